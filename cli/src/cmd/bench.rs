//! `meo bench FILE [--prompt-len N] [--gen N] [--threads N] [--json]`: prompt-processing and
//! decoding speed, expert traffic and memory on random (seeded) prompt tokens with greedy
//! decoding. End-of-sequence ids do not stop it. The JSON object is documented in `docs/CLI.md`.

use super::target::{RunOptions, open_target};
use super::{human_bytes, open_model, print_residency};
use anyhow::{Result, bail};
use meo::generate::{GenerateOptions, Hooks, generate};
use meo::residency::{self, ExpertTracker};
use meo::sample::{Pcg32, SamplerConfig};
use meo::{Model, Session, SessionOptions};
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
    /// How decode steps pick the next token: `greedy` (the model's own choice; on random
    /// weights this often repeats one token, and so one routing) or `random` (near-uniform
    /// random ids, seeded: what llama-bench feeds; fair when comparing expert traffic).
    #[arg(long, value_name = "HOW", default_value = "greedy", value_parser = ["greedy", "random"])]
    pub decode_tokens: String,
    #[command(flatten)]
    pub memory: super::memory::MemoryArgs,
    #[command(flatten)]
    pub mode: super::mode::ModeArgs,
    #[command(flatten)]
    pub target: super::target::TargetArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// Bytes of session state (KV cache and recurrent state) to report the context that fits
    /// in, for the chosen `--kv` (e.g. 512M, 2G).
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = super::parse_bytes)]
    pub kv_budget: u64,
}

/// What `meo bench` observes of a generation: expert slabs read per forward call (the tracker
/// counts distinct slabs per step; a merged layer reads its merged expert instead), and the KV
/// cache each decode step reads.
struct BenchHooks<'a, 'm> {
    model: &'m Model,
    tracker: &'a mut ExpertTracker<'m>,
    /// Bytes of merged experts read by the current call (once per call and layer).
    merged: u64,
    prompt_len: usize,
    prompt_expert_bytes: u64,
    step_bytes: Vec<u64>,
    kv_bytes: u64,
    kv: meo::KvOptions,
    /// On-miss fallbacks (token choices) of the decode steps, and the tracker's count at the
    /// end of the previous call.
    decode_fallbacks: u64,
    fallbacks_seen: u64,
}

impl meo::Trace for BenchHooks<'_, '_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.tracker.on_experts_selected(layer, experts);
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[meo::Choice]) {
        self.tracker.on_route(layer, pos, choices);
    }
    fn on_merged(&mut self, layer: usize, tokens: usize, expert: &meo::MergedUse) {
        self.tracker.on_merged(layer, tokens, expert);
        self.merged += expert.bytes() as u64;
    }
    fn wants_prediction(&self) -> bool {
        self.tracker.wants_prediction()
    }
    fn on_experts_predicted(&mut self, from: usize, layer: usize, experts: &[u32]) {
        self.tracker.on_experts_predicted(from, layer, experts);
    }
    fn resident_experts(&mut self, layer: usize, resident: &mut Vec<bool>) -> bool {
        self.tracker.resident_experts(layer, resident)
    }
    fn on_fallback(&mut self, layer: usize, missed: &[u32], choices: usize) {
        self.tracker.on_fallback(layer, missed, choices);
    }
}

impl Hooks for BenchHooks<'_, '_> {
    fn trace(&mut self, prompt: bool) -> Option<&mut dyn meo::Trace> {
        if !prompt {
            self.kv_bytes += self.model.kv_bytes_read(self.prompt_len + self.step_bytes.len(), self.kv);
        }
        Some(self)
    }

    fn after_forward(&mut self, prompt: bool) {
        let bytes = self.tracker.take_step_bytes() + std::mem::take(&mut self.merged);
        let f = self.tracker.fallback_choices();
        if !prompt {
            self.decode_fallbacks += f - self.fallbacks_seen;
        }
        self.fallbacks_seen = f;
        if prompt {
            self.prompt_expert_bytes += bytes;
        } else {
            self.step_bytes.push(bytes);
        }
    }
}

