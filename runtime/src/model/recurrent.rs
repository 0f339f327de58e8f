//! What the recurrent token mixers share: their fixed-size per-layer state and the causal
//! depthwise convolution each of them runs over its projected inputs.

use crate::kernels::silu;
use alloc::vec::Vec;

/// One recurrent layer's state: the last `kernel − 1` convolution inputs (`[kernel − 1,
/// channels]`, oldest first) and the recurrence's own state (gated DeltaNet: `[v_heads, k_dim,
/// v_dim]`; Mamba2: `[heads, head_dim, state]`). Its size does not depend on the context length.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct RecurrentState {
    pub conv: Vec<f32>,
    pub s: Vec<f32>,
}

impl RecurrentState {
    /// A zero state of `conv` convolution floats and `s` recurrence floats.
    pub(crate) fn zeros(conv: usize, s: usize) -> Self {
        Self { conv: alloc::vec![0.0; conv], s: alloc::vec![0.0; s] }
    }

    /// Back to the state before any token (keeps the memory).
    pub(crate) fn clear(&mut self) {
        self.conv.fill(0.0);
        self.s.fill(0.0);
    }

    /// Floats held.
    pub(crate) fn floats(&self) -> usize {
        self.conv.len() + self.s.len()
    }
}

/// Causal depthwise convolution of `t` rows of `input` `[T, channels]` continuing from `hist`
/// (the last `kernel − 1` inputs before them, updated to the last `kernel − 1` inputs after):
/// `out[t][c] = act(bias[c] + Σ_j w[c][j] · in[t − (K−1) + j][c])`, `w` `[channels, kernel]`,
/// SiLU as the activation when `silu_out`. `out` is resized to `[T, channels]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_conv(
    input: &[f32],
    t: usize,
    channels: usize,
    kernel: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    silu_out: bool,
    hist: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    out.clear();
    out.resize(t * channels, 0.0);
    let past = kernel - 1;
    for tok in 0..t {
        let o = &mut out[tok * channels..][..channels];
        for j in 0..kernel {
            // Input at time tok − past + j: from the history when before this call.
            let src = if tok + j >= past {
                &input[(tok + j - past) * channels..][..channels]
            } else {
                &hist[(tok + j) * channels..][..channels]
            };
            for ((acc, &v), wc) in o.iter_mut().zip(src).zip(w.chunks_exact(kernel)) {
                *acc += wc[j] * v;
            }
        }
        if let Some(b) = bias {
            o.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
        }
        if silu_out {
            o.iter_mut().for_each(|v| *v = silu(*v));
        }
    }
    // The history keeps the last K − 1 inputs.
    if past > 0 {
        hist.extend_from_slice(&input[..t * channels]);
        let drop = hist.len() - past * channels;
        hist.drain(..drop);
    }
}
