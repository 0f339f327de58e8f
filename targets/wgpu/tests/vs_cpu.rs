//! The GPU target against the CPU target on the same files: every fixture family (hybrids with
//! gated DeltaNet layers included; the Switch encoder through `encode`), vanilla and MEO modes (prompt merges with both poolings, stored
//! task merges, MEO-native banks merged and unmerged), in f32 and int8, and with 4-bit (Q4_0,
//! MXFP4) experts. Checked per layer (the input of every MoE layer, as `Trace::on_moe_input`
//! reports it) and on the logits, each within its error budget; routing must be identical (same experts at every layer and position,
//! weights within 1e-5), and merged layers reported alike.
//! Also: expert residency (LRU budget, stats) and typed errors.

use meo::route::Choice;
use meo::{
    DType, LayerSelect, MergeOptions, MergedUse, Mode, Model, PromptPool, Session, SessionOptions, Target, Trace,
};
use meo_converter::convert::{self, Options};
use meo_converter::merges::{MergeSpec, TaskSpec, Weighting};
use meo_tests::conformance::{FIXTURES, RECURRENT_FIXTURES, fixture_dir};
use meo_wgpu::{WgpuOptions, WgpuTarget};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

#[derive(Default)]
struct Rec {
    /// (layer, pos) → (experts, weights).
    routes: BTreeMap<(usize, usize), (Vec<u32>, Vec<f32>)>,
    /// layer → the MoE layer's inputs, every call concatenated.
    inputs: BTreeMap<usize, Vec<f32>>,
    merged: Vec<(usize, usize, MergedUse)>,
}

impl Trace for Rec {
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        let prev = self.routes.insert(
            (layer, pos),
            (choices.iter().map(|c| c.expert).collect(), choices.iter().map(|c| c.weight).collect()),
        );
        assert!(prev.is_none(), "layer {layer} position {pos} routed twice");
    }
    fn on_moe_input(&mut self, layer: usize, _pos0: usize, x: &[f32]) {
        self.inputs.entry(layer).or_default().extend_from_slice(x);
    }
    fn on_merged(&mut self, layer: usize, tokens: usize, expert: &MergedUse) {
        self.merged.push((layer, tokens, expert.clone()));
    }
}

fn wgpu(model: &Model, budget: usize) -> WgpuTarget<'_> {
    let opts =
        WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), expert_budget: budget, ..Default::default() };
    let t = WgpuTarget::new(model, opts).unwrap_or_else(|e| panic!("wgpu target: {e}"));
    println!("adapter: {}", t.describe());
    t
}

fn cpu(model: &Model) -> Session<'_> {
    Session::new(model, SessionOptions { threads: 1, ..Default::default() }).unwrap()
}

const PROMPT: [u32; 12] = [193, 255, 160, 120, 222, 144, 165, 83, 207, 77, 177, 14];

