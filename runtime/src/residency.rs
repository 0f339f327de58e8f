//! Expert residency: which expert slabs are in memory, prefetching the ones routing selects,
//! and releasing cold ones under a memory budget (feature `std`; Unix).
//!
//! Expert slabs are page-aligned and alone on their pages (see `docs/FORMAT.md`), so the OS
//! calls here act on exactly one expert:
//!
//! - [`prefetch`]: `madvise(MADV_WILLNEED)` — start reading the slab in the background.
//! - [`release`]: `madvise(MADV_DONTNEED)` — drop the slab's pages from this process. The
//!   mapping is a read-only file mapping that is never written, so the pages hold exactly the
//!   file's bytes and fault back in from the file (or page cache) on the next read.
//! - [`evict`]: [`release`], then `posix_fadvise(POSIX_FADV_DONTNEED)` on the slab's file range,
//!   so the kernel also drops it from the page cache (unless another process maps it).
//! - [`resident_bytes`]: `mincore`. On Linux ≥ 5.0 it reports page-cache residency for files
//!   the caller owns or may write, and otherwise only the pages mapped into this process.
//! - [`drop_page_cache`]: `posix_fadvise(POSIX_FADV_DONTNEED)` on a whole file (cold start).
//!
//! [`ExpertTracker`] ties them together for a model: it records the experts each layer
//! selects, prefetches their slabs, and with a byte budget evicts the least recently used
//! slabs when the selected set grows past it.

use crate::file::Mapped;
use crate::format::MeoFile;
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::vec::Vec;

