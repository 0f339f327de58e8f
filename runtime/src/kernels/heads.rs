//! The inner loops of attention: per kv head, the scores of a group of queries against the
//! cached keys, and the values weighted by them. The loop around them (windows, biases,
//! softmax) is `model::attention`'s; it hands its code to [`run_heads`], which runs it with
//! the best [`HeadLoops`] this CPU has: the portable ones, or [`Simd`] over an architecture's
//! [`SimdOps`] (AVX2, NEON), compiled for that architecture's vectors.

use super::arch;
use super::portable::Portable;

/// Code generic over the attention loops ([`run_heads`] picks them).
pub(crate) trait HeadJob {
    /// Outputs `o` of the query heads `h0..`, with the loops `L`.
    ///
    /// # Safety
    /// The CPU supports what `L` needs.
    unsafe fn run_with<L: HeadLoops>(&self, h0: usize, o: &mut [f32]);
}

/// Runs `job` with the best loops this CPU has, its whole code compiled for their vectors
/// (the SIMD loops give the same bits as the portable ones).
pub(crate) fn run_heads<J: HeadJob>(job: &J, h0: usize, o: &mut [f32]) {
    if !arch::run_heads(job, h0, o) {
        // SAFETY: the portable loops need no CPU feature.
        unsafe { job.run_with::<Portable>(h0, o) }
    }
}

/// The two inner loops of attention: [`Portable`] in plain Rust, [`Simd`] the same arithmetic
/// in the same order (no FMA) with explicit vectors.
pub(crate) trait HeadLoops {
    /// `scores[hh·span + jj] = dot(q_hh, row_jj) · scale` for the `g` queries `q` (`g·hd`
    /// values) and the `span` rows of `hd` values, `stride` apart, at the start of `rows`.
    ///
    /// # Safety
    /// The CPU supports the implementation's features.
    unsafe fn scores(q: &[f32], hd: usize, rows: &[f32], stride: usize, span: usize, scale: f32, scores: &mut [f32]);

    /// `o[hh·ostride..][..hd] += Σ_jj scores[hh·span + jj] · row_jj` for each query `hh`, in
    /// ascending `jj` per value (rows as in [`HeadLoops::scores`]).
    ///
    /// # Safety
    /// As [`HeadLoops::scores`].
    unsafe fn weighted(
        scores: &[f32],
        span: usize,
        rows: &[f32],
        stride: usize,
        hd: usize,
        o: &mut [f32],
        ostride: usize,
    );
}

// The SIMD loops, for the architectures that have them (x86-64 runs them only with `std`:
// AVX2 is detected at run time).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
/// The vector pieces of the SIMD loops; [`Simd`] builds [`HeadLoops`] from them. No fused
/// multiply-add anywhere, so the values are the bits of the portable loops.
pub(super) trait SimdOps {
    /// `[dot(q, k[0]), …, dot(q, k[3])]` over `n` values: per sum eight lanes, sequential over
    /// the 8-blocks, then `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`, then the
    /// sequential tail — `kernels::dot`'s order.
    ///
    /// # Safety
    /// The CPU has the implementation's features; `q` and each `k[p]` valid for `n` values.
    unsafe fn dot4(q: *const f32, k: [*const f32; 4], n: usize) -> [f32; 4];

