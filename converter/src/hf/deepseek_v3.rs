//! DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA) with interleaved
//! RoPE and YaRN, dense MLP layers before `first_k_dense_replace`, and MoE layers routed by
//! sigmoid scores with a selection-only bias (`e_score_correction_bias`), group-limited
//! selection (top-2 sum per group), renormalised weights times `routed_scaling_factor`, plus
//! always-on shared experts. Semantics: transformers 5.23 `DeepseekV3TopkRouter`,
//! `DeepseekV3MoE`, `DeepseekV3Attention` (see `docs/ROUTING.md`).
//!
//! The config reader here ([`model_config`]) serves every MLA family (DeepSeek-V2 too): a
//! [`Variant`] holds what differs.

use super::config::Json;
use super::{Family, Flag, Kind, Window};
use anyhow::{Context, Result, ensure};
use meo::config::{GroupScore, Mla, Recipe, SharedGate};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

pub const FAMILY: Family = Family {
    name: "deepseek_v3",
    hf_class: "DeepseekV3ForCausalLM",
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
    norm_topk_prob: Flag::Key("norm_topk_prob", true),
    tensors: TENSORS,
    kind: Kind::DeepSeek,
};

/// Canonical layer suffix → HF name, shared by the MLA families.
pub(crate) const TENSORS: &[(&str, &str)] = &[
    ("attn.q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn.q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.kv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn.kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn.kv_b.weight", "self_attn.kv_b_proj.weight"),
    ("ffn.gate.weight", "mlp.gate_proj.weight"),
    ("ffn.up.weight", "mlp.up_proj.weight"),
    ("ffn.down.weight", "mlp.down_proj.weight"),
    ("shared.gate.weight", "{moe}.shared_experts.gate_proj.weight"),
    ("shared.up.weight", "{moe}.shared_experts.up_proj.weight"),
    ("shared.down.weight", "{moe}.shared_experts.down_proj.weight"),
    ("router.selection_bias", "{moe}.gate.e_score_correction_bias"),
];

/// What differs between the MLA families: transformers' defaults for absent keys, and the
/// routing its router class implements.
#[derive(Debug)]
pub(crate) struct Variant {
    pub family: &'static str,
    /// Defaults of `first_k_dense_replace`, `n_shared_experts`, `routed_scaling_factor`.
    pub first_k_dense: usize,
    pub shared_experts: usize,
    pub scaling: f64,
    /// The scoring the router class computes, and the config spellings that agree with it
    /// (`scoring_func`; any other value is refused rather than silently ignored).
    pub scoring: Scoring,
    pub scoring_func: &'static str,
    /// Accepted `topk_method` values and, for each, whether selection is group-limited.
    pub topk_methods: &'static [(&'static str, bool)],
    pub group_score: GroupScore,
    /// `e_score_correction_bias` is added for selection.
    pub selection_bias: bool,
    /// The router honours `norm_topk_prob` (with this epsilon).
    pub renormalise: Option<f32>,
    /// `rope_interleave` key (default true); `false` = always interleaved.
    pub rope_interleave_key: bool,
}

/// DeepSeek-V3: `DeepseekV3TopkRouter` always scores by sigmoid, adds the bias for
/// selection, limits groups by their top-2 sum (`noaux_tc`), renormalises with `+ 1e-20`.
pub(crate) const V3: Variant = Variant {
    family: "deepseek_v3",
    first_k_dense: 3,
    shared_experts: 1,
    scaling: 2.5,
    scoring: Scoring::Sigmoid,
    scoring_func: "sigmoid",
    topk_methods: &[("noaux_tc", true)],
    group_score: GroupScore::TopTwoSum,
    selection_bias: true,
    renormalise: Some(1e-20),
    rope_interleave_key: true,
};

/// transformers' `get_mscale` (YaRN).
fn mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
}

/// RoPE as transformers computes it for a DeepSeek config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeSpec {
    pub theta: f32,
    /// `rope_type` other than `default`.
    pub scaled: Option<String>,
    /// Precomputed frequencies (YaRN), `dim/2` values.
    pub inv_freq: Option<Vec<f32>>,
    /// Multiplies cos and sin.
    pub attention_factor: Option<f32>,
    /// Multiplies the softmax scale (`yarn_apply_mscale`: `mscale(factor, mscale_all_dim)²`).
    pub softmax_mscale: f64,
}

