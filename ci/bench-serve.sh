#!/usr/bin/env bash
# `meo serve` throughput with 1, 2 and 4 concurrent clients, for --parallel 1, 2 and 4: the
# table in docs/CLI.md. Release build; each configuration runs ROUNDS times, interleaved
# (round 1 of every configuration, then round 2, …), and the median is reported, with the CPU
# and the load average before and after.
#
# The model is the Mixtral test fixture with a chat template (as cli/tests/serve.rs makes it):
# a tiny random model, so the figures measure the server and the generation loop, not a real
# model's arithmetic. The client is the official `openai` Python package (ci/setup puts it in
# .py/), the same request as `cli/tests/openai_client.py --bench`: the chat turn of that file,
# 64-token sampled replies (temperature 0.8, seed 1), 4 requests per client, after one untimed
# request per server.
#
#   ROUNDS=3 THREADS=1 ci/bench-serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-1}
PY=${PYTHON:-python3}
export PYTHONPATH=${MEO_PYTHONPATH:-$PWD/.py}

cargo build --release -p meo-cli --bin meo
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
meo="$target_dir/release/meo"
tmp=$(mktemp -d)
server=
cleanup() {
  if [[ -n $server ]]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

ck="$tmp/ck"
mkdir "$ck"
cp tests/fixtures/mixtral/{config.json,generation_config.json,model.safetensors,tokenizer.json} "$ck/"
cat >"$ck/tokenizer_config.json" <<'EOF'
{"chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", "bos_token": "<|endoftext|>"}
EOF
"$meo" convert "$ck" -o "$tmp/chatdemo.meo" >/dev/null

cat >"$tmp/client.py" <<'EOF'
import sys, time
from concurrent.futures import ThreadPoolExecutor
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The value of the object"}]
model = client.models.list().data[0].id
# One request first, not timed: the first one pays for faulting the model in.
client.chat.completions.create(model=model, messages=MSGS, max_tokens=64, temperature=0.8, seed=1)
for clients in map(int, sys.argv[2:]):
    def one(_):
        return client.chat.completions.create(
            model=model, messages=MSGS, max_tokens=64, temperature=0.8, seed=1).usage.completion_tokens
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        tokens = sum(ex.map(one, range(clients * 4)))
    print(clients, tokens / (time.perf_counter() - t0))
EOF

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
echo "CPU: $cpu ($(nproc) logical CPUs); meo: $meo; --threads $THREADS; $ROUNDS rounds"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
results="$tmp/results"
for round in $(seq "$ROUNDS"); do
  for parallel in 1 2 4; do
    err="$tmp/serve-$round-$parallel.err"
    "$meo" serve "$tmp/chatdemo.meo" --port 0 --parallel "$parallel" --threads "$THREADS" 2>"$err" &
    server=$!
    url=
    for _ in $(seq 100); do
      url=$(sed -n 's/.* on \(http:[^ ]*\).*/\1/p' "$err" 2>/dev/null)
      [[ -n $url ]] && break
      sleep 0.1
    done
    [[ -n $url ]] || { cat "$err" >&2; exit 1; }
    "$PY" "$tmp/client.py" "$url/v1" 1 2 4 | sed "s/^/$parallel /" | tee -a "$results" |
      sed "s/^/round $round: parallel, clients, tokens\/s: /"
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "median of $ROUNDS rounds, completion tokens/s:"
echo "| \`--parallel\` | 1 client | 2 clients | 4 clients |"
echo "|---|---|---|---|"
"$PY" - "$results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    p, c, r = line.split()
    rows.setdefault(int(p), {}).setdefault(int(c), []).append(float(r))
for p in sorted(rows):
    cells = " | ".join(f"{statistics.median(rows[p][c]):.0f} tok/s" for c in (1, 2, 4))
    print(f"| {p} | {cells} |")
EOF
