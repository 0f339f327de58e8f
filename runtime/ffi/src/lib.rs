//! The C API of meo. The header `include/meo.h` is generated from this file by cbindgen
//! (`cargo test -p meo-ffi --test header` checks it; `MEO_BLESS=1` rewrites it).
//!
//! Conventions, for every function:
//! - The return value is a [`MeoStatus`]; on anything but `MEO_STATUS_OK` a message is kept
//!   for the calling thread ([`meo_last_error`]) and no out-parameter is written except where
//!   a function documents otherwise (`MEO_STATUS_BUFFER_TOO_SMALL` reports the size needed).
//! - Every pointer is checked for NULL. Handles are ids, not addresses, checked against the
//!   live handles of this library and never given out twice: a freed or made-up handle gives
//!   `MEO_STATUS_INVALID_HANDLE` for ever, it is never read.
//! - No Rust panic crosses the boundary: one becomes `MEO_STATUS_PANIC`.
//! - A `MeoModel` may be used from many threads at once. A `MeoSession` is in use for the whole
//!   of each call on it, `meo_session_generate`'s callbacks included; a call on a session in
//!   use (from another thread, or from that callback, `meo_session_free` included) is refused
//!   with `MEO_STATUS_BUSY` and does nothing. A session keeps its model alive:
//!   `meo_model_free` may come first.
//! - `meo_status_string` takes an `int`: no C value is read as a Rust enum.
#![allow(clippy::missing_safety_doc)] // every function's safety contract is in the header docs

use meo::chat::{ChatError, ChatTemplate, Message};
use meo::generate::{GenerateError, GenerateOptions, Hooks, Start, StopReason, generate_with};
use meo::model::Mode;
use meo::residency::{ExpertTracker, SharedTracker, TrackerOptions};
use meo::sample::{Sampler, SamplerConfig};
use meo::tokenizer::Tokenizer;
use meo::{LayerSelect, Logits, MergeOptions, Model, Session, SessionOptions, TargetError};
use std::cell::{RefCell, UnsafeCell};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

/// Result of every call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeoStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// A handle that is not a live handle of this library (freed, or never created).
    InvalidHandle = 2,
    /// An argument is out of range or misspelt (the message says which).
    InvalidArgument = 3,
    /// A string argument is not valid UTF-8.
    InvalidUtf8 = 4,
    /// The file or file descriptor cannot be opened, read or mapped.
    Io = 5,
    /// The bytes are not a `.meo` model this runtime can run.
    InvalidModel = 6,
    /// The request is valid but not supported (by this build, platform or model).
    Unsupported = 7,
    /// An output buffer is too small; the size needed was written to the length argument.
    BufferTooSmall = 8,
    /// A token id is outside the model's vocabulary.
    TokenOutOfRange = 9,
    /// The tokens do not fit in the session's context.
    ContextFull = 10,
    /// The model file has no embedded tokenizer.
    NoTokenizer = 11,
    /// Generation stopped because the cancel flag was set or the callback asked to stop.
    Cancelled = 12,
    /// The call is not valid in the session's current state (e.g. sampling before feeding).
    BadState = 13,
    /// A bug: the library panicked. The handle involved should be freed.
    Panic = 14,
    /// The session is in use: by a call on another thread, or this call comes from the
    /// callback of the session's own `meo_session_generate`. Nothing was done; call again
    /// once the other call has returned.
    Busy = 15,
    /// The model file has no chat template (`meo_chat_apply_template`).
    NoChatTemplate = 16,
    /// A saved session state cannot be loaded: damaged, truncated, another version, another
    /// model, or another KV cache layout (the message says which). The session is unchanged.
    InvalidState = 17,
}

impl MeoStatus {
    /// Every status, for turning an integer from C into one without transmuting (a new
    /// variant goes here too; a unit test checks that the codes run 0, 1, 2, … in order).
    const ALL: [MeoStatus; 18] = [
        MeoStatus::Ok,
        MeoStatus::NullPointer,
        MeoStatus::InvalidHandle,
        MeoStatus::InvalidArgument,
        MeoStatus::InvalidUtf8,
        MeoStatus::Io,
        MeoStatus::InvalidModel,
        MeoStatus::Unsupported,
        MeoStatus::BufferTooSmall,
        MeoStatus::TokenOutOfRange,
        MeoStatus::ContextFull,
        MeoStatus::NoTokenizer,
        MeoStatus::Cancelled,
        MeoStatus::BadState,
        MeoStatus::Panic,
        MeoStatus::Busy,
        MeoStatus::NoChatTemplate,
        MeoStatus::InvalidState,
    ];

    /// The status whose code is `code`, if any.
    fn from_code(code: i32) -> Option<MeoStatus> {
        Self::ALL.into_iter().find(|&s| s as i32 == code)
    }
}

/// Token id passed to a [`MeoTokenCallback`] for the final flush of held-back text.
pub const MEO_TOKEN_NONE: u32 = u32::MAX;

/// `meo_session_set_kv_dtype`: the KV cache in f32 (the default; exact).
pub const MEO_KV_F32: u32 = 0;
/// `meo_session_set_kv_dtype`: the KV cache in f16 (half the memory of f32).
pub const MEO_KV_F16: u32 = 1;
/// `meo_session_set_kv_dtype`: the KV cache in int8 with one f32 scale per position and kv
/// head (about a quarter of f32).
pub const MEO_KV_INT8: u32 = 2;

type Res<T> = Result<T, (MeoStatus, String)>;

