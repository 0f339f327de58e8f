//! MEO merged execution of standard MoEs (docs/MEO-MERGING.md): the merge rule, task merges stored by
//! the converter, prompt-mode merges cached in the session, the layer policy, and expert
//! alignment. Files are converted from the golden fixtures with a small calibration text.

use meo::merge::{ExpertRef, merge_matrices};
use meo::{
    DType, LayerSelect, MergeOptions, MergedUse, Mode, ModeError, Model, PromptPool, Session, SessionOptions, Trace,
};
use meo_converter::convert::{self, Options};
use meo_converter::merges::{MergeSpec, TaskSpec, Weighting};
use meo_tests::Rng;
use meo_tests::conformance::fixture_dir;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

const DOCS: &str = "The value of the object is returned. If the argument is a string, it is parsed \
as a number; otherwise the object must define an index method. A list is a mutable sequence, \
and a tuple is an immutable one. The return value is None when the function falls off the end. \
Keys of a dictionary must be hashable; the values may be of any type. Exceptions are raised with \
the raise statement and handled with try and except clauses. ";
const CODE: &str = "def f(x):\n    return [i * 2 for i in range(x) if i % 3]\n\nclass A:\n    \
def __init__(self, n):\n        self.n = n\n\n    def __repr__(self):\n        return f'A({self.n})'\n";

/// Converts fixture `name` with tasks `docs` and `code` (calibration texts above, repeated).
fn convert_tasks(name: &str, opts: Options, dir: &Path) -> PathBuf {
    let mut tasks = Vec::new();
    for (task, text) in [("docs", DOCS), ("code", CODE)] {
        let p = dir.join(format!("{task}.txt"));
        std::fs::write(&p, text.repeat(6)).unwrap();
        tasks.push(TaskSpec { name: task.into(), text: p });
    }
    let out = dir.join(format!("{name}-{}-{}.meo", opts.experts.name(), opts.align));
    let spec = MergeSpec { tasks, weighting: Weighting::MeanGate, ..Default::default() };
    convert::convert_with(&fixture_dir(name), &out, opts, &spec, &AtomicBool::new(false), |_| {})
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    out
}

fn plain(name: &str, opts: Options, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-plain-{}-{}.meo", opts.experts.name(), opts.align));
    convert::convert(&fixture_dir(name), &out, opts, &AtomicBool::new(false), |_| {}).unwrap();
    out
}

fn session(m: &Model) -> Session<'_> {
    Session::new(m, SessionOptions { threads: 1, ..Default::default() }).unwrap()
}

fn task(name: &str) -> MergeOptions {
    MergeOptions { mode: Mode::Task(name.into()), layers: LayerSelect::All }
}

/// Prompt then `n` greedy steps; all logits.
fn generate(s: &mut Session<'_>, prompt: &[u32], n: usize, trace: &mut dyn Trace) -> Vec<f32> {
    let v = s.model().config().vocab_size;
    let mut all = s.forward_with(prompt, meo::Logits::All, trace).unwrap().to_vec();
    for _ in 0..n {
        let next = meo::sample::argmax(&all[all.len() - v..]);
        all.extend_from_slice(s.forward_with(&[next], meo::Logits::All, trace).unwrap());
    }
    all
}

const PROMPT: [u32; 12] = [193, 255, 160, 120, 222, 144, 165, 83, 207, 77, 177, 14];

#[derive(Default)]
struct Seen {
    routed: Vec<(usize, usize)>,
    selected: usize,
    merged: Vec<(usize, MergedUse)>,
}

impl Trace for Seen {
    fn on_experts_selected(&mut self, _layer: usize, _experts: &[u32]) {
        self.selected += 1;
    }
    fn on_route(&mut self, layer: usize, pos: usize, _choices: &[meo::route::Choice]) {
        self.routed.push((layer, pos));
    }
    fn on_merged(&mut self, layer: usize, _tokens: usize, expert: &MergedUse) {
        self.merged.push((layer, expert.clone()));
    }
}

