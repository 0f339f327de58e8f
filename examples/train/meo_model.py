"""meo's own PyTorch reference of an MEO-native GPT-2-style decoder.

MEO ("Merging Experts into One", He et al., EMNLP 2023) puts one bank of E *linear* experts plus
its own router on every FFN linear layer. The router picks k experts from a pooled vector (the
mean of the layer's input over the prompt = "sequence level", or a projected task embedding =
"task level"); the gate is the softmax over the top-k router logits. Because a linear map is
linear in its parameters, the gate-weighted mixture of the experts' outputs equals one matmul
with the merged parameters, for every token the gate is shared by:

    sum_i g_i (W_i x + b_i) = (sum_i g_i W_i) x + sum_i g_i b_i

so the model is *executed* merged: one merge per sequence (k * |W| MACs), one matmul per token.

Architecture (see docs/MEO-NATIVE.md for the full specification the Rust runtime implements):
GPT-2-style decoder: learned token + position embeddings, pre-LayerNorm blocks (LayerNorm with
bias, eps 1e-5), causal multi-head self-attention with fused q|k|v projection and biases, MLP
fc1 [I, H] -> GELU (tanh approximation, GPT-2's `gelu_new`) -> fc2 [H, I] where fc1 and fc2 are
MEO expert banks, final LayerNorm, LM head tied to the token embedding. All weight matrices use
the [out, in] convention (y = x @ W.T + b), unlike GPT-2's Conv1D ([in, out]).

Dense mode (`num_experts == 0`) is plain GPT-2 with the same names minus the expert bank
(`fc1.weight [I, H]`, `fc1.bias [I]`): it is the model MEO-native checkpoints are upcycled from.

This file has no dependency on transformers; it is imported by train.py and the tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_TYPE = "meo_gpt2"
GATE_MODES = ("sequence", "task")


@dataclass
class MeoGPT2Config:
    vocab_size: int = 512
    n_positions: int = 128
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    layer_norm_eps: float = 1e-5
    num_experts: int = 8  # 0 = dense GPT-2 (plain fc1/fc2), the upcycling source
    top_k: int = 2
    token_bottleneck: int = 8  # r of the token-level block; 0 = no token-level block
    task_names: list = field(default_factory=lambda: ["docs", "code"])
    task_descriptions: list = field(default_factory=list)
    gate_levels: list = field(default_factory=lambda: ["sequence", "task"])
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_json_dict(self, dtype: str = "float16") -> dict:
        d = asdict(self)
        d.update(
            model_type=MODEL_TYPE if self.is_moe else "meo_gpt2_dense",
            architectures=["MeoGPT2LMHeadModel"],
            activation_function="gelu_new",
            tie_word_embeddings=True,
            weight_layout="[out, in]: y = x @ W.T + b",
            dtype=dtype,
            num_tasks=len(self.task_names),
            head_dim=self.head_dim,
            gate="softmax over the top_k router logits of a pooled vector (no renormalisation step)",
            sequence_pool="unmasked mean of the linear layer's input over the prompt positions",
            task_pool="task_proj(task_embed[t])  (mean over a 1-row description = identity)",
            token_block="x + up(relu(down(x))) before the merged matmul; gate pooled from x",
        )
        return dict(sorted(d.items()))

    @classmethod
    def from_json_dict(cls, d: dict) -> "MeoGPT2Config":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------
@dataclass
class Gate:
    """The routing decision of one expert bank for a batch: one gate per sequence."""

    pooled: torch.Tensor  # [B, in_dim] the vector the router sees
    logits: torch.Tensor  # [B, E] router logits = pooled @ router.weight.T
    indices: torch.Tensor  # [B, k] selected experts, ascending
    weights: torch.Tensor  # [B, k] softmax over the selected logits, matching `indices`
    dense: torch.Tensor  # [B, E] weights scattered into E slots (zeros elsewhere)

    def detach(self) -> "Gate":
        return Gate(*(t.detach() for t in (self.pooled, self.logits, self.indices,
                                              self.weights, self.dense)))


def topk_softmax_gate(pooled: torch.Tensor, logits: torch.Tensor, k: int) -> Gate:
    top_v, top_i = logits.topk(k, dim=-1)  # descending
    order = top_i.argsort(dim=-1)  # report indices ascending (ties impossible: distinct ids)
    idx = top_i.gather(-1, order)
    w = torch.softmax(top_v, dim=-1).gather(-1, order)
    dense = torch.zeros_like(logits).scatter(-1, idx, w)
    return Gate(pooled, logits, idx, w, dense)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class ExpertBank(nn.Module):
    """E linear experts: weight [E, out, in], bias [E, out]."""

    def __init__(self, num_experts: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)


class TokenBlock(nn.Module):
    """Token-level residual bottleneck: x + up(relu(down(x))). up starts at zero (identity)."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.up = nn.Linear(r, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