fn err<T>(status: MeoStatus, msg: impl Into<String>) -> Res<T> {
    Err((status, msg.into()))
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f` with every failure (error or panic) turned into a status and a message.
fn guard(f: impl FnOnce() -> Res<()>) -> MeoStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => MeoStatus::Ok,
        Ok(Err((status, msg))) => {
            set_error(&msg);
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error (panic): {what}"));
            MeoStatus::Panic
        }
    }
}

fn check_ptr<T>(p: *const T, name: &str) -> Res<()> {
    if p.is_null() { err(MeoStatus::NullPointer, format!("{name} is NULL")) } else { Ok(()) }
}

/// Writes `v` to the out-pointer `p` (checked for NULL by the caller first).
unsafe fn put<T>(p: *mut T, v: T) {
    // SAFETY: the caller checked `p` for NULL; the C contract says it points to a `T`.
    unsafe { p.write(v) }
}

/// `p` as a UTF-8 string (NULL-terminated C string).
unsafe fn c_str<'a>(p: *const c_char, name: &str) -> Res<&'a str> {
    check_ptr(p, name)?;
    // SAFETY: non-NULL; the C contract says it is NUL-terminated and lives for the call.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|e| (MeoStatus::InvalidUtf8, format!("{name} is not valid UTF-8: {e}")))
}

/// `n` elements at `p` (`p` may be NULL when `n` is 0).
unsafe fn slice<'a, T>(p: *const T, n: usize, name: &str) -> Res<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    check_ptr(p, name)?;
    if n.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return err(MeoStatus::InvalidArgument, format!("{name}: length {n} is too large"));
    }
    // SAFETY: non-NULL, length bounded; the C contract says `n` elements are readable.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

// ---------------------------------------------------------------------------------------
// Handles

/// Where a model's bytes live.
enum Holder {
    Plain(Model),
    #[cfg(unix)]
    Fd(meo::platform::FdModel),
}

/// An opened model (opaque). Shareable across threads.
pub struct MeoModel {
    // Field order is drop order: the residency tracker borrows the model in `holder`.
    /// The model-wide residency tracker (one budget for all sessions), made on first use;
    /// `None` for a model that is not file-backed.
    residency: OnceLock<Result<Option<SharedTracker<'static>>, String>>,
    holder: Holder,
    tokenizer: OnceLock<Result<Tokenizer, String>>,
    chat: OnceLock<Result<ChatTemplate, (MeoStatus, String)>>,
}

impl MeoModel {
    fn model(&self) -> &Model {
        match &self.holder {
            Holder::Plain(m) => m,
            #[cfg(unix)]
            Holder::Fd(f) => f.model(),
        }
    }

    /// The model-wide residency tracker (`None`: not file-backed), made on first use with the
    /// default budget (the process's memory limit, `meo::residency::default_budget`).
    fn residency(&self) -> Res<Option<&SharedTracker<'static>>> {
        let r = self.residency.get_or_init(|| {
            // SAFETY (lifetime): the tracker borrows the model in `self.holder`, which is dropped
            // after `self.residency` (field order) and never moves (`self` lives in an `Arc`).
            let m: &'static Model = unsafe { &*std::ptr::from_ref(self.model()) };
            if m.mapped().is_none() {
                return Ok(None);
            }
            let opts = TrackerOptions { budget: meo::residency::default_budget(), ..TrackerOptions::default() };
            ExpertTracker::for_model(m, opts).map(|t| Some(SharedTracker::new(t))).map_err(|e| e.to_string())
        });
        match r {
            Ok(t) => Ok(t.as_ref()),
            Err(e) => err(MeoStatus::Io, e.clone()),
        }
    }

    fn tokenizer(&self) -> Res<&Tokenizer> {
        let t = self.tokenizer.get_or_init(|| {
            let file = self.model().file().map_err(|e| e.to_string())?;
            Tokenizer::from_metadata(&file.metadata).map_err(|e| e.to_string())
        });
        match t {
            Ok(t) => Ok(t),
            Err(e) if e.contains("no embedded tokenizer") => err(MeoStatus::NoTokenizer, e.clone()),
            Err(e) => err(MeoStatus::InvalidModel, e.clone()),
        }
    }

    fn chat_template(&self) -> Res<&ChatTemplate> {
        let t = self.chat.get_or_init(|| {
            let file = self.model().file().map_err(|e| (MeoStatus::InvalidModel, e.to_string()))?;
            ChatTemplate::from_metadata(&file.metadata).map_err(|e| match e {
                ChatError::NoTemplate => (MeoStatus::NoChatTemplate, e.to_string()),
                _ => (MeoStatus::InvalidModel, e.to_string()),
            })
        });
        t.as_ref().map_err(Clone::clone)
    }

    fn trim(&self) -> Res<u64> {
        let r = match &self.holder {
            Holder::Plain(m) if m.mapped().is_none() => {
                return err(
                    MeoStatus::Unsupported,
                    "this model was opened from bytes in memory: there are no file-backed pages to release",
                );
            }
            #[cfg(unix)]
            Holder::Plain(m) => meo::platform::release_expert_slabs(m),
            #[cfg(not(unix))]
            Holder::Plain(_) => return err(MeoStatus::Unsupported, "releasing pages needs a Unix platform"),
            #[cfg(unix)]
            Holder::Fd(f) => f.release_expert_slabs(),
        };
        r.map_err(|e| (MeoStatus::Io, e.to_string()))
    }
}

/// Options of a new session. Zero-initialise for the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MeoSessionOptions {
    /// Worker threads; 0 = one per physical core.
    pub threads: u32,
    /// Most positions the session holds, at most the model's maximum: 0 = 4096 (a
    /// phone-sized default; `meo_model_context_bytes` gives the KV-cache bytes of a context),
    /// `UINT32_MAX` = the model's maximum.
    pub max_context: u32,
}

/// Options of `meo_model_open_with`. Zero-initialise for the defaults (those of
/// `meo_model_open`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MeoOpenOptions {
    /// 1: check the checksums of every tensor outside the expert slabs (embeddings,
    /// attention, norms, routers, dense blocks) and of the file's structure at open, and fail
    /// with `MEO_STATUS_INVALID_MODEL` on a mismatch. Reads those bytes, which every token
    /// reads anyway; expert slabs stay unread. 0: no check.
    pub verify_dense: u32,
}

/// Sampling settings. `{0, 0, 1.0, 0}` (temperature 0, the rest zero) is greedy decoding,
/// the default. The penalties (Hugging Face's repetition penalty, OpenAI's presence and
/// frequency penalties) count the tokens fed to the session since it started or was reset
/// (the prompt and the generated tokens), or their last `penalty_last_n`; they apply to
/// greedy decoding too.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MeoSamplerOptions {
    /// 0 = greedy (so is anything below 1e-6); otherwise logits are divided by it. Must be
    /// finite and >= 0 (`MEO_STATUS_INVALID_ARGUMENT` otherwise); `top_p` must be in (0, 1].
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 = no limit.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 = no limit.
    pub top_p: f32,
    /// Random seed (same seed, same output).
    pub seed: u64,
    /// Keep tokens at least `min_p` times as likely as the most likely one; 0 = no limit.
    /// In [0, 1].
    pub min_p: f32,
    /// Repetition penalty: a seen token's logit is divided by it if positive, multiplied if
    /// negative. 0 or 1 = none; otherwise finite and > 0.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every seen token; 0 = none.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was seen; 0 = none.
    pub frequency_penalty: f32,
    /// The penalties count only the last `penalty_last_n` tokens; 0 = all of them.
    pub penalty_last_n: u32,
}

impl Default for MeoSamplerOptions {
    /// Greedy decoding, no penalties.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 0,
        }
    }
}

impl MeoSamplerOptions {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: if self.repetition_penalty == 0.0 { 1.0 } else { self.repetition_penalty },
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.penalty_last_n as usize,
            seed: self.seed,
        }
    }
}

/// Facts about a model.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MeoModelInfo {
    pub vocab_size: u32,
    pub num_layers: u32,
    /// Experts per MoE layer.
    pub num_experts: u32,
    /// Experts each token is routed to.
    pub top_k: u32,
    /// The model's maximum context (positions).
    pub max_context: u32,
    /// First end-of-sequence id, or `MEO_TOKEN_NONE`.
    pub eos_token: u32,
    /// Size of the model's bytes.
    pub file_bytes: u64,
    /// 1 if the file embeds a tokenizer of at most 32 MiB, else 0. It is loaded on first
    /// use (`meo_tokenize`, `meo_detokenize`), where a malformed one gives
    /// `MEO_STATUS_INVALID_MODEL`; this call does not load it.
    pub has_tokenizer: u32,
    /// 1 if the model is file-backed (`meo_session_trim` and the memory budget work), else 0.
    pub file_backed: u32,
    /// 1 if the file embeds a chat template (`meo_chat_apply_template`; compiled on first
    /// use), else 0.
    pub has_chat_template: u32,
}

/// Speed and expert-residency figures of a session.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MeoStats {
    /// Tokens fed in calls of more than one token (prompts) and their time.
    pub prompt_tokens: u64,
    pub prompt_seconds: f64,
    /// Tokens fed one at a time (decoding) and their time.
    pub decode_tokens: u64,
    pub decode_seconds: f64,
    /// 1 if the residency fields below are measured (the session tracks experts: the model
    /// was opened from a path), else 0 and they are 0.
    pub residency_available: u32,
    /// Distinct (layer, expert) pairs routed to so far, and how many exist.
    pub experts_touched: u64,
    pub experts_total: u64,
    /// Bytes of expert slabs resident in memory now (mincore), and in the file.
    pub expert_bytes_resident: u64,
    pub expert_bytes_in_file: u64,
    /// Slabs released under the memory budget or by `meo_session_trim`, and their bytes.
    pub released_slabs: u64,
    pub released_bytes: u64,
    /// Peak resident set size of the process (0 where unavailable).
    pub peak_rss_bytes: u64,
}

/// A sequence being run over a model (opaque). One call at a time: a call while another is in
/// progress (another thread, or `meo_session_generate`'s callback) gets `MEO_STATUS_BUSY`.
pub struct MeoSession {
    // Field order is drop order: everything borrowing the model comes before `model`.
    session: Session<'static>,
    sampler: Sampler,
    options: MeoSessionOptions,
    kv: meo::KvOptions,
    has_logits: bool,
    stats: MeoStats,
    trimmed_slabs: u64,
    trimmed_bytes: u64,
    model: Arc<MeoModel>,
}

/// A session and its in-use flag. Every call on the session holds the flag for its whole
/// length (a [`SessionGuard`]), so a second call meanwhile, from another thread or from the
/// callback of `meo_session_generate`, is refused with `MEO_STATUS_BUSY` instead of making a
/// second `&mut`; `meo_session_free` is refused the same way.
struct SessionCell {
    busy: AtomicBool,
    session: UnsafeCell<MeoSession>,
}

// SAFETY: `session` is reached only through a `SessionGuard`, and at most one guard exists per
// cell at a time (the `busy` flag, taken by compare-and-swap); `MeoSession` is `Send`, so the
// guard may be on any thread.
unsafe impl Sync for SessionCell {}

/// Exclusive access to a session for the length of one call.
struct SessionGuard(Arc<SessionCell>);

impl std::ops::Deref for SessionGuard {
    type Target = MeoSession;
    fn deref(&self) -> &MeoSession {
        // SAFETY: this guard holds the cell's `busy` flag, so no other reference exists.
        unsafe { &*self.0.session.get() }
    }
}

impl std::ops::DerefMut for SessionGuard {
    fn deref_mut(&mut self) -> &mut MeoSession {
        // SAFETY: as in `deref`; `&mut self` keeps this the only reference from this guard.
        unsafe { &mut *self.0.session.get() }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// Live handles by id. A handle is an id, not an address: ids come from one counter shared by
/// models and sessions and are never given out twice, so a freed handle stays invalid for ever
/// (a new object cannot take its place, as it could at a reused address) and a model's handle
/// is never a session's.
struct Handles {
    /// Handles given out so far (the next id is made from `issued + 1`).
    issued: u64,
    models: BTreeMap<usize, Arc<MeoModel>>,
    sessions: BTreeMap<usize, Arc<SessionCell>>,
}

static HANDLES: Mutex<Handles> = Mutex::new(Handles { issued: 0, models: BTreeMap::new(), sessions: BTreeMap::new() });

fn handles() -> MutexGuard<'static, Handles> {
    // The maps stay consistent across a panic (each update is one insert or remove).
    HANDLES.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Handles {
    /// A fresh id: the count of handles issued times an odd constant, a bijection on
    /// `usize`, so ids never repeat or are 0, and a made-up small value is unlikely to be one.
    fn next_id(&mut self) -> Res<usize> {
        let n = self.issued + 1;
        // Past `usize::MAX` handles (32-bit targets only) the ids would repeat: refuse instead.
        let Ok(k) = usize::try_from(n) else {
            return err(MeoStatus::Unsupported, "this process has used up the library's handles");
        };
        self.issued = n;
        Ok(k.wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize))
    }
}

/// The handle C sees for `id` (never dereferenced: it is an id).
fn handle<T>(id: usize) -> *mut T {
    std::ptr::without_provenance_mut(id)
}

/// A new reference to the model behind a live handle.
fn model_ref(p: *const MeoModel) -> Res<Arc<MeoModel>> {
    check_ptr(p, "model")?;
    handles().models.get(&p.addr()).cloned().ok_or_else(|| {
        (MeoStatus::InvalidHandle, "model is not a live MeoModel handle (freed, or never opened)".to_string())
    })
}

/// The live cell behind a session handle, with its `busy` flag taken (`MEO_STATUS_BUSY` if it
/// was already taken). Runs under the handles lock, so `meo_session_free` cannot interleave.
fn take_session(h: &Handles, p: *mut MeoSession) -> Res<&Arc<SessionCell>> {
    let Some(cell) = h.sessions.get(&p.addr()) else {
        return err(MeoStatus::InvalidHandle, "session is not a live MeoSession handle (freed, or never created)");
    };
    if cell.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return err(
            MeoStatus::Busy,
            "the session is in use: by a call on another thread, or this call comes from the callback of its own \
             meo_session_generate",
        );
    }
    Ok(cell)
}

/// Exclusive use of the session behind a live handle until the guard is dropped.
fn session_mut(p: *mut MeoSession) -> Res<SessionGuard> {
    check_ptr(p, "session")?;
    let h = handles();
    Ok(SessionGuard(take_session(&h, p)?.clone()))
}

fn new_model(holder: Holder, out: *mut *mut MeoModel) -> Res<()> {
    let model =
        Arc::new(MeoModel { residency: OnceLock::new(), holder, tokenizer: OnceLock::new(), chat: OnceLock::new() });
    let mut h = handles();
    let id = h.next_id()?;
    h.models.insert(id, model);
    // SAFETY: checked for NULL by the caller.
    unsafe { put(out, handle(id)) };
    Ok(())
}

fn model_error(e: meo::ModelError) -> (MeoStatus, String) {
    let status = match &e {
        meo::ModelError::Open(meo::file::OpenError::Io { .. }) => MeoStatus::Io,
        _ => MeoStatus::InvalidModel,
    };
    (status, e.to_string())
}

// ---------------------------------------------------------------------------------------
// Errors and version

/// The message of the last failed call on this thread ("" if none). The string stays valid
/// until the next failing call on this thread; copy it to keep it. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn meo_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A static description of a status code. Takes an `int`, not a `MeoStatus`, so any value is
/// safe to pass: one that is not a `MeoStatus` gives "unknown status". Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn meo_status_string(status: i32) -> *const c_char {
    let Some(status) = MeoStatus::from_code(status) else {
        return c"unknown status".as_ptr();
    };
    let s: &'static CStr = match status {
        MeoStatus::Ok => c"ok",
        MeoStatus::NullPointer => c"null pointer argument",
        MeoStatus::InvalidHandle => c"invalid handle",
        MeoStatus::InvalidArgument => c"invalid argument",
        MeoStatus::InvalidUtf8 => c"invalid UTF-8",
        MeoStatus::Io => c"I/O error",
        MeoStatus::InvalidModel => c"invalid model",
        MeoStatus::Unsupported => c"unsupported",
        MeoStatus::BufferTooSmall => c"buffer too small",
        MeoStatus::TokenOutOfRange => c"token id out of range",
        MeoStatus::ContextFull => c"context full",
        MeoStatus::NoTokenizer => c"no tokenizer in the model file",
        MeoStatus::Cancelled => c"cancelled",
        MeoStatus::BadState => c"invalid in the current state",
        MeoStatus::Panic => c"internal error (panic)",
        MeoStatus::Busy => c"session in use (another thread, or its own generate callback)",
        MeoStatus::NoChatTemplate => c"no chat template in the model file",
        MeoStatus::InvalidState => c"invalid saved session state",
    };
    s.as_ptr()
}

/// The library version ("0.1.0"). Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn meo_version() -> *const c_char {
    static V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    V.as_ptr()
}

// ---------------------------------------------------------------------------------------
// Models

/// Opens the `.meo` file at `path` (UTF-8), memory-mapped lazily: only the experts that
/// routing selects are ever read. On success `*out` is a new handle for `meo_model_free`.
/// While it is open the file must not be truncated, written or replaced in place (see
/// `meo_file_guard_install`); `meo_model_open_with` can verify checksums at open.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_open(path: *const c_char, out: *mut *mut MeoModel) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        // SAFETY: C contract (NUL-terminated string).
        let path = unsafe { c_str(path, "path") }?;
        let map = meo::residency::map_lazy(path).map_err(|e| {
            let status = match &e {
                meo::residency::ResidencyError::Map(meo::file::OpenError::Io { .. }) => MeoStatus::Io,
                meo::residency::ResidencyError::Format(_) | meo::residency::ResidencyError::Map(_) => {
                    MeoStatus::InvalidModel
                }
                _ => MeoStatus::Io,
            };
            (status, format!("cannot open {path}: {e}"))
        })?;
        let model = Model::from_mapped(map).map_err(model_error)?;
        new_model(Holder::Plain(model), out)
    })
}

/// `meo_model_open` with options (`options` may be NULL for the defaults).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_open_with(
    path: *const c_char,
    options: *const MeoOpenOptions,
    out: *mut *mut MeoModel,
) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        // SAFETY: NULL or a valid MeoOpenOptions (C contract).
        let opts = if options.is_null() { MeoOpenOptions::default() } else { unsafe { *options } };
        let mut m: *mut MeoModel = std::ptr::null_mut();
        // SAFETY: C contract for `path`; `m` is a valid out-pointer.
        let status = unsafe { meo_model_open(path, &mut m) };
        if status != MeoStatus::Ok {
            return Err((status, LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())));
        }
        let held = model_ref(m)?;
        if opts.verify_dense != 0
            && let Err(e) = held.model().verify_dense()
        {
            drop(held);
            // SAFETY: `m` is the live handle opened above and given to nobody else.
            unsafe { meo_model_free(m) };
            return err(MeoStatus::InvalidModel, format!("checksum verification failed: {e}"));
        }
        // SAFETY: checked for NULL above.
        unsafe { put(out, m) };
        Ok(())
    })
}

/// Installs meo's opt-in `SIGBUS` guard (Unix; `MEO_STATUS_UNSUPPORTED` elsewhere). Once per
/// process; later calls do nothing. Call it at start-up, before opening models.
///
/// A model file is memory-mapped: while a model is open, the app must not truncate the file,
/// write into it or replace it in place (copying over it, `open(O_TRUNC)`), nor hand meo a
/// file that another process may do this to. Replace a model by writing a new file and
/// renaming it over the old one (the open model keeps the old bytes), then reopen. Without the
/// guard, reading a page a truncation removed raises `SIGBUS`, which kills the process. With
/// it, such a read sees zeros and the next `meo_session_*` call that ran the model fails with
/// `MEO_STATUS_IO` ("the model file changed on disk"); free the session and reopen the model.
/// A `SIGBUS` outside meo's mappings goes to the handler installed before this call (or
/// kills the process as it would have without the guard), so crash reporters keep working.
#[unsafe(no_mangle)]
pub extern "C" fn meo_file_guard_install() -> MeoStatus {
    guard(|| {
        #[cfg(unix)]
        {
            meo::guard::install().map_err(|e| (MeoStatus::Io, e.to_string()))
        }
        #[cfg(not(unix))]
        err(MeoStatus::Unsupported, "the file guard needs a Unix platform")
    })
}

/// Writes to `*bytes` the KV-cache bytes a session over `model` uses when it holds
/// `positions` positions (4096 = the default context; scratch buffers, which do not grow
/// with the context, not included), with the default f32 cache (`MEO_KV_F16` halves it). Memory grows with the positions fed, up to this figure
/// for a full context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_context_bytes(model: *const MeoModel, positions: u32, bytes: *mut u64) -> MeoStatus {
    guard(|| {
        check_ptr(bytes, "bytes")?;
        let m = model_ref(model)?;
        let b = m.model().config().kv_cache_bytes(positions as usize, meo::KvOptions::default());
        // SAFETY: checked above.
        unsafe { put(bytes, b) };
        Ok(())
    })
}

/// Opens a model from `len` bytes at `data`, which are copied (the caller may free them when
/// this returns). Costs the model's size in memory; prefer `meo_model_open` or
/// `meo_model_open_fd`, which map the file lazily.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_open_bytes(data: *const u8, len: usize, out: *mut *mut MeoModel) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        check_ptr(data, "data")?;
        // SAFETY: C contract (`len` readable bytes).
        let bytes = unsafe { slice(data, len, "data") }?;
        let model = Model::from_vec(bytes.to_vec()).map_err(model_error)?;
        new_model(Holder::Plain(model), out)
    })
}

/// Opens a model stored as `len` bytes at `offset` of the open file descriptor `fd`
/// (`len` 0 = to the end of the file): an uncompressed Android asset
/// (`AAsset_openFileDescriptor64` / `AssetFileDescriptor`), or a file from a picker. The
/// range is memory-mapped lazily; `fd` is duplicated, so the caller may close it at once.
/// Keep `offset` a multiple of 16 KiB for slab-precise memory release (docs/EMBEDDING.md).
/// Unix only (`MEO_STATUS_UNSUPPORTED` elsewhere).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_open_fd(fd: i32, offset: u64, len: u64, out: *mut *mut MeoModel) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        #[cfg(unix)]
        {
            use meo::platform::{FdModel, FdOpenError};
            let m = FdModel::open(fd, offset, len).map_err(|e| match e {
                FdOpenError::Model(m) => model_error(m),
                FdOpenError::OutOfRange { .. } | FdOpenError::Empty => (MeoStatus::InvalidArgument, e.to_string()),
                _ => (MeoStatus::Io, e.to_string()),
            })?;
            new_model(Holder::Fd(m), out)
        }
        #[cfg(not(unix))]
        {
            let _ = (fd, offset, len);
            err(MeoStatus::Unsupported, "opening from a file descriptor needs a Unix platform")
        }
    })
}

/// Releases the caller's reference to a model. Sessions over it keep it alive until they are
/// freed. NULL is a no-op (returns `MEO_STATUS_OK`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_free(model: *mut MeoModel) -> MeoStatus {
    guard(|| {
        if model.is_null() {
            return Ok(());
        }
        let Some(m) = handles().models.remove(&model.addr()) else {
            return err(MeoStatus::InvalidHandle, "model is not a live MeoModel handle (freed twice?)");
        };
        // Outside the lock: the last reference unmaps the file.
        drop(m);
        Ok(())
    })
}

/// Fills `*out` with facts about the model.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_info(model: *const MeoModel, out: *mut MeoModelInfo) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        let m = model_ref(model)?;
        let c = m.model().config();
        let u32c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let info = MeoModelInfo {
            vocab_size: u32c(c.vocab_size),
            num_layers: u32c(c.num_layers),
            num_experts: u32c(c.router.num_experts),
            top_k: u32c(c.router.top_k),
            max_context: u32c(c.max_position_embeddings),
            eos_token: c.eos_token_ids.iter().find_map(|&e| u32::try_from(e).ok()).unwrap_or(MEO_TOKEN_NONE),
            file_bytes: m.model().bytes().len() as u64,
            // Present, within the size cap and UTF-8; parsed only on first use (loading costs
            // about 13 times its size in memory).
            has_tokenizer: u32::from(m.model().file().is_ok_and(|f| {
                meo::tokenizer::embedded_json(&f.metadata, meo::tokenizer::MAX_TOKENIZER_BYTES).is_ok()
            })),
            file_backed: u32::from(match &m.holder {
                Holder::Plain(p) => p.mapped().is_some(),
                #[cfg(unix)]
                Holder::Fd(_) => true,
            }),
            has_chat_template: u32::from(m.model().file().is_ok_and(|f| meo::chat::has_template(&f.metadata))),
        };
        // SAFETY: checked above.
        unsafe { put(out, info) };
        Ok(())
    })
}

/// Encodes the UTF-8, NUL-terminated `text` with the model's embedded tokenizer into
/// `ids[0..capacity]`; `*n_ids` receives the number of ids. If `capacity` is too small,
/// returns `MEO_STATUS_BUFFER_TOO_SMALL` with the number needed in `*n_ids` (call with
/// `ids` NULL and `capacity` 0 to ask for the size).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_tokenize(
    model: *const MeoModel,
    text: *const c_char,
    ids: *mut u32,
    capacity: usize,
    n_ids: *mut usize,
) -> MeoStatus {
    guard(|| {
        check_ptr(n_ids, "n_ids")?;
        // SAFETY: C contract.
        let text = unsafe { c_str(text, "text") }?;
        let m = model_ref(model)?;
        let enc = m.tokenizer()?.encode(text).map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))?;
        // SAFETY: checked above.
        unsafe { put(n_ids, enc.len()) };
        if enc.len() > capacity {
            return err(
                MeoStatus::BufferTooSmall,
                format!("the text has {} tokens, the buffer holds {capacity}", enc.len()),
            );
        }
        if !enc.is_empty() {
            check_ptr(ids, "ids")?;
            // SAFETY: non-NULL, `capacity >= enc.len()` writable ids (C contract).
            unsafe { std::ptr::copy_nonoverlapping(enc.as_ptr(), ids, enc.len()) };
        }
        Ok(())
    })
}

/// Decodes `n_ids` ids into UTF-8 text written NUL-terminated to `text[0..capacity]`;
/// `*len` receives the text's length in bytes (without the NUL). If `capacity` is less than
/// that plus one, returns `MEO_STATUS_BUFFER_TOO_SMALL` with the length in `*len`.
/// Special tokens are left out. An id outside the vocabulary gives
/// `MEO_STATUS_TOKEN_OUT_OF_RANGE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_detokenize(
    model: *const MeoModel,
    ids: *const u32,
    n_ids: usize,
    text: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> MeoStatus {
    guard(|| {
        check_ptr(len, "len")?;
        // SAFETY: C contract.
        let ids = unsafe { slice(ids, n_ids, "ids") }?;
        let m = model_ref(model)?;
        let s = m.tokenizer()?.decode(ids).map_err(|e| match e {
            meo::tokenizer::TokenizerError::UnknownId { .. } => (MeoStatus::TokenOutOfRange, e.to_string()),
            _ => (MeoStatus::InvalidArgument, e.to_string()),
        })?;
        // SAFETY: checked above.
        unsafe { put(len, s.len()) };
        if s.len() >= capacity {
            return err(
                MeoStatus::BufferTooSmall,
                format!("the text has {} bytes, the buffer holds {capacity} (one is for the NUL)", s.len()),
            );
        }
        check_ptr(text, "text")?;
        // SAFETY: non-NULL, `capacity > s.len()` writable bytes (C contract).
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), text.cast::<u8>(), s.len());
            text.add(s.len()).write(0);
        }
        Ok(())
    })
}

