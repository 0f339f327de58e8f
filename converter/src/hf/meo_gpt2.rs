//! MEO-native GPT-2 (`MeoGPT2LMHeadModel`, `model_type: meo_gpt2`; `docs/MEO-NATIVE.md`): LayerNorm
//! with biases, learned positions, fused `c_attn` (q‖k‖v rows, split here into three
//! canonical tensors by element range, no copy beyond the conversion itself), `c_proj` with
//! bias, and a GELU MLP whose fc1 and fc2 are MEO expert banks (`[E, out, in]` weights,
//! `[E, out]` biases, a router, a task projection and a token block).
//!
//! Task merges are computed here from the task gate (it does not depend on the input):
//! `p = task_proj(task_embed[t])`, `g = softmax(top_k(router p))`, `Ŵ = Σ g_i W_i`,
//! `b̂ = Σ g_i b_i`, in f32 from the checkpoint's upcast values. `task_proj.*` and
//! `task_embed.weight` are consumed by that and not stored.

use super::config::Json;
use super::{Family, Flag, Kind, Source, Window};
use crate::canonical::{Canon, Place};
use anyhow::{Context, Result, bail, ensure};
use meo::config::{Activation, NormKind, Positions, Recipe};
use meo::names::MEO_BANKS;
use meo::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

pub const FAMILY: Family = Family {
    name: "meo_gpt2",
    hf_class: "MeoGPT2LMHeadModel",
    default_rope_theta: 1e4,
    moe_prefixes: &[],
    expert_names: ["", "", ""],
    expert_intermediate_key: "intermediate_size",
    dense_layers: false,
    shared_expert: false,
    qk_norm: QkNorm::None,
    attention_bias: Flag::Fixed(true),
    clip_qkv: false,
    window: Window::None,
    norm_topk_prob: Flag::Fixed(false),
    tensors: &[],
    kind: Kind::MeoNative,
};

/// Most tasks an MEO-native config may name (each adds merged banks to every layer).
pub const MAX_TASKS: usize = 1024;

/// The canonical config, and the task names (index = row of `task_embed`; empty without the
/// task gate level).
///
/// # Errors
/// A missing or mistyped key, or an unsupported variant (dense mode, another activation,
/// untied head).
pub fn model_config(j: &Json<'_>) -> Result<(ModelConfig, Vec<String>)> {
    let act = j.opt_str("activation_function")?.unwrap_or("gelu_new");
    ensure!(act == "gelu_new", "activation_function {act:?} is not supported (only \"gelu_new\")");
    ensure!(j.bool_or("tie_word_embeddings", true)?, "tie_word_embeddings = false is not supported");
    let hidden = j.usize("hidden_size")?;
    let heads = j.usize("num_heads")?;
    ensure!(heads > 0 && hidden % heads == 0, "hidden_size {hidden} is not a multiple of num_heads {heads}");
    let layers = j.layers("num_layers")?;
    let experts = j.usize("num_experts")?;
    ensure!(experts > 0, "num_experts = 0 (a dense GPT-2) is not an MEO model; convert it as GPT-2");
    let top_k = j.usize("top_k")?;
    ensure!(top_k > 0 && top_k <= experts, "top_k {top_k} must be in 1..={experts}");
    let levels: Vec<String> = match j.0.get("gate_levels") {
        Some(v) => serde_json::from_value(v.clone()).context("gate_levels must be a list of strings")?,
        None => vec!["sequence".into()],
    };
    for l in &levels {
        ensure!(l == "sequence" || l == "task", "gate level {l:?} is not supported (sequence, task)");
    }
    let tasks: Vec<String> = if levels.iter().any(|l| l == "task") {
        let t: Vec<String> = match j.0.get("task_names") {
            Some(v) => serde_json::from_value(v.clone()).context("task_names must be a list of strings")?,
            None => bail!("gate_levels has \"task\" but there are no task_names"),
        };
        ensure!(t.len() <= MAX_TASKS, "task_names lists {} tasks, more than {MAX_TASKS}", t.len());
        for n in &t {
            ensure!(meo::names::valid_task_name(n), "task name {n:?}: use 1-64 characters of [A-Za-z0-9_-]");
        }
        t
    } else {
        Vec::new()
    };
    let eps = j.opt_f64("layer_norm_eps")?.unwrap_or(1e-5);
    let cfg = ModelConfig {
        architecture: FAMILY.name.into(),
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hidden / heads,
        rms_norm_eps: eps as f32,
        rope_theta: FAMILY.default_rope_theta,
        max_position_embeddings: j.usize("n_positions")?,
        attention_bias: true,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        tie_word_embeddings: true,
        intermediate_size: j.usize("intermediate_size")?,
        expert_intermediate_size: 0,
        shared_expert_intermediate_size: 0,
        layer_ffn: vec![FfnKind::MeoBank; layers],
        layer_window: vec![0; layers],
        eos_token_ids: j.usizes("eos_token_id")?.into_iter().map(|x| x as u64).collect(),
        router: RouterSpec::plain(experts, top_k, Scoring::SoftmaxAfterTopK),
        recipe: Recipe {
            norm: NormKind::Layer,
            positions: Positions::Learned,
            attention_out_bias: true,
            ffn_activation: Activation::GeluTanh,
            meo_token_bottleneck: j.opt_usize("token_bottleneck")?.unwrap_or(0),
            ..Recipe::default()
        },
    };
    cfg.validate().context("inconsistent config")?;
    Ok((cfg, tasks))
}

