//! Precomputed MEO task merges for standard token-routed MoEs (`meo convert --task`).
//!
//! For each task, the calibration text is tokenized with the checkpoint's tokenizer and run
//! through the model (the runtime, on an f32 conversion of the checkpoint written to a
//! temporary file). Per MoE layer the merge weights are the mean gate weight of each expert
//! over the calibration tokens (0 for a token that did not select it), or, with
//! `--merge-weighting frequency` (MC-SMoE), the experts' selection frequencies scaled to the
//! same mean routing mass. The experts are merged in f32 from the f32 weights (aligned, see
//! [`crate::align`]), re-encoded to the file's expert dtype, and stored as one slab per task
//! and layer (`tasks.<task>.layers.<l>.experts.merged.*`). The merge weights and the measured
//! merge error go into the metadata (`merge.task.<task>.*`), so a merge can be verified and
//! reproduced. The merge rule for weights that do not sum to 1 is [`meo::merge`]'s.
//!
//! **Merge error** of a layer: `‖y_merged − y_mixture‖_F / ‖y_mixture‖_F` over calibration
//! tokens, where `y_mixture = Σ g_i E_i(x)` is the layer's routed output (shared experts
//! excluded) for the token's own routing, and `y_merged` the f32 merged expert's output on the
//! same input `x`. Both in f32, so it measures merging alone (int8 effects show in `meo eval`).
//! It is measured with and without alignment (`errors`, `errors_unaligned`), and for prompt
//! mode (merge from the mean gate of the first [`PROMPT_LEN`] tokens of each calibration window,
//! error on the window's remaining tokens), which `--merge-layers auto` uses in prompt mode.

use crate::align::unpermute;
use crate::canonical;
use crate::convert::{Event, Options, Orders, Owned, Summary, TOKENIZER_KEY, check_cancel, encode_with};
use crate::writer::{AtomicFile, MeoWriter, TensorSpec, WriteError};
use anyhow::{Context, Result, bail, ensure};
use meo::format::{DEFAULT_ALIGNMENT, MetaValue, Metadata};
use meo::merge::{ExpertRef, Mass, MergedExpert, error_sums, merge_f32, pack};
use meo::names::{self, merge_keys};
use meo::route::Choice;
use meo::{DType, Logits, Model, Session, SessionOptions, Trace};
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Calibration windows: tokens run per sequence (at most the model's context).
pub const CALIB_WINDOW: usize = 128;
/// Prompt length used to measure prompt-mode merge error (as `meo eval`'s default).
pub const PROMPT_LEN: usize = 32;
/// Windows whose router inputs are kept to measure merge errors.
pub const ERROR_WINDOWS: usize = 16;

/// One `--task NAME=calibration.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub name: String,
    pub text: PathBuf,
}

impl std::str::FromStr for TaskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, path) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=calibration.txt"))?;
        if !names::valid_task_name(name) {
            return Err(format!("task name {name:?}: use 1-{} characters of [A-Za-z0-9_-]", names::MAX_TASK_NAME));
        }
        if path.is_empty() {
            return Err(format!("{s:?}: no calibration file after '='"));
        }
        Ok(Self { name: name.into(), text: path.into() })
    }
}

/// How the merge weights are computed from the calibration routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weighting {
    /// Mean gate weight per expert over the calibration tokens.
    #[default]
    MeanGate,
    /// Selection frequency per expert (MC-SMoE), scaled to the mean routing mass.
    Frequency,
    /// Calibrated: starting from the mean gate, the weights that minimise the merged
    /// expert's output error against the mixture on the calibration tokens ([`fit_weights`]).
    Calibrated,
}

impl Weighting {
    /// Every weighting, in the order command lines list them.
    pub const ALL: [Self; 3] = [Self::MeanGate, Self::Frequency, Self::Calibrated];

