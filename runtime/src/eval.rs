//! How far a routing mode is from vanilla on real text: what `meo eval` and the Python
//! package's `Model.eval` report.
//!
//! The text is tokenized with the file's tokenizer and cut into windows of
//! [`EvalOptions::window`] tokens. In each window the first [`EvalOptions::prompt_len`] tokens
//! are the prompt (fed as one call: in prompt mode that is the vanilla pass the merge is pooled
//! from) and the rest the continuation (a second call, teacher-forced: what decoding computes).
//! Every metric is over the continuation's next-token predictions, for the mode and for
//! vanilla on the same positions:
//!
//! - perplexity (`exp` of the mean negative log-likelihood), mode and vanilla;
//! - next-token agreement: argmax of the mode's logits equals vanilla's;
//! - KL(vanilla ‖ mode), mean nats per token;
//! - merge error per merged layer: `‖E_merged(x) − Σ g_i E_i(x)‖_F / ‖Σ g_i E_i(x)‖_F` over the
//!   continuation tokens, `x` being vanilla's input of that layer and `g` vanilla's routing
//!   (each layer's own error, not compounded through earlier merged layers);
//! - expert bytes per token: mean over continuation tokens of the bytes of the distinct expert
//!   slabs that token's forward pass read (a merged layer counts its merged expert), for the
//!   mode and for vanilla.

use crate::route::Choice;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::{
    FormatError, ForwardError, KvOptions, Logits, MergeOptions, MergedUse, ModeError, Model, OnMiss, Session,
    SessionError, SessionOptions, Trace,
};
use std::collections::BTreeMap;
use std::string::String;
use std::vec::Vec;

/// How the text is cut and scored; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Tokens per window (at most the model's context).
    pub window: usize,
    /// Prompt tokens at the start of each window (not scored).
    pub prompt_len: usize,
    /// Evaluate at most this many windows (0 = all).
    pub max_windows: usize,
    /// Worker threads (0 = one per physical core).
    pub threads: usize,
    /// How the evaluated session stores its KV cache (the reference session's is f32).
    pub kv: KvOptions,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { window: 128, prompt_len: 32, max_windows: 0, threads: 0, kv: KvOptions::default() }
    }
}

/// What an evaluation measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The mode's spelling (`vanilla`, `prompt`, `task:NAME`).
    pub mode: String,
    pub merged_layers: Vec<usize>,
    pub windows: usize,
    pub scored_tokens: usize,
    pub perplexity: f64,
    pub vanilla_perplexity: f64,
    pub agreement: f64,
    pub kl: f64,
    /// Per merged layer.
    pub merge_error: BTreeMap<usize, f64>,
    pub expert_bytes_per_token: f64,
    pub vanilla_expert_bytes_per_token: f64,
    /// The on-miss fallback's spelling (`exact` unless [`evaluate_with`] set one), and the
    /// token choices per scored token it served instead of a missed expert.
    pub on_miss: String,
    pub fallbacks_per_token: f64,
}

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(
        "the window ({window} tokens, at most the context) must exceed the prompt length ({prompt_len}) by 2 or more, \
         and the prompt length be >= 1"
    )]
    BadWindow { window: usize, prompt_len: usize },
    #[error("the text has {tokens} tokens: too few for one window of more than {need} tokens")]
    TooShort { tokens: usize, need: usize },
    #[error("the reference model has a vocabulary of {reference} tokens, the model {model}")]
    ReferenceVocab { reference: usize, model: usize },
}

/// Per-layer router inputs and routing of the positions `from..` of one forward call.
#[derive(Default)]
struct Capture {
    from: usize,
    x: BTreeMap<usize, Vec<f32>>,
    routes: BTreeMap<usize, Vec<Choice>>,
    h: usize,
}

impl Trace for Capture {
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        let skip = self.from.saturating_sub(pos0) * self.h;
        self.x.entry(layer).or_default().extend_from_slice(&x[skip.min(x.len())..]);
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        if pos >= self.from {
            self.routes.entry(layer).or_default().extend_from_slice(choices);
        }
    }
}

/// Bytes of expert weights read, summed over tokens.
struct Bytes<'m> {
    model: &'m Model,
    total: u64,
    /// MEO-native layers (their unmerged banks report selections per call, not routes).
    meo: Vec<usize>,
    /// Tokens of the current call.
    tokens: usize,
    /// Token choices served by an on-miss fallback (their expert is not read).
    fallbacks: u64,
}

impl<'m> Bytes<'m> {
    fn new(model: &'m Model, tokens: usize) -> Self {
        Self { model, total: 0, meo: model.meo_layers().collect(), tokens, fallbacks: 0 }
    }
}

