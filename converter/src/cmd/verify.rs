//! `meo verify FILE`: the container's structure, every checksum and all padding; and, when
//! the file carries a model description (`general.architecture`), that the config is
//! consistent and every tensor the model needs is there with its shape and a valid dtype.

use crate::canonical::{self, Role};
use anyhow::{Context, Result, bail, ensure};
use meo::{DType, MeoFile, ModelConfig};
use std::path::PathBuf;

/// Check a .meo file: structure, every checksum, padding, model tensors.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
}

/// Checks that the tensors of `f` are the ones its model config needs, with their shapes
/// and dtypes a runtime accepts. Returns the config, or `None` if the file has no model
/// description.
///
/// # Errors
/// Bad config metadata, or a missing, mis-shaped or wrongly typed tensor.
pub fn check_model(f: &MeoFile<'_>) -> Result<Option<ModelConfig>> {
    if f.metadata.get("general.architecture").is_none() {
        return Ok(None);
    }
    let cfg = ModelConfig::from_metadata(&f.metadata).context("model metadata")?;
    for c in canonical::tensors_within(&cfg, canonical::budget(canonical::file_elements(f)), "the file")? {
        let t = f.tensor(&c.name).with_context(|| format!("tensor {:?} is missing", c.name))?;
        ensure!(t.shape() == c.shape.as_slice(), "tensor {:?}: shape {:?}, expected {:?}", c.name, t.shape(), c.shape);
        let ok = match c.role {
            Role::Norm | Role::Bias | Role::Router => t.dtype == DType::F32,
            Role::Dense => matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16),
            Role::Expert => matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0),
        };
        if !ok {
            bail!("tensor {:?}: dtype {} is not allowed for a {:?} tensor", c.name, t.dtype.name(), c.role);
        }
    }
    Ok(Some(cfg))
}

/// Bytes verified between releases of their pages.
const RELEASE_EVERY: usize = 64 << 20;

/// `madvise(MADV_DONTNEED)` on the whole pages inside `b`, a slice of a read-only file mapping.
fn release(b: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let start = (b.as_ptr() as usize).next_multiple_of(page);
        let end = (b.as_ptr() as usize + b.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside a live read-only shared file mapping, and no
            // reference into it is used across this call in a way that could observe a
            // change: MADV_DONTNEED on file-backed pages drops them, and later accesses
            // fault the same bytes back in from the file.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = b;
}

pub fn run(args: &Args) -> Result<()> {
    let mapped = super::open_meo(&args.file)?;
    let f = mapped.parse()?;
    let bar = super::byte_bar(f.header.data_len);
    let data = &f.bytes()[f.header.data_offset as usize..];
    let mut released = 0usize;
    let r = f.verify_with(|done, _| {
        bar.set_position(done);
        // Verified pages are not needed again: drop them so the resident set stays small
        // on models larger than memory (they are clean file pages; nothing is lost).
        let done = done as usize;
        if done - released >= RELEASE_EVERY {
            release(&data[released..done]);
            released = done;
        }
    });
    bar.finish_and_clear();
    r.with_context(|| format!("{}: verification failed", args.file.display()))?;
    let cfg = check_model(&f).with_context(|| format!("{}: verification failed", args.file.display()))?;
    super::print_stdout(&format!(
        "OK: {} tensors ({} expert slabs), {} bytes, all checksums match{}\n",
        f.tensors().len(),
        f.slabs().len(),
        f.bytes().len(),
        cfg.map_or(String::from("; no model description"), |c| format!(
            "; {} model, {} layers",
            c.architecture, c.num_layers
        ))
    ))
}
