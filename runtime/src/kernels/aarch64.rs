//! The aarch64 kernels: Q8_0 and 4-bit micro-kernels on NEON, NEON `sdot` (dotprod) and NEON `smmla`
//! (i8mm), and the attention loops on NEON. NEON is part of every aarch64 target this builds
//! for (checked at compile time); with `std` dotprod and i8mm are detected at run time,
//! without it only what the target enables at compile time runs.

use super::heads::HeadJob;
#[cfg(target_feature = "neon")]
use super::heads::{Simd, SimdOps, prefetch_row};
use super::q4::{Nib, finish};
use super::q8::{Kernel, QActs, QWeights, ahead, micro, micro4, prefetch_scales, prefetch_scales_of, run, scale};
use crate::quant::QK;
use alloc::vec::Vec;
use core::arch::aarch64::*;

/// Hints the cache line at `p` into L1 ahead of its use.
#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    // SAFETY: a prefetch is a hint: it never faults, whatever the address, and writes
    // nothing; callers form `p` with wrapping arithmetic and never dereference it.
    unsafe { core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags)) }
}

/// Appends the Q8_0 kernels this CPU runs, best last.
pub(super) fn q8_kernels(v: &mut Vec<Kernel>) {
    #[cfg(feature = "std")]
    let (dot, i8mm) =
        (std::arch::is_aarch64_feature_detected!("dotprod"), std::arch::is_aarch64_feature_detected!("i8mm"));
    #[cfg(not(feature = "std"))]
    let (dot, i8mm) = (cfg!(target_feature = "dotprod"), cfg!(target_feature = "i8mm"));
    if cfg!(target_feature = "neon") {
        // SAFETY: the target enables NEON at compile time.
        v.push(unsafe { Kernel::new("Neon", run::<Neon, 4, 2, 1>) });
    }
    if dot {
        // SAFETY: dotprod was detected just above (and NEON comes with it).
        v.push(unsafe { Kernel::new("NeonDot", run::<NeonDot, 4, 2, 1>) });
    }
    if i8mm {
        // SAFETY: i8mm was detected just above (and NEON comes with it).
        v.push(unsafe { Kernel::new("NeonI8mm", run::<NeonI8mm, 4, 2, 4>) });
    }
}

/// Appends the 4-bit kernels (format `F`) this CPU runs, best last.
pub(super) fn q4_kernels<F: Nib>(v: &mut Vec<Kernel>) {
    #[cfg(feature = "std")]
    let (dot, i8mm) =
        (std::arch::is_aarch64_feature_detected!("dotprod"), std::arch::is_aarch64_feature_detected!("i8mm"));
    #[cfg(not(feature = "std"))]
    let (dot, i8mm) = (cfg!(target_feature = "dotprod"), cfg!(target_feature = "i8mm"));
    if cfg!(target_feature = "neon") {
        // SAFETY: the target enables NEON at compile time.
        v.push(unsafe { Kernel::new("Neon", run::<NeonQ4<F>, 1, 4, 1>) });
    }
    if dot {
        // SAFETY: dotprod was detected just above (and NEON comes with it).
        v.push(unsafe { Kernel::new("NeonDot", run::<NeonDotQ4<F>, 1, 4, 1>) });
    }
    if i8mm {
        // SAFETY: i8mm was detected just above (and NEON comes with it). Tiles of 4 × 2 (16
        // accumulator registers); decoding takes rows in one pair, the token doubled.
        v.push(unsafe { Kernel::new("NeonI8mm", run::<NeonI8mmQ4<F>, 4, 2, 2>) });
    }
}

