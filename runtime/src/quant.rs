//! The int8 block format `Q8_0` (quantization version 1).
//!
//! A `[rows, cols]` matrix is stored as two planes: the quantized plane, `rows` rows of
//! `row_stride(cols)` int8 values (each row padded with zeros to a whole number of 32-blocks),
//! then, at the next 64-byte boundary, the scale plane: `rows × blocks(cols)` f16 scales.
//! Element `(r, c)` is `q[r][c] · scale[r][c / 32]`. Numerics match ggml's Q8_0.

use half::f16;

/// Values per block, along the input (last) dimension.
pub const QK: usize = 32;

/// Blocks per row of `cols` values.
pub fn blocks(cols: u64) -> Option<u64> {
    cols.checked_add(QK as u64 - 1).map(|c| c / QK as u64)
}

/// Bytes per row of the quantized plane.
pub fn row_stride(cols: u64) -> Option<u64> {
    blocks(cols)?.checked_mul(QK as u64)
}

/// Offset of the scale plane from the start of the tensor.
pub fn scales_offset(rows: u64, cols: u64) -> Option<u64> {
    crate::align::align_up(rows.checked_mul(row_stride(cols)?)?, 64)
}

/// Total bytes of a `[rows, cols]` Q8_0 tensor, or `None` on overflow.
pub fn q8_0_len(rows: u64, cols: u64) -> Option<u64> {
    scales_offset(rows, cols)?.checked_add(rows.checked_mul(blocks(cols)?)?.checked_mul(2)?)
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

/// Quantizes a row-major `[rows, cols]` f32 matrix into a Q8_0 tensor's bytes.
///
/// # Panics
/// If `w.len() != rows * cols` (a caller bug, not untrusted input).
pub fn quantize(w: &[f32], rows: usize, cols: usize) -> alloc::vec::Vec<u8> {
    assert_eq!(w.len(), rows * cols, "quantize: buffer does not match shape");
    let (nb, stride) = (cols.div_ceil(QK), cols.div_ceil(QK) * QK);
    let soff = scales_offset(rows as u64, cols as u64).expect("in-memory size fits") as usize;
    let mut out = alloc::vec![0u8; soff + rows * nb * 2];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for b in 0..nb {
            let x = &row[b * QK..row.len().min((b + 1) * QK)];
            let mut q = [0i8; QK];
            let d = quantize_block(x, &mut q);
            for (dst, v) in out[r * stride + b * QK..][..QK].iter_mut().zip(q) {
                *dst = v as u8;
            }
            out[soff + (r * nb + b) * 2..][..2].copy_from_slice(&d.to_le_bytes());
        }
    }
    out
}

/// Dequantizes row `r` of a `[rows, cols]` Q8_0 tensor into `out` (`cols` values).
///
/// # Panics
/// If `bytes` is shorter than the tensor or `out.len() != cols` (validated by the reader).
pub fn dequantize_row(bytes: &[u8], rows: usize, cols: usize, r: usize, out: &mut [f32]) {
    let (nb, stride) = (cols.div_ceil(QK), cols.div_ceil(QK) * QK);
    let soff = scales_offset(rows as u64, cols as u64).expect("validated size") as usize;
    let q = &bytes[r * stride..][..cols];
    let s = &bytes[soff + r * nb * 2..][..nb * 2];
    for (c, o) in out.iter_mut().enumerate() {
        let d = f16::from_le_bytes([s[(c / QK) * 2], s[(c / QK) * 2 + 1]]).to_f32();
        *o = f32::from(q[c] as i8) * d;
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
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let (rows, cols) = (5, 70);
        let w: alloc::vec::Vec<f32> = (0..rows * cols).map(|i| libm::sinf(i as f32 * 0.37) * 3.0).collect();
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
}
