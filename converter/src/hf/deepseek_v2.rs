//! DeepSeek-V2 (`DeepseekV2ForCausalLM`): the MLA decoder of DeepSeek-V3 with softmax routing,
//! group-limited greedy selection (a group scores by its best expert), no renormalisation
//! (transformers' `DeepseekV2TopkRouter` ignores `norm_topk_prob`), `routed_scaling_factor`,
//! and always-on shared experts. RoPE is always interleaved (complex multiplication).
//! Config reading is shared with DeepSeek-V3 ([`super::deepseek_v3::model_config`]).

use super::deepseek_v3::{TENSORS, Variant};
use super::{Family, Flag, Kind, Window};
use meo::config::GroupScore;
use meo::{QkNorm, Scoring};

pub const FAMILY: Family = Family {
    name: "deepseek_v2",
    hf_class: "DeepseekV2ForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: true,
    qk_norm: QkNorm::None,
    attention_bias: Flag::MustBeFalse("attention_bias"),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::MustBeFalse("norm_topk_prob"),
    tensors: TENSORS,
    kind: Kind::DeepSeek,
};

/// transformers' `DeepseekV2TopkRouter`: softmax; `greedy` = plain top-k,
/// `group_limited_greedy` = groups by their best probability; weights never renormalised.
pub(crate) const V2: Variant = Variant {
    family: "deepseek_v2",
    first_k_dense: 0,
    shared_experts: 2,
    scaling: 1.0,
    scoring: Scoring::Softmax,
    scoring_func: "softmax",
    topk_methods: &[("greedy", false), ("group_limited_greedy", true)],
    group_score: GroupScore::Max,
    selection_bias: false,
    renormalise: None,
    rope_interleave_key: false,
};
