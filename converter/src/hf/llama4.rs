//! Llama-4 text models (`Llama4ForCausalLM`, and the text model of
//! `Llama4ForConditionalGeneration` checkpoints such as Llama-4-Scout and -Maverick), as
//! transformers 5.23 runs them (`models/llama4/modeling_llama4.py`):
//! - MoE layers per `moe_layers`, else every `interleave_moe_layer_step`-th layer (the others a
//!   dense SwiGLU MLP of `intermediate_size_mlp`); routed experts `intermediate_size` wide,
//!   fused and transposed (`feed_forward.experts.gate_up_proj [E, H, 2I]`, gate then up
//!   columns; `down_proj [E, I, H]`);
//! - the router (`Llama4Router`): top-k of the logits, each chosen expert weighted by the
//!   sigmoid of its logit, that weight applied to the expert's **input**
//!   (`routing.weight_on_input`); plus one ungated shared expert of the experts' width;
//! - attention: RoPE on interleaved pairs (`torch.view_as_complex`), skipped in the NoPE layers
//!   (`no_rope_layers` 0, by default every `no_rope_layer_interval`-th layer); the RoPE layers
//!   attend within chunks of `attention_chunk_size` (`layer_types` `chunked_attention`) and,
//!   with `use_qk_norm`, RMS-normalise q and k per head without a weight after RoPE; the NoPE
//!   layers scale q by `attn_temperature_tuning`'s `1 + attn_scale · ln(1 + ⌊(p + 1) /
//!   floor_scale⌋)`; `attention_bias` gives q/k/v/o biases; RoPE scaling `llama3` is
//!   precomputed into the frequency table.
//!
//! The multimodal checkpoints nest the text config under `text_config` and store the text model
//! under `language_model.model.` / `language_model.lm_head.` (read as `model.` / `lm_head.`);
//! the vision tower and projector are not converted.

use super::config::{Json, union_into};
use super::{Family, Features, Flag, FusedLayout, Kind, OwnConfig, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::Recipe;
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const FEATURES: Features = Features {
    out_bias_with_qkv_bias: true,
    fused_layout: FusedLayout::TransposedHalves,
    fused_names: &[("experts.gate_up_proj", "experts.down_proj")],
    ignored_prefixes: &["vision_model.", "multi_modal_projector."],
    renamed_prefixes: &[("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")],
    ..Features::STANDARD
};

const OWN: OwnConfig = OwnConfig { name: "llama4", read: model_config, features: FEATURES };

const TENSORS: &[(&str, &str)] = &[
    ("router.weight", "{moe}.router.weight"),
    ("ffn.gate.weight", "feed_forward.gate_proj.weight"),
    ("ffn.up.weight", "feed_forward.up_proj.weight"),
    ("ffn.down.weight", "feed_forward.down_proj.weight"),
    ("shared.gate.weight", "{moe}.shared_expert.gate_proj.weight"),
    ("shared.up.weight", "{moe}.shared_expert.up_proj.weight"),
    ("shared.down.weight", "{moe}.shared_expert.down_proj.weight"),
    ("attn.q.bias", "self_attn.q_proj.bias"),
    ("attn.k.bias", "self_attn.k_proj.bias"),
    ("attn.v.bias", "self_attn.v_proj.bias"),
    ("attn.o.bias", "self_attn.o_proj.bias"),
];

/// `Llama4ForCausalLM` (`model_type` `llama4_text`).
pub const FAMILY: Family = Family {
    name: "llama4",
    hf_class: "Llama4ForCausalLM",
    default_rope_theta: 500000.0,
    moe_prefixes: &["feed_forward"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: true,
    shared_expert: true,
    qk_norm: QkNorm::None,
    attention_bias: Flag::Key("attention_bias", false),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Fixed(false),
    tensors: TENSORS,
    kind: Kind::Own(&OWN),
};

/// `Llama4ForConditionalGeneration` (`model_type` `llama4`): its text model.
pub const FAMILY_MULTIMODAL: Family = Family { hf_class: "Llama4ForConditionalGeneration", ..FAMILY };

/// Llama 3.1's RoPE scaling (`rope_type` `llama3`) as transformers' `_compute_llama3_parameters`
/// computes it, in f32: frequencies whose wavelength exceeds `original / low_freq_factor` are
/// divided by `factor`, those below `original / high_freq_factor` kept, the ones between
/// blended by `(original / wavelength − low) / (high − low)`.
fn llama3_inv_freq(theta: f64, dim: usize, p: &Json<'_>) -> Result<Vec<f32>> {
    let num = |k: &str| p.opt_f64(k)?.with_context(|| format!("rope_scaling llama3: {k:?} is missing"));
    let (factor, low, high) = (num("factor")? as f32, num("low_freq_factor")? as f32, num("high_freq_factor")? as f32);
    let original = p
        .opt_usize("original_max_position_embeddings")?
        .context("rope_scaling llama3: \"original_max_position_embeddings\" is missing")? as f32;
    ensure!(factor > 0.0 && low > 0.0 && high > 0.0, "rope_scaling llama3: factors must be positive");
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    Ok((0..dim / 2)
        .map(|i| {
            let f = 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                scaled
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            }
        })
        .collect())
}

/// The text config: `text_config` of a multimodal config, or the config itself.
fn model_config(j: &Json<'_>, f: &'static Family, eos: Vec<u64>) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    match j.raw("text_config") {
        Some(t) => {
            let t = t.as_object().context("key \"text_config\" must be an object")?;
            let mut more: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
            union_into(&mut more, eos);
            let mut c = text_config(&Json(t), f, more).context("text_config")?;
            // transformers ties by the outer config (false when absent).
            c.tie_word_embeddings = j.bool_or("tie_word_embeddings", false)?;
            c.validate().context("inconsistent config")?;
            Ok((c, 0..0))
        }
        None => Ok((text_config(j, f, eos)?, 0..0)),
    }
}

