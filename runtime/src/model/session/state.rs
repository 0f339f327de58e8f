//! Saving a session's sequence state to bytes and loading it back ([`Session::save_state`],
//! [`Session::load_state`]).
//!
//! The format, little-endian, version [`STATE_VERSION`]:
//!
//! ```text
//! "MEOSTATE"  version:u32  model:u32 (the file's structure CRC-32)  layers:u32
//! kv_dtype:u8  mla_cache:u8  0:u16  position:u64
//! n_tokens:u64  tokens:u32×n            the token history the caller passed (may be 0)
//! n_logits:u64  logits:f32×n            the last position's logits (0 or the vocabulary)
//! per layer: kind:u8 0:u8×3, then
//!   kind 0 (KV cache): k_heads:u32 hk:u32 v_heads:u32 hv:u32, then each key head's rows,
//!     each value head's rows: position×width values in the dtype (f32, f16; int8: the
//!     values, then position f32 scales)
//!   kind 1 (fixed-size recurrent state): n:u32, then per buffer len:u64 f32×len
//! crc32:u32                             of every byte before it
//! ```
//!
//! Loading checks everything (length, magic, version, checksum, model, layout, sizes) before
//! changing the session: a state from another model or a damaged buffer is a [`StateError`].

use super::{LayerState, Session};
use crate::model::kv::{KvBuf, KvDtype, KvOptions, MlaCache};
use crate::model::plan::Attention;
use alloc::vec::Vec;
use half::f16;

/// The magic bytes a saved state starts with.
pub const STATE_MAGIC: [u8; 8] = *b"MEOSTATE";
/// The version of the format this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Why a state could not be saved or loaded (the session is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("saved state is truncated: {needed} bytes needed at offset {offset}, {len} in the buffer")]
    Truncated { offset: usize, needed: usize, len: usize },
    #[error("not a saved meo session state (bad magic)")]
    BadMagic,
    #[error("saved state version {found} is not supported (this build reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error("saved state is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { expected: u32, found: u32 },
    #[error("saved state belongs to another model (model id {found:#010x}, this model's is {expected:#010x})")]
    OtherModel { expected: u32, found: u32 },
    #[error("saved state has {found} layers, the model has {expected}")]
    LayerCount { expected: usize, found: usize },
    #[error("saved state stores its KV cache as {found}, this session as {expected}")]
    KvLayout { expected: alloc::string::String, found: alloc::string::String },
    #[error("saved state layer {layer}: {what}")]
    Layer { layer: usize, what: alloc::string::String },
    #[error("saved state holds {positions} positions, more than this session's context ({max})")]
    Context { positions: u64, max: usize },
    #[error("saved state has {found} logits, expected 0 or the vocabulary size {vocab}")]
    Logits { found: u64, vocab: usize },
    #[error("saved state has {0} bytes after its end")]
    Trailing(usize),
    /// Prompt-mode merges are built from the prompt and are not part of a state.
    #[error(
        "this session's mode builds merges from the prompt, which a saved state does not hold: \
         save and load states in another mode"
    )]
    PromptMode,
}

/// Per KV layer: key heads and width, value heads and width, for a session storing `kv`.
fn kv_dims(attn: &Attention, kv: KvOptions) -> Option<[usize; 4]> {
    match attn {
        Attention::Gqa(a) => Some([a.num_kv_heads, a.head_dim, a.num_kv_heads, a.head_dim]),
        Attention::Mla(a) => Some(match kv.mla {
            MlaCache::Latent => [1, a.kv_lora + a.rope, 0, 0],
            MlaCache::Decompressed => [a.num_heads, a.nope + a.rope, a.num_heads, a.v_dim],
        }),
        Attention::GatedDeltaNet(_) | Attention::Mamba2(_) | Attention::ShortConv(_) => None,
    }
}

impl LayerState {
    /// A recurrent state's buffers (all f32, fixed size; every recurrent mixer's).
    fn fixed(&self) -> Vec<&[f32]> {
        match self {
            Self::Kv(_) => Vec::new(),
            Self::Recurrent(d) => alloc::vec![&d.conv[..], &d.s[..]],
        }
    }

    fn fixed_mut(&mut self) -> Vec<&mut [f32]> {
        match self {
            Self::Kv(_) => Vec::new(),
            Self::Recurrent(d) => alloc::vec![&mut d.conv[..], &mut d.s[..]],
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
}

/// `rows` rows of `width` values of one head, as the format stores them.
fn put_rows(out: &mut Vec<u8>, b: &KvBuf, rows: usize, width: usize) {
    let n = rows * width;
    match b {
        KvBuf::F32(v) => put_f32s(out, &v[..n]),
        KvBuf::F16(v) => v[..n].iter().for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
        KvBuf::Int8 { q, scales } => {
            out.extend(q[..n].iter().map(|&x| x as u8));
            put_f32s(out, &scales[..rows]);
        }
    }
}

/// A bounds-checked cursor over a saved state.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let truncated = StateError::Truncated { offset: self.at, needed: n, len: self.bytes.len() };
        let end = self.at.checked_add(n).ok_or(truncated.clone())?;
        let s = self.bytes.get(self.at..end).ok_or(truncated)?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// `n` elements of `size` bytes (the count checked against what is left first).
    fn array(&mut self, n: u64, size: usize) -> Result<&'a [u8], StateError> {
        let left = self.bytes.len() - self.at;
        let bytes = usize::try_from(n).ok().and_then(|n| n.checked_mul(size));
        self.take(bytes.unwrap_or(left.saturating_add(1)))
    }

