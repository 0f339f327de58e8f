//! Conformance of the GPU target: the shared suite (`meo_tests::conformance`) run on
//! [`meo_wgpu::WgpuTarget`]. There is no skip: without an adapter every test fails, naming
//! the problem (CI installs lavapipe through ci/setup). `MEO_WGPU_ADAPTER` picks the adapter.
//!
//! The GPU kernels do not cover every family yet: `UNSUPPORTED` lists the fixtures this target
//! refuses, and `unsupported_families_are_typed_errors` proves each is refused with
//! `TargetError::Unsupported` naming the feature (never a panic or a silent wrong answer).

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

meo_tests::conformance_suite!(@standard &open_wgpu);

/// The fixtures this target refuses, with a word of its error (the ONNX targets now export all
/// of them, so the shared `REFUSED_BY_PORTABLE_TARGETS` is empty).
const UNSUPPORTED: [(&str, &str); 5] = [
    ("deepseek_v3", "interleaved"),
    ("deepseek_v2", "interleaved"),
    ("granitemoe", "multipliers"),
    ("granitemoe-fused", "multipliers"),
    ("gpt_oss", "sinks"),
];

#[test]
fn every_fixture_is_run_or_refused() {
    for name in meo_tests::conformance::FIXTURES {
        let listed = UNSUPPORTED.iter().any(|u| u.0 == name);
        let run = [
            "mixtral",
            "mixtral-fused",
            "mixtral-bf16-sharded",
            "qwen2_moe",
            "qwen2_moe-fused",
            "qwen3_moe",
            "qwen3_moe-fused",
            "olmoe",
            "olmoe-fused",
        ]
        .contains(&name);
        assert!(listed != run, "{name}: neither in the wgpu suite nor in UNSUPPORTED (or in both)");
    }
}

#[test]
fn unsupported_families_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, what) in UNSUPPORTED {
        let path = meo_tests::conformance::convert_fixture(name, meo::DType::F32, meo::DType::F32, tmp.path());
        let model = Model::open(&path).unwrap();
        let opts = WgpuOptions { adapter: std::env::var("MEO_WGPU_ADAPTER").ok(), ..Default::default() };
        match WgpuTarget::new(&model, opts) {
            Err(e @ meo::TargetError::Unsupported { .. }) => {
                assert!(e.to_string().contains(what), "{name}: {e}");
            }
            Err(e) => panic!("{name}: expected an unsupported error, got {e}"),
            Ok(_) => panic!("{name}: the wgpu target accepted a recipe it does not implement"),
        }
    }
}
