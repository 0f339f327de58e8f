//! ERNIE-4.5-MoE (`Ernie4_5_MoeForCausalLM`, transformers `ernie4_5_moe`, e.g.
//! ERNIE-4.5-21B-A3B): a Llama-style decoder with RoPE on interleaved pairs, dense MLP layers
//! outside `moe_layer_start_index ..= moe_layer_end_index` (every `moe_layer_interval`-th),
//! and MoE layers routed by softmax with a selection-only bias (`e_score_correction_bias`),
//! renormalised, plus an ungated shared expert block. The text model only: the released
//! checkpoints have no vision part ("modality-free" routing), and their multi-token-prediction
//! block (`model.mtp_*`) is skipped as transformers skips it. Semantics: transformers 5.23
//! `Ernie4_5_MoeTopKRouter`, `Ernie4_5_MoeSparseMoeBlock`, `apply_rotary_pos_emb`,
//! `Ernie4_5_MoeDecoderLayer` (see `docs/ROUTING.md`).

use super::config::{Json, union_into};
use super::{Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{Recipe, SharedGate};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const OWN: OwnConfig = OwnConfig {
    name: "ernie4_5_moe",
    read: model_config,
    features: Features { ignored_prefixes: &["model.mtp"], ..Features::STANDARD },
};

pub const FAMILY: Family = Family {
    name: "ernie4_5_moe",
    hf_class: "Ernie4_5_MoeForCausalLM",
    default_rope_theta: 5e5,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: true,
    qk_norm: QkNorm::None,
    attention_bias: Flag::MustBeFalse("use_bias"),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Fixed(true),
    tensors: &[
        ("ffn.gate.weight", "mlp.gate_proj.weight"),
        ("ffn.up.weight", "mlp.up_proj.weight"),
        ("ffn.down.weight", "mlp.down_proj.weight"),
        ("shared.gate.weight", "{moe}.shared_experts.gate_proj.weight"),
        ("shared.up.weight", "{moe}.shared_experts.up_proj.weight"),
        ("shared.down.weight", "{moe}.shared_experts.down_proj.weight"),
        // `[1, E]`; the Hub's name, then transformers 5's.
        (
            "router.selection_bias",
            "{moe}.moe_statics.e_score_correction_bias|{moe}.gate.moe_statics.e_score_correction_bias",
        ),
    ],
    kind: Kind::Own(&OWN),
};

/// Fills a [`ModelConfig`] for ERNIE-4.5-MoE from its `config.json` (absent keys take
/// `Ernie4_5_MoeConfig`'s defaults, which are ERNIE-4.5-21B-A3B's values).
///
/// # Errors
/// A missing or mistyped key, an unsupported variant (`use_bias`, RoPE scaling, a partial
/// rotary factor, an activation other than SiLU), or inconsistent sizes; the message names the
/// key.
pub(crate) fn model_config(
    j: &Json<'_>,
    f: &'static Family,
    eos: Vec<u64>,
) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    // Biases on every linear map, dense MLPs included: no released model has them.
    ensure!(!j.bool_or("use_bias", false)?, "use_bias = true is not supported");
    let hidden = j.opt_usize("hidden_size")?.unwrap_or(2560);
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.opt_usize("num_attention_heads")?.unwrap_or(20);
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(4);
    ensure!(
        heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    );
    let head_dim = j.opt_usize("head_dim")?.filter(|&d| d > 0).unwrap_or(hidden / heads);
    let mut theta = j.opt_f64("rope_theta")?;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        let kind = p.opt_str("rope_type")?.or(p.opt_str("type")?);
        if let Some(k) = kind.filter(|k| *k != "default") {
            bail!("{key}: RoPE scaling type {k:?} is not supported for ernie4_5_moe (only \"default\")");
        }
        if let Some(pr) = p.opt_f64("partial_rotary_factor")? {
            ensure!(pr == 1.0, "{key}: partial_rotary_factor {pr} is not supported (only 1.0)");
        }
        theta = p.opt_f64("rope_theta")?.or(theta);
    }
    let theta = theta.unwrap_or(f64::from(f.default_rope_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");

    let experts = j.opt_usize("moe_num_experts")?.unwrap_or(64);
    let top_k = j.opt_usize("moe_k")?.unwrap_or(6);
    ensure!(top_k > 0 && top_k <= experts, "moe_k {top_k} must be in 1..={experts}");
    let start = j.opt_usize("moe_layer_start_index")?.unwrap_or(1);
    // -1 (the default) means the last layer.
    let end = match j.raw("moe_layer_end_index").map(|v| v.as_i64()) {
        None | Some(Some(-1)) => layers.saturating_sub(1),
        Some(Some(e)) if e >= 0 => e as usize,
        Some(_) => bail!("moe_layer_end_index must be -1 or a layer index"),
    };
    let interval = j.opt_usize("moe_layer_interval")?.unwrap_or(1);
    ensure!(interval > 0, "moe_layer_interval must be at least 1");
    let layer_ffn: Vec<FfnKind> = (0..layers)
        .map(|l| {
            let moe = experts > 0 && (l + 1) % interval == 0 && l >= start && l <= end;
            if moe { FfnKind::Moe } else { FfnKind::Dense }
        })
        .collect();
    let moe_i =
        if layer_ffn.contains(&FfnKind::Moe) { j.opt_usize("moe_intermediate_size")?.unwrap_or(1536) } else { 0 };
    let dense_i =
        if layer_ffn.contains(&FfnKind::Dense) { j.opt_usize("intermediate_size")?.unwrap_or(12288) } else { 0 };
    let n_shared = j.opt_usize("moe_num_shared_experts")?.unwrap_or(2);

    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    if j.raw("eos_token_id").is_none() {
        eos_ids.push(2);
    }
    union_into(&mut eos_ids, eos);
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.opt_usize("vocab_size")?.unwrap_or(103424),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32,
        rope_theta: theta as f32,
        max_position_embeddings: j.opt_usize("max_position_embeddings")?.unwrap_or(131072),
        attention_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", true)?,
        intermediate_size: dense_i,
        expert_intermediate_size: moe_i,
        shared_expert_intermediate_size: n_shared * moe_i,
        layer_window: vec![0; layers],
        layer_ffn,
        eos_token_ids: eos_ids,
        router: RouterSpec {
            // transformers divides by `clamp(sum, min=moe_norm_min)`: the same unless the
            // selected probabilities sum below 1e-12.
            norm_topk_prob: true,
            selection_bias: true,
            num_shared_experts: usize::from(n_shared > 0 && moe_i > 0),
            shared_gate: SharedGate::None,
            ..RouterSpec::plain(experts, top_k, Scoring::Softmax)
        },
        recipe: Recipe { rope_interleave: true, ..Recipe::default() },
    };
    cfg.validate().context("inconsistent config")?;
    Ok((cfg, 0..0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// ERNIE-4.5-21B-A3B's config.json shrunk.
    fn ernie() -> Value {
        json!({
            "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": 64,
            "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
            "moe_num_experts": 8, "moe_k": 2, "moe_num_shared_experts": 2, "moe_intermediate_size": 16,
            "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1, "rope_theta": 500000,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "use_bias": false, "vocab_size": 256,
            "max_position_embeddings": 131072, "eos_token_id": 0
        })
    }

    fn cfg(v: Value) -> Result<ModelConfig> {
        Ok(model_config(&Json(v.as_object().unwrap()), &FAMILY, vec![])?.0)
    }

    #[test]
    fn ernie_config_gives_softmax_with_selection_bias_shared_experts_and_pairs() {
        let c = cfg(ernie()).unwrap();
        assert_eq!(c.layer_ffn, [FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]);
        let r = &c.router;
        assert_eq!((r.scoring, r.top_k, r.norm_eps), (Scoring::Softmax, 2, 0.0));
        assert!(r.selection_bias && r.norm_topk_prob);
        assert_eq!((r.num_shared_experts, c.shared_expert_intermediate_size), (1, 32));
        assert!(c.recipe.rope_interleave && c.tie_word_embeddings && c.rope_theta == 5e5);
        let mut v = ernie();
        v["moe_layer_end_index"] = json!(1);
        v["moe_layer_interval"] = json!(2);
        assert_eq!(cfg(v).unwrap().layer_ffn, [FfnKind::Dense, FfnKind::Moe, FfnKind::Dense]);
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        for (key, val, says) in [
            ("use_bias", json!(true), "use_bias"),
            ("rope_scaling", json!({"type": "yarn", "factor": 4.0}), "yarn"),
            ("moe_layer_end_index", json!(-2), "moe_layer_end_index"),
            ("moe_k", json!(9), "moe_k"),
        ] {
            let mut v = ernie();
            v[key] = val;
            let e = format!("{:#}", cfg(v).unwrap_err());
            assert!(e.contains(says), "{key}: {e}");
        }
    }
}