/// The NEON 4-bit micro-kernel (numerics of `q4.rs`, bit for bit): each block's 16 code
/// bytes split into low nibbles (even values) and high nibbles (odd values), looked up in the
/// format's signed table (`tbl`), an exact block sum against the rearranged activations,
/// then the block's f32 term added to accumulator `b mod 8` as the portable loop does.
macro_rules! tile4_neon {
    ($name:ident, $feat:literal, $block:ident) => {
        /// # Safety
        /// As [`Micro::tile`](super::q8::Micro::tile), with the CPU features enabled here.
        #[target_feature(enable = $feat)]
        #[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
        unsafe fn $name<F: Nib, const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            let nb = w.nb;
            let (row, srow) = (nb * 16, nb * F::SB);
            let ne = nb.next_multiple_of(2);
            let mut acc = [[[0.0f32; 8]; NR]; MR];
            if NR == 1 {
                prefetch_scales_of(w.s.as_ptr().wrapping_add(r * srow), MR, nb, 16, F::SB);
            }
            // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer
            // below addresses a block < nb of a row or < ne of a token; unaligned loads.
            unsafe {
                let lut = vld1q_s8(F::LUT.as_ptr());
                let m4 = vdupq_n_u8(0x0F);
                for b in 0..nb {
                    let (p, h) = (b / 2, b % 2);
                    let xv: [(int8x16_t, int8x16_t); NR] = core::array::from_fn(|j| {
                        let xr = x.q.as_ptr().add((tok + j) * ne * 32 + p * 64 + h * 16);
                        (vld1q_s8(xr), vld1q_s8(xr.add(32)))
                    });
                    for i in 0..MR {
                        let wp = w.q.as_ptr().add((r + i) * row + b * 16);
                        if NR == 1 && b % 4 == 0 {
                            prefetch(wp.wrapping_add(ahead(MR, row)));
                        }
                        let raw = vld1q_u8(wp);
                        let lo = vqtbl1q_s8(lut, vandq_u8(raw, m4));
                        let hi = vqtbl1q_s8(lut, vshrq_n_u8::<4>(raw));
                        let dw = F::scale(core::slice::from_raw_parts(w.s.as_ptr().add((r + i) * srow), srow), b);
                        for j in 0..NR {
                            let s = vaddvq_s32($block((lo, hi), xv[j]));
                            acc[i][j][b % 8] += s as f32 * (dw * x.d[(tok + j) * ne + b]);
                        }
                    }
                }
            }
            for i in 0..MR {
                for j in 0..NR {
                    out[i + j * os] = finish(acc[i][j]);
                }
            }
        }
    };
}
tile4_neon!(tile4_neon, "neon", block_neon);
tile4_neon!(tile4_neon_dot, "neon,dotprod", block_dot);

micro4!(
    /// NEON 4-bit kernel of format `F`.
    NeonQ4 => tile4_neon
);
micro4!(
    /// NEON `sdot` 4-bit kernel of format `F`.
    NeonDotQ4 => tile4_neon_dot
);
micro4!(
    /// NEON `smmla` (i8mm) 4-bit kernel of format `F`.
    NeonI8mmQ4 => tile4_i8mm
);