/// Generation of exactly `gen + 1` tokens (`gen` decode steps), end-of-sequence ids not
/// stopping it: greedy, or (`random`) sampled at a temperature so high that every id is about
/// equally likely.
fn bench_options(gen_tokens: usize, random: Option<u64>) -> GenerateOptions {
    let sampling = match random {
        Some(seed) => SamplerConfig { temperature: 1e6, seed, ..SamplerConfig::default() },
        None => SamplerConfig::default(),
    };
    GenerateOptions { max_new_tokens: gen_tokens + 1, sampling, ..GenerateOptions::default() }
}

/// Runs `meo bench`.
///
/// # Errors
/// Bad arguments, a flag the target cannot honour, an unreadable model, or a residency query
/// failing.
pub fn run(a: &Args) -> Result<()> {
    if a.prompt_len == 0 {
        bail!("--prompt-len must be at least 1");
    }
    if a.cold {
        residency::drop_page_cache(&a.file)?;
    }
    let t_open = Instant::now();
    let model = open_model(&a.file)?;
    let cfg = model.config().clone();
    let file_bytes = model.bytes().len() as u64;
    let run = RunOptions {
        threads: a.threads,
        memory_budget: a.memory.explicit(),
        mode: a.mode.options(&model)?,
        kv: a.kv.options(),
    };
    let (mut opened, merged_layers) = open_target(&model, &a.target, &run)?;
    a.memory.apply_on_miss(&mut opened)?;
    let open_time = t_open.elapsed();
    if a.prompt_len + a.gen_tokens > cfg.max_position_embeddings {
        bail!(
            "--prompt-len + --gen = {} exceeds the context of {}",
            a.prompt_len + a.gen_tokens,
            cfg.max_position_embeddings
        );
    }
    let opts = a.memory.tracker_options();
    let mut tracker = ExpertTracker::for_model(&model, opts)?;
    let mut rng = Pcg32::seed_from_u64(a.seed);
    let vocab = cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..a.prompt_len).map(|_| ((u64::from(rng.next_u32()) * vocab) >> 32) as u32).collect();

    let target = opened.target();
    let warmup = if a.cold || a.memory.explicit() { 0 } else { a.warmup };
    for w in 0..warmup {
        let other: Vec<u32> = prompt.iter().map(|&t| ((u64::from(t) + 1 + w as u64) % vocab) as u32).collect();
        generate(target, &other, &bench_options(1, None), None, &mut ())?;
        target.reset();
    }
    let mut hooks = BenchHooks {
        model: &model,
        tracker: &mut tracker,
        merged: 0,
        prompt_len: a.prompt_len,
        prompt_expert_bytes: 0,
        step_bytes: Vec::with_capacity(a.gen_tokens),
        kv_bytes: 0,
        kv: run.kv,
        decode_fallbacks: 0,
        fallbacks_seen: 0,
    };
    let random = (a.decode_tokens == "random").then_some(a.seed);
    let g = generate(target, &prompt, &bench_options(a.gen_tokens, random), None, &mut hooks)?;
    let BenchHooks { prompt_expert_bytes, step_bytes, kv_bytes, decode_fallbacks, .. } = hooks;
    let threads = threads_of(&opened);
    let describe = opened.target().describe();
    // `--compare-cpu` (ONNX Runtime only): the same generation on meo's CPU target.
    let cpu = if a.target.compare_cpu {
        let mut s = Session::new(&model, SessionOptions { threads: a.threads, ..SessionOptions::default() })?;
        s.set_mode(run.mode.clone())?;
        let c = generate(&mut s, &prompt, &bench_options(a.gen_tokens, random), None, &mut ())?;
        let agree = g.tokens.iter().zip(&c.tokens).take_while(|(x, y)| x == y).count();
        Some((c, s.threads(), agree))
    } else {
        None
    };
    let stats = tracker.stats()?;
    let dense_bytes = model.dense_bytes_per_token()?;
    let gpu_stats = opened.gpu_expert_stats();
    let peak_rss = residency::peak_rss_bytes().ok();
    let rate = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
    let prompt_tps = rate(a.prompt_len, g.prompt_time);
    let decode_tps = rate(g.decode_steps, g.decode_time);
    let bytes_per_token =
        if step_bytes.is_empty() { 0.0 } else { step_bytes.iter().sum::<u64>() as f64 / step_bytes.len() as f64 };
    let kv_per_token = if g.decode_steps == 0 { 0.0 } else { kv_bytes as f64 / g.decode_steps as f64 };
    let mode = run.mode.mode.spelling();
    // Session state at the end of the run: the KV cache grows with the context, the recurrent
    // layers' state does not (and is read and written once per decoded token).
    let kv_cache_bytes = cfg.kv_cache_bytes(a.prompt_len + g.decode_steps, run.kv);
    let recurrent_bytes = cfg.recurrent_state_bytes();
    // What one more position of context costs, and how many fit in --kv-budget (with the
    // fixed recurrent state taken out first; the model's own maximum not applied).
    let kv_per_position = cfg.kv_bytes_per_position(run.kv);
    let budget_context = a.kv_budget.saturating_sub(recurrent_bytes).checked_div(kv_per_position);
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = json!({
            "file": a.file.display().to_string(),
            "file_bytes": file_bytes,
            "architecture": cfg.architecture,
            "num_layers": cfg.num_layers,
            "num_experts": cfg.router.num_experts,
            "top_k": cfg.router.top_k,
            "mode": mode,
            "merged_layers": merged_layers,
            "threads": threads,
            "target": describe,
            "gpu_expert_cache": gpu_stats,
            "cold": a.cold,
            "warmup": warmup,
            "memory_budget": tracker.options().budget,
            "decode_tokens": a.decode_tokens,
            "open_seconds": open_time.as_secs_f64(),
            "prompt_tokens": a.prompt_len,
            "prompt_seconds": g.prompt_time.as_secs_f64(),
            "prompt_tokens_per_s": prompt_tps,
            "prompt_expert_bytes": prompt_expert_bytes,
            "decode_tokens": g.decode_steps,
            "decode_seconds": g.decode_time.as_secs_f64(),
            "decode_tokens_per_s": decode_tps,
            "expert_bytes_per_token": bytes_per_token,
            "dense_bytes_per_token": dense_bytes,
            "kv_bytes_per_token": kv_per_token,
            "bytes_per_token": dense_bytes as f64 + bytes_per_token + kv_per_token + recurrent_bytes as f64,
            "kv_cache_bytes": kv_cache_bytes,
            "recurrent_state_bytes": recurrent_bytes,
            "state_bytes": kv_cache_bytes + recurrent_bytes,
            "experts_touched": stats.experts_touched,
            "experts_total": stats.experts_per_layer.iter().sum::<usize>(),
            "experts_touched_per_layer": stats.experts_touched_per_layer,
            "expert_bytes_resident": stats.expert_bytes_resident,
            "expert_bytes_mapped": stats.expert_bytes_mapped,
            "expert_bytes_in_file": stats.expert_bytes_in_file,
            "released_slabs": stats.released_slabs,
            "peak_rss_bytes": peak_rss,
        });
        let residency = json!({
            "cache_policy": tracker.options().policy.name(),
            "predict": tracker.options().predict,
            "expert_hits": stats.hits,
            "expert_misses": stats.misses,
            "expert_hit_rate": stats.hit_rate(),
            "prediction_accuracy_per_layer": stats.prediction.iter().map(|p| p.accuracy()).collect::<Vec<_>>(),
            "predicted_prefetches": stats.predicted_prefetches,
            "miss_read": stats.miss_read.name(),
            "miss_reads": stats.miss_reads,
            "miss_read_bytes": stats.miss_read_bytes,
            "populate_fallbacks": stats.populate_fallbacks,
            "on_miss": a.memory.on_miss.spelling(),
            "approximate": a.memory.on_miss.approximate(),
            "fallback_choices": stats.fallback_choices,
            "fallbacks_per_layer": stats.fallbacks_per_layer,
            "fallback_fetches": stats.fallback_fetches,
            "decode_fallbacks_per_token":
                if g.decode_steps == 0 { 0.0 } else { decode_fallbacks as f64 / g.decode_steps as f64 },
            "dense_pinned_bytes": stats.dense_pinned_bytes,
            "dense_locked": stats.dense_locked,
        });
        let kv = json!({
            "kv_dtype": run.kv.dtype.name(),
            "mla_cache": run.kv.mla.name(),
            "kv_cache_bytes_per_position": kv_per_position,
            "kv_budget": a.kv_budget,
            "context_in_kv_budget": budget_context,
        });
        for more in [residency, kv] {
            if let (Some(o), serde_json::Value::Object(r)) = (v.as_object_mut(), more) {
                o.extend(r);
            }
        }
        if let Some((c, threads, agree)) = &cpu {
            v["cpu"] = json!({
                "threads": threads,
                "prompt_tokens_per_s": rate(a.prompt_len, c.prompt_time),
                "decode_tokens_per_s": rate(c.decode_steps, c.decode_time),
                "greedy_tokens_agreeing": agree,
            });
        }
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
            describe
        )?;
        writeln!(out, "mode: {mode} (merged layers: {merged_layers:?})")?;
        writeln!(
            out,
            "prompt: {} tokens in {:.3} s = {prompt_tps:.1} tokens/s",
            a.prompt_len,
            g.prompt_time.as_secs_f64()
        )?;
        writeln!(
            out,
            "decode: {} tokens in {:.3} s = {decode_tps:.1} tokens/s",
            g.decode_steps,
            g.decode_time.as_secs_f64()
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
        let fits = budget_context.map_or_else(|| "any (no KV cache)".into(), |n| format!("{n} positions"));
        writeln!(
            out,
            "KV cache ({} storage): {} per position; context in {} of session state: {fits}",
            run.kv.dtype,
            human_bytes(kv_per_position),
            human_bytes(a.kv_budget)
        )?;
        writeln!(
            out,
            "session state: {} ({} KV cache at {} positions + {} recurrent state, fixed)",
            human_bytes(kv_cache_bytes + recurrent_bytes),
            human_bytes(kv_cache_bytes),
            a.prompt_len + g.decode_steps,
            human_bytes(recurrent_bytes)
        )?;
        print_residency(&mut out, &stats, file_bytes)?;
        if let Some(gs) = gpu_stats {
            writeln!(out, "gpu expert cache: {gs}")?;
        }
        if let Some((c, threads, agree)) = &cpu {
            writeln!(out, "cpu ({threads} threads) prompt: {:.1} tokens/s", rate(a.prompt_len, c.prompt_time))?;
            writeln!(out, "cpu ({threads} threads) decode: {:.1} tokens/s", rate(c.decode_steps, c.decode_time))?;
            writeln!(out, "greedy tokens agreeing (from the first): {agree} of {}", g.tokens.len())?;
        }
    }
    if a.target.ep_report
        && let Some(report) = opened.ep_report()?
    {
        write!(out, "{report}")?;
    }
    Ok(())
}

/// Worker threads the target runs its kernels on (`None` on the GPU, whose kernels are not
/// threaded by meo).
fn threads_of(opened: &super::target::Opened<'_>) -> Option<usize> {
    #[allow(unreachable_patterns)] // only the CPU target without the `wgpu` and `ort` features
    match opened {
        super::target::Opened::Cpu(s) => Some(s.threads()),
        _ => None,
    }
}