/// `meo_tokenize` without the special tokens the tokenizer adds around a text (a Llama-style
/// BOS): for text that holds them already, such as `meo_chat_apply_template`'s output
/// (transformers tokenizes a rendered chat the same way). Special tokens written in the text
/// (`<|im_start|>`) become their ids. Same buffer protocol as `meo_tokenize`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_tokenize_raw(
    model: *const MeoModel,
    text: *const c_char,
    ids: *mut u32,
    capacity: usize,
    n_ids: *mut usize,
) -> MeoStatus {
    guard(|| {
        check_ptr(n_ids, "n_ids")?;
        // SAFETY: C contract.
        let text = unsafe { c_str(text, "text") }?;
        let m = model_ref(model)?;
        let enc = m
            .tokenizer()?
            .encode_without_special_tokens(text)
            .map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))?;
        // SAFETY: checked above.
        unsafe { put(n_ids, enc.len()) };
        if enc.len() > capacity {
            return err(
                MeoStatus::BufferTooSmall,
                format!("the text has {} tokens, the buffer holds {capacity}", enc.len()),
            );
        }
        if !enc.is_empty() {
            check_ptr(ids, "ids")?;
            // SAFETY: non-NULL, `capacity >= enc.len()` writable ids (C contract).
            unsafe { std::ptr::copy_nonoverlapping(enc.as_ptr(), ids, enc.len()) };
        }
        Ok(())
    })
}

