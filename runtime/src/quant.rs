//! The block formats: `Q8_0` (int8), `Q4_0` (int4) and `MXFP4` (OCP microscaling FP4),
//! quantization version 1.
//!
//! All three store a `[rows, cols]` matrix as two planes, blocks of [`QK`] = 32 values along
//! the input (last) dimension: the code plane, `rows` rows of `row_stride(cols)` bytes (each
//! row padded with zero codes to a whole number of blocks), then, at the next 64-byte
//! boundary, the scale plane: `rows × blocks(cols)` scales.
//!
//! - `Q8_0`: one int8 per value, an f16 scale per block; `(r, c) = q · scale`. Numerics match
//!   ggml's Q8_0.
//! - `Q4_0`: 16 bytes per block, byte `j` holds value `2j` in its low nibble and `2j + 1` in
//!   its high nibble, code `n` meaning `n − 8`; an f16 scale per block.
//! - `MXFP4`: the same nibble order, each nibble an E2M1 code (sign, 2-bit exponent, 1-bit
//!   mantissa: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}), one E8M0 byte per block (`2^(e − 127)`,
//!   `0xFF` is NaN): gpt-oss's `*_blocks` / `*_scales` bytes as they ship.

use crate::format::DType;
use half::f16;

/// Values per block, along the input (last) dimension.
pub const QK: usize = 32;

/// Blocks per row of `cols` values.
pub fn blocks(cols: u64) -> Option<u64> {
    cols.checked_add(QK as u64 - 1).map(|c| c / QK as u64)
}

/// The planar layout of a block dtype: bytes of codes and of scale per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planar {
    /// Code bytes per block (32 for `Q8_0`, 16 for the 4-bit formats).
    pub code: u64,
    /// Scale bytes per block (2: f16; 1: E8M0).
    pub scale: u64,
}

impl Planar {
    /// The layout of `dtype`, or `None` for the plain dtypes.
    pub const fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::Q8_0 => Some(Self { code: 32, scale: 2 }),
            DType::Q4_0 => Some(Self { code: 16, scale: 2 }),
            DType::MXFP4 => Some(Self { code: 16, scale: 1 }),
            DType::F32 | DType::F16 | DType::BF16 => None,
        }
    }
    /// Bytes per row of the code plane.
    pub fn row_stride(self, cols: u64) -> Option<u64> {
        blocks(cols)?.checked_mul(self.code)
    }
    /// Offset of the scale plane from the start of the tensor.
    pub fn scales_offset(self, rows: u64, cols: u64) -> Option<u64> {
        crate::align::align_up(rows.checked_mul(self.row_stride(cols)?)?, 64)
    }
    /// Total bytes of a `[rows, cols]` tensor, or `None` on overflow.
    pub fn len(self, rows: u64, cols: u64) -> Option<u64> {
        self.scales_offset(rows, cols)?.checked_add(rows.checked_mul(blocks(cols)?)?.checked_mul(self.scale)?)
    }
}

const Q8: Planar = Planar { code: 32, scale: 2 };

/// Bytes per row of a Q8_0 quantized plane.
pub fn row_stride(cols: u64) -> Option<u64> {
    Q8.row_stride(cols)
}

/// Offset of a Q8_0 tensor's scale plane from its start.
pub fn scales_offset(rows: u64, cols: u64) -> Option<u64> {
    Q8.scales_offset(rows, cols)
}

/// Total bytes of a `[rows, cols]` Q8_0 tensor, or `None` on overflow.
pub fn q8_0_len(rows: u64, cols: u64) -> Option<u64> {
    Q8.len(rows, cols)
}

/// Quantizes one block (≤ 32 values; missing values count as zero) into `q`, returning
/// its scale. `d = max|x| / 127`, `q = round(x / d)` (half away from zero).
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> f16 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (i, out) in q.iter_mut().enumerate() {
        let v = x.get(i).copied().unwrap_or(0.0);
        *out = libm::roundf(v * id).clamp(-127.0, 127.0) as i8;
    }
    f16::from_f32(d)
}

