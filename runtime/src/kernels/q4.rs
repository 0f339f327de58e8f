//! 4-bit products (`Q4_0`, `MXFP4`): nibble codes through a 16-entry table to small integers,
//! times the activations quantized to int8 per 32-block as for Q8_0 (`q8.rs`).
//!
//! # Numerics (every implementation, bit for bit)
//!
//! A row's 4-bit block `b` holds 32 codes; with `v(n)` the format's integer value of code `n`
//! (`Q4_0`: `n − 8`; `MXFP4`: twice the E2M1 value, so `0, ±1, ±2, ±3, ±4, ±6, ±8, ±12`) the
//! block sum `S_b = Σ v(n_i)·xq_i` is an exact i32. With the block's weight scale `dw_b` (f16,
//! or E8M0 halved for the doubling) and activation scale `dx_b`, the output is
//!
//! ```text
//! A[b mod 8] = A[b mod 8] + f32(S_b) · (dw_b · dx_b)       (block order, f32, no fusing)
//! y = ((A0 + A1) + (A4 + A5)) + ((A2 + A3) + (A6 + A7))
//! ```
//!
//! Every kernel (portable, AVX2, AVX-VNNI, AVX-512 VNNI, NEON, `sdot`, `smmla`) computes exactly this, so they agree bitwise
//! and a prompt gives the same bits as token-by-token decoding (tested below). The order is
//! the one a 256-bit register of 8 accumulators reaches most cheaply (see `x86_64.rs`).
//!
//! # Activation layout
//!
//! The weights' nibbles are in the file's order (byte `j` of a block: value `2j` low, `2j + 1`
//! high), so the kernels unpack a block into its even and its odd values. The activations are
//! rearranged once per matrix product to match: per pair of blocks `(2p, 2p + 1)`, 64 bytes
//! `[evens of 2p | evens of 2p + 1 | odds of 2p | odds of 2p + 1]` — what one 32-byte load of
//! two weight blocks gives after masking (low nibbles) and shifting (high nibbles). A row with
//! an odd number of blocks is padded with a zero block (zero scale, zero sum).

use super::q8::{Kernel, Micro, QActs, QWeights, run};
use crate::format::DType;
use crate::quant::{QK, e8m0};
use alloc::vec;
use alloc::vec::Vec;
use half::f16;

/// A 4-bit format: its code values and its scale bytes.
pub(super) trait Nib: 'static {
    /// The integer value of each code.
    const LUT: [i8; 16];
    /// The smallest value: the unsigned kernels add `−MIN` to every code's value and take
    /// `−MIN · Σx` off again.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const MIN: i8;
    /// Scale bytes per block.
    const SB: usize;
    /// Block `b`'s scale from a row's scale bytes, in the units of [`Nib::LUT`].
    fn scale(s: &[u8], b: usize) -> f32;
}

/// `Q4_0`: code `n` is `n − 8`, an f16 scale.
pub(super) struct Q4;
impl Nib for Q4 {
    const LUT: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];
    const MIN: i8 = -8;
    const SB: usize = 2;
    #[inline(always)]
    fn scale(s: &[u8], b: usize) -> f32 {
        f16::from_le_bytes([s[2 * b], s[2 * b + 1]]).to_f32()
    }
}

/// `MXFP4`: twice the E2M1 value (integers), an E8M0 scale halved to match.
pub(super) struct Mx;
impl Nib for Mx {
    const LUT: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
    const MIN: i8 = -12;
    const SB: usize = 1;
    #[inline(always)]
    fn scale(s: &[u8], b: usize) -> f32 {
        // Exact: a power of two, at least 2^-128 (an f32 subnormal), or NaN.
        e8m0(s[b]) * 0.5
    }
}

/// The format's table shifted to unsigned (`v − MIN`, at most 24): `maddubs` / `vpdpbusd`
/// multiply an unsigned byte by a signed one.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) const fn unsigned_lut<F: Nib>() -> [u8; 16] {
    let mut u = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        u[i] = (F::LUT[i] as i16 - F::MIN as i16) as u8;
        i += 1;
    }
    u
}

/// The 4-bit activations of `x` (already quantized per block): each pair of blocks
/// rearranged as the module doc says, rows padded to an even number of blocks.
pub(super) fn rearrange(x: &QActs, t: usize) -> QActs {
    let nb = x.nb;
    let ne = nb.next_multiple_of(2);
    let mut q = vec![0i8; t * ne * QK];
    let mut d = vec![0.0f32; t * ne];
    let mut s = vec![0i32; t * ne];
    for tok in 0..t {
        let src = &x.q[tok * nb * QK..][..nb * QK];
        let dst = &mut q[tok * ne * QK..][..ne * QK];
        for b in 0..nb {
            let (p, h) = (b / 2, b % 2);
            for j in 0..QK / 2 {
                dst[p * 64 + h * 16 + j] = src[b * QK + 2 * j];
                dst[p * 64 + 32 + h * 16 + j] = src[b * QK + 2 * j + 1];
            }
        }
        d[tok * ne..][..nb].copy_from_slice(&x.d[tok * nb..][..nb]);
        s[tok * ne..][..nb].copy_from_slice(&x.s[tok * nb..][..nb]);
    }
    QActs { q, d, s, nb }
}