#[test]
fn merging_a_linear_map_is_exact() {
    // θ̂ = Σ w_i θ_i applied to x equals Σ w_i (θ_i x), for f32 and for int8 (dequantized) maps.
    let (rows, cols, t) = (24, 96, 5);
    let mut r = Rng::new(9);
    let x: Vec<f32> = (0..t * cols).map(|_| r.f32()).collect();
    let w = [0.5f32, 0.0, 0.2, 0.3];
    for dtype in [DType::F32, DType::Q8_0] {
        let mats: Vec<Vec<u8>> = (0..w.len())
            .map(|_| {
                let v: Vec<f32> = (0..rows * cols).map(|_| r.f32()).collect();
                meo::merge::encode(&v, rows, cols, dtype)
            })
            .collect();
        let refs: Vec<_> = mats.iter().map(|b| meo::kernels::MatRef::new(dtype, rows, cols, b).unwrap()).collect();
        let mut merged = vec![0.0; rows * cols];
        merge_matrices(&refs.iter().copied().zip(w).collect::<Vec<_>>(), &mut merged);
        let mb = meo::merge::encode(&merged, rows, cols, DType::F32);
        let mref = meo::kernels::MatRef::new(DType::F32, rows, cols, &mb).unwrap();
        let mut y = vec![0.0; t * rows];
        meo::kernels::matmul(&meo::kernels::Serial, &x, t, &mref, &mut y);
        let mut mix = vec![0.0f32; t * rows];
        for (m, &wi) in refs.iter().zip(&w) {
            // The reference product (dequantized weights, unquantized x): the Q8_0 kernel
            // also quantizes the activations, which is not what this test is about.
            let yi = meo::kernels::matmul_reference(&x, t, m);
            for (o, v) in mix.iter_mut().zip(yi) {
                *o += wi * v;
            }
        }
        for (a, b) in y.iter().zip(&mix) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{dtype:?}: {a} vs {b}");
        }
    }
}