    /// For `h < H`: `o[h·ostride..][..16] += Σ_{jj in j0..j1} s[h·span + jj] · r[jj·stride..][..16]`
    /// in ascending `jj`, the 16 sums held in registers; with `pf = Some(hd)` (the first
    /// slice, so `r` is at the rows' start) each row `jj + 4` is hinted whole on the way.
    ///
    /// # Safety
    /// The features; every address named above valid.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// Hints the cache line at `p` (never faults, whatever `p` is).
    fn prefetch(p: *const f32);
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
/// Hints every cache line of `n` values at `p`.
#[inline(always)]
pub(super) fn prefetch_row<O: SimdOps>(p: *const f32, n: usize) {
    for off in (0..n).step_by(16) {
        O::prefetch(p.wrapping_add(off));
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
/// Value rows per block of [`HeadLoops::weighted`]: a block of one kv head's rows stays in L1
/// while every 16-column slice of it is accumulated.
const VROWS: usize = 32;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
/// [`HeadLoops`] on a vector unit: scores four keys at a time (one dot product is a chain of
/// dependent additions, four are independent), values in blocks of [`VROWS`] rows × 16 columns
/// × up to four queries with the sums in registers (the portable loop loads and stores them
/// per row), and prefetches, because a layer's cache is cold after a token's weights streamed
/// past.
pub(super) struct Simd<O>(core::marker::PhantomData<O>);

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
impl<O: SimdOps> HeadLoops for Simd<O> {
    #[inline(always)]
    unsafe fn scores(q: &[f32], hd: usize, rows: &[f32], stride: usize, span: usize, scale: f32, scores: &mut [f32]) {
        let g = q.len() / hd.max(1);
        assert!(span == 0 || rows.len() >= (span - 1) * stride + hd, "attention: key rows");
        assert!(scores.len() >= g * span && q.len() == g * hd, "attention: scores");
        let mut jj = 0;
        while jj < span {
            let n = (span - jj).min(4);
            // Fewer than four rows left: the last one is repeated and its extra sums dropped.
            let k: [*const f32; 4] = core::array::from_fn(|p| rows[(jj + p.min(n - 1)) * stride..].as_ptr());
            // The rows two passes ahead.
            for p in 8..12 {
                prefetch_row::<O>(rows.as_ptr().wrapping_add((jj + p) * stride), hd);
            }
            for hh in 0..g {
                // SAFETY: the features (caller); q row hh and the four key rows hold `hd`
                // values each (asserted above).
                let d = unsafe { O::dot4(q[hh * hd..].as_ptr(), k, hd) };
                for (p, &v) in d.iter().enumerate().take(n) {
                    scores[hh * span + jj + p] = v * scale;
                }
            }
            jj += 4;
        }
    }

    #[inline(always)]
    unsafe fn weighted(
        scores: &[f32],
        span: usize,
        rows: &[f32],
        stride: usize,
        hd: usize,
        o: &mut [f32],
        ostride: usize,
    ) {
        let g = scores.len() / span.max(1);
        if g == 0 || span == 0 {
            return;
        }
        assert!(rows.len() >= (span - 1) * stride + hd, "attention: value rows");
        assert!(o.len() >= (g - 1) * ostride + hd && scores.len() >= g * span, "attention: outputs");
        let cols = hd / 16 * 16;
        let (r, op, sp) = (rows.as_ptr(), o.as_mut_ptr(), scores.as_ptr());
        for j0 in (0..span).step_by(VROWS) {
            let j1 = (j0 + VROWS).min(span);
            let mut hb = 0;
            while hb < g {
                let n = (g - hb).min(4);
                for c0 in (0..cols).step_by(16) {
                    // Whole rows, four ahead, in the first slice: the later slices hit L1.
                    let pf = (c0 == 0).then_some(hd);
                    // SAFETY: the features (caller); rows jj < span hold `hd` values at
                    // jj·stride, outputs hb + h < g hold `hd` at (hb + h)·ostride, scores
                    // (hb + h)·span + jj < g·span (asserted above); c0 + 16 ≤ hd.
                    unsafe {
                        let (s, rr, oo) = (sp.add(hb * span), r.add(c0), op.add(hb * ostride + c0));
                        match n {
                            4 => O::slice16::<4>(s, span, rr, stride, oo, ostride, j0, j1, pf),
                            3 => O::slice16::<3>(s, span, rr, stride, oo, ostride, j0, j1, pf),
                            2 => O::slice16::<2>(s, span, rr, stride, oo, ostride, j0, j1, pf),
                            _ => O::slice16::<1>(s, span, rr, stride, oo, ostride, j0, j1, pf),
                        }
                    }
                }
                for c in cols..hd {
                    for h in hb..hb + n {
                        let mut a = o[h * ostride + c];
                        for jj in j0..j1 {
                            a += scores[h * span + jj] * rows[jj * stride + c];
                        }
                        o[h * ostride + c] = a;
                    }
                }
                hb += n;
            }
        }
    }
}
