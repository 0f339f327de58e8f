//! Hunyuan-MoE (`HunYuanMoEV1ForCausalLM`, e.g. Hunyuan-A13B), as transformers 5.23 runs it
//! (`models/hunyuan_v1_moe/modeling_hunyuan_v1_moe.py`): every layer MoE; the router
//! (`HunYuanMoEV1Gate`, `mlp.gate.wg`, f32) takes a softmax over all experts, the top
//! `moe_topk` and renormalises them; one ungated shared MLP (`mlp.shared_mlp`) of the experts'
//! width `intermediate_size` is added; per-head q/k RMSNorms (`query_layernorm`,
//! `key_layernorm`) applied **after** RoPE (`model.qk_norm_after_rope`); RoPE `dynamic` with a
//! fixed `alpha` is NTK scaling of the base (`theta · alpha^(d / (d − 2))`), precomputed into
//! the frequency table. Per-layer lists for `num_experts` / `moe_topk` are accepted when all
//! their entries are equal (meo has one router per model).

use super::config::{Json, union_into};
use super::{Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{Recipe, SharedGate};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const OWN: OwnConfig = OwnConfig { name: "hunyuan_v1_moe", read: model_config, features: Features::STANDARD };

/// `HunYuanMoEV1ForCausalLM` (`model_type` `hunyuan_v1_moe`).
pub const FAMILY: Family = Family {
    name: "hunyuan_v1_moe",
    hf_class: "HunYuanMoEV1ForCausalLM",
    default_rope_theta: 10000.0,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: true,
    qk_norm: QkNorm::PerHead,
    attention_bias: Flag::Key("attention_bias", false),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Fixed(true),
    tensors: &[
        ("router.weight", "{moe}.gate.wg.weight"),
        ("shared.gate.weight", "{moe}.shared_mlp.gate_proj.weight"),
        ("shared.up.weight", "{moe}.shared_mlp.up_proj.weight"),
        ("shared.down.weight", "{moe}.shared_mlp.down_proj.weight"),
        ("attn.q_norm.weight", "self_attn.query_layernorm.weight"),
        ("attn.k_norm.weight", "self_attn.key_layernorm.weight"),
        ("attn.q.bias", "self_attn.q_proj.bias"),
        ("attn.k.bias", "self_attn.k_proj.bias"),
        ("attn.v.bias", "self_attn.v_proj.bias"),
        ("attn.o.bias", "self_attn.o_proj.bias"),
    ],
    kind: Kind::Own(&OWN),
};

/// An integer, or a per-layer list of equal integers (`num_experts`, `moe_topk`).
fn uniform(j: &Json<'_>, key: &str, default: usize, layers: usize) -> Result<usize> {
    let v = j.usizes(key)?;
    match v.split_first() {
        None => Ok(default),
        Some((&first, rest)) => {
            ensure!(v.len() == 1 || v.len() == layers, "{key} has {} entries for {layers} layers", v.len());
            ensure!(rest.iter().all(|&x| x == first), "{key} differs between layers ({v:?}): not supported");
            Ok(first)
        }
    }
}

/// `HunYuanMoEV1Config`, with its defaults for absent keys.
fn model_config(j: &Json<'_>, f: &'static Family, eos: Vec<u64>) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    let hidden = j.opt_usize("hidden_size")?.unwrap_or(4096);
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.opt_usize("num_attention_heads")?.unwrap_or(32);
    ensure!(heads > 0, "num_attention_heads must be positive");
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    ensure!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    );
    let head_dim = j.opt_usize("head_dim")?.filter(|&d| d > 0).unwrap_or(hidden / heads);
    ensure!(
        head_dim > 2 && head_dim <= meo::config::MAX_WIDTH && head_dim.is_multiple_of(2),
        "head_dim {head_dim} must be even, above 2 and in range"
    );
    let experts = uniform(j, "num_experts", 1, layers)?;
    let top_k = uniform(j, "moe_topk", 1, layers)?;
    ensure!(top_k > 0 && top_k <= experts, "moe_topk {top_k} must be in 1..={experts}");
    let inter = j.opt_usize("intermediate_size")?.unwrap_or(11008);

    // RoPE: `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (Hub): default, or
    // `dynamic` with `alpha` (transformers' `ntk_alpha`: a fixed, larger base).
    let mut theta = j.opt_f64("rope_theta")?;
    let mut alpha = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        if let Some(t) = p.opt_f64("rope_theta")? {
            theta = Some(t);
        }
        match (p.opt_str("rope_type")?.or(p.opt_str("type")?), p.opt_f64("alpha")?.filter(|&a| a != 0.0)) {
            (None | Some("default"), _) => {}
            (Some("dynamic"), Some(a)) => alpha = Some(a),
            (Some(k), _) => {
                bail!("{key}: RoPE scaling type {k:?} is not supported (only \"default\" and \"dynamic\" with alpha)")
            }
        }
    }
    let theta = theta.unwrap_or(f64::from(f.default_rope_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");
    let rope_inv_freq = match alpha {
        Some(a) => {
            ensure!(a > 0.0, "rope alpha {a} must be positive");
            let d = head_dim as f64;
            // `base ** (arange(0, d, 2) / d)` in f32, as torch computes it.
            let base = (theta * a.powf(d / (d - 2.0))) as f32;
            Some((0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect())
        }
        None => None,
    };
    let attention_bias = j.bool_or("attention_bias", false)?;
    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    union_into(&mut eos_ids, eos);
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.opt_usize("vocab_size")?.unwrap_or(290943),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-5) as f32,
        rope_theta: theta as f32,
        max_position_embeddings: j.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        attention_bias,
        qk_norm: QkNorm::PerHead,
        clip_qkv: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        intermediate_size: 0,
        expert_intermediate_size: inter,
        shared_expert_intermediate_size: inter,
        layer_window: vec![0; layers],
        layer_ffn: vec![FfnKind::Moe; layers],
        eos_token_ids: eos_ids,
        router: RouterSpec {
            norm_topk_prob: true,
            num_shared_experts: 1,
            shared_gate: SharedGate::None,
            ..RouterSpec::plain(experts, top_k, Scoring::Softmax)
        },
        recipe: Recipe {
            attention_out_bias: attention_bias,
            rope_inv_freq,
            qk_norm_after_rope: true,
            ..Recipe::default()
        },
    };
    cfg.validate().context("inconsistent config")?;
    Ok((cfg, 0..0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn router_norms_and_ntk_alpha_from_the_config() {
        let v = json!({
            "architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe", "hidden_size": 64,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_experts": [8, 8], "moe_topk": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
        });
        let p = super::super::parse_config(v.as_object().unwrap(), vec![]).unwrap();
        let c = p.config;
        assert_eq!((c.router.num_experts, c.router.top_k, c.router.scoring), (8, 2, Scoring::Softmax));
        assert!(c.router.norm_topk_prob && c.router.num_shared_experts == 1);
        assert_eq!(c.router.shared_gate, SharedGate::None);
        assert_eq!((c.expert_intermediate_size, c.shared_expert_intermediate_size), (16, 16));
        assert!(c.recipe.qk_norm_after_rope && c.qk_norm == QkNorm::PerHead);
        // transformers 5.23 gives inv_freq[1] = 1.1788e-01 for these sizes (base 1e4 · 1000^(16/14)).
        let f = c.recipe.rope_inv_freq.unwrap();
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.11788).abs() < 1e-4, "{f:?}");
        // Per-layer lists must agree.
        let mut bad = v.clone();
        bad["num_experts"] = json!([8, 4]);
        let e = format!("{:#}", super::super::parse_config(bad.as_object().unwrap(), vec![]).err().unwrap());
        assert!(e.contains("num_experts"), "{e}");
        let mut bad = v;
        bad["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0});
        let e = format!("{:#}", super::super::parse_config(bad.as_object().unwrap(), vec![]).err().unwrap());
        assert!(e.contains("linear"), "{e}");
    }
}