/// Where canonical tensor `c` comes from (`None` for computed task merges).
pub fn source(c: &Canon, cfg: &ModelConfig) -> Result<Option<(String, u64, u64)>> {
    let numel: u64 = c.shape.iter().product();
    let whole = |n: String| Ok(Some((n, 0, numel)));
    let h = cfg.hidden_size as u64;
    match c.place {
        Place::Global => match c.name.as_str() {
            meo::names::EMBED => whole("wte.weight".into()),
            meo::names::POS_EMBED => whole("wpe.weight".into()),
            meo::names::OUTPUT_NORM => whole("ln_f.weight".into()),
            meo::names::OUTPUT_NORM_BIAS => whole("ln_f.bias".into()),
            other => bail!("no source for {other}"),
        },
        Place::Layer { layer: l, suffix } => {
            let p = format!("h.{l}");
            // q, k, v: rows [0, H), [H, 2H), [2H, 3H) of the fused c_attn (elements of the
            // row-major weight, or of the bias).
            let qkv = |i: u64, part: &str| -> Result<Option<(String, u64, u64)>> {
                let per = if part == "weight" { h * h } else { h };
                Ok(Some((format!("{p}.attn.c_attn.{part}"), i * per, per)))
            };
            match suffix {
                "attn_norm.weight" => whole(format!("{p}.ln_1.weight")),
                "attn_norm.bias" => whole(format!("{p}.ln_1.bias")),
                "attn.q.weight" => qkv(0, "weight"),
                "attn.k.weight" => qkv(1, "weight"),
                "attn.v.weight" => qkv(2, "weight"),
                "attn.q.bias" => qkv(0, "bias"),
                "attn.k.bias" => qkv(1, "bias"),
                "attn.v.bias" => qkv(2, "bias"),
                "attn.o.weight" => whole(format!("{p}.attn.c_proj.weight")),
                "attn.o.bias" => whole(format!("{p}.attn.c_proj.bias")),
                "ffn_norm.weight" => whole(format!("{p}.ln_2.weight")),
                "ffn_norm.bias" => whole(format!("{p}.ln_2.bias")),
                s => match s.split_once('.') {
                    Some((bank, rest)) if MEO_BANKS.contains(&bank) => whole(format!("{p}.mlp.{bank}.{rest}")),
                    _ => bail!("no source for layer tensor {s}"),
                },
            }
        }
        Place::BankExpert { layer, bank, expert, part } => {
            let part_name = meo::names::BANK_EXPERT_PARTS[part];
            Ok(Some((format!("h.{layer}.mlp.{}.experts.{part_name}", MEO_BANKS[bank]), expert as u64 * numel, numel)))
        }
        Place::TaskBank { .. } => Ok(None),
        Place::Expert { .. } | Place::ExpertBias { .. } => bail!("{} has no standard experts", FAMILY.name),
    }
}

/// Checkpoint tensors consumed by the task merges (not stored).
pub fn consumed(cfg: &ModelConfig, tasks: &[String]) -> Vec<String> {
    if tasks.is_empty() {
        return Vec::new();
    }
    let mut v = vec!["task_embed.weight".to_string()];
    for l in 0..cfg.num_layers {
        for b in MEO_BANKS {
            v.push(format!("h.{l}.mlp.{b}.task_proj.weight"));
            v.push(format!("h.{l}.mlp.{b}.task_proj.bias"));
        }
    }
    v
}