/// The i8mm 4-bit micro-kernel (numerics of `q4.rs`, bit for bit): rows and tokens in pairs,
/// the last one doubled when odd, as in [`tile_i8mm`]. A block's codes become its even and
/// odd values through the format's table (`tbl`); four `smmla` give the exact block sums of a
/// 2 × 2 tile, and each sum's f32 term goes to accumulator `b mod 8` (multiply, then add: the
/// portable loop's operations, lane by lane).
///
/// # Safety
/// As [`Micro::tile`](super::q8::Micro::tile), with neon and i8mm; `MR ≤ 4`, `NR ≤ 4`.
#[target_feature(enable = "neon,i8mm")]
#[allow(clippy::needless_range_loop)] // [row pair][token pair] indices read best as such
unsafe fn tile4_i8mm<F: Nib, const MR: usize, const NR: usize>(
    w: &QWeights<'_>,
    r: usize,
    x: &QActs,
    tok: usize,
    out: &mut [f32],
    os: usize,
) {
    let nb = w.nb;
    let (row, srow) = (nb * 16, nb * F::SB);
    let ne = nb.next_multiple_of(2);
    let (rp, tp) = (MR.div_ceil(2), NR.div_ceil(2));
    // Row / token of pair `p`, half `h` (the last doubled when odd).
    let ri = |p: usize, h: usize| (2 * p + h).min(MR - 1);
    let tj = |q: usize, h: usize| (2 * q + h).min(NR - 1);
    let ws: [&[u8]; MR] = core::array::from_fn(|i| &w.s[(r + i) * srow..][..srow]);
    let xd: [&[f32]; NR] = core::array::from_fn(|j| &x.d[(tok + j) * ne..][..nb]);
    let mut acc = [[[vdupq_n_f32(0.0); 8]; 2]; 2];
    if NR == 1 {
        prefetch_scales_of(w.s.as_ptr().wrapping_add(r * srow), MR, nb, 16, F::SB);
    }
    // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer below
    // addresses a block < nb of a row or < ne of a token; unaligned loads.
    unsafe {
        let lut = vld1q_s8(F::LUT.as_ptr());
        let m4 = vdupq_n_u8(0x0F);
        let even = |raw: uint8x16_t| vqtbl1q_s8(lut, vandq_u8(raw, m4));
        let odd = |raw: uint8x16_t| vqtbl1q_s8(lut, vshrq_n_u8::<4>(raw));
        for b in 0..nb {
            let (p, h) = (b / 2, b % 2);
            let xv: [[int8x16_t; 4]; 2] = core::array::from_fn(|q| {
                if q < tp {
                    let xr = |j: usize| x.q.as_ptr().add((tok + j) * ne * 32 + p * 64 + h * 16);
                    let (x0, x1) = (xr(tj(q, 0)), xr(tj(q, 1)));
                    let (e0, e1) = zip64(vld1q_s8(x0), vld1q_s8(x1));
                    let (o0, o1) = zip64(vld1q_s8(x0.add(32)), vld1q_s8(x1.add(32)));
                    [e0, e1, o0, o1]
                } else {
                    [vdupq_n_s8(0); 4]
                }
            });
            for pr in 0..rp {
                let (i0, i1) = (ri(pr, 0), ri(pr, 1));
                let wp = |i: usize| w.q.as_ptr().add((r + i) * row + b * 16);
                if NR == 1 && b % 4 == 0 {
                    prefetch(wp(i0).wrapping_add(ahead(MR, row)));
                    prefetch(wp(i1).wrapping_add(ahead(MR, row)));
                }
                let (raw0, raw1) = (vld1q_u8(wp(i0)), vld1q_u8(wp(i1)));
                let (e0, e1) = zip64(even(raw0), even(raw1));
                let (o0, o1) = zip64(odd(raw0), odd(raw1));
                let (dw0, dw1) = (F::scale(ws[i0], b), F::scale(ws[i1], b));
                for q in 0..tp {
                    let mut s = mmla(vdupq_n_s32(0), e0, xv[q][0]);
                    s = mmla(s, e1, xv[q][1]);
                    s = mmla(s, o0, xv[q][2]);
                    s = mmla(s, o1, xv[q][3]);
                    let (dx0, dx1) = (xd[tj(q, 0)][b], xd[tj(q, 1)][b]);
                    let sc = [dw0 * dx0, dw0 * dx1, dw1 * dx0, dw1 * dx1];
                    let a = &mut acc[pr][q][b % 8];
                    *a = vaddq_f32(*a, vmulq_f32(vcvtq_f32_s32(s), vld1q_f32(sc.as_ptr())));
                }
            }
        }
    }
    for pr in 0..rp {
        for q in 0..tp {
            let mut v = [[0.0f32; 4]; 8];
            for (k, vk) in v.iter_mut().enumerate() {
                // SAFETY: `vk` holds 4 f32.
                unsafe { vst1q_f32(vk.as_mut_ptr(), acc[pr][q][k]) };
            }
            for l in 0..4 {
                // Doubled rows/tokens write the same value to the same place twice.
                out[ri(pr, l / 2) + tj(q, l % 2) * os] = finish(core::array::from_fn(|k| v[k][l]));
            }
        }
    }
}

/// No build of the activations' quantization of its own here (the portable one runs): `None`.
pub(super) fn quantize(_x: &[f32], _t: usize, _cols: usize) -> Option<QActs> {
    None
}

/// No f16 conversion of its own here (`half`'s runs): `false`.
pub(super) fn f16_to_f32(_h: &[half::f16], _out: &mut [f32]) -> bool {
    false
}

/// Runs `job` with the NEON attention loops: `true` (`false`, nothing run, without NEON).
pub(super) fn run_heads<J: HeadJob>(job: &J, h0: usize, o: &mut [f32]) -> bool {
    // SAFETY: NEON is part of every aarch64 target this builds for (checked at compile time
    // by the `cfg`).
    #[cfg(target_feature = "neon")]
    unsafe {
        job.run_with::<Simd<HeadsNeon>>(h0, o);
        return true;
    }
    #[allow(unreachable_code)]
    {
        let _ = (job, h0, o);
        false
    }
}

