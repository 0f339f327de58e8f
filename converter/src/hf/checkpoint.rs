//! Safetensors checkpoints (one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`), read header-first and then tensor by tensor.
//!
//! Only the JSON headers are held in memory. Tensor bytes are read with positioned reads
//! into a buffer the size of the one tensor asked for (nothing is memory-mapped, so pages
//! of tensors already converted never count towards the resident set).

use anyhow::{Context, Result, bail, ensure};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Largest safetensors header accepted (the format's own limit).
const MAX_HEADER_LEN: u64 = 100 << 20;
/// Raw bytes read per positioned read while converting to f32.
const CHUNK: usize = 1 << 20;

/// Element types of the safetensors format and their width in bits.
const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 8),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("I64", 64),
    ("U64", 64),
    ("F64", 64),
    ("C64", 64),
];

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index into the checkpoint's files.
    pub file: usize,
    /// Safetensors dtype name (`F32`, `BF16`, …).
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Absolute byte offset of the first element in the file.
    pub start: u64,
    pub len: u64,
}

impl Entry {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Converts little-endian raw elements to f32.
type Conv = fn(&[u8], &mut [f32]);

/// All tensors of a checkpoint, by name.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, Entry>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// Parses one file's header (8-byte little-endian length, then a JSON object) and checks
/// every entry's dtype, shape and byte range against the file.
fn read_header(f: &File, file: usize) -> Result<Vec<(String, Entry)>> {
    let file_len = f.metadata()?.len();
    ensure!(file_len >= 8, "file is {file_len} bytes, too short for a safetensors header");
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0)?;
    let n = u64::from_le_bytes(n);
    ensure!(n <= MAX_HEADER_LEN, "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit");
    ensure!(8 + n <= file_len, "header length {n} runs past the end of the {file_len}-byte file");
    let mut raw = vec![0u8; n as usize];
    f.read_exact_at(&mut raw, 8)?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&raw).context("header is not a JSON object")?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let e: RawEntry = serde_json::from_value(v).with_context(|| format!("tensor {name:?}: malformed entry"))?;
        let bits = DTYPES
            .iter()
            .find(|(d, _)| *d == e.dtype)
            .map(|&(_, b)| b)
            .with_context(|| format!("tensor {name:?}: unknown dtype {:?}", e.dtype))?;
        let [begin, end] = e.data_offsets;
        ensure!(begin <= end, "tensor {name:?}: data_offsets [{begin}, {end}] are reversed");
        let len = end - begin;
        let abs_end = data_start.checked_add(end);
        ensure!(
            abs_end.is_some_and(|x| x <= file_len),
            "tensor {name:?}: bytes [{begin}, {end}) of the data section run past the end of the {file_len}-byte file (truncated?)"
        );
        let expect = e.shape.iter().try_fold(bits, |a, &d| a.checked_mul(d)).map(|b| b.div_ceil(8));
        ensure!(
            expect == Some(len),
            "tensor {name:?}: {len} bytes, but {} of shape {:?} needs {}",
            e.dtype,
            e.shape,
            expect.map_or("more than 2^64".into(), |x| x.to_string())
        );
        out.push((name, Entry { file, dtype: e.dtype, shape: e.shape, start: data_start + begin, len }));
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens the weights of the checkpoint directory `dir`: `model.safetensors` if present,
    /// else the shards named by `model.safetensors.index.json`.
    ///
    /// # Errors
    /// No weights found, unreadable or corrupt files (the error names the file), a tensor in
    /// two shards, or an index entry its shard lacks.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut ck = Self { files: Vec::new(), tensors: BTreeMap::new() };
        if single.is_file() {
            ck.add_file(single)?;
            return Ok(ck);
        }
        if !index_path.is_file() {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        }
        let text = std::fs::read_to_string(&index_path).with_context(|| index_path.display().to_string())?;
        let index: Index = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a safetensors index (no weight_map)", index_path.display()))?;
        let mut shards: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            let plain = Path::new(shard).file_name().is_some_and(|n| n == shard) && shard != "..";
            ensure!(plain, "{}: shard name {shard:?} is not a plain file name", index_path.display());
            ck.add_file(dir.join(shard))?;
        }
        for (name, shard) in &index.weight_map {
            let found = ck.tensors.get(name).map(|e| &ck.files[e.file].0);
            ensure!(
                found.is_some_and(|p| p.file_name().is_some_and(|n| n == shard.as_str())),
                "{}: lists tensor {name:?} in {shard}, which does not hold it",
                index_path.display()
            );
        }
        Ok(ck)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let f = File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        let idx = self.files.len();
        let entries = read_header(&f, idx).with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        for (name, e) in entries {
            if let Some(prev) = self.tensors.get(&name) {
                bail!(
                    "tensor {name:?} is stored twice: in {} and in {}",
                    self.files[prev.file].0.display(),
                    path.display()
                );
            }
            self.tensors.insert(name, e);
        }
        self.files.push((path, f));
        Ok(())
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.tensors.get(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.len).sum()
    }

    /// The file holding `e`.
    pub fn path_of(&self, e: &Entry) -> &Path {
        &self.files[e.file].0
    }

    /// Reads `count` elements of tensor `name`, starting at element `first` (row-major),
    /// converted to f32. Only those bytes are read.
    ///
    /// # Errors
    /// Unknown tensor, a range outside it, a dtype other than F32/F16/BF16, or I/O.
    /// All elements of tensor `name`, as f32.
    ///
    /// # Errors
    /// As [`Self::read_f32`].
    pub fn read_all(&self, name: &str) -> Result<Vec<f32>> {
        let n = self.get(name).with_context(|| format!("checkpoint has no tensor {name:?}"))?.numel();
        self.read_f32(name, 0, n)
    }

    /// `count` elements of tensor `name` from element `first`, as f32.
    ///
    /// # Errors
    /// Unknown tensor, range out of bounds, unsupported dtype, I/O.
    pub fn read_f32(&self, name: &str, first: u64, count: u64) -> Result<Vec<f32>> {
        let e = self.tensors.get(name).with_context(|| format!("checkpoint has no tensor {name:?}"))?;
        let path = &self.files[e.file].0;
        let (width, conv): (usize, Conv) = match e.dtype.as_str() {
            "F32" => (4, |b, o| {
                o.iter_mut().zip(b.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }),
            "F16" => (2, |b, o| {
                o.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32())
            }),
            "BF16" => (2, |b, o| {
                o.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            }),
            d => {
                bail!("{}: tensor {name:?} has dtype {d}; only F32, F16 and BF16 weights are supported", path.display())
            }
        };
        ensure!(
            first.checked_add(count).is_some_and(|end| end <= e.numel()),
            "tensor {name:?}: elements [{first}, +{count}) outside its {} elements",
            e.numel()
        );
        let n = usize::try_from(count).context("tensor too large for this machine")?;
        let mut out = vec![0f32; n];
        let mut raw = vec![0u8; CHUNK.min(n * width)];
        let per = raw.len() / width.max(1);
        let mut at = e.start + first * width as u64;
        for o in out.chunks_mut(per.max(1)) {
            let b = &mut raw[..o.len() * width];
            self.files[e.file]
                .1
                .read_exact_at(b, at)
                .with_context(|| format!("{}: reading tensor {name:?}", path.display()))?;
            conv(b, o);
            at += b.len() as u64;
        }
        Ok(out)
    }
}

