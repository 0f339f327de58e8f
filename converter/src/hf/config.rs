//! `config.json` → [`ModelConfig`], for both forms transformers writes: the older Hub form
//! (`torch_dtype`, top-level `rope_theta`, `rope_scaling`, no `head_dim`, `null` windows) and
//! the transformers-5 form (`dtype`, `rope_parameters {rope_theta, rope_type}`, `layer_types`).
//! Both forms of one model give the same `ModelConfig`.

use super::{FAMILIES, Family, Flag, FusedLayout, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{Activation, DeltaNet, Mamba2, Mixer, Positions, SharedGate};
use meo::{FfnKind, ModelConfig, RouterSpec};
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

    /// A number, or `None` if absent or null. Every number of a model ends up as an f32, so
    /// one beyond f32's range (`1e300`) is refused here, by its key.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.raw(key)
            .map(|v| {
                let x = v.as_f64().with_context(|| format!("key {key:?} is {v}, expected a number"))?;
                ensure!(
                    x.is_finite() && x.abs() <= f64::from(f32::MAX),
                    "key {key:?} is {v}, outside the range of a 32-bit float"
                );
                Ok(x)
            })
            .transpose()
    }

    /// A required layer count, at most [`meo::config::MAX_LAYERS`]: per-layer tables are
    /// allocated from it before the checkpoint's tensors can confirm it.
    pub fn layers(&self, key: &str) -> Result<usize> {
        let n = self.usize(key)?;
        ensure!(
            n <= meo::config::MAX_LAYERS,
            "key {key:?} is {n}, more than the {} layers supported",
            meo::config::MAX_LAYERS
        );
        Ok(n)
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
pub(crate) fn rope_theta(j: &Json<'_>, f: &Family) -> Result<f32> {
    let mut theta = j.opt_f64("rope_theta")?;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        let kind = match p.opt_str("rope_type")? {
            Some(t) => Some(t),
            None => p.opt_str("type")?,
        };
        if let Some(k) = kind.filter(|k| *k != "default" && *k != "yarn") {
            bail!("{key}: RoPE scaling type {k:?} is not supported yet (only \"default\" and \"yarn\")");
        }
        if let Some(p) = p.opt_f64("partial_rotary_factor")? {
            let x = f.kind.features();
            ensure!(p == 1.0 || x.partial_rotary, "{key}: partial_rotary_factor {p} is not supported (only 1.0)");
        }
        if let Some(t) = p.opt_f64("rope_theta")? {
            theta = Some(t);
        }
    }
    let theta = theta.unwrap_or(f64::from(f.default_rope_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");
    Ok(theta as f32)
}

/// YaRN RoPE scaling parameters (transformers `rope_type = "yarn"`), as the config gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Yarn {
    factor: f64,
    beta_fast: f64,
    beta_slow: f64,
    original_max_positions: usize,
    /// Round the correction range outward to whole dimensions.
    truncate: bool,
    /// Multiplies cos and sin.
    attention_factor: f64,
}

/// YaRN parameters when `rope_parameters` (v5) or `rope_scaling` (Hub) says `yarn`, as
/// transformers' `_compute_yarn_parameters` reads them: `factor` (null: max positions /
/// original), `beta_fast` (32) and `beta_slow` (1) when absent or 0, `truncate` (true), and the
/// attention factor given, or `0.1 ln(factor) + 1` (with `mscale`/`mscale_all_dim`, their ratio).
fn yarn(j: &Json<'_>, max_positions: usize) -> Result<Option<Yarn>> {
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let Some(obj) = v.as_object() else { continue };
        let p = Json(obj);
        let kind = match p.opt_str("rope_type")? {
            Some(t) => Some(t),
            None => p.opt_str("type")?,
        };
        if kind != Some("yarn") {
            continue;
        }
        let original = p
            .opt_usize("original_max_position_embeddings")?
            .filter(|&o| o > 0)
            .with_context(|| format!("{key}: yarn needs a positive \"original_max_position_embeddings\""))?;
        let factor = p.opt_f64("factor")?.unwrap_or(max_positions as f64 / original as f64);
        ensure!(factor > 0.0, "{key}: yarn factor {factor} must be positive");
        let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
        let attention_factor =
            match (p.opt_f64("attention_factor")?, p.opt_f64("mscale")?, p.opt_f64("mscale_all_dim")?) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                _ => mscale(factor, 1.0),
            };
        let nonzero_or = |k: &str, d: f64| -> Result<f64> { Ok(p.opt_f64(k)?.filter(|&x| x != 0.0).unwrap_or(d)) };
        let (beta_fast, beta_slow) = (nonzero_or("beta_fast", 32.0)?, nonzero_or("beta_slow", 1.0)?);
        ensure!(beta_fast > 0.0 && beta_slow > 0.0, "{key}: yarn beta_fast/beta_slow must be positive");
        ensure!(attention_factor > 0.0, "{key}: yarn attention factor {attention_factor} must be positive");
        return Ok(Some(Yarn {
            factor,
            beta_fast,
            beta_slow,
            original_max_positions: original,
            truncate: p.bool_or("truncate", true)?,
            attention_factor,
        }));
    }
    Ok(None)
}

