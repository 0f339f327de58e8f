//! Q8_0 × Q8_0 products: activations quantized per 32-block to int8, exact int32 block
//! dot products, scaled by the weight's f16 scale times the activation's f32 scale.
//!
//! [`Kernel::gemm`] computes a block of outputs `rows × tokens` with a register-blocked
//! micro-kernel: `MR` weight rows × `NR` tokens at a time, every loaded weight block used
//! against `NR` tokens and every activation block against `MR` rows, each output kept in a
//! vector of f32 lane sums across the whole row and reduced once at the end. Decode (one
//! token) is the same micro-kernel with `NR = 1`, one row at a time (address order).
//! AVX-512 VNNI prompts instead repack 16 weight rows at a time into a small buffer so that
//! one register holds 4 bytes of each of 16 rows (`x86_64::gemm_packed`): the file's layout
//! is read in place everywhere else.
//!
//! [`Kernel`] picks the implementation once per matmul: on x86-64 AVX-512 VNNI (`vpdpbusd`
//! on 512 bits), AVX-VNNI (`vpdpbusd` on 256 bits) or AVX2
//! (`maddubs`/`madd`), all with F16C for the scales; `smmla` (`i8mm`), `sdot` (`dotprod`) or
//! plain NEON on aarch64; the portable scalar loop everywhere. All of them compute the same
//! int32 block sums exactly; they differ only in the order of the f32 accumulation
//! (lane-wise partial sums), so they agree to f32 rounding (tested below). For one
//! implementation the sequence of f32 operations that produces an output depends only on the
//! row and the token's activations — never on `MR`/`NR`, the number of tokens or the row
//! split — so a prompt and token-by-token decoding give bitwise identical results.
//!
//! This file is the frame, the same on every CPU: the activations' quantization, the
//! [`Kernel`] record, the tile driver [`run`] and the prefetch distances. The micro-kernels
//! themselves live in `portable.rs` and one file per architecture (`x86_64.rs`,
//! `aarch64.rs`), which list the kernels their CPU runs.

use super::arch;
use super::portable::Portable;
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
        arch::quantize(x, t, cols).unwrap_or_else(|| Self::new_any(x, t, cols))
    }

    /// The portable code; an architecture's `quantize` compiles it again for its vectors.
    #[inline(always)]
    pub(super) fn new_any(x: &[f32], t: usize, cols: usize) -> Self {
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
    // `inline`: so that an architecture's build of `new_any` (another file, so another
    // codegen unit) gets this loop compiled for its vectors too.
    #[inline]
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
    /// Code bytes per block: [`QK`] for Q8_0, 16 for the 4-bit formats (`q4.rs`).
    pub(crate) code: usize,
    /// Scale bytes per block: 2 (f16) or 1 (E8M0).
    pub(crate) sb: usize,
}

impl<'a> QWeights<'a> {
    /// Q8_0 planes.
    pub(crate) fn q8(q: &'a [u8], s: &'a [u8], nb: usize) -> Self {
        Self { q, s, nb, code: QK, sb: 2 }
    }
    /// Bytes of one row of the code plane.
    pub(crate) fn row_bytes(&self) -> usize {
        self.nb * self.code
    }
}

/// `Kernel::gemm`'s code after its checks, with the contract of [`run`]: rows `r0..r0 + nr` of
/// `w` and tokens `..t` of `x` exist (`x.nb == w.nb`), `out.len() == t · nr`.
pub(super) type Gemm = unsafe fn(w: &QWeights<'_>, r0: usize, nr: usize, x: &QActs, t: usize, out: &mut [f32]);

/// One implementation of [`Kernel::gemm`]: a name (benchmarks pick kernels by it) and its
/// code. Made here (the portable loop) and by the architecture files, for what their CPU runs.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    name: &'static str,
    gemm: Gemm,
}

impl core::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name)
    }
}

impl Kernel {
    /// The kernel `name` running `gemm`.
    ///
    /// # Safety
    /// This CPU has every feature `gemm` needs (detected at run time, or enabled at compile
    /// time without std): [`Kernel::gemm`] calls it on any machine that made the `Kernel`.
    pub(super) const unsafe fn new(name: &'static str, gemm: Gemm) -> Self {
        Self { name, gemm }
    }

    /// The kernel's name (`Portable`, `Avx2`, `NeonDot`, …).
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The portable loop, on every CPU.
    pub(crate) fn portable() -> Self {
        // SAFETY: the portable loop needs no CPU feature.
        unsafe { Self::new("Portable", run::<Portable, 1, 1, 1>) }
    }