/// One message of a conversation for `meo_chat_apply_template`: UTF-8, NUL-terminated.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MeoChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, `"tool"`, … (what the model's template expects).
    pub role: *const c_char,
    pub content: *const c_char,
}

/// Renders the conversation `messages[0..n_messages]` with the model's chat template (as
/// Hugging Face transformers' `apply_chat_template` does), written NUL-terminated to
/// `text[0..capacity]`; `*len` receives its length in bytes (without the NUL). If `capacity`
/// is less than that plus one, returns `MEO_STATUS_BUFFER_TOO_SMALL` with the length in `*len`
/// (call with `text` NULL and `capacity` 0 to ask for the size). `add_generation_prompt`
/// non-zero appends the start of the assistant's reply. `template_vars` (may be NULL): extra
/// template variables as a JSON object, e.g. `{"enable_thinking": false}` (Qwen3) or
/// `{"tools": [...]}`. Tokenize the result with `meo_tokenize_raw`.
/// `MEO_STATUS_NO_CHAT_TEMPLATE` when the file has none; `MEO_STATUS_INVALID_ARGUMENT` when
/// the template refuses the conversation (e.g. roles that do not alternate; the message is
/// the template's) or `template_vars` is not a JSON object.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_chat_apply_template(
    model: *const MeoModel,
    messages: *const MeoChatMessage,
    n_messages: usize,
    add_generation_prompt: i32,
    template_vars: *const c_char,
    text: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> MeoStatus {
    guard(|| {
        check_ptr(len, "len")?;
        // SAFETY: C contract.
        let raw = unsafe { slice(messages, n_messages, "messages") }?;
        let mut msgs = Vec::with_capacity(raw.len());
        for (i, m) in raw.iter().enumerate() {
            // SAFETY: C contract (NUL-terminated strings).
            let role = unsafe { c_str(m.role, &format!("messages[{i}].role")) }?;
            // SAFETY: as above.
            let content = unsafe { c_str(m.content, &format!("messages[{i}].content")) }?;
            msgs.push(Message::new(role, content));
        }
        let vars = if template_vars.is_null() {
            None
        } else {
            // SAFETY: C contract.
            Some(unsafe { c_str(template_vars, "template_vars") }?)
        };
        let m = model_ref(model)?;
        let out = m.chat_template()?.render(&msgs, add_generation_prompt != 0, vars).map_err(|e| match e {
            ChatError::Raised(_) | ChatError::Input(_) => (MeoStatus::InvalidArgument, e.to_string()),
            _ => (MeoStatus::InvalidModel, e.to_string()),
        })?;
        // SAFETY: checked above.
        unsafe { put(len, out.len()) };
        if out.len() >= capacity {
            return err(
                MeoStatus::BufferTooSmall,
                format!("the text has {} bytes, the buffer holds {capacity} (one is for the NUL)", out.len()),
            );
        }
        check_ptr(text, "text")?;
        // SAFETY: non-NULL, `capacity > out.len()` writable bytes (C contract).
        unsafe {
            std::ptr::copy_nonoverlapping(out.as_ptr(), text.cast::<u8>(), out.len());
            text.add(out.len()).write(0);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Sessions

fn make_session(model: &Arc<MeoModel>, opts: MeoSessionOptions, kv: meo::KvOptions) -> Res<Session<'static>> {
    // SAFETY (lifetime): the session borrows the model inside an `Arc` that the `MeoSession`
    // owns and drops after the session (field order); the `Arc`'s contents never move.
    let m: &'static Model = unsafe { &*std::ptr::from_ref(model.model()) };
    // UINT32_MAX asks for the model's maximum, whatever the width of usize.
    let max_context = if opts.max_context == u32::MAX { usize::MAX } else { opts.max_context as usize };
    Session::new(m, SessionOptions { threads: opts.threads as usize, max_context, kv })
        .map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))
}

/// Creates a session over `model` (`options` may be NULL for the defaults). The session runs
/// vanilla routing on the CPU, sampling with the file's generation defaults (greedy unless
/// the checkpoint's generation_config.json samples; `meo_session_set_sampler` overrides them)
/// until told otherwise. On success `*out` is a new handle for `meo_session_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_new(
    model: *const MeoModel,
    options: *const MeoSessionOptions,
    out: *mut *mut MeoSession,
) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        let model = model_ref(model)?;
        // SAFETY: NULL or a readable `MeoSessionOptions` (C contract).
        let options = if options.is_null() { MeoSessionOptions::default() } else { unsafe { *options } };
        let session = make_session(&model, options, meo::KvOptions::default())?;
        // The model's residency tracker is made now, so a failure shows here.
        model.residency()?;
        let s = MeoSession {
            session,
            // The file's generation defaults (greedy unless its checkpoint's
            // generation_config.json samples); meo_session_set_sampler overrides them.
            sampler: Sampler::new(
                model.model().file().map(|f| meo::generate::sampling_defaults(&f.metadata)).unwrap_or_default(),
            )
            .map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))?,
            options,
            kv: meo::KvOptions::default(),
            has_logits: false,
            stats: MeoStats::default(),
            trimmed_slabs: 0,
            trimmed_bytes: 0,
            model,
        };
        let cell = Arc::new(SessionCell { busy: AtomicBool::new(false), session: UnsafeCell::new(s) });
        let mut h = handles();
        let id = h.next_id()?;
        h.sessions.insert(id, cell);
        // SAFETY: checked above.
        unsafe { put(out, handle(id)) };
        Ok(())
    })
}

