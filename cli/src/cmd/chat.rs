//! `meo chat FILE`: an interactive multi-turn chat in the terminal, with the model's own chat
//! template ([`meo::chat`]).
//!
//! One line of input is one user message; the reply is streamed to stdout. Commands:
//! `/reset` forgets the conversation (the system prompt stays), `/exit` (or end of input)
//! quits, `/help` lists them. The KV cache is kept across turns: each turn renders the whole
//! conversation, and only the tokens after what the cache already holds are fed
//! ([`meo::chat::Conversation`]). When the conversation no longer fits in the context, the
//! earlier turns are forgotten (the system prompt kept) and a note says so on stderr.
//! `--verbose` prints one line per turn on stderr: tokens in the conversation, reused from
//! the cache, fed, generated. Ctrl-C during a reply stops the reply (what was generated stays
//! in the conversation); at the prompt it quits.

use super::open_model;
use super::run::SamplingArgs;
use super::target::{RunOptions, TargetArgs, open_target};
use anyhow::{Context, Result};
use meo::chat::{CacheUse, ChatTemplate, Conversation};
use meo::generate::{GenerateError, GenerateOptions, Hooks, StopReason};
use meo::sample::Sampler;
use meo::tokenizer::Tokenizer;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Chat with a model in the terminal (its chat template, multi-turn, streamed).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file (it must embed a tokenizer and a chat template).
    pub file: PathBuf,
    /// System prompt, kept across /reset and context resets.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Extra chat-template variables, a JSON object, e.g. '{"enable_thinking": false}' (Qwen3)
    /// or '{"reasoning_effort": "low"}' (gpt-oss).
    #[arg(long, value_name = "JSON")]
    pub template_vars: Option<String>,
    /// Use the file's chat template with this name (`meo inspect` lists them) instead of the
    /// default one.
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// Worker threads (0 = one per physical core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub memory: super::memory::MemoryArgs,
    /// One line per turn on stderr: conversation tokens, tokens reused from the cache, fed,
    /// generated, why the reply stopped.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
}

/// Runs `meo chat` on the process's stdin, stdout and stderr.
///
/// # Errors
/// As [`chat_with`].
pub fn run(a: &Args) -> Result<()> {
    // Ctrl-C stops a reply; outside one it quits as it would without a handler.
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            INTERRUPT.store(true, Ordering::SeqCst);
        } else {
            eprintln!();
            std::process::exit(130);
        }
    });
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    chat_with(a, &mut stdin.lock(), interactive, &mut std::io::stdout().lock(), &mut std::io::stderr().lock())
}

/// A reply is being generated (Ctrl-C stops it rather than quitting).
static GENERATING: AtomicBool = AtomicBool::new(false);
/// Ctrl-C was pressed during the reply.
static INTERRUPT: AtomicBool = AtomicBool::new(false);

/// The model's chat template (`name`, or the default), or an error that says what to do.
///
/// # Errors
/// The file has no such template or it does not compile.
pub fn template(model: &meo::Model, name: Option<&str>) -> Result<ChatTemplate> {
    let file = model.file()?;
    let t = match name {
        Some(n) => ChatTemplate::from_metadata_named(&file.metadata, n),
        None => ChatTemplate::from_metadata(&file.metadata),
    };
    Ok(t?)
}

/// Streams the reply text to the output; routing goes to the residency tracker.
struct Stream<'a, 'm> {
    out: &'a mut dyn Write,
    tracker: &'a mut meo::residency::ExpertTracker<'m>,
}

impl Hooks for Stream<'_, '_> {
    fn trace(&mut self, _prompt: bool) -> Option<&mut dyn meo::Trace> {
        Some(&mut *self.tracker)
    }
    fn after_forward(&mut self, _prompt: bool) {
        self.tracker.take_step_bytes();
    }
    fn on_token(&mut self, _id: u32, text: &str) -> Result<bool, GenerateError> {
        if !text.is_empty() {
            self.out.write_all(text.as_bytes()).and_then(|()| self.out.flush()).map_err(GenerateError::Output)?;
        }
        Ok(true)
    }
    fn on_text_end(&mut self, text: &str) -> Result<(), GenerateError> {
        self.out.write_all(text.as_bytes()).map_err(GenerateError::Output)
    }
    fn cancelled(&mut self) -> bool {
        INTERRUPT.swap(false, Ordering::SeqCst)
    }
}