/// The E2M1 magnitudes of codes 0..8 (code | 8 is the negative).
pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// `2^(e − 127)`, the value of an E8M0 scale byte (`0xFF` is NaN).
pub fn e8m0(e: u8) -> f32 {
    match e {
        0xFF => f32::NAN,
        // 2^-127 and 2^-126 … : subnormal for e = 0, then the exponent field itself.
        0 => f32::from_bits(0x0040_0000),
        e => f32::from_bits(u32::from(e) << 23),
    }
}

/// The value of 4-bit code `n` (0..16) of `dtype` before scaling: `n − 8` for `Q4_0`, the
/// E2M1 value for `MXFP4`.
#[inline]
fn nibble_value(dtype: DType, n: u8) -> f32 {
    if dtype == DType::MXFP4 {
        let v = E2M1[usize::from(n & 7)];
        if n & 8 != 0 { -v } else { v }
    } else {
        f32::from(n) - 8.0
    }
}

/// Block `x` (32 values) as Q4_0 codes (`n − 8` in `[−8, 7]`) with the scale that minimises
/// `Σ imp·(x − d·q)²`: the best of a few candidate grids (the largest |x| mapped near −8 or near
/// +7), each with its least-squares `d`. With `imp` all ones this is the weight's own error;
/// with activation statistics, the error of `W·x` on those activations.
fn q4_block(x: &[f32; QK], imp: &[f32; QK], q: &mut [i8; QK]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    if amax == 0.0 {
        *q = [0; QK];
        return 0.0;
    }
    let mut best = (f32::NEG_INFINITY, 0.0f32);
    for (nmax, step) in [(-8.0f32, 0.1f32), (7.0, 0.1)] {
        for k in -4..=4 {
            let id = (nmax + step * k as f32) / max;
            let (mut lx, mut l2) = (0.0f32, 0.0f32);
            for i in 0..QK {
                let l = libm::roundf(x[i] * id).clamp(-8.0, 7.0);
                lx += imp[i] * x[i] * l;
                l2 += imp[i] * l * l;
            }
            // Error at the least-squares scale: Σ imp·x² − lx²/l2; maximise lx²/l2.
            if l2 > 0.0 && lx * lx / l2 > best.0 {
                best = (lx * lx / l2, id);
            }
        }
    }
    let id = best.1;
    let (mut lx, mut l2) = (0.0f32, 0.0f32);
    for i in 0..QK {
        let l = libm::roundf(x[i] * id).clamp(-8.0, 7.0);
        q[i] = l as i8;
        lx += imp[i] * x[i] * l;
        l2 += imp[i] * l * l;
    }
    if l2 > 0.0 { lx / l2 } else { 0.0 }
}

/// The E2M1 code nearest to `v` (ties to the even code, as OCP rounding), saturating at ±6.
fn e2m1_code(v: f32) -> u8 {
    let a = v.abs();
    let mut best = 0u8;
    for (i, &g) in E2M1.iter().enumerate() {
        let (d, db) = ((a - g).abs(), (a - E2M1[usize::from(best)]).abs());
        if d < db || (d == db && i % 2 == 0 && best % 2 == 1) {
            best = i as u8;
        }
    }
    if v < 0.0 && best != 0 { best | 8 } else { best }
}

/// Block `x` as MXFP4 codes with the E8M0 scale byte that minimises `Σ imp·(x − v)²`: the
/// OCP choice `floor(log2 amax) − 2` (which may clip the largest values to 6) or one above it.
fn mxfp4_block(x: &[f32; QK], imp: &[f32; QK], codes: &mut [u8; QK]) -> u8 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        *codes = [0; QK];
        return 0;
    }
    let e0 = libm::floorf(libm::log2f(amax)) as i32 - 2;
    let mut best = (f32::INFINITY, 0u8);
    for e in [e0, e0 + 1] {
        let byte = (e + 127).clamp(0, 254) as u8;
        let s = e8m0(byte);
        let err: f32 = (0..QK)
            .map(|i| {
                let r = x[i] - nibble_value(DType::MXFP4, e2m1_code(x[i] / s)) * s;
                imp[i] * r * r
            })
            .sum();
        if err < best.0 {
            best = (err, byte);
        }
    }
    let s = e8m0(best.1);
    for i in 0..QK {
        codes[i] = e2m1_code(x[i] / s);
    }
    best.1
}