/// Four i32 lane sums of one block with plain NEON: widening multiplies, pairwise
/// accumulation.
#[inline]
#[target_feature(enable = "neon")]
fn block_neon(w: (int8x16_t, int8x16_t), x: (int8x16_t, int8x16_t)) -> int32x4_t {
    let mut s = vpaddlq_s16(vmull_s8(vget_low_s8(w.0), vget_low_s8(x.0)));
    s = vpadalq_s16(s, vmull_high_s8(w.0, x.0));
    s = vpadalq_s16(s, vmull_s8(vget_low_s8(w.1), vget_low_s8(x.1)));
    vpadalq_s16(s, vmull_high_s8(w.1, x.1))
}

/// The same with `sdot` (different lanes, exact block sum).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn block_dot(w: (int8x16_t, int8x16_t), x: (int8x16_t, int8x16_t)) -> int32x4_t {
    let mut s = vdupq_n_s32(0);
    // SAFETY: pure register arithmetic; the CPU has dotprod (target feature).
    // `vdotq_s32` is still unstable (stdarch_neon_dotprod): `sdot` by hand.
    unsafe {
        core::arch::asm!(
            "sdot {s:v}.4s, {w0:v}.16b, {x0:v}.16b",
            "sdot {s:v}.4s, {w1:v}.16b, {x1:v}.16b",
            s = inout(vreg) s,
            w0 = in(vreg) w.0,
            x0 = in(vreg) x.0,
            w1 = in(vreg) w.1,
            x1 = in(vreg) x.1,
            options(pure, nomem, nostack),
        );
    }
    s
}

/// The NEON micro-kernel: per output one 4-lane f32 accumulator over every block of the
/// row, `acc += f32(lanes_b) · (dw_b·dx_b)`, summed once at the end.
macro_rules! tile_neon {
    ($name:ident, $feat:literal, $block:ident) => {
        /// # Safety
        /// As [`Micro::tile`](super::q8::Micro::tile), with the CPU features enabled here.
        #[target_feature(enable = $feat)]
        #[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
        unsafe fn $name<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            let nb = w.nb;
            let row = nb * QK;
            let mut acc = [[vdupq_n_f32(0.0); NR]; MR];
            let ws: [&[u8]; MR] = core::array::from_fn(|i| &w.s[(r + i) * nb * 2..][..nb * 2]);
            if NR == 1 {
                prefetch_scales(w.s.as_ptr().wrapping_add(r * nb * 2), MR, nb);
            }
            let xd: [&[f32]; NR] = core::array::from_fn(|j| &x.d[(tok + j) * nb..][..nb]);
            for b in 0..nb {
                let dw: [f32; MR] = core::array::from_fn(|i| scale(ws[i], b));
                // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller); block
                // b < nb of each; unaligned loads.
                unsafe {
                    let off = b * QK;
                    let xv: [(int8x16_t, int8x16_t); NR] = core::array::from_fn(|j| {
                        let p = x.q.as_ptr().add((tok + j) * row + off);
                        (vld1q_s8(p), vld1q_s8(p.add(16)))
                    });
                    for i in 0..MR {
                        if NR == 1 && b % 2 == 0 {
                            prefetch(w.q.as_ptr().wrapping_add((r + i) * row + off + ahead(MR, row)));
                        }
                        let p = w.q.as_ptr().add((r + i) * row + off).cast::<i8>();
                        let wv = (vld1q_s8(p), vld1q_s8(p.add(16)));
                        for j in 0..NR {
                            let s = $block(wv, xv[j]);
                            acc[i][j] = vfmaq_n_f32(acc[i][j], vcvtq_f32_s32(s), dw[i] * xd[j][b]);
                        }
                    }
                }
            }
            for i in 0..MR {
                for j in 0..NR {
                    out[i + j * os] = vaddvq_f32(acc[i][j]);
                }
            }
        }
    };
}
tile_neon!(tile_neon, "neon", block_neon);
tile_neon!(tile_neon_dot, "neon,dotprod", block_dot);

/// `smmla`: `acc[2i + j] += Σ_k a[8i + k] · b[8j + k]`, a 2 × 2 block of i32 dot products of
/// two 8-byte rows of `a` with two of `b`.
#[inline]
#[target_feature(enable = "neon,i8mm")]
fn mmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: pure register arithmetic; the CPU has i8mm (target feature).
    // `vmmlaq_s32` is still unstable (stdarch_neon_i8mm): `smmla` by hand.
    unsafe {
        core::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack),
        );
    }
    acc
}

