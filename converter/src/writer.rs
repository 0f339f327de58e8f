//! Streaming `.meo` writer: plan the layout from shapes, write tensors one at a time in
//! table order, then fill in the table and header (see `docs/FORMAT.md`).

use meo::format::Metadata;
use meo::format::{
    self, BYTE_ORDER_MARK, DType, FORMAT_VERSION, HEADER_LEN, MAGIC, QUANT_VERSION, RECORD_LEN, TENSOR_ALIGN, align_up,
    slab_key,
};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A tensor to be written: name, dtype, shape (outermost first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// What can go wrong while writing.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor {name:?} written with {found} bytes, its shape needs {expected}")]
    WrongSize { name: String, expected: u64, found: u64 },
    #[error("more tensors written than planned")]
    TooManyTensors,
    #[error("only {written} of {planned} tensors were written")]
    Incomplete { written: usize, planned: usize },
    #[error("interrupted")]
    Interrupted,
}

/// Offsets (relative to the data section) and lengths of each tensor, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub offsets: Vec<u64>,
    pub lens: Vec<u64>,
    pub data_len: u64,
}

/// Lays tensors out in the given order: each at a 64-byte boundary, and every expert slab
/// (tensors `<p>.experts.<id>.*`, which must be consecutive) starting at an `alignment`
/// boundary, with the tensor after a slab also moved to the next `alignment` boundary.
///
/// # Errors
/// An alignment the reader refuses, empty or overflowing shapes, ranks above 4, empty,
/// over-long or duplicate names, or a slab whose tensors are not consecutive.
pub fn plan(specs: &[TensorSpec], alignment: u32) -> Result<Plan, WriteError> {
    if !alignment.is_power_of_two() || !(format::MIN_ALIGNMENT..=format::MAX_ALIGNMENT).contains(&alignment) {
        return Err(WriteError::BadTensor {
            name: String::new(),
            reason: format!("alignment {alignment} is not a power of two in [4096, 1048576]"),
        });
    }
    let align = u64::from(alignment);
    let (mut offsets, mut lens) = (Vec::with_capacity(specs.len()), Vec::with_capacity(specs.len()));
    let mut pos = 0u64;
    let mut prev_key: Option<&str> = None;
    let mut seen = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for s in specs {
        let bad = |reason: &str| WriteError::BadTensor { name: s.name.clone(), reason: reason.into() };
        if s.name.is_empty() || s.name.len() > format::MAX_NAME_LEN as usize {
            return Err(bad("name must be 1..=1024 bytes"));
        }
        if !names.insert(s.name.as_str()) {
            return Err(bad("duplicate tensor name"));
        }
        if s.shape.is_empty() || s.shape.len() > format::MAX_RANK || s.shape.contains(&0) {
            return Err(bad("rank must be 1..=4 with non-zero dimensions"));
        }
        let len = s.dtype.byte_len(&s.shape).ok_or_else(|| bad("size overflows"))?;
        let key = slab_key(&s.name);
        let boundary = if key != prev_key && (key.is_some() || prev_key.is_some()) {
            if let Some(k) = key
                && !seen.insert(k)
            {
                return Err(bad("expert slab tensors must be consecutive"));
            }
            align
        } else {
            TENSOR_ALIGN
        };
        pos = align_up(pos, boundary).ok_or_else(|| bad("offset overflows"))?;
        offsets.push(pos);
        lens.push(len);
        pos = pos.checked_add(len).ok_or_else(|| bad("offset overflows"))?;
        prev_key = key;
    }
    Ok(Plan { offsets, lens, data_len: pos })
}

/// Writes one `.meo` file to any seekable sink. Call [`write_tensor`](Self::write_tensor)
/// once per planned tensor, in order, then [`finish`](Self::finish).
pub struct MeoWriter<W: Write + Seek> {
    w: W,
    specs: Vec<TensorSpec>,
    plan: Plan,
    crcs: Vec<u32>,
    meta: Vec<u8>,
    names: Vec<u8>,
    name_ranges: Vec<(u32, u32)>,
    alignment: u32,
    names_offset: u64,
    table_offset: u64,
    data_offset: u64,
    /// Bytes of the data section written so far.
    written: u64,
}

const ZEROS: [u8; 4096] = [0; 4096];

