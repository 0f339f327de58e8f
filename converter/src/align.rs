//! Expert alignment before merging (MC-SMoE-style weight matching).
//!
//! Permuting an expert's intermediate units — the rows of its gate and up projections and
//! the same columns of its down projection — leaves its function unchanged. Experts trained
//! apart have their units in unrelated orders, so averaging their weights averages unrelated
//! units. The converter therefore stores every expert of a layer with its units in the order
//! that best matches a reference expert (expert 0): the permutation `π` maximising
//! `Σ_j ⟨f_ref(j), f(π(j))⟩`, where `f(u) = [gate row u ‖ up row u ‖ down column u]`
//! (equivalently, minimising `‖θ_ref − Pθ‖_F`, the weight distance a merge averages over).
//!
//! The assignment is solved exactly (Hungarian / Jonker-Volgenant shortest augmenting paths,
//! `O(i³)`) for intermediate sizes up to [`EXACT_MAX`]; above that (real Mixtral/Qwen experts,
//! `i` = 1 408 … 14 336) it falls back to a greedy matching (each reference unit, in order,
//! takes its most similar free unit: `O(i² · 3h)`), which is not optimal but keeps conversion
//! time linear in the number of experts. Both are deterministic.

use crate::convert::{Cancelled, check_cancel};
use meo::DType;
use meo::kernels::{MatRef, Serial, matmul};
use std::sync::atomic::AtomicBool;

/// Why an alignment stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlignError {
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    /// A unit similarity is not a finite f32 (weights so large that their products overflow,
    /// or non-finite weights): there is no meaningful matching to compute.
    #[error("unit similarities are not finite (weights too large to align in f32)")]
    NotFinite,
}

/// Multiply-adds of the similarity product between two cancellation checks (well under a
/// second on one core).
const MACS_PER_CHECK: usize = 1 << 28;

/// Largest intermediate size solved with the exact assignment.
pub const EXACT_MAX: usize = 2048;

/// One expert's matrices in f32: gate `[i, h]` (empty for ungated experts), up `[i, h]`,
/// down `[h, i]`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertF32<'a> {
    pub gate: &'a [f32],
    pub up: &'a [f32],
    pub down: &'a [f32],
}

/// `[i, 3h]`: per unit, its gate row, up row and down column.
fn features(e: ExpertF32<'_>, i: usize, h: usize) -> Vec<f32> {
    let mut f = vec![0.0f32; i * 3 * h];
    for u in 0..i {
        let row = &mut f[u * 3 * h..][..3 * h];
        // Ungated (ReLU) experts have no gate: that third of the features stays zero.
        if !e.gate.is_empty() {
            row[..h].copy_from_slice(&e.gate[u * h..][..h]);
        }
        row[h..2 * h].copy_from_slice(&e.up[u * h..][..h]);
        for (c, o) in row[2 * h..].iter_mut().enumerate() {
            *o = e.down[c * i + u];
        }
    }
    f
}

/// `S[j][k] = 2⟨f_ref(j), f_other(k)⟩ − ‖f_other(k)‖²` (= `‖f_ref(j)‖² − ‖f_ref(j) − f_other(k)‖²`),
/// `[i, i]`. A perfect matching's total differs from `Σ_j ⟨f_ref(j), f_other(π(j))⟩` by a
/// constant, so the exact assignment is the same; row by row it ranks by distance, which is
/// what the greedy matching needs (a unit of larger norm does not win on the inner product).
fn similarity(
    reference: ExpertF32<'_>,
    other: ExpertF32<'_>,
    i: usize,
    h: usize,
    cancel: &AtomicBool,
) -> Result<Vec<f32>, AlignError> {
    let fr = features(reference, i, h);
    let fo = features(other, i, h);
    let bytes: &[u8] = bytemuck::cast_slice(&fo);
    let w = MatRef::new(DType::F32, i, 3 * h, bytes).expect("feature matrix shape");
    let mut s = vec![0.0f32; i * i];
    // In row blocks, checking for cancellation between them: one product of real expert
    // sizes (i = 14 336, h = 4 096) takes minutes.
    let rows = (MACS_PER_CHECK / (i * 3 * h).max(1)).max(1);
    for (x, y) in fr.chunks(rows * 3 * h).zip(s.chunks_mut(rows * i)) {
        check_cancel(cancel)?;
        matmul(&Serial, x, x.len() / (3 * h), &w, y);
    }
    let norms: Vec<f32> = fo.chunks(3 * h).map(|r| r.iter().map(|v| v * v).sum()).collect();
    for row in s.chunks_mut(i) {
        for (x, n) in row.iter_mut().zip(&norms) {
            *x = 2.0 * *x - n;
        }
    }
    if s.iter().any(|x| !x.is_finite()) {
        return Err(AlignError::NotFinite);
    }
    Ok(s)
}

