//! Conformance of the ONNX Runtime target (CPU EP): the shared suite over the vanilla export
//! (routing in the graph, reported from its `route.L.*` outputs). Needs the ONNX Runtime
//! library (ci/setup puts it in `.ort/`; or set ORT_DYLIB_PATH): without it these tests FAIL.

use meo::Model;
use meo_ort::{OrtOptions, OrtTarget};
use meo_tests::conformance::{Runner, TargetRunner};
use std::path::Path;

fn open_ort(path: &Path) -> Box<dyn Runner> {
    let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open model")));
    let opts = OrtOptions { threads: 2, ..Default::default() };
    Box::new(TargetRunner(OrtTarget::new(model, opts).unwrap_or_else(|e| panic!("ort target: {e}"))))
}

meo_tests::conformance_suite!(&open_ort);
meo_tests::encoder_suite!(&open_ort);

/// The fixed-shape export (`--static-shape`, what NPU EPs compile) through the same suite:
/// 5-token calls (the 12-token prompt in chunks, the last one padded; every decode step
/// padded) over a 32-slot cache written in place.
mod static_shape {
    use super::*;
    use meo_ort::export::StaticShape;

    pub(super) const SHAPE: StaticShape = StaticShape { seq: 5, context: 32 };

    fn open_static(path: &Path) -> Box<dyn Runner> {
        let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open model")));
        let opts = OrtOptions { threads: 2, static_shape: Some(SHAPE), ..Default::default() };
        let t = OrtTarget::new(model, opts).unwrap_or_else(|e| panic!("ort target: {e}"));
        let info = t.info();
        assert_eq!(info.static_shape, Some(SHAPE));
        Box::new(TargetRunner(t))
    }

    meo_tests::conformance_suite!(&open_static);

    #[test]
    fn overflowing_the_fixed_cache_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = meo_tests::conformance::convert_fixture("qwen3_moe", meo::DType::F32, meo::DType::F32, tmp.path());
        let model = Model::open(&path).unwrap();
        let opts = OrtOptions { threads: 2, static_shape: Some(SHAPE), ..Default::default() };
        let mut t = OrtTarget::new(&model, opts).unwrap();
        use meo::Target;
        let ids: Vec<u32> = (0..SHAPE.context as u32).collect();
        assert!(t.forward(&ids, meo::Logits::Last, &mut meo::NoTrace).is_ok());
        let e = t.forward(&[1], meo::Logits::Last, &mut meo::NoTrace).unwrap_err().to_string();
        assert!(e.contains("context overflow"), "{e}");
    }
}

/// Every fixture exports (the suite above runs them all); what stays refused — a fixed-shape
/// encoder — is refused by name; an encoder graph refuses decoding and a decoder graph encoding.
#[test]
fn what_stays_refused_is_refused_by_name() {
    use meo::Target;
    let tmp = tempfile::tempdir().unwrap();
    let path =
        meo_tests::conformance::convert_fixture("switch_transformers", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let e = OrtTarget::new(
        &model,
        OrtOptions { threads: 2, static_shape: Some(static_shape::SHAPE), ..Default::default() },
    )
    .err()
    .expect("a fixed-shape encoder is refused")
    .to_string();
    assert!(e.contains("fixed-shape encoder"), "{e}");
    let mut t = OrtTarget::new(&model, OrtOptions { threads: 2, ..Default::default() }).unwrap();
    let e = t.forward(&[1, 2], meo::Logits::All, &mut meo::NoTrace).unwrap_err().to_string();
    assert!(e.contains("encoder"), "{e}");
    let path = meo_tests::conformance::convert_fixture("qwen3_moe", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let mut t = OrtTarget::new(&model, OrtOptions { threads: 2, ..Default::default() }).unwrap();
    let e = t.encode(&[1, 2], &mut meo::NoTrace).unwrap_err().to_string();
    assert!(e.contains("encode"), "{e}");
}

/// Recipe combinations no fixture has (`portable_recipe_variants`), f32 weights (int8 experts
/// are compared with transformers by the int8 suite: the CPU also quantises activations), in the
/// dynamic and fixed-shape forms: the same logits (within the suite's tolerance) and the same
/// routing as the CPU target.
#[test]
fn synthetic_recipe_variants_match_the_cpu() {
    use meo_ort::export::StaticShape;
    use meo_tests::conformance::{LOGIT_TOL, compare_with_cpu, portable_recipe_variants, synthetic_model};
    let opts = |s| OrtOptions { threads: 2, static_shape: s, ..Default::default() };
    let open = |m: &'static Model, s| -> Box<dyn Runner> {
        Box::new(TargetRunner(OrtTarget::new(m, opts(s)).unwrap_or_else(|e| panic!("{e}"))))
    };
    for (name, c) in portable_recipe_variants() {
        for experts in [meo::DType::F32] {
            let bytes = synthetic_model(&c, meo::DType::F32, experts, 11, &|_| false, &[]);
            let m: &'static Model = Box::leak(Box::new(Model::from_vec(bytes).expect("synthetic model opens")));
            let prompt: Vec<u32> = (0..13).map(|i| ((i * 37 + 11) % c.vocab_size) as u32).collect();
            let decode = [5, 17, 3];
            for shape in [None, Some(StaticShape { seq: 5, context: 24 })] {
                let d = compare_with_cpu(name, m, &mut *open(m, shape), &prompt, &decode);
                println!("{name} ({}, {shape:?}): max |Δlogit| vs CPU {d:.3e}", experts.name());
                assert!(d <= LOGIT_TOL, "{name} ({}, {shape:?}): max |Δlogit| {d}", experts.name());
            }
        }
    }
}
