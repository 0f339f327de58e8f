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