/// The prompt, then `tokens` one at a time (teacher forced, so both targets see the same
/// sequence); all logits and the trace.
fn run(t: &mut dyn Target, opts: &MergeOptions, tokens: &[u32]) -> (Vec<f32>, Rec) {
    t.set_mode(opts.clone()).unwrap_or_else(|e| panic!("{}: set_mode: {e}", t.name()));
    let mut rec = Rec::default();
    let mut logits = t.forward(&PROMPT, meo::Logits::All, &mut rec).unwrap().to_vec();
    for &tok in tokens {
        logits.extend_from_slice(t.forward(&[tok], meo::Logits::All, &mut rec).unwrap());
    }
    (logits, rec)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Error budgets: (MoE-layer input, logits), absolute. Measured on lavapipe: ≤ 2.1e-6 and
/// ≤ 1.2e-5 in every case (f32 summation order only: the int8 kernels quantize activations
/// exactly as the CPU does). int8 leaves room for an activation landing on the other side of
/// a rounding boundary on another adapter (one quantization step of one block).
///
/// The 4-bit kernels (Q4_0, MXFP4) take the same path: the same int8 activations, exact int32
/// block sums of the codes' integer values, one f32 product per block; so the GPU differs from
/// the CPU by f32 summation order plus, where an activation falls on the other side of a
/// rounding boundary, one activation quantum times one weight — the same weights' magnitude as
/// int8 (a 4-bit weight is `code · scale` with the block's largest at about the int8 one), so
/// the int8 budget holds for them too.
fn budget(experts: DType) -> (f32, f32) {
    match experts {
        DType::F32 => (2e-5, 1e-4),
        _ => (5e-4, 2e-3),
    }
}

/// Runs `opts` on both targets over `path` and checks them against each other.
fn compare(path: &Path, what: &str, opts: &MergeOptions, experts: DType) {
    let model = Model::open(path).unwrap();
    let v = model.config().vocab_size;
    // Continuation: the CPU's own greedy tokens.
    let mut s = cpu(&model);
    s.set_mode(opts.clone()).unwrap();
    let mut last = s.forward(&PROMPT).unwrap()[(PROMPT.len() - 1) * v..].to_vec();
    let mut cont = Vec::new();
    for _ in 0..5 {
        let next = meo::sample::argmax(&last);
        cont.push(next);
        last = s.forward(&[next]).unwrap().to_vec();
    }
    let (cl, cr) = run(&mut cpu(&model), opts, &cont);
    let mut g = wgpu(&model, 0);
    let (gl, gr) = run(&mut g, opts, &cont);
    let (bx, bl) = budget(experts);
    let dl = max_diff(&cl, &gl);
    let mut dx = 0.0f32;
    assert_eq!(cr.inputs.keys().collect::<Vec<_>>(), gr.inputs.keys().collect::<Vec<_>>(), "{what}: MoE layers");
    for (l, x) in &cr.inputs {
        let d = max_diff(x, &gr.inputs[l]);
        assert!(d <= bx, "{what}: layer {l} input differs by {d:e} > budget {bx:e}");
        dx = dx.max(d);
    }
    assert!(dl <= bl, "{what}: logits differ by {dl:e} > budget {bl:e}");
    assert_eq!(cr.routes.keys().collect::<Vec<_>>(), gr.routes.keys().collect::<Vec<_>>(), "{what}: routed positions");
    for (k, (ce, cw)) in &cr.routes {
        let (ge, gw) = &gr.routes[k];
        assert_eq!(ce, ge, "{what}: layer {} position {}: experts", k.0, k.1);
        let d = max_diff(cw, gw);
        assert!(d <= 1e-5, "{what}: layer {} position {}: weights differ by {d:e}", k.0, k.1);
    }
    assert_eq!(cr.merged, gr.merged, "{what}: merged layers reported");
    println!(
        "{what}: max |Δ| vs cpu: MoE inputs {dx:.2e}, logits {dl:.2e}; {} routes identical, {} merged calls; {:?}",
        cr.routes.len(),
        cr.merged.len(),
        g.expert_stats()
    );
}

const DOCS: &str = "The value of the object is returned. If the argument is a string, it is parsed \
as a number; otherwise the object must define an index method. A list is a mutable sequence. ";

fn convert_fixture(name: &str, experts: DType, dense: DType, tasks: bool, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-{}-{}-{tasks}.meo", experts.name(), dense.name()));
    let opts = Options { experts, dense, align: true };
    let mut spec = MergeSpec { weighting: Weighting::MeanGate, ..Default::default() };
    if tasks {
        let p = dir.join("docs.txt");
        std::fs::write(&p, DOCS.repeat(6)).unwrap();
        spec.tasks.push(TaskSpec { name: "docs".into(), text: p });
    }
    convert::convert_with(&fixture_dir(name), &out, opts, &spec, &AtomicBool::new(false), |_| {})
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    out
}

fn vanilla() -> MergeOptions {
    MergeOptions { mode: Mode::Vanilla, layers: LayerSelect::All }
}

#[test]
fn every_fixture_vanilla_matches_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES.into_iter().chain(RECURRENT_FIXTURES) {
        for (experts, dense) in [(DType::F32, DType::F32), (DType::Q8_0, DType::F16)] {
            let p = convert_fixture(name, experts, dense, false, tmp.path());
            compare(&p, &format!("{name} {}/{} vanilla", experts.name(), dense.name()), &vanilla(), experts);
        }
    }
}

#[test]
fn four_bit_experts_match_cpu() {
    // Q4_0 and MXFP4 experts (f16 dense): the prompt (T tokens) and decode (T = 1) paths.
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        for experts in [DType::Q4_0, DType::MXFP4] {
            let p = convert_fixture(name, experts, DType::F16, false, tmp.path());
            compare(&p, &format!("{name} {}/f16 vanilla", experts.name()), &vanilla(), experts);
        }
    }
}

