//! Q8_0 × Q8_0 products: activations quantized per 32-block to int8, exact int32 block
//! dot products, scaled by the weight's f16 scale times the activation's f32 scale.
//!
//! [`Kernel`] picks the implementation once per matmul: AVX2 (+FMA, F16C) on x86-64, `sdot`
//! (`dotprod`) or plain NEON on aarch64, and the portable scalar loop everywhere. All of them
//! compute the same int32 block sums exactly; they differ only in the order of the f32
//! accumulation inside one tile (the SIMD versions keep lane-wise partial sums), so the
//! results agree to f32 rounding (tested in `tests` below).

use crate::quant::QK;
use alloc::vec;
use alloc::vec::Vec;
use half::f16;

/// Blocks of 32 columns per tile: a row's dot product is summed tile by tile, in order.
/// 32 blocks × [`super::TILE_ROWS`] rows = 16 KiB of int8 weights, reused from L1 across the
/// tokens of a prompt.
pub(crate) const TILE_BLOCKS: usize = 32;

/// Activations `x[T, cols]` quantized per 32-block: `q` is `T × blocks·32` int8 values (zero
/// padded like the weights' rows), `d` the `T × blocks` f32 scales.
pub(crate) struct QActs {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) nb: usize,
}

impl QActs {
    /// Quantizes `t` rows of `cols` values: `d = max|x| / 127`, `q = round(x / d)` (half away
    /// from zero, clamped to ±127), as [`crate::quant::quantize_block`] but with the scale
    /// kept in f32.
    pub(crate) fn new(x: &[f32], t: usize, cols: usize) -> Self {
        let nb = cols.div_ceil(QK);
        let mut q = vec![0i8; t * nb * QK];
        let mut d = vec![0.0f32; t * nb];
        for tok in 0..t {
            let xr = &x[tok * cols..][..cols];
            for b in 0..nb {
                let xb = &xr[b * QK..cols.min((b + 1) * QK)];
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let db = amax / 127.0;
                let id = if db > 0.0 { 1.0 / db } else { 0.0 };
                d[tok * nb + b] = db;
                for (o, &v) in q[(tok * nb + b) * QK..][..xb.len()].iter_mut().zip(xb) {
                    *o = libm::roundf(v * id).clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Self { q, d, nb }
    }
}

/// Which implementation of [`Kernel::dot`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Without std, variants the target does not enable at compile time are never built.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Kernel {
    /// The best implementation this CPU runs (with `std`: detected at run time; without:
    /// what the target enables at compile time).
    pub(crate) fn detect() -> Self {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        #[cfg(all(
            not(feature = "std"),
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        return Self::Avx2;
        #[cfg(all(feature = "std", target_arch = "aarch64"))]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Self::NeonDot;
        }
        #[cfg(all(not(feature = "std"), target_arch = "aarch64", target_feature = "dotprod"))]
        return Self::NeonDot;
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        return Self::Neon;
        #[allow(unreachable_code)]
        Self::Portable
    }

    /// Every implementation this CPU runs (tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut v = vec![Self::Portable];
        let best = Self::detect();
        #[cfg(target_arch = "aarch64")]
        if best == Self::NeonDot {
            v.push(Self::Neon);
        }
        if best != Self::Portable {
            v.push(best);
        }
        v
    }

    /// `Σ_b (dw_b · dx_b) · Σ_i wq[b][i]·xq[b][i]` over `xd.len()` (≤ [`TILE_BLOCKS`]) blocks:
    /// `wq` the weights' int8 values, `ws` their little-endian f16 scales (2 bytes a block),
    /// `xq`, `xd` the quantized activations.
    #[inline]
    pub(crate) fn dot(self, wq: &[u8], ws: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        let nb = xd.len();
        assert!(nb <= TILE_BLOCKS && wq.len() >= nb * QK && xq.len() >= nb * QK && ws.len() >= nb * 2);
        match self {
            Self::Portable => dot_portable(wq, ws, xq, xd),
            // SAFETY: `Avx2` is only constructed by `detect` after checking avx2, fma and f16c
            // (at run time, or at compile time without std); the lengths were asserted above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::dot_avx2(wq, ws, xq, xd) },
            // SAFETY: `Neon` is only constructed when the target enables neon; lengths asserted.
            #[cfg(target_arch = "aarch64")]
            Self::Neon => unsafe { arm::dot_neon(wq, ws, xq, xd) },
            // SAFETY: `NeonDot` is only constructed after detecting `dotprod`; lengths asserted.
            #[cfg(target_arch = "aarch64")]
            Self::NeonDot => unsafe { arm::dot_neon_dotprod(wq, ws, xq, xd) },
        }
    }
}

