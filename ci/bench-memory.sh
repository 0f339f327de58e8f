#!/usr/bin/env bash
# meo vs llama.cpp when the model does not fit: both tools on the same >= 1 GB MoE checkpoint,
# each run inside a memory cgroup limited to 75 %, 50 % and 25 % of the file size (the page
# cache of the mapped file counts against the limit), the file dropped from the page cache
# before every run.
#
#   ci/bench-memory.sh            (as root: it creates and removes the cgroups)
#
# 1. ci/bench-vs-llamacpp.sh's steps 1-4 (MEO_BENCH_SETUP_ONLY=1, 4-bit and perplexity off):
#    llama.cpp's llama-bench built from the llama-cpp-python sdist, the synthetic Mixtral-shaped
#    checkpoint (random weights), its GGUF Q8_0 and its .meo (int8 experts and dense). Everything
#    is kept under MEO_BENCH_DIR (default target/bench-llamacpp), so a machine that ran
#    bench-vs-llamacpp.sh already has it.
# 2. With MEO_MEM_TRAINED=1 (the default), a checkpoint "whose routing is real": the trained
#    tests/fixtures/trained/mixtral-scratch, scaled up to >= 1 GB without changing its function:
#    every expert's w1/w3 rows are tiled N times and w2 gets the original columns followed by
#    zeros, so each expert computes exactly what it did (the tiles' outputs meet zero columns)
#    while its slab is N times larger. Its routers, attention and embeddings are the trained
#    ones, so which experts a token selects, and how that repeats from token to token, is the
#    trained model's. (The other approach, routing statistics of a trained model driving a
#    synthetic one, would need a routing override in both tools; llama.cpp has none.) Its
#    context is 128 positions: prompt 64, decode 32 there.
# 3. Rounds (MEO_MEM_REPS, default 3), interleaved: for each limit, four runs, each a fresh
#    process in a fresh cgroup with the file dropped from the page cache first:
#    prompt  `llama-bench -p P -n 0`   and `meo bench --prompt-len P --gen 0`
#    decode  `llama-bench -p 0 -n G`   and `meo bench --prompt-len 1 --gen G`
#    (llama-bench's warm-up is one prompt pass or one token; meo bench's default warm-up is a
#    prompt of the same length and one token). The tool order alternates from round to round.
#    Storage reads and major faults come from the process's rusage at exit (`wait4`:
#    ru_inblock is /proc/PID/io's read_bytes in 512-byte units, ru_majflt); read bytes per
#    token = the decode run's read bytes ÷ G (load and warm-up included, the same for both).
#    The cgroup's peak usage is recorded to show the limit held.
#
# A run the OOM killer ends (llama.cpp's compute buffers can exceed the smallest limit) is
# reported in the table, and its ratios print as `na`.
#
# Output: a table per checkpoint (medians over the rounds; meo's expert-cache hit rate and mean
# next-layer prediction accuracy of the decode runs), then the lines of the trained
# checkpoint (prefixed `trained `), then, last, one line per limit for the synthetic one, exactly
#   limit_fraction=F decode_ratio=X prompt_ratio=Y read_bytes_per_token=Z
# with X, Y = meo ÷ llama.cpp tokens/s and Z meo's storage read bytes per decoded token.
#
# Env: MEO_BENCH_DIR, MEO_BENCH_PYTHON, MEO_BENCH_THREADS (2) as for bench-vs-llamacpp.sh;
#      MEO_MEM_REPS (3), MEO_MEM_PROMPT (128), MEO_MEM_GEN (32), MEO_MEM_FRACTIONS
#      ("0.75 0.5 0.25"), MEO_MEM_TRAINED (1), MEO_MEM_SYNTHETIC (1; 0 = the trained
#      checkpoint only, and the lines it ends with are the trained ones), MEO_MEM_MEO_ARGS
#      (extra flags for every `meo bench`), MEO_MEM_VARIANTS (more meo configurations measured
#      in the same rounds, `NAME:FLAGS;NAME:FLAGS`, default "meo-before:--memory-budget none
#      --miss-read willneed-once;meo-once:--miss-read willneed-once;meo-resident:--on-miss
#      resident": `meo-before` is meo as it ran before issue 20 — no budget, nothing pinned, no
#      prediction, a missed slab advised in one WILLNEED call, which the kernel truncates;
#      `meo-once` today's default but that; `meo-resident` the approximate on-miss fallback
#      that routes among resident experts; each gets a row in the table and
#      `NAME_decode_ratio=` after the four fields).
# meo bench decodes with `--decode-tokens random` (near-uniform random ids, as llama-bench feeds):
# greedy decoding on random weights repeats one token, and so one routing, which would flatter
# any cache.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ $(id -u) != 0 ]]; then
  echo "error: ci/bench-memory.sh creates memory cgroups: run it as root" >&2
  exit 1
