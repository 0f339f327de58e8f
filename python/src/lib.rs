//! The `meo` Python package (PyO3): convert checkpoints, generate (whole or streamed), chat
//! with the model's template, and evaluate — over the same library calls the `meo` command
//! makes (`meo_converter::convert`, `meo::generate`, `meo::chat`, `meo::eval`), so an option
//! means the same in Python as on the command line. docs/PYTHON.md is the reference; `meo.pyi`
//! (beside this crate's Cargo.toml) holds the type stubs maturin ships in the wheel.
//!
//! Long work (conversion, generation, evaluation) runs with the GIL released; Ctrl-C is
//! checked between tokens (between tensors when converting) and raises `KeyboardInterrupt`.
//! A streamed generation runs on a thread of its own and hands tokens to the iterator over a
//! bounded channel; dropping the iterator stops it.

use meo::chat::{ChatError, ChatTemplate as Template, SpecialTokens};
use meo::generate::{GenerateOptions, Generation, Hooks, StopReason};
use meo::sample::SamplerConfig;
use meo::tokenizer::{Tokenizer, TokenizerError};
use meo::{MergeOptions, PromptPool, Session, SessionOptions};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

create_exception!(meo, MeoError, PyException, "Base class of the errors meo raises.");
create_exception!(meo, ConvertError, MeoError, "A checkpoint could not be converted (the message names the problem).");
create_exception!(
    meo,
    ModelError,
    MeoError,
    "A file is not a model this runtime runs (not a .meo file, corrupt, truncated, or refused)."
);
create_exception!(meo, GenerateError, MeoError, "A generation failed (the model or the output).");
create_exception!(
    meo,
    ChatTemplateError,
    MeoError,
    "The chat template is missing, does not compile, or refused the conversation."
);
create_exception!(meo, EvalError, MeoError, "An evaluation failed (text too short, a refused forward pass).");

/// `e` and its sources, each once (many messages already include their source).
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// FileNotFoundError naming `path` (`what` says what it was to be) when it does not exist.
fn must_exist(path: &Path, what: &str) -> PyResult<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err(format!("{what} {} does not exist", path.display())))
    }
}

fn chat_error(e: ChatError) -> PyErr {
    match e {
        ChatError::Input(_) => PyValueError::new_err(describe(&e)),
        e => ChatTemplateError::new_err(describe(&e)),
    }
}

fn mode_error(e: meo::ModeError) -> PyErr {
    PyValueError::new_err(describe(&e))
}

