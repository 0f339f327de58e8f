//! LFM2-MoE (`Lfm2MoeForCausalLM`, transformers `lfm2_moe`, e.g. LFM2-8B-A1B): a hybrid decoder
//! whose layers are, per `layer_types`, gated short convolutions (`conv`: `conv.in_proj`
//! `[3h, h]` = b, c, x; a depthwise `conv.conv` of width `conv_L_cache`; `conv.out_proj`) or
//! attention (`full_attention`: per-head q/k RMSNorm `q_layernorm` / `k_layernorm`, RoPE,
//! `out_proj`). The first `num_dense_layers` layers have a dense SwiGLU MLP (`feed_forward.w1`,
//! `w3`, `w2`), the others MoE: sigmoid scores, top-k selected on `sigmoid + expert_bias`
//! (a selection-only bias), the unbiased sigmoids of the selected renormalised (`+ 1e-6`) and
//! times `routed_scaling_factor`; no shared expert. Norms: `operator_norm`, `ffn_norm`, and
//! the final `embedding_norm`; tied embeddings. Semantics: transformers 5.23
//! `Lfm2MoeTopKRouter`, `Lfm2MoeSparseMoeBlock`, `Lfm2MoeShortConv`, `Lfm2MoeDecoderLayer`
//! (see `docs/ROUTING.md`).
//!
//! Refused: `conv_bias` (biases on the convolution and its projections: no released model).

