//! ONNX export (issue 6): task-merged exports of the trained models run in ONNX Runtime (CPU EP)
//! and in tract and match the CPU target in the same task mode; every weight form and external
//! data pass the ONNX checker; EP selection fails loudly for a required absent EP. Needs
//! `ci/setup` (the ONNX Runtime library in `.ort/`, the `onnx` package in `.py/`): without them
//! these tests FAIL, never skip.

use meo::{DType, LayerSelect, Logits, MergeOptions, Mode, Model, NoTrace, Session, SessionOptions, Target};
use meo_converter::convert::{self, Options};
use meo_converter::merges::{MergeSpec, TaskSpec, Weighting};
use meo_ort::export::{self, ExportOptions, WeightFormat};
use meo_ort::{Ep, EpChoice, OrtError, OrtOptions, OrtTarget};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tract_onnx::prelude::*;

/// Largest |Δlogit| between the CPU target and an exported graph on the same (f32 or block
/// int8) weights: the same arithmetic in another order (the suite's f32 tolerance).
const TOL: f32 = 1e-4;
/// The CPU target multiplies int8 weights by int8-quantised activations (Q8_0 × Q8_0); the
/// graph multiplies the same int8 weights by f32 activations. Measured 0.11–0.16 on these
/// models (logits of magnitude ~10); top-1 agreement is checked as in the int8 suite.
const INT8_TOL: f32 = 0.3;

fn trained(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trained").join(name)
}

const DOCS: &str = "The value of the object is returned. If the argument is a string, it is parsed \
as a number; otherwise the object must define an index method. A list is a mutable sequence. ";
const CODE: &str = "def f(x):\n    return [i * 2 for i in range(x) if i % 3]\n\nclass A:\n    pass\n";

/// mixtral-upcycled with task merges `docs` and `code` (as ci/quickstart converts it).
fn upcycled(dir: &Path, experts: DType) -> PathBuf {
    let mut tasks = Vec::new();
    for (task, text) in [("docs", DOCS), ("code", CODE)] {
        let p = dir.join(format!("{task}.txt"));
        std::fs::write(&p, text.repeat(8)).unwrap();
        tasks.push(TaskSpec { name: task.into(), text: p });
    }
    let out = dir.join(format!("upcycled-{}.meo", experts.name()));
    let spec = MergeSpec { tasks, weighting: Weighting::MeanGate, ..Default::default() };
    let opts = Options { experts, dense: DType::F32, align: true };
    convert::convert_with(&trained("mixtral-upcycled"), &out, opts, &spec, &AtomicBool::new(false), |_| {})
        .unwrap_or_else(|e| panic!("convert: {e:#}"));
    out
}

/// The MEO-native meo-gpt2 (its task banks are merged at conversion).
fn gpt2(dir: &Path, experts: DType) -> PathBuf {
    let out = dir.join(format!("gpt2-{}.meo", experts.name()));
    let opts = Options { experts, dense: DType::F32, align: true };
    convert::convert(&trained("meo-gpt2"), &out, opts, &AtomicBool::new(false), |_| {}).unwrap();
    out
}

fn task(name: &str) -> MergeOptions {
    MergeOptions { mode: Mode::Task(name.into()), layers: LayerSelect::All }
}

fn prompt(vocab: usize) -> Vec<u32> {
    (0..12).map(|i| ((i * 131 + 7) % vocab) as u32).collect()
}

/// Prompt logits, then 6 decode steps' logits (teacher-forced on the target's own argmax).
fn run(t: &mut dyn Target, ids: &[u32]) -> (Vec<f32>, Vec<u32>) {
    t.reset();
    let name = t.name().to_string();
    let mut all = t.forward(ids, Logits::All, &mut NoTrace).unwrap_or_else(|e| panic!("{name}: {e}")).to_vec();
    let v = all.len() / ids.len();
    let mut next = meo::sample::argmax(&all[all.len() - v..]);
    let mut greedy = vec![next];
    for _ in 0..6 {
        let l = t.forward(&[next], Logits::Last, &mut NoTrace).unwrap().to_vec();
        next = meo::sample::argmax(&l);
        greedy.push(next);
        all.extend(l);
    }
    (all, greedy)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn cpu(model: &Model, mode: MergeOptions) -> Session<'_> {
    let mut s = Session::new(model, SessionOptions { threads: 2, ..Default::default() }).unwrap();
    s.set_mode(mode).unwrap();
    s
}

fn ort(model: &Model, mode: MergeOptions, weights: WeightFormat) -> OrtTarget<'_> {
    let opts = OrtOptions { threads: 2, weights, ..Default::default() };
    OrtTarget::with_mode(model, opts, mode).unwrap_or_else(|e| panic!("ort target: {e}"))
}