/// A residency query or advice that failed.
#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error("{call} failed: {source}")]
    Os { call: &'static str, source: io::Error },
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{what} is not supported on this platform")]
    Unsupported { what: &'static str },
    #[error("byte range {start}..{end} is outside the mapping of {len} bytes")]
    OutOfBounds { start: usize, end: usize, len: usize },
    #[error("the model was not opened from a file (no mapping to query)")]
    NotMapped,
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    #[error(transparent)]
    Map(#[from] crate::file::OpenError),
}

fn os_err(call: &'static str) -> ResidencyError {
    ResidencyError::Os { call, source: io::Error::last_os_error() }
}

/// The OS page size (4096 unless the OS says otherwise).
pub fn page_size() -> usize {
    static PS: OnceLock<usize> = OnceLock::new();
    *PS.get_or_init(|| {
        #[cfg(unix)]
        {
            // SAFETY: sysconf has no preconditions; it returns -1 on error.
            let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if v > 0 && (v as usize).is_power_of_two() {
                return v as usize;
            }
        }
        4096
    })
}

/// `range` of `map`, widened to whole pages: (first page address, length in bytes).
fn page_span(map: &Mapped, range: &Range<usize>) -> Result<(usize, usize), ResidencyError> {
    let bytes = map.bytes();
    if range.start > range.end || range.end > bytes.len() {
        return Err(ResidencyError::OutOfBounds { start: range.start, end: range.end, len: bytes.len() });
    }
    let ps = page_size();
    let base = bytes.as_ptr() as usize;
    // The mapping starts on a page boundary (mmap), so the widened span stays inside its pages.
    debug_assert_eq!(base % ps, 0);
    let start = (base + range.start) & !(ps - 1);
    let end = (base + range.end).next_multiple_of(ps);
    Ok((start, end - start))
}

#[cfg(unix)]
fn madvise(map: &Mapped, range: &Range<usize>, advice: libc::c_int, call: &'static str) -> Result<(), ResidencyError> {
    let (addr, len) = page_span(map, range)?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: [addr, addr + len) is whole pages of `map`'s live read-only file mapping (checked
    // above; `map` is borrowed, so it stays mapped during the call). WILLNEED only starts
    // reads. DONTNEED drops the pages of this process: the mapping is read-only and never
    // written, so every page holds exactly the file's bytes and the next access faults the
    // same bytes back in from the file — no reference into the mapping observes a change.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if r != 0 { Err(os_err(call)) } else { Ok(()) }
}

/// Longest range one `madvise(MADV_WILLNEED)` is given. Linux reads at most
/// max(read-ahead window, device's largest request) pages per call (`force_page_cache_ra`) and
/// silently drops the rest: one call over a 35 MB slab read its first 8 MiB here, and the rest
/// was faulted in 4 KiB at a time. 128 KiB is the default read-ahead window, at or below both
/// figures on any device, and longer pieces measured no faster (`docs/PERFORMANCE.md`).
pub const WILLNEED_CHUNK: usize = 128 << 10;

/// Asks the OS to start reading `range` of the mapping (`madvise(MADV_WILLNEED)` on each
/// [`WILLNEED_CHUNK`] of it, so the whole range is queued, not only its start).
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn prefetch(map: &Mapped, range: Range<usize>) -> Result<(), ResidencyError> {
    #[cfg(unix)]
    {
        page_span(map, &range)?;
        let mut at = range.start;
        while at < range.end {
            let end = range.end.min((at & !(WILLNEED_CHUNK - 1)) + WILLNEED_CHUNK);
            madvise(map, &(at..end), libc::MADV_WILLNEED, "madvise(MADV_WILLNEED)")?;
            at = end;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = (map, range);
        Err(ResidencyError::Unsupported { what: "madvise" })
    }
}

/// `madvise(MADV_WILLNEED)` over all of `range` in one call: what [`prefetch`] did before it
/// was split into [`WILLNEED_CHUNK`]s, kept to measure against ([`MissRead::WillneedOnce`]).
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn prefetch_once(map: &Mapped, range: Range<usize>) -> Result<(), ResidencyError> {
    #[cfg(unix)]
    return madvise(map, &range, libc::MADV_WILLNEED, "madvise(MADV_WILLNEED)");
    #[cfg(not(unix))]
    {
        let _ = (map, range);
        Err(ResidencyError::Unsupported { what: "madvise" })
    }
}

/// Reads `range` of the mapping in and maps it into this process before returning
/// ([`prefetch`], then `madvise(MADV_POPULATE_READ)`, Linux ≥ 5.14): the later accesses take
/// no page fault at all. Returns `Ok(false)` where the kernel does not know
/// `MADV_POPULATE_READ` (`EINVAL`): the range is then touched page by page instead, after the
/// prefetch, so it is read in large requests all the same.
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn populate(map: &Mapped, range: Range<usize>) -> Result<bool, ResidencyError> {
    prefetch(map, range.clone())?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    match madvise(map, &range, libc::MADV_POPULATE_READ, "madvise(MADV_POPULATE_READ)") {
        Ok(()) => return Ok(true),
        Err(ResidencyError::Os { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(e),
    }
    touch(map, std::slice::from_ref(&range));
    Ok(false)
}

/// Drops the pages of `range` (widened to whole pages) from this process
/// (`madvise(MADV_DONTNEED)`); they fault back from the file on the next read.
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn release(map: &Mapped, range: Range<usize>) -> Result<(), ResidencyError> {
    #[cfg(unix)]
    return madvise(map, &range, libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)");
    #[cfg(not(unix))]
    {
        let _ = (map, range);
        Err(ResidencyError::Unsupported { what: "madvise" })
    }
}

/// Turns off read-ahead for `range` of the mapping (`madvise(MADV_RANDOM)`): a page fault
/// there reads only the faulting page, not the ±64 KiB around it that the kernel reads by
/// default (which would pull in the neighbours of a selected expert).
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn advise_random(map: &Mapped, range: Range<usize>) -> Result<(), ResidencyError> {
    #[cfg(unix)]
    return madvise(map, &range, libc::MADV_RANDOM, "madvise(MADV_RANDOM)");
    #[cfg(not(unix))]
    {
        let _ = (map, range);
        Err(ResidencyError::Unsupported { what: "madvise" })
    }
}

/// Maps `path` for lazy use ([`Mapped::open`] turns read-ahead off before any byte is read),
/// checks the header's sections, then prefetches the header, metadata, names and tensor
/// table (never a byte past them, and nothing before the check). Give the result to
/// [`Model::from_mapped`](crate::model::Model::from_mapped).
///
/// Without read-ahead off, faulting in the header page makes the kernel read around it
/// (`read_ahead_kb`: 128 KiB, or MiBs on some machines) — into the first expert slabs of a
/// small model.
///
/// # Errors
/// The file cannot be mapped, its header is invalid, or the OS refuses the advice.
pub fn map_lazy(path: impl AsRef<Path>) -> Result<Mapped, ResidencyError> {
    // Mapped::open has already turned read-ahead off (MADV_RANDOM) before any read.
    let map = Mapped::open(path)?;
    // Validate the header's sections (reading the header page only) before advising
    // anything, then prefetch exactly the structure the parser reads next: a crafted
    // `data_offset` once made this prefetch the whole file before the file was rejected.
    let sections = crate::format::check_sections(map.bytes())?;
    prefetch(&map, 0..sections.structure_end())?;
    Ok(map)
}

/// The file's data split for residency advice: maximal runs of consecutive expert slabs, and
/// runs of the other tensors that every token uses (everything but the token embedding
/// when a separate LM head exists: embedding rows are read one token at a time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataLayout {
    /// Absolute byte ranges of runs of consecutive expert slabs.
    pub expert_runs: Vec<Range<usize>>,
    /// Absolute byte ranges of runs of consecutive always-used tensors.
    pub dense_runs: Vec<Range<usize>>,
}

impl DataLayout {
    /// Computes the runs from the tensor table.
    pub fn new(file: &MeoFile<'_>) -> Self {
        #[derive(PartialEq)]
        enum Kind {
            Expert,
            Dense,
            Skip,
        }
        let base = file.header.data_offset as usize;
        let tied = file.tensor(crate::names::OUTPUT).is_none();
        let mut out = Self::default();
        let mut prev = Kind::Skip;
        for t in file.tensors() {
            let kind = if crate::format::slab_key(t.name).is_some() {
                Kind::Expert
            } else if t.name == crate::names::EMBED && !tied {
                Kind::Skip
            } else {
                Kind::Dense
            };
            let r = base + t.offset as usize..base + (t.offset + t.len) as usize;
            let runs = match kind {
                Kind::Expert => &mut out.expert_runs,
                Kind::Dense => &mut out.dense_runs,
                Kind::Skip => {
                    prev = Kind::Skip;
                    continue;
                }
            };
            match runs.last_mut() {
                Some(last) if prev == kind => last.end = r.end,
                _ => runs.push(r),
            }
            prev = kind;
        }
        out
    }
}

/// Makes reads of the mapping exact: read-ahead off for the whole mapping
/// ([`advise_random`]), then the tensors every token uses ([`DataLayout::dense_runs`])
/// prefetched. Afterwards a page fault reads only its own page, so an expert's bytes are read
/// only when it is used or [`prefetch`]ed, and embedding rows one at a time. Without this the
/// kernel reads around every faulting page (`read_ahead_kb`, often 128 KiB and on some
/// machines 8 MiB), pulling in unselected experts next to the bytes being read.
///
/// # Errors
/// `file` does not describe `map`, or the OS refuses.
pub fn advise_lazy(map: &Mapped, file: &MeoFile<'_>) -> Result<(), ResidencyError> {
    let len = map.bytes().len();
    if file.bytes().len() != len {
        return Err(ResidencyError::OutOfBounds { start: 0, end: file.bytes().len(), len });
    }
    advise_random(map, 0..len)?;
    for r in DataLayout::new(file).dense_runs {
        prefetch(map, r)?;
    }
    Ok(())
}

/// `posix_fadvise(fd, offset, len, POSIX_FADV_DONTNEED)`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn fadvise_dontneed(f: &std::fs::File, offset: u64, len: u64) -> Result<(), ResidencyError> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(ResidencyError::OutOfBounds { start: offset as usize, end: (offset + len) as usize, len: 0 });
    };
    // SAFETY: plain syscall on a file descriptor `f` keeps open; it only advises the kernel.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED) };
    // posix_fadvise returns the error number instead of setting errno.
    if r != 0 {
        Err(ResidencyError::Os { call: "posix_fadvise(POSIX_FADV_DONTNEED)", source: io::Error::from_raw_os_error(r) })
    } else {
        Ok(())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn fadvise_dontneed(_f: &std::fs::File, _offset: u64, _len: u64) -> Result<(), ResidencyError> {
    Err(ResidencyError::Unsupported { what: "posix_fadvise" })
}

/// [`release`]s `range`, then asks the kernel to drop those file pages from the page cache too
/// (`posix_fadvise(POSIX_FADV_DONTNEED)` through `file`, which must be the mapped file). Pages
/// another process maps stay cached.
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn evict(map: &Mapped, file: &std::fs::File, range: Range<usize>) -> Result<(), ResidencyError> {
    release(map, range.clone())?;
    let ps = page_size();
    let start = range.start & !(ps - 1);
    let end = range.end.next_multiple_of(ps);
    fadvise_dontneed(file, start as u64, (end - start) as u64)
}

/// Drops a whole file from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`), e.g. to
/// measure a cold start. Dirty pages are written back first (`fdatasync`), since the kernel
/// does not drop those; pages mapped by a live mapping (ours included) stay.
///
/// # Errors
/// The file cannot be opened or synced, or the platform has no `posix_fadvise`.
pub fn drop_page_cache(path: impl AsRef<Path>) -> Result<(), ResidencyError> {
    let path = path.as_ref();
    let open = |source| ResidencyError::Open { path: path.to_path_buf(), source };
    let f = std::fs::File::open(path).map_err(open)?;
    f.sync_data().map_err(open)?;
    fadvise_dontneed(&f, 0, 0) // len 0 = to the end of the file
}

/// Bytes of `range` of the mapping whose pages are resident (`mincore`).
///
/// # Errors
/// `range` is outside the mapping, or the OS refuses.
pub fn resident_bytes(map: &Mapped, range: Range<usize>) -> Result<u64, ResidencyError> {
    #[cfg(unix)]
    {
        let (addr, len) = page_span(map, &range)?;
        if len == 0 {
            return Ok(0);
        }
        let ps = page_size();
        let mut vec = vec![0u8; len / ps];
        // SAFETY: [addr, addr + len) is whole pages of a live mapping (checked above) and `vec`
        // has one byte per page, as mincore requires. mincore only writes `vec`.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr().cast()) };
        if r != 0 {
            return Err(os_err("mincore"));
        }
        let base = map.bytes().as_ptr() as usize;
        let (lo, hi) = (base + range.start, base + range.end);
        let mut n = 0u64;
        for (i, &v) in vec.iter().enumerate() {
            if v & 1 != 0 {
                let p = addr + i * ps;
                n += (hi.min(p + ps) - lo.max(p)) as u64;
            }
        }
        Ok(n)
    }
    #[cfg(not(unix))]
    {
        let _ = (map, range);
        Err(ResidencyError::Unsupported { what: "mincore" })
    }
}

/// Bytes of `range` of the mapping that are mapped into this process's page tables (the
/// pages that count toward its RSS), from `/proc/self/pagemap` (Linux and Android).
///
/// Unlike [`resident_bytes`], this does not count pages that are only in the page cache: after
/// [`release`] a slab's pages are no longer mapped here even if the kernel keeps them cached.
///
/// # Errors
/// `range` is outside the mapping, or pagemap cannot be read (other platforms).
pub fn mapped_bytes(map: &Mapped, range: Range<usize>) -> Result<u64, ResidencyError> {
    let (addr, len) = page_span(map, &range)?;
    if len == 0 {
        return Ok(0);
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::fs::FileExt;
        static PAGEMAP: OnceLock<Result<std::fs::File, String>> = OnceLock::new();
        let f = PAGEMAP
            .get_or_init(|| std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ResidencyError::Os {
            call: "open(/proc/self/pagemap)",
            source: io::Error::other(e.clone()),
        })?;
        let ps = page_size();
        let pages = len / ps;
        let mut buf = vec![0u8; pages * 8];
        f.read_exact_at(&mut buf, (addr / ps * 8) as u64)
            .map_err(|source| ResidencyError::Os { call: "read(/proc/self/pagemap)", source })?;
        let base = map.bytes().as_ptr() as usize;
        let (lo, hi) = (base + range.start, base + range.end);
        let mut n = 0u64;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            // Bit 63: page present in RAM and mapped here.
            if u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 63 == 1 {
                let p = addr + i * ps;
                n += (hi.min(p + ps) - lo.max(p)) as u64;
            }
        }
        Ok(n)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = addr;
        Err(ResidencyError::Unsupported { what: "/proc/self/pagemap" })
    }
}

/// Peak resident set size of this process in bytes (`getrusage(RUSAGE_SELF).ru_maxrss`).
///
/// # Errors
/// Not available on this platform.
pub fn peak_rss_bytes() -> Result<u64, ResidencyError> {
    #[cfg(unix)]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is a valid, writable rusage; getrusage fills it.
        let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
        if r != 0 {
            return Err(os_err("getrusage"));
        }
        // SAFETY: getrusage succeeded, so `ru` is initialised (it was zeroed anyway).
        let max = unsafe { ru.assume_init() }.ru_maxrss.max(0) as u64;
        // Linux and the BSDs report KiB, Apple platforms bytes.
        Ok(if cfg!(target_vendor = "apple") { max } else { max * 1024 })
    }
    #[cfg(not(unix))]
    Err(ResidencyError::Unsupported { what: "getrusage" })
}

/// The memory this process may use, in bytes, where the OS says: the smallest of its memory
/// cgroup limits (v2 `memory.max` of its group and every parent; v1 `memory.limit_in_bytes`;
/// the page cache of mapped files counts against both) and the machine's `MemAvailable`
/// (Linux and Android; `None` elsewhere or when nothing is known).
pub fn process_memory_limit() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
        let mut best: Option<u64> = None;
        let mut consider = |v: Option<u64>| {
            // v1 reports "no limit" as a huge page-aligned number.
            if let Some(v) = v.filter(|&v| v < 1 << 60) {
                best = Some(best.map_or(v, |b| b.min(v)));
            }
        };
        for line in read(Path::new("/proc/self/cgroup")).unwrap_or_default().lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
            let (root, file) = match ctl {
                "" => ("/sys/fs/cgroup", "memory.max"),
                c if c.split(',').any(|c| c == "memory") => ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
                _ => continue,
            };
            let mut dir = PathBuf::from(root).join(path.trim_start_matches('/'));
            loop {
                consider(num(read(&dir.join(file))));
                if dir.as_os_str().len() <= root.len() || !dir.pop() {
                    break;
                }
            }
        }
        let avail = read(Path::new("/proc/meminfo")).and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
        });
        consider(avail);
        best
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    None
}

