//! The chat side of a checkpoint's tokenizer files: the chat template(s) and the special
//! tokens' strings, from `tokenizer_config.json` and `chat_template.jinja`, stored in the
//! `.meo` metadata under the `tokenizer.*` keys of [`meo::chat`] (docs/FORMAT.md).
//!
//! Where the template comes from, first found wins: `chat_template.jinja` (transformers 5
//! saves it there), then `tokenizer_config.json`'s `chat_template`, a string or a list of
//! `{"name", "template"}` (the one named `default` is the default; the others are stored
//! under their names). Named templates in a `chat_templates/` folder (`NAME.jinja`) are
//! stored too. A checkpoint with none of these converts as before, without a template.

use super::{MAX_CONFIG_JSON, read_capped};
use anyhow::{Context, Result, bail};
use meo::chat;
use meo::format::{MetaArray, MetaValue};
use std::path::{Path, PathBuf};

/// Largest template file read.
const MAX_TEMPLATE: u64 = chat::MAX_TEMPLATE_BYTES as u64;

/// Chat metadata of a checkpoint (every field optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatMeta {
    /// The default template.
    pub template: Option<String>,
    /// Other templates by name (`tool_use`, `rag`), sorted by name.
    pub named: Vec<(String, String)>,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    /// The added tokens' strings (`added_tokens_decoder`), in id order.
    pub added_tokens: Vec<String>,
    /// The files read (inputs of the conversion).
    pub paths: Vec<PathBuf>,
    /// The metadata keys of `named`, in its order.
    named_keys: Vec<String>,
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object.
fn token_text(v: Option<&serde_json::Value>, what: &str) -> Result<Option<String>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("{what}: an object without a string \"content\""),
        },
        Some(other) => bail!("{what}: expected a string or an object with \"content\", got {other}"),
    }
}

impl ChatMeta {
    /// Reads the chat files of the checkpoint directory `dir` (none may exist).
    ///
    /// # Errors
    /// A file that exists but is unreadable, too large, not UTF-8 or malformed (the message
    /// names the file and the key).
    pub fn read(dir: &Path) -> Result<Self> {
        let mut m = Self::default();
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = read_capped(&cfg_path, MAX_CONFIG_JSON.max(MAX_TEMPLATE * 4))?;
            let cfg: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", cfg_path.display()))?;
            m.read_config(&cfg).with_context(|| cfg_path.display().to_string())?;
            m.paths.push(cfg_path);
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            m.template = Some(read_capped(&jinja, MAX_TEMPLATE)?);
            m.paths.push(jinja);
        }
        let folder = dir.join("chat_templates");
        if folder.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
                .with_context(|| format!("{}: cannot list", folder.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                .collect();
            files.sort();
            for p in files {
                let Some(name) = p.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
                let src = read_capped(&p, MAX_TEMPLATE)?;
                m.named.retain(|(n, _)| *n != name);
                m.named.push((name, src));
                m.paths.push(p);
            }
            m.named.sort();
        }
        for (name, src) in m.template.iter().map(|s| ("default", s)).chain(m.named.iter().map(|(n, s)| (n.as_str(), s)))
        {
            if src.len() > chat::MAX_TEMPLATE_BYTES {
                bail!(
                    "chat template {name:?}: {} bytes, more than the {} accepted",
                    src.len(),
                    chat::MAX_TEMPLATE_BYTES
                );
            }
            if name.is_empty() || name.contains(['\0', '/']) {
                bail!("chat template name {name:?}: empty or not a plain name");
            }
        }
        m.named_keys = m.named.iter().map(|(n, _)| format!("{}{n}", chat::NAMED_TEMPLATE_PREFIX)).collect();
        Ok(m)
    }