/// `partial_rotary_factor` (`rope_parameters`' or the top level's, as transformers reads it:
/// the top-level key is the default), 1 when absent.
fn partial_rotary(j: &Json<'_>) -> Result<f64> {
    let mut p = j.opt_f64("partial_rotary_factor")?;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(v) = j.raw(key).and_then(|v| v.as_object())
            && let Some(x) = Json(v).opt_f64("partial_rotary_factor")?
        {
            p = Some(x);
        }
    }
    let p = p.unwrap_or(1.0);
    ensure!(p > 0.0 && p <= 1.0, "partial_rotary_factor {p} must be in (0, 1]");
    Ok(p)
}

/// Per layer: the token mixer (`layer_types`: `linear_attention`, or its legacy name `mamba`,
/// is the family's recurrent mixer, `full_attention` or `attention` is attention; without
/// `layer_types`, gated DeltaNet families have attention every `full_attention_interval`-th
/// layer (4), Mamba2 families none: transformers' defaults).
fn layer_mixer(j: &Json<'_>, f: &Family, layers: usize) -> Result<Vec<Mixer>> {
    let x = f.kind.features();
    let recurrent = match (x.delta_net, x.mamba2) {
        (Some(_), _) => Mixer::GatedDeltaNet,
        (None, true) => Mixer::Mamba2,
        (None, false) => return Ok(Vec::new()),
    };
    let types: Vec<String> = match j.raw("layer_types") {
        Some(v) => serde_json::from_value(v.clone()).context("layer_types must be a list of strings")?,
        None if recurrent == Mixer::Mamba2 => vec!["linear_attention".to_string(); layers],
        None => {
            let every = j.opt_usize("full_attention_interval")?.unwrap_or(4);
            ensure!(every > 0, "full_attention_interval must be at least 1");
            (0..layers)
                .map(|i| if (i + 1) % every == 0 { "full_attention" } else { "linear_attention" }.to_string())
                .collect()
        }
    };
    ensure!(types.len() == layers, "layer_types has {} entries for {layers} layers", types.len());
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "full_attention" | "attention" => Ok(Mixer::Attention),
            "linear_attention" | "mamba" => Ok(recurrent),
            other => bail!("layer {i}: layer type {other:?} is not supported"),
        })
        .collect()
}

/// The gated DeltaNet sizes (`linear_*` keys; transformers' defaults when absent).
fn delta_net(j: &Json<'_>) -> Result<DeltaNet> {
    let d = DeltaNet {
        num_k_heads: j.opt_usize("linear_num_key_heads")?.unwrap_or(16),
        num_v_heads: j.opt_usize("linear_num_value_heads")?.unwrap_or(32),
        k_head_dim: j.opt_usize("linear_key_head_dim")?.unwrap_or(128),
        v_head_dim: j.opt_usize("linear_value_head_dim")?.unwrap_or(128),
        conv_kernel: j.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4),
    };
    ensure!(
        d.num_k_heads > 0 && d.num_v_heads.is_multiple_of(d.num_k_heads),
        "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
        d.num_v_heads,
        d.num_k_heads
    );
    Ok(d)
}

