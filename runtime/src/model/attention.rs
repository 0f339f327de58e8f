//! Grouped-query self-attention with a KV cache: projections (+ biases), q/k norm (per head
//! or full width), clipping, RoPE, causal (optionally sliding-window) or bidirectional
//! softmax attention, optionally with a T5-style relative position bias.

use super::kv::{KvBuf, KvDtype};
use super::plan::{AttnPlan, Rope, relative_bucket};
use crate::config::QkNorm;
use crate::kernels::{
    Acts, Gemv, HeadJob, HeadLoops, Parallel, gemv_many, matmul, matmul_acts, rmsnorm_in_place, run_heads,
    softmax_in_place,
};
use alloc::vec::Vec;

/// Keys and values of every position seen so far: one buffer per kv head, `[positions, hk]`
/// and `[positions, hv]`, in the session's [`KvDtype`]. A head's task then reads its keys and
/// values in address order; interleaved `[positions, kv_heads · hk]` rows made each task read
/// every other slice of a row, a pattern the hardware prefetcher follows less well (see
/// `kernels::q8::run`). An MLA layer caching its latent has one key buffer (the latent and
/// rotary key) and no value buffer: its values are the first values of each key row.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    pub dtype: KvDtype,
    /// Values per row of each kv head's keys and of its values (0 until the first append).
    pub hk: usize,
    pub hv: usize,
    pub k: Vec<KvBuf>,
    pub v: Vec<KvBuf>,
}

impl LayerCache {
    /// An empty cache storing `dtype`.
    pub(crate) fn new(dtype: KvDtype) -> Self {
        Self { dtype, hk: 0, hv: 0, k: Vec::new(), v: Vec::new() }
    }

