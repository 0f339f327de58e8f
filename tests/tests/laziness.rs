//! Laziness: a forward pass reads only the expert slabs routing selects, and the memory
//! budget releases cold ones. Checked with `mincore` on a synthetic model (32 experts of
//! ≥ 64 KiB per layer, top-2) whose file was dropped from the page cache first.
//!
//! The file is written under Cargo's per-target temporary directory (not `/tmp`, which may be
//! tmpfs, whose pages cannot be dropped). We own the file, so on Linux `mincore` reports
//! page-cache residency: "not resident" means no byte of that slab was read from disk.

#![cfg(target_os = "linux")]

#[path = "../../converter/examples/synth/model.rs"]
mod synth;

use meo::DType;
use meo::residency::{self, ExpertTracker, TrackerOptions, drop_page_cache, expert_residency, resident_bytes};
use meo::{Logits, Model, Session, SessionOptions};
use std::path::{Path, PathBuf};
use synth::SynthSpec;

const EXPERTS: usize = 32;
const LAYERS: usize = 2;

fn spec() -> SynthSpec {
    SynthSpec {
        vocab: 256,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        layers: LAYERS,
        experts: EXPERTS,
        top_k: 2,
        expert_intermediate: 256,
        experts_dtype: DType::Q8_0,
        dense_dtype: DType::F16,
        seed: 42,
        ..SynthSpec::default()
    }
}

/// Writes the model, drops it from the page cache, opens it, and checks nothing of the
/// experts is resident yet.
fn cold_model(dir: &Path) -> (PathBuf, Model) {
    let path = dir.join("lazy.meo");
    synth::write(&spec(), &path, |_, _| {}).expect("write synthetic model");
    drop_page_cache(&path).expect("drop page cache");
    // As `meo run` opens: read-ahead off before the header is read (see `map_lazy`).
    let model = Model::from_mapped(residency::map_lazy(&path).expect("map")).expect("open");
    let map = model.mapped().expect("opened from a file");
    let file = model.file().expect("parse");
    let slabs = residency::SlabIndex::new(&file);
    assert_eq!(slabs.len(), EXPERTS * LAYERS);
    for (l, e, r) in slabs.iter() {
        assert!(r.len() >= 64 << 10, "expert {l}.{e} is {} bytes, the test needs >= 64 KiB", r.len());
    }
    let (resident, in_file) = expert_residency(map, &file).expect("mincore");
    assert!(in_file > 0);
    assert_eq!(
        resident, 0,
        "expert pages still cached after posix_fadvise(DONTNEED): the temporary directory's file system \
         does not drop pages (tmpfs?)"
    );
    (path, model)
}

#[test]
fn forward_pages_in_only_the_selected_experts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let (_path, model) = cold_model(dir.path());
    let map = model.mapped().unwrap();
    // No prefetch: whatever becomes resident was read by the forward pass itself.
    let opts = TrackerOptions { prefetch: false, ..TrackerOptions::default() };
    let mut tracker = ExpertTracker::for_model(&model, opts).expect("tracker");
    let mut session = Session::new(&model, SessionOptions { threads: 2, ..Default::default() }).expect("session");
    let logits = session.forward_with(&[5, 17, 42], Logits::All, &mut tracker).expect("forward");
    assert_eq!(logits.len(), 3 * 256);
    assert!(logits.iter().all(|v| v.is_finite()));

    let (mut selected, mut unselected) = (0, 0);
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            let r = model.expert_slab(l, e).expect("slab");
            let resident = resident_bytes(map, r.clone()).expect("mincore");
            if tracker.touched(l, e) {
                selected += 1;
                assert_eq!(resident, r.len() as u64, "selected expert {l}.{e} not fully resident");
            } else {
                unselected += 1;
                assert_eq!(resident, 0, "unselected expert {l}.{e} has {resident} bytes resident");
            }
        }
    }
    // 3 tokens × top-2 select at most 6 of 32 experts per layer.
    assert!((LAYERS * 2..=LAYERS * 6).contains(&selected), "{selected} selected");
    assert!(unselected >= LAYERS * (EXPERTS - 6), "{unselected} unselected slabs checked");
    let stats = tracker.stats().expect("stats");
    assert_eq!(stats.experts_touched, selected);
    let selected_bytes: u64 = (0..LAYERS)
        .flat_map(|l| (0..EXPERTS).map(move |e| (l, e)))
        .filter(|&(l, e)| tracker.touched(l, e))
        .map(|(l, e)| model.expert_slab(l, e).unwrap().len() as u64)
        .sum();
    assert_eq!(stats.expert_bytes_resident, selected_bytes);
    assert_eq!(stats.expert_bytes_mapped, Some(selected_bytes));
    assert!(stats.expert_bytes_resident < stats.expert_bytes_in_file / 4);
}

#[test]
fn memory_budget_releases_cold_experts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let (_path, model) = cold_model(dir.path());
    let map = model.mapped().unwrap();
    let slab = model.expert_slab(0, 0).unwrap().len() as u64;
    // The dense tensors are pinned and counted; room for one token's experts (2 layers ×
    // top-2) beside them, not more.
    let dense: u64 = residency::DataLayout::new(&model.file().unwrap()).dense_runs.iter().map(|r| r.len() as u64).sum();
    let budget = 4 * slab;
    // Without prediction: a predicted slab evicted while its read is in flight can stay in the
    // page cache (posix_fadvise does not drop pages under I/O), which mincore would count.
    let opts = TrackerOptions { budget: Some(dense + budget), ..TrackerOptions::default() };
    let mut tracker = ExpertTracker::for_model(&model, opts).expect("tracker");
    let mut session = Session::new(&model, SessionOptions { threads: 2, ..Default::default() }).expect("session");
    let mut tok = 7u32;
    for step in 0..24 {
        let logits = session.forward_with(&[tok], Logits::Last, &mut tracker).expect("forward");
        tok = meo::sample::argmax(logits) ^ (step * 37 % 256); // vary the input to spread routing
        assert!(tracker.held_bytes() <= budget, "step {step}: {} held > budget {budget}", tracker.held_bytes());
    }
    assert!(tracker.take_error().is_none());
    let stats = tracker.stats().expect("stats");
    assert_eq!(stats.dense_pinned_bytes, dense);
    assert!(
        stats.experts_touched > 4,
        "only {} experts touched: the test needs more than the budget",
        stats.experts_touched
    );
    assert!(stats.released_slabs > 0);
    assert!(stats.expert_bytes_mapped.expect("pagemap") <= budget);
    assert!(
        stats.expert_bytes_resident <= budget,
        "{} bytes of experts resident > budget {budget}",
        stats.expert_bytes_resident
    );
    // Touched-then-released slabs are gone from memory…
    let released_and_gone = (0..LAYERS)
        .flat_map(|l| (0..EXPERTS).map(move |e| (l, e)))
        .filter(|&(l, e)| tracker.touched(l, e))
        .filter(|&(l, e)| resident_bytes(map, model.expert_slab(l, e).unwrap()).unwrap() == 0)
        .count();
    assert!(released_and_gone > 0);
    // …and fault back from the file with the same bytes: the same prompt gives the same logits.
    let mut a = Session::new(&model, SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let first = a.forward_with(&[3, 1, 4, 1, 5], Logits::All, &mut tracker).unwrap().to_vec();
    let mut b = Session::new(&model, SessionOptions { threads: 1, ..Default::default() }).unwrap();
    let second = b.forward(&[3, 1, 4, 1, 5]).unwrap();
    assert_eq!(first.as_slice(), second);
}
