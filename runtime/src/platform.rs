//! What mobile platforms need beyond [`Model::open`] (feature `std`, Unix): opening a model
//! that lies at an offset inside a file descriptor (an uncompressed Android APK asset, a
//! file handed over by a document picker), and releasing expert pages on a low-memory
//! warning ([`release_expert_slabs`]).
//!
//! Releasing is `madvise(MADV_DONTNEED)` on the read-only file mapping: the pages hold
//! exactly the file's bytes and fault back in from the file on the next read, so it is safe
//! at any time between forward calls (see [`crate::residency`]).

use crate::model::{Model, ModelError};
use crate::residency::{self, ResidencyError, SlabIndex};
use core::mem::ManuallyDrop;
use core::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Why a model could not be opened from a file descriptor.
#[derive(Debug, thiserror::Error)]
pub enum FdOpenError {
    #[error("file descriptor {fd} is not open: {source}")]
    BadFd { fd: RawFd, source: std::io::Error },
    #[error("cannot read or map file descriptor {fd}: {source}")]
    Io { fd: RawFd, source: std::io::Error },
    #[error("byte range {offset}+{len} is outside the file of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the byte range is empty")]
    Empty,
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A model read from `len` bytes at `offset` of a file descriptor, memory-mapped lazily.
///
/// The descriptor is duplicated for the mapping only; the caller may close its own at once.
/// The mapping starts at `offset` rounded down to the page size, so `offset` needs no
/// alignment; for slab-precise release (each expert alone on its pages) keep `offset` a
/// multiple of 16 KiB (`.meo` slabs are 16 KiB-aligned relative to the file's start).
pub struct FdModel {
    /// Dropped before `map`: it holds a reference into the mapping (see [`FdModel::open`]).
    model: ManuallyDrop<Model>,
    /// The SIGBUS guard's entry ([`crate::guard`]); dropped before `map` is unmapped.
    _guard: crate::guard::Registration,
    map: memmap2::Mmap,
    /// Offset of the model's first byte inside `map`.
    start: usize,
}

impl core::fmt::Debug for FdModel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FdModel").field("model", &*self.model).field("start", &self.start).finish()
    }
}

impl FdModel {
    /// Maps `len` bytes at `offset` of `fd` (`len` 0 = to the end of the file) and validates
    /// them as a model. No weight page is read; read-ahead is turned off for the mapping so
    /// only the experts routing selects are read.
    ///
    /// # Errors
    /// `fd` is not an open file descriptor, the range lies outside the file, mapping fails,
    /// or the bytes are not a model this runtime runs.
    pub fn open(fd: RawFd, offset: u64, len: u64) -> Result<Self, FdOpenError> {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) has no memory preconditions; an invalid fd gives -1.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(FdOpenError::BadFd { fd, source: std::io::Error::last_os_error() });
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        let io = |source| FdOpenError::Io { fd, source };
        let size = file.metadata().map_err(io)?.len();
        let len = if len == 0 { size.saturating_sub(offset) } else { len };
        if len == 0 {
            return Err(FdOpenError::Empty);
        }
        let end = offset.checked_add(len).filter(|&e| e <= size);
        let out_of_range = || FdOpenError::OutOfRange { offset, len, size };
        end.ok_or_else(out_of_range)?;
        let ps = residency::page_size() as u64;
        let map_offset = offset - offset % ps;
        let start = usize::try_from(offset - map_offset).map_err(|_| out_of_range())?;
        let map_len = usize::try_from(len).ok().and_then(|l| l.checked_add(start)).ok_or_else(out_of_range)?;
        // SAFETY: a read-only mapping of a range checked to lie inside the file. As for
        // `Mapped::open`, the bytes must not change while mapped (apps do not rewrite their
        // own assets).
        let map = unsafe { memmap2::MmapOptions::new().offset(map_offset).len(map_len).map(&file) }.map_err(io)?;
        // Read-ahead off before anything is read (a fault reads one page, not its neighbours).
        // Advice only: a refusal is not an error.
        let _ = map.advise(memmap2::Advice::Random);
        let bytes: &[u8] = &map[start..];
        // SAFETY: `Model::from_static` needs bytes that outlive the model. The bytes live in
        // `map`, which is owned by the same `FdModel`, never moved out, never remapped, and is
        // dropped only after `model` (see `Drop`); `model` is only lent out as `&Model` tied to
        // `&self`, and `Model` hands out no `'static` borrow of its bytes.
        let bytes: &'static [u8] = unsafe { core::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let guard = crate::guard::Registration::new(&map);
        let model = Model::from_static(bytes)?;
        Ok(Self { model: ManuallyDrop::new(model), _guard: guard, map, start })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Drops every expert slab's pages from this process (see the module docs); returns the
    /// bytes of the slabs released.
    ///
    /// # Errors
    /// The OS refuses the advice.
    pub fn release_expert_slabs(&self) -> Result<u64, ResidencyError> {
        let mut total = 0;
        for (_, _, r) in SlabIndex::from_model(&self.model).iter() {
            total += r.len() as u64;
            self.release(r)?;
        }
        Ok(total)
    }

    /// `madvise(MADV_DONTNEED)` on `range` of the model's bytes, widened to whole pages
    /// (clipped to the mapping).
    fn release(&self, range: Range<usize>) -> Result<(), ResidencyError> {
        let len = self.map.len();
        let (start, end) = (self.start + range.start, self.start + range.end);
        if start > end || end > len {
            return Err(ResidencyError::OutOfBounds { start: range.start, end: range.end, len: len - self.start });
        }
        let ps = residency::page_size();
        let a = start - start % ps;
        let b = end.next_multiple_of(ps).min(len);
        if a >= b {
            return Ok(());
        }
        // SAFETY: `a..b` lies in the live read-only mapping `self.map` (checked above); the
        // mapping starts on a page boundary, so `a` is page-aligned. DONTNEED on a file mapping
        // that is never written drops pages that fault back with the same bytes.
        unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) }
            .map_err(|source| ResidencyError::Os { call: "madvise(MADV_DONTNEED)", source })
    }
}

impl Drop for FdModel {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before `map` (fields drop after this body).
        unsafe { ManuallyDrop::drop(&mut self.model) }
    }
}

/// Drops every expert slab's pages of a model opened from a path ([`Model::open`] or
/// [`Model::from_mapped`]) from this process; returns the bytes of the slabs released. What
/// an app calls on a memory warning: sessions keep working, experts fault back on use.
///
/// # Errors
/// [`ResidencyError::NotMapped`] for a model over bytes in memory (nothing to release
/// without losing data), or the OS refuses.
pub fn release_expert_slabs(model: &Model) -> Result<u64, ResidencyError> {
    let map = model.mapped().ok_or(ResidencyError::NotMapped)?;
    let mut total = 0;
    for (_, _, r) in SlabIndex::from_model(model).iter() {
        total += r.len() as u64;
        residency::release(map, r)?;
    }
    Ok(total)
}