use super::config::{Json, rope_theta, union_into};
use super::{Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{Mixer, Recipe};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const OWN: OwnConfig = OwnConfig {
    name: "lfm2_moe",
    read: model_config,
    features: Features { short_conv: true, output_norm: Some("model.embedding_norm.weight"), ..Features::STANDARD },
};

pub const FAMILY: Family = Family {
    name: "lfm2_moe",
    hf_class: "Lfm2MoeForCausalLM",
    default_rope_theta: 1e6,
    moe_prefixes: &["feed_forward"],
    expert_names: ["w1", "w3", "w2"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: false,
    qk_norm: QkNorm::PerHead,
    attention_bias: Flag::Fixed(false),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Key("norm_topk_prob", true),
    tensors: &[
        ("attn_norm.weight", "operator_norm.weight"),
        ("ffn_norm.weight", "ffn_norm.weight"),
        ("attn.o.weight", "self_attn.out_proj.weight"),
        ("attn.q_norm.weight", "self_attn.q_layernorm.weight"),
        ("attn.k_norm.weight", "self_attn.k_layernorm.weight"),
        ("ffn.gate.weight", "feed_forward.w1.weight"),
        ("ffn.up.weight", "feed_forward.w3.weight"),
        ("ffn.down.weight", "feed_forward.w2.weight"),
        ("router.selection_bias", "{moe}.expert_bias"),
        ("mixer.out.weight", "conv.out_proj.weight"),
    ],
    kind: Kind::Own(&OWN),
};

/// Fills a [`ModelConfig`] for LFM2-MoE from its `config.json` (absent keys take
/// `Lfm2MoeConfig`'s defaults, which are LFM2-8B-A1B's values).
///
/// # Errors
/// A missing or mistyped key, an unsupported variant (`conv_bias`, RoPE scaling, an unknown
/// layer type), or inconsistent sizes; the message names the key.
pub(crate) fn model_config(
    j: &Json<'_>,
    f: &'static Family,
    eos: Vec<u64>,
) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    ensure!(!j.bool_or("conv_bias", false)?, "conv_bias = true is not supported");
    let hidden = j.opt_usize("hidden_size")?.unwrap_or(2048);
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.opt_usize("num_attention_heads")?.unwrap_or(32);
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(8);
    ensure!(
        heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads) && hidden.is_multiple_of(heads),
        "num_attention_heads {heads} must divide hidden_size {hidden} and be a multiple of num_key_value_heads {kv_heads}"
    );
    let experts = j.opt_usize("num_experts")?.unwrap_or(32);
    let top_k = j.opt_usize("num_experts_per_tok")?.unwrap_or(4);
    ensure!(top_k > 0 && top_k <= experts, "num_experts_per_tok {top_k} must be in 1..={experts}");
    let dense = j.opt_usize("num_dense_layers")?.unwrap_or(2);
    let layer_ffn: Vec<FfnKind> = (0..layers).map(|l| if l < dense { FfnKind::Dense } else { FfnKind::Moe }).collect();
    let types: Vec<String> = match j.raw("layer_types") {
        Some(v) => serde_json::from_value(v.clone()).context("layer_types must be a list of strings")?,
        None => bail!("key \"layer_types\" is missing (which layers are convolutions)"),
    };
    ensure!(types.len() == layers, "layer_types has {} entries for {layers} layers", types.len());
    let layer_mixer = types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "conv" => Ok(Mixer::ShortConv),
            "full_attention" => Ok(Mixer::Attention),
            other => bail!("layer {i}: layer type {other:?} is not supported"),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    if j.raw("eos_token_id").is_none() {
        eos_ids.push(2);
    }
    union_into(&mut eos_ids, eos);
    let tie = match j.raw("tie_word_embeddings") {
        Some(_) => j.bool_or("tie_word_embeddings", true)?,
        None => j.bool_or("tie_embedding", true)?,
    };
    let scaling = j.opt_f64("routed_scaling_factor")?.unwrap_or(1.0);
    ensure!(scaling.is_finite() && scaling > 0.0, "routed_scaling_factor {scaling} must be positive");
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.opt_usize("vocab_size")?.unwrap_or(65536),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: j.opt_f64("norm_eps")?.unwrap_or(1e-5) as f32,
        rope_theta: rope_theta(j, f)?,
        max_position_embeddings: j.opt_usize("max_position_embeddings")?.unwrap_or(128_000),
        attention_bias: false,
        qk_norm: QkNorm::PerHead,
        clip_qkv: None,
        tie_word_embeddings: tie,
        intermediate_size: if dense > 0 { j.opt_usize("intermediate_size")?.unwrap_or(7168) } else { 0 },
        expert_intermediate_size: if dense < layers {
            j.opt_usize("moe_intermediate_size")?.unwrap_or(1792)
        } else {
            0
        },
        shared_expert_intermediate_size: 0,
        layer_window: vec![0; layers],
        layer_ffn,
        eos_token_ids: eos_ids,
        router: RouterSpec {
            norm_topk_prob: j.bool_or("norm_topk_prob", true)?,
            // transformers divides by `sum + 1e-6`.
            norm_eps: 1e-6,
            scaling_factor: scaling as f32,
            selection_bias: j.bool_or("use_expert_bias", true)?,
            ..RouterSpec::plain(experts, top_k, Scoring::Sigmoid)
        },
        recipe: Recipe {
            layer_mixer,
            short_conv_kernel: j.opt_usize("conv_L_cache")?.unwrap_or(3),
            ..Recipe::default()
        },
    };
    cfg.validate().context("inconsistent config")?;
    Ok((cfg, 0..0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// LFM2-8B-A1B's config.json shrunk.
    fn lfm2() -> Value {
        json!({
            "architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "hidden_size": 64,
            "intermediate_size": 32, "moe_intermediate_size": 16, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 4, "num_dense_layers": 1, "num_experts": 8,
            "num_experts_per_tok": 2, "conv_L_cache": 3, "conv_bias": false, "norm_eps": 1e-5,
            "layer_types": ["conv", "conv", "full_attention", "conv"], "rope_theta": 1000000.0,
            "use_expert_bias": true, "norm_topk_prob": true, "routed_scaling_factor": 1.0,
            "tie_embedding": true, "vocab_size": 256, "max_position_embeddings": 128000, "eos_token_id": 7
        })
    }

    fn cfg(v: Value) -> Result<ModelConfig> {
        Ok(model_config(&Json(v.as_object().unwrap()), &FAMILY, vec![])?.0)
    }

    #[test]
    fn lfm2_config_gives_sigmoid_with_selection_bias_dense_first_layers_and_short_convs() {
        let c = cfg(lfm2()).unwrap();
        assert_eq!(c.layer_ffn, [FfnKind::Dense, FfnKind::Moe, FfnKind::Moe, FfnKind::Moe]);
        let m = [Mixer::ShortConv, Mixer::ShortConv, Mixer::Attention, Mixer::ShortConv];
        assert_eq!(c.recipe.layer_mixer, m);
        assert_eq!(c.recipe.short_conv_kernel, 3);
        let r = &c.router;
        assert_eq!((r.scoring, r.top_k, r.norm_eps, r.num_shared_experts), (Scoring::Sigmoid, 2, 1e-6, 0));
        assert!(r.selection_bias && r.norm_topk_prob);
        assert!(c.tie_word_embeddings && c.rope_theta == 1e6 && c.qk_norm == QkNorm::PerHead);
        // 3 convolution layers × 2 past inputs × 64 channels.
        assert_eq!(c.recurrent_state_bytes(), 3 * 2 * 64 * 4);
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        for (key, val, says) in [
            ("conv_bias", json!(true), "conv_bias"),
            ("layer_types", json!(["conv", "mamba", "full_attention", "conv"]), "mamba"),
            ("layer_types", json!(["conv"]), "layer_types"),
            ("rope_scaling", json!({"type": "yarn", "factor": 4.0}), "yarn"),
            ("num_experts_per_tok", json!(9), "num_experts_per_tok"),
        ] {
            let mut v = lfm2();
            v[key] = val;
            let e = format!("{:#}", cfg(v).unwrap_err());
            assert!(e.contains(says), "{key}: {e}");
        }
    }
}
