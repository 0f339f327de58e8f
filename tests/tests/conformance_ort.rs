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
    meo_tests::conformance::check_recipe_variants(&|m, fixed| {
        let opts = OrtOptions {
            threads: 2,
            static_shape: fixed.then_some(StaticShape { seq: 5, context: 24 }),
            ..Default::default()
        };
        Box::new(TargetRunner(OrtTarget::new(m, opts).unwrap_or_else(|e| panic!("{e}"))))
    });
}

/// Hybrid models (`RECURRENT_FIXTURES`: gated DeltaNet and Mamba2 layers, their state carried
/// between calls as `past_conv.L`/`past_state.L` → `present_*`, beside attention (with a gated
/// output; without positions); LFM2's short convolutions, `past_conv.L` → `present_conv.L`):
/// the suite's f32 and int8 checks. Not its bitwise prompt-vs-decode check: ONNX Runtime's
/// GEMMs round a one-row call differently from a many-row one (as for every family here), so
/// prompts against decoding are compared within the suite's tolerance instead (below).
mod recurrent {
    use super::*;
    meo_tests::conformance_suite!(@tests &open_ort;
        qwen3_next => "qwen3_next",
        qwen3_5_moe => "qwen3_5_moe",
        qwen3_5_moe_multimodal => "qwen3_5_moe-multimodal",
        granitemoehybrid => "granitemoehybrid",
        lfm2_moe => "lfm2_moe",
    );
}

/// The hybrid graphs against the CPU target call by call: the prompt in two calls, then decode
/// steps one token each (the state carried by the runtime wrapper), within the suite's
/// tolerance with identical routing; a reset starts over.
#[test]
fn recurrent_state_carries_between_calls_as_on_the_cpu() {
    use meo_ort::export::LayerState;
    let tmp = tempfile::tempdir().unwrap();
    // (fixture, whether its recurrent layers have a `past_state`)
    for (name, with_state) in
        [("qwen3_next", true), ("qwen3_5_moe", true), ("granitemoehybrid", true), ("lfm2_moe", false)]
    {
        let path = meo_tests::conformance::convert_fixture(name, meo::DType::F32, meo::DType::F32, tmp.path());
        let model: &'static Model = Box::leak(Box::new(Model::open(&path).unwrap()));
        let rf = meo_tests::conformance::reference(name);
        let t = OrtTarget::new(model, OrtOptions { threads: 2, ..Default::default() }).unwrap();
        let info = t.info().clone();
        let kinds: Vec<bool> = info.layers.iter().map(|s| matches!(s, LayerState::Recurrent { .. })).collect();
        assert!(kinds.contains(&true) && kinds.contains(&false), "{name}: a hybrid: {kinds:?}");
        for (l, s) in info.layers.iter().enumerate() {
            if let LayerState::Recurrent { state, .. } = s {
                assert_eq!(state.is_some(), with_state, "{name}: layer {l}");
                assert_eq!(info.past(l, 0).len(), info.present(l).len(), "{name}: layer {l}");
                assert_eq!(info.past(l, 0).len(), 1 + usize::from(with_state), "{name}: layer {l}");
            }
        }
        let mut r = TargetRunner(t);
        for _ in 0..2 {
            let d = meo_tests::conformance::compare_with_cpu(name, model, &mut r, &rf.input_ids, &rf.greedy);
            assert!(d <= meo_tests::conformance::LOGIT_TOL, "{name}: max |Δlogit| {d:e} vs the cpu");
        }
    }
}

/// What the exporter does not write for recurrent layers is refused by name: the fixed-shape
/// form (its padding would enter the state).
#[test]
fn fixed_shape_recurrent_export_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = meo_tests::conformance::convert_fixture("qwen3_next", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let opts = meo_ort::export::ExportOptions { static_shape: Some(static_shape::SHAPE), ..Default::default() };
    let Err(e) = meo_ort::export::export(&model, &opts) else { panic!("a fixed-shape hybrid must be refused") };
    assert!(e.to_string().contains("recurrent mixer"), "{e}");
}

/// Llama-4's attention and routing variants have no ONNX graph yet: the export refuses the
/// model with a typed error naming the first metadata key it lacks.
#[test]
fn cpu_only_variants_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = meo_tests::conformance::convert_fixture("llama4", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let Err(e) = meo_ort::export::export(&model, &meo_ort::export::ExportOptions::default()) else {
        panic!("Llama-4 must be refused")
    };
    assert!(matches!(e, meo_ort::export::ExportError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("model.layer_nope"), "{e}");
}