fi
REPS=${MEO_MEM_REPS:-3}
PROMPT=${MEO_MEM_PROMPT:-128}
GEN=${MEO_MEM_GEN:-32}
FRACTIONS=${MEO_MEM_FRACTIONS:-0.75 0.5 0.25}
TRAINED=${MEO_MEM_TRAINED:-1}
SYNTHETIC=${MEO_MEM_SYNTHETIC:-1}
THREADS=${MEO_BENCH_THREADS:-2}
say() { printf '\n=== %s\n' "$*" >&2; }

say "setup (ci/bench-vs-llamacpp.sh, steps 1-4)"
SETUP=$(MEO_BENCH_SETUP_ONLY=1 MEO_BENCH_4BIT=0 MEO_BENCH_PPL=0 ci/bench-vs-llamacpp.sh)
eval "$SETUP"
WORK=$(dirname "$(dirname "$GGUF")")

MODELS=()
((SYNTHETIC)) && MODELS+=("synthetic $GGUF $MEOFILE $PROMPT")
if ((TRAINED)); then
  say "trained checkpoint scaled up (tests/fixtures/trained/mixtral-scratch)"
  TH=$WORK/trained-scaled
  if [[ ! -f $TH/model.meo || ! -f $TH/model-q8_0.gguf ]]; then
    rm -rf "$TH"
    mkdir -p "$TH"
    "$PY" - "$ROOT/tests/fixtures/trained/mixtral-scratch" "$TH" <<'PY'
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = json.loads((src / "config.json").read_text())
# >= 1 GiB of int8 experts: layers * experts * 3 * hidden * inter bytes.
n_exp = cfg["num_hidden_layers"] * cfg["num_local_experts"]
inter = cfg["intermediate_size"]
tiles = -(-(1 << 30) // (n_exp * 3 * cfg["hidden_size"] * inter))
w = load_file(src / "model.safetensors")
for k in list(w):
    t = w[k]
    if k.endswith(("w1.weight", "w3.weight")):  # [inter, hidden]: rows tiled
        w[k] = t.repeat(tiles, 1).contiguous()
    elif k.endswith("w2.weight"):  # [hidden, inter]: original columns, then zeros
        w[k] = torch.cat([t, torch.zeros(t.shape[0], inter * (tiles - 1), dtype=t.dtype)], 1).contiguous()
    elif k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
        sys.exit(f"fused expert tensors ({k}) are not handled")
save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
cfg["intermediate_size"] = inter * tiles
(out / "config.json").write_text(json.dumps(cfg, indent=2))
for f in ["tokenizer.json", "generation_config.json"]:
    if (src / f).is_file():
        shutil.copy(src / f, out / f)
(out / "tokenizer_config.json").write_text('{"add_bos_token": false, "add_eos_token": false}')
print(f"intermediate {inter} -> {inter * tiles} ({tiles} tiles)", file=sys.stderr)
PY
    "$MEO" convert "$TH" -o "$TH/model.meo" --experts int8 --dense int8 >&2
    "$PY" "$CONVERT_PY" "$LLAMA_SRC" "$TH" --outtype q8_0 --outfile "$TH/model-q8_0.gguf.tmp" >&2
    mv "$TH/model-q8_0.gguf.tmp" "$TH/model-q8_0.gguf"
    rm -f "$TH/model.safetensors"
  fi
  MODELS+=("trained $TH/model-q8_0.gguf $TH/model.meo 64")
fi

RESULTS=$WORK/memory-results.jsonl
: >"$RESULTS"
say "benchmarks: $REPS rounds x limits ($FRACTIONS) x models, $THREADS threads, gen $GEN"
# The runner: one process in one fresh cgroup, the file dropped from the page cache first.
cat >"$WORK/memrun.py" <<'PY'
import json, os, sys, time
from pathlib import Path
limit, path, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
argv = sys.argv[4:]
fd = os.open(path, os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
v2 = Path("/sys/fs/cgroup/cgroup.controllers")
if v2.is_file() and "memory" in v2.read_text().split():
    root = Path("/sys/fs/cgroup")
    (root / "cgroup.subtree_control").write_text("+memory")
    files = {"limit": "memory.max", "peak": "memory.peak"}
elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").is_file():
    root = Path("/sys/fs/cgroup/memory")
    files = {"limit": "memory.limit_in_bytes", "peak": "memory.max_usage_in_bytes"}
else:
    sys.exit("error: no memory cgroup controller (v2 memory.max or v1 memory.limit_in_bytes) is mounted")
cg = root / f"meo-bench-{os.getpid()}"
cg.mkdir()
try:
    (cg / files["limit"]).write_text(str(limit))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        (cg / "cgroup.procs").write_text(str(os.getpid()))
        os.dup2(w, 1)
        os.execv(argv[0], argv)
    os.close(w)
    out = b""
    while chunk := os.read(r, 1 << 16):
        out += chunk
    t0 = time.time()
    _, status, ru = os.wait4(pid, 0)
    peak = int((cg / files["peak"]).read_text()) if (cg / files["peak"]).is_file() else None
finally:
    for _ in range(50):
        try:
            cg.rmdir()
            break
        except OSError:
            time.sleep(0.1)
# A tool killed under the limit (the OOM killer: SIGKILL) is a result, recorded as such.
failed = None
if os.WIFSIGNALED(status):
    failed = f"killed by signal {os.WTERMSIG(status)}" + (" (OOM killer)" if os.WTERMSIG(status) == 9 else "")
elif os.WEXITSTATUS(status) != 0:
    failed = f"exit status {os.WEXITSTATUS(status)}"
if failed:
    print(f"warning: {tag}: {argv[0]} {failed} under a {limit}-byte limit", file=sys.stderr)
print(json.dumps({"tag": tag, "limit": limit, "read_bytes": ru.ru_inblock * 512, "major_faults": ru.ru_majflt,
                  "cgroup_peak": peak, "out": out.decode(), "failed": failed}))
PY
run() { # MODEL FRACTION FILE TOOL PHASE ROUND ARGV...
  local model=$1 frac=$2 file=$3 tool=$4 phase=$5 round=$6
  shift 6
  local size limit
  size=$(stat -c %s "$file")
  limit=$("$PY" -c "print(int($size * $frac))")
  "$PY" "$WORK/memrun.py" "$limit" "$file" "$model $frac $tool $phase $round" "$@" >>"$RESULTS"
}
llama_run() { # MODEL FRAC GGUF PHASE ROUND P
  local n=0 p=$6
  [[ $4 == decode ]] && { n=$GEN; p=0; }
  run "$1" "$2" "$3" llama.cpp "$4" "$5" "$LLAMA_BENCH" -m "$3" -t "$THREADS" -p "$p" -n "$n" -r 1 -o jsonl
}
meo_run() { # MODEL FRAC MEOFILE PHASE ROUND P [NAME FLAGS]
  local n=0 p=$6 tool=${7:-meo}
  [[ $4 == decode ]] && { n=$GEN; p=1; }
  # shellcheck disable=SC2086 # flags lists
  run "$1" "$2" "$3" "$tool" "$4" "$5" "$MEO" bench "$3" --threads "$THREADS" --prompt-len "$p" --gen "$n" \
    --seed "$5" --json --decode-tokens random ${MEO_MEM_MEO_ARGS:-} ${8:-}
}
IFS=';' read -r -a VARIANTS <<<"${MEO_MEM_VARIANTS-meo-before:--memory-budget none --miss-read willneed-once;meo-once:--miss-read willneed-once;meo-resident:--on-miss resident}"
for r in $(seq "$REPS"); do
  for m in "${MODELS[@]}"; do
    read -r name gguf meofile p <<<"$m"
    for f in $FRACTIONS; do
      for phase in prompt decode; do
        if ((r % 2)); then
          llama_run "$name" "$f" "$gguf" "$phase" "$r" "$p"
          meo_run "$name" "$f" "$meofile" "$phase" "$r" "$p"
        else
          meo_run "$name" "$f" "$meofile" "$phase" "$r" "$p"
          llama_run "$name" "$f" "$gguf" "$phase" "$r" "$p"
        fi
        for v in "${VARIANTS[@]}"; do
          [[ -n $v ]] && meo_run "$name" "$f" "$meofile" "$phase" "$r" "$p" "${v%%:*}" "${v#*:}"
        done
        printf '.' >&2
      done
    done
  done
done
echo >&2

"$PY" - "$RESULTS" "$GEN" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
gen = int(sys.argv[2])
med = statistics.median
by = defaultdict(list)  # (model, frac, tool, phase) -> [row]
for r in rows:
    model, frac, tool, phase, _ = r["tag"].split()
    lines = [json.loads(l) for l in r["out"].splitlines() if l.startswith("{")]
    if r.get("failed"):
        by[model, frac, tool, phase].append(dict(r, tps=None))
        continue
    if tool == "llama.cpp":
        tps = [l["avg_ts"] for l in lines if l.get("n_gen" if phase == "decode" else "n_prompt", 0) > 0]
    else:
        tps = [l["decode_tokens_per_s" if phase == "decode" else "prompt_tokens_per_s"] for l in lines]
    if len(tps) != 1:
        sys.exit(f"error: no {phase} figure in the output of {r['tag']}:\n{r['out']}")
    extra = {}
    if tool != "llama.cpp":
        extra["hit"] = lines[0].get("expert_hit_rate")
        acc = [a for a in lines[0].get("prediction_accuracy_per_layer", []) if a is not None]
        extra["acc"] = sum(acc) / len(acc) if acc else None
        extra["fb"] = lines[0].get("decode_fallbacks_per_token") if lines[0].get("approximate") else None
    by[model, frac, tool, phase].append(dict(r, tps=tps[0], **extra))
tools = sorted({k[2] for k in by}, key=lambda t: (t != "llama.cpp", t != "meo", t))
models = list(dict.fromkeys(k[0] for k in by))
lines = []
for model in models:
    print(f"\n{model} checkpoint (medians of {len(by[next(k for k in by if k[0] == model)])} rounds)")
    print(f"{'limit':>6} {'tool':<14} {'prompt t/s':>10} {'decode t/s':>10} {'MB read/token':>13}"
          f" {'major faults/token':>18} {'cgroup peak MB':>14} {'hit rate':>8} {'pred. acc.':>10}"
          f" {'fallbacks/token':>15}")
    for frac in dict.fromkeys(k[1] for k in by if k[0] == model):
        fig = {}
        for tool in tools:
            p, d = by.get((model, frac, tool, "prompt")), by.get((model, frac, tool, "decode"))
            if not p or not d:
                continue
            bad = [x["failed"] for x in p + d if x.get("failed")]
            if bad:
                print(f"{frac:>6} {tool:<14} {len(bad)} of {len(p + d)} runs failed: {bad[0]}")
                fig[tool] = None
                continue
            fig[tool] = (med(x["tps"] for x in p), med(x["tps"] for x in d),
                         med(x["read_bytes"] for x in d) / gen, med(x["major_faults"] for x in d) / gen,
                         max(x["cgroup_peak"] or 0 for x in p + d))
            pt, dt, rb, mf, peak = fig[tool]
            opt = lambda k: (lambda v: "-" if not v else f"{med(v):.3f}")([x[k] for x in d if x.get(k) is not None])
            print(f"{frac:>6} {tool:<14} {pt:10.1f} {dt:10.2f} {rb / 1e6:13.1f} {mf:18.0f} {peak / 1e6:14.0f}"
                  f" {opt('hit'):>8} {opt('acc'):>10} {opt('fb'):>15}")
        ll, me = fig.get("llama.cpp"), fig.get("meo")
        ratio = lambda a, b, i: f"{a[i] / b[i]:.2f}" if a and b else "na"
        rb = f"{me[2]:.0f}" if me else "na"
        line = (f"limit_fraction={frac} decode_ratio={ratio(me, ll, 1)} prompt_ratio={ratio(me, ll, 0)}"
                f" read_bytes_per_token={rb}")
        for tool in tools[2:]:
            line += f" {tool}_decode_ratio={ratio(fig.get(tool), ll, 1)}"
        lines.append((model == "synthetic", line if model == "synthetic" else f"{model} {line}"))
print()
# The synthetic checkpoint's lines come last: the script ends with them (the trained
# checkpoint's, with MEO_MEM_SYNTHETIC=0).
for _, l in sorted(lines, key=lambda x: x[0]):
    print(l)
PY