    /// Command-line spelling (`--merge-weighting`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::MeanGate => "mean-gate",
            Self::Frequency => "frequency",
            Self::Calibrated => "calibrated",
        }
    }

    /// Metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanGate => "mean_gate",
            Self::Frequency => "frequency",
            Self::Calibrated => "calibrated",
        }
    }
}

impl core::str::FromStr for Weighting {
    type Err = String;

    /// Parses the command-line spelling ([`Weighting::cli_name`]).
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|w| w.cli_name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|w| w.cli_name()).collect();
            format!("unknown weighting {s:?} (use {})", names.join(" or "))
        })
    }
}

/// The second pass of a conversion: task merges and calibrated expert quantization.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeSpec {
    pub tasks: Vec<TaskSpec>,
    pub weighting: Weighting,
    /// Calibration text for the 4-bit quantizers and `hot_experts` ([`crate::calib`]).
    pub calib: Option<PathBuf>,
    /// Share of each MoE layer's experts (the most selected on `calib`) stored as int8 while
    /// the rest take `Options::experts` (0: none).
    pub hot_experts: f64,
    /// Expert compression chosen on `calib` ([`crate::compress`]).
    pub compress: Option<crate::compress::CompressSpec>,
}

impl MergeSpec {
    /// Whether the conversion needs the two-pass path (a calibration run).
    pub fn calibrates(&self) -> bool {
        !self.tasks.is_empty() || self.calib.is_some() || self.compress.is_some()
    }
}

/// One kept calibration window of one layer: router inputs `[n, h]` and choices `[n, k]`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Window {
    pub(crate) x: Vec<f32>,
    pub(crate) choices: Vec<Choice>,
}

/// What the calibration run saw in one MoE layer.
#[derive(Debug, Default, Clone)]
pub(crate) struct LayerRec {
    pub(crate) gate_sum: Vec<f64>,
    pub(crate) counts: Vec<u64>,
    pub(crate) tokens: u64,
    pub(crate) windows: Vec<Window>,
}

/// Records routing (all tokens) and router inputs (kept windows) per MoE layer.
#[derive(Debug, Default)]
struct Recorder {
    experts: usize,
    keep: bool,
    layers: BTreeMap<usize, LayerRec>,
}

impl Trace for Recorder {
    fn on_moe_input(&mut self, layer: usize, _pos0: usize, x: &[f32]) {
        if self.keep {
            let e = self.experts;
            let r = self.layers.entry(layer).or_insert_with(|| LayerRec {
                gate_sum: vec![0.0; e],
                counts: vec![0; e],
                ..Default::default()
            });
            r.windows.push(Window { x: x.to_vec(), choices: Vec::new() });
        }
    }
    fn on_route(&mut self, layer: usize, _pos: usize, choices: &[Choice]) {
        let e = self.experts;
        let r = self.layers.entry(layer).or_insert_with(|| LayerRec {
            gate_sum: vec![0.0; e],
            counts: vec![0; e],
            ..Default::default()
        });
        r.tokens += 1;
        for c in choices {
            r.gate_sum[c.expert as usize] += f64::from(c.weight);
            if c.weight != 0.0 {
                r.counts[c.expert as usize] += 1;
            }
        }
        if self.keep
            && let Some(w) = r.windows.last_mut()
        {
            w.choices.extend_from_slice(choices);
        }
    }
}

/// Runs `tokens` through `model` in windows of [`CALIB_WINDOW`], keeping the router inputs
/// of the first [`ERROR_WINDOWS`] windows.
fn calibrate(model: &Model, tokens: &[u32], cancel: &AtomicBool) -> Result<BTreeMap<usize, LayerRec>> {
    calibrate_with(model, tokens, cancel, &mut meo::NoTrace)
}

