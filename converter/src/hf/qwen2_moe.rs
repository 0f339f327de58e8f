//! Qwen2-MoE (`Qwen2MoeForCausalLM`, e.g. Qwen1.5-MoE-A2.7B): q/k/v biases, a shared expert
//! scaled by `sigmoid(shared_expert_gate · x)`, dense MLP layers chosen by `mlp_only_layers`
//! and `decoder_sparse_step`, sliding-window layers chosen by `layer_types`.

use super::{Family, Flag, Kind, Window};
use meo::QkNorm;

pub const FAMILY: Family = Family {
    name: "qwen2_moe",
    hf_class: "Qwen2MoeForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: true,
    qk_norm: QkNorm::None,
    // Hub configs have no `qkv_bias` key: the biases are always there.
    attention_bias: Flag::Key("qkv_bias", true),
    clip_qkv: false,
    window: Window::LayerTypes,
    norm_topk_prob: Flag::Key("norm_topk_prob", false),
    tensors: &[
        ("attn.q.bias", "self_attn.q_proj.bias"),
        ("attn.k.bias", "self_attn.k_proj.bias"),
        ("attn.v.bias", "self_attn.v_proj.bias"),
        ("ffn.gate.weight", "mlp.gate_proj.weight"),
        ("ffn.up.weight", "mlp.up_proj.weight"),
        ("ffn.down.weight", "mlp.down_proj.weight"),
        ("shared.gate.weight", "{moe}.shared_expert.gate_proj.weight"),
        ("shared.up.weight", "{moe}.shared_expert.up_proj.weight"),
        ("shared.down.weight", "{moe}.shared_expert.down_proj.weight"),
        ("shared_gate.weight", "{moe}.shared_expert_gate.weight"),
    ],
    kind: Kind::Standard,
};
