#!/usr/bin/env python3
"""Tests of the MEO-native reference (examples/train/meo_model.py) and the committed models.

Run from the repository root (no pytest needed; pytest also collects the test_* functions):
    .venv-ref/bin/python examples/train/test_meo_model.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import meo_model  # noqa: E402
from meo_model import MeoGPT2Config, MeoGPT2LMHeadModel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAINED = Path(os.environ.get("MEO_TRAINED_DIR", REPO / "tests" / "fixtures" / "trained"))


def small_cfg(**kw) -> MeoGPT2Config:
    base = dict(vocab_size=97, n_positions=32, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=48, num_experts=6, top_k=2, token_bottleneck=4)
    base.update(kw)
    return MeoGPT2Config(**base)


def randomized(cfg: MeoGPT2Config, seed: int = 0) -> MeoGPT2LMHeadModel:
    torch.manual_seed(seed)
    m = MeoGPT2LMHeadModel(cfg)
    with torch.no_grad():  # make everything non-trivial (token block, biases, ...)
        for name, p in m.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    return m.eval()


def test_merged_equals_mixture_of_linear_experts():
    """For a linear map, merging parameters == mixing the experts' outputs (both gate levels)."""
    m = randomized(small_cfg())
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode, kw in (("sequence", {}), ("sequence", {"prompt_len": 7}),
                         ("task", {"task": torch.tensor([0, 1, 0])})):
            a = m(ids, gate_mode=mode, **kw)
            b = m(ids, gate_mode=mode, execution="mixture", **kw)
            diff = (a.logits - b.logits).abs().max().item()
            assert diff < 1e-5, (mode, diff)
            for n in a.gates:  # same routing in both executions
                assert torch.equal(a.gates[n].indices, b.gates[n].indices)
            # and per layer: one linear bank in isolation, f64
            fc = m.h[0].mlp.fc1.double()
            x = torch.randn(3, 20, 32, dtype=torch.float64)
            g = fc.route(x.mean(1))
            ym = fc(x, g.dense, "merged")
            yx = fc(x, g.dense, "mixture")
            assert (ym - yx).abs().max().item() < 1e-12
            m.h[0].mlp.fc1.float()


def test_gate_is_softmax_over_topk_logits():
    m = randomized(small_cfg())
    fc = m.h[1].mlp.fc2
    pooled = torch.randn(5, fc.in_dim)
    g = fc.route(pooled)
    logits = pooled @ fc.router.weight.T
    torch.testing.assert_close(g.logits, logits)
    top = logits.topk(2, -1)
    assert torch.equal(g.indices, top.indices.sort(-1).values)
    assert (g.indices[:, 0] < g.indices[:, 1]).all()
    torch.testing.assert_close(g.dense.sum(-1), torch.ones(5))
    w = torch.softmax(top.values, -1)
    for b in range(5):
        for j in range(2):
            assert torch.isclose(g.dense[b, top.indices[b, j]], w[b, j])


def test_sequence_gate_pools_prompt_only():
    """prompt_len=P: gates depend only on the first P tokens; logits at positions < P equal a
    forward over the prompt alone (causality), and later tokens never change the gate."""
    m = randomized(small_cfg())
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids, gate_mode="sequence", prompt_len=10)
        prompt = m(ids[:, :10], gate_mode="sequence")
        ids2 = ids.clone()
        ids2[:, 10:] = (ids2[:, 10:] + 5) % 97
        other = m(ids2, gate_mode="sequence", prompt_len=10)
    torch.testing.assert_close(full.logits[:, :10], prompt.logits, atol=1e-5, rtol=0)
    for n in full.gates:
        torch.testing.assert_close(full.gates[n].dense, prompt.gates[n].dense)
        torch.testing.assert_close(full.gates[n].dense, other.gates[n].dense)


def test_kv_cache_generation_matches_recompute():
    m = randomized(small_cfg(), seed=3)
    prompt = [5, 17, 3, 88, 42, 9, 61]
    for mode, task in (("sequence", None), ("task", 1)):
        a, ga = m.generate(prompt, 12, gate_mode=mode, task=task, use_cache=True)
        b, gb = m.generate(prompt, 12, gate_mode=mode, task=task, use_cache=False)
        assert a == b, (mode, a, b)
        # and the whole sequence in one forward with the gate pooled over the prompt
        with torch.no_grad():
            seq = torch.tensor([prompt + a[:-1]])
            lg = m(seq, gate_mode=mode, task=task, prompt_len=len(prompt)).logits[0]
        assert lg[len(prompt) - 1:].argmax(-1).tolist() == a


