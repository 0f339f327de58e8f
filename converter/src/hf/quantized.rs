//! Quantized releases read as the f32 weights they stand for.
//!
//! A release's `config.json` names its encoding in `quantization_config`. Each quantized
//! weight is a group of checkpoint tensors; the converter sees it as one *virtual* tensor with
//! the name and shape the unquantized checkpoint would have, so the family tables and shape
//! checks are the same for every encoding. Reading a virtual tensor dequantizes it exactly
//! (in f32, as the reference code does); tensors the release leaves unquantized (routers,
//! norms, embeddings, the LM head, biases) are read as they are.
//!
//! Covered (see `docs/CLI.md`, "Quantized releases"):
//! - `fp8`: `F8_E4M3` / `F8_E5M2` weights `X.weight` with `X.weight_scale_inv` (f32/bf16, a
//!   multiplier despite its name), either one value per tensor or one per
//!   `weight_block_size = [bm, bn]` block on a `ceil(rows / bm) × ceil(cols / bn)` grid
//!   (ragged edge blocks, as DeepSeek's `weight_dequant`): `w[r, c] = fp8[r, c] · s[r / bm, c / bn]`.
//! - `mxfp4` (gpt-oss): `X_blocks` u8 `[E, rows, nb, 16]` and `X_scales` u8 `[E, rows, nb]`:
//!   `w[e, r, 32b + 2j] = E2M1(low nibble of byte j) · 2^(scale − 127)`, the high nibble is
//!   element `32b + 2j + 1` (transformers' `convert_moe_packed_tensors`). The virtual tensor is
//!   `X [E, nb·32, rows]`, the transposed layout of transformers' bf16 `gate_up_proj`/`down_proj`.
//! - `gptq` 4-bit (`checkpoint_format` `gptq`, the default, whose stored zeros are one less
//!   than the real ones, or `gptq_v2`): `X.qweight` i32 `[in / 8, out]` (8 codes per word
//!   along the input dimension, element `k` in bits `4 (k mod 8)`), `X.qzeros` i32
//!   `[groups, out / 8]` (along the output dimension), `X.scales` `[groups, out]`, `X.g_idx`
//!   i32 `[in]` (any order, so `desc_act` is covered; absent: `k / group_size`):
//!   `w[n, k] = s[g, n] · (q[k, n] − z[g, n])` with `g = g_idx[k]`.
//! - `awq` 4-bit (`version` `gemm`, `zero_point` true): `X.qweight` i32 `[in, out / 8]`,
//!   `X.qzeros` i32 `[in / group_size, out / 8]`, both packed along the output dimension in
//!   the order `[0, 2, 4, 6, 1, 3, 5, 7]` (output `8c + j` in nibble `[0, 4, 1, 5, 2, 6, 3, 7][j]`),
//!   `X.scales` `[in / group_size, out]`: `w[n, k] = s[k / gs, n] · (q[k, n] − z[k / gs, n])`.
//!
//! Any other `quant_method` or bit width is refused ([`QuantError::Unsupported`]).

use super::checkpoint::{Checkpoint, Entry, NonFinite};
use anyhow::Result;
use std::collections::BTreeMap;

/// What `meo convert` reads, for error messages.
pub const SUPPORTED: &str = "fp8 (F8_E4M3/F8_E5M2 with weight_scale_inv, block-scaled or per-tensor), \
                             mxfp4 (gpt-oss *_blocks/*_scales), gptq 4-bit (gptq or gptq_v2 format, any group size, \
                             desc_act), awq 4-bit (gemm, zero_point)";

/// A quantized checkpoint the converter cannot read, or one whose tensors do not fit its
/// `quantization_config`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("quantization {method}{} is not supported; supported: {SUPPORTED}", bits.map(|b| format!(" with {b} bits")).unwrap_or_default())]
    Unsupported { method: String, bits: Option<u64> },
    #[error("quantization_config: {key}: {reason}")]
    BadConfig { key: &'static str, reason: String },
    #[error(
        "tensor {tensor:?} is quantized ({what}) but config.json has no quantization_config saying how; supported: {SUPPORTED}"
    )]
    Undeclared { tensor: String, what: &'static str },
    #[error("tensor {tensor:?}: {found}, expected {expected}")]
    Mismatch { tensor: String, found: String, expected: String },
    #[error("tensor {tensor:?} needs {needed:?}, which the checkpoint lacks")]
    Missing { tensor: String, needed: String },
    #[error("tensor {tensor:?}: group index {value} at input {index} is outside [0, {groups})")]
    GroupIndex { tensor: String, index: u64, value: i64, groups: u64 },
}

/// The encoding named by `quantization_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Block (`Some([rows, cols])`) or per-tensor (`None`) scaled FP8.
    Fp8 { block: Option<[u64; 2]> },
    /// OCP MXFP4 experts (gpt-oss).
    Mxfp4,
    /// GPTQ 4-bit; `zero_offset` is 1 for the original format (zeros stored minus one).
    Gptq { group_size: Option<u64>, zero_offset: i32 },
    /// AWQ 4-bit, GEMM packing.
    Awq { group_size: u64 },
}

