//! Chat templates: a conversation (role/content messages) → the prompt text a chat model was
//! trained on, with the Jinja template the model ships (feature `chat`).
//!
//! The converter copies the checkpoint's template (`tokenizer_config.json`'s `chat_template`,
//! or `chat_template.jinja`) and its special tokens into the file's metadata ([`TEMPLATE_KEY`],
//! [`BOS_KEY`], …; see docs/FORMAT.md). [`ChatTemplate`] renders it with `minijinja` the way
//! Hugging Face transformers' `apply_chat_template` does:
//! - the environment: `trim_blocks` and `lstrip_blocks` on, loop controls (`break`,
//!   `continue`), `namespace`, `raise_exception(msg)`, `strftime_now(fmt)` (UTC here, local
//!   time in transformers), a `tojson` that writes what Python's `json.dumps` writes (no HTML
//!   escaping; `indent`, `separators`, `sort_keys`, `ensure_ascii`), and Python's string, dict
//!   and list methods (`.strip()`, `.split()`, `.startswith()`, `.items()`, `.get()`, …);
//! - the variables: the special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`),
//!   the caller's extra variables (`enable_thinking`, `reasoning_effort`, `tools`, …; they
//!   override the special tokens), `messages`, `tools` and `documents` (none unless given),
//!   and `add_generation_prompt`;
//! - the messages: keys whose value is null are dropped; a message with reasoning
//!   (`reasoning_content`, `thinking` or `reasoning`) gets it under `thinking` and
//!   `reasoning_content` too (gpt-oss templates read `thinking`, Qwen3's `reasoning_content`).
//!
//! Templates come with downloaded models: rendering is bounded (a fuel limit on the
//! template's steps, a recursion limit) and every failure is a [`ChatError`], never a panic.

use crate::format::{MetaValue, Metadata};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use std::string::{String, ToString};
use std::vec::Vec;

/// Metadata key of the model's default chat template (Jinja source).
pub const TEMPLATE_KEY: &str = "tokenizer.chat_template";
/// Prefix of the keys of named templates (`tokenizer.chat_template.tool_use`), from the
/// list form of `chat_template` in `tokenizer_config.json`.
pub const NAMED_TEMPLATE_PREFIX: &str = "tokenizer.chat_template.";
/// Metadata keys of the special tokens' strings, as the template sees them.
pub const BOS_KEY: &str = "tokenizer.bos_token";
pub const EOS_KEY: &str = "tokenizer.eos_token";
pub const PAD_KEY: &str = "tokenizer.pad_token";
pub const UNK_KEY: &str = "tokenizer.unk_token";
/// Metadata key of the added tokens' strings (an array, in id order).
pub const ADDED_TOKENS_KEY: &str = "tokenizer.added_tokens";

/// Largest template source accepted (real ones are under 20 KiB).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Template steps a render may take (minijinja fuel); a real template over a long
/// conversation takes well under a million.
pub const FUEL: u64 = 50_000_000;

/// Largest `tojson` output (a template argument serialised is far smaller).
const MAX_TOJSON_BYTES: usize = 16 << 20;

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "this model has no chat template (metadata key {TEMPLATE_KEY:?} is missing): convert it from a checkpoint \
         whose tokenizer_config.json has a chat_template (or that has chat_template.jinja), or give a plain prompt"
    )]
    NoTemplate,
    #[error("this model has no chat template named {name:?} (it has: {available})")]
    UnknownName { name: String, available: String },
    #[error("metadata key {key:?} has type {found}, expected a string")]
    WrongType { key: String, found: &'static str },
    #[error("the chat template is {len} bytes, more than the {MAX_TEMPLATE_BYTES} bytes accepted")]
    TooLarge { len: usize },
    #[error("the chat template does not compile: {0}")]
    Syntax(String),
    /// The template refused the conversation (its `raise_exception`), e.g. roles that do
    /// not alternate.
    #[error("the chat template refused the conversation: {0}")]
    Raised(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("invalid chat input: {0}")]
    Input(String),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, … (what the template expects).
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The special tokens' strings a template sees (`bos_token`, …); `None` leaves one undefined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
    /// Fixed time for `strftime_now` (Unix seconds), for reproducible renders.
    now: Option<i64>,
}

impl core::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ChatTemplate").field("special", &self.special).field("now", &self.now).finish()
    }
}

/// The error a `raise_exception` call carries, to tell it from other render errors.
#[derive(Debug)]
struct Raised(String);

impl core::fmt::Display for Raised {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn meta_str<'a>(m: &Metadata<'a>, key: &str) -> Result<Option<&'a str>, ChatError> {
    match m.get(key) {
        None => Ok(None),
        Some(MetaValue::Str(s)) => Ok(Some(s)),
        Some(v) => Err(ChatError::WrongType { key: key.into(), found: v.type_name() }),
    }
}

