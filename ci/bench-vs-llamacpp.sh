#!/usr/bin/env bash
# meo vs llama.cpp, side by side: one machine, one >= 1 GB MoE checkpoint, the same prompt and
# generation lengths, the same thread count; and the perplexity of both on one trained model.
#
#   ci/bench-vs-llamacpp.sh
#
# 1. A Python venv with what llama.cpp's HF converter needs (torch, numpy, sentencepiece,
#    pyyaml, tqdm, transformers) and the build tools (cmake, ninja), all from PyPI.
#    MEO_BENCH_PYTHON=/path/to/python reuses an interpreter that already has them.
# 2. llama.cpp from the PyPI `llama-cpp-python` sdist (it vendors llama.cpp), built Release with
#    native CPU flags: llama-bench, llama-quantize, llama-perplexity, llama-tokenize. On a CPU
#    whose CPUID advertises AMX while the kernel or hypervisor has not enabled it (VMs: a native
#    build dies with SIGILL in `tilezero`), the script finds out with a small probe program
#    (request the tile state with arch_prctl, run `tilezero`) and builds with -mno-amx-* (its
#    own build folder); the output says which. MEO_BENCH_AMX=off forces the AMX-less build.
#    Builds are kept under MEO_BENCH_DIR: a second run only re-checks them.
# 3. A synthetic Mixtral-shaped bf16 checkpoint (converter/examples/synth_hf.rs; random weights,
#    which is fine for speed) with a SentencePiece tokenizer, trained here on CPython's docs text.
# 4. GGUF Q8_0 with llama.cpp's convert_hf_to_gguf.py; .meo with `meo convert --dense int8` (int8
#    everywhere but norms and routers, as Q8_0). 4-bit (MEO_BENCH_4BIT=1, the default): GGUF f16,
#    then `llama-quantize` Q4_K_M and Q4_0 (the f16 file is deleted afterwards); .meo with
#    `--experts int4 --dense int8` and `--experts mxfp4 --dense int8` (attention, embeddings and
#    head Q8_0-like int8, where llama.cpp's are 4/6-bit), and `--experts int4 --dense int4` (4-bit
#    everywhere, as Q4_0).
# 5. Every benchmarked file dropped from the page cache and read back (fresh pages for all, see
#    below). REPS rounds, each: the streaming-read bandwidth probe with the same thread count
#    (converter/examples/bandwidth.rs, best of 5 passes), `llama-bench -t T -p 128 -n 64 -r 1` on
#    each GGUF and `meo bench --threads T --prompt-len 128 --gen 64` on each .meo, in turn:
#    Q8_0, meo int8, Q4_K_M, Q4_0, meo int4, meo mxfp4, meo int4 with dense int4; medians over
#    the rounds.
# 6. With MEO_BENCH_DEPTH=D, as many rounds of decoding after D tokens of context (llama-bench
#    -p 0 -n 64 -d D, meo bench --prompt-len D), Q8_0 against int8: attention over a long KV cache.
# 7. Perplexity (MEO_BENCH_PPL=1, the default) of both tools on the same held-out text, with a
#    trained MoE both can read: MEO_BENCH_PPL_MODEL (default tests/fixtures/trained/
#    mixtral-scratch, a MixtralForCausalLM trained by examples/train/train.py) and its held-out
#    split (8 pydoc topics + contextlib.py + fractions.py of this Python, as train.py splits
#    them; a digest mismatch with the fixture's metrics.json is reported). Its tokenizer is a
#    byte-level BPE whose hash convert_hf_to_gguf.py does not know: the converter runs with its
#    pre-tokenizer check answering "gpt-2" (the GPT-2 regex, which is what the tokenizer's
#    ByteLevel pre-tokenizer with use_regex applies) only for such a tokenizer, and the script
#    checks that llama-tokenize gives the same ids as Python `tokenizers` on the whole text.
#    Both tools score the same tokens: non-overlapping windows of 128 tokens (the model's
#    context), the first 64 of each window context only, the next-token predictions of tokens
#    65..127 scored (63 per window), over the same number of whole windows: `llama-perplexity
#    -c 128 -b 128 --no-escape` (without --no-escape it would turn "\n" written in the Python
#    sources into newlines before tokenizing) against `meo eval --window 128 --prompt-len 64
#    --max-windows N`. llama.cpp: f16, Q8_0, Q4_K_M, Q4_0 (llama-quantize from the f16 file,
#    whole model); meo: experts f32, int8, int4, mxfp4 with dense f32, and int8, int4 with dense
#    int8 (the benchmarked form). When the model's widths are not multiples of 256 (the bundled
#    models: hidden 64), llama-quantize stores K-quant tensors in its fallback types (Q4_K ->
#    Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0): the script prints llama-quantize's fallback count, so read Q4_K_M there
#    as "what llama.cpp's Q4_K_M recipe gives on this model".
#
# Output: a table per part. The last two lines are exactly
#   decode_ratio=X prompt_ratio=Y bandwidth_fraction=Z
#   decode_ratio_q4km=A prompt_ratio_q4km=B ppl_ratio_q4km=C
# The first (the Q8_0 comparison, unchanged): meo int8 ÷ llama.cpp Q8_0 tokens/s, and meo's bytes
# read per decoded token (dense + selected experts + KV cache) × decode tokens/s ÷ measured
# bandwidth (the median of the rounds' probes). The second: meo int4 ÷ llama.cpp Q4_K_M tokens/s,
# and meo int4's perplexity (--dense int8, the benchmarked form) ÷ llama.cpp Q4_K_M's; a part
# that was switched off prints `na`.
#
# Env: MEO_BENCH_DIR (default target/bench-llamacpp), MEO_BENCH_THREADS (2), MEO_BENCH_REPS (10),
#      MEO_BENCH_PYTHON, MEO_LLAMA_SDIST (a downloaded llama_cpp_python-0.3.36.tar.gz),
#      MEO_BENCH_JOBS (build jobs for llama.cpp, default nproc), MEO_BENCH_AMX (auto|off),
#      MEO_BENCH_SHAPE ("layers hidden intermediate experts top_k vocab", default
#      "8 1024 1280 32 4 8000": 1.07 GB in Q8_0), MEO_BENCH_WRAP (a command prefix for all
#      measurements, e.g. "chrt -f 10" on a machine shared with other jobs: both tools and the
#      bandwidth probe get the same priority), MEO_BENCH_DEPTH (0; see 6), MEO_BENCH_4BIT (1),
#      MEO_BENCH_PPL (1), MEO_BENCH_PPL_MODEL (see 7), MEO_BENCH_SETUP_ONLY (0; 1 = steps 1-4
#      only, then the paths as shell assignments on stdout: ci/bench-memory.sh uses it),
#      MEO_BENCH_MEO (with MEO_BENCH_SETUP_ONLY=1: use this meo binary instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WORK=${MEO_BENCH_DIR:-target/bench-llamacpp}
THREADS=${MEO_BENCH_THREADS:-2}
read -r -a WRAP <<<"${MEO_BENCH_WRAP:-}"
REPS=${MEO_BENCH_REPS:-10}
DEPTH=${MEO_BENCH_DEPTH:-0}
FOURBIT=${MEO_BENCH_4BIT:-1}
PPL=${MEO_BENCH_PPL:-1}
PPL_MODEL=${MEO_BENCH_PPL_MODEL:-$ROOT/tests/fixtures/trained/mixtral-scratch}
JOBS=${MEO_BENCH_JOBS:-$(nproc)}
AMX=${MEO_BENCH_AMX:-auto}
read -r LAYERS HIDDEN INTER EXPERTS TOPK VOCAB <<<"${MEO_BENCH_SHAPE:-8 1024 1280 32 4 8000}"
LLAMA_VERSION=0.3.36
PROMPT=128
GEN=64
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
PPL_MODEL=$(cd "$PPL_MODEL" && pwd)
START=$SECONDS

