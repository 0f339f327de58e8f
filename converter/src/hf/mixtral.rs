//! Mixtral (`MixtralForCausalLM`): plain attention, 8 SwiGLU experts per layer, softmax
//! router renormalised over the top-k, optional sliding window on every layer.
//!
//! Checkpoints name the MoE block `block_sparse_moe` (the Hub's per-expert `w1`/`w3`/`w2`)
//! or `mlp` (transformers 5 `save_pretrained`, fused `gate_up_proj`/`down_proj`).

use super::{Family, Flag, Kind, Window};
use meo::QkNorm;

pub const FAMILY: Family = Family {
    name: "mixtral",
    hf_class: "MixtralForCausalLM",
    default_rope_theta: 1e6,
    moe_prefixes: &["block_sparse_moe", "mlp"],
    expert_names: ["w1", "w3", "w2"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: false,
    qk_norm: QkNorm::None,
    attention_bias: Flag::Fixed(false),
    clip_qkv: false,
    window: Window::AllLayers { enabled_by: None },
    norm_topk_prob: Flag::Fixed(true),
    tensors: &[],
    kind: Kind::Standard,
};
