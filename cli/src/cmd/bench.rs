//! `meo bench FILE [--prompt-len N] [--gen N] [--threads N] [--json]`: prompt-processing and
//! decoding speed, expert traffic and memory on random (seeded) prompt tokens with greedy
//! decoding. End-of-sequence ids do not stop it. The JSON object is documented in `docs/CLI.md`.

use super::run::{Tee, human_bytes, open_model, parse_bytes, print_residency};
use anyhow::{Result, bail};
use meo::Logits;
use meo::residency::{self, ExpertTracker, TrackerOptions};
use meo::sample::{Pcg32, argmax};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Measure prompt and decode speed, expert traffic and memory.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
    /// Prompt tokens (random ids, seeded).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to decode greedily after the prompt.
    #[arg(long = "gen", value_name = "N", default_value_t = 64)]
    pub gen_tokens: usize,
    /// Worker threads (0 = one per physical core; logical CPUs where the OS does not say).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seed of the random prompt.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Drop the file from the page cache first (a cold start: experts are read from disk).
    /// No warm-up pass runs then (nor with `--memory-budget`).
    #[arg(long)]
    pub cold: bool,
    /// Untimed warm-up passes first (a prompt of the same length, other tokens, and one
    /// decode step, then a reset), as llama-bench does: the timed prompt then pays no
    /// first-touch page faults of the mapping. 0 times a fresh process's first call.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: usize,
    /// Keep at most this many bytes of expert weights mapped (as `meo run --memory-budget`).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
    #[command(flatten)]
    pub mode: super::mode::ModeArgs,
    #[command(flatten)]
    pub target: super::gpu::TargetArgs,
}

/// Counts the bytes of the merged experts a forward call read, once per call and layer (as the
/// tracker counts distinct slabs per step): a merged layer reads its merged expert instead of
/// the selected experts' slabs.
#[derive(Default)]
struct MergedBytes(u64);

impl meo::Trace for MergedBytes {
    fn on_merged(&mut self, _layer: usize, _tokens: usize, expert: &meo::MergedUse) {
        self.0 += expert.bytes() as u64;
    }
}