say() { printf '\n=== %s\n' "$*" >&2; }

say "python"
if [[ -n ${MEO_BENCH_PYTHON:-} ]]; then
  PY=$MEO_BENCH_PYTHON
else
  if [[ ! -x $WORK/venv/bin/python ]]; then
    python3 -m venv "$WORK/venv"
  fi
  PY=$WORK/venv/bin/python
  "$PY" -c "import torch, numpy, sentencepiece, yaml, tqdm, transformers, cmake, ninja" 2>/dev/null ||
    "$PY" -m pip install --quiet torch numpy sentencepiece pyyaml tqdm transformers cmake ninja
fi
"$PY" -c "import torch, numpy, sentencepiece, yaml, tqdm, transformers, tokenizers" || {
  echo "error: $PY lacks torch/numpy/sentencepiece/pyyaml/tqdm/transformers/tokenizers" >&2
  exit 1
}
PYBIN=$(dirname "$PY")
export PATH="$PYBIN:$PATH"
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  "$PY" -m pip install --quiet cmake ninja
fi

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

# AMX: a native build compiles ggml's AMX kernels when the compiler's -march=native enables
# amx-tile/amx-int8, i.e. when CPUID advertises them. Some VMs advertise AMX without the kernel
# (or hypervisor) enabling the tile state; ggml then dies with SIGILL in `tilezero`. Probe the
# instruction itself, as ggml would use it, and build without AMX when it fails.
CC_=${CC:-cc}
amx_native=$("$CC_" -march=native -Q --help=target 2>/dev/null | awk '$1 == "-mamx-tile" { print $2 }')
NOAMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD=$WORK/llama-build
CMAKE_EXTRA=()
amx_off() {
  BUILD=$WORK/llama-build-noamx
  CMAKE_EXTRA=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    "-DCMAKE_C_FLAGS=$NOAMX_FLAGS" "-DCMAKE_CXX_FLAGS=$NOAMX_FLAGS")
}
if [[ $AMX == off ]]; then
  amx_off
  AMX_NOTE="AMX: off (MEO_BENCH_AMX=off): llama.cpp built natively with $NOAMX_FLAGS"
