//! `meo serve FILE [--host 127.0.0.1] [--port 8080]`: an OpenAI-compatible HTTP server (axum).
//!
//! Endpoints: `POST /v1/chat/completions` (the model's chat template), `POST /v1/completions`
//! (plain text), both streamed with server-sent events (`"stream": true`) or not; `GET
//! /v1/models`; `GET /health`. Every non-streamed answer carries `usage` (prompt, completion
//! and total tokens), as the OpenAI API defines it; a streamed one does with
//! `"stream_options": {"include_usage": true}`.
//!
//! Each session keeps what its KV cache holds after a request: a request whose prompt starts
//! with it (the next turn of a conversation, resent whole) feeds only the rest, on the free
//! session that shares the longest prefix (`usage.prompt_tokens_details.cached_tokens`).
//!
//! Concurrency: `--parallel N` sessions over the one mapped model, each request runs on one
//! (a blocking thread; the HTTP side stays responsive); requests beyond those wait, at most
//! `--queue` of them, and further ones get 503. Limits: request bodies over `--max-body`
//! bytes get 413, `max_tokens` over `--max-tokens-limit` and prompts that leave no room in
//! the context get 400, with an OpenAI-style error body (`{"error": {"message", "type",
//! "param", "code"}}`). Bound to 127.0.0.1 unless `--host` says otherwise.

use super::open_model;
use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meo::chat::{ChatTemplate, Message};
use meo::generate::{GenerateError, GenerateOptions, Hooks, Start, StopReason, generate_with};
use meo::sample::{Sampler, SamplerConfig};
use meo::tokenizer::Tokenizer;
use meo::{Model, Session, SessionOptions};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Serve a model over an OpenAI-compatible HTTP API.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sessions that generate at the same time (each holds its own KV cache).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel: usize,
    /// Requests that may wait for a session; more get 503.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub queue: usize,
    /// Worker threads per session (0 = one per physical core, shared by the sessions).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Positions per session (0 = 4096, or the model's maximum if smaller).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub ctx_size: usize,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// Largest `max_tokens` a request may ask for; also the default when it asks for none.
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub max_tokens_limit: usize,
    /// Largest request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_body: usize,
    /// The model name the API reports (default: the file name without `.meo`).
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
}

/// What every request handler shares.
struct Shared {
    tok: Tokenizer,
    template: Option<ChatTemplate>,
    /// Sessions not in use, each with the tokens its KV cache holds (a later request that
    /// starts with them feeds only the rest).
    free: Mutex<Vec<(Session<'static>, Vec<u32>)>>,
    /// Permits for the sessions.
    permits: Arc<tokio::sync::Semaphore>,
    /// Requests generating or waiting for a session; at most `parallel + queue`.
    active: AtomicUsize,
    parallel: usize,
    queue: usize,
    /// Positions per session.
    context: usize,
    name: String,
    max_tokens_limit: usize,
    stop_tokens: Vec<u32>,
}

/// An OpenAI-style error.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

/// Runs `meo serve` until the process is stopped.
///
/// # Errors
/// The model cannot be opened or has no tokenizer, the address cannot be bound.
pub fn run(a: &Args) -> Result<()> {
    let model: &'static Model = Box::leak(Box::new(open_model(&a.file)?));
    let meta = &model.file()?.metadata;
    let tok = Tokenizer::from_metadata(meta)?;
    let template = match ChatTemplate::from_metadata(meta) {
        Ok(t) => Some(t),
        Err(meo::chat::ChatError::NoTemplate) => None,
        Err(e) => return Err(e).context("the model's chat template"),
    };
    let parallel = a.parallel.max(1);
    let mut sessions = Vec::with_capacity(parallel);
    let opts = SessionOptions { threads: a.threads, max_context: a.ctx_size, kv: a.kv.options() };
    for _ in 0..parallel {
        sessions.push((Session::new(model, opts)?, Vec::new()));
    }
    let base = GenerateOptions::for_model(model.config());
    let stop_tokens = match &template {
        Some(t) => meo::chat::stop_tokens(&base, t, &tok),
        None => base.stop_tokens.clone(),
    };
    let name = a
        .model_name
        .clone()
        .unwrap_or_else(|| a.file.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()));
    let shared = Arc::new(Shared {
        tok,
        template,
        free: Mutex::new(sessions),
        permits: Arc::new(tokio::sync::Semaphore::new(parallel)),
        active: AtomicUsize::new(0),
        parallel,
        queue: a.queue,
        context: opts.context_for(model.config()),
        name,
        max_tokens_limit: a.max_tokens_limit,
        stop_tokens,
    });
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .layer(DefaultBodyLimit::max(a.max_body))
        .with_state(shared.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener =
            tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "meo serve: {} ({} sessions, context {} tokens, chat template: {}) on http://{local}",
            a.file.display(),
            parallel,
            shared.context,
            if shared.template.is_some() { "yes" } else { "no" }
        );
        axum::serve(listener, app).await.context("serving")
    })
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "meo"}]}))
}

