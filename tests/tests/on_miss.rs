//! Reading a missed expert, and the approximate on-miss fallbacks (`OnMiss`, issue 20), on the
//! bundled trained models: every miss is read by the chosen method and results stay bitwise
//! the same; exact mode never falls back; the fallbacks repeat given the same residency, send
//! only resident experts (or the merged expert) to the kernels, and count what they served; a
//! file without the merged experts refuses `merged` by name.

#![cfg(unix)]

use meo::residency::{ExpertTracker, MissRead, TrackerOptions, drop_page_cache};
use meo::{Choice, DType, Logits, ModeError, Model, NoTrace, OnMiss, Session, SessionOptions, Trace};
use meo_converter::convert::{self, Options};
use meo_converter::merges::{MergeSpec, TaskSpec, Weighting};
use meo_tests::conformance::{fixture_dir, reference};
use std::path::Path;
use std::sync::atomic::AtomicBool;

const NAME: &str = "trained/mixtral-scratch";

const CALIB: &str = "The value of the object is returned. If the argument is a string, it is parsed \
as a number; otherwise the object must define an index method. A list is a mutable sequence, \
and a tuple is an immutable one. def f(x):\n    return [i * 2 for i in range(x) if i % 3]\n";

/// The fixture converted with int8 experts; with `miss`, also the merged experts of task
/// `miss` (every expert weighted by its calibration routing frequency).
fn convert_fixture(dir: &Path, miss: bool) -> Model {
    let out = dir.join(if miss { "miss.meo" } else { "plain.meo" });
    let opts = Options { experts: DType::Q8_0, dense: DType::F32, align: true };
    let mut spec = MergeSpec { weighting: Weighting::Frequency, ..Default::default() };
    if miss {
        let p = dir.join("calib.txt");
        std::fs::write(&p, CALIB.repeat(8)).unwrap();
        spec.tasks.push(TaskSpec { name: meo::MISS_TASK.into(), text: p });
    }
    convert::convert_with(&fixture_dir(NAME), &out, opts, &spec, &AtomicBool::new(false), |_| {})
        .unwrap_or_else(|e| panic!("{NAME}: {e:#}"));
    Model::open(out).unwrap()
}

fn tokens() -> Vec<u32> {
    reference(NAME).input_ids.into_iter().take(40).collect()
}

/// A prompt of 8 tokens, then one per call; every call's logits, as bits.
fn run(model: &Model, on_miss: &OnMiss, trace: &mut dyn Trace) -> Vec<u32> {
    let mut s = Session::new(model, SessionOptions { threads: 2, ..Default::default() }).unwrap();
    s.set_on_miss(on_miss.clone()).unwrap();
    let toks = tokens();
    let (prompt, rest) = toks.split_at(8);
    let mut bits = Vec::new();
    for chunk in std::iter::once(prompt).chain(rest.chunks(1)) {
        bits.extend(s.forward_with(chunk, Logits::All, trace).unwrap().iter().map(|v| v.to_bits()));
    }
    bits
}

fn slab_bytes(model: &Model) -> u64 {
    model.expert_slab(0, 0).unwrap().len() as u64
}

fn opts(budget: u64, miss_read: MissRead) -> TrackerOptions {
    // The dense tensors are counted separately: the budget here is all experts.
    TrackerOptions { budget: Some(budget), miss_read, pin_dense: false, ..TrackerOptions::default() }
}

#[test]
fn every_miss_is_read_by_the_chosen_method_and_results_stay_exact() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let model = convert_fixture(dir.path(), false);
    let exact = run(&model, &OnMiss::Exact, &mut NoTrace);
    for how in MissRead::ALL {
        for budget in [0, 3 * slab_bytes(&model)] {
            let mut t = ExpertTracker::for_model(&model, opts(budget, how)).unwrap();
            let got = run(&model, &OnMiss::Exact, &mut t);
            assert!(got == exact, "{}, budget {budget}: logits differ", how.name());
            let st = t.stats().unwrap();
            assert_eq!(st.miss_read, how);
            assert!(st.misses > 0, "{}: no miss to read", how.name());
            assert_eq!(st.miss_reads, st.misses, "{}: every miss is read by the chosen method", how.name());
            assert_eq!(st.fallback_choices, 0, "{}: exact mode fell back", how.name());
            assert!(t.take_error().is_none(), "{}: an OS call failed", how.name());
        }
    }
}

/// `populate` has the slab read and mapped into the process when the tracker returns: before
/// the layer touches a byte of it.
#[cfg(target_os = "linux")]
#[test]
fn populate_maps_a_missed_slab_before_it_is_used() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = {
        let m = convert_fixture(dir.path(), false);
        m.mapped().unwrap().path().to_path_buf()
    };
    drop_page_cache(&path).unwrap();
    let map = meo::residency::map_lazy(&path).unwrap();
    let model = Model::from_mapped(map).unwrap();
    let slab = model.expert_slab(1, 3).unwrap();
    let m = model.mapped().unwrap();
    let mut t = ExpertTracker::for_model(&model, opts(0, MissRead::Populate)).unwrap();
    assert_eq!(meo::residency::mapped_bytes(m, slab.clone()).unwrap(), 0, "mapped before it was selected");
    t.on_selected(1, &[3]);
    let st = t.stats().unwrap();
    assert_eq!((st.miss_reads, st.miss_read_bytes), (1, slab.len() as u64));
    assert_eq!(
        meo::residency::mapped_bytes(m, slab.clone()).unwrap(),
        slab.len() as u64,
        "the whole slab is mapped (populate_fallbacks {})",
        st.populate_fallbacks
    );
}