/// Frees a session. NULL is a no-op (returns `MEO_STATUS_OK`). A session in use (a call on
/// another thread, or this is the callback of its own `meo_session_generate`) is not freed:
/// `MEO_STATUS_BUSY`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_free(session: *mut MeoSession) -> MeoStatus {
    guard(|| {
        if session.is_null() {
            return Ok(());
        }
        let cell = {
            let mut h = handles();
            // Taking the flag (never given back) and removing the handle under one lock: no
            // call can be inside the session or get into it after this.
            take_session(&h, session)?;
            h.sessions.remove(&session.addr())
        };
        // Outside the lock: dropping a session joins its worker threads.
        drop(cell);
        Ok(())
    })
}

/// Sets the worker thread count (0 = one per physical core). Only before anything is fed or
/// right after `meo_session_reset` (`MEO_STATUS_BAD_STATE` otherwise); keeps the mode.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_set_threads(session: *mut MeoSession, threads: u32) -> MeoStatus {
    guard(|| {
        let mut s = session_mut(session)?;
        if s.session.position() != 0 {
            return err(MeoStatus::BadState, "threads can only change before feeding (call meo_session_reset first)");
        }
        let opts = MeoSessionOptions { threads, ..s.options };
        let mut new = make_session(&s.model, opts, s.kv)?;
        new.set_mode(s.session.mode().clone()).map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))?;
        s.session = new;
        s.options = opts;
        Ok(())
    })
}

/// Sets how the session stores its KV cache: `MEO_KV_F32` (the default), `MEO_KV_F16` or
/// `MEO_KV_INT8` (`MEO_STATUS_INVALID_ARGUMENT` otherwise). f16 and int8 approximate the
/// f32 results (docs/PERFORMANCE.md measures how closely). Only before anything is fed or
/// right after `meo_session_reset` (`MEO_STATUS_BAD_STATE` otherwise); keeps the mode.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_set_kv_dtype(session: *mut MeoSession, kv_dtype: u32) -> MeoStatus {
    guard(|| {
        let mut s = session_mut(session)?;
        let dtype = u8::try_from(kv_dtype).ok().and_then(meo::KvDtype::from_code).ok_or_else(|| {
            (MeoStatus::InvalidArgument, format!("kv_dtype {kv_dtype} is not MEO_KV_F32, MEO_KV_F16 or MEO_KV_INT8"))
        })?;
        if s.session.position() != 0 {
            return err(
                MeoStatus::BadState,
                "the KV dtype can only change before feeding (call meo_session_reset first)",
            );
        }
        let kv = meo::KvOptions { dtype, ..s.kv };
        let mut new = make_session(&s.model, s.options, kv)?;
        new.set_mode(s.session.mode().clone()).map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))?;
        s.session = new;
        s.kv = kv;
        Ok(())
    })
}

fn state_status(e: &meo::StateError) -> (MeoStatus, String) {
    let status = match e {
        meo::StateError::PromptMode => MeoStatus::BadState,
        _ => MeoStatus::InvalidState,
    };
    (status, e.to_string())
}

/// Writes to `*size` the bytes `meo_session_state_save` needs now.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_state_size(session: *mut MeoSession, size: *mut usize) -> MeoStatus {
    guard(|| {
        check_ptr(size, "size")?;
        let s = session_mut(session)?;
        let n = s.session.state_size(s.sampler.history().len());
        // SAFETY: checked above.
        unsafe { put(size, n) };
        Ok(())
    })
}

