//! Grouped-query self-attention with a KV cache: projections (+ biases), q/k norm (per head
//! or full width), clipping, RoPE, causal (optionally sliding-window) or bidirectional
//! softmax attention, optionally with a T5-style relative position bias.

use super::plan::{AttnPlan, Rope, relative_bucket};
use crate::config::QkNorm;
use crate::kernels::{Acts, Gemv, Parallel, dot, gemv_many, matmul, matmul_acts, rmsnorm_in_place, softmax_in_place};
use alloc::vec::Vec;

/// Keys and values of every position seen so far: one buffer per kv head, `[positions, hk]`
/// and `[positions, hv]`. A head's task then reads its keys and values in address order;
/// interleaved `[positions, kv_heads · hk]` rows made each task read every other slice of
/// a row, a pattern the hardware prefetcher follows less well (see `kernels::q8::run`).
#[derive(Debug, Default, Clone)]
pub(crate) struct LayerCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl LayerCache {
    /// Appends tokens whose keys `k` are rows of `heads · hk` values and values `v` rows of
    /// `heads · hv` values.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], heads: usize, hk: usize, hv: usize) {
        for (cache, rows, width) in [(&mut self.k, k, hk), (&mut self.v, v, hv)] {
            cache.resize_with(heads, Vec::new);
            for row in rows.chunks_exact(heads * width) {
                for (dst, src) in cache.iter_mut().zip(row.chunks_exact(width)) {
                    dst.extend_from_slice(src);
                }
            }
        }
    }

    /// Keeps the first `len` positions, given the widths `heads · hk` and `heads · hv` of a
    /// position's keys and values.
    pub(crate) fn truncate(&mut self, len: usize, kw: usize, vw: usize) {
        let heads = self.k.len().max(1);
        self.k.iter_mut().for_each(|k| k.truncate(len * (kw / heads)));
        self.v.iter_mut().for_each(|v| v.truncate(len * (vw / heads)));
    }
}

/// Reusable buffers of the attention block.
#[derive(Debug, Default)]
pub(crate) struct AttnScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// q, k and v of one token, side by side (decoding computes them in one pass).
    qkv: Vec<f32>,
    w: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Per-head outputs, `[heads, T, head_dim]`.
    heads: Vec<f32>,
    /// Head outputs re-interleaved, `[T, heads · head_dim]`.
    ctx: Vec<f32>,
    /// Relative position bias table `[buckets, heads]`, and the bucket of every relative
    /// position `key − query` from `−(total − 1)` on.
    rel_table: Vec<f32>,
    rel_bucket: Vec<usize>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// Softmax of `x` with one more logit `sink` in the denominator (its probability is dropped):
