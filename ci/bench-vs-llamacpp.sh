#!/usr/bin/env bash
# meo vs llama.cpp, side by side: one machine, one >= 1 GB MoE checkpoint, the same prompt and
# generation lengths, the same thread count.
#
#   ci/bench-vs-llamacpp.sh
#
# 1. A Python venv with what llama.cpp's HF converter needs (torch, numpy, sentencepiece,
#    pyyaml, tqdm, transformers) and the build tools (cmake, ninja), all from PyPI.
#    MEO_BENCH_PYTHON=/path/to/python reuses an interpreter that already has them.
# 2. llama.cpp from the PyPI `llama-cpp-python` sdist (it vendors llama.cpp), built Release with
#    native CPU flags: llama-bench.
# 3. A synthetic Mixtral-shaped bf16 checkpoint (converter/examples/synth_hf.rs; random weights,
#    which is fine for speed) with a SentencePiece tokenizer, trained here on CPython's docs text.
# 4. GGUF Q8_0 with llama.cpp's convert_hf_to_gguf.py; .meo with `meo convert --dense int8` (int8
#    everywhere but norms and routers, as Q8_0).
# 5. Both files dropped from the page cache and read back (fresh pages for both, see below).
#    REPS rounds, each: `llama-bench -t T -p 128 -n 64 -r 1`, the streaming-read bandwidth
#    probe with the same thread count (converter/examples/bandwidth.rs, best of 5 passes), and
#    `meo bench --threads T --prompt-len 128 --gen 64`; medians over the rounds.
# 6. With MEO_BENCH_DEPTH=D, as many rounds of decoding after D tokens of context (llama-bench
#    -p 0 -n 64 -d D, meo bench --prompt-len D): attention over a long KV cache.
#
# The last line is exactly `decode_ratio=X prompt_ratio=Y bandwidth_fraction=Z`: meo ÷ llama.cpp
# tokens/s, and meo's bytes read per decoded token (dense + selected experts + KV cache) ×
# decode tokens/s ÷ measured bandwidth (the median of the rounds' probes).
#
# Env: MEO_BENCH_DIR (default target/bench-llamacpp), MEO_BENCH_THREADS (2), MEO_BENCH_REPS (10),
#      MEO_BENCH_PYTHON, MEO_LLAMA_SDIST (a downloaded llama_cpp_python-0.3.36.tar.gz),
#      MEO_BENCH_SHAPE ("layers hidden intermediate experts top_k vocab", default
#      "8 1024 1280 32 4 8000": 1.07 GB in Q8_0), MEO_BENCH_WRAP (a command prefix for all three
#      measurements, e.g. "chrt -f 10" on a machine shared with other jobs: both tools and the
#      bandwidth probe get the same priority), MEO_BENCH_DEPTH (0; see 6).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WORK=${MEO_BENCH_DIR:-target/bench-llamacpp}
THREADS=${MEO_BENCH_THREADS:-2}
read -r -a WRAP <<<"${MEO_BENCH_WRAP:-}"
REPS=${MEO_BENCH_REPS:-10}
DEPTH=${MEO_BENCH_DEPTH:-0}
read -r LAYERS HIDDEN INTER EXPERTS TOPK VOCAB <<<"${MEO_BENCH_SHAPE:-8 1024 1280 32 4 8000}"
LLAMA_VERSION=0.3.36
PROMPT=128
GEN=64
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

say() { printf '\n=== %s\n' "$*" >&2; }

say "python"
if [[ -n ${MEO_BENCH_PYTHON:-} ]]; then
  PY=$MEO_BENCH_PYTHON
else
  if [[ ! -x $WORK/venv/bin/python ]]; then
    python3 -m venv "$WORK/venv"
  fi
  PY=$WORK/venv/bin/python
  "$PY" -m pip install --quiet torch numpy sentencepiece pyyaml tqdm transformers cmake ninja
fi
"$PY" -c "import torch, numpy, sentencepiece, yaml, tqdm, transformers" || {
  echo "error: $PY lacks torch/numpy/sentencepiece/pyyaml/tqdm/transformers" >&2
  exit 1
}
PYBIN=$(dirname "$PY")
export PATH="$PYBIN:$PATH"
command -v cmake >/dev/null && command -v ninja >/dev/null || "$PY" -m pip install --quiet cmake ninja