elif [[ $amx_native != "[enabled]" ]]; then
  AMX_NOTE="AMX: not advertised by this CPU (-march=native leaves amx-tile ${amx_native:-unknown}): plain native build"
else
  cat >"$WORK/amx-probe.c" <<'C'
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
  /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA: what ggml asks for before using AMX. */
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 2;
  struct { uint8_t palette, start; uint8_t res[14]; uint16_t colsb[16]; uint8_t rows[16]; }
      __attribute__((aligned(64))) cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  cfg.colsb[0] = 64;
  cfg.rows[0] = 16;
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_release();
  return 0;
}
C
  probe_rc=0
  if "$CC_" -O1 -mamx-tile -o "$WORK/amx-probe" "$WORK/amx-probe.c" 2>/dev/null; then
    "$WORK/amx-probe" 2>/dev/null || probe_rc=$?
  else
    probe_rc=compile
  fi
  if [[ $probe_rc == 0 ]]; then
    AMX_NOTE="AMX: advertised and usable (tilezero probe ran): native build, ggml's AMX kernels included"
  else
    amx_off
    AMX_NOTE="AMX: CPUID advertises it but the probe failed (exit $probe_rc: tile state not enabled by the kernel/hypervisor): llama.cpp built WITHOUT AMX ($NOAMX_FLAGS)"
  fi
fi
echo "$AMX_NOTE" >&2
LLAMA_TARGETS=(llama-bench llama-quantize llama-perplexity llama-tokenize)
if [[ ! -f $BUILD/build.ninja ]]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    "${CMAKE_EXTRA[@]}" >&2
fi
# A no-op when the binaries are up to date (a second run).
cmake --build "$BUILD" --target "${LLAMA_TARGETS[@]}" -j "$JOBS" >&2
LLAMA_BENCH=$BUILD/bin/llama-bench
LLAMA_QUANTIZE=$BUILD/bin/llama-quantize
LLAMA_PPL=$BUILD/bin/llama-perplexity
LLAMA_TOKENIZE=$BUILD/bin/llama-tokenize
# The converter, with one hook: a byte-level BPE tokenizer whose hash it does not know (meo's
# trained fixtures) is converted as GPT-2's pre-tokenizer, which is the one such a tokenizer
# applies; any other unknown tokenizer still fails as upstream does.
cat >"$WORK/convert.py" <<'PY'
import json, runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [f"{src}/gguf-py", src]
import conversion.base as base

orig = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        tj = json.loads((self.dir_model / "tokenizer.json").read_text())
        pt = tj.get("pre_tokenizer") or {}
        if (pt.get("type") == "ByteLevel" and pt.get("use_regex", True)
                and not pt.get("add_prefix_space") and tj.get("normalizer") is None
                and tj.get("model", {}).get("type") == "BPE"):
            print("convert: unknown byte-level BPE tokenizer hash; its pre-tokenizer is GPT-2's regex: "
                  "tokenizer.ggml.pre = gpt-2", file=sys.stderr)
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = f"{src}/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
PY
convert_gguf() { # HF_DIR OUTTYPE OUT
  [[ -f $3 ]] && return
  "$PY" "$WORK/convert.py" "$SRC" "$1" --outtype "$2" --outfile "$3.tmp" >&2
  mv "$3.tmp" "$3"
}
quantize_gguf() { # F16 TYPE OUT (prints llama-quantize's fallback warning, if any)
  [[ -f $3 ]] && return
  "$LLAMA_QUANTIZE" "$1" "$3.tmp" "$2" "$THREADS" >"$3.log" 2>&1 || { cat "$3.log" >&2; exit 1; }
  grep -i 'fallback' "$3.log" >&2 || true
  mv "$3.tmp" "$3"
}

