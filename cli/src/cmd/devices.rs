//! `meo devices`: the targets this binary was built with and the GPU adapters wgpu finds.

use anyhow::Result;

/// List the devices models can run on (`--target`, `--adapter`).
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `meo devices`.
///
/// # Errors
/// Writing to stdout failed.
pub fn run(_a: &Args) -> Result<()> {
    let mut out = String::from("cpu: always available (--target cpu)\n");
    #[cfg(feature = "wgpu")]
    {
        let all = meo_wgpu::list_adapters();
        if all.is_empty() {
            out.push_str("wgpu: no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)\n");
        }
        for a in all {
            out.push_str(&format!("wgpu adapter {a}\n"));
        }
    }
    #[cfg(not(feature = "wgpu"))]
    out.push_str("wgpu: not built (cargo feature `wgpu` of meo-cli is off)\n");
    if cfg!(feature = "ort") {
        out.push_str("ort: built (--target ort; the ONNX Runtime library is loaded when a model opens)\n");
    } else {
        out.push_str("ort: not built (cargo feature `ort` of meo-cli is off)\n");
    }
    super::print_stdout(&out)
}
