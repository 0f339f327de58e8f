//! `config.json` → [`ModelConfig`], for both forms transformers writes: the older Hub form
//! (`torch_dtype`, top-level `rope_theta`, `rope_scaling`, no `head_dim`, `null` windows) and
//! the transformers-5 form (`dtype`, `rope_parameters {rope_theta, rope_type}`, `layer_types`).
//! Both forms of one model give the same `ModelConfig`.

use super::{FAMILIES, Family, Flag, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::SharedGate;
use meo::{FfnKind, ModelConfig, RouterSpec, Scoring};
use serde_json::{Map, Value};

/// A `config.json` object with typed, error-reporting accessors. `null` counts as absent.
pub struct Json<'a>(pub &'a Map<String, Value>);

impl Json<'_> {
    pub(crate) fn raw(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer, or `None` if absent or null.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.raw(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .with_context(|| format!("key {key:?} is {v}, expected a non-negative integer"))
            })
            .transpose()
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.with_context(|| format!("key {key:?} is missing"))
    }

    /// A number, or `None` if absent or null.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.raw(key)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite()).with_context(|| format!("key {key:?} is {v}, expected a number"))
            })
            .transpose()
    }

    /// A boolean, or `default` if absent or null.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        self.raw(key)
            .map_or(Ok(default), |v| v.as_bool().with_context(|| format!("key {key:?} is {v}, expected true or false")))
    }

    /// A string, or `None` if absent or null.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.raw(key).map(|v| v.as_str().with_context(|| format!("key {key:?} is {v}, expected a string"))).transpose()
    }

    /// A list of non-negative integers (a single integer counts as a list of one).
    pub fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        let err = || format!("key {key:?} must be an integer or a list of integers");
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()).with_context(err))
                .collect::<Result<_>>(),
            Some(v) => Ok(vec![v.as_u64().and_then(|x| usize::try_from(x).ok()).with_context(err)?]),
        }
    }

    fn flag(&self, f: Flag) -> Result<bool> {
        match f {
            Flag::Fixed(b) => Ok(b),
            Flag::Key(key, default) => self.bool_or(key, default),
            Flag::MustBeFalse(key) => {
                ensure!(!self.bool_or(key, false)?, "{key} = true is not supported");
                Ok(false)
            }
        }
    }
}

fn supported_list() -> String {
    FAMILIES.iter().map(|f| format!("{} ({})", f.hf_class, f.name)).collect::<Vec<_>>().join(", ")
}