/// The names of the named templates a file holds (`tool_use`, `rag`, …), in key order.
pub fn template_names(m: &Metadata<'_>) -> Vec<String> {
    m.entries().iter().filter_map(|(k, _)| k.strip_prefix(NAMED_TEMPLATE_PREFIX).map(str::to_string)).collect()
}

/// Whether the file has a default chat template (present and a string; not compiled).
pub fn has_template(m: &Metadata<'_>) -> bool {
    matches!(m.get(TEMPLATE_KEY), Some(MetaValue::Str(_)))
}

impl SpecialTokens {
    /// The special tokens stored in a file's metadata.
    ///
    /// # Errors
    /// A key holds something other than a string.
    pub fn from_metadata(m: &Metadata<'_>) -> Result<Self, ChatError> {
        let get = |k| meta_str(m, k).map(|v| v.map(str::to_string));
        Ok(Self { bos: get(BOS_KEY)?, eos: get(EOS_KEY)?, pad: get(PAD_KEY)?, unk: get(UNK_KEY)? })
    }
}

impl ChatTemplate {
    /// Compiles the Jinja `source` with the special tokens `special`.
    ///
    /// # Errors
    /// [`ChatError::TooLarge`] or [`ChatError::Syntax`].
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, ChatError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(ChatError::TooLarge { len: source.len() });
        }
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(200);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
        });
        env.add_template_owned("chat", without_generation_tags(source)).map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self { env, special, now: None })
    }

    /// The default template of a file's metadata.
    ///
    /// # Errors
    /// [`ChatError::NoTemplate`] when the file has none, or it does not compile.
    pub fn from_metadata(m: &Metadata<'_>) -> Result<Self, ChatError> {
        let source = meta_str(m, TEMPLATE_KEY)?.ok_or(ChatError::NoTemplate)?;
        Self::new(source, SpecialTokens::from_metadata(m)?)
    }

    /// The template named `name` (`tool_use`, …; `default` is the default one).
    ///
    /// # Errors
    /// [`ChatError::UnknownName`] (listing the names there are), or as
    /// [`from_metadata`](Self::from_metadata).
    pub fn from_metadata_named(m: &Metadata<'_>, name: &str) -> Result<Self, ChatError> {
        if name == "default" {
            return Self::from_metadata(m);
        }
        let key = format!("{NAMED_TEMPLATE_PREFIX}{name}");
        let Some(source) = meta_str(m, &key)? else {
            let mut names = template_names(m);
            if has_template(m) {
                names.insert(0, "default".into());
            }
            let available = if names.is_empty() { "none".into() } else { names.join(", ") };
            return Err(ChatError::UnknownName { name: name.into(), available });
        };
        Self::new(source, SpecialTokens::from_metadata(m)?)
    }

    /// The default template of a model's file.
    ///
    /// # Errors
    /// As [`from_metadata`](Self::from_metadata); the file's header cannot be read.
    pub fn from_model(model: &crate::Model) -> Result<Self, ChatError> {
        let file = model.file().map_err(|e| ChatError::Input(e.to_string()))?;
        Self::from_metadata(&file.metadata)
    }

    /// `strftime_now` returns this time (Unix seconds, UTC) instead of the clock's.
    #[must_use]
    pub fn with_fixed_time(mut self, unix_seconds: i64) -> Self {
        self.now = Some(unix_seconds);
        self
    }

    /// The special tokens the template sees.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages`; `add_generation_prompt` appends the header of the assistant's
    /// reply. `kwargs`: extra template variables as a JSON object (`{"enable_thinking":
    /// false}`, `{"tools": […]}`), or `None`.
    ///
    /// # Errors
    /// `kwargs` is not a JSON object; the template raised an error or failed.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: Option<&str>,
    ) -> Result<String, ChatError> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        self.render_values(msgs, add_generation_prompt, parse_kwargs(kwargs)?)
    }

    /// [`render`](Self::render) with the messages as a JSON array of objects, any fields
    /// (`tool_calls`, `reasoning_content`, content as a list of parts…), key order kept.
    ///
    /// # Errors
    /// As [`render`](Self::render); `messages` is not a JSON array of objects.
    pub fn render_json(
        &self,
        messages: &str,
        add_generation_prompt: bool,
        kwargs: Option<&str>,
    ) -> Result<String, ChatError> {
        let v: Value = serde_json::from_str(messages)
            .map_err(|e| ChatError::Input(format!("the messages are not valid JSON: {e}")))?;
        if v.kind() != ValueKind::Seq {
            return Err(ChatError::Input("the messages must be a JSON array of objects".into()));
        }
        let msgs = v.try_iter().map_err(|e| ChatError::Input(e.to_string()))?.collect();
        self.render_values(msgs, add_generation_prompt, parse_kwargs(kwargs)?)
    }

    fn render_values(
        &self,
        messages: Vec<Value>,
        add_generation_prompt: bool,
        kwargs: Option<Value>,
    ) -> Result<String, ChatError> {
        let mut ctx: Vec<(String, Value)> = Vec::new();
        let s = &self.special;
        for (k, v) in [("bos_token", &s.bos), ("eos_token", &s.eos), ("unk_token", &s.unk), ("pad_token", &s.pad)] {
            if let Some(v) = v {
                ctx.push((k.into(), Value::from(v.as_str())));
            }
        }
        let mut tools = Value::from(());
        let mut documents = Value::from(());
        if let Some(v) = kwargs {
            if v.kind() != ValueKind::Map {
                return Err(ChatError::Input("the template variables must be a JSON object".into()));
            }
            for key in v.try_iter().map_err(|e| ChatError::Input(e.to_string()))? {
                let val = v.get_item(&key).unwrap_or_default();
                let name = key.as_str().unwrap_or_default().to_string();
                match name.as_str() {
                    "tools" => tools = val,
                    "documents" => documents = val,
                    "messages" | "add_generation_prompt" => {
                        return Err(ChatError::Input(format!("{name:?} cannot be a template variable")));
                    }
                    _ => {
                        ctx.retain(|(k, _)| *k != name);
                        ctx.push((name, val));
                    }
                }
            }
        }
        let mut msgs = Vec::with_capacity(messages.len());
        for m in messages {
            msgs.push(prepare_message(m)?);
        }
        ctx.push(("messages".into(), Value::from(msgs)));
        ctx.push(("tools".into(), tools));
        ctx.push(("documents".into(), documents));
        ctx.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));
        let now = self.now;
        let strftime_now = Value::from_function(move |fmt: String| -> Result<String, minijinja::Error> {
            let t = now.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
            });
            strftime(&fmt, t).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
        });
        ctx.push(("strftime_now".into(), strftime_now));
        let tmpl = self.env.get_template("chat").map_err(|e| ChatError::Render(describe(&e)))?;
        tmpl.render(Value::from_pairs(ctx)).map_err(|e| {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if let Some(r) = s.downcast_ref::<Raised>() {
                    return ChatError::Raised(r.0.clone());
                }
                src = s.source();
            }
            ChatError::Render(describe(&e))
        })
    }
}