#[test]
fn merging_one_expert_gives_its_vanilla_output() {
    // The SwiGLU rule (gate/up with normalised weights, down with the raw ones) is exact for a
    // single expert with any weight: p·E_i(x).
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::open(plain("olmoe", Options { experts: DType::F32, dense: DType::F32, align: true }, tmp.path()))
        .unwrap();
    let (h, e) = (m.config().hidden_size, m.config().router.num_experts);
    let mut r = Rng::new(3);
    let x: Vec<f32> = (0..3 * h).map(|_| r.f32()).collect();
    for (i, p) in [(2usize, 0.37f32), (5, 1.0)] {
        let mut w = vec![0.0; e];
        w[i] = p;
        let me = m.merge_layer(0, &w, Some(DType::F32)).unwrap();
        let (mut a, mut b) = (vec![0.0; 3 * h], vec![0.0; 3 * h]);
        m.run_expert(me.as_ref(), &x, 3, &mut a);
        m.run_expert(m.expert(0, i).unwrap(), &x, 3, &mut b);
        for (a, b) in a.iter().zip(&b) {
            assert!((a - p * b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {p}·{b}");
        }
    }
}

/// The file's bytes with every per-expert slab (`layers.L.experts.E`) overwritten with NaN
/// patterns (0xFF bytes: NaN in f32, f16 scales and bf16).
fn poison_expert_slabs(bytes: &[u8]) -> Vec<u8> {
    let f = meo::MeoFile::parse(bytes).unwrap();
    let ranges: Vec<_> = f.slabs().iter().filter(|s| s.key.starts_with("layers.")).map(|s| f.slab_range(s)).collect();
    assert!(!ranges.is_empty());
    let mut out = bytes.to_vec();
    for r in ranges {
        out[r].fill(0xFF);
    }
    out
}

#[test]
fn task_mode_reads_no_per_expert_slab() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture in ["mixtral", "qwen2_moe", "glm4_moe", "phimoe", "llama4", "hunyuan_v1_moe"] {
        let path = convert_tasks(fixture, Options::default(), tmp.path());
        let bytes = std::fs::read(&path).unwrap();
        let good = Model::from_vec(bytes.clone()).unwrap();
        let bad = Model::from_vec(poison_expert_slabs(&bytes)).unwrap();
        // The poison is real: vanilla on the poisoned file is NaN.
        assert!(session(&bad).forward(&PROMPT).unwrap().iter().any(|v| v.is_nan()), "{fixture}");
        for name in ["docs", "code"] {
            let mut a = session(&good);
            let merged = a.set_mode(task(name)).unwrap();
            assert_eq!(merged, good.moe_layers().collect::<Vec<_>>());
            let mut seen = Seen::default();
            let want = generate(&mut a, &PROMPT, 6, &mut seen);
            assert!(seen.routed.is_empty() && seen.selected == 0, "{fixture}/{name}: task mode routed tokens");
            assert_eq!(seen.merged.len(), 7 * merged.len());
            assert!(seen.merged.iter().all(|(_, u)| matches!(u, MergedUse::File(_))));
            let mut b = session(&bad);
            b.set_mode(task(name)).unwrap();
            let got = generate(&mut b, &PROMPT, 6, &mut meo::NoTrace);
            assert!(got.iter().all(|v| v.is_finite()), "{fixture}/{name}: read a poisoned expert slab");
            assert_eq!(got, want, "{fixture}/{name}");
        }
    }
}

/// Task mode on a file whose pages were dropped from the page cache: `mincore` shows no byte
/// of any per-expert slab was read.
#[cfg(target_os = "linux")]
#[test]
fn task_mode_residency_shows_no_expert_slab() {
    use meo::residency::{self, ExpertTracker, TrackerOptions};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = convert_tasks("mixtral", Options::default(), dir.path());
    residency::drop_page_cache(&path).unwrap();
    let model = Model::from_mapped(residency::map_lazy(&path).unwrap()).unwrap();
    // Prediction on: it must not read the slabs of a layer that runs a task merge.
    let opts = TrackerOptions { prefetch: false, predict: true, ..TrackerOptions::default() };
    let mut tracker = ExpertTracker::for_model(&model, opts).unwrap();
    let before = tracker.stats().unwrap();
    assert_eq!(before.expert_bytes_resident, 0, "page cache not dropped (tmpfs?)");
    let mut s = session(&model);
    s.set_mode(task("docs")).unwrap();
    let logits = generate(&mut s, &PROMPT, 4, &mut tracker);
    assert!(logits.iter().all(|v| v.is_finite()));
    let after = tracker.stats().unwrap();
    assert_eq!(after.experts_touched, 0);
    assert_eq!(after.expert_bytes_resident, 0, "a per-expert slab was read in task mode");
    // The same file in vanilla mode does read expert slabs.
    let mut v = session(&model);
    generate(&mut v, &PROMPT, 1, &mut tracker);
    assert!(tracker.stats().unwrap().expert_bytes_resident > 0);
}

/// Prompt mode: after the prompt the per-expert slabs are made unreadable (`PROT_NONE`); the
/// decode steps run on the merged experts cached in the session, with the same logits.
#[cfg(target_os = "linux")]
#[test]
fn prompt_mode_decode_uses_the_cached_merge() {
    let tmp = tempfile::tempdir().unwrap();
    for fixture in ["mixtral", "olmoe", "glm4_moe", "phimoe", "llama4", "hunyuan_v1_moe"] {
        let path = plain(fixture, Options::default(), tmp.path());
        let model = Model::open(&path).unwrap();
        for pool in [PromptPool::MeanGate, PromptPool::PooledInput] {
            let opts = MergeOptions { mode: Mode::Prompt(pool), layers: LayerSelect::All };
            let mut s = session(&model);
            s.set_mode(opts.clone()).unwrap();
            let want = generate(&mut s, &PROMPT, 6, &mut meo::NoTrace);
            // The prompt's logits are vanilla's.
            let vanilla = session(&model).forward(&PROMPT).unwrap().to_vec();
            assert_eq!(want[..vanilla.len()], vanilla[..]);

            let mut s = session(&model);
            s.set_mode(opts).unwrap();
            let mut seen = Seen::default();
            let v = model.config().vocab_size;
            let mut got = s.forward_with(&PROMPT, meo::Logits::All, &mut seen).unwrap().to_vec();
            assert_eq!(s.merged_layers(), model.moe_layers().collect::<Vec<_>>());
            let routed_in_prompt = seen.routed.len();
            let map = model.mapped().unwrap();
            let base = map.bytes().as_ptr() as usize;
            let ps = meo::residency::page_size();
            let slabs: Vec<_> = (0..model.config().num_layers)
                .flat_map(|l| (0..8).map(move |e| (l, e)))
                .filter_map(|(l, e)| model.expert_slab(l, e))
                .map(|r| (base + r.start, (r.end - r.start).next_multiple_of(ps)))
                .collect();
            let protect = |prot| {
                for &(addr, len) in &slabs {
                    assert_eq!(addr % ps, 0);
                    // SAFETY: whole pages of this process's read-only file mapping of `path`,
                    // which outlives the calls; only the protection changes.
                    let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
                    assert_eq!(r, 0, "mprotect");
                }
            };
            protect(libc::PROT_NONE);
            for _ in 0..6 {
                let next = meo::sample::argmax(&got[got.len() - v..]);
                got.extend_from_slice(s.forward_with(&[next], meo::Logits::All, &mut seen).unwrap());
            }
            protect(libc::PROT_READ);
            assert_eq!(got, want, "{fixture} {pool:?}");
            assert_eq!(seen.routed.len(), routed_in_prompt, "decode routed tokens");
            assert!(seen.merged.iter().all(|(_, u)| matches!(u, MergedUse::Session(_))));
            // A reset merges again from the next prompt.
            s.reset();
            assert!(s.merged_layers().is_empty());
        }
    }
}

#[test]
fn auto_never_merges_a_layer_above_its_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let path = convert_tasks("qwen3_moe", Options::default(), tmp.path());
    let model = Model::open(&path).unwrap();
    let t = model.task("docs").unwrap();
    let errors: Vec<(usize, f64)> = t.layers.iter().map(|l| (l.layer, l.error.unwrap())).collect();
    assert_eq!(errors.len(), 2);
    let prompt = model.prompt_errors().to_vec();
    assert_eq!(prompt.len(), 2);
    let mut budgets = vec![0.0, 1e9];
    for &(_, e) in errors.iter().chain(&prompt) {
        budgets.extend([e, e * (1.0 - 1e-9), e * (1.0 + 1e-9)]);
    }
    for (mode, errs) in [(Mode::Task("docs".into()), &errors), (Mode::Prompt(PromptPool::MeanGate), &prompt)] {
        for &budget in &budgets {
            let mut s = session(&model);
            let got = s.set_mode(MergeOptions { mode: mode.clone(), layers: LayerSelect::Auto { budget } }).unwrap();
            let want: Vec<usize> = errs.iter().filter(|(_, e)| *e <= budget).map(|(l, _)| *l).collect();
            assert_eq!(got, want, "{mode:?} budget {budget}");
            for l in &got {
                let e = errs.iter().find(|x| x.0 == *l).unwrap().1;
                assert!(e <= budget);
            }
            if matches!(mode, Mode::Task(_)) {
                generate(&mut s, &PROMPT, 1, &mut meo::NoTrace);
                assert_eq!(s.merged_layers(), want);
            }
        }
    }
    // A file without measured errors: auto is refused, not guessed.
    let bare = Model::open(plain("qwen3_moe", Options::default(), tmp.path())).unwrap();
    let e = session(&bare)
        .set_mode(MergeOptions { mode: Mode::Prompt(PromptPool::MeanGate), layers: LayerSelect::Auto { budget: 1.0 } })
        .unwrap_err();
    assert!(matches!(e, ModeError::NoErrors { .. }), "{e}");
}

