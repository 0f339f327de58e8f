//! GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`, transformers `glm4_moe`): a Llama-style
//! decoder (q/k/v biases with `attention_bias`, optional per-head q/k RMSNorm `use_qk_norm`,
//! RoPE on the first `partial_rotary_factor` of each head) with dense MLP layers before
//! `first_k_dense_replace`, and MoE layers routed as DeepSeek-V3's: sigmoid scores, a
//! selection-only bias (`e_score_correction_bias`), group-limited selection (top-2 sum per
//! group), renormalisation with `+ 1e-20`, times `routed_scaling_factor`, plus an ungated
//! shared expert block. Semantics: transformers 5.23 `Glm4MoeTopkRouter`, `Glm4MoeMoE`,
//! `Glm4MoeAttention`, `Glm4MoeRotaryEmbedding` (see `docs/ROUTING.md`).
//!
//! Experts are read per expert (`mlp.experts.N.{gate,up,down}_proj`, what `save_pretrained`
//! and the Hub write) or fused (`mlp.experts.gate_up_proj` / `down_proj`, transformers 5).
//! The multi-token-prediction layers the Hub checkpoints carry after the decoder
//! (`num_nextn_predict_layers`) are skipped, as transformers skips them.

use super::config::{Json, union_into};
use super::{Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{GroupScore, Recipe, SharedGate};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const OWN: OwnConfig = OwnConfig { name: "glm4_moe", read: model_config, features: Features::STANDARD };

pub const FAMILY: Family = Family {
    name: "glm4_moe",
    hf_class: "Glm4MoeForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: true,
    // With `use_qk_norm` (GLM-4.5; not Air), as [`model_config`] reads it.
    qk_norm: QkNorm::PerHead,
    // q, k and v only: o_proj never has a bias.
    attention_bias: Flag::Key("attention_bias", false),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Key("norm_topk_prob", true),
    tensors: &[
        ("attn.q.bias", "self_attn.q_proj.bias"),
        ("attn.k.bias", "self_attn.k_proj.bias"),
        ("attn.v.bias", "self_attn.v_proj.bias"),
        ("attn.q_norm.weight", "self_attn.q_norm.weight"),
        ("attn.k_norm.weight", "self_attn.k_norm.weight"),
        ("ffn.gate.weight", "mlp.gate_proj.weight"),
        ("ffn.up.weight", "mlp.up_proj.weight"),
        ("ffn.down.weight", "mlp.down_proj.weight"),
        ("shared.gate.weight", "{moe}.shared_experts.gate_proj.weight"),
        ("shared.up.weight", "{moe}.shared_experts.up_proj.weight"),
        ("shared.down.weight", "{moe}.shared_experts.down_proj.weight"),
        ("router.selection_bias", "{moe}.gate.e_score_correction_bias"),
    ],
    kind: Kind::Own(&OWN),
};

/// transformers' `Glm4MoeConfig.__post_init__` default (`kwargs.setdefault`).
const DEFAULT_PARTIAL_ROTARY: f64 = 0.5;

/// `rope_theta` and `partial_rotary_factor` as transformers resolves them: `rope_parameters`
/// (v5) or `rope_scaling` (Hub) first, then the top-level keys, then the defaults (theta
/// 1e4, factor 0.5). RoPE scaling other than the default is refused.
fn rope_params(j: &Json<'_>) -> Result<(f64, f64)> {
    let (mut theta, mut partial) = (None, None);
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        let kind = match p.opt_str("rope_type")? {
            Some(t) => Some(t),
            None => p.opt_str("type")?,
        };
        if let Some(k) = kind.filter(|k| *k != "default") {
            bail!("{key}: RoPE scaling type {k:?} is not supported for glm4_moe (only \"default\")");
        }
        theta = theta.or(p.opt_f64("rope_theta")?);
        partial = partial.or(p.opt_f64("partial_rotary_factor")?);
    }
    let theta = theta.or(j.opt_f64("rope_theta")?).unwrap_or(1e4);
    let partial = partial.or(j.opt_f64("partial_rotary_factor")?).unwrap_or(DEFAULT_PARTIAL_ROTARY);
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");
    ensure!(partial > 0.0 && partial <= 1.0, "partial_rotary_factor {partial} must be in (0, 1]");
    Ok((theta, partial))
}