/// The order aligning `other` to `reference`: `order[j]` is the unit of `other` stored at
/// position `j`. Identity when `other` is `reference`. `cancel` is checked at least once a
/// second.
///
/// # Errors
/// [`AlignError::Cancelled`] when `cancel` is set; [`AlignError::NotFinite`] when the
/// weights give similarities outside f32.
pub fn align_order(
    reference: ExpertF32<'_>,
    other: ExpertF32<'_>,
    i: usize,
    h: usize,
    cancel: &AtomicBool,
) -> Result<Vec<u32>, AlignError> {
    let s = similarity(reference, other, i, h, cancel)?;
    if i <= EXACT_MAX { assignment_max(&s, i, cancel) } else { greedy_max(&s, i, cancel) }
}

/// Exact maximum-weight perfect matching of the square `[n, n]` score matrix: `out[row] = col`.
/// Shortest augmenting paths with potentials (the Hungarian method in its `O(n³)` form).
/// `cancel` is checked once per row (`O(n²)` work).
///
/// # Errors
/// [`AlignError::NotFinite`] for a score that is NaN or infinite (no augmenting path can
/// be found through it: the search would never end); cancellation.
pub fn assignment_max(score: &[f32], n: usize, cancel: &AtomicBool) -> Result<Vec<u32>, AlignError> {
    if score.len() != n * n || score.iter().any(|x| !x.is_finite()) {
        return Err(AlignError::NotFinite);
    }
    // Minimise cost = -score, in f64, 1-based with a virtual column 0.
    let cost = |r: usize, c: usize| -f64::from(score[(r - 1) * n + (c - 1)]);
    let inf = f64::INFINITY;
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; n + 1];
    let mut p = vec![0usize; n + 1]; // p[col] = row matched to col
    let mut way = vec![0usize; n + 1];
    for row in 1..=n {
        check_cancel(cancel)?;
        p[0] = row;
        let mut j0 = 0usize;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0usize;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost(i0, j) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            // With finite scores some free column always gives a finite delta; j1 = 0
            // (none found) would revisit column 0 forever.
            if j1 == 0 {
                return Err(AlignError::NotFinite);
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![0u32; n];
    for col in 1..=n {
        out[p[col] - 1] = (col - 1) as u32;
    }
    Ok(out)
}

/// Greedy matching: each row in order takes its best free column (ties: lowest column).
/// `cancel` is checked every 256 rows.
///
/// # Errors
/// Cancellation.
pub fn greedy_max(score: &[f32], n: usize, cancel: &AtomicBool) -> Result<Vec<u32>, AlignError> {
    let mut free = vec![true; n];
    (0..n)
        .map(|r| {
            if r % 256 == 0 {
                check_cancel(cancel)?;
            }
            let row = &score[r * n..][..n];
            let best = (0..n).filter(|&c| free[c]).fold(None, |b: Option<usize>, c| match b {
                Some(b) if row[b] >= row[c] => Some(b),
                _ => Some(c),
            });
            let c = best.expect("a free column remains");
            free[c] = false;
            Ok(c as u32)
        })
        .collect()
}

/// Applies `order` to one expert matrix: rows of gate/up (`[i, h]`, `is_down = false`), or
/// columns of down (`[h, i]`, `is_down = true`).
pub fn permute(m: &[f32], order: &[u32], i: usize, h: usize, is_down: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; m.len()];
    if is_down {
        for r in 0..h {
            let (src, dst) = (&m[r * i..][..i], &mut out[r * i..][..i]);
            for (d, &o) in dst.iter_mut().zip(order) {
                *d = src[o as usize];
            }
        }
    } else {
        for (j, &o) in order.iter().enumerate() {
            out[j * h..][..h].copy_from_slice(&m[o as usize * h..][..h]);
        }
    }
    out
}

/// The inverse permutation of [`permute`]: stored order back to the checkpoint's.
pub fn unpermute(m: &[f32], order: &[u32], i: usize, h: usize, is_down: bool) -> Vec<f32> {
    let mut inv = vec![0u32; order.len()];
    for (j, &o) in order.iter().enumerate() {
        inv[o as usize] = j as u32;
    }
    permute(m, &inv, i, h, is_down)
}

