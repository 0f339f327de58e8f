//! Granite-4 hybrid (`GraniteMoeHybridForCausalLM`, transformers `granitemoehybrid`, e.g.
//! granite-4.0-h-tiny / h-small): Granite-MoE's decoder (its four multipliers, top-k-then-softmax
//! router, fused `block_sparse_moe` experts, tied embeddings) where `layer_types` says `mamba`
//! (legacy name; `linear_attention` in transformers 5) the layer's mixer is Mamba2
//! (`mamba.*`: fused `in_proj`, depthwise `conv1d` with bias, `dt_bias`, `A_log`, `D`, a gated
//! RMSNorm per group, `out_proj`), and every MoE layer adds an ungated `shared_mlp`. Attention
//! layers have no positional encoding unless `position_embedding_type` is `rope`.
//!
//! Refused: `mamba_proj_bias` (the projections have no bias slot), a `time_step_limit` clamp,
//! and dense variants (`num_local_experts` 0).

use super::{Family, Features, Flag, FusedLayout, Kind, Window};
use meo::{QkNorm, Scoring};

const FEATURES: Features = Features {
    scoring: Scoring::SoftmaxAfterTopK,
    out_bias_with_qkv_bias: true,
    multipliers: true,
    fused_layout: FusedLayout::GateUpRows,
    fused_names: &[("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight")],
    mamba2: true,
    shared_mlp: true,
    position_embedding_type: true,
    ..Features::STANDARD
};

pub const FAMILY: Family = Family {
    name: "granitemoehybrid",
    hf_class: "GraniteMoeHybridForCausalLM",
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
        ("shared.down.weight", "shared_mlp.output_linear.weight"),
        ("mixer.conv.bias", "mamba.conv1d.bias"),
        ("mixer.dt_bias", "mamba.dt_bias"),
        ("mixer.a_log", "mamba.A_log"),
        ("mixer.d", "mamba.D"),
        ("mixer.norm.weight", "mamba.norm.weight"),
        ("mixer.out.weight", "mamba.out_proj.weight"),
    ],
    kind: Kind::Extended(&FEATURES),
};