#[test]
fn stored_merge_weights_reproduce_the_merged_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    for weighting in [Weighting::MeanGate, Weighting::Frequency] {
        let texts: Vec<TaskSpec> = [("docs", DOCS)]
            .iter()
            .map(|(n, t)| {
                let p = tmp.path().join(format!("{n}.txt"));
                std::fs::write(&p, t.repeat(4)).unwrap();
                TaskSpec { name: (*n).into(), text: p }
            })
            .collect();
        let spec = MergeSpec { tasks: texts, weighting, ..Default::default() };
        let int8 = tmp.path().join("int8.meo");
        // Both aligned (the library's default is unaligned; `meo convert --task` aligns).
        let int8_opts = Options { align: true, ..Options::default() };
        convert::convert_with(&fixture_dir("olmoe"), &int8, int8_opts, &spec, &AtomicBool::new(false), |_| {}).unwrap();
        let f32_opts = Options { experts: DType::F32, dense: DType::F32, align: true };
        let f32_path = tmp.path().join("f32.meo");
        convert::convert_with(&fixture_dir("olmoe"), &f32_path, f32_opts, &spec, &AtomicBool::new(false), |_| {})
            .unwrap();
        let (mq, mf) = (Model::open(&int8).unwrap(), Model::open(&f32_path).unwrap());
        for (model, dtype) in [(&mq, DType::Q8_0), (&mf, DType::F32)] {
            let t = model.task("docs").unwrap();
            assert_eq!(t.weighting, weighting_name(weighting));
            assert!(t.tokens > 0);
            for tl in &t.layers {
                let w: Vec<f32> = tl.weights.iter().map(|&x| x as f32).collect();
                assert!(w.iter().all(|&x| x >= 0.0) && w.iter().sum::<f32>() > 0.0);
                // Merge the f32 (aligned) experts with the stored weights, re-encode.
                let again = mf.merge_layer(tl.layer, &w, Some(dtype)).unwrap();
                let stored = model.task_expert("docs", tl.layer).unwrap();
                for (a, b) in [
                    (again.mlp.gate.as_ref().expect("gated"), stored.mlp.gate.as_ref().expect("gated")),
                    (&again.mlp.up, &stored.mlp.up),
                    (&again.mlp.down, &stored.mlp.down),
                ] {
                    assert!(
                        again.bytes[a.range.clone()] == stored.bytes[b.range.clone()],
                        "{weighting:?} {dtype:?} layer {}: merge not reproduced",
                        tl.layer
                    );
                }
                assert!(tl.error.unwrap().is_finite() && tl.error_unaligned.unwrap().is_finite());
            }
        }
    }
}

