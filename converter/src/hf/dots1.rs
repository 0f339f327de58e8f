//! dots.llm1 (`Dots1ForCausalLM`), as transformers 5.23 runs it (`models/dots1/modular_dots1.py`):
//! Qwen3's attention (per-head q/k RMSNorm before RoPE, sliding windows on the
//! `sliding_attention` layers — by default the layers from `max_window_layers` on) with
//! DeepSeek-V3's MoE: dense MLP layers before `first_k_dense_replace`, then sigmoid scores, a
//! selection-only bias (`e_score_correction_bias`), group-limited selection (top-2 sum per
//! group), renormalisation (`norm_topk_prob`, `+ 1e-20`), times `routed_scaling_factor`, plus
//! an ungated block of `n_shared_experts` shared experts.

use super::config::{Json, union_into};
use super::{Family, Features, Flag, Kind, OwnConfig, Window};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{GroupScore, Recipe, SharedGate};
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

const OWN: OwnConfig = OwnConfig { name: "dots1", read: model_config, features: Features::STANDARD };

/// `Dots1ForCausalLM` (`model_type` `dots1`).
pub const FAMILY: Family = Family {
    name: "dots1",
    hf_class: "Dots1ForCausalLM",
    default_rope_theta: 1e4,
    moe_prefixes: &["mlp"],
    expert_names: ["gate_proj", "up_proj", "down_proj"],
    expert_intermediate_key: "moe_intermediate_size",
    dense_layers: true,
    shared_expert: true,
    qk_norm: QkNorm::PerHead,
    attention_bias: Flag::Key("attention_bias", false),
    clip_qkv: false,
    window: Window::LayerTypes,
    norm_topk_prob: Flag::Key("norm_topk_prob", false),
    tensors: &[
        ("attn.q.bias", "self_attn.q_proj.bias"),
        ("attn.k.bias", "self_attn.k_proj.bias"),
        ("attn.v.bias", "self_attn.v_proj.bias"),
        ("attn.o.bias", "self_attn.o_proj.bias"),
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

/// `Dots1Config`, with its defaults for absent keys.
fn model_config(j: &Json<'_>, f: &'static Family, eos: Vec<u64>) -> Result<(ModelConfig, std::ops::Range<usize>)> {
    if let Some(act) = j.opt_str("hidden_act")? {
        ensure!(act == "silu", "hidden_act {act:?} is not supported (only \"silu\")");
    }
    let hidden = j.opt_usize("hidden_size")?.unwrap_or(4608);
    let layers = j.layers("num_hidden_layers")?;
    let heads = j.opt_usize("num_attention_heads")?.unwrap_or(32);
    ensure!(heads > 0, "num_attention_heads must be positive");
    let kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    ensure!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    );
    let head_dim = j.opt_usize("head_dim")?.filter(|&d| d > 0).unwrap_or(hidden / heads);
    ensure!(head_dim > 0 && head_dim <= meo::config::MAX_WIDTH, "head_dim {head_dim} is out of range");
    let experts = j.opt_usize("n_routed_experts")?.context("key \"n_routed_experts\" is missing")?;
    let top_k = j.opt_usize("num_experts_per_tok")?.context("key \"num_experts_per_tok\" is missing")?;
    ensure!(top_k > 0 && top_k <= experts, "num_experts_per_tok {top_k} must be in 1..={experts}");
    let first_dense = j.opt_usize("first_k_dense_replace")?.unwrap_or(0);
    let layer_ffn: Vec<FfnKind> =
        (0..layers).map(|l| if l >= first_dense { FfnKind::Moe } else { FfnKind::Dense }).collect();
    let has = |k| layer_ffn.contains(&k);
    let moe_i = if has(FfnKind::Moe) { j.opt_usize("moe_intermediate_size")?.unwrap_or(1408) } else { 0 };
    let dense_i = if has(FfnKind::Dense) { j.opt_usize("intermediate_size")?.unwrap_or(10944) } else { 0 };
    let n_shared = j.opt_usize("n_shared_experts")?.unwrap_or(0);
    let (n_group, topk_group) = (j.opt_usize("n_group")?.unwrap_or(1), j.opt_usize("topk_group")?.unwrap_or(1));
    ensure!(
        n_group > 0 && experts.is_multiple_of(n_group) && (1..=n_group).contains(&topk_group),
        "n_group {n_group} / topk_group {topk_group} do not divide {experts} experts"
    );
    ensure!(
        topk_group * (experts / n_group) >= top_k,
        "topk_group {topk_group} of n_group {n_group} leaves fewer than num_experts_per_tok {top_k} experts eligible"
    );
    let norm = j.bool_or("norm_topk_prob", false)?;

    let mut theta = j.opt_f64("rope_theta")?;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(v) = j.raw(key) else { continue };
        let p = Json(v.as_object().with_context(|| format!("key {key:?} must be an object or null"))?);
        if let Some(k) = p.opt_str("rope_type")?.or(p.opt_str("type")?).filter(|k| *k != "default") {
            bail!("{key}: RoPE scaling type {k:?} is not supported for dots1 (only \"default\")");
        }
        theta = p.opt_f64("rope_theta")?.or(theta);
    }
    let theta = theta.unwrap_or(f64::from(f.default_rope_theta));
    ensure!(theta > 0.0, "rope_theta {theta} must be positive");

    // `layer_types`, else sliding from `max_window_layers` on when `sliding_window` is set.
    let window = j.opt_usize("sliding_window")?;
    let types: Vec<String> = match j.raw("layer_types") {
        Some(v) => serde_json::from_value(v.clone()).context("layer_types must be a list of strings")?,
        None => {
            let max = j.opt_usize("max_window_layers")?.unwrap_or(62);
            let sliding = |i: usize| window.is_some() && i >= max;
            (0..layers).map(|i| if sliding(i) { "sliding_attention" } else { "full_attention" }.to_string()).collect()
        }
    };
    ensure!(types.len() == layers, "layer_types has {} entries for {layers} layers", types.len());
    let layer_window = types
        .iter()
        .enumerate()
        .map(|(i, t)| match (t.as_str(), window) {
            ("full_attention", _) => Ok(0),
            ("sliding_attention", Some(w)) if w > 0 => Ok(w),
            ("sliding_attention", _) => bail!("layer {i} is sliding_attention but no sliding_window is set"),
            (other, _) => bail!("layer {i}: attention type {other:?} is not supported"),
        })
        .collect::<Result<Vec<_>>>()?;
    let attention_bias = j.bool_or("attention_bias", false)?;
    let mut eos_ids: Vec<u64> = j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect();
    union_into(&mut eos_ids, eos);
    let cfg = ModelConfig {
        architecture: f.name.to_string(),
        vocab_size: j.opt_usize("vocab_size")?.unwrap_or(152064),
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope_theta: theta as f32,
        max_position_embeddings: j.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        attention_bias,
        qk_norm: QkNorm::PerHead,
        clip_qkv: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
        intermediate_size: dense_i,
        expert_intermediate_size: moe_i,
        shared_expert_intermediate_size: n_shared * moe_i,
        layer_window,
        layer_ffn,
        eos_token_ids: eos_ids,
        router: RouterSpec {
            norm_topk_prob: norm,
            norm_eps: if norm { 1e-20 } else { 0.0 },
            scaling_factor: j.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
            selection_bias: true,
            n_group,
            topk_group,
            group_score: GroupScore::TopTwoSum,
            num_shared_experts: usize::from(n_shared > 0 && moe_i > 0),
            shared_gate: SharedGate::None,
            ..RouterSpec::plain(experts, top_k, Scoring::Sigmoid)
        },
        recipe: Recipe { attention_out_bias: attention_bias, ..Recipe::default() },
    };
    cfg.validate().context("inconsistent config")?;
    Ok((cfg, 0..0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deepseek_router_qwen3_attention_and_window_rule() {
        let v = json!({
            "architectures": ["Dots1ForCausalLM"], "model_type": "dots1", "hidden_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_shared_experts": 2, "moe_intermediate_size": 16, "intermediate_size": 32,
            "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "vocab_size": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
            "sliding_window": 4, "max_window_layers": 2, "rope_theta": 10000.0, "eos_token_id": 0
        });
        let p = super::super::parse_config(v.as_object().unwrap(), vec![]).unwrap();
        let c = p.config;
        assert_eq!(c.layer_ffn, [FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]);
        assert_eq!(c.layer_window, [0, 0, 4]);
        let r = &c.router;
        assert_eq!((r.scoring, r.n_group, r.topk_group, r.scaling_factor), (Scoring::Sigmoid, 4, 2, 2.5));
        assert!(r.selection_bias && r.norm_topk_prob && r.norm_eps == 1e-20);
        assert_eq!((r.num_shared_experts, c.shared_expert_intermediate_size), (1, 32));
        assert_eq!(c.qk_norm, QkNorm::PerHead);
        let mut bad = v;
        bad["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = format!("{:#}", super::super::parse_config(bad.as_object().unwrap(), vec![]).err().unwrap());
        assert!(e.contains("yarn"), "{e}");
    }
}