/// Runs an exported graph in tract: prompt then the same decode tokens as `greedy`.
fn tract_logits(model: &Model, mode: MergeOptions, ids: &[u32], greedy: &[u32]) -> Vec<f32> {
    let e = export::export(model, &ExportOptions { merge: mode, weights: WeightFormat::Block, ..Default::default() })
        .unwrap();
    let bytes = e.to_bytes().unwrap();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|err| panic!("tract: {err:#}"));
    let (nkv, kd, vd, layers) = (e.info.kv_heads, e.info.head_dim, e.info.value_dim, e.info.num_layers);
    let mut kv: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); layers];
    let (mut pos, mut out) = (0usize, Vec::new());
    let steps: Vec<Vec<u32>> =
        std::iter::once(ids.to_vec()).chain(greedy[..greedy.len() - 1].iter().map(|&t| vec![t])).collect();
    for (i, toks) in steps.iter().enumerate() {
        let t: Vec<i64> = toks.iter().map(|&x| i64::from(x)).collect();
        let mut inputs: TVec<TValue> = tvec![Tensor::from_shape(&[t.len()], &t).unwrap().into()];
        for (k, v) in &kv {
            inputs.push(Tensor::from_shape(&[nkv, pos, kd], k).unwrap().into());
            inputs.push(Tensor::from_shape(&[nkv, pos, vd], v).unwrap().into());
        }
        let res = plan.run(inputs).unwrap_or_else(|err| panic!("tract run: {err:#}"));
        let f = |j: usize| res[j].to_plain_array_view::<f32>().unwrap().iter().copied().collect::<Vec<f32>>();
        let logits = f(0);
        let v = logits.len() / toks.len();
        if i == 0 {
            out.extend(logits);
        } else {
            out.extend_from_slice(&logits[logits.len() - v..]);
        }
        for (l, slot) in kv.iter_mut().enumerate() {
            *slot = (f(1 + 2 * l), f(2 + 2 * l));
        }
        pos += toks.len();
    }
    out
}

/// Teacher-forced run: the prompt, then `greedy` (all but the last) one token at a time;
/// the prompt's logits and each step's.
fn forced(t: &mut dyn Target, ids: &[u32], greedy: &[u32]) -> Vec<f32> {
    t.reset();
    let name = t.name().to_string();
    let mut all = t.forward(ids, Logits::All, &mut NoTrace).unwrap_or_else(|e| panic!("{name}: {e}")).to_vec();
    for &g in &greedy[..greedy.len() - 1] {
        all.extend_from_slice(t.forward(&[g], Logits::Last, &mut NoTrace).unwrap());
    }
    all
}

/// Fraction of positions whose argmax agrees.
fn top1_agreement(a: &[f32], b: &[f32], vocab: usize) -> f64 {
    let n = a.len() / vocab;
    let same = (0..n)
        .filter(|&p| meo::sample::argmax(&a[p * vocab..][..vocab]) == meo::sample::argmax(&b[p * vocab..][..vocab]))
        .count();
    same as f64 / n as f64
}

/// Task-merged exports of a model file against the CPU target in the same task mode, teacher
/// forced on the CPU's greedy continuation. `tol` bounds max |Δlogit|; `top1` the argmax
/// agreement floor (1.0 for f32; the int8 suite's 0.95 for int8, where the CPU also quantises
/// activations and the graph does not).
fn check_task_merged(path: &Path, tasks: &[&str], tol: f32, top1: f64) {
    let model = Model::open(path).unwrap();
    let vocab = model.config().vocab_size;
    let ids = prompt(vocab);
    for &t in tasks {
        let (_, greedy) = run(&mut cpu(&model, task(t)), &ids);
        let want = forced(&mut cpu(&model, task(t)), &ids, &greedy);
        let mut o = ort(&model, task(t), WeightFormat::Block);
        assert!(!o.info().merged.is_empty(), "{t}: no layer merged");
        assert!(o.info().routed.is_empty(), "{t}: a task-merged export routes layers {:?}", o.info().routed);
        let tr = tract_logits(&model, task(t), &ids, &greedy);
        for (who, got) in [("ORT-CPU", forced(&mut o, &ids, &greedy)), ("tract", tr)] {
            let (d, a) = (max_diff(&got, &want), top1_agreement(&got, &want, vocab));
            println!("{}: task {t}: {who} vs meo-CPU max |Δlogit| {d:.3e}, top-1 agreement {a:.3}", path.display());
            assert!(d <= tol, "{t}: {who} vs CPU max |Δlogit| {d} > {tol}");
            assert!(a >= top1, "{t}: {who} vs CPU top-1 agreement {a} < {top1}");
        }
    }
}

#[test]
fn task_merged_upcycled_mixtral_f32_matches_cpu_on_ort_and_tract() {
    let tmp = tempfile::tempdir().unwrap();
    check_task_merged(&upcycled(tmp.path(), DType::F32), &["docs", "code"], TOL, 1.0);
}

#[test]
fn task_merged_upcycled_mixtral_int8_matches_cpu_on_ort_and_tract() {
    let tmp = tempfile::tempdir().unwrap();
    check_task_merged(&upcycled(tmp.path(), DType::Q8_0), &["docs", "code"], INT8_TOL, 0.95);
}

#[test]
fn task_merged_meo_gpt2_matches_cpu_on_ort_and_tract() {
    let tmp = tempfile::tempdir().unwrap();
    check_task_merged(&gpt2(tmp.path(), DType::F32), &["docs", "code"], TOL, 1.0);
    check_task_merged(&gpt2(tmp.path(), DType::Q8_0), &["docs"], INT8_TOL, 0.95);
}