#[inline]
fn scale(ws: &[u8], b: usize) -> f32 {
    f16::from_le_bytes([ws[2 * b], ws[2 * b + 1]]).to_f32()
}

/// The portable loop: exact i32 per block, then `acc += (dw·dx) · sum` in block order.
fn dot_portable(wq: &[u8], ws: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (b, (w, x)) in wq.chunks_exact(QK).zip(xq.chunks_exact(QK)).take(xd.len()).enumerate() {
        let mut s = 0i32;
        for i in 0..QK {
            s += i32::from(w[i] as i8) * i32::from(x[i]);
        }
        acc += (scale(ws, b) * xd[b]) * s as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
mod x86 {
    use super::{QK, scale};
    use core::arch::x86_64::*;

    /// Eight i32 partial sums of one block: `|w| ·u8 sign(x, w)` with `maddubs`, then pairs
    /// with `madd`. `w` goes through `abs` (so −128 reads as 128 unsigned, exact) and the
    /// activation, within ±127, takes `w`'s sign, so nothing wraps; pair sums ≤ 2·128·127
    /// fit in i16.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn block(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
    }

    /// F16C conversion of `h` into `out` (lengths must match).
    ///
    /// # Safety
    /// The CPU must support f16c and avx.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32_f16c(h: &[half::f16], out: &mut [f32]) {
        assert_eq!(h.len(), out.len());
        let n = h.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n = h.len() = out.len(); unaligned load and store.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().add(i).cast()));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            }
            i += 8;
        }
        for j in i..n {
            out[j] = h[j].to_f32();
        }
    }

    /// AVX2 version of [`super::dot_portable`].
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c; `wq`, `xq` must hold `32·xd.len()` values and
    /// `ws` `2·xd.len()` bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(wq: &[u8], ws: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        let nb = xd.len();
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut d = [0.0f32; 8];
        let mut b = 0;
        while b + 8 <= nb {
            // SAFETY: blocks b..b+8 are in bounds (b + 8 <= nb, lengths per the contract);
            // all loads are unaligned loads.
            unsafe {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(ws.as_ptr().add(2 * b).cast()));
                let dx = _mm256_loadu_ps(xd.as_ptr().add(b));
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_mul_ps(dw, dx));
                for i in (0..8).step_by(2) {
                    let p = (b + i) * QK;
                    let s0 = block(
                        _mm256_loadu_si256(wq.as_ptr().add(p).cast()),
                        _mm256_loadu_si256(xq.as_ptr().add(p).cast()),
                    );
                    let s1 = block(
                        _mm256_loadu_si256(wq.as_ptr().add(p + QK).cast()),
                        _mm256_loadu_si256(xq.as_ptr().add(p + QK).cast()),
                    );
                    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(d[i]), acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(d[i + 1]), acc1);
                }
            }
            b += 8;
        }
        while b < nb {
            let p = b * QK;
            // SAFETY: block b < nb is in bounds.
            unsafe {
                let s =
                    block(_mm256_loadu_si256(wq.as_ptr().add(p).cast()), _mm256_loadu_si256(xq.as_ptr().add(p).cast()));
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale(ws, b) * xd[b]), acc0);
            }
            b += 1;
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }
}