/// Runs a chat reading user lines from `input`; `interactive` prints a `> ` prompt and a
/// greeting (for a terminal).
///
/// # Errors
/// The model cannot be opened, has no tokenizer or chat template, bad flags, or I/O. A
/// turn that fails (a template error, a message too long) is reported on `stderr` and the
/// chat goes on.
pub fn chat_with(
    a: &Args,
    input: &mut dyn BufRead,
    interactive: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<()> {
    let model = open_model(&a.file)?;
    let tok = Tokenizer::from_metadata(&model.file()?.metadata)?;
    let template = template(&model, a.template.as_deref())?;
    let run = RunOptions {
        threads: a.threads,
        memory_budget: a.memory.explicit(),
        kv: a.kv.options(),
        ..RunOptions::default()
    };
    // The model's budget and prediction (before this, `--memory-budget` was accepted and unused).
    let mut tracker = meo::residency::ExpertTracker::for_model(&model, a.memory.tracker_options())?;
    let (mut opened, _) = open_target(&model, &a.target, &run)?;
    a.memory.apply_on_miss(&mut opened)?;
    let mut sampler = Sampler::new(a.sampling.config(&model))?;
    let base = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_strings: a.sampling.stop.clone(),
        ..GenerateOptions::for_model(model.config())
    };
    let opts = GenerateOptions { stop_tokens: meo::chat::stop_tokens(&base, &template, &tok), ..base };
    let mut conv = Conversation::new(template, a.system.clone());
    conv.set_vars(a.template_vars.clone()).context("--template-vars")?;
    let target = opened.target();
    if interactive {
        writeln!(
            stderr,
            "meo chat: {} (context {} tokens). /reset forgets the conversation, /exit quits.",
            a.file.display(),
            target.max_context()
        )?;
    }
    let mut turn_no = 0usize;
    let mut line = String::new();
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conv.reset(target);
                sampler.clear_history();
                writeln!(stderr, "(conversation reset; the system prompt is kept)")?;
                continue;
            }
            "/help" => {
                writeln!(stderr, "/reset  forget the conversation (keeps --system)\n/exit   quit")?;
                continue;
            }
            _ => {}
        }
        turn_no += 1;
        INTERRUPT.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let t = conv.turn(
            target,
            text,
            &opts,
            &mut sampler,
            &tok,
            &mut Stream { out: &mut *stdout, tracker: &mut tracker },
        );
        GENERATING.store(false, Ordering::SeqCst);
        let t = match t {
            Ok(t) => t,
            Err(meo::chat::TurnError::Generate(GenerateError::Output(e))) => return Err(e.into()),
            Err(e) => {
                writeln!(stderr, "error: {e}")?;
                continue;
            }
        };
        writeln!(stdout)?;
        stdout.flush()?;
        match t.cache {
            CacheUse::Reused => {}
            CacheUse::Rewound { common } => {
                if a.verbose {
                    writeln!(
                        stderr,
                        "(the conversation re-rendered differently after {common} cached tokens: recomputed from there)"
                    )?;
                }
            }
            CacheUse::Reset => writeln!(
                stderr,
                "(the conversation re-rendered differently from the cache; this target cannot cut its cache: recomputed it all)"
            )?,
            CacheUse::ContextReset { dropped_messages } => writeln!(
                stderr,
                "(context full: forgot the {dropped_messages} earlier messages, kept the system prompt)"
            )?,
        }
        if t.generation.stop == StopReason::Cancelled {
            writeln!(stderr, "(interrupted; the partial reply stays in the conversation)")?;
        }
        if t.generation.stop == StopReason::ContextFull {
            writeln!(
                stderr,
                "(the reply filled the context and was cut; the next message starts a fresh conversation)"
            )?;
        }
        if a.verbose {
            let stop = match &t.generation.stop {
                StopReason::MaxTokens => "max tokens".to_string(),
                StopReason::StopToken(id) => format!("stop token {id}"),
                StopReason::StopString(i) => format!("stop string {i}"),
                StopReason::ContextFull => "context full".to_string(),
                StopReason::Cancelled => "cancelled".to_string(),
            };
            writeln!(
                stderr,
                "[turn {turn_no}] conversation {} tokens, reused {}, fed {}, generated {} ({stop}), {:.1} tok/s",
                t.conversation_tokens,
                t.reused,
                t.fed,
                t.generation.tokens.len(),
                rate(t.generation.decode_steps, t.generation.decode_time)
            )?;
        }
    }
    Ok(())
}

fn rate(n: usize, d: std::time::Duration) -> f64 {
    if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
}