/// A hybrid (Qwen3-Next: gated DeltaNet layers, a gated attention output) task-merged: its MoE
/// layers run the stored merge, its recurrent layers carry their state between calls; against
/// the CPU target in the same task mode (ORT only: tract is not run on recurrent graphs).
#[test]
fn task_merged_hybrid_matches_cpu_on_ort() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("docs.txt");
    std::fs::write(&text, DOCS.repeat(8)).unwrap();
    let spec = MergeSpec {
        tasks: vec![TaskSpec { name: "docs".into(), text }],
        weighting: Weighting::MeanGate,
        ..Default::default()
    };
    let out = tmp.path().join("qwen3_next.meo");
    let opts = Options { experts: DType::F32, dense: DType::F32, align: true };
    let dir = meo_tests::conformance::fixture_dir("qwen3_next");
    convert::convert_with(&dir, &out, opts, &spec, &AtomicBool::new(false), |_| {})
        .unwrap_or_else(|e| panic!("convert: {e:#}"));
    let model = Model::open(&out).unwrap();
    let vocab = model.config().vocab_size;
    let ids = prompt(vocab);
    let (_, greedy) = run(&mut cpu(&model, task("docs")), &ids);
    let want = forced(&mut cpu(&model, task("docs")), &ids, &greedy);
    let mut o = ort(&model, task("docs"), WeightFormat::Block);
    assert!(!o.info().merged.is_empty() && o.info().routed.is_empty(), "{:?}", o.info());
    let got = forced(&mut o, &ids, &greedy);
    let (d, a) = (max_diff(&got, &want), top1_agreement(&got, &want, vocab));
    println!("qwen3_next task docs: ORT-CPU vs meo-CPU max |Δlogit| {d:.3e}, top-1 agreement {a:.3}");
    assert!(d <= TOL && a == 1.0, "max |Δlogit| {d}, top-1 agreement {a}");
}

/// 4-bit experts (Q4_0, MXFP4) exported in the block form: exact weights (Q4_0 through
/// `MatMulNBits`, MXFP4 decoded in the graph from its planes) times f32 activations, against
/// the CPU target's int8-quantised activations times the same weights. The error has the int8
/// case's source and size (one activation quantum, `max|x|/254` per block, times the weights,
/// summed over a row), so the int8 bound and top-1 floor apply.
#[test]
fn task_merged_4bit_experts_match_cpu_on_ort_and_tract() {
    let tmp = tempfile::tempdir().unwrap();
    for experts in [DType::Q4_0, DType::MXFP4] {
        check_task_merged(&upcycled(tmp.path(), experts), &["docs", "code"], INT8_TOL, 0.95);
        check_task_merged(&gpt2(tmp.path(), experts), &["docs"], INT8_TOL, 0.95);
    }
}

/// The 4-bit block form is smaller than the f32-decoded one, Q4_0 runs as `MatMulNBits`, and
/// every 4-bit form passes the ONNX checker; the vanilla graph (every expert, routing in the
/// graph) runs in ORT and agrees with the CPU target.
#[test]
fn four_bit_exports_are_compact_checked_and_run_vanilla() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for experts in [DType::Q4_0, DType::MXFP4] {
        let model = Model::open(upcycled(tmp.path(), experts)).unwrap();
        let mut sizes = Vec::new();
        for (wname, w) in
            [("block", WeightFormat::Block), ("channel", WeightFormat::Channel), ("f32", WeightFormat::F32)]
        {
            for (mname, mode) in [("vanilla", MergeOptions::default()), ("docs", task("docs"))] {
                let e =
                    export::export(&model, &ExportOptions { merge: mode, weights: w, ..Default::default() }).unwrap();
                let nbits = e.model.graph.node.iter().filter(|n| n.op_type == "MatMulNBits").count();
                let want = experts == DType::Q4_0 && w == WeightFormat::Block;
                assert_eq!(nbits > 0, want, "{} {wname} {mname}: {nbits} MatMulNBits nodes", experts.name());
                assert!(e.model.graph.node.iter().all(|n| n.domain.is_empty() || n.op_type == "MatMulNBits"));
                let p = tmp.path().join(format!("{}-{wname}-{mname}.onnx", experts.name()));
                assert!(!export::write(&e, &p, false).unwrap());
                sizes.push((wname, mname, std::fs::metadata(&p).unwrap().len()));
                files.push(p);
            }
        }
        println!("{} exports (bytes): {sizes:?}", experts.name());
        for m in ["vanilla", "docs"] {
            let size = |w: &str| sizes.iter().find(|s| s.0 == w && s.1 == m).unwrap().2;
            assert!(size("block") < size("f32"), "{}: block {} >= f32 {}", experts.name(), size("block"), size("f32"));
        }
        let ids = prompt(model.config().vocab_size);
        let (_, greedy) = run(&mut cpu(&model, MergeOptions::default()), &ids);
        let want = forced(&mut cpu(&model, MergeOptions::default()), &ids, &greedy);
        let got = forced(&mut ort(&model, MergeOptions::default(), WeightFormat::Block), &ids, &greedy);
        let (d, a) = (max_diff(&got, &want), top1_agreement(&got, &want, model.config().vocab_size));
        println!("{} vanilla: ORT-CPU vs meo-CPU max |Δlogit| {d:.3e}, top-1 agreement {a:.3}", experts.name());
        assert!(d <= INT8_TOL && a >= 0.95, "{}: vanilla max |Δlogit| {d}, top-1 {a}", experts.name());
        // The block form is exact: it gives the f32-decoded graph's logits (f32 order only).
        let dec = forced(&mut ort(&model, MergeOptions::default(), WeightFormat::F32), &ids, &greedy);
        let de = max_diff(&got, &dec);
        println!("{} vanilla: block vs f32-decoded graph on ORT max |Δlogit| {de:.3e}", experts.name());
        assert!(de <= TOL, "{}: block vs f32-decoded max |Δlogit| {de}", experts.name());
    }
    onnx_check(&files);
}

#[test]
fn partial_merge_routes_the_other_layers_and_reports_their_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(upcycled(tmp.path(), DType::F32)).unwrap();
    let moe: Vec<usize> = model.moe_layers().collect();
    assert!(moe.len() >= 2, "the fixture has several MoE layers");
    let mode = MergeOptions { mode: Mode::Task("docs".into()), layers: LayerSelect::Layers(vec![moe[0]]) };
    let ids = prompt(model.config().vocab_size);
    let (want, _) = run(&mut cpu(&model, mode.clone()), &ids);
    let mut o = ort(&model, mode, WeightFormat::Block);
    assert_eq!(o.info().merged, vec![moe[0]]);
    assert_eq!(o.info().routed, moe[1..].to_vec());
    let (got, _) = run(&mut o, &ids);
    assert!(max_diff(&got, &want) <= TOL, "partial merge: {}", max_diff(&got, &want));
}