/// The Mamba2 sizes (`mamba_*` keys; transformers' defaults when absent).
fn mamba2(j: &Json<'_>, hidden: usize) -> Result<Mamba2> {
    ensure!(!j.bool_or("mamba_proj_bias", false)?, "mamba_proj_bias true is not supported (no projection biases)");
    // transformers clamps Δ to it in the prompt path only; its default (0, inf) is no clamp.
    ensure!(j.raw("time_step_limit").is_none(), "time_step_limit is not supported (only the default, no clamp)");
    let expand = j.opt_usize("mamba_expand")?.unwrap_or(2);
    let inner = expand.checked_mul(hidden).context("mamba_expand × hidden_size overflows")?;
    let heads = j.opt_usize("mamba_n_heads")?.unwrap_or(128);
    ensure!(heads > 0 && inner.is_multiple_of(heads), "mamba_n_heads {heads} does not divide {inner} channels");
    let head_dim = match j.raw("mamba_d_head") {
        Some(serde_json::Value::String(s)) if s == "auto" => inner / heads,
        _ => j.opt_usize("mamba_d_head")?.unwrap_or(inner / heads),
    };
    ensure!(
        head_dim * heads == inner,
        "mamba_d_head {head_dim} × mamba_n_heads {heads} is not mamba_expand × hidden_size {inner}"
    );
    Ok(Mamba2 {
        num_heads: heads,
        head_dim,
        state_size: j.opt_usize("mamba_d_state")?.unwrap_or(256),
        n_groups: j.opt_usize("mamba_n_groups")?.unwrap_or(1),
        conv_kernel: j.opt_usize("mamba_d_conv")?.unwrap_or(4),
        conv_bias: j.bool_or("mamba_conv_bias", true)?,
    })
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
        Window::LayerTypes | Window::Alternating => {
            // transformers: sliding_window only counts with use_sliding_window; without
            // `layer_types`, odd-numbered layers below max_window_layers slide. GPT-OSS:
            // no switch, and even-numbered layers slide.
            let alternating = matches!(f.window, Window::Alternating);
            let use_sw = alternating || j.bool_or("use_sliding_window", false)?;
            let window = if use_sw { window } else { 0 };
            let types: Vec<String> = match j.raw("layer_types") {
                Some(v) => serde_json::from_value(v.clone()).context("layer_types must be a list of strings")?,
                None if alternating => (0..layers)
                    .map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }.to_string())
                    .collect(),
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

/// Appends to `ids` the ids of `more` it does not hold yet, in order.
pub fn union_into(ids: &mut Vec<u64>, more: Vec<u64>) {
    for e in more {
        if !ids.contains(&e) {
            ids.push(e);
        }
    }
}

/// Fills a [`ModelConfig`] for family `f` from a parsed `config.json`.
///
/// The end-of-sequence ids are `config.json`'s followed by those of `generation_eos`
/// (`generation_config.json`'s) it lacks: Qwen3 lists `<|im_end|>` in one and `<|endoftext|>`
/// in the other, and generation must stop at both.
///
/// # Errors
/// A missing or mistyped key, an unsupported feature (RoPE scaling, activation other than
/// SiLU), or inconsistent sizes; the message names the key.
pub fn model_config(j: &Json<'_>, f: &'static Family, generation_eos: Vec<u64>) -> Result<ModelConfig> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    let hidden = j.usize("hidden_size")?;
    let layers = j.layers("num_hidden_layers")?;
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
    // The YaRN frequency table below is sized by it before the config as a whole is checked.
    ensure!(head_dim <= meo::config::MAX_WIDTH, "head_dim {head_dim} is too large");
    let experts = match j.opt_usize("num_local_experts")? {
        Some(e) => e,
        None => j.usize("num_experts").context("no num_local_experts or num_experts")?,
    };
    let top_k = j.usize("num_experts_per_tok")?;
    let layer_ffn = layer_ffn(j, f, layers, experts)?;
    let has_moe = layer_ffn.contains(&FfnKind::Moe);
    let x = f.kind.features();
    if x.shared_mlp {
        ensure!(experts > 0, "num_local_experts 0 (a dense model) is not supported: meo runs MoE models");
    }
    let shared = if f.shared_expert {
        j.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0)
    } else if x.shared_mlp {
        j.opt_usize("shared_intermediate_size")?.unwrap_or(1024)
    } else {
        0
    };
    let clip_qkv = if f.clip_qkv { j.opt_f64("clip_qkv")?.map(|c| c as f32) } else { None };
    if let Some(c) = clip_qkv {
        ensure!(c > 0.0, "clip_qkv {c} must be positive");
    }
    let mut eos: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    union_into(&mut eos, generation_eos);
    let attention_bias = j.flag(f.attention_bias)?;
    let max_positions = j.usize("max_position_embeddings")?;
    let multiplier = |key: &str| -> Result<f32> {
        // transformers' defaults are 1.0 for each of them (attention_multiplier included).
        let v = if x.multipliers { j.opt_f64(key)?.unwrap_or(1.0) } else { 1.0 };
        ensure!(v.is_finite() && v != 0.0, "{key} {v} must be a non-zero number");
        Ok(v as f32)
    };
    let rope_theta = rope_theta(j, f)?;
    let yarn = yarn(j, max_positions)?;
    let recipe = meo::config::Recipe {
        attention_out_bias: x.out_bias_with_qkv_bias && attention_bias,
        embedding_multiplier: multiplier("embedding_multiplier")?,
        residual_multiplier: multiplier("residual_multiplier")?,
        attention_scale: if x.multipliers { Some(multiplier("attention_multiplier")?) } else { None },
        logits_scaling: multiplier("logits_scaling")?,
        attention_sinks: x.attention_sinks,
        // YaRN becomes the precomputed frequency table and cos/sin factor, as for DeepSeek.
        rope_inv_freq: yarn.map(|y| {
            super::deepseek_v3::yarn_inv_freq(
                f64::from(rope_theta),
                head_dim,
                y.factor,
                y.original_max_positions as f64,
                y.beta_fast,
                y.beta_slow,
                y.truncate,
            )
        }),
        rope_attention_factor: yarn.map(|y| y.attention_factor as f32),
        mlp_activation: if x.clamped_swiglu {
            let limit = j.opt_f64("swiglu_limit")?.unwrap_or(7.0);
            ensure!(limit > 0.0, "swiglu_limit {limit} must be positive");
            Activation::ClampedSwiglu { alpha: j.opt_f64("swiglu_alpha")?.unwrap_or(1.702) as f32, limit: limit as f32 }
        } else {
            Activation::Silu
        },
        expert_bias: x.fused_layout == FusedLayout::TransposedInterleaved,
        layer_mixer: layer_mixer(j, f, layers)?,
        delta_net: if x.delta_net.is_some() { Some(delta_net(j)?) } else { None },
        mamba2: if x.mamba2 { Some(mamba2(j, hidden)?) } else { None },
        positions: if x.position_embedding_type && j.opt_str("position_embedding_type")? != Some("rope") {
            Positions::None
        } else {
            Positions::Rope
        },
        rope_dim: if x.partial_rotary {
            // transformers: int(head_dim · factor); 0 (all) when that is the whole head.
            let d = (head_dim as f64 * partial_rotary(j)?) as usize;
            if d == head_dim { 0 } else { d }
        } else {
            0
        },
        attention_output_gate: x.gated_attention,
        ..meo::config::Recipe::default()
    };
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: {
            let eps = j.opt_f64("rms_norm_eps")?.context("key \"rms_norm_eps\" is missing")?;
            ensure!(eps >= 0.0, "key \"rms_norm_eps\" is {eps}, expected a non-negative number");
            eps as f32
        },
        rope_theta,
        max_position_embeddings: max_positions,
        attention_bias,
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
            shared_gate: if shared > 0 && f.shared_expert { SharedGate::Sigmoid } else { SharedGate::None },
            router_bias: x.router_bias,
            ..RouterSpec::plain(experts, top_k, x.scoring)
        },
        recipe,
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
        v["rope_scaling"] = json!({"type": "longrope", "factor": 4.0});
        let e = format!("{:#}", cfg(v).unwrap_err());
        assert!(e.contains("longrope"), "{e}");
        // YaRN is supported, but needs its original context length.
        let mut v = mixtral();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = format!("{:#}", cfg(v).unwrap_err());
        assert!(e.contains("original_max_position_embeddings"), "{e}");
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
        // generation_config.json's list joins config.json's (Qwen3: two ids, one in each).
        let mut ids = vec![5];
        union_into(&mut ids, vec![6, 5, 7]);
        assert_eq!(ids, vec![5, 6, 7]);
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

    fn gpt_oss_hub() -> Value {
        json!({
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": true,
            "head_dim": 16, "hidden_size": 64, "intermediate_size": 16, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
            "num_experts_per_tok": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512, "sliding_window": 4, "swiglu_limit": 7.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_theta": 150000,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false}
        })
    }

    #[test]
    fn gpt_oss_recipe_and_both_config_forms() {
        let hub = cfg(gpt_oss_hub()).unwrap();
        assert_eq!(hub.architecture, "gpt_oss");
        assert_eq!(hub.router.scoring, meo::Scoring::SoftmaxAfterTopK);
        assert!(hub.router.router_bias && !hub.router.norm_topk_prob);
        assert!(hub.attention_bias && hub.recipe.attention_out_bias && hub.recipe.attention_sinks);
        assert!(hub.recipe.expert_bias);
        assert_eq!(hub.recipe.mlp_activation, Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 });
        assert_eq!(hub.layer_window, vec![4, 0, 4, 0]);
        // YaRN: the frequency table (factor 32, original 4096, betas 32/1, no truncation) and,
        // as transformers, attention_factor = 0.1 ln(factor) + 1.
        let freq = hub.recipe.rope_inv_freq.as_ref().expect("YaRN frequencies");
        let af = hub.recipe.rope_attention_factor.expect("YaRN attention factor");
        assert!((f64::from(af) - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-6);
        // The correction range is dimensions [2.02, 4.35] here: below it extrapolation (the plain
        // frequency), above it interpolation (plain / factor), a blend in between.
        let plain: Vec<f32> = (0..8).map(|i| 1.0 / 150000f32.powf((2 * i) as f32 / 16.0)).collect();
        assert_eq!(freq.len(), 8);
        assert_eq!(freq[..3], plain[..3]);
        for i in 5..8 {
            assert!((freq[i] - plain[i] / 32.0).abs() <= 1e-6 * plain[i], "{i}");
        }
        for i in 3..5 {
            assert!(freq[i] < plain[i] && freq[i] > plain[i] / 32.0, "{i}");
        }
        // Truncation widens the range to [2, 5]: dimension 3 keeps more of its plain frequency.
        let mut t = gpt_oss_hub();
        t["rope_scaling"]["truncate"] = json!(true);
        let t = cfg(t).unwrap().recipe.rope_inv_freq.unwrap();
        assert_eq!(t[..3], plain[..3]);
        assert!(t[3] > freq[3]);
        assert_eq!(hub.rope_theta, 150000.0);
        // The transformers-5 form: rope_parameters, no layer_types (even layers slide).
        let mut v5 = gpt_oss_hub();
        let o = v5.as_object_mut().unwrap();
        let mut rp = o.remove("rope_scaling").unwrap();
        rp["rope_theta"] = o.remove("rope_theta").unwrap();
        o.insert("rope_parameters".into(), rp);
        o.remove("layer_types");
        o.insert("swiglu_alpha".into(), json!(1.702));
        assert_eq!(cfg(v5).unwrap(), hub);
    }

    #[test]
    fn granite_multipliers_and_defaults() {
        let v = json!({
            "architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "hidden_size": 64,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 256, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512, "rope_theta": 10000, "tie_word_embeddings": true,
            "embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
            "logits_scaling": 6.0
        });
        let c = cfg(v.clone()).unwrap();
        assert_eq!(c.router.scoring, meo::Scoring::SoftmaxAfterTopK);
        assert!(c.tie_word_embeddings && !c.attention_bias && !c.recipe.attention_out_bias);
        let r = &c.recipe;
        assert_eq!(
            (r.embedding_multiplier, r.attention_scale, r.residual_multiplier, r.logits_scaling),
            (12.0, Some(0.015625), 0.22, 6.0)
        );
        // Absent multipliers are transformers' defaults, 1.0 (the attention scale included).
        let mut bare = v;
        for k in ["embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"] {
            bare.as_object_mut().unwrap().remove(k);
        }
        bare["attention_bias"] = json!(true);
        let c = cfg(bare).unwrap();
        assert_eq!(c.recipe.attention_scale, Some(1.0));
        assert!(c.attention_bias && c.recipe.attention_out_bias);
        // Other families never read these keys.
        let mut m = mixtral();
        m["embedding_multiplier"] = json!(12.0);
        assert_eq!(cfg(m).unwrap().recipe, meo::config::Recipe::default());
    }

    #[test]
    fn floats_beyond_f32_are_refused_by_key() {
        // Before: 1e300 became f32 infinity silently.
        for key in ["rms_norm_eps", "rope_theta"] {
            let mut v = mixtral();
            v[key] = json!(1e300);
            let e = format!("{:#}", cfg(v).unwrap_err());
            assert!(e.contains(key) && e.contains("32-bit"), "{key}: {e}");
        }
        // Before: a negative epsilon was reported as model.rope_theta.
        let mut v = mixtral();
        v["rms_norm_eps"] = json!(-1e-5);
        let e = format!("{:#}", cfg(v).unwrap_err());
        assert!(e.contains("rms_norm_eps") && !e.contains("rope_theta"), "{e}");
        let mut v = mixtral();
        v["rms_norm_eps"] = json!(3.0e38);
        assert!(cfg(v).is_ok());
    }
}