    /// Appends tokens whose keys `k` are rows of `heads · hk` values and values `v` rows of
    /// `heads · hv` values (`hv` 0: no value buffers).
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], heads: usize, hk: usize, hv: usize) {
        (self.hk, self.hv) = (hk, hv);
        for (cache, rows, width) in [(&mut self.k, k, hk), (&mut self.v, v, hv)] {
            if width == 0 {
                continue;
            }
            let dtype = self.dtype;
            cache.resize_with(heads, || KvBuf::new(dtype));
            for row in rows.chunks_exact(heads * width) {
                for (dst, src) in cache.iter_mut().zip(row.chunks_exact(width)) {
                    dst.push(src);
                }
            }
        }
    }

    /// Keeps the first `len` positions.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.k.iter_mut().for_each(|k| k.truncate(len, self.hk));
        self.v.iter_mut().for_each(|v| v.truncate(len, self.hv));
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvBuf::bytes).sum()
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
    if !a.qk_norm_after_rope {
        qk_norm(bytes, a, eps, s);
    }
    if let Some(c) = a.clip {
        for v in s.q.iter_mut().chain(s.k.iter_mut()).chain(s.v.iter_mut()) {
            *v = v.clamp(-c, c);
        }
    }
    resize(&mut s.cos, a.rope_dim / 2);
    resize(&mut s.sin, a.rope_dim / 2);
    for tok in (0..t).filter(|_| a.rope) {
        rope.angles(pos0 + tok, &mut s.cos, &mut s.sin);
        for head in s.q[tok * qd..][..qd].chunks_mut(hd).chain(s.k[tok * kvd..][..kvd].chunks_mut(hd)) {
            rope.rotate(head, &s.cos, &s.sin);
        }
    }
    if a.qk_norm_after_rope {
        qk_norm(bytes, a, eps, s);
    }
    if a.qk_rms_after_rope {
        // Llama-4's L2Norm: x · rsqrt(mean(x²) + eps), no weight (times 1, exact).
        resize(&mut s.w, hd);
        s.w.fill(1.0);
        for head in s.q.chunks_mut(hd).chain(s.k.chunks_mut(hd)) {
            rmsnorm_in_place(head, &s.w, eps);
        }
    }
    if let Some((floor_scale, scale)) = a.temperature {
        // Llama-4's temperature tuning, in f32 as transformers computes it.
        for (tok, row) in s.q.chunks_mut(qd).enumerate() {
            let p = (pos0 + tok) as f32;
            let f = libm::log1pf(libm::floorf((p + 1.0) / floor_scale)) * scale + 1.0;
            row.iter_mut().for_each(|v| *v *= f);
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
        vstride: hd,
        rel: a.rel_bias.as_ref().map(|_| (&s.rel_table[..], &s.rel_bucket[..])),
        sinks: a.sinks.as_ref().map(|_| &s.w[..]),
        nh,
        group: nh / nkv,
        hk: hd,
        hv: hd,
        t,
        pos0,
        window: a.window,
        chunk: a.chunk,
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
    if let Some(g) = &a.gate {
        // Gated attention output: ctx ⊙ sigmoid(gate · x), per head dimension.
        resize(&mut s.qkv, t * qd);
        matmul_acts(par, &xa, &g.view(bytes), &mut s.qkv);
        for (c, &gv) in s.ctx.iter_mut().zip(&s.qkv) {
            *c *= 1.0 / (1.0 + crate::kernels::exp(-gv));
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

/// The q/k norm (`model.qk_norm`) on `s.q` and `s.k`: over each head's values, or over the
/// whole projection.
fn qk_norm(bytes: &[u8], a: &AttnPlan, eps: f32, s: &mut AttnScratch) {
    let (qd, kvd) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let norm_width = match a.qk_norm {
        QkNorm::None => return,
        QkNorm::PerHead => a.head_dim,
        QkNorm::Full => usize::MAX,
    };
    for (buf, w, width) in [(&mut s.q, &a.q_norm, qd), (&mut s.k, &a.k_norm, kvd)] {
        if let Some(w) = w {
            w.read(bytes, &mut s.w);
            for piece in buf.chunks_mut(norm_width.min(width)) {
                rmsnorm_in_place(piece, &s.w, eps);
            }
        }
    }
}

/// Everything the per-head part of [`attention`] (and of MLA's) reads: queries
/// `[T, heads · hk]`, the cached keys `[positions, hk]` and values (`hv` values `vstride`
/// apart) of each kv head, and the options of the layer.
pub(crate) struct Heads<'a> {
    pub(crate) q: &'a [f32],
    pub(crate) k: &'a [KvBuf],
    pub(crate) v: &'a [KvBuf],
    /// Values from one cached value row to the next (`hv`, or the key width when the values
    /// are the start of the key rows: MLA's latent).
    pub(crate) vstride: usize,
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
    /// Attend within aligned chunks of this many positions; 0 = all.
    pub(crate) chunk: usize,
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
    /// in the kv group of `h0`), with the best loops this CPU has ([`run_heads`]).
    fn run(&self, h0: usize, o: &mut [f32]) {
        run_heads(self, h0, o)
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
        let vs = self.vstride;
        // The rows any of the tokens reads, from the first token's lowest (f16 and int8
        // decoded once per task).
        let lo0 = if self.causal && self.window > 0 { (self.pos0 + 1).saturating_sub(self.window) } else { 0 };
        let (mut kt, mut vt) = (Vec::new(), Vec::new());
        let keys = self.k[kvh].rows_f32(lo0, total, hk, &mut kt);
        let vals = self.v[kvh].rows_f32(lo0, total, vs, &mut vt);
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
            let lo = if self.chunk > 0 { lo.max(i - i % self.chunk) } else { lo };
            let span = hi + 1 - lo;
            scores.clear();
            scores.resize(g * span, 0.0);
            let q = &self.q[tok * nh * hk + h0 * hk..][..g * hk];
            // SAFETY: the CPU supports `L` (caller).
            unsafe { L::scores(q, hk, &keys[(lo - lo0) * hk..], hk, span, self.scale, &mut scores) };
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
            unsafe { L::weighted(&scores, span, &vals[(lo - lo0) * vs..], vs, hv, &mut o[tok * hv..], t * hv) };
        }
    }
}

impl HeadJob for Heads<'_> {
    #[inline(always)]
    unsafe fn run_with<L: HeadLoops>(&self, h0: usize, o: &mut [f32]) {
        // SAFETY: the CPU supports what `L` needs (caller).
        unsafe { self.run_any::<L>(h0, o) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{Portable, Serial, dot};

    /// One head at a time, as the attention was written before heads were grouped.
    fn one_head(h: &Heads<'_>, head: usize, o: &mut [f32]) {
        let (hk, hv, t, nh) = (h.hk, h.hv, h.t, h.nh);
        let kvh = head / h.group;
        let total = h.pos0 + t;
        let (mut kt, mut vt) = (Vec::new(), Vec::new());
        let keys = h.k[kvh].rows_f32(0, total, hk, &mut kt);
        let vals = h.v[kvh].rows_f32(0, total, h.vstride, &mut vt);
        for tok in 0..t {
            let i = h.pos0 + tok;
            let (lo, hi) = match (h.causal, h.window) {
                (false, _) => (0, total - 1),
                (true, 0) => (0, i),
                (true, w) => ((i + 1).saturating_sub(w), i),
            };
            // Chunked attention (chunk > 0): not before the start of the query's chunk.
            let lo = i.checked_div(h.chunk).map_or(lo, |c| lo.max(c * h.chunk));
            let qv = &h.q[tok * nh * hk + head * hk..][..hk];
            let mut sc: Vec<f32> = (lo..=hi).map(|j| dot(qv, &keys[j * hk..][..hk]) * h.scale).collect();
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
                for (acc, &v) in ov.iter_mut().zip(&vals[j * h.vstride..][..hv]) {
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
        // Every KV dtype (f16 and int8 rows are decoded per task: the same values as one head
        // at a time over the decoded rows), and MLA's latent (values read from the key rows).
        for dtype in KvDtype::ALL {
            for (nkv, hk, hv) in [(2, 20, 20), (2, 40, 40), (2, 64, 64), (12, 24, 16), (12, 40, 20)] {
                check_heads(&mut rnd, dtype, nkv, hk, hv, false);
            }
            check_heads(&mut rnd, dtype, 1, 40, 32, true);
        }
    }

    fn check_heads(rnd: &mut impl FnMut() -> f32, dtype: KvDtype, nkv: usize, hk: usize, hv: usize, latent: bool) {
        let (nh, pos0, t) = (12, 70, 5);
        let total = pos0 + t;
        let q: Vec<f32> = (0..t * nh * hk).map(|_| rnd()).collect();
        let mut cache = LayerCache::new(dtype);
        let k: Vec<f32> = (0..total * nkv * hk).map(|_| rnd()).collect();
        let v: Vec<f32> = if latent { Vec::new() } else { (0..total * nkv * hv).map(|_| rnd()).collect() };
        cache.append(&k, &v, nkv, hk, if latent { 0 } else { hv });
        let mut tmp = Vec::new();
        // Per head, the cache holds each position's slice of the interleaved rows.
        for (j, kr) in k.chunks(nkv * hk).enumerate().filter(|_| dtype == KvDtype::F32) {
            for h in 0..nkv {
                assert_eq!(cache.k[h].rows_f32(j, j + 1, hk, &mut tmp), &kr[h * hk..][..hk]);
            }
        }
        for (j, vr) in v.chunks(nkv * hv).enumerate().filter(|_| dtype == KvDtype::F32) {
            for h in 0..nkv {
                assert_eq!(cache.v[h].rows_f32(j, j + 1, hv, &mut tmp), &vr[h * hv..][..hv]);
            }
        }
        let (vals, vstride) = if latent { (&cache.k, hk) } else { (&cache.v, hv) };
        let table: Vec<f32> = (0..6 * nh).map(|_| rnd()).collect();
        let bucket: Vec<usize> = (0..2 * total - 1).map(|r| r % 6).collect();
        let sinks: Vec<f32> = (0..nh).map(|_| rnd()).collect();
        for (causal, window, chunk, rel, sink) in [
            (true, 0, 0, false, false),
            (true, 4, 0, false, true),
            (false, 0, 0, true, false),
            (true, 0, 8, false, false),
        ] {
            let h = Heads {
                q: &q,
                k: &cache.k,
                v: vals,
                vstride,
                rel: rel.then_some((&table[..], &bucket[..])),
                sinks: sink.then_some(&sinks[..]),
                nh,
                group: nh / nkv,
                hk,
                hv,
                t,
                pos0,
                window,
                chunk,
                scale: 0.3,
                causal,
            };
            let what = format!(
                "{dtype}: kv heads {nkv}, widths {hk}/{hv}, latent {latent}, causal {causal} window {window} chunk {chunk} rel {rel} sink {sink}"
            );
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
