//! Switch Transformers (`switch_transformers`: `SwitchTransformersEncoderModel`,
//! `SwitchTransformersModel`, `SwitchTransformersForConditionalGeneration`), the **encoder**
//! stack: T5 RMS-style norms (no mean, no bias), unscaled attention with a bidirectional
//! relative position bias computed from layer 0's table and shared by every layer, ReLU
//! `wo(relu(wi x))` FFNs, and in every `encoder_sparse_step`-th layer a top-1 router (f32
//! softmax, weight = the chosen probability) with per-sequence expert capacity (first come,
//! first served; dropped tokens pass through the residual only).
//!
//! The output is an encoder-only file (`model.encoder_only`, run with `Session::encode`). A
//! seq2seq checkpoint's decoder and LM head are not converted (not read, not stored).
//! Reference: transformers 5.23 `models/switch_transformers/modeling_switch_transformers.py`.

use super::config::Json;
use super::{Family, Flag, Kind, Window};
use crate::canonical::{Canon, Place};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{Activation, Positions, Recipe};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const fn family(hf_class: &'static str) -> Family {
    Family {
        name: "switch_transformers",
        hf_class,
        default_rope_theta: 1e4,
        moe_prefixes: &[],
        expert_names: ["", "wi", "wo"],
        expert_intermediate_key: "d_ff",
        dense_layers: true,
        shared_expert: false,
        qk_norm: QkNorm::None,
        attention_bias: Flag::Fixed(false),
        clip_qkv: false,
        window: Window::None,
        norm_topk_prob: Flag::Fixed(false),
        tensors: &[],
        kind: Kind::Switch,
    }
}

/// The encoder-only class.
pub const FAMILY: Family = family("SwitchTransformersEncoderModel");
/// Encoder-decoder classes: their encoder is converted.
pub const FAMILY_MODEL: Family = family("SwitchTransformersModel");
pub const FAMILY_GENERATION: Family = family("SwitchTransformersForConditionalGeneration");

/// Input length when the config names none (`n_positions`; T5 and Switch were trained on 512).
const DEFAULT_POSITIONS: usize = 512;

/// transformers' rule: layer `i` is sparse iff `step > 0` and (`i % step == 1` or `step == 1`),
/// with `step = encoder_sparse_step` (a config.json key when present, else
/// `num_layers // num_sparse_encoder_layers`, or `num_layers` when that is 0).
fn layer_ffn(j: &Json<'_>, layers: usize) -> Result<Vec<FfnKind>> {
    let step = match j.opt_usize("encoder_sparse_step")? {
        Some(s) => s,
        None => match j.opt_usize("num_sparse_encoder_layers")?.unwrap_or(3) {
            0 => layers,
            n => layers / n,
        },
    };
    Ok((0..layers)
        .map(|i| if step > 0 && (step == 1 || i % step == 1) { FfnKind::Moe } else { FfnKind::Dense })
        .collect())
}

