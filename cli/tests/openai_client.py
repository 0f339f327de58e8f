#!/usr/bin/env python3
"""`meo serve` against the official `openai` Python client (PyPI `openai`), run by
cli/tests/serve.rs when MEO_OPENAI_PYTHON names a Python that has it:

    python openai_client.py http://127.0.0.1:PORT/v1 [--bench]

Checks models.list, chat and text completions streamed and not (usage in every non-streamed
answer, and in the stream with include_usage), stop strings, 4 concurrent requests, and that
out-of-range requests get a 4xx the client raises as BadRequestError. Prints "ok NAME" per
check. With --bench, prints completion tokens/s for 1, 2 and 4 concurrent clients.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The value of the object"}]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok {name}")


models = client.models.list()
check("models", len(models.data) == 1 and models.data[0].id, models)
model = models.data[0].id

r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8, temperature=0)
u = r.usage
check("chat", r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length"), r)
check("chat usage", u.prompt_tokens > 5 and 0 < u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
greedy = r.choices[0].message.content

parts, usage, finish = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=MSGS, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("chat stream", "".join(parts) == greedy and finish == r.choices[0].finish_reason, (parts, greedy, finish))
check("chat stream usage", usage is not None and usage.completion_tokens == u.completion_tokens, usage)

t = client.completions.create(model=model, prompt="The value of the object", max_tokens=6, temperature=0)
check("completion", t.choices[0].text is not None and t.usage.completion_tokens <= 6 and t.usage.prompt_tokens == 5, t)
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="The value of the object", max_tokens=6, temperature=0, stream=True) if c.choices)
check("completion stream", streamed == t.choices[0].text, (streamed, t.choices[0].text))

stop_at = next((ch for ch in greedy[1:] if ch.isprintable() and not ch.isspace()), None)
if stop_at is not None:
    cut = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8, temperature=0, stop=[stop_at])
    check("stop", cut.choices[0].message.content == greedy[: greedy.index(stop_at)] and cut.choices[0].finish_reason == "stop",
          (cut.choices[0].message.content, greedy, stop_at))

with ThreadPoolExecutor(4) as ex:
    outs = list(ex.map(lambda i: client.chat.completions.create(
        model=model, messages=MSGS, max_tokens=8, temperature=0).choices[0].message.content, range(4)))
check("concurrent", all(o == greedy for o in outs), outs)

for bad in [dict(max_tokens=10**9), dict(max_tokens=4, temperature=-1), dict(max_tokens=4, n=2)]:
    try:
        client.chat.completions.create(model=model, messages=MSGS, **bad)
        check(f"refused {bad}", False, "no error")
    except openai.BadRequestError as e:
        check(f"refused {list(bad)}", e.status_code == 400 and e.body and "message" in e.body, e)

if "--bench" in sys.argv:
    for clients in (1, 2, 4):
        def one(_):
            return client.chat.completions.create(
                model=model, messages=MSGS, max_tokens=64, temperature=0.8, seed=1).usage.completion_tokens
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            tokens = sum(ex.map(one, range(clients * 4)))
        dt = time.perf_counter() - t0
        print(f"bench {clients} clients: {tokens} tokens in {dt:.2f} s = {tokens / dt:.1f} tokens/s")