/// The request's options common to both endpoints.
struct Request {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplerConfig,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn f32_field(body: &Value, key: &'static str, default: f32) -> Result<f32, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            v.as_f64().map(|x| x as f32).ok_or_else(|| ApiError::bad(format!("{key} must be a number"), Some(key)))
        }
    }
}

fn usize_field(body: &Value, key: &'static str) -> Result<Option<usize>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{key} must be a non-negative integer"), Some(key))),
    }
}

/// The options of a request body (the prompt is filled in by the endpoint).
fn parse_options(s: &Shared, body: &Value) -> Result<Request, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object", None));
    }
    if let Some(n) = usize_field(body, "n")?
        && n != 1
    {
        return Err(ApiError::bad("only n = 1 is supported", Some("n")));
    }
    let max_tokens =
        usize_field(body, "max_completion_tokens")?.or(usize_field(body, "max_tokens")?).unwrap_or(s.max_tokens_limit);
    if max_tokens > s.max_tokens_limit {
        return Err(ApiError::bad(
            format!(
                "max_tokens is {max_tokens}, this server allows at most {} (--max-tokens-limit)",
                s.max_tokens_limit
            ),
            Some("max_tokens"),
        ));
    }
    let stops = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop must be a string or a list of strings", Some("stop")))?,
        Some(_) => return Err(ApiError::bad("stop must be a string or a list of strings", Some("stop"))),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad("a stop string must not be empty", Some("stop")));
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|x| x as u64))
            .ok_or_else(|| ApiError::bad("seed must be an integer", Some("seed")))?,
    };
    let sampling = SamplerConfig {
        // The OpenAI default temperature is 1.
        temperature: f32_field(body, "temperature", 1.0)?,
        top_k: usize_field(body, "top_k")?.unwrap_or(0),
        top_p: f32_field(body, "top_p", 1.0)?,
        min_p: f32_field(body, "min_p", 0.0)?,
        repetition_penalty: f32_field(body, "repetition_penalty", 1.0)?,
        presence_penalty: f32_field(body, "presence_penalty", 0.0)?,
        frequency_penalty: f32_field(body, "frequency_penalty", 0.0)?,
        penalty_last_n: 0,
        seed,
    };
    sampling.validate().map_err(|e| ApiError::bad(e.to_string(), None))?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage =
        body.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    Ok(Request { prompt: Vec::new(), max_tokens, sampling, stops, stream, include_usage })
}

/// A message's content: a string, or a list of parts whose `text` parts are joined.
fn content_text(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => return Err(ApiError::bad("only text content parts are supported", Some("messages"))),
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad("a message's content must be a string or a list of parts", Some("messages"))),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{:x}{:04x}", unix_now(), N.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