class MeoLinear(nn.Module):
    """One MEO expert bank replacing a linear layer in_dim -> out_dim.

    Parameters (state-dict names relative to the layer):
      experts.weight [E, out, in], experts.bias [E, out]   the linear experts
      router.weight  [E, in]                                 W_g, no bias
      task_proj.weight [in, H], task_proj.bias [in]          task level: H -> in (router space)
      token.down.weight [r, in], token.down.bias [r]         token level (r > 0 only)
      token.up.weight [in, r],   token.up.bias [in]
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: MeoGPT2Config):
        super().__init__()
        self.in_dim, self.out_dim, self.k = in_dim, out_dim, cfg.top_k
        self.num_experts = cfg.num_experts
        self.experts = ExpertBank(cfg.num_experts, in_dim, out_dim)
        self.router = nn.Linear(in_dim, cfg.num_experts, bias=False)
        self.task_proj = nn.Linear(cfg.hidden_size, in_dim) if "task" in cfg.gate_levels else None
        self.token = TokenBlock(in_dim, cfg.token_bottleneck) if cfg.token_bottleneck > 0 else None

    def route(self, pooled: torch.Tensor) -> Gate:
        return topk_softmax_gate(pooled, self.router(pooled), self.k)

    def merge(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta_hat = sum_i g_i theta_i for weights and biases: ([B, out, in], [B, out])."""
        w = torch.einsum("be,eoi->boi", gates, self.experts.weight)
        b = gates @ self.experts.bias
        return w, b

    def forward(self, x: torch.Tensor, gates: torch.Tensor, execution: str = "merged"):
        """x [B, T, in], gates [B, E] (dense, zeros for unselected experts) -> [B, T, out]."""
        if self.token is not None:
            x = self.token(x)
        if execution == "merged":
            w, b = self.merge(gates)
            return torch.einsum("bti,boi->bto", x, w) + b[:, None, :]
        if execution == "mixture":  # reference: run every selected expert, mix the outputs
            y = x.new_zeros(*x.shape[:-1], self.out_dim)
            for e in range(self.num_experts):
                g = gates[:, e]
                if not bool((g != 0).any()):
                    continue
                y = y + g[:, None, None] * F.linear(x, self.experts.weight[e], self.experts.bias[e])
            return y
        raise ValueError(f"unknown execution {execution!r}")


class Attention(nn.Module):
    """Causal MHA; c_attn [3H, H] rows = q | k | v, each split into heads contiguously."""

    def __init__(self, cfg: MeoGPT2Config):
        super().__init__()
        self.nh, self.hd, self.h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, past: Optional[tuple] = None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.h, dim=-1)
        q, k, v = (t.view(B, T, self.nh, self.hd).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        S = k.shape[2]
        off = S - T
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        qi = torch.arange(T)[:, None] + off
        kj = torch.arange(S)[None, :]
        att = att.masked_fill(kj > qi, float("-inf"))
        y = torch.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, self.h)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: MeoGPT2Config):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        if cfg.is_moe:
            self.fc1 = MeoLinear(H, I, cfg)
            self.fc2 = MeoLinear(I, H, cfg)
        else:
            self.fc1 = nn.Linear(H, I)
            self.fc2 = nn.Linear(I, H)


class Block(nn.Module):
    def __init__(self, cfg: MeoGPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)


