//! `meo run FILE (-p TEXT | --tokens 1,2,3) [...]`: generate a continuation.
//!
//! Output: with `-p` the generated text is streamed to stdout; with `--tokens` the generated
//! ids go to stdout, space-separated, on one line. Everything else (stats, warnings) goes to
//! stderr. Generation stops after `--max-new-tokens` tokens or after an end-of-sequence id
//! of the model config (that id is part of the `--tokens` output, as in Hugging Face
//! `generate`; its text is not printed). `--dump` and `--stats` are documented in `docs/CLI.md`.

use super::dump::{RouteRecorder, Tee, write_dump, write_dump_as};
use super::target::{RunOptions, open_target};
use super::{open_model, print_residency};
use anyhow::{Result, bail};
use meo::generate::{GenerateError, GenerateOptions, Hooks, StopReason, generate};
use meo::residency::ExpertTracker;
use meo::route::Choice;
use meo::sample::SamplerConfig;
use meo::tokenizer::Tokenizer;
use meo::{Logits, Model, Trace};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Generate text or token ids with a .meo model.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
    /// Prompt text (encoded with the tokenizer embedded in the file); the output is text.
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "TEXT",
        required_unless_present = "tokens",
        conflicts_with = "tokens"
    )]
    pub prompt: Option<String>,
    /// Treat the -p text as one user message of a chat: render it with the model's chat
    /// template (with --system), stop at the end of the assistant's turn.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// System prompt for --chat.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
    /// Extra chat-template variables for --chat, a JSON object (e.g. '{"enable_thinking": false}').
    #[arg(long, value_name = "JSON", requires = "chat")]
    pub template_vars: Option<String>,
    /// Prompt token ids, comma-separated; the output is token ids.
    #[arg(long, value_name = "IDS", value_delimiter = ',', num_args = 1)]
    pub tokens: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Worker threads (0 = one per physical core; logical CPUs where the OS does not say).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Print speed, expert residency and memory figures to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Write the prompt's logits and routing to a safetensors file.
    #[arg(long, value_name = "OUT.safetensors")]
    pub dump: Option<PathBuf>,
    #[command(flatten)]
    pub memory: super::memory::MemoryArgs,
    #[command(flatten)]
    pub mode: super::mode::ModeArgs,
    #[command(flatten)]
    pub target: super::target::TargetArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
}

/// Sampling and stop flags, shared by `meo run` and `meo chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding. Default (this flag and the next four): the
    /// file's generation defaults, from the checkpoint's generation_config.json (`meo inspect`
    /// lists them as generation.*); greedy, no limits and no penalty when it has none, and
    /// greedy when its do_sample is false.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample only from the K most likely tokens (0 = no limit).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches P (1 = no limit).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Sample only from tokens at least P times as likely as the most likely one (0 = no limit).
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// Repetition penalty (Hugging Face's) over the prompt and generated tokens; 1 = none.
    #[arg(long, value_name = "R")]
    pub repeat_penalty: Option<f32>,
    /// Presence penalty (OpenAI's): subtracted from the logit of every token already seen; 0 = none.
    #[arg(long, value_name = "X", default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Frequency penalty (OpenAI's): subtracted per earlier occurrence of a token; 0 = none.
    #[arg(long, value_name = "X", default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// The penalties count only the last N tokens (0 = all tokens of the sequence).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub repeat_last_n: usize,
    /// Random seed for sampling (same seed, same output).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Stop when the generated text contains this string (not printed); repeatable.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampler settings: these flags over `model`'s generation defaults (checked when the
    /// sampler is made).
    pub fn config(&self, model: &meo::Model) -> SamplerConfig {
        let d = model.file().map(|f| meo::generate::sampling_defaults(&f.metadata)).unwrap_or_default();
        SamplerConfig {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

/// `meo run`'s arguments alone, for parsing them outside the `meo` command.
#[derive(clap::Parser, Debug)]
#[command(name = "meo run")]
struct Standalone {
    #[command(flatten)]
    args: Args,
}

impl Args {
    /// Parses `meo run` arguments (`FILE`, `-p`/`--tokens`, options; no program name), e.g. to
    /// drive [`run_to`] from tests or another program.
    ///
    /// # Errors
    /// The arguments are invalid (the error renders as clap's usage message).
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsString::from("meo run")).chain(args.into_iter().map(Into::into));
        Ok(Standalone::try_parse_from(argv)?.args)
    }
}