async fn chat_completions(
    State(s): State<Arc<Shared>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return rejection(e),
    };
    let r = (|| {
        let Some(t) = &s.template else {
            return Err(ApiError::bad(
                "this model has no chat template (metadata key \"tokenizer.chat_template\" is missing): use /v1/completions",
                None,
            ));
        };
        let msgs = body
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::bad("messages must be a list", Some("messages")))?;
        if msgs.is_empty() {
            return Err(ApiError::bad("messages must not be empty", Some("messages")));
        }
        let mut list = Vec::with_capacity(msgs.len());
        for m in msgs {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("every message needs a string role", Some("messages")))?;
            list.push(Message::new(role, content_text(m.get("content"))?));
        }
        let mut r = parse_options(&s, &body)?;
        // Template variables: `chat_template_kwargs` (as vLLM and llama-server take them, e.g.
        // {"enable_thinking": false}) and the request's `tools`.
        let mut vars = match body.get("chat_template_kwargs") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => {
                return Err(ApiError::bad("chat_template_kwargs must be an object", Some("chat_template_kwargs")));
            }
        };
        if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
            vars.insert("tools".into(), tools.clone());
        }
        let vars = (!vars.is_empty()).then(|| Value::Object(vars).to_string());
        let text =
            t.render(&list, true, vars.as_deref()).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        r.prompt = s.tok.encode_without_special_tokens(&text).map_err(|e| ApiError::bad(e.to_string(), None))?;
        if r.prompt.is_empty() {
            return Err(ApiError::bad("the chat template rendered nothing to feed", Some("messages")));
        }
        Ok(r)
    })();
    match r {
        Ok(r) => respond(s, r, true).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(s): State<Arc<Shared>>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return rejection(e),
    };
    let r = (|| {
        let prompt = match body.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            Some(Value::Array(v)) if v.len() == 1 && v[0].is_string() => v[0].as_str().unwrap_or_default().to_string(),
            _ => return Err(ApiError::bad("prompt must be a string", Some("prompt"))),
        };
        let mut r = parse_options(&s, &body)?;
        r.prompt = s.tok.encode(&prompt).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?;
        if r.prompt.is_empty() {
            return Err(ApiError::bad("the prompt is empty (no tokens)", Some("prompt")));
        }
        Ok(r)
    })();
    match r {
        Ok(r) => respond(s, r, false).await,
        Err(e) => e.into_response(),
    }
}

