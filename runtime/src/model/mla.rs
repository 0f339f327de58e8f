//! Multi-head latent attention (DeepSeek-V2/V3), as transformers' `DeepseekV3Attention`:
//!
//! ```text
//! q       = q_b(rms(q_a x))                     (or q_proj x)      [H, nope + rope]
//! latent  = kv_a x = [c | k_rot]                c: kv_lora, k_rot: rope (one for all heads)
//! [k_nope | v] = kv_b(rms(c))                                      [H, nope + v]
//! k       = [k_nope | RoPE(k_rot)],  q = [q_nope | RoPE(q_rot)]
//! out     = o(softmax(q·k · scale) v)
//! ```
//!
//! What is cached per position is the session's [`MlaCache`]:
//!
//! - `Latent` (the default): `[rms(c) | RoPE(k_rot)]`, `kv_lora + rope` values, one row for
//!   all heads. `kv_b` is absorbed as DeepSeek's inference does: head `h`'s query becomes
//!   `[W_uk[h]ᵀ q_nope | q_rot]` (so `q·k` is unchanged), attention runs over the latent rows
//!   as one kv head shared by every query head with the latent `c` as values, and each
//!   head's output is `W_uv[h] · Σ p c`. Equal to the decompressed form up to f32 rounding
//!   (the sums run in another order).
//! - `Decompressed`: every head's keys and values (`H·(nope + rope)` and `H·v` values).

use super::attention::{Heads, LayerCache};
use super::kv::MlaCache;
use super::plan::{MlaPlan, Rope};
use crate::kernels::{Parallel, decode, dot, matmul, rmsnorm_in_place};
use alloc::vec::Vec;

/// Reusable buffers of the MLA block.
#[derive(Debug, Default)]
pub(crate) struct MlaScratch {
    q_lat: Vec<f32>,
    q: Vec<f32>,
    kv_a: Vec<f32>,
    latent: Vec<f32>,
    kv: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Per-head outputs, `[heads, T, v]`.
    heads: Vec<f32>,
    /// Head outputs re-interleaved, `[T, heads · v]`.
    ctx: Vec<f32>,
    /// Latent mode: the absorbed queries `[T, heads · (kv_lora + rope)]`, and one head's
    /// rows of `kv_b` `[nope + v, kv_lora]`.
    q_abs: Vec<f32>,
    kv_b_head: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// MLA for `t` tokens at positions `pos0..pos0 + t` on normalised input `x` `[T, H]`; appends
/// what `mode` caches of them to `cache` and writes the output projection to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    par: &dyn Parallel,
    bytes: &[u8],
    a: &MlaPlan,
    rope: &Rope,
    mode: MlaCache,
    cache: &mut LayerCache,
    pos0: usize,
    x: &[f32],
    t: usize,
    s: &mut MlaScratch,
    out: &mut [f32],
) {
    let (nh, nope, rd, vd, r) = (a.num_heads, a.nope, a.rope, a.v_dim, a.kv_lora);
    let qk = nope + rd;
    let (kd, vdim) = (nh * qk, nh * vd);

    // Queries.
    resize(&mut s.q, t * kd);
    match &a.q_a {
        Some((q_a, norm)) => {
            let q_a = q_a.view(bytes);
            resize(&mut s.q_lat, t * q_a.rows());
            matmul(par, x, t, &q_a, &mut s.q_lat);
            norm.read(bytes, &mut s.w);
            for row in s.q_lat.chunks_mut(s.w.len()) {
                rmsnorm_in_place(row, &s.w, a.latent_eps);
            }
            matmul(par, &s.q_lat, t, &a.q.view(bytes), &mut s.q);
        }
        None => matmul(par, x, t, &a.q.view(bytes), &mut s.q),
    }

    // The latent and the shared rotary key; keys and values decompressed from the latent.
    resize(&mut s.kv_a, t * (r + rd));
    matmul(par, x, t, &a.kv_a.view(bytes), &mut s.kv_a);
    a.kv_norm.read(bytes, &mut s.w);
    resize(&mut s.latent, t * r);
    for (lat, row) in s.latent.chunks_mut(r).zip(s.kv_a.chunks(r + rd)) {
        lat.copy_from_slice(&row[..r]);
        rmsnorm_in_place(lat, &s.w, a.latent_eps);
    }
    if mode == MlaCache::Latent {
        return latent_attention(par, bytes, a, rope, cache, pos0, t, s, out);
    }
    resize(&mut s.kv, t * nh * (nope + vd));
    matmul(par, &s.latent, t, &a.kv_b.view(bytes), &mut s.kv);

    // RoPE on each head's q_rot and on the shared k_rot, then the full keys and values.
    resize(&mut s.cos, rd / 2);
    resize(&mut s.sin, rd / 2);
    resize(&mut s.k, t * kd);
    resize(&mut s.v, t * vdim);
    for tok in 0..t {
        rope.angles(pos0 + tok, &mut s.cos, &mut s.sin);
        for head in s.q[tok * kd..][..kd].chunks_mut(qk) {
            rope.rotate(&mut head[nope..], &s.cos, &s.sin);
        }
        let k_rot = &mut s.kv_a[tok * (r + rd) + r..][..rd];
        rope.rotate(k_rot, &s.cos, &s.sin);
        let kv_row = &s.kv[tok * nh * (nope + vd)..][..nh * (nope + vd)];
        for (head, src) in kv_row.chunks(nope + vd).enumerate() {
            let k = &mut s.k[tok * kd + head * qk..][..qk];
            k[..nope].copy_from_slice(&src[..nope]);
            k[nope..].copy_from_slice(k_rot);
            s.v[tok * vdim + head * vd..][..vd].copy_from_slice(&src[nope..]);
        }
    }
    cache.append(&s.k, &s.v, nh, qk, vd);

    // Scores and weighted values: one query head per key head, keys wider than values.
    resize(&mut s.heads, nh * t * vd);
    Heads {
        q: &s.q,
        k: &cache.k,
        v: &cache.v,
        vstride: vd,
        rel: None,
        sinks: None,
        nh,
        group: 1,
        hk: qk,
        hv: vd,
        t,
        pos0,
        window: a.window,
        chunk: 0,
        scale: a.scale,
        causal: true,
    }
    .run_all(par, &mut s.heads);
    resize(&mut s.ctx, t * vdim);
    for head in 0..nh {
        for tok in 0..t {
            s.ctx[tok * vdim + head * vd..][..vd].copy_from_slice(&s.heads[(head * t + tok) * vd..][..vd]);
        }
    }
    matmul(par, &s.ctx, t, &a.o.view(bytes), out);
}