/// The default model budget for a process limited to `limit` bytes: the limit less room for
/// what is not weights (KV caches, scratch, the program): an eighth of it, at least 32 MiB.
pub fn budget_for_limit(limit: u64) -> u64 {
    limit.saturating_sub((limit / 8).max(32 << 20))
}

/// [`budget_for_limit`] of [`process_memory_limit`]: what a model's budget defaults to.
pub fn default_budget() -> Option<u64> {
    process_memory_limit().map(budget_for_limit)
}

/// Where each expert's slab lies in the file: `[layer][expert]` → absolute byte range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlabIndex {
    layers: Vec<Vec<Option<Range<usize>>>>,
    bytes_in_file: u64,
    count: usize,
}

/// `layers.L.experts.E` → (L, E).
fn parse_slab_key(key: &str) -> Option<(usize, usize)> {
    let rest = key.strip_prefix("layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let e = rest.strip_prefix("experts.")?;
    Some((l.parse().ok()?, e.parse().ok()?))
}

impl SlabIndex {
    /// The slabs of a model's routed experts, as the model resolved them. In an MEO-native
    /// layer, slot `b·E + e` is expert `e` of bank `b` (0 = fc1, 1 = fc2), the numbering the
    /// session reports selections in.
    pub fn from_model(model: &crate::model::Model) -> Self {
        let mut ix = Self::default();
        let n = model.config().router.num_experts;
        let moe = model.moe_layers().map(|l| (l, 1));
        let meo = model.meo_layers().map(|l| (l, 2));
        for (l, banks) in moe.chain(meo) {
            if ix.layers.len() <= l {
                ix.layers.resize(l + 1, Vec::new());
            }
            for slot in 0..banks * n {
                let r =
                    if banks == 1 { model.expert_slab(l, slot) } else { model.bank_expert_slab(l, slot / n, slot % n) };
                if let Some(r) = &r {
                    ix.bytes_in_file += r.len() as u64;
                    ix.count += 1;
                }
                ix.layers[l].push(r);
            }
        }
        ix
    }

    /// Indexes the slabs named `layers.L.experts.E` (others, if any, are ignored).
    pub fn new(file: &MeoFile<'_>) -> Self {
        let mut ix = Self::default();
        for s in file.slabs() {
            let Some((l, e)) = parse_slab_key(s.key) else { continue };
            if ix.layers.len() <= l {
                ix.layers.resize(l + 1, Vec::new());
            }
            let row = &mut ix.layers[l];
            if row.len() <= e {
                row.resize(e + 1, None);
            }
            row[e] = Some(file.slab_range(s));
            ix.bytes_in_file += s.len;
            ix.count += 1;
        }
        ix
    }

    /// The slab of expert `e` of layer `l`.
    pub fn get(&self, l: usize, e: usize) -> Option<Range<usize>> {
        self.layers.get(l)?.get(e)?.clone()
    }

    /// Number of layers (the highest layer with experts, plus one).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of expert slots of layer `l` (0 for a dense layer).
    pub fn num_experts(&self, l: usize) -> usize {
        self.layers.get(l).map_or(0, Vec::len)
    }

    /// Number of expert slabs.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when the file has no expert slabs.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sum of all slab lengths.
    pub fn bytes_in_file(&self) -> u64 {
        self.bytes_in_file
    }

    /// Every slab: (layer, expert, range).
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, Range<usize>)> + '_ {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, row)| row.iter().enumerate().filter_map(move |(e, r)| Some((l, e, r.clone()?))))
    }
}

/// [`ExpertTracker`] settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerOptions {
    /// `madvise(WILLNEED)` each selected slab as soon as routing reports it.
    pub prefetch: bool,
    /// At creation, [`advise_lazy`]: read-ahead off, the tensors every token uses prefetched,
    /// so page faults never pull in bytes of unselected experts: an expert is read only when
    /// routing selects it.
    pub precise: bool,
    /// Most bytes of expert slabs to keep; when the slabs selected since their last release
    /// exceed it, the least recently selected ones (never those of the current call) are
    /// evicted. `None` = no limit.
    pub budget: Option<u64>,
    /// Evicted slabs are also dropped from the page cache (see [`evict`]), not only from this
    /// process ([`release`]). Makes the budget hold for the machine's memory, not just RSS
    /// (Linux and Android; elsewhere releases are `madvise` only).
    pub drop_page_cache: bool,
    /// Next-layer prediction: before each MoE layer runs, the next MoE layer's router is
    /// applied to this layer's router input and the slabs it picks are prefetched, so their
    /// reads overlap this layer's compute. A misprediction costs only a wasted read (and
    /// counts toward the budget like any held slab); results never change. Off by default:
    /// under the memory limits measured so far it cost more than it saved
    /// (`docs/PERFORMANCE.md`, "Bigger than memory").
    pub predict: bool,
    /// Which held slab is evicted first when the budget is exceeded.
    pub policy: Policy,
    /// How predicted slabs are read.
    pub predict_io: PredictIo,
    /// With a budget: keep the tensors every token reads ([`DataLayout::dense_runs`])
    /// resident — `mlock`ed where permitted, otherwise touched at creation and re-touched every
    /// [`RETOUCH_STEPS`] forward calls — and count them against the budget (slabs get the
    /// rest).
    pub pin_dense: bool,
    /// How the slab of a selected expert that is not held (a miss) is read, before the layer
    /// runs it (with `prefetch` on).
    pub miss_read: MissRead,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        Self {
            prefetch: true,
            precise: true,
            budget: None,
            drop_page_cache: true,
            predict: false,
            policy: Policy::default(),
            predict_io: PredictIo::default(),
            pin_dense: true,
            miss_read: MissRead::default(),
        }
    }
}