#[test]
fn set_mode_switches_between_vanilla_and_task_and_refuses_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(upcycled(tmp.path(), DType::F32)).unwrap();
    let ids = prompt(model.config().vocab_size);
    let mut o = ort(&model, MergeOptions::default(), WeightFormat::Block);
    let (van, _) = run(&mut o, &ids);
    let (want_van, _) = run(&mut cpu(&model, MergeOptions::default()), &ids);
    assert!(max_diff(&van, &want_van) <= TOL);
    let merged = o.set_mode(task("code")).unwrap();
    assert_eq!(merged, model.moe_layers().collect::<Vec<_>>());
    let (got, _) = run(&mut o, &ids);
    let (want, _) = run(&mut cpu(&model, task("code")), &ids);
    assert!(max_diff(&got, &want) <= TOL);
    let e = o.set_mode(MergeOptions { mode: Mode::Prompt(Default::default()), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("unsupported"), "{e}");
    let e = o.set_mode(task("nope")).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// Runs the ONNX checker (full check, with shape inference) from `.py/` on each file.
fn onnx_check(files: &[PathBuf]) {
    let script = "import sys, onnx\nfor p in sys.argv[1:]:\n    onnx.checker.check_model(p, full_check=True)\n    print('ok', p)\n";
    python(script, files);
}

/// ONNX shape inference (strict, with data propagation) gives every value in each graph a
/// fully known shape: what NNAPI, QNN HTP and Core ML need to compile the whole graph.
fn onnx_all_static(files: &[PathBuf]) {
    let script = "import sys, onnx\nfrom onnx import shape_inference\nfor p in sys.argv[1:]:\n    \
                  m = shape_inference.infer_shapes(onnx.load(p), check_type=True, strict_mode=True, data_prop=True)\n    \
                  g = m.graph\n    vis = list(g.value_info) + list(g.input) + list(g.output)\n    \
                  dyn = [v.name for v in vis if not v.type.tensor_type.HasField('shape') or any(not d.HasField('dim_value') for d in v.type.tensor_type.shape.dim)]\n    \
                  assert not dyn, (p, dyn[:8])\n    names = set(v.name for v in vis)\n    \
                  missing = [o for n in g.node for o in n.output if o not in names]\n    assert not missing, (p, missing[:8])\n    \
                  print('ok', p)\n";
    python(script, files);
}

/// Runs `script` with `.py/` (ci/setup's `onnx` package) over `files`; each must print `ok`.
fn python(script: &str, files: &[PathBuf]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = root.join(".py");
    assert!(py.join("onnx").exists(), "{} has no onnx package: run ci/setup", py.display());
    let out = std::process::Command::new("python3")
        .env("PYTHONPATH", &py)
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "ONNX checker failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("ok ")).count(), files.len());
}

#[test]
fn every_export_form_passes_the_onnx_checker_and_external_data_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Model::open(upcycled(tmp.path(), DType::Q8_0)).unwrap();
    let g2 = Model::open(gpt2(tmp.path(), DType::Q8_0)).unwrap();
    let mut files = Vec::new();
    for (name, model, mode) in
        [("up-docs", &up, task("docs")), ("up-vanilla", &up, MergeOptions::default()), ("gpt2-code", &g2, task("code"))]
    {
        for (wname, w) in
            [("block", WeightFormat::Block), ("channel", WeightFormat::Channel), ("f32", WeightFormat::F32)]
        {
            let e = export::export(model, &ExportOptions { merge: mode.clone(), weights: w, ..Default::default() })
                .unwrap();
            let p = tmp.path().join(format!("{name}-{wname}.onnx"));
            assert!(!export::write(&e, &p, false).unwrap());
            files.push(p);
        }
    }
    // External data: the graph file holds no weights, and ORT loads it from the path.
    let e = export::export(&up, &ExportOptions::task("docs")).unwrap();
    let p = tmp.path().join("ext.onnx");
    assert!(export::write(&e, &p, true).unwrap());
    let data = std::fs::metadata(tmp.path().join("ext.onnx.data")).unwrap().len();
    let graph = std::fs::metadata(&p).unwrap().len();
    assert!(graph < data / 4, "graph {graph} bytes, data {data} bytes");
    files.push(p.clone());
    onnx_check(&files);
    let plan = tract_onnx::onnx().model_for_path(&p).and_then(|m| m.into_optimized()).and_then(|m| m.into_runnable());
    assert!(plan.is_ok(), "tract loads external data: {:?}", plan.err());
}

/// Fixtures of every family the export covers (MLA, sinks, multipliers, plain GQA, partial RoPE, sparsemixer).
const FAMILIES: [&str; 7] = ["deepseek_v3", "deepseek_v2", "gpt_oss", "granitemoe", "qwen3_moe", "glm4_moe", "phimoe"];

