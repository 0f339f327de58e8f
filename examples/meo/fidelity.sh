#!/usr/bin/env bash
# Fidelity of MEO merged execution on standard token-routed MoEs (docs/MEO-MERGING.md, "Merging
# standard MoEs"): converts each model with and without expert alignment and with two task
# merges from calibration text, then runs `meo eval` for every mode and `meo bench` for
# vanilla vs task mode. Prints one JSON object per line (also saved under $OUT).
#
# Usage: examples/meo/fidelity.sh [MODEL_DIR ...]
#   default models: tests/fixtures/trained/mixtral-upcycled tests/fixtures/trained/mixtral-scratch
# Env: MEO (the meo binary; default target/release/meo), PY (a python3 with the standard
# library; default python3), OUT (work folder; default /tmp/meo-fidelity), BUDGET (0.25).
#
# Text (PSF licence, shipped with CPython, as examples/train/train.py uses it):
#   docs: pydoc_data/topics.py topics; code: standard-library modules. Calibration text comes
#   from the training split, evaluation from the held-out split of train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
MEO=${MEO:-${CARGO_TARGET_DIR:-target}/release/meo}
PY=${PY:-python3}
OUT=${OUT:-/tmp/meo-fidelity}
BUDGET=${BUDGET:-0.25}
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
for dir in "${models[@]}"; do
  name=$(basename "$dir")
  for align in on off; do
    f="$OUT/$name-align-$align.meo"
    "$MEO" convert "$dir" -o "$f" --align-experts "$align" \
      --task docs="$OUT/docs_calib.txt" --task code="$OUT/code_calib.txt" >&2
    for data in docs code; do
      d="$OUT/${data}_held.txt"
      run() { emit "{\"model\":\"$name\",\"align\":\"$align\",\"data\":\"$data\",\"run\":\"$1\",\"eval\":$("$MEO" eval "$f" --data "$d" --json "${@:2}")}"; }
      [ "$align" = on ] && run vanilla --mode vanilla
      run prompt-mean-gate --mode prompt --prompt-pool mean-gate
      run prompt-pooled-input --mode prompt --prompt-pool pooled-input
      run prompt-auto --mode prompt --merge-layers auto --merge-budget "$BUDGET"
      run task-right --mode "task:$data"
      run task-auto --mode "task:$data" --merge-layers auto --merge-budget "$BUDGET"
    done
  done
  f="$OUT/$name-align-on.meo"
  for mode in vanilla task:docs; do
    emit "{\"model\":\"$name\",\"bench\":\"$mode\",\"result\":$("$MEO" bench "$f" --mode "$mode" --prompt-len 32 --gen 96 --threads 1 --json)}"
  done
done
