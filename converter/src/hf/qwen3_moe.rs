//! Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): RMSNorm on each q/k head, no
//! biases, optional dense MLP layers (`mlp_only_layers`, `decoder_sparse_step`).

use super::{Family, Flag, Kind, Window};
use meo::QkNorm;

pub const FAMILY: Family = Family {
    name: "qwen3_moe",
    hf_class: "Qwen3MoeForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: false,
    qk_norm: QkNorm::PerHead,
    // `attention_bias` would also give o_proj a bias, which the runtime has no slot for.
    attention_bias: Flag::MustBeFalse("attention_bias"),
    clip_qkv: false,
    window: Window::AllLayers { enabled_by: Some("use_sliding_window") },
    norm_topk_prob: Flag::Key("norm_topk_prob", false),
    tensors: &[
        ("attn.q_norm.weight", "self_attn.q_norm.weight"),
        ("attn.k_norm.weight", "self_attn.k_norm.weight"),
        ("ffn.gate.weight", "mlp.gate_proj.weight"),
        ("ffn.up.weight", "mlp.up_proj.weight"),
        ("ffn.down.weight", "mlp.down_proj.weight"),
    ],
    kind: Kind::Standard,
};
