//! How a session stores its KV cache: per kv head, one row of keys (or values) per position,
//! in f32 (the default, exact), f16, or int8 with one f32 scale per row (per position and
//! kv head). The attention reads f16 and int8 rows back as f32 ([`KvBuf::rows_f32`]) one kv
//! head at a time, so the rest of the computation is the f32 code.

use alloc::vec::Vec;
use half::f16;

/// The element type of a session's KV cache ([`KvOptions::dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum KvDtype {
    /// 4 bytes per value: exactly what the attention computed.
    #[default]
    F32,
    /// 2 bytes per value (IEEE half, round to nearest even).
    F16,
    /// 1 byte per value plus one f32 scale per row (`max |x| / 127`, round to nearest).
    Int8,
}

impl KvDtype {
    /// All of them, in the order of their codes.
    pub const ALL: [Self; 3] = [Self::F32, Self::F16, Self::Int8];

    /// The name `--kv` and the bindings take: `f32`, `f16`, `int8`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }

    /// Bytes one cached row of `width` values costs (int8: with its scale). Saturates.
    pub fn row_bytes(self, width: u64) -> u64 {
        match self {
            Self::F32 => width.saturating_mul(4),
            Self::F16 => width.saturating_mul(2),
            Self::Int8 => width.saturating_add(4),
        }
    }

    /// The code the C API and saved states use (0 f32, 1 f16, 2 int8).
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Int8 => 2,
        }
    }

    /// The dtype with code `code` ([`KvDtype::code`]).
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

impl core::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name [`KvDtype`] or [`MlaCache`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {found:?} (use {expected})")]
pub struct KvParseError {
    pub what: &'static str,
    pub found: alloc::string::String,
    pub expected: &'static str,
}

impl core::str::FromStr for KvDtype {
    type Err = KvParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| KvParseError {
            what: "KV cache dtype",
            found: s.into(),
            expected: "f32, f16 or int8",
        })
    }
}

/// What an MLA (DeepSeek) layer caches per position ([`KvOptions::mla`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum MlaCache {
    /// The normalised latent and the rotated shared key (`kv_lora + rope` values); `kv_b` is
    /// absorbed into the query and the output, as DeepSeek's inference does.
    #[default]
    Latent,
    /// Every head's decompressed keys and values (`heads · (nope + rope + v)` values).
    Decompressed,
}

impl MlaCache {
    /// `latent` or `decompressed`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Latent => "latent",
            Self::Decompressed => "decompressed",
        }
    }

    /// The code the C API and saved states use (0 latent, 1 decompressed).
    pub fn code(self) -> u8 {
        match self {
            Self::Latent => 0,
            Self::Decompressed => 1,
        }
    }

    /// The mode with code `code` ([`MlaCache::code`]).
    pub fn from_code(code: u8) -> Option<Self> {
        [Self::Latent, Self::Decompressed].get(usize::from(code)).copied()
    }
}

impl core::str::FromStr for MlaCache {
    type Err = KvParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Latent, Self::Decompressed].into_iter().find(|d| d.name() == s).ok_or_else(|| KvParseError {
            what: "MLA cache",
            found: s.into(),
            expected: "latent or decompressed",
        })
    }
}

/// How a session stores its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct KvOptions {
    /// Element type of every attention layer's cache.
    pub dtype: KvDtype,
    /// What MLA layers cache.
    pub mla: MlaCache,
}

/// The sizes of one attention layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheShape {
    Gqa { kv_heads: usize, head_dim: usize },
    Mla { heads: usize, nope: usize, rope: usize, v: usize, kv_lora: usize },
}

impl KvOptions {
    /// Bytes one position costs a layer of `shape`. Saturates.
    pub(crate) fn position_bytes(self, shape: CacheShape) -> u64 {
        let rows = |n: usize, width: usize| (n as u64).saturating_mul(self.dtype.row_bytes(width as u64));
        match (shape, self.mla) {
            (CacheShape::Gqa { kv_heads, head_dim }, _) => rows(kv_heads, head_dim).saturating_mul(2),
            (CacheShape::Mla { kv_lora, rope, .. }, MlaCache::Latent) => rows(1, kv_lora.saturating_add(rope)),
            (CacheShape::Mla { heads, nope, rope, v, .. }, MlaCache::Decompressed) => {
                rows(heads, nope.saturating_add(rope)).saturating_add(rows(heads, v))
            }
        }
    }
}

