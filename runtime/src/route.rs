//! The router: one implementation, parameterised by [`RouterSpec`] (see `docs/ROUTING.md`).
//!
//! Every family's routing is the same pipeline with different settings:
//! scores → (+ selection-only bias) → (group limit) → top-k → weights → renormalise → scale.
//! Ties are broken towards the lowest expert index, so selection is deterministic.

use crate::config::{GroupScore, MAX_TOP_K, RouterSpec, Scoring};
use alloc::vec::Vec;

/// One selected expert and the weight its output is multiplied by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub expert: u32,
    pub weight: f32,
}

/// Reusable buffers so routing allocates nothing per token.
#[derive(Debug, Default, Clone)]
pub struct RouteScratch {
    scores: Vec<f32>,
    select: Vec<f32>,
    order: Vec<u32>,
    groups: Vec<(f32, u32)>,
}

/// Softmax of `x` into `out` (max-subtracted, f32).
pub fn softmax(x: &[f32], out: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = libm::expf(v - m);
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// `a` ranks before `b`: higher score, then lower index. NaN ranks last.
fn before(sa: f32, a: u32, sb: f32, b: u32) -> bool {
    match (sa.is_nan(), sb.is_nan()) {
        (false, true) => true,
        (true, false) => false,
        (true, true) => a < b,
        _ => sa > sb || (sa == sb && a < b),
    }
}

/// Indices of the `k` best of `scores` (best first, ties to the lowest index), into `order`.
fn top_k(scores: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    // Insertion into a sorted prefix of length k: k and E are small (≤ 256), this is
    // cheaper than a full sort and allocation-free.
    for (i, &s) in scores.iter().enumerate() {
        let i = i as u32;
        let pos = order.iter().position(|&j| before(s, i, scores[j as usize], j)).unwrap_or(order.len());
        if pos < k {
            if order.len() == k {
                order.pop();
            }
            order.insert(pos, i);
        }
    }
}

/// Routes one token: `logits` are the router outputs (length `num_experts`, f32),
/// `selection_bias` the optional per-expert bias used for selection only. Writes
/// `spec.top_k` choices into `out`, sorted by ascending expert index.
///
/// # Panics
/// If `logits.len() != spec.num_experts` or `out.len() != spec.top_k` (shapes are validated
/// when the model is opened, so this is a caller bug).
pub fn route_token(
    spec: &RouterSpec,
    logits: &[f32],
    selection_bias: Option<&[f32]>,
    s: &mut RouteScratch,
    out: &mut [Choice],
) {
    let (e, k) = (spec.num_experts, spec.top_k);
    assert!(logits.len() == e && out.len() == k && k <= MAX_TOP_K, "route_token: bad shapes");
    if spec.scoring == Scoring::SparseMixer {
        sparse_mixer(logits, spec.sparsemixer_eps, s, out);
    } else {
        select(spec, logits, selection_bias, s, out);
    }
    if spec.norm_topk_prob {
        let sum: f32 = out.iter().map(|c| c.weight).sum::<f32>() + spec.norm_eps;
        for o in out.iter_mut() {
            o.weight /= sum;
        }
    }
    for o in out.iter_mut() {
        o.weight *= spec.scaling_factor;
    }
    out.sort_unstable_by_key(|c| c.expert);
}

/// Scores, selection bias, group limit and top-k: every scoring but the sparsemixer.
fn select(spec: &RouterSpec, logits: &[f32], selection_bias: Option<&[f32]>, s: &mut RouteScratch, out: &mut [Choice]) {
    let (e, k) = (spec.num_experts, spec.top_k);
    s.scores.clear();
    s.scores.resize(e, 0.0);
    match spec.scoring {
        Scoring::Softmax => softmax(logits, &mut s.scores),
        Scoring::Sigmoid => {
            for (o, &v) in s.scores.iter_mut().zip(logits) {
                *o = 1.0 / (1.0 + libm::expf(-v));
            }
        }
        Scoring::SoftmaxAfterTopK | Scoring::SparseMixer => s.scores.copy_from_slice(logits),
    }
    s.select.clear();
    s.select.extend_from_slice(&s.scores);
    if let Some(b) = selection_bias {
        for (x, &bias) in s.select.iter_mut().zip(b) {
            *x += bias;
        }
    }
    if spec.n_group > 1 && spec.topk_group < spec.n_group {
        // Group score = sum of the group's two best selection scores (DeepSeek-V3) or its
        // best one (DeepSeek-V2); experts outside the best `topk_group` groups cannot be
        // selected.
        let per = e / spec.n_group;
        s.groups.clear();
        for g in 0..spec.n_group {
            let mut best = [f32::NEG_INFINITY; 2];
            for &v in &s.select[g * per..(g + 1) * per] {
                if v > best[0] {
                    best = [v, best[0]];
                } else if v > best[1] {
                    best[1] = v;
                }
            }
            let score = match spec.group_score {
                GroupScore::TopTwoSum if per >= 2 => best[0] + best[1],
                GroupScore::TopTwoSum | GroupScore::Max => best[0],
            };
            s.groups.push((score, g as u32));
        }
        let group_scores: Vec<f32> = s.groups.iter().map(|g| g.0).collect();
        top_k(&group_scores, spec.topk_group, &mut s.order);
        for g in 0..spec.n_group as u32 {
            if !s.order.contains(&g) {
                let g = g as usize;
                s.select[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
            }
        }
    }
    top_k(&s.select, k, &mut s.order);
    for (o, &i) in out.iter_mut().zip(&s.order) {
        *o = Choice { expert: i, weight: s.scores[i as usize] };
    }
    if spec.scoring == Scoring::SoftmaxAfterTopK {
        let sel: heapless::Vec<f32, MAX_TOP_K> = out.iter().map(|c| c.weight).collect();
        let mut w = [0.0f32; MAX_TOP_K];
        softmax(&sel, &mut w[..sel.len()]);
        for (o, &w) in out.iter_mut().zip(&w) {
            o.weight = w;
        }
    }
}

/// Phi-3.5-MoE's sparsemixer as transformers runs it at inference (`sparsemixer`,
/// `training=False`), for `out.len()` rounds (transformers: 2). Each round takes the best
/// remaining logit `m` (ties: lowest index) and weights it `1 / Σ_j exp(l_j − m)` over the
/// remaining experts `j` not masked, where `j` is masked when `(m − l_j) / max(|l_j|, m) > 2ε`:
/// the chosen expert's probability in a softmax over the unmasked remaining logits.
fn sparse_mixer(logits: &[f32], eps: f32, s: &mut RouteScratch, out: &mut [Choice]) {
    s.select.clear();
    s.select.extend_from_slice(logits);
    let threshold = 2.0 * eps;
    for o in out.iter_mut() {
        top_k(&s.select, 1, &mut s.order);
        let i = s.order[0] as usize;
        let m = s.select[i];
        let mut sum = 0.0f32;
        for (&l, &rem) in logits.iter().zip(&s.select) {
            // Chosen in an earlier round (set to -inf below): out of this round's softmax.
            if rem == f32::NEG_INFINITY {
                continue;
            }
            // torch: `scores.abs().clamp(min=m)`, then the relative gap against 2ε.
            if (m - l) / l.abs().max(m) > threshold {
                continue;
            }
            sum += libm::expf(l - m);
        }
        *o = Choice { expert: i as u32, weight: 1.0 / sum };
        s.select[i] = f32::NEG_INFINITY;
    }
}

/// Applies per-expert capacity over one sequence in token order (Switch): a choice whose
/// expert already took `spec.expert_capacity` tokens is dropped — its weight set to 0 and
/// its flag in `dropped` (`[tokens, k]`) set. No-op when the capacity is 0 (unlimited).
pub fn apply_capacity(spec: &RouterSpec, choices: &mut [Choice], dropped: &mut [bool], counts: &mut Vec<usize>) {
    dropped.fill(false);
    if spec.expert_capacity == 0 {
        return;
    }
    counts.clear();
    counts.resize(spec.num_experts, 0);
    for (c, d) in choices.iter_mut().zip(dropped.iter_mut()) {
        let n = &mut counts[c.expert as usize];
        if *n >= spec.expert_capacity {
            c.weight = 0.0;
            *d = true;
        } else {
            *n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(e: usize, k: usize, scoring: Scoring, norm: bool) -> RouterSpec {
        RouterSpec { norm_topk_prob: norm, ..RouterSpec::plain(e, k, scoring) }
    }

    fn run(sp: &RouterSpec, logits: &[f32], bias: Option<&[f32]>) -> Vec<Choice> {
        let mut out = alloc::vec![Choice { expert: 0, weight: 0.0 }; sp.top_k];
        route_token(sp, logits, bias, &mut RouteScratch::default(), &mut out);
        out
    }

    #[test]
    fn sparsemixer_weights_each_round_by_its_unmasked_softmax() {
        let sp = RouterSpec { sparsemixer_eps: 0.01, ..RouterSpec::plain(4, 2, Scoring::SparseMixer) };
        // Round 1: m = 3.0 (expert 1); 2.99 is within 2ε relative gap (0.01/3), 1.0 and 0.5 are not.
        // Round 2: m = 2.99 (expert 2); 1.0 and 0.5 masked again, so its weight is 1.
        let out = run(&sp, &[1.0, 3.0, 2.99, 0.5], None);
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 2]);
        let w1 = 1.0 / (1.0 + libm::expf(2.99 - 3.0));
        assert!((out[0].weight - w1).abs() < 1e-6, "{out:?}");
        assert_eq!(out[1].weight, 1.0);
        // Far apart: each round's softmax holds only its own expert.
        let out = run(&sp, &[-4.0, 2.0, 0.0, 1.0], None);
        assert_eq!((out[0].expert, out[1].expert, out[0].weight, out[1].weight), (1, 3, 1.0, 1.0));
        // A larger ε unmasks expert 3 in round 1: (2 − 1) / 2 = 0.5 ≤ 2 · 0.3.
        let wide = RouterSpec { sparsemixer_eps: 0.3, ..sp };
        let out = run(&wide, &[-4.0, 2.0, 0.0, 1.0], None);
        let w = 1.0 / (1.0 + libm::expf(-1.0));
        assert!((out[0].weight - w).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn softmax_topk_renormalised() {
        let out = run(&spec(4, 2, Scoring::Softmax, true), &[1.0, 3.0, 2.0, 0.0], None);
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 2]);
        let (a, b) = (libm::expf(3.0), libm::expf(2.0));
        assert!((out[0].weight - a / (a + b)).abs() < 1e-6);
        assert!((out[1].weight - b / (a + b)).abs() < 1e-6);
    }

    #[test]
    fn softmax_topk_not_renormalised_keeps_full_softmax_probs() {
        let l = [1.0, 3.0, 2.0, 0.0];
        let out = run(&spec(4, 2, Scoring::Softmax, false), &l, None);
        let mut p = [0.0; 4];
        softmax(&l, &mut p);
        assert!((out[0].weight - p[1]).abs() < 1e-7 && (out[1].weight - p[2]).abs() < 1e-7);
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let out = run(&spec(5, 2, Scoring::Softmax, true), &[0.5, 1.0, 1.0, 1.0, 0.0], None);
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn selection_bias_changes_choice_not_weight() {
        let mut sp = spec(4, 1, Scoring::Sigmoid, false);
        sp.selection_bias = true;
        let out = run(&sp, &[2.0, 1.0, 0.0, 0.0], Some(&[0.0, 5.0, 0.0, 0.0]));
        assert_eq!(out[0].expert, 1);
        assert!((out[0].weight - 1.0 / (1.0 + libm::expf(-1.0))).abs() < 1e-6);
    }

    #[test]
    fn group_limit_masks_weak_groups() {
        // Groups {0,1} and {2,3}; group 1 scores higher by its top-2 sum although
        // expert 0 alone is the best expert.
        let mut sp = spec(4, 1, Scoring::Sigmoid, false);
        sp.n_group = 2;
        sp.topk_group = 1;
        let out = run(&sp, &[3.0, -5.0, 2.0, 2.0], None);
        assert_eq!(out[0].expert, 2);
    }

    #[test]
    fn group_score_rule_decides_the_group() {
        // Groups {0,1}, {2,3}, {4,5}. Sum of the top two: σ(3)+σ(-5) ≈ 0.959 < 2σ(2) ≈ 1.762,
        // so group 1 wins and its tie goes to expert 2; the best single score is σ(3), so
        // by the max rule group 0 wins.
        let logits = [3.0, -5.0, 2.0, 2.0, 1.0, 1.0];
        let mut sp = spec(6, 1, Scoring::Sigmoid, false);
        sp.n_group = 3;
        sp.topk_group = 1;
        assert_eq!(run(&sp, &logits, None)[0].expert, 2);
        sp.group_score = GroupScore::Max;
        assert_eq!(run(&sp, &logits, None)[0].expert, 0);
        // Two eligible groups: top-2 may take one expert from each.
        sp.topk_group = 2;
        sp.top_k = 2;
        let out = run(&sp, &logits, None);
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [0, 2]);
        // All groups eligible: the limit is off and selection is plain top-k.
        sp.topk_group = 3;
        sp.group_score = GroupScore::TopTwoSum;
        let plain = run(&RouterSpec { n_group: 1, topk_group: 1, ..sp.clone() }, &logits, None);
        assert_eq!(run(&sp, &logits, None), plain);
    }

    #[test]
    fn deepseek_v3_pipeline_bias_picks_the_group_weights_stay_unbiased() {
        // Equal logits: every score is σ(0) = 0.5. The bias lifts group {2,3} (0.6 + 0.7 >
        // 0.5 + 0.5), so experts 2 and 3 are chosen; their weights are the unbiased 0.5,
        // renormalised (0.5 / (1.0 + 1e-20)) and scaled by 2.5: 1.25 each.
        let mut sp = spec(4, 2, Scoring::Sigmoid, true);
        sp.n_group = 2;
        sp.topk_group = 1;
        sp.norm_eps = 1e-20;
        sp.scaling_factor = 2.5;
        sp.selection_bias = true;
        let out = run(&sp, &[0.0; 4], Some(&[0.0, 0.0, 0.1, 0.2]));
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [2, 3]);
        assert!(out.iter().all(|c| (c.weight - 1.25).abs() < 1e-6), "{out:?}");
        // Without the bias the groups tie and the lower one wins.
        let out = run(&sp, &[0.0; 4], None);
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [0, 1]);
        // Expert 1 has the best biased score (0.5 + 0.45 = 0.95 > σ(1) ≈ 0.731) but its group
        // sums to 1.45 < 2σ(1) ≈ 1.462: it is masked, and plain top-2 would have taken it.
        let (logits, bias) = ([0.0, 0.0, 1.0, 1.0], [0.0, 0.45, 0.0, 0.0]);
        let out = run(&sp, &logits, Some(&bias));
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [2, 3]);
        let ungrouped = RouterSpec { n_group: 1, topk_group: 1, ..sp.clone() };
        let out = run(&ungrouped, &logits, Some(&bias));
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn softmax_after_topk_and_scaling() {
        let mut sp = spec(4, 2, Scoring::SoftmaxAfterTopK, false);
        sp.scaling_factor = 2.0;
        let out = run(&sp, &[0.0, 1.0, 1.0, -1.0], None);
        assert_eq!(out.iter().map(|c| c.expert).collect::<Vec<_>>(), [1, 2]);
        assert!((out[0].weight - 1.0).abs() < 1e-6);
    }

    #[test]
    fn capacity_drops_late_tokens() {
        let mut sp = spec(2, 1, Scoring::Softmax, false);
        sp.expert_capacity = 1;
        let mut ch = alloc::vec![
            Choice { expert: 0, weight: 0.9 },
            Choice { expert: 0, weight: 0.8 },
            Choice { expert: 1, weight: 0.7 },
        ];
        let mut dropped = [false; 3];
        apply_capacity(&sp, &mut ch, &mut dropped, &mut Vec::new());
        assert_eq!(dropped, [false, true, false]);
        assert_eq!(ch[1].weight, 0.0);
    }
}