say "llama.cpp $LLAMA_VERSION (llama-cpp-python sdist)"
SRC=$WORK/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
if [[ ! -d $SRC ]]; then
  SDIST=${MEO_LLAMA_SDIST:-}
  if [[ -z $SDIST ]]; then
    "$PY" -m pip download --quiet --no-binary llama-cpp-python --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$WORK"
    SDIST=$WORK/llama_cpp_python-$LLAMA_VERSION.tar.gz
  fi
  tar xzf "$SDIST" -C "$WORK"
fi
if [[ ! -x $WORK/llama-build/bin/llama-bench ]]; then
  cmake -S "$SRC" -B "$WORK/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$WORK/llama-build" --target llama-bench -j "$(nproc)" >&2
fi
LLAMA_BENCH=$WORK/llama-build/bin/llama-bench

say "meo"
cargo build --release -p meo-cli --bin meo >&2
cargo build --release -p meo-converter --example synth_hf --example bandwidth >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
MEO=$TARGET_DIR/release/meo

HF=$WORK/hf-$LAYERS-$HIDDEN-$INTER-$EXPERTS-$TOPK-$VOCAB
if [[ ! -f $HF/config.json ]]; then
  say "checkpoint $HF"
  rm -rf "$HF"
  "$TARGET_DIR/release/examples/synth_hf" "$HF" --layers "$LAYERS" --hidden "$HIDDEN" \
    --intermediate "$INTER" --experts "$EXPERTS" --top-k "$TOPK" --vocab "$VOCAB" >&2
  # llama.cpp's converter needs a tokenizer it knows: a Llama-style SentencePiece BPE model.
  "$PY" - "$HF" "$VOCAB" <<'PY'
import sys, io, pydoc_data.topics, sentencepiece as spm
out, vocab = sys.argv[1], int(sys.argv[2])
text = "\n".join(pydoc_data.topics.topics.values())
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text.splitlines()), model_prefix=f"{out}/tokenizer", vocab_size=vocab,
    model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
    minloglevel=2)
PY
fi

GGUF=$HF/model-q8_0.gguf
if [[ ! -f $GGUF ]]; then
  say "GGUF Q8_0"
  PYTHONPATH="$SRC/gguf-py:$SRC" "$PY" "$SRC/convert_hf_to_gguf.py" "$HF" --outtype q8_0 --outfile "$GGUF.tmp" >&2
  mv "$GGUF.tmp" "$GGUF"
fi
MEOFILE=$HF/model.meo
if [[ ! -f $MEOFILE ]]; then
  say "meo convert"
  "$MEO" convert "$HF" -o "$MEOFILE" --experts int8 --dense int8 --align-experts off >&2
fi
ls -l "$GGUF" "$MEOFILE" >&2

# Both files start from freshly read page-cache pages, the same for both: on some VMs pages that
# sat in the cache for hours read markedly slower than fresh ones (docs/PERFORMANCE.md: a .meo
# decoded 130-149 tok/s from such pages and 172-179 once dropped and read back), and which file
# has old pages depends on its history. Dropped with posix_fadvise(DONTNEED) (clean, unmapped
# pages only, hence the fsync) and read back once, so the timed runs read no disk.
say "page cache: both files dropped and read back"
"$PY" - "$GGUF" "$MEOFILE" <<'EOF'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 24):
            pass
    finally:
        os.close(fd)
EOF

say "benchmarks and bandwidth ($REPS runs each, interleaved; $THREADS threads)"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
for r in $(seq "$REPS"); do
  # The probe runs between the two tools, every round: on a shared machine the bandwidth moves
  # from minute to minute, and the fraction must compare figures from the same minutes.
  "${WRAP[@]}" "$TARGET_DIR/release/examples/bandwidth" --threads "$THREADS" --reps 5 --json |
    sed 's/^/{"tool":"bandwidth","run":'"$r"',"row":/; s/$/}/' >>"$RESULTS"
  "${WRAP[@]}" "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r 1 -o jsonl 2>/dev/null |
    sed 's/^/{"tool":"llama.cpp","run":'"$r"',"row":/; s/$/}/' >>"$RESULTS"
  "${WRAP[@]}" "$MEO" bench "$MEOFILE" --threads "$THREADS" --prompt-len "$PROMPT" --gen "$GEN" --seed "$r" --json |
    sed 's/^/{"tool":"meo","run":'"$r"',"row":/; s/$/}/' >>"$RESULTS"
  printf '.' >&2