/// How a missed expert's slab is read: in large requests before the layer touches it, so the
/// kernel's page faults find its pages in memory instead of reading them 4 KiB at a time
/// (read-ahead is off, see [`advise_lazy`]). Measured in `docs/PERFORMANCE.md` ("Reading a
/// missed expert"); results are the same whichever is used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissRead {
    /// [`prefetch`]: `madvise(MADV_WILLNEED)` per [`WILLNEED_CHUNK`]; returns at once, the
    /// reads complete while earlier experts compute.
    Willneed,
    /// [`prefetch_once`]: one `madvise(MADV_WILLNEED)` over the slab, as before issue 20; the
    /// kernel reads only its first max(read-ahead, largest request) bytes, the rest is faulted
    /// in page by page. For measurements.
    WillneedOnce,
    /// [`populate`]: [`prefetch`], then `madvise(MADV_POPULATE_READ)` (Linux ≥ 5.14; a touch of
    /// every page where the kernel refuses it by `EINVAL`): waits until the slab is read and
    /// mapped, so the layer takes no page fault on it.
    #[default]
    Populate,
    /// Positioned reads (`pread`, 4 MiB at a time) of the slab's file range into a scratch
    /// buffer the tracker owns: the page cache is filled before the layer runs and its page
    /// faults only map pages.
    Pread,
}

impl MissRead {
    /// Every variant, for measurements.
    pub const ALL: [MissRead; 4] = [MissRead::Willneed, MissRead::WillneedOnce, MissRead::Populate, MissRead::Pread];

    /// The name the CLI takes (`willneed`, `willneed-once`, `populate`, `pread`).
    pub fn name(self) -> &'static str {
        match self {
            MissRead::Willneed => "willneed",
            MissRead::WillneedOnce => "willneed-once",
            MissRead::Populate => "populate",
            MissRead::Pread => "pread",
        }
    }

    /// The variant named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Bytes a [`MissRead::Pread`] read asks for at once (the scratch buffer's size).
const PREAD_CHUNK: usize = 4 << 20;

/// How the slabs of a next-layer prediction are read (measured in `docs/PERFORMANCE.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PredictIo {
    /// `madvise(MADV_WILLNEED)` from the computing thread (the kernel reads in the background,
    /// but queueing the reads — and any reclaim they cause — happens on this thread).
    Inline,
    /// `madvise(MADV_WILLNEED)` from a dedicated I/O thread.
    #[default]
    Thread,
    /// Positioned reads (`pread`) of the slab's file range into a scratch buffer on a dedicated
    /// I/O thread: the page cache is filled before the layer runs, and its page faults only map.
    ReadThread,
}

impl PredictIo {
    /// Every variant, for measurements.
    pub const ALL: [PredictIo; 3] = [PredictIo::Inline, PredictIo::Thread, PredictIo::ReadThread];

    /// The name the CLI takes (`inline`, `thread`, `read-thread`).
    pub fn name(self) -> &'static str {
        match self {
            PredictIo::Inline => "inline",
            PredictIo::Thread => "thread",
            PredictIo::ReadThread => "read-thread",
        }
    }

    /// The variant named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The I/O thread of [`PredictIo::Thread`] and [`PredictIo::ReadThread`]: takes (address,
/// length) of whole pages of the mapping, or (file offset, length), and reads them ahead.
struct IoThread {
    tx: Option<std::sync::mpsc::SyncSender<(usize, usize)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl IoThread {
    /// Requests waiting beyond this are dropped (a prediction that late is useless).
    const QUEUE: usize = 64;

    fn spawn(how: PredictIo, map: &Mapped) -> Result<Self, ResidencyError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, usize)>(Self::QUEUE);
        let file = match how {
            PredictIo::ReadThread => {
                let path = map.path();
                Some(
                    std::fs::File::open(path)
                        .map_err(|source| ResidencyError::Open { path: path.to_path_buf(), source })?,
                )
            }
            _ => None,
        };
        let handle = std::thread::Builder::new()
            .name("meo-prefetch".into())
            .spawn(move || {
                let mut buf = Vec::new();
                for (a, len) in rx {
                    match &file {
                        #[cfg(unix)]
                        Some(f) => {
                            use std::os::unix::fs::FileExt;
                            buf.resize(len.min(4 << 20), 0u8);
                            let mut off = 0;
                            while off < len {
                                let n = (len - off).min(buf.len());
                                // Errors (a truncated file) surface where the bytes are used.
                                if f.read_exact_at(&mut buf[..n], (a + off) as u64).is_err() {
                                    break;
                                }
                                off += n;
                            }
                        }
                        #[cfg(unix)]
                        None => {
                            // In pieces: see WILLNEED_CHUNK.
                            for at in (a..a + len).step_by(WILLNEED_CHUNK) {
                                // SAFETY: [a, a + len) is whole pages of the tracker's mapping,
                                // which outlives this thread: the tracker joins it on drop, and
                                // the tracker borrows the mapping. `at` and the piece's end are
                                // page-aligned (a is, WILLNEED_CHUNK is a multiple of a page).
                                // WILLNEED only starts reads.
                                unsafe {
                                    let n = WILLNEED_CHUNK.min(a + len - at);
                                    libc::madvise(at as *mut libc::c_void, n, libc::MADV_WILLNEED);
                                }
                            }
                        }
                        #[cfg(not(unix))]
                        _ => {
                            let _ = (a, len, &mut buf);
                        }
                    }
                }
            })
            .map_err(|source| ResidencyError::Os { call: "spawn(meo-prefetch)", source })?;
        Ok(Self { tx: Some(tx), handle: Some(handle) })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        drop(self.tx.take()); // ends the thread's loop
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Forward calls between re-touches of the dense tensors when `mlock` was refused.
pub const RETOUCH_STEPS: u64 = 8;

/// Eviction order of held expert slabs under a budget (see `docs/PERFORMANCE.md`, "Bigger than
/// memory", for hit rates measured on the trained fixtures).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Least recently selected first.
    Lru,
    /// Least often selected first (ties: least recent).
    Lfu,
    /// Lowest frequency × recency score first: each selection adds 1 to a score that halves
    /// every [`DECAY_STEPS`] forward calls. The default: a predicted slab not yet selected
    /// scores 0, so a misprediction is the first to go, where LRU would keep it as the most
    /// recent and evict a slab still in use (measured: `docs/PERFORMANCE.md`).
    #[default]
    FreqRecency,
}

/// Half-life of [`Policy::FreqRecency`]'s score, in forward calls.
pub const DECAY_STEPS: f64 = 16.0;

impl Policy {
    /// Every policy, for measurements.
    pub const ALL: [Policy; 3] = [Policy::Lru, Policy::Lfu, Policy::FreqRecency];

    /// The name the CLI takes (`lru`, `lfu`, `freq-recency`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Lfu => "lfu",
            Policy::FreqRecency => "freq-recency",
        }
    }

    /// The policy named `name` ([`name`](Self::name)), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SlabState {
    touched: bool,
    /// LRU key while held (selected or predicted, and not released since).
    held_tick: Option<u64>,
    /// The step in which it was last counted toward [`ExpertTracker::take_step_bytes`].
    step_seen: u64,
    /// Times selected.
    count: u64,
    /// [`Policy::FreqRecency`] score as of step `score_step`.
    score: f64,
    score_step: u64,
}