/// The exact block sum `S_b` of row block `wb` (16 code bytes) with block `b` of a token's
/// rearranged activations `xr` (the whole row).
#[inline(always)]
pub(super) fn block_sum<F: Nib>(wb: &[u8], xr: &[i8], b: usize) -> i32 {
    let (p, h) = (b / 2, b % 2);
    let (ev, od) = (&xr[p * 64 + h * 16..][..16], &xr[p * 64 + 32 + h * 16..][..16]);
    let mut s = 0i32;
    for j in 0..16 {
        s += i32::from(F::LUT[usize::from(wb[j] & 15)]) * i32::from(ev[j]);
        s += i32::from(F::LUT[usize::from(wb[j] >> 4)]) * i32::from(od[j]);
    }
    s
}

/// The final sum of the 8 accumulators, in the module doc's order.
#[inline(always)]
pub(super) fn finish(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[4] + a[5])) + ((a[2] + a[3]) + (a[6] + a[7]))
}

/// One row's 4-bit dot product with one token's rearranged activations, as the module doc
/// defines it: `wq`/`ws` the row's codes and scales, `xr`/`xd` the token's activations and
/// scales (at least `nb` blocks).
pub(super) fn dot_portable<F: Nib>(wq: &[u8], ws: &[u8], nb: usize, xr: &[i8], xd: &[f32]) -> f32 {
    let mut a = [0.0f32; 8];
    for b in 0..nb {
        let s = block_sum::<F>(&wq[b * 16..][..16], xr, b);
        a[b % 8] += s as f32 * (F::scale(ws, b) * xd[b]);
    }
    finish(a)
}

/// The portable 4-bit micro-kernel.
pub(super) struct Portable4<F>(core::marker::PhantomData<F>);

impl<F: Nib> Micro for Portable4<F> {
    unsafe fn tile<const MR: usize, const NR: usize>(
        w: &QWeights<'_>,
        r: usize,
        x: &QActs,
        tok: usize,
        out: &mut [f32],
        os: usize,
    ) {
        let (nb, ne) = (w.nb, w.nb.next_multiple_of(2));
        for i in 0..MR {
            let wq = &w.q[(r + i) * nb * 16..][..nb * 16];
            let ws = &w.s[(r + i) * nb * F::SB..][..nb * F::SB];
            for j in 0..NR {
                let xr = &x.q[(tok + j) * ne * QK..][..ne * QK];
                out[i + j * os] = dot_portable::<F>(wq, ws, nb, xr, &x.d[(tok + j) * ne..][..nb]);
            }
        }
    }
}

/// Every 4-bit kernel this CPU runs for `dtype` (`Q4_0` or `MXFP4`), best last.
pub(crate) fn candidates(dtype: DType) -> Vec<Kernel> {
    match dtype {
        DType::MXFP4 => kernels::<Mx>(),
        _ => kernels::<Q4>(),
    }
}

fn kernels<F: Nib>() -> Vec<Kernel> {
    // SAFETY: the portable loop needs no CPU feature.
    let mut v = vec![unsafe { Kernel::new("Portable", run::<Portable4<F>, 1, 4, 1>) }];
    super::arch::q4_kernels::<F>(&mut v);
    v
}

/// The best 4-bit kernel for `dtype` on this CPU (detected once per process with `std`).
pub(crate) fn detect(dtype: DType) -> Kernel {
    #[cfg(feature = "std")]
    {
        static BEST: std::sync::OnceLock<[Kernel; 2]> = std::sync::OnceLock::new();
        let best = BEST.get_or_init(|| {
            let last = |d| candidates(d).last().copied().expect("the portable kernel is listed");
            [last(DType::Q4_0), last(DType::MXFP4)]
        });
        if dtype == DType::MXFP4 { best[1] } else { best[0] }
    }
    #[cfg(not(feature = "std"))]
    candidates(dtype).last().copied().expect("the portable kernel is listed")
}

