#!/usr/bin/env python3
"""Train meo's small committed MoE models on offline text (CPU, ~12 minutes, 1 thread).

Writes tests/fixtures/trained/:
  mixtral-upcycled/  MixtralForCausalLM, 8 experts top-2, upcycled from a dense Mistral model
  mixtral-scratch/   the same architecture trained from scratch for the same number of steps
  meo-gpt2/          MEO-native GPT-2-style model (examples/train/meo_model.py), upcycled from a
                     dense GPT-2-style model, 2 tasks, fine-tuned with merging in the loop
each with tokenizer.json and reference.safetensors, plus metrics.json and README.md.

Data (shipped with CPython 3.11, PSF licence, no network):
  domain A "docs": pydoc_data/topics.py (the Python documentation topics used by help());
  domain B "code": a fixed list of standard-library .py files.

Usage (from the repository root):
    nice -n 19 .venv-ref/bin/python examples/train/train.py          # everything
    ... train.py --out /tmp/trained --scale 0.05                          # quick smoke run

See examples/train/README.md and docs/MEO-NATIVE.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import pydoc_data.topics  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meo_model  # noqa: E402
from meo_model import MeoGPT2Config, MeoGPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(os.__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------
EOT, PAD = "<|endoftext|>", "<|padding|>"
EOT_ID, PAD_ID = 0, 1
VOCAB = 512
CTX = 128  # training / eval window
BATCH = 16  # sequences per step: half docs, half code
EVAL_PROMPT = 32  # eval: gate / context from the first 32 tokens, score the other 96
PROMPT_TOKENS = 24  # reference prompts
NEW_TOKENS = 16
TIE_GAP = 1e-4
MIN_DISTINCT_GREEDY = 5  # reference continuations must not collapse into a repetition ...
MAX_GREEDY_RUN = 4  # ... nor repeat one token more than this many times in a row
STRICT_GREEDY = True  # off for --scale < 1 smoke runs (undertrained models repeat themselves)
UPCYCLE_NOISE = 0.01  # expert copies get N(0, (0.01 * std(W_dense))^2) noise

CODE_TRAIN = ["argparse.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py",
              "pathlib.py", "shutil.py", "threading.py"]
CODE_HELDOUT = ["contextlib.py", "fractions.py"]
TASKS = ["docs", "code"]
TASK_DESCRIPTIONS = [
    "Python documentation: the language reference and library manual, in English prose.",
    "Python source code from the standard library: modules, classes and functions.",
]

H, LAYERS, HEADS, KV_HEADS = 64, 4, 4, 2
DENSE_I = 128  # MLP width of both dense models and of each Mixtral / MEO expert
E, TOP_K = 8, 2
TOKEN_R = 8

# steps (scaled by --scale), learning rates
STEPS = {"gpt2_dense": 800, "meo": 500, "mistral_dense": 800, "mixtral_upcycled": 400,
         "mixtral_scratch": 1200}  # scratch = dense + upcycled steps (same tokens seen)
LR = {"gpt2_dense": 3e-3, "meo": 1e-3, "mistral_dense": 3e-3, "mixtral_upcycled": 1e-3,
      "mixtral_scratch": 3e-3}
SEEDS = {"gpt2_dense": 11, "meo": 12, "mistral_dense": 21, "mixtral_upcycled": 22,
         "mixtral_scratch": 23, "prompts": 0}
MEO_AUX = 0.01  # load-balancing loss coefficient per expert bank (as the MEO code)
MIXTRAL_AUX = 0.02  # Mixtral's router_aux_loss_coef

SAVE_DTYPE = torch.float16


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------------
def load_domains() -> dict:
    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    docs_train = [topics[k] for i, k in enumerate(keys) if i % 10 != 5]
    docs_held = [topics[k] for i, k in enumerate(keys) if i % 10 == 5]  # 8 topics, ~36 k chars
    code_train = [(STDLIB / f).read_text(encoding="utf-8") for f in CODE_TRAIN]
    code_held = [(STDLIB / f).read_text(encoding="utf-8") for f in CODE_HELDOUT]
    return {"docs": (docs_train, docs_held), "code": (code_train, code_held)}


def text_digest(docs: list[str]) -> str:
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]


def train_tokenizer(domains: dict) -> Tokenizer:
    """Byte-level BPE: 2 specials + all 256 byte symbols + 254 merges = 512, so every byte encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT, PAD], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = domains["docs"][0] + domains["code"][0]
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id(EOT) == EOT_ID and tok.token_to_id(PAD) == PAD_ID
    vocab = tok.get_vocab()
    assert all(c in vocab for c in pre_tokenizers.ByteLevel.alphabet())
    probe = "naïve → ü \x00\x7f"
    assert tok.decode(tok.encode(probe).ids) == probe
    return tok


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for; the EOT separator counts as 1 byte."""
    dec = {v: k for k, v in bytes_to_unicode().items()}
    lens = torch.zeros(VOCAB, dtype=torch.long)
    for s, i in tok.get_vocab().items():
        lens[i] = 1 if s in (EOT, PAD) else sum(1 for c in s if c in dec)
    return lens


def encode_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
        ids.append(EOT_ID)
    return torch.tensor(ids, dtype=torch.long)


class Batches:
    """Random CTX+1 windows, BATCH/2 from each domain's training stream; task = domain."""

    def __init__(self, streams: dict, seed: int):
        self.streams = [streams["docs"], streams["code"]]
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, tasks = [], []
        for t, s in enumerate(self.streams):
            starts = torch.randint(0, len(s) - CTX - 1, (BATCH // 2,), generator=self.gen)
            rows += [s[i:i + CTX + 1] for i in starts.tolist()]
            tasks += [t] * (BATCH // 2)
        return torch.stack(rows), torch.tensor(tasks)


def eval_windows(stream: torch.Tensor) -> torch.Tensor:
    n = len(stream) // CTX
    return stream[: n * CTX].view(n, CTX)


@torch.no_grad()
def evaluate(logits_fn, windows: torch.Tensor, byte_lens: torch.Tensor) -> dict:
    """Score tokens EVAL_PROMPT..CTX-1 of every window (the first EVAL_PROMPT tokens are the
    prompt: context for every model, and the pooling span of MEO's sequence gate)."""
    nll, ntok, nbytes = 0.0, 0, 0
    for i in range(0, len(windows), 32):
        w = windows[i:i + 32]
        logits = logits_fn(w).float()
        lp = torch.log_softmax(logits[:, EVAL_PROMPT - 1:-1], dim=-1)
        tgt = w[:, EVAL_PROMPT:]
        nll += -lp.gather(-1, tgt[..., None]).sum().item()
        ntok += tgt.numel()
        nbytes += byte_lens[tgt].sum().item()
    return {"bits_per_byte": round(nll / math.log(2) / nbytes, 4),
            "ppl_per_token": round(math.exp(nll / ntok), 3),
            "scored_tokens": ntok, "scored_bytes": nbytes}


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, min(50, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_loop(name: str, model: torch.nn.Module, loss_fn, steps: int, lr: float,
               batches: Batches) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    t0 = time.time()
    ema = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        ids, tasks = batches.next()
        loss, lm = loss_fn(model, ids, tasks, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        if step % 100 == 0 or step == steps - 1:
            log(f"  [{name}] step {step:5d}/{steps}  lm loss {lm:.4f} (ema {ema:.4f})  "
                f"{time.time() - t0:6.1f}s")
    model.eval()
    return {"steps": steps, "lr": lr, "batch": BATCH, "ctx": CTX,
            "final_train_loss_ema": round(ema, 4), "wall_s": round(time.time() - t0, 1)}


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def gpt2_config(moe: bool) -> MeoGPT2Config:
    return MeoGPT2Config(
        vocab_size=VOCAB, n_positions=CTX, hidden_size=H, num_layers=LAYERS, num_heads=HEADS,
        intermediate_size=DENSE_I, num_experts=E if moe else 0, top_k=TOP_K,
        token_bottleneck=TOKEN_R if moe else 0, task_names=list(TASKS) if moe else [],
        task_descriptions=list(TASK_DESCRIPTIONS) if moe else [],
        gate_levels=["sequence", "task"] if moe else [],
        bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID)


def mistral_like(cls, **extra):
    common = dict(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  num_hidden_layers=LAYERS, vocab_size=VOCAB, intermediate_size=DENSE_I,
                  max_position_embeddings=CTX, rope_theta=1e6, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=EOT_ID, eos_token_id=EOT_ID,
                  sliding_window=None, initializer_range=0.02, hidden_act="silu")
    return cls(**common, **extra)


def mixtral_config() -> MixtralConfig:
    cfg = mistral_like(MixtralConfig, num_local_experts=E, num_experts_per_tok=TOP_K,
                       router_aux_loss_coef=MIXTRAL_AUX, router_jitter_noise=0.0)
    cfg.architectures = ["MixtralForCausalLM"]
    return cfg


def new_hf(cls, cfg, seed: int):
    torch.manual_seed(seed)
    return cls._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


@torch.no_grad()
def upcycle_mixtral(dense: MistralForCausalLM, seed: int) -> MixtralForCausalLM:
    """Mixtral from a dense Mistral: attention/norms/embeddings copied, every expert = the dense
    MLP (gate_proj -> w1, up_proj -> w3, down_proj -> w2) + N(0, (0.01 std)^2) noise; fresh router."""
    moe = new_hf(MixtralForCausalLM, mixtral_config(), seed)
    gen = torch.Generator().manual_seed(seed)
    dsd = dense.state_dict()
    msd = moe.state_dict()
    for k, v in msd.items():
        if k in dsd:
            v.copy_(dsd[k])
    for i in range(LAYERS):
        g = dsd[f"model.layers.{i}.mlp.gate_proj.weight"]
        u = dsd[f"model.layers.{i}.mlp.up_proj.weight"]
        d = dsd[f"model.layers.{i}.mlp.down_proj.weight"]
        gu = msd[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # [E, 2I, H] = cat(gate, up)
        dn = msd[f"model.layers.{i}.mlp.experts.down_proj"]  # [E, H, I]
        for e in range(E):
            gu[e].copy_(torch.cat([g + torch.randn(g.shape, generator=gen) * UPCYCLE_NOISE * g.std(),
                                   u + torch.randn(u.shape, generator=gen) * UPCYCLE_NOISE * u.std()]))
            dn[e].copy_(d + torch.randn(d.shape, generator=gen) * UPCYCLE_NOISE * d.std())
    moe.load_state_dict(msd)
    return moe


def hf_loss(model, ids, tasks, step):
    del tasks, step
    moe = isinstance(model, MixtralForCausalLM)
    out = model(input_ids=ids[:, :-1], **({"output_router_logits": True} if moe else {}))
    lm = lm_loss(out.logits, ids)
    loss = lm + (MIXTRAL_AUX * out.aux_loss if moe else 0.0)
    return loss, lm.item()


def gpt2_dense_loss(model, ids, tasks, step):
    del tasks, step
    lm = lm_loss(model(ids[:, :-1]).logits, ids)
    return lm, lm.item()


class MeoLoss:
    """Merging in the loop, both gate levels trained jointly on alternating steps:
    even steps sequence level (gate pooled over a random prompt prefix of 16..128 tokens),
    odd steps task level (task = the window's domain). Plus MEO's cv^2 load-balancing loss."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model, ids, tasks, step):
        if step % 2 == 0:
            p = int(torch.randint(16, CTX + 1, (1,), generator=self.gen))
            out = model(ids[:, :-1], gate_mode="sequence", prompt_len=p)
        else:
            out = model(ids[:, :-1], gate_mode="task", task=tasks)
        lm = lm_loss(out.logits, ids)
        return lm + MEO_AUX * out.aux_loss, lm.item()


def hf_logits_fn(model):
    return lambda w: model(input_ids=w).logits


def save_hf(model, path: Path, tok_json: str) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.to(SAVE_DTYPE).save_pretrained(path)
    model.float()
    (path / "tokenizer.json").write_text(tok_json)


def load_hf(path: Path) -> MixtralForCausalLM:
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                               experts_implementation="eager")
    model.eval()
    with torch.no_grad():  # fresh aligned memory (see examples/fixtures/README.md)
        for p in model.parameters():
            p.data = p.data.clone()
    return model


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
class FixtureError(Exception):
    pass


@torch.no_grad()
def mixtral_reference(model, ids: list[int], prefix: str) -> dict:
    """Same tensors as tests/fixtures/README.md describes, names prefixed by `prefix`."""
    cap = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        def hook(_m, _i, out, li=li):
            logits, scores, idx = out
            order = idx.argsort(dim=-1)
            cap[f"layers.{li}.router_logits"] = logits.float().clone()
            cap[f"layers.{li}.topk_indices"] = idx.gather(-1, order).long().clone()
            cap[f"layers.{li}.topk_weights"] = scores.gather(-1, order).float().clone()
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    x = torch.tensor([ids])
    try:
        out = model(input_ids=x, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    ref = {"input_ids": x[0].clone(), "logits": out.logits[0].float().clone(), **cap}
    for li in range(LAYERS):
        probs = torch.softmax(ref[f"layers.{li}.router_logits"].double(), -1)
        s = probs.sort(-1, descending=True).values
        if (s[:, TOP_K - 1] - s[:, TOP_K]).min() < TIE_GAP:
            raise FixtureError(f"{prefix}: router near tie in layer {li}")
        expect = probs.topk(TOP_K, -1).indices.sort(-1).values
        assert torch.equal(expect, ref[f"layers.{li}.topk_indices"])
        w = torch.softmax(ref[f"layers.{li}.router_logits"], -1).gather(-1, expect)
        torch.testing.assert_close(w / w.sum(-1, keepdim=True), ref[f"layers.{li}.topk_weights"],
                                   rtol=1e-6, atol=1e-7)
    gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=NEW_TOKENS, pad_token_id=EOT_ID)
    ref["greedy_tokens"] = gen[0, len(ids):].clone()
    check_greedy(ref["greedy_tokens"], prefix)
    seq = torch.cat([x[0], ref["greedy_tokens"][:-1]])[None]
    lg = model(input_ids=seq, use_cache=False).logits[0, len(ids) - 1:]
    check_gaps(lg, prefix)
    if not torch.equal(lg.argmax(-1), ref["greedy_tokens"]):
        raise FixtureError(f"{prefix}: cached greedy != no-cache argmax")
    return {prefix + k: v for k, v in ref.items()}


def check_greedy(tokens: torch.Tensor, label: str) -> None:
    toks = tokens.tolist()
    if len(toks) != NEW_TOKENS or EOT_ID in toks:
        raise FixtureError(f"{label}: greedy stopped or produced EOS ({toks})")
    run = max(len(list(g)) for _, g in itertools.groupby(toks))
    if STRICT_GREEDY and (len(set(toks)) < MIN_DISTINCT_GREEDY or run > MAX_GREEDY_RUN):
        raise FixtureError(f"{label}: greedy is degenerate ({toks})")


def check_gaps(logits: torch.Tensor, label: str) -> None:
    top2 = logits.topk(2, -1).values
    if (top2[:, 0] - top2[:, 1]).min() < TIE_GAP:
        raise FixtureError(f"{label}: greedy near tie")


@torch.no_grad()
def meo_reference(model: MeoGPT2LMHeadModel, ids: list[int], task: int, prefix: str) -> dict:
    ref = {f"{prefix}input_ids": torch.tensor(ids)}
    x = torch.tensor([ids])
    for mode in ("sequence", "task"):
        out = model(x, gate_mode=mode, task=task)
        mix = model(x, gate_mode=mode, task=task, execution="mixture")
        assert (out.logits - mix.logits).abs().max() < 1e-4
        p = f"{prefix}{mode}."
        ref[p + "logits"] = out.logits[0].float().clone()
        for name, g in out.gates.items():
            li, fc = name.split(".")[1], name.split(".")[3]
            q = f"{p}layers.{li}.{fc}."
            srt = g.logits[0].double().sort(descending=True).values
            if srt[TOP_K - 1] - srt[TOP_K] < TIE_GAP:
                raise FixtureError(f"{prefix}{mode}: gate near tie at {name}")
            ref[q + "router_logits"] = g.logits[0].float().clone()
            ref[q + "topk_indices"] = g.indices[0].long().clone()
            ref[q + "topk_weights"] = g.weights[0].float().clone()
            ref[q + "pooled"] = g.pooled[0].float().clone()
        new, _ = model.generate(ids, NEW_TOKENS, gate_mode=mode, task=task)
        new_nc, _ = model.generate(ids, NEW_TOKENS, gate_mode=mode, task=task, use_cache=False)
        assert new == new_nc, (new, new_nc)
        greedy = torch.tensor(new)
        check_greedy(greedy, p)
        # all logits of prompt + continuation with the prompt's gates, one no-cache forward
        seq = torch.tensor([ids + new[:-1]])
        lg = model(seq, gate_mode=mode, task=task, prompt_len=len(ids)).logits[0, len(ids) - 1:]
        check_gaps(lg, p)
        assert torch.equal(lg.argmax(-1), greedy)
        ref[p + "greedy_tokens"] = greedy
    return ref


def prompt_candidates(tok: Tokenizer, docs: list[str]):
    """Held-out lines, cut to the longest whole-word prefix of <= PROMPT_TOKENS tokens (>= 16)."""
    for d in docs:
        for line in d.split("\n"):
            if len(line.strip()) < 40 or line[0].isspace():
                continue
            words = line.split(" ")
            for n in range(len(words), 0, -1):
                text = " ".join(words[:n])
                ids = tok.encode(text).ids
                if len(ids) <= PROMPT_TOKENS:
                    break
            if len(ids) >= 16 and text == text.rstrip() and tok.decode(ids) == text:
                yield text, ids


def save_reference(path: Path, ref: dict, meta: dict) -> None:
    """Deterministic safetensors writer (sorted header, padded to 8), as generate_fixtures.py."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header: dict = {"__metadata__": {k: str(v) for k, v in sorted(meta.items())}}
    blobs, off = [], 0
    for name, t in sorted(ref.items()):
        t = t.detach().contiguous().cpu()
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    target = path / "reference.safetensors"
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    back = load_file(str(target))
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    with safe_open(str(target), "pt") as f:
        assert f.metadata() == header["__metadata__"]


def tensor_listing(path: Path) -> list[str]:
    out = []
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            out.append(f"{k} {list(sl.get_shape())} {sl.get_dtype()}")
    return out


# ---------------------------------------------------------------------------------------------
# README for tests/fixtures/trained
# ---------------------------------------------------------------------------------------------
EVAL_ROWS = [
    ("gpt2_dense", "dense GPT-2-style (upcycling source of meo-gpt2)"),
    ("gpt2_dense_continued", "dense GPT-2-style, trained as many more steps as the MEO fine-tune"),
    ("meo_upcycled_init_sequence", "meo-gpt2 right after upcycling (sequence gate)"),
    ("meo_sequence", "**meo-gpt2**, sequence gate (pooled over the 32-token prompt)"),
    ("meo_task_right", "**meo-gpt2**, task gate of the right task"),
    ("meo_task_wrong", "meo-gpt2, task gate of the wrong task"),
    ("mistral_dense", "dense Mistral-style (upcycling source of mixtral-upcycled)"),
    ("mixtral_upcycled_init", "Mixtral right after upcycling"),
    ("mixtral_upcycled", "**mixtral-upcycled**"),
    ("mixtral_scratch", "**mixtral-scratch**"),
]


def write_readme(out: Path, m: dict) -> None:
    st = m["steps"]
    rows = "\n".join(
        f"| {label} | {m['eval'][k]['docs']['bits_per_byte']:.4f} | "
        f"{m['eval'][k]['docs']['ppl_per_token']:.2f} | {m['eval'][k]['code']['bits_per_byte']:.4f} | "
        f"{m['eval'][k]['code']['ppl_per_token']:.2f} |" for k, label in EVAL_ROWS if k in m["eval"])
    sizes = "\n".join(f"| `{d}` | " + ", ".join(f"{n} {b:,} B" for n, b in files.items()) + " |"
                       for d, files in m["files"].items())

    def listing(name, keep):
        return "\n".join(line for line in m["listing"][name] if keep(line))

    meo_list = listing("meo-gpt2", lambda s: not s.startswith("h.") or s.startswith("h.0."))
    mix_list = listing("mixtral-upcycled", lambda s: ".layers." not in s or (
        ".layers.0." in s and (".experts." not in s or ".experts.0." in s)))
    pd, pc = m["prompts"]["docs"], m["prompts"]["code"]
    text = f"""# Trained MoE fixtures

Generated by `examples/train/train.py` (see `examples/train/README.md`, `docs/MEO-NATIVE.md`); do not
edit by hand: rerun the script. Small models **trained** on real text (CPU, ~12 min), unlike the
random-weight models in `tests/fixtures/<family>/`. Weights are stored in **float16**; every
reference below is computed in float32 from the stored (f16-rounded) weights.

| directory | model | training |
|---|---|---|
| `mixtral-upcycled` | `MixtralForCausalLM`, 8 experts, top-2, expert width 128 | dense `MistralForCausalLM` ({st['mistral_dense']} steps), MLP copied into every expert (+1% noise), then {st['mixtral_upcycled']} MoE steps |
| `mixtral-scratch` | same architecture | {st['mixtral_scratch']} MoE steps from random init (same tokens as dense + upcycled) |
| `meo-gpt2` | MEO-native GPT-2-style decoder (`model_type: meo_gpt2`), 8 linear experts per FFN linear, top-2, tasks `docs`, `code` | dense GPT-2-style ({st['gpt2_dense']} steps), upcycled, then {st['meo']} steps with merging in the loop (sequence and task gates, alternating) |

Common sizes: hidden 64, 4 layers, 4 heads (Mixtral: 2 KV heads), context 128, vocab 512.
Data: domain `docs` = `pydoc_data/topics.py`, domain `code` = CPython standard-library sources
({", ".join(CODE_TRAIN)}; held out: {", ".join(CODE_HELDOUT)}), CPython {m['versions']['python']},
PSF licence. Tokenizer (`tokenizer.json`, identical in every directory): byte-level BPE, 2
specials (`<|endoftext|>` = 0, `<|padding|>` = 1) + all 256 byte symbols + 254 merges, so every
byte sequence encodes; no BOS/EOS added.

## Held-out results

Bits per UTF-8 byte and perplexity per token on held-out text (docs: 8 `pydoc_data` topics,
code: 2 stdlib files), in windows of 128 tokens: the first 32 tokens are the prompt (context for
every model, pooling span of the MEO sequence gate), the other 96 are scored. From
`metrics.json` (written by the same run).

| model | docs bits/byte | docs ppl | code bits/byte | code ppl |
|---|---|---|---|---|
{rows}

## Files

{sizes}

## `reference.safetensors`

Prompts (held-out text, whole words, ≤ 24 tokens): docs `{pd['text']!r}` → {pd['ids']};
code `{pc['text']!r}` → {pc['ids']}. Also in the metadata (`prompt_docs`, `prompt_code`).
Greedy continuations: 16 new tokens, never EOS; every routing decision and greedy step has a
gap ≥ 1e-4 (router probabilities / logits), so nothing depends on tie order.

**Mixtral directories**: exactly the tensors of `tests/fixtures/README.md` (`input_ids`,
`logits` [T, 512], `layers.L.router_logits` [T, 8], `layers.L.topk_indices` [T, 2] ascending,
`layers.L.topk_weights` [T, 2], `greedy_tokens` [16]) for the **docs** prompt, and the same
names prefixed `code.` for the code prompt. Semantics as there (softmax over all 8 in f32, top-2,
renormalise).

**meo-gpt2**: for P in `docs`, `code` (task index 0, 1) and MODE in `sequence`, `task` (the
prompt's own task), L in 0..3, FC in `fc1`, `fc2`:

| tensor | shape | dtype | meaning |
|---|---|---|---|
| `P.input_ids` | [T] | int64 | the prompt |
| `P.MODE.logits` | [T, 512] | f32 | logits at every prompt position, gates pooled over the whole prompt |
| `P.MODE.layers.L.FC.pooled` | [in] | f32 | the router's input: prompt mean of the layer input (sequence) or `task_proj(task_embed[t])` (task); in = 64 (fc1), 128 (fc2) |
| `P.MODE.layers.L.FC.router_logits` | [8] | f32 | `pooled @ router.weight.T` |
| `P.MODE.layers.L.FC.topk_indices` | [2] | int64 | selected experts, ascending |
| `P.MODE.layers.L.FC.topk_weights` | [2] | f32 | softmax over the 2 selected logits, matching `topk_indices` |
| `P.MODE.greedy_tokens` | [16] | int64 | greedy continuation under the causal-generation rule (gates from the prompt, unchanged while decoding) |

## Tensor names

`meo-gpt2/model.safetensors` (layer 0 shown; layers 0..3 exist; F16; [out, in] layout; no
`lm_head`: tied to `wte`):

```
{meo_list}
```

`mixtral-upcycled` and `mixtral-scratch` (`save_pretrained` default: per-expert names, config in
the transformers-5 form; layer 0 and expert 0 shown):

```
{mix_list}
```
"""
    (out / "README.md").write_text(text)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "trained")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    ap.add_argument("--references-only", action="store_true",
                    help="no training: recompute the references and README of the models in --out")
    args = ap.parse_args()
    if args.references_only:
        references_only(args.out)
        return
    if args.scale < 1:
        global STRICT_GREEDY
        STRICT_GREEDY = False
    t_all = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    steps = {k: max(2, int(v * args.scale)) for k, v in STEPS.items()}
    metrics: dict = {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                  "transformers": transformers.__version__},
                     "steps": steps, "upcycle_noise": UPCYCLE_NOISE, "eval": {}, "train": {}}

    # ---- data
    domains = load_domains()
    tok = train_tokenizer(domains)
    tok_json = tok.to_str(pretty=True)
    byte_lens = token_byte_lengths(tok)
    train_streams = {d: encode_stream(tok, domains[d][0]) for d in TASKS}
    held = {d: eval_windows(encode_stream(tok, domains[d][1])) for d in TASKS}
    metrics["data"] = {
        d: {"train_docs": len(domains[d][0]), "train_chars": sum(map(len, domains[d][0])),
            "train_tokens": len(train_streams[d]), "heldout_docs": len(domains[d][1]),
            "heldout_chars": sum(map(len, domains[d][1])), "heldout_windows": len(held[d]),
            "train_sha256_16": text_digest(domains[d][0]),
            "heldout_sha256_16": text_digest(domains[d][1])} for d in TASKS}
    log(f"data: {json.dumps(metrics['data'])}")

    def ev(name, fn):
        r = {d: evaluate(fn, held[d], byte_lens) for d in TASKS}
        metrics["eval"][name] = r
        log(f"  eval {name:28s} docs {r['docs']['bits_per_byte']:.4f} b/B "
            f"(ppl {r['docs']['ppl_per_token']:.2f})  code {r['code']['bits_per_byte']:.4f} b/B "
            f"(ppl {r['code']['ppl_per_token']:.2f})")

    # ---- (b) dense GPT-2 -> MEO-native
    log("== dense GPT-2-style model")
    torch.manual_seed(SEEDS["gpt2_dense"])
    dense = MeoGPT2LMHeadModel(gpt2_config(moe=False))
    metrics["train"]["gpt2_dense"] = train_loop(
        "gpt2-dense", dense, gpt2_dense_loss, steps["gpt2_dense"], LR["gpt2_dense"],
        Batches(train_streams, SEEDS["gpt2_dense"]))
    ev("gpt2_dense", lambda w: dense(w).logits)

    # Compute-matched dense baseline for the MEO fine-tune: the same dense model trained for
    # the MEO step count more, on the same batches.
    log("== dense GPT-2-style model, continued (baseline for MEO)")
    dense_cont = MeoGPT2LMHeadModel(gpt2_config(moe=False))
    dense_cont.load_state_dict(dense.state_dict())
    metrics["train"]["gpt2_dense_continued"] = train_loop(
        "gpt2-dense-cont", dense_cont, gpt2_dense_loss, steps["meo"], LR["meo"],
        Batches(train_streams, SEEDS["meo"]))
    ev("gpt2_dense_continued", lambda w: dense_cont(w).logits)
    del dense_cont

    log("== MEO-native GPT-2 (upcycled)")
    cfg = gpt2_config(moe=True)
    task_init = torch.stack([dense.wte.weight[tok.encode(t).ids].mean(0) for t in TASK_DESCRIPTIONS])
    meo = meo_model.upcycle(dense, cfg, noise=UPCYCLE_NOISE, seed=SEEDS["meo"],
                            task_init=task_init.detach())
    meo.eval()
    ev("meo_upcycled_init_sequence", lambda w: meo(w, gate_mode="sequence", prompt_len=EVAL_PROMPT).logits)
    metrics["train"]["meo"] = train_loop("meo", meo, MeoLoss(SEEDS["meo"]), steps["meo"], LR["meo"],
                                         Batches(train_streams, SEEDS["meo"]))
    meo_model.round_to_(meo, SAVE_DTYPE)  # evaluate exactly what is stored
    d_meo = out / "meo-gpt2"
    if d_meo.exists():
        shutil.rmtree(d_meo)
    meo_model.save_checkpoint(meo, d_meo, SAVE_DTYPE)
    (d_meo / "tokenizer.json").write_text(tok_json)
    meo = meo_model.load_checkpoint(d_meo)
    ev("meo_sequence", lambda w: meo(w, gate_mode="sequence", prompt_len=EVAL_PROMPT).logits)
    ev("meo_sequence_mixture_exec", lambda w: meo(w, gate_mode="sequence", prompt_len=EVAL_PROMPT,
                                                  execution="mixture").logits)
    for t, name in enumerate(TASKS):
        ev(f"meo_task_{name}", lambda w, t=t: meo(w, gate_mode="task", task=t).logits)
    metrics["eval"]["meo_task_right"] = {d: metrics["eval"][f"meo_task_{d}"][d] for d in TASKS}
    metrics["eval"]["meo_task_wrong"] = {d: metrics["eval"][f"meo_task_{TASKS[1 - i]}"][d]
                                         for i, d in enumerate(TASKS)}
    # how the sequence gate routes held-out windows: fraction that pick the same experts as the
    # right task's gate, per layer-linear
    with torch.no_grad():
        agree = {}
        for t, d in enumerate(TASKS):
            w = held[d][:64]
            gs = meo(w[:, :EVAL_PROMPT], gate_mode="sequence").gates
            gt = meo(w[:, :EVAL_PROMPT], gate_mode="task", task=t).gates
            agree[d] = round(sum(float((gs[n].indices == gt[n].indices).all(-1).float().mean())
                                 for n in gs) / len(gs), 3)
            metrics.setdefault("meo_task_gates", {})[d] = {
                n: {"indices": gt[n].indices[0].tolist(),
                    "weights": [round(x, 4) for x in gt[n].weights[0].tolist()]} for n in gt}
        metrics["meo_sequence_gate_equals_task_gate_fraction"] = agree

    # ---- (a) Mixtral: dense Mistral -> upcycled; and from scratch
    log("== dense Mistral-style model")
    mistral = new_hf(MistralForCausalLM, mistral_like(MistralConfig), SEEDS["mistral_dense"])
    metrics["train"]["mistral_dense"] = train_loop(
        "mistral-dense", mistral, hf_loss, steps["mistral_dense"], LR["mistral_dense"],
        Batches(train_streams, SEEDS["mistral_dense"]))
    ev("mistral_dense", hf_logits_fn(mistral))

    log("== Mixtral upcycled")
    mix_up = upcycle_mixtral(mistral, SEEDS["mixtral_upcycled"])
    mix_up.eval()
    ev("mixtral_upcycled_init", hf_logits_fn(mix_up))
    metrics["train"]["mixtral_upcycled"] = train_loop(
        "mixtral-upcycled", mix_up, hf_loss, steps["mixtral_upcycled"], LR["mixtral_upcycled"],
        Batches(train_streams, SEEDS["mixtral_upcycled"]))
    save_hf(mix_up, out / "mixtral-upcycled", tok_json)

    log("== Mixtral from scratch")
    mix_sc = new_hf(MixtralForCausalLM, mixtral_config(), SEEDS["mixtral_scratch"])
    metrics["train"]["mixtral_scratch"] = train_loop(
        "mixtral-scratch", mix_sc, hf_loss, steps["mixtral_scratch"], LR["mixtral_scratch"],
        Batches(train_streams, SEEDS["mixtral_scratch"]))
    save_hf(mix_sc, out / "mixtral-scratch", tok_json)

    loaded = {name: load_hf(out / name) for name in ("mixtral-upcycled", "mixtral-scratch")}
    for name, m in loaded.items():
        ev(name.replace("-", "_"), hf_logits_fn(m))

    metrics["params"] = {
        "gpt2_dense": sum(p.numel() for p in dense.parameters()),
        "meo_gpt2": sum(p.numel() for p in meo.parameters()),
        "mistral_dense": sum(p.numel() for p in mistral.parameters()),
        "mixtral": sum(p.numel() for p in mix_sc.parameters())}
    metrics["wall_s_train_and_eval"] = round(time.time() - t_all, 1)
    write_references(out, tok, domains, meo, loaded, metrics)
    metrics["wall_s_total"] = round(time.time() - t_all, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_readme(out, metrics)
    log(f"done in {metrics['wall_s_total']} s; wrote {out}")


def references_only(out: Path) -> None:
    """Recompute reference.safetensors, metrics' prompt/file entries and README.md from the
    checkpoints already in `out` (no training)."""
    tok = Tokenizer.from_file(str(out / "meo-gpt2" / "tokenizer.json"))
    metrics = json.loads((out / "metrics.json").read_text())
    meo = meo_model.load_checkpoint(out / "meo-gpt2")
    loaded = {name: load_hf(out / name) for name in ("mixtral-upcycled", "mixtral-scratch")}
    write_references(out, tok, load_domains(), meo, loaded, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_readme(out, metrics)
    log(f"references rewritten in {out}")


def write_references(out: Path, tok, domains, meo, loaded, metrics) -> None:
    """The first candidate prompt per domain that every model passes (see FixtureError)."""
    d_meo = out / "meo-gpt2"
    log("== references")
    prompts = {}
    for t, d in enumerate(TASKS):
        for text, ids in prompt_candidates(tok, domains[d][1]):
            try:
                meo_reference(meo, ids, t, f"{d}.")
                for m in loaded.values():
                    mixtral_reference(m, ids, f"{d}.")
            except FixtureError as e:
                log(f"  prompt rejected: {e}")
                continue
            prompts[d] = (text, ids)
            break
        else:
            raise SystemExit(f"no usable {d} prompt")
    meta_common = {"generator": "examples/train/train.py", "reference_dtype": "float32",
                   "weights_dtype": "float16", "torch": torch.__version__,
                   "transformers": transformers.__version__, "eos_token_id": EOT_ID,
                   "prompt_docs": prompts["docs"][0], "prompt_code": prompts["code"][0]}
    ref = {}
    for t, d in enumerate(TASKS):
        ref.update(meo_reference(meo, prompts[d][1], t, f"{d}."))
    save_reference(d_meo, ref, {**meta_common, "family": "meo_gpt2", "tasks": ",".join(TASKS)})
    for name, m in loaded.items():
        ref = {}
        ref.update(mixtral_reference(m, prompts["docs"][1], ""))  # unprefixed: the docs prompt
        ref.update(mixtral_reference(m, prompts["code"][1], "code."))
        save_reference(out / name, ref, {**meta_common, "family": "mixtral", "layout": "per-expert",
                                         "config_form": "v5", "prompt": prompts["docs"][0]})
    metrics["prompts"] = {d: {"text": p[0], "ids": p[1]} for d, p in prompts.items()}
    for d in TASKS:
        for mode in ("sequence", "task"):
            new, _ = meo.generate(prompts[d][1], NEW_TOKENS, gate_mode=mode, task=TASKS.index(d))
            log(f"  meo {d}/{mode}: {prompts[d][0]!r} -> {tok.decode(new)!r}")
        for name, m in loaded.items():
            x = torch.tensor([prompts[d][1]])
            new = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=EOT_ID)[0, x.shape[1]:]
            log(f"  {name} {d}: {prompts[d][0]!r} -> {tok.decode(new.tolist())!r}")

    # ---- sizes, listing, metrics
    metrics["files"] = {}
    for name in ("meo-gpt2", "mixtral-upcycled", "mixtral-scratch"):
        metrics["files"][name] = {f.name: f.stat().st_size for f in sorted((out / name).iterdir())}
    metrics["listing"] = {name: tensor_listing(out / name / "model.safetensors")
                          for name in ("meo-gpt2", "mixtral-upcycled")}


if __name__ == "__main__":
    main()