/// Runs `meo bench`.
///
/// # Errors
/// Bad arguments, an unreadable model, or a residency query failing.
pub fn run(a: &Args) -> Result<()> {
    if a.target.is_ort()? {
        return super::target::bench_ort(a);
    }
    if a.prompt_len == 0 {
        bail!("--prompt-len must be at least 1");
    }
    if a.cold {
        residency::drop_page_cache(&a.file)?;
    }
    let t_open = Instant::now();
    let model = open_model(&a.file)?;
    let open_time = t_open.elapsed();
    let cfg = model.config().clone();
    let file_bytes = model.bytes().len() as u64;
    let mut opened = super::gpu::open_target(&model, &a.target, a.threads)?;
    let threads = opened.threads();
    let session = opened.target();
    let merged_layers = session.set_mode(a.mode.options(&model)?)?;
    if a.prompt_len + a.gen_tokens > cfg.max_position_embeddings {
        bail!(
            "--prompt-len + --gen = {} exceeds the context of {}",
            a.prompt_len + a.gen_tokens,
            cfg.max_position_embeddings
        );
    }
    let opts = TrackerOptions { budget: a.memory_budget, ..TrackerOptions::default() };
    let mut tracker = ExpertTracker::for_model(&model, opts)?;
    let mut rng = Pcg32::seed_from_u64(a.seed);
    let vocab = cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..a.prompt_len).map(|_| ((u64::from(rng.next_u32()) * vocab) >> 32) as u32).collect();

    let warmup = if a.cold || a.memory_budget.is_some() { 0 } else { a.warmup };
    for w in 0..warmup {
        let other: Vec<u32> = prompt.iter().map(|&t| ((u64::from(t) + 1 + w as u64) % vocab) as u32).collect();
        let logits = session.forward(&other, Logits::Last, &mut meo::NoTrace)?;
        let next = argmax(logits);
        session.forward(&[next], Logits::Last, &mut meo::NoTrace)?;
        session.reset();
    }

    let mut merged = MergedBytes::default();
    let t0 = Instant::now();
    let logits = session.forward(&prompt, Logits::Last, &mut Tee(vec![&mut tracker, &mut merged]))?;
    let prompt_time = t0.elapsed();
    let prompt_expert_bytes = tracker.take_step_bytes() + std::mem::take(&mut merged.0);
    let mut next = argmax(logits);
    let mut decode_time = Duration::ZERO;
    let mut step_bytes = Vec::with_capacity(a.gen_tokens);
    let mut kv_bytes = 0u64;
    for i in 0..a.gen_tokens {
        kv_bytes += kv_bytes_read(&model, a.prompt_len + i);
        let t1 = Instant::now();
        let logits = session.forward(&[next], Logits::Last, &mut Tee(vec![&mut tracker, &mut merged]))?;
        next = argmax(logits);
        decode_time += t1.elapsed();
        step_bytes.push(tracker.take_step_bytes() + std::mem::take(&mut merged.0));
    }
    let stats = tracker.stats()?;
    let dense_bytes = dense_bytes_per_token(&model)?;
    let target = session.describe();
    let gpu_stats = opened.gpu_expert_stats();
    let peak_rss = residency::peak_rss_bytes().ok();
    let rate = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
    let prompt_tps = rate(a.prompt_len, prompt_time);
    let decode_tps = rate(a.gen_tokens, decode_time);
    let bytes_per_token =
        if step_bytes.is_empty() { 0.0 } else { step_bytes.iter().sum::<u64>() as f64 / step_bytes.len() as f64 };
    let kv_per_token = if a.gen_tokens == 0 { 0.0 } else { kv_bytes as f64 / a.gen_tokens as f64 };
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = json!({
            "file": a.file.display().to_string(),
            "file_bytes": file_bytes,
            "architecture": cfg.architecture,
            "num_layers": cfg.num_layers,
            "num_experts": cfg.router.num_experts,
            "top_k": cfg.router.top_k,
            "mode": a.mode.options(&model)?.mode.spelling(),
            "merged_layers": merged_layers,
            "threads": threads,
            "target": target,
            "gpu_expert_cache": gpu_stats,
            "cold": a.cold,
            "warmup": warmup,
            "memory_budget": a.memory_budget,
            "open_seconds": open_time.as_secs_f64(),
            "prompt_tokens": a.prompt_len,
            "prompt_seconds": prompt_time.as_secs_f64(),
            "prompt_tokens_per_s": prompt_tps,
            "prompt_expert_bytes": prompt_expert_bytes,
            "decode_tokens": a.gen_tokens,
            "decode_seconds": decode_time.as_secs_f64(),
            "decode_tokens_per_s": decode_tps,
            "expert_bytes_per_token": bytes_per_token,
            "dense_bytes_per_token": dense_bytes,
            "kv_bytes_per_token": kv_per_token,
            "bytes_per_token": dense_bytes as f64 + bytes_per_token + kv_per_token,
            "experts_touched": stats.experts_touched,
            "experts_total": stats.experts_per_layer.iter().sum::<usize>(),
            "experts_touched_per_layer": stats.experts_touched_per_layer,
            "expert_bytes_resident": stats.expert_bytes_resident,
            "expert_bytes_mapped": stats.expert_bytes_mapped,
            "expert_bytes_in_file": stats.expert_bytes_in_file,
            "released_slabs": stats.released_slabs,
            "peak_rss_bytes": peak_rss,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "{}: {} ({} layers, {} experts, top-{}), {}, on {}",
            a.file.display(),
            cfg.architecture,
            cfg.num_layers,
            cfg.router.num_experts,
            cfg.router.top_k,
            human_bytes(file_bytes),
            target
        )?;
        writeln!(out, "mode: {} (merged layers: {merged_layers:?})", a.mode.options(&model)?.mode.spelling())?;
        writeln!(
            out,
            "prompt: {} tokens in {:.3} s = {prompt_tps:.1} tokens/s",
            a.prompt_len,
            prompt_time.as_secs_f64()
        )?;
        writeln!(
            out,
            "decode: {} tokens in {:.3} s = {decode_tps:.1} tokens/s",
            a.gen_tokens,
            decode_time.as_secs_f64()
        )?;
        writeln!(
            out,
            "expert bytes per decoded token: {} (mean over decode steps)",
            human_bytes(bytes_per_token as u64)
        )?;
        writeln!(out, "dense bytes per decoded token: {}", human_bytes(dense_bytes))?;
        writeln!(
            out,
            "KV cache bytes per decoded token: {} (mean over decode steps)",
            human_bytes(kv_per_token as u64)
        )?;
        print_residency(&mut out, &stats, file_bytes)?;
        if let Some(g) = gpu_stats {
            writeln!(out, "gpu expert cache: {g}")?;
        }
    }
    Ok(())
}

/// Bytes of cached keys and values the attention reads for the query at position `pos`: f32,
/// as the CPU target caches them, and only the window of a sliding-window layer.
fn kv_bytes_read(model: &meo::Model, pos: usize) -> u64 {
    use meo::model::plan::Attention;
    let per_layer = |attn: &Attention| {
        let (kw, vw) = attn.cache_widths();
        let window = match attn {
            Attention::Gqa(a) => a.window,
            Attention::Mla(a) => a.window,
        };
        let n = if window > 0 { window.min(pos + 1) } else { pos + 1 };
        (n * (kw + vw) * std::mem::size_of::<f32>()) as u64
    };
    model.layer_plans().iter().map(|l| per_layer(&l.attn)).sum()
}

/// Bytes of the non-expert tensors one decode step reads: every tensor outside expert and
/// merged-expert slabs (those are counted per step from routing), except that an untied
/// embedding table (and a learned position table) contributes one row.
fn dense_bytes_per_token(model: &meo::Model) -> Result<u64> {
    let file = model.file()?;
    let tied = model.config().tie_word_embeddings;
    let mut total = 0u64;
    for t in file.tensors() {
        if meo::format::slab_key(t.name).is_some() {
            continue;
        }
        let one_row = (t.name == meo::names::EMBED && !tied) || t.name == meo::names::POS_EMBED;
        let rows = t.shape().first().copied().unwrap_or(1).max(1);
        total += if one_row { t.len / rows } else { t.len };
    }
    Ok(total)
}