impl Trace for Bytes<'_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        // An MEO bank run unmerged reads its k experts for every token; slot b·E + e.
        if self.meo.contains(&layer) {
            let n = self.model.config().router.num_experts;
            for &s in experts {
                let s = s as usize;
                if let Some(r) = self.model.bank_expert_slab(layer, s / n, s % n) {
                    self.total += (r.len() * self.tokens) as u64;
                }
            }
        }
    }
    fn on_route(&mut self, layer: usize, _pos: usize, choices: &[Choice]) {
        for c in choices {
            if c.weight != 0.0
                && let Some(r) = self.model.expert_slab(layer, c.expert as usize)
            {
                self.total += r.len() as u64;
            }
        }
    }
    fn on_merged(&mut self, _layer: usize, tokens: usize, expert: &MergedUse) {
        self.total += (expert.bytes() * tokens) as u64;
    }
    fn on_fallback(&mut self, _layer: usize, _missed: &[u32], choices: usize) {
        self.fallbacks += choices as u64;
    }
}

/// Sends the routing to two observers.
struct Both<'a>(&'a mut dyn Trace, &'a mut dyn Trace);

impl Trace for Both<'_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.0.on_experts_selected(layer, experts);
        self.1.on_experts_selected(layer, experts);
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        self.0.on_route(layer, pos, choices);
        self.1.on_route(layer, pos, choices);
    }
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        self.0.on_moe_input(layer, pos0, x);
        self.1.on_moe_input(layer, pos0, x);
    }
    fn on_merged(&mut self, layer: usize, tokens: usize, expert: &MergedUse) {
        self.0.on_merged(layer, tokens, expert);
        self.1.on_merged(layer, tokens, expert);
    }
    fn on_experts_predicted(&mut self, from: usize, layer: usize, experts: &[u32]) {
        self.0.on_experts_predicted(from, layer, experts);
        self.1.on_experts_predicted(from, layer, experts);
    }
    fn wants_prediction(&self) -> bool {
        self.0.wants_prediction() || self.1.wants_prediction()
    }
    // Residency comes from the first observer (the one that tracks it).
    fn resident_experts(&mut self, layer: usize, resident: &mut Vec<bool>) -> bool {
        self.0.resident_experts(layer, resident)
    }
    fn on_fallback(&mut self, layer: usize, missed: &[u32], choices: usize) {
        self.0.on_fallback(layer, missed, choices);
        self.1.on_fallback(layer, missed, choices);
    }
}

/// The full log-softmax of `row`, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// Evaluates routing mode `mode` of `model` against vanilla on `text`.
///
/// # Errors
/// No tokenizer in the file, a mode the model refuses, a window that does not exceed the
/// prompt length by 2, text too short for one window, or a forward pass refused.
pub fn evaluate(model: &Model, text: &str, mode: &MergeOptions, o: &EvalOptions) -> Result<Report, EvalError> {
    evaluate_against(model, None, text, mode, o)
}

/// [`evaluate`], with the vanilla baseline run by `reference` instead of `model` when given
/// (e.g. the uncompressed conversion of a `--compress`ed file; same tokenizer and
/// vocabulary). Per-layer merge errors are measured only without a reference (they compare a
/// merged layer with the same file's vanilla inputs).
///
/// # Errors
/// As [`evaluate`]; a reference with another vocabulary size.
pub fn evaluate_against(
    model: &Model,
    reference: Option<&Model>,
    text: &str,
    mode: &MergeOptions,
    o: &EvalOptions,
) -> Result<Report, EvalError> {
    evaluate_with(model, reference, text, mode, &OnMiss::Exact, &mut crate::NoTrace, o)
}

