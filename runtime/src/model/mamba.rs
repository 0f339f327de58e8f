//! Mamba2 (Granite-4 hybrid): a recurrent token mixer with a fixed-size state.
//!
//! Per token: the input projection gives the gate `z` `[inner]`, `x, B, C` (the convolution's
//! channels: `inner + 2 · groups · N`) and `dt` `[heads]`; `x, B, C` pass through a causal
//! depthwise convolution (with bias) and SiLU. Each head `h` (group `g = h / (heads / groups)`)
//! keeps a state `S_h` `[head_dim, N]` updated by the selective state space rule
//! `Δ = softplus(dt_h + dt_bias_h);  S ← exp(Δ·A_h)·S + Δ·x_h ⊗ B_g;  y_h = S·C_g + D_h·x_h`
//! with `A_h = −exp(a_log_h)`; then `y ⊙ silu(z)` is RMS-normalised per group of
//! `inner / groups` channels (times the norm weight) and projected out.
//!
//! Prompts and decoding run the same recurrence token by token (transformers' prompt path,
//! the chunked SSD form of the same rule, differs from it by rounding only), so a prompt and
//! the same tokens fed one at a time give the same state and outputs.

use super::plan::Mamba2Plan;
use super::recurrent::{RecurrentState, causal_conv};
use crate::kernels::{Acts, Parallel, matmul, matmul_acts, silu};
use alloc::vec::Vec;

/// A zero state for `p`'s sizes: the last `conv_kernel − 1` convolution inputs
/// (`[kernel − 1, conv_dim]`) and the SSM state `[heads, head_dim, N]`.
pub(crate) fn zero_state(p: &Mamba2Plan) -> RecurrentState {
    let d = &p.dims;
    RecurrentState::zeros(d.conv_dim() * (d.conv_kernel - 1), d.inner() * d.state_size)
}

/// Reusable buffers of the Mamba2 block.
#[derive(Debug, Default)]
pub(crate) struct MambaScratch {
    /// `[T, conv_dim]`: x, B, C before the convolution, then after it.
    xbc: Vec<f32>,
    conv_out: Vec<f32>,
    z: Vec<f32>,
    dt: Vec<f32>,
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    dt_bias: Vec<f32>,
    a_log: Vec<f32>,
    d: Vec<f32>,
    w: Vec<f32>,
    /// `[T, inner]`: the scan's output, gated and normalised in place.
    y: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// `ln(1 + eˣ)` as torch's `softplus` (beta 1, threshold 20: linear above it).
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { libm::log1pf(libm::expf(x)) }
}

/// The Mamba2 block for `t` tokens of normalised input `x` `[T, H]`, continuing from `state`
/// (updated); writes the output projection to `out` `[T, H]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mamba2(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &Mamba2Plan,
    state: &mut RecurrentState,
    x: &[f32],
    t: usize,
    s: &mut MambaScratch,
    out: &mut [f32],
) {
    let d = &p.dims;
    let (nh, hd, n, kw) = (d.num_heads, d.head_dim, d.state_size, d.conv_kernel);
    let (inner, cd) = (d.inner(), d.conv_dim());
    let gn = d.n_groups * n;
    let xa = Acts::new(x, t);
    resize(&mut s.z, t * inner);
    matmul_acts(par, &xa, &p.z.view(bytes), &mut s.z);
    resize(&mut s.xbc, t * cd);
    matmul_acts(par, &xa, &p.xbc.view(bytes), &mut s.xbc);
    resize(&mut s.dt, t * nh);
    matmul_acts(par, &xa, &p.dt.view(bytes), &mut s.dt);

    resize(&mut s.conv_w, cd * kw);
    let cv = p.conv.view(bytes);
    for (c, row) in s.conv_w.chunks_mut(kw).enumerate() {
        cv.row(c, row);
    }
    let bias = match &p.conv_bias {
        Some(b) => {
            b.read(bytes, &mut s.conv_b);
            Some(s.conv_b.as_slice())
        }
        None => None,
    };
    causal_conv(&s.xbc, t, cd, kw, &s.conv_w, bias, true, &mut state.conv, &mut s.conv_out);

    p.dt_bias.read(bytes, &mut s.dt_bias);
    p.a_log.read(bytes, &mut s.a_log);
    p.d.read(bytes, &mut s.d);
    p.out_norm.read(bytes, &mut s.w);
    let heads_per_group = nh / d.n_groups;
    resize(&mut s.y, t * inner);
    for tok in 0..t {
        let row = &s.conv_out[tok * cd..][..cd];
        let (xs, bc) = row.split_at(inner);
        let (bs, cs) = bc.split_at(gn);
        for h in 0..nh {
            let g = h / heads_per_group;
            let (b, c) = (&bs[g * n..][..n], &cs[g * n..][..n]);
            let delta = softplus(s.dt[tok * nh + h] + s.dt_bias[h]);
            let decay = libm::expf(delta * -libm::expf(s.a_log[h]));
            let dh = s.d[h];
            let st = &mut state.s[h * hd * n..][..hd * n];
            let y = &mut s.y[tok * inner + h * hd..][..hd];
            for ((yp, &xp), sp) in y.iter_mut().zip(&xs[h * hd..][..hd]).zip(st.chunks_exact_mut(n)) {
                // S ← exp(Δ·A)·S + (Δ·B)·x;  y = S·C + D·x.
                let mut acc = 0.0f32;
                for ((sv, &bv), &cv) in sp.iter_mut().zip(b).zip(c) {
                    *sv = *sv * decay + delta * bv * xp;
                    acc += *sv * cv;
                }
                *yp = acc + xp * dh;
            }
        }
        // Gated RMSNorm: the gate before the norm, the norm per group.
        let y = &mut s.y[tok * inner..][..inner];
        for (v, &zv) in y.iter_mut().zip(&s.z[tok * inner..][..inner]) {
            *v *= silu(zv);
        }
        let gs = inner / d.n_groups;
        for (yg, wg) in y.chunks_exact_mut(gs).zip(s.w.chunks_exact(gs)) {
            crate::kernels::rmsnorm_in_place(yg, wg, p.eps);
        }
    }
    matmul(par, &s.y, t, &p.out.view(bytes), out);
}
