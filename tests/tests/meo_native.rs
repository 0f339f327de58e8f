//! MEO-native checkpoints (`docs/MEO.md`): the trained `meo_gpt2` fixture converted with f32
//! weights matches the PyTorch reference (`reference.safetensors`) in sequence and task mode —
//! logits within 1e-4 at every position, identical gates, identical greedy continuation — and
//! the default int8 conversion keeps gate and top-1 agreement above pinned floors.

use meo::{DType, LayerSelect, MergeOptions, Mode, Model, PromptPool, Session, SessionOptions};
use meo_converter::convert::{self, Options};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trained/meo-gpt2")
}

fn convert(dir: &Path, experts: DType, dense: DType) -> PathBuf {
    let out = dir.join(format!("meo-gpt2-{}.meo", experts.name()));
    let opts = Options { experts, dense, align: true };
    convert::convert(&fixture(), &out, opts, &AtomicBool::new(false), |_| {}).unwrap();
    out
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn i64s(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn mode(level: &str, task: &str) -> MergeOptions {
    let mode = if level == "task" { Mode::Task(task.into()) } else { Mode::Prompt(PromptPool::default()) };
    MergeOptions { mode, layers: LayerSelect::All }
}

/// What one (prompt, level) run gives: logits of the prompt, gates, greedy continuation.
struct Run {
    logits: Vec<f32>,
    gates: Vec<[Vec<(u32, f32)>; 2]>,
    greedy: Vec<u32>,
}

fn run(model: &Model, ids: &[u32], opts: MergeOptions) -> Run {
    let mut s = Session::new(model, SessionOptions { threads: 1, ..Default::default() }).unwrap();
    s.set_mode(opts).unwrap();
    let v = model.config().vocab_size;
    let logits = s.forward(ids).unwrap().to_vec();
    let gates = (0..model.config().num_layers)
        .map(|l| s.bank_gates(l).unwrap().map(|g| g.iter().map(|c| (c.expert, c.weight)).collect()))
        .collect();
    let mut next = meo::sample::argmax(&logits[logits.len() - v..]);
    let mut greedy = vec![next];
    for _ in 1..16 {
        next = meo::sample::argmax(s.forward(&[next]).unwrap());
        greedy.push(next);
    }
    Run { logits, gates, greedy }
}

/// The reference gates of `<prompt>.<level>` per layer and bank, ascending by expert.
fn ref_gates(st: &SafeTensors<'_>, key: &str, layers: usize) -> Vec<[Vec<(u32, f32)>; 2]> {
    (0..layers)
        .map(|l| {
            ["fc1", "fc2"].map(|b| {
                let idx = i64s(st, &format!("{key}.layers.{l}.{b}.topk_indices"));
                let w = f32s(st, &format!("{key}.layers.{l}.{b}.topk_weights"));
                let mut g: Vec<(u32, f32)> = idx.iter().zip(w).map(|(&i, w)| (i as u32, w)).collect();
                g.sort_by_key(|x| x.0);
                g
            })
        })
        .collect()
}

const CASES: [(&str, &str); 4] = [("docs", "sequence"), ("docs", "task"), ("code", "sequence"), ("code", "task")];

#[test]
fn f32_conversion_matches_the_pytorch_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(convert(dir.path(), DType::F32, DType::F32)).unwrap();
    assert_eq!(model.meo_layers().count(), 4);
    assert_eq!(model.meo_tasks().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["docs", "code"]);
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (prompt, level) in CASES {
        let key = format!("{prompt}.{level}");
        let ids: Vec<u32> = i64s(&st, &format!("{prompt}.input_ids")).iter().map(|&x| x as u32).collect();
        let r = run(&model, &ids, mode(level, prompt));
        let want = f32s(&st, &format!("{key}.logits"));
        assert_eq!(r.logits.len(), want.len());
        let max = r.logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{key}: max |Δlogit| = {max:.3e}");
        assert!(max <= 1e-4, "{key}: max |Δlogit| {max}");
        for (l, (got, want)) in r.gates.iter().zip(ref_gates(&st, &key, 4)).enumerate() {
            for b in 0..2 {
                let (g, w) = (&got[b], &want[b]);
                assert_eq!(
                    g.iter().map(|x| x.0).collect::<Vec<_>>(),
                    w.iter().map(|x| x.0).collect::<Vec<_>>(),
                    "{key} layer {l} bank {b}"
                );
                for (x, y) in g.iter().zip(w) {
                    assert!((x.1 - y.1).abs() <= 1e-5, "{key} layer {l} bank {b}: {} vs {}", x.1, y.1);
                }
            }
        }
        let greedy: Vec<u32> = i64s(&st, &format!("{key}.greedy_tokens")).iter().map(|&x| x as u32).collect();
        assert_eq!(r.greedy, greedy, "{key}: greedy continuation");
    }
}

#[test]
fn int8_conversion_keeps_gates_and_top1() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(convert(dir.path(), DType::Q8_0, DType::F16)).unwrap();
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = model.config().vocab_size;
    let (mut gates_same, mut gates_all, mut top1_same, mut top1_all) = (0, 0, 0, 0);
    let mut max_dlogit = 0.0f32;
    for (prompt, level) in CASES {
        let key = format!("{prompt}.{level}");
        let ids: Vec<u32> = i64s(&st, &format!("{prompt}.input_ids")).iter().map(|&x| x as u32).collect();
        let r = run(&model, &ids, mode(level, prompt));
        let want = f32s(&st, &format!("{key}.logits"));
        max_dlogit = r.logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(max_dlogit, f32::max);
        for (a, b) in r.logits.chunks(v).zip(want.chunks(v)) {
            top1_all += 1;
            top1_same += usize::from(meo::sample::argmax(a) == meo::sample::argmax(b));
        }
        for (got, want) in r.gates.iter().zip(ref_gates(&st, &key, 4)) {
            for b in 0..2 {
                gates_all += 1;
                gates_same += usize::from(
                    got[b].iter().map(|x| x.0).collect::<Vec<_>>() == want[b].iter().map(|x| x.0).collect::<Vec<_>>(),
                );
            }
        }
    }
    let (g, t) = (gates_same as f64 / gates_all as f64, top1_same as f64 / top1_all as f64);
    eprintln!(
        "int8: gates identical {gates_same}/{gates_all} ({g:.3}), top-1 {top1_same}/{top1_all} ({t:.3}), max |Δlogit| {max_dlogit:.3e}"
    );
    // Measured: 32/32 gates identical, 74/74 top-1, max |Δlogit| 0.113. Gates are pinned
    // exactly (the reference guarantees a logit gap >= 1e-4); top-1 allows 2 flips of 74.
    assert!(g >= GATE_FLOOR, "gate agreement {g}");
    assert!(t >= TOP1_FLOOR, "top-1 agreement {t}");
}

const GATE_FLOOR: f64 = 1.0;
const TOP1_FLOOR: f64 = 0.97;