impl Method {
    /// The `quantization_config` of a `config.json` (`None`: an unquantized checkpoint).
    ///
    /// # Errors
    /// [`QuantError::Unsupported`] for another method or bit width; [`QuantError::BadConfig`]
    /// for a mistyped key.
    pub fn from_config(raw: &serde_json::Map<String, serde_json::Value>) -> Result<Option<Self>, QuantError> {
        use serde_json::Value;
        let Some(q) = raw.get("quantization_config").filter(|v| !v.is_null()) else { return Ok(None) };
        let q = q
            .as_object()
            .ok_or(QuantError::BadConfig { key: "quantization_config", reason: "not an object".into() })?;
        let method = match q.get("quant_method") {
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            _ => return Err(QuantError::BadConfig { key: "quant_method", reason: "missing or not a string".into() }),
        };
        let uint = |key: &'static str| -> Result<Option<u64>, QuantError> {
            match q.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| QuantError::BadConfig { key, reason: format!("{v} is not an unsigned integer") }),
            }
        };
        let flag = |key: &'static str, default: bool| -> Result<bool, QuantError> {
            match q.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(QuantError::BadConfig { key, reason: format!("{v} is not a boolean") }),
            }
        };
        let text = |key: &'static str| -> Result<Option<String>, QuantError> {
            match q.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.to_ascii_lowercase())),
                Some(v) => Err(QuantError::BadConfig { key, reason: format!("{v} is not a string") }),
            }
        };
        // Group size -1 means one group over the whole input dimension.
        let group_size = || -> Result<Option<u64>, QuantError> {
            match q.get("group_size") {
                Some(v) if v.as_i64() == Some(-1) => Ok(None),
                Some(v) if v.as_u64().is_some_and(|g| g > 0) => Ok(v.as_u64()),
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    Err(QuantError::BadConfig { key: "group_size", reason: format!("{v} is not -1 or positive") })
                }
            }
        };
        let bits = uint("bits")?;
        let four_bits = |method: &str| match bits {
            Some(4) => Ok(()),
            b => Err(QuantError::Unsupported { method: method.into(), bits: b }),
        };
        match method.as_str() {
            "fp8" => {
                let block = match q.get("weight_block_size") {
                    None | Some(Value::Null) => None,
                    Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|x| x.as_u64().is_some_and(|x| x > 0)) => {
                        Some([a[0].as_u64().unwrap_or(1), a[1].as_u64().unwrap_or(1)])
                    }
                    Some(v) => {
                        return Err(QuantError::BadConfig {
                            key: "weight_block_size",
                            reason: format!("{v} is not two positive integers"),
                        });
                    }
                };
                if let Some(f) = text("fmt")?
                    && f != "e4m3"
                    && f != "e5m2"
                {
                    return Err(QuantError::Unsupported { method: format!("fp8 ({f})"), bits: None });
                }
                Ok(Some(Self::Fp8 { block }))
            }
            "mxfp4" => Ok(Some(Self::Mxfp4)),
            "gptq" => {
                four_bits("gptq")?;
                let zero_offset = match text("checkpoint_format")?.as_deref() {
                    None | Some("gptq") => 1,
                    Some("gptq_v2") => 0,
                    Some(f) => return Err(QuantError::Unsupported { method: format!("gptq ({f} format)"), bits }),
                };
                // desc_act and sym change only what g_idx and qzeros hold, both read as stored.
                flag("desc_act", false)?;
                flag("sym", true)?;
                Ok(Some(Self::Gptq { group_size: group_size()?, zero_offset }))
            }
            "awq" => {
                four_bits("awq")?;
                match text("version")?.as_deref() {
                    None | Some("gemm") => {}
                    Some(v) => return Err(QuantError::Unsupported { method: format!("awq ({v})"), bits }),
                }
                if !flag("zero_point", true)? {
                    return Err(QuantError::Unsupported { method: "awq (zero_point false)".into(), bits });
                }
                let Some(group_size) = group_size()? else {
                    return Err(QuantError::BadConfig {
                        key: "group_size",
                        reason: "awq needs a positive group size".into(),
                    });
                };
                Ok(Some(Self::Awq { group_size }))
            }
            m => Err(QuantError::Unsupported { method: m.into(), bits }),
        }
    }
}

/// One quantized weight: the checkpoint tensors it is made of and its logical shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Virtual {
    /// `[rows, cols]` FP8 (`e5m2`: `F8_E5M2`, else `F8_E4M3`) with `scale` on the `block` grid
    /// (`None`: one scale).
    Fp8 { weight: String, scale: String, rows: u64, cols: u64, block: Option<[u64; 2]>, e5m2: bool },
    /// `[experts, rows, nb, 16]` codes and `[experts, rows, nb]` scales; the logical tensor is
    /// `[experts, nb · 32, rows]`.
    Mxfp4 { blocks: String, scales: String, experts: u64, rows: u64, nb: u64 },
    /// GPTQ `[out, inp]`; `g_idx` absent: `k / group_size`.
    Gptq {
        qweight: String,
        qzeros: String,
        scales: String,
        g_idx: Option<String>,
        out: u64,
        inp: u64,
        groups: u64,
        group_size: u64,
        zero_offset: i32,
    },
    /// AWQ `[out, inp]`.
    Awq { qweight: String, qzeros: String, scales: String, out: u64, inp: u64, group_size: u64 },
}

impl Virtual {
    /// The shape of the unquantized tensor.
    pub fn shape(&self) -> Vec<u64> {
        match self {
            Self::Fp8 { rows, cols, .. } => vec![*rows, *cols],
            Self::Mxfp4 { experts, rows, nb, .. } => vec![*experts, nb * 32, *rows],
            Self::Gptq { out, inp, .. } | Self::Awq { out, inp, .. } => vec![*out, *inp],
        }
    }

    /// The checkpoint tensors it reads.
    pub fn parts(&self) -> Vec<&str> {
        match self {
            Self::Fp8 { weight, scale, .. } => vec![weight, scale],
            Self::Mxfp4 { blocks, scales, .. } => vec![blocks, scales],
            Self::Gptq { qweight, qzeros, scales, g_idx, .. } => {
                let mut v = vec![qweight.as_str(), qzeros, scales];
                v.extend(g_idx.as_deref());
                v
            }
            Self::Awq { qweight, qzeros, scales, .. } => vec![qweight, qzeros, scales],
        }
    }
}

fn mismatch(tensor: &str, found: impl Into<String>, expected: impl Into<String>) -> QuantError {
    QuantError::Mismatch { tensor: tensor.into(), found: found.into(), expected: expected.into() }
}