impl SlabState {
    fn decayed(&self, step: u64) -> f64 {
        self.score * (-((step - self.score_step) as f64) / DECAY_STEPS).exp2()
    }
}

/// Next-layer prediction figures of one layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PredictionStats {
    /// Forward calls in which this layer's experts were predicted and then selected.
    pub calls: u64,
    /// Experts selected in those calls, and how many of them had been predicted.
    pub selected: u64,
    pub predicted_and_selected: u64,
    /// Experts predicted in those calls.
    pub predicted: u64,
}

impl PredictionStats {
    /// Share of the selected experts that were predicted (recall); `None` before any call.
    pub fn accuracy(&self) -> Option<f64> {
        (self.selected > 0).then(|| self.predicted_and_selected as f64 / self.selected as f64)
    }
}

/// Residency figures for a model's expert slabs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResidencyStats {
    /// Per layer, distinct experts selected so far (0 for dense layers).
    pub experts_touched_per_layer: Vec<usize>,
    /// Per layer, number of experts (0 for dense layers).
    pub experts_per_layer: Vec<usize>,
    /// Distinct (layer, expert) pairs selected so far.
    pub experts_touched: usize,
    /// Bytes of expert slabs resident now (`mincore` over every slab; see [`resident_bytes`]).
    pub expert_bytes_resident: u64,
    /// Bytes of expert slabs mapped into this process now ([`mapped_bytes`]); `None` where
    /// `/proc/self/pagemap` is not available.
    pub expert_bytes_mapped: Option<u64>,
    /// Bytes of all expert slabs in the file.
    pub expert_bytes_in_file: u64,
    /// Slabs evicted under the budget, and their bytes.
    pub released_slabs: u64,
    pub released_bytes: u64,
    /// Selections of a slab that was held (selected or predicted earlier and not evicted since:
    /// a cache hit), and of one that was not (a miss: read from the file when used).
    pub hits: u64,
    pub misses: u64,
    /// Per layer, next-layer prediction figures (all zero without prediction).
    pub prediction: Vec<PredictionStats>,
    /// Slabs prefetched because they were predicted (not yet held then).
    pub predicted_prefetches: u64,
    /// Bytes of dense tensors kept resident and counted against the budget, and whether
    /// `mlock` held them (false: touched and re-touched instead).
    pub dense_pinned_bytes: u64,
    pub dense_locked: bool,
    /// How missed slabs were read, how many were, and how many of those
    /// [`MissRead::Populate`] had to touch page by page (`MADV_POPULATE_READ` refused).
    pub miss_read: MissRead,
    pub miss_reads: u64,
    pub miss_read_bytes: u64,
    pub populate_fallbacks: u64,
    /// Token choices an on-miss fallback served instead of a missed expert (all layers, and
    /// per layer), and the missed slabs it then started reading.
    pub fallback_choices: u64,
    pub fallbacks_per_layer: Vec<u64>,
    pub fallback_fetches: u64,
}

impl ResidencyStats {
    /// Hits ÷ (hits + misses); `None` before any selection.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

/// Records routing, prefetches selected slabs and enforces a memory budget.
///
/// Feed it each MoE layer's selected experts through [`on_selected`](Self::on_selected) (the
/// model's routing observer does this); call [`take_step_bytes`](Self::take_step_bytes) after
/// each forward call for the bytes of the distinct slabs that call selected.
pub struct ExpertTracker<'m> {
    map: &'m Mapped,
    file: Option<std::fs::File>,
    /// Reads predicted slabs ([`PredictIo::Thread`], [`PredictIo::ReadThread`]).
    io: Option<IoThread>,
    index: SlabIndex,
    /// Start of each layer's run in `state`.
    layer_base: Vec<usize>,
    state: Vec<SlabState>,
    opts: TrackerOptions,
    lru: BTreeMap<u64, (usize, usize)>,
    held_bytes: u64,
    tick: u64,
    step: u64,
    step_bytes: u64,
    released_slabs: u64,
    released_bytes: u64,
    hits: u64,
    misses: u64,
    /// Per layer, the experts predicted for the current call (cleared when it selects).
    pending: Vec<Vec<u32>>,
    prediction: Vec<PredictionStats>,
    predicted_prefetches: u64,
    /// (layer, expert) of the slabs prefetched on prediction since the last
    /// [`take_predicted_prefetches`](ExpertTracker::take_predicted_prefetches), when recording.
    prefetch_log: Option<Vec<(usize, usize)>>,
    dense: DensePin,
    /// [`MissRead::Pread`]'s file and scratch buffer (opened and allocated on first use).
    pread: Option<(std::fs::File, Vec<u8>)>,
    miss_reads: u64,
    miss_read_bytes: u64,
    populate_fallbacks: u64,
    fallback_choices: u64,
    fallbacks_per_layer: Vec<u64>,
    fallback_fetches: u64,
    last_error: Option<ResidencyError>,
}

/// Why [`ExpertTracker::hold`] holds a slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Selected,
    Predicted,
    /// Missed and served by an on-miss fallback: read for later tokens.
    Fetched,
}

/// The dense tensors kept resident under a budget.
#[derive(Debug, Default)]
struct DensePin {
    runs: Vec<Range<usize>>,
    bytes: u64,
    locked: bool,
}

impl core::fmt::Debug for ExpertTracker<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ExpertTracker")
            .field("path", &self.map.path())
            .field("slabs", &self.index.len())
            .field("opts", &self.opts)
            .field("held_bytes", &self.held_bytes)
            .field("released_slabs", &self.released_slabs)
            .finish_non_exhaustive()
    }
}

impl<'m> ExpertTracker<'m> {
    /// A tracker for the slabs of `file`, which must be parsed from `map`'s bytes.
    ///
    /// # Errors
    /// `file` does not describe `map` (a slab lies outside it), or opening the file for
    /// page-cache advice fails.
    pub fn new(map: &'m Mapped, file: &MeoFile<'_>, opts: TrackerOptions) -> Result<Self, ResidencyError> {
        Self::with_index(map, SlabIndex::new(file), file, opts)
    }

    /// A tracker for a model opened from a file ([`Model::open`](crate::model::Model::open)).
    ///
    /// # Errors
    /// The model has no mapping (opened from bytes in memory), or opening the file for
    /// page-cache advice fails.
    pub fn for_model(model: &'m crate::model::Model, opts: TrackerOptions) -> Result<Self, ResidencyError> {
        let map = model.mapped().ok_or(ResidencyError::NotMapped)?;
        Self::with_index(map, SlabIndex::from_model(model), &model.file()?, opts)
    }

    fn with_index(
        map: &'m Mapped,
        index: SlabIndex,
        file: &MeoFile<'_>,
        opts: TrackerOptions,
    ) -> Result<Self, ResidencyError> {
        let len = map.bytes().len();
        if let Some((_, _, r)) = index.iter().find(|(_, _, r)| r.end > len) {
            return Err(ResidencyError::OutOfBounds { start: r.start, end: r.end, len });
        }
        if opts.precise {
            advise_lazy(map, file)?;
        }
        let fd = if opts.drop_page_cache && opts.budget.is_some() && CAN_FADVISE {
            let path = map.path();
            Some(
                std::fs::File::open(path)
                    .map_err(|source| ResidencyError::Open { path: path.to_path_buf(), source })?,
            )
        } else {
            None
        };
        let mut layer_base = Vec::with_capacity(index.num_layers());
        let mut n = 0;
        for l in 0..index.num_layers() {
            layer_base.push(n);
            n += index.num_experts(l);
        }
        let dense = if opts.pin_dense && opts.budget.is_some() { pin_dense(map, file)? } else { DensePin::default() };
        let layers = index.num_layers();
        Ok(Self {
            map,
            file: fd,
            io: if opts.predict && opts.predict_io != PredictIo::Inline {
                Some(IoThread::spawn(opts.predict_io, map)?)
            } else {
                None
            },
            index,
            layer_base,
            state: vec![SlabState::default(); n],
            opts,
            lru: BTreeMap::new(),
            held_bytes: 0,
            tick: 0,
            step: 1,
            step_bytes: 0,
            released_slabs: 0,
            released_bytes: 0,
            hits: 0,
            misses: 0,
            pending: vec![Vec::new(); layers],
            prediction: vec![PredictionStats::default(); layers],
            predicted_prefetches: 0,
            prefetch_log: None,
            dense,
            pread: None,
            miss_reads: 0,
            miss_read_bytes: 0,
            populate_fallbacks: 0,
            fallback_choices: 0,
            fallbacks_per_layer: vec![0; layers],
            fallback_fetches: 0,
            last_error: None,
        })
    }