/// Quantizes a row-major `[rows, cols]` f32 matrix into a Q8_0 tensor's bytes.
///
/// # Panics
/// If `w.len() != rows * cols` (a caller bug, not untrusted input).
pub fn quantize(w: &[f32], rows: usize, cols: usize) -> alloc::vec::Vec<u8> {
    quantize_as(DType::Q8_0, w, rows, cols, None)
}

/// Quantizes a row-major `[rows, cols]` f32 matrix into the bytes of block dtype `dtype`.
///
/// `importance` (`cols` values ≥ 0: the mean square of each input over calibration tokens)
/// makes the 4-bit formats choose each block's scale for the error of `W·x` rather than of
/// `W`; `Q8_0` ignores it (its rounding is ggml's, bit for bit).
///
/// # Panics
/// If `w.len() != rows * cols`, `importance` is not `cols` long, or `dtype` is not a block
/// dtype (caller bugs, not untrusted input).
pub fn quantize_as(
    dtype: DType,
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
) -> alloc::vec::Vec<u8> {
    assert_eq!(w.len(), rows * cols, "quantize: buffer does not match shape");
    assert!(importance.is_none_or(|i| i.len() == cols), "quantize: importance is not one value per column");
    let p = Planar::of(dtype).expect("quantize: a block dtype");
    let (nb, code, sb) = (cols.div_ceil(QK), p.code as usize, p.scale as usize);
    let soff = p.scales_offset(rows as u64, cols as u64).expect("in-memory size fits") as usize;
    let mut out = alloc::vec![0u8; soff + rows * nb * sb];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        // As llama.cpp's imatrix quantizers: a value's weight is its column's importance
        // times sqrt(σ² + x²), σ² the row's mean square, so larger weights also count more.
        let sigma2 = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        for b in 0..nb {
            let (c0, c1) = (b * QK, cols.min((b + 1) * QK));
            let mut x = [0.0f32; QK];
            x[..c1 - c0].copy_from_slice(&row[c0..c1]);
            let mut imp = [1.0f32; QK];
            if let Some(i) = importance {
                // Padding values weigh nothing; a column never seen still counts a little.
                imp = [0.0; QK];
                for ((d, &v), &xv) in imp.iter_mut().zip(&i[c0..c1]).zip(&x) {
                    *d = (v.max(0.0) + 1e-6) * libm::sqrtf(sigma2 + xv * xv);
                }
            }
            let (head, scales) = out.split_at_mut(soff);
            let codes = &mut head[(r * nb + b) * code..][..code];
            let scale = &mut scales[(r * nb + b) * sb..][..sb];
            match dtype {
                DType::Q8_0 => {
                    let mut q = [0i8; QK];
                    scale.copy_from_slice(&quantize_block(&row[c0..c1], &mut q).to_le_bytes());
                    for (dst, v) in codes.iter_mut().zip(q) {
                        *dst = v as u8;
                    }
                }
                DType::Q4_0 => {
                    let mut q = [0i8; QK];
                    let d = f16::from_f32(q4_block(&x, &imp, &mut q));
                    scale.copy_from_slice(&d.to_le_bytes());
                    pack_nibbles(codes, |i| (q[i] + 8) as u8);
                }
                _ => {
                    let mut n = [0u8; QK];
                    scale[0] = mxfp4_block(&x, &imp, &mut n);
                    pack_nibbles(codes, |i| n[i]);
                }
            }
        }
    }
    out
}

/// Packs 32 nibbles into 16 bytes: value `2j` low, `2j + 1` high.
fn pack_nibbles(codes: &mut [u8], n: impl Fn(usize) -> u8) {
    for (j, c) in codes.iter_mut().enumerate() {
        *c = (n(2 * j) & 15) | (n(2 * j + 1) << 4);
    }
}

/// Dequantizes row `r` of a `[rows, cols]` Q8_0 tensor into `out` (`cols` values).
///
/// # Panics
/// If `bytes` is shorter than the tensor or `out.len() != cols` (validated by the reader).
pub fn dequantize_row(bytes: &[u8], rows: usize, cols: usize, r: usize, out: &mut [f32]) {
    dequantize_row_as(DType::Q8_0, bytes, rows, cols, r, out)
}