/// YaRN frequencies for a `dim`-wide rotary part, step for step as transformers'
/// `_compute_yarn_parameters` (f64 where it uses Python floats, f32 where it uses tensors).
pub(crate) fn yarn_inv_freq(
    base: f64,
    dim: usize,
    factor: f64,
    original_max: f64,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> Vec<f32> {
    let correction_dim =
        |rot: f64| (dim as f64 * (original_max / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001; // transformers: "prevent singularity"
    }
    let span = (high - low) as f32;
    (0..dim / 2)
        .map(|i| {
            // std's powf is the C library's, as torch's pow on CPU.
            let pos = (base as f32).powf((2 * i) as f32 / dim as f32);
            let extrapolation = 1.0 / pos;
            let interpolation = 1.0 / (factor as f32 * pos);
            let ramp = ((i as f32 - low as f32) / span).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

/// `rope_theta` and the RoPE scaling of `rope_parameters` (v5) or `rope_scaling` (Hub):
/// none/default, or YaRN; anything else is refused.
pub(crate) fn rope(j: &Json<'_>, default_theta: f32, dim: usize, max_positions: usize) -> Result<RopeSpec> {
    let mut theta = j.opt_f64("rope_theta")?;
    let mut scaling = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?;
        let pj = Json(p);
        if let Some(t) = pj.opt_f64("rope_theta")? {
            theta = Some(t);
        }
        let kind = match pj.opt_str("rope_type")? {
            Some(t) => Some(t),
            None => pj.opt_str("type")?,
        };
        if let Some(k) = kind.filter(|k| *k != "default") {
            scaling = Some((key, p, k.to_string()));
        }
    }
    let theta = theta.unwrap_or(f64::from(default_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");
    let Some((key, p, kind)) = scaling else {
        return Ok(RopeSpec {
            theta: theta as f32,
            scaled: None,
            inv_freq: None,
            attention_factor: None,
            softmax_mscale: 1.0,
        });
    };
    ensure!(kind == "yarn", "{key}: RoPE scaling type {kind:?} is not supported (only \"default\" and \"yarn\")");
    let p = Json(p);
    if let Some(f) = p.opt_f64("partial_rotary_factor")? {
        ensure!(f == 1.0, "{key}: partial_rotary_factor {f} is not supported (only 1.0)");
    }
    let original = p.usize("original_max_position_embeddings").with_context(|| format!("{key} (yarn)"))? as f64;
    ensure!(original > 0.0, "{key}: original_max_position_embeddings must be positive");
    let factor = p.opt_f64("factor")?.unwrap_or(max_positions as f64 / original);
    ensure!(factor > 0.0, "{key}: factor {factor} must be positive");
    // `or` in transformers: 0 and null both mean the default.
    let nonzero = |x: Option<f64>| x.filter(|&v| v != 0.0);
    let (ms, ms_all) = (nonzero(p.opt_f64("mscale")?), nonzero(p.opt_f64("mscale_all_dim")?));
    let attention_factor = match p.opt_f64("attention_factor")? {
        Some(a) => a,
        None => match (ms, ms_all) {
            (Some(m), Some(a)) => mscale(factor, m) / mscale(factor, a),
            _ => mscale(factor, 1.0),
        },
    };
    let beta_fast = nonzero(p.opt_f64("beta_fast")?).unwrap_or(32.0);
    let beta_slow = nonzero(p.opt_f64("beta_slow")?).unwrap_or(1.0);
    let truncate = p.bool_or("truncate", true)?;
    let softmax_mscale = ms_all.map_or(1.0, |a| mscale(factor, a).powi(2));
    Ok(RopeSpec {
        theta: theta as f32,
        scaled: Some(kind),
        inv_freq: Some(yarn_inv_freq(theta, dim, factor, original, beta_fast, beta_slow, truncate)),
        attention_factor: Some(attention_factor as f32),
        softmax_mscale,
    })
}

/// Fills a [`ModelConfig`] for an MLA family from its `config.json`.
///
/// # Errors
/// A missing or mistyped key, an unsupported variant (RoPE scaling other than YaRN,
/// `attention_bias`, a `scoring_func`/`topk_method` the router class does not implement,
/// fewer KV heads than heads), or inconsistent sizes; the message names the key.
pub(crate) fn model_config(
    j: &Json<'_>,
    f: &'static Family,
    v: &Variant,
    eos: Vec<u64>,
) -> Result<(ModelConfig, RopeSpec)> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    ensure!(!j.bool_or("attention_bias", false)?, "attention_bias = true is not supported");
    ensure!(!j.bool_or("mlp_bias", false)?, "mlp_bias = true is not supported");
    let hidden = j.usize("hidden_size")?;
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.usize("num_attention_heads")?;
    ensure!(heads > 0, "num_attention_heads must be positive");
    // transformers repeats k/v by heads / num_key_value_heads after decompressing one k/v
    // per head, which only works when they are equal.
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    ensure!(
        kv_heads == heads,
        "num_key_value_heads {kv_heads} != num_attention_heads {heads} is not supported with MLA"
    );
    let mla = Mla {
        q_lora_rank: j.opt_usize("q_lora_rank")?.unwrap_or(0),
        kv_lora_rank: j.usize("kv_lora_rank")?,
        qk_nope_head_dim: j.usize("qk_nope_head_dim")?,
        v_head_dim: j.usize("v_head_dim")?,
        // DeepseekV3RMSNorm's default: q_a_layernorm and kv_a_layernorm are built without
        // the config's rms_norm_eps (DeepSeek's inference/model.py: RMSNorm default, 1e-6).
        latent_norm_eps: 1e-6,
    };
    let rope_dim = j.usize("qk_rope_head_dim")?;
    ensure!(rope_dim > 0 && rope_dim % 2 == 0, "qk_rope_head_dim {rope_dim} must be even and positive");
    // Its frequency table is computed before the config as a whole is checked.
    ensure!(rope_dim <= meo::config::MAX_WIDTH, "qk_rope_head_dim {rope_dim} is too large");
    let experts = j.usize("n_routed_experts")?;
    let top_k = j.usize("num_experts_per_tok")?;
    ensure!(top_k > 0 && top_k <= experts, "num_experts_per_tok {top_k} must be in 1..={experts}");
    let first_dense = j.opt_usize("first_k_dense_replace")?.unwrap_or(v.first_k_dense);
    // DeepSeek's own modeling code also requires l % moe_layer_freq == 0 (transformers
    // ignores the key; every published config has 1).
    let freq = j.opt_usize("moe_layer_freq")?.unwrap_or(1);
    ensure!(freq > 0, "moe_layer_freq must be at least 1");
    let layer_ffn: Vec<FfnKind> = (0..layers)
        .map(|l| if experts > 0 && l >= first_dense && l % freq == 0 { FfnKind::Moe } else { FfnKind::Dense })
        .collect();
    let has_moe = layer_ffn.contains(&FfnKind::Moe);
    let moe_i = if has_moe { j.usize(f.expert_intermediate_key)? } else { 0 };
    let n_shared = j.opt_usize("n_shared_experts")?.unwrap_or(v.shared_experts);

    if let Some(s) = j.opt_str("scoring_func")? {
        ensure!(s == v.scoring_func, "scoring_func {s:?}: {} routes by {:?} only", v.family, v.scoring_func);
    }
    let method = j.opt_str("topk_method")?.unwrap_or(v.topk_methods[0].0);
    let grouped = v.topk_methods.iter().find(|m| m.0 == method).map(|m| m.1).with_context(|| {
        let ok: Vec<&str> = v.topk_methods.iter().map(|m| m.0).collect();
        format!("topk_method {method:?} is not supported for {} (supported: {})", v.family, ok.join(", "))
    })?;
    let (n_group, topk_group) =
        if grouped { (j.opt_usize("n_group")?.unwrap_or(1), j.opt_usize("topk_group")?.unwrap_or(1)) } else { (1, 1) };
    ensure!(
        n_group > 0 && experts % n_group == 0 && (1..=n_group).contains(&topk_group),
        "n_group {n_group} / topk_group {topk_group} do not divide {experts} experts"
    );
    // With fewer eligible experts than top_k, transformers picks masked ones (V3: weight
    // p, V2: weight 0) in an unspecified order: refused.
    ensure!(
        topk_group * (experts / n_group) >= top_k,
        "topk_group {topk_group} of n_group {n_group} leaves fewer than num_experts_per_tok {top_k} experts eligible"
    );
    let norm = match v.renormalise {
        Some(_) => j.bool_or("norm_topk_prob", true)?,
        None => {
            ensure!(
                !j.bool_or("norm_topk_prob", false)?,
                "norm_topk_prob = true: transformers' {} router ignores it, DeepSeek's code applies it; refused as ambiguous",
                v.family
            );
            false
        }
    };
    let scaling = j.opt_f64("routed_scaling_factor")?.unwrap_or(v.scaling);

    let max_positions = j.usize("max_position_embeddings")?;
    let rope = rope(j, f.default_rope_theta, rope_dim, max_positions)?;
    let qk = (mla.qk_nope_head_dim + rope_dim) as f64;
    let interleave = !v.rope_interleave_key || j.bool_or("rope_interleave", true)?;
    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    super::config::union_into(&mut eos_ids, eos);
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        // The rotary width: what RoPE and `model.head_dim` mean for MLA (as transformers sets
        // `config.head_dim = qk_rope_head_dim`).
        head_dim: rope_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.context("key \"rms_norm_eps\" is missing")? as f32,
        rope_theta: rope.theta,
        max_position_embeddings: max_positions,
        attention_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        intermediate_size: if layer_ffn.contains(&FfnKind::Dense) { j.usize("intermediate_size")? } else { 0 },
        expert_intermediate_size: moe_i,
        shared_expert_intermediate_size: n_shared * moe_i,
        layer_window: vec![0; layers],
        layer_ffn,
        eos_token_ids: eos_ids,
        router: RouterSpec {
            norm_topk_prob: norm,
            norm_eps: if norm { v.renormalise.unwrap_or(0.0) } else { 0.0 },
            scaling_factor: scaling as f32,
            selection_bias: v.selection_bias,
            n_group,
            topk_group,
            group_score: v.group_score,
            num_shared_experts: usize::from(n_shared > 0),
            shared_gate: SharedGate::None,
            ..RouterSpec::plain(experts, top_k, v.scoring)
        },
        recipe: Recipe {
            mla: Some(mla),
            rope_interleave: interleave,
            rope_inv_freq: rope.inv_freq.clone(),
            rope_attention_factor: rope.attention_factor,
            attention_scale: Some((qk.powf(-0.5) * rope.softmax_mscale) as f32),
            ..Recipe::default()
        },
    };
    cfg.validate().context("inconsistent config")?;
    if rope.scaled.is_none() && cfg.recipe.attention_scale == Some((qk.powf(-0.5)) as f32) {
        // Keep files without scaling free of a key that restates the default.
        let mut cfg = cfg;
        cfg.recipe.attention_scale = None;
        return Ok((cfg, rope));
    }
    Ok((cfg, rope))
}

/// The checkpoint layers after the decoder's (multi-token-prediction modules, which
/// transformers does not load): `num_hidden_layers .. + num_nextn_predict_layers`.
pub(crate) fn mtp_layers(j: &Json<'_>) -> Result<std::ops::Range<usize>> {
    let n = j.layers("num_hidden_layers")?;
    let mtp = j.opt_usize("num_nextn_predict_layers")?.unwrap_or(0);
    ensure!(mtp <= meo::config::MAX_LAYERS, "num_nextn_predict_layers {mtp} is too large");
    Ok(n..n.saturating_add(mtp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn v3() -> Value {
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
            "first_k_dense_replace": 1, "moe_intermediate_size": 16, "intermediate_size": 32,
            "n_shared_experts": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "vocab_size": 256, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 163840, "rope_theta": 10000, "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
            "num_nextn_predict_layers": 1,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}
        })
    }

    fn cfg(v: Value) -> Result<ModelConfig> {
        let m = v.as_object().unwrap();
        Ok(model_config(&Json(m), &FAMILY, &V3, vec![])?.0)
    }

    #[test]
    fn v3_config_gives_mla_groups_bias_and_yarn() {
        let c = cfg(v3()).unwrap();
        assert_eq!(c.layer_ffn, [FfnKind::Dense, FfnKind::Moe, FfnKind::Moe, FfnKind::Moe]);
        assert_eq!((c.head_dim, c.num_kv_heads, c.shared_expert_intermediate_size), (8, 4, 16));
        let r = &c.router;
        assert_eq!(
            (r.scoring, r.n_group, r.topk_group, r.group_score),
            (Scoring::Sigmoid, 4, 2, GroupScore::TopTwoSum)
        );
        assert!(r.selection_bias && r.norm_topk_prob && r.norm_eps == 1e-20 && r.scaling_factor == 2.5);
        assert_eq!((r.num_shared_experts, r.shared_gate), (1, SharedGate::None));
        let m = c.recipe.mla.unwrap();
        assert_eq!((m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim), (16, 16, 16, 16));
        assert!(c.recipe.rope_interleave);
        // mscale = mscale_all_dim: cos/sin unscaled, softmax scale 24^-0.5 · (0.1 ln 40 + 1)².
        assert_eq!(c.recipe.rope_attention_factor, Some(1.0));
        let want = (24f64.powf(-0.5) * (0.1 * 40f64.ln() + 1.0).powi(2)) as f32;
        assert_eq!(c.recipe.attention_scale, Some(want));
    }

    #[test]
    fn yarn_frequencies_interpolate_low_and_keep_high() {
        // dim 8, base 1e4, original 4096: correction dims 1.309 (32 rotations) and 2.814
        // (1 rotation), truncated to [1, 3]: pairs 0-1 keep θ^(-2i/d) (extrapolation), pair 3
        // is fully interpolated (/ factor), pair 2 is half of each.
        let f = yarn_inv_freq(1e4, 8, 40.0, 4096.0, 32.0, 1.0, true);
        let plain: Vec<f32> = (0..4).map(|i| 1.0 / 1e4f32.powf((2 * i) as f32 / 8.0)).collect();
        assert_eq!(f[..2], plain[..2]);
        assert!((f[3] - plain[3] / 40.0).abs() <= f[3] * 1e-6);
        let want = plain[2] / 40.0 * 0.5 + plain[2] * 0.5;
        assert!((f[2] - want).abs() <= want * 1e-6, "{} vs {want}", f[2]);
    }

    #[test]
    fn v5_rope_parameters_and_plain_rope_forms() {
        let mut v = v3();
        let o = v.as_object_mut().unwrap();
        let scaling = o.remove("rope_scaling").unwrap();
        let mut params = scaling.as_object().unwrap().clone();
        params.insert("rope_type".into(), json!("yarn"));
        params.insert("rope_theta".into(), json!(10000));
        o.remove("rope_theta");
        o.insert("rope_parameters".into(), Value::Object(params));
        o.insert("head_dim".into(), json!(8)); // v5 writes the rotary width here; ignored
        assert_eq!(cfg(v).unwrap(), cfg(v3()).unwrap());
        let mut plain = v3();
        plain.as_object_mut().unwrap().remove("rope_scaling");
        let c = cfg(plain).unwrap();
        assert_eq!((c.recipe.rope_inv_freq.as_ref(), c.recipe.attention_scale), (None, None));
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        for (key, value, needle) in [
            ("scoring_func", json!("softmax"), "scoring_func"),
            ("topk_method", json!("greedy"), "topk_method"),
            ("num_key_value_heads", json!(2), "num_key_value_heads"),
            ("attention_bias", json!(true), "attention_bias"),
            ("rope_scaling", json!({"type": "linear", "factor": 2.0}), "linear"),
            ("n_group", json!(3), "n_group"),
        ] {
            let mut v = v3();
            v[key] = value;
            let e = format!("{:#}", cfg(v).unwrap_err());
            assert!(e.contains(needle), "{key}: {e}");
        }
    }

    #[test]
    fn v2_config_gives_softmax_max_groups_and_no_renormalisation() {
        let mut v = v3();
        let o = v.as_object_mut().unwrap();
        for k in ["scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor"] {
            o.remove(k);
        }
        o.insert("architectures".into(), json!(["DeepseekV2ForCausalLM"]));
        o.insert("topk_method".into(), json!("group_limited_greedy"));
        o.insert("routed_scaling_factor".into(), json!(16.0));
        let f = &super::super::deepseek_v2::FAMILY;
        let read = |v: &Value| model_config(&Json(v.as_object().unwrap()), f, &super::super::deepseek_v2::V2, vec![]);
        let c = read(&v).unwrap().0;
        let r = &c.router;
        assert_eq!((r.scoring, r.group_score, r.n_group, r.topk_group), (Scoring::Softmax, GroupScore::Max, 4, 2));
        assert!(!r.norm_topk_prob && !r.selection_bias && r.scaling_factor == 16.0);
        assert_eq!(c.shared_expert_intermediate_size, 16);
        assert!(c.recipe.rope_interleave);
        // greedy: no groups, whatever n_group says; norm_topk_prob true is ambiguous.
        v["topk_method"] = json!("greedy");
        assert_eq!(read(&v).unwrap().0.router.n_group, 1);
        v["norm_topk_prob"] = json!(true);
        assert!(format!("{:#}", read(&v).unwrap_err()).contains("norm_topk_prob"));
    }

    #[test]
    fn dense_layer_rule_and_mtp_layers() {
        let mut v = v3();
        v["moe_layer_freq"] = json!(2);
        assert_eq!(cfg(v.clone()).unwrap().layer_ffn, [FfnKind::Dense, FfnKind::Dense, FfnKind::Moe, FfnKind::Dense]);
        assert_eq!(mtp_layers(&Json(v.as_object().unwrap())).unwrap(), 4..5);
        v["q_lora_rank"] = Value::Null;
        assert_eq!(cfg(v).unwrap().recipe.mla.unwrap().q_lora_rank, 0);
    }
}
