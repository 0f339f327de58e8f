//! Conformance of the GPU target: the shared suite (`meo_tests::conformance`) run on
//! [`meo_wgpu::WgpuTarget`], every fixture family the CPU target runs (decoders through
//! `conformance_suite!`, the Switch Transformers encoder through `encoder_suite!`). There is no
//! skip: without an adapter every test fails, naming the problem (CI installs lavapipe through
//! ci/setup). `MEO_WGPU_ADAPTER` picks the adapter.

use meo::{Model, Target};
use meo_tests::conformance::{Runner, TargetRunner};
use meo_wgpu::{WgpuOptions, WgpuTarget};
use std::path::Path;

fn open_wgpu(path: &Path) -> Box<dyn Runner> {
    // Tests open a handful of tiny models: leaking them gives the target a 'static model.
    let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open model")));
    let opts = WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), ..Default::default() };
    let t = WgpuTarget::new(model, opts).unwrap_or_else(|e| panic!("wgpu target: {e}"));
    println!("adapter: {}", t.describe());
    Box::new(TargetRunner(t))
}

meo_tests::conformance_suite!(&open_wgpu);
meo_tests::encoder_suite!(&open_wgpu);

#[test]
fn encoder_refuses_forward_with_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path =
        meo_tests::conformance::convert_fixture("switch_transformers", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let opts = WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), ..Default::default() };
    let mut t = WgpuTarget::new(&model, opts).unwrap_or_else(|e| panic!("wgpu target: {e}"));
    let e = t.forward(&[1, 2], meo::Logits::All, &mut meo::NoTrace).unwrap_err();
    assert!(matches!(e, meo::TargetError::Forward(meo::ForwardError::EncoderOnly)), "{e}");
    assert_eq!(t.position(), 0);
}

// Hybrid models (`RECURRENT_FIXTURES`: gated DeltaNet layers beside attention with a gated
// output, Granite-4's Mamba2 layers beside attention without positions, LFM2's short
// convolutions beside attention with q/k norms): the same suite, plus a prompt fed whole, token
// by token and in two pieces giving identical logits and routing.
meo_tests::recurrent_suite!(&open_wgpu);

/// The recurrent state the target holds is what the CPU session holds (and what the config
/// says), whatever the context: gated DeltaNet, Mamba2 and short-convolution layers.
#[test]
fn recurrent_state_bytes_match_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3_next", "granitemoehybrid", "lfm2_moe"] {
        let path = meo_tests::conformance::convert_fixture(name, meo::DType::F32, meo::DType::F32, tmp.path());
        let model = Model::open(&path).unwrap();
        let cpu = meo::Session::new(&model, meo::SessionOptions::default()).unwrap();
        let opts = WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), ..Default::default() };
        let mut t = WgpuTarget::new(&model, opts).unwrap_or_else(|e| panic!("wgpu target: {e}"));
        let want = cpu.recurrent_state_bytes();
        assert!(want > 0, "{name}");
        assert_eq!(t.recurrent_state_bytes(), want, "{name}");
        assert_eq!(model.config().recurrent_state_bytes(), want, "{name}");
        t.forward(&[1, 2, 3], meo::Logits::Last, &mut meo::NoTrace).unwrap();
        assert_eq!(t.recurrent_state_bytes(), want, "{name}");
    }
}

/// Llama-4's attention and routing variants have no shaders here yet: the target refuses the
/// model with a typed error naming the first metadata key it lacks.
#[test]
fn cpu_only_variants_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = meo_tests::conformance::convert_fixture("llama4", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let Err(e) = WgpuTarget::new(&model, WgpuOptions::default()) else { panic!("Llama-4 must be refused") };
    assert!(matches!(&e, meo::TargetError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("model.layer_nope"), "{e}");
}
