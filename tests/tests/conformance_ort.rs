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

meo_tests::conformance_suite!(@standard &open_ort);

#[test]
fn newer_recipes_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, what) in meo_tests::conformance::REFUSED_BY_PORTABLE_TARGETS {
        let path = meo_tests::conformance::convert_fixture(name, meo::DType::F32, meo::DType::F32, tmp.path());
        let model = Model::open(&path).unwrap();
        match OrtTarget::new(&model, OrtOptions { threads: 2, ..Default::default() })
            .map(|_| ())
            .map_err(|e| e.to_string())
        {
            Err(e) => assert!(e.contains(what), "{name}: {e}"),
            Ok(()) => panic!("{name}: accepted a recipe it does not implement"),
        }
    }
}