class GateContext:
    """How gates are obtained during one forward: computed (sequence / task) or given."""

    def __init__(self, mode, prompt_len, task_vec, fixed, execution):
        self.mode, self.prompt_len, self.task_vec = mode, prompt_len, task_vec
        self.fixed = fixed or {}
        self.execution = execution
        self.gates: dict[str, Gate] = {}

    def gate(self, name: str, layer: MeoLinear, x: torch.Tensor) -> Gate:
        if name in self.fixed:
            g = self.fixed[name]
        elif self.mode == "sequence":
            # Unmasked mean of this layer's input over the prompt positions [0, prompt_len).
            g = layer.route(x[:, : self.prompt_len].mean(dim=1))
        elif self.mode == "task":
            g = layer.route(layer.task_proj(self.task_vec))
        else:
            raise ValueError(f"unknown gate mode {self.mode!r}")
        self.gates[name] = g
        return g


@dataclass
class Output:
    logits: torch.Tensor
    gates: dict
    past: list
    aux_loss: torch.Tensor


class MeoGPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: MeoGPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.hidden_size)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.is_moe and "task" in cfg.gate_levels:
            self.task_embed = nn.Embedding(len(cfg.task_names), cfg.hidden_size)
        else:
            self.task_embed = None
        self._init_weights()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if ".experts." in name or ".token." in name:
                continue  # own init (uniform weight, zero bias / zero-up)
            if p.ndim >= 2 and "router" not in name and "task_proj" not in name:
                nn.init.normal_(p, std=0.02)
            elif p.ndim == 1 and "ln_" not in name:
                nn.init.zeros_(p)
        # Token / position embeddings N(0, 0.1): with the tied LM head, GPT-2's 0.02 learns
        # far slower at this size (measured: 2.81 vs 2.47 bits/byte on docs after 300 steps).
        nn.init.normal_(self.wte.weight, std=0.1)
        nn.init.normal_(self.wpe.weight, std=0.1)
        for blk in self.h:  # GPT-2's scaled init of residual projections
            nn.init.normal_(blk.attn.c_proj.weight, std=0.02 / math.sqrt(2 * self.config.num_layers))

    def gate_names(self) -> list[str]:
        return [f"h.{i}.mlp.{fc}" for i in range(self.config.num_layers) for fc in ("fc1", "fc2")]

    def forward(
        self,
        input_ids: torch.Tensor,
        gate_mode: str = "sequence",
        task=None,
        prompt_len: Optional[int] = None,
        gates: Optional[dict] = None,
        past: Optional[list] = None,
        execution: str = "merged",
    ) -> Output:
        """input_ids [B, T].

        gate_mode "sequence": each expert bank's gate comes from the mean of its input over
          positions [0, prompt_len) (default: all T positions), i.e. over the prompt.
        gate_mode "task": the gate comes from task_embed[task] (task: int or LongTensor [B]).
        gates: precomputed gates (name -> Gate), e.g. from the prompt pass; used as given.
        past: KV cache from a previous call (then `gates` must be given: decoding never changes
          the gate, see docs/MEO-NATIVE.md "causal-generation rule").
        execution "merged" (the model) or "mixture" (per-expert reference, same result).
        """
        cfg = self.config
        B, T = input_ids.shape
        off = 0 if past is None else past[0][0].shape[2]
        if off + T > cfg.n_positions:
            raise ValueError(f"sequence of {off + T} > n_positions {cfg.n_positions}")
        if past is not None and cfg.is_moe and not gates:
            raise ValueError("decoding with a KV cache needs the prompt's gates")
        task_vec = None
        if cfg.is_moe and gate_mode == "task" and not gates:
            if task is None:
                raise ValueError("task gate mode needs `task`")
            if isinstance(task, int):
                task = torch.full((B,), task, dtype=torch.long)
            task_vec = self.task_embed(task)
        ctx = GateContext(gate_mode, prompt_len or T, task_vec, gates, execution)
        pos = torch.arange(off, off + T)
        h = self.wte(input_ids) + self.wpe(pos)[None]
        new_past = []
        for i, blk in enumerate(self.h):
            a, kv = blk.attn(blk.ln_1(h), None if past is None else past[i])
            new_past.append(kv)
            h = h + a
            x = blk.ln_2(h)
            if cfg.is_moe:
                g1 = ctx.gate(f"h.{i}.mlp.fc1", blk.mlp.fc1, x)
                m = gelu_new(blk.mlp.fc1(x, g1.dense, execution))
                g2 = ctx.gate(f"h.{i}.mlp.fc2", blk.mlp.fc2, m)
                m = blk.mlp.fc2(m, g2.dense, execution)
            else:
                m = blk.mlp.fc2(gelu_new(blk.mlp.fc1(x)))
            h = h + m
        h = self.ln_f(h)
        logits = h @ self.wte.weight.T
        aux = logits.new_zeros(())
        if cfg.is_moe and not gates:
            for g in ctx.gates.values():  # load balance: cv^2 of per-expert importance
                imp = g.dense.sum(0)
                aux = aux + imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-10)
        return Output(logits, ctx.gates, new_past, aux)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, gate_mode: str = "sequence",
                 task: Optional[int] = None, use_cache: bool = True) -> tuple[list[int], dict]:
        """Greedy decoding under the causal-generation rule.

        The gates are computed once from the prompt (sequence mode: mean over the prompt
        positions; task mode: the task embedding) and applied unchanged to the prompt and every
        generated token. Returns (new tokens, prompt gates).
        """
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = self(ids, gate_mode=gate_mode, task=task)
        gates = {k: g.detach() for k, g in out.gates.items()}
        new = [int(out.logits[0, -1].argmax())]
        past = out.past
        seq = list(prompt_ids) + new
        for _ in range(max_new_tokens - 1):
            if use_cache:
                out = self(torch.tensor([[new[-1]]]), gates=gates, past=past)
                past = out.past
            else:  # recompute everything with the prompt's gates: must give the same tokens
                out = self(torch.tensor([seq]), gates=gates)
            new.append(int(out.logits[0, -1].argmax()))
            seq.append(new[-1])
        return new, gates


