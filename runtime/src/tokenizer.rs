//! Text ↔ token ids with the tokenizer embedded in a `.meo` file (feature `tokenizer`).
//!
//! The converter copies the checkpoint's `tokenizer.json` into the metadata string
//! [`METADATA_KEY`]. It is loaded with the pure-Rust `tokenizers` crate (no C dependencies,
//! `fancy-regex` instead of Oniguruma), which gives the same ids as Python `tokenizers`.

use crate::format::{MetaValue, Metadata};
use std::string::String;
use std::vec::Vec;

/// Metadata key holding the Hugging Face `tokenizer.json` text.
pub const METADATA_KEY: &str = "tokenizer.huggingface.json";

/// Largest embedded tokenizer [`Tokenizer::from_metadata`] loads. Loading costs about 13× its
/// size in memory (a 45 MB `tokenizer.json` took 600 MB of RSS); the largest tokenizers of the
/// supported families are under 30 MB. [`Tokenizer::from_metadata_with_limit`] sets another cap.
pub const MAX_TOKENIZER_BYTES: usize = 32 << 20;

/// Why text could not be turned into ids or back.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "this file has no embedded tokenizer (metadata key {METADATA_KEY:?} is missing); \
         pass token ids with --tokens instead of text"
    )]
    Missing,
    #[error("metadata key {METADATA_KEY:?} has type {found}, expected a string")]
    WrongType { found: &'static str },
    #[error(
        "the embedded tokenizer is {len} bytes, more than the {max} bytes this runtime loads \
         (loading costs about 13 times its size in memory)"
    )]
    TooLarge { len: usize, max: usize },
    #[error("the embedded tokenizer cannot be loaded: {0}")]
    Load(String),
    #[error("cannot encode the text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    #[error("token id {id} is outside the tokenizer's vocabulary of {vocab} entries")]
    UnknownId { id: u32, vocab: usize },
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl core::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` document.
    ///
    /// # Errors
    /// The JSON is not a tokenizer `tokenizers` can load.
    pub fn from_json(json: &str) -> Result<Self, TokenizerError> {
        let inner = json.parse::<tokenizers::Tokenizer>().map_err(|e| TokenizerError::Load(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Loads the tokenizer embedded in a file's metadata.
    ///
    /// # Errors
    /// [`TokenizerError::Missing`] when the file has none (the message tells the user to pass
    /// `--tokens`), or the value is not a loadable tokenizer.
    pub fn from_metadata(m: &Metadata<'_>) -> Result<Self, TokenizerError> {
        Self::from_metadata_with_limit(m, MAX_TOKENIZER_BYTES)
    }

    /// [`from_metadata`](Self::from_metadata) with a size cap of `max_bytes` instead of
    /// [`MAX_TOKENIZER_BYTES`].
    ///
    /// # Errors
    /// As [`from_metadata`](Self::from_metadata); [`TokenizerError::TooLarge`] above the cap.
    pub fn from_metadata_with_limit(m: &Metadata<'_>, max_bytes: usize) -> Result<Self, TokenizerError> {
        Self::from_json(embedded_json(m, max_bytes)?)
    }
}

/// The embedded `tokenizer.json` text, checked for presence, type, size and UTF-8 but not
/// parsed (cheap: no allocation).
///
/// # Errors
/// [`TokenizerError::Missing`], [`TokenizerError::WrongType`], [`TokenizerError::TooLarge`]
/// above `max_bytes`, or [`TokenizerError::Load`] for text that is not UTF-8.
pub fn embedded_json<'a>(m: &Metadata<'a>, max_bytes: usize) -> Result<&'a str, TokenizerError> {
    let text = match m.get(METADATA_KEY) {
        None => return Err(TokenizerError::Missing),
        Some(MetaValue::Str(s)) => *s,
        Some(MetaValue::Bytes(b)) => core::str::from_utf8(b).map_err(|e| TokenizerError::Load(e.to_string()))?,
        Some(v) => return Err(TokenizerError::WrongType { found: v.type_name() }),
    };
    if text.len() > max_bytes {
        return Err(TokenizerError::TooLarge { len: text.len(), max: max_bytes });
    }
    Ok(text)
}

impl Tokenizer {
    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds (BOS
    /// for Llama-style tokenizers; none for the fixtures'), as `tokenizer(text)` does in Python.
    ///
    /// # Errors
    /// The tokenizer fails on this text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, true).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without the special tokens the post-processor adds: for text that
    /// already holds them, such as a rendered chat template (transformers'
    /// `apply_chat_template` tokenizes with `add_special_tokens=False`). Special tokens
    /// written in the text (`<|im_start|>`) still become their ids.
    ///
    /// # Errors
    /// The tokenizer fails on this text.
    pub fn encode_without_special_tokens(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    ///
    /// # Errors
    /// An id outside the vocabulary or a decoder failure.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string (`"<|endoftext|>"`), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// An incremental decoder: feed generated ids one at a time, get the text they complete
    /// (byte-level tokens that end inside a UTF-8 character wait for the next one).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream { tok: self, ids: Vec::new(), prefix: String::new(), prefix_len: 0 }
    }

    /// Whether `id` is a special added token (`<|endoftext|>`, `</s>`): [`decode`](Self::decode)
    /// leaves it out.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(&id) => Err(TokenizerError::UnknownId { id, vocab }),
            None => Ok(()),
        }
    }
}

/// See [`Tokenizer::stream`]. The algorithm of `tokenizers`' `DecodeStream`: only a short
/// window of ids is decoded per step (the ids of the last emitted piece and the new ones),
/// since decoders such as byte-level or SentencePiece's leading-space rule depend on context.
/// Two bounds keep each step's cost constant: special tokens, which decode to nothing, never
/// enter the window, and a window that has held back [`MAX_HELD`] ids (bytes that never form a
/// character) is emitted as it decodes.
#[derive(Debug)]
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    /// The window: the ids of the last emitted piece, then those not emitted yet.
    ids: Vec<u32>,
    /// Text of the first `prefix_len` ids of the window (already emitted).
    prefix: String,
    prefix_len: usize,
}

/// Most ids a [`TextStream`] holds back waiting for a character to complete (UTF-8 needs at
/// most 4 bytes; byte-fallback tokenizers spend one id per byte).
pub const MAX_HELD: usize = 8;

impl TextStream<'_> {
    /// Adds one id; returns the new text, if any is complete (a trailing U+FFFD, which a
    /// later byte may complete, is held back, at most [`MAX_HELD`] ids).
    ///
    /// # Errors
    /// An unknown id or a decoder failure.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.tok.check_ids(&[id])?;
        if self.tok.is_special(id) {
            return Ok(None);
        }
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        let held = self.ids.len() - self.prefix_len;
        let waiting = text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}');
        if waiting && held < MAX_HELD {
            return Ok(None);
        }
        // Past MAX_HELD ids, what the window decodes to is emitted as it is (ids that decode
        // to nothing emit nothing) and the window restarts after it.
        let new = if text.len() <= self.prefix.len() {
            String::new()
        } else {
            let Some(new) = text.strip_prefix(self.prefix.as_str()) else {
                return Err(TokenizerError::Decode("the decoded text no longer starts with what was emitted".into()));
            };
            new.to_string()
        };
        self.ids.drain(..self.prefix_len);
        self.prefix = self.tok.decode(&self.ids)?;
        self.prefix_len = self.ids.len();
        Ok((!new.is_empty()).then_some(new))
    }

    /// Whatever is still held back (at the end of generation).
    ///
    /// # Errors
    /// A decoder failure.
    pub fn finish(self) -> Result<Option<String>, TokenizerError> {
        let text = self.tok.decode(&self.ids)?;
        Ok(text.strip_prefix(self.prefix.as_str()).filter(|rest| !rest.is_empty()).map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mixtral/tokenizer.json");
        Tokenizer::from_json(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn fixture_prompt_ids_match_python_tokenizers() {
        let t = fixture();
        assert_eq!(t.vocab_size(), 256);
        let ids = t.encode("The value of the object is returned.").unwrap();
        assert_eq!(ids, [193, 255, 160, 120, 222, 144, 165, 83, 207, 77, 177, 14]);
        assert_eq!(t.decode(&ids).unwrap(), "The value of the object is returned.");
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
    }

    #[test]
    fn stream_reassembles_the_text() {
        let t = fixture();
        let text = "The value of the object is returned. Ünïcode too";
        let ids = t.encode(text).unwrap();
        let mut s = t.stream();
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = s.push(id).unwrap() {
                out.push_str(&piece);
            }
        }
        if let Some(rest) = s.finish().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, t.decode(&ids).unwrap());
    }

    #[test]
    fn stream_of_arbitrary_ids_matches_whole_decode() {
        let t = fixture();
        let mut state = 12345u64;
        for _ in 0..20 {
            let ids: Vec<u32> = (0..64).map(|_| (crate::sample::splitmix64(&mut state) % 256) as u32).collect();
            let mut s = t.stream();
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&s.push(id).unwrap().unwrap_or_default());
            }
            out.push_str(&s.finish().unwrap().unwrap_or_default());
            assert_eq!(out, t.decode(&ids).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn stream_window_stays_short_on_runs_of_special_tokens() {
        let t = fixture();
        let eot = t.token_to_id("<|endoftext|>").unwrap();
        assert!(t.is_special(eot));
        let text_ids = t.encode("The value").unwrap();
        let mut s = t.stream();
        let mut out = String::new();
        let mut all = Vec::new();
        for i in 0..5000 {
            let id = if i % 1000 == 0 { text_ids[(i / 1000) % text_ids.len()] } else { eot };
            all.push(id);
            out.push_str(&s.push(id).unwrap().unwrap_or_default());
            // Each step decodes only this window: its length bounds the step's cost.
            assert!(s.ids.len() <= 2 * MAX_HELD, "window of {} ids after {i} pushes", s.ids.len());
        }
        out.push_str(&s.finish().unwrap().unwrap_or_default());
        assert_eq!(out, t.decode(&all).unwrap());
    }

    #[test]
    fn missing_and_bad_tokenizers_are_typed_errors() {
        let m = Metadata::from_entries(vec![("general.architecture", MetaValue::Str("x"))]);
        let e = Tokenizer::from_metadata(&m).unwrap_err();
        assert!(matches!(e, TokenizerError::Missing));
        assert!(e.to_string().contains("--tokens"));
        let m = Metadata::from_entries(vec![(METADATA_KEY, MetaValue::U64(3))]);
        assert!(matches!(Tokenizer::from_metadata(&m), Err(TokenizerError::WrongType { .. })));
        let m = Metadata::from_entries(vec![(METADATA_KEY, MetaValue::Str("{not json"))]);
        assert!(matches!(Tokenizer::from_metadata(&m), Err(TokenizerError::Load(_))));
        assert!(matches!(fixture().decode(&[999]), Err(TokenizerError::UnknownId { id: 999, vocab: 256 })));
    }

    #[test]
    fn oversized_tokenizers_are_refused_before_parsing() {
        // Valid JSON padded past the cap with whitespace: refused by size, never parsed.
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mixtral/tokenizer.json");
        let small = std::fs::read_to_string(p).unwrap();
        let mut big = small.clone();
        big.push_str(&" ".repeat(MAX_TOKENIZER_BYTES + 1 - small.len()));
        let m = Metadata::from_entries(vec![(METADATA_KEY, MetaValue::Str(&big))]);
        let e = Tokenizer::from_metadata(&m).unwrap_err();
        assert!(matches!(e, TokenizerError::TooLarge { len, max: MAX_TOKENIZER_BYTES } if len == big.len()), "{e}");
        assert!(Tokenizer::from_metadata_with_limit(&m, big.len()).is_ok());
        let m = Metadata::from_entries(vec![(METADATA_KEY, MetaValue::Bytes(small.as_bytes()))]);
        assert!(matches!(Tokenizer::from_metadata_with_limit(&m, 100), Err(TokenizerError::TooLarge { max: 100, .. })));
        assert_eq!(embedded_json(&m, small.len()).unwrap().len(), small.len());
    }
}