    /// The best implementation this CPU runs (with `std`: detected at run time; without:
    /// what the target enables at compile time).
    pub(crate) fn detect() -> Self {
        // Once per process: every matrix product asks, ~65 times per decoded token.
        #[cfg(feature = "std")]
        {
            static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
            *BEST.get_or_init(|| Self::candidates().last().copied().unwrap_or_else(Self::portable))
        }
        #[cfg(not(feature = "std"))]
        Self::candidates().last().copied().unwrap_or_else(Self::portable)
    }

    /// Every implementation this CPU runs, best last.
    pub(crate) fn candidates() -> Vec<Self> {
        let mut v = vec![Self::portable()];
        arch::q8_kernels(&mut v);
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
        // 4-bit activations pad each row to an even number of blocks (`q4.rs`).
        let xnb = if w.code == QK { nb } else { nb.next_multiple_of(2) };
        assert!(
            x.nb == nb
                && w.q.len() >= (r0 + nr) * nb * w.code
                && w.s.len() >= (r0 + nr) * nb * w.sb
                && x.q.len() >= t * xnb * QK
                && x.d.len() >= t * xnb
                && x.s.len() >= t * xnb
                && out.len() >= nr * t,
            "Kernel::gemm: shapes do not match"
        );
        if nr == 0 || t == 0 {
            return;
        }
        let out = &mut out[..nr * t];
        // SAFETY: `Kernel::new`'s contract: the CPU runs `gemm`; rows `r0..r0 + nr` and tokens
        // `..t` exist per the assertion above, and `out` is `nr × t`.
        unsafe { (self.gemm)(w, r0, nr, x, t, out) }
    }
}

// Decoding streams each weight byte once: hinting the bytes `PREFETCH_AHEAD` ahead while
// this tile computes keeps the memory pipeline full across rows (2-thread GEMV over 500 MB of
// expert matrices: 27–31 → 35–37 GB/s, against 37 GB/s streaming read). `arch::prefetch`
// hints one cache line (a no-op where there is no instruction).
use arch::prefetch;

/// How far ahead of the rows it is reading a decode tile prefetches weights: at least this
/// many bytes, and at least one tile. 4 KiB keeps ~64 cache lines in flight per thread.
const PREFETCH_AHEAD: usize = 4096;

/// The prefetch distance in weight bytes for tiles of `mr` rows of `row` bytes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
pub(super) fn ahead(mr: usize, row: usize) -> usize {
    (mr * row).max(PREFETCH_AHEAD)
}

/// Prefetches the scales of `mr` rows as far ahead of the tile whose scales start at `ws` as
/// [`ahead`] is for its weights (each row's `2·nb` bytes lie in a separate plane, 1/16 of the
/// weight bytes, so the weight prefetch does not bring them).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
pub(super) fn prefetch_scales(ws: *const u8, mr: usize, nb: usize) {
    prefetch_scales_of(ws, mr, nb, QK, 2)
}

/// [`prefetch_scales`] for blocks of `code` weight bytes and `sb` scale bytes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
pub(super) fn prefetch_scales_of(ws: *const u8, mr: usize, nb: usize, code: usize, sb: usize) {
    let at = ws.wrapping_add(ahead(mr, nb * code) / code * sb);
    for i in 0..mr {
        prefetch(at.wrapping_add(i * nb * sb));
        prefetch(at.wrapping_add((i + 1) * nb * sb - 1));
    }
}

/// Prefetches every cache line of `p[..len]`.
#[inline]
pub(super) fn prefetch_range(p: *const u8, len: usize) {
    for off in (0..len).step_by(64) {
        prefetch(p.wrapping_add(off));
    }
    prefetch(p.wrapping_add(len.saturating_sub(1)));
}