/// The family of a config: by `architectures` when present, else by `model_type`.
///
/// # Errors
/// Neither names a supported family; the message names what was found and lists the
/// supported ones.
pub fn detect(j: &Json<'_>) -> Result<&'static Family> {
    let model_type = j.opt_str("model_type")?;
    let archs: Vec<&str> = match j.raw("architectures") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let found = if archs.is_empty() {
        FAMILIES.iter().find(|f| Some(f.name) == model_type)
    } else {
        FAMILIES.iter().find(|f| archs.contains(&f.hf_class))
    };
    if let Some(f) = found {
        return Ok(f);
    }
    let what = match (archs.is_empty(), model_type) {
        (false, Some(mt)) => format!("{} (model_type {mt:?})", archs.join(", ")),
        (false, None) => archs.join(", "),
        (true, Some(mt)) => format!("model_type {mt:?}"),
        (true, None) => "unknown (no \"architectures\" or \"model_type\")".into(),
    };
    bail!("unsupported architecture {what}; supported: {}", supported_list())
}

/// `rope_theta` from `rope_parameters` (v5) or the top level (Hub), else the family's
/// default; any RoPE scaling other than the default one is rejected.
fn rope_theta(j: &Json<'_>, f: &Family) -> Result<f32> {
    let mut theta = j.opt_f64("rope_theta")?;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        let kind = match p.opt_str("rope_type")? {
            Some(t) => Some(t),
            None => p.opt_str("type")?,
        };
        if let Some(k) = kind.filter(|k| *k != "default") {
            bail!("{key}: RoPE scaling type {k:?} is not supported yet (only \"default\")");
        }
        if let Some(p) = p.opt_f64("partial_rotary_factor")? {
            ensure!(p == 1.0, "{key}: partial_rotary_factor {p} is not supported (only 1.0)");
        }
        if let Some(t) = p.opt_f64("rope_theta")? {
            theta = Some(t);
        }
    }
    let theta = theta.unwrap_or(f64::from(f.default_rope_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");
    Ok(theta as f32)
}

/// Per layer: dense FFN or MoE.
fn layer_ffn(j: &Json<'_>, f: &Family, layers: usize, experts: usize) -> Result<Vec<FfnKind>> {
    if !f.dense_layers {
        return Ok(vec![FfnKind::Moe; layers]);
    }
    let mlp_only = j.usizes("mlp_only_layers")?;
    let step = j.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    ensure!(step > 0, "decoder_sparse_step must be at least 1");
    Ok((0..layers)
        .map(|i| {
            let sparse = !mlp_only.contains(&i) && experts > 0 && (i + 1) % step == 0;
            if sparse { FfnKind::Moe } else { FfnKind::Dense }
        })
        .collect())
}

/// Per layer: sliding attention window (0 = full attention).
fn layer_window(j: &Json<'_>, f: &Family, layers: usize) -> Result<Vec<usize>> {
    let window = j.opt_usize("sliding_window")?.unwrap_or(0);
    match f.window {
        Window::None => Ok(vec![0; layers]),
        Window::AllLayers { enabled_by } => {
            let on = enabled_by.map_or(Ok(true), |k| j.bool_or(k, false))?;
            Ok(vec![if on { window } else { 0 }; layers])
        }
        Window::LayerTypes => {
            // transformers: sliding_window only counts with use_sliding_window; without
            // `layer_types`, odd-numbered layers below max_window_layers slide.
            let use_sw = j.bool_or("use_sliding_window", false)?;
            let window = if use_sw { window } else { 0 };
            let types: Vec<String> = match j.raw("layer_types") {
                Some(v) => serde_json::from_value(v.clone()).context("layer_types must be a list of strings")?,
                None => {
                    let max = j.opt_usize("max_window_layers")?.unwrap_or(28);
                    (0..layers)
                        .map(|i| {
                            let s = (i + 1) % 2 == 1 && i < max && use_sw;
                            if s { "sliding_attention" } else { "full_attention" }.to_string()
                        })
                        .collect()
                }
            };
            ensure!(types.len() == layers, "layer_types has {} entries for {layers} layers", types.len());
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "full_attention" => Ok(0),
                    "sliding_attention" if window > 0 => Ok(window),
                    "sliding_attention" => bail!("layer {i} is sliding_attention but no sliding_window is set"),
                    other => bail!("layer {i}: attention type {other:?} is not supported"),
                })
                .collect()
        }
    }
}