/// `meo run` on an encoder (`model.encoder_only`): one bidirectional pass over the prompt, no
/// generation. Prints a summary (tokens, hidden size, dropped tokens per MoE layer); `--dump`
/// writes `last_hidden_state` `[T, H]`, the routing and `layers.L.dropped`.
#[allow(clippy::too_many_arguments)]
fn encode_to(
    a: &Args,
    cfg: &meo::ModelConfig,
    session: &mut dyn meo::Target,
    prompt: &[u32],
    mut recorder: Option<&mut RouteRecorder>,
    tracker: &mut ExpertTracker,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<()> {
    let (t, h) = (prompt.len(), cfg.hidden_size);
    let mut counted = RouteRecorder::new(t, cfg.router.top_k);
    let t0 = Instant::now();
    let hidden = {
        let mut tee = Tee(vec![tracker, &mut counted]);
        if let Some(r) = recorder.as_mut() {
            tee.0.push(&mut **r);
        }
        session.encode(prompt, &mut tee)?
    };
    let elapsed = t0.elapsed();
    if let (Some(path), Some(rec)) = (&a.dump, &recorder) {
        write_dump_as(path, "last_hidden_state", hidden, [t, h], rec, true)?;
    }
    let dropped: Vec<String> = counted
        .layers
        .iter()
        .map(|(l, (_, w))| {
            let n = w.chunks(cfg.router.top_k.max(1)).filter(|c| c.iter().all(|&x| x == 0.0)).count();
            format!("{l}: {n}")
        })
        .collect();
    writeln!(
        stdout,
        "encoded {t} tokens -> [{t}, {h}] hidden states; tokens dropped by expert capacity per MoE layer: {}",
        if dropped.is_empty() { "none (no MoE layer)".to_string() } else { dropped.join(", ") }
    )?;
    if a.stats {
        writeln!(
            stderr,
            "encode: {t} tokens in {:.1} ms ({:.1} tok/s)",
            elapsed.as_secs_f64() * 1e3,
            rate(t, elapsed)
        )?;
    }
    Ok(())
}

/// The prompt of `a` as token ids (`-p TEXT` through the file's tokenizer, which is returned
/// for decoding the output, or `--tokens`).
///
/// # Errors
/// Neither given, no tokenizer in the file, or an empty prompt.
pub fn prompt_tokens(a: &Args, model: &Model) -> Result<(Option<Tokenizer>, Vec<u32>)> {
    let tokenizer = match &a.prompt {
        Some(_) => Some(Tokenizer::from_metadata(&model.file()?.metadata)?),
        None => None,
    };
    let prompt: Vec<u32> = match (&a.prompt, &a.tokens, &tokenizer) {
        (Some(text), _, Some(tok)) if a.chat => {
            let t = super::chat::template(model, None)?;
            let mut msgs: Vec<meo::chat::Message> =
                a.system.iter().map(|s| meo::chat::Message::new("system", s.clone())).collect();
            msgs.push(meo::chat::Message::new("user", text.clone()));
            let rendered = t.render(&msgs, true, a.template_vars.as_deref())?;
            tok.encode_without_special_tokens(&rendered)?
        }
        (Some(text), _, Some(tok)) => tok.encode(text)?,
        (None, Some(ids), _) => ids.clone(),
        _ => bail!("give a prompt with -p TEXT or --tokens 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty (no tokens)");
    }
    Ok((tokenizer, prompt))
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
}

/// Runs `meo run` with the process's stdout and stderr.
///
/// # Errors
/// Bad arguments, an unreadable model, a missing tokenizer with `-p`, or I/O.
pub fn run(a: &Args) -> Result<()> {
    run_to(a, &mut std::io::stdout().lock(), &mut std::io::stderr().lock())
}

/// Runs `meo run`, writing the output to `stdout` and stats and warnings to `stderr`.
///
/// # Errors
/// Bad arguments, an unreadable model, a missing tokenizer with `-p`, a flag the target
/// cannot honour, or I/O.
pub fn run_to(a: &Args, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<()> {
    if !a.sampling.stop.is_empty() && a.prompt.is_none() {
        bail!("--stop matches text: it needs -p (with --tokens the output is ids)");
    }
    let t_open = Instant::now();
    let model = open_model(&a.file)?;
    let sampling = a.sampling.config(&model);
    let cfg = model.config().clone();
    let file_bytes = model.bytes().len() as u64;
    let (tokenizer, prompt) = prompt_tokens(a, &model)?;
    let run = RunOptions {
        threads: a.threads,
        memory_budget: a.memory.explicit(),
        mode: a.mode.options(&model)?,
        kv: a.kv.options(),
    };
    let (mut opened, merged_layers) = open_target(&model, &a.target, &run)?;
    a.memory.apply_on_miss(&mut opened)?;
    let opts = a.memory.tracker_options();
    let mut tracker = ExpertTracker::for_model(&model, opts)?;
    if a.stats {
        writeln!(
            stderr,
            "model: {} ({} layers, {} experts, top-{}), on {}, opened in {:.1} ms",
            cfg.architecture,
            cfg.num_layers,
            cfg.router.num_experts,
            cfg.router.top_k,
            opened.target().describe(),
            t_open.elapsed().as_secs_f64() * 1e3
        )?;
        writeln!(stderr, "mode: {} (merged layers: {merged_layers:?})", run.mode.mode.spelling())?;
    }
    let t = prompt.len();
    let mut recorder = a.dump.as_ref().map(|_| RouteRecorder::new(t, cfg.router.top_k));
    if cfg.recipe.encoder_only {
        let session = opened.target();
        return encode_to(a, &cfg, session, &prompt, recorder.as_mut(), &mut tracker, stdout, stderr);
    }
    let mut gen_opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_strings: a.sampling.stop.clone(),
        prompt_logits: if a.dump.is_some() { Logits::All } else { Logits::Last },
        ..GenerateOptions::for_model(&cfg)
    };
    if let (true, Some(tok)) = (a.chat, &tokenizer) {
        gen_opts.stop_tokens = meo::chat::stop_tokens(&gen_opts, &super::chat::template(&model, None)?, tok);
    }
    let (g, prompt_logits) = {
        let mut hooks = RunHooks {
            tracker: &mut tracker,
            recorder: recorder.as_mut(),
            in_prompt: false,
            prompt_logits: Vec::new(),
            text: tokenizer.is_some(),
            out: &mut *stdout,
        };
        let g = generate(opened.target(), &prompt, &gen_opts, tokenizer.as_ref(), &mut hooks)?;
        (g, hooks.prompt_logits)
    };
    if let (Some(path), Some(rec)) = (&a.dump, &recorder) {
        write_dump(path, &prompt_logits, t, cfg.vocab_size, rec)?;
    }
    if tokenizer.is_some() {
        writeln!(stdout)?;
    } else {
        let ids: Vec<String> = g.tokens.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", ids.join(" "))?;
    }
    stdout.flush()?;
    if g.stop == StopReason::ContextFull {
        let max = gen_opts.max_context.min(opened.target().max_context());
        writeln!(stderr, "warning: context full ({max} positions); stopped")?;
    }
    if let Some(e) = tracker.take_error() {
        writeln!(stderr, "warning: residency advice failed: {e}")?;
    }
    if a.stats {
        writeln!(
            stderr,
            "prompt: {t} tokens in {:.3} s ({:.1} tokens/s)",
            g.prompt_time.as_secs_f64(),
            rate(t, g.prompt_time)
        )?;
        writeln!(
            stderr,
            "decode: {} tokens in {:.3} s ({:.1} tokens/s), {} generated",
            g.decode_steps,
            g.decode_time.as_secs_f64(),
            rate(g.decode_steps, g.decode_time),
            g.tokens.len()
        )?;
        print_residency(stderr, &tracker.stats()?, file_bytes)?;
        if let Some(gs) = opened.gpu_expert_stats() {
            writeln!(stderr, "gpu expert cache: {gs}")?;
        }
    }
    if a.target.ep_report
        && let Some(report) = opened.ep_report()?
    {
        stderr.write_all(report.as_bytes())?;
    }
    Ok(())
}

/// What `meo run` observes of a generation: routing for residency (and the prompt's for
/// `--dump`), the prompt's logits for `--dump`, and the streamed text.
struct RunHooks<'a, 'm> {
    tracker: &'a mut ExpertTracker<'m>,
    recorder: Option<&'a mut RouteRecorder>,
    /// The forward call running is a prompt chunk (recorded for `--dump`).
    in_prompt: bool,
    /// `[T, vocab]` with `--dump`.
    prompt_logits: Vec<f32>,
    /// Stream text (`-p`) rather than collect ids (`--tokens`).
    text: bool,
    out: &'a mut dyn Write,
}

impl Trace for RunHooks<'_, '_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.tracker.on_experts_selected(layer, experts);
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        self.tracker.on_route(layer, pos, choices);
        if let (true, Some(r)) = (self.in_prompt, self.recorder.as_deref_mut()) {
            r.on_route(layer, pos, choices);
        }
    }
    fn on_merged(&mut self, layer: usize, tokens: usize, expert: &meo::MergedUse) {
        self.tracker.on_merged(layer, tokens, expert);
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

impl Hooks for RunHooks<'_, '_> {
    fn trace(&mut self, prompt: bool) -> Option<&mut dyn Trace> {
        self.in_prompt = prompt;
        Some(self)
    }

    fn on_prompt_logits(&mut self, _pos0: usize, logits: &[f32]) -> Result<(), GenerateError> {
        if self.recorder.is_some() {
            self.prompt_logits.extend_from_slice(logits);
        }
        Ok(())
    }

    fn after_forward(&mut self, _prompt: bool) {
        self.tracker.take_step_bytes();
    }

    fn on_token(&mut self, _id: u32, text: &str) -> Result<bool, GenerateError> {
        if self.text && !text.is_empty() {
            self.out.write_all(text.as_bytes()).and_then(|()| self.out.flush()).map_err(io_error)?;
        }
        Ok(true)
    }

    fn on_text_end(&mut self, text: &str) -> Result<(), GenerateError> {
        self.out.write_all(text.as_bytes()).map_err(io_error)
    }
}

/// An output error inside the generation loop (kept as the cause: a closed pipe ends `meo`
/// quietly).
fn io_error(e: std::io::Error) -> GenerateError {
    GenerateError::Output(e)
}

#[cfg(test)]
mod tests {
    use super::super::parse_bytes;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("1234"), Ok(1234));
        assert_eq!(parse_bytes("64k"), Ok(65536));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("-1").is_err());
    }
}