/// The rest of [`attention`] in [`MlaCache::Latent`] mode, from the queries `s.q`, the
/// projected latent `s.kv_a` and its normalised part `s.latent`.
#[allow(clippy::too_many_arguments)]
fn latent_attention(
    par: &dyn Parallel,
    bytes: &[u8],
    a: &MlaPlan,
    rope: &Rope,
    cache: &mut LayerCache,
    pos0: usize,
    t: usize,
    s: &mut MlaScratch,
    out: &mut [f32],
) {
    let (nh, nope, rd, vd, r) = (a.num_heads, a.nope, a.rope, a.v_dim, a.kv_lora);
    let (qk, lw) = (nope + rd, r + rd);
    let (kd, vdim) = (nh * qk, nh * vd);
    // RoPE on each head's q_rot and on the shared k_rot; the rows `[rms(c) | k_rot]` cached.
    resize(&mut s.cos, rd / 2);
    resize(&mut s.sin, rd / 2);
    resize(&mut s.k, t * lw);
    for tok in 0..t {
        rope.angles(pos0 + tok, &mut s.cos, &mut s.sin);
        for head in s.q[tok * kd..][..kd].chunks_mut(qk) {
            rope.rotate(&mut head[nope..], &s.cos, &s.sin);
        }
        let row = &mut s.k[tok * lw..][..lw];
        row[..r].copy_from_slice(&s.latent[tok * r..][..r]);
        row[r..].copy_from_slice(&s.kv_a[tok * lw + r..][..rd]);
        rope.rotate(&mut row[r..], &s.cos, &s.sin);
    }
    cache.append(&s.k, &[], 1, lw, 0);

    // Absorbed queries: head h's `q_nope · W_uk[h]` (W_uk[h]: its `nope` rows of kv_b), then
    // its rotary part.
    let kv_b = a.kv_b.view(bytes);
    resize(&mut s.q_abs, t * nh * lw);
    resize(&mut s.kv_b_head, (nope + vd) * r);
    for h in 0..nh {
        decode(&kv_b, h * (nope + vd), nope + vd, 0, r, &mut s.kv_b_head);
        for tok in 0..t {
            let q = &s.q[tok * kd + h * qk..][..qk];
            let dst = &mut s.q_abs[(tok * nh + h) * lw..][..lw];
            for (&qi, w) in q[..nope].iter().zip(s.kv_b_head.chunks_exact(r)) {
                for (d, &wv) in dst[..r].iter_mut().zip(w) {
                    *d += qi * wv;
                }
            }
            dst[r..].copy_from_slice(&q[nope..]);
        }
    }

    // Every query head attends over the one latent row per position; the values are the
    // latent `c`, the first `r` values of each row.
    resize(&mut s.heads, nh * t * r);
    Heads {
        q: &s.q_abs,
        k: &cache.k,
        v: &cache.k,
        vstride: lw,
        rel: None,
        sinks: None,
        nh,
        group: nh,
        hk: lw,
        hv: r,
        t,
        pos0,
        window: a.window,
        chunk: 0,
        scale: a.scale,
        causal: true,
    }
    .run_all(par, &mut s.heads);

    // Each head's output: `W_uv[h] · Σ p c` (W_uv[h]: its `v` rows of kv_b).
    resize(&mut s.ctx, t * vdim);
    for h in 0..nh {
        decode(&kv_b, h * (nope + vd), nope + vd, 0, r, &mut s.kv_b_head);
        for tok in 0..t {
            let c = &s.heads[(h * t + tok) * r..][..r];
            let dst = &mut s.ctx[tok * vdim + h * vd..][..vd];
            for (d, w) in dst.iter_mut().zip(s.kv_b_head[nope * r..].chunks_exact(r)) {
                *d = dot(w, c);
            }
        }
    }
    matmul(par, &s.ctx, t, &a.o.view(bytes), out);
}