/// A malformed body: 413 when too large, else 400 (OpenAI-style body either way).
fn rejection(e: axum::extract::rejection::JsonRejection) -> Response {
    let status = e.status();
    let status = if status == StatusCode::UNSUPPORTED_MEDIA_TYPE || status == StatusCode::PAYLOAD_TOO_LARGE {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError { status, message: e.body_text(), kind: "invalid_request_error", param: None }.into_response()
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The `usage` object: OpenAI's fields, with the prompt tokens reused from a session's cache
/// in `prompt_tokens_details.cached_tokens`.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// Counts a request in `Shared::active` until dropped.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the generating thread sends the HTTP side.
enum Msg {
    Text(String),
    Done { completion_tokens: usize, cached_tokens: usize, finish: &'static str },
    Failed(String),
}

/// Streams text pieces into a channel; stops when the receiver is gone (client left).
struct ChannelHooks {
    tx: tokio::sync::mpsc::UnboundedSender<Msg>,
}

impl Hooks for ChannelHooks {
    fn on_token(&mut self, _id: u32, text: &str) -> Result<bool, GenerateError> {
        if text.is_empty() {
            return Ok(!self.tx.is_closed());
        }
        Ok(self.tx.send(Msg::Text(text.to_string())).is_ok())
    }
    fn on_text_end(&mut self, text: &str) -> Result<(), GenerateError> {
        let _ = self.tx.send(Msg::Text(text.to_string()));
        Ok(())
    }
    fn cancelled(&mut self) -> bool {
        self.tx.is_closed()
    }
}

/// Waits for a session (or refuses when the queue is full), runs the generation on a
/// blocking thread and answers, streamed or not.
async fn respond(s: Arc<Shared>, r: Request, chat: bool) -> Response {
    if r.prompt.len() >= s.context {
        return ApiError::bad(
            format!(
                "the prompt has {} tokens, the context holds {} (and the reply needs room)",
                r.prompt.len(),
                s.context
            ),
            Some(if chat { "messages" } else { "prompt" }),
        )
        .into_response();
    }
    if s.active.fetch_add(1, Ordering::SeqCst) >= s.parallel + s.queue {
        s.active.fetch_sub(1, Ordering::SeqCst);
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the server is busy: {} requests generating and {} waiting (--parallel, --queue); try again",
                s.parallel, s.queue
            ),
            kind: "server_error",
            param: None,
        }
        .into_response();
    }
    let slot = Active(s.clone());
    let Ok(permit) = s.permits.clone().acquire_owned().await else {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "shutting down".into(),
            kind: "server_error",
            param: None,
        }
        .into_response();
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Msg>();
    let prompt_tokens = r.prompt.len();
    let worker = s.clone();
    let opts = GenerateOptions {
        max_new_tokens: r.max_tokens,
        sampling: r.sampling,
        stop_tokens: s.stop_tokens.clone(),
        stop_strings: r.stops.clone(),
        max_context: 0,
        ..GenerateOptions::default()
    };
    let prompt = r.prompt;
    tokio::task::spawn_blocking(move || {
        let _held = (permit, slot);
        // The free session whose cache shares the longest prefix with this prompt.
        let picked = worker.free.lock().ok().and_then(|mut f| {
            let best = (0..f.len()).max_by_key(|&i| common_prefix(&f[i].1, &prompt))?;
            Some(f.swap_remove(best))
        });
        let Some((mut session, mut cached)) = picked else {
            let _ = tx.send(Msg::Failed("no free session".into()));
            return;
        };
        // At least one token is fed: its logits give the first completion token.
        let mut common = common_prefix(&cached, &prompt).min(prompt.len() - 1);
        if !session.truncate(common) {
            // A recurrent state cannot be rewound: start over.
            session.reset();
            common = 0;
        }
        cached.truncate(common);
        let mut hooks = ChannelHooks { tx: tx.clone() };
        let g = Sampler::new(opts.sampling).map_err(GenerateError::from).and_then(|mut sampler| {
            sampler.observe(&cached);
            generate_with(
                &mut session,
                Start::Prompt(&prompt[common..]),
                &opts,
                &mut sampler,
                Some(&worker.tok),
                &mut hooks,
            )
        });
        // What the cache holds now: the prompt and the generated tokens fed back.
        cached.clear();
        if let Ok(g) = &g {
            cached.extend_from_slice(&prompt);
            cached.extend_from_slice(&g.tokens[..g.decode_steps.min(g.tokens.len())]);
        }
        if cached.len() != session.position() {
            session.reset();
            cached.clear();
        }
        if let Ok(mut f) = worker.free.lock() {
            f.push((session, cached));
        }
        let _ = match g {
            Ok(g) => {
                let finish = match g.stop {
                    StopReason::MaxTokens | StopReason::ContextFull => "length",
                    _ => "stop",
                };
                // A final stop token is not part of the completion's text; OpenAI counts it.
                tx.send(Msg::Done { completion_tokens: g.tokens.len(), cached_tokens: common, finish })
            }
            Err(e) => tx.send(Msg::Failed(e.to_string())),
        };
    });
    let id = request_id(if chat { "chatcmpl" } else { "cmpl" });
    let created = unix_now();
    let name = s.name.clone();
    if !r.stream {
        let mut text = String::new();
        while let Some(m) = rx.recv().await {
            match m {
                Msg::Text(t) => text.push_str(&t),
                Msg::Done { completion_tokens, cached_tokens, finish } => {
                    let usage = usage(prompt_tokens, completion_tokens, cached_tokens);
                    let body = if chat {
                        json!({"id": id, "object": "chat.completion", "created": created, "model": name,
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                            "logprobs": null, "finish_reason": finish}],
                               "usage": usage})
                    } else {
                        json!({"id": id, "object": "text_completion", "created": created, "model": name,
                               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                               "usage": usage})
                    };
                    return Json(body).into_response();
                }
                Msg::Failed(e) => {
                    return ApiError {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message: e,
                        kind: "server_error",
                        param: None,
                    }
                    .into_response();
                }
            }
        }
        return ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the generation ended without a result".into(),
            kind: "server_error",
            param: None,
        }
        .into_response();
    }
    // Streamed: one chunk per text piece, then the finish reason, usage if asked, [DONE].
    let include_usage = r.include_usage;
    let chunk = move |delta: Value, finish: Value| -> Value {
        if chat {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        } else {
            json!({"id": id, "object": "text_completion", "created": created, "model": name,
                   "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                                "logprobs": null, "finish_reason": finish}]})
        }
    };
    let (etx, erx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| Event::default().data(v.to_string());
        if chat && etx.send(Ok(send(chunk(json!({"role": "assistant", "content": ""}), Value::Null)))).await.is_err() {
            return;
        }
        while let Some(m) = rx.recv().await {
            let ev = match m {
                Msg::Text(t) => send(chunk(json!({"content": t}), Value::Null)),
                Msg::Done { completion_tokens, cached_tokens, finish } => {
                    let _ = etx.send(Ok(send(chunk(json!({}), json!(finish))))).await;
                    if include_usage {
                        let mut u = chunk(json!({}), Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
                        let _ = etx.send(Ok(send(u))).await;
                    }
                    let _ = etx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
                Msg::Failed(e) => {
                    let _ = etx.send(Ok(send(json!({"error": {"message": e, "type": "server_error"}})))).await;
                    return;
                }
            };
            if etx.send(Ok(ev)).await.is_err() {
                return; // the client left: dropping `rx` stops the generation
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(erx)).into_response()
}