/// Validates that `order` is a permutation of `0..i`.
pub fn is_permutation(order: &[u32], i: usize) -> bool {
    let mut seen = vec![false; i];
    order.len() == i && order.iter().all(|&o| (o as usize) < i && !std::mem::replace(&mut seen[o as usize], true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(score: &[f32], n: usize) -> f32 {
        fn go(score: &[f32], n: usize, r: usize, used: &mut Vec<bool>) -> f32 {
            if r == n {
                return 0.0;
            }
            let mut best = f32::NEG_INFINITY;
            for c in 0..n {
                if !used[c] {
                    used[c] = true;
                    best = best.max(score[r * n + c] + go(score, n, r + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        go(score, n, 0, &mut vec![false; n])
    }

    #[test]
    fn assignment_is_optimal_on_small_random_matrices() {
        let mut s = 12345u64;
        for n in 1..=6 {
            for _ in 0..20 {
                let m: Vec<f32> = (0..n * n)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s % 1000) as f32 / 100.0 - 5.0
                    })
                    .collect();
                let a = assignment_max(&m, n, &AtomicBool::new(false)).unwrap();
                assert!(is_permutation(&a, n));
                let got: f32 = a.iter().enumerate().map(|(r, &c)| m[r * n + c as usize]).sum();
                assert!((got - brute(&m, n)).abs() < 1e-4, "n={n}: {got} vs {}", brute(&m, n));
            }
        }
    }

    #[test]
    fn a_permuted_copy_is_aligned_back_exactly() {
        let (i, h) = (12, 5);
        let val = |k: usize| ((k * 7919) % 101) as f32 / 50.0 - 1.0;
        let gate: Vec<f32> = (0..i * h).map(val).collect();
        let up: Vec<f32> = (0..i * h).map(|k| val(k + 3)).collect();
        let down: Vec<f32> = (0..h * i).map(|k| val(k + 11)).collect();
        let perm: Vec<u32> = vec![3, 0, 11, 7, 1, 2, 10, 4, 9, 5, 8, 6];
        let (g2, u2, d2) =
            (permute(&gate, &perm, i, h, false), permute(&up, &perm, i, h, false), permute(&down, &perm, i, h, true));
        let r = ExpertF32 { gate: &gate, up: &up, down: &down };
        let o = ExpertF32 { gate: &g2, up: &u2, down: &d2 };
        let no = AtomicBool::new(false);
        for order in
            [align_order(r, o, i, h, &no).unwrap(), greedy_max(&similarity(r, o, i, h, &no).unwrap(), i, &no).unwrap()]
        {
            assert_eq!(permute(&g2, &order, i, h, false), gate);
            assert_eq!(permute(&d2, &order, i, h, true), down);
            assert_eq!(unpermute(&permute(&up, &order, i, h, false), &order, i, h, false), up);
        }
    }

    #[test]
    fn non_finite_or_overflowing_weights_stop_with_an_error() {
        // Before: a NaN score made the augmenting-path search loop forever.
        let no = AtomicBool::new(false);
        let mut m = vec![1.0f32, 2.0, 3.0, 4.0];
        m[1] = f32::NAN;
        assert_eq!(assignment_max(&m, 2, &no), Err(AlignError::NotFinite));
        m[1] = f32::INFINITY;
        assert_eq!(assignment_max(&m, 2, &no), Err(AlignError::NotFinite));
        // Finite weights whose squares overflow f32 (not caught by a finiteness check on them).
        let (i, h) = (3, 2);
        let big = vec![1e30f32; i * h];
        let e = ExpertF32 { gate: &big, up: &big, down: &big };
        assert_eq!(align_order(e, e, i, h, &no), Err(AlignError::NotFinite));
    }

    #[test]
    fn alignment_honours_cancellation() {
        let yes = AtomicBool::new(true);
        let (i, h) = (4, 2);
        let w: Vec<f32> = (0..i * h).map(|k| k as f32).collect();
        let e = ExpertF32 { gate: &w, up: &w, down: &w };
        assert!(matches!(align_order(e, e, i, h, &yes), Err(AlignError::Cancelled(_))));
        assert!(matches!(assignment_max(&[1.0; 4], 2, &yes), Err(AlignError::Cancelled(_))));
        assert!(matches!(greedy_max(&[1.0; 4], 2, &yes), Err(AlignError::Cancelled(_))));
    }
}