#[test]
fn four_bit_meo_modes_match_cpu() {
    // Merges of 4-bit experts are re-encoded in the experts' dtype (`meo::merge::encode`):
    // stored task merges, prompt merges, and the MEO-native banks merged and unmerged.
    let tmp = tempfile::tempdir().unwrap();
    for experts in [DType::Q4_0, DType::MXFP4] {
        for name in ["mixtral", "deepseek_v3"] {
            let p = convert_fixture(name, experts, DType::F16, true, tmp.path());
            for (label, mode) in [
                ("task docs", Mode::Task("docs".into())),
                ("prompt mean-gate", Mode::Prompt(PromptPool::MeanGate)),
                ("prompt pooled-input", Mode::Prompt(PromptPool::PooledInput)),
            ] {
                let opts = MergeOptions { mode, layers: LayerSelect::All };
                compare(&p, &format!("{name} {} {label}", experts.name()), &opts, experts);
            }
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trained/meo-gpt2");
        let out = tmp.path().join(format!("gpt2-{}.meo", experts.name()));
        let opts = Options { experts, dense: DType::F16, align: true };
        convert::convert(&dir, &out, opts, &AtomicBool::new(false), |_| {}).unwrap();
        let model = Model::open(&out).unwrap();
        let mut modes =
            vec![("sequence", Mode::Prompt(PromptPool::default())), ("vanilla (unmerged banks)", Mode::Vanilla)];
        modes.extend(model.meo_tasks().iter().map(|t| ("task", Mode::Task(t.name.clone()))));
        for (label, mode) in modes {
            let opts = MergeOptions { mode, layers: LayerSelect::All };
            compare(&out, &format!("meo-gpt2 {} {label}", experts.name()), &opts, experts);
        }
    }
}

#[test]
fn portable_int8_dot_gives_the_packed_results_on_4bit() {
    let tmp = tempfile::tempdir().unwrap();
    for experts in [DType::Q4_0, DType::MXFP4] {
        let p = convert_fixture("qwen2_moe", experts, DType::F16, false, tmp.path());
        let model = Model::open(&p).unwrap();
        let mut runs = Vec::new();
        for portable_dot in [false, true] {
            let opts =
                WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), portable_dot, ..Default::default() };
            let mut t = WgpuTarget::new(&model, opts).unwrap_or_else(|e| panic!("wgpu target: {e}"));
            runs.push(t.forward(&PROMPT, meo::Logits::All, &mut meo::NoTrace).unwrap().to_vec());
        }
        assert_eq!(runs[0], runs[1], "{}", experts.name());
    }
}

#[test]
fn meo_modes_match_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v3",
        "deepseek_v2",
        "granitemoe",
        "glm4_moe",
        "phimoe",
        "qwen3_next",
        "lfm2_moe",
    ] {
        for (experts, dense) in [(DType::F32, DType::F32), (DType::Q8_0, DType::F16)] {
            let p = convert_fixture(name, experts, dense, true, tmp.path());
            for (label, mode) in [
                ("task docs", Mode::Task("docs".into())),
                ("prompt mean-gate", Mode::Prompt(PromptPool::MeanGate)),
                ("prompt pooled-input", Mode::Prompt(PromptPool::PooledInput)),
            ] {
                let opts = MergeOptions { mode, layers: LayerSelect::All };
                compare(&p, &format!("{name} {} {label}", experts.name()), &opts, experts);
            }
        }
    }
}

#[test]
fn meo_native_banks_match_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trained/meo-gpt2");
    for (experts, dense) in [(DType::F32, DType::F32), (DType::Q8_0, DType::F16)] {
        let out = tmp.path().join(format!("gpt2-{}.meo", experts.name()));
        convert::convert(&dir, &out, Options { experts, dense, align: true }, &AtomicBool::new(false), |_| {}).unwrap();
        let model = Model::open(&out).unwrap();
        let mut modes =
            vec![("sequence", Mode::Prompt(PromptPool::default())), ("vanilla (unmerged banks)", Mode::Vanilla)];
        modes.extend(model.meo_tasks().iter().map(|t| ("task", Mode::Task(t.name.clone()))));
        assert!(modes.len() > 1, "the MEO-native fixture stores task merges");
        for (label, mode) in modes {
            let opts = MergeOptions { mode, layers: LayerSelect::All };
            let what = format!("meo-gpt2 {} {label}", experts.name());
            compare(&out, &what, &opts, experts);
            // MEO-native routing is the banks' gates: the same experts and weights.
            let mut c = cpu(&model);
            c.set_mode(opts.clone()).unwrap();
            c.forward(&PROMPT).unwrap();
            let mut g = wgpu(&model, 0);
            g.set_mode(opts).unwrap();
            g.forward(&PROMPT, meo::Logits::Last, &mut meo::NoTrace).unwrap();
            let mut selected = 0;
            for l in 0..model.config().num_layers {
                let (cg, gg) = (c.bank_gates(l).expect("cpu gates"), g.bank_gates(l).expect("gpu gates"));
                for (a, b) in cg.iter().zip(&gg) {
                    let ids = |v: &[Choice]| v.iter().map(|c| c.expert).collect::<Vec<_>>();
                    assert_eq!(ids(a), ids(b), "{what}: layer {l}: gate experts");
                    for (x, y) in a.iter().zip(b) {
                        assert!((x.weight - y.weight).abs() <= 1e-5, "{what}: layer {l}: gate weights");
                    }
                    selected += b.len() as u64;
                }
            }
            // Unmerged banks read their selected experts through the expert cache: each
            // uploaded once, then resident for the following tokens.
            let s = g.expert_stats();
            if label.starts_with("vanilla") {
                assert_eq!((s.uploads, s.hits), (selected, 0), "{what}: {s:?}");
                g.forward(&[PROMPT[0]], meo::Logits::Last, &mut meo::NoTrace).unwrap();
                let s = g.expert_stats();
                assert_eq!((s.uploads, s.hits), (selected, selected), "{what}: {s:?}");
            } else {
                assert_eq!(s.uploads, 0, "{what}: merged banks upload no single expert: {s:?}");
            }
        }
    }
}

