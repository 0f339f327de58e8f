//! Grouped-query self-attention with a KV cache: projections (+ biases), q/k norm (per head
//! or full width), clipping, RoPE, causal (optionally sliding-window) or bidirectional
//! softmax attention, optionally with a T5-style relative position bias.

use super::plan::{AttnPlan, Rope, relative_bucket};
use crate::config::QkNorm;
use crate::kernels::{Acts, Parallel, dot, matmul, matmul_acts, rmsnorm_in_place, softmax_in_place};
use alloc::vec::Vec;

/// Keys and values of every position seen so far, `[positions, kv_heads · head_dim]` each.
#[derive(Debug, Default, Clone)]
pub(crate) struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Reusable buffers of the attention block.
#[derive(Debug, Default)]
pub(crate) struct AttnScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
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
    matmul_acts(par, &xa, &a.q.view(bytes), &mut s.q);
    matmul_acts(par, &xa, &a.k.view(bytes), &mut s.k);
    matmul_acts(par, &xa, &a.v.view(bytes), &mut s.v);
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
    cache.k.extend_from_slice(&s.k);
    cache.v.extend_from_slice(&s.v);

    // Scores and weighted values, one head per task.
    let group = nh / nkv;
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
    let (q, kc, vc) = (&s.q[..], &cache.k[..], &cache.v[..]);
    let (window, scale, causal) = (a.window, a.scale, a.causal);
    let rel = a.rel_bias.as_ref().map(|_| (&s.rel_table[..], &s.rel_bucket[..]));
    if let Some(sinks) = &a.sinks {
        sinks.read(bytes, &mut s.w);
    }
    let sinks = a.sinks.as_ref().map(|_| &s.w[..]);
    let head_task = |head: usize, o: &mut [f32]| {
        let kvh = head / group;
        let mut scores = Vec::with_capacity(if window > 0 { window.min(total) } else { total });
        for tok in 0..t {
            let i = pos0 + tok;
            // Bidirectional (encoder): every key; causal: keys up to the query, in the window.
            let (lo, hi) = if !causal {
                (0, total - 1)
            } else if window > 0 {
                ((i + 1).saturating_sub(window), i)
            } else {
                (0, i)
            };
            let qv = &q[tok * qd + head * hd..][..hd];
            scores.clear();
            scores.extend((lo..=hi).map(|j| dot(qv, &kc[j * kvd + kvh * hd..][..hd]) * scale));
            if let Some((table, bucket)) = rel {
                // bucket[r + total − 1] is the bucket of relative position r = j − i.
                for (sc, j) in scores.iter_mut().zip(lo..=hi) {
                    *sc += table[bucket[j + total - 1 - i] * nh + head];
                }
            }
            match sinks {
                Some(sk) => softmax_with_sink(&mut scores, sk[head]),
                None => softmax_in_place(&mut scores),
            }
            let ov = &mut o[tok * hd..][..hd];
            ov.fill(0.0);
            for (j, &p) in (lo..=hi).zip(&scores) {
                for (acc, &v) in ov.iter_mut().zip(&vc[j * kvd + kvh * hd..][..hd]) {
                    *acc += p * v;
                }
            }
        }
    };
    if par.threads() > 1 && nh * t * total * hd >= PARALLEL_MIN_MACS {
        par.for_each_chunk(&mut s.heads, t * hd, &head_task);
    } else {
        for (head, o) in s.heads.chunks_mut(t * hd).enumerate() {
            head_task(head, o);
        }
    }
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
