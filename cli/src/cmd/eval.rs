//! `meo eval FILE --data TEXT [--mode …] [--merge-layers …] [--json]`: how far a routing mode
//! is from vanilla on real text.
//!
//! The text is tokenized with the file's tokenizer and cut into windows of `--window` tokens.
//! In each window the first `--prompt-len` tokens are the prompt (fed as one call: in prompt
//! mode that is the vanilla pass the merge is pooled from) and the rest the continuation (a
//! second call, teacher-forced: what decoding computes). Every metric is over the
//! continuation's next-token predictions, for the mode and for vanilla on the same positions:
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

use super::mode::ModeArgs;
use super::{human_bytes, open_model};
use anyhow::{Context, Result, bail};
use meo::route::Choice;
use meo::tokenizer::Tokenizer;
use meo::{Logits, MergedUse, Model, Session, SessionOptions, Trace};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Measure a routing mode against vanilla on a text file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
    /// A UTF-8 text file to evaluate on.
    #[arg(long, value_name = "TEXT")]
    pub data: PathBuf,
    #[command(flatten)]
    pub mode: ModeArgs,
    /// Tokens per window (at most the model's context).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub window: usize,
    /// Prompt tokens at the start of each window (not scored).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub prompt_len: usize,
    /// Evaluate at most this many windows (0 = all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_windows: usize,
    /// Worker threads (0 = one per physical core; logical CPUs where the OS does not say).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compare against vanilla routing of this file instead of FILE's own (e.g. the
    /// uncompressed conversion of a `--compress`ed FILE); same tokenizer and vocabulary.
    #[arg(long, value_name = "REFERENCE.meo")]
    pub reference: Option<PathBuf>,
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
}

impl<'m> Bytes<'m> {
    fn new(model: &'m Model, tokens: usize) -> Self {
        Self { model, total: 0, meo: model.meo_layers().collect(), tokens }
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
}

/// `log softmax(row)[i]` and the full log-softmax, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// What `meo eval` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
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
}

/// Runs the evaluation.
///
/// # Errors
/// Unreadable model or text, no tokenizer in the file, a mode the model refuses, or text too
/// short for one window.
pub fn evaluate(a: &Args) -> Result<Report> {
    let model = open_model(&a.file)?;
    let cfg = model.config().clone();
    let text = std::fs::read_to_string(&a.data).with_context(|| format!("cannot read {}", a.data.display()))?;
    let tok = Tokenizer::from_metadata(&model.file()?.metadata)?;
    let ids = tok.encode(&text)?;
    let opts = SessionOptions { threads: a.threads, max_context: 0 };
    let reference = a.reference.as_deref().map(open_model).transpose()?;
    let ref_model = reference.as_ref().unwrap_or(&model);
    if ref_model.config().vocab_size != cfg.vocab_size {
        bail!(
            "--reference has a vocabulary of {} tokens, {} has {}",
            ref_model.config().vocab_size,
            a.file.display(),
            cfg.vocab_size
        );
    }
    let mut van = Session::new(ref_model, opts)?;
    // Explicitly vanilla: for an MEO-native model that is its gates run unmerged.
    van.set_mode(meo::MergeOptions::default())?;
    let mut ses = Session::new(&model, opts)?;
    let merged_layers = a.mode.apply(&mut ses)?;
    let win = a.window.min(van.max_context());
    let p = a.prompt_len;
    if p == 0 || win < p + 2 {
        bail!(
            "--window ({win}, at most the context) must exceed --prompt-len ({p}) by 2 or more, and --prompt-len be >= 1"
        );
    }
    let mut windows: Vec<&[u32]> = ids.chunks(win).filter(|w| w.len() >= p + 2).collect();
    if a.max_windows > 0 {
        windows.truncate(a.max_windows);
    }
    if windows.is_empty() {
        bail!("{} has {} tokens: too few for one window of more than {} tokens", a.data.display(), ids.len(), p + 1);
    }
    let (h, k, v) = (cfg.hidden_size, cfg.router.top_k, cfg.vocab_size);
    let (mut nll, mut nll_v, mut kl, mut agree, mut n) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    let mut err: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    let (mut bytes, mut bytes_v, mut bytes_tokens) = (0u64, 0u64, 0usize);
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
        ses.forward_with(&w[..p], Logits::Last, &mut meo::NoTrace)?;
        let mut bm = Bytes::new(&model, t - p);
        let lm = ses.forward_with(&w[p..], Logits::All, &mut bm)?.to_vec();
        bytes += bm.total;
        bytes_v += bv.total;
        bytes_tokens += t - p;
        // Row r predicts token p + r + 1.
        for r in 0..t - p - 1 {
            let target = w[p + r + 1] as usize;
            let (a_m, a_v) = (log_softmax(&lm[r * v..][..v]), log_softmax(&lv[r * v..][..v]));
            nll -= a_m[target];
            nll_v -= a_v[target];
            kl += a_v.iter().zip(&a_m).map(|(&x, &y)| x.exp() * (x - y)).sum::<f64>();
            let am = meo::sample::argmax(&lm[r * v..][..v]);
            let av = meo::sample::argmax(&lv[r * v..][..v]);
            agree += usize::from(am == av);
            n += 1;
        }
        // Per-layer merge error on vanilla's inputs (of this file: not with a reference).
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
            let s = meo::merge::error_sums(&y, &mix);
            let e = err.entry(l).or_default();
            e.0 += s.0;
            e.1 += s.1;
        }
    }
    let nf = n.max(1) as f64;
    let bt = bytes_tokens.max(1) as f64;
    Ok(Report {
        mode: a.mode.options(ses.model())?.mode.spelling(),
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
    })
}

