//! OLMoE (`OlmoeForCausalLM`, e.g. OLMoE-1B-7B): RMSNorm over the whole q and k projections
//! (before splitting into heads), optional `clip_qkv` clamp, 64 small experts per layer.

use super::{Family, Flag, Kind, Window};
use meo::QkNorm;

pub const FAMILY: Family = Family {
    name: "olmoe",
    hf_class: "OlmoeForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: false,
    qk_norm: QkNorm::Full,
    // `attention_bias` would also give o_proj a bias, which the runtime has no slot for.
    attention_bias: Flag::MustBeFalse("attention_bias"),
    clip_qkv: true,
    window: Window::None,
    norm_topk_prob: Flag::Key("norm_topk_prob", false),
    tensors: &[("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight")],
    kind: Kind::Standard,
};