/// The canonical config of the encoder.
///
/// # Errors
/// A missing or mistyped key, or an unsupported variant (gated or non-ReLU FFN, capacity 0).
pub fn model_config(j: &Json<'_>) -> Result<ModelConfig> {
    let act = j.opt_str("dense_act_fn")?.unwrap_or("relu");
    ensure!(act == "relu", "dense_act_fn {act:?} is not supported (only \"relu\")");
    if let Some(ff) = j.opt_str("feed_forward_proj")? {
        ensure!(ff == "relu", "feed_forward_proj {ff:?} is not supported (only \"relu\")");
    }
    ensure!(!j.bool_or("is_gated_act", false)?, "is_gated_act = true is not supported");
    let hidden = j.usize("d_model")?;
    let heads = j.usize("num_heads")?;
    let head_dim = j.usize("d_kv")?;
    let layers = j.layers("num_layers")?;
    let d_ff = j.usize("d_ff")?;
    let experts = j.opt_usize("num_experts")?.unwrap_or(8);
    let capacity = j.opt_usize("expert_capacity")?.unwrap_or(64);
    let layer_ffn = layer_ffn(j, layers)?;
    let has_moe = layer_ffn.contains(&FfnKind::Moe);
    if has_moe {
        ensure!(experts > 0, "num_experts must be positive");
        // transformers keeps a token iff its position among its expert's tokens is ≤
        // capacity: 0 would drop every token, where meo reads 0 as unlimited.
        ensure!(capacity > 0, "expert_capacity 0 (every token dropped) is not supported");
    }
    if let Some(n) = j.opt_usize("num_selected_experts")? {
        ensure!(n == 1, "num_selected_experts {n} is not supported (Switch routes top-1)");
    }
    let buckets = j.opt_usize("relative_attention_num_buckets")?.unwrap_or(32);
    let max_distance = j.opt_usize("relative_attention_max_distance")?.unwrap_or(128);
    let eps = j.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-6);
    let mut eos: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    if eos.is_empty() && j.0.get("eos_token_id").is_none() {
        eos = vec![1];
    }
    let cfg = ModelConfig {
        architecture: FAMILY.name.into(),
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim,
        rms_norm_eps: eps as f32,
        // Unused (no RoPE); validation wants a positive value.
        rope_theta: FAMILY.default_rope_theta,
        max_position_embeddings: j.opt_usize("n_positions")?.unwrap_or(DEFAULT_POSITIONS),
        attention_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        // No LM head is stored (encoder).
        tie_word_embeddings: true,
        intermediate_size: if layer_ffn.contains(&FfnKind::Dense) { d_ff } else { 0 },
        expert_intermediate_size: if has_moe { d_ff } else { 0 },
        shared_expert_intermediate_size: 0,
        layer_window: vec![0; layers],
        layer_ffn,
        eos_token_ids: eos,
        router: RouterSpec {
            router_bias: j.bool_or("router_bias", false)?,
            expert_capacity: capacity,
            ..RouterSpec::plain(experts.max(1), 1, Scoring::Softmax)
        },
        recipe: Recipe {
            positions: Positions::Relative,
            ffn_activation: Activation::Relu,
            relative_buckets: buckets,
            relative_max_distance: max_distance,
            attention_unscaled: true,
            encoder_only: true,
            ..Recipe::default()
        },
    };
    cfg.validate().context("inconsistent config")?;
    Ok(cfg)
}

/// The checkpoint tensor holding canonical tensor `c` (whole; shapes match). `has` says
/// whether the checkpoint has a tensor (the embedding is `encoder.embed_tokens.weight` or,
/// tied and saved once, `shared.weight`).
pub fn source_name(c: &Canon, has: &dyn Fn(&str) -> bool) -> Result<String> {
    let block = |l: usize, rest: &str| format!("encoder.block.{l}.{rest}");
    Ok(match c.place {
        Place::Global => match c.name.as_str() {
            meo::names::EMBED => {
                let own = "encoder.embed_tokens.weight";
                if has(own) { own } else { "shared.weight" }.to_string()
            }
            meo::names::REL_BIAS => block(0, "layer.0.SelfAttention.relative_attention_bias.weight"),
            meo::names::OUTPUT_NORM => "encoder.final_layer_norm.weight".into(),
            other => bail!("no source for {other}"),
        },
        Place::Layer { layer: l, suffix } => match suffix {
            "attn_norm.weight" => block(l, "layer.0.layer_norm.weight"),
            "attn.q.weight" => block(l, "layer.0.SelfAttention.q.weight"),
            "attn.k.weight" => block(l, "layer.0.SelfAttention.k.weight"),
            "attn.v.weight" => block(l, "layer.0.SelfAttention.v.weight"),
            "attn.o.weight" => block(l, "layer.0.SelfAttention.o.weight"),
            "ffn_norm.weight" => block(l, "layer.1.layer_norm.weight"),
            "ffn.up.weight" => block(l, "layer.1.mlp.wi.weight"),
            "ffn.down.weight" => block(l, "layer.1.mlp.wo.weight"),
            "router.weight" => block(l, "layer.1.mlp.router.classifier.weight"),
            "router.bias" => block(l, "layer.1.mlp.router.classifier.bias"),
            s => bail!("no source for layer tensor {s}"),
        },
        Place::Expert { layer, expert, part } => {
            let name = FAMILY.expert_names[part];
            ensure!(!name.is_empty(), "{}: Switch experts have no gate", c.name);
            block(layer, &format!("layer.1.mlp.experts.expert_{expert}.{name}.weight"))
        }
        Place::BankExpert { .. } | Place::TaskBank { .. } => bail!("{}: not an MEO-native family", c.name),
        Place::ExpertBias { .. } => bail!("{}: Switch experts have no biases", c.name),
    })
}

