//! `meo run FILE (-p TEXT | --tokens 1,2,3) [...]`: generate a continuation.
//!
//! Output: with `-p` the generated text is streamed to stdout; with `--tokens` the generated
//! ids go to stdout, space-separated, on one line. Everything else (stats, warnings) goes to
//! stderr. Generation stops after `--max-new-tokens` tokens or after an end-of-sequence id
//! of the model config (that id is part of the `--tokens` output, as in Hugging Face
//! `generate`; its text is not printed). `--dump` and `--stats` are documented in `docs/CLI.md`.

use anyhow::{Context, Result, bail};
use meo::residency::{self, ExpertTracker, ResidencyStats, TrackerOptions};
use meo::route::Choice;
use meo::sample::{Sampler, SamplerConfig};
use meo::tokenizer::Tokenizer;
use meo::{Logits, Model, Trace};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// Prompt token ids, comma-separated; the output is token ids.
    #[arg(long, value_name = "IDS", value_delimiter = ',', num_args = 1)]
    pub tokens: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only from the K most likely tokens (0 = no limit).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sample only from the smallest set of tokens whose probability reaches P (1 = no limit).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling (same seed, same output).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0 = one per physical core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Print speed, expert residency and memory figures to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Write the prompt's logits and routing to a safetensors file.
    #[arg(long, value_name = "OUT.safetensors")]
    pub dump: Option<PathBuf>,
    /// Keep at most this many bytes of expert weights mapped (e.g. 512M, 2G); least recently
    /// used experts are released (and re-read from the file when needed again).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
    #[command(flatten)]
    pub mode: super::mode::ModeArgs,
    #[command(flatten)]
    pub target: super::gpu::TargetArgs,
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

/// Parses `1234`, `64k`, `512M`, `2G`, `1.5GiB` (k/M/G and KiB/MiB/GiB are powers of 1024,
/// kB/MB/GB powers of 1000).
///
/// # Errors
/// Not a number with one of those suffixes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use k, M, G, KiB, MiB, GiB, kB, MB, GB)")),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a byte count"))?;
    let v = n * mult;
    if !(v.is_finite() && (0.0..1.8e19).contains(&v)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

/// Opens a model for lazy use ([`residency::map_lazy`]: no read-ahead, so only the experts
/// routing selects are read), with the file named in the error.
///
/// # Errors
/// The file cannot be opened or is not a model this runtime runs.
pub fn open_model(path: &Path) -> Result<Model> {
    let ctx = || format!("cannot open {}", path.display());
    let map = residency::map_lazy(path).with_context(ctx)?;
    Model::from_mapped(map).with_context(ctx)
}

/// Sends the routing to several observers.
pub struct Tee<'a>(pub Vec<&'a mut dyn Trace>);

impl Trace for Tee<'_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        for t in &mut self.0 {
            t.on_experts_selected(layer, experts);
        }
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        for t in &mut self.0 {
            t.on_route(layer, pos, choices);
        }
    }
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        for t in &mut self.0 {
            t.on_moe_input(layer, pos0, x);
        }
    }
    fn on_merged(&mut self, layer: usize, tokens: usize, expert: &meo::MergedUse) {
        for t in &mut self.0 {
            t.on_merged(layer, tokens, expert);
        }
    }
}

/// Records each MoE layer's choices for the positions `0..len` (the prompt).
#[derive(Debug, Default)]
pub struct RouteRecorder {
    len: usize,
    top_k: usize,
    /// layer → (`[len, k]` indices, `[len, k]` weights)
    pub layers: BTreeMap<usize, (Vec<i64>, Vec<f32>)>,
}

impl RouteRecorder {
    /// A recorder for positions `0..len` with `top_k` choices each.
    pub fn new(len: usize, top_k: usize) -> Self {
        Self { len, top_k, layers: BTreeMap::new() }
    }
}

impl Trace for RouteRecorder {
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        if pos >= self.len {
            return;
        }
        let (k, len) = (self.top_k, self.len);
        let (idx, w) = self.layers.entry(layer).or_insert_with(|| (vec![0; len * k], vec![0.0; len * k]));
        let mut sorted: Vec<Choice> = choices.to_vec();
        sorted.sort_by_key(|c| c.expert);
        for (j, c) in sorted.iter().take(k).enumerate() {
            idx[pos * k + j] = i64::from(c.expert);
            w[pos * k + j] = c.weight;
        }
    }
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Writes `logits` `[T, V]` and each layer's `topk_indices` / `topk_weights` `[T, k]`.
///
/// # Errors
/// I/O.
pub fn write_dump(path: &Path, logits: &[f32], t: usize, vocab: usize, rec: &RouteRecorder) -> Result<()> {
    write_dump_as(path, "logits", logits, [t, vocab], rec, false)
}

