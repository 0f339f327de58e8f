//! Granite-MoE (`GraniteMoeForCausalLM`, transformers `granitemoe`, e.g.
//! granite-3.0-1b-a400m): a Mixtral-like decoder with four scalars — embeddings times
//! `embedding_multiplier`, attention scale `attention_multiplier` (not `head_dim^-0.5`), each
//! residual branch times `residual_multiplier`, logits divided by `logits_scaling` — a router
//! that takes the top-k of the logits and softmaxes over those k, and tied embeddings.
//!
//! Experts are fused 3-D tensors in both layouts transformers 5.23 reads: the Hub's
//! `block_sparse_moe.input_linear.weight [E, 2I, H]` (gate rows first) /
//! `output_linear.weight [E, H, I]` / `router.layer.weight` (also what `save_pretrained`
//! writes by default), and the transformers-5 names `block_sparse_moe.experts.gate_up_proj` /
//! `experts.down_proj` / `router.weight` (`save_original_format=False`).

use super::{Family, Features, Flag, FusedLayout, Kind, Window};
use meo::{QkNorm, Scoring};

const FEATURES: Features = Features {
    scoring: Scoring::SoftmaxAfterTopK,
    out_bias_with_qkv_bias: true,
    multipliers: true,
    fused_layout: FusedLayout::GateUpRows,
    fused_names: &[("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight")],
    ..Features::STANDARD
};

pub const FAMILY: Family = Family {
    name: "granitemoe",
    hf_class: "GraniteMoeForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["block_sparse_moe"],
    // Granite checkpoints are never per-expert; these names are never found.
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: false,
    qk_norm: QkNorm::None,
    // `attention_bias` gives q, k, v and o biases.
    attention_bias: Flag::Key("attention_bias", false),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Fixed(false),
    tensors: &[
        ("router.weight", "{moe}.router.layer.weight|{moe}.router.weight"),
        ("attn.q.bias", "self_attn.q_proj.bias"),
        ("attn.k.bias", "self_attn.k_proj.bias"),
        ("attn.v.bias", "self_attn.v_proj.bias"),
        ("attn.o.bias", "self_attn.o_proj.bias"),
    ],
    kind: Kind::Extended(&FEATURES),
};