/// [`evaluate_against`], the mode's session running with on-miss fallback `on_miss`
/// ([`Session::set_on_miss`]) and every one of its forward calls observed by `residency`
/// (e.g. an [`ExpertTracker`](crate::residency::ExpertTracker) with a budget: what is resident
/// follows from its bookkeeping, so the figures are the same on every run).
///
/// # Errors
/// As [`evaluate_against`]; a `Merged` fallback the file has no merged experts for.
pub fn evaluate_with(
    model: &Model,
    reference: Option<&Model>,
    text: &str,
    mode: &MergeOptions,
    on_miss: &OnMiss,
    residency: &mut dyn Trace,
    o: &EvalOptions,
) -> Result<Report, EvalError> {
    let cfg = model.config();
    let ref_model = reference.unwrap_or(model);
    if ref_model.config().vocab_size != cfg.vocab_size {
        return Err(EvalError::ReferenceVocab { reference: ref_model.config().vocab_size, model: cfg.vocab_size });
    }
    let tok = Tokenizer::from_metadata(&model.file()?.metadata)?;
    let ids = tok.encode(text)?;
    let opts = SessionOptions { threads: o.threads, ..SessionOptions::default() };
    let mut van = Session::new(ref_model, opts)?;
    // Explicitly vanilla: for an MEO-native model that is its gates run unmerged.
    van.set_mode(MergeOptions::default())?;
    let mut ses = Session::new(model, SessionOptions { kv: o.kv, ..opts })?;
    let merged_layers = ses.set_mode(mode.clone())?;
    ses.set_on_miss(on_miss.clone())?;
    let win = o.window.min(van.max_context());
    let p = o.prompt_len;
    if p == 0 || win < p + 2 {
        return Err(EvalError::BadWindow { window: win, prompt_len: p });
    }
    let mut windows: Vec<&[u32]> = ids.chunks(win).filter(|w| w.len() >= p + 2).collect();
    if o.max_windows > 0 {
        windows.truncate(o.max_windows);
    }
    if windows.is_empty() {
        return Err(EvalError::TooShort { tokens: ids.len(), need: p + 1 });
    }
    let (h, k, v) = (cfg.hidden_size, cfg.router.top_k, cfg.vocab_size);
    let (mut nll, mut nll_v, mut kl, mut agree, mut n) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    let mut err: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    let (mut bytes, mut bytes_v, mut bytes_tokens, mut fallbacks) = (0u64, 0u64, 0usize, 0u64);
    for w in &windows {
        let t = w.len();
        // Vanilla, capturing each MoE layer's input and routing on the continuation.
        van.reset();
        let mut cap = Capture { from: p, h, ..Default::default() };
        let mut bv = Bytes::new(ref_model, t - p);
        van.forward_with(&w[..p], Logits::Last, &mut cap)?;
        let lv = van.forward_with(&w[p..], Logits::All, &mut Both(&mut cap, &mut bv))?.to_vec();
        // The mode.
        ses.reset();
        ses.forward_with(&w[..p], Logits::Last, &mut *residency)?;
        let mut bm = Bytes::new(model, t - p);
        let lm = ses.forward_with(&w[p..], Logits::All, &mut Both(&mut *residency, &mut bm))?.to_vec();
        bytes += bm.total;
        fallbacks += bm.fallbacks;
        bytes_v += bv.total;
        bytes_tokens += t - p;
        // Row r predicts token p + r + 1.
        for r in 0..t - p - 1 {
            let target = w[p + r + 1] as usize;
            let (a_m, a_v) = (log_softmax(&lm[r * v..][..v]), log_softmax(&lv[r * v..][..v]));
            nll -= a_m[target];
            nll_v -= a_v[target];
            kl += a_v.iter().zip(&a_m).map(|(&x, &y)| x.exp() * (x - y)).sum::<f64>();
            let am = crate::sample::argmax(&lm[r * v..][..v]);
            let av = crate::sample::argmax(&lv[r * v..][..v]);
            agree += usize::from(am == av);
            n += 1;
        }
        // Per-layer merge error on vanilla's inputs.
        let m = t - p;
        for &l in merged_layers.iter().filter(|_| reference.is_none()) {
            let (Some(x), Some(ch), Some(ex)) = (cap.x.get(&l), cap.routes.get(&l), ses.merged_expert(l)) else {
                continue;
            };
            if x.len() != m * h || ch.len() != m * k {
                continue;
            }
            let mut mix = vec![0.0; m * h];
            model.mixture(l, x, m, ch, &mut mix)?;
            let mut y = vec![0.0; m * h];
            model.run_expert(ex, x, m, &mut y);
            let s = crate::merge::error_sums(&y, &mix);
            let e = err.entry(l).or_default();
            e.0 += s.0;
            e.1 += s.1;
        }
    }
    let nf = n.max(1) as f64;
    let bt = bytes_tokens.max(1) as f64;
    Ok(Report {
        mode: mode.mode.spelling(),
        merged_layers,
        windows: windows.len(),
        scored_tokens: n,
        perplexity: (nll / nf).exp(),
        vanilla_perplexity: (nll_v / nf).exp(),
        agreement: agree as f64 / nf,
        kl: kl / nf,
        merge_error: err.into_iter().map(|(l, (a, b))| (l, if b > 0.0 { (a / b).sqrt() } else { 0.0 })).collect(),
        expert_bytes_per_token: bytes as f64 / bt,
        vanilla_expert_bytes_per_token: bytes_v as f64 / bt,
        on_miss: on_miss.spelling(),
        fallbacks_per_token: fallbacks as f64 / bt,
    })
}