# ----------------------------------------------------------------------------------------------
# Upcycling
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def upcycle(dense: MeoGPT2LMHeadModel, cfg: MeoGPT2Config, noise: float = 0.01,
            seed: int = 0, task_init: Optional[torch.Tensor] = None) -> MeoGPT2LMHeadModel:
    """MEO-native model from a trained dense model.

    Every expert of fc1/fc2 starts as a copy of the dense layer's weight plus N(0, (noise *
    std(W_dense))^2) noise (biases copied exactly); everything else is copied. Routers,
    task projections and token blocks get their fresh init (token block = identity), so the
    upcycled model computes the dense function up to the expert noise (with noise=0 exactly:
    the gate weights sum to 1 and all experts are equal).
    task_init [n_tasks, H]: initial task embeddings (e.g. mean token embedding of each task's
    description string).
    """
    assert not dense.config.is_moe and cfg.is_moe
    torch.manual_seed(seed)
    moe = MeoGPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    dsd = dense.state_dict()
    for name, p in moe.named_parameters():
        if name in dsd:
            p.copy_(dsd[name])
    for i, blk in enumerate(moe.h):
        for fc in ("fc1", "fc2"):
            w = dsd[f"h.{i}.mlp.{fc}.weight"]
            b = dsd[f"h.{i}.mlp.{fc}.bias"]
            bank = getattr(blk.mlp, fc).experts
            eps = torch.randn(bank.weight.shape, generator=gen) * (noise * w.std())
            bank.weight.copy_(w[None].expand_as(bank.weight) + eps)
            bank.bias.copy_(b[None].expand_as(bank.bias))
    if task_init is not None and moe.task_embed is not None:
        moe.task_embed.weight.copy_(task_init)
    return moe


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O
# ----------------------------------------------------------------------------------------------
def save_checkpoint(model: MeoGPT2LMHeadModel, path: Path, dtype=torch.float16) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    dt = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    (path / "config.json").write_text(json.dumps(model.config.to_json_dict(dt), indent=2) + "\n")


def load_checkpoint(path: Path) -> MeoGPT2LMHeadModel:
    """Load in f32 (weights stored in f16 are upcast exactly)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = MeoGPT2Config.from_json_dict(json.loads((path / "config.json").read_text()))
    model = MeoGPT2LMHeadModel(cfg)
    sd = {k: v.float().clone() for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def round_to_(model: nn.Module, dtype=torch.float16) -> None:
    """Round every parameter to `dtype` and back to f32 (what the stored checkpoint holds)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
