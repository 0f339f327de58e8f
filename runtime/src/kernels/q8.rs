//! Q8_0 × Q8_0 products: activations quantized per 32-block to int8, exact int32 block
//! dot products, scaled by the weight's f16 scale times the activation's f32 scale.
//!
//! [`Kernel::gemm`] computes a block of outputs `rows × tokens` with a register-blocked
//! micro-kernel: `MR` weight rows × `NR` tokens at a time, every loaded weight block used
//! against `NR` tokens and every activation block against `MR` rows, each output kept in a
//! vector of f32 lane sums across the whole row and reduced once at the end. Decode (one
//! token) is the same micro-kernel with `NR = 1`, one row at a time (address order).
//! AVX-512 VNNI prompts instead repack 16 weight rows at a time into a small buffer so that
//! one register holds 4 bytes of each of 16 rows (`x86::gemm_packed`): the file's layout is
//! read in place everywhere else.
//!
//! [`Kernel`] picks the implementation once per matmul: on x86-64 AVX-512 VNNI (`vpdpbusd`
//! on 512 bits), AVX-VNNI (`vpdpbusd` on 256 bits) or AVX2
//! (`maddubs`/`madd`), all with F16C for the scales; `sdot` (`dotprod`) or plain NEON on
//! aarch64; the portable scalar loop everywhere. All of them compute the same int32 block
//! sums exactly; they differ only in the order of the f32 accumulation (lane-wise partial
//! sums), so they agree to f32 rounding (tested below). For one implementation the
//! sequence of f32 operations that produces an output depends only on the row and the
//! token's activations — never on `MR`/`NR`, the number of tokens or the row split — so a
//! prompt and token-by-token decoding give bitwise identical results.

use crate::quant::QK;
use alloc::vec;
use alloc::vec::Vec;
use half::f16;

/// Activations `x[T, cols]` quantized per 32-block: `q` is `T × blocks·32` int8 values (zero
/// padded like the weights' rows), `d` the `T × blocks` f32 scales, `s` the `T × blocks` sums
/// of each block's int8 values (what the unsigned×signed `vpdpbusd` kernels subtract, ×128).
pub(crate) struct QActs {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<i32>,
    pub(crate) nb: usize,
}

impl QActs {
    /// Quantizes `t` rows of `cols` values: `d = max|x| / 127`, `q = round(x / d)` (half away
    /// from zero, clamped to ±127), as [`crate::quant::quantize_block`] but with the scale
    /// kept in f32.
    pub(crate) fn new(x: &[f32], t: usize, cols: usize) -> Self {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked on the line above).
            return unsafe { Self::new_avx2(x, t, cols) };
        }
        Self::new_any(x, t, cols)
    }

    /// The same code with 256-bit vectors (every operation is exact per element, so the
    /// values are the same bits): quantizing runs on the calling thread between parallel
    /// passes, while the workers wait.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2")]
    unsafe fn new_avx2(x: &[f32], t: usize, cols: usize) -> Self {
        Self::new_any(x, t, cols)
    }

    #[inline(always)]
    fn new_any(x: &[f32], t: usize, cols: usize) -> Self {
        let nb = cols.div_ceil(QK);
        let mut q = vec![0i8; t * nb * QK];
        let mut d = vec![0.0f32; t * nb];
        for tok in 0..t {
            let xr = &x[tok * cols..][..cols];
            for (b, (qb, db)) in
                q[tok * nb * QK..][..nb * QK].chunks_exact_mut(QK).zip(&mut d[tok * nb..][..nb]).enumerate()
            {
                // A whole block of fixed length (the last one zero padded), so the loops vectorise.
                let mut xb = [0.0f32; QK];
                let src = &xr[b * QK..cols.min((b + 1) * QK)];
                xb[..src.len()].copy_from_slice(src);
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                *db = amax / 127.0;
                let id = if *db > 0.0 { 1.0 / *db } else { 0.0 };
                for (o, &v) in qb.iter_mut().zip(&xb) {
                    *o = round_i8(v * id);
                }
            }
        }
        Self::from_parts(q, d, nb)
    }

    /// Activations already quantized: `q` (`T × nb·32`) and `d` (`T × nb`); sums the blocks.
    pub(crate) fn from_parts(q: Vec<i8>, d: Vec<f32>, nb: usize) -> Self {
        let s = q.chunks_exact(QK).map(|b| b.iter().map(|&v| i32::from(v)).sum()).collect();
        Self { q, d, s, nb }
    }
}

/// `round(y)` (half away from zero, as `libm::roundf`) clamped to ±127; NaN gives 0.
/// Branch-free so that it vectorises: `y - trunc(y)` is exact for |y| < 2²³, and larger
/// values clamp anyway.
#[inline]
fn round_i8(y: f32) -> i8 {
    let y = if y.is_nan() { 0.0 } else { y.clamp(-128.0, 128.0) };
    // SAFETY: `y` is finite and within ±128, so truncating it fits an i32. (The checked
    // `as` cast handles NaN and overflow one value at a time, which stops vectorisation.)
    let t: i32 = unsafe { y.to_int_unchecked() };
    let f = y - t as f32;
    (t + i32::from(f >= 0.5) - i32::from(f <= -0.5)).clamp(-127, 127) as i8
}

/// Q8_0 weights in the file's planar layout: `q` holds rows of `nb·32` int8 values, `s`
/// rows of `nb` little-endian f16 scales.
pub(crate) struct QWeights<'a> {
    pub(crate) q: &'a [u8],
    pub(crate) s: &'a [u8],
    pub(crate) nb: usize,
}

/// Which implementation of [`Kernel::gemm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Without std, variants the target does not enable at compile time are never built.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg(target_arch = "aarch64")]
    NeonDot,
    #[cfg(target_arch = "aarch64")]
    NeonI8mm,
}

impl Kernel {
    /// The best implementation this CPU runs (with `std`: detected at run time; without:
    /// what the target enables at compile time).
    pub(crate) fn detect() -> Self {
        // Once per process: every matrix product asks, ~65 times per decoded token.
        #[cfg(feature = "std")]
        {
            static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
            *BEST.get_or_init(|| Self::candidates().last().copied().unwrap_or(Self::Portable))
        }
        #[cfg(not(feature = "std"))]
        Self::candidates().last().copied().unwrap_or(Self::Portable)
    }

