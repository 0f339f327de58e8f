//! LFM2's gated short convolution: a recurrent token mixer whose whole state is the last
//! `kernel − 1` inputs of its convolution.
//!
//! Per token: `b`, `c`, `x` projections of the normalised input (`[h]` each); `b ⊙ x` passes
//! through a causal depthwise convolution over the hidden channels (no bias, no activation);
//! the output is `out · (c ⊙ conv)`. Prompts and decoding run the same convolution, so a
//! prompt and the same tokens fed one at a time give the same state and outputs.

use super::plan::ShortConvPlan;
use super::recurrent::{RecurrentState, causal_conv};
use crate::kernels::{Acts, Parallel, matmul, matmul_acts};
use alloc::vec::Vec;

/// A zero state for `p`: the last `kernel − 1` convolution inputs (`[kernel − 1, h]`).
pub(crate) fn zero_state(p: &ShortConvPlan) -> RecurrentState {
    RecurrentState::zeros(p.conv.rows * (p.kernel - 1), 0)
}

/// Reusable buffers of the short convolution block.
#[derive(Debug, Default)]
pub(crate) struct ShortConvScratch {
    b: Vec<f32>,
    c: Vec<f32>,
    x: Vec<f32>,
    conv_w: Vec<f32>,
    conv_out: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// The gated short convolution for `t` tokens of normalised input `x` `[T, H]`, continuing
/// from `state` (updated); writes the output projection to `out` `[T, H]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn short_conv(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &ShortConvPlan,
    state: &mut RecurrentState,
    x: &[f32],
    t: usize,
    s: &mut ShortConvScratch,
    out: &mut [f32],
) {
    let (h, kw) = (p.conv.rows, p.kernel);
    let xa = Acts::new(x, t);
    for (m, buf) in [(&p.b, &mut s.b), (&p.c, &mut s.c), (&p.x, &mut s.x)] {
        resize(buf, t * h);
        matmul_acts(par, &xa, &m.view(bytes), buf);
    }
    // b ⊙ x, in b's buffer.
    s.b.iter_mut().zip(&s.x).for_each(|(b, &x)| *b *= x);
    resize(&mut s.conv_w, h * kw);
    let cv = p.conv.view(bytes);
    for (ch, row) in s.conv_w.chunks_mut(kw).enumerate() {
        cv.row(ch, row);
    }
    causal_conv(&s.b, t, h, kw, &s.conv_w, None, false, &mut state.conv, &mut s.conv_out);
    // c ⊙ conv, in c's buffer.
    s.c.iter_mut().zip(&s.conv_out).for_each(|(c, &v)| *c *= v);
    matmul(par, &s.c, t, &p.out.view(bytes), out);
}
