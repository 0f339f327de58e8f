//! Qwen3.5-MoE (`Qwen3_5MoeForCausalLM`, and the text model of
//! `Qwen3_5MoeForConditionalGeneration` checkpoints such as Qwen3.5-35B-A3B): Qwen3-Next's
//! hybrid decoder (gated DeltaNet in the `linear_attention` layers, gated attention with
//! per-head q/k RMSNorm and partial RoPE in the others, zero-centred RMSNorms, a shared expert
//! gated by `sigmoid(shared_expert_gate · x)`), with these differences, as transformers 5.23
//! runs them:
//! - the DeltaNet's input projections are stored apart ([`DeltaLayout::Separate`]);
//! - every layer is MoE (no `mlp_only_layers` / `decoder_sparse_step`), and the router always
//!   renormalises its top-k (`Qwen3_5MoeTopKRouter`; the config has no `norm_topk_prob`);
//! - RoPE is multimodal (`mrope_section`, `mrope_interleaved`): for text every token has the
//!   same temporal, height and width position, which makes it the plain (partial) RoPE;
//!   image and video positions are not converted (text only).
//!
//! The multimodal checkpoints nest the text config under `text_config` and store the text
//! model under `model.language_model.` (read as `model.`, as transformers does); the vision
//! tower (`model.visual.*`) and the multi-token-prediction head (`mtp.*`) are not converted.

use super::config::{self, Json};
use super::{DeltaLayout, Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result};
use meo::{ModelConfig, QkNorm};

const FEATURES: Features = Features {
    zero_centred_norms: true,
    gated_attention: true,
    partial_rotary: true,
    delta_net: Some(DeltaLayout::Separate),
    ignored_prefixes: &["mtp.", "model.visual."],
    renamed_prefixes: &[("model.language_model.", "model.")],
    ..Features::STANDARD
};

/// `Qwen3_5MoeForCausalLM` (`model_type` `qwen3_5_moe_text`): the text config at the top level.
pub const FAMILY: Family = Family {
    name: "qwen3_5_moe",
    hf_class: "Qwen3_5MoeForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: false,
    shared_expert: true,
    qk_norm: QkNorm::PerHead,
    attention_bias: Flag::MustBeFalse("attention_bias"),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Fixed(true),
    tensors: &[
        ("attn.q_norm.weight", "self_attn.q_norm.weight"),
        ("attn.k_norm.weight", "self_attn.k_norm.weight"),
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

const MULTIMODAL: OwnConfig = OwnConfig { name: "qwen3_5_moe_multimodal", read: text_config, features: FEATURES };

/// `Qwen3_5MoeForConditionalGeneration` (`model_type` `qwen3_5_moe`): its text model.
pub const FAMILY_MULTIMODAL: Family =
    Family { hf_class: "Qwen3_5MoeForConditionalGeneration", kind: Kind::Own(&MULTIMODAL), ..FAMILY };

/// The model config of a multimodal config's `text_config`. `tie_word_embeddings` is the
/// top level's (transformers ties by the outer config; false when absent), and the top level's
/// `eos_token_id`, if any, joins the text config's.
fn text_config(j: &Json<'_>, f: &'static Family, eos: Vec<u64>) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    let text = j
        .raw("text_config")
        .and_then(serde_json::Value::as_object)
        .context("key \"text_config\" is missing or not an object")?;
    let mut more: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    config::union_into(&mut more, eos);
    let mut cfg = config::model_config(&Json(text), f, more).context("text_config")?;
    cfg.tie_word_embeddings = j.bool_or("tie_word_embeddings", false)?;
    Ok((cfg, 0..0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text() -> serde_json::Value {
        json!({
            "model_type": "qwen3_5_moe_text", "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
            "vocab_size": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "eos_token_id": 0,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": true}
        })
    }

    fn parse(v: serde_json::Value) -> Result<(&'static Family, ModelConfig)> {
        let p = super::super::parse_config(v.as_object().unwrap(), vec![])?;
        Ok((p.family, p.config))
    }

    #[test]
    fn causal_and_multimodal_configs_give_one_text_model() {
        let mut causal = text();
        causal["architectures"] = json!(["Qwen3_5MoeForCausalLM"]);
        let (f, c) = parse(causal).unwrap();
        assert_eq!(f.hf_class, "Qwen3_5MoeForCausalLM");
        assert_eq!(c.architecture, "qwen3_5_moe");
        // Every layer MoE; the router always renormalises; RoPE on 4 of 16 dims.
        assert!(c.layer_ffn.iter().all(|&k| k == meo::FfnKind::Moe));
        assert!(c.router.norm_topk_prob && c.router.num_shared_experts == 1);
        assert_eq!((c.recipe.rope_dim, c.rope_theta), (4, 1e7));
        assert_eq!(c.recipe.layer_mixer.iter().filter(|&&m| m == meo::config::Mixer::GatedDeltaNet).count(), 3);
        let multimodal = json!({
            "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text(), "vision_config": {"depth": 1}, "tie_word_embeddings": false,
            "image_token_id": 248056
        });
        let (f, m) = parse(multimodal.clone()).unwrap();
        assert_eq!(f.hf_class, "Qwen3_5MoeForConditionalGeneration");
        assert_eq!(m, c);
        // The outer config decides the tie.
        let mut tied = multimodal.clone();
        tied["tie_word_embeddings"] = json!(true);
        assert!(parse(tied).unwrap().1.tie_word_embeddings);
        let mut bare = multimodal;
        bare.as_object_mut().unwrap().remove("text_config");
        let e = format!("{:#}", parse(bare).unwrap_err());
        assert!(e.contains("text_config"), "{e}");
    }
}