/// GPT-OSS attention sinks, max-subtracted over the scores and the sink as transformers does.
pub(crate) fn softmax_with_sink(x: &mut [f32], sink: f32) {
    let m = x.iter().fold(sink, |a, &b| a.max(b));
    let mut sum = libm::expf(sink - m);
    for v in x.iter_mut() {
        *v = libm::expf(*v - m);
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Below this many multiply-adds the heads run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 14;

/// Attention for `t` tokens at positions `pos0..pos0 + t` on normalised input `x` `[T, H]`;
/// appends their keys and values to `cache` and writes the output projection to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    par: &dyn Parallel,
    bytes: &[u8],
    a: &AttnPlan,
    rope: &Rope,
    eps: f32,
    cache: &mut LayerCache,
    pos0: usize,
    x: &[f32],
    t: usize,
    s: &mut AttnScratch,
    out: &mut [f32],
) {
    let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let (qd, kvd) = (nh * hd, nkv * hd);
    resize(&mut s.q, t * qd);
    resize(&mut s.k, t * kvd);
    resize(&mut s.v, t * kvd);
    // q, k and v read the same input: quantized once.
    let xa = Acts::new(x, t);
    let (wq, wk, wv) = (a.q.view(bytes), a.k.view(bytes), a.v.view(bytes));
    if t == 1 {
        // One fork/join for the three (same values as three `matmul_acts`).
        resize(&mut s.qkv, qd + 2 * kvd);
        let job = |w| Gemv { x: &xa, w, glu: None };
        gemv_many(par, &[job(wq), job(wk), job(wv)], &mut s.qkv);
        let (q, kv) = s.qkv.split_at(qd);
        s.q.copy_from_slice(q);
        s.k.copy_from_slice(&kv[..kvd]);
        s.v.copy_from_slice(&kv[kvd..]);
    } else {
        matmul_acts(par, &xa, &wq, &mut s.q);
        matmul_acts(par, &xa, &wk, &mut s.k);
        matmul_acts(par, &xa, &wv, &mut s.v);
    }
    if let Some([bq, bk, bv]) = &a.bias {
        for (buf, b, width) in [(&mut s.q, bq, qd), (&mut s.k, bk, kvd), (&mut s.v, bv, kvd)] {
            b.read(bytes, &mut s.w);
            for row in buf.chunks_mut(width) {
                crate::kernels::add_into(row, &s.w);
            }
        }
    }
    // q/k norm: over each head's values, or over the whole projection.
    let norm_width = match a.qk_norm {
        QkNorm::None => 0,
        QkNorm::PerHead => hd,
        QkNorm::Full => usize::MAX,
    };
    if norm_width != 0 {
        for (buf, w, width) in [(&mut s.q, &a.q_norm, qd), (&mut s.k, &a.k_norm, kvd)] {
            if let Some(w) = w {
                w.read(bytes, &mut s.w);
                for piece in buf.chunks_mut(norm_width.min(width)) {
                    rmsnorm_in_place(piece, &s.w, eps);
                }
            }
        }
    }
    if let Some(c) = a.clip {
        for v in s.q.iter_mut().chain(s.k.iter_mut()).chain(s.v.iter_mut()) {
            *v = v.clamp(-c, c);
        }
    }
    resize(&mut s.cos, hd / 2);
    resize(&mut s.sin, hd / 2);
    for tok in (0..t).filter(|_| a.rope) {
        rope.angles(pos0 + tok, &mut s.cos, &mut s.sin);
        for head in s.q[tok * qd..][..qd].chunks_mut(hd).chain(s.k[tok * kvd..][..kvd].chunks_mut(hd)) {
            rope.rotate(head, &s.cos, &s.sin);
        }
    }
    cache.append(&s.k, &s.v, nkv, hd, hd);

    // Scores and weighted values.
    let total = pos0 + t;
    if let Some(rb) = &a.rel_bias {
        s.rel_table.clear();
        s.rel_table.resize(rb.buckets * nh, 0.0);
        let tv = rb.table.view(bytes);
        for (b, row) in s.rel_table.chunks_mut(nh).enumerate() {
            tv.row(b, row);
        }
        s.rel_bucket.clear();
        // `total` is bounded by the context length, far below i64::MAX.
        let span = total as i64 - 1;
        s.rel_bucket.extend((-span..=span).map(|r| relative_bucket(r, rb.bidirectional, rb.buckets, rb.max_distance)));
    }
    resize(&mut s.heads, nh * t * hd);
    if let Some(sinks) = &a.sinks {
        sinks.read(bytes, &mut s.w);
    }
    Heads {
        q: &s.q,
        k: &cache.k,
        v: &cache.v,
        rel: a.rel_bias.as_ref().map(|_| (&s.rel_table[..], &s.rel_bucket[..])),
        sinks: a.sinks.as_ref().map(|_| &s.w[..]),
        nh,
        group: nh / nkv,
        hk: hd,
        hv: hd,
        t,
        pos0,
        window: a.window,
        scale: a.scale,
        causal: a.causal,
    }
    .run_all(par, &mut s.heads);
    resize(&mut s.ctx, t * qd);
    for head in 0..nh {
        for tok in 0..t {
            s.ctx[tok * qd + head * hd..][..hd].copy_from_slice(&s.heads[(head * t + tok) * hd..][..hd]);
        }
    }
    matmul(par, &s.ctx, t, &a.o.view(bytes), out);
    if let Some(b) = &a.o_bias {
        b.read(bytes, &mut s.w);
        for row in out.chunks_mut(s.w.len()) {
            crate::kernels::add_into(row, &s.w);
        }
    }
}

/// Everything the per-head part of [`attention`] (and of MLA's) reads: queries
/// `[T, heads · hk]`, the cached keys `[positions, hk]` and values `[positions, hv]` of each
/// kv head, and the options of the layer.
pub(crate) struct Heads<'a> {
    pub(crate) q: &'a [f32],
    pub(crate) k: &'a [Vec<f32>],
    pub(crate) v: &'a [Vec<f32>],
    /// The relative bias table `[buckets, heads]` and the bucket of every relative position.
    pub(crate) rel: Option<(&'a [f32], &'a [usize])>,
    pub(crate) sinks: Option<&'a [f32]>,
    pub(crate) nh: usize,
    pub(crate) group: usize,
    /// Values per head of the queries and keys, and of the values (they differ in MLA).
    pub(crate) hk: usize,
    pub(crate) hv: usize,
    pub(crate) t: usize,
    pub(crate) pos0: usize,
    pub(crate) window: usize,
    pub(crate) scale: f32,
    pub(crate) causal: bool,
}