    fn f32s(&mut self, n: u64) -> Result<Vec<f32>, StateError> {
        let b = self.array(n, 4)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// One head's `rows` rows of `width` values in `dtype`.
    fn rows(&mut self, dtype: KvDtype, rows: usize, width: usize) -> Result<KvBuf, StateError> {
        let n = (rows as u64).saturating_mul(width as u64);
        Ok(match dtype {
            KvDtype::F32 => KvBuf::F32(self.f32s(n)?),
            KvDtype::F16 => {
                let b = self.array(n, 2)?;
                KvBuf::F16(b.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())
            }
            KvDtype::Int8 => {
                let q = self.array(n, 1)?.iter().map(|&x| x as i8).collect();
                KvBuf::Int8 { q, scales: self.f32s(rows as u64)? }
            }
        })
    }
}

fn kv_name(dtype: KvDtype, mla: MlaCache) -> alloc::string::String {
    alloc::format!("{} (MLA {})", dtype.name(), mla.name())
}

impl Session<'_> {
    /// The identity a saved state records of the model: its file's structure CRC-32 (which
    /// covers the metadata and every tensor's checksum).
    fn model_id(&self) -> u32 {
        crate::format::parse_header(self.model.bytes()).map_or(0, |h| h.structure_crc32)
    }

    fn check_mode(&self) -> Result<(), StateError> {
        if self.bank.plan.layers().iter().any(|l| l.from_prompt()) {
            return Err(StateError::PromptMode);
        }
        Ok(())
    }

    /// The sequence state as bytes (see the module doc): position, the last position's
    /// logits, every layer's KV cache (in its dtype) or recurrent state, and `tokens`, a
    /// token history the caller keeps (the session keeps none; [`load_state`](Self::load_state)
    /// returns it).
    ///
    /// # Errors
    /// [`StateError::PromptMode`]: the session runs a mode that builds merges from the prompt.
    pub fn save_state(&self, tokens: &[u32]) -> Result<Vec<u8>, StateError> {
        self.check_mode()?;
        let pos = self.pos;
        let mut out = Vec::with_capacity(64 + tokens.len() * 4 + self.kv_cache_bytes() as usize);
        out.extend_from_slice(&STATE_MAGIC);
        put_u32(&mut out, STATE_VERSION);
        put_u32(&mut out, self.model_id());
        put_u32(&mut out, self.state.len() as u32);
        out.extend_from_slice(&[self.kv.dtype.code(), self.kv.mla.code(), 0, 0]);
        put_u64(&mut out, pos as u64);
        put_u64(&mut out, tokens.len() as u64);
        tokens.iter().for_each(|t| put_u32(&mut out, *t));
        let vocab = self.model.config().vocab_size;
        let last = if pos > 0 && self.logits.len() >= vocab { &self.logits[self.logits.len() - vocab..] } else { &[] };
        put_u64(&mut out, last.len() as u64);
        put_f32s(&mut out, last);
        for (st, layer) in self.state.iter().zip(&self.model.layers) {
            match st {
                LayerState::Kv(c) => {
                    out.extend_from_slice(&[0; 4]);
                    let [kh, hk, vh, hv] = kv_dims(&layer.attn, self.kv).unwrap_or_default();
                    [kh, hk, vh, hv].iter().for_each(|&d| put_u32(&mut out, d as u32));
                    // A cache never appended to (position 0) has no head buffers yet.
                    for (bufs, heads, width) in [(&c.k, kh, hk), (&c.v, vh, hv)] {
                        bufs.iter().take(heads).for_each(|b| put_rows(&mut out, b, pos, width));
                    }
                }
                st => {
                    out.extend_from_slice(&[1, 0, 0, 0]);
                    let bufs = st.fixed();
                    put_u32(&mut out, bufs.len() as u32);
                    for b in bufs {
                        put_u64(&mut out, b.len() as u64);
                        put_f32s(&mut out, b);
                    }
                }
            }
        }
        let crc = crc32fast::hash(&out);
        put_u32(&mut out, crc);
        Ok(out)
    }

    /// Bytes [`save_state`](Self::save_state) with `tokens` history tokens would write now.
    pub fn state_size(&self, tokens: usize) -> usize {
        let vocab = self.model.config().vocab_size;
        let logits = if self.pos > 0 && self.logits.len() >= vocab { vocab } else { 0 };
        let layers: usize = self
            .state
            .iter()
            .zip(&self.model.layers)
            .map(|(st, layer)| match st {
                LayerState::Kv(c) => {
                    let [kh, hk, vh, hv] = kv_dims(&layer.attn, self.kv).unwrap_or_default();
                    let heads = |bufs: &[KvBuf], n: usize, w: usize| {
                        bufs.iter().take(n).count() * self.kv.dtype.row_bytes(w as u64) as usize * self.pos
                    };
                    20 + heads(&c.k, kh, hk) + heads(&c.v, vh, hv)
                }
                st => 8 + st.fixed().iter().map(|b| 8 + b.len() * 4).sum::<usize>(),
            })
            .sum();
        32 + 8 + tokens * 4 + 8 + logits * 4 + layers + 4
    }

