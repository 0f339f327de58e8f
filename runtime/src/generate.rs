//! The generation loop: prompt → sample → stop → feed back → stream text, over any
//! [`Target`]. `meo run`, `meo bench`, the C API's `meo_session_generate` and every target
//! share it, so an option means the same everywhere.
//!
//! Per call: the prompt is fed (in chunks of [`GenerateOptions::prompt_chunk`] tokens when
//! set), then up to [`GenerateOptions::max_new_tokens`] tokens are sampled one at a time.
//! Generation stops at the first of: the token budget, a stop token (the model's
//! end-of-sequence ids by default; the token is part of the output, its text is not), a stop
//! string in the text (the text up to it is streamed, the string is not), the context limit,
//! or a cancel request from [`Hooks`].

use crate::ModelConfig;
use crate::model::{ForwardError, Logits, NoTrace, Trace};
use crate::sample::{SampleError, Sampler, SamplerConfig};
use crate::target::{Target, TargetError};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};
use std::string::String;
use std::time::{Duration, Instant};
use std::vec::Vec;

/// What a generation does; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (the first is sampled from the prompt's logits).
    pub max_new_tokens: usize,
    /// How tokens are drawn from the logits.
    pub sampling: SamplerConfig,
    /// Tokens that end the generation (included in the output ids, not in the text).
    pub stop_tokens: Vec<u32>,
    /// Strings that end the generation when the text contains one (not streamed). Needs a
    /// tokenizer.
    pub stop_strings: Vec<String>,
    /// Most positions (prompt + generated) fed to the target; 0 = no limit but the target's
    /// ([`Target::max_context`], which bounds it in any case).
    pub max_context: usize,
    /// Feed the prompt in calls of at most this many tokens (bounds the activation memory of a
    /// long prompt); 0 = the whole prompt in one call.
    pub prompt_chunk: usize,
    /// Which logits of the prompt [`Hooks::on_prompt_logits`] receives.
    pub prompt_logits: Logits,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplerConfig::default(),
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            max_context: 0,
            prompt_chunk: 0,
            prompt_logits: Logits::Last,
        }
    }
}

impl GenerateOptions {
    /// The defaults for a model: its end-of-sequence ids as stop tokens, its maximum context.
    pub fn for_model(cfg: &ModelConfig) -> Self {
        Self {
            stop_tokens: cfg.eos_token_ids.iter().filter_map(|&e| u32::try_from(e).ok()).collect(),
            max_context: cfg.max_position_embeddings,
            ..Self::default()
        }
    }
}

/// The sampling defaults a file carries (`generation.*`, from the checkpoint's
/// `generation_config.json`): its temperature, top-k and top-p when `generation.do_sample` is
/// true; greedy decoding otherwise, as transformers' `generate` (which samples only with
/// `do_sample`). A value out of the sampler's range is ignored (the built-in default stays).
pub fn sampling_defaults(meta: &crate::format::Metadata<'_>) -> SamplerConfig {
    use crate::MetaValue;
    use crate::names::generation_keys as k;
    let mut c = SamplerConfig::default();
    let f = |key| match meta.get(key) {
        Some(MetaValue::F64(x)) if x.is_finite() => Some(*x as f32),
        _ => None,
    };
    // A logits processor in transformers: it applies to greedy decoding too.
    if let Some(r) = f(k::REPETITION_PENALTY).filter(|r| *r > 0.0) {
        c.repetition_penalty = r;
    }
    if !matches!(meta.get(k::DO_SAMPLE), Some(MetaValue::Bool(true))) {
        return c;
    }
    if let Some(t) = f(k::TEMPERATURE).filter(|t| *t >= 0.0) {
        c.temperature = t;
    }
    if let Some(p) = f(k::TOP_P).filter(|p| *p > 0.0 && *p <= 1.0) {
        c.top_p = p;
    }
    if let Some(p) = f(k::MIN_P).filter(|p| (0.0..=1.0).contains(p)) {
        c.min_p = p;
    }
    if let Some(MetaValue::U64(n)) = meta.get(k::TOP_K) {
        c.top_k = usize::try_from(*n).unwrap_or(0);
    }
    c
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// This stop token was generated.
    StopToken(u32),
    /// The text reached `stop_strings[index]`.
    StopString(usize),
    /// The context is full.
    ContextFull,
    /// [`Hooks::cancelled`] or [`Hooks::on_token`] asked to stop.
    Cancelled,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated ids (a final stop token included).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Prompt tokens fed, and the time to feed them and sample the first token.
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    /// Decoding steps (tokens fed back) and their time.
    pub decode_steps: usize,
    pub decode_time: Duration,
}

