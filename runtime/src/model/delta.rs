//! Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE): a recurrent token mixer with a fixed-size state.
//!
//! Per token: q, k, v projections pass through a causal depthwise convolution (SiLU), q and k
//! are L2-normalised per head (q also scaled by `k_dim^-0.5`); each value head `h` keeps a
//! state `S_h` `[k_dim, v_dim]` updated by the gated delta rule
//! `S ← exp(g)·S;  S ← S + k ⊗ β(v − Sᵀk);  o = Sᵀq`, with `β = sigmoid(b·x)` and
//! `g = −exp(a_log)·softplus(a·x + dt_bias)`; the output is `RMSNorm(o)·w ⊙ silu(z·x)` per
//! head, then the output projection. Key head `h / (v_heads / k_heads)` serves value head `h`.
//!
//! Prompts and decoding run the same recurrence token by token, so a prompt and the same
//! tokens fed one at a time give the same state and outputs. (transformers' prompt path, the
//! chunked form of the same rule, differs from it by rounding only; see `docs/FORMAT.md`.)

use super::plan::DeltaPlan;
use super::recurrent::{RecurrentState, causal_conv};
use crate::kernels::{Acts, Parallel, exp, matmul, matmul_acts, silu};
use alloc::vec::Vec;

/// A zero state for `p`'s sizes: the last `conv_kernel − 1` convolution inputs
/// (`[kernel − 1, conv_dim]`) and the delta-rule state `[v_heads, k_dim, v_dim]`.
pub(crate) fn zero_state(p: &DeltaPlan) -> RecurrentState {
    let d = &p.dims;
    RecurrentState::zeros(d.conv_dim() * (d.conv_kernel - 1), d.num_v_heads * d.k_head_dim * d.v_head_dim)
}

/// Reusable buffers of the DeltaNet block.
#[derive(Debug, Default)]
pub(crate) struct DeltaScratch {
    /// Projections `[T, conv_dim]` (q, k, v side by side), then the convolution's output.
    qkv: Vec<f32>,
    conv_out: Vec<f32>,
    proj: Vec<f32>,
    z: Vec<f32>,
    b: Vec<f32>,
    a: Vec<f32>,
    conv_w: Vec<f32>,
    w: Vec<f32>,
    dt_bias: Vec<f32>,
    a_log: Vec<f32>,
    /// Per-token outputs of every value head `[T, v_heads · v_dim]`.
    o: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// `ln(1 + eˣ)` as torch's `softplus` (beta 1, threshold 20: linear above it).
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { libm::log1pf(libm::expf(x)) }
}

/// `x / sqrt(Σx² + 1e-6)` in place (the FLA-compatible L2 norm transformers uses).
fn l2norm(x: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / libm::sqrtf(ss + 1e-6);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// The gated DeltaNet block for `t` tokens of normalised input `x` `[T, H]`, continuing from
/// `state` (updated); writes the output projection to `out` `[T, H]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn delta_net(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &DeltaPlan,
    state: &mut RecurrentState,
    x: &[f32],
    t: usize,
    s: &mut DeltaScratch,
    out: &mut [f32],
) {
    let d = &p.dims;
    let (nk, nv, dk, dv, kw) = (d.num_k_heads, d.num_v_heads, d.k_head_dim, d.v_head_dim, d.conv_kernel);
    let (kd, vd) = (nk * dk, nv * dv);
    let cd = d.conv_dim();
    // Projections: q, k, v into one row per token (the convolution's channels), z, b, a.
    let xa = Acts::new(x, t);
    resize(&mut s.qkv, t * cd);
    for (m, off, width) in [(&p.q, 0, kd), (&p.k, kd, kd), (&p.v, 2 * kd, vd)] {
        resize(&mut s.proj, t * width);
        matmul_acts(par, &xa, &m.view(bytes), &mut s.proj);
        for (row, src) in s.qkv.chunks_mut(cd).zip(s.proj.chunks(width)) {
            row[off..off + width].copy_from_slice(src);
        }
    }
    resize(&mut s.z, t * vd);
    matmul_acts(par, &xa, &p.z.view(bytes), &mut s.z);
    resize(&mut s.b, t * nv);
    matmul_acts(par, &xa, &p.b.view(bytes), &mut s.b);
    resize(&mut s.a, t * nv);
    matmul_acts(par, &xa, &p.a.view(bytes), &mut s.a);

    // Causal depthwise convolution, SiLU, continuing from the state's last inputs.
    resize(&mut s.conv_w, cd * kw);
    let cv = p.conv.view(bytes);
    for (c, row) in s.conv_w.chunks_mut(kw).enumerate() {
        cv.row(c, row);
    }
    causal_conv(&s.qkv, t, cd, kw, &s.conv_w, None, true, &mut state.conv, &mut s.conv_out);

    p.dt_bias.read(bytes, &mut s.dt_bias);
    p.a_log.read(bytes, &mut s.a_log);
    p.out_norm.read(bytes, &mut s.w);
    let scale = 1.0 / libm::sqrtf(dk as f32);
    let group = nv / nk;
    resize(&mut s.o, t * vd);
    for tok in 0..t {
        let row = &mut s.conv_out[tok * cd..][..cd];
        let (qs, rest) = row.split_at_mut(kd);
        let (ks, vs) = rest.split_at_mut(kd);
        for (q, k) in qs.chunks_mut(dk).zip(ks.chunks_mut(dk)) {
            l2norm(q);
            q.iter_mut().for_each(|v| *v *= scale);
            l2norm(k);
        }
        for h in 0..nv {
            let kh = h / group;
            let (q, k, v) = (&qs[kh * dk..][..dk], &ks[kh * dk..][..dk], &vs[h * dv..][..dv]);
            let beta = 1.0 / (1.0 + exp(-s.b[tok * nv + h]));
            let g = -libm::expf(s.a_log[h]) * softplus(s.a[tok * nv + h] + s.dt_bias[h]);
            let decay = libm::expf(g);
            let st = &mut state.s[h * dk * dv..][..dk * dv];
            st.iter_mut().for_each(|x| *x *= decay);
            // delta = β (v − Sᵀk); S += k ⊗ delta; o = Sᵀq.
            let o = &mut s.o[tok * vd + h * dv..][..dv];
            o.fill(0.0);
            for (i, &ki) in k.iter().enumerate() {
                for (acc, &sv) in o.iter_mut().zip(&st[i * dv..][..dv]) {
                    *acc += sv * ki;
                }
            }
            // `o` holds Sᵀk for now: turn it into delta.
            for (acc, &vv) in o.iter_mut().zip(v) {
                *acc = (vv - *acc) * beta;
            }
            for (i, &ki) in k.iter().enumerate() {
                for (sv, &dl) in st[i * dv..][..dv].iter_mut().zip(o.iter()) {
                    *sv += ki * dl;
                }
            }
            o.fill(0.0);
            for (i, &qi) in q.iter().enumerate() {
                for (acc, &sv) in o.iter_mut().zip(&st[i * dv..][..dv]) {
                    *acc += sv * qi;
                }
            }
            // Gated RMSNorm: weight · (o · rsqrt(mean(o²) + eps)) · silu(z).
            crate::kernels::rmsnorm_in_place(o, &s.w, p.eps);
            for (v, &zv) in o.iter_mut().zip(&s.z[tok * vd + h * dv..][..dv]) {
                *v *= silu(zv);
            }
        }
    }
    matmul(par, &s.o, t, &p.out.view(bytes), out);
}