fn weighting_name(w: Weighting) -> &'static str {
    w.name()
}

#[test]
fn alignment_keeps_vanilla_and_stores_the_order() {
    let tmp = tempfile::tempdir().unwrap();
    let on = Options { experts: DType::F32, dense: DType::F32, align: true };
    let off = Options { align: false, ..on };
    for fixture in ["mixtral", "qwen2_moe"] {
        let (a, b) = (
            Model::open(plain(fixture, on, tmp.path())).unwrap(),
            Model::open(plain(fixture, off, tmp.path())).unwrap(),
        );
        let orders = meo_converter::merges::read_orders(&a).unwrap().expect("aligned");
        assert!(meo_converter::merges::read_orders(&b).unwrap().is_none());
        let c = a.config();
        let (h, i) = (c.hidden_size, c.expert_intermediate_size);
        let mut moved = 0;
        for (&l, per) in &orders {
            assert_eq!(per[0], (0..i as u32).collect::<Vec<_>>(), "expert 0 is the reference");
            for (e, o) in per.iter().enumerate() {
                moved += usize::from(o.iter().enumerate().any(|(j, &x)| j as u32 != x));
                let (ea, eb) = (a.expert(l, e).unwrap(), b.expert(l, e).unwrap());
                for (part, is_down) in [(0, false), (1, false), (2, true)] {
                    let m = |x: ExpertRef<'_>| {
                        let mm = [x.mlp.gate.as_ref().expect("gated"), &x.mlp.up, &x.mlp.down][part];
                        x.bytes[mm.range.clone()]
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                            .collect::<Vec<f32>>()
                    };
                    assert_eq!(m(ea), meo_converter::align::permute(&m(eb), o, i, h, is_down), "{fixture} L{l} E{e}");
                }
            }
        }
        assert!(moved > 0, "{fixture}: alignment moved no unit");
        let (la, lb) = (session(&a).forward(&PROMPT).unwrap().to_vec(), session(&b).forward(&PROMPT).unwrap().to_vec());
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= 1e-5, "{fixture}: aligned {x} vs unaligned {y}");
        }
    }
}

