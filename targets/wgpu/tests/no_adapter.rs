//! Without an adapter the GPU target is a typed error naming the problem, not a panic. Its own
//! test binary: it changes the process environment.

#[cfg(target_os = "linux")]
#[test]
fn no_adapter_is_a_typed_error() {
    // SAFETY: the only test of this binary, and it sets the variable before anything (wgpu
    // included) starts a thread or reads the environment.
    unsafe { std::env::set_var("WGPU_BACKEND", "metal") };
    assert!(meo_wgpu::list_adapters().is_empty(), "Metal on Linux?");
    let tmp = tempfile::tempdir().unwrap();
    let path = meo_tests::conformance::convert_fixture("olmoe", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = meo::Model::open(path).unwrap();
    let e = meo_wgpu::WgpuTarget::new(&model, meo_wgpu::WgpuOptions::default()).unwrap_err();
    assert!(matches!(e, meo::TargetError::Device { .. }), "{e}");
    assert!(e.to_string().contains("no GPU adapter found"), "{e}");
}