impl Heads<'_> {
    /// Every head's output, `out` `[heads, T, hv]`. Heads sharing a kv head run in one task,
    /// so each key and value row is read once for all of them; a group is split when there
    /// would be fewer tasks than threads. The values do not depend on the split.
    pub(crate) fn run_all(&self, par: &dyn Parallel, out: &mut [f32]) {
        let (nh, t) = (self.nh, self.t);
        let threads = par.threads();
        let per_task = (1..=self.group).rev().find(|&g| self.group.is_multiple_of(g) && nh / g >= threads).unwrap_or(1);
        let task = |i: usize, o: &mut [f32]| self.run(i * per_task, o);
        let macs = nh * t * (self.pos0 + t) * (self.hk + self.hv);
        if threads > 1 && macs >= PARALLEL_MIN_MACS {
            par.for_each_chunk(out, per_task * t * self.hv, &task);
        } else {
            for (i, o) in out.chunks_mut(per_task * t * self.hv).enumerate() {
                task(i, o);
            }
        }
    }

    /// Outputs `o` `[heads, T, hv]` of the query heads `h0..` (as many as `o` holds, all
    /// in the kv group of `h0`).
    fn run(&self, h0: usize, o: &mut [f32]) {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked on the line above).
            return unsafe { self.run_avx2(h0, o) };
        }
        // SAFETY: NEON is part of every aarch64 target this builds for (checked at compile
        // time by the `cfg`).
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        return unsafe { self.run_any::<Simd<neon::Neon>>(h0, o) };
        #[cfg(not(all(target_arch = "aarch64", target_feature = "neon")))]
        // SAFETY: the portable loops need no CPU feature.
        unsafe {
            self.run_any::<Portable>(h0, o)
        }
    }

    /// The same code with 256-bit vectors and the [`Simd`] loops on AVX2. No FMA: multiply and
    /// add round separately as in the portable loops, so the values are the same bits.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, h0: usize, o: &mut [f32]) {
        // SAFETY: the CPU has AVX2 (caller).
        unsafe { self.run_any::<Simd<avx2::Avx2>>(h0, o) }
    }

    /// Scores, softmax and weighted values, token by token. Key row `j` is dotted with every
    /// query of the task while it is in L1, then value row `j` is added to every output: the
    /// same operations, in the same order per head, as one head at a time.
    ///
    /// # Safety
    /// The CPU supports what `L` needs.
    #[inline(always)]
    unsafe fn run_any<L: HeadLoops>(&self, h0: usize, o: &mut [f32]) {
        let (hk, hv, t, nh) = (self.hk, self.hv, self.t, self.nh);
        let g = o.len() / (t * hv);
        let kvh = h0 / self.group;
        let total = self.pos0 + t;
        let span_max = if self.window > 0 { self.window.min(total) } else { total };
        let mut scores = Vec::with_capacity(g * span_max);
        for tok in 0..t {
            let i = self.pos0 + tok;
            // Bidirectional (encoder): every key; causal: keys up to the query, in the window.
            let (lo, hi) = if !self.causal {
                (0, total - 1)
            } else if self.window > 0 {
                ((i + 1).saturating_sub(self.window), i)
            } else {
                (0, i)
            };
            let span = hi + 1 - lo;
            scores.clear();
            scores.resize(g * span, 0.0);
            let q = &self.q[tok * nh * hk + h0 * hk..][..g * hk];
            // SAFETY: the CPU supports `L` (caller).
            unsafe { L::scores(q, hk, &self.k[kvh][lo * hk..], hk, span, self.scale, &mut scores) };
            for (hh, sc) in scores.chunks_exact_mut(span).enumerate() {
                let head = h0 + hh;
                if let Some((table, bucket)) = self.rel {
                    // bucket[r + total − 1] is the bucket of relative position r = j − i.
                    for (s, j) in sc.iter_mut().zip(lo..=hi) {
                        *s += table[bucket[j + total - 1 - i] * nh + head];
                    }
                }
                match self.sinks {
                    Some(sk) => softmax_with_sink(sc, sk[head]),
                    None => softmax_in_place(sc),
                }
            }
            for hh in 0..g {
                o[(hh * t + tok) * hv..][..hv].fill(0.0);
            }
            // SAFETY: as above.
            unsafe { L::weighted(&scores, span, &self.v[kvh][lo * hv..], hv, hv, &mut o[tok * hv..], t * hv) };
        }
    }
}