/// Checkpoint tensors an encoder conversion leaves out on purpose: the decoder and LM head
/// of the seq2seq classes, and the copy of the tied embedding not read.
pub fn not_converted(name: &str) -> bool {
    name.starts_with("decoder.")
        || name == "lm_head.weight"
        || name == "shared.weight"
        || name == "encoder.embed_tokens.weight"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> Result<ModelConfig> {
        model_config(&Json(v.as_object().unwrap()))
    }

    fn base() -> serde_json::Value {
        json!({
            "architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers",
            "d_model": 64, "d_kv": 8, "d_ff": 32, "num_heads": 4, "num_layers": 6,
            "num_sparse_encoder_layers": 3, "num_experts": 4, "expert_capacity": 3, "vocab_size": 256
        })
    }

    #[test]
    fn sparse_layers_follow_transformers() {
        use FfnKind::{Dense, Moe};
        // 6 // 3 = step 2: layers 1, 3, 5.
        assert_eq!(cfg(base()).unwrap().layer_ffn, vec![Dense, Moe, Dense, Moe, Dense, Moe]);
        // An explicit encoder_sparse_step wins (transformers keeps the config.json value).
        let mut v = base();
        v["encoder_sparse_step"] = json!(3);
        assert_eq!(cfg(v).unwrap().layer_ffn, vec![Dense, Moe, Dense, Dense, Moe, Dense]);
        let mut v = base();
        v["encoder_sparse_step"] = json!(1);
        assert_eq!(cfg(v).unwrap().layer_ffn, vec![Moe; 6]);
        // 0 sparse layers gives step = num_layers, and layer 1 is still sparse in
        // transformers (its documented edge case): follow it.
        let mut v = base();
        v["num_sparse_encoder_layers"] = json!(0);
        assert_eq!(cfg(v).unwrap().layer_ffn, vec![Dense, Moe, Dense, Dense, Dense, Dense]);
        let mut v = base();
        v["encoder_sparse_step"] = json!(0);
        assert_eq!(cfg(v).unwrap().layer_ffn, vec![Dense; 6]);
    }

    #[test]
    fn recipe_and_router() {
        let c = cfg(base()).unwrap();
        assert_eq!(c.router.top_k, 1);
        assert_eq!(c.router.expert_capacity, 3);
        assert!(!c.router.norm_topk_prob);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(c.recipe.encoder_only && c.recipe.attention_unscaled);
        assert_eq!((c.recipe.relative_buckets, c.recipe.relative_max_distance), (32, 128));
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn unsupported_variants_are_named() {
        let mut v = base();
        v["dense_act_fn"] = json!("gated-gelu");
        assert!(cfg(v).unwrap_err().to_string().contains("gated-gelu"));
        let mut v = base();
        v["expert_capacity"] = json!(0);
        assert!(cfg(v).unwrap_err().to_string().contains("expert_capacity"));
    }
}
