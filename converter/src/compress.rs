//! Expert compression at conversion (`meo convert --compress METHOD:FRACTION --calib TEXT`).
//!
//! The calibration text runs through the f32 conversion of the checkpoint (the first pass, as
//! for task merges). Per MoE layer a method then decides which experts the file keeps and
//! how the router addresses them, and the file is written with
//! `routing.num_experts` = the survivors: a **standard** `.meo` file that every reader and
//! target runs as it runs any other (nothing to refuse, nothing new to implement per
//! target). Routing over the survivors is documented in `docs/ROUTING.md` ("Compressed files").
//!
//! Methods (`FRACTION` = the share of each layer's routed experts removed, the same in every
//! layer because `routing.num_experts` is one number per file):
//!
//! - `prune`: task-specific pruning. Saliency = how many calibration tokens selected the
//!   expert (ties: the larger summed gate weight, then the lower index).
//! - `reap`: REAP (router-weighted expert activation pruning). Saliency = the mean over the
//!   tokens that selected the expert of `g_e(x) · ‖E_e(x)‖₂` (gate weight times output norm).
//! - `mc-smoe`: MC-SMoE's merge step ([`mc_smoe`]): groups around the most used experts by
//!   router-logit similarity, aligned, merged with frequency weights. (MC-SMoE's further
//!   low-rank + sparse compression of the merged experts is not implemented: it needs factored
//!   expert storage in the format and every target.)
//! - `eep`: EEP's gradient-free search ([`eep_search`]) over the pruning choices, scored by
//!   the model's KL against the original on calibration text.
//!
//! Pruning keeps the chosen experts in their original order and drops the router rows
//! (and router / selection biases) of the others, so the router's top-k runs over the
//! survivors and the family's weight rule (softmax, renormalisation, scaling) applies to
//! them as it did to all.
//!
//! The file records what was done (`compress.*`, `docs/FORMAT.md`): the method, the fraction,
//! the SHA-256 and token count of the calibration text, per layer the original index of every
//! kept expert, the saliencies, and the measured error: per layer `‖y_c − y‖_F / ‖y‖_F` over
//! calibration tokens, `y` the original layer's routed output and `y_c` the compressed
//! layer's (its routing included) on the same input, in f32 (each layer's own error, not
//! compounded).

use crate::canonical::{self, Place};
use crate::convert::{Event, Options, Owned, Summary, check_cancel, encode_with};
use crate::merges::{LayerRec, MergeSpec, Window, calibrate_with, rel};
use crate::writer::{AtomicFile, MeoWriter, TensorSpec, WriteError};
use anyhow::{Context, Result, bail, ensure};
use meo::format::{DEFAULT_ALIGNMENT, MetaValue, Metadata};
use meo::merge::{ExpertRef, error_sums};
use meo::names::{self, merge_keys};
use meo::route::{Choice, RouteScratch, route_token};
use meo::{DType, Model, Trace};
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Metadata keys of compressed files.
pub mod keys {
    /// The method (`prune` or `reap`).
    pub const METHOD: &str = "compress.method";
    /// The share of each layer's routed experts removed.
    pub const FRACTION: &str = "compress.fraction";
    /// Routed experts per MoE layer before compression.
    pub const EXPERTS_BEFORE: &str = "compress.experts_before";
    /// SHA-256 of the calibration text's bytes, lowercase hex.
    pub const CALIB_SHA256: &str = "compress.calibration.sha256";
    /// Calibration tokens run.
    pub const CALIB_TOKENS: &str = "compress.calibration.tokens";
    /// The MoE layers, in the order of the per-layer arrays.
    pub const LAYERS: &str = "compress.layers";
    /// Per layer, the measured relative error of the routed output (module docs).
    pub const ERRORS: &str = "compress.errors";
    /// EEP: the chosen candidate's mean KL against the original on its scoring windows.
    pub const EEP_KL: &str = "compress.eep.kl";
    /// EEP: candidates scored.
    pub const EEP_EVALUATIONS: &str = "compress.eep.evaluations";

    /// Original index of each expert the file stores in layer `l`.
    pub fn kept(l: usize) -> String {
        format!("compress.layer.{l}.kept")
    }

    /// Merging methods: for every original expert of layer `l`, the stored expert it was
    /// merged into.
    pub fn group(l: usize) -> String {
        format!("compress.layer.{l}.group")
    }

    /// Saliency of every original expert of layer `l`.
    pub fn saliency(l: usize) -> String {
        format!("compress.layer.{l}.saliency")
    }
}

/// A compression method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Task-specific pruning: keep the experts the calibration routing selects most.
    Prune,
    /// REAP: keep the experts with the largest mean `gate weight × output norm`.
    Reap,
    /// MC-SMoE: merge each layer's experts into groups around its most used experts.
    McSmoe,
    /// EEP: an evolutionary search over the pruning choices, scored by the model's KL against
    /// the original on calibration text.
    Eep,
}

impl Method {
    pub const ALL: [Self; 4] = [Self::Prune, Self::Reap, Self::McSmoe, Self::Eep];