/// Saves the session's sequence state to `buf[0..capacity]`: its position, the last logits,
/// every layer's KV cache (in its dtype) and recurrent state, and the tokens the sampler's
/// penalties count. `*written` receives the size; if `capacity` is smaller, returns
/// `MEO_STATUS_BUFFER_TOO_SMALL` with the size needed in `*written` (`buf` may be NULL then).
/// The format is versioned, checksummed and names the model (docs/EMBEDDING.md). A mode
/// that merges experts from the prompt (`"prompt"`) is not saved: `MEO_STATUS_BAD_STATE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_state_save(
    session: *mut MeoSession,
    buf: *mut u8,
    capacity: usize,
    written: *mut usize,
) -> MeoStatus {
    guard(|| {
        check_ptr(written, "written")?;
        let s = session_mut(session)?;
        let bytes = s.session.save_state(s.sampler.history()).map_err(|e| state_status(&e))?;
        // SAFETY: checked above.
        unsafe { put(written, bytes.len()) };
        if bytes.len() > capacity {
            return err(
                MeoStatus::BufferTooSmall,
                format!("the state has {} bytes, the buffer holds {capacity}", bytes.len()),
            );
        }
        check_ptr(buf, "buf")?;
        // SAFETY: non-NULL, `capacity >= bytes.len()` writable bytes (C contract).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
        Ok(())
    })
}

/// Replaces the session's sequence state with `buf[0..len]`, written by
/// `meo_session_state_save` from a session over the same model with the same KV dtype;
/// generation then continues as it would have in the saved session (the sampler's random
/// state is this session's). A damaged, truncated or foreign buffer gives
/// `MEO_STATUS_INVALID_STATE` and changes nothing; a prompt-merging mode `MEO_STATUS_BAD_STATE`.
/// The routing mode is this session's: load in the mode the state was saved in.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_state_load(session: *mut MeoSession, buf: *const u8, len: usize) -> MeoStatus {
    guard(|| {
        check_ptr(buf, "buf")?;
        // SAFETY: C contract.
        let bytes = unsafe { slice(buf, len, "buf") }?;
        let mut s = session_mut(session)?;
        let tokens = s.session.load_state(bytes).map_err(|e| state_status(&e))?;
        s.sampler.clear_history();
        s.sampler.observe(&tokens);
        s.has_logits = !s.session.logits().is_empty();
        Ok(())
    })
}

/// Sets the routing mode, and resets the sequence. `mode`: `"vanilla"` (the model as
/// trained), `"prompt"` (experts merged once per layer from the prompt's routing) or
/// `"task:NAME"` (merges stored by `meo convert --task`). `layers` (NULL = `"all"`): `"all"`,
/// a list `"0,2,5"`, or `"auto"` (layers whose measured merge error is at most
/// `merge_budget`). Merged modes approximate a standard MoE: see docs/MEO-MERGING.md.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_set_mode(
    session: *mut MeoSession,
    mode: *const c_char,
    layers: *const c_char,
    merge_budget: f64,
) -> MeoStatus {
    guard(|| {
        // SAFETY: C contract.
        let mode = unsafe { c_str(mode, "mode") }?;
        // SAFETY: C contract.
        let layers = if layers.is_null() { "all" } else { unsafe { c_str(layers, "layers") }? };
        let mut s = session_mut(session)?;
        if !(merge_budget.is_finite() && merge_budget >= 0.0) {
            return err(MeoStatus::InvalidArgument, format!("merge_budget must be a number >= 0, got {merge_budget}"));
        }
        let bad = |e: meo::ModeError| (MeoStatus::InvalidArgument, e.to_string());
        let opts = MergeOptions {
            mode: Mode::parse(mode).map_err(bad)?,
            layers: LayerSelect::parse(layers, merge_budget).map_err(bad)?,
        };
        s.session.set_mode(opts).map_err(bad)?;
        s.sampler.clear_history();
        s.has_logits = false;
        Ok(())
    })
}

/// Selects the compute target. This build runs on the CPU only: `"cpu"` succeeds, anything
/// else returns `MEO_STATUS_UNSUPPORTED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_set_target(session: *mut MeoSession, target: *const c_char) -> MeoStatus {
    guard(|| {
        // SAFETY: C contract.
        let target = unsafe { c_str(target, "target") }?;
        session_mut(session)?;
        match target {
            "cpu" => Ok(()),
            other => {
                err(MeoStatus::Unsupported, format!("target {other:?} is not available in this build (only \"cpu\")"))
            }
        }
    })
}

/// Sets the memory budget of the session's model — one budget for all sessions of a model —
/// as `meo_model_set_memory_budget` does.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_set_memory_budget(session: *mut MeoSession, bytes: u64) -> MeoStatus {
    guard(|| {
        let model = Arc::clone(&session_mut(session)?.model);
        set_budget(&model, bytes)
    })
}

/// The budget value `meo_model_set_memory_budget` takes for the process's memory limit.
pub const MEO_MEMORY_BUDGET_AUTO: u64 = u64::MAX;

/// Sets the model's memory budget, for all its sessions, at any time: at most `bytes` of its
/// weights kept in memory. The tensors every token reads (attention, norms, routers, shared
/// experts, output head) are kept resident (`mlock` where permitted) and counted; expert
/// slabs are cached under the rest, the lowest frequency × recency evicted (also from the page
/// cache on Linux/Android) and re-read from the file when needed. 0 = no limit;
/// `MEO_MEMORY_BUDGET_AUTO` = the default, the process's memory limit (its cgroup limit or
/// the machine's available memory) less an eighth for the rest. Lowering it evicts at once:
/// call it from a memory warning (iOS `didReceiveMemoryWarning`, Android `onTrimMemory`).
/// Results never change. Needs a model opened with `meo_model_open`
/// (`MEO_STATUS_UNSUPPORTED` otherwise; `meo_session_trim` releases any model's experts).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_model_set_memory_budget(model: *const MeoModel, bytes: u64) -> MeoStatus {
    guard(|| {
        let m = model_ref(model)?;
        set_budget(&m, bytes)
    })
}

fn set_budget(model: &MeoModel, bytes: u64) -> Res<()> {
    let Some(t) = model.residency()? else {
        return err(
            MeoStatus::Unsupported,
            "a memory budget needs a model opened from a path (meo_model_open); call meo_session_trim on memory warnings",
        );
    };
    let budget = match bytes {
        0 => None,
        MEO_MEMORY_BUDGET_AUTO => meo::residency::default_budget(),
        b => Some(b),
    };
    t.lock().set_budget(budget).map_err(|e| (MeoStatus::Io, e.to_string()))
}

/// Sets the sampler (and reseeds it; the tokens fed so far still count for the penalties).
/// NULL `options` restores greedy decoding.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_set_sampler(
    session: *mut MeoSession,
    options: *const MeoSamplerOptions,
) -> MeoStatus {
    guard(|| {
        let mut s = session_mut(session)?;
        let cfg = if options.is_null() {
            SamplerConfig::default()
        } else {
            // SAFETY: readable (C contract).
            unsafe { *options }.config()
        };
        // The history the penalties count (the tokens fed so far) is kept.
        s.sampler.reconfigure(cfg).map_err(|e| (MeoStatus::InvalidArgument, e.to_string()))?;
        Ok(())
    })
}

impl MeoSession {
    /// Runs `tokens` after those already fed; keeps the last position's logits.
    fn feed(&mut self, tokens: &[u32]) -> Res<()> {
        if tokens.is_empty() {
            return err(MeoStatus::InvalidArgument, "no tokens to feed");
        }
        let t0 = Instant::now();
        let model = Arc::clone(&self.model);
        let r = match model.residency()? {
            Some(mut t) => {
                let r = self.session.forward_with(tokens, Logits::Last, &mut t).map(|_| ());
                t.lock().take_step_bytes();
                r
            }
            None => self.session.forward_with(tokens, Logits::Last, &mut meo::NoTrace).map(|_| ()),
        };
        r.map_err(|e| forward_status(&e))?;
        self.sampler.observe(tokens);
        let dt = t0.elapsed().as_secs_f64();
        if tokens.len() == 1 {
            self.stats.decode_tokens += 1;
            self.stats.decode_seconds += dt;
        } else {
            self.stats.prompt_tokens += tokens.len() as u64;
            self.stats.prompt_seconds += dt;
        }
        self.has_logits = true;
        Ok(())
    }

    fn sample(&mut self) -> Res<u32> {
        if !self.has_logits {
            return err(MeoStatus::BadState, "nothing has been fed since the session started or was reset");
        }
        self.sampler.sample(self.session.logits()).map_err(|e| (MeoStatus::BadState, e.to_string()))
    }
}

/// Runs `tokens[0..n_tokens]` after the tokens already fed (the prompt, or one generated
/// token); the logits of the last one are kept for `meo_session_sample` and
/// `meo_session_logits`. An out-of-range id gives `MEO_STATUS_TOKEN_OUT_OF_RANGE`, too many
/// tokens `MEO_STATUS_CONTEXT_FULL`; the session is unchanged then.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_feed(session: *mut MeoSession, tokens: *const u32, n_tokens: usize) -> MeoStatus {
    guard(|| {
        check_ptr(tokens, "tokens")?;
        // SAFETY: C contract.
        let tokens = unsafe { slice(tokens, n_tokens, "tokens") }?;
        session_mut(session)?.feed(tokens)
    })
}