    /// Replaces the sequence state with one [`save_state`](Self::save_state) wrote, from a
    /// session over the same model storing its KV cache the same way; returns the token
    /// history it holds. The routing mode is this session's (save and load in the same mode).
    ///
    /// # Errors
    /// A damaged or truncated buffer, another version, another model, another KV layout, more
    /// positions than this session holds, or a mode that builds merges from the prompt. On
    /// error the session is unchanged.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<Vec<u32>, StateError> {
        self.check_mode()?;
        let mut r = Reader { bytes, at: 0 };
        if r.take(8)? != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = r.u32()?;
        if version != STATE_VERSION {
            return Err(StateError::Version { found: version, supported: STATE_VERSION });
        }
        let body_len = bytes.len().checked_sub(4).filter(|&n| n >= 12).ok_or(StateError::Truncated {
            offset: 12,
            needed: 4,
            len: bytes.len(),
        })?;
        let (body, tail) = bytes.split_at(body_len);
        let expected = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let found = crc32fast::hash(body);
        if found != expected {
            return Err(StateError::Checksum { expected, found });
        }
        let mut r = Reader { bytes: body, at: 12 };
        let id = r.u32()?;
        if id != self.model_id() {
            return Err(StateError::OtherModel { expected: self.model_id(), found: id });
        }
        let layers = r.u32()? as usize;
        if layers != self.state.len() {
            return Err(StateError::LayerCount { expected: self.state.len(), found: layers });
        }
        let (code, mla_code) = (r.u8()?, r.u8()?);
        r.take(2)?;
        let dtype = KvDtype::from_code(code);
        let mla = MlaCache::from_code(mla_code);
        if dtype != Some(self.kv.dtype) || mla != Some(self.kv.mla) {
            let found = match (dtype, mla) {
                (Some(d), Some(m)) => kv_name(d, m),
                _ => alloc::format!("unknown codes {code}/{mla_code}"),
            };
            return Err(StateError::KvLayout { expected: kv_name(self.kv.dtype, self.kv.mla), found });
        }
        let positions = r.u64()?;
        let pos = usize::try_from(positions)
            .ok()
            .filter(|&p| p <= self.max_context)
            .ok_or(StateError::Context { positions, max: self.max_context })?;
        let n_tokens = r.u64()?;
        let tokens =
            r.array(n_tokens, 4)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let vocab = self.model.config().vocab_size;
        let n_logits = r.u64()?;
        if n_logits != 0 && n_logits != vocab as u64 {
            return Err(StateError::Logits { found: n_logits, vocab });
        }
        let logits = r.f32s(n_logits)?;
        let mut state = Vec::with_capacity(layers);
        for (l, layer) in self.model.layers.iter().enumerate() {
            let bad = |what: &str| StateError::Layer { layer: l, what: what.into() };
            let kind = r.take(4)?;
            let mut st = LayerState::new(&layer.attn, self.kv);
            if let ([0, 0, 0, 0], LayerState::Kv(c)) = (kind, &mut st) {
                let dims = [r.u32()?, r.u32()?, r.u32()?, r.u32()?].map(|d| d as usize);
                let want = kv_dims(&layer.attn, self.kv).unwrap_or_default();
                if dims != want {
                    return Err(bad(&alloc::format!("KV cache heads and widths {dims:?}, expected {want:?}")));
                }
                let [kh, hk, vh, hv] = dims;
                (c.hk, c.hv) = (hk, hv);
                for _ in 0..kh {
                    c.k.push(r.rows(self.kv.dtype, pos, hk)?);
                }
                for _ in 0..vh {
                    c.v.push(r.rows(self.kv.dtype, pos, hv)?);
                }
            } else if kind == [1, 0, 0, 0] && !matches!(st, LayerState::Kv(_)) {
                let mut bufs = st.fixed_mut();
                let n = r.u32()? as usize;
                if n != bufs.len() {
                    return Err(bad(&alloc::format!("{n} state buffers, expected {}", bufs.len())));
                }
                for (i, b) in bufs.iter_mut().enumerate() {
                    let len = r.u64()?;
                    if len != b.len() as u64 {
                        return Err(bad(&alloc::format!("state buffer {i} has {len} values, expected {}", b.len())));
                    }
                    b.copy_from_slice(&r.f32s(len)?);
                }
            } else {
                return Err(bad("its kind (KV cache or recurrent state) does not match the model's layer"));
            }
            state.push(st);
        }
        if r.at != body.len() {
            return Err(StateError::Trailing(body.len() - r.at));
        }
        self.state = state;
        self.pos = pos;
        self.logits = logits;
        self.bank.built.iter_mut().for_each(|b| *b = None);
        Ok(tokens)
    }
}