#[test]
fn unknown_task_and_bad_layers_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(convert_tasks("mixtral", Options::default(), tmp.path())).unwrap();
    let mut s = session(&model);
    let e = s.set_mode(task("poetry")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("poetry") && msg.contains("docs") && msg.contains("code"), "{msg}");
    let e =
        s.set_mode(MergeOptions { mode: Mode::Task("docs".into()), layers: LayerSelect::Layers(vec![7]) }).unwrap_err();
    assert!(matches!(e, ModeError::NotMoe { layer: 7 }), "{e}");
    assert_eq!(s.mode().mode, Mode::Vanilla, "a refused mode leaves the session unchanged");
    let bare = Model::open(plain("mixtral", Options::default(), tmp.path())).unwrap();
    let msg = session(&bare).set_mode(task("docs")).unwrap_err().to_string();
    assert!(msg.contains("no task merges"), "{msg}");
    // Spellings.
    assert_eq!(Mode::parse("task:docs").unwrap(), Mode::Task("docs".into()));
    assert!(Mode::parse("task:").is_err() && Mode::parse("merged").is_err());
    assert_eq!(LayerSelect::parse("0, 2", 0.1).unwrap(), LayerSelect::Layers(vec![0, 2]));
    assert!(LayerSelect::parse("0,x", 0.1).is_err());
}

#[test]
fn eval_vanilla_is_identical_and_task_mode_reads_one_expert_per_layer() {
    use meo_cli::cmd::eval::{Args, evaluate};
    use meo_cli::cmd::mode::ModeArgs;
    let tmp = tempfile::tempdir().unwrap();
    let path = convert_tasks("mixtral", Options::default(), tmp.path());
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, DOCS.repeat(4)).unwrap();
    let args = |mode: &str| Args {
        file: path.clone(),
        data: data.clone(),
        mode: ModeArgs { mode: Some(mode.into()), ..ModeArgs::default() },
        kv: Default::default(),
        window: 64,
        prompt_len: 16,
        max_windows: 0,
        threads: 1,
        json: false,
        reference: None,
        memory: meo_cli::cmd::memory::MemoryArgs::default(),
    };
    let v = evaluate(&args("vanilla")).unwrap();
    assert_eq!((v.agreement, v.kl, v.perplexity), (1.0, 0.0, v.vanilla_perplexity));
    assert!(v.merge_error.is_empty() && v.scored_tokens > 0);
    assert_eq!(v.expert_bytes_per_token, v.vanilla_expert_bytes_per_token);
    let t = evaluate(&args("task:docs")).unwrap();
    assert_eq!(t.merged_layers, vec![0, 1]);
    assert!(t.perplexity.is_finite() && t.kl >= 0.0 && (0.0..=1.0).contains(&t.agreement));
    assert_eq!(t.merge_error.len(), 2);
    // One merged expert per layer instead of top_k = 2.
    let ratio = t.expert_bytes_per_token / t.vanilla_expert_bytes_per_token;
    assert!((ratio - 0.5).abs() < 1e-9, "bytes per token ratio {ratio}");
    let p = evaluate(&args("prompt")).unwrap();
    assert_eq!(p.merged_layers, vec![0, 1]);
    assert!(p.perplexity.is_finite());
}