done
echo >&2

if ((DEPTH > 0)); then
  say "decoding after $DEPTH tokens of context ($REPS rounds)"
  for r in $(seq "$REPS"); do
    "${WRAP[@]}" "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -p 0 -n "$GEN" -d "$DEPTH" -r 1 -o jsonl 2>/dev/null |
      sed 's/^/{"tool":"llama.cpp-depth","run":'"$r"',"row":/; s/$/}/' >>"$RESULTS"
    "${WRAP[@]}" "$MEO" bench "$MEOFILE" --threads "$THREADS" --prompt-len "$DEPTH" --gen "$GEN" --seed "$r" --json |
      sed 's/^/{"tool":"meo-depth","run":'"$r"',"row":/; s/$/}/' >>"$RESULTS"
    printf '.' >&2
  done
  echo >&2
fi

"$PY" - "$RESULTS" "$THREADS" "$PROMPT" "$GEN" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
threads, prompt, gen = sys.argv[2:5]
llama_pp = [r["row"]["avg_ts"] for r in rows if r["tool"] == "llama.cpp" and r["row"]["n_prompt"] > 0]
llama_tg = [r["row"]["avg_ts"] for r in rows if r["tool"] == "llama.cpp" and r["row"]["n_gen"] > 0]
meo = [r["row"] for r in rows if r["tool"] == "meo"]
meo_pp = st.median(m["prompt_tokens_per_s"] for m in meo)
meo_tg = st.median(m["decode_tokens_per_s"] for m in meo)
bpt = st.median(m["bytes_per_token"] for m in meo)
lpp, ltg = st.median(llama_pp), st.median(llama_tg)
# Each round's probe: its best pass; the ceiling is the median over rounds.
probes = [r["row"]["best_gb_s"] for r in rows if r["tool"] == "bandwidth"]
bw_gb = st.median(probes)
frac = bpt * meo_tg / (bw_gb * 1e9)
print(f"threads {threads}, prompt {prompt}, generate {gen}, {len(meo)} runs each (medians)")
print(f"{'':>10} {'prompt tok/s':>14} {'decode tok/s':>14}")
print(f"{'llama.cpp':>10} {lpp:14.1f} {ltg:14.1f}")
print(f"{'meo':>10} {meo_pp:14.1f} {meo_tg:14.1f}")
print(f"meo bytes per decoded token: {bpt / 1e6:.1f} MB (dense {meo[0]['dense_bytes_per_token'] / 1e6:.1f} MB"
      f" + experts {st.median(m['expert_bytes_per_token'] for m in meo) / 1e6:.1f} MB"
      f" + KV cache {st.median(m.get('kv_bytes_per_token', 0) for m in meo) / 1e6:.1f} MB)")
print(f"streaming-read bandwidth ({threads} threads, one probe per round, its best pass): median {bw_gb:.2f} GB/s,"
      f" range {min(probes):.2f}-{max(probes):.2f} GB/s")
print(f"meo achieved {bpt * meo_tg / 1e9:.2f} GB/s; against the highest probe: {bpt * meo_tg / (max(probes) * 1e9):.3f}")
depth_l = [r["row"]["avg_ts"] for r in rows if r["tool"] == "llama.cpp-depth" and r["row"]["n_gen"] > 0]
depth_m = [r["row"]["decode_tokens_per_s"] for r in rows if r["tool"] == "meo-depth"]
if depth_l and depth_m:
    dl, dm = st.median(depth_l), st.median(depth_m)
    depth = next(r["row"]["prompt_tokens"] for r in rows if r["tool"] == "meo-depth")
    print(f"decode after {depth} tokens of context: llama.cpp {dl:.1f}, meo {dm:.1f} tok/s, ratio {dm / dl:.3f}")
print(f"decode_ratio={meo_tg / ltg:.3f} prompt_ratio={meo_pp / lpp:.3f} bandwidth_fraction={frac:.3f}")
PY