/// The 4-bit planes of a `[rows, cols]` tensor: codes and scales.
pub(crate) fn weights<'a>(dtype: DType, data: &'a [u8], rows: usize, cols: usize) -> QWeights<'a> {
    let p = crate::quant::Planar::of(dtype).expect("a 4-bit dtype");
    let nb = cols.div_ceil(QK);
    let (code, sb) = (p.code as usize, p.scale as usize);
    let soff = (rows * nb * code).div_ceil(64) * 64;
    QWeights { q: &data[..rows * nb * code], s: &data[soff..][..rows * nb * sb], nb, code, sb }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::q8::tests::{BLOCKS, SHAPES, rng};
    use super::*;

    /// Random 4-bit weights (every code) with scales of `dtype`, and random activations.
    pub(in crate::kernels) fn case4(
        r: &mut impl FnMut() -> u64,
        dtype: DType,
        rows: usize,
        nb: usize,
        t: usize,
    ) -> (Vec<u8>, Vec<u8>, QActs) {
        let wq: Vec<u8> = (0..rows * nb * 16).map(|_| r() as u8).collect();
        let ws: Vec<u8> = if dtype == DType::MXFP4 {
            (0..rows * nb).map(|_| 110 + (r() % 30) as u8).collect()
        } else {
            (0..rows * nb).flat_map(|_| f16::from_f32((r() % 1000) as f32 / 1e4 - 0.05).to_le_bytes()).collect()
        };
        let q: Vec<i8> = (0..t * nb * QK).map(|_| ((r() % 255) as i32 - 127) as i8).collect();
        let d: Vec<f32> = (0..t * nb).map(|_| (r() % 1000) as f32 / 1e4).collect();
        (wq, ws, rearrange(&QActs::from_parts(q, d, nb), t))
    }

    #[test]
    fn every_4bit_kernel_equals_the_portable_one_bitwise() {
        let mut r = rng(11);
        for dtype in [DType::Q4_0, DType::MXFP4] {
            let sb = if dtype == DType::MXFP4 { 1 } else { 2 };
            for nb in BLOCKS {
                for (rows, t) in SHAPES {
                    let (wq, ws, x) = case4(&mut r, dtype, rows, nb, t);
                    let w = QWeights { q: &wq, s: &ws, nb, code: 16, sb };
                    let mut want = vec![0.0; rows * t];
                    candidates(dtype)[0].gemm(&w, 0, rows, &x, t, &mut want);
                    for k in candidates(dtype) {
                        let mut got = vec![0.0; rows * t];
                        k.gemm(&w, 0, rows, &x, t, &mut got);
                        assert_eq!(got, want, "{dtype:?} {k:?} nb{nb} {rows}x{t}");
                        // Decoding each token alone gives the same bits as the prompt.
                        for j in 0..t {
                            let xj = QActs {
                                q: x.q[j * nb.next_multiple_of(2) * QK..][..nb.next_multiple_of(2) * QK].to_vec(),
                                d: x.d[j * nb.next_multiple_of(2)..][..nb.next_multiple_of(2)].to_vec(),
                                s: x.s[j * nb.next_multiple_of(2)..][..nb.next_multiple_of(2)].to_vec(),
                                nb,
                            };
                            let mut one = vec![0.0; rows];
                            k.gemm(&w, 0, rows, &xj, 1, &mut one);
                            assert_eq!(one[..], want[j * rows..][..rows], "{dtype:?} {k:?} decode nb{nb} token {j}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_4bit_sum_is_the_dequantized_product() {
        // Against f64 over dequantized weights and activations: only f32 rounding apart.
        let mut r = rng(3);
        for dtype in [DType::Q4_0, DType::MXFP4] {
            let (rows, nb) = (3, 5);
            let cols = nb * QK;
            let w: Vec<f32> = (0..rows * cols).map(|_| (r() % 2001) as f32 / 1000.0 - 1.0).collect();
            let bytes = crate::quant::quantize_as(dtype, &w, rows, cols, None);
            let x: Vec<f32> = (0..cols).map(|_| (r() % 2001) as f32 / 500.0 - 2.0).collect();
            let qa = QActs::new(&x, 1, cols);
            let mut xd = vec![0.0f32; cols];
            for (i, v) in xd.iter_mut().enumerate() {
                *v = f32::from(qa.q[i]) * qa.d[i / QK];
            }
            let qw = weights(dtype, &bytes, rows, cols);
            let mut got = vec![0.0; rows];
            candidates(dtype)[0].gemm(&qw, 0, rows, &rearrange(&qa, 1), 1, &mut got);
            let mut row = vec![0.0f32; cols];
            for (i, g) in got.iter().enumerate() {
                crate::quant::dequantize_row_as(dtype, &bytes, rows, cols, i, &mut row);
                let want: f64 = row.iter().zip(&xd).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let mag: f64 = row.iter().zip(&xd).map(|(&a, &b)| f64::from((a * b).abs())).sum();
                assert!((f64::from(*g) - want).abs() <= 1e-5 * mag, "{dtype:?} row {i}: {g} vs {want}");
            }
        }
    }
}
