//! Calibration statistics for quantizing experts (`meo convert --calib TEXT`).
//!
//! The calibration text runs through the f32 conversion of the checkpoint (the first pass of a
//! two-pass conversion, as for task merges). For every MoE layer and expert the run records
//! how many tokens selected it (a gate weight > 0) and, over those tokens, the mean square of
//! each input of its matrices: the layer's normalised hidden state for `gate` and `up`, the
//! expert's own intermediate activation `act(gate x, up x)` for `down`. These are the
//! importances the 4-bit quantizers weigh their rounding error with
//! ([`meo::quant::quantize_as`]): the error of `W·x` on the inputs the expert really sees,
//! rather than of `W` (llama.cpp's imatrix plays this part). The selection counts pick the
//! experts kept at int8 by `--hot-experts`.

use crate::convert::check_cancel;
use anyhow::{Result, bail};
use meo::route::Choice;
use meo::{Logits, Model, Session, SessionOptions, Trace};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

/// What one expert saw.
#[derive(Debug, Clone, Default)]
pub struct ExpertStats {
    /// Tokens that selected it.
    pub count: u64,
    /// Σ x² per hidden input (gate, up).
    pub x2: Vec<f64>,
    /// Σ h² per intermediate input (down).
    pub h2: Vec<f64>,
}

/// Calibration statistics of every MoE layer, per expert.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Calibration tokens run.
    pub tokens: u64,
    pub layers: BTreeMap<usize, Vec<ExpertStats>>,
}

impl Stats {
    /// The importance (mean square of each input column) for matrix `part` (`gate`, `up` or
    /// `down`) of `expert` in `layer`, or `None` if no calibration token selected it.
    pub fn importance(&self, layer: usize, expert: usize, part: &str) -> Option<Vec<f32>> {
        let s = self.layers.get(&layer)?.get(expert)?;
        if s.count == 0 {
            return None;
        }
        let n = s.count as f64;
        let v = if part == "down" { &s.h2 } else { &s.x2 };
        Some(v.iter().map(|&x| (x / n) as f32).collect())
    }

    /// Which experts of `layer` are hot: the `ceil(fraction · E)` most selected (ties: lower
    /// index first).
    pub fn hot(&self, layer: usize, fraction: f64) -> Vec<bool> {
        let Some(l) = self.layers.get(&layer) else { return Vec::new() };
        let keep = ((fraction.clamp(0.0, 1.0) * l.len() as f64).ceil() as usize).min(l.len());
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].count.cmp(&l[a].count).then(a.cmp(&b)));
        let mut hot = vec![false; l.len()];
        for &e in &order[..keep] {
            hot[e] = true;
        }
        hot
    }

    /// The share of routed token-expert pairs the hot experts of every layer take (what
    /// fraction of expert reads stays int8).
    pub fn hot_share(&self, fraction: f64) -> f64 {
        let (mut hot, mut all) = (0u64, 0u64);
        for (&l, ex) in &self.layers {
            for (s, h) in ex.iter().zip(self.hot(l, fraction)) {
                all += s.count;
                hot += if h { s.count } else { 0 };
            }
        }
        if all == 0 { 0.0 } else { hot as f64 / all as f64 }
    }
}

/// The trace that fills [`Stats`]: the layer's input arrives before its routing.
struct Collector<'m> {
    model: &'m Model,
    /// Per layer, the current call's MoE input and its first position.
    input: BTreeMap<usize, (usize, Vec<f32>)>,
    stats: Stats,
    err: Option<String>,
}

impl Trace for Collector<'_> {
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        self.input.insert(layer, (pos0, x.to_vec()));
    }

    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        let c = self.model.config();
        let (h, e) = (c.hidden_size, c.router.num_experts);
        let Some((pos0, x)) = self.input.get(&layer) else {
            self.err.get_or_insert_with(|| format!("layer {layer}: routing without its input"));
            return;
        };
        let Some(x) = pos.checked_sub(*pos0).and_then(|i| x.get(i * h..(i + 1) * h)) else {
            self.err.get_or_insert_with(|| format!("layer {layer}: position {pos} outside its input"));
            return;
        };
        let stats = self.stats.layers.entry(layer).or_insert_with(|| vec![ExpertStats::default(); e]);
        for ch in choices.iter().filter(|c| c.weight != 0.0) {
            let Some((s, ex)) = stats.get_mut(ch.expert as usize).zip(self.model.expert(layer, ch.expert as usize))
            else {
                continue;
            };
            let hid = self.model.expert_hidden(ex, x, 1);
            if s.count == 0 {
                s.x2 = vec![0.0; h];
                s.h2 = vec![0.0; hid.len()];
            }
            s.count += 1;
            for (a, &v) in s.x2.iter_mut().zip(x) {
                *a += f64::from(v) * f64::from(v);
            }
            for (a, &v) in s.h2.iter_mut().zip(&hid) {
                *a += f64::from(v) * f64::from(v);
            }
        }
    }
}

/// Runs `tokens` through `model` (windows of [`crate::merges::CALIB_WINDOW`]) and returns
/// the statistics.
///
/// # Errors
/// A forward error, a trace inconsistency, or cancellation.
pub fn collect(model: &Model, tokens: &[u32], cancel: &AtomicBool) -> Result<Stats> {
    let mut s = Session::new(model, SessionOptions::default())?;
    let win = crate::merges::CALIB_WINDOW.min(s.max_context()).max(1);
    let mut c = Collector { model, input: BTreeMap::new(), stats: Stats::default(), err: None };
    for chunk in tokens.chunks(win) {
        check_cancel(cancel)?;
        s.reset();
        c.input.clear();
        s.forward_with(chunk, Logits::Last, &mut c)?;
        c.stats.tokens += chunk.len() as u64;
    }
    if let Some(e) = c.err {
        bail!("calibration: {e}");
    }
    Ok(c.stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(counts: &[u64]) -> Stats {
        let ex = counts.iter().map(|&count| ExpertStats { count, x2: vec![count as f64; 2], h2: vec![1.0] }).collect();
        Stats { tokens: 10, layers: BTreeMap::from([(0, ex)]) }
    }

    #[test]
    fn hot_experts_are_the_most_selected() {
        let s = stats(&[3, 9, 0, 9, 1]);
        assert_eq!(s.hot(0, 0.4), [false, true, false, true, false]);
        // ceil(0.1 · 5) = 1: the first of the tied most selected.
        assert_eq!(s.hot(0, 0.1), [false, true, false, false, false]);
        assert_eq!(s.hot(0, 0.0), [false; 5]);
        assert_eq!(s.hot(0, 1.0), [true; 5]);
        assert!((s.hot_share(0.4) - 18.0 / 22.0).abs() < 1e-12);
        assert!(s.hot(7, 0.5).is_empty());
    }

    #[test]
    fn importance_is_the_mean_square_and_absent_for_unused_experts() {
        let s = stats(&[4, 0]);
        assert_eq!(s.importance(0, 0, "up"), Some(vec![1.0, 1.0]));
        assert_eq!(s.importance(0, 0, "down"), Some(vec![0.25]));
        assert_eq!(s.importance(0, 1, "gate"), None);
        assert_eq!(s.importance(3, 0, "gate"), None);
    }
}