    /// The budget left for expert slabs: the budget less the pinned dense bytes.
    fn expert_budget(&self) -> Option<u64> {
        self.opts.budget.map(|b| b.saturating_sub(self.dense.bytes))
    }

    /// Changes the budget (`None`: no limit) and evicts down to it at once — what a memory
    /// warning calls with a lower figure. Dense tensors are pinned on the first budget set and
    /// stay pinned when it is lifted.
    ///
    /// # Errors
    /// Pinning the dense tensors failed (a first budget on a tracker made without one).
    pub fn set_budget(&mut self, budget: Option<u64>) -> Result<(), ResidencyError> {
        if budget.is_some() && self.opts.pin_dense && self.dense.runs.is_empty() {
            self.dense = pin_dense(self.map, &crate::format::MeoFile::parse(self.map.bytes())?)?;
        }
        if budget.is_some() && self.file.is_none() && self.opts.drop_page_cache && CAN_FADVISE {
            let path = self.map.path();
            self.file = Some(
                std::fs::File::open(path)
                    .map_err(|source| ResidencyError::Open { path: path.to_path_buf(), source })?,
            );
        }
        self.opts.budget = budget;
        self.enforce_budget(self.tick + 1);
        Ok(())
    }

    /// Forgets which slabs are held, after something released them all (a memory warning's
    /// [`release_expert_slabs`](crate::platform::release_expert_slabs)): they count as misses
    /// when selected again.
    pub fn forget_held(&mut self) {
        for st in &mut self.state {
            st.held_tick = None;
        }
        self.lru.clear();
        self.held_bytes = 0;
    }

    /// Records the (layer, expert) of every slab prefetched on prediction from now on, for
    /// [`take_predicted_prefetches`](Self::take_predicted_prefetches).
    pub fn record_predicted_prefetches(&mut self) {
        self.prefetch_log.get_or_insert_with(Vec::new);
    }