/// The logits of the last position fed: `*logits` points to `*n` floats (the vocabulary
/// size), valid until the next call on this session.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_logits(
    session: *mut MeoSession,
    logits: *mut *const f32,
    n: *mut usize,
) -> MeoStatus {
    guard(|| {
        check_ptr(logits, "logits")?;
        check_ptr(n, "n")?;
        let s = session_mut(session)?;
        if !s.has_logits {
            return err(MeoStatus::BadState, "nothing has been fed since the session started or was reset");
        }
        let l = s.session.logits();
        // SAFETY: checked above.
        unsafe {
            put(logits, l.as_ptr());
            put(n, l.len());
        }
        Ok(())
    })
}

/// Draws the next token from the last logits with the session's sampler.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_sample(session: *mut MeoSession, token: *mut u32) -> MeoStatus {
    guard(|| {
        check_ptr(token, "token")?;
        let t = session_mut(session)?.sample()?;
        // SAFETY: checked above.
        unsafe { put(token, t) };
        Ok(())
    })
}

/// Forgets the sequence (keeps mode, sampler, budget and stats).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_reset(session: *mut MeoSession) -> MeoStatus {
    guard(|| {
        let mut s = session_mut(session)?;
        s.session.reset();
        s.sampler.clear_history();
        s.has_logits = false;
        Ok(())
    })
}

/// Number of positions fed since the session started or was reset.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_position(session: *mut MeoSession, position: *mut usize) -> MeoStatus {
    guard(|| {
        check_ptr(position, "position")?;
        let p = session_mut(session)?.session.position();
        // SAFETY: checked above.
        unsafe { put(position, p) };
        Ok(())
    })
}

/// Called once per generated token with the text it completes (UTF-8, not NUL-terminated,
/// `text_len` bytes; `text_len` 0 when the token completes no character yet, and always for an
/// end-of-sequence token or a model without tokenizer). After the last token one more call
/// with `token == MEO_TOKEN_NONE` flushes text held back, if any. Return 0 to continue,
/// anything else to stop (`meo_session_generate` then returns `MEO_STATUS_CANCELLED`).
/// The session is in use while the callback runs: calls on it from the callback
/// (`meo_session_free` included) return `MEO_STATUS_BUSY` and do nothing; calls on the
/// model and on other sessions work.
pub type MeoTokenCallback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, token: u32, text: *const c_char, text_len: usize) -> i32>;

/// Generates up to `max_new_tokens` tokens, exactly as `meo run` does: feeds the prompt
/// (`prompt` may be NULL with `n_prompt` 0 to continue from the last logits), then samples,
/// stops after an end-of-sequence token (which is counted and reported, its text is not),
/// and feeds each token back. Each token goes to `callback` (may be NULL) and to
/// `tokens[0..capacity]` (may be NULL with `capacity` 0; tokens beyond it are dropped);
/// `*n_generated` (may be NULL) receives the count. `cancel` (may be NULL) is read before
/// every step: set `*cancel` to non-zero from any thread to stop
/// (`MEO_STATUS_CANCELLED`; the tokens so far are reported). Stops with `MEO_STATUS_OK` when
/// the context is full. `meo_session_generate_with` adds stop strings and stop tokens.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_generate(
    session: *mut MeoSession,
    prompt: *const u32,
    n_prompt: usize,
    max_new_tokens: usize,
    callback: MeoTokenCallback,
    user_data: *mut c_void,
    cancel: *const i32,
    tokens: *mut u32,
    capacity: usize,
    n_generated: *mut usize,
) -> MeoStatus {
    guard(|| {
        let out = GenOut { callback, user_data, cancel, tokens, capacity, n_generated, stop: std::ptr::null_mut() };
        // SAFETY: C contract (as documented above).
        unsafe { generate_impl(session, prompt, n_prompt, max_new_tokens, &[], &[], false, out) }
    })
}

/// Options of `meo_session_generate_with`. Zero-initialise for the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MeoGenerateOptions {
    /// Most tokens to generate; 0 = until a stop or the context is full.
    pub max_new_tokens: usize,
    /// `n_stop_strings` UTF-8, NUL-terminated strings (may be NULL when 0): generation stops
    /// when the text contains one; the text up to it is streamed, the string is not. Needs a
    /// tokenizer in the file (`MEO_STATUS_NO_TOKENIZER`); an empty string is
    /// `MEO_STATUS_INVALID_ARGUMENT`.
    pub stop_strings: *const *const c_char,
    pub n_stop_strings: usize,
    /// `n_stop_tokens` more ids that end the generation (may be NULL when 0), besides the
    /// model's end-of-sequence ids (e.g. the chat template's end of turn).
    pub stop_tokens: *const u32,
    pub n_stop_tokens: usize,
    /// 1: do not stop at the model's end-of-sequence ids (only at `stop_tokens`).
    pub ignore_eos: u32,
}

/// Why `meo_session_generate_with` stopped (`*stop_reason`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeoStopReason {
    /// `max_new_tokens` were generated.
    MaxTokens = 0,
    /// A stop token (end of sequence, or one of `stop_tokens`): the last token generated.
    StopToken = 1,
    /// A stop string was reached.
    StopString = 2,
    /// The context is full.
    ContextFull = 3,
    /// The cancel flag or the callback stopped it (the status is `MEO_STATUS_CANCELLED`).
    Cancelled = 4,
}

/// `meo_session_generate` with options: stop strings, more stop tokens, no limit on the
/// tokens. `options` may be NULL for the defaults; `stop_reason` (may be NULL) receives why
/// the generation stopped. Sampling (temperature, top-k/p, min-p, penalties, seed) is the
/// session's, set with `meo_session_set_sampler`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_generate_with(
    session: *mut MeoSession,
    prompt: *const u32,
    n_prompt: usize,
    options: *const MeoGenerateOptions,
    callback: MeoTokenCallback,
    user_data: *mut c_void,
    cancel: *const i32,
    tokens: *mut u32,
    capacity: usize,
    n_generated: *mut usize,
    stop_reason: *mut MeoStopReason,
) -> MeoStatus {
    guard(|| {
        let o = if options.is_null() {
            MeoGenerateOptions {
                max_new_tokens: 0,
                stop_strings: std::ptr::null(),
                n_stop_strings: 0,
                stop_tokens: std::ptr::null(),
                n_stop_tokens: 0,
                ignore_eos: 0,
            }
        } else {
            // SAFETY: a readable MeoGenerateOptions (C contract).
            unsafe { *options }
        };
        // SAFETY: C contract.
        let ptrs = unsafe { slice(o.stop_strings, o.n_stop_strings, "options.stop_strings") }?;
        let mut stops = Vec::with_capacity(ptrs.len());
        for (i, &p) in ptrs.iter().enumerate() {
            // SAFETY: C contract (NUL-terminated strings).
            stops.push(unsafe { c_str(p, &format!("options.stop_strings[{i}]")) }?.to_string());
        }
        // SAFETY: C contract.
        let stop_ids = unsafe { slice(o.stop_tokens, o.n_stop_tokens, "options.stop_tokens") }?;
        let max = if o.max_new_tokens == 0 { usize::MAX } else { o.max_new_tokens };
        let out = GenOut { callback, user_data, cancel, tokens, capacity, n_generated, stop: stop_reason };
        // SAFETY: C contract (as documented above).
        unsafe { generate_impl(session, prompt, n_prompt, max, &stops, stop_ids, o.ignore_eos != 0, out) }
    })
}

/// Where a generation's results go (the C caller's pointers).
struct GenOut {
    callback: MeoTokenCallback,
    user_data: *mut c_void,
    cancel: *const i32,
    tokens: *mut u32,
    capacity: usize,
    n_generated: *mut usize,
    stop: *mut MeoStopReason,
}