#[test]
fn portable_int8_dot_gives_the_packed_results() {
    // Int8 block sums are exact integers either way: the two implementations agree bitwise.
    let tmp = tempfile::tempdir().unwrap();
    let p = convert_fixture("qwen2_moe", DType::Q8_0, DType::F16, false, tmp.path());
    let model = Model::open(&p).unwrap();
    let toks: Vec<u32> = PROMPT.to_vec();
    let mut runs = Vec::new();
    for portable_dot in [false, true] {
        let opts = WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), portable_dot, ..Default::default() };
        let mut t = WgpuTarget::new(&model, opts).unwrap_or_else(|e| panic!("wgpu target: {e}"));
        println!("adapter: {} (portable requested: {portable_dot})", t.describe());
        assert!(!portable_dot || !t.packed_dot());
        runs.push(t.forward(&toks, meo::Logits::All, &mut meo::NoTrace).unwrap().to_vec());
    }
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn expert_cache_respects_its_budget_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = convert_fixture("mixtral", DType::Q8_0, DType::F16, false, tmp.path());
    let model = Model::open(&p).unwrap();
    let toks: Vec<u32> = PROMPT.iter().chain(&PROMPT).copied().collect();
    let mut roomy = wgpu(&model, 0);
    let want = roomy.forward(&toks, meo::Logits::All, &mut meo::NoTrace).unwrap().to_vec();
    let s = roomy.expert_stats();
    assert!(s.uploads > 0 && s.evictions == 0, "{s:?}");
    // The same tokens again: every selected expert is resident.
    roomy.reset();
    roomy.forward(&toks, meo::Logits::All, &mut meo::NoTrace).unwrap();
    let s2 = roomy.expert_stats();
    assert_eq!(s2.uploads, s.uploads, "{s2:?}");
    assert!(s2.hits >= s.uploads, "{s2:?}");
    // One expert's worth of budget: evictions, same logits.
    let one = s.resident_bytes / s.uploads;
    let mut tight = wgpu(&model, one as usize);
    let got = tight.forward(&toks, meo::Logits::All, &mut meo::NoTrace).unwrap().to_vec();
    let st = tight.expert_stats();
    assert!(st.evictions > 0 && st.resident_bytes <= one, "{st:?}");
    assert_eq!(got, want, "eviction changed the result");
    println!("roomy {s2:?}\ntight {st:?}");
}