/// Fills a [`ModelConfig`] for GLM-4.5 from its `config.json` (absent keys take
/// `Glm4MoeConfig`'s defaults, which are GLM-4.5-Air's values); also returns the
/// multi-token-prediction layers after the decoder.
///
/// # Errors
/// A missing or mistyped key, an unsupported variant (RoPE scaling, an activation other than
/// SiLU, an odd rotary width), or inconsistent sizes; the message names the key.
pub(crate) fn model_config(
    j: &Json<'_>,
    f: &'static Family,
    eos: Vec<u64>,
) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    let hidden = j.opt_usize("hidden_size")?.unwrap_or(4096);
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.opt_usize("num_attention_heads")?.unwrap_or(96);
    ensure!(heads > 0, "num_attention_heads must be positive");
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(8);
    ensure!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    );
    // `getattr(config, "head_dim", hidden_size // num_attention_heads)`.
    let head_dim = match j.opt_usize("head_dim")? {
        Some(d) => d,
        None => hidden / heads,
    };
    ensure!(head_dim > 0 && head_dim <= meo::config::MAX_WIDTH, "head_dim {head_dim} is out of range");
    let (theta, partial) = rope_params(j)?;
    // transformers: `dim = int(head_dim * partial_rotary_factor)`, frequencies for its pairs.
    let rope_dim = (head_dim as f64 * partial) as usize;
    ensure!(
        rope_dim >= 2 && rope_dim.is_multiple_of(2),
        "partial_rotary_factor {partial} of head_dim {head_dim} gives {rope_dim} rotary dimensions (must be even and at least 2)"
    );

    let experts = j.opt_usize("n_routed_experts")?.unwrap_or(128);
    let top_k = j.opt_usize("num_experts_per_tok")?.unwrap_or(8);
    ensure!(top_k > 0 && top_k <= experts, "num_experts_per_tok {top_k} must be in 1..={experts}");
    let first_dense = j.opt_usize("first_k_dense_replace")?.unwrap_or(1);
    let layer_ffn: Vec<FfnKind> =
        (0..layers).map(|l| if experts > 0 && l >= first_dense { FfnKind::Moe } else { FfnKind::Dense }).collect();
    let moe_i =
        if layer_ffn.contains(&FfnKind::Moe) { j.opt_usize("moe_intermediate_size")?.unwrap_or(1408) } else { 0 };
    let dense_i =
        if layer_ffn.contains(&FfnKind::Dense) { j.opt_usize("intermediate_size")?.unwrap_or(10944) } else { 0 };
    let n_shared = j.opt_usize("n_shared_experts")?.unwrap_or(1);
    let (n_group, topk_group) = (j.opt_usize("n_group")?.unwrap_or(1), j.opt_usize("topk_group")?.unwrap_or(1));
    ensure!(
        n_group > 0 && experts.is_multiple_of(n_group) && (1..=n_group).contains(&topk_group),
        "n_group {n_group} / topk_group {topk_group} do not divide {experts} experts"
    );
    // With fewer eligible experts than top_k, transformers would pick masked ones in an
    // unspecified order: refused (as for DeepSeek-V3).
    ensure!(
        topk_group * (experts / n_group) >= top_k,
        "topk_group {topk_group} of n_group {n_group} leaves fewer than num_experts_per_tok {top_k} experts eligible"
    );
    let norm = j.bool_or("norm_topk_prob", true)?;
    let scaling = j.opt_f64("routed_scaling_factor")?.unwrap_or(1.0);
    let mtp = j.opt_usize("num_nextn_predict_layers")?.unwrap_or(1);
    ensure!(mtp <= meo::config::MAX_LAYERS, "num_nextn_predict_layers {mtp} is too large");

    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    union_into(&mut eos_ids, eos);
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.opt_usize("vocab_size")?.unwrap_or(151552),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32,
        rope_theta: theta as f32,
        max_position_embeddings: j.opt_usize("max_position_embeddings")?.unwrap_or(131072),
        attention_bias: j.bool_or("attention_bias", false)?,
        qk_norm: if j.bool_or("use_qk_norm", false)? { QkNorm::PerHead } else { QkNorm::None },
        clip_qkv: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        intermediate_size: dense_i,
        expert_intermediate_size: moe_i,
        shared_expert_intermediate_size: n_shared * moe_i,
        layer_window: vec![0; layers],
        layer_ffn,
        eos_token_ids: eos_ids,
        router: RouterSpec {
            norm_topk_prob: norm,
            norm_eps: if norm { 1e-20 } else { 0.0 },
            scaling_factor: scaling as f32,
            selection_bias: true,
            n_group,
            topk_group,
            group_score: GroupScore::TopTwoSum,
            num_shared_experts: usize::from(n_shared > 0 && moe_i > 0),
            shared_gate: SharedGate::None,
            ..RouterSpec::plain(experts, top_k, Scoring::Sigmoid)
        },
        recipe: Recipe { rope_dim: if rope_dim == head_dim { 0 } else { rope_dim }, ..Recipe::default() },
    };
    cfg.validate().context("inconsistent config")?;
    Ok((cfg, layers..layers.saturating_add(mtp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// GLM-4.5-Air's config.json shrunk (the Hub form: top-level `partial_rotary_factor`).
    fn air() -> Value {
        json!({
            "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": true,
            "head_dim": 16, "hidden_size": 64, "partial_rotary_factor": 0.5, "intermediate_size": 64,
            "max_position_embeddings": 131072, "moe_intermediate_size": 16, "norm_topk_prob": true,
            "num_attention_heads": 4, "n_group": 1, "topk_group": 1, "n_routed_experts": 8,
            "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 2,
            "first_k_dense_replace": 1, "num_hidden_layers": 3, "num_key_value_heads": 2,
            "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-5, "rope_scaling": null,
            "rope_theta": 1000000, "tie_word_embeddings": false, "use_qk_norm": false,
            "vocab_size": 256, "eos_token_id": [0, 1]
        })
    }

    fn cfg(v: Value) -> Result<(ModelConfig, std::ops::Range<usize>)> {
        model_config(&Json(v.as_object().unwrap()), &FAMILY, vec![])
    }

    #[test]
    fn air_config_gives_partial_rope_sigmoid_router_and_shared_expert() {
        let (c, mtp) = cfg(air()).unwrap();
        assert_eq!(mtp, 3..4);
        assert_eq!(c.layer_ffn, [FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]);
        assert_eq!((c.head_dim, c.recipe.rope_dim, c.rotary_dim(), c.rope_theta), (16, 8, 8, 1e6));
        assert!(c.attention_bias && !c.recipe.attention_out_bias && c.qk_norm == QkNorm::None);
        let r = &c.router;
        assert_eq!((r.scoring, r.n_group, r.top_k), (Scoring::Sigmoid, 1, 2));
        assert!(r.selection_bias && r.norm_topk_prob && r.norm_eps == 1e-20 && r.scaling_factor == 1.0);
        assert_eq!((r.num_shared_experts, r.shared_gate, c.shared_expert_intermediate_size), (1, SharedGate::None, 16));
        assert_eq!(c.eos_token_ids, [0, 1]);
    }

    #[test]
    fn v5_rope_parameters_and_defaults_agree_with_the_hub_form() {
        let mut v = air();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("partial_rotary_factor");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 1000000, "rope_type": "default", "partial_rotary_factor": 0.5}),
        );
        assert_eq!(cfg(v.clone()).unwrap().0, cfg(air()).unwrap().0);
        // No factor anywhere: transformers' default 0.5.
        v["rope_parameters"].as_object_mut().unwrap().remove("partial_rotary_factor");
        assert_eq!(cfg(v.clone()).unwrap().0.recipe.rope_dim, 8);
        // A full rotation writes no `model.rope_dim`.
        v["rope_parameters"]["partial_rotary_factor"] = json!(1.0);
        assert_eq!(cfg(v).unwrap().0.recipe.rope_dim, 0);
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        for (key, val, says) in [
            ("rope_scaling", json!({"type": "yarn", "factor": 4.0}), "yarn"),
            ("partial_rotary_factor", json!(0.1875), "rotary dimensions"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("topk_group", json!(2), "topk_group"),
        ] {
            let mut v = air();
            v[key] = val;
            let e = format!("{:#}", cfg(v).unwrap_err());
            assert!(e.contains(says), "{key}: {e}");
        }
    }
}