    fn read_config(&mut self, cfg: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
        match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) => self.template = Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                for (i, t) in list.iter().enumerate() {
                    let (Some(name), Some(src)) =
                        (t.get("name").and_then(|v| v.as_str()), t.get("template").and_then(|v| v.as_str()))
                    else {
                        bail!("chat_template[{i}]: expected {{\"name\": string, \"template\": string}}");
                    };
                    if name == "default" {
                        self.template = Some(src.to_string());
                    } else {
                        self.named.push((name.to_string(), src.to_string()));
                    }
                }
            }
            Some(other) => bail!("chat_template: expected a string or a list of named templates, got {other}"),
        }
        self.bos = token_text(cfg.get("bos_token"), "bos_token")?;
        self.eos = token_text(cfg.get("eos_token"), "eos_token")?;
        self.pad = token_text(cfg.get("pad_token"), "pad_token")?;
        self.unk = token_text(cfg.get("unk_token"), "unk_token")?;
        if let Some(serde_json::Value::Object(added)) = cfg.get("added_tokens_decoder") {
            let mut v: Vec<(u64, String)> = Vec::new();
            for (id, t) in added {
                let id: u64 = id.parse().with_context(|| format!("added_tokens_decoder: key {id:?} is not an id"))?;
                let text = token_text(Some(t), &format!("added_tokens_decoder[{id}]"))?.unwrap_or_default();
                v.push((id, text));
            }
            v.sort();
            self.added_tokens = v.into_iter().map(|(_, t)| t).collect();
        }
        Ok(())
    }

    /// The metadata entries (keys of [`meo::chat`]); none for a checkpoint without chat files.
    pub fn entries(&self) -> Vec<(&str, MetaValue<'_>)> {
        let mut v = Vec::new();
        if let Some(t) = &self.template {
            v.push((chat::TEMPLATE_KEY, MetaValue::Str(t)));
        }
        for (key, (_, src)) in self.named_keys.iter().zip(&self.named) {
            v.push((key.as_str(), MetaValue::Str(src)));
        }
        for (key, val) in [
            (chat::BOS_KEY, &self.bos),
            (chat::EOS_KEY, &self.eos),
            (chat::PAD_KEY, &self.pad),
            (chat::UNK_KEY, &self.unk),
        ] {
            if let Some(s) = val {
                v.push((key, MetaValue::Str(s)));
            }
        }
        if !self.added_tokens.is_empty() {
            v.push((
                chat::ADDED_TOKENS_KEY,
                MetaValue::Array(MetaArray::Str(self.added_tokens.iter().map(String::as_str).collect())),
            ));
        }
        v
    }

    /// Whether the default template compiles (a warning at conversion, not an error: the file
    /// still runs plain prompts).
    ///
    /// # Errors
    /// The compile error.
    pub fn check(&self) -> Result<(), chat::ChatError> {
        if let Some(t) = &self.template {
            chat::ChatTemplate::new(t, chat::SpecialTokens::default())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_string_list_and_jinja_forms() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(ChatMeta::read(d.path()).unwrap(), ChatMeta::default());
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}],
                "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null,
                "added_tokens_decoder": {"2": {"content": "</s>"}, "0": {"content": "<unk>"}}}"#,
        )
        .unwrap();
        let m = ChatMeta::read(d.path()).unwrap();
        assert_eq!(m.template.as_deref(), Some("D"));
        assert_eq!(m.named, [("tool_use".to_string(), "T".to_string())]);
        assert_eq!((m.bos.as_deref(), m.eos.as_deref(), m.pad.as_deref()), (Some("<s>"), Some("</s>"), None));
        assert_eq!(m.added_tokens, ["<unk>", "</s>"]);
        let keys: Vec<&str> = m.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "tokenizer.chat_template",
                "tokenizer.chat_template.tool_use",
                "tokenizer.bos_token",
                "tokenizer.eos_token",
                "tokenizer.added_tokens"
            ]
        );
        // chat_template.jinja wins over the config's.
        std::fs::write(d.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(ChatMeta::read(d.path()).unwrap().template.as_deref(), Some("J"));
        std::fs::write(d.path().join("tokenizer_config.json"), r#"{"chat_template": 3}"#).unwrap();
        let e = ChatMeta::read(d.path()).unwrap_err();
        assert!(format!("{e:#}").contains("chat_template: expected"), "{e:#}");
        std::fs::write(d.path().join("tokenizer_config.json"), r#"{"bos_token": {"x": 1}}"#).unwrap();
        assert!(format!("{:#}", ChatMeta::read(d.path()).unwrap_err()).contains("bos_token"));
    }
}