/// Fills a [`ModelConfig`] for family `f` from a parsed `config.json`.
///
/// `generation_eos` is used when the config names no `eos_token_id`.
///
/// # Errors
/// A missing or mistyped key, an unsupported feature (RoPE scaling, activation other than
/// SiLU), or inconsistent sizes; the message names the key.
pub fn model_config(j: &Json<'_>, f: &'static Family, generation_eos: Vec<u64>) -> Result<ModelConfig> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    let hidden = j.usize("hidden_size")?;
    let layers = j.usize("num_hidden_layers")?;
    let heads = j.usize("num_attention_heads")?;
    ensure!(heads > 0, "num_attention_heads must be positive");
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    let head_dim = match j.opt_usize("head_dim")?.filter(|&d| d > 0) {
        Some(d) => d,
        None => {
            ensure!(hidden % heads == 0, "hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
            hidden / heads
        }
    };
    let experts = match j.opt_usize("num_local_experts")? {
        Some(e) => e,
        None => j.usize("num_experts").context("no num_local_experts or num_experts")?,
    };
    let top_k = j.usize("num_experts_per_tok")?;
    let layer_ffn = layer_ffn(j, f, layers, experts)?;
    let has_moe = layer_ffn.contains(&FfnKind::Moe);
    let shared = if f.shared_expert { j.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0) } else { 0 };
    let clip_qkv = if f.clip_qkv { j.opt_f64("clip_qkv")?.map(|c| c as f32) } else { None };
    if let Some(c) = clip_qkv {
        ensure!(c > 0.0, "clip_qkv {c} must be positive");
    }
    let mut eos: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    if eos.is_empty() {
        eos = generation_eos;
    }
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.context("key \"rms_norm_eps\" is missing")? as f32,
        rope_theta: rope_theta(j, f)?,
        max_position_embeddings: j.usize("max_position_embeddings")?,
        attention_bias: j.flag(f.attention_bias)?,
        qk_norm: f.qk_norm,
        clip_qkv,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        intermediate_size: if f.dense_layers && layer_ffn.contains(&FfnKind::Dense) {
            j.usize("intermediate_size")?
        } else {
            0
        },
        expert_intermediate_size: if has_moe { j.usize(f.expert_intermediate_key)? } else { 0 },
        shared_expert_intermediate_size: shared,
        layer_window: layer_window(j, f, layers)?,
        layer_ffn,
        eos_token_ids: eos,
        router: RouterSpec {
            norm_topk_prob: j.flag(f.norm_topk_prob)?,
            num_shared_experts: usize::from(shared > 0),
            shared_gate: if shared > 0 { SharedGate::Sigmoid } else { SharedGate::None },
            ..RouterSpec::plain(experts, top_k, Scoring::Softmax)
        },
        recipe: meo::config::Recipe::default(),
    };
    ensure!(
        cfg.num_heads.is_multiple_of(cfg.num_kv_heads),
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    );
    ensure!(top_k > 0 && top_k <= experts, "num_experts_per_tok {top_k} must be in 1..={experts}");
    cfg.validate().context("inconsistent config")?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<ModelConfig> {
        let m = v.as_object().unwrap();
        let j = Json(m);
        let f = detect(&j)?;
        model_config(&j, f, vec![])
    }

    fn mixtral() -> Value {
        json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16,
            "vocab_size": 256, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
            "rope_theta": 1e6, "sliding_window": null, "eos_token_id": 2
        })
    }

    #[test]
    fn hub_and_v5_forms_agree() {
        let hub = cfg(mixtral()).unwrap();
        let mut v5 = mixtral();
        let o = v5.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.insert("rope_parameters".into(), json!({"rope_theta": 1e6, "rope_type": "default"}));
        o.insert("head_dim".into(), Value::Null);
        o.insert("eos_token_id".into(), json!([2]));
        assert_eq!(cfg(v5).unwrap(), hub);
        assert_eq!(hub.head_dim, 16);
        assert_eq!(hub.layer_window, vec![0, 0]);
        assert!(hub.router.norm_topk_prob);
    }

    #[test]
    fn sliding_window_applies_to_every_mixtral_layer() {
        let mut v = mixtral();
        v["sliding_window"] = json!(4096);
        assert_eq!(cfg(v).unwrap().layer_window, vec![4096, 4096]);
    }

    #[test]
    fn rope_scaling_is_rejected() {
        let mut v = mixtral();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = format!("{:#}", cfg(v).unwrap_err());
        assert!(e.contains("yarn"), "{e}");
        let mut v = mixtral();
        v["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4});
        assert!(format!("{:#}", cfg(v).unwrap_err()).contains("linear"));
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let mut v = mixtral();
        v["architectures"] = json!(["JambaForCausalLM"]);
        v["model_type"] = json!("jamba");
        let e = cfg(v).unwrap_err().to_string();
        assert!(e.contains("JambaForCausalLM") && e.contains("jamba"), "{e}");
        for f in FAMILIES {
            assert!(e.contains(f.hf_class), "{e}");
        }
    }

    #[test]
    fn qwen2_sparse_step_and_layer_types() {
        let v = json!({
            "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
            "num_experts_per_tok": 2, "intermediate_size": 64, "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32, "vocab_size": 256, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512, "decoder_sparse_step": 2, "mlp_only_layers": [3],
            "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2,
            "eos_token_id": [5, 6]
        });
        let c = cfg(v).unwrap();
        use FfnKind::{Dense, Moe};
        assert_eq!(c.layer_ffn, vec![Dense, Moe, Dense, Dense]);
        assert_eq!(c.layer_window, vec![8, 0, 0, 0]);
        assert!(c.attention_bias);
        assert_eq!(c.router.num_shared_experts, 1);
        assert_eq!(c.router.shared_gate, SharedGate::Sigmoid);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert_eq!(c.rope_theta, 1e4);
    }

    #[test]
    fn olmoe_attention_bias_rejected() {
        let v = json!({
            "model_type": "olmoe", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16, "vocab_size": 256,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "attention_bias": true
        });
        assert!(cfg(v).unwrap_err().to_string().contains("attention_bias"));
    }
}