say "meo"
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [[ -n ${MEO_BENCH_MEO:-} && ${MEO_BENCH_SETUP_ONLY:-0} == 1 ]]; then
  # A meo built already (e.g. by ci/test's feature selection, which this build's differs from:
  # a second build of every dependency). Setup then needs no example unless the checkpoint is
  # missing.
  MEO=$MEO_BENCH_MEO
else
  cargo build --release -p meo-cli --bin meo >&2
  cargo build --release -p meo-converter --example synth_hf --example bandwidth >&2
  MEO=$TARGET_DIR/release/meo
fi

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

say "GGUF and .meo files"
GGUF=$HF/model-q8_0.gguf
convert_gguf "$HF" q8_0 "$GGUF"
MEOFILE=$HF/model.meo
[[ -f $MEOFILE ]] || "$MEO" convert "$HF" -o "$MEOFILE" --experts int8 --dense int8 --align-experts off >&2
FILES=("$GGUF" "$MEOFILE")
GGUF_Q4KM=$HF/model-q4_k_m.gguf
GGUF_Q40=$HF/model-q4_0.gguf
MEO_INT4=$HF/model-int4.meo
MEO_MXFP4=$HF/model-mxfp4.meo
MEO_INT4D4=$HF/model-int4-dense-int4.meo
if ((FOURBIT)); then
  if [[ ! -f $GGUF_Q4KM || ! -f $GGUF_Q40 ]]; then
    convert_gguf "$HF" f16 "$HF/model-f16.gguf"
    quantize_gguf "$HF/model-f16.gguf" Q4_K_M "$GGUF_Q4KM"
    quantize_gguf "$HF/model-f16.gguf" Q4_0 "$GGUF_Q40"
    rm -f "$HF/model-f16.gguf"
  fi
  [[ -f $MEO_INT4 ]] || "$MEO" convert "$HF" -o "$MEO_INT4" --experts int4 --dense int8 --align-experts off >&2
  [[ -f $MEO_MXFP4 ]] || "$MEO" convert "$HF" -o "$MEO_MXFP4" --experts mxfp4 --dense int8 --align-experts off >&2
  [[ -f $MEO_INT4D4 ]] || "$MEO" convert "$HF" -o "$MEO_INT4D4" --experts int4 --dense int4 --align-experts off >&2
  FILES+=("$GGUF_Q4KM" "$GGUF_Q40" "$MEO_INT4" "$MEO_MXFP4" "$MEO_INT4D4")
fi
ls -l "${FILES[@]}" >&2
# MEO_BENCH_SETUP_ONLY=1 (ci/bench-memory.sh): stop here and print what was built, as shell
# assignments, on stdout.
if [[ ${MEO_BENCH_SETUP_ONLY:-0} == 1 ]]; then
  printf 'LLAMA_BENCH=%q\nGGUF=%q\nMEOFILE=%q\nMEO=%q\nPY=%q\nCONVERT_PY=%q\nLLAMA_SRC=%q\nTARGET_DIR=%q\n' \
    "$LLAMA_BENCH" "$GGUF" "$MEOFILE" "$MEO" "$PY" "$WORK/convert.py" "$SRC" "$TARGET_DIR"
  exit 0
fi

# Every file starts from freshly read page-cache pages, the same for all: on some VMs pages that
# sat in the cache for hours read markedly slower than fresh ones (docs/PERFORMANCE.md: a .meo
# decoded 130-149 tok/s from such pages and 172-179 once dropped and read back), and which file
# has old pages depends on its history. Dropped with posix_fadvise(DONTNEED) (clean, unmapped
# pages only, hence the fsync) and read back once, so the timed runs read no disk.
say "page cache: ${#FILES[@]} files dropped and read back"
"$PY" - "${FILES[@]}" <<'EOF'
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

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
llama_row() { # TOOL RUN FILE ARGS...
  local tool=$1 run=$2 file=$3
  shift 3
  "${WRAP[@]}" "$LLAMA_BENCH" -m "$file" -t "$THREADS" "$@" -r 1 -o jsonl 2>/dev/null |
    sed 's/^/{"tool":"'"$tool"'","run":'"$run"',"row":/; s/$/}/' >>"$RESULTS"
}
meo_row() { # TOOL RUN FILE ARGS...
  local tool=$1 run=$2 file=$3
  shift 3
  "${WRAP[@]}" "$MEO" bench "$file" --threads "$THREADS" "$@" --seed "$run" --json |
    sed 's/^/{"tool":"'"$tool"'","run":'"$run"',"row":/; s/$/}/' >>"$RESULTS"
}