/// Dequantizes row `r` of a `[rows, cols]` tensor of block dtype `dtype` into `out`.
///
/// # Panics
/// If `bytes` is shorter than the tensor, `out.len() != cols` or `dtype` is not a block dtype
/// (validated by the reader).
pub fn dequantize_row_as(dtype: DType, bytes: &[u8], rows: usize, cols: usize, r: usize, out: &mut [f32]) {
    let p = Planar::of(dtype).expect("dequantize: a block dtype");
    let (nb, code, sb) = (cols.div_ceil(QK), p.code as usize, p.scale as usize);
    let soff = p.scales_offset(rows as u64, cols as u64).expect("validated size") as usize;
    assert_eq!(out.len(), cols, "dequantize: output length");
    let q = &bytes[r * nb * code..][..nb * code];
    let s = &bytes[soff + r * nb * sb..][..nb * sb];
    for (b, o) in out.chunks_mut(QK).enumerate() {
        let d = match dtype {
            DType::MXFP4 => e8m0(s[b]),
            _ => f16::from_le_bytes([s[2 * b], s[2 * b + 1]]).to_f32(),
        };
        let c = &q[b * code..][..code];
        for (i, o) in o.iter_mut().enumerate() {
            *o = match dtype {
                DType::Q8_0 => f32::from(c[i] as i8) * d,
                _ => nibble_value(dtype, (c[i / 2] >> (4 * (i % 2))) & 15) * d,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes() {
        // 3 rows × 40 cols: stride 64, q plane 192 → scales at 192, 3×2 scales × 2 bytes.
        assert_eq!(row_stride(40), Some(64));
        assert_eq!(scales_offset(3, 40), Some(192));
        assert_eq!(q8_0_len(3, 40), Some(204));
        assert_eq!(q8_0_len(u64::MAX, 2), None);
        // 4-bit: 2 blocks × 16 bytes per row, 3 rows = 96 → scales at 128.
        let q4 = Planar::of(DType::Q4_0).unwrap();
        assert_eq!((q4.row_stride(40), q4.scales_offset(3, 40), q4.len(3, 40)), (Some(32), Some(128), Some(140)));
        let mx = Planar::of(DType::MXFP4).unwrap();
        assert_eq!(mx.len(3, 40), Some(134));
        assert_eq!(mx.len(u64::MAX, 64), None);
    }

    fn wave(rows: usize, cols: usize) -> alloc::vec::Vec<f32> {
        (0..rows * cols).map(|i| libm::sinf(i as f32 * 0.37) * 3.0 + libm::cosf(i as f32 * 1.91)).collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let (rows, cols) = (5, 70);
        let w = wave(rows, cols);
        let q = quantize(&w, rows, cols);
        assert_eq!(q.len() as u64, q8_0_len(rows as u64, cols as u64).unwrap());
        let mut out = alloc::vec![0.0; cols];
        for r in 0..rows {
            dequantize_row(&q, rows, cols, r, &mut out);
            for (c, (&a, &b)) in w[r * cols..][..cols].iter().zip(&out).enumerate() {
                let blk = &w[r * cols + (c / QK) * QK..r * cols + cols.min((c / QK + 1) * QK)];
                let d = blk.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                assert!((a - b).abs() <= d * 0.57 + 1e-6, "r{r} c{c}: {a} vs {b}");
            }
        }
    }

    /// Root-mean-square error of a round trip through `dtype`, relative to the weights' RMS.
    fn rel_rms(dtype: DType, w: &[f32], rows: usize, cols: usize, imp: Option<&[f32]>) -> f32 {
        let q = quantize_as(dtype, w, rows, cols, imp);
        assert_eq!(q.len() as u64, Planar::of(dtype).unwrap().len(rows as u64, cols as u64).unwrap());
        let (mut e, mut n) = (0.0f64, 0.0f64);
        let mut out = alloc::vec![0.0; cols];
        for r in 0..rows {
            dequantize_row_as(dtype, &q, rows, cols, r, &mut out);
            for (c, (&a, &b)) in w[r * cols..][..cols].iter().zip(&out).enumerate() {
                let k = imp.map_or(1.0, |i| f64::from(i[c]));
                e += k * f64::from(a - b).powi(2);
                n += k * f64::from(a).powi(2);
            }
        }
        (e / n).sqrt() as f32
    }

    #[test]
    fn four_bit_round_trips_are_as_close_as_their_grids_allow() {
        let (rows, cols) = (7, 100);
        let w = wave(rows, cols);
        // A uniform 16-level grid over ±amax has a step of amax/7.5: RMS error ≈ step/√12,
        // about 6 % of these blocks' RMS; the E2M1 grid is coarser at the top.
        let q4 = rel_rms(DType::Q4_0, &w, rows, cols, None);
        let mx = rel_rms(DType::MXFP4, &w, rows, cols, None);
        assert!(q4 < 0.09, "q4_0 {q4}");
        assert!(mx < 0.16, "mxfp4 {mx}");
        assert!(rel_rms(DType::Q8_0, &w, rows, cols, None) < 0.006);
    }

    #[test]
    fn importance_lowers_the_weighted_error() {
        let (rows, cols) = (16, 64);
        let w = wave(rows, cols);
        // A few columns carry most of the activation energy.
        let imp: alloc::vec::Vec<f32> = (0..cols).map(|c| if c % 7 == 0 { 100.0 } else { 0.1 }).collect();
        for dt in [DType::Q4_0, DType::MXFP4] {
            let weighted_by_plain = {
                let q = quantize_as(dt, &w, rows, cols, None);
                let mut out = alloc::vec![0.0; cols];
                let (mut e, mut n) = (0.0f64, 0.0f64);
                for r in 0..rows {
                    dequantize_row_as(dt, &q, rows, cols, r, &mut out);
                    for c in 0..cols {
                        e += f64::from(imp[c]) * f64::from(w[r * cols + c] - out[c]).powi(2);
                        n += f64::from(imp[c]) * f64::from(w[r * cols + c]).powi(2);
                    }
                }
                (e / n).sqrt() as f32
            };
            let aware = rel_rms(dt, &w, rows, cols, Some(&imp));
            assert!(aware < weighted_by_plain, "{dt:?}: aware {aware} vs plain {weighted_by_plain}");
        }
    }

    #[test]
    fn mxfp4_codes_decode_as_the_ocp_table() {
        // Byte 0x9A: low nibble 0xA (−1.0), high nibble 0x9 (−0.5); scale byte 128 = 2.
        let mut t = alloc::vec![0u8; 64 + 1];
        t[0] = 0x9A;
        t[1] = 0x07 | 0xF0; // 6, −6
        t[64] = 128;
        let mut out = alloc::vec![0.0; 32];
        dequantize_row_as(DType::MXFP4, &t, 1, 32, 0, &mut out);
        assert_eq!(&out[..4], &[-2.0, -1.0, 12.0, -12.0]);
        assert_eq!((e8m0(127), e8m0(0), e8m0(1)), (1.0, libm::ldexpf(1.0, -127), libm::ldexpf(1.0, -126)));
        assert!(e8m0(255).is_nan());
        // Ties round to the even code: 0.25 → 0, 1.25 → 1, 2.5 → 2, 5 → 4; saturation at 6.
        let got: alloc::vec::Vec<u8> = [0.25f32, 1.25, 2.5, 5.0, 9.0, -0.75].iter().map(|&v| e2m1_code(v)).collect();
        assert_eq!(got, [0, 2, 4, 6, 7, 8 | 2]);
    }

    #[test]
    fn q4_0_codes_are_offset_by_eight() {
        // One block 0..32 scaled: the extreme (31) maps to +7 or −8·d with d < 0.
        let w: alloc::vec::Vec<f32> = (0..32).map(|i| i as f32).collect();
        let q = quantize_as(DType::Q4_0, &w, 1, 32, None);
        let mut out = alloc::vec![0.0; 32];
        dequantize_row_as(DType::Q4_0, &q, 1, 32, 0, &mut out);
        let d = f16::from_le_bytes([q[64], q[65]]).to_f32();
        for (i, &o) in out.iter().enumerate() {
            let n = (q[i / 2] >> (4 * (i % 2))) & 15;
            assert_eq!(o, (f32::from(n) - 8.0) * d);
            assert!((o - i as f32).abs() <= d.abs() * 0.75 + 1e-3 || i == 31, "{i}: {o}");
        }
    }
}
