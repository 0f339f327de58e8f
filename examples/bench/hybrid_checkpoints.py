#!/usr/bin/env python3
"""Write two random-weight Qwen3-Next checkpoints of the same size for the hybrid decode
benchmark (docs/PERFORMANCE.md): `hybrid` (the real layer pattern, gated DeltaNet in three of
every four layers) and `attention` (every layer full attention). Same hidden size, heads,
experts and MoE; only the token mixers differ.

    python examples/bench/hybrid_checkpoints.py OUT_DIR
    meo convert OUT_DIR/hybrid OUT_DIR/hybrid.meo --experts int8 --dense f16
    meo convert OUT_DIR/attention OUT_DIR/attention.meo --experts int8 --dense f16
"""

import sys
from pathlib import Path

import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

SIZES = dict(
    vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, intermediate_size=1024, moe_intermediate_size=256, shared_expert_intermediate_size=256,
    num_experts=16, num_experts_per_tok=4, linear_num_key_heads=4, linear_num_value_heads=8,
    linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=8192,
    partial_rotary_factor=0.25, rope_theta=1e7, rms_norm_eps=1e-6, norm_topk_prob=True, eos_token_id=0,
)


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    for name, types in [
        ("hybrid", ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(8)]),
        ("attention", ["full_attention"] * 8),
    ]:
        cfg = Qwen3NextConfig(**SIZES, layer_types=types)
        cfg.architectures = ["Qwen3NextForCausalLM"]
        model = Qwen3NextForCausalLM(cfg).eval()
        model.save_pretrained(out / name)
        print(f"wrote {out / name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    main()
