//! `meo eval FILE --data TEXT [--mode …] [--merge-layers …] [--json]`: how far a routing mode
//! is from vanilla on real text. The measurement is [`meo::eval`] (the Python package's
//! `Model.eval` calls it too); its docs define every metric.

use super::mode::ModeArgs;
use super::{human_bytes, open_model};
use anyhow::{Context, Result};
pub use meo::eval::Report;
use meo::eval::{EvalError, EvalOptions};
use serde_json::json;
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
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
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
    /// Residency flags: with `--on-miss merged|resident` and a `--memory-budget` in bytes, the
    /// mode runs with that fallback under that budget (what is resident follows from the
    /// budget's bookkeeping, so the figures repeat).
    #[command(flatten)]
    pub memory: super::memory::MemoryArgs,
}

/// Runs the evaluation ([`meo::eval::evaluate_against`] with these flags).
///
/// # Errors
/// Unreadable model or text, no tokenizer in the file, a mode the model refuses, or text too
/// short for one window.
pub fn evaluate(a: &Args) -> Result<Report> {
    let model = open_model(&a.file)?;
    let reference = a.reference.as_deref().map(open_model).transpose()?;
    let text = std::fs::read_to_string(&a.data).with_context(|| format!("cannot read {}", a.data.display()))?;
    let mode = a.mode.options(&model)?;
    let opts = EvalOptions {
        window: a.window,
        prompt_len: a.prompt_len,
        max_windows: a.max_windows,
        threads: a.threads,
        kv: a.kv.options(),
    };
    let on_miss = &a.memory.on_miss;
    let mut tracker = if on_miss.approximate() {
        if !a.memory.explicit() {
            anyhow::bail!("--on-miss {} needs --memory-budget BYTES (what is resident)", on_miss.spelling());
        }
        Some(meo::residency::ExpertTracker::for_model(&model, a.memory.tracker_options())?)
    } else {
        None
    };
    let residency: &mut dyn meo::Trace = match &mut tracker {
        Some(t) => t,
        None => &mut meo::NoTrace,
    };
    // The library's messages, in the flags' and the file's names.
    meo::eval::evaluate_with(&model, reference.as_ref(), &text, &mode, on_miss, residency, &opts).map_err(|e| match e {
        EvalError::BadWindow { window, prompt_len } => anyhow::anyhow!(
            "--window ({window}, at most the context) must exceed --prompt-len ({prompt_len}) by 2 or more, and \
             --prompt-len be >= 1"
        ),
        EvalError::TooShort { tokens, need } => anyhow::anyhow!(
            "{} has {tokens} tokens: too few for one window of more than {need} tokens",
            a.data.display()
        ),
        EvalError::ReferenceVocab { reference: r, model: m } => {
            anyhow::anyhow!("--reference has a vocabulary of {r} tokens, {} has {m}", a.file.display())
        }
        e => e.into(),
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
            "kv_dtype": a.kv.kv.name(),
            "mla_cache": a.kv.mla_cache.name(),
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
            "on_miss": r.on_miss,
            "approximate": r.on_miss != "exact",
            "memory_budget": a.memory.budget().filter(|_| r.on_miss != "exact"),
            "fallbacks_per_token": r.fallbacks_per_token,
        });
        super::print_stdout(&format!("{v}\n"))
    } else {
        let errs: Vec<String> = r.merge_error.iter().map(|(l, e)| format!("L{l} {e:.4}")).collect();
        super::print_stdout(&format!(
            "mode: {} (merged layers: {:?}), KV cache {}\n\
             windows: {} ({} scored tokens)\n\
             perplexity: {:.4} (vanilla {:.4})\n\
             next-token agreement with vanilla: {:.4}\n\
             KL(vanilla || mode): {:.5} nats/token\n\
             merge error per layer: {}\n\
             expert bytes per token: {} (vanilla {})\n\
             on miss: {} ({:.3} fallbacks per token)\n",
            r.mode,
            r.merged_layers,
            a.kv.kv,
            r.windows,
            r.scored_tokens,
            r.perplexity,
            r.vanilla_perplexity,
            r.agreement,
            r.kl,
            if errs.is_empty() { "-".into() } else { errs.join(", ") },
            human_bytes(r.expert_bytes_per_token as u64),
            human_bytes(r.vanilla_expert_bytes_per_token as u64),
            r.on_miss,
            r.fallbacks_per_token,
        ))
    }
}
