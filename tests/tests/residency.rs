//! The residency policy on the bundled trained models: next-layer prediction and budgets never
//! change results (bitwise, every policy and prediction I/O, budgets too small for one token),
//! one tracker shared by two sessions holds one budget, the slabs prefetched on prediction are
//! exactly the predicted ones not already held, and prediction accuracy per layer on the
//! models' own held-out text (printed; asserted well above chance).

#![cfg(unix)]

use meo::residency::{ExpertTracker, Policy, PredictIo, SharedTracker, TrackerOptions};
use meo::{DType, Logits, Model, NoTrace, Session, SessionOptions, Trace};
use meo_tests::conformance::{convert_fixture, reference};
use std::collections::BTreeSet;

const MODELS: [&str; 2] = ["mixtral-scratch", "mixtral-upcycled"];

fn open(name: &str, dir: &std::path::Path) -> Model {
    std::fs::create_dir_all(dir.join("trained")).expect("mkdir"); // the output is named after the fixture
    let p = convert_fixture(&format!("trained/{name}"), DType::Q8_0, DType::F32, dir);
    Model::open(p).expect("open")
}

/// The held-out tokens of the fixture's reference (real text of the kind it was trained on).
fn text(name: &str) -> Vec<u32> {
    reference(&format!("trained/{name}")).input_ids
}

/// Feeds `tokens`: a prompt of 8, then one token per call (decoding); all logits of each call.
fn run(model: &Model, tokens: &[u32], trace: &mut dyn Trace, after: &mut dyn FnMut()) -> Vec<u32> {
    let mut s = Session::new(model, SessionOptions { threads: 2, ..Default::default() }).expect("session");
    let mut bits = Vec::new();
    let (prompt, rest) = tokens.split_at(8);
    for chunk in std::iter::once(prompt).chain(rest.chunks(1)) {
        let logits = s.forward_with(chunk, Logits::All, trace).expect("forward");
        bits.extend(logits.iter().map(|v| v.to_bits()));
        after();
    }
    bits
}

fn slab_bytes(model: &Model) -> u64 {
    model.expert_slab(0, 0).expect("layer 0 has experts").len() as u64
}

#[test]
fn prediction_and_budgets_never_change_results() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    for name in MODELS {
        let model = open(name, dir.path());
        let tokens: Vec<u32> = text(name).into_iter().take(40).collect();
        let exact = run(&model, &tokens, &mut NoTrace, &mut || {});
        let slab = slab_bytes(&model);
        // Nothing beyond the current call's slabs; then room for about one token's.
        for budget in [Some(0), Some(3 * slab), None] {
            for policy in Policy::ALL {
                let ios: Vec<Option<PredictIo>> =
                    std::iter::once(None).chain(PredictIo::ALL.into_iter().map(Some)).collect();
                for io in ios {
                    let opts = TrackerOptions {
                        budget,
                        policy,
                        predict: io.is_some(),
                        predict_io: io.unwrap_or_default(),
                        pin_dense: false, // counted separately: the budget here is all experts
                        ..TrackerOptions::default()
                    };
                    let mut tracker = ExpertTracker::for_model(&model, opts).expect("tracker");
                    let got = run(&model, &tokens, &mut tracker, &mut || {});
                    let what = format!("{name}, budget {budget:?}, {}, prediction {io:?}", policy.name());
                    assert!(got == exact, "{what}: logits differ from the run without a tracker");
                    let st = tracker.stats().expect("stats");
                    if budget == Some(0) {
                        assert!(st.released_slabs > 0, "{what}: the budget evicted nothing");
                    }
                    let predicted: u64 = st.prediction.iter().map(|p| p.calls).sum();
                    assert_eq!(predicted > 0, io.is_some(), "{what}: {predicted} predicted calls");
                }
            }
        }
    }
}

