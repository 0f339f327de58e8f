//! MEO-native feed-forward blocks (`docs/MEO-NATIVE.md` §2.1): `fc2(act(fc1(x)))` where each of fc1
//! and fc2 is a bank of linear experts merged once from a pooled gate,
//! `Y_t = Ŵ X'_t + b̂` with `Ŵ = Σ g_i W_i`, `b̂ = Σ g_i b_i` and the token block
//! `X' = X + up(relu(down X + b_down)) + b_up`.
//!
//! The gate is a softmax over the top-k router logits of a pooled vector: the mean of the
//! bank's input over the prompt (sequence level, computed here from the first forward call
//! after a reset) or the task embedding's projection (task level, computed by the converter,
//! whose merged banks are stored in the file).

use super::plan::{Bank, BankExpert, MeoFfn, TokenBlock, Vector};
use crate::config::{Activation, NormKind};
use crate::format::DType;
use crate::kernels::{MatRef, Parallel, add_into, matmul, read_f32s, rmsnorm, silu};
use crate::route::Choice;
use alloc::vec;
use alloc::vec::Vec;

/// A bank merged in the session (sequence level): the merged weight `[out, in]` encoded in
/// the experts' dtype, the merged bias, and the gate it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedBank {
    pub bytes: Vec<u8>,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bias: Vec<f32>,
    /// The selected experts, ascending, with their gate weights.
    pub gate: Vec<Choice>,
}

impl MergedBank {
    /// The merged weight as a kernel operand.
    pub fn view(&self) -> MatRef<'_> {
        MatRef::validated(self.dtype, self.rows, self.cols, &self.bytes)
    }
}