/// `source` with transformers' `{% generation %}` … `{% endgeneration %}` block (it marks the
/// assistant's tokens for training masks and renders its body unchanged) turned into `{% if
/// true %}` … `{% endif %}`, whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let inner = tag[2..].trim_start_matches(['-', '+']).trim_start();
        let word_end = inner.find(|c: char| !c.is_ascii_alphanumeric() && c != '_').unwrap_or(inner.len());
        let word = &inner[..word_end];
        let after = inner[word_end..].trim_start();
        let closes = after.starts_with("%}") || after.starts_with("-%}") || after.starts_with("+%}");
        if closes && (word == "generation" || word == "endgeneration") {
            let head_len = tag.len() - inner.len();
            out.push_str(&tag[..head_len]);
            out.push_str(if word == "generation" { "if true" } else { "endif" });
            out.push(' ');
            rest = &tag[tag.len() - after.len()..];
        } else {
            out.push_str("{%");
            rest = &tag[2..];
        }
    }
    out.push_str(rest);
    out
}

/// The template variables' JSON text as a value (key order kept).
fn parse_kwargs(kwargs: Option<&str>) -> Result<Option<Value>, ChatError> {
    kwargs
        .map(|k| {
            serde_json::from_str(k)
                .map_err(|e| ChatError::Input(format!("the template variables are not valid JSON: {e}")))
        })
        .transpose()
}