#[test]
fn merged_needs_the_merged_experts_in_the_file() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let model = convert_fixture(dir.path(), false);
    let mut s = Session::new(&model, SessionOptions::default()).unwrap();
    let e = s.set_on_miss(OnMiss::parse("merged").unwrap()).unwrap_err();
    assert!(matches!(&e, ModeError::NoMissMerge { task, available } if task == "miss" && available.is_empty()));
    let msg = e.to_string();
    assert!(msg.contains("--on-miss merged:miss") && msg.contains("no task merges"), "{msg}");
    assert_eq!(s.on_miss(), &OnMiss::Exact, "a refused fallback leaves the session exact");
    assert!(OnMiss::parse("merged:").is_err() && OnMiss::parse("nearest").is_err());
    for sp in ["exact", "resident", "merged", "merged:docs"] {
        assert_eq!(OnMiss::parse(sp).unwrap().spelling(), sp);
    }
}

/// Forwards to a tracker, and checks what reaches the kernels: under `resident`, when the layer
/// had at least top-k resident experts, every routed choice is resident.
struct Check<'a, 'm> {
    tracker: &'a mut ExpertTracker<'m>,
    k: usize,
    resident: Vec<bool>,
    enough: bool,
    fallbacks: u64,
    routed_resident: u64,
    /// `resident` mode (under `merged`, routing is exact and missed choices go to the merged
    /// expert).
    rerouting: bool,
}

impl Trace for Check<'_, '_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.tracker.on_selected(layer, experts);
    }
    fn resident_experts(&mut self, layer: usize, resident: &mut Vec<bool>) -> bool {
        let known = self.tracker.resident_experts(layer, resident);
        self.resident.clone_from(resident);
        self.enough = resident.iter().filter(|&&r| r).count() >= self.k;
        known
    }
    fn on_route(&mut self, _layer: usize, _pos: usize, choices: &[Choice]) {
        if self.rerouting && self.enough {
            for c in choices {
                assert!(self.resident[c.expert as usize], "expert {} is routed but not resident", c.expert);
                self.routed_resident += 1;
            }
        }
    }
    fn on_fallback(&mut self, layer: usize, missed: &[u32], choices: usize) {
        assert!(missed.iter().all(|&e| !self.resident[e as usize]), "a resident expert counted as missed");
        self.fallbacks += choices as u64;
        self.tracker.on_fallback(layer, missed, choices);
    }
}

#[test]
fn fallbacks_repeat_use_what_is_resident_and_are_counted() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let model = convert_fixture(dir.path(), true);
    let exact = run(&model, &OnMiss::Exact, &mut NoTrace);
    let k = model.config().router.top_k;
    let layers = model.moe_layers().count() as u64;
    let slab = slab_bytes(&model);
    let positions = tokens().len() as u64;
    for on_miss in [OnMiss::Resident, OnMiss::parse("merged").unwrap()] {
        for budget in [0, 4 * slab, 12 * slab] {
            let what = format!("{}, budget {budget}", on_miss.spelling());
            let mut figures = Vec::new();
            for _ in 0..2 {
                let mut tracker = ExpertTracker::for_model(&model, opts(budget, MissRead::Populate)).unwrap();
                let mut c = Check {
                    tracker: &mut tracker,
                    k,
                    resident: Vec::new(),
                    enough: false,
                    fallbacks: 0,
                    routed_resident: 0,
                    rerouting: on_miss == OnMiss::Resident,
                };
                let got = run(&model, &on_miss, &mut c);
                let (fallbacks, routed) = (c.fallbacks, c.routed_resident);
                let st = tracker.stats().unwrap();
                assert_eq!(st.fallback_choices, fallbacks, "{what}: the tracker's count");
                assert_eq!(st.fallbacks_per_layer.iter().sum::<u64>(), fallbacks, "{what}: per layer");
                if on_miss == OnMiss::Resident && budget == 12 * slab {
                    assert!(routed > 0, "{what}: no layer had top-k resident experts");
                }
                figures.push((got, fallbacks, st.hits, st.misses, st.fallback_fetches));
            }
            assert!(figures[0] == figures[1], "{what}: two runs with the same residency differ");
            let (got, fallbacks, hits, misses, _) = &figures[0];
            match (&on_miss, budget) {
                // Nothing is resident when a layer routes (only the previous layer's slabs are
                // held): `resident` routes exactly, `merged` serves every choice of every layer.
                (OnMiss::Resident, 0) => {
                    assert!(*got == exact && *fallbacks == 0, "{what}: fewer than top-k resident must route exactly");
                }
                (OnMiss::Merged(_), 0) => {
                    assert_eq!(*fallbacks, positions * layers * k as u64, "{what}");
                    assert_eq!((*hits, *misses), (0, 0), "{what}: an expert ran");
                    assert!(*got != exact, "{what}: the merged expert gave the exact logits");
                }
                // Room for about three experts per layer: some layers have top-k resident.
                _ if budget == 12 * slab || matches!(on_miss, OnMiss::Merged(_)) => {
                    assert!(*fallbacks > 0, "{what}: nothing fell back");
                    assert!(*got != exact, "{what}: fallbacks left the logits exact");
                }
                _ => {}
            }
        }
    }
}