#[test]
fn every_family_and_the_static_form_pass_the_checker_and_static_graphs_are_fully_static() {
    use meo_ort::export::StaticShape;
    let tmp = tempfile::tempdir().unwrap();
    let shape = StaticShape { seq: 4, context: 64 };
    let (mut dynamic, mut fixed) = (Vec::new(), Vec::new());
    let mut write = |name: &str, model: &Model, opts: ExportOptions| {
        let e = export::export(model, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ops: std::collections::BTreeSet<&str> = e.model.graph.node.iter().map(|n| n.op_type.as_str()).collect();
        let p = tmp.path().join(format!("{name}.onnx"));
        assert!(!export::write(&e, &p, false).unwrap());
        if opts.static_shape.is_some() {
            // No op whose output shape depends on a run-time value.
            for op in ["Shape", "Range", "ConstantOfShape", "NonZero", "ScatterElements"] {
                assert!(!ops.contains(op), "{name}: static graph has {op}");
            }
            assert_eq!(e.info.static_shape, Some(shape));
            fixed.push(p);
        } else {
            dynamic.push(p);
        }
    };
    for name in FAMILIES {
        let path = meo_tests::conformance::convert_fixture(name, DType::Q8_0, DType::F16, tmp.path());
        let model = Model::open(&path).unwrap();
        write(name, &model, ExportOptions::default());
        write(&format!("{name}-static"), &model, ExportOptions { static_shape: Some(shape), ..Default::default() });
    }
    // The encoder graph (Switch: relative position bias, expert capacity), dynamic only.
    let path = meo_tests::conformance::convert_fixture("switch_transformers", DType::Q8_0, DType::F16, tmp.path());
    let sw = Model::open(&path).unwrap();
    let e = export::export(&sw, &ExportOptions::default()).unwrap();
    assert_eq!(e.info.encoder, Some(sw.config().hidden_size));
    let p = tmp.path().join("switch.onnx");
    export::write(&e, &p, false).unwrap();
    let mut checked = vec![p];
    // A hybrid (gated DeltaNet layers: the delta rule as a `Scan` with its body graph; a gated
    // attention output), dynamic only (the fixed-shape form refuses recurrent layers).
    let path = meo_tests::conformance::convert_fixture("qwen3_next", DType::Q8_0, DType::F16, tmp.path());
    let hy = Model::open(&path).unwrap();
    let e = export::export(&hy, &ExportOptions::default()).unwrap();
    let ops: std::collections::BTreeSet<&str> = e.model.graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(ops.contains("Scan") && ops.contains("Conv"), "{ops:?}");
    let p = tmp.path().join("qwen3_next.onnx");
    export::write(&e, &p, false).unwrap();
    checked.push(p);
    // A hybrid of short convolutions (a grouped `Conv`, `past_conv` without `past_state`) and
    // attention with q/k norms.
    let path = meo_tests::conformance::convert_fixture("lfm2_moe", DType::Q8_0, DType::F16, tmp.path());
    let lf = Model::open(&path).unwrap();
    let e = export::export(&lf, &ExportOptions::default()).unwrap();
    let ops: std::collections::BTreeSet<&str> = e.model.graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(ops.contains("Conv") && !ops.contains("Scan"), "{ops:?}");
    let inputs: Vec<&str> = e.model.graph.input.iter().map(|i| i.name.as_str()).collect();
    assert!(inputs.contains(&"past_conv.0") && !inputs.iter().any(|n| n.starts_with("past_state")), "{inputs:?}");
    let p = tmp.path().join("lfm2_moe.onnx");
    export::write(&e, &p, false).unwrap();
    checked.push(p);
    // Mamba2 layers (the selective scan as a `Scan`, a convolution with a bias) beside attention
    // without positions.
    let path = meo_tests::conformance::convert_fixture("granitemoehybrid", DType::Q8_0, DType::F16, tmp.path());
    let gr = Model::open(&path).unwrap();
    let e = export::export(&gr, &ExportOptions::default()).unwrap();
    let ops: std::collections::BTreeSet<&str> = e.model.graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(ops.contains("Scan") && ops.contains("Conv"), "{ops:?}");
    let p = tmp.path().join("granitemoehybrid.onnx");
    export::write(&e, &p, false).unwrap();
    checked.push(p);
    // The NPU deployment form: task-merged, per-channel int8 weights, fixed shapes.
    let up = Model::open(upcycled(tmp.path(), DType::Q8_0)).unwrap();
    let npu =
        ExportOptions { weights: WeightFormat::Channel, static_shape: Some(shape), ..ExportOptions::task("docs") };
    write("up-docs-channel-static", &up, npu);
    assert_eq!((dynamic.len(), fixed.len()), (FAMILIES.len(), FAMILIES.len() + 1));
    checked.extend(dynamic.iter().chain(&fixed).cloned());
    onnx_check(&checked);
    onnx_all_static(&fixed);
}

#[test]
fn static_task_merged_export_matches_the_dynamic_one_on_ort_and_tract() {
    use meo_ort::export::StaticShape;
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(upcycled(tmp.path(), DType::Q8_0)).unwrap();
    let ids = prompt(model.config().vocab_size);
    let (want, greedy) = run(&mut ort(&model, task("docs"), WeightFormat::Channel), &ids);
    // A prompt-chunk graph (5 tokens per call: 12 = 5 + 5 + 2 padded) and a decode graph.
    for shape in [StaticShape { seq: 5, context: 24 }, StaticShape { seq: 1, context: 24 }] {
        let opts =
            OrtOptions { threads: 2, weights: WeightFormat::Channel, static_shape: Some(shape), ..Default::default() };
        let mut o = OrtTarget::with_mode(&model, opts, task("docs")).unwrap_or_else(|e| panic!("{e}"));
        let got = forced(&mut o, &ids, &greedy);
        let d = max_diff(&got, &want);
        println!("static {shape:?} vs dynamic (ORT, task docs, channel int8): max |Δlogit| {d:.3e}");
        assert!(d <= TOL, "{shape:?}: {d}");
        // The cache is full at 24 positions: one more token is refused, not silently dropped.
        o.reset();
        let long: Vec<u32> = (0..25).map(|i| ids[i % ids.len()]).collect();
        let e = o.forward(&long, Logits::Last, &mut NoTrace).unwrap_err().to_string();
        assert!(e.contains("context overflow"), "{e}");
    }
    // tract on the same static graph (block weights, as tract_logits does for the dynamic one).
    let e = export::export(
        &model,
        &ExportOptions { static_shape: Some(StaticShape { seq: 5, context: 24 }), ..ExportOptions::task("docs") },
    )
    .unwrap();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &e.to_bytes().unwrap()[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|err| panic!("tract: {err:#}"));
    let dynamic = tract_logits(&model, task("docs"), &ids, &greedy);
    let (nkv, kd, vd, vocab) = (e.info.kv_heads, e.info.head_dim, e.info.value_dim, e.info.vocab);
    let mut kv = vec![(vec![0f32; nkv * 24 * kd], vec![0f32; nkv * 24 * vd]); e.info.num_layers];
    let (mut pos, mut got) = (0usize, Vec::new());
    let steps: Vec<Vec<u32>> =
        std::iter::once(ids.clone()).chain(greedy[..greedy.len() - 1].iter().map(|&t| vec![t])).collect();
    for (i, toks) in steps.iter().enumerate() {
        let mut rows = Vec::new();
        for part in toks.chunks(5) {
            let mut t: Vec<i64> = part.iter().map(|&x| i64::from(x)).collect();
            t.resize(5, 0);
            let mut inputs: TVec<TValue> = tvec![Tensor::from_shape(&[5], &t).unwrap().into()];
            inputs.push(Tensor::from_shape(&[1], &[pos as i64]).unwrap().into());
            for (k, v) in &kv {
                inputs.push(Tensor::from_shape(&[nkv, 24, kd], k).unwrap().into());
                inputs.push(Tensor::from_shape(&[nkv, 24, vd], v).unwrap().into());
            }
            let res = plan.run(inputs).unwrap_or_else(|err| panic!("tract run: {err:#}"));
            let f = |j: usize| res[j].to_plain_array_view::<f32>().unwrap().iter().copied().collect::<Vec<f32>>();
            rows.extend_from_slice(&f(0)[..part.len() * vocab]);
            for (l, slot) in kv.iter_mut().enumerate() {
                *slot = (f(1 + 2 * l), f(2 + 2 * l));
            }
            pos += part.len();
        }
        if i == 0 {
            got.extend(rows);
        } else {
            got.extend_from_slice(&rows[rows.len() - vocab..]);
        }
    }
    let d = max_diff(&got, &dynamic);
    println!("static vs dynamic (tract, task docs, block int8): max |Δlogit| {d:.3e}");
    assert!(d <= TOL, "tract static vs dynamic: {d}");
}

/// QDQ activation quantization for the QNN HTP (examples/onnx/quantize_qdq.py: ONNX Runtime's
/// QNN QDQ configuration, calibrated on the fixed-shape graph itself, the attention-mask path kept
/// float): every projection's input is quantized and the quantized graph, run by ONNX Runtime's
/// CPU EP, keeps the float graph's argmax on held-out text. Not run on an HTP (none in CI).
#[test]
fn qdq_activation_quantization_of_the_fixed_shape_graph_keeps_the_argmax() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(upcycled(tmp.path(), DType::Q8_0)).unwrap();
    let tok = meo::tokenizer::Tokenizer::from_metadata(&model.file().unwrap().metadata).unwrap();
    // Calibration on the task's kind of text, held out on a different passage (the last line).
    let held_out = "A tuple is an immutable sequence. Dictionaries map keys to values; \
                    a key must be hashable. The with statement wraps a block in a context manager. ";
    let lines: Vec<String> = [DOCS, CODE, &DOCS[40..], held_out]
        .iter()
        .map(|t| tok.encode(&t.repeat(4)).unwrap().iter().take(64).map(u32::to_string).collect::<Vec<_>>().join(" "))
        .collect();
    let tokens = tmp.path().join("tokens.txt");
    std::fs::write(&tokens, lines.join("\n")).unwrap();
    let shape = meo_ort::export::StaticShape { seq: 4, context: 64 };
    let opts =
        ExportOptions { weights: WeightFormat::Channel, static_shape: Some(shape), ..ExportOptions::task("docs") };
    let e = export::export(&model, &opts).unwrap();
    let (f, q) = (tmp.path().join("docs.onnx"), tmp.path().join("docs.qdq.onnx"));
    export::write(&e, &f, false).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .env("PYTHONPATH", root.join(".py"))
        .arg(root.join("examples/onnx/quantize_qdq.py"))
        .args([&f, &q])
        .arg("--tokens")
        .arg(&tokens)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "quantize_qdq.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("QDQ (uint16 activations, uint8 weights) vs float, fixed-shape task docs: {r}");
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(n("gemms_with_quantized_input"), n("gemms"), "every Gemm's activation is quantized");
    assert!(n("gemms") >= 4.0 * 5.0, "q, k, v, o and the merged MLP per layer: {r}");
    assert_eq!(n("rows"), 64.0);
    assert!(n("top1_agreement") >= 0.9, "{r}");
    assert!(n("max_dlogit") > 0.0 && n("max_dlogit") < 0.5 * n("max_logit"), "{r}");
}

