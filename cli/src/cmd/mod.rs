//! The `meo` subcommands, one module each. Every module has an `Args` (clap derive) and a
//! `run(&Args) -> anyhow::Result<()>`; `main.rs` only parses and dispatches.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod devices;
pub mod dump;
pub mod eval;
#[cfg(feature = "onnx")]
pub mod export_onnx;
pub mod inspect;
pub mod kv;
pub mod memory;
pub mod mode;
pub mod run;
#[cfg(feature = "serve")]
pub mod serve;
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

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use meo::Model;
use meo::residency::{self, ResidencyStats};
use std::io::Write;
use std::path::Path;

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

/// Parses `1234`, `64k`, `512M`, `2G`, `1.5GiB` (k/M/G and KiB/MiB/GiB are powers of 1024,
/// kB/MB/GB powers of 1000).
///
/// # Errors
/// Not a number with one of those suffixes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use k, M, G, KiB, MiB, GiB, kB, MB, GB)")),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a byte count"))?;
    let v = n * mult;
    if !(v.is_finite() && (0.0..1.8e19).contains(&v)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

/// Opens a model for lazy use ([`residency::map_lazy`]: no read-ahead, so only the experts
/// routing selects are read), with the file named in the error.
///
/// # Errors
/// The file cannot be opened or is not a model this runtime runs.
pub fn open_model(path: &Path) -> Result<Model> {
    let ctx = || format!("cannot open {}", path.display());
    let map = residency::map_lazy(path).with_context(ctx)?;
    Model::from_mapped(map).with_context(ctx)
}

/// Human-readable bytes (binary units).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Writes the residency part of `--stats` (and of `meo bench`'s text output).
///
/// # Errors
/// I/O.
pub fn print_residency(out: &mut dyn Write, s: &ResidencyStats, file_bytes: u64) -> std::io::Result<()> {
    let per_layer: Vec<String> = s
        .experts_touched_per_layer
        .iter()
        .zip(&s.experts_per_layer)
        .enumerate()
        .filter(|(_, (_, n))| **n > 0)
        .map(|(l, (t, n))| format!("L{l} {t}/{n}"))
        .collect();
    let total: usize = s.experts_per_layer.iter().sum();
    writeln!(out, "experts touched per layer: {}", per_layer.join(", "))?;
    writeln!(out, "experts touched: {} of {} (distinct, all layers)", s.experts_touched, total)?;
    let pct = if s.expert_bytes_in_file == 0 {
        0.0
    } else {
        100.0 * s.expert_bytes_resident as f64 / s.expert_bytes_in_file as f64
    };
    writeln!(
        out,
        "expert bytes resident: {} of {} in file ({pct:.1}%)",
        human_bytes(s.expert_bytes_resident),
        human_bytes(s.expert_bytes_in_file)
    )?;
    if let Some(mapped) = s.expert_bytes_mapped {
        writeln!(out, "expert bytes mapped by this process: {}", human_bytes(mapped))?;
    }
    if s.released_slabs > 0 {
        writeln!(
            out,
            "released under the memory budget: {} slabs, {}",
            s.released_slabs,
            human_bytes(s.released_bytes)
        )?;
    }
    if let Some(rate) = s.hit_rate() {
        writeln!(out, "expert cache hits: {} of {} selections ({:.1}%)", s.hits, s.hits + s.misses, 100.0 * rate)?;
    }
    let acc: Vec<String> = s
        .prediction
        .iter()
        .enumerate()
        .filter_map(|(l, p)| Some(format!("L{l} {:.0}%", 100.0 * p.accuracy()?)))
        .collect();
    if !acc.is_empty() {
        writeln!(out, "next-layer prediction accuracy: {}", acc.join(", "))?;
    }
    if s.dense_pinned_bytes > 0 {
        let how = if s.dense_locked { "mlock" } else { "re-touched: mlock refused" };
        writeln!(out, "dense bytes kept resident: {} ({how})", human_bytes(s.dense_pinned_bytes))?;
    }
    match residency::peak_rss_bytes() {
        Ok(rss) => writeln!(out, "peak RSS: {} (file: {})", human_bytes(rss), human_bytes(file_bytes)),
        Err(e) => writeln!(out, "peak RSS: unavailable ({e})"),
    }
}