/// One 32-byte block of two rows as `smmla` operands: `[p0[8k..8k+8], p1[8k..8k+8]]`, k < 4.
///
/// # Safety
/// `p0` and `p1` valid for 32 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn two_rows(p0: *const i8, p1: *const i8) -> [int8x16_t; 4] {
    // SAFETY: per the contract.
    let (a0, a1, b0, b1) = unsafe { (vld1q_s8(p0), vld1q_s8(p0.add(16)), vld1q_s8(p1), vld1q_s8(p1.add(16))) };
    let ((k0, k1), (k2, k3)) = (zip64(a0, b0), zip64(a1, b1));
    [k0, k1, k2, k3]
}

/// Two 16-byte vectors as `smmla` operands: `([a[..8], b[..8]], [a[8..], b[8..]])`.
#[inline]
#[target_feature(enable = "neon")]
fn zip64(a: int8x16_t, b: int8x16_t) -> (int8x16_t, int8x16_t) {
    let (a, b) = (vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b));
    (vreinterpretq_s8_s64(vzip1q_s64(a, b)), vreinterpretq_s8_s64(vzip2q_s64(a, b)))
}

/// The i8mm micro-kernel: rows and tokens in pairs (the last one doubled when odd), each
/// block's exact i32 sums from four `smmla`, one f32 lane per output:
/// `acc = fma(f32(sum_b), dw_b·dx_b, acc)` block by block. Every output is computed by the
/// same operations in whatever tile shape, so results do not depend on tiling (decoding
/// doubles the token: memory-bound, the extra arithmetic is free).
///
/// # Safety
/// As [`Micro::tile`](super::q8::Micro::tile), with neon and i8mm; `MR ≤ 4`, `NR ≤ 4`.
#[target_feature(enable = "neon,i8mm")]
#[allow(clippy::needless_range_loop)] // [row pair][token pair] indices read best as such
unsafe fn tile_i8mm<const MR: usize, const NR: usize>(
    w: &QWeights<'_>,
    r: usize,
    x: &QActs,
    tok: usize,
    out: &mut [f32],
    os: usize,
) {
    let nb = w.nb;
    let row = nb * QK;
    let (rp, tp) = (MR.div_ceil(2), NR.div_ceil(2));
    // Row / token of pair `p`, half `h` (the last doubled when odd).
    let ri = |p: usize, h: usize| (2 * p + h).min(MR - 1);
    let tj = |q: usize, h: usize| (2 * q + h).min(NR - 1);
    let ws: [&[u8]; MR] = core::array::from_fn(|i| &w.s[(r + i) * nb * 2..][..nb * 2]);
    let xd: [&[f32]; NR] = core::array::from_fn(|j| &x.d[(tok + j) * nb..][..nb]);
    let mut acc = [[vdupq_n_f32(0.0); 2]; 2];
    if NR == 1 {
        prefetch_scales(w.s.as_ptr().wrapping_add(r * nb * 2), MR, nb);
    }
    for b in 0..nb {
        let off = b * QK;
        // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller); block b < nb of
        // each; unaligned loads.
        unsafe {
            let xp = |j: usize| x.q.as_ptr().add((tok + j) * row + off);
            let xv: [[int8x16_t; 4]; 2] =
                core::array::from_fn(
                    |q| {
                        if q < tp { two_rows(xp(tj(q, 0)), xp(tj(q, 1))) } else { [vdupq_n_s8(0); 4] }
                    },
                );
            for p in 0..rp {
                let (i0, i1) = (ri(p, 0), ri(p, 1));
                if NR == 1 {
                    prefetch(w.q.as_ptr().wrapping_add((r + i0) * row + off + ahead(MR, row)));
                    prefetch(w.q.as_ptr().wrapping_add((r + i1) * row + off + ahead(MR, row)));
                }
                let wp = |i: usize| w.q.as_ptr().add((r + i) * row + off).cast::<i8>();
                let wv = two_rows(wp(i0), wp(i1));
                let (dw0, dw1) = (scale(ws[i0], b), scale(ws[i1], b));
                for q in 0..tp {
                    let mut s = vdupq_n_s32(0);
                    for k in 0..4 {
                        s = mmla(s, wv[k], xv[q][k]);
                    }
                    let (dx0, dx1) = (xd[tj(q, 0)][b], xd[tj(q, 1)][b]);
                    let sc = [dw0 * dx0, dw0 * dx1, dw1 * dx0, dw1 * dx1];
                    acc[p][q] = vfmaq_f32(acc[p][q], vcvtq_f32_s32(s), vld1q_f32(sc.as_ptr()));
                }
            }
        }
    }
    for p in 0..rp {
        for q in 0..tp {
            let mut v = [0.0f32; 4];
            // SAFETY: `v` holds 4 f32.
            unsafe { vst1q_f32(v.as_mut_ptr(), acc[p][q]) };
            for (l, &val) in v.iter().enumerate() {
                // Doubled rows/tokens write the same value to the same place twice.
                out[ri(p, l / 2) + tj(q, l % 2) * os] = val;
            }
        }
    }
}