/// Learned positions (meo-gpt2, 128 of them) in the fixed-shape form: a decode step at position
/// 126 pads rows to positions 127–129, past the table; they are clamped, and the real rows
/// match the CPU target up to the model's last position.
#[test]
fn static_form_with_learned_positions_runs_to_the_last_position() {
    use meo_ort::export::StaticShape;
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(gpt2(tmp.path(), DType::F32)).unwrap();
    let max = model.config().max_position_embeddings;
    assert_eq!(max, 128);
    let ids: Vec<u32> = (0..max).map(|i| ((i * 37 + 11) % model.config().vocab_size) as u32).collect();
    let shape = StaticShape { seq: 4, context: max };
    let opts = OrtOptions { threads: 2, static_shape: Some(shape), ..Default::default() };
    let mut o = OrtTarget::with_mode(&model, opts, task("docs")).unwrap_or_else(|e| panic!("{e}"));
    let mut c = cpu(&model, task("docs"));
    let mut got = o.forward(&ids[..max - 2], Logits::All, &mut NoTrace).unwrap().to_vec();
    let mut want = c.forward_with(&ids[..max - 2], Logits::All, &mut NoTrace).unwrap().to_vec();
    for &t in &ids[max - 2..] {
        got.extend_from_slice(o.forward(&[t], Logits::Last, &mut NoTrace).unwrap());
        want.extend_from_slice(c.forward_with(&[t], Logits::Last, &mut NoTrace).unwrap());
    }
    let d = max_diff(&got, &want);
    assert!(d <= TOL, "static learned positions vs CPU: {d}");
    let e = o.forward(&[1], Logits::Last, &mut NoTrace).unwrap_err().to_string();
    assert!(e.contains("context overflow"), "{e}");
}