/// A Python object as JSON text (`json.dumps`), for the template's messages and variables.
fn to_json(py: Python<'_>, v: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    py.import("json")?
        .call_method1("dumps", (v,))
        .and_then(|s| s.extract::<String>())
        .map_err(|e| PyValueError::new_err(format!("{what} cannot be written as JSON: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Conversion

/// Summary of a conversion (what `meo convert` prints).
#[pyclass(module = "meo", frozen, get_all)]
struct ConvertSummary {
    output: String,
    architecture: String,
    tensors: usize,
    file_bytes: u64,
    checkpoint_bytes: u64,
}

#[pymethods]
impl ConvertSummary {
    fn __repr__(&self) -> String {
        format!(
            "ConvertSummary(output={:?}, architecture={:?}, tensors={}, file_bytes={}, checkpoint_bytes={})",
            self.output, self.architecture, self.tensors, self.file_bytes, self.checkpoint_bytes
        )
    }
}

/// Convert a Hugging Face MoE checkpoint directory into one .meo file (`meo convert`).
#[pyfunction]
#[pyo3(signature = (
    hf_dir, output, *, experts = "int8", dense = "f16", align_experts = None, tasks = None,
    merge_weighting = "mean-gate", calib = None, hot_experts = 0.0, compress = None, progress = false
))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    hf_dir: PathBuf,
    output: PathBuf,
    experts: &str,
    dense: &str,
    align_experts: Option<bool>,
    tasks: Option<BTreeMap<String, PathBuf>>,
    merge_weighting: &str,
    calib: Option<PathBuf>,
    hot_experts: f64,
    compress: Option<&str>,
    progress: bool,
) -> PyResult<ConvertSummary> {
    use meo::DType;
    use meo_converter::convert::{Event, Options, convert_with};
    use meo_converter::merges::{MergeSpec, TaskSpec, Weighting};
    let experts = match experts {
        "int8" => DType::Q8_0,
        "int4" => DType::Q4_0,
        "mxfp4" => DType::MXFP4,
        "f16" => DType::F16,
        "f32" => DType::F32,
        e => return Err(PyValueError::new_err(format!("experts={e:?}: expected int8, int4, mxfp4, f16 or f32"))),
    };
    let dense = match dense {
        "int8" => DType::Q8_0,
        "int4" => DType::Q4_0,
        "f16" => DType::F16,
        "f32" => DType::F32,
        d => return Err(PyValueError::new_err(format!("dense={d:?}: expected int8, int4, f16 or f32"))),
    };
    // `--compress METHOD:FRACTION`'s parser.
    let compress: Option<meo_converter::compress::CompressSpec> =
        compress.map(str::parse).transpose().map_err(|e: String| PyValueError::new_err(format!("compress: {e}")))?;
    let weighting: Weighting =
        merge_weighting.parse().map_err(|e: String| PyValueError::new_err(format!("merge_weighting: {e}")))?;
    must_exist(&hf_dir, "checkpoint directory")?;
    let mut task_specs = Vec::new();
    for (name, text) in tasks.unwrap_or_default() {
        must_exist(&text, &format!("calibration text of task {name:?},"))?;
        // The command line's NAME=FILE parser checks the name.
        let spec: TaskSpec = format!("{name}={}", text.display())
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("tasks: {e}")))?;
        task_specs.push(spec);
    }
    if let Some(c) = &calib {
        must_exist(c, "calibration text")?;
    }
    let align = align_experts.unwrap_or(!task_specs.is_empty());
    let opts = Options { experts, dense, align };
    let merges = MergeSpec { tasks: task_specs, weighting, calib, hot_experts, compress };
    let cancel = AtomicBool::new(false);
    let mut interrupt: Option<PyErr> = None;
    let mut warnings: Vec<String> = Vec::new();
    let result = py.detach(|| {
        let target =
            if progress { indicatif::ProgressDrawTarget::stderr() } else { indicatif::ProgressDrawTarget::hidden() };
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), target);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let r = convert_with(&hf_dir, &output, opts, &merges, &cancel, |e| {
            match e {
                Event::Warning { message } => warnings.push(message.to_string()),
                Event::AlignStart { experts } => {
                    bar.set_length(experts as u64);
                    bar.set_message("experts aligned");
                }
                Event::Aligned => bar.inc(1),
                Event::Start { bytes, .. } => {
                    bar.set_position(0);
                    bar.set_length(bytes);
                }
                Event::Tensor { name, bytes } => {
                    bar.inc(bytes);
                    bar.set_message(name.to_string());
                }
            }
            // Ctrl-C: the converter stops at the next tensor and removes its temporary file.
            if interrupt.is_none()
                && let Err(e) = Python::attach(|py| py.check_signals())
            {
                interrupt = Some(e);
                cancel.store(true, Ordering::Relaxed);
            }
        });
        bar.finish_and_clear();
        r
    });
    for w in warnings {
        let msg = std::ffi::CString::new(w.replace('\0', " ")).unwrap_or_default();
        PyErr::warn(py, &py.get_type::<pyo3::exceptions::PyUserWarning>(), &msg, 1)?;
    }
    if let Some(e) = interrupt {
        return Err(e);
    }
    let s = result.map_err(|e| ConvertError::new_err(format!("{e:#}")))?;
    Ok(ConvertSummary {
        output: output.display().to_string(),
        architecture: s.architecture,
        tensors: s.tensors,
        file_bytes: s.file_bytes,
        checkpoint_bytes: s.checkpoint_bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// Chat templates

/// A compiled chat template (Jinja, rendered as transformers' `apply_chat_template` does).
#[pyclass(module = "meo", frozen)]
struct ChatTemplate {
    inner: Template,
}

#[pymethods]
impl ChatTemplate {
    #[new]
    #[pyo3(signature = (source, *, bos_token = None, eos_token = None, pad_token = None, unk_token = None, now = None))]
    fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        pad_token: Option<String>,
        unk_token: Option<String>,
        now: Option<i64>,
    ) -> PyResult<Self> {
        let special = SpecialTokens { bos: bos_token, eos: eos_token, pad: pad_token, unk: unk_token };
        let mut inner = Template::new(source, special).map_err(chat_error)?;
        if let Some(t) = now {
            inner = inner.with_fixed_time(t);
        }
        Ok(Self { inner })
    }

    /// Renders `messages` (a list of dicts: role, content, and any other fields).
    #[pyo3(signature = (messages, *, add_generation_prompt = false, template_vars = None))]
    fn render(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        template_vars: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        render(py, &self.inner, messages, add_generation_prompt, template_vars)
    }
}

fn render(
    py: Python<'_>,
    t: &Template,
    messages: &Bound<'_, PyAny>,
    add_generation_prompt: bool,
    vars: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    let msgs = to_json(py, messages, "messages")?;
    let vars = vars.map(|v| to_json(py, v.as_any(), "template_vars")).transpose()?;
    t.render_json(&msgs, add_generation_prompt, vars.as_deref()).map_err(chat_error)
}

// ---------------------------------------------------------------------------------------------
// Generation

/// The result of a generation.
#[pyclass(module = "meo", frozen, get_all)]
struct Completion {
    /// The generated text (stop strings and the stop token's text left out); None when the
    /// file has no tokenizer.
    text: Option<String>,
    /// The generated token ids (a final stop token included, as in transformers' `generate`).
    tokens: Vec<u32>,
    /// Why it ended: "max_tokens", "stop_token", "stop_string", "context_full" or "cancelled".
    stop_reason: &'static str,
    prompt_tokens: usize,
    prompt_seconds: f64,
    decode_steps: usize,
    decode_seconds: f64,
}

#[pymethods]
impl Completion {
    fn __repr__(&self) -> String {
        format!(
            "Completion(text={:?}, tokens={:?}, stop_reason={:?}, prompt_tokens={})",
            self.text, self.tokens, self.stop_reason, self.prompt_tokens
        )
    }
}

fn completion(g: Generation, text: Option<String>) -> Completion {
    Completion {
        text,
        stop_reason: match g.stop {
            StopReason::MaxTokens => "max_tokens",
            StopReason::StopToken(_) => "stop_token",
            StopReason::StopString(_) => "stop_string",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        },
        prompt_tokens: g.prompt_tokens,
        prompt_seconds: g.prompt_time.as_secs_f64(),
        decode_steps: g.decode_steps,
        decode_seconds: g.decode_time.as_secs_f64(),
        tokens: g.tokens,
    }
}

/// One piece of a streamed generation.
#[pyclass(module = "meo", frozen, get_all)]
struct Chunk {
    /// The generated token id; None for the final piece of held-back text.
    token: Option<u32>,
    /// The text this token completes (may be empty).
    text: String,
}

#[pymethods]
impl Chunk {
    fn __repr__(&self) -> String {
        format!("Chunk(token={:?}, text={:?})", self.token, self.text)
    }
}

/// Everything a generation needs, owned, so that it can run on another thread.
struct Job {
    model: Arc<meo::Model>,
    tokenizer: Option<Arc<Tokenizer>>,
    threads: usize,
    mode: MergeOptions,
    kv: meo::KvOptions,
    prompt: Vec<u32>,
    opts: GenerateOptions,
}

impl Job {
    fn run(&self, hooks: &mut dyn Hooks) -> PyResult<Generation> {
        let mut s =
            Session::new(&self.model, SessionOptions { threads: self.threads, kv: self.kv, ..Default::default() })
                .map_err(|e| GenerateError::new_err(describe(&e)))?;
        s.set_mode(self.mode.clone()).map_err(mode_error)?;
        meo::generate::generate(&mut s, &self.prompt, &self.opts, self.tokenizer.as_deref(), hooks).map_err(|e| match e
        {
            meo::generate::GenerateError::Sample(_)
            | meo::generate::GenerateError::EmptyPrompt
            | meo::generate::GenerateError::PromptTooLong { .. }
            | meo::generate::GenerateError::EmptyStopString
            | meo::generate::GenerateError::StopStringsNeedText => PyValueError::new_err(describe(&e)),
            e => GenerateError::new_err(describe(&e)),
        })
    }
}

/// Collects the text; polls Ctrl-C between tokens.
#[derive(Default)]
struct Collect {
    text: String,
    interrupt: Option<PyErr>,
}

impl Hooks for Collect {
    fn on_token(&mut self, _id: u32, text: &str) -> Result<bool, meo::generate::GenerateError> {
        self.text.push_str(text);
        Ok(true)
    }
    fn on_text_end(&mut self, text: &str) -> Result<(), meo::generate::GenerateError> {
        self.text.push_str(text);
        Ok(())
    }
    fn cancelled(&mut self) -> bool {
        if self.interrupt.is_none()
            && let Err(e) = Python::attach(|py| py.check_signals())
        {
            self.interrupt = Some(e);
        }
        self.interrupt.is_some()
    }
}

enum Msg {
    Chunk(Option<u32>, String),
    Done(PyResult<Completion>),
}

/// Sends each token to the iterator; stops when it is dropped.
struct Streamer {
    tx: SyncSender<Msg>,
    cancel: Arc<AtomicBool>,
    text: Option<String>,
}

impl Hooks for Streamer {
    fn on_token(&mut self, id: u32, text: &str) -> Result<bool, meo::generate::GenerateError> {
        if let Some(t) = &mut self.text {
            t.push_str(text);
        }
        Ok(self.tx.send(Msg::Chunk(Some(id), text.to_string())).is_ok())
    }
    fn on_text_end(&mut self, text: &str) -> Result<(), meo::generate::GenerateError> {
        if !text.is_empty() {
            if let Some(t) = &mut self.text {
                t.push_str(text);
            }
            // A closed iterator wants nothing more.
            let _ = self.tx.send(Msg::Chunk(None, text.to_string()));
        }
        Ok(())
    }
    fn cancelled(&mut self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// An iterator over a generation's [`Chunk`]s; `completion` is set once it is exhausted.
#[pyclass(module = "meo", frozen)]
struct TokenStream {
    rx: Mutex<Receiver<Msg>>,
    cancel: Arc<AtomicBool>,
    done: Mutex<Option<Py<Completion>>>,
    /// The generation failed (its error was raised).
    failed: AtomicBool,
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        // The generation thread stops before its next forward call; it owns what it uses.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Chunk>> {
        if self.failed.load(Ordering::Relaxed)
            || self.done.lock().map_err(|_| GenerateError::new_err("stream state poisoned"))?.is_some()
        {
            return Ok(None);
        }
        let msg = py.detach(|| self.rx.lock().map(|rx| rx.recv()).map_err(|_| ()));
        match msg {
            Ok(Ok(Msg::Chunk(token, text))) => Ok(Some(Chunk { token, text })),
            Ok(Ok(Msg::Done(r))) => {
                let c = match r {
                    Ok(c) => Py::new(py, c)?,
                    Err(e) => {
                        // Raised once; the iterator then stays exhausted.
                        self.failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                };
                *self.done.lock().map_err(|_| GenerateError::new_err("stream state poisoned"))? = Some(c);
                Ok(None)
            }
            Ok(Err(_)) => Err(GenerateError::new_err("the generation thread ended without a result")),
            Err(_) => Err(GenerateError::new_err("stream state poisoned")),
        }
    }

    /// The finished generation (None until the iterator is exhausted).
    #[getter]
    fn completion(&self, py: Python<'_>) -> Option<Py<Completion>> {
        self.done.lock().ok().and_then(|d| d.as_ref().map(|c| c.clone_ref(py)))
    }

    /// Stops the generation (the iterator then ends with stop_reason "cancelled").
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Tokens the iterator may hold before the generation waits for the consumer.
const STREAM_BUFFER: usize = 64;

fn run_job(py: Python<'_>, job: Job, stream: bool) -> PyResult<Py<PyAny>> {
    let has_text = job.tokenizer.is_some();
    if !stream {
        let mut hooks = Collect::default();
        let g = py.detach(|| job.run(&mut hooks));
        if let Some(e) = hooks.interrupt {
            return Err(e);
        }
        let c = completion(g?, has_text.then_some(hooks.text));
        return Ok(Py::new(py, c)?.into_any());
    }
    let (tx, rx) = sync_channel(STREAM_BUFFER);
    let cancel = Arc::new(AtomicBool::new(false));
    let mut hooks = Streamer { tx: tx.clone(), cancel: cancel.clone(), text: has_text.then(String::new) };
    std::thread::Builder::new()
        .name("meo-generate".into())
        .spawn(move || {
            let r = job.run(&mut hooks);
            let r = r.map(|g| completion(g, hooks.text.take()));
            let _ = tx.send(Msg::Done(r));
        })
        .map_err(|e| GenerateError::new_err(format!("cannot start the generation thread: {e}")))?;
    Ok(Py::new(py, TokenStream { rx: Mutex::new(rx), cancel, done: Mutex::new(None), failed: AtomicBool::new(false) })?
        .into_any())
}

/// Sampling options as `meo run` takes them; `None` means the file's generation default.
struct Sampling {
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    presence_penalty: f32,
    frequency_penalty: f32,
    repeat_last_n: usize,
    seed: u64,
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// What `Model.eval` measured (as `meo eval` reports it; see docs/CLI.md).
#[pyclass(module = "meo", frozen, get_all)]
struct EvalReport {
    mode: String,
    merged_layers: Vec<usize>,
    windows: usize,
    scored_tokens: usize,
    perplexity: f64,
    vanilla_perplexity: f64,
    next_token_agreement: f64,
    kl_vs_vanilla: f64,
    merge_error_per_layer: BTreeMap<usize, f64>,
    expert_bytes_per_token: f64,
    vanilla_expert_bytes_per_token: f64,
}

#[pymethods]
impl EvalReport {
    fn __repr__(&self) -> String {
        format!(
            "EvalReport(mode={:?}, windows={}, scored_tokens={}, perplexity={}, vanilla_perplexity={}, \
             next_token_agreement={}, kl_vs_vanilla={})",
            self.mode,
            self.windows,
            self.scored_tokens,
            self.perplexity,
            self.vanilla_perplexity,
            self.next_token_agreement,
            self.kl_vs_vanilla
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// A .meo model, memory-mapped (only the experts routing selects are read).
#[pyclass(module = "meo", frozen)]
struct Model {
    inner: Arc<meo::Model>,
    path: PathBuf,
    tokenizer: Option<Arc<Tokenizer>>,
    threads: usize,
    mode: MergeOptions,
    kv: meo::KvOptions,
}

impl Model {
    fn tokenizer(&self) -> PyResult<&Arc<Tokenizer>> {
        self.tokenizer.as_ref().ok_or_else(|| {
            PyValueError::new_err(format!(
                "{} has no embedded tokenizer: give the prompt as a list of token ids",
                self.path.display()
            ))
        })
    }

    fn template(&self, name: Option<&str>) -> PyResult<Template> {
        let file = self.inner.file().map_err(|e| ModelError::new_err(describe(&e)))?;
        match name {
            Some(n) => Template::from_metadata_named(&file.metadata, n),
            None => Template::from_metadata(&file.metadata),
        }
        .map_err(chat_error)
    }

    fn options(&self, max_new_tokens: usize, s: Sampling, stop: Option<Vec<String>>) -> GenerateOptions {
        let d = self.inner.file().map(|f| meo::generate::sampling_defaults(&f.metadata)).unwrap_or_default();
        let sampling = SamplerConfig {
            temperature: s.temperature.unwrap_or(d.temperature),
            top_k: s.top_k.unwrap_or(d.top_k),
            top_p: s.top_p.unwrap_or(d.top_p),
            min_p: s.min_p.unwrap_or(d.min_p),
            repetition_penalty: s.repeat_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            penalty_last_n: s.repeat_last_n,
            seed: s.seed,
        };
        GenerateOptions {
            max_new_tokens,
            sampling,
            stop_strings: stop.unwrap_or_default(),
            ..GenerateOptions::for_model(self.inner.config())
        }
    }

    fn job(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Job {
        Job {
            model: self.inner.clone(),
            tokenizer: self.tokenizer.clone(),
            threads: self.threads,
            mode: self.mode.clone(),
            kv: self.kv,
            prompt,
            opts,
        }
    }
}

/// A prompt: text (encoded with the file's tokenizer) or token ids.
#[derive(FromPyObject)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

fn tokenizer_error(e: TokenizerError) -> PyErr {
    PyValueError::new_err(describe(&e))
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, *, threads = 0, mode = None, merge_layers = "all", merge_budget = 0.25, prompt_pool = "mean-gate", kv = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: usize,
        mode: Option<&str>,
        merge_layers: &str,
        merge_budget: f64,
        prompt_pool: &str,
        kv: &str,
    ) -> PyResult<Self> {
        let kv = meo::KvOptions {
            dtype: kv.parse().map_err(|e| PyValueError::new_err(describe(&e)))?,
            ..Default::default()
        };
        must_exist(&path, "model file")?;
        let pool = match prompt_pool {
            "mean-gate" => PromptPool::MeanGate,
            "pooled-input" => PromptPool::PooledInput,
            p => return Err(PyValueError::new_err(format!("prompt_pool={p:?}: expected mean-gate or pooled-input"))),
        };
        let model = py.detach(|| -> PyResult<meo::Model> {
            let ctx = |e: &dyn std::error::Error| {
                ModelError::new_err(format!("cannot open {}: {}", path.display(), describe(e)))
            };
            let map = meo::residency::map_lazy(&path).map_err(|e| ctx(&e))?;
            meo::Model::from_mapped(map).map_err(|e| ctx(&e))
        })?;
        let tokenizer = match model.file().map(|f| Tokenizer::from_metadata(&f.metadata)) {
            Ok(Ok(t)) => Some(Arc::new(t)),
            Ok(Err(TokenizerError::Missing)) => None,
            Ok(Err(e)) => return Err(ModelError::new_err(format!("{}: {}", path.display(), describe(&e)))),
            Err(e) => return Err(ModelError::new_err(format!("{}: {}", path.display(), describe(&e)))),
        };
        let mode = MergeOptions::from_spellings(&model, mode, pool, merge_layers, merge_budget).map_err(mode_error)?;
        // Refuse a mode the file cannot run (an unknown task) now rather than at the first call.
        Session::new(&model, SessionOptions { threads: 1, ..Default::default() })
            .map_err(|e| ModelError::new_err(describe(&e)))?
            .set_mode(mode.clone())
            .map_err(mode_error)?;
        Ok(Self { inner: Arc::new(model), path, tokenizer, threads, mode, kv })
    }

    /// The file's path.
    #[getter]
    fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// The model family (`mixtral`, `qwen3_moe`, …).
    #[getter]
    fn architecture(&self) -> String {
        self.inner.config().architecture.clone()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config().vocab_size
    }

    /// Most positions (prompt + generated) a sequence may have.
    #[getter]
    fn context_length(&self) -> usize {
        self.inner.config().max_position_embeddings
    }

    /// The routing mode every call uses (`vanilla`, `prompt`, `task:NAME`).
    #[getter]
    fn mode(&self) -> String {
        self.mode.mode.spelling()
    }

    /// How sessions store the KV cache (`f32`, `f16`, `int8`).
    #[getter]
    fn kv(&self) -> &'static str {
        self.kv.dtype.name()
    }

    /// Whether the file embeds a tokenizer (text prompts need one).
    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({:?}, architecture={:?}, mode={:?})",
            self.path.display().to_string(),
            self.architecture(),
            self.mode()
        )
    }

    /// Text to token ids with the file's tokenizer.
    #[pyo3(signature = (text, *, add_special_tokens = true))]
    fn tokenize(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let t = self.tokenizer()?;
        if add_special_tokens { t.encode(text) } else { t.encode_without_special_tokens(text) }.map_err(tokenizer_error)
    }

    /// Token ids to text with the file's tokenizer.
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        self.tokenizer()?.decode(&ids).map_err(tokenizer_error)
    }

    /// Generates a continuation of `prompt` (text or token ids), as `meo run` does.
    #[pyo3(signature = (
        prompt, *, max_new_tokens = 64, temperature = None, top_k = None, top_p = None, min_p = None,
        repeat_penalty = None, presence_penalty = 0.0, frequency_penalty = 0.0, repeat_last_n = 0, seed = 0,
        stop = None, stream = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_new_tokens: usize,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repeat_penalty: Option<f32>,
        presence_penalty: f32,
        frequency_penalty: f32,
        repeat_last_n: usize,
        seed: u64,
        stop: Option<Vec<String>>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let s = Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty,
            frequency_penalty,
            repeat_last_n,
            seed,
        };
        let ids = match prompt {
            Prompt::Text(t) => self.tokenizer()?.encode(&t).map_err(tokenizer_error)?,
            Prompt::Ids(ids) => {
                let vocab = self.inner.config().vocab_size;
                if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
                    return Err(PyValueError::new_err(format!(
                        "token id {t} at index {i} is out of range (vocabulary has {vocab} tokens)"
                    )));
                }
                ids
            }
        };
        let opts = self.options(max_new_tokens, s, stop);
        run_job(py, self.job(ids, opts), stream)
    }

    /// Replies to a conversation (a list of {"role", "content", …} dicts) with the model's chat
    /// template, as `meo run --chat` does; stops at the end of the assistant's turn.
    #[pyo3(signature = (
        messages, *, max_new_tokens = 512, template = None, template_vars = None, temperature = None, top_k = None,
        top_p = None, min_p = None, repeat_penalty = None, presence_penalty = 0.0, frequency_penalty = 0.0,
        repeat_last_n = 0, seed = 0, stop = None, stream = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        template: Option<&str>,
        template_vars: Option<&Bound<'_, PyDict>>,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repeat_penalty: Option<f32>,
        presence_penalty: f32,
        frequency_penalty: f32,
        repeat_last_n: usize,
        seed: u64,
        stop: Option<Vec<String>>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let s = Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty,
            frequency_penalty,
            repeat_last_n,
            seed,
        };
        let tok = self.tokenizer()?.clone();
        let t = self.template(template)?;
        let text = render(py, &t, messages, true, template_vars)?;
        let ids = tok.encode_without_special_tokens(&text).map_err(tokenizer_error)?;
        let mut opts = self.options(max_new_tokens, s, stop);
        opts.stop_tokens = meo::chat::stop_tokens(&opts, &t, &tok);
        run_job(py, self.job(ids, opts), stream)
    }

    /// Renders a conversation with the model's chat template (the prompt `chat` feeds).
    #[pyo3(signature = (messages, *, add_generation_prompt = true, template = None, template_vars = None))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        template: Option<&str>,
        template_vars: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let t = self.template(template)?;
        render(py, &t, messages, add_generation_prompt, template_vars)
    }

    /// Measures this model's routing mode against vanilla on `text`, as `meo eval` does.
    #[pyo3(signature = (text, *, window = 128, prompt_len = 32, max_windows = 0))]
    fn eval(
        &self,
        py: Python<'_>,
        text: &str,
        window: usize,
        prompt_len: usize,
        max_windows: usize,
    ) -> PyResult<EvalReport> {
        let opts = meo::eval::EvalOptions { window, prompt_len, max_windows, threads: self.threads, kv: self.kv };
        let r = py.detach(|| meo::eval::evaluate(&self.inner, text, &self.mode, &opts)).map_err(|e| match e {
            meo::eval::EvalError::BadWindow { .. } | meo::eval::EvalError::TooShort { .. } => {
                PyValueError::new_err(describe(&e))
            }
            e => EvalError::new_err(describe(&e)),
        })?;
        Ok(EvalReport {
            mode: r.mode,
            merged_layers: r.merged_layers,
            windows: r.windows,
            scored_tokens: r.scored_tokens,
            perplexity: r.perplexity,
            vanilla_perplexity: r.vanilla_perplexity,
            next_token_agreement: r.agreement,
            kl_vs_vanilla: r.kl,
            merge_error_per_layer: r.merge_error,
            expert_bytes_per_token: r.expert_bytes_per_token,
            vanilla_expert_bytes_per_token: r.vanilla_expert_bytes_per_token,
        })
    }
}

/// The module: `import meo`.
#[pymodule]
#[pyo3(name = "meo")]
fn meo_python(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<Completion>()?;
    m.add_class::<Chunk>()?;
    m.add_class::<TokenStream>()?;
    m.add_class::<ChatTemplate>()?;
    m.add_class::<EvalReport>()?;
    m.add_class::<ConvertSummary>()?;
    m.add("MeoError", py.get_type::<MeoError>())?;
    m.add("ConvertError", py.get_type::<ConvertError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("GenerateError", py.get_type::<GenerateError>())?;
    m.add("ChatTemplateError", py.get_type::<ChatTemplateError>())?;
    m.add("EvalError", py.get_type::<EvalError>())?;
    Ok(())
}