/// The two inner loops of [`Heads::run_any`]: [`Portable`] in plain Rust, [`avx2::Avx2`] the
/// same arithmetic in the same order (no FMA) with explicit 256-bit vectors.
trait HeadLoops {
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

/// The loops as plain Rust (vectorised by the compiler as far as it can). On aarch64 only the
/// tests run them (to compare).
#[cfg_attr(all(target_arch = "aarch64", target_feature = "neon"), allow(dead_code))]
struct Portable;

impl HeadLoops for Portable {
    #[inline(always)]
    unsafe fn scores(q: &[f32], hd: usize, rows: &[f32], stride: usize, span: usize, scale: f32, scores: &mut [f32]) {
        for jj in 0..span {
            let k = &rows[jj * stride..][..hd];
            for (hh, qv) in q.chunks_exact(hd).enumerate() {
                scores[hh * span + jj] = dot(qv, k) * scale;
            }
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
        for jj in 0..span {
            let v = &rows[jj * stride..][..hd];
            for hh in 0..g {
                let p = scores[hh * span + jj];
                for (acc, &x) in o[hh * ostride..][..hd].iter_mut().zip(v) {
                    *acc += p * x;
                }
            }
        }
    }
}

#[cfg(any(all(feature = "std", target_arch = "x86_64"), all(target_arch = "aarch64", target_feature = "neon")))]
/// The vector pieces of the SIMD loops; [`Simd`] builds [`HeadLoops`] from them. No fused
/// multiply-add anywhere, so the values are the bits of the portable loops.
trait SimdOps {
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

#[cfg(any(all(feature = "std", target_arch = "x86_64"), all(target_arch = "aarch64", target_feature = "neon")))]
/// Hints every cache line of `n` values at `p`.
#[inline(always)]
fn prefetch_row<O: SimdOps>(p: *const f32, n: usize) {
    for off in (0..n).step_by(16) {
        O::prefetch(p.wrapping_add(off));
    }
}

#[cfg(any(all(feature = "std", target_arch = "x86_64"), all(target_arch = "aarch64", target_feature = "neon")))]
/// Value rows per block of [`HeadLoops::weighted`]: a block of one kv head's rows stays in L1
/// while every 16-column slice of it is accumulated.
const VROWS: usize = 32;

#[cfg(any(all(feature = "std", target_arch = "x86_64"), all(target_arch = "aarch64", target_feature = "neon")))]
/// [`HeadLoops`] on a vector unit: scores four keys at a time (one dot product is a chain of
/// dependent additions, four are independent), values in blocks of [`VROWS`] rows × 16 columns
/// × up to four queries with the sums in registers (the portable loop loads and stores them
/// per row), and prefetches, because a layer's cache is cold after a token's weights streamed
/// past.
struct Simd<O>(core::marker::PhantomData<O>);

#[cfg(any(all(feature = "std", target_arch = "x86_64"), all(target_arch = "aarch64", target_feature = "neon")))]
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

#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx2 {
    use super::{SimdOps, prefetch_row};
    use core::arch::x86_64::*;