/// Runs `meo eval`.
///
/// # Errors
/// As [`evaluate`].
pub fn run(a: &Args) -> Result<()> {
    let r = evaluate(a)?;
    if a.json {
        let v = json!({
            "file": a.file.display().to_string(),
            "data": a.data.display().to_string(),
            "reference": a.reference.as_ref().map(|r| r.display().to_string()),
            "mode": r.mode,
            "prompt_pool": match a.mode.prompt_pool { super::mode::PoolArg::MeanGate => "mean-gate", super::mode::PoolArg::PooledInput => "pooled-input" },
            "merge_layers_arg": a.mode.merge_layers,
            "merge_budget": a.mode.merge_budget,
            "merged_layers": r.merged_layers,
            "window": a.window,
            "prompt_len": a.prompt_len,
            "windows": r.windows,
            "scored_tokens": r.scored_tokens,
            "perplexity": r.perplexity,
            "vanilla_perplexity": r.vanilla_perplexity,
            "next_token_agreement": r.agreement,
            "kl_vs_vanilla": r.kl,
            "merge_error_per_layer": r.merge_error.iter().map(|(l, e)| (l.to_string(), json!(e))).collect::<serde_json::Map<_, _>>(),
            "expert_bytes_per_token": r.expert_bytes_per_token,
            "vanilla_expert_bytes_per_token": r.vanilla_expert_bytes_per_token,
        });
        super::print_stdout(&format!("{v}\n"))
    } else {
        let errs: Vec<String> = r.merge_error.iter().map(|(l, e)| format!("L{l} {e:.4}")).collect();
        super::print_stdout(&format!(
            "mode: {} (merged layers: {:?})\n\
             windows: {} ({} scored tokens)\n\
             perplexity: {:.4} (vanilla {:.4})\n\
             next-token agreement with vanilla: {:.4}\n\
             KL(vanilla || mode): {:.5} nats/token\n\
             merge error per layer: {}\n\
             expert bytes per token: {} (vanilla {})\n",
            r.mode,
            r.merged_layers,
            r.windows,
            r.scored_tokens,
            r.perplexity,
            r.vanilla_perplexity,
            r.agreement,
            r.kl,
            if errs.is_empty() { "-".into() } else { errs.join(", ") },
            human_bytes(r.expert_bytes_per_token as u64),
            human_bytes(r.vanilla_expert_bytes_per_token as u64),
        ))
    }
}