/// Why a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty (no tokens)")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens, the context holds {max}")]
    PromptTooLong { prompt: usize, max: usize },
    #[error("stop strings need a tokenizer (the text is what they are matched against)")]
    StopStringsNeedText,
    #[error("an empty stop string would stop before the first token")]
    EmptyStopString,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A hook could not write the output (the cause is kept, e.g. a closed pipe).
    #[error("writing the output")]
    Output(#[source] std::io::Error),
    /// A hook failed otherwise; the message is the hook's.
    #[error("{0}")]
    Hook(String),
}

impl From<ForwardError> for GenerateError {
    fn from(e: ForwardError) -> Self {
        Self::Target(e.into())
    }
}

/// What a caller observes and controls during a generation. Every method has a default.
pub trait Hooks {
    /// The routing observer for the forward call about to run (`prompt`: a prompt chunk).
    fn trace(&mut self, prompt: bool) -> Option<&mut dyn Trace> {
        let _ = prompt;
        None
    }
    /// The prompt's logits for positions `pos0..`: `[rows, vocab]` per
    /// [`GenerateOptions::prompt_logits`], once per prompt chunk.
    ///
    /// # Errors
    /// Any: the generation stops with it.
    fn on_prompt_logits(&mut self, pos0: usize, logits: &[f32]) -> Result<(), GenerateError> {
        let _ = (pos0, logits);
        Ok(())
    }
    /// A forward call finished (`prompt`: a prompt chunk), e.g. to account bytes per step.
    fn after_forward(&mut self, prompt: bool) {
        let _ = prompt;
    }
    /// A token was generated; `text` is the text it completes (empty when none is complete
    /// yet, for a stop token, and without a tokenizer). Return false to stop (cancel).
    ///
    /// # Errors
    /// Any: the generation stops with it (e.g. the output could not be written).
    fn on_token(&mut self, id: u32, text: &str) -> Result<bool, GenerateError> {
        let _ = (id, text);
        Ok(true)
    }
    /// Text held back until the end (an incomplete character, or a partial stop string that
    /// did not complete), delivered once when the generation ends.
    ///
    /// # Errors
    /// Any: it is returned as the generation's error.
    fn on_text_end(&mut self, text: &str) -> Result<(), GenerateError> {
        let _ = text;
        Ok(())
    }
    /// Polled before every forward call; true stops the generation ([`StopReason::Cancelled`]).
    fn cancelled(&mut self) -> bool {
        false
    }
}

/// Hooks that observe nothing.
impl Hooks for () {}

/// Text of the generated tokens with stop strings applied: what is safe to emit now, and the
/// longest tail that might still start a stop string, held back.
struct StopText<'s> {
    stops: &'s [String],
    pending: String,
}

impl StopText<'_> {
    /// Adds `piece`; returns (text to emit, index of the stop string reached).
    fn push(&mut self, piece: &str) -> (String, Option<usize>) {
        self.pending.push_str(piece);
        let hit =
            self.stops.iter().enumerate().filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i))).min();
        if let Some((at, i)) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, Some(i));
        }
        // Hold back the longest suffix of `pending` that is a proper prefix of a stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, None)
    }
}