/// Reusable buffers.
#[derive(Debug, Default)]
pub(crate) struct MeoScratch {
    xt: Vec<f32>,
    down: Vec<f32>,
    up: Vec<f32>,
    mid: Vec<f32>,
    vec: Vec<f32>,
    bias: Vec<f32>,
    mix: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// `LN(x) = (x − mean) / sqrt(var + eps) · w + b` (biased variance), or RMSNorm when
/// `kind` is [`NormKind::Rms`] (then `b` is not used).
pub(crate) fn norm(kind: NormKind, x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    match kind {
        NormKind::Rms => rmsnorm(x, w, eps, out),
        NormKind::Layer => {
            let n = x.len() as f32;
            let mean = x.iter().sum::<f32>() / n;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / libm::sqrtf(var + eps);
            for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

/// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    0.5 * x * (1.0 + libm::tanhf(C * (x + 0.044_715 * x * x * x)))
}

fn activate(act: Activation, v: &mut [f32]) {
    match act {
        Activation::GeluTanh => v.iter_mut().for_each(|x| *x = gelu_tanh(*x)),
        // `model.ffn_activation` is never clamped SwiGLU (that is `model.mlp_activation`).
        Activation::Silu | Activation::ClampedSwiglu { .. } => v.iter_mut().for_each(|x| *x = silu(*x)),
        Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
    }
}

/// Top-k of `logits` (ties to the lower index), softmax over the selected logits; ascending
/// by expert.
pub fn topk_softmax(logits: &[f32], k: usize) -> Vec<Choice> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    let max = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
    let ex: Vec<f32> = idx.iter().map(|&i| libm::expf(logits[i] - max)).collect();
    let sum: f32 = ex.iter().sum();
    let mut out: Vec<Choice> =
        idx.iter().zip(&ex).map(|(&i, &e)| Choice { expert: i as u32, weight: e / sum }).collect();
    out.sort_by_key(|c| c.expert);
    out
}

/// The sequence-level gate of `bank` from its input `x` (`[t, in]`): router logits of the
/// plain mean over the `t` rows, then [`topk_softmax`].
pub fn sequence_gate(par: &dyn Parallel, bytes: &[u8], bank: &Bank, x: &[f32], t: usize, k: usize) -> Vec<Choice> {
    let d = x.len() / t.max(1);
    let mut mean = vec![0.0f32; d];
    for row in x.chunks(d) {
        add_into(&mut mean, row);
    }
    mean.iter_mut().for_each(|v| *v /= t.max(1) as f32);
    let router = bank.router.view(bytes);
    let mut logits = vec![0.0f32; router.rows()];
    matmul(par, &mean, 1, &router, &mut logits);
    topk_softmax(&logits, k)
}

fn read_vec(v: &Vector, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; v.len];
    read_f32s(&bytes[v.range.clone()], &mut out);
    out
}

/// Merges `bank`'s experts with `gate` in f32 (weights and biases) and stores the weight in
/// the experts' dtype. Only the selected experts' slabs are read; a choice naming no expert of
/// the bank is skipped ([`sequence_gate`] makes none).
pub fn merge_bank(bytes: &[u8], bank: &Bank, gate: Vec<Choice>) -> MergedBank {
    // Banks have at least one expert (checked at open).
    let e0: &BankExpert = &bank.experts[0];
    let (rows, cols, dtype) = (e0.weight.rows, e0.weight.cols, e0.weight.dtype);
    let chosen: Vec<(&BankExpert, f32)> =
        gate.iter().filter_map(|c| Some((bank.experts.get(c.expert as usize)?, c.weight))).collect();
    let parts: Vec<(MatRef<'_>, f32)> =
        chosen.iter().map(|(ex, w)| (ex.weight.view(&bytes[ex.slab.clone()]), *w)).collect();
    let mut w = vec![0.0f32; rows * cols];
    crate::merge::merge_matrices(&parts, &mut w);
    let mut bias = vec![0.0f32; rows];
    for (ex, g) in &chosen {
        let b = read_vec(&ex.bias, &bytes[ex.slab.clone()]);
        for (o, &v) in bias.iter_mut().zip(&b) {
            *o += g * v;
        }
    }
    MergedBank { bytes: crate::merge::encode(&w, rows, cols, dtype), dtype, rows, cols, bias, gate }
}

/// How one bank runs in a forward pass.
pub(crate) enum BankSrc<'a> {
    /// Merged in the session.
    Session(&'a MergedBank),
    /// Stored in the file (task merge): the slab's bytes and its tensors.
    File(&'a [u8], &'a BankExpert),
    /// Not merged: `Σ g_i (W_i X' + b_i)` over the gate's experts (the same function as the
    /// merge, since a bank is linear; k times the bytes and MACs). The baseline merged
    /// execution is measured against.
    Mixture(&'a [Choice]),
}

/// `out = Ŵ X' + b̂` for the `t` rows of `x`, with the token block when the bank has one.
#[allow(clippy::too_many_arguments)]
fn run_bank(
    par: &dyn Parallel,
    bytes: &[u8],
    bank: &Bank,
    src: &BankSrc<'_>,
    x: &[f32],
    t: usize,
    s: &mut MeoScratch,
    out: &mut [f32],
) {
    let d = x.len() / t.max(1);
    let xin: &[f32] = match &bank.token {
        Some(tb) => {
            token_block(par, bytes, tb, x, t, d, s);
            &s.xt
        }
        None => x,
    };
    let (w, bias): (MatRef<'_>, &[f32]) = match src {
        BankSrc::Mixture(gate) => {
            let rows = bank.experts[0].weight.rows;
            out.iter_mut().for_each(|v| *v = 0.0);
            let mut y = core::mem::take(&mut s.mix);
            resize(&mut y, t * rows);
            for c in gate.iter() {
                let ex = &bank.experts[c.expert as usize];
                let slab = &bytes[ex.slab.clone()];
                matmul(par, xin, t, &ex.weight.view(slab), &mut y);
                resize(&mut s.bias, ex.bias.len);
                read_f32s(&slab[ex.bias.range.clone()], &mut s.bias);
                for (o_row, y_row) in out.chunks_mut(rows).zip(y.chunks(rows)) {
                    for ((o, &v), &b) in o_row.iter_mut().zip(y_row).zip(&s.bias) {
                        *o += c.weight * (v + b);
                    }
                }
            }
            s.mix = y;
            return;
        }
        BankSrc::Session(m) => (m.view(), &m.bias),
        BankSrc::File(slab, ex) => {
            resize(&mut s.bias, ex.bias.len);
            read_f32s(&slab[ex.bias.range.clone()], &mut s.bias);
            (ex.weight.view(slab), &s.bias)
        }
    };
    matmul(par, xin, t, &w, out);
    for row in out.chunks_mut(w.rows()) {
        add_into(row, bias);
    }
}

/// `s.xt = x + up(relu(down x + b_down)) + b_up`.
fn token_block(par: &dyn Parallel, bytes: &[u8], tb: &TokenBlock, x: &[f32], t: usize, d: usize, s: &mut MeoScratch) {
    let r = tb.down.rows;
    resize(&mut s.down, t * r);
    matmul(par, x, t, &tb.down.view(bytes), &mut s.down);
    tb.down_bias.read(bytes, &mut s.vec);
    for row in s.down.chunks_mut(r) {
        add_into(row, &s.vec);
        row.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    resize(&mut s.up, t * d);
    matmul(par, &s.down, t, &tb.up.view(bytes), &mut s.up);
    tb.up_bias.read(bytes, &mut s.vec);
    s.xt.clear();
    s.xt.extend_from_slice(x);
    for (row, up) in s.xt.chunks_mut(d).zip(s.up.chunks(d)) {
        add_into(row, up);
        add_into(row, &s.vec);
    }
}

/// What the first forward call of a sequence-level session made: each bank's gate, pooled
/// from the bank's own input, and (merged execution) the merged bank.
pub(crate) enum Made {
    Merged([MergedBank; 2]),
    Gates([Vec<Choice>; 2]),
}

/// The MEO block on `x` (`[t, hidden]`) into `out` (`[t, hidden]`). `src` says how each bank
/// runs; when it is `None` (the prompt of a sequence-level session) each bank's gate is pooled
/// from its own input here, reported to `on_gate(bank, gate)` before any expert of that bank
/// is read, and the bank is merged (`merge`) or run as a mixture; the result is returned.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ffn(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MeoFfn,
    act: Activation,
    top_k: usize,
    src: Option<[BankSrc<'_>; 2]>,
    merge: bool,
    on_gate: &mut dyn FnMut(usize, &[Choice]),
    x: &[f32],
    t: usize,
    s: &mut MeoScratch,
    out: &mut [f32],
) -> Option<Made> {
    let inter = p.banks[0].experts[0].weight.rows;
    let mut mid = core::mem::take(&mut s.mid);
    resize(&mut mid, t * inter);
    let made = match src {
        Some([a, b]) => {
            run_bank(par, bytes, &p.banks[0], &a, x, t, s, &mut mid);
            activate(act, &mut mid);
            run_bank(par, bytes, &p.banks[1], &b, &mid, t, s, out);
            None
        }
        None if merge => {
            let g1 = sequence_gate(par, bytes, &p.banks[0], x, t, top_k);
            on_gate(0, &g1);
            let m1 = merge_bank(bytes, &p.banks[0], g1);
            run_bank(par, bytes, &p.banks[0], &BankSrc::Session(&m1), x, t, s, &mut mid);
            activate(act, &mut mid);
            let g2 = sequence_gate(par, bytes, &p.banks[1], &mid, t, top_k);
            on_gate(1, &g2);
            let m2 = merge_bank(bytes, &p.banks[1], g2);
            run_bank(par, bytes, &p.banks[1], &BankSrc::Session(&m2), &mid, t, s, out);
            Some(Made::Merged([m1, m2]))
        }
        None => {
            let g1 = sequence_gate(par, bytes, &p.banks[0], x, t, top_k);
            on_gate(0, &g1);
            run_bank(par, bytes, &p.banks[0], &BankSrc::Mixture(&g1), x, t, s, &mut mid);
            activate(act, &mut mid);
            let g2 = sequence_gate(par, bytes, &p.banks[1], &mid, t, top_k);
            on_gate(1, &g2);
            run_bank(par, bytes, &p.banks[1], &BankSrc::Mixture(&g2), &mid, t, s, out);
            Some(Made::Gates([g1, g2]))
        }
    };
    s.mid = mid;
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_softmax_selects_and_normalises() {
        let g = topk_softmax(&[0.0, 2.0, -1.0, 1.0], 2);
        assert_eq!(g.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 3]);
        let e = libm::expf(1.0);
        assert!((g[0].weight - e / (1.0 + e)).abs() < 1e-6);
        assert!((g.iter().map(|c| c.weight).sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn layer_norm_and_gelu() {
        let mut out = [0.0; 4];
        norm(NormKind::Layer, &[1.0, 2.0, 3.0, 4.0], &[1.0; 4], &[0.5; 4], 0.0, &mut out);
        let sd = libm::sqrtf(1.25);
        assert!((out[0] - (0.5 - 1.5 / sd)).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(gelu_tanh(0.0), 0.0);
    }
}
