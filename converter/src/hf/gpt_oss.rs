//! GPT-OSS (`GptOssForCausalLM`, transformers `gpt_oss`, e.g. gpt-oss-20b): q/k/v/o biases,
//! a learned sink logit per head that joins the attention softmax, sliding-window layers by
//! `layer_types`, YaRN RoPE, a router with a bias that takes the top-k of the logits and
//! softmaxes over those k, and experts with biases and a clamped SwiGLU
//! (`(clamp(up, ±limit) + 1) · g · σ(alpha · g)`, `g = min(gate, limit)`).
//!
//! Experts as transformers' `save_pretrained` writes them (bf16/f32): transposed and fused,
//! `mlp.experts.gate_up_proj [E, H, 2I]` with gate at even and up at odd columns,
//! `gate_up_proj_bias [E, 2I]` (interleaved alike), `down_proj [E, I, H]`, `down_proj_bias
//! [E, H]`. The original release's MXFP4 experts (`*_blocks`, `*_scales`) are read as the
//! same tensors ([`super::quantized`]).

use super::{Family, Features, Flag, FusedLayout, Kind, Window};
use meo::{QkNorm, Scoring};

const FEATURES: Features = Features {
    scoring: Scoring::SoftmaxAfterTopK,
    router_bias: true,
    out_bias_with_qkv_bias: true,
    attention_sinks: true,
    clamped_swiglu: true,
    fused_layout: FusedLayout::TransposedInterleaved,
    ..Features::STANDARD
};

pub const FAMILY: Family = Family {
    name: "gpt_oss",
    hf_class: "GptOssForCausalLM",
    default_rope_theta: 150_000.0,
    moe_prefixes: &["mlp"],
    // GPT-OSS checkpoints are never per-expert; these names are never found.
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: false,
    qk_norm: QkNorm::None,
    attention_bias: Flag::Key("attention_bias", true),
    clip_qkv: false,
    window: Window::Alternating,
    norm_topk_prob: Flag::Fixed(false),
    tensors: &[
        ("router.weight", "{moe}.router.weight"),
        ("router.bias", "{moe}.router.bias"),
        ("attn.q.bias", "self_attn.q_proj.bias"),
        ("attn.k.bias", "self_attn.k_proj.bias"),
        ("attn.v.bias", "self_attn.v_proj.bias"),
        ("attn.o.bias", "self_attn.o_proj.bias"),
        ("attn.sinks", "self_attn.sinks"),
    ],
    kind: Kind::Extended(&FEATURES),
};
