//! MEO merging ("Merging Experts into One"): `θ̂ = Σ g_i θ_i`, computed in f32 from the
//! dequantized weights and re-encoded to the experts' storage dtype. `no_std` + `alloc`.
//!
//! # SwiGLU experts and weights that do not sum to 1
//!
//! A routed MoE layer computes `y = Σ_i w_i · E_i(x)` with `E_i(x) = D_i(silu(G_i x) ⊙ U_i x)`.
//! The merge weights `w` (one per expert, ≥ 0) need not sum to 1: OLMoE and Qwen-MoE without
//! `norm_topk_prob` keep the top-k softmax mass, DeepSeek scales by `routed_scaling_factor`.
//! meo merges with the **normalised** weights `ḡ = w / Σw` inside the nonlinearity and keeps
//! the mass `s = Σw` outside it:
//!
//! ```text
//! Ĝ = Σ ḡ_i G_i     Û = Σ ḡ_i U_i     D̂ = Σ w_i D_i  (= s · Σ ḡ_i D_i)
//! y ≈ D̂(silu(Ĝ x) ⊙ Û x) = s · E_{θ̄}(x)
//! ```
//!
//! So the merged gate and up projections are convex combinations (their pre-activations keep
//! the experts' scale, whatever the routing mass), the output carries the mass the mixture
//! had, and a merge of one expert (`w = p·e_i`) is exactly `p · E_i(x)`: the vanilla output.
//! The scale is folded into the down projection, so a merged expert is one ordinary SwiGLU
//! expert and needs no extra runtime parameter. For a single linear map (`D̂` alone) the
//! merge is exact: `D̂ x = Σ w_i D_i x`.
//!
//! # Weights on the inputs
//!
//! Llama-4 weights each selected expert's *input*: `y = Σ_i E_i(w_i x)`
//! (`routing.weight_on_input`). Then the mass goes into the nonlinearity, through the gate and
//! up projections, and the down projection is a convex combination ([`Mass::Input`]):
//!
//! ```text
//! Ĝ = Σ w_i G_i     Û = Σ w_i U_i     D̂ = Σ ḡ_i D_i
//! y ≈ D̂(silu(Ĝ x) ⊙ Û x) = E_{θ̄}(s x)
//! ```
//!
//! so a merge of one expert (`w = p·e_i`) is again exactly the vanilla output `E_i(p x)`.

use crate::format::DType;
use crate::kernels::{MatRef, decode};
use crate::model::plan::{Mat, Mlp};
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

/// `out[rows × cols] = Σ w_i · W_i` over `parts` (`(matrix, weight)`), in f32 from the
/// dequantized values; parts with weight 0 are not read.
///
/// # Panics
/// If the parts' shapes differ or `out` has the wrong length (caller bug).
pub fn merge_matrices(parts: &[(MatRef<'_>, f32)], out: &mut [f32]) {
    out.fill(0.0);
    let Some((first, _)) = parts.first() else { return };
    let (rows, cols) = (first.rows(), first.cols());
    assert!(out.len() == rows * cols, "merge_matrices: output length");
    let mut row = vec![0.0f32; cols];
    for (m, w) in parts {
        assert!(m.rows() == rows && m.cols() == cols, "merge_matrices: shapes differ");
        if *w == 0.0 {
            continue;
        }
        for r in 0..rows {
            decode(m, r, 1, 0, cols, &mut row);
            for (o, &v) in out[r * cols..][..cols].iter_mut().zip(&row) {
                *o += w * v;
            }
        }
    }
}

/// Encodes a row-major `[rows, cols]` f32 matrix as `dtype` (the block dtypes through
/// [`crate::quant::quantize_as`], f16/bf16 rounding to nearest even).
pub fn encode(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Vec<u8> {
    debug_assert_eq!(values.len(), rows * cols);
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        DType::Q8_0 | DType::Q4_0 | DType::MXFP4 => crate::quant::quantize_as(dtype, values, rows, cols, None),
    }
}

/// Splits merge weights `w` into the normalised weights `ḡ = w / Σw` and the mass `s = Σw`
/// (all zero and 0 when `Σw = 0`).
pub fn normalise(w: &[f32]) -> (Vec<f32>, f32) {
    let s: f32 = w.iter().sum();
    if s > 0.0 && s.is_finite() { (w.iter().map(|&x| x / s).collect(), s) } else { (vec![0.0; w.len()], 0.0) }
}

/// Where a routed layer applies its routing weights, and so where a merge keeps their mass
/// (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mass {
    /// `Σ w_i E_i(x)`: the mass in the down projection.
    Output,
    /// `Σ E_i(w_i x)` (`routing.weight_on_input`): the mass in the gate and up projections.
    Input,
}

impl Mass {
    /// The rule of layers routed by `spec`.
    pub fn of(spec: &crate::config::RouterSpec) -> Self {
        if spec.weight_on_input { Self::Input } else { Self::Output }
    }
}

/// One expert's matrices: the bytes they live in (a slab, or a merged buffer) and where.
#[derive(Debug, Clone, Copy)]
pub struct ExpertRef<'a> {
    pub bytes: &'a [u8],
    pub mlp: &'a Mlp,
}

