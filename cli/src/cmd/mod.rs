//! The `meo` subcommands, one module each. Every module has an `Args` (clap derive) and a
//! `run(&Args) -> anyhow::Result<()>`; `main.rs` only parses and dispatches.

pub mod bench;
pub mod convert;
pub mod eval;
#[cfg(feature = "onnx")]
pub mod export_onnx;
pub mod gpu;
pub mod inspect;
pub mod mode;
pub mod run;
pub mod target;
pub mod verify;

/// `meo --version`: the version and the targets this binary was built with (cargo features).
pub fn long_version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let mut targets = vec!["cpu"];
        if cfg!(feature = "wgpu") {
            targets.push("wgpu");
        }
        if cfg!(feature = "ort") {
            targets.push("ort");
        }
        let export = if cfg!(feature = "onnx") { "yes" } else { "no (cargo feature `onnx`)" };
        format!("{}\ntargets: {}\nexport-onnx: {export}", env!("CARGO_PKG_VERSION"), targets.join(", "))
    })
}

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting progress bar on stderr (drawn only when stderr is a terminal).
pub fn byte_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The largest power of two dividing `offset`, capped at 1 MiB (0 counts as aligned to all).
pub fn alignment_of(offset: u64) -> u64 {
    const CAP: u64 = 1 << 20;
    if offset == 0 { CAP } else { (1u64 << offset.trailing_zeros()).min(CAP) }
}

/// Writes `s` to stdout; a closed pipe (`meo inspect f | head`) is not an error.
///
/// # Errors
/// Any other I/O error.
pub fn print_stdout(s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Maps and parses a `.meo` file (header, metadata and table only).
///
/// # Errors
/// The file cannot be opened or is not a valid `.meo` file; the message names the file.
pub fn open_meo(path: &std::path::Path) -> anyhow::Result<meo::file::Mapped> {
    // OpenError's message already includes its source: flatten it to one line.
    let m = meo::file::Mapped::open(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    m.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(m)
}