/// Where a generation starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Feed these tokens after the positions the target holds, then sample from the last one.
    Prompt(&'a [u32]),
    /// Feed nothing: sample the first token from these logits (`[vocab]`, the target's last
    /// row), continuing a sequence already fed.
    Logits(&'a [f32]),
}

/// Runs one generation of `prompt` on `target` (after the positions it already holds), with a
/// sampler made from [`GenerateOptions::sampling`].
///
/// `tokenizer` turns the generated ids into streamed text ([`Hooks::on_token`]); without it
/// only ids are produced.
///
/// # Errors
/// An empty prompt, one longer than the context, stop strings without a tokenizer, a target,
/// sampling or tokenizer failure, or a hook's error. Tokens generated before a failure were
/// already reported to [`Hooks::on_token`].
pub fn generate(
    target: &mut dyn Target,
    prompt: &[u32],
    opts: &GenerateOptions,
    tokenizer: Option<&Tokenizer>,
    hooks: &mut dyn Hooks,
) -> Result<Generation, GenerateError> {
    let mut sampler = Sampler::new(opts.sampling)?;
    generate_with(target, Start::Prompt(prompt), opts, &mut sampler, tokenizer, hooks)
}

/// [`generate`] from `start`, drawing from `sampler` (whose state carries over between calls;
/// [`GenerateOptions::sampling`] is not used). Every token fed is [`Sampler::observe`]d, so
/// the penalties count the prompt and the generated tokens; a caller that resets `target`
/// clears the sampler's history too.
///
/// # Errors
/// As [`generate`].
pub fn generate_with(
    target: &mut dyn Target,
    start: Start<'_>,
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    tokenizer: Option<&Tokenizer>,
    hooks: &mut dyn Hooks,
) -> Result<Generation, GenerateError> {
    let prompt = match start {
        Start::Prompt(p) => p,
        Start::Logits(_) => &[],
    };
    if matches!(start, Start::Prompt(_)) && prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if !opts.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(GenerateError::StopStringsNeedText);
    }
    if opts.stop_strings.iter().any(String::is_empty) {
        return Err(GenerateError::EmptyStopString);
    }
    let max = if opts.max_context == 0 { usize::MAX } else { opts.max_context }.min(target.max_context());
    let start_pos = target.position();
    if start_pos.checked_add(prompt.len()).is_none_or(|end| end > max) {
        return Err(GenerateError::PromptTooLong { prompt: prompt.len(), max: max.saturating_sub(start_pos) });
    }
    let mut g = Generation {
        tokens: Vec::new(),
        stop: StopReason::MaxTokens,
        prompt_tokens: prompt.len(),
        prompt_time: Duration::ZERO,
        decode_steps: 0,
        decode_time: Duration::ZERO,
    };
    if hooks.cancelled() {
        g.stop = StopReason::Cancelled;
        return Ok(g);
    }

    // The prompt, in chunks; the first token is sampled from the last chunk's last row.
    let t0 = Instant::now();
    let chunk = if opts.prompt_chunk == 0 { prompt.len().max(1) } else { opts.prompt_chunk };
    let mut next = match start {
        Start::Logits(l) if opts.max_new_tokens > 0 => Some(sampler.sample(l)?),
        _ => None,
    };
    for (i, part) in prompt.chunks(chunk).enumerate() {
        if i > 0 && hooks.cancelled() {
            g.stop = StopReason::Cancelled;
            return Ok(g);
        }
        let pos0 = target.position();
        let logits = forward(target, part, opts.prompt_logits, hooks, true)?;
        sampler.observe(part);
        let last = last_row(logits, part.len(), opts.prompt_logits);
        let id = if opts.max_new_tokens > 0 && i == prompt.len().div_ceil(chunk) - 1 {
            Some(sampler.sample(last)?)
        } else {
            None
        };
        hooks.on_prompt_logits(pos0, logits)?;
        hooks.after_forward(true);
        next = id;
    }
    g.prompt_time = t0.elapsed();
    let Some(mut next) = next else { return Ok(g) };

    let mut text = tokenizer.map(Tokenizer::stream);
    let mut stop_text = StopText { stops: &opts.stop_strings, pending: String::new() };
    loop {
        g.tokens.push(next);
        let is_stop = opts.stop_tokens.contains(&next);
        let mut piece = String::new();
        let mut hit = None;
        if let Some(s) = text.as_mut()
            && !is_stop
            && let Some(p) = s.push(next)?
        {
            (piece, hit) = stop_text.push(&p);
        }
        if !hooks.on_token(next, &piece)? {
            g.stop = StopReason::Cancelled;
            break;
        }
        if let Some(i) = hit {
            g.stop = StopReason::StopString(i);
            break;
        }
        if is_stop {
            g.stop = StopReason::StopToken(next);
            break;
        }
        if g.tokens.len() >= opts.max_new_tokens {
            g.stop = StopReason::MaxTokens;
            break;
        }
        if target.position() >= max {
            g.stop = StopReason::ContextFull;
            break;
        }
        if hooks.cancelled() {
            g.stop = StopReason::Cancelled;
            break;
        }
        let t1 = Instant::now();
        let logits = forward(target, &[next], Logits::Last, hooks, false)?;
        sampler.observe(&[next]);
        next = sampler.sample(logits)?;
        g.decode_time += t1.elapsed();
        g.decode_steps += 1;
        hooks.after_forward(false);
    }
    // What is still held back: an incomplete character (unless a stop string ended the text).
    if !matches!(g.stop, StopReason::StopString(_)) {
        let mut rest = text.map(TextStream::finish).transpose()?.flatten().unwrap_or_default();
        if !stop_text.pending.is_empty() {
            rest.insert_str(0, &stop_text.pending);
        }
        if !rest.is_empty() {
            hooks.on_text_end(&rest)?;
        }
    }
    Ok(g)
}