fn write_zeros(w: &mut impl Write, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl<W: Write + Seek> MeoWriter<W> {
    /// Plans the layout and writes the metadata and names; tensors follow.
    ///
    /// # Errors
    /// An invalid spec (see [`plan`]) or an I/O error.
    pub fn new(mut w: W, metadata: &Metadata<'_>, specs: Vec<TensorSpec>, alignment: u32) -> Result<Self, WriteError> {
        let plan = plan(&specs, alignment)?;
        let meta = metadata.to_bytes();
        let mut names = Vec::new();
        let mut name_ranges = Vec::with_capacity(specs.len());
        for s in &specs {
            name_ranges.push((names.len() as u32, s.name.len() as u32));
            names.extend_from_slice(s.name.as_bytes());
        }
        let names_offset = align_up(HEADER_LEN + meta.len() as u64, 8).expect("small");
        let table_offset = align_up(names_offset + names.len() as u64, 8).expect("small");
        let table_end = table_offset + specs.len() as u64 * RECORD_LEN;
        let data_offset = align_up(table_end, u64::from(alignment)).expect("small");
        // Header and table are filled in by finish(); reserve them as zeros now.
        write_zeros(&mut w, HEADER_LEN)?;
        w.write_all(&meta)?;
        write_zeros(&mut w, names_offset - HEADER_LEN - meta.len() as u64)?;
        w.write_all(&names)?;
        write_zeros(&mut w, data_offset - names_offset - names.len() as u64)?;
        Ok(Self {
            w,
            crcs: Vec::with_capacity(specs.len()),
            specs,
            plan,
            meta,
            names,
            name_ranges,
            alignment,
            names_offset,
            table_offset,
            data_offset,
            written: 0,
        })
    }

    /// The planned tensors, in the order they must be written.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Writes the next tensor's bytes.
    ///
    /// # Errors
    /// Wrong length, too many tensors, or I/O.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<(), WriteError> {
        let i = self.crcs.len();
        let spec = self.specs.get(i).ok_or(WriteError::TooManyTensors)?;
        let (offset, len) = (self.plan.offsets[i], self.plan.lens[i]);
        if data.len() as u64 != len {
            return Err(WriteError::WrongSize { name: spec.name.clone(), expected: len, found: data.len() as u64 });
        }
        write_zeros(&mut self.w, offset - self.written)?;
        self.w.write_all(data)?;
        self.written = offset + len;
        self.crcs.push(crc32fast::hash(data));
        Ok(())
    }

    /// Writes the tensor table and header and returns the sink.
    ///
    /// # Errors
    /// Not every tensor was written, or I/O.
    pub fn finish(mut self) -> Result<W, WriteError> {
        if self.crcs.len() != self.specs.len() {
            return Err(WriteError::Incomplete { written: self.crcs.len(), planned: self.specs.len() });
        }
        let mut table = Vec::with_capacity(self.specs.len() * RECORD_LEN as usize);
        for (i, s) in self.specs.iter().enumerate() {
            let (name_off, name_len) = self.name_ranges[i];
            table.extend_from_slice(&name_off.to_le_bytes());
            table.extend_from_slice(&name_len.to_le_bytes());
            table.push(s.dtype as u8);
            table.push(s.shape.len() as u8);
            table.extend_from_slice(&0u16.to_le_bytes());
            table.extend_from_slice(&self.crcs[i].to_le_bytes());
            for k in 0..format::MAX_RANK {
                table.extend_from_slice(&s.shape.get(k).copied().unwrap_or(0).to_le_bytes());
            }
            table.extend_from_slice(&self.plan.offsets[i].to_le_bytes());
            table.extend_from_slice(&self.plan.lens[i].to_le_bytes());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.meta);
        crc.update(&self.names);
        crc.update(&table);
        let mut h = Vec::with_capacity(HEADER_LEN as usize);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&QUANT_VERSION.to_le_bytes());
        h.extend_from_slice(&BYTE_ORDER_MARK.to_le_bytes());
        h.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        for v in [
            HEADER_LEN,
            self.meta.len() as u64,
            self.names_offset,
            self.names.len() as u64,
            self.table_offset,
            self.specs.len() as u64,
            self.data_offset,
            self.plan.data_len,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&self.alignment.to_le_bytes());
        h.extend_from_slice(&crc.finalize().to_le_bytes());
        debug_assert_eq!(h.len() as u64, HEADER_LEN);
        self.w.seek(SeekFrom::Start(self.table_offset))?;
        self.w.write_all(&table)?;
        self.w.seek(SeekFrom::Start(0))?;
        self.w.write_all(&h)?;
        self.w.seek(SeekFrom::End(0))?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// A file being written under a temporary name in its target folder; renamed over the
/// target by [`commit`](Self::commit), removed if dropped uncommitted.
///
/// The temporary file is created exclusively (`O_CREAT | O_EXCL`, so never through a
/// symlink planted at its name) under an unpredictable name, and the rename replaces
/// whatever is at the target (a symlink included) without writing through it.
pub struct AtomicFile {
    tmp: tempfile::TempPath,
    target: PathBuf,
    dir: PathBuf,
}

impl AtomicFile {
    /// Creates `.<name>.tmp-<random>` beside `target`.
    ///
    /// # Errors
    /// The folder is not writable.
    pub fn create(target: &Path) -> io::Result<(Self, std::fs::File)> {
        let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = target.file_name().ok_or_else(|| io::Error::other("output path has no file name"))?;
        // 0o666 less the umask, as `File::create` (tempfile's default, 0o600, would make the
        // finished model unreadable to other users).
        #[cfg(unix)]
        let perms = {
            use std::os::unix::fs::PermissionsExt;
            Some(std::fs::Permissions::from_mode(0o666))
        };
        #[cfg(not(unix))]
        let perms = None;
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix);
        if let Some(p) = perms {
            b.permissions(p);
        }
        let (file, tmp) = b.tempfile_in(dir)?.into_parts();
        Ok((Self { tmp, target: target.to_path_buf(), dir: dir.to_path_buf() }, file))
    }

    /// Path of the temporary file.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs `file`, renames the temporary file over the target and syncs the folder (so
    /// the rename itself survives a crash).
    ///
    /// # Errors
    /// I/O.
    pub fn commit(self, file: std::fs::File) -> io::Result<()> {
        file.sync_all()?;
        drop(file);
        self.tmp.persist(&self.target).map_err(|e| e.error)?;
        #[cfg(unix)]
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// An output path that names one of the conversion's input files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the output {} is the input file {}; choose another output path", output.display(), input.display())]
pub struct OutputIsInput {
    pub output: PathBuf,
    pub input: PathBuf,
}

/// Refuses an output path that is one of `inputs`: the same file (device and inode), so
/// also through a symlink, a hard link or another spelling of the path.
///
/// # Errors
/// [`OutputIsInput`].
pub fn refuse_overwriting<'a>(out: &Path, inputs: impl IntoIterator<Item = &'a Path>) -> Result<(), OutputIsInput> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // metadata() follows symlinks; nothing at `out` yet means it cannot be an input.
        let Ok(o) = std::fs::metadata(out) else { return Ok(()) };
        for input in inputs {
            if let Ok(m) = std::fs::metadata(input)
                && (m.dev(), m.ino()) == (o.dev(), o.ino())
            {
                return Err(OutputIsInput { output: out.to_path_buf(), input: input.to_path_buf() });
            }
        }
    }
    #[cfg(not(unix))]
    {
        let Ok(o) = std::fs::canonicalize(out) else { return Ok(()) };
        for input in inputs {
            if std::fs::canonicalize(input).is_ok_and(|i| i == o) {
                return Err(OutputIsInput { output: out.to_path_buf(), input: input.to_path_buf() });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meo::MeoFile;
    use meo::format::MetaValue;

    fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn slabs_are_page_aligned_and_alone() {
        let specs = vec![
            spec("norm.weight", DType::F32, &[64]),
            spec("layers.0.experts.0.gate", DType::Q8_0, &[16, 64]),
            spec("layers.0.experts.0.down", DType::Q8_0, &[64, 16]),
            spec("layers.0.experts.1.gate", DType::Q8_0, &[16, 64]),
            spec("output.weight", DType::F32, &[4, 64]),
        ];
        let meta = Metadata::from_entries(vec![("general.architecture", MetaValue::Str("test"))]);
        let mut w = MeoWriter::new(std::io::Cursor::new(Vec::new()), &meta, specs.clone(), 16384).unwrap();
        for s in &specs {
            let n = s.dtype.byte_len(&s.shape).unwrap() as usize;
            w.write_tensor(&vec![7u8; n]).unwrap();
        }
        let bytes = w.finish().unwrap().into_inner();
        let f = MeoFile::parse(&bytes).unwrap();
        f.verify().unwrap();
        assert_eq!(f.slabs().len(), 2);
        for s in f.slabs() {
            assert_eq!(s.offset % 16384, 0);
        }
        assert_eq!(f.tensor("output.weight").unwrap().offset % 16384, 0);
    }

    #[test]
    fn temporary_file_never_follows_a_planted_symlink() {
        // Before: `.<name>.tmp-<pid>` was opened with File::create, which follows a symlink
        // planted at that (predictable) name and truncates its target.
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"keep me").unwrap();
        let target = dir.path().join("out.meo");
        let old_name = dir.path().join(format!(".out.meo.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_name).unwrap();
        let (a, mut f) = AtomicFile::create(&target).unwrap();
        assert_ne!(a.tmp_path(), old_name.as_path());
        f.write_all(b"model").unwrap();
        a.commit(f).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(std::fs::read(&target).unwrap(), b"model");
        // The rename replaces a symlink at the target itself, not the file it points to.
        std::fs::remove_file(&target).unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let (a, mut f) = AtomicFile::create(&target).unwrap();
        f.write_all(b"model").unwrap();
        a.commit(f).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(!std::fs::symlink_metadata(&target).unwrap().file_type().is_symlink());
        // Only the victim, the symlink at the old name and the output remain: no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn output_naming_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("model.safetensors");
        std::fs::write(&input, b"weights").unwrap();
        let inputs = [input.as_path()];
        assert!(refuse_overwriting(&input, inputs).is_err());
        let other_spelling = dir.path().join(".").join("model.safetensors");
        assert!(refuse_overwriting(&other_spelling, inputs).is_err());
        let sym = dir.path().join("sym.meo");
        std::os::unix::fs::symlink(&input, &sym).unwrap();
        assert!(refuse_overwriting(&sym, inputs).is_err());
        let hard = dir.path().join("hard.meo");
        std::fs::hard_link(&input, &hard).unwrap();
        assert!(refuse_overwriting(&hard, inputs).is_err());
        assert!(refuse_overwriting(&dir.path().join("new.meo"), inputs).is_ok());
        std::fs::write(dir.path().join("old.meo"), b"x").unwrap();
        assert!(refuse_overwriting(&dir.path().join("old.meo"), inputs).is_ok());
    }
}
