//! Phi-3.5-MoE (`PhimoeForCausalLM` in transformers, `PhiMoEForCausalLM` in the Hub's
//! config): a Mixtral-shaped decoder with LayerNorms (weight and bias, eps `rms_norm_eps`),
//! q/k/v/o biases (`attention_bias`), an LM head bias (`lm_head_bias`), LongRoPE, and the
//! sparsemixer router (two rounds of a masked softmax over the logits, `router_jitter_noise`
//! as its ε). Semantics: transformers 5.23 `sparsemixer`, `PhimoeTopKRouter`,
//! `PhimoeSparseMoeBlock`, `PhimoeRotaryEmbedding`, `PhimoeDecoderLayer` (see
//! `docs/ROUTING.md`).
//!
//! Checkpoints name the MoE block `block_sparse_moe` (the Hub's per-expert `w1`/`w3`/`w2` and
//! `gate`) or `mlp` (transformers 5: fused `gate_up_proj`/`down_proj` and `router`).

use super::config::Json;
use super::{Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result, ensure};
use meo::config::NormKind;
use meo::{ModelConfig, QkNorm, Scoring};

const OWN: OwnConfig = OwnConfig {
    name: "phimoe",
    read: model_config,
    features: Features {
        scoring: Scoring::SparseMixer,
        out_bias_with_qkv_bias: true,
        fused_names: &[("experts.gate_up_proj", "experts.down_proj")],
        ..Features::STANDARD
    },
    ignored_prefixes: &[],
};

const TENSORS: &[(&str, &str)] = &[
    ("router.weight", "{moe}.gate.weight|{moe}.router.weight"),
    ("attn_norm.bias", "input_layernorm.bias"),
    ("ffn_norm.bias", "post_attention_layernorm.bias"),
    ("attn.q.bias", "self_attn.q_proj.bias"),
    ("attn.k.bias", "self_attn.k_proj.bias"),
    ("attn.v.bias", "self_attn.v_proj.bias"),
    ("attn.o.bias", "self_attn.o_proj.bias"),
];