/// `y[r] = Σ_c w[r, c] x[c] + b[r]` in f64, rounded to f32 once.
fn affine(w: &[f32], x: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let cols = x.len();
    w.chunks(cols)
        .enumerate()
        .map(|(r, row)| {
            let s: f64 = row.iter().zip(x).map(|(&a, &v)| f64::from(a) * f64::from(v)).sum();
            (s + b.map_or(0.0, |b| f64::from(b[r]))) as f32
        })
        .collect()
}

/// The task gates, `[task][layer][bank]` → merge weight per expert (0 if not selected).
///
/// # Errors
/// Reading the checkpoint.
pub fn task_gates(ck: &super::Checkpoint, cfg: &ModelConfig, tasks: &[String]) -> Result<Vec<Vec<[Vec<f32>; 2]>>> {
    let h = cfg.hidden_size;
    let emb = ck.read_all("task_embed.weight")?;
    ensure!(emb.len() == tasks.len() * h, "task_embed.weight has {} values for {} tasks", emb.len(), tasks.len());
    let (e, k) = (cfg.router.num_experts, cfg.router.top_k);
    let mut out = vec![Vec::new(); tasks.len()];
    for l in 0..cfg.num_layers {
        let mut per_bank: Vec<Vec<Vec<f32>>> = Vec::new();
        for b in MEO_BANKS {
            let pw = ck.read_all(&format!("h.{l}.mlp.{b}.task_proj.weight"))?;
            let pb = ck.read_all(&format!("h.{l}.mlp.{b}.task_proj.bias"))?;
            let router = ck.read_all(&format!("h.{l}.mlp.{b}.router.weight"))?;
            per_bank.push(
                (0..tasks.len())
                    .map(|t| {
                        let p = affine(&pw, &emb[t * h..][..h], Some(&pb));
                        let z = affine(&router, &p, None);
                        let mut w = vec![0.0f32; e];
                        for c in meo::model::topk_softmax(&z, k) {
                            w[c.expert as usize] = c.weight;
                        }
                        w
                    })
                    .collect(),
            );
        }
        for (t, o) in out.iter_mut().enumerate() {
            o.push([per_bank[0][t].clone(), per_bank[1][t].clone()]);
        }
    }
    Ok(out)
}

/// The values of a merged task bank tensor: `Σ g_i θ_i` over the bank's experts.
///
/// # Errors
/// Reading the checkpoint.
pub fn task_bank_values(ck: &super::Checkpoint, layer: usize, bank: usize, part: usize, g: &[f32]) -> Result<Vec<f32>> {
    let name = format!("h.{layer}.mlp.{}.experts.{}", MEO_BANKS[bank], meo::names::BANK_EXPERT_PARTS[part]);
    let all = ck.read_all(&name)?;
    let per = all.len() / g.len().max(1);
    let mut acc = vec![0.0f64; per];
    for (i, &w) in g.iter().enumerate().filter(|(_, w)| **w != 0.0) {
        for (a, &v) in acc.iter_mut().zip(&all[i * per..][..per]) {
            *a += f64::from(w) * f64::from(v);
        }
    }
    Ok(acc.into_iter().map(|v| v as f32).collect())
}

/// The `merge.*` metadata of the task merges: `merge.tasks`, and per task `layers`, `weights`
/// (`layers × 2 banks × experts`) and `weighting` = `task_gate`.
pub fn merge_metadata(tasks: &[String], gates: &[Vec<[Vec<f32>; 2]>]) -> Vec<(String, crate::convert::Owned)> {
    use crate::convert::Owned;
    use meo::names::merge_keys as mk;
    if tasks.is_empty() {
        return Vec::new();
    }
    let mut v = vec![(mk::TASKS.to_string(), Owned::Strs(tasks.to_vec()))];
    for (t, g) in tasks.iter().zip(gates) {
        v.push((mk::task(t, "layers"), Owned::U64s((0..g.len() as u64).collect())));
        let w = g.iter().flat_map(|b| b.iter().flatten().map(|&x| f64::from(x))).collect();
        v.push((mk::task(t, "weights"), Owned::F64s(w)));
        v.push((mk::task(t, "weighting"), Owned::Str("task_gate".into())));
    }
    v
}

/// A checkpoint's source for `c` as a [`Source`] (`None` for computed tensors).
pub(super) fn to_source(c: &Canon, cfg: &ModelConfig) -> Result<Option<Source>> {
    Ok(source(c, cfg)?.map(|(tensor, first, count)| Source { tensor, first, count, pick: super::Pick::Whole }))
}