/// [`calibrate`], with `extra` seeing the same run (per-token statistics of other passes).
pub(crate) fn calibrate_with(
    model: &Model,
    tokens: &[u32],
    cancel: &AtomicBool,
    extra: &mut dyn Trace,
) -> Result<BTreeMap<usize, LayerRec>> {
    let mut s = Session::new(model, SessionOptions::default())?;
    let win = CALIB_WINDOW.min(s.max_context()).max(1);
    let mut rec = Recorder { experts: model.config().router.num_experts, ..Default::default() };
    for (i, chunk) in tokens.chunks(win).enumerate() {
        check_cancel(cancel)?;
        rec.keep = i < ERROR_WINDOWS;
        s.reset();
        s.forward_with(chunk, Logits::Last, &mut Both(&mut rec, extra))?;
    }
    Ok(rec.layers)
}

/// Sends a run's observations to two traces.
struct Both<'a>(&'a mut dyn Trace, &'a mut dyn Trace);

impl Trace for Both<'_> {
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        self.0.on_moe_input(layer, pos0, x);
        self.1.on_moe_input(layer, pos0, x);
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        self.0.on_route(layer, pos, choices);
        self.1.on_route(layer, pos, choices);
    }
}

/// Merge weights `w` (per expert) from a layer's calibration routing.
fn weights(r: &LayerRec, weighting: Weighting) -> Vec<f32> {
    let n = r.tokens.max(1) as f64;
    match weighting {
        Weighting::MeanGate | Weighting::Calibrated => r.gate_sum.iter().map(|&g| (g / n) as f32).collect(),
        Weighting::Frequency => {
            let mass = r.gate_sum.iter().sum::<f64>() / n;
            let total = r.counts.iter().sum::<u64>().max(1) as f64;
            r.counts.iter().map(|&c| (mass * c as f64 / total) as f32).collect()
        }
    }
}

/// Evaluations of the merge error one weight fit may spend per layer.
const FIT_EVALS: usize = 240;