#[test]
fn one_budget_for_two_sessions() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let name = MODELS[0];
    let model = open(name, dir.path());
    let tokens: Vec<u32> = text(name).into_iter().take(24).collect();
    let exact = run(&model, &tokens, &mut NoTrace, &mut || {});
    let budget = 3 * slab_bytes(&model);
    let opts = TrackerOptions {
        budget: Some(budget),
        predict: true,
        predict_io: PredictIo::Inline,
        ..TrackerOptions::default()
    };
    let shared = SharedTracker::new(ExpertTracker::for_model(&model, opts).expect("tracker"));
    let expert_budget = budget.saturating_sub(shared.lock().stats().expect("stats").dense_pinned_bytes);
    assert!(shared.lock().stats().unwrap().dense_pinned_bytes > 0, "the dense tensors are pinned and counted");
    // Two sessions, interleaved call by call, on one tracker.
    let mut a = Session::new(&model, SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let mut b = Session::new(&model, SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    let top_k = model.config().router.top_k as u64;
    let layers = model.moe_layers().count() as u64;
    for (i, chunk) in std::iter::once(&tokens[..8]).chain(tokens[8..].chunks(1)).enumerate() {
        for (s, out) in [(&mut a, &mut la), (&mut b, &mut lb)] {
            let logits = s.forward_with(chunk, Logits::All, &mut &shared).expect("forward");
            out.extend(logits.iter().map(|v| v.to_bits()));
            if i > 0 {
                // After a decode call: at most the budget, or the last call's slabs if those
                // alone exceed it (one layer's top-k plus the next layer's prediction).
                let held = shared.lock().held_bytes();
                assert!(
                    held <= expert_budget.max(2 * top_k * slab_bytes(&model)),
                    "{held} bytes held > budget {expert_budget}"
                );
            }
        }
    }
    assert!(la == exact && lb == exact, "a shared budget changed results");
    let st = shared.lock().stats().unwrap();
    assert!(st.released_slabs > 0);
    // Each decode call selects at least one expert per MoE layer, in each session.
    assert!(st.hits + st.misses >= 2 * (tokens.len() as u64 - 8) * layers);
    // A memory warning: the budget lowered at once.
    shared.lock().set_budget(Some(0)).unwrap();
    assert!(shared.lock().held_bytes() == 0, "set_budget evicts down to the new budget");
}

/// Forwards to a tracker and records the predictions.
struct Recorder<'a, 'm> {
    tracker: &'a mut ExpertTracker<'m>,
    predictions: Vec<(usize, usize, Vec<u32>)>,
    held_before: Vec<BTreeSet<(usize, usize)>>,
}

impl Trace for Recorder<'_, '_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.tracker.on_experts_selected(layer, experts);
    }
    fn wants_prediction(&self) -> bool {
        self.tracker.wants_prediction()
    }
    fn on_experts_predicted(&mut self, from: usize, layer: usize, experts: &[u32]) {
        // What is held just before the prediction lands (earlier layers' selections of this
        // call never touch `layer`'s slabs).
        let n = self.tracker.index().num_experts(layer);
        self.held_before.push((0..n).filter(|&e| self.tracker.is_held(layer, e)).map(|e| (layer, e)).collect());
        self.predictions.push((from, layer, experts.to_vec()));
        self.tracker.on_experts_predicted(from, layer, experts);
    }
}

#[test]
fn prefetched_slabs_are_the_predicted_ones() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    for name in MODELS {
        let model = open(name, dir.path());
        let opts = TrackerOptions { predict: true, predict_io: PredictIo::Inline, ..TrackerOptions::default() };
        let mut tracker = ExpertTracker::for_model(&model, opts).expect("tracker");
        tracker.record_predicted_prefetches();
        let moe: Vec<usize> = model.moe_layers().collect();
        let tokens: Vec<u32> = text(name).into_iter().take(24).collect();
        let mut s = Session::new(&model, SessionOptions::default()).unwrap();
        let mut any = 0;
        for (i, chunk) in std::iter::once(&tokens[..8]).chain(tokens[8..].chunks(1)).enumerate() {
            let mut rec = Recorder { tracker: &mut tracker, predictions: Vec::new(), held_before: Vec::new() };
            s.forward_with(chunk, Logits::Last, &mut rec).expect("forward");
            let (predictions, held_before) = (rec.predictions, rec.held_before);
            // Every MoE layer but the first is predicted once per call, from the one before.
            let layers: Vec<(usize, usize)> = predictions.iter().map(|(f, l, _)| (*f, *l)).collect();
            assert_eq!(layers, moe.windows(2).map(|w| (w[0], w[1])).collect::<Vec<_>>(), "call {i}");
            let mut expected = BTreeSet::new();
            for ((_, l, experts), held) in predictions.iter().zip(&held_before) {
                if chunk.len() == 1 {
                    assert_eq!(experts.len(), model.config().router.top_k, "one token: top-k predicted");
                }
                expected.extend(experts.iter().map(|&e| (*l, e as usize)).filter(|le| !held.contains(le)));
            }
            let got: BTreeSet<(usize, usize)> = tracker.take_predicted_prefetches().into_iter().collect();
            assert_eq!(got, expected, "{name}, call {i}: prefetched slabs differ from the predicted ones");
            any += got.len();
        }
        assert!(any > 0, "{name}: nothing was prefetched on prediction");
    }
}

#[test]
fn prediction_accuracy_per_layer_on_trained_models() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    for name in MODELS {
        let model = open(name, dir.path());
        let opts = TrackerOptions { predict: true, predict_io: PredictIo::Inline, ..TrackerOptions::default() };
        let mut tracker = ExpertTracker::for_model(&model, opts).expect("tracker");
        let tokens = text(name);
        let mut s = Session::new(&model, SessionOptions::default()).unwrap();
        // One token per call, as decoding runs: the prediction is the next layer's top-k.
        for &t in tokens.iter().take(model.config().max_position_embeddings) {
            s.forward_with(&[t], Logits::Last, &mut tracker).expect("forward");
        }
        let st = tracker.stats().unwrap();
        let c = model.config();
        let chance = c.router.top_k as f64 / c.router.num_experts as f64;
        let acc: Vec<f64> = st.prediction.iter().filter_map(|p| p.accuracy()).collect();
        let shown: Vec<String> = acc.iter().map(|a| format!("{a:.3}")).collect();
        println!(
            "{name}: next-layer prediction accuracy per layer (layers 1..): {} (chance {chance:.3})",
            shown.join(" ")
        );
        assert_eq!(acc.len(), model.moe_layers().count() - 1);
        let mean = acc.iter().sum::<f64>() / acc.len() as f64;
        assert!(mean > 1.5 * chance, "{name}: mean accuracy {mean:.3} is near chance {chance:.3}");
    }
}