    /// The slabs prefetched on prediction since the last call (empty unless recording).
    pub fn take_predicted_prefetches(&mut self) -> Vec<(usize, usize)> {
        self.prefetch_log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The slab index.
    pub fn index(&self) -> &SlabIndex {
        &self.index
    }

    /// The settings.
    pub fn options(&self) -> &TrackerOptions {
        &self.opts
    }

    fn slot(&self, l: usize, e: usize) -> Option<usize> {
        (e < self.index.num_experts(l)).then(|| self.layer_base[l] + e)
    }

    /// Layer `layer` selected `experts` (any order, duplicates allowed) for the tokens of the
    /// current forward call: records them, prefetches their slabs, and enforces the budget.
    /// Unknown layers or experts are ignored. OS failures are kept (see
    /// [`take_error`](Self::take_error)), never fatal: residency advice is only advice.
    pub fn on_selected(&mut self, layer: usize, experts: &[u32]) {
        let call_start = self.tick + 1;
        if let Some(pending) = self.pending.get_mut(layer)
            && !pending.is_empty()
        {
            let st = &mut self.prediction[layer];
            st.calls += 1;
            st.predicted += pending.len() as u64;
            let mut sel: Vec<u32> = experts.to_vec();
            sel.sort_unstable();
            sel.dedup();
            st.selected += sel.len() as u64;
            st.predicted_and_selected += sel.iter().filter(|e| pending.binary_search(e).is_ok()).count() as u64;
            pending.clear();
        }
        for &e in experts {
            let e = e as usize;
            let (Some(i), Some(range)) = (self.slot(layer, e), self.index.get(layer, e)) else { continue };
            let len = range.len() as u64;
            let st = &mut self.state[i];
            st.touched = true;
            if st.step_seen != self.step {
                st.step_seen = self.step;
                self.step_bytes += len;
            }
            if st.held_tick.is_some_and(|t| t >= call_start) {
                continue; // a duplicate within this call
            }
            st.count += 1;
            st.score = st.decayed(self.step) + 1.0;
            st.score_step = self.step;
            if st.held_tick.is_some() {
                self.hits += 1;
            } else {
                self.misses += 1;
            }
            self.hold(layer, e, range, Hold::Selected);
        }
        self.enforce_budget(call_start);
    }

    /// Marks slab (`l`, `e`) held by the newest tick; a slab not held before is read: as
    /// [`TrackerOptions::miss_read`] says when selected (and `prefetch` is on), in the
    /// background when predicted or fetched after an on-miss fallback.
    fn hold(&mut self, l: usize, e: usize, range: Range<usize>, why: Hold) {
        let predicted = why == Hold::Predicted;
        let i = self.layer_base[l] + e;
        let was_held = match self.state[i].held_tick.take() {
            Some(t) => {
                self.lru.remove(&t);
                true
            }
            None => false,
        };
        self.tick += 1;
        self.state[i].held_tick = Some(self.tick);
        self.lru.insert(self.tick, (l, e));
        if !was_held {
            self.held_bytes += range.len() as u64;
            if predicted {
                self.predicted_prefetches += 1;
                if let Some(log) = &mut self.prefetch_log {
                    log.push((l, e));
                }
            }
            if predicted && let Some(io) = &self.io {
                let req = match self.opts.predict_io {
                    PredictIo::ReadThread => Ok((range.start, range.len())),
                    _ => page_span(self.map, &range),
                };
                match req {
                    // A full queue drops the request: the slab is then read when used.
                    Ok(r) => drop(io.tx.as_ref().map(|tx| tx.try_send(r))),
                    Err(err) => self.last_error = Some(err),
                }
            } else if why != Hold::Selected {
                if let Err(err) = prefetch(self.map, range) {
                    self.last_error = Some(err);
                }
            } else if self.opts.prefetch
                && let Err(err) = self.read_missed(range)
            {
                self.last_error = Some(err);
            }
        }
    }

    /// Reads a missed slab as [`TrackerOptions::miss_read`] says.
    fn read_missed(&mut self, range: Range<usize>) -> Result<(), ResidencyError> {
        self.miss_reads += 1;
        self.miss_read_bytes += range.len() as u64;
        match self.opts.miss_read {
            MissRead::Willneed => prefetch(self.map, range),
            MissRead::WillneedOnce => prefetch_once(self.map, range),
            MissRead::Populate => {
                if !populate(self.map, range)? {
                    self.populate_fallbacks += 1;
                }
                Ok(())
            }
            MissRead::Pread => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::FileExt;
                    if self.pread.is_none() {
                        let path = self.map.path();
                        let f = std::fs::File::open(path)
                            .map_err(|source| ResidencyError::Open { path: path.to_path_buf(), source })?;
                        self.pread = Some((f, vec![0u8; PREAD_CHUNK]));
                    }
                    let (f, buf) = self.pread.as_mut().expect("opened above");
                    let mut at = range.start;
                    while at < range.end {
                        let n = (range.end - at).min(buf.len());
                        f.read_exact_at(&mut buf[..n], at as u64)
                            .map_err(|source| ResidencyError::Os { call: "pread", source })?;
                        at += n;
                    }
                    Ok(())
                }
                #[cfg(not(unix))]
                Err(ResidencyError::Unsupported { what: "pread" })
            }
        }
    }

    /// Before layer `from` runs, layer `layer` is predicted to select `experts`: their slabs
    /// that are not held are prefetched and held (so they count toward the budget); the
    /// prediction is kept to score against what `layer` then selects.
    pub fn on_predicted(&mut self, _from: usize, layer: usize, experts: &[u32]) {
        if !self.opts.predict {
            return;
        }
        let call_start = self.tick + 1;
        let Some(pending) = self.pending.get_mut(layer) else { return };
        pending.clear();
        pending.extend_from_slice(experts);
        pending.sort_unstable();
        pending.dedup();
        for &e in experts {
            let e = e as usize;
            let (Some(i), Some(range)) = (self.slot(layer, e), self.index.get(layer, e)) else { continue };
            if self.state[i].held_tick.is_none() {
                self.hold(layer, e, range, Hold::Predicted);
            }
        }
        self.enforce_budget(call_start);
    }

    /// Which experts of layer `layer` are held now, into `resident` (see
    /// [`Trace::resident_experts`](crate::model::Trace::resident_experts)); false for a layer
    /// without routed experts.
    pub fn resident_experts(&self, layer: usize, resident: &mut Vec<bool>) -> bool {
        let n = self.index.num_experts(layer);
        resident.clear();
        resident.extend((0..n).map(|e| self.is_held(layer, e)));
        n > 0
    }

    /// An on-miss fallback served `choices` token choices of layer `layer` instead of the
    /// experts `missed`: counts them, and starts reading the missed slabs (held, so they count
    /// toward the budget) for later tokens.
    pub fn on_fallback(&mut self, layer: usize, missed: &[u32], choices: usize) {
        let call_start = self.tick + 1;
        self.fallback_choices += choices as u64;
        if let Some(f) = self.fallbacks_per_layer.get_mut(layer) {
            *f += choices as u64;
        }
        for &e in missed {
            let e = e as usize;
            let (Some(i), Some(range)) = (self.slot(layer, e), self.index.get(layer, e)) else { continue };
            if self.state[i].held_tick.is_none() {
                self.fallback_fetches += 1;
                self.hold(layer, e, range, Hold::Fetched);
            }
        }
        self.enforce_budget(call_start);
    }

    /// Token choices served by an on-miss fallback so far.
    pub fn fallback_choices(&self) -> u64 {
        self.fallback_choices
    }

    /// The held slab to evict first under the policy, among those held before `call_start`.
    fn victim(&self, call_start: u64) -> Option<(usize, usize)> {
        match self.opts.policy {
            Policy::Lru => self.lru.first_key_value().filter(|(t, _)| **t < call_start).map(|(_, &le)| le),
            Policy::Lfu | Policy::FreqRecency => {
                let key = |st: &SlabState| match self.opts.policy {
                    Policy::Lfu => st.count as f64,
                    _ => st.decayed(self.step),
                };
                let mut best: Option<(f64, u64, (usize, usize))> = None;
                for (&t, &(l, e)) in self.lru.range(..call_start) {
                    let k = key(&self.state[self.layer_base[l] + e]);
                    // Iterating in tick order, a strict `<` keeps the least recent of a tie.
                    if best.is_none_or(|(bk, _, _)| k < bk) {
                        best = Some((k, t, (l, e)));
                    }
                }
                best.map(|(_, _, le)| le)
            }
        }
    }

    fn enforce_budget(&mut self, call_start: u64) {
        let Some(budget) = self.expert_budget() else { return };
        while self.held_bytes > budget {
            // None: only this call's slabs are left, and they are about to be used.
            let Some((l, e)) = self.victim(call_start) else { break };
            let i = self.layer_base[l] + e;
            let t = self.state[i].held_tick.take().expect("a victim is held");
            self.lru.remove(&t);
            let range = self.index.get(l, e).expect("held slabs exist");
            self.held_bytes -= range.len() as u64;
            self.released_slabs += 1;
            self.released_bytes += range.len() as u64;
            let r = match &self.file {
                Some(f) => evict(self.map, f, range),
                None => release(self.map, range),
            };
            if let Err(err) = r {
                self.last_error = Some(err);
            }
        }
    }

    /// Bytes of the distinct slabs selected since the previous call (one forward call = one
    /// step), and starts a new step.
    pub fn take_step_bytes(&mut self) -> u64 {
        self.step += 1;
        if !self.dense.locked && !self.dense.runs.is_empty() && self.step.is_multiple_of(RETOUCH_STEPS) {
            touch(self.map, &self.dense.runs);
        }
        std::mem::take(&mut self.step_bytes)
    }

    /// Bytes of the slabs selected and not released since (what the budget counts).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Whether the slab of expert `e` of layer `l` is held (selected or predicted, not evicted
    /// since): what the budget counts.
    pub fn is_held(&self, l: usize, e: usize) -> bool {
        self.slot(l, e).is_some_and(|i| self.state[i].held_tick.is_some())
    }

    /// Whether expert `e` of layer `l` has been selected.
    pub fn touched(&self, l: usize, e: usize) -> bool {
        self.slot(l, e).is_some_and(|i| self.state[i].touched)
    }

    /// The last OS failure seen while prefetching or releasing, if any (and forgets it).
    pub fn take_error(&mut self) -> Option<ResidencyError> {
        self.last_error.take()
    }

    /// Counts and `mincore` residency of every slab.
    ///
    /// # Errors
    /// `mincore` fails.
    pub fn stats(&self) -> Result<ResidencyStats, ResidencyError> {
        let mut s = ResidencyStats {
            experts_touched_per_layer: vec![0; self.index.num_layers()],
            experts_per_layer: (0..self.index.num_layers()).map(|l| self.index.num_experts(l)).collect(),
            expert_bytes_in_file: self.index.bytes_in_file(),
            released_slabs: self.released_slabs,
            released_bytes: self.released_bytes,
            hits: self.hits,
            misses: self.misses,
            prediction: self.prediction.clone(),
            predicted_prefetches: self.predicted_prefetches,
            dense_pinned_bytes: self.dense.bytes,
            dense_locked: self.dense.locked,
            miss_read: self.opts.miss_read,
            miss_reads: self.miss_reads,
            miss_read_bytes: self.miss_read_bytes,
            populate_fallbacks: self.populate_fallbacks,
            fallback_choices: self.fallback_choices,
            fallbacks_per_layer: self.fallbacks_per_layer.clone(),
            fallback_fetches: self.fallback_fetches,
            ..ResidencyStats::default()
        };
        let mut mapped = Some(0u64);
        for (l, e, range) in self.index.iter() {
            if self.touched(l, e) {
                s.experts_touched_per_layer[l] += 1;
                s.experts_touched += 1;
            }
            s.expert_bytes_resident += resident_bytes(self.map, range.clone())?;
            mapped = match (mapped, mapped_bytes(self.map, range)) {
                (Some(m), Ok(b)) => Some(m + b),
                _ => None,
            };
        }
        s.expert_bytes_mapped = mapped;
        Ok(s)
    }
}

impl Drop for ExpertTracker<'_> {
    fn drop(&mut self) {
        if self.dense.locked {
            for r in &self.dense.runs {
                // Failure leaves the pages locked until the mapping goes: nothing to report to.
                let _ = lock(self.map, r, false);
            }
        }
    }
}

impl crate::model::Trace for ExpertTracker<'_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.on_selected(layer, experts);
    }
    fn wants_prediction(&self) -> bool {
        self.opts.predict
    }
    fn on_experts_predicted(&mut self, from: usize, layer: usize, experts: &[u32]) {
        self.on_predicted(from, layer, experts);
    }
    fn resident_experts(&mut self, layer: usize, resident: &mut Vec<bool>) -> bool {
        ExpertTracker::resident_experts(self, layer, resident)
    }
    fn on_fallback(&mut self, layer: usize, missed: &[u32], choices: usize) {
        ExpertTracker::on_fallback(self, layer, missed, choices);
    }
}