say "benchmarks and bandwidth ($REPS rounds, interleaved; $THREADS threads)"
for r in $(seq "$REPS"); do
  # The probe runs between the tools, every round: on a shared machine the bandwidth moves from
  # minute to minute, and the fraction must compare figures from the same minutes.
  "${WRAP[@]}" "$TARGET_DIR/release/examples/bandwidth" --threads "$THREADS" --reps 5 --json |
    sed 's/^/{"tool":"bandwidth","run":'"$r"',"row":/; s/$/}/' >>"$RESULTS"
  llama_row llama.cpp "$r" "$GGUF" -p "$PROMPT" -n "$GEN"
  meo_row meo "$r" "$MEOFILE" --prompt-len "$PROMPT" --gen "$GEN"
  if ((FOURBIT)); then
    llama_row llama.cpp-q4_k_m "$r" "$GGUF_Q4KM" -p "$PROMPT" -n "$GEN"
    llama_row llama.cpp-q4_0 "$r" "$GGUF_Q40" -p "$PROMPT" -n "$GEN"
    meo_row meo-int4 "$r" "$MEO_INT4" --prompt-len "$PROMPT" --gen "$GEN"
    meo_row meo-mxfp4 "$r" "$MEO_MXFP4" --prompt-len "$PROMPT" --gen "$GEN"
    meo_row meo-int4d4 "$r" "$MEO_INT4D4" --prompt-len "$PROMPT" --gen "$GEN"
  fi
  printf '.' >&2
done
echo >&2

if ((DEPTH > 0)); then
  say "decoding after $DEPTH tokens of context ($REPS rounds)"
  for r in $(seq "$REPS"); do
    llama_row llama.cpp-depth "$r" "$GGUF" -p 0 -n "$GEN" -d "$DEPTH"
    meo_row meo-depth "$r" "$MEOFILE" --prompt-len "$DEPTH" --gen "$GEN"
    printf '.' >&2
  done
  echo >&2
fi

PPLRES=$WORK/ppl.jsonl
: >"$PPLRES"
if ((PPL)); then
  say "perplexity: $PPL_MODEL"
  PH=$WORK/ppl-$(basename "$PPL_MODEL")
  mkdir -p "$PH"
  for f in config.json generation_config.json model.safetensors model.safetensors.index.json tokenizer.json; do
    [[ -f $PPL_MODEL/$f ]] && cp -p "$PPL_MODEL/$f" "$PH/"
  done
  # No BOS/EOS added (as the model was trained and as meo's tokenizer encodes).
  echo '{"add_bos_token": false, "add_eos_token": false}' >"$PH/tokenizer_config.json"
  TEXT=$WORK/heldout.txt
  "$PY" - "$TEXT" "$PPL_MODEL/../metrics.json" <<'PY'
import hashlib, json, sys, sysconfig, pydoc_data.topics
from pathlib import Path
out, metrics = sys.argv[1], Path(sys.argv[2])
# The held-out split of examples/train/train.py: topics with sorted index = 5 (mod 10), and two
# standard-library files, from this Python's copies.
topics = pydoc_data.topics.topics
keys = sorted(topics)
docs = [topics[k] for i, k in enumerate(keys) if i % 10 == 5]
stdlib = Path(sysconfig.get_paths()["stdlib"])
code = [(stdlib / f).read_text(encoding="utf-8") for f in ["contextlib.py", "fractions.py"]]
digest = lambda d: hashlib.sha256("\x00".join(d).encode()).hexdigest()[:16]
if metrics.is_file():
    m = json.loads(metrics.read_text())
    for name, d in [("docs", docs), ("code", code)]:
        want = next((v.get("heldout_sha256_16") for k, v in m.get("data", {}).items() if k == name), None)
        if want and want != digest(d):
            print(f"note: held-out {name} text differs from the one the model was evaluated on "
                  f"(Python {sys.version.split()[0]}): still the same text for both tools", file=sys.stderr)