/// One forward call with the hooks' trace.
fn forward<'t>(
    target: &'t mut dyn Target,
    tokens: &[u32],
    which: Logits,
    hooks: &mut dyn Hooks,
    prompt: bool,
) -> Result<&'t [f32], GenerateError> {
    Ok(match hooks.trace(prompt) {
        Some(trace) => target.forward(tokens, which, trace)?,
        None => target.forward(tokens, which, &mut NoTrace)?,
    })
}

/// The last row of a forward call's logits (`[t, vocab]` for [`Logits::All`]).
fn last_row(logits: &[f32], t: usize, which: Logits) -> &[f32] {
    match which {
        Logits::Last => logits,
        Logits::All => {
            let vocab = logits.len() / t.max(1);
            &logits[logits.len() - vocab..]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).into()).collect()
    }

    #[test]
    fn stop_text_holds_back_partial_matches_and_cuts_at_the_stop() {
        let s = stops(&["</s>", "\n\n"]);
        let mut st = StopText { stops: &s, pending: String::new() };
        assert_eq!(st.push("Hello"), ("Hello".into(), None));
        assert_eq!(st.push(" wor<"), (" wor".into(), None));
        assert_eq!(st.push("/"), (String::new(), None));
        assert_eq!(st.push("x"), ("</x".into(), None));
        assert_eq!(st.push("ld\n"), ("ld".into(), None));
        assert_eq!(st.push("\nmore"), (String::new(), Some(1)));
        let mut st = StopText { stops: &s, pending: String::new() };
        assert_eq!(st.push("a</s>b"), ("a".into(), Some(0)));
    }

    /// A target whose next token is always `(last fed + 1) % VOCAB`, counting its calls.
    struct Counter {
        pos: usize,
        calls: Vec<usize>,
        logits: Vec<f32>,
    }

    const VOCAB: usize = 8;

    impl Target for Counter {
        fn name(&self) -> &str {
            "counter"
        }
        fn describe(&self) -> String {
            "counter".into()
        }
        fn forward(&mut self, tokens: &[u32], which: Logits, _: &mut dyn Trace) -> Result<&[f32], TargetError> {
            self.calls.push(tokens.len());
            self.pos += tokens.len();
            let rows: Vec<u32> = match which {
                Logits::All => tokens.to_vec(),
                Logits::Last => vec![tokens[tokens.len() - 1]],
            };
            self.logits = rows
                .iter()
                .flat_map(|&t| (0..VOCAB).map(move |v| if v == (t as usize + 1) % VOCAB { 1.0 } else { 0.0 }))
                .collect();
            Ok(&self.logits)
        }
        fn reset(&mut self) {
            self.pos = 0;
        }
        fn position(&self) -> usize {
            self.pos
        }
        fn max_context(&self) -> usize {
            100
        }
        fn set_mode(&mut self, _: crate::MergeOptions) -> Result<Vec<usize>, TargetError> {
            Ok(Vec::new())
        }
    }

    fn counter() -> Counter {
        Counter { pos: 0, calls: Vec::new(), logits: Vec::new() }
    }

    #[derive(Default)]
    struct Log {
        tokens: Vec<u32>,
        prompt_rows: usize,
        cancel_after: Option<usize>,
    }

    impl Hooks for Log {
        fn on_prompt_logits(&mut self, _: usize, logits: &[f32]) -> Result<(), GenerateError> {
            self.prompt_rows += logits.len() / VOCAB;
            Ok(())
        }
        fn on_token(&mut self, id: u32, _: &str) -> Result<bool, GenerateError> {
            self.tokens.push(id);
            Ok(true)
        }
        fn cancelled(&mut self) -> bool {
            self.cancel_after.is_some_and(|n| self.tokens.len() >= n)
        }
    }

    #[test]
    fn stops_at_the_budget_a_stop_token_the_context_and_a_cancel() {
        let opts = GenerateOptions { max_new_tokens: 5, ..GenerateOptions::default() };
        let (mut t, mut log) = (counter(), Log::default());
        let g = generate(&mut t, &[1, 2], &opts, None, &mut log).unwrap();
        assert_eq!((g.tokens.clone(), g.stop.clone()), (vec![3, 4, 5, 6, 7], StopReason::MaxTokens));
        assert_eq!(log.tokens, g.tokens);
        // One prompt call, then one call per token fed back (not the last).
        assert_eq!(t.calls, [2, 1, 1, 1, 1]);
        assert_eq!((g.prompt_tokens, g.decode_steps), (2, 4));

        let opts = GenerateOptions { max_new_tokens: 50, stop_tokens: vec![5], ..GenerateOptions::default() };
        let g = generate(&mut counter(), &[1, 2], &opts, None, &mut ()).unwrap();
        assert_eq!((g.tokens, g.stop), (vec![3, 4, 5], StopReason::StopToken(5)));

        let opts = GenerateOptions { max_new_tokens: 50, max_context: 4, ..GenerateOptions::default() };
        let g = generate(&mut counter(), &[1, 2], &opts, None, &mut ()).unwrap();
        assert_eq!((g.tokens, g.stop), (vec![3, 4, 5], StopReason::ContextFull));
        let e = generate(&mut counter(), &[1; 5], &opts, None, &mut ()).unwrap_err();
        assert!(matches!(e, GenerateError::PromptTooLong { prompt: 5, max: 4 }), "{e}");

        let mut log = Log { cancel_after: Some(2), ..Log::default() };
        let opts = GenerateOptions { max_new_tokens: 50, ..GenerateOptions::default() };
        let g = generate(&mut counter(), &[1], &opts, None, &mut log).unwrap();
        assert_eq!((g.tokens, g.stop), (vec![2, 3], StopReason::Cancelled));
    }

    #[test]
    fn prompt_chunks_and_continuing_from_logits() {
        let opts = GenerateOptions {
            max_new_tokens: 2,
            prompt_chunk: 2,
            prompt_logits: Logits::All,
            ..GenerateOptions::default()
        };
        let (mut t, mut log) = (counter(), Log::default());
        let g = generate(&mut t, &[0, 1, 2, 3, 4], &opts, None, &mut log).unwrap();
        assert_eq!(t.calls, [2, 2, 1, 1]);
        assert_eq!(log.prompt_rows, 5);
        assert_eq!(g.tokens, [5, 6]);
        // Continue the same sequence from the last logits, with the same sampler.
        let mut sampler = Sampler::new(SamplerConfig::default()).unwrap();
        let last = t.logits.clone();
        let opts = GenerateOptions { max_new_tokens: 2, ..GenerateOptions::default() };
        let g = generate_with(&mut t, Start::Logits(&last), &opts, &mut sampler, None, &mut ()).unwrap();
        assert_eq!(g.tokens, [6, 7]);
        // The penalties' history: the tokens fed (6), not the last one sampled (7).
        assert_eq!(sampler.history(), [6]);
        let g = generate_with(&mut t, Start::Prompt(&[1, 2]), &opts, &mut sampler, None, &mut ()).unwrap();
        assert_eq!(g.tokens, [3, 4]);
        assert_eq!(sampler.history(), [6, 1, 2, 3]);
        assert!(matches!(generate(&mut t, &[], &opts, None, &mut ()), Err(GenerateError::EmptyPrompt)));
        let stops = GenerateOptions { stop_strings: vec!["x".into()], ..opts };
        assert!(matches!(generate(&mut t, &[1], &stops, None, &mut ()), Err(GenerateError::StopStringsNeedText)));
    }

    #[test]
    fn stop_text_without_stops_passes_everything() {
        let s = Vec::new();
        let mut st = StopText { stops: &s, pending: String::new() };
        assert_eq!(st.push("abc"), ("abc".into(), None));
        assert!(st.pending.is_empty());
    }

    #[test]
    fn sampling_defaults_follow_do_sample() {
        use crate::MetaValue;
        use crate::format::Metadata;
        use crate::names::generation_keys as k;
        let m = Metadata::from_entries(vec![
            (k::DO_SAMPLE, MetaValue::Bool(true)),
            (k::TEMPERATURE, MetaValue::F64(0.6)),
            (k::TOP_P, MetaValue::F64(0.95)),
            (k::TOP_K, MetaValue::U64(20)),
        ]);
        let c = sampling_defaults(&m);
        assert_eq!((c.temperature, c.top_k, c.top_p), (0.6, 20, 0.95));
        // Without do_sample transformers decodes greedily whatever the temperature says.
        let m = Metadata::from_entries(vec![(k::TEMPERATURE, MetaValue::F64(0.6))]);
        assert_eq!(sampling_defaults(&m), SamplerConfig::default());
        // Out of range: ignored.
        let m = Metadata::from_entries(vec![(k::DO_SAMPLE, MetaValue::Bool(true)), (k::TOP_P, MetaValue::F64(2.0))]);
        assert_eq!(sampling_defaults(&m).top_p, 1.0);
        // min-p only when sampling; the repetition penalty for greedy decoding too.
        let greedy = Metadata::from_entries(vec![
            (k::MIN_P, MetaValue::F64(0.05)),
            (k::REPETITION_PENALTY, MetaValue::F64(1.1)),
        ]);
        let c = sampling_defaults(&greedy);
        assert_eq!((c.temperature, c.min_p, c.repetition_penalty), (0.0, 0.0, 1.1));
        let m = Metadata::from_entries(vec![(k::DO_SAMPLE, MetaValue::Bool(true)), (k::MIN_P, MetaValue::F64(0.05))]);
        assert_eq!(sampling_defaults(&m).min_p, 0.05);
    }
}
