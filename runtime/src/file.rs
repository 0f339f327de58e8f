//! Opening `.meo` files from disk by memory mapping (feature `std`).

use crate::format::{FormatError, MeoFile};
use std::path::{Path, PathBuf};

/// Failure to open a `.meo` file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{}: {cause}", path.display())]
    Format { path: PathBuf, cause: FormatError },
}

/// A read-only memory mapping of a whole file. Mapping reads nothing; pages fault in on use.
pub struct Mapped {
    /// Before `map`: fields drop in order, and the entry must go before the pages do.
    #[cfg(unix)]
    _guard: crate::guard::Registration,
    map: memmap2::Mmap,
    path: PathBuf,
}

impl Mapped {
    /// Maps `path` read-only.
    ///
    /// # Errors
    /// The file cannot be opened or mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        let io = |cause| OpenError::Io { path: path.clone(), cause };
        let f = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only. meo writers never modify a file in place (they
        // write a temporary file and rename it over), so the bytes under a live mapping do
        // not change. A file truncated under us makes reads past its new end raise SIGBUS:
        // fatal unless the app installed `crate::guard`, which turns it into zeros and a
        // `FileChanged` error (docs/EMBEDDING.md says what an app must not do).
        let map = unsafe { memmap2::MmapOptions::new().map(&f) }.map_err(io)?;
        // Kernel read-ahead (often 128 KiB to 8 MiB) would page in the experts next to every
        // page we touch, starting with the header's: turn it off before the first read, so
        // only the experts routing selects are ever read. Advice only; failure is harmless.
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        #[cfg(unix)]
        let guard = crate::guard::Registration::new(&map);
        Ok(Self {
            #[cfg(unix)]
            _guard: guard,
            map,
            path,
        })
    }

    /// Whether the file changed on disk under the mapping: the SIGBUS guard
    /// ([`crate::guard::install`]) replaced a page that was no longer in the file. Always
    /// false without the guard (the process would have died instead).
    pub fn changed(&self) -> bool {
        #[cfg(unix)]
        return crate::guard::changed(&self.map);
        #[cfg(not(unix))]
        false
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The path this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses the mapped bytes (header, metadata and table only).
    ///
    /// # Errors
    /// The file is not a valid `.meo` file.
    pub fn parse(&self) -> Result<MeoFile<'_>, OpenError> {
        MeoFile::parse(&self.map).map_err(|cause| OpenError::Format { path: self.path.clone(), cause })
    }
}
