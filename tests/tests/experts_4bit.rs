//! `meo convert --experts int4` (Q4_0) and `--experts mxfp4`: not exact; measured on every
//! fixture against transformers and against the f32 conversion (prompt + greedy
//! continuation): routing (top-k sets) and next-token top-1 agreement.

use meo::{DType, Model, Session, SessionOptions};
use meo_tests::conformance::{Agreement, FIXTURES, Runner, TargetRunner, measure_experts};
use std::path::Path;

fn cpu(path: &Path) -> Box<dyn Runner> {
    let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open")));
    Box::new(TargetRunner(Session::new(model, SessionOptions { threads: 2, ..Default::default() }).expect("session")))
}

fn measure(experts: DType, dense: DType) -> Vec<(&'static str, Agreement)> {
    let mut all = Vec::new();
    for name in FIXTURES {
        let a = measure_experts(name, experts, dense, &cpu);
        println!(
            "{name}: {} (dense {}) routing {:.3} (vs transformers) {:.3} (vs f32); top-1 {:.3} / {:.3}; max |Δlogit| {:.3e}",
            experts.name(),
            dense.name(),
            a.routing_vs_reference,
            a.routing_vs_f32,
            a.top1_vs_reference,
            a.top1_vs_f32,
            a.max_dlogit
        );
        all.push((name, a));
    }
    all
}

/// Floors over all fixtures (means) and per fixture, routing and top-1 (vs the f32 file).
/// Random-weight tiny models route on small margins and some (Granite-MoE) have nearly flat
/// logits, so a 4-bit error flips some choices; a broken kernel or layout flips most (top-1 on
/// a 256-token vocabulary falls towards 0). Measured (x86-64, AVX-512 VNNI): int4 means
/// 0.978 / 0.857, lowest 0.929 / 0.536 (Granite-MoE); mxfp4 0.980 / 0.788, lowest 0.929 / 0.429.
fn check(experts: DType, dense: DType, mean: [f64; 2], each: [f64; 2]) {
    let all = measure(experts, dense);
    let n = all.len() as f64;
    let avg = |f: fn(&Agreement) -> f64| all.iter().map(|(_, a)| f(a)).sum::<f64>() / n;
    let (r, t) = (avg(|a| a.routing_vs_f32), avg(|a| a.top1_vs_f32));
    println!("{}: mean routing agreement vs f32 {r:.3}, top-1 {t:.3}", experts.name());
    assert!(r >= mean[0] && t >= mean[1], "{}: mean routing {r:.3}, top-1 {t:.3} < {mean:?}", experts.name());
    for (name, a) in &all {
        for (what, got, floor) in [("routing", a.routing_vs_f32, each[0]), ("top-1", a.top1_vs_f32, each[1])] {
            assert!(got >= floor, "{name}: {} {what} agreement {got:.3} < {floor}", experts.name());
        }
    }
}

#[test]
fn int4_experts_keep_routing_and_top1() {
    check(DType::Q4_0, DType::F16, [0.95, 0.8], [0.9, 0.45]);
}

/// `--dense int4` as well: every matrix 4-bit (embeddings and LM head included). The tiny
/// random models (hidden 64) have no redundancy to absorb 4-bit attention and embeddings, so
/// agreement falls further than with 4-bit experts alone — measured means 0.753 / 0.506,
/// lowest 0.518 routing (DeepSeek-V3 FP8) and 0.214 top-1 (Granite-MoE) — but a wrong layout
/// or kernel falls to chance (routing ≈ k/E = 0.25, top-1 ≈ 1/256). On the trained models
/// perplexity moves by −1.0 % (upcycled) and +1.7 % (scratch) against `--dense f16`.
#[test]
fn int4_dense_and_experts_keep_routing_and_top1() {
    check(DType::Q4_0, DType::Q4_0, [0.65, 0.4], [0.45, 0.15]);
}

#[test]
fn mxfp4_experts_keep_routing_and_top1() {
    check(DType::MXFP4, DType::F16, [0.95, 0.7], [0.9, 0.35]);
}

/// `--calib` with `--hot-experts`: per MoE layer the `ceil(share · E)` most selected experts
/// are int8 and the rest int4; the file records the calibration; without `--calib` or with
/// int8 experts the option is refused before anything is written.
#[test]
fn hot_experts_stay_int8_beside_int4() {
    use meo_converter::convert::{Options, convert_with};
    use meo_converter::merges::MergeSpec;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trained/mixtral-scratch");
    let tmp = tempfile::tempdir().unwrap();
    let calib = tmp.path().join("calib.txt");
    std::fs::write(&calib, "def parse(self, args):\n    return [a.strip() for a in args if a]\n".repeat(20)).unwrap();
    let out = tmp.path().join("hot.meo");
    let opts = Options { experts: DType::Q4_0, dense: DType::F16, align: false };
    let spec = MergeSpec { calib: Some(calib.clone()), hot_experts: 0.25, ..Default::default() };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    convert_with(&dir, &out, opts, &spec, &cancel, |_| {}).unwrap();
    let model = Model::open(&out).unwrap();
    let file = model.file().unwrap();
    let e = model.config().router.num_experts;
    for l in model.moe_layers() {
        let dtypes: Vec<DType> =
            (0..e).map(|x| file.tensor(&meo::names::expert(l, x, "up")).expect("expert tensor").dtype).collect();
        let hot = dtypes.iter().filter(|&&d| d == DType::Q8_0).count();
        assert_eq!(hot, e.div_ceil(4), "layer {l}: {dtypes:?}");
        assert!(dtypes.iter().all(|&d| d == DType::Q8_0 || d == DType::Q4_0), "layer {l}: {dtypes:?}");
        for (x, &d) in dtypes.iter().enumerate() {
            for part in meo::names::EXPERT_PARTS {
                assert_eq!(file.tensor(&meo::names::expert(l, x, part)).unwrap().dtype, d, "one dtype per expert");
            }
        }
    }
    assert!(matches!(file.metadata.get("quant.calibration.tokens"), Some(meo::MetaValue::U64(n)) if *n > 0));
    // It runs, prompt and decode alike.
    let mut s = Session::new(&model, SessionOptions { threads: 2, ..Default::default() }).unwrap();
    let all = s.forward(&[5, 6, 7, 8]).unwrap().to_vec();
    s.reset();
    s.forward(&[5, 6, 7]).unwrap();
    let last = s.forward(&[8]).unwrap().to_vec();
    assert_eq!(&all[all.len() - last.len()..], &last[..]);

    for (experts, spec, want) in [
        (DType::Q4_0, MergeSpec { hot_experts: 0.25, ..Default::default() }, "--hot-experts needs --calib"),
        (
            DType::Q8_0,
            MergeSpec { calib: Some(calib.clone()), hot_experts: 0.25, ..Default::default() },
            "int4 or mxfp4",
        ),
        (DType::Q4_0, MergeSpec { calib: Some(calib.clone()), hot_experts: 1.5, ..Default::default() }, "0 to 1"),
        (DType::Q8_0, MergeSpec { calib: Some(calib), ..Default::default() }, "4-bit experts"),
    ] {
        let out = tmp.path().join("refused.meo");
        let err = convert_with(&dir, &out, Options { experts, ..opts }, &spec, &cancel, |_| {}).unwrap_err();
        assert!(format!("{err:#}").contains(want), "{err:#}");
        assert!(!out.exists());
    }
}