    /// 256-bit AVX2 (run-time detected by the caller).
    pub(super) struct Avx2;

    impl SimdOps for Avx2 {
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn dot4(q: *const f32, k: [*const f32; 4], n: usize) -> [f32; 4] {
            let full = n / 8 * 8;
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            // SAFETY: c + 8 ≤ full ≤ n: within every row (contract).
            unsafe {
                while c < full {
                    let qv = _mm256_loadu_ps(q.add(c));
                    a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(qv, _mm256_loadu_ps(k[0].add(c))));
                    a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(qv, _mm256_loadu_ps(k[1].add(c))));
                    a[2] = _mm256_add_ps(a[2], _mm256_mul_ps(qv, _mm256_loadu_ps(k[2].add(c))));
                    a[3] = _mm256_add_ps(a[3], _mm256_mul_ps(qv, _mm256_loadu_ps(k[3].add(c))));
                    c += 8;
                }
            }
            let mut out = [0.0f32; 4];
            for p in 0..4 {
                let mut tail = 0.0f32;
                for i in full..n {
                    // SAFETY: i < n (contract).
                    tail += unsafe { *q.add(i) * *k[p].add(i) };
                }
                let s = _mm_add_ps(_mm256_castps256_ps128(a[p]), _mm256_extractf128_ps::<1>(a[p]));
                let u = _mm_add_ps(s, _mm_movehdup_ps(s));
                out[p] = _mm_cvtss_f32(_mm_add_ss(u, _mm_movehl_ps(u, u))) + tail;
            }
            out
        }

        #[inline]
        #[target_feature(enable = "avx2")]
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
                let mut acc = [[_mm256_setzero_ps(); 2]; H];
                for (h, a) in acc.iter_mut().enumerate() {
                    let at = o.add(h * ostride);
                    *a = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
                }
                for jj in j0..j1 {
                    if let Some(hd) = pf {
                        prefetch_row::<Avx2>(r.wrapping_add((jj + 4) * stride), hd);
                    }
                    let v = r.add(jj * stride);
                    let (v0, v1) = (_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8)));
                    for (h, a) in acc.iter_mut().enumerate() {
                        let p = _mm256_set1_ps(*s.add(h * span + jj));
                        a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(p, v0));
                        a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(p, v1));
                    }
                }
                for (h, a) in acc.iter().enumerate() {
                    let at = o.add(h * ostride);
                    _mm256_storeu_ps(at, a[0]);
                    _mm256_storeu_ps(at.add(8), a[1]);
                }
            }
        }

        #[inline(always)]
        fn prefetch(p: *const f32) {
            // SAFETY: a prefetch neither faults nor writes; `p` is never dereferenced.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }
    }
}