/// The transformers class name.
pub const FAMILY: Family = Family {
    name: "phimoe",
    hf_class: "PhimoeForCausalLM",
    default_rope_theta: 1e6,
    moe_prefixes: &["block_sparse_moe", "mlp"],
    expert_names: ["w1", "w3", "w2"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: false,
    qk_norm: QkNorm::None,
    attention_bias: Flag::Key("attention_bias", false),
    clip_qkv: false,
    // transformers: a sliding-window mask on every layer whenever `sliding_window` is set.
    window: Window::AllLayers { enabled_by: None },
    norm_topk_prob: Flag::Fixed(false),
    tensors: TENSORS,
    kind: Kind::Own(&OWN),
};

/// The class name the Hub's config.json gives (its remote code).
pub const FAMILY_HUB: Family = Family { hf_class: "PhiMoEForCausalLM", ..FAMILY };

/// LongRoPE as `PhimoeRotaryEmbedding` applies it in transformers 5.23: its `forward`
/// recomputes the frequencies without a sequence length, so they always use `short_factor`
/// (`1 / (short_factor_i · θ^(2i/d))`); cos and sin are multiplied by `short_mscale`, or
/// `long_mscale` once a forward's positions pass `original_max_position_embeddings`. Returns
/// the frequencies and the factor; the two mscales must agree (they do in Phi-3.5-MoE), since
/// a factor that changes with the length of the call has no place in the file.
fn longrope(p: &Json<'_>, theta: f64, head_dim: usize) -> Result<(Vec<f32>, f32)> {
    let factors = |key: &str| -> Result<Vec<f32>> {
        let v = p.raw(key).and_then(|v| v.as_array()).with_context(|| format!("longrope: {key:?} must be a list"))?;
        v.iter()
            .map(|x| x.as_f64().filter(|x| x.is_finite() && *x > 0.0).map(|x| x as f32))
            .collect::<Option<Vec<f32>>>()
            .with_context(|| format!("longrope: {key:?} must hold positive numbers"))
    };
    let short = factors("short_factor")?;
    ensure!(short.len() == head_dim / 2, "longrope: short_factor has {} values for head_dim {head_dim}", short.len());
    let mscale = |key: &str| p.opt_f64(key)?.with_context(|| format!("longrope: {key:?} is missing"));
    let (s, l) = (mscale("short_mscale")?, mscale("long_mscale")?);
    ensure!(
        s == l && s > 0.0,
        "longrope: short_mscale {s} != long_mscale {l} (transformers switches between them with the length of each call; not supported)"
    );
    let base = theta as f32;
    let freq = short
        .iter()
        .enumerate()
        // torch: `1.0 / (ext_factors * base ** (arange(0, d, 2).float() / d))` in f32.
        .map(|(i, &f)| 1.0 / (f * base.powf((2 * i) as f32 / head_dim as f32)))
        .collect();
    Ok((freq, s as f32))
}

/// Fills a [`ModelConfig`] for Phi-3.5-MoE: the standard decoder reader, then LayerNorms,
/// the LM head bias, the sparsemixer's ε and LongRoPE.
///
/// # Errors
/// A missing or mistyped key, `num_experts_per_tok` other than 2 (the sparsemixer always
/// picks two), or an unsupported RoPE (see [`longrope`]); the message names the key.
pub(crate) fn model_config(
    j: &Json<'_>,
    f: &'static Family,
    eos: Vec<u64>,
) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    let top_k = j.opt_usize("num_experts_per_tok")?.unwrap_or(2);
    ensure!(top_k == 2, "num_experts_per_tok {top_k}: the sparsemixer router always selects 2 experts");
    // LongRoPE is read here; the standard reader sees the rest of the config.
    let mut rest = j.0.clone();
    let mut long = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(p) = j.raw(key).and_then(|v| v.as_object()) else { continue };
        let pj = Json(p);
        let kind = pj.opt_str("rope_type")?.or(pj.opt_str("type")?);
        if kind == Some("longrope") {
            long = Some(p.clone());
            let theta = pj.opt_f64("rope_theta")?;
            rest.remove(key);
            if let Some(t) = theta {
                rest.insert("rope_theta".into(), t.into());
            }
        }
    }
    let mut c = super::config::model_config(&Json(&rest), f, eos)?;
    c.recipe.norm = NormKind::Layer;
    c.recipe.output_bias = j.bool_or("lm_head_bias", false)?;
    let eps = j.opt_f64("router_jitter_noise")?.unwrap_or(0.01);
    ensure!(eps >= 0.0, "router_jitter_noise {eps} must not be negative");
    c.router.sparsemixer_eps = eps as f32;
    if let Some(p) = &long {
        let (freq, factor) = longrope(&Json(p), f64::from(c.rope_theta), c.head_dim)?;
        c.recipe.rope_inv_freq = Some(freq);
        c.recipe.rope_attention_factor = Some(factor);
    }
    c.validate().context("inconsistent config")?;
    Ok((c, 0..0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn phi() -> Value {
        json!({
            "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "attention_bias": true,
            "hidden_size": 64, "intermediate_size": 16, "lm_head_bias": true, "max_position_embeddings": 131072,
            "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "num_local_experts": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "router_jitter_noise": 0.01,
            "sliding_window": 131072, "vocab_size": 256, "eos_token_id": 0,
            "rope_scaling": {"type": "longrope", "original_max_position_embeddings": 4096,
                             "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 4.0],
                             "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                             "short_mscale": 1.2, "long_mscale": 1.2}
        })
    }

    fn cfg(v: Value) -> Result<ModelConfig> {
        Ok(model_config(&Json(v.as_object().unwrap()), &FAMILY, vec![])?.0)
    }

    #[test]
    fn phi_config_gives_sparsemixer_layernorm_biases_and_short_longrope() {
        let c = cfg(phi()).unwrap();
        assert_eq!((c.router.scoring, c.router.top_k, c.router.sparsemixer_eps), (Scoring::SparseMixer, 2, 0.01));
        assert!(!c.router.norm_topk_prob);
        assert_eq!(c.recipe.norm, NormKind::Layer);
        assert!(c.attention_bias && c.recipe.attention_out_bias && c.recipe.output_bias);
        assert_eq!(c.layer_window, [131072, 131072]);
        let f = c.recipe.rope_inv_freq.unwrap();
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[5], 1.0 / (2.0 * 1e4f32.powf(10.0 / 16.0)));
        assert_eq!(c.recipe.rope_attention_factor, Some(1.2));
    }

    #[test]
    fn v5_rope_parameters_give_the_same_config() {
        let mut v = phi();
        let mut p = v["rope_scaling"].clone();
        p["rope_type"] = json!("longrope");
        p.as_object_mut().unwrap().remove("type");
        p["rope_theta"] = json!(10000.0);
        let o = v.as_object_mut().unwrap();
        o.remove("rope_scaling");
        o.remove("rope_theta");
        o.insert("rope_parameters".into(), p);
        assert_eq!(cfg(v).unwrap(), cfg(phi()).unwrap());
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        let mut v = phi();
        v["num_experts_per_tok"] = json!(3);
        assert!(format!("{:#}", cfg(v).unwrap_err()).contains("always selects 2"));
        let mut v = phi();
        v["rope_scaling"]["long_mscale"] = json!(1.3);
        assert!(format!("{:#}", cfg(v).unwrap_err()).contains("long_mscale"));
        let mut v = phi();
        v["rope_scaling"]["short_factor"] = json!([1.0, 2.0]);
        assert!(format!("{:#}", cfg(v).unwrap_err()).contains("short_factor"));
    }
}