/// Writes `values` `[T, width]` as tensor `name` (`logits`, or `last_hidden_state` for an
/// encoder), each layer's `topk_indices` / `topk_weights` `[T, k]` and, with `dropped`, each
/// layer's `layers.L.dropped` `[T]` bool (every choice of the token dropped by capacity:
/// weight 0).
///
/// # Errors
/// I/O.
pub fn write_dump_as(
    path: &Path,
    name: &str,
    values: &[f32],
    [t, width]: [usize; 2],
    rec: &RouteRecorder,
    dropped: bool,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        vec![(name.into(), Dtype::F32, vec![t, width], le_bytes(values, f32::to_le_bytes))];
    for (l, (_, w)) in rec.layers.iter().filter(|_| dropped) {
        let d = w.chunks(rec.top_k.max(1)).map(|c| u8::from(c.iter().all(|&x| x == 0.0))).collect();
        owned.push((format!("layers.{l}.dropped"), Dtype::BOOL, vec![t], d));
    }
    for (l, (idx, w)) in &rec.layers {
        owned.push((
            format!("layers.{l}.topk_indices"),
            Dtype::I64,
            vec![t, rec.top_k],
            le_bytes(idx, i64::to_le_bytes),
        ));
        owned.push((format!("layers.{l}.topk_weights"), Dtype::F32, vec![t, rec.top_k], le_bytes(w, f32::to_le_bytes)));
    }
    let views = owned
        .iter()
        .map(|(name, dt, shape, data)| Ok((name.clone(), TensorView::new(*dt, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let info = std::collections::HashMap::from([("producer".to_string(), "meo run --dump".to_string())]);
    safetensors::serialize_to_file(views, Some(info), path).with_context(|| format!("cannot write {}", path.display()))
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
        (Some(text), _, Some(tok)) => tok.encode(text)?,
        (None, Some(ids), _) => ids.clone(),
        _ => bail!("give a prompt with -p TEXT or --tokens 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty (no tokens)");
    }
    Ok((tokenizer, prompt))
}

/// Human-readable bytes (binary units).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
}

/// Writes the residency part of `--stats` (and of `meo bench`'s text output).
///
/// # Errors
/// I/O.
pub fn print_residency(out: &mut dyn Write, s: &ResidencyStats, file_bytes: u64) -> std::io::Result<()> {
    let per_layer: Vec<String> = s
        .experts_touched_per_layer
        .iter()
        .zip(&s.experts_per_layer)
        .enumerate()
        .filter(|(_, (_, n))| **n > 0)
        .map(|(l, (t, n))| format!("L{l} {t}/{n}"))
        .collect();
    let total: usize = s.experts_per_layer.iter().sum();
    writeln!(out, "experts touched per layer: {}", per_layer.join(", "))?;
    writeln!(out, "experts touched: {} of {} (distinct, all layers)", s.experts_touched, total)?;
    let pct = if s.expert_bytes_in_file == 0 {
        0.0
    } else {
        100.0 * s.expert_bytes_resident as f64 / s.expert_bytes_in_file as f64
    };
    writeln!(
        out,
        "expert bytes resident: {} of {} in file ({pct:.1}%)",
        human_bytes(s.expert_bytes_resident),
        human_bytes(s.expert_bytes_in_file)
    )?;
    if let Some(mapped) = s.expert_bytes_mapped {
        writeln!(out, "expert bytes mapped by this process: {}", human_bytes(mapped))?;
    }
    if s.released_slabs > 0 {
        writeln!(
            out,
            "released under the memory budget: {} slabs, {}",
            s.released_slabs,
            human_bytes(s.released_bytes)
        )?;
    }
    match residency::peak_rss_bytes() {
        Ok(rss) => writeln!(out, "peak RSS: {} (file: {})", human_bytes(rss), human_bytes(file_bytes)),
        Err(e) => writeln!(out, "peak RSS: unavailable ({e})"),
    }
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
/// Bad arguments, an unreadable model, a missing tokenizer with `-p`, or I/O.
pub fn run_to(a: &Args, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<()> {
    if a.target.is_ort()? {
        return super::target::run_ort(a, stdout, stderr);
    }
    let sampling = SamplerConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let mut sampler = Sampler::new(sampling)?;
    let t_open = Instant::now();
    let model = open_model(&a.file)?;
    let cfg = model.config().clone();
    let file_bytes = model.bytes().len() as u64;
    let (tokenizer, prompt) = prompt_tokens(a, &model)?;
    let mut opened = super::gpu::open_target(&model, &a.target, a.threads)?;
    let session = opened.target();
    let merged_layers = session.set_mode(a.mode.options(&model)?)?;
    // The session's context: the default cap (`meo::DEFAULT_MAX_CONTEXT`) or the model's maximum.
    let max_context = meo::SessionOptions::default().context_for(&cfg);
    if prompt.len() > max_context {
        bail!("the prompt has {} tokens, the context holds {}", prompt.len(), max_context);
    }
    let opts = TrackerOptions { budget: a.memory_budget, ..TrackerOptions::default() };
    let mut tracker = ExpertTracker::for_model(&model, opts)?;
    if a.stats {
        writeln!(
            stderr,
            "model: {} ({} layers, {} experts, top-{}), on {}, opened in {:.1} ms",
            cfg.architecture,
            cfg.num_layers,
            cfg.router.num_experts,
            cfg.router.top_k,
            session.describe(),
            t_open.elapsed().as_secs_f64() * 1e3
        )?;
        writeln!(stderr, "mode: {} (merged layers: {merged_layers:?})", a.mode.options(&model)?.mode.spelling())?;
    }

    // Prompt.
    let t = prompt.len();
    let mut recorder = a.dump.as_ref().map(|_| RouteRecorder::new(t, cfg.router.top_k));
    if cfg.recipe.encoder_only {
        return encode_to(a, &cfg, session, &prompt, recorder.as_mut(), &mut tracker, stdout, stderr);
    }
    let which = if a.dump.is_some() { Logits::All } else { Logits::Last };
    let t0 = Instant::now();
    let logits = {
        let mut tee = Tee(vec![&mut tracker]);
        if let Some(r) = recorder.as_mut() {
            tee.0.push(r);
        }
        session.forward(&prompt, which, &mut tee)?
    };
    let prompt_time = t0.elapsed();
    tracker.take_step_bytes();
    let vocab = cfg.vocab_size;
    if let (Some(path), Some(rec)) = (&a.dump, &recorder) {
        write_dump(path, logits, t, vocab, rec)?;
    }
    let last = &logits[logits.len() - vocab..];
    let mut next = sampler.sample(last)?;

    // Decode.
    let eos: Vec<u32> = cfg.eos_token_ids.iter().filter_map(|&e| u32::try_from(e).ok()).collect();
    let mut generated: Vec<u32> = Vec::new();
    let mut text = tokenizer.as_ref().map(Tokenizer::stream);
    let mut decode_time = Duration::ZERO;
    let mut decode_steps = 0usize;
    for i in 0..a.max_new_tokens {
        generated.push(next);
        let is_eos = eos.contains(&next);
        if let Some(s) = text.as_mut()
            && !is_eos
            && let Some(piece) = s.push(next)?
        {
            stdout.write_all(piece.as_bytes())?;
            stdout.flush()?;
        }
        if is_eos || i + 1 == a.max_new_tokens {
            break;
        }
        if session.position() >= max_context {
            writeln!(stderr, "warning: context full ({max_context} positions); stopping")?;
            break;
        }
        let t1 = Instant::now();
        let logits = session.forward(&[next], Logits::Last, &mut tracker)?;
        next = sampler.sample(logits)?;
        decode_time += t1.elapsed();
        decode_steps += 1;
        tracker.take_step_bytes();
    }
    match text {
        Some(s) => {
            if let Some(rest) = s.finish()? {
                stdout.write_all(rest.as_bytes())?;
            }
            writeln!(stdout)?;
        }
        None => {
            let ids: Vec<String> = generated.iter().map(u32::to_string).collect();
            writeln!(stdout, "{}", ids.join(" "))?;
        }
    }
    stdout.flush()?;
    if let Some(e) = tracker.take_error() {
        writeln!(stderr, "warning: residency advice failed: {e}")?;
    }
    if a.stats {
        writeln!(
            stderr,
            "prompt: {t} tokens in {:.3} s ({:.1} tokens/s)",
            prompt_time.as_secs_f64(),
            rate(t, prompt_time)
        )?;
        writeln!(
            stderr,
            "decode: {decode_steps} tokens in {:.3} s ({:.1} tokens/s), {} generated",
            decode_time.as_secs_f64(),
            rate(decode_steps, decode_time),
            generated.len()
        )?;
        print_residency(stderr, &tracker.stats()?, file_bytes)?;
        if let Some(g) = opened.gpu_expert_stats() {
            writeln!(stderr, "gpu expert cache: {g}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

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