/// 128-bit NEON, two registers per 8-lane partial sum (NEON is part of every aarch64 target
/// this builds for).
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon {
    use super::{SimdOps, prefetch_row};
    use core::arch::aarch64::*;

    pub(super) struct Neon;

    impl SimdOps for Neon {
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
                        prefetch_row::<Neon>(r.wrapping_add((jj + 4) * stride), hd);
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
            // SAFETY: a prefetch neither faults nor writes; `p` is never dereferenced.
            unsafe { core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Serial;

    /// One head at a time, as the attention was written before heads were grouped.
    fn one_head(h: &Heads<'_>, head: usize, o: &mut [f32]) {
        let (hk, hv, t, nh) = (h.hk, h.hv, h.t, h.nh);
        let kvh = head / h.group;
        let total = h.pos0 + t;
        for tok in 0..t {
            let i = h.pos0 + tok;
            let (lo, hi) = match (h.causal, h.window) {
                (false, _) => (0, total - 1),
                (true, 0) => (0, i),
                (true, w) => ((i + 1).saturating_sub(w), i),
            };
            let qv = &h.q[tok * nh * hk + head * hk..][..hk];
            let mut sc: Vec<f32> = (lo..=hi).map(|j| dot(qv, &h.k[kvh][j * hk..][..hk]) * h.scale).collect();
            if let Some((table, bucket)) = h.rel {
                for (s, j) in sc.iter_mut().zip(lo..=hi) {
                    *s += table[bucket[j + total - 1 - i] * nh + head];
                }
            }
            match h.sinks {
                Some(sk) => softmax_with_sink(&mut sc, sk[head]),
                None => softmax_in_place(&mut sc),
            }
            let ov = &mut o[tok * hv..][..hv];
            ov.fill(0.0);
            for (j, &p) in (lo..=hi).zip(&sc) {
                for (acc, &v) in ov.iter_mut().zip(&h.v[kvh][j * hv..][..hv]) {
                    *acc += p * v;
                }
            }
        }
    }

    #[test]
    fn grouped_heads_equal_one_head_at_a_time() {
        let mut seed = 7u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Head sizes with and without tails of 8 and 16 columns; more keys than one block of
        // value rows; GQA groups of 6, and MLA's shape (one query head per key head, keys wider
        // than values).
        for (nkv, hk, hv) in [(2, 20, 20), (2, 40, 40), (2, 64, 64), (12, 24, 16), (12, 40, 20)] {
            check_heads(&mut rnd, nkv, hk, hv);
        }
    }

    fn check_heads(rnd: &mut impl FnMut() -> f32, nkv: usize, hk: usize, hv: usize) {
        let (nh, pos0, t) = (12, 70, 5);
        let total = pos0 + t;
        let q: Vec<f32> = (0..t * nh * hk).map(|_| rnd()).collect();
        let mut cache = LayerCache::default();
        let k: Vec<f32> = (0..total * nkv * hk).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..total * nkv * hv).map(|_| rnd()).collect();
        cache.append(&k, &v, nkv, hk, hv);
        // Per head, the cache holds each position's slice of the interleaved rows.
        for (j, (kr, vr)) in k.chunks(nkv * hk).zip(v.chunks(nkv * hv)).enumerate() {
            for h in 0..nkv {
                assert_eq!(cache.k[h][j * hk..][..hk], kr[h * hk..][..hk]);
                assert_eq!(cache.v[h][j * hv..][..hv], vr[h * hv..][..hv]);
            }
        }
        let table: Vec<f32> = (0..6 * nh).map(|_| rnd()).collect();
        let bucket: Vec<usize> = (0..2 * total - 1).map(|r| r % 6).collect();
        let sinks: Vec<f32> = (0..nh).map(|_| rnd()).collect();
        for (causal, window, rel, sink) in [(true, 0, false, false), (true, 4, false, true), (false, 0, true, false)] {
            let h = Heads {
                q: &q,
                k: &cache.k,
                v: &cache.v,
                rel: rel.then_some((&table[..], &bucket[..])),
                sinks: sink.then_some(&sinks[..]),
                nh,
                group: nh / nkv,
                hk,
                hv,
                t,
                pos0,
                window,
                scale: 0.3,
                causal,
            };
            let what =
                format!("kv heads {nkv}, widths {hk}/{hv}, causal {causal} window {window} rel {rel} sink {sink}");
            let mut want = vec![0.0; nh * t * hv];
            for (head, o) in want.chunks_mut(t * hv).enumerate() {
                one_head(&h, head, o);
            }
            // Every split of a group, and both the portable loops and the dispatched ones
            // (AVX2 or NEON where the CPU has them).
            for per_task in [1, 2, 3, 6].into_iter().filter(|&g| h.group.is_multiple_of(g)) {
                let mut got = vec![0.0; nh * t * hv];
                for (i, o) in got.chunks_mut(per_task * t * hv).enumerate() {
                    // SAFETY: the portable loops need no CPU feature.
                    unsafe { h.run_any::<Portable>(i * per_task, o) };
                }
                assert_eq!(got, want, "{what}: {per_task} heads per task");
                let mut got = vec![0.0; nh * t * hv];
                for (i, o) in got.chunks_mut(per_task * t * hv).enumerate() {
                    h.run(i * per_task, o);
                }
                assert_eq!(got, want, "{what}: dispatched, {per_task} heads per task");
            }
            let mut got = vec![0.0; nh * t * hv];
            h.run_all(&Serial, &mut got);
            assert_eq!(got, want, "{what}: run_all");
        }
    }
}