# No trailing newline: llama.cpp's -f drops one, meo reads the file as it is.
Path(out).write_text("\n\n".join(docs + code).rstrip("\n"), encoding="utf-8")
PY
  # The same ids from llama.cpp's tokenizer (GGUF) and from Python tokenizers (what meo's
  # tokenizer reproduces), on the whole text.
  G16=$PH/model-f16.gguf
  convert_gguf "$PH" f16 "$G16"
  "$LLAMA_TOKENIZE" -m "$G16" -f "$TEXT" --ids --log-disable 2>/dev/null >"$WORK/ids-llama.txt"
  NTOK=$("$PY" - "$PH/tokenizer.json" "$TEXT" "$WORK/ids-llama.txt" <<'PY'
import json, sys
from tokenizers import Tokenizer
tok, text, llama = sys.argv[1:4]
ids = Tokenizer.from_file(tok).encode(open(text, encoding="utf-8").read(), add_special_tokens=False).ids
got = json.loads(open(llama).read().strip().splitlines()[-1])
if got != ids:
    first = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), len(ids)))
    sys.exit(f"error: llama.cpp tokenizes the text differently ({len(got)} vs {len(ids)} ids, first difference at {first})")
print(len(ids))
PY
)
  CHUNKS=$((NTOK / 128))
  echo "held-out text: $(wc -c <"$TEXT") bytes, $NTOK tokens (same ids in llama.cpp and tokenizers), $CHUNKS windows of 128" >&2
  for q in Q8_0 Q4_K_M Q4_0; do
    quantize_gguf "$G16" "$q" "$PH/model-${q,,}.gguf"
  done
  for spec in f32:f32 int8:f32 int4:f32 mxfp4:f32 int8:int8 int4:int8 int4:int4; do
    e=${spec%:*} d=${spec#*:}
    f=$PH/model-$e-dense-$d.meo
    [[ -f $f ]] || "$MEO" convert "$PH" -o "$f" --experts "$e" --dense "$d" --align-experts off >&2
  done
  # llama.cpp's logger writes from a thread and is never flushed at exit (its common/log.cpp
  # leaks it on purpose, upstream issue 22142): the "Final estimate" line was lost in 2 of 3
  # runs here. A preloaded destructor gives that thread time to drain its queue.
  printf '#include <unistd.h>\n__attribute__((destructor)) static void drain(void) { usleep(300000); }\n' \
    >"$WORK/logdrain.c"
  "$CC_" -shared -fPIC -O1 -o "$WORK/logdrain.so" "$WORK/logdrain.c"
  for q in f16 q8_0 q4_k_m q4_0; do
    f=$PH/model-$q.gguf
    LD_PRELOAD=$WORK/logdrain.so "$LLAMA_PPL" -m "$f" -f "$TEXT" -c 128 -b 128 -t "$THREADS" --no-escape >"$f.ppl.log" 2>&1 || {
      tail -20 "$f.ppl.log" >&2
      exit 1
    }
    "$PY" - "$f" "$f.ppl.log" >>"$PPLRES" <<'PY'
import json, os, re, sys
path, log = sys.argv[1:3]
t = open(log).read()
ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", t).group(1))
chunks = int(re.search(r"calculating perplexity over (\d+) chunks", t).group(1))
print(json.dumps({"tool": "llama.cpp", "fmt": os.path.basename(path)[6:-5], "ppl": ppl,
                  "scored": chunks * 63, "bytes": os.path.getsize(path)}))
PY
  done
  for spec in f32:f32 int8:f32 int4:f32 mxfp4:f32 int8:int8 int4:int8 int4:int4; do
    e=${spec%:*} d=${spec#*:}
    f=$PH/model-$e-dense-$d.meo
    "$MEO" eval "$f" --data "$TEXT" --window 128 --prompt-len 64 --max-windows "$CHUNKS" \
      --threads "$THREADS" --json |
      "$PY" -c 'import json, os, sys; r = json.load(sys.stdin); f = sys.argv[1]
print(json.dumps({"tool": "meo", "fmt": sys.argv[2], "ppl": r["perplexity"], "scored": r["scored_tokens"],
                  "bytes": os.path.getsize(f), "expert_bytes_per_token": r["vanilla_expert_bytes_per_token"]}))' \
        "$f" "experts $e, dense $d" >>"$PPLRES"
  done
fi

echo "wall time so far: $((SECONDS - START)) s" >&2
"$PY" - "$RESULTS" "$PPLRES" "$THREADS" "$PROMPT" "$GEN" "$SRC" "${FILES[@]}" <<'PY'
import json, os, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ppl_rows = [json.loads(l) for l in open(sys.argv[2])]
threads, prompt, gen, src = sys.argv[3:7]
files = sys.argv[7:]
def llama(tool, key):
    v = [r["row"]["avg_ts"] for r in rows if r["tool"] == tool and r["row"][key] > 0]
    return st.median(v) if v else None
def meo(tool):
    return [r["row"] for r in rows if r["tool"] == tool]
lpp, ltg = llama("llama.cpp", "n_prompt"), llama("llama.cpp", "n_gen")
m8 = meo("meo")
meo_pp = st.median(m["prompt_tokens_per_s"] for m in m8)
meo_tg = st.median(m["decode_tokens_per_s"] for m in m8)
bpt = st.median(m["bytes_per_token"] for m in m8)
# Each round's probe: its best pass; the ceiling is the median over rounds.
probes = [r["row"]["best_gb_s"] for r in rows if r["tool"] == "bandwidth"]
bw_gb = st.median(probes)
frac = bpt * meo_tg / (bw_gb * 1e9)
print(f"threads {threads}, prompt {prompt}, generate {gen}, {len(m8)} runs each (medians)")
print(f"{'':>10} {'prompt tok/s':>14} {'decode tok/s':>14}")
print(f"{'llama.cpp':>10} {lpp:14.1f} {ltg:14.1f}")
print(f"{'meo':>10} {meo_pp:14.1f} {meo_tg:14.1f}")
print(f"meo bytes per decoded token: {bpt / 1e6:.1f} MB (dense {m8[0]['dense_bytes_per_token'] / 1e6:.1f} MB"
      f" + experts {st.median(m['expert_bytes_per_token'] for m in m8) / 1e6:.1f} MB"
      f" + KV cache {st.median(m.get('kv_bytes_per_token', 0) for m in m8) / 1e6:.1f} MB)")
print(f"streaming-read bandwidth ({threads} threads, one probe per round, its best pass): median {bw_gb:.2f} GB/s,"
      f" range {min(probes):.2f}-{max(probes):.2f} GB/s")
print(f"meo achieved {bpt * meo_tg / 1e9:.2f} GB/s; against the highest probe: {bpt * meo_tg / (max(probes) * 1e9):.3f}")
depth_l = [r["row"]["avg_ts"] for r in rows if r["tool"] == "llama.cpp-depth" and r["row"]["n_gen"] > 0]
depth_m = [r["row"]["decode_tokens_per_s"] for r in rows if r["tool"] == "meo-depth"]
if depth_l and depth_m:
    dl, dm = st.median(depth_l), st.median(depth_m)
    depth = next(r["row"]["prompt_tokens"] for r in rows if r["tool"] == "meo-depth")
    print(f"decode after {depth} tokens of context: llama.cpp {dl:.1f}, meo {dm:.1f} tok/s, ratio {dm / dl:.3f}")

sys.path.insert(0, f"{src}/gguf-py")
def gguf_bytes_per_token(path):
    """What one decoded token reads of the weights: top_k / n_expert of the routed-expert
    tensors, every other tensor, one row of the embedding table (as meo bench counts)."""
    from gguf import GGUFReader
    g = GGUFReader(path)
    k = e = None
    for f in g.fields.values():
        if f.name.endswith(".expert_used_count"):
            k = int(f.parts[-1][0])
        elif f.name.endswith(".expert_count"):
            e = int(f.parts[-1][0])
    if not (k and e):
        return None, None
    exps = sum(int(t.n_bytes) for t in g.tensors if "_exps" in t.name) * k / e
    dense = sum(int(t.n_bytes) if t.name != "token_embd.weight" else int(t.n_bytes) // int(t.shape[-1])
                for t in g.tensors if "_exps" not in t.name)
    return exps, exps + dense

q4 = None
if meo("meo-int4"):
    print()
    print(f"4-bit: {len(meo('meo-int4'))} interleaved rounds, medians; file bytes; expert bytes per decoded token"
          " (meo: counted from the routing by meo bench; llama.cpp: its expert tensors x top_k / experts);"
          " bytes per decoded token (weights; meo also its KV cache)")
    print(f"{'':>22} {'prompt tok/s':>13} {'decode tok/s':>13} {'file bytes':>14} {'expert B/token':>15} {'B/token':>13}")
    table = {}
    def add(name, pp, tg, path, eb, b):
        table[name] = (pp, tg)
        eb_s = f"{eb / 1e6:12.2f} MB" if eb else f"{'':>15}"
        b_s = f"{b / 1e6:10.2f} MB" if b else f"{'':>13}"
        print(f"{name:>22} {pp:13.1f} {tg:13.1f} {os.path.getsize(path):14,d} {eb_s} {b_s}")
    paths = dict(zip(["q8_0", "int8", "q4_k_m", "q4_0", "int4", "mxfp4", "int4d4"], files))
    for tool, name, key in [("llama.cpp", "llama.cpp Q8_0", "q8_0"), ("llama.cpp-q4_k_m", "llama.cpp Q4_K_M", "q4_k_m"),
                            ("llama.cpp-q4_0", "llama.cpp Q4_0", "q4_0")]:
        add(name, llama(tool, "n_prompt"), llama(tool, "n_gen"), paths[key], *gguf_bytes_per_token(paths[key]))
    eb = {}
    for tool, name, key in [("meo", "meo int8", "int8"), ("meo-int4", "meo int4", "int4"), ("meo-mxfp4", "meo mxfp4", "mxfp4"),
                            ("meo-int4d4", "meo int4 dense int4", "int4d4")]:
        m = meo(tool)
        eb[key] = st.median(x["expert_bytes_per_token"] for x in m)
        add(name, st.median(x["prompt_tokens_per_s"] for x in m), st.median(x["decode_tokens_per_s"] for x in m),
            paths[key], eb[key], st.median(x["bytes_per_token"] for x in m))
    print(f"meo expert bytes per decoded token, int4 / int8: {eb['int4'] / eb['int8']:.3f} (target <= 0.56),"
          f" mxfp4 / int8: {eb['mxfp4'] / eb['int8']:.3f}")
    (mpp, mtg), (kpp, ktg), (opp, otg) = table["meo int4"], table["llama.cpp Q4_K_M"], table["llama.cpp Q4_0"]
    print(f"meo int4 / llama.cpp Q4_K_M: decode {mtg / ktg:.3f} (target >= 1.5), prompt {mpp / kpp:.3f} (target >= 2)")
    print(f"meo int4 / llama.cpp Q4_0:   decode {mtg / otg:.3f}, prompt {mpp / opp:.3f}")
    dpp, dtg = table["meo int4 dense int4"]
    print(f"meo int4 dense int4 / llama.cpp Q4_K_M: decode {dtg / ktg:.3f}, prompt {dpp / kpp:.3f}")
    q4 = (mtg / ktg, mpp / kpp)

ppl_ratio = None
if ppl_rows:
    print()
    print("perplexity on the held-out text (windows of 128, tokens 65..127 of each scored)")
    print(f"{'':>34} {'perplexity':>11} {'scored':>8} {'file bytes':>12}")
    for r in ppl_rows:
        print(f"{r['tool'] + ' ' + r['fmt']:>34} {r['ppl']:11.4f} {r['scored']:8d} {r['bytes']:12,d}")
    by = {(r["tool"], r["fmt"]): r["ppl"] for r in ppl_rows}
    if len({r["scored"] for r in ppl_rows}) != 1:
        print("WARNING: the tools scored different numbers of tokens")
    k, o, m = by[("llama.cpp", "q4_k_m")], by[("llama.cpp", "q4_0")], by[("meo", "experts int4, dense int8")]
    mf = by[("meo", "experts int4, dense f32")]
    print(f"meo int4 (dense int8) / llama.cpp Q4_K_M: {m / k:.4f} (target <= 1.01); / Q4_0: {m / o:.4f} (target <= 1)")
    print(f"meo int4 (dense f32)  / llama.cpp Q4_K_M: {mf / k:.4f}; / Q4_0: {mf / o:.4f}")
    print(f"reference (unquantized): llama.cpp f16 {by[('llama.cpp', 'f16')]:.4f}, meo f32 {by[('meo', 'experts f32, dense f32')]:.4f}")
    ppl_ratio = m / k

print(f"decode_ratio={meo_tg / ltg:.3f} prompt_ratio={meo_pp / lpp:.3f} bandwidth_fraction={frac:.3f}")
fmt = lambda x, d: "na" if x is None else f"{x:.{d}f}"
print(f"decode_ratio_q4km={fmt(q4 and q4[0], 3)} prompt_ratio_q4km={fmt(q4 and q4[1], 3)} ppl_ratio_q4km={fmt(ppl_ratio, 4)}")
PY