/// A register-blocked micro-kernel.
pub(super) trait Micro {
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

/// Declares the unit struct `$name`, a [`Micro`] whose tile is the function `$tile` (same
/// signature): the micro-kernels are free functions with their `#[target_feature]`s, made by
/// one macro per family, and this is the impl that hands each one to [`run`].
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
macro_rules! micro {
    ($(#[$attr:meta])* $name:ident => $tile:ident) => {
        $(#[$attr])*
        pub(super) struct $name;
        impl $crate::kernels::q8::Micro for $name {
            unsafe fn tile<const MR: usize, const NR: usize>(
                w: &$crate::kernels::q8::QWeights<'_>,
                r: usize,
                x: &$crate::kernels::q8::QActs,
                tok: usize,
                out: &mut [f32],
                os: usize,
            ) {
                // SAFETY: forwarded contract (CPU features and bounds).
                unsafe { $tile::<MR, NR>(w, r, x, tok, out, os) }
            }
        }
    };
}
/// [`micro!`] for a 4-bit kernel generic over its format: declares `$name<F>`, a [`Micro`]
/// for every `F: Nib` whose tile is `$tile::<F, MR, NR>`.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
macro_rules! micro4 {
    ($(#[$attr:meta])* $name:ident => $tile:ident) => {
        $(#[$attr])*
        pub(super) struct $name<F>(core::marker::PhantomData<F>);
        impl<F: $crate::kernels::q4::Nib> $crate::kernels::q8::Micro for $name<F> {
            unsafe fn tile<const MR: usize, const NR: usize>(
                w: &$crate::kernels::q8::QWeights<'_>,
                r: usize,
                x: &$crate::kernels::q8::QActs,
                tok: usize,
                out: &mut [f32],
                os: usize,
            ) {
                // SAFETY: forwarded contract (CPU features and bounds).
                unsafe { $tile::<F, MR, NR>(w, r, x, tok, out, os) }
            }
        }
    };
}
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_imports))]
pub(super) use micro;
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_imports))]
pub(super) use micro4;

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
pub(super) unsafe fn run<K: Micro, const MR: usize, const NR: usize, const DR: usize>(
    w: &QWeights<'_>,
    r0: usize,
    nr: usize,
    x: &QActs,
    t: usize,
    out: &mut [f32],
) {
    if t == 1 {
        // The kernel hints the bytes ahead of its rows as it goes; the first ones are hinted here.
        let row = w.row_bytes();
        let first = (nr * row).min(PREFETCH_AHEAD.max(DR * row));
        prefetch_range(w.q.as_ptr().wrapping_add(r0 * row), first);
        prefetch_range(w.s.as_ptr().wrapping_add(r0 * w.nb * w.sb), first / w.code * w.sb);
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

/// The f16 scale of block `b` in a row's scales `ws`.
#[inline]
pub(super) fn scale(ws: &[u8], b: usize) -> f32 {
    f16::from_le_bytes([ws[2 * b], ws[2 * b + 1]]).to_f32()
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::portable::dot_portable;
    use super::*;

    pub(in crate::kernels) fn rng(seed: u64) -> impl FnMut() -> u64 {
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
    pub(in crate::kernels) fn case(
        r: &mut impl FnMut() -> u64,
        rows: usize,
        nb: usize,
        t: usize,
    ) -> (Vec<u8>, Vec<u8>, QActs) {
        let wq: Vec<u8> = (0..rows * nb * QK).map(|_| r() as u8).collect();
        let ws: Vec<u8> = (0..rows * nb).flat_map(|_| f16::from_f32((r() % 1000) as f32 / 1e5).to_le_bytes()).collect();
        let q: Vec<i8> = (0..t * nb * QK).map(|_| ((r() % 255) as i32 - 127) as i8).collect();
        let d: Vec<f32> = (0..t * nb).map(|_| (r() % 1000) as f32 / 1e4).collect();
        (wq, ws, QActs::from_parts(q, d, nb))
    }

    /// Block counts around the 8- and 16-block scale groups and the 2-block pairs.
    pub(in crate::kernels) const BLOCKS: [usize; 11] = [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 66];
    /// `(rows, tokens)`: row counts around the 4-row tiles and (prompts: t ≥ 2) the 16-row
    /// packed groups; token counts around the 2- and 4-token tiles.
    pub(in crate::kernels) const SHAPES: [(usize, usize); 13] =
        [(1, 1), (3, 1), (4, 1), (9, 1), (5, 2), (7, 3), (8, 4), (6, 5), (9, 17), (5, 64), (16, 2), (17, 3), (33, 5)];

    #[test]
    fn every_kernel_matches_the_portable_one() {
        let mut r = rng(5);
        for nb in BLOCKS {
            for (rows, t) in SHAPES {
                let (wq, ws, x) = case(&mut r, rows, nb, t);
                let w = QWeights::q8(&wq, &ws, nb);
                let mut want = vec![0.0; rows * t];
                Kernel::portable().gemm(&w, 0, rows, &x, t, &mut want);
                for i in 0..rows {
                    for j in 0..t {
                        let (wr, sr) = (&wq[i * nb * QK..][..nb * QK], &ws[i * nb * 2..][..nb * 2]);
                        let (xr, dr) = (&x.q[j * nb * QK..][..nb * QK], &x.d[j * nb..][..nb]);
                        assert_eq!(want[j * rows + i], dot_portable(wr, sr, xr, dr));
                    }
                }
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
        let w = QWeights::q8(&wq, &ws, nb);
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
            let w = QWeights::q8(&wq, &ws, nb);
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