#[test]
fn refused_input_is_a_typed_error_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = convert_fixture("olmoe", DType::F32, DType::F32, false, tmp.path());
    let model = Model::open(&p).unwrap();
    let v = model.config().vocab_size as u32;
    let mut g = wgpu(&model, 0);
    let e = g.forward(&[1, v], meo::Logits::All, &mut meo::NoTrace).unwrap_err();
    assert!(matches!(e, meo::TargetError::Forward(meo::ForwardError::TokenOutOfRange { index: 1, .. })), "{e}");
    assert_eq!(g.position(), 0);
    let last = g.forward(&PROMPT, meo::Logits::Last, &mut meo::NoTrace).unwrap().to_vec();
    assert_eq!(last.len(), v as usize);
    assert_eq!(g.position(), PROMPT.len());
    let e = g.set_mode(MergeOptions { mode: Mode::Task("nope".into()), layers: LayerSelect::All }).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn encoder_matches_cpu() {
    // Switch Transformers: bidirectional attention with a relative position bias, ReLU
    // experts, top-1 routing with expert capacity (dropped tokens keep the residual).
    let tmp = tempfile::tempdir().unwrap();
    let toks: Vec<u32> = PROMPT.iter().chain(&PROMPT).copied().collect();
    for (experts, dense) in [(DType::F32, DType::F32), (DType::Q8_0, DType::F16)] {
        let p = convert_fixture("switch_transformers", experts, dense, false, tmp.path());
        let model = Model::open(&p).unwrap();
        let toks: Vec<u32> = toks.iter().map(|&t| t % model.config().vocab_size as u32).collect();
        let (mut cr, mut gr) = (Rec::default(), Rec::default());
        let ch = cpu(&model).encode(&toks, &mut cr).unwrap().to_vec();
        let mut g = wgpu(&model, 0);
        let gh = g.encode(&toks, &mut gr).unwrap().to_vec();
        assert_eq!(g.position(), toks.len());
        let (bx, bl) = budget(experts);
        let what = format!("switch_transformers {}", experts.name());
        for (l, x) in &cr.inputs {
            let d = max_diff(x, &gr.inputs[l]);
            assert!(d <= bx, "{what}: layer {l} input differs by {d:e} > budget {bx:e}");
        }
        let dh = max_diff(&ch, &gh);
        assert!(dh <= bl, "{what}: hidden states differ by {dh:e} > budget {bl:e}");
        assert!(!cr.routes.is_empty());
        assert_eq!(cr.routes.len(), gr.routes.len(), "{what}: routed positions");
        for (k, (ce, cw)) in &cr.routes {
            let (ge, gw) = &gr.routes[k];
            assert_eq!(ce, ge, "{what}: layer {} position {}: experts", k.0, k.1);
            // Weight 0 marks a token dropped by capacity: the same tokens on both.
            assert_eq!(
                cw.iter().map(|&w| w == 0.0).collect::<Vec<_>>(),
                gw.iter().map(|&w| w == 0.0).collect::<Vec<_>>()
            );
            assert!(max_diff(cw, gw) <= 1e-5, "{what}: layer {} position {}: weights", k.0, k.1);
        }
        let dropped = cr.routes.values().filter(|(_, w)| w.contains(&0.0)).count();
        println!("{what}: max |Δ| vs cpu: hidden {dh:.2e}; {} routes identical ({dropped} dropped)", cr.routes.len());
    }
}

#[test]
fn biased_experts_refuse_prompt_merges_like_the_cpu() {
    // GPT-OSS experts have biases: there is no merge rule, on either target.
    let tmp = tempfile::tempdir().unwrap();
    let p = convert_fixture("gpt_oss", DType::F32, DType::F32, false, tmp.path());
    let model = Model::open(&p).unwrap();
    let opts = MergeOptions { mode: Mode::Prompt(PromptPool::MeanGate), layers: LayerSelect::All };
    let c = cpu(&model).set_mode(opts.clone()).unwrap_err().to_string();
    let g = wgpu(&model, 0).set_mode(opts).unwrap_err();
    assert!(matches!(g, meo::TargetError::Mode(meo::ModeError::NotMergeable { .. })), "{g}");
    assert_eq!(g.to_string(), c);
}

/// `meo convert --compress` (issue 23): pruned and merged files are standard files with fewer
/// experts; the GPU routes over the survivors exactly as the CPU does.
#[test]
fn compressed_files_match_cpu() {
    use meo_converter::compress::{CompressSpec, Method};
    let tmp = tempfile::tempdir().unwrap();
    let calib = tmp.path().join("calib.txt");
    std::fs::write(&calib, DOCS.repeat(12)).unwrap();
    for method in [Method::Reap, Method::McSmoe] {
        let out = tmp.path().join(format!("{}.meo", method.name()));
        let spec = MergeSpec {
            calib: Some(calib.clone()),
            compress: Some(CompressSpec { method, fraction: 0.5 }),
            ..Default::default()
        };
        let opts = Options { experts: DType::Q8_0, dense: DType::F16, align: false };
        convert::convert_with(&fixture_dir("mixtral"), &out, opts, &spec, &AtomicBool::new(false), |_| {})
            .unwrap_or_else(|e| panic!("{}: {e:#}", method.name()));
        // The fixture has 8 experts per layer.
        assert_eq!(Model::open(&out).unwrap().config().router.num_experts, 4);
        compare(&out, &format!("mixtral --compress {}:0.5", method.name()), &vanilla(), DType::Q8_0);
    }
}