/// `out[i] = h[i]` as f32 (exact), F16C-vectorised when the CPU has it (detected once per
/// call; `half`'s slice conversion pays a call and a detection per 8 values).
pub(crate) fn f16_to_f32(h: &[f16], out: &mut [f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
        // SAFETY: f16c and avx were detected just above.
        unsafe { x86::f16_to_f32_f16c(h, out) };
        return;
    }
    #[cfg(all(not(feature = "std"), target_arch = "x86_64", target_feature = "f16c", target_feature = "avx"))]
    {
        // SAFETY: the target enables f16c and avx at compile time.
        unsafe { x86::f16_to_f32_f16c(h, out) };
        return;
    }
    #[allow(unreachable_code)]
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out);
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{QK, scale};
    use core::arch::aarch64::*;

    /// Plain NEON: widening multiplies, pairwise accumulation to i32.
    ///
    /// # Safety
    /// The CPU must support neon; lengths as for [`super::Kernel::dot`].
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_neon(wq: &[u8], ws: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        let mut acc = vdupq_n_f32(0.0);
        for (b, &dx) in xd.iter().enumerate() {
            let p = b * QK;
            // SAFETY: block b is in bounds (contract); unaligned loads.
            let s = unsafe {
                let w0 = vld1q_s8(wq.as_ptr().add(p).cast());
                let w1 = vld1q_s8(wq.as_ptr().add(p + 16).cast());
                let x0 = vld1q_s8(xq.as_ptr().add(p));
                let x1 = vld1q_s8(xq.as_ptr().add(p + 16));
                let mut s = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
                s = vpadalq_s16(s, vmull_high_s8(w0, x0));
                s = vpadalq_s16(s, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
                vpadalq_s16(s, vmull_high_s8(w1, x1))
            };
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), scale(ws, b) * dx);
        }
        vaddvq_f32(acc)
    }

    /// NEON with `sdot`.
    ///
    /// # Safety
    /// The CPU must support neon and dotprod; lengths as for [`super::Kernel::dot`].
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn dot_neon_dotprod(wq: &[u8], ws: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        let mut acc = vdupq_n_f32(0.0);
        for (b, &dx) in xd.iter().enumerate() {
            let p = b * QK;
            // SAFETY: block b is in bounds (contract); unaligned loads.
            let s = unsafe {
                let w0 = vld1q_s8(wq.as_ptr().add(p).cast());
                let w1 = vld1q_s8(wq.as_ptr().add(p + 16).cast());
                let x0 = vld1q_s8(xq.as_ptr().add(p));
                let x1 = vld1q_s8(xq.as_ptr().add(p + 16));
                // `vdotq_s32` is still unstable (stdarch_neon_dotprod): `sdot` by hand.
                let mut s = vdupq_n_s32(0);
                core::arch::asm!(
                    "sdot {s:v}.4s, {w0:v}.16b, {x0:v}.16b",
                    "sdot {s:v}.4s, {w1:v}.16b, {x1:v}.16b",
                    s = inout(vreg) s,
                    w0 = in(vreg) w0,
                    x0 = in(vreg) x0,
                    w1 = in(vreg) w1,
                    x1 = in(vreg) x1,
                    options(pure, nomem, nostack),
                );
                s
            };
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), scale(ws, b) * dx);
        }
        vaddvq_f32(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn every_kernel_matches_the_portable_one() {
        let mut r = rng(5);
        for nb in [0, 1, 3, 7, 8, 9, 16, 31, 32] {
            for _ in 0..20 {
                // Full int8 range in the weights (−128 included), ±127 in the activations.
                let wq: Vec<u8> = (0..nb * QK).map(|_| r() as u8).collect();
                let xq: Vec<i8> = (0..nb * QK).map(|_| ((r() % 255) as i32 - 127) as i8).collect();
                let ws: Vec<u8> =
                    (0..nb).flat_map(|_| f16::from_f32((r() % 1000) as f32 / 1e5).to_le_bytes()).collect();
                let xd: Vec<f32> = (0..nb).map(|_| (r() % 1000) as f32 / 1e4).collect();
                let want = dot_portable(&wq, &ws, &xq, &xd);
                let mag: f32 = (0..nb).map(|b| (scale(&ws, b) * xd[b]).abs() * 32.0 * 128.0 * 127.0).sum();
                for k in Kernel::available() {
                    let got = k.dot(&wq, &ws, &xq, &xd);
                    assert!((got - want).abs() <= 1e-6 * (mag + 1.0), "{k:?} nb{nb}: {got} vs {want}");
                }
            }
        }
        // Extremes: every product at its largest, exact in every kernel.
        let wq = vec![0x80u8; 8 * QK];
        let xq = vec![-127i8; 8 * QK];
        let ws: Vec<u8> = (0..8).flat_map(|_| f16::from_f32(1.0).to_le_bytes()).collect();
        let xd = vec![1.0f32; 8];
        for k in Kernel::available() {
            assert_eq!(k.dot(&wq, &ws, &xq, &xd), 8.0 * 32.0 * 128.0 * 127.0, "{k:?}");
        }
    }

    #[test]
    fn activation_quantization_round_trips_within_half_a_step() {
        let cols = 70;
        let mut r = rng(9);
        let x: Vec<f32> = (0..2 * cols).map(|_| (r() % 2001) as f32 / 1000.0 - 1.0).collect();
        let a = QActs::new(&x, 2, cols);
        assert_eq!((a.nb, a.q.len(), a.d.len()), (3, 2 * 96, 6));
        for tok in 0..2 {
            for c in 0..96 {
                let b = tok * 3 + c / QK;
                let back = f32::from(a.q[tok * 96 + c]) * a.d[b];
                let want = if c < cols { x[tok * cols + c] } else { 0.0 };
                assert!((back - want).abs() <= a.d[b] * 0.5 + 1e-7, "{tok} {c}");
            }
        }
    }
}