/// The body of `meo_session_generate(_with)`.
#[allow(clippy::too_many_arguments)]
unsafe fn generate_impl(
    session: *mut MeoSession,
    prompt: *const u32,
    n_prompt: usize,
    max_new_tokens: usize,
    stop_strings: &[String],
    stop_tokens: &[u32],
    ignore_eos: bool,
    out: GenOut,
) -> Res<()> {
    // SAFETY: C contract.
    let prompt = unsafe { slice(prompt, n_prompt, "prompt") }?;
    if out.capacity > 0 {
        check_ptr(out.tokens, "tokens")?;
    }
    if !out.cancel.is_null() && !(out.cancel as usize).is_multiple_of(align_of::<AtomicI32>()) {
        return err(MeoStatus::InvalidArgument, "cancel is not aligned for an int32_t");
    }
    if stop_strings.iter().any(String::is_empty) {
        return err(MeoStatus::InvalidArgument, "an empty stop string would stop before the first token");
    }
    let mut s = session_mut(session)?;
    let s = &mut *s;
    let model = s.model.clone();
    let logits: Vec<f32>;
    let start = if prompt.is_empty() {
        if !s.has_logits {
            return err(MeoStatus::BadState, "nothing has been fed since the session started or was reset");
        }
        logits = s.session.logits().to_vec();
        Start::Logits(&logits)
    } else {
        Start::Prompt(prompt)
    };
    let mut opts = GenerateOptions {
        max_new_tokens,
        max_context: s.session.max_context(),
        stop_strings: stop_strings.to_vec(),
        ..GenerateOptions::for_model(model.model().config())
    };
    if ignore_eos {
        opts.stop_tokens.clear();
    }
    opts.stop_tokens.extend(stop_tokens.iter().filter(|t| !opts.stop_tokens.contains(t)).collect::<Vec<_>>());
    let tok = if stop_strings.is_empty() { model.tokenizer().ok() } else { Some(model.tokenizer()?) };
    let residency = model.residency()?;
    let mut hooks = FfiHooks {
        tracker: residency,
        callback: out.callback,
        user_data: out.user_data,
        cancel: out.cancel,
        tokens: out.tokens,
        capacity: out.capacity,
        n_generated: out.n_generated,
        count: 0,
        stopped_by_callback: false,
    };
    hooks.report();
    let r = generate_with(&mut s.session, start, &opts, &mut s.sampler, tok, &mut hooks);
    let stopped_by_callback = hooks.stopped_by_callback;
    let g = r.map_err(|e| match e {
        GenerateError::Target(TargetError::Forward(f)) => forward_status(&f),
        GenerateError::Target(t) => (MeoStatus::Unsupported, t.to_string()),
        GenerateError::Sample(e) => (MeoStatus::BadState, e.to_string()),
        GenerateError::Tokenizer(e) => (MeoStatus::TokenOutOfRange, e.to_string()),
        e => (MeoStatus::InvalidArgument, e.to_string()),
    })?;
    s.has_logits = true;
    s.stats.prompt_tokens += prompt.len() as u64;
    s.stats.prompt_seconds += g.prompt_time.as_secs_f64();
    s.stats.decode_tokens += g.decode_steps as u64;
    s.stats.decode_seconds += g.decode_time.as_secs_f64();
    if !out.stop.is_null() {
        let why = match g.stop {
            StopReason::MaxTokens => MeoStopReason::MaxTokens,
            StopReason::StopToken(_) => MeoStopReason::StopToken,
            StopReason::StopString(_) => MeoStopReason::StopString,
            StopReason::ContextFull => MeoStopReason::ContextFull,
            StopReason::Cancelled => MeoStopReason::Cancelled,
        };
        // SAFETY: non-NULL (C contract: writable).
        unsafe { put(out.stop, why) };
    }
    match g.stop {
        StopReason::Cancelled if stopped_by_callback => err(MeoStatus::Cancelled, "the callback asked to stop"),
        StopReason::Cancelled => err(MeoStatus::Cancelled, "cancelled by the cancel flag"),
        _ => Ok(()),
    }
}

/// `meo_session_generate`'s side of the library generation loop: the C callback, the caller's
/// token buffer and count, the cancel flag, and the model's residency tracker.
struct FfiHooks<'a, 'm> {
    tracker: Option<&'a SharedTracker<'m>>,
    callback: MeoTokenCallback,
    user_data: *mut c_void,
    cancel: *const i32,
    tokens: *mut u32,
    capacity: usize,
    n_generated: *mut usize,
    count: usize,
    stopped_by_callback: bool,
}

impl FfiHooks<'_, '_> {
    fn report(&self) {
        if !self.n_generated.is_null() {
            // SAFETY: non-NULL (C contract: writable).
            unsafe { put(self.n_generated, self.count) };
        }
    }

    fn emit(&self, token: u32, text: &str) -> bool {
        match self.callback {
            // SAFETY: a C function pointer given by the caller; `text` lives for the call.
            Some(cb) => unsafe { cb(self.user_data, token, text.as_ptr().cast(), text.len()) == 0 },
            None => true,
        }
    }
}

impl Hooks for FfiHooks<'_, '_> {
    fn trace(&mut self, _prompt: bool) -> Option<&mut dyn meo::Trace> {
        self.tracker.as_mut().map(|t| t as &mut dyn meo::Trace)
    }

    fn after_forward(&mut self, _prompt: bool) {
        if let Some(t) = self.tracker {
            t.lock().take_step_bytes();
        }
    }

    fn on_token(&mut self, id: u32, text: &str) -> Result<bool, GenerateError> {
        if self.count < self.capacity {
            // SAFETY: `count < capacity` writable ids (checked non-NULL by the caller).
            unsafe { self.tokens.add(self.count).write(id) };
        }
        self.count += 1;
        self.report();
        let go_on = self.emit(id, text);
        self.stopped_by_callback = !go_on;
        Ok(go_on)
    }

    fn on_text_end(&mut self, text: &str) -> Result<(), GenerateError> {
        self.emit(MEO_TOKEN_NONE, text);
        Ok(())
    }

    fn cancelled(&mut self) -> bool {
        // SAFETY: non-NULL, aligned (checked by the caller), and the C contract says it stays
        // valid for the call; other threads write it, so it is read atomically.
        !self.cancel.is_null() && unsafe { AtomicI32::from_ptr(self.cancel.cast_mut()) }.load(Ordering::Relaxed) != 0
    }
}

/// The status and message of a refused forward call.
fn forward_status(e: &meo::ForwardError) -> (MeoStatus, String) {
    let status = match e {
        meo::ForwardError::TokenOutOfRange { .. } => MeoStatus::TokenOutOfRange,
        meo::ForwardError::ContextOverflow { .. } => MeoStatus::ContextFull,
        meo::ForwardError::EncoderOnly => MeoStatus::Unsupported,
        meo::ForwardError::FileChanged => MeoStatus::Io,
    };
    (status, e.to_string())
}

/// Fills `*out` with the session's speed and residency figures.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_stats(session: *mut MeoSession, out: *mut MeoStats) -> MeoStatus {
    guard(|| {
        check_ptr(out, "out")?;
        let s = session_mut(session)?;
        let mut st = s.stats;
        st.released_slabs = s.trimmed_slabs;
        st.released_bytes = s.trimmed_bytes;
        if let Some(t) = Arc::clone(&s.model).residency()? {
            let r = t.lock().stats().map_err(|e| (MeoStatus::Io, e.to_string()))?;
            st.residency_available = 1;
            st.experts_touched = r.experts_touched as u64;
            st.experts_total = r.experts_per_layer.iter().sum::<usize>() as u64;
            st.expert_bytes_resident = r.expert_bytes_resident;
            st.expert_bytes_in_file = r.expert_bytes_in_file;
            st.released_slabs += r.released_slabs;
            st.released_bytes += r.released_bytes;
        }
        st.peak_rss_bytes = meo::residency::peak_rss_bytes().unwrap_or(0);
        // SAFETY: checked above.
        unsafe { put(out, st) };
        Ok(())
    })
}

/// Releases the pages of every expert of the session's model from memory
/// (`madvise(MADV_DONTNEED)` on the read-only file mapping); they are read back from the file
/// when routing selects them again. Call it on a memory warning (iOS
/// `didReceiveMemoryWarning`, Android `onTrimMemory`), between calls on the model's
/// sessions. `*released` (may be NULL) receives the bytes of the slabs released.
/// `MEO_STATUS_UNSUPPORTED` for a model opened from bytes (its memory cannot be re-read).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn meo_session_trim(session: *mut MeoSession, released: *mut u64) -> MeoStatus {
    guard(|| {
        let mut s = session_mut(session)?;
        let bytes = s.model.trim()?;
        if let Some(t) = Arc::clone(&s.model).residency()? {
            t.lock().forget_held();
        }
        let slabs = meo::residency::SlabIndex::from_model(s.model.model()).len() as u64;
        s.trimmed_slabs += slabs;
        s.trimmed_bytes += bytes;
        if !released.is_null() {
            // SAFETY: non-NULL (C contract: writable).
            unsafe { put(released, bytes) };
        }
        Ok(())
    })
}

/// `MeoModel` is shared across threads: it must stay `Send + Sync`. A session moves between
/// the threads that call it one at a time (its `SessionCell` is `Sync` because of that).
const _: () = {
    const fn both<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    both::<MeoModel>();
    send::<MeoSession>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_code_converts_back_and_others_do_not() {
        for (i, s) in MeoStatus::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i, "MeoStatus::ALL is out of order at {s:?}");
            assert_eq!(MeoStatus::from_code(i as i32), Some(s));
        }
        for code in [-1, MeoStatus::ALL.len() as i32, i32::MAX, i32::MIN] {
            assert_eq!(MeoStatus::from_code(code), None);
        }
    }
}