fn expect(tensors: &BTreeMap<String, Entry>, name: &str, of: &str) -> Result<Entry, QuantError> {
    tensors.get(name).cloned().ok_or_else(|| QuantError::Missing { tensor: of.into(), needed: name.into() })
}

fn check(e: &Entry, name: &str, dtypes: &[&str], shape: &[u64]) -> Result<(), QuantError> {
    if !dtypes.contains(&e.dtype.as_str()) {
        return Err(mismatch(name, format!("dtype {}", e.dtype), format!("dtype {}", dtypes.join(" or "))));
    }
    if e.shape != shape {
        return Err(mismatch(name, format!("shape {:?}", e.shape), format!("shape {shape:?}")));
    }
    Ok(())
}

const FLOAT_SCALES: &[&str] = &["F32", "F16", "BF16"];

/// The virtual tensors of a checkpoint whose raw tensors are `tensors`, quantized as
/// `method` (`None`: none declared; quantized-looking tensors are then an error).
///
/// # Errors
/// A tensor group that does not fit the method: a missing part, a wrong dtype or shape.
pub fn virtuals(
    tensors: &BTreeMap<String, Entry>,
    method: Option<&Method>,
) -> Result<BTreeMap<String, Virtual>, QuantError> {
    let mut out = BTreeMap::new();
    for (name, e) in tensors {
        let fp8 = matches!(e.dtype.as_str(), "F8_E4M3" | "F8_E5M2");
        let packed = name.strip_suffix(".qweight");
        let mx = name.strip_suffix("_blocks").filter(|b| tensors.contains_key(&format!("{b}_scales")));
        let Some(method) = method else {
            let what = if fp8 {
                "FP8"
            } else if packed.is_some() {
                "GPTQ/AWQ qweight"
            } else if mx.is_some() {
                "MXFP4 blocks"
            } else {
                continue;
            };
            return Err(QuantError::Undeclared { tensor: name.clone(), what });
        };
        match method {
            Method::Fp8 { block } if fp8 => {
                let [rows, cols] = e.shape[..] else {
                    return Err(mismatch(name, format!("shape {:?}", e.shape), "a matrix"));
                };
                let scale = format!("{name}_scale_inv");
                let s = expect(tensors, &scale, name)?;
                let grid = match block {
                    Some([bm, bn]) => vec![rows.div_ceil(*bm), cols.div_ceil(*bn)],
                    None => vec![1],
                };
                let one = s.shape.iter().product::<u64>() == 1;
                if block.is_none() && !one {
                    return Err(mismatch(&scale, format!("shape {:?}", s.shape), "one value (no weight_block_size)"));
                }
                check(&s, &scale, FLOAT_SCALES, if one && block.is_none() { &s.shape } else { &grid })?;
                let v =
                    Virtual::Fp8 { weight: name.clone(), scale, rows, cols, block: *block, e5m2: e.dtype == "F8_E5M2" };
                out.insert(name.clone(), v);
            }
            Method::Mxfp4 if mx.is_some() => {
                let base = mx.unwrap_or_default();
                let [experts, rows, nb, 16] = e.shape[..] else {
                    return Err(mismatch(name, format!("shape {:?}", e.shape), "[experts, rows, blocks, 16]"));
                };
                check(e, name, &["U8"], &e.shape)?;
                let scales = format!("{base}_scales");
                check(&tensors[&scales], &scales, &["U8"], &[experts, rows, nb])?;
                out.insert(base.to_string(), Virtual::Mxfp4 { blocks: name.clone(), scales, experts, rows, nb });
            }
            Method::Gptq { group_size, zero_offset } if packed.is_some() => {
                let base = packed.unwrap_or_default();
                let [words, n] = e.shape[..] else {
                    return Err(mismatch(name, format!("shape {:?}", e.shape), "[in / 8, out]"));
                };
                check(e, name, &["I32"], &e.shape)?;
                let inp = words * 8;
                let gs = group_size.unwrap_or(inp).max(1);
                let groups = inp.div_ceil(gs);
                if n % 8 != 0 {
                    return Err(mismatch(name, format!("{n} outputs"), "a multiple of 8"));
                }
                let (qzeros, scales, g_idx) =
                    (format!("{base}.qzeros"), format!("{base}.scales"), format!("{base}.g_idx"));
                let z = expect(tensors, &qzeros, name)?;
                check(&z, &qzeros, &["I32"], &[groups, n / 8])?;
                let s = expect(tensors, &scales, name)?;
                check(&s, &scales, FLOAT_SCALES, &[groups, n])?;
                let g_idx = match tensors.get(&g_idx) {
                    Some(g) => {
                        check(g, &g_idx, &["I32"], &[inp])?;
                        Some(g_idx)
                    }
                    None => None,
                };
                let v = Virtual::Gptq {
                    qweight: name.clone(),
                    qzeros,
                    scales,
                    g_idx,
                    out: n,
                    inp,
                    groups,
                    group_size: gs,
                    zero_offset: *zero_offset,
                };
                out.insert(format!("{base}.weight"), v);
            }
            Method::Awq { group_size } if packed.is_some() => {
                let base = packed.unwrap_or_default();
                let [inp, words] = e.shape[..] else {
                    return Err(mismatch(name, format!("shape {:?}", e.shape), "[in, out / 8]"));
                };
                check(e, name, &["I32"], &e.shape)?;
                if inp % group_size != 0 {
                    return Err(mismatch(
                        name,
                        format!("{inp} inputs"),
                        format!("a multiple of group_size {group_size}"),
                    ));
                }
                let (qzeros, scales) = (format!("{base}.qzeros"), format!("{base}.scales"));
                let groups = inp / group_size;
                check(&expect(tensors, &qzeros, name)?, &qzeros, &["I32"], &[groups, words])?;
                check(&expect(tensors, &scales, name)?, &scales, FLOAT_SCALES, &[groups, words * 8])?;
                let v = Virtual::Awq {
                    qweight: name.clone(),
                    qzeros,
                    scales,
                    out: words * 8,
                    inp,
                    group_size: *group_size,
                };
                out.insert(format!("{base}.weight"), v);
            }
            // A tensor of another encoding than the one declared.
            _ if fp8 || packed.is_some() || mx.is_some() => {
                return Err(mismatch(
                    name,
                    format!("dtype {} {}", e.dtype, if fp8 { "(FP8)" } else { "(packed)" }),
                    format!("a tensor of the declared quantization {method:?}"),
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The 16 E2M1 values, by code (sign in bit 3).
pub const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The value of an FP8 byte: `F8_E4M3` (e4m3fn: bias 7, no infinities, `S.1111.111` is NaN)
/// or `F8_E5M2` (bias 15, IEEE-like infinities and NaNs).
pub fn fp8_value(b: u8, e5m2: bool) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let (exp_bits, man_bits, bias) = if e5m2 { (5, 2, 15) } else { (4, 3, 7) };
    let e = i32::from((b >> man_bits) & ((1 << exp_bits) - 1));
    let m = f32::from(b & ((1 << man_bits) - 1));
    let scale = f32::from(1u8 << man_bits);
    let max_e = (1 << exp_bits) - 1;
    if e5m2 && e == max_e {
        return if m == 0.0 { sign * f32::INFINITY } else { f32::NAN };
    }
    if !e5m2 && e == max_e && m == 7.0 {
        return f32::NAN;
    }
    // Every value is exact in f32 (at most 3 mantissa bits, exponents within ±17).
    if e == 0 { sign * (m / scale) * 2f32.powi(1 - bias) } else { sign * (1.0 + m / scale) * 2f32.powi(e - bias) }
}

/// `2^(s − 127)` for an E8M0 scale byte; 255 is NaN (OCP MX).
pub fn e8m0_value(s: u8) -> f32 {
    if s == 255 { f32::NAN } else { (2f64.powi(i32::from(s) - 127)) as f32 }
}

fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Checks that a scale is finite (a NaN or infinite scale makes every weight of its block
/// meaningless: it is refused like a NaN weight).
fn finite_scales(name: &str, s: &[f32]) -> Result<()> {
    if let Some(k) = s.iter().position(|x| !x.is_finite()) {
        return Err(NonFinite { tensor: name.to_string(), element: k as u64, value: s[k] }.into());
    }
    Ok(())
}

impl Virtual {
    /// Dequantizes the slice `[first, first + count)` of the logical tensor (row-major).
    /// Whole matrices (and for MXFP4 whole experts) are decoded, then sliced.
    ///
    /// # Errors
    /// I/O; a NaN or infinite scale or value ([`NonFinite`], naming the checkpoint tensor);
    /// a GPTQ group index out of range ([`QuantError::GroupIndex`]).
    pub fn read(&self, ck: &Checkpoint, name: &str, first: u64, count: u64) -> Result<Vec<f32>> {
        let total: u64 = self.shape().iter().product();
        anyhow::ensure!(
            first.checked_add(count).is_some_and(|e| e <= total),
            "tensor {name:?}: elements [{first}, +{count}) outside its {total} elements"
        );
        if let Self::Mxfp4 { blocks, scales, rows, nb, .. } = self {
            let per = rows * nb * 32;
            let (e0, e1) = (first / per, (first + count).div_ceil(per));
            let mut out = Vec::with_capacity(usize::try_from((e1 - e0) * per)?);
            for x in e0..e1 {
                out.extend(mxfp4_expert(ck, blocks, scales, x, *rows, *nb)?);
            }
            let skip = usize::try_from(first - e0 * per)?;
            return Ok(out.drain(skip..skip + count as usize).collect());
        }
        let mut w = match self {
            Self::Fp8 { weight, scale, rows, cols, block, e5m2 } => {
                let s = ck.read_all(scale)?;
                finite_scales(scale, &s)?;
                let raw = ck.read_raw(weight)?;
                let lut: Vec<f32> = (0..=255u8).map(|b| fp8_value(b, *e5m2)).collect();
                let (rows, cols) = (*rows as usize, *cols as usize);
                let [bm, bn] = block.map_or([rows.max(1), cols.max(1)], |[a, b]| [a as usize, b as usize]);
                let grid_cols = cols.div_ceil(bn);
                let mut out = vec![0f32; rows * cols];
                for (r, (o, q)) in out.chunks_mut(cols.max(1)).zip(raw.chunks(cols.max(1))).enumerate() {
                    let srow = &s[(r / bm) * grid_cols..];
                    for (c, (o, &q)) in o.iter_mut().zip(q).enumerate() {
                        *o = lut[q as usize] * srow[c / bn];
                    }
                }
                if let Some(k) = out.iter().position(|x| !x.is_finite()) {
                    return Err(NonFinite { tensor: weight.clone(), element: k as u64, value: out[k] }.into());
                }
                out
            }
            Self::Gptq { qweight, qzeros, scales, g_idx, out, inp, groups, group_size, zero_offset } => {
                let (n, k_all) = (*out as usize, *inp as usize);
                let q = i32s(&ck.read_raw(qweight)?);
                let z = i32s(&ck.read_raw(qzeros)?);
                let s = ck.read_all(scales)?;
                finite_scales(scales, &s)?;
                let g: Vec<usize> = match g_idx {
                    Some(gi) => i32s(&ck.read_raw(gi)?)
                        .into_iter()
                        .enumerate()
                        .map(|(k, v)| {
                            usize::try_from(v).ok().filter(|&v| (v as u64) < *groups).ok_or(QuantError::GroupIndex {
                                tensor: gi.clone(),
                                index: k as u64,
                                value: i64::from(v),
                                groups: *groups,
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    None => (0..k_all).map(|k| k / *group_size as usize).collect(),
                };
                // Decoded as [in, out] (every plane is read along its rows), then transposed.
                let mut wt = vec![0f32; n * k_all];
                for (k, row) in wt.chunks_exact_mut(n.max(1)).enumerate() {
                    let (word, shift) = (k / 8, 4 * (k % 8));
                    let gk = g[k];
                    let (q, z, s) = (&q[word * n..][..n], &z[gk * (n / 8)..][..n / 8], &s[gk * n..][..n]);
                    for (c, o) in row.iter_mut().enumerate() {
                        let code = (q[c] >> shift) & 0xF;
                        let zero = ((z[c / 8] >> (4 * (c % 8))) & 0xF) + zero_offset;
                        *o = s[c] * (code - zero) as f32;
                    }
                }
                transpose(&wt, k_all, n)
            }
            Self::Awq { qweight, qzeros, scales, out, inp, group_size } => {
                const NIBBLE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
                let (n, k_all, gs) = (*out as usize, *inp as usize, *group_size as usize);
                let q = i32s(&ck.read_raw(qweight)?);
                let z = i32s(&ck.read_raw(qzeros)?);
                let s = ck.read_all(scales)?;
                finite_scales(scales, &s)?;
                let words = n / 8;
                let mut wt = vec![0f32; n * k_all];
                for (k, row) in wt.chunks_exact_mut(n.max(1)).enumerate() {
                    let g = k / gs;
                    let (q, z, s) = (&q[k * words..][..words], &z[g * words..][..words], &s[g * n..][..n]);
                    for (c, o) in row.iter_mut().enumerate() {
                        let shift = 4 * NIBBLE[c % 8];
                        let code = (q[c / 8] >> shift) & 0xF;
                        let zero = (z[c / 8] >> shift) & 0xF;
                        *o = s[c] * (code - zero) as f32;
                    }
                }
                transpose(&wt, k_all, n)
            }
            Self::Mxfp4 { .. } => unreachable!("handled above"),
        };
        let first = usize::try_from(first)?;
        if first == 0 && count as usize == w.len() {
            return Ok(w);
        }
        Ok(w.drain(first..first + count as usize).collect())
    }

    /// MXFP4 only: expert `x`'s codes and scales for its rows `start, start + step, …`, as the
    /// release stores them (per row `nb · 16` code bytes, then per row `nb` scale bytes).
    ///
    /// # Errors
    /// Not MXFP4, an expert or row selection outside the tensor, I/O.
    pub fn mxfp4_rows(&self, ck: &Checkpoint, x: u64, start: u64, step: u64) -> Result<(Vec<u8>, Vec<u8>)> {
        let Self::Mxfp4 { blocks, scales, experts, rows, nb } = self else {
            anyhow::bail!("not an MXFP4 tensor");
        };
        anyhow::ensure!(x < *experts && step > 0 && start < step, "expert {x} rows {start}+{step}k: outside {blocks}");
        let (codes, sc) = (
            ck.read_range(blocks, x * rows * nb * 16, rows * nb * 16)?,
            ck.read_range(scales, x * rows * nb, rows * nb)?,
        );
        let (cw, sw) = ((nb * 16) as usize, *nb as usize);
        let pick = |v: &[u8], w: usize| -> Vec<u8> {
            v.chunks(w).skip(start as usize).step_by(step as usize).flatten().copied().collect()
        };
        Ok((pick(&codes, cw), pick(&sc, sw)))
    }
}

/// `[rows, cols]` → `[cols, rows]`, in tiles (a plain loop strides through memory on one
/// side; on release-sized matrices the tiles are several times faster).
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; src.len()];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// Dequantizes expert `x` of an MXFP4 pair to the transposed logical layout `[nb · 32, rows]`.
fn mxfp4_expert(ck: &Checkpoint, blocks: &str, scales: &str, x: u64, rows: u64, nb: u64) -> Result<Vec<f32>> {
    let codes = ck.read_range(blocks, x * rows * nb * 16, rows * nb * 16)?;
    let sc = ck.read_range(scales, x * rows * nb, rows * nb)?;
    let (rows, cols) = (rows as usize, nb as usize * 32);
    // Decoded as stored ([rows, cols]), then transposed to the logical [cols, rows].
    let mut out = vec![0f32; rows * cols];
    for (blk, (o, code)) in out.chunks_exact_mut(32).zip(codes.chunks_exact(16)).enumerate() {
        let s = e8m0_value(sc[blk]);
        if !s.is_finite() {
            let element = x * rows as u64 * nb + blk as u64;
            return Err(NonFinite { tensor: scales.to_string(), element, value: s }.into());
        }
        for (o, &byte) in o.chunks_exact_mut(2).zip(code) {
            o[0] = E2M1[usize::from(byte & 0xF)] * s;
            o[1] = E2M1[usize::from(byte >> 4)] * s;
        }
    }
    if let Some(k) = out.iter().position(|v| !v.is_finite()) {
        return Err(NonFinite { tensor: blocks.to_string(), element: k as u64, value: out[k] }.into());
    }
    Ok(transpose(&out, rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_values_match_the_formats() {
        // e4m3fn: 0x38 = 1.0, 0x7E = 448 (max), 0x01 = 2^-9 (smallest subnormal), 0x7F NaN.
        assert_eq!(fp8_value(0x38, false), 1.0);
        assert_eq!(fp8_value(0x7E, false), 448.0);
        assert_eq!(fp8_value(0xFE, false), -448.0);
        assert_eq!(fp8_value(0x01, false), 2f32.powi(-9));
        assert!(fp8_value(0x7F, false).is_nan());
        assert_eq!(fp8_value(0x78, false), 256.0);
        // e5m2: 0x3C = 1.0, 0x7B = 57344 (max), 0x7C inf, 0x7D NaN, 0x01 = 2^-16.
        assert_eq!(fp8_value(0x3C, true), 1.0);
        assert_eq!(fp8_value(0x7B, true), 57344.0);
        assert_eq!(fp8_value(0x7C, true), f32::INFINITY);
        assert!(fp8_value(0x7D, true).is_nan());
        assert_eq!(fp8_value(0x01, true), 2f32.powi(-16));
        // Every e4m3 value round-trips through half's own decoding of the same bits.
        for b in 0..=255u8 {
            let v = fp8_value(b, false);
            if v.is_finite() {
                assert_eq!(v.to_bits() & 0xFFFF, 0, "{b:#x}: more than 7 significant bits? {v}");
            }
        }
    }

    #[test]
    fn e8m0_scales() {
        assert_eq!(e8m0_value(127), 1.0);
        assert_eq!(e8m0_value(0), 2f32.powi(-127));
        assert_eq!(e8m0_value(254), 2f32.powi(127));
        assert!(e8m0_value(255).is_nan());
    }

    fn cfg(q: serde_json::Value) -> Result<Option<Method>, QuantError> {
        let j = serde_json::json!({ "quantization_config": q });
        Method::from_config(j.as_object().unwrap())
    }

    #[test]
    fn configs_are_read_or_refused_by_name() {
        use serde_json::json;
        assert_eq!(cfg(json!(null)).unwrap(), None);
        assert_eq!(
            cfg(json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})).unwrap(),
            Some(Method::Fp8 { block: Some([128, 128]) })
        );
        assert_eq!(cfg(json!({"quant_method": "mxfp4"})).unwrap(), Some(Method::Mxfp4));
        assert_eq!(
            cfg(json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": true})).unwrap(),
            Some(Method::Gptq { group_size: Some(128), zero_offset: 1 })
        );
        assert_eq!(
            cfg(json!({"quant_method": "gptq", "bits": 4, "group_size": -1, "checkpoint_format": "gptq_v2"})).unwrap(),
            Some(Method::Gptq { group_size: None, zero_offset: 0 })
        );
        assert_eq!(
            cfg(json!({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "GEMM", "zero_point": true}))
                .unwrap(),
            Some(Method::Awq { group_size: 64 })
        );
        for (q, says) in [
            (json!({"quant_method": "gptq", "bits": 8, "group_size": 128}), "gptq with 8 bits"),
            (json!({"quant_method": "awq", "bits": 3, "group_size": 128}), "awq with 3 bits"),
            (json!({"quant_method": "bitsandbytes", "load_in_4bit": true}), "bitsandbytes"),
            (json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}), "awq (gemv)"),
            (json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}), "marlin"),
        ] {
            let e = cfg(q).unwrap_err();
            assert!(matches!(e, QuantError::Unsupported { .. }), "{e}");
            let s = e.to_string();
            assert!(s.contains(says) && s.contains("supported: fp8"), "{s}");
        }
        assert!(matches!(
            cfg(json!({"quant_method": "fp8", "weight_block_size": [0, 4]})),
            Err(QuantError::BadConfig { .. })
        ));
        assert!(matches!(cfg(json!({"bits": 4})), Err(QuantError::BadConfig { .. })));
    }

    /// A checkpoint of raw tensors `(name, dtype, shape, bytes)`, quantized as `method`.
    fn ck(tensors: &[(&str, &str, Vec<u64>, Vec<u8>)], method: &Method) -> Result<(tempfile::TempDir, Checkpoint)> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                (*name).into(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::Value::Object(header).to_string();
        let mut file = (h.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(h.as_bytes());
        file.extend_from_slice(&data);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
        let mut c = Checkpoint::open(dir.path())?;
        c.dequantize(Some(method))?;
        Ok((dir, c))
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn le(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// An e4m3 byte pattern of every finite code, as a [rows, cols] matrix.
    fn fp8_codes(rows: usize, cols: usize) -> Vec<u8> {
        (0..rows * cols).map(|i| (i * 37 % 256) as u8).map(|b| if b & 0x7F == 0x7F { 0x38 } else { b }).collect()
    }

    #[test]
    fn fp8_ragged_blocks_follow_the_ceil_grid() {
        // 5 x 7 with [2, 3] blocks: a 3 x 3 grid whose last row and column are partial.
        let (rows, cols) = (5usize, 7usize);
        let codes = fp8_codes(rows, cols);
        let scales: Vec<f32> = (0..9).map(|i| 0.5 + i as f32).collect();
        let m = Method::Fp8 { block: Some([2, 3]) };
        let (_d, c) = ck(
            &[
                ("w.weight", "F8_E4M3", vec![5, 7], codes.clone()),
                ("w.weight_scale_inv", "F32", vec![3, 3], f32s(&scales)),
            ],
            &m,
        )
        .unwrap();
        assert_eq!(c.get("w.weight").unwrap().shape, vec![5, 7]);
        assert!(c.get("w.weight_scale_inv").is_none(), "a part is not a tensor of its own");
        let w = c.read_all("w.weight").unwrap();
        for r in 0..rows {
            for k in 0..cols {
                let want = fp8_value(codes[r * cols + k], false) * scales[(r / 2) * 3 + k / 3];
                assert_eq!(w[r * cols + k], want, "({r}, {k})");
            }
        }
        // A slice is the same values.
        assert_eq!(c.read_f32("w.weight", 7, 14).unwrap(), w[7..21].to_vec());
        // A scale grid of the floor rule (2 x 2) is refused, naming the scale tensor.
        let e = ck(
            &[
                ("w.weight", "F8_E4M3", vec![5, 7], codes.clone()),
                ("w.weight_scale_inv", "F32", vec![2, 2], f32s(&[1.0; 4])),
            ],
            &m,
        )
        .unwrap_err();
        assert!(
            matches!(e.downcast_ref::<QuantError>(), Some(QuantError::Mismatch { tensor, .. }) if tensor == "w.weight_scale_inv"),
            "{e:#}"
        );
        // No scale at all.
        let e = ck(&[("w.weight", "F8_E4M3", vec![5, 7], codes.clone())], &m).unwrap_err();
        assert!(matches!(e.downcast_ref::<QuantError>(), Some(QuantError::Missing { .. })), "{e:#}");
        // A NaN scale is refused when read, naming the scale tensor and element.
        let mut bad = scales.clone();
        bad[4] = f32::NAN;
        let (_d, c) = ck(
            &[
                ("w.weight", "F8_E4M3", vec![5, 7], codes.clone()),
                ("w.weight_scale_inv", "F32", vec![3, 3], f32s(&bad)),
            ],
            &m,
        )
        .unwrap();
        let e = c.read_all("w.weight").unwrap_err();
        let nf = e.downcast_ref::<NonFinite>().expect("typed");
        assert_eq!((nf.tensor.as_str(), nf.element), ("w.weight_scale_inv", 4));
        // A NaN code (0x7F) in the weight is refused too.
        let mut nan = codes;
        nan[3] = 0x7F;
        let (_d, c) = ck(
            &[("w.weight", "F8_E4M3", vec![5, 7], nan), ("w.weight_scale_inv", "F32", vec![3, 3], f32s(&scales))],
            &m,
        )
        .unwrap();
        assert_eq!(c.read_all("w.weight").unwrap_err().downcast_ref::<NonFinite>().unwrap().element, 3);
    }

    #[test]
    fn fp8_per_tensor_scale_and_e5m2() {
        let codes: Vec<u8> = vec![0x3C, 0x40, 0xBC, 0x00, 0x01, 0x7B];
        let m = Method::Fp8 { block: None };
        let (_d, c) = ck(
            &[
                ("w.weight", "F8_E5M2", vec![2, 3], codes.clone()),
                ("w.weight_scale_inv", "F32", vec![1], f32s(&[0.25])),
            ],
            &m,
        )
        .unwrap();
        let want: Vec<f32> = codes.iter().map(|&b| fp8_value(b, true) * 0.25).collect();
        assert_eq!(c.read_all("w.weight").unwrap(), want);
        assert_eq!(want[..3], [0.25, 0.5, -0.25]);
    }

    /// Packs 4-bit codes as GPTQ does: `[in, out]` codes → `[in / 8, out]` words.
    fn gptq_pack_in(codes: &[i32], inp: usize, out: usize) -> Vec<i32> {
        let mut q = vec![0i32; inp / 8 * out];
        for k in 0..inp {
            for n in 0..out {
                q[(k / 8) * out + n] |= codes[k * out + n] << (4 * (k % 8));
            }
        }
        q
    }

    /// Packs `[rows, out]` codes along the output dimension, nibble `i` holding column
    /// `8c + order[i]`.
    fn pack_out(codes: &[i32], rows: usize, out: usize, order: [usize; 8]) -> Vec<i32> {
        let mut q = vec![0i32; rows * out / 8];
        for r in 0..rows {
            for c in 0..out / 8 {
                for (i, &j) in order.iter().enumerate() {
                    q[r * out / 8 + c] |= codes[r * out + 8 * c + j] << (4 * i);
                }
            }
        }
        q
    }

    fn codes(n: usize, seed: usize) -> Vec<i32> {
        (0..n).map(|i| ((i * 7 + seed * 3 + i / 5) % 16) as i32).collect()
    }

    #[test]
    fn gptq_dequantizes_with_g_idx_and_the_zero_convention() {
        let (inp, out, gs) = (16usize, 8usize, 4usize);
        let groups = inp / gs;
        let q = codes(inp * out, 1);
        let zeros = codes(groups * out, 2);
        let scales: Vec<f32> = (0..groups * out).map(|i| 0.01 * (i + 1) as f32).collect();
        // desc_act: groups in a permuted order.
        let g_idx: Vec<i32> = (0..inp).map(|k| ((k * 3) % inp / gs) as i32).collect();
        let tensors = |g: &[i32]| {
            vec![
                ("l.qweight", "I32", vec![(inp / 8) as u64, out as u64], le(&gptq_pack_in(&q, inp, out))),
                (
                    "l.qzeros",
                    "I32",
                    vec![groups as u64, (out / 8) as u64],
                    le(&pack_out(&zeros, groups, out, [0, 1, 2, 3, 4, 5, 6, 7])),
                ),
                ("l.scales", "F32", vec![groups as u64, out as u64], f32s(&scales)),
                ("l.g_idx", "I32", vec![inp as u64], le(g)),
            ]
        };
        for offset in [1, 0] {
            let (_d, c) =
                ck(&tensors(&g_idx), &Method::Gptq { group_size: Some(gs as u64), zero_offset: offset }).unwrap();
            assert_eq!(c.get("l.weight").unwrap().shape, vec![out as u64, inp as u64]);
            assert_eq!(c.names().collect::<Vec<_>>(), vec!["l.weight"]);
            let w = c.read_all("l.weight").unwrap();
            for n in 0..out {
                for k in 0..inp {
                    let g = g_idx[k] as usize;
                    let want = scales[g * out + n] * (q[k * out + n] - (zeros[g * out + n] + offset)) as f32;
                    assert_eq!(w[n * inp + k], want, "offset {offset} ({n}, {k})");
                }
            }
        }
        // A group index out of range is a typed error naming the tensor and input.
        let mut bad = g_idx.clone();
        bad[5] = groups as i32;
        let (_d, c) = ck(&tensors(&bad), &Method::Gptq { group_size: Some(gs as u64), zero_offset: 1 }).unwrap();
        let e = c.read_all("l.weight").unwrap_err();
        assert_eq!(
            e.downcast_ref::<QuantError>(),
            Some(&QuantError::GroupIndex {
                tensor: "l.g_idx".into(),
                index: 5,
                value: groups as i64,
                groups: groups as u64
            })
        );
        bad[5] = -1;
        let (_d, c) = ck(&tensors(&bad), &Method::Gptq { group_size: Some(gs as u64), zero_offset: 1 }).unwrap();
        assert!(c.read_all("l.weight").is_err());
        // Scales of the wrong shape: refused when opened, naming them.
        let mut t = tensors(&g_idx);
        t[2] = ("l.scales", "F32", vec![out as u64, groups as u64], f32s(&scales));
        let e = ck(&t, &Method::Gptq { group_size: Some(gs as u64), zero_offset: 1 }).unwrap_err();
        assert!(
            matches!(e.downcast_ref::<QuantError>(), Some(QuantError::Mismatch { tensor, .. }) if tensor == "l.scales"),
            "{e:#}"
        );
    }

    #[test]
    fn awq_unpacks_its_interleaved_order() {
        let (inp, out, gs) = (8usize, 16usize, 4usize);
        let groups = inp / gs;
        let q = codes(inp * out, 3);
        let zeros = codes(groups * out, 4);
        let scales: Vec<f32> = (0..groups * out).map(|i| 0.5 - 0.03 * i as f32).collect();
        const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
        let (_d, c) = ck(
            &[
                ("l.qweight", "I32", vec![inp as u64, (out / 8) as u64], le(&pack_out(&q, inp, out, ORDER))),
                ("l.qzeros", "I32", vec![groups as u64, (out / 8) as u64], le(&pack_out(&zeros, groups, out, ORDER))),
                ("l.scales", "F32", vec![groups as u64, out as u64], f32s(&scales)),
            ],
            &Method::Awq { group_size: gs as u64 },
        )
        .unwrap();
        let w = c.read_all("l.weight").unwrap();
        for n in 0..out {
            for k in 0..inp {
                let g = k / gs;
                let want = scales[g * out + n] * (q[k * out + n] - zeros[g * out + n]) as f32;
                assert_eq!(w[n * inp + k], want, "({n}, {k})");
            }
        }
    }

    #[test]
    fn mxfp4_low_nibble_is_the_even_element() {
        // 2 experts, 3 rows, 2 blocks of 32.
        let (e, rows, nb) = (2usize, 3usize, 2usize);
        let blocks: Vec<u8> = (0..e * rows * nb * 16).map(|i| (i * 29 % 256) as u8).collect();
        let scales: Vec<u8> = (0..e * rows * nb).map(|i| 120 + i as u8).collect();
        let (_d, c) = ck(
            &[
                ("x.down_proj_blocks", "U8", vec![e as u64, rows as u64, nb as u64, 16], blocks.clone()),
                ("x.down_proj_scales", "U8", vec![e as u64, rows as u64, nb as u64], scales.clone()),
            ],
            &Method::Mxfp4,
        )
        .unwrap();
        let cols = nb * 32;
        assert_eq!(c.get("x.down_proj").unwrap().shape, vec![e as u64, cols as u64, rows as u64]);
        let w = c.read_all("x.down_proj").unwrap();
        for x in 0..e {
            for r in 0..rows {
                for k in 0..cols {
                    let byte = blocks[((x * rows + r) * nb + k / 32) * 16 + (k % 32) / 2];
                    let code = if k % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    let s = 2f32.powi(i32::from(scales[(x * rows + r) * nb + k / 32]) - 127);
                    // Transposed: [E, cols, rows].
                    assert_eq!(w[(x * cols + k) * rows + r], E2M1[code as usize] * s, "({x}, {r}, {k})");
                }
            }
        }
        // One expert alone reads the same values.
        let per = (cols * rows) as u64;
        assert_eq!(c.read_f32("x.down_proj", per, per).unwrap(), w[per as usize..].to_vec());
        // The raw rows of expert 1, odd rows only: bytes as stored.
        let (codes, sc) = c.quantized("x.down_proj").unwrap().mxfp4_rows(&c, 1, 1, 2).unwrap();
        assert_eq!(codes, blocks[(rows + 1) * nb * 16..(rows + 2) * nb * 16].to_vec());
        assert_eq!(sc, scales[(rows + 1) * nb..(rows + 2) * nb].to_vec());
        // Scale 255 (NaN in E8M0) is refused.
        let mut bad = scales;
        bad[7] = 255;
        let (_d, c) = ck(
            &[
                ("x.down_proj_blocks", "U8", vec![e as u64, rows as u64, nb as u64, 16], blocks),
                ("x.down_proj_scales", "U8", vec![e as u64, rows as u64, nb as u64], bad),
            ],
            &Method::Mxfp4,
        )
        .unwrap();
        let e = c.read_all("x.down_proj").unwrap_err();
        assert_eq!(
            e.downcast_ref::<NonFinite>().map(|n| (n.tensor.as_str(), n.element)),
            Some(("x.down_proj_scales", 7))
        );
    }

    #[test]
    fn quantized_tensors_without_a_config_are_named() {
        let t = BTreeMap::from([(
            "a.qweight".to_string(),
            Entry { file: 0, dtype: "I32".into(), shape: vec![1, 8], start: 0, len: 32 },
        )]);
        let e = virtuals(&t, None).unwrap_err();
        assert_eq!(e, QuantError::Undeclared { tensor: "a.qweight".into(), what: "GPTQ/AWQ qweight" });
        // FP8 weights under a GPTQ config: the encoding does not match.
        let t = BTreeMap::from([(
            "a.weight".to_string(),
            Entry { file: 0, dtype: "F8_E4M3".into(), shape: vec![1, 8], start: 0, len: 8 },
        )]);
        assert!(matches!(
            virtuals(&t, Some(&Method::Gptq { group_size: None, zero_offset: 1 })),
            Err(QuantError::Mismatch { .. })
        ));
    }
}