def test_upcycled_without_noise_equals_dense():
    dense_cfg = small_cfg(num_experts=0, token_bottleneck=0, gate_levels=[], task_names=[])
    dense = randomized(dense_cfg, seed=4)
    moe = meo_model.upcycle(dense, small_cfg(task_names=["a", "b"]), noise=0.0, seed=5)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = dense(ids).logits
        for mode in ("sequence", "task"):
            out = moe(ids, gate_mode=mode, task=1).logits
            assert (out - ref).abs().max().item() < 1e-5


def test_dense_matches_transformers_gpt2():
    """Dense mode is exactly GPT-2 (gelu_new, pre-LN, tied head) up to the [out,in] layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = small_cfg(num_experts=0, token_bottleneck=0, gate_levels=[], task_names=[])
    ours = randomized(cfg, seed=7)
    hf_cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = ours.state_dict()
    with torch.no_grad():
        t = hf.transformer
        t.wte.weight.copy_(sd["wte.weight"])
        t.wpe.weight.copy_(sd["wpe.weight"])
        t.ln_f.weight.copy_(sd["ln_f.weight"])
        t.ln_f.bias.copy_(sd["ln_f.bias"])
        for i, blk in enumerate(t.h):
            for ln in ("ln_1", "ln_2"):
                getattr(blk, ln).weight.copy_(sd[f"h.{i}.{ln}.weight"])
                getattr(blk, ln).bias.copy_(sd[f"h.{i}.{ln}.bias"])
            for ours_name, mod in (("attn.c_attn", blk.attn.c_attn), ("attn.c_proj", blk.attn.c_proj),
                                   ("mlp.fc1", blk.mlp.c_fc), ("mlp.fc2", blk.mlp.c_proj)):
                mod.weight.copy_(sd[f"h.{i}.{ours_name}.weight"].T)  # Conv1D is [in, out]
                mod.bias.copy_(sd[f"h.{i}.{ours_name}.bias"])
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a = ours(ids).logits
        b = hf(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max().item()


def test_checkpoint_roundtrip():
    m = randomized(small_cfg(task_names=["a", "b"]), seed=9)
    meo_model.round_to_(m, torch.float16)
    with tempfile.TemporaryDirectory() as d:
        meo_model.save_checkpoint(m, Path(d), torch.float16)
        cfg = json.loads((Path(d) / "config.json").read_text())
        assert cfg["model_type"] == "meo_gpt2" and cfg["num_experts"] == 6
        back = meo_model.load_checkpoint(Path(d))
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_committed_meo_reference():
    """The committed meo-gpt2 checkpoint reproduces its reference.safetensors."""
    path = TRAINED / "meo-gpt2"
    if not (path / "reference.safetensors").exists():
        print("  (skipped: no committed meo-gpt2)")
        return
    from safetensors.torch import load_file

    m = meo_model.load_checkpoint(path)
    ref = load_file(str(path / "reference.safetensors"))
    for t, p in enumerate(m.config.task_names):
        ids = ref[f"{p}.input_ids"].tolist()
        for mode in ("sequence", "task"):
            with torch.no_grad():
                out = m(torch.tensor([ids]), gate_mode=mode, task=t)
            q = f"{p}.{mode}."
            assert (out.logits[0] - ref[q + "logits"]).abs().max().item() < 1e-4
            for name, g in out.gates.items():
                li, fc = name.split(".")[1], name.split(".")[3]
                r = f"{q}layers.{li}.{fc}."
                assert torch.equal(g.indices[0], ref[r + "topk_indices"]), name
                torch.testing.assert_close(g.weights[0], ref[r + "topk_weights"])
            new, _ = m.generate(ids, 16, gate_mode=mode, task=t)
            assert new == ref[q + "greedy_tokens"].tolist()


def test_committed_mixtral_references():
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    for name in ("mixtral-upcycled", "mixtral-scratch"):
        path = TRAINED / name
        if not (path / "reference.safetensors").exists():
            print(f"  (skipped: no committed {name})")
            continue
        m = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               attn_implementation="eager",
                                               experts_implementation="eager").eval()
        ref = load_file(str(path / "reference.safetensors"))
        for pre in ("", "code."):
            ids = ref[pre + "input_ids"][None]
            with torch.no_grad():
                lg = m(input_ids=ids).logits[0]
                gen = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=16, pad_token_id=0)[0, ids.shape[1]:]
            assert (lg - ref[pre + "logits"]).abs().max().item() < 1e-4, name
            assert torch.equal(gen, ref[pre + "greedy_tokens"]), name


if __name__ == "__main__":
    fns = [v for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    for fn in fns:
        fn()
        print(f"ok  {fn.__name__}")
    print(f"{len(fns)} tests passed")