    /// The spelling in `--compress` and in `compress.method`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prune => "prune",
            Self::Reap => "reap",
            Self::McSmoe => "mc-smoe",
            Self::Eep => "eep",
        }
    }
}

/// One `--compress METHOD:FRACTION`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressSpec {
    pub method: Method,
    /// Share of each MoE layer's routed experts removed, in (0, 1).
    pub fraction: f64,
}

impl std::str::FromStr for CompressSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        let (m, f) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected METHOD:FRACTION, e.g. reap:0.5 (methods: {})", names.join(", ")))?;
        let method = Method::ALL
            .into_iter()
            .find(|x| x.name() == m)
            .ok_or_else(|| format!("unknown compression method {m:?} (use {})", names.join(", ")))?;
        let fraction: f64 = f.parse().map_err(|_| format!("{s:?}: {f:?} is not a number"))?;
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(format!("{s:?}: the fraction of experts removed must be between 0 and 1 (exclusive)"));
        }
        Ok(Self { method, fraction })
    }
}

impl CompressSpec {
    /// Experts kept per layer out of `experts`, at least `top_k`.
    ///
    /// # Errors
    /// Nothing would be removed, or fewer than `top_k` experts would remain.
    pub fn kept(&self, experts: usize, top_k: usize) -> Result<usize> {
        let remove = (self.fraction * experts as f64).round() as usize;
        ensure!(
            remove >= 1,
            "--compress {}:{}: removes no expert of {experts} (round({} × {experts}) = 0)",
            self.method.name(),
            self.fraction,
            self.fraction
        );
        let keep = experts.saturating_sub(remove);
        ensure!(
            keep >= top_k,
            "--compress {}:{}: would keep {keep} of {experts} experts per layer, fewer than the {top_k} each token \
             selects",
            self.method.name(),
            self.fraction
        );
        Ok(keep)
    }
}

/// Per-expert `Σ g·‖E(x)‖₂` over the tokens that selected it (REAP's numerator).
struct Reap<'m> {
    model: &'m Model,
    input: BTreeMap<usize, (usize, Vec<f32>)>,
    sums: BTreeMap<usize, Vec<f64>>,
    out: Vec<f32>,
}

impl Trace for Reap<'_> {
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        self.input.insert(layer, (pos0, x.to_vec()));
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        let c = self.model.config();
        let (h, e) = (c.hidden_size, c.router.num_experts);
        // A missing input is a runtime bug; the recorder's own checks report it.
        let Some(x) =
            self.input.get(&layer).and_then(|(p0, x)| pos.checked_sub(*p0).and_then(|i| x.get(i * h..(i + 1) * h)))
        else {
            return;
        };
        let sums = self.sums.entry(layer).or_insert_with(|| vec![0.0; e]);
        self.out.resize(h, 0.0);
        for ch in choices.iter().filter(|c| c.weight != 0.0) {
            let Some(ex) = self.model.expert(layer, ch.expert as usize) else { continue };
            self.model.run_expert(ex, x, 1, &mut self.out);
            let norm = self.out.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
            sums[ch.expert as usize] += f64::from(ch.weight) * norm;
        }
    }
}

/// Saliency of each expert of one layer under `method`.
fn saliency(method: Method, rec: &LayerRec, reap: Option<&[f64]>) -> Vec<f64> {
    match method {
        Method::Prune | Method::McSmoe | Method::Eep => rec.counts.iter().map(|&c| c as f64).collect(),
        Method::Reap => {
            let sums = reap.unwrap_or(&[]);
            rec.counts.iter().enumerate().map(|(e, &c)| if c == 0 { 0.0 } else { sums[e] / c as f64 }).collect()
        }
    }
}