/// One kv head's rows (see the module doc).
#[derive(Debug, Clone)]
pub(crate) enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Int8 { q: Vec<i8>, scales: Vec<f32> },
}

impl KvBuf {
    pub(crate) fn new(dtype: KvDtype) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32(Vec::new()),
            KvDtype::F16 => Self::F16(Vec::new()),
            KvDtype::Int8 => Self::Int8 { q: Vec::new(), scales: Vec::new() },
        }
    }

    /// Appends one row.
    pub(crate) fn push(&mut self, row: &[f32]) {
        match self {
            Self::F32(v) => v.extend_from_slice(row),
            Self::F16(v) => v.extend(row.iter().map(|&x| f16::from_f32(x))),
            Self::Int8 { q, scales } => {
                let max = row.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
                let scale = if max.is_finite() { max / 127.0 } else { 0.0 };
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                // `as` saturates (and maps NaN to 0).
                q.extend(row.iter().map(|&x| libm::roundf(x * inv) as i8));
                scales.push(scale);
            }
        }
    }

    /// Keeps the first `rows` rows of `width` values.
    pub(crate) fn truncate(&mut self, rows: usize, width: usize) {
        match self {
            Self::F32(v) => v.truncate(rows * width),
            Self::F16(v) => v.truncate(rows * width),
            Self::Int8 { q, scales } => {
                q.truncate(rows * width);
                scales.truncate(rows);
            }
        }
    }

    /// Bytes held (the values in use, not the capacity).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.len() * 4,
            Self::F16(v) => v.len() * 2,
            Self::Int8 { q, scales } => q.len() + scales.len() * 4,
        }
    }

    /// Rows `r0..r1` (of `width` values) as f32: in place for an f32 cache, else decoded
    /// into `tmp`.
    pub(crate) fn rows_f32<'a>(&'a self, r0: usize, r1: usize, width: usize, tmp: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Self::F32(v) => &v[r0 * width..r1 * width],
            Self::F16(v) => {
                tmp.clear();
                tmp.resize((r1 - r0) * width, 0.0);
                crate::kernels::f16_to_f32(&v[r0 * width..r1 * width], tmp);
                tmp
            }
            Self::Int8 { q, scales } => {
                tmp.clear();
                tmp.reserve((r1 - r0) * width);
                for (row, &s) in q[r0 * width..r1 * width].chunks_exact(width.max(1)).zip(&scales[r0..r1]) {
                    tmp.extend(row.iter().map(|&x| f32::from(x) * s));
                }
                tmp
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for d in KvDtype::ALL {
            assert_eq!(d.name().parse::<KvDtype>(), Ok(d));
            assert_eq!(KvDtype::from_code(d.code()), Some(d));
        }
        assert!("q8".parse::<KvDtype>().is_err());
        assert_eq!(KvDtype::from_code(3), None);
    }

    #[test]
    fn int8_rows_are_within_half_a_step_and_f16_rounds() {
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| (0..24).map(|i| ((r * 24 + i) as f32 * 0.37).sin() * (r as f32 + 0.5) * 3.0).collect())
            .collect();
        let zero = alloc::vec![0.0f32; 24];
        for d in KvDtype::ALL {
            let mut b = KvBuf::new(d);
            rows.iter().for_each(|r| b.push(r));
            b.push(&zero);
            assert_eq!(b.bytes() as u64, 6 * d.row_bytes(24), "{d}");
            let mut tmp = Vec::new();
            let got = b.rows_f32(0, 6, 24, &mut tmp).to_vec();
            assert!(got[5 * 24..].iter().all(|&v| v == 0.0), "{d}: a zero row stays zero");
            for (r, want) in rows.iter().enumerate() {
                let max = want.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
                for (g, w) in got[r * 24..][..24].iter().zip(want) {
                    let bound = match d {
                        KvDtype::F32 => 0.0,
                        KvDtype::F16 => w.abs() / 2048.0 + 1e-7,
                        KvDtype::Int8 => max / 127.0 / 2.0 * 1.0001,
                    };
                    assert!((g - w).abs() <= bound, "{d}: row {r}: {g} vs {w}");
                }
            }
            b.truncate(2, 24);
            assert_eq!(b.bytes() as u64, 2 * d.row_bytes(24));
            assert_eq!(b.rows_f32(1, 2, 24, &mut tmp), &got[24..48], "{d}: truncation keeps rows");
        }
    }
}