/// `Llama4TextConfig`, with its defaults (Llama-4-Scout's values) for absent keys.
fn text_config(j: &Json<'_>, f: &'static Family, eos: Vec<u64>) -> Result<ModelConfig> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    let hidden = j.opt_usize("hidden_size")?.unwrap_or(5120);
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.opt_usize("num_attention_heads")?.unwrap_or(40);
    ensure!(heads > 0, "num_attention_heads must be positive");
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(8);
    ensure!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    );
    let head_dim = j.opt_usize("head_dim")?.filter(|&d| d > 0).unwrap_or(hidden / heads);
    ensure!(
        head_dim > 0 && head_dim <= meo::config::MAX_WIDTH && head_dim.is_multiple_of(2),
        "head_dim {head_dim} must be even and in range"
    );
    let experts = j.opt_usize("num_local_experts")?.unwrap_or(16);
    let top_k = j.opt_usize("num_experts_per_tok")?.unwrap_or(1);
    ensure!(top_k > 0 && top_k <= experts, "num_experts_per_tok {top_k} must be in 1..={experts}");
    // `moe_layers`, else every `interleave_moe_layer_step`-th layer from step − 1.
    let moe_layers: Vec<usize> = match j.raw("moe_layers") {
        Some(_) => j.usizes("moe_layers")?,
        None => {
            let step = j.opt_usize("interleave_moe_layer_step")?.unwrap_or(1);
            ensure!(step > 0, "interleave_moe_layer_step must be at least 1");
            (step - 1..layers).step_by(step).collect()
        }
    };
    let layer_ffn: Vec<FfnKind> =
        (0..layers).map(|l| if moe_layers.contains(&l) { FfnKind::Moe } else { FfnKind::Dense }).collect();
    let has = |k| layer_ffn.contains(&k);
    let expert_i = if has(FfnKind::Moe) { j.opt_usize("intermediate_size")?.unwrap_or(8192) } else { 0 };
    let dense_i = if has(FfnKind::Dense) { j.opt_usize("intermediate_size_mlp")?.unwrap_or(16384) } else { 0 };
    // `no_rope_layers[l]` is 1 where layer l uses RoPE; by default every interval-th is NoPE.
    let rope_layers: Vec<bool> = match j.usizes("no_rope_layers")? {
        v if v.is_empty() => {
            let every = j.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
            ensure!(every > 0, "no_rope_layer_interval must be at least 1");
            (0..layers).map(|l| (l + 1) % every != 0).collect()
        }
        v => {
            ensure!(v.len() >= layers, "no_rope_layers has {} entries for {layers} layers", v.len());
            v[..layers].iter().map(|&x| x != 0).collect()
        }
    };
    let chunk = j.opt_usize("attention_chunk_size")?.unwrap_or(8192);
    let layer_types: Vec<String> = match j.raw("layer_types") {
        Some(v) => serde_json::from_value(v.clone()).context("layer_types must be a list of strings")?,
        None => {
            rope_layers.iter().map(|&r| if r { "chunked_attention" } else { "full_attention" }.to_string()).collect()
        }
    };
    ensure!(layer_types.len() == layers, "layer_types has {} entries for {layers} layers", layer_types.len());
    let layer_chunk = layer_types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "full_attention" => Ok(0),
            "chunked_attention" if chunk > 0 => Ok(chunk),
            "chunked_attention" => bail!("layer {i} is chunked_attention but attention_chunk_size is 0"),
            other => bail!("layer {i}: attention type {other:?} is not supported"),
        })
        .collect::<Result<Vec<_>>>()?;
    let max_positions = j.opt_usize("max_position_embeddings")?.unwrap_or(4096 * 32);

    // RoPE: `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (Hub); default or llama3.
    let mut theta = j.opt_f64("rope_theta")?;
    let mut inv_freq = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        if let Some(t) = p.opt_f64("rope_theta")? {
            theta = Some(t);
        }
        match p.opt_str("rope_type")?.or(p.opt_str("type")?) {
            None | Some("default") => {}
            Some("llama3") => inv_freq = Some(p),
            Some(k) => bail!("{key}: RoPE scaling type {k:?} is not supported (only \"default\" and \"llama3\")"),
        }
    }
    let theta = theta.unwrap_or(f64::from(f.default_rope_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");
    let rope_inv_freq = inv_freq.map(|p| llama3_inv_freq(theta, head_dim, &p)).transpose()?;

    let temperature = if j.bool_or("attn_temperature_tuning", true)? {
        let floor = j.opt_f64("floor_scale")?.unwrap_or(8192.0);
        ensure!(floor > 0.0, "floor_scale {floor} must be positive");
        Some((floor as f32, j.opt_f64("attn_scale")?.unwrap_or(0.1) as f32))
    } else {
        None
    };
    let attention_bias = j.bool_or("attention_bias", false)?;
    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    union_into(&mut eos_ids, eos);
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.opt_usize("vocab_size")?.unwrap_or(202048),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32,
        rope_theta: theta as f32,
        max_position_embeddings: max_positions,
        attention_bias,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        intermediate_size: dense_i,
        expert_intermediate_size: expert_i,
        shared_expert_intermediate_size: expert_i,
        layer_window: vec![0; layers],
        layer_ffn,
        eos_token_ids: eos_ids,
        router: RouterSpec {
            num_shared_experts: usize::from(expert_i > 0),
            weight_on_input: true,
            ..RouterSpec::plain(experts, top_k, Scoring::Sigmoid)
        },
        recipe: Recipe {
            attention_out_bias: attention_bias,
            rope_interleave: true,
            rope_inv_freq,
            layer_nope: if rope_layers.contains(&false) { rope_layers.iter().map(|&r| !r).collect() } else { vec![] },
            layer_chunk: if layer_chunk.iter().any(|&c| c > 0) { layer_chunk } else { vec![] },
            qk_rms_after_rope: j.bool_or("use_qk_norm", true)?,
            nope_temperature: temperature.filter(|_| rope_layers.contains(&false)),
            ..Recipe::default()
        },
    };
    cfg.validate().context("inconsistent config")?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn text() -> Value {
        json!({
            "model_type": "llama4_text", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 16, "intermediate_size_mlp": 64,
            "num_local_experts": 8, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "vocab_size": 256,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "attention_chunk_size": 4, "floor_scale": 4,
            "attn_scale": 0.1, "eos_token_id": 0,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}
        })
    }

    fn parse(v: Value) -> Result<(&'static Family, ModelConfig)> {
        let p = super::super::parse_config(v.as_object().unwrap(), vec![])?;
        Ok((p.family, p.config))
    }

    #[test]
    fn layers_router_and_attention_variants_from_the_config() {
        let mut causal = text();
        causal["architectures"] = json!(["Llama4ForCausalLM"]);
        let (f, c) = parse(causal).unwrap();
        assert_eq!((f.hf_class, c.architecture.as_str()), ("Llama4ForCausalLM", "llama4"));
        use FfnKind::{Dense, Moe};
        assert_eq!(c.layer_ffn, [Dense, Moe, Dense, Moe]);
        assert_eq!((c.intermediate_size, c.expert_intermediate_size, c.shared_expert_intermediate_size), (64, 16, 16));
        let r = &c.router;
        assert!(r.weight_on_input && !r.norm_topk_prob && r.scoring == Scoring::Sigmoid && r.num_shared_experts == 1);
        assert_eq!(r.shared_gate, meo::config::SharedGate::None);
        // Layer 3 is NoPE (interval 4) and full; the others RoPE, chunked by 4, q/k normalised.
        assert_eq!(c.recipe.layer_nope, [false, false, false, true]);
        assert_eq!(c.recipe.layer_chunk, [4, 4, 4, 0]);
        assert!(c.recipe.qk_rms_after_rope && c.recipe.rope_interleave);
        assert_eq!(c.recipe.nope_temperature, Some((4.0, 0.1)));
        // llama3 scaling: the highest frequencies kept, the lowest divided by the factor.
        let freq = c.recipe.rope_inv_freq.as_ref().unwrap();
        let plain = |i: usize| 1.0 / 500000f32.powf((2 * i) as f32 / 16.0);
        assert_eq!(freq[0], plain(0));
        assert!((freq[7] - plain(7) / 16.0).abs() <= 1e-6 * plain(7));
        // The multimodal config: the same text model.
        let mm = json!({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                        "text_config": text(), "vision_config": {"hidden_size": 32}});
        let (f, m) = parse(mm).unwrap();
        assert_eq!((f.hf_class, &m), ("Llama4ForConditionalGeneration", &c));
        // Explicit lists win; an unknown scaling is refused by name.
        let mut v = text();
        v["architectures"] = json!(["Llama4ForCausalLM"]);
        v["moe_layers"] = json!([0]);
        v["no_rope_layers"] = json!([1, 0, 1, 1]);
        v["use_qk_norm"] = json!(false);
        let c = parse(v.clone()).unwrap().1;
        assert_eq!(c.layer_ffn, [Moe, Dense, Dense, Dense]);
        assert_eq!((c.recipe.layer_nope[1], c.recipe.layer_chunk[1], c.recipe.qk_rms_after_rope), (true, 0, false));
        v["rope_parameters"]["rope_type"] = json!("dynamic");
        assert!(format!("{:#}", parse(v).unwrap_err()).contains("dynamic"));
    }
}