/// Calibrated merge weights: from `w0`, a coordinate search (each weight moved by ± a step,
/// a move kept when it lowers the error, the step halved when none does; weights stay ≥ 0)
/// minimising the merge error ([`error_of`]) of the merged expert on the kept calibration
/// windows. Gradient-free because the merged expert is a nonlinear function of the weights
/// (they sit inside SiLU); at most [`FIT_EVALS`] evaluations. The result is ordinary merge
/// weights: the merge rule applied to them reproduces the stored tensors.
///
/// # Errors
/// A mixture that does not fit (a runtime bug), or cancellation.
fn fit_weights(
    model: &Model,
    layer: usize,
    experts: &[ExpertRef<'_>],
    w0: Vec<f32>,
    windows: &[Window],
    cancel: &AtomicBool,
) -> Result<Vec<f32>> {
    let c = model.config();
    let (h, i) = (c.hidden_size, c.expert_intermediate_size);
    let mut mixes = Vec::new();
    for w in windows {
        let t = w.x.len() / h;
        let mut m = vec![0.0; t * h];
        model.mixture(layer, &w.x, t, &w.choices, &mut m)?;
        mixes.push(m);
    }
    let err = |w: &[f32]| -> f64 {
        let (g, u, d) = merge_f32(experts, w, Mass::of(&c.router));
        let (b, m) = pack(&g, &u, &d, i, h, DType::F32);
        let mut sums = (0.0, 0.0);
        for (win, mix) in windows.iter().zip(&mixes) {
            let mut y = vec![0.0; mix.len()];
            model.run_expert(ExpertRef { bytes: &b, mlp: &m }, &win.x, mix.len() / h, &mut y);
            let s = error_sums(&y, mix);
            sums.0 += s.0;
            sums.1 += s.1;
        }
        rel(sums)
    };
    let scale = w0.iter().sum::<f32>() / w0.len().max(1) as f32;
    let (mut w, mut step, mut evals) = (w0, 0.5f32, 1usize);
    let mut best = err(&w);
    while step > 1.0 / 64.0 && evals < FIT_EVALS && scale > 0.0 {
        let mut improved = false;
        for e in 0..w.len() {
            check_cancel(cancel)?;
            for dir in [1.0f32, -1.0] {
                let mut cand = w.clone();
                cand[e] = (cand[e] + dir * step * scale).max(0.0);
                if cand[e] == w[e] || evals >= FIT_EVALS {
                    continue;
                }
                evals += 1;
                let v = err(&cand);
                if v < best {
                    (best, w, improved) = (v, cand, true);
                    break;
                }
            }
        }
        if !improved {
            step /= 2.0;
        }
    }
    Ok(w)
}

/// `(Σ‖merged − mixture‖², Σ‖mixture‖²)` of `merged` on the tokens `from..` of each window.
fn error_of(model: &Model, layer: usize, merged: ExpertRef<'_>, windows: &[Window], from: usize) -> Result<(f64, f64)> {
    let (h, k) = (model.config().hidden_size, model.config().router.top_k);
    let mut sums = (0.0, 0.0);
    for w in windows {
        let n = w.x.len() / h;
        if n <= from {
            continue;
        }
        let m = n - from;
        let x = &w.x[from * h..];
        let mut mix = vec![0.0; m * h];
        model.mixture(layer, x, m, &w.choices[from * k..], &mut mix)?;
        let mut y = vec![0.0; m * h];
        model.run_expert(merged, x, m, &mut y);
        let (a, b) = error_sums(&y, &mix);
        sums.0 += a;
        sums.1 += b;
    }
    Ok(sums)
}

pub(crate) fn rel((num, den): (f64, f64)) -> f64 {
    if den > 0.0 { (num / den).sqrt() } else { 0.0 }
}

/// The layer's experts in the checkpoint's unit order (undoing the alignment), as f32.
fn unaligned_experts(model: &Model, layer: usize, orders: &[Vec<u32>]) -> Vec<(Vec<u8>, meo::model::plan::Mlp)> {
    let c = model.config();
    let (h, i) = (c.hidden_size, c.expert_intermediate_size);
    (0..c.router.num_experts)
        .map(|e| {
            let ex = model.expert(layer, e).expect("MoE layer");
            let f32s = |m: &meo::model::plan::Mat| -> Vec<f32> {
                let view = meo::kernels::MatRef::new(m.dtype, m.rows, m.cols, &ex.bytes[m.range.clone()])
                    .expect("validated at open");
                let mut v = vec![0.0; m.rows * m.cols];
                meo::kernels::decode(&view, 0, m.rows, 0, m.cols, &mut v);
                v
            };
            let o = &orders[e];
            let g = ex.mlp.gate.as_ref().map(|g| unpermute(&f32s(g), o, i, h, false)).unwrap_or_default();
            let u = unpermute(&f32s(&ex.mlp.up), o, i, h, false);
            let d = unpermute(&f32s(&ex.mlp.down), o, i, h, true);
            meo::merge::pack_act(&g, &u, &d, i, h, DType::F32, ex.mlp.act)
        })
        .collect()
}

/// One task's merge of one layer.
#[derive(Debug, Clone)]
pub struct LayerMerge {
    pub layer: usize,
    pub weights: Vec<f32>,
    pub error: f64,
    pub error_unaligned: Option<f64>,
    /// Encoded in the file's expert dtype.
    pub merged: MergedExpert,
}

/// One task's merges.
#[derive(Debug, Clone)]
pub struct TaskMerges {
    pub name: String,
    pub tokens: u64,
    pub layers: Vec<LayerMerge>,
}

/// Merges of every MoE layer for one task's calibration routing.
fn task_merges(
    model: &Model,
    name: &str,
    recs: &BTreeMap<usize, LayerRec>,
    orders: Option<&Orders>,
    weighting: Weighting,
    dtype: DType,
    cancel: &AtomicBool,
) -> Result<TaskMerges> {
    let c = model.config();
    let (h, i) = (c.hidden_size, c.expert_intermediate_size);
    let mut layers = Vec::new();
    let mut tokens = 0;
    for (&l, r) in recs {
        check_cancel(cancel)?;
        tokens = r.tokens;
        let experts: Vec<ExpertRef<'_>> = (0..c.router.num_experts).map(|e| model.expert(l, e).expect("MoE")).collect();
        let w = match weighting {
            Weighting::Calibrated => fit_weights(model, l, &experts, weights(r, weighting), &r.windows, cancel)?,
            _ => weights(r, weighting),
        };
        let (g, u, d) = merge_f32(&experts, &w, Mass::of(&c.router));
        let (fb, fm) = pack(&g, &u, &d, i, h, DType::F32);
        let error = rel(error_of(model, l, ExpertRef { bytes: &fb, mlp: &fm }, &r.windows, 0)?);
        let error_unaligned = match orders.and_then(|o| o.get(&l)) {
            Some(o) => {
                let un = unaligned_experts(model, l, o);
                let refs: Vec<ExpertRef<'_>> = un.iter().map(|(b, m)| ExpertRef { bytes: b, mlp: m }).collect();
                let (g2, u2, d2) = merge_f32(&refs, &w, Mass::of(&c.router));
                let (ub, um) = pack(&g2, &u2, &d2, i, h, DType::F32);
                Some(rel(error_of(model, l, ExpertRef { bytes: &ub, mlp: &um }, &r.windows, 0)?))
            }
            None => None,
        };
        let (bytes, mlp) = pack(&g, &u, &d, i, h, dtype);
        layers.push(LayerMerge {
            layer: l,
            weights: w.clone(),
            error,
            error_unaligned,
            merged: MergedExpert { bytes, mlp, weights: w },
        });
    }
    Ok(TaskMerges { name: name.into(), tokens, layers })
}

/// Prompt-mode merge error per MoE layer over the kept windows of every task.
fn prompt_errors(model: &Model, all: &[BTreeMap<usize, LayerRec>], cancel: &AtomicBool) -> Result<Vec<(usize, f64)>> {
    let c = model.config();
    let (h, i, k) = (c.hidden_size, c.expert_intermediate_size, c.router.top_k);
    let mut out = Vec::new();
    for l in model.moe_layers() {
        let experts: Vec<ExpertRef<'_>> = (0..c.router.num_experts).map(|e| model.expert(l, e).expect("MoE")).collect();
        let mut sums = (0.0, 0.0);
        for w in all.iter().filter_map(|r| r.get(&l)).flat_map(|r| &r.windows) {
            check_cancel(cancel)?;
            let n = w.x.len() / h;
            if n <= PROMPT_LEN {
                continue;
            }
            let mut wt = vec![0.0f32; c.router.num_experts];
            for ch in &w.choices[..PROMPT_LEN * k] {
                wt[ch.expert as usize] += ch.weight / PROMPT_LEN as f32;
            }
            let (g, u, d) = merge_f32(&experts, &wt, Mass::of(&c.router));
            let (b, m) = pack(&g, &u, &d, i, h, DType::F32);
            let s = error_of(model, l, ExpertRef { bytes: &b, mlp: &m }, std::slice::from_ref(w), PROMPT_LEN)?;
            sums.0 += s.0;
            sums.1 += s.1;
        }
        if sums.1 > 0.0 {
            out.push((l, rel(sums)));
        }
    }
    Ok(out)
}

/// The `merge.*` metadata entries for these merges.
pub fn merge_metadata(tasks: &[TaskMerges], prompt: &[(usize, f64)], weighting: Weighting) -> Vec<(String, Owned)> {
    let mut v = vec![(merge_keys::TASKS.to_string(), Owned::Strs(tasks.iter().map(|t| t.name.clone()).collect()))];
    for t in tasks {
        let key = |f: &str| merge_keys::task(&t.name, f);
        v.push((key("layers"), Owned::U64s(t.layers.iter().map(|l| l.layer as u64).collect())));
        v.push((
            key("weights"),
            Owned::F64s(t.layers.iter().flat_map(|l| l.weights.iter().map(|&w| f64::from(w))).collect()),
        ));
        v.push((key("errors"), Owned::F64s(t.layers.iter().map(|l| l.error).collect())));
        if t.layers.iter().all(|l| l.error_unaligned.is_some()) && !t.layers.is_empty() {
            v.push((key("errors_unaligned"), Owned::F64s(t.layers.iter().filter_map(|l| l.error_unaligned).collect())));
        }
        v.push((key("tokens"), Owned::U64(t.tokens)));
        v.push((key("weighting"), Owned::Str(weighting.name().into())));
    }
    if !prompt.is_empty() {
        v.push((merge_keys::PROMPT_LAYERS.into(), Owned::U64s(prompt.iter().map(|p| p.0 as u64).collect())));
        v.push((merge_keys::PROMPT_ERRORS.into(), Owned::F64s(prompt.iter().map(|p| p.1).collect())));
    }
    v
}

/// Reads the alignment orders back from a file's metadata (`None` if it is not aligned).
///
/// # Errors
/// An order entry of the wrong size or not a permutation.
pub fn read_orders(model: &Model) -> Result<Option<Orders>> {
    let file = model.file()?;
    if file.metadata.get(merge_keys::ALIGNED) != Some(&MetaValue::Bool(true)) {
        return Ok(None);
    }
    let c = model.config();
    let (e, i) = (c.router.num_experts, c.expert_intermediate_size);
    let mut orders = Orders::new();
    for l in model.moe_layers() {
        let key = merge_keys::align_order(l);
        let Some(MetaValue::Bytes(b)) = file.metadata.get(&key) else { bail!("{key}: missing or not bytes") };
        ensure!(b.len() == e * i * 4, "{key}: {} bytes, expected {}", b.len(), e * i * 4);
        let all: Vec<u32> = b.chunks_exact(4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect();
        let per: Vec<Vec<u32>> = all.chunks(i).map(<[u32]>::to_vec).collect();
        ensure!(per.iter().all(|o| crate::align::is_permutation(o, i)), "{key}: not a permutation");
        orders.insert(l, per);
    }
    Ok(Some(orders))
}

/// The first pass of a two-pass conversion: an f32 conversion of `dir` (aligned when `align`)
/// in a temporary file beside `out`, removed when the returned path is dropped (on success,
/// error and cancellation alike).
///
/// # Errors
/// As [`crate::convert::convert_single`]; the temporary file cannot be created.
pub(crate) fn first_pass(
    dir: &Path,
    out: &Path,
    align: bool,
    cancel: &AtomicBool,
) -> Result<(tempfile::TempPath, Summary)> {
    let first_opts = Options { experts: DType::F32, dense: DType::F32, align };
    let dir_out = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Created exclusively under an unpredictable name (as the output's temporary file).
    let first = tempfile::Builder::new()
        .prefix(&format!(".{name}.calibration-"))
        .suffix(".meo")
        .tempfile_in(dir_out)
        .with_context(|| format!("{}: cannot create the calibration file", dir_out.display()))?
        .into_temp_path();
    let summary = crate::convert::convert_single(dir, &first, first_opts, cancel, |_| {})?;
    Ok((first, summary))
}

/// The tokenizer embedded in a first-pass file (needed to tokenize calibration text).
///
/// # Errors
/// The checkpoint had no `tokenizer.json`, or it does not load.
pub(crate) fn file_tokenizer(model: &Model, dir: &Path) -> Result<meo::tokenizer::Tokenizer> {
    let tok_json = match model.file()?.metadata.get(TOKENIZER_KEY) {
        Some(MetaValue::Str(s)) => (*s).to_string(),
        _ => bail!(
            "--task, --calib and --compress need the checkpoint's tokenizer.json to tokenize the calibration text; \
             {} has none",
            dir.display()
        ),
    };
    meo::tokenizer::Tokenizer::from_json(&tok_json).map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))
}

/// [`crate::convert::convert_with`] with at least one task.
///
/// # Errors
/// As [`crate::convert::convert_with`].
pub fn convert_with_tasks(
    dir: &Path,
    out: &Path,
    opts: Options,
    spec: &MergeSpec,
    cancel: &AtomicBool,
    mut progress: impl FnMut(Event<'_>),
) -> Result<Summary> {
    // Everything about the tasks (and the output path) is checked before any output exists.
    crate::convert::check_output(out)?;
    let calib_text = match &spec.calib {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--calib: cannot read calibration text {}", p.display()))?,
        ),
        None => None,
    };
    let mut texts = Vec::new();
    for (j, t) in spec.tasks.iter().enumerate() {
        ensure!(names::valid_task_name(&t.name), "task name {:?}: use 1-64 characters of [A-Za-z0-9_-]", t.name);
        ensure!(!spec.tasks[..j].iter().any(|o| o.name == t.name), "task {:?} given twice", t.name);
        let text = std::fs::read_to_string(&t.text)
            .with_context(|| format!("task {}: cannot read calibration text {}", t.name, t.text.display()))?;
        texts.push(text);
    }
    let (first, first_summary) = first_pass(dir, out, opts.align, cancel)?;
    let model = Model::open(&first).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Stored task merges are SiLU-gated experts (the task tensors name gate, up, down).
    ensure!(
        spec.tasks.is_empty() || model.config().recipe.ffn_activation.gated() || model.moe_layers().next().is_none(),
        "--task: task merges of ungated ({:?}) experts are not supported",
        model.config().recipe.ffn_activation
    );
    let tok = file_tokenizer(&model, dir)?;
    let stats = match (&calib_text, &spec.calib) {
        (Some(text), Some(path)) => {
            let ids = tok.encode(text).map_err(|e| anyhow::anyhow!("--calib {}: {e}", path.display()))?;
            ensure!(!ids.is_empty(), "--calib: the calibration text {} has no tokens", path.display());
            Some(crate::calib::collect(&model, &ids, cancel)?)
        }
        _ => None,
    };
    let orders = read_orders(&model)?;
    let mut tasks = Vec::new();
    let mut recs = Vec::new();
    for (t, text) in spec.tasks.iter().zip(&texts) {
        let ids = tok.encode(text).map_err(|e| anyhow::anyhow!("task {}: {e}", t.name))?;
        ensure!(!ids.is_empty(), "task {}: the calibration text {} has no tokens", t.name, t.text.display());
        let r = calibrate(&model, &ids, cancel)?;
        tasks.push(task_merges(&model, &t.name, &r, orders.as_ref(), spec.weighting, opts.experts, cancel)?);
        recs.push(r);
    }
    let prompt = prompt_errors(&model, &recs, cancel)?;

    // Final pass: the first-pass tensors re-encoded, then the task slabs.
    let file = model.file()?;
    let cfg = model.config();
    let roles: BTreeMap<String, DType> =
        canonical::tensors(cfg).into_iter().map(|c| (c.name.clone(), c.dtype(opts.dense, opts.experts))).collect();
    // Routed expert matrices by name: (layer, expert, part), for the calibrated encoding.
    let experts: BTreeMap<String, (usize, usize, &str)> = model
        .moe_layers()
        .flat_map(|l| (0..cfg.router.num_experts).map(move |e| (l, e)))
        .flat_map(|(l, e)| names::EXPERT_PARTS.map(|p| (names::expert(l, e, p), (l, e, p))))
        .collect();
    let hot: BTreeMap<usize, Vec<bool>> = match &stats {
        Some(s) if spec.hot_experts > 0.0 => model.moe_layers().map(|l| (l, s.hot(l, spec.hot_experts))).collect(),
        _ => BTreeMap::new(),
    };
    let mut specs: Vec<TensorSpec> = Vec::new();
    for t in file.tensors() {
        let mut dtype =
            *roles.get(t.name).with_context(|| format!("unexpected tensor {} in the calibration file", t.name))?;
        if let Some(&(l, e, _)) = experts.get(t.name)
            && hot.get(&l).and_then(|h| h.get(e)).copied().unwrap_or(false)
        {
            dtype = DType::Q8_0;
        }
        specs.push(TensorSpec { name: t.name.into(), dtype, shape: t.shape().to_vec() });
    }
    let (h, i) = (cfg.hidden_size as u64, cfg.expert_intermediate_size as u64);
    for t in &tasks {
        for lm in &t.layers {
            for part in names::EXPERT_PARTS {
                let shape = if part == "down" { vec![h, i] } else { vec![i, h] };
                specs.push(TensorSpec {
                    name: names::task_expert(&t.name, lm.layer, part),
                    dtype: opts.experts,
                    shape,
                });
            }
        }
    }
    let mut extra = merge_metadata(&tasks, &prompt, spec.weighting);
    if let Some(s) = &stats {
        extra.push(("quant.calibration.tokens".into(), Owned::U64(s.tokens)));
        if spec.hot_experts > 0.0 {
            extra.push(("quant.hot_experts".into(), Owned::F64s(vec![spec.hot_experts])));
            extra.push(("quant.hot_share".into(), Owned::F64s(vec![s.hot_share(spec.hot_experts)])));
        }
    }
    let mut entries: Vec<(&str, MetaValue<'_>)> = file
        .metadata
        .entries()
        .iter()
        .filter(|(k, _)| {
            !matches!(*k, "quant.experts" | "quant.dense") && !k.starts_with("merge.task") && *k != merge_keys::TASKS
        })
        .cloned()
        .collect();
    entries.push(("quant.experts", MetaValue::Str(opts.experts.name())));
    entries.push(("quant.dense", MetaValue::Str(opts.dense.name())));
    entries.extend(extra.iter().map(|(k, v)| (k.as_str(), v.value())));
    let meta = Metadata::from_entries(entries);

    let data_bytes: u64 = specs.iter().map(|s| s.dtype.byte_len(&s.shape).unwrap_or(0)).sum();
    let (atomic, f) =
        AtomicFile::create(out).with_context(|| format!("{}: cannot create the output file", out.display()))?;
    let tmp = atomic.tmp_path().display().to_string();
    let io = |e: WriteError| anyhow::Error::new(e).context(format!("writing {tmp}"));
    let mut w =
        MeoWriter::new(BufWriter::with_capacity(1 << 20, f), &meta, specs.clone(), DEFAULT_ALIGNMENT).map_err(io)?;
    progress(Event::Start { tensors: specs.len(), bytes: data_bytes });
    let mut spec_iter = specs.iter();
    for t in file.tensors() {
        check_cancel(cancel)?;
        let s = spec_iter.next().expect("one spec per tensor");
        let values: Vec<f32> =
            file.data(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let importance = match (&stats, experts.get(t.name)) {
            (Some(st), Some(&(l, e, part))) => st.importance(l, e, part),
            _ => None,
        };
        let bytes = encode_with(&values, &s.shape, s.dtype, importance.as_deref());
        w.write_tensor(&bytes).map_err(io)?;
        progress(Event::Tensor { name: &s.name, bytes: bytes.len() as u64 });
    }
    for t in &tasks {
        for lm in &t.layers {
            let m = &lm.merged;
            for r in m.mlp.gate.iter().chain([&m.mlp.up, &m.mlp.down]).map(|m| &m.range) {
                let s = spec_iter.next().expect("one spec per task tensor");
                w.write_tensor(&m.bytes[r.clone()]).map_err(io)?;
                progress(Event::Tensor { name: &s.name, bytes: r.len() as u64 });
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_specs_parse() {
        let t: TaskSpec = "code=calib/py.txt".parse().unwrap();
        assert_eq!(t, TaskSpec { name: "code".into(), text: "calib/py.txt".into() });
        assert!("bad name=x".parse::<TaskSpec>().is_err());
        assert!("x".parse::<TaskSpec>().is_err());
        assert!("x=".parse::<TaskSpec>().is_err());
        assert!("a.b=x".parse::<TaskSpec>().is_err());
    }
}