/// A minijinja error in one line: what, and where in the template.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line()
        && !s.contains("line")
    {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

/// A message as transformers hands it to the template: null fields dropped, reasoning aliased.
fn prepare_message(m: Value) -> Result<Value, ChatError> {
    if m.kind() != ValueKind::Map {
        return Err(ChatError::Input(format!("a message must be an object, got {}", m.kind())));
    }
    let mut fields: Vec<(Value, Value)> = Vec::new();
    for key in m.try_iter().map_err(|e| ChatError::Input(e.to_string()))? {
        let v = m.get_item(&key).unwrap_or_default();
        if !v.is_none() && !v.is_undefined() {
            fields.push((key, v));
        }
    }
    let get = |name: &str| fields.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v.clone());
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|n| get(n));
    if let Some(r) = reasoning {
        // {"thinking": r, **message, "reasoning_content": r}
        let mut out: Vec<(Value, Value)> = Vec::with_capacity(fields.len() + 2);
        out.push((Value::from("thinking"), get("thinking").unwrap_or_else(|| r.clone())));
        out.extend(fields.into_iter().filter(|(k, _)| k.as_str() != Some("thinking")));
        match out.iter_mut().find(|(k, _)| k.as_str() == Some("reasoning_content")) {
            Some(slot) => slot.1 = r,
            None => out.push((Value::from("reasoning_content"), r)),
        }
        fields = out;
    }
    Ok(Value::from_pairs(fields))
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
                })?;
                Some(" ".repeat(usize::try_from(n.clamp(0, 64)).unwrap_or(0)))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item(&Value::from(0)).ok().and_then(|v| v.as_str().map(str::to_string));
            let b = s.get_item(&Value::from(1)).ok().and_then(|v| v.as_str().map(str::to_string));
            match (a, b) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ));
                }
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let w = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    w.value(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn value(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        if depth > 128 {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: nested too deeply"));
        }
        // Every value visited writes at least a byte: capping the output caps the work (a
        // namespace holding itself twice would otherwise take 2^depth steps).
        if out.len() > MAX_TOJSON_BYTES {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: the output is too large"));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match (v.is_integer(), f64::try_from(v.clone())) {
                (false, Ok(f)) => out.push_str(&py_float(f)),
                _ => out.push_str(&v.to_string()),
            },
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Bytes => self.string(&v.to_string(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.value(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(key_text);
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.string(&key_text(k), out);
                    out.push_str(&self.key_sep);
                    self.value(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            _ => self.string(&v.to_string(), out),
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A map key as Python's `json.dumps` writes it (strings as they are, others as JSON).
fn key_text(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None | ValueKind::Undefined => "null".into(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        _ => k.to_string(),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed notation for exponents
/// in `[-4, 16)`, otherwise `d.ddde+XX`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let e = format!("{f:e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(usize::try_from(-point).unwrap_or(0)))
        } else {
            let p = usize::try_from(point).unwrap_or(0);
            if digits.len() <= p {
                format!("{digits}{}.0", "0".repeat(p - digits.len()))
            } else {
                format!("{}.{}", &digits[..p], &digits[p..])
            }
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Civil date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// C's `strftime` for UTC time `t` (Unix seconds): `%Y %y %m %d %e %j %H %I %M %S %p %B %b %h
/// %A %a %F %T %%`, and the glibc flag `-` that drops padding (`%-d`).
///
/// # Errors
/// An unknown directive.
pub fn strftime(fmt: &str, t: i64) -> Result<String, String> {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, mo, d) = civil(days);
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(mo - 1) as usize] + d + u32::from(is_leap && mo > 2);
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = it.next().ok_or("strftime: the format ends with %")?;
        let pad = spec != '-';
        if !pad {
            spec = it.next().ok_or("strftime: the format ends with %-")?;
        }
        let num = |v: i64, width: usize| if pad { format!("{v:0width$}") } else { v.to_string() };
        match spec {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&num(y.rem_euclid(100), 2)),
            'm' => out.push_str(&num(i64::from(mo), 2)),
            'd' => out.push_str(&num(i64::from(d), 2)),
            'e' => out.push_str(&if pad { format!("{d:2}") } else { d.to_string() }),
            'j' => out.push_str(&num(i64::from(yday), 3)),
            'H' => out.push_str(&num(h, 2)),
            'I' => out.push_str(&num(if h % 12 == 0 { 12 } else { h % 12 }, 2)),
            'M' => out.push_str(&num(mi, 2)),
            'S' => out.push_str(&num(s, 2)),
            'p' => out.push_str(if h < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[(mo - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(mo - 1) as usize][..3]),
            'A' => out.push_str(DAYS[wday]),
            'a' => out.push_str(&DAYS[wday][..3]),
            'F' => out.push_str(&format!("{y}-{mo:02}-{d:02}")),
            'T' => out.push_str(&format!("{h:02}:{mi:02}:{s:02}")),
            '%' => out.push('%'),
            other => return Err(format!("strftime: unsupported directive %{other}")),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Multi-turn conversations over one target

/// Why a chat turn failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    /// The new message alone (with the system prompt) does not fit in the context.
    #[error(
        "the message does not fit in the context: the conversation renders to {tokens} tokens with only the system \
         prompt and this message, the context holds {max}"
    )]
    TooLong { tokens: usize, max: usize },
}

/// What happened to the cache at the start of a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// The cached tokens are a prefix of the new rendering: only the rest was fed.
    Reused,
    /// The rendering departs from the cache after `common` tokens (the template rewrote an
    /// earlier turn, or the reply re-tokenized differently): the cache was cut back to them.
    Rewound { common: usize },
    /// As `Rewound`, but the target cannot cut its cache: it was reset and everything fed.
    Reset,
    /// The conversation did not fit in the context: it was forgotten (the system prompt kept)
    /// and the new message starts a fresh one.
    ContextReset { dropped_messages: usize },
}

/// What one turn did.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The assistant's reply text (as streamed: stop strings and special tokens left out).
    pub reply: String,
    /// Tokens of the whole rendered conversation this turn fed up to.
    pub conversation_tokens: usize,
    /// Of those, tokens already in the cache (not fed again).
    pub reused: usize,
    /// Tokens fed for this turn's prompt (`conversation_tokens - reused`).
    pub fed: usize,
    pub cache: CacheUse,
    /// The generation (generated ids, stop reason, timings).
    pub generation: crate::generate::Generation,
}

/// A conversation with a model over one [`Target`](crate::Target): the messages so far, and
/// the tokens the target's cache holds, so that each turn feeds only what is new.
///
/// Each turn renders the whole conversation with the template (generation prompt added),
/// tokenizes it, and compares it with the cached tokens: when they are a prefix, only the
/// rest is fed; otherwise the cache is cut back to the shared prefix ([`CacheUse`] says
/// which). The reply is appended as an `assistant` message. Context-full policy: when the
/// rendered conversation plus room for the reply (`GenerateOptions::max_new_tokens`, at most
/// half the context) does not fit, the earlier turns are forgotten, the system prompt is
/// kept, and the new message starts over ([`CacheUse::ContextReset`]); a reply that fills
/// the context stops with [`StopReason::ContextFull`](crate::generate::StopReason).
#[derive(Debug)]
pub struct Conversation {
    template: ChatTemplate,
    system: Option<String>,
    vars: Option<String>,
    messages: Vec<Message>,
    /// The tokens the target holds (fed since its last reset).
    cached: Vec<u32>,
}

/// Forwards to the caller's hooks, collecting the reply's text.
struct Collect<'h> {
    inner: &'h mut dyn crate::generate::Hooks,
    text: String,
}

impl crate::generate::Hooks for Collect<'_> {
    fn trace(&mut self, prompt: bool) -> Option<&mut dyn crate::Trace> {
        self.inner.trace(prompt)
    }
    fn on_prompt_logits(&mut self, pos0: usize, logits: &[f32]) -> Result<(), crate::generate::GenerateError> {
        self.inner.on_prompt_logits(pos0, logits)
    }
    fn after_forward(&mut self, prompt: bool) {
        self.inner.after_forward(prompt);
    }
    fn on_token(&mut self, id: u32, text: &str) -> Result<bool, crate::generate::GenerateError> {
        self.text.push_str(text);
        self.inner.on_token(id, text)
    }
    fn on_text_end(&mut self, text: &str) -> Result<(), crate::generate::GenerateError> {
        self.text.push_str(text);
        self.inner.on_text_end(text)
    }
    fn cancelled(&mut self) -> bool {
        self.inner.cancelled()
    }
}

impl Conversation {
    /// A conversation with `template`, starting with the system prompt `system` if given.
    pub fn new(template: ChatTemplate, system: Option<String>) -> Self {
        Self { template, system, vars: None, messages: Vec::new(), cached: Vec::new() }
    }

    /// Extra template variables for every turn, a JSON object (`{"enable_thinking": false}`).
    ///
    /// # Errors
    /// Not a JSON object.
    pub fn set_vars(&mut self, vars: Option<String>) -> Result<(), ChatError> {
        if let Some(v) = parse_kwargs(vars.as_deref())?
            && v.kind() != ValueKind::Map
        {
            return Err(ChatError::Input("the template variables must be a JSON object".into()));
        }
        self.vars = vars;
        Ok(())
    }

    /// The messages so far (the system prompt first, if any).
    pub fn messages(&self) -> Vec<Message> {
        self.system.iter().map(|s| Message::new("system", s.clone())).chain(self.messages.iter().cloned()).collect()
    }

    /// Forgets the conversation (keeps the system prompt) and resets `target`.
    pub fn reset(&mut self, target: &mut dyn crate::Target) {
        self.messages.clear();
        self.cached.clear();
        target.reset();
    }

    /// The tokens of the conversation with `user` added, rendered with the generation prompt.
    fn render_tokens(&self, user: &[Message], tok: &crate::tokenizer::Tokenizer) -> Result<Vec<u32>, TurnError> {
        let mut all = self.messages();
        all.extend_from_slice(user);
        let text = self.template.render(&all, true, self.vars.as_deref())?;
        Ok(tok.encode_without_special_tokens(&text)?)
    }

    /// One turn: `user` says something, the model replies (streamed through `hooks`).
    /// `sampler`'s history is kept in step with the cache.
    ///
    /// # Errors
    /// The template or tokenizer failed, the message alone does not fit in the context, or
    /// the generation failed (the conversation is then as before the turn, the target reset).
    pub fn turn(
        &mut self,
        target: &mut dyn crate::Target,
        user: &str,
        opts: &crate::generate::GenerateOptions,
        sampler: &mut crate::sample::Sampler,
        tok: &crate::tokenizer::Tokenizer,
        hooks: &mut dyn crate::generate::Hooks,
    ) -> Result<Turn, TurnError> {
        let max = if opts.max_context == 0 { usize::MAX } else { opts.max_context }.min(target.max_context());
        let room = opts.max_new_tokens.clamp(1, (max / 2).max(1));
        let msg = [Message::new("user", user)];
        let mut tokens = self.render_tokens(&msg, tok)?;
        let mut cache = CacheUse::Reused;
        if tokens.len() + room > max && !self.messages.is_empty() {
            let dropped = self.messages.len();
            self.messages.clear();
            tokens = self.render_tokens(&msg, tok)?;
            cache = CacheUse::ContextReset { dropped_messages: dropped };
        }
        if tokens.is_empty() {
            return Err(ChatError::Render("the chat template rendered nothing to feed".into()).into());
        }
        if tokens.len() >= max {
            return Err(TurnError::TooLong { tokens: tokens.len(), max });
        }
        if self.cached.len() != target.position() {
            // Someone else fed or reset the target: nothing cached can be trusted.
            self.cached.clear();
            target.reset();
        }
        let mut common = self.cached.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        // At least one token is fed: its logits give the first reply token.
        common = common.min(tokens.len() - 1);
        if common < self.cached.len() {
            if matches!(cache, CacheUse::Reused) {
                cache = CacheUse::Rewound { common };
            }
            if !target.truncate(common) {
                target.reset();
                common = 0;
                if matches!(cache, CacheUse::Rewound { .. }) {
                    cache = CacheUse::Reset;
                }
            }
            self.cached.truncate(common);
            sampler.clear_history();
            sampler.observe(&self.cached);
        }
        let suffix = &tokens[common..];
        let mut collect = Collect { inner: hooks, text: String::new() };
        let g = crate::generate::generate_with(
            target,
            crate::generate::Start::Prompt(suffix),
            opts,
            sampler,
            Some(tok),
            &mut collect,
        );
        let g = match g {
            Ok(g) => g,
            Err(e) => {
                self.cached.clear();
                target.reset();
                sampler.clear_history();
                return Err(e.into());
            }
        };
        // What the target holds now: the prompt, then the generated tokens fed back (all but
        // the last, which was sampled and not fed).
        self.cached = tokens.clone();
        self.cached.extend_from_slice(&g.tokens[..g.decode_steps.min(g.tokens.len())]);
        if self.cached.len() != target.position() {
            self.cached.clear();
            target.reset();
            sampler.clear_history();
        }
        self.messages.push(msg[0].clone());
        self.messages.push(Message::new("assistant", collect.text.clone()));
        Ok(Turn {
            reply: collect.text,
            conversation_tokens: tokens.len(),
            reused: common,
            fed: tokens.len() - common,
            cache,
            generation: g,
        })
    }
}

/// Stop tokens for chatting: the model's end-of-sequence ids and the template's `eos_token`
/// (Qwen's `<|im_end|>`, which ends a turn), if the tokenizer knows it.
pub fn stop_tokens(
    opts: &crate::generate::GenerateOptions,
    template: &ChatTemplate,
    tok: &crate::tokenizer::Tokenizer,
) -> Vec<u32> {
    let mut v = opts.stop_tokens.clone();
    if let Some(id) = template.special.eos.as_deref().and_then(|e| tok.token_to_id(e))
        && !v.contains(&id)
    {
        v.push(id);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> ChatTemplate {
        let special = SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), ..Default::default() };
        ChatTemplate::new(src, special).unwrap()
    }

    #[test]
    fn renders_messages_special_tokens_and_generation_prompt() {
        let t = tmpl(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m['content'] | trim }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        );
        let msgs = [Message::new("user", " hi "), Message::new("assistant", "hello")];
        assert_eq!(t.render(&msgs, true, None).unwrap(), "<s>[user]hi\n[assistant]hello[assistant]");
        assert_eq!(t.render(&msgs[..1], false, None).unwrap(), "<s>[user]hi");
    }

    #[test]
    fn raise_exception_and_bad_templates_are_typed_errors() {
        let t = tmpl("{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}ok");
        let e = t.render(&[Message::new("assistant", "x")], false, None).unwrap_err();
        assert!(matches!(&e, ChatError::Raised(m) if m == "roles must alternate"), "{e}");
        assert_eq!(t.render(&[Message::new("user", "x")], false, None).unwrap(), "ok");
        let special = SpecialTokens::default();
        assert!(matches!(ChatTemplate::new("{% for %}", special.clone()), Err(ChatError::Syntax(_))));
        let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}", special.clone()).unwrap();
        assert!(matches!(t.render(&[Message::new("user", "x")], false, None), Err(ChatError::Render(_))));
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            special,
        )
        .unwrap();
        assert!(matches!(t.render(&[], false, None), Err(ChatError::Render(_))), "fuel bounds a render");
        for hostile in [
            "{% set ns = namespace() %}{% set ns.a = ns %}{% set ns.b = ns %}{{ ns | tojson }}",
            "{{ 'x' * 1000000000 }}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{{ range(1000000000) | list | length }}",
        ] {
            let t = ChatTemplate::new(hostile, SpecialTokens::default()).unwrap();
            let r = t.render(&[], false, None);
            assert!(r.as_ref().is_err_and(|e| matches!(e, ChatError::Render(_))), "{hostile}: {r:?}");
        }
        assert!(matches!(t.render(&[], false, Some("[1]")), Err(ChatError::Input(_))));
        assert!(matches!(t.render_json("{\"role\": 1}", false, None), Err(ChatError::Input(_))));
        assert!(matches!(t.render_json("[1]", false, None), Err(ChatError::Input(_))));
        assert!(matches!(t.render_json("[", false, None), Err(ChatError::Input(_))));
    }

    #[test]
    fn python_methods_loop_controls_namespace_and_kwargs() {
        let t = tmpl(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.content.startswith('skip') %}{% continue %}{% endif %}\
             {% set ns.n = ns.n + 1 %}{{ m.content.split(',')[-1].strip() }}|{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}\
             {{ ns.n }}{% if enable_thinking is defined and enable_thinking is false %}/nothink{% endif %}",
        );
        let msgs: Vec<Message> = ["a, b ", "skip", "c,d", "e"].iter().map(|c| Message::new("user", *c)).collect();
        assert_eq!(t.render(&msgs, false, None).unwrap(), "b|d|2");
        assert_eq!(t.render(&msgs, false, Some(r#"{"enable_thinking": false}"#)).unwrap(), "b|d|2/nothink");
        // kwargs override the special tokens.
        let t = tmpl("{{ bos_token }}");
        assert_eq!(t.render(&[], false, Some(r#"{"bos_token": "<B>"}"#)).unwrap(), "<B>");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t =
            tmpl("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ tools | tojson(separators=(',', ':')) }}");
        let kw =
            r#"{"tools": [{"name": "f<&>", "x": [1, 2.5, 1e20, 1e-7, true, null], "u": "é\n\"", "e": {}, "l": []}]}"#;
        let got = t.render(&[], false, Some(kw)).unwrap();
        let want = concat!(
            r#"[{"name": "f<&>", "x": [1, 2.5, 1e+20, 1e-07, true, null], "u": "é\n\"", "e": {}, "l": []}]|"#,
            "{\n  \"name\": \"f<&>\",\n  \"x\": [\n    1,\n    2.5,\n    1e+20,\n    1e-07,\n    true,\n    null\n  ],\n  \"u\": \"é\\n\\\"\",\n  \"e\": {},\n  \"l\": []\n}|",
            r#"[{"name":"f<&>","x":[1,2.5,1e+20,1e-07,true,null],"u":"é\n\"","e":{},"l":[]}]"#
        );
        assert_eq!(got, want);
        assert_eq!(py_float(100.0), "100.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(123456789012345.6), "123456789012345.6");
        assert_eq!(py_float(-0.5), "-0.5");
    }

    #[test]
    fn messages_drop_nulls_and_alias_reasoning() {
        let t = tmpl("{% for m in messages %}{{ m | tojson }}{% endfor %}");
        let got = t.render_json(
            r#"[{"role": "assistant", "content": "x", "reasoning": "r", "tool_calls": null}]"#,
            false,
            None,
        );
        assert_eq!(
            got.unwrap(),
            r#"{"thinking": "r", "role": "assistant", "content": "x", "reasoning": "r", "reasoning_content": "r"}"#
        );
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let src = "{% for m in messages %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}{% endfor %}{%generation%}x{%endgeneration%}";
        assert_eq!(
            without_generation_tags(src),
            "{% for m in messages %}{%- if true -%}\n[{{ m.content }}]\n{%- endif %}{% endfor %}{%if true %}x{%endif %}"
        );
        let t = tmpl(src);
        assert_eq!(t.render(&[Message::new("user", "a"), Message::new("user", "b")], false, None).unwrap(), "[a][b]x");
        assert_eq!(without_generation_tags("{% if generations %}{{ '{%' }}"), "{% if generations %}{{ '{%' }}");
    }

    #[test]
    fn strftime_matches_c() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t).unwrap(), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y|%B %-d, %Y|%A %a %j %I%p %y %e%%", t).unwrap(),
            "29 Feb 2024|February 29, 2024|Thursday Thu 060 01PM 24 29%"
        );
        assert_eq!(strftime("%F %T", 0).unwrap(), "1970-01-01 00:00:00");
        assert_eq!(strftime("%Y-%m-%d", -86_400).unwrap(), "1969-12-31");
        assert!(strftime("%Q", 0).is_err());
        let tm = tmpl("{{ strftime_now('%d %B %Y') }}").with_fixed_time(t);
        assert_eq!(tm.render(&[], false, None).unwrap(), "29 February 2024");
    }

    #[test]
    fn metadata_lookup() {
        let m = Metadata::from_entries(vec![
            (TEMPLATE_KEY, MetaValue::Str("{{ bos_token }}{{ messages[0].content }}")),
            ("tokenizer.chat_template.tool_use", MetaValue::Str("tools")),
            (BOS_KEY, MetaValue::Str("<s>")),
        ]);
        let t = ChatTemplate::from_metadata(&m).unwrap();
        assert_eq!(t.render(&[Message::new("user", "x")], false, None).unwrap(), "<s>x");
        assert_eq!(template_names(&m), ["tool_use"]);
        let t = ChatTemplate::from_metadata_named(&m, "tool_use").unwrap();
        assert_eq!(t.render(&[], false, None).unwrap(), "tools");
        let e = ChatTemplate::from_metadata_named(&m, "rag").unwrap_err();
        assert!(e.to_string().contains("default, tool_use"), "{e}");
        let empty = Metadata::from_entries(vec![]);
        assert!(matches!(ChatTemplate::from_metadata(&empty), Err(ChatError::NoTemplate)));
        let wrong = Metadata::from_entries(vec![(TEMPLATE_KEY, MetaValue::U64(1))]);
        assert!(matches!(ChatTemplate::from_metadata(&wrong), Err(ChatError::WrongType { .. })));
    }

    /// Every case of `tests/fixtures/chat_templates.json` (written by
    /// `examples/fixtures/chat_templates.py` with transformers' `apply_chat_template`) renders
    /// to the same string, or fails where transformers failed.
    #[test]
    fn chat_templates_match_transformers() {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/chat_templates.json");
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let field = |v: &Value, k: &str| v.get_attr(k).unwrap();
        let text = |v: Value| v.as_str().map(str::to_string);
        let now = i64::try_from(field(&fixture, "now")).unwrap();
        let templates = field(&fixture, "templates");
        let cases: Vec<Value> = field(&fixture, "cases").try_iter().unwrap().collect();
        let mut seen = std::collections::BTreeSet::new();
        for case in &cases {
            let tname = text(field(case, "template")).unwrap();
            let name = text(field(case, "name")).unwrap();
            let t = field(&templates, &tname);
            let sp = field(&t, "special_tokens");
            let special = SpecialTokens {
                bos: text(field(&sp, "bos_token")),
                eos: text(field(&sp, "eos_token")),
                pad: text(field(&sp, "pad_token")),
                unk: text(field(&sp, "unk_token")),
            };
            let tm = ChatTemplate::new(&text(field(&t, "source")).unwrap(), special).unwrap().with_fixed_time(now);
            let msgs = field(case, "messages").try_iter().unwrap().collect();
            let got =
                tm.render_values(msgs, field(case, "add_generation_prompt").is_true(), Some(field(case, "kwargs")));
            match (text(field(case, "expected")), text(field(case, "error"))) {
                (Some(want), _) => assert_eq!(got.unwrap(), want, "{tname}: {name}"),
                (None, Some(err)) => match got {
                    Err(ChatError::Raised(m)) => assert_eq!(m, err, "{tname}: {name}"),
                    other => panic!("{tname}: {name}: expected the template to raise {err:?}, got {other:?}"),
                },
                (None, None) => panic!("{tname}: {name}: neither expected nor error"),
            }
            seen.insert(tname);
        }
        let all: Vec<&str> = seen.iter().map(String::as_str).collect();
        for family in ["mixtral", "mistral", "qwen3", "deepseek-v3", "gpt-oss", "granite", "olmoe"] {
            assert!(all.iter().any(|t| t.starts_with(family)), "no {family} template in the fixture");
        }
        assert!(cases.len() >= 20);
    }
}
