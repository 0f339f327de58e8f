#!/usr/bin/env bash
# Expert compression at conversion (docs/COMPRESSION.md): converts each model uncompressed and
# with every `--compress` method at 25 %, 50 % and 75 % of the expert bytes, calibrated on one
# domain's training text, then runs `meo eval --reference` (the uncompressed file) on that
# domain's held-out text. Prints one JSON object per line (also saved under $OUT).
#
# Usage: examples/meo/compress.sh [MODEL_DIR ...]
#   default models: tests/fixtures/trained/mixtral-upcycled tests/fixtures/trained/mixtral-scratch
# Env: MEO (the meo binary; default target/release/meo), PY (python3), OUT (work folder;
# default /tmp/meo-compress), DATA (docs or code; default docs), METHODS (default
# "prune reap mc-smoe eep").
#
# Text: as examples/meo/fidelity.sh (CPython's pydoc topics and standard library, PSF licence):
# calibration from the training split, evaluation from the held-out split of train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
MEO=${MEO:-${CARGO_TARGET_DIR:-target}/release/meo}
PY=${PY:-python3}
OUT=${OUT:-/tmp/meo-compress}
DATA=${DATA:-docs}
METHODS=${METHODS:-prune reap mc-smoe eep}
mkdir -p "$OUT"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tests/fixtures/trained/mixtral-upcycled tests/fixtures/trained/mixtral-scratch)

"$PY" - "$OUT" <<'PYEOF'
import os, sys, pydoc_data.topics
from pathlib import Path
out = Path(sys.argv[1]); lib = Path(os.__file__).resolve().parent
topics = pydoc_data.topics.topics; keys = sorted(topics)
train = ["argparse.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py", "pathlib.py", "shutil.py", "threading.py"]
held = ["contextlib.py", "fractions.py"]
(out / "docs_calib.txt").write_text("\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 != 5)[:60000])
(out / "docs_held.txt").write_text("\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 == 5))
(out / "code_calib.txt").write_text("\n\n".join((lib / f).read_text() for f in train)[:60000])
(out / "code_held.txt").write_text("\n\n".join((lib / f).read_text() for f in held))
PYEOF

emit() { echo "$1" | tee -a "$OUT/results.jsonl"; }
: > "$OUT/results.jsonl"
bytes() { "$MEO" inspect "$1" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["expert_bytes"])'; }
for dir in "${models[@]}"; do
  name=$(basename "$dir")
  ref="$OUT/$name.meo"
  "$MEO" convert "$dir" -o "$ref" >&2
  emit "{\"model\":\"$name\",\"method\":\"none\",\"keep\":1,\"expert_bytes\":$(bytes "$ref"),\"file_bytes\":$(stat -c %s "$ref")}"
  for method in $METHODS; do
    for keep in 0.75 0.5 0.25; do
      frac=$("$PY" -c "print(round(1 - $keep, 4))")
      f="$OUT/$name-$method-$keep.meo"
      "$MEO" convert "$dir" -o "$f" --compress "$method:$frac" --calib "$OUT/${DATA}_calib.txt" >&2
      e=$("$MEO" eval "$f" --reference "$ref" --data "$OUT/${DATA}_held.txt" --json)
      emit "{\"model\":\"$name\",\"method\":\"$method\",\"keep\":$keep,\"data\":\"$DATA\",\"expert_bytes\":$(bytes "$f"),\"file_bytes\":$(stat -c %s "$f"),\"eval\":$e}"
    done
  done
done
