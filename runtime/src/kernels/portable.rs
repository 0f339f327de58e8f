//! The portable kernels: plain Rust that runs on every CPU (and that the compiler vectorises as
//! far as it can). The architecture files beside this one hold the SIMD versions; the tests
//! compare them with these.

use super::dot;
use super::heads::HeadLoops;
use super::q8::{Micro, QActs, QWeights, scale};
use crate::quant::QK;

/// The portable code: the Q8_0 micro-kernel ([`Micro`]) and the attention loops
/// ([`HeadLoops`]).
pub(crate) struct Portable;

/// The portable Q8_0 loop: exact i32 per block, then `acc += (dw·dx) · sum` in block order.
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

/// One row's Q8_0 dot product with one token's activations.
pub(super) fn dot_portable(wq: &[u8], ws: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
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

/// The attention loops as plain Rust. On aarch64 only the tests run them (to compare).
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
