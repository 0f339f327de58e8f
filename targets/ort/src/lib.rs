//! meo on ONNX: export a `.meo` model to a static ONNX graph ([`export`]) and run it with
//! ONNX Runtime ([`OrtTarget`], feature `runtime`), loaded dynamically at run time.
//!
//! The library is never downloaded at build time: [`library_path`] says where it is looked
//! for (`ORT_DYLIB_PATH`, then the project-local `.ort/` that `ci/setup` fills from the PyPI
//! `onnxruntime` wheel, then the system loader's search path).

pub mod export;
#[cfg(feature = "runtime")]
mod runtime;

pub use export::{ExportError, ExportOptions, Exported, GraphInfo, WeightFormat, export};
#[cfg(feature = "runtime")]
pub use runtime::{Ep, EpChoice, OrtError, OrtOptions, OrtTarget, available_eps, init, report_routes};

/// The ONNX Runtime library to load: `ORT_DYLIB_PATH` if set; else `.ort/libonnxruntime.so`
/// (`.dylib` on macOS) in this workspace, where `ci/setup` puts it, if it exists; else the
/// bare file name, for the system loader's search path (`LD_LIBRARY_PATH`, an app bundle).
pub fn library_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    let name = if cfg!(target_os = "macos") { "libonnxruntime.dylib" } else { "libonnxruntime.so" };
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ort").join(name);
    if local.exists() { local } else { name.into() }
}