/// Names of every tensor, for "did you mean" style messages.
pub fn summarize(names: &[&str], max: usize) -> String {
    let mut s = names.iter().take(max).map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    if names.len() > max {
        s.push_str(&format!(" and {} more", names.len() - max));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a header JSON and a data section.
    fn st(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn open_one(bytes: &[u8]) -> Result<Checkpoint> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        Checkpoint::open(dir.path())
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", open_one(bytes).unwrap_err())
    }

    #[test]
    fn reads_every_float_dtype_and_slices() {
        let mut data = Vec::new();
        for x in [1.0f32, -2.0, 3.5, 0.25] {
            data.extend_from_slice(&x.to_le_bytes());
        }
        for x in [1.0f32, -2.0, 3.5, 0.25] {
            data.extend_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        for x in [1.0f32, -2.0, 3.5, 0.25] {
            data.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
        }
        let h = r#"{"__metadata__":{"format":"pt"},
            "a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},
            "b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]},
            "c":{"dtype":"BF16","shape":[2,2],"data_offsets":[24,32]}}"#;
        let ck = open_one(&st(h, &data)).unwrap();
        for n in ["a", "b", "c"] {
            assert_eq!(ck.read_f32(n, 0, 4).unwrap(), vec![1.0, -2.0, 3.5, 0.25], "{n}");
            assert_eq!(ck.read_f32(n, 1, 2).unwrap(), vec![-2.0, 3.5], "{n}");
        }
        assert!(ck.read_f32("a", 3, 2).is_err());
        assert_eq!(ck.data_bytes(), 32);
    }

    #[test]
    fn corrupt_headers_are_named() {
        let path_named = |e: String| assert!(e.contains("model.safetensors"), "{e}");
        let e = err(b"abc");
        assert!(e.contains("too short"), "{e}");
        path_named(e);
        let e = err(&st("{not json", b""));
        assert!(e.contains("JSON"), "{e}");
        path_named(e);
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(err(&huge).contains("exceeds"));
        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        assert!(err(&long).contains("past the end"));
        let e = err(&st(r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]));
        assert!(e.contains("unknown dtype") && e.contains("Q9"), "{e}");
        let e = err(&st(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8]));
        assert!(e.contains("truncated"), "{e}");
        let e = err(&st(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]));
        assert!(e.contains("needs 12"), "{e}");
        let e = err(&st(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#, &[0; 8]));
        assert!(e.contains("reversed"), "{e}");
        let e = err(&st(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, &[0; 8]));
        assert!(e.contains("2^64"), "{e}");
        let e = err(&st(r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,8]}}"#, &[0; 8]));
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn unsupported_dtype_fails_on_read() {
        let ck = open_one(&st(r#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8])).unwrap();
        let e = format!("{:#}", ck.read_f32("a", 0, 1).unwrap_err());
        assert!(e.contains("I64") && e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn sharded_index_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let one = st(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &1f32.to_le_bytes());
        let two = st(r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &2f32.to_le_bytes());
        std::fs::write(p.join("s1.safetensors"), one).unwrap();
        std::fs::write(p.join("s2.safetensors"), &two).unwrap();
        let index = |m: &str| std::fs::write(p.join("model.safetensors.index.json"), m).unwrap();
        index(r#"{"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#);
        let ck = Checkpoint::open(p).unwrap();
        assert_eq!(ck.read_f32("b", 0, 1).unwrap(), vec![2.0]);
        index(r#"{"weight_map":{"a":"s2.safetensors","b":"s2.safetensors"}}"#);
        assert!(format!("{:#}", Checkpoint::open(p).unwrap_err()).contains("does not hold"));
        index(r#"{"weight_map":{"a":"../s1.safetensors"}}"#);
        assert!(format!("{:#}", Checkpoint::open(p).unwrap_err()).contains("plain file name"));
        std::fs::write(p.join("s1.safetensors"), &two).unwrap();
        index(r#"{"weight_map":{"b":"s1.safetensors","c":"s2.safetensors"}}"#);
        assert!(format!("{:#}", Checkpoint::open(p).unwrap_err()).contains("stored twice"));
        std::fs::remove_file(p.join("model.safetensors.index.json")).unwrap();
        assert!(format!("{:#}", Checkpoint::open(p).unwrap_err()).contains("no model.safetensors"));
    }
}