/// The `keep` most salient experts, in ascending index order. Ties: the larger summed gate
/// weight, then the lower index.
pub fn most_salient(saliency: &[f64], gate_sum: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..saliency.len()).collect();
    order.sort_by(|&a, &b| {
        saliency[b].total_cmp(&saliency[a]).then(gate_sum[b].total_cmp(&gate_sum[a])).then(a.cmp(&b))
    });
    let mut kept = order[..keep.min(order.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// One layer's compressed router: rows `[n, h]` and optional biases `[n]`.
struct Router {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    selection_bias: Option<Vec<f32>>,
}

/// Per stored expert, the original experts merged into it (dominant first).
type Groups = Vec<Vec<usize>>;
/// An expert's f32 `[gate, up, down]`.
type ExpertF32 = [Vec<f32>; 3];

/// What the file stores for one MoE layer.
struct LayerPlan {
    /// Original index of each stored expert (a merged group's dominant expert).
    kept: Vec<usize>,
    /// Merging methods: per stored expert, the original experts merged into it and the
    /// merged f32 `[gate, up, down]`.
    merged: Option<(Groups, Vec<ExpertF32>)>,
    router: Router,
    saliency: Vec<f64>,
    error: f64,
}

/// An f32 tensor of the first-pass file by name.
fn f32_tensor(model: &Model, name: &str) -> Result<Option<Vec<f32>>> {
    let file = model.file()?;
    let Some(t) = file.tensor(name) else { return Ok(None) };
    ensure!(t.dtype == DType::F32, "{name}: {} in the calibration file, expected f32", t.dtype.name());
    Ok(Some(file.data(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
}

/// Rows `rows` of a row-major matrix of `cols` columns.
fn pick_rows(m: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| m[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// The router restricted to `kept`.
fn pruned_router(model: &Model, layer: usize, kept: &[usize]) -> Result<Router> {
    let h = model.config().hidden_size;
    let name = names::layer(layer, "router.weight");
    let w = f32_tensor(model, &name)?.with_context(|| format!("{name}: missing"))?;
    Ok(Router {
        weight: pick_rows(&w, h, kept),
        bias: f32_tensor(model, &names::layer(layer, "router.bias"))?.map(|b| pick_rows(&b, 1, kept)),
        selection_bias: f32_tensor(model, &names::layer(layer, "router.selection_bias"))?
            .map(|b| pick_rows(&b, 1, kept)),
    })
}

/// `(Σ‖y_c − y‖², Σ‖y‖²)` of a compressed layer on the kept calibration windows: `y` the
/// recorded routing's mixture, `y_c` the stored `experts` routed by `router` under the
/// model's `RouterSpec` with `experts.len()` experts.
fn compressed_error(
    model: &Model,
    layer: usize,
    router: &Router,
    experts: &[ExpertRef<'_>],
    windows: &[Window],
) -> Result<(f64, f64)> {
    let c = model.config();
    let (h, k) = (c.hidden_size, c.router.top_k);
    let mut spec = c.router.clone();
    spec.num_experts = experts.len();
    let n = experts.len();
    let mut scratch = RouteScratch::default();
    let mut sums = (0.0, 0.0);
    let mut logits = vec![0.0f32; n];
    let mut choices = vec![Choice { expert: 0, weight: 0.0 }; k];
    let mut y = vec![0.0f32; h];
    let mut yc = vec![0.0f32; h];
    for w in windows {
        let t = w.x.len() / h;
        let mut mix = vec![0.0; t * h];
        model.mixture(layer, &w.x, t, &w.choices, &mut mix)?;
        for tok in 0..t {
            let x = &w.x[tok * h..(tok + 1) * h];
            router_logits(router, x, &mut logits);
            route_token(&spec, &logits, router.selection_bias.as_deref(), &mut scratch, &mut choices);
            // Capacity (Switch) is not applied: the error is of routing and experts alone.
            yc.fill(0.0);
            for ch in choices.iter().filter(|c| c.weight != 0.0) {
                model.run_expert(experts[ch.expert as usize], x, 1, &mut y);
                for (o, &v) in yc.iter_mut().zip(&y) {
                    *o += ch.weight * v;
                }
            }
            let s = error_sums(&yc, &mix[tok * h..(tok + 1) * h]);
            sums.0 += s.0;
            sums.1 += s.1;
        }
    }
    Ok(sums)
}

/// `logits[j] = router row j · x (+ bias j)`.
fn router_logits(router: &Router, x: &[f32], logits: &mut [f32]) {
    let h = x.len();
    for (j, l) in logits.iter_mut().enumerate() {
        let row = &router.weight[j * h..(j + 1) * h];
        *l = row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + router.bias.as_ref().map_or(0.0, |b| b[j]);
    }
}

/// An expert's f32 matrices `[gate, up, down]` from the first-pass file (gate empty when the
/// experts are ungated).
fn expert_f32(model: &Model, layer: usize, e: usize) -> Result<[Vec<f32>; 3]> {
    let mut out: [Vec<f32>; 3] = Default::default();
    for (o, part) in out.iter_mut().zip(names::EXPERT_PARTS) {
        if let Some(v) = f32_tensor(model, &names::expert(layer, e, part))? {
            *o = v;
        }
    }
    ensure!(!out[1].is_empty() && !out[2].is_empty(), "layer {layer} expert {e}: missing up or down");
    Ok(out)
}

/// MC-SMoE on one layer: the `keep` most frequently selected experts are the groups'
/// dominant experts; every other expert joins the dominant expert whose router logits over
/// the calibration tokens are most similar (cosine; ties: the lower index), is aligned to it
/// (weight matching, [`crate::align`]) and merged into it with the experts' selection
/// frequencies as weights. The group's router row is its dominant expert's row (biases
/// alike): measured closer to the original than the frequency-weighted mean of the members'
/// rows (docs/COMPRESSION.md).
fn mc_smoe(
    model: &Model,
    layer: usize,
    rec: &LayerRec,
    keep: usize,
    cancel: &AtomicBool,
) -> Result<(Groups, Vec<ExpertF32>, Router)> {
    let c = model.config();
    let (h, i, e) = (c.hidden_size, c.expert_intermediate_size, c.router.num_experts);
    let freq: Vec<f64> = rec.counts.iter().map(|&x| x as f64).collect();
    let dominant = most_salient(&freq, &rec.gate_sum, keep);
    let all: Vec<usize> = (0..e).collect();
    let full = pruned_router(model, layer, &all)?;
    // Router logits per expert over the kept windows' tokens.
    let mut cols: Vec<Vec<f32>> = vec![Vec::new(); e];
    let mut logits = vec![0.0f32; e];
    for w in &rec.windows {
        for x in w.x.chunks_exact(h) {
            router_logits(&full, x, &mut logits);
            for (col, &v) in cols.iter_mut().zip(&logits) {
                col.push(v);
            }
        }
    }
    let cos = |a: &[f32], b: &[f32]| -> f64 {
        let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            ab += f64::from(x) * f64::from(y);
            aa += f64::from(x) * f64::from(x);
            bb += f64::from(y) * f64::from(y);
        }
        if aa > 0.0 && bb > 0.0 { ab / (aa * bb).sqrt() } else { 0.0 }
    };
    let mut groups: Vec<Vec<usize>> = dominant.iter().map(|&d| vec![d]).collect();
    for x in (0..e).filter(|x| !dominant.contains(x)) {
        let mut best = 0;
        for (j, &d) in dominant.iter().enumerate().skip(1) {
            if cos(&cols[x], &cols[d]) > cos(&cols[x], &cols[dominant[best]]) {
                best = j;
            }
        }
        groups[best].push(x);
    }
    let mut merged = Vec::new();
    let mut rows = vec![0.0f32; keep * h];
    let mut bias = full.bias.as_ref().map(|_| vec![0.0f32; keep]);
    let mut sel = full.selection_bias.as_ref().map(|_| vec![0.0f32; keep]);
    for (j, g) in groups.iter().enumerate() {
        check_cancel(cancel)?;
        let total: f64 = g.iter().map(|&x| freq[x]).sum();
        let weight = |x: usize| if total > 0.0 { (freq[x] / total) as f32 } else { 1.0 / g.len() as f32 };
        let dom = expert_f32(model, layer, g[0])?;
        let mut acc: [Vec<f32>; 3] = dom.clone().map(|v| v.iter().map(|&a| a * weight(g[0])).collect());
        for &x in &g[1..] {
            let [gt, up, dn] = expert_f32(model, layer, x)?;
            let order = crate::align::align_order(
                crate::align::ExpertF32 { gate: &dom[0], up: &dom[1], down: &dom[2] },
                crate::align::ExpertF32 { gate: &gt, up: &up, down: &dn },
                i,
                h,
                cancel,
            )
            .map_err(|err| anyhow::anyhow!("layer {layer}: aligning expert {x} to expert {}: {err}", g[0]))?;
            let parts = [
                if gt.is_empty() { gt } else { crate::align::permute(&gt, &order, i, h, false) },
                crate::align::permute(&up, &order, i, h, false),
                crate::align::permute(&dn, &order, i, h, true),
            ];
            for (a, p) in acc.iter_mut().zip(&parts) {
                for (o, &v) in a.iter_mut().zip(p) {
                    *o += weight(x) * v;
                }
            }
        }
        merged.push(acc);
        // The dominant expert's router row (and biases) address the group.
        let d = g[0];
        rows[j * h..(j + 1) * h].copy_from_slice(&full.weight[d * h..(d + 1) * h]);
        if let (Some(b), Some(fb)) = (bias.as_mut(), full.bias.as_ref()) {
            b[j] = fb[d];
        }
        if let (Some(b), Some(fb)) = (sel.as_mut(), full.selection_bias.as_ref()) {
            b[j] = fb[d];
        }
    }
    Ok((groups, merged, Router { weight: rows, bias, selection_bias: sel }))
}

/// The compressed conversion: `spec.compress` with `spec.calib` (checked by the caller).
///
/// # Errors
/// As [`crate::convert::convert_with`]; a model the method cannot compress (group-limited
/// routing, no MoE layer, too few experts to remove).
pub fn convert_compressed(
    dir: &Path,
    out: &Path,
    opts: Options,
    spec: &MergeSpec,
    cancel: &AtomicBool,
    mut progress: impl FnMut(Event<'_>),
) -> Result<Summary> {
    let cs = spec.compress.context("no --compress")?;
    let calib_path = spec.calib.as_deref().context("--compress needs --calib TEXT")?;
    crate::convert::check_output(out)?;
    let text = std::fs::read(calib_path)
        .with_context(|| format!("--calib: cannot read calibration text {}", calib_path.display()))?;
    let text =
        String::from_utf8(text).map_err(|_| anyhow::anyhow!("--calib {}: not UTF-8 text", calib_path.display()))?;
    let (first, first_summary) = crate::merges::first_pass(dir, out, opts.align, cancel)?;
    let model = Model::open(&first).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = model.config().clone();
    ensure!(model.moe_layers().next().is_some(), "--compress: this model has no routed-expert (MoE) layer");
    ensure!(
        cs.method != Method::McSmoe || !cfg.recipe.expert_bias,
        "--compress mc-smoe: merging experts with biases is not supported"
    );
    ensure!(
        cfg.router.n_group <= 1,
        "--compress: group-limited routing (n_group = {}) needs equal groups of experts; pruning would break them",
        cfg.router.n_group
    );
    let (e, k) = (cfg.router.num_experts, cfg.router.top_k);
    let keep = cs.kept(e, k)?;
    let tok = crate::merges::file_tokenizer(&model, dir)?;
    let ids = tok.encode(&text).map_err(|e| anyhow::anyhow!("--calib {}: {e}", calib_path.display()))?;
    ensure!(!ids.is_empty(), "--calib: the calibration text {} has no tokens", calib_path.display());

    let mut reap = Reap { model: &model, input: BTreeMap::new(), sums: BTreeMap::new(), out: Vec::new() };
    let recs = calibrate_with(&model, &ids, cancel, &mut reap)?;
    let mut eep = None;
    if cs.method == Method::Eep {
        let mut seeds = Vec::new();
        for m in [Method::Prune, Method::Reap] {
            let mut kept = BTreeMap::new();
            for (&l, rec) in &recs {
                kept.insert(
                    l,
                    most_salient(&saliency(m, rec, reap.sums.get(&l).map(Vec::as_slice)), &rec.gate_sum, keep),
                );
            }
            seeds.push(kept);
        }
        eep = Some(eep_search(&model, seeds, &ids, cancel)?);
    }
    let mut plans: BTreeMap<usize, LayerPlan> = BTreeMap::new();
    for l in model.moe_layers() {
        check_cancel(cancel)?;
        let rec = recs.get(&l).with_context(|| format!("calibration: layer {l} was never routed"))?;
        let sal = saliency(cs.method, rec, reap.sums.get(&l).map(Vec::as_slice));
        let (kept, router, merged) = if cs.method == Method::McSmoe {
            let (groups, m, router) = mc_smoe(&model, l, rec, keep, cancel)?;
            (groups.iter().map(|g| g[0]).collect(), router, Some((groups, m)))
        } else {
            let kept = match &eep {
                Some((best, _, _)) => best.get(&l).cloned().context("EEP: a layer without a choice")?,
                None => most_salient(&sal, &rec.gate_sum, keep),
            };
            (kept.clone(), pruned_router(&model, l, &kept)?, None)
        };
        let packs: Vec<(Vec<u8>, meo::model::plan::Mlp)> = merged
            .iter()
            .flat_map(|(_, m)| m)
            .map(|[g, u, d]| meo::merge::pack(g, u, d, cfg.expert_intermediate_size, cfg.hidden_size, DType::F32))
            .collect();
        let experts: Vec<ExpertRef<'_>> = if packs.is_empty() {
            kept.iter().map(|&x| model.expert(l, x).context("MoE layer")).collect::<Result<_>>()?
        } else {
            packs.iter().map(|(b, m)| ExpertRef { bytes: b, mlp: m }).collect()
        };
        let error = rel(compressed_error(&model, l, &router, &experts, &rec.windows)?);
        plans.insert(l, LayerPlan { kept, merged, router, saliency: sal, error });
    }
    let tokens = recs.values().next().map_or(0, |r| r.tokens);
    // 4-bit experts keep their activation-aware rounding (as `--calib` alone gives them).
    let stats = if matches!(opts.experts, DType::Q4_0 | DType::MXFP4) {
        Some(crate::calib::collect(&model, &ids, cancel)?)
    } else {
        None
    };

    // The compressed config's tensors, in a standard conversion's order.
    let mut new_cfg = cfg.clone();
    new_cfg.router.num_experts = keep;
    let canon = canonical::tensors(&new_cfg);
    let specs: Vec<TensorSpec> = canon
        .iter()
        .map(|c| TensorSpec { name: c.name.clone(), dtype: c.dtype(opts.dense, opts.experts), shape: c.shape.clone() })
        .collect();
    let file = model.file()?;
    let orders = crate::merges::read_orders(&model)?;
    let mut extra: Vec<(String, Owned)> = vec![
        (keys::METHOD.into(), Owned::Str(cs.method.name().into())),
        (keys::FRACTION.into(), Owned::F64s(vec![cs.fraction])),
        (keys::EXPERTS_BEFORE.into(), Owned::U64(e as u64)),
        (keys::CALIB_SHA256.into(), Owned::Str(hex(&sha256(text.as_bytes())))),
        (keys::CALIB_TOKENS.into(), Owned::U64(tokens)),
        (keys::LAYERS.into(), Owned::U64s(plans.keys().map(|&l| l as u64).collect())),
        (keys::ERRORS.into(), Owned::F64s(plans.values().map(|p| p.error).collect())),
    ];
    if let Some((_, kl, evals)) = &eep {
        extra.push((keys::EEP_KL.into(), Owned::F64s(vec![*kl])));
        extra.push((keys::EEP_EVALUATIONS.into(), Owned::U64(*evals as u64)));
    }
    for (&l, p) in &plans {
        extra.push((keys::kept(l), Owned::U64s(p.kept.iter().map(|&x| x as u64).collect())));
        if let Some((groups, _)) = &p.merged {
            // Original expert -> the stored expert it was merged into.
            let mut map = vec![0u64; e];
            for (j, g) in groups.iter().enumerate() {
                for &x in g {
                    map[x] = j as u64;
                }
            }
            extra.push((keys::group(l), Owned::U64s(map)));
        }
        extra.push((keys::saliency(l), Owned::F64s(p.saliency.clone())));
    }
    // Alignment orders follow the kept experts.
    let aligned: Option<crate::convert::Orders> = orders
        .map(|o| o.iter().map(|(l, per)| (*l, plans[l].kept.iter().map(|&x| per[x].clone()).collect())).collect());
    let align_meta = crate::convert::alignment_metadata(aligned.as_ref());
    let routing = new_cfg.router.to_metadata();
    let mut entries: Vec<(&str, MetaValue<'_>)> = file
        .metadata
        .entries()
        .iter()
        .filter(|(k, _)| {
            !matches!(*k, "quant.experts" | "quant.dense")
                && !k.starts_with("routing.")
                && !k.starts_with("merge.align")
                && *k != merge_keys::ALIGNED
        })
        .cloned()
        .collect();
    entries.extend(routing);
    entries.push(("quant.experts", MetaValue::Str(opts.experts.name())));
    entries.push(("quant.dense", MetaValue::Str(opts.dense.name())));
    entries.extend(align_meta.iter().chain(&extra).map(|(k, v)| (k.as_str(), v.value())));
    let meta = Metadata::from_entries(entries);

    let data_bytes: u64 = specs.iter().map(|s| s.dtype.byte_len(&s.shape).unwrap_or(0)).sum();
    let (atomic, f) =
        AtomicFile::create(out).with_context(|| format!("{}: cannot create the output file", out.display()))?;
    let tmp = atomic.tmp_path().display().to_string();
    let io = |e: WriteError| anyhow::Error::new(e).context(format!("writing {tmp}"));
    let mut w =
        MeoWriter::new(BufWriter::with_capacity(1 << 20, f), &meta, specs.clone(), DEFAULT_ALIGNMENT).map_err(io)?;
    progress(Event::Start { tensors: specs.len(), bytes: data_bytes });
    write_tensors(&model, &plans, &canon, &specs, stats.as_ref(), &mut w, cancel, &mut progress).map_err(|e| {
        match e.downcast::<WriteError>() {
            Ok(we) => io(we),
            Err(e) => e,
        }
    })?;
    let fh = w.finish().map_err(io)?.into_inner().map_err(|e| io(WriteError::Io(e.into_error())))?;
    let file_bytes = fh.metadata().map_err(|e| io(e.into()))?.len();
    atomic.commit(fh).with_context(|| format!("{}: cannot move the finished file into place", out.display()))?;
    Ok(Summary {
        architecture: cfg.architecture.clone(),
        tensors: specs.len(),
        file_bytes,
        checkpoint_bytes: first_summary.checkpoint_bytes,
    })
}

/// Writes every tensor of the compressed file (`canon` / `specs`, a standard conversion's order)
/// from the f32 first-pass `model` and the layers' `plans`.
///
/// # Errors
/// A missing source tensor, a size mismatch, I/O ([`WriteError`]), cancellation.
#[allow(clippy::too_many_arguments)]
fn write_tensors<W: std::io::Write + std::io::Seek>(
    model: &Model,
    plans: &BTreeMap<usize, LayerPlan>,
    canon: &[canonical::Canon],
    specs: &[TensorSpec],
    stats: Option<&crate::calib::Stats>,
    w: &mut MeoWriter<W>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<()> {
    for (c, s) in canon.iter().zip(specs) {
        check_cancel(cancel)?;
        let source = |name: &str| -> Result<Vec<f32>> {
            f32_tensor(model, name)?.with_context(|| format!("{name}: missing from the calibration file"))
        };
        let (values, importance) = match c.place {
            Place::Expert { layer, expert, part } if plans[&layer].merged.is_some() => {
                let (_, m) = plans[&layer].merged.as_ref().expect("checked");
                (m[expert][part].clone(), None)
            }
            Place::Expert { layer, expert, .. } | Place::ExpertBias { layer, expert, .. } => {
                let orig = plans[&layer].kept[expert];
                let prefix = format!("layers.{layer}.experts.{expert}.");
                let part = c.name.strip_prefix(&prefix).context("expert tensor name")?;
                let imp = match (stats, c.place) {
                    (Some(st), Place::Expert { .. }) => st.importance(layer, orig, part),
                    _ => None,
                };
                (source(&names::expert(layer, orig, part))?, imp)
            }
            _ => match plans.iter().find_map(|(&l, p)| router_part(&c.name, l, &p.router)) {
                Some(v) => (v.to_vec(), None),
                None => (source(&c.name)?, None),
            },
        };
        ensure!(
            values.len() as u64 == c.shape.iter().product::<u64>(),
            "{}: {} values for shape {:?}",
            c.name,
            values.len(),
            c.shape
        );
        let bytes = encode_with(&values, &s.shape, s.dtype, importance.as_deref());
        w.write_tensor(&bytes)?;
        progress(Event::Tensor { name: &s.name, bytes: bytes.len() as u64 });
    }
    Ok(())
}

/// A compressed model of `kept` experts per layer (pruned: router rows dropped), f32, in
/// memory: what EEP scores a candidate with.
///
/// # Errors
/// As [`write_tensors`]; the file does not open.
fn pruned_in_memory(model: &Model, kept: &BTreeMap<usize, Vec<usize>>, cancel: &AtomicBool) -> Result<Model> {
    let mut plans = BTreeMap::new();
    for (&l, k) in kept {
        let router = pruned_router(model, l, k)?;
        plans.insert(l, LayerPlan { kept: k.clone(), merged: None, router, saliency: Vec::new(), error: 0.0 });
    }
    let mut cfg = model.config().clone();
    cfg.router.num_experts = kept.values().next().map_or(0, Vec::len);
    let canon = canonical::tensors(&cfg);
    let specs: Vec<TensorSpec> = canon
        .iter()
        .map(|c| TensorSpec { name: c.name.clone(), dtype: c.dtype(DType::F32, DType::F32), shape: c.shape.clone() })
        .collect();
    let file = model.file()?;
    let mut entries: Vec<(&str, MetaValue<'_>)> = file
        .metadata
        .entries()
        .iter()
        .filter(|(k, _)| !k.starts_with("routing.") && !k.starts_with("merge.align") && *k != merge_keys::ALIGNED)
        .cloned()
        .collect();
    entries.extend(cfg.router.to_metadata());
    let meta = Metadata::from_entries(entries);
    let mut w = MeoWriter::new(std::io::Cursor::new(Vec::new()), &meta, specs.clone(), DEFAULT_ALIGNMENT)?;
    write_tensors(model, &plans, &canon, &specs, None, &mut w, cancel, &mut |_| {})?;
    let bytes = w.finish()?.into_inner();
    Model::from_vec(bytes).map_err(|e| anyhow::anyhow!("EEP candidate: {e}"))
}

/// Windows of calibration text EEP scores candidates on.
pub const EEP_WINDOWS: usize = 4;
/// EEP generations and children per generation.
pub const EEP_GENERATIONS: usize = 10;
const EEP_CHILDREN: usize = 6;

/// All next-token log-probabilities of `model` on `windows` (`Logits::All`), concatenated.
fn log_probs(model: &Model, windows: &[&[u32]]) -> Result<Vec<f32>> {
    let mut s = meo::Session::new(model, meo::SessionOptions::default())?;
    let v = model.config().vocab_size;
    let mut out = Vec::new();
    for w in windows {
        s.reset();
        let l = s.forward_with(w, meo::Logits::All, &mut meo::NoTrace)?;
        for row in l.chunks_exact(v) {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln() + m;
            out.extend(row.iter().map(|&x| x - lse));
        }
    }
    Ok(out)
}

/// Mean KL(reference ‖ candidate) per position, from log-probabilities.
fn mean_kl(reference: &[f32], cand: &[f32], vocab: usize) -> f64 {
    let mut kl = 0.0f64;
    for (r, c) in reference.chunks_exact(vocab).zip(cand.chunks_exact(vocab)) {
        kl += r.iter().zip(c).map(|(&a, &b)| f64::from(a.exp()) * f64::from(a - b)).sum::<f64>();
    }
    kl / (reference.len() / vocab).max(1) as f64
}

/// EEP: a gradient-free (evolutionary) search over which experts each layer keeps, scored by
/// the whole model's KL against the original on the first [`EEP_WINDOWS`] calibration windows
/// (what `meo eval` measures, on calibration text). Seeds: the `prune` and `reap` choices;
/// each generation mutates the best candidates (one layer swaps one kept expert for a removed
/// one, chosen by a fixed-seed generator, so conversions are reproducible) and keeps the best
/// [`EEP_CHILDREN`]. Returns the best kept sets and their KL.
///
/// # Errors
/// As [`pruned_in_memory`]; a forward error; cancellation.
fn eep_search(
    model: &Model,
    seeds: Vec<BTreeMap<usize, Vec<usize>>>,
    ids: &[u32],
    cancel: &AtomicBool,
) -> Result<(BTreeMap<usize, Vec<usize>>, f64, usize)> {
    let e = model.config().router.num_experts;
    let v = model.config().vocab_size;
    let win = crate::merges::CALIB_WINDOW;
    let windows: Vec<&[u32]> = ids.chunks(win).filter(|w| w.len() > 1).take(EEP_WINDOWS).collect();
    let reference = log_probs(model, &windows)?;
    let score = |k: &BTreeMap<usize, Vec<usize>>| -> Result<f64> {
        let m = pruned_in_memory(model, k, cancel)?;
        Ok(mean_kl(&reference, &log_probs(&m, &windows)?, v))
    };
    let mut pop: Vec<(f64, BTreeMap<usize, Vec<usize>>)> = Vec::new();
    let mut evals = 0;
    for s in seeds {
        if !pop.iter().any(|p| p.1 == s) {
            evals += 1;
            pop.push((score(&s)?, s));
        }
    }
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        // xorshift64*: a fixed sequence, so the search is reproducible.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    };
    let layers: Vec<usize> = pop[0].1.keys().copied().collect();
    for _ in 0..EEP_GENERATIONS {
        check_cancel(cancel)?;
        pop.sort_by(|a, b| a.0.total_cmp(&b.0));
        pop.truncate(EEP_CHILDREN);
        let parents = pop.len().min(3);
        for c in 0..EEP_CHILDREN {
            let mut child = pop[c % parents].1.clone();
            let l = layers[next(layers.len())];
            let kept = child.get_mut(&l).expect("layer");
            let removed: Vec<usize> = (0..e).filter(|x| !kept.contains(x)).collect();
            if removed.is_empty() {
                continue;
            }
            let at = next(kept.len());
            kept[at] = removed[next(removed.len())];
            kept.sort_unstable();
            if pop.iter().any(|p| p.1 == child) {
                continue;
            }
            evals += 1;
            pop.push((score(&child)?, child));
        }
    }
    pop.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (kl, best) = pop.swap_remove(0);
    Ok((best, kl, evals))
}

/// The compressed router tensor `name` of layer `l`, if `name` is one.
fn router_part<'a>(name: &str, l: usize, r: &'a Router) -> Option<&'a [f32]> {
    if name == names::layer(l, "router.weight") {
        Some(&r.weight)
    } else if name == names::layer(l, "router.bias") {
        r.bias.as_deref()
    } else if name == names::layer(l, "router.selection_bias") {
        r.selection_bias.as_deref()
    } else {
        None
    }
}

/// Lowercase hex.
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (FIPS 180-4) of `data`: names the calibration text in the file.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut hs: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (t, c) in block.chunks_exact(4).enumerate() {
            w[t] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for t in 16..64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16].wrapping_add(s0).wrapping_add(w[t - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = hs;
        for (&k, &wt) in K.iter().zip(&w) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h.wrapping_add(s1).wrapping_add(ch).wrapping_add(k).wrapping_add(wt);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            (h, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
        }
        for (x, y) in hs.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (o, x) in out.chunks_exact_mut(4).zip(hs) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// Refuses flag combinations `--compress` does not support (before any work).
///
/// # Errors
/// `--compress` without `--calib`, or with `--task` or `--hot-experts`.
pub fn check_flags(spec: &MergeSpec) -> Result<()> {
    let Some(cs) = spec.compress else { return Ok(()) };
    if spec.calib.is_none() {
        bail!(
            "--compress {}:{} needs --calib TEXT: the experts kept are chosen from the routing on it",
            cs.method.name(),
            cs.fraction
        );
    }
    ensure!(spec.tasks.is_empty(), "--compress with --task is not supported: compress, or add task merges, not both");
    ensure!(spec.hot_experts == 0.0, "--compress with --hot-experts is not supported");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s: CompressSpec = "reap:0.5".parse().unwrap();
        assert_eq!(s, CompressSpec { method: Method::Reap, fraction: 0.5 });
        assert_eq!("prune:0.25".parse::<CompressSpec>().unwrap().method, Method::Prune);
        for bad in ["reap", "reap:", "reap:x", "reap:0", "reap:1", "reap:-0.5", "merge:0.5", "reap:NaN"] {
            assert!(bad.parse::<CompressSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn kept_counts() {
        let s = |f| CompressSpec { method: Method::Prune, fraction: f };
        assert_eq!(s(0.5).kept(8, 2).unwrap(), 4);
        assert_eq!(s(0.75).kept(8, 2).unwrap(), 2);
        assert_eq!(s(0.25).kept(8, 2).unwrap(), 6);
        assert!(s(0.9).kept(8, 2).is_err());
        assert!(s(0.01).kept(8, 2).is_err());
    }

    #[test]
    fn most_salient_keeps_order_and_breaks_ties() {
        assert_eq!(most_salient(&[1.0, 5.0, 3.0, 5.0], &[0.0; 4], 2), [1, 3]);
        assert_eq!(most_salient(&[1.0, 5.0, 3.0, 5.0], &[0.0; 4], 3), [1, 2, 3]);
        // Equal saliency: the larger gate sum, then the lower index.
        assert_eq!(most_salient(&[2.0, 2.0, 2.0], &[0.1, 0.3, 0.3], 1), [1]);
    }

    #[test]
    fn sha256_vectors() {
        assert_eq!(hex(&sha256(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(&sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(hex(&sha256(long)), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    }
}
