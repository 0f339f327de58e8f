#!/usr/bin/env bash
# What the approximate on-miss fallbacks cost (docs/PERFORMANCE.md, "On a miss"): each trained
# fixture is converted with its merged experts for misses (`--miss-merge`, frequency-weighted
# on the docs calibration text), then `meo eval` runs exact, `--on-miss resident` and
# `--on-miss merged` under budgets of 25, 50 and 75 % of the expert bytes (plus the pinned
# dense tensors) on held-out docs text. Prints one JSON object per line (also saved under $OUT).
#
# Usage: examples/meo/on-miss.sh [MODEL_DIR ...]
#   default models: tests/fixtures/trained/mixtral-scratch tests/fixtures/trained/mixtral-upcycled
# Env: MEO (the meo binary; default target/release/meo), PY (a python3 with the standard
# library; default python3), OUT (work folder; default /tmp/meo-on-miss), WINDOWS (max windows,
# default 0 = all).
#
# Text: as examples/meo/fidelity.sh (pydoc_data topics, training split for calibration, the
# held-out split for evaluation).
set -euo pipefail
cd "$(dirname "$0")/../.."
MEO=${MEO:-${CARGO_TARGET_DIR:-target}/release/meo}
PY=${PY:-python3}
OUT=${OUT:-/tmp/meo-on-miss}
WINDOWS=${WINDOWS:-0}
mkdir -p "$OUT"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tests/fixtures/trained/mixtral-scratch tests/fixtures/trained/mixtral-upcycled)

"$PY" - "$OUT" <<'PYEOF'
import sys, pydoc_data.topics
from pathlib import Path
out = Path(sys.argv[1])
topics = pydoc_data.topics.topics; keys = sorted(topics)
(out / "docs_calib.txt").write_text("\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 != 5)[:60000])
(out / "docs_held.txt").write_text("\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 == 5))
PYEOF

emit() { echo "$1" | tee -a "$OUT/results.jsonl"; }
: >"$OUT/results.jsonl"
for dir in "${models[@]}"; do
  name=$(basename "$dir")
  f="$OUT/$name.meo"
  "$MEO" convert "$dir" -o "$f" --experts int8 --miss-merge --calib "$OUT/docs_calib.txt" \
    --merge-weighting frequency >&2
  # The pinned dense bytes and the expert bytes, from a bench run with a budget.
  read -r dense experts < <("$MEO" bench "$f" --prompt-len 1 --gen 1 --memory-budget 1G --json |
    "$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["dense_pinned_bytes"], j["expert_bytes_in_file"])')
  for frac in 0.25 0.5 0.75; do
    budget=$("$PY" -c "print(int($dense + $frac * $experts))")
    for on_miss in exact resident merged; do
      emit "{\"model\":\"$name\",\"fraction\":$frac,\"budget\":$budget,\"on_miss\":\"$on_miss\",\"eval\":$("$MEO" eval "$f" \
        --data "$OUT/docs_held.txt" --max-windows "$WINDOWS" --json --on-miss "$on_miss" --memory-budget "$budget")}"
    done
  done
done