/// One [`ExpertTracker`] shared by every session of a model: one budget for the model. Give
/// each forward call `&mut &shared` as its [`Trace`](crate::model::Trace); calls from several
/// threads take turns on its lock (once per MoE layer). A slab the current call of one
/// session selected may be evicted by another session's call (it then faults back in from the
/// file: results never change).
#[derive(Debug)]
pub struct SharedTracker<'m>(std::sync::Mutex<ExpertTracker<'m>>);

impl<'m> SharedTracker<'m> {
    /// Shares `tracker`.
    pub fn new(tracker: ExpertTracker<'m>) -> Self {
        Self(std::sync::Mutex::new(tracker))
    }

    /// The tracker, locked (a panic while it was locked does not poison it: its state is
    /// counters and advice, consistent after every statement that can panic).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ExpertTracker<'m>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl crate::model::Trace for &SharedTracker<'_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        self.lock().on_selected(layer, experts);
    }
    fn wants_prediction(&self) -> bool {
        self.lock().opts.predict
    }
    fn on_experts_predicted(&mut self, from: usize, layer: usize, experts: &[u32]) {
        self.lock().on_predicted(from, layer, experts);
    }
    fn resident_experts(&mut self, layer: usize, resident: &mut Vec<bool>) -> bool {
        self.lock().resident_experts(layer, resident)
    }
    fn on_fallback(&mut self, layer: usize, missed: &[u32], choices: usize) {
        self.lock().on_fallback(layer, missed, choices);
    }
}

/// posix_fadvise exists on Linux and Android only; elsewhere a release is madvise alone.
const CAN_FADVISE: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// `mlock` (or `munlock`) of `range` of the mapping, widened to whole pages.
fn lock(map: &Mapped, range: &Range<usize>, on: bool) -> Result<(), ResidencyError> {
    #[cfg(unix)]
    {
        let (addr, len) = page_span(map, range)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: [addr, addr + len) is whole pages of `map`'s live mapping (checked above);
        // locking only changes whether the kernel may reclaim them.
        let r = unsafe {
            if on {
                libc::mlock(addr as *const libc::c_void, len)
            } else {
                libc::munlock(addr as *const libc::c_void, len)
            }
        };
        if r != 0 { Err(os_err(if on { "mlock" } else { "munlock" })) } else { Ok(()) }
    }
    #[cfg(not(unix))]
    {
        let _ = (map, range, on);
        Err(ResidencyError::Unsupported { what: "mlock" })
    }
}

/// Reads one byte of every page of `runs` (faulting back any page the kernel reclaimed, and
/// marking the rest recently used).
fn touch(map: &Mapped, runs: &[Range<usize>]) {
    let (bytes, ps) = (map.bytes(), page_size());
    let mut sum = 0u8;
    for r in runs {
        let mut i = r.start;
        while i < r.end {
            sum = sum.wrapping_add(bytes[i]);
            i = (i & !(ps - 1)) + ps;
        }
    }
    std::hint::black_box(sum);
}

/// Keeps the dense tensors of `file` resident: `mlock`, or (refused: `RLIMIT_MEMLOCK`, no
/// permission) a touch of every page, re-touched by the tracker.
fn pin_dense(map: &Mapped, file: &MeoFile<'_>) -> Result<DensePin, ResidencyError> {
    let runs = DataLayout::new(file).dense_runs;
    let len = map.bytes().len();
    if let Some(r) = runs.iter().find(|r| r.end > len) {
        return Err(ResidencyError::OutOfBounds { start: r.start, end: r.end, len });
    }
    let bytes = runs.iter().map(|r| r.len() as u64).sum();
    let mut locked = true;
    for (i, r) in runs.iter().enumerate() {
        if lock(map, r, true).is_err() {
            for done in &runs[..i] {
                let _ = lock(map, done, false);
            }
            locked = false;
            break;
        }
    }
    if !locked {
        touch(map, &runs);
    }
    Ok(DensePin { runs, bytes, locked })
}

/// `mincore` residency of every expert slab of `file` (mapped by `map`): (resident, in file).
///
/// # Errors
/// `mincore` fails or `file` does not describe `map`.
pub fn expert_residency(map: &Mapped, file: &MeoFile<'_>) -> Result<(u64, u64), ResidencyError> {
    let ix = SlabIndex::new(file);
    let mut resident = 0;
    for (_, _, r) in ix.iter() {
        resident += resident_bytes(map, r)?;
    }
    Ok((resident, ix.bytes_in_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_keys_parse() {
        assert_eq!(parse_slab_key("layers.3.experts.17"), Some((3, 17)));
        assert_eq!(parse_slab_key("layers.3.shared.experts.1"), None);
        assert_eq!(parse_slab_key("blocks.3.experts.1"), None);
    }

    /// A header that parses but whose `data_offset` points past the end of the file: before the
    /// fix `map_lazy` prefetched `0..min(data_offset, len)` (the whole file) before any section
    /// was checked.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_rejected_header_advises_nothing() {
        use crate::format::{BYTE_ORDER_MARK, FORMAT_VERSION, HEADER_LEN, MAGIC, QUANT_VERSION};
        let dir = std::env::temp_dir().join(format!("meo-advise-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bogus.meo");
        let len = 16usize << 20;
        let mut b = vec![0u8; len];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&QUANT_VERSION.to_le_bytes());
        b[16..20].copy_from_slice(&BYTE_ORDER_MARK.to_le_bytes());
        b[20..24].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes()); // data_offset: 1 TiB
        b[88..92].copy_from_slice(&16384u32.to_le_bytes());
        assert!(crate::format::parse_header(&b).is_ok(), "the header itself must parse");
        std::fs::write(&p, &b).unwrap();
        drop_page_cache(&p).unwrap();
        let probe = Mapped::open(&p).unwrap();
        if resident_bytes(&probe, 0..len).unwrap() != 0 {
            eprintln!("skipped: this file system keeps the file cached (tmpfs?)");
            return;
        }
        let e = map_lazy(&p).map(drop).unwrap_err();
        assert!(matches!(e, ResidencyError::Format(_)), "{e}");
        // WILLNEED reads in the background: give it time to land.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let resident = resident_bytes(&probe, 0..len).unwrap();
        // Only the header's page may have been read.
        assert!(resident <= page_size() as u64, "{resident} bytes resident after a rejected open");
        drop(probe);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resident_bytes_of_a_touched_file() {
        let dir = std::env::temp_dir().join(format!("meo-residency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        let ps = page_size();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&p).unwrap();
            f.write_all(&vec![1u8; 8 * ps]).unwrap();
            f.sync_all().unwrap(); // dirty pages cannot be dropped from the page cache
        }
        let m = Mapped::open(&p).unwrap();
        // Reading a page makes it resident.
        let sum: u32 = m.bytes()[3 * ps..3 * ps + 10].iter().map(|&b| u32::from(b)).sum();
        assert_eq!(sum, 10);
        assert_eq!(resident_bytes(&m, 3 * ps + 5..3 * ps + 15).unwrap(), 10);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(mapped_bytes(&m, 3 * ps + 5..3 * ps + 15).unwrap(), 10);
            release(&m, 3 * ps..4 * ps).unwrap();
            assert_eq!(mapped_bytes(&m, 3 * ps..4 * ps).unwrap(), 0);
        }
        assert!(resident_bytes(&m, 0..8 * ps).unwrap() >= ps as u64);
        prefetch(&m, 0..8 * ps).unwrap();
        release(&m, 0..8 * ps).unwrap();
        assert!(matches!(resident_bytes(&m, 0..8 * ps + 1), Err(ResidencyError::OutOfBounds { .. })));
        // After release the bytes still read back from the file.
        assert_eq!(m.bytes()[7 * ps], 1);
        #[cfg(target_os = "linux")]
        {
            let f = std::fs::File::open(&p).unwrap();
            evict(&m, &f, 0..8 * ps).unwrap();
            assert_eq!(resident_bytes(&m, 0..8 * ps).unwrap(), 0);
            drop_page_cache(&p).unwrap();
        }
        assert!(peak_rss_bytes().unwrap() > 0);
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