micro!(
    /// Plain NEON.
    Neon => tile_neon
);
micro!(
    /// NEON with `sdot`.
    NeonDot => tile_neon_dot
);
micro!(
    /// NEON with `smmla` (i8mm; such CPUs also have `sdot`). [`tile_i8mm`] takes tiles of at
    /// most 4 × 4: [`q8_kernels`] runs 4 × 2.
    NeonI8mm => tile_i8mm
);

/// The attention loops' vector pieces in 128-bit NEON, two registers per 8-lane partial
/// sum.
#[cfg(target_feature = "neon")]
struct HeadsNeon;

#[cfg(target_feature = "neon")]
impl SimdOps for HeadsNeon {
    #[inline(always)]
    unsafe fn dot4(q: *const f32, k: [*const f32; 4], n: usize) -> [f32; 4] {
        let full = n / 8 * 8;
        let mut out = [0.0f32; 4];
        // SAFETY: every load is below `full ≤ n` or `n` (contract).
        unsafe {
            let z = vdupq_n_f32(0.0);
            let (mut lo, mut hi) = ([z; 4], [z; 4]);
            let mut c = 0;
            while c < full {
                let (q0, q1) = (vld1q_f32(q.add(c)), vld1q_f32(q.add(c + 4)));
                for p in 0..4 {
                    lo[p] = vaddq_f32(lo[p], vmulq_f32(q0, vld1q_f32(k[p].add(c))));
                    hi[p] = vaddq_f32(hi[p], vmulq_f32(q1, vld1q_f32(k[p].add(c + 4))));
                }
                c += 8;
            }
            for p in 0..4 {
                let mut tail = 0.0f32;
                for i in full..n {
                    tail += *q.add(i) * *k[p].add(i);
                }
                let s = vaddq_f32(lo[p], hi[p]);
                let u = vpaddq_f32(s, s);
                out[p] = (vgetq_lane_f32::<0>(u) + vgetq_lane_f32::<1>(u)) + tail;
            }
        }
        out
    }

    #[inline(always)]
    unsafe fn slice16<const H: usize>(
        s: *const f32,
        span: usize,
        r: *const f32,
        stride: usize,
        o: *mut f32,
        ostride: usize,
        j0: usize,
        j1: usize,
        pf: Option<usize>,
    ) {
        // SAFETY: every address is valid (contract).
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); 4]; H];
            for (h, a) in acc.iter_mut().enumerate() {
                let at = o.add(h * ostride);
                *a = core::array::from_fn(|i| vld1q_f32(at.add(4 * i)));
            }
            for jj in j0..j1 {
                if let Some(hd) = pf {
                    prefetch_row::<HeadsNeon>(r.wrapping_add((jj + 4) * stride), hd);
                }
                let v = r.add(jj * stride);
                let vv: [float32x4_t; 4] = core::array::from_fn(|i| vld1q_f32(v.add(4 * i)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let p = vdupq_n_f32(*s.add(h * span + jj));
                    for i in 0..4 {
                        a[i] = vaddq_f32(a[i], vmulq_f32(p, vv[i]));
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let at = o.add(h * ostride);
                for (i, &x) in a.iter().enumerate() {
                    vst1q_f32(at.add(4 * i), x);
                }
            }
        }
    }

    #[inline(always)]
    fn prefetch(p: *const f32) {
        self::prefetch(p.cast())
    }
}
