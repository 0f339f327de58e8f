//! Qwen3-Next (`Qwen3NextForCausalLM`, e.g. Qwen3-Next-80B-A3B): a hybrid decoder. Layers
//! where `layer_types` says `linear_attention` (three of every four, `full_attention_interval`)
//! are gated DeltaNet (`linear_attn.*`: fused `in_proj_qkvz` / `in_proj_ba`, a depthwise
//! `conv1d`, `A_log`, `dt_bias`, a gated RMSNorm, `out_proj`); the others are attention whose
//! `q_proj` also yields an output gate, with per-head q/k RMSNorm and RoPE on the first
//! `partial_rotary_factor` (0.25) of each head. Every RMSNorm but the DeltaNet's is
//! zero-centred (`1 + w`). MoE layers as Qwen2-MoE's: softmax top-k (renormalised with
//! `norm_topk_prob`) plus a shared expert gated by `sigmoid(shared_expert_gate · x)`.
//! Multi-token-prediction tensors (`mtp.*`) are not converted.

use super::{DeltaLayout, Family, Features, Flag, Kind, Window};
use meo::QkNorm;

const FEATURES: Features = Features {
    zero_centred_norms: true,
    gated_attention: true,
    partial_rotary: true,
    delta_net: Some(DeltaLayout::FusedPerKeyHead),
    ignored_prefixes: &["mtp."],
    ..Features::STANDARD
};

pub const FAMILY: Family = Family {
    name: "qwen3_next",
    hf_class: "Qwen3NextForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: true,
    qk_norm: QkNorm::PerHead,
    // `attention_bias` would give o_proj a bias too, which the runtime has no slot for here.
    attention_bias: Flag::MustBeFalse("attention_bias"),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Key("norm_topk_prob", true),
    tensors: &[
        ("attn.q_norm.weight", "self_attn.q_norm.weight"),
        ("attn.k_norm.weight", "self_attn.k_norm.weight"),
        ("ffn.gate.weight", "mlp.gate_proj.weight"),
        ("ffn.up.weight", "mlp.up_proj.weight"),
        ("ffn.down.weight", "mlp.down_proj.weight"),
        ("shared.gate.weight", "{moe}.shared_expert.gate_proj.weight"),
        ("shared.up.weight", "{moe}.shared_expert.up_proj.weight"),
        ("shared.down.weight", "{moe}.shared_expert.down_proj.weight"),
        ("shared_gate.weight", "{moe}.shared_expert_gate.weight"),
        ("mixer.conv.weight", "linear_attn.conv1d.weight"),
        ("mixer.dt_bias", "linear_attn.dt_bias"),
        ("mixer.a_log", "linear_attn.A_log"),
        ("mixer.norm.weight", "linear_attn.norm.weight"),
        ("mixer.out.weight", "linear_attn.out_proj.weight"),
    ],
    kind: Kind::Extended(&FEATURES),
};