#[test]
fn channel_weights_stay_close_to_block_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(upcycled(tmp.path(), DType::Q8_0)).unwrap();
    let ids = prompt(model.config().vocab_size);
    let (block, g1) = run(&mut ort(&model, task("docs"), WeightFormat::Block), &ids);
    let (chan, g2) = run(&mut ort(&model, task("docs"), WeightFormat::Channel), &ids);
    let d = max_diff(&block, &chan);
    println!("channel vs block max |Δlogit| {d:.3e}");
    assert!(d > 0.0, "requantisation changes something");
    assert!(d <= 0.25, "channel vs block max |Δlogit| {d}");
    assert_eq!(g1[0], g2[0], "first greedy token");
}

#[test]
fn unsupported_recipe_features_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let g2 = Model::open(gpt2(tmp.path(), DType::F32)).unwrap();
    // An MEO-native model has no vanilla (per-token) graph: its gates come from the prompt.
    let e = export::export(&g2, &ExportOptions::default()).unwrap_err();
    assert!(matches!(e, export::ExportError::Unsupported(_)), "{e}");
    assert!(e.to_string().starts_with("unsupported in export: "), "{e}");
    let e = export::export(&g2, &ExportOptions::task("nope")).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn ep_selection_skips_absent_optional_eps_and_fails_loudly_for_required_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::open(upcycled(tmp.path(), DType::F32)).unwrap();
    let available = meo_ort::available_eps().unwrap_or_else(|e| panic!("{e}"));
    assert!(available.contains(&Ep::Cpu), "the CPU EP is always there: {available:?}");
    let absent = Ep::ALL.into_iter().find(|e| !available.contains(e)).expect("the PyPI wheel lacks some EP");
    // Optional and absent: skipped, said in describe(), CPU runs every node.
    let eps = EpChoice::parse_list(&format!("{},cpu", absent.name())).unwrap();
    let mut o = OrtTarget::with_mode(&model, OrtOptions { eps, profile: true, ..Default::default() }, task("docs"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.registered_eps(), &[Ep::Cpu]);
    assert!(o.describe().contains(&format!("skipped: {}", absent.name())), "{}", o.describe());
    o.forward(&prompt(model.config().vocab_size), Logits::Last, &mut NoTrace).unwrap();
    let placement = o.node_placement().unwrap();
    assert_eq!(placement.keys().collect::<Vec<_>>(), ["CPUExecutionProvider"], "{placement:?}");
    assert!(placement["CPUExecutionProvider"].len() > 10);
    // Required and absent: a loud error naming it and what the build has.
    let eps = EpChoice::parse_list(&format!("{}!,cpu", absent.name())).unwrap();
    let err = OrtTarget::with_mode(&model, OrtOptions { eps, ..Default::default() }, task("docs")).err().unwrap();
    assert!(matches!(err, OrtError::EpMissing { .. }), "{err}");
    assert!(err.to_string().contains(absent.ort_name()) && err.to_string().contains("cpu"), "{err}");
    assert!(EpChoice::parse_list("cpu,npu").is_err());
}