    /// Every implementation this CPU runs, best last.
    pub(crate) fn candidates() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut v = vec![Self::Portable];
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                v.push(Self::Avx2);
                if has!("avxvnni") {
                    v.push(Self::AvxVnni);
                }
                if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    v.push(Self::Avx512Vnni);
                }
            }
        }
        #[cfg(all(
            not(feature = "std"),
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        {
            v.push(Self::Avx2);
            #[cfg(target_feature = "avxvnni")]
            v.push(Self::AvxVnni);
            #[cfg(all(target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni"))]
            v.push(Self::Avx512Vnni);
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        v.push(Self::Neon);
        #[cfg(all(feature = "std", target_arch = "aarch64"))]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(Self::NeonDot);
        }
        #[cfg(all(not(feature = "std"), target_arch = "aarch64", target_feature = "dotprod"))]
        v.push(Self::NeonDot);
        #[cfg(all(feature = "std", target_arch = "aarch64"))]
        if std::arch::is_aarch64_feature_detected!("i8mm") {
            v.push(Self::NeonI8mm);
        }
        #[cfg(all(not(feature = "std"), target_arch = "aarch64", target_feature = "i8mm"))]
        v.push(Self::NeonI8mm);
        v
    }

    /// Every implementation this CPU runs (tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        Self::candidates()
    }

    /// `out[j·nr + i] = Σ_b (dw[r0+i][b] · dx[j][b]) · Σ_k wq[r0+i][b][k]·xq[j][b][k]` for rows
    /// `r0..r0 + nr` of `w` and all `t` tokens of `x` (token-major, like the matmul output).
    ///
    /// # Panics
    /// If the shapes do not fit (caller bug): `x.nb != w.nb`, fewer than `r0 + nr` rows in
    /// `w`, fewer than `t` tokens in `x`, or `out` shorter than `nr · t`.
    pub(crate) fn gemm(self, w: &QWeights<'_>, r0: usize, nr: usize, x: &QActs, t: usize, out: &mut [f32]) {
        let nb = w.nb;
        assert!(
            x.nb == nb
                && w.q.len() >= (r0 + nr) * nb * QK
                && w.s.len() >= (r0 + nr) * nb * 2
                && x.q.len() >= t * nb * QK
                && x.d.len() >= t * nb
                && out.len() >= nr * t,
            "Kernel::gemm: shapes do not match"
        );
        if nr == 0 || t == 0 {
            return;
        }
        let out = &mut out[..nr * t];
        match self {
            // SAFETY (every arm): a SIMD variant is only in `candidates` after its CPU
            // features were detected (at run time, or at compile time without std), the
            // portable one needs none; `run` only reads rows `r0..r0 + nr` and tokens `..t`,
            // in bounds per the assertion above, and `out` is `nr × t`.
            Self::Portable => unsafe { run::<Portable, 1, 1, 1>(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { run::<x86::Avx2, 4, 2, 1>(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni => unsafe { run::<x86::AvxVnni, 4, 2, 1>(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni if t == 1 => unsafe { run::<x86::Avx512Vnni, 1, 1, 1>(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => unsafe { x86::gemm_packed(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "aarch64")]
            Self::Neon => unsafe { run::<arm::Neon, 4, 2, 1>(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "aarch64")]
            Self::NeonDot => unsafe { run::<arm::NeonDot, 4, 2, 1>(w, r0, nr, x, t, out) },
            #[cfg(target_arch = "aarch64")]
            Self::NeonI8mm => unsafe { run::<arm::NeonI8mm, 4, 2, 4>(w, r0, nr, x, t, out) },
        }
    }
}

/// Asks for the cache line at `p` ahead of its use (a no-op where there is no instruction).
/// Decoding streams each weight byte once: hinting the bytes [`PREFETCH_AHEAD`] ahead while
/// this tile computes keeps the memory pipeline full across rows (2-thread GEMV over 500 MB of
/// expert matrices: 27–31 → 35–37 GB/s, against 37 GB/s streaming read).
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY (both): a prefetch is a hint: it never faults, whatever the address, and writes
    // nothing; callers form `p` with wrapping arithmetic and never dereference it.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// How far ahead of the rows it is reading a decode tile prefetches weights: at least this
/// many bytes, and at least one tile. 4 KiB keeps ~64 cache lines in flight per thread.
const PREFETCH_AHEAD: usize = 4096;

/// The prefetch distance in weight bytes for tiles of `mr` rows of `row` bytes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn ahead(mr: usize, row: usize) -> usize {
    (mr * row).max(PREFETCH_AHEAD)
}

/// Prefetches the scales of `mr` rows as far ahead of the tile whose scales start at `ws` as
/// [`ahead`] is for its weights (each row's `2·nb` bytes lie in a separate plane, 1/16 of the
/// weight bytes, so the weight prefetch does not bring them).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn prefetch_scales(ws: *const u8, mr: usize, nb: usize) {
    let at = ws.wrapping_add(ahead(mr, nb * QK) / QK * 2);
    for i in 0..mr {
        prefetch(at.wrapping_add(i * nb * 2));
        prefetch(at.wrapping_add((i + 1) * nb * 2 - 1));
    }
}

/// Prefetches every cache line of `p[..len]`.
#[inline]
fn prefetch_range(p: *const u8, len: usize) {
    for off in (0..len).step_by(64) {
        prefetch(p.wrapping_add(off));
    }
    prefetch(p.wrapping_add(len.saturating_sub(1)));
}

/// A register-blocked micro-kernel.
trait Micro {
    /// Writes `out[i + j·os]` for the `MR × NR` outputs of rows `r..r + MR` of `w` and tokens
    /// `tok..tok + NR` of `x`.
    ///
    /// # Safety
    /// The CPU supports the implementation's features; rows `r..r + MR` and tokens
    /// `tok..tok + NR` exist (`w.q`, `w.s`, `x.q`, `x.d` long enough for them, `x.nb == w.nb`).
    unsafe fn tile<const MR: usize, const NR: usize>(
        w: &QWeights<'_>,
        r: usize,
        x: &QActs,
        tok: usize,
        out: &mut [f32],
        os: usize,
    );
}

/// Activations kept in L2 while the weight rows of a pass stream past them.
const ACTS_L2_BYTES: usize = 256 << 10;

/// Drives `K`'s micro-kernel over rows `r0..r0 + nr` and tokens `0..t`: `MR × NR` tiles, then
/// `1 × NR` for the last rows and `· × 1` for the last tokens. `out` is `t × nr`.
///
/// Decoding (`t == 1`) takes `DR` rows per tile instead. With `DR = 1` the weights are read in
/// address order: a 4-row tile reads its rows 64 bytes at a time, four streams one row apart,
/// and on some machines the hardware prefetcher does not follow that. Measured on a 2-core
/// Zen 4 VM, GEMV over 400 MB of expert matrices, AVX-512 VNNI: 4-row tiles 7.5 (1 thread) and
/// 14 GB/s (2), one row at a time 17–18 and 22–25 GB/s, the streaming-read probe 24 and 29–31
/// GB/s. A row's result does not depend on the tile (every `(row, token)` sums alone).
///
/// # Safety
/// As [`Micro::tile`] for every row `r0..r0 + nr` and token `0..t`; `out.len() == t · nr`.
unsafe fn run<K: Micro, const MR: usize, const NR: usize, const DR: usize>(
    w: &QWeights<'_>,
    r0: usize,
    nr: usize,
    x: &QActs,
    t: usize,
    out: &mut [f32],
) {
    if t == 1 {
        // The kernel hints the bytes ahead of its rows as it goes; the first ones are hinted here.
        let row = w.nb * QK;
        let first = (nr * row).min(PREFETCH_AHEAD.max(DR * row));
        prefetch_range(w.q.as_ptr().wrapping_add(r0 * row), first);
        prefetch_range(w.s.as_ptr().wrapping_add(r0 * w.nb * 2), first / QK * 2);
        let mut r = 0;
        while r < nr {
            let m = if r + DR <= nr { DR } else { 1 };
            // SAFETY: rows r0 + r..r0 + r + m ≤ r0 + nr and token 0 exist (caller); `tile`
            // writes out[r + i], i < m.
            unsafe {
                if m == DR {
                    K::tile::<DR, 1>(w, r0 + r, x, 0, &mut out[r..], nr);
                } else {
                    K::tile::<1, 1>(w, r0 + r, x, 0, &mut out[r..], nr);
                }
            }
            r += m;
        }
        return;
    }
    // Tokens per pass, so that one pass's activations stay in L2 (a multiple of NR).
    let pass = (ACTS_L2_BYTES / (w.nb * QK).max(1)).max(NR) / NR * NR;
    for t0 in (0..t).step_by(pass) {
        let t1 = (t0 + pass).min(t);
        let mut r = 0;
        while r < nr {
            let m = if r + MR <= nr { MR } else { 1 };
            let mut tok = t0;
            while tok < t1 {
                let n = if tok + NR <= t1 { NR } else { 1 };
                let o = &mut out[tok * nr + r..];
                // SAFETY: rows r0 + r.. r0 + r + m ≤ r0 + nr and tokens tok..tok + n ≤ t exist
                // (caller); `tile` writes o[i + j·nr], i < m, j < n: within `out` (t × nr).
                unsafe {
                    match (m == MR, n == NR) {
                        (true, true) => K::tile::<MR, NR>(w, r0 + r, x, tok, o, nr),
                        (true, false) => K::tile::<MR, 1>(w, r0 + r, x, tok, o, nr),
                        (false, true) => K::tile::<1, NR>(w, r0 + r, x, tok, o, nr),
                        (false, false) => K::tile::<1, 1>(w, r0 + r, x, tok, o, nr),
                    }
                }
                tok += n;
            }
            r += m;
        }
    }
}

#[inline]
fn scale(ws: &[u8], b: usize) -> f32 {
    f16::from_le_bytes([ws[2 * b], ws[2 * b + 1]]).to_f32()
}

/// The portable loop: exact i32 per block, then `acc += (dw·dx) · sum` in block order.
struct Portable;

impl Micro for Portable {
    unsafe fn tile<const MR: usize, const NR: usize>(
        w: &QWeights<'_>,
        r: usize,
        x: &QActs,
        tok: usize,
        out: &mut [f32],
        os: usize,
    ) {
        let nb = w.nb;
        for i in 0..MR {
            let wq = &w.q[(r + i) * nb * QK..][..nb * QK];
            let ws = &w.s[(r + i) * nb * 2..][..nb * 2];
            for j in 0..NR {
                let xq = &x.q[(tok + j) * nb * QK..][..nb * QK];
                let xd = &x.d[(tok + j) * nb..][..nb];
                out[i + j * os] = dot_portable(wq, ws, xq, xd);
            }
        }
    }
}

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
    use super::{Micro, QActs, QK, QWeights, ahead, prefetch, prefetch_range, prefetch_scales};
    use core::arch::x86_64::*;

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

    /// `g ≤ 8` f16 scales at `p` as f32, zero beyond `g`.
    ///
    /// # Safety
    /// f16c and avx; `p` valid for `2·g` bytes.
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn scales8(p: *const u8, g: usize) -> __m256 {
        let mut buf = [0u8; 16];
        // SAFETY: `p` holds 2·g bytes (caller), `buf` 16 ≥ 2·g.
        unsafe {
            if g == 8 {
                return _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            }
            core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), 2 * g);
            _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr().cast()))
        }
    }

    /// `g ≤ 8` f32 values at `p`, zero beyond `g`.
    ///
    /// # Safety
    /// avx; `p` valid for `g` values.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn f32x8(p: *const f32, g: usize) -> __m256 {
        let mut buf = [0.0f32; 8];
        // SAFETY: `p` holds g values (caller), `buf` 8 ≥ g.
        unsafe {
            if g == 8 {
                return _mm256_loadu_ps(p);
            }
            core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), g);
            _mm256_loadu_ps(buf.as_ptr())
        }
    }

    /// The sum of the 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx")]
    fn hsum8(acc: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }

    // The 256-bit integer part, in two flavours producing the *same* eight i32 lanes per
    // block (lane k = Σ of the products of bytes 4k..4k+3), so AVX2 and AVX-VNNI give
    // bitwise equal results. Both instructions multiply an unsigned byte by a signed one:
    //
    // - AVX2 `maddubs`: `|w|` (−128 reads as 128 unsigned, exact) times `x` with `w`'s sign
    //   (|x| ≤ 127, so nothing wraps); pair sums ≤ 2·128·127 fit in i16, then `madd` adds
    //   pairs into i32. (`w + 128` would overflow maddubs' saturating i16 pair sums.)
    // - VNNI `vpdpbusd` (i32 accumulation, no saturation): `w + 128` (= `w ^ 0x80`, in
    //   0..=255) times `x`, which adds `128·Σx` to each lane; the lane starts from
    //   `−128·Σx` (computed once per token block with a `vpdpbusd` of 128s by `x`), so the
    //   result is exactly `Σ w·x`. Lane magnitudes stay below 4·255·127 — no overflow.

    /// Per-row preparation of a weight block: `(w, |w|)` or `(w ^ 0x80, _)`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prep_w_avx2(w: __m256i) -> (__m256i, __m256i) {
        (w, _mm256_sign_epi8(w, w))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prep_x_avx2(x: __m256i) -> (__m256i, __m256i) {
        (x, x)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2(w: (__m256i, __m256i), x: (__m256i, __m256i)) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w.1, _mm256_sign_epi8(x.0, w.0)), _mm256_set1_epi16(1))
    }
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn prep_w_vnni(w: __m256i) -> (__m256i, __m256i) {
        (_mm256_xor_si256(w, _mm256_set1_epi8(-128)), w)
    }
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn prep_x_vnni(x: __m256i) -> (__m256i, __m256i) {
        let z = _mm256_setzero_si256();
        (x, _mm256_sub_epi32(z, _mm256_dpbusd_avx_epi32(z, _mm256_set1_epi8(-128), x)))
    }
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn dot_vnni(w: (__m256i, __m256i), x: (__m256i, __m256i)) -> __m256i {
        _mm256_dpbusd_avx_epi32(x.1, w.0, x.0)
    }

    /// The 256-bit micro-kernel: per output one 8-lane f32 accumulator over every block of
    /// the row, `acc = fma(f32(lanes_b), dw_b·dx_b, acc)`, summed once at the end.
    macro_rules! tile256 {
        ($name:ident, $feat:literal, $prep_w:ident, $prep_x:ident, $dot:ident) => {
            /// # Safety
            /// As [`Micro::tile`], with the CPU features enabled here.
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
                let mut acc = [[_mm256_setzero_ps(); NR]; MR];
                // Scale products dw_b·dx_b of the current 8 blocks, per (row, token).
                let mut p = [[[0.0f32; 8]; NR]; MR];
                // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer
                // below addresses block b + k < nb of one of them; loads are unaligned.
                unsafe {
                    let wq = w.q.as_ptr().add(r * row);
                    let ws = w.s.as_ptr().add(r * nb * 2);
                    if NR == 1 {
                        prefetch_scales(ws, MR, nb);
                    }
                    let xq = x.q.as_ptr().add(tok * row);
                    let xd = x.d.as_ptr().add(tok * nb);
                    let mut b = 0;
                    while b < nb {
                        let g = (nb - b).min(8);
                        let mut dw = [_mm256_setzero_ps(); MR];
                        for (i, d) in dw.iter_mut().enumerate() {
                            *d = scales8(ws.add(i * nb * 2 + 2 * b), g);
                        }
                        for j in 0..NR {
                            let dx = f32x8(xd.add(j * nb + b), g);
                            for i in 0..MR {
                                _mm256_storeu_ps(p[i][j].as_mut_ptr(), _mm256_mul_ps(dw[i], dx));
                            }
                        }
                        for k in 0..g {
                            let off = (b + k) * QK;
                            let mut xv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); NR];
                            for (j, v) in xv.iter_mut().enumerate() {
                                *v = $prep_x(_mm256_loadu_si256(xq.add(j * row + off).cast()));
                            }
                            for i in 0..MR {
                                if NR == 1 && k % 2 == 0 {
                                    prefetch(wq.wrapping_add(i * row + off + ahead(MR, row)));
                                }
                                let wv = $prep_w(_mm256_loadu_si256(wq.add(i * row + off).cast()));
                                for j in 0..NR {
                                    let s = $dot(wv, xv[j]);
                                    acc[i][j] =
                                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(p[i][j][k]), acc[i][j]);
                                }
                            }
                        }
                        b += g;
                    }
                }
                for i in 0..MR {
                    for j in 0..NR {
                        out[i + j * os] = hsum8(acc[i][j]);
                    }
                }
            }
        };
    }
    tile256!(tile_avx2, "avx2,fma,f16c", prep_w_avx2, prep_x_avx2, dot_avx2);
    tile256!(tile_avxvnni, "avx2,fma,f16c,avxvnni", prep_w_vnni, prep_x_vnni, dot_vnni);

    /// AVX2 `maddubs`/`madd`.
    pub(super) struct Avx2;
    impl Micro for Avx2 {
        unsafe fn tile<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            // SAFETY: forwarded contract (CPU features and bounds).
            unsafe { tile_avx2::<MR, NR>(w, r, x, tok, out, os) }
        }
    }

    /// AVX-VNNI `vpdpbusd` on 256 bits.
    pub(super) struct AvxVnni;
    impl Micro for AvxVnni {
        unsafe fn tile<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            // SAFETY: forwarded contract (CPU features and bounds).
            unsafe { tile_avxvnni::<MR, NR>(w, r, x, tok, out, os) }
        }
    }

    /// AVX-512 VNNI: `vpdpbusd` on 512 bits. One f32 order for both of its paths, so that a
    /// prompt and token-by-token decoding give the same bits: every block's exact i32 sum
    /// times `fl(dw·dx)` is added into one of 8 accumulators, block `b` into `b mod 8` in
    /// block order (fused multiply-add), and the 8 are summed as [`hsum8`] does.
    ///
    /// - Decoding ([`Micro::tile`], one row and one token at a time) reads a row in address
    ///   order, blocks `2k`, `2k + 1` per register (`w ^ 0x80` times `x`, as AVX-VNNI above),
    ///   reduces 16 blocks' lanes to their 16 sums ([`block_sums`]), takes off the `128·Σx`
    ///   that the unsigned operand added (from [`QActs::s`]) and adds them with two 8-lane
    ///   FMAs.
    /// - Prompts ([`gemm_packed`]) repack 16 rows at a time so that one register holds 4
    ///   bytes of each of 16 rows: 8 `vpdpbusd` sum a whole block of 16 rows against
    ///   broadcast activations, and the f32 work is one FMA per block and 16 rows instead of
    ///   three instructions per 2 blocks and row.
    pub(super) struct Avx512Vnni;
    impl Micro for Avx512Vnni {
        unsafe fn tile<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            // SAFETY: forwarded contract (CPU features and bounds).
            unsafe { tile_avx512vnni::<MR, NR>(w, r, x, tok, out, os) }
        }
    }

    /// Blocks `b`, `b + 1` (only `b` when `two` is false; the high half is then zero).
    ///
    /// # Safety
    /// avx512f; `p` valid for 64 bytes (32 when `!two`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load2(p: *const u8, two: bool) -> __m512i {
        // SAFETY: per the contract.
        unsafe { if two { _mm512_loadu_si512(p.cast()) } else { _mm512_zextsi256_si512(_mm256_loadu_si256(p.cast())) } }
    }

    /// Where [`block_sums`]' in-lane steps leave block `b`: lane `SPREAD[m]` holds block `m`.
    const SPREAD: [i32; 16] = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15];

    /// The 16 exact block sums of 16 blocks, lane `b` = block `b`, from the 8 registers of
    /// block pairs (`s[k]`: lanes 0..8 hold block `2k`'s partial sums, 8..16 block `2k + 1`'s).
    /// Two steps inside 128-bit lanes (unpack and add: cheap), one across them, one permute.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn block_sums(s: [__m512i; 8]) -> __m512i {
        // 128-bit lane q of s[k] holds 4 partial sums of block 2k + q / 2. Per 128-bit lane:
        // (a, c) → (a0 + a2, c0 + c2, a1 + a3, c1 + c3), then two such → 4 blocks' halves.
        let l1 = |a, b| _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let l2 = |a, b| _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
        // v: 128-bit lanes 0, 1 hold blocks (0, 2, 4, 6) (two halves), 2, 3 blocks (1, 3, 5, 7).
        let v0 = l2(l1(s[0], s[1]), l1(s[2], s[3]));
        let v1 = l2(l1(s[4], s[5]), l1(s[6], s[7]));
        let t = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v1),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v1),
        );
        // t: blocks 0, 2, 4, 6, 1, 3, 5, 7, 8, 10, …; back into block order.
        // SAFETY: SPREAD is 16 i32, an unaligned 64-byte load.
        let ix = unsafe { _mm512_loadu_si512(SPREAD.as_ptr().cast()) };
        _mm512_permutexvar_epi32(ix, t)
    }

    /// # Safety
    /// As [`Micro::tile`], with avx512f, avx512bw, avx512vnni, fma, f16c.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
    unsafe fn tile_avx512vnni<const MR: usize, const NR: usize>(
        w: &QWeights<'_>,
        r: usize,
        x: &QActs,
        tok: usize,
        out: &mut [f32],
        os: usize,
    ) {
        let nb = w.nb;
        let row = nb * QK;
        let k80 = _mm512_set1_epi8(-128);
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer below
        // addresses blocks < nb of one of them (the second block of a pair only when
        // 2k + 1 < g); loads are unaligned.
        unsafe {
            let wq = w.q.as_ptr().add(r * row);
            let ws = w.s.as_ptr().add(r * nb * 2);
            if NR == 1 {
                prefetch_scales(ws, MR, nb);
            }
            let xq = x.q.as_ptr().add(tok * row);
            let xd = x.d.as_ptr().add(tok * nb);
            let xsum = x.s.as_ptr().add(tok * nb);
            let mut b = 0;
            while b < nb {
                let g = (nb - b).min(16);
                let mut dw = [_mm512_setzero_ps(); MR];
                for (i, d) in dw.iter_mut().enumerate() {
                    let s = ws.add(i * nb * 2 + 2 * b);
                    *d = if g == 16 {
                        _mm512_cvtph_ps(_mm256_loadu_si256(s.cast()))
                    } else {
                        let mut buf = [0u8; 32];
                        core::ptr::copy_nonoverlapping(s, buf.as_mut_ptr(), 2 * g);
                        _mm512_cvtph_ps(_mm256_loadu_si256(buf.as_ptr().cast()))
                    };
                }
                for j in 0..NR {
                    let s = xd.add(j * nb + b);
                    let xs = xsum.add(j * nb + b);
                    let (dx, sx) = if g == 16 {
                        (_mm512_loadu_ps(s), _mm512_loadu_si512(xs.cast()))
                    } else {
                        let mut buf = [0.0f32; 16];
                        let mut sbuf = [0i32; 16];
                        core::ptr::copy_nonoverlapping(s, buf.as_mut_ptr(), g);
                        core::ptr::copy_nonoverlapping(xs, sbuf.as_mut_ptr(), g);
                        (_mm512_loadu_ps(buf.as_ptr()), _mm512_loadu_si512(sbuf.as_ptr().cast()))
                    };
                    // vpdpbusd of `w ^ 0x80` adds 128·Σx per block: taken off the 16 sums at once.
                    let c = _mm512_slli_epi32::<7>(sx);
                    for i in 0..MR {
                        // Pair k of block sums; pairs past the group's end are zero (and
                        // their scales too, so they add exact zeros).
                        let pair = |k: usize| {
                            if 2 * k >= g {
                                return zero;
                            }
                            let off = (b + 2 * k) * QK;
                            let two = 2 * k + 1 < g;
                            if NR == 1 {
                                prefetch(wq.wrapping_add(i * row + off + ahead(MR, row)));
                            }
                            let xx = load2(xq.add(j * row + off).cast(), two);
                            let wu = _mm512_xor_si512(load2(wq.add(i * row + off), two), k80);
                            _mm512_dpbusd_epi32(zero, wu, xx)
                        };
                        let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(block_sums(core::array::from_fn(pair)), c));
                        let p = _mm512_mul_ps(dw[i], dx);
                        let a = _mm256_fmadd_ps(_mm512_castps512_ps256(sums), _mm512_castps512_ps256(p), acc[i][j]);
                        acc[i][j] = _mm256_fmadd_ps(hi256(sums), hi256(p), a);
                    }
                }
                b += g;
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                out[i + j * os] = hsum8(acc[i][j]);
            }
        }
    }

    /// Lanes 8..16.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hi256(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
    }

    /// Rows per packed group: one 32-bit lane of a 512-bit register per row.
    const GROUP: usize = 16;

    /// A prompt pass (`t ≥ 2`) over rows `r0..r0 + nr`, `out` token-major (`t × nr`), in
    /// [`Avx512Vnni`]'s f32 order.
    ///
    /// Each group of 16 rows is repacked once into a buffer that stays in L1/L2 while every
    /// token runs over it: per block, 8 registers whose lane `i` holds bytes `4c..4c + 4` of
    /// row `i` (`^ 0x80`, the unsigned operand of `vpdpbusd`), then the 16 rows' scales as
    /// f32. A missing row of the last group is zero weights with zero scales. Decoding (one
    /// token) keeps the file's layout ([`Micro::tile`]); from two tokens on, this runs.
    ///
    /// # Safety
    /// avx512f, avx512bw, avx512vnni, avx2, fma, f16c; rows `r0..r0 + nr` of `w` and tokens
    /// `..t` of `x` exist (`x.nb == w.nb`); `out.len() == t · nr`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx,avx2,fma,f16c")]
    pub(super) unsafe fn gemm_packed(w: &QWeights<'_>, r0: usize, nr: usize, x: &QActs, t: usize, out: &mut [f32]) {
        let nb = w.nb;
        let mut wp = alloc::vec![_mm512_setzero_si512(); nb * 8];
        let mut sp = alloc::vec![0.0f32; nb * GROUP];
        // Whole 8-scale vectors (zero past nb), as `scales8` gives them.
        let mut srow = alloc::vec![0.0f32; nb.next_multiple_of(8)];
        for g0 in (0..nr).step_by(GROUP) {
            let gr = (nr - g0).min(GROUP);
            // SAFETY: rows r0 + g0..r0 + g0 + gr exist (caller); features as ours.
            unsafe { pack(w, r0 + g0, gr, &mut wp, &mut sp, &mut srow) };
            // The next group's weights and scales, hinted a share per token step while this
            // group computes, so that packing it finds them in cache.
            let (row, nx) = (nb * QK, (nr - g0 - gr).min(GROUP));
            let next_q = w.q.as_ptr().wrapping_add((r0 + g0 + gr) * row);
            let next_s = w.s.as_ptr().wrapping_add((r0 + g0 + gr) * nb * 2);
            let share = (nx * row).div_ceil(t.div_ceil(2)).next_multiple_of(64);
            let mut ahead = 0;
            let mut tok = 0;
            while tok < t {
                if ahead < nx * row {
                    prefetch_range(next_q.wrapping_add(ahead), share.min(nx * row - ahead));
                    prefetch_range(next_s.wrapping_add(ahead / 16), (share / 16).min(nx * nb * 2 - ahead / 16));
                    ahead += share;
                }
                // SAFETY: tokens tok..tok + 2 (or 1) < t exist; the group's outputs lie in `out`.
                unsafe {
                    if tok + 2 <= t {
                        group_tokens::<2>(&wp, &sp, x, tok, out, nr, g0, gr);
                        tok += 2;
                    } else {
                        group_tokens::<1>(&wp, &sp, x, tok, out, nr, g0, gr);
                        tok += 1;
                    }
                }
            }
        }
    }

    /// Packs rows `r..r + gr` (`gr ≤ 16`) into `wp` (per block 8 registers, see
    /// [`gemm_packed`]) and `sp` (per block 16 f32 scales); `srow` is scratch of `nb` values
    /// rounded up to a multiple of 8.
    ///
    /// # Safety
    /// As [`gemm_packed`]'s features; rows `r..r + gr` of `w` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx,avx2,f16c")]
    unsafe fn pack(w: &QWeights<'_>, r: usize, gr: usize, wp: &mut [__m512i], sp: &mut [f32], srow: &mut [f32]) {
        let nb = w.nb;
        let row = nb * QK;
        let k80 = _mm512_set1_epi8(-128);
        // Qword indices joining 128-bit lanes (0, 0', 2, 2') and (1, 1', 3, 3') of two registers.
        let lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        let hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
        for b in 0..nb {
            // Register i: row i's block in its low half, row i + 8's in its high half.
            // SAFETY: rows r + i < r + gr exist (caller), each `row` bytes; unaligned loads.
            let ld = |i: usize| unsafe {
                if i < gr {
                    _mm256_loadu_si256(w.q.as_ptr().add((r + i) * row + b * QK).cast())
                } else {
                    _mm256_setzero_si256()
                }
            };
            let z: [__m512i; 8] =
                core::array::from_fn(|i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ld(i)), ld(i + 8)));
            // An 8×8 transpose of 32-bit values in each 256-bit half.
            let t0: [__m512i; 8] = core::array::from_fn(|k| {
                let (a, b) = (z[2 * (k / 2)], z[2 * (k / 2) + 1]);
                if k % 2 == 0 { _mm512_unpacklo_epi32(a, b) } else { _mm512_unpackhi_epi32(a, b) }
            });
            // u[4h + m]: rows 4h..4h + 4 of columns m and m + 4 (in 128-bit lanes 0/2 and 1/3).
            let u: [__m512i; 8] = core::array::from_fn(|k| {
                let (h, m) = (k / 4, k % 4);
                let (a, b) = (t0[4 * h + m / 2], t0[4 * h + m / 2 + 2]);
                if m % 2 == 0 { _mm512_unpacklo_epi64(a, b) } else { _mm512_unpackhi_epi64(a, b) }
            });
            for c in 0..8 {
                let (m, ix) = (c % 4, if c < 4 { lo } else { hi });
                wp[b * 8 + c] = _mm512_xor_si512(_mm512_permutex2var_epi64(u[m], ix, u[4 + m]), k80);
            }
        }
        for i in 0..GROUP {
            if i < gr {
                let s = &w.s[(r + i) * nb * 2..][..nb * 2];
                for b in (0..nb).step_by(8) {
                    // SAFETY: bytes 2b..2b + 2·min(8, nb − b) of `s` (unaligned: the scale
                    // plane need not be 2-byte aligned); values b..b + 8 ≤ srow.len() of `srow`.
                    unsafe {
                        _mm256_storeu_ps(srow.as_mut_ptr().add(b), scales8(s.as_ptr().add(2 * b), (nb - b).min(8)))
                    };
                }
            } else {
                srow.fill(0.0);
            }
            for (b, &v) in srow[..nb].iter().enumerate() {
                sp[b * GROUP + i] = v;
            }
        }
    }

    /// Tokens `tok..tok + NT` over a packed group: `out[(tok + j)·nr + g0 + i]` for rows `i < gr`.
    ///
    /// # Safety
    /// As [`gemm_packed`]; `wp`, `sp` packed for `x.nb` blocks; tokens `tok..tok + NT` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_tokens<const NT: usize>(
        wp: &[__m512i],
        sp: &[f32],
        x: &QActs,
        tok: usize,
        out: &mut [f32],
        nr: usize,
        g0: usize,
        gr: usize,
    ) {
        let nb = x.nb;
        let mut acc = [[_mm512_setzero_ps(); 8]; NT];
        // Block `b` into accumulator `L = b mod 8`, written out 8 times with a literal `L` so the
        // accumulator index is a constant. (With two tokens, 16 accumulators, 8 weight registers
        // and the i32 chains exceed 32 registers, so some still spill.)
        let step = |acc: &mut [[__m512; 8]; NT], b: usize, l: usize| {
            let wv: [__m512i; 8] = core::array::from_fn(|c| wp[b * 8 + c]);
            // SAFETY: sp holds nb·16 values; unaligned load.
            let d = unsafe { _mm512_loadu_ps(sp.as_ptr().add(b * GROUP)) };
            for (j, a) in acc.iter_mut().enumerate() {
                let k = (tok + j) * nb + b;
                // SAFETY: token tok + j exists (caller): its block b is 32 bytes of x.q.
                let xb = unsafe { x.q.as_ptr().add(k * QK) };
                // SAFETY: bytes 4c..4c + 4 of the block; unaligned read.
                let xc = |c: usize| _mm512_set1_epi32(unsafe { xb.add(4 * c).cast::<i32>().read_unaligned() });
                // Four chains of 2 instead of one of 8 (exact i32 either way).
                let z = _mm512_setzero_si512();
                // vpdpbusd of `w ^ 0x80` adds 128·Σx: start from −128·Σx.
                let mut s = [_mm512_set1_epi32(-128 * x.s[k]), z, z, z];
                for c in 0..8 {
                    s[c % 4] = _mm512_dpbusd_epi32(s[c % 4], wv[c], xc(c));
                }
                let (s0, s1) = (_mm512_add_epi32(s[0], s[2]), _mm512_add_epi32(s[1], s[3]));
                let p = _mm512_mul_ps(d, _mm512_set1_ps(x.d[k]));
                a[l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), p, a[l]);
            }
        };
        let mut b8 = 0;
        while b8 + 8 <= nb {
            step(&mut acc, b8, 0);
            step(&mut acc, b8 + 1, 1);
            step(&mut acc, b8 + 2, 2);
            step(&mut acc, b8 + 3, 3);
            step(&mut acc, b8 + 4, 4);
            step(&mut acc, b8 + 5, 5);
            step(&mut acc, b8 + 6, 6);
            step(&mut acc, b8 + 7, 7);
            b8 += 8;
        }
        for b in b8..nb {
            step(&mut acc, b, b - b8);
        }
        for (j, a) in acc.iter().enumerate() {
            // hsum8's order, lane by lane: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
            let e: [__m512; 4] = core::array::from_fn(|l| _mm512_add_ps(a[l], a[l + 4]));
            let v = _mm512_add_ps(_mm512_add_ps(e[0], e[2]), _mm512_add_ps(e[1], e[3]));
            let o = &mut out[(tok + j) * nr + g0..][..gr];
            // SAFETY: masked store of the first gr ≤ 16 lanes into `o`, which holds gr values.
            unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), ((1u32 << gr) - 1) as u16, v) };
        }
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
    use super::{Micro, QActs, QK, QWeights, ahead, prefetch, prefetch_scales, scale};
    use core::arch::aarch64::*;

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
            /// As [`Micro::tile`], with the CPU features enabled here.
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
        let zip = |a: int8x16_t, b: int8x16_t| {
            let (a, b) = (vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b));
            (vreinterpretq_s8_s64(vzip1q_s64(a, b)), vreinterpretq_s8_s64(vzip2q_s64(a, b)))
        };
        // SAFETY: per the contract.
        let (a0, a1, b0, b1) = unsafe { (vld1q_s8(p0), vld1q_s8(p0.add(16)), vld1q_s8(p1), vld1q_s8(p1.add(16))) };
        let ((k0, k1), (k2, k3)) = (zip(a0, b0), zip(a1, b1));
        [k0, k1, k2, k3]
    }

    /// The i8mm micro-kernel: rows and tokens in pairs (the last one doubled when odd), each
    /// block's exact i32 sums from four `smmla`, one f32 lane per output:
    /// `acc = fma(f32(sum_b), dw_b·dx_b, acc)` block by block. Every output is computed by the
    /// same operations in whatever tile shape, so results do not depend on tiling (decoding
    /// doubles the token: memory-bound, the extra arithmetic is free).
    ///
    /// # Safety
    /// As [`Micro::tile`], with neon and i8mm; `MR ≤ 4`, `NR ≤ 4`.
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
                let xv: [[int8x16_t; 4]; 2] = core::array::from_fn(|q| {
                    if q < tp { two_rows(xp(tj(q, 0)), xp(tj(q, 1))) } else { [vdupq_n_s8(0); 4] }
                });
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

    /// Plain NEON.
    pub(super) struct Neon;
    impl Micro for Neon {
        unsafe fn tile<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            // SAFETY: forwarded contract (CPU features and bounds).
            unsafe { tile_neon::<MR, NR>(w, r, x, tok, out, os) }
        }
    }

    /// NEON with `sdot`.
    pub(super) struct NeonDot;
    /// NEON with `smmla` (i8mm; such CPUs also have `sdot`).
    pub(super) struct NeonI8mm;
    impl Micro for NeonI8mm {
        unsafe fn tile<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            // SAFETY: forwarded contract (CPU features and bounds; `gemm` uses 4 × 2 tiles).
            unsafe { tile_i8mm::<MR, NR>(w, r, x, tok, out, os) }
        }
    }

    impl Micro for NeonDot {
        unsafe fn tile<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            // SAFETY: forwarded contract (CPU features and bounds).
            unsafe { tile_neon_dot::<MR, NR>(w, r, x, tok, out, os) }
        }
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

    /// Random weights (full int8 range, −128 included) in the planar layout and random
    /// activations (±127), `rows × nb` blocks and `t` tokens.
    fn case(r: &mut impl FnMut() -> u64, rows: usize, nb: usize, t: usize) -> (Vec<u8>, Vec<u8>, QActs) {
        let wq: Vec<u8> = (0..rows * nb * QK).map(|_| r() as u8).collect();
        let ws: Vec<u8> = (0..rows * nb).flat_map(|_| f16::from_f32((r() % 1000) as f32 / 1e5).to_le_bytes()).collect();
        let q: Vec<i8> = (0..t * nb * QK).map(|_| ((r() % 255) as i32 - 127) as i8).collect();
        let d: Vec<f32> = (0..t * nb).map(|_| (r() % 1000) as f32 / 1e4).collect();
        (wq, ws, QActs::from_parts(q, d, nb))
    }

    #[test]
    fn every_kernel_matches_the_portable_one() {
        let mut r = rng(5);
        // Block counts around the 8- and 16-block scale groups and the 2-block pairs; row
        // counts around the 4-row tiles; token counts around the 2- and 4-token tiles.
        for nb in [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 66] {
            // Row counts around the 16-row packed groups too (prompts: t ≥ 2).
            for (rows, t) in [
                (1, 1),
                (3, 1),
                (4, 1),
                (9, 1),
                (5, 2),
                (7, 3),
                (8, 4),
                (6, 5),
                (9, 17),
                (5, 64),
                (16, 2),
                (17, 3),
                (33, 5),
            ] {
                let (wq, ws, x) = case(&mut r, rows, nb, t);
                let w = QWeights { q: &wq, s: &ws, nb };
                let mut want = vec![0.0; rows * t];
                Kernel::Portable.gemm(&w, 0, rows, &x, t, &mut want);
                for i in 0..rows {
                    for j in 0..t {
                        let (wr, sr) = (&wq[i * nb * QK..][..nb * QK], &ws[i * nb * 2..][..nb * 2]);
                        let (xr, dr) = (&x.q[j * nb * QK..][..nb * QK], &x.d[j * nb..][..nb]);
                        assert_eq!(want[j * rows + i], dot_portable(wr, sr, xr, dr));
                    }
                }
                let mut results = Vec::new();
                for k in Kernel::available() {
                    let mut got = vec![0.0; rows * t];
                    k.gemm(&w, 0, rows, &x, t, &mut got);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        let (row, j) = (i % rows, i / rows);
                        let mag: f32 = (0..nb)
                            .map(|b| (scale(&ws[row * nb * 2..], b) * x.d[j * nb + b]).abs() * 32.0 * 128.0 * 127.0)
                            .sum();
                        assert!((a - b).abs() <= 1e-6 * (mag + 1.0), "{k:?} nb{nb} {rows}x{t} [{i}]: {a} vs {b}");
                    }
                    results.push((k, got));
                }
                // AVX-VNNI computes the same i32 lanes and f32 operations as AVX2 (see the x86
                // module), so the two agree bitwise; `candidates` never lists it without AVX2.
                #[cfg(target_arch = "x86_64")]
                if let Some((_, vnni)) = results.iter().find(|(k, _)| *k == Kernel::AvxVnni) {
                    let avx2 = &results.iter().find(|(k, _)| *k == Kernel::Avx2).expect("AVX2 listed").1;
                    assert_eq!(avx2, vnni, "nb{nb} {rows}x{t}");
                }
            }
        }
    }

    #[test]
    fn every_kernel_is_independent_of_tiling_and_batch() {
        let mut r = rng(8);
        // 37 rows: two full 16-row packed groups and a partial one.
        let (rows, nb, t) = (37, 37, 13);
        let (wq, ws, x) = case(&mut r, rows, nb, t);
        let w = QWeights { q: &wq, s: &ws, nb };
        for k in Kernel::available() {
            let mut all = vec![0.0; rows * t];
            k.gemm(&w, 0, rows, &x, t, &mut all);
            // Row by row (1 × NR tiles) and token by token (MR × 1 tiles): bitwise equal.
            for row in 0..rows {
                let mut one = vec![0.0; t];
                k.gemm(&w, row, 1, &x, t, &mut one);
                let col: Vec<f32> = (0..t).map(|j| all[j * rows + row]).collect();
                assert_eq!(one, col, "{k:?} row {row}");
            }
            // Row ranges that start inside a group (a task's share of the rows).
            for (r0, n) in [(5, 20), (16, 21), (30, 7)] {
                let mut part = vec![0.0; n * t];
                k.gemm(&w, r0, n, &x, t, &mut part);
                for j in 0..t {
                    assert_eq!(part[j * n..][..n], all[j * rows + r0..][..n], "{k:?} rows {r0}+{n} token {j}");
                }
            }
            for j in 0..t {
                let xj = QActs::from_parts(x.q[j * nb * QK..][..nb * QK].to_vec(), x.d[j * nb..][..nb].to_vec(), nb);
                let mut one = vec![0.0; rows];
                k.gemm(&w, 0, rows, &xj, 1, &mut one);
                assert_eq!(one, all[j * rows..][..rows], "{k:?} token {j}");
            }
        }
    }

    #[test]
    fn extreme_products_are_exact_in_every_kernel() {
        // Every product at its largest (−128 · −127), every sum exact in f32.
        for nb in [1, 8, 9, 17] {
            let (rows, t) = (5, 3);
            let wq = vec![0x80u8; rows * nb * QK];
            let ws: Vec<u8> = (0..rows * nb).flat_map(|_| f16::from_f32(1.0).to_le_bytes()).collect();
            let x = QActs::from_parts(vec![-127i8; t * nb * QK], vec![1.0f32; t * nb], nb);
            let w = QWeights { q: &wq, s: &ws, nb };
            for k in Kernel::available() {
                let mut got = vec![0.0; rows * t];
                k.gemm(&w, 0, rows, &x, t, &mut got);
                assert!(got.iter().all(|&v| v == nb as f32 * 32.0 * 128.0 * 127.0), "{k:?} nb{nb}: {got:?}");
            }
        }
    }

    #[test]
    fn rounding_matches_libm() {
        let mut r = rng(21);
        let special = [0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 0.499_999_97, -0.499_999_97, 126.5, 127.49, -127.5, 1e9, -1e9];
        let random = (0..10_000).map(|_| (r() % 2_000_001) as f32 / 7_800.0 - 128.0);
        for y in special.into_iter().chain(random).chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]) {
            assert_eq!(round_i8(y), libm::roundf(y).clamp(-127.0, 127.0) as i8, "{y}");
        }
    }

    #[test]
    fn activation_quantization_is_the_same_in_every_build() {
        let mut r = rng(5);
        for cols in [1, 31, 32, 70, 1024] {
            let mut x: Vec<f32> = (0..3 * cols).map(|_| (r() % 20_001) as f32 / 997.0 - 10.0).collect();
            // Blocks with a NaN, an infinity, and all zeros.
            x[0] = f32::NAN;
            x[cols / 2] = f32::INFINITY;
            x[2 * cols..(2 * cols + 32).min(3 * cols)].fill(0.0);
            let want = QActs::new_any(&x, 3, cols);
            let got = QActs::new(&x, 3, cols);
            assert_eq!(got.q, want.q, "{cols}");
            assert_eq!(
                got.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
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