/// A merged SwiGLU expert owned in memory: gate, up and down back to back (each at a 64-byte
/// offset), with the merge weights it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedExpert {
    pub bytes: Vec<u8>,
    /// Ranges relative to `bytes`.
    pub mlp: Mlp,
    /// The merge weights `w` per expert (unnormalised; see the module docs).
    pub weights: Vec<f32>,
}

impl MergedExpert {
    /// A view for running it.
    pub fn as_ref(&self) -> ExpertRef<'_> {
        ExpertRef { bytes: &self.bytes, mlp: &self.mlp }
    }
}

/// The three merged matrices in f32, `(gate [i·h], up [i·h], down [h·i])`, following the
/// module's rule for `mass` (output: gate/up with `ḡ`, down with `w`; input: gate/up with
/// `w`, down with `ḡ`). `experts[i]` pairs with `w[i]`. Ungated experts (no `gate`) give an
/// empty `gate`.
///
/// # Panics
/// If `experts.len() != w.len()`, or the experts' shapes differ (caller bug).
pub fn merge_f32(experts: &[ExpertRef<'_>], w: &[f32], mass: Mass) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(experts.len(), w.len(), "merge_f32: one weight per expert");
    let (normalised, _) = normalise(w);
    let (gbar, w) = match mass {
        Mass::Output => (&normalised[..], w),
        Mass::Input => (w, &normalised[..]),
    };
    let m0 = experts.first().expect("at least one expert").mlp;
    let (i, h) = (m0.up.rows, m0.up.cols);
    let gated = experts.iter().all(|e| e.mlp.gate.is_some());
    let mut gate = vec![0.0; if gated { i * h } else { 0 }];
    let mut up = vec![0.0; i * h];
    let mut down = vec![0.0; h * i];
    if gated {
        let gp: Vec<(MatRef<'_>, f32)> =
            experts.iter().zip(gbar).filter_map(|(e, &x)| Some((e.mlp.gate.as_ref()?.view(e.bytes), x))).collect();
        merge_matrices(&gp, &mut gate);
    }
    let up_p: Vec<(MatRef<'_>, f32)> = experts.iter().zip(gbar).map(|(e, &x)| (e.mlp.up.view(e.bytes), x)).collect();
    merge_matrices(&up_p, &mut up);
    let dp: Vec<(MatRef<'_>, f32)> = experts.iter().zip(w).map(|(e, &x)| (e.mlp.down.view(e.bytes), x)).collect();
    merge_matrices(&dp, &mut down);
    (gate, up, down)
}

/// Packs gate, up and down (f32) into one buffer in `dtype`, each part at a 64-byte offset.
/// An empty `gate` packs an ungated expert with activation `act`; a non-empty one a
/// SiLU-gated expert.
pub fn pack(gate: &[f32], up: &[f32], down: &[f32], i: usize, h: usize, dtype: DType) -> (Vec<u8>, Mlp) {
    pack_act(gate, up, down, i, h, dtype, crate::config::Activation::Silu)
}

/// [`pack`] with the activation of an ungated expert.
pub fn pack_act(
    gate: &[f32],
    up: &[f32],
    down: &[f32],
    i: usize,
    h: usize,
    dtype: DType,
    act: crate::config::Activation,
) -> (Vec<u8>, Mlp) {
    let mut bytes = Vec::new();
    let mut put = |v: &[f32], rows: usize, cols: usize| -> Mat {
        let start = bytes.len().next_multiple_of(64);
        bytes.resize(start, 0);
        bytes.extend_from_slice(&encode(v, rows, cols, dtype));
        Mat { dtype, rows, cols, range: Range { start, end: bytes.len() } }
    };
    // A gated MLP keeps a gated activation (SiLU, clamped SwiGLU); any other becomes SiLU.
    let (gate, act) = if gate.is_empty() {
        (None, act)
    } else {
        (Some(put(gate, i, h)), if act.gated() { act } else { crate::config::Activation::Silu })
    };
    let up = put(up, i, h);
    let down = put(down, h, i);
    (bytes, Mlp { gate, up, down, bias: None, act })
}

/// Merges `experts` with weights `w` (their mass kept as `mass` says) and stores the result
/// in `dtype`.
///
/// # Panics
/// As [`merge_f32`].
pub fn merge_expert(experts: &[ExpertRef<'_>], w: &[f32], dtype: DType, mass: Mass) -> MergedExpert {
    let m0 = experts[0].mlp;
    let (i, h) = (m0.up.rows, m0.up.cols);
    let (g, u, d) = merge_f32(experts, w, mass);
    let (bytes, mlp) = pack_act(&g, &u, &d, i, h, dtype, m0.act);
    MergedExpert { bytes, mlp, weights: w.to_vec() }
}

/// `‖a − b‖_F / ‖b‖_F` in f64 (0 when both are zero, ∞ when only `b` is).
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = f64::from(x) - f64::from(y);
        num += d * d;
        den += f64::from(y) * f64::from(y);
    }
    if den == 0.0 { if num == 0.0 { 0.0 } else { f64::INFINITY } } else { libm::sqrt(num / den) }
}

/// Sums of squares for a relative error accumulated over several batches:
/// `(Σ‖a − b‖², Σ‖b‖²)`.
pub fn error_sums(a: &[f32], b: &[f32]) -> (f64, f64) {
    let mut s = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let d = f64::from(x) - f64::from(y);
        s.0 += d * d;
        s.1 += f64::from(y) * f64::from(y);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(vals: &[f32], rows: usize, cols: usize, dtype: DType) -> Vec<u8> {
        encode(vals, rows, cols, dtype)
    }

    #[test]
    fn merging_a_linear_map_is_exact_in_f32() {
        let (rows, cols) = (3, 5);
        let a: Vec<f32> = (0..15).map(|i| i as f32 * 0.25 - 1.0).collect();
        let b: Vec<f32> = (0..15).map(|i| (i as f32 * 0.7).sin()).collect();
        let (ba, bb) = (mat(&a, rows, cols, DType::F32), mat(&b, rows, cols, DType::F32));
        let ma = MatRef::new(DType::F32, rows, cols, &ba).unwrap();
        let mb = MatRef::new(DType::F32, rows, cols, &bb).unwrap();
        let mut out = vec![0.0; 15];
        merge_matrices(&[(ma, 0.3), (mb, 0.7)], &mut out);
        for k in 0..15 {
            assert!((out[k] - (0.3 * a[k] + 0.7 * b[k])).abs() < 1e-6);
        }
    }

    #[test]
    fn one_expert_keeps_its_mass_where_the_router_applies_it() {
        let (i, h) = (2, 3);
        let part = |k: f32, n: usize| (0..n).map(|x| k + x as f32).collect::<Vec<f32>>();
        let packed: Vec<_> = [1.0f32, 10.0]
            .iter()
            .map(|&k| pack(&part(k, i * h), &part(k + 0.5, i * h), &part(k - 0.5, h * i), i, h, DType::F32))
            .collect();
        let refs: Vec<ExpertRef<'_>> = packed.iter().map(|(b, m)| ExpertRef { bytes: b, mlp: m }).collect();
        let w = [0.0, 0.5];
        let half = |v: Vec<f32>| v.into_iter().map(|x| 0.5 * x).collect::<Vec<_>>();
        // Output side: `0.5 · E(x)`, the mass in the down projection.
        let (g, u, d) = merge_f32(&refs, &w, Mass::Output);
        assert_eq!((g, u, d), (part(10.0, i * h), part(10.5, i * h), half(part(9.5, h * i))));
        // Input side: `E(0.5 · x)`, the mass in the gate and up projections.
        let (g, u, d) = merge_f32(&refs, &w, Mass::Input);
        assert_eq!((g, u, d), (half(part(10.0, i * h)), half(part(10.5, i * h)), part(9.5, h * i)));
    }

    #[test]
    fn normalise_splits_mass() {
        let (g, s) = normalise(&[0.2, 0.0, 0.2]);
        assert_eq!(g, [0.5, 0.0, 0.5]);
        assert!((s - 0.4).abs() < 1e-7);
        assert_eq!(normalise(&[0.0, 0.0]), (vec![0.0, 0.0], 0.0));
    }

    #[test]
    fn relative_error_basics() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((relative_error(&[0.0, 0.0], &[3.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(relative_error(&[0.0], &[0.0]), 0.0);
    }
}