#[test]
fn cli_export_onnx_writes_a_graph_and_run_target_ort_matches_cpu() {
    use meo_cli::cmd::{export_onnx, run};
    let tmp = tempfile::tempdir().unwrap();
    let path = upcycled(tmp.path(), DType::F32);
    let out = tmp.path().join("docs.onnx");
    let a = export_onnx::Args {
        file: path.clone(),
        task: Some("docs".into()),
        merge_layers: "all".into(),
        weights: "channel".into(),
        external_data: false,
        static_shape: None,
        output: out.clone(),
    };
    export_onnx::run(&a).unwrap();
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
    // The fixed-shape form from the CLI, and a malformed shape refused by name.
    let st = tmp.path().join("docs-static.onnx");
    let sa = export_onnx::Args { static_shape: Some("4:64".into()), output: st.clone(), ..a.clone() };
    export_onnx::run(&sa).unwrap();
    let g = tract_onnx::onnx().proto_model_for_path(&st).unwrap().graph.unwrap();
    assert!(g.input.iter().any(|i| i.name == export::POSITION_INPUT), "static graph has a position input");
    let bad = export_onnx::Args { static_shape: Some("4x64".into()), ..a.clone() };
    assert!(export_onnx::run(&bad).unwrap_err().to_string().contains("--static-shape"));
    let bad = export_onnx::Args { task: Some("nope".into()), ..a };
    assert!(export_onnx::run(&bad).unwrap_err().to_string().contains("nope"));
    let gen_ids = |target: &str, extra: &[&str]| {
        let p = path.display().to_string();
        let args = ["--tokens", "5,17,42,9", "--max-new-tokens", "8", "--mode", "task:docs", "--target", target];
        let a = run::Args::parse_from(std::iter::once(p.as_str()).chain(args).chain(extra.iter().copied())).unwrap();
        let (mut o, mut e) = (Vec::new(), Vec::new());
        run::run_to(&a, &mut o, &mut e).unwrap_or_else(|err| panic!("{target}: {err:#}"));
        String::from_utf8(o).unwrap()
    };
    let (cpu_ids, ort_ids) = (gen_ids("cpu", &[]), gen_ids("ort", &[]));
    assert_eq!(ort_ids, cpu_ids);
    // The fixed-shape graph (3-token calls, the 4-token prompt padded) generates the same.
    assert_eq!(gen_ids("ort", &["--onnx-static-shape", "3:16"]), cpu_ids);
    assert_eq!(cpu_ids.split_whitespace().count(), 8);
    let p = path.display().to_string();
    let a = run::Args::parse_from([p.as_str(), "--tokens", "1", "--target", "npu"]).unwrap();
    assert!(run::run_to(&a, &mut Vec::new(), &mut Vec::new()).unwrap_err().to_string().contains("npu"));
    // One generation loop on every target: `--dump` writes the prompt's logits and routing on
    // ONNX Runtime too, the same logits as the CPU's.
    let dump = |target: &str| {
        let f = tmp.path().join(format!("dump-{target}.safetensors"));
        let fs = f.display().to_string();
        let args = [p.as_str(), "--tokens", "5,17,42,9", "--max-new-tokens", "2", "--target", target, "--dump", &fs];
        let a = run::Args::parse_from(args).unwrap();
        run::run_to(&a, &mut Vec::new(), &mut Vec::new()).unwrap_or_else(|err| panic!("{target}: {err:#}"));
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{target} wrote no dump: {e}"));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let l = st.tensor("logits").unwrap();
        assert_eq!(l.shape()[0], 4);
        assert!(st.names().iter().any(|n| n.ends_with("topk_indices")), "{target}: no routing in the dump");
        l.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>()
    };
    let (cpu_logits, ort_logits) = (dump("cpu"), dump("ort"));
    assert!(max_diff(&cpu_logits, &ort_logits) <= TOL);
    // A flag the target cannot honour is refused by name, never dropped.
    for (target, flag) in [("ort", ["--memory-budget", "64M"]), ("cpu", ["--ep", "cpu"]), ("cpu", ["--adapter", "0"])] {
        let args = [p.as_str(), "--tokens", "1", "--target", target, flag[0], flag[1]];
        let e = run::run_to(&run::Args::parse_from(args).unwrap(), &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains(flag[0]), "{target} {flag:?}: {e}");
    }
}

/// `meo convert --compress` (issue 23): a pruned file (fewer experts, router rows dropped) and
/// an MC-SMoE-merged one export with routed MoE layers that match the CPU target in vanilla
/// mode, on ONNX Runtime and tract.
#[test]
fn compressed_upcycled_mixtral_matches_cpu_on_ort_and_tract() {
    use meo_converter::compress::{CompressSpec, Method};
    let tmp = tempfile::tempdir().unwrap();
    let calib = tmp.path().join("calib.txt");
    std::fs::write(&calib, DOCS.repeat(16) + &CODE.repeat(16)).unwrap();
    let vanilla = MergeOptions { mode: Mode::Vanilla, layers: LayerSelect::All };
    for method in [Method::Prune, Method::McSmoe] {
        let out = tmp.path().join(format!("{}.meo", method.name()));
        let spec = MergeSpec {
            calib: Some(calib.clone()),
            compress: Some(CompressSpec { method, fraction: 0.5 }),
            ..Default::default()
        };
        let opts = Options { experts: DType::F32, dense: DType::F32, align: false };
        convert::convert_with(&trained("mixtral-upcycled"), &out, opts, &spec, &AtomicBool::new(false), |_| {})
            .unwrap_or_else(|e| panic!("convert: {e:#}"));
        let model = Model::open(&out).unwrap();
        assert_eq!(model.config().router.num_experts, 4);
        let vocab = model.config().vocab_size;
        let ids = prompt(vocab);
        let (_, greedy) = run(&mut cpu(&model, vanilla.clone()), &ids);
        let want = forced(&mut cpu(&model, vanilla.clone()), &ids, &greedy);
        let mut o = ort(&model, vanilla.clone(), WeightFormat::Block);
        assert_eq!(o.info().routed, [0, 1, 2, 3], "{}: every MoE layer routed", method.name());
        let tr = tract_logits(&model, vanilla.clone(), &ids, &greedy);
        for (who, got) in [("ORT-CPU", forced(&mut o, &ids, &greedy)), ("tract", tr)] {
            let d = max_diff(&got, &want);
            println!("--compress {}:0.5: {who} vs meo-CPU max |Δlogit| {d:.3e}", method.name());
            assert!(d <= TOL, "{}: {who} vs CPU max |Δlogit| {d} > {TOL}", method.name());
        }
    }
}
