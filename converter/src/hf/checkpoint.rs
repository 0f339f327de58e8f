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

/// A weight that is NaN or infinite: nothing downstream (quantization scales, alignment,
/// merges) has a meaning for it, so conversion stops and names it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tensor {tensor:?} holds {value} at element {element}; NaN and infinite weights cannot be converted")]
pub struct NonFinite {
    pub tensor: String,
    pub element: u64,
    pub value: f32,
}

/// Converts little-endian raw elements to f32.
type Conv = fn(&[u8], &mut [f32]);

/// All tensors of a checkpoint, by name.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, Entry>,
    /// Quantized weights, by the name of the unquantized tensor they stand for
    /// ([`super::quantized`]); their parts are hidden from [`Self::names`].
    virtuals: BTreeMap<String, (Entry, super::quantized::Virtual)>,
    /// Raw tensors that are parts of a virtual one.
    parts: std::collections::BTreeSet<String>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// What can be wrong with a safetensors header. The checks are the `safetensors` crate's
/// (`Metadata::validate` and `SafeTensors::read_metadata`): tensors tile the data section
/// exactly, with no overlap, no gap and nothing after the last one; plus duplicate keys,
/// which `serde_json` would otherwise resolve silently to the last one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file is {0} bytes, too short for a safetensors header")]
    TooShort(u64),
    #[error("header length {0} exceeds the {MAX_HEADER_LEN}-byte limit")]
    TooLong(u64),
    #[error("header length {len} runs past the end of the {file_len}-byte file")]
    PastEnd { len: u64, file_len: u64 },
    #[error("header is not a JSON object of tensors: {0}")]
    NotJson(String),
    #[error("key {0:?} appears twice in the header")]
    DuplicateKey(String),
    #[error("tensor {tensor:?}: malformed entry: {reason}")]
    Malformed { tensor: String, reason: String },
    #[error("tensor {tensor:?}: unknown dtype {dtype:?}")]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] are reversed")]
    Reversed { tensor: String, begin: u64, end: u64 },
    #[error(
        "tensor {tensor:?}: bytes [{begin}, {end}) of the data section run past the end of the {file_len}-byte file (truncated?)"
    )]
    Truncated { tensor: String, begin: u64, end: u64, file_len: u64 },
    #[error("tensor {tensor:?}: {len} bytes, but {dtype} of shape {shape:?} needs {needed}")]
    WrongSize { tensor: String, len: u64, dtype: String, shape: Vec<u64>, needed: String },
    #[error("tensor {tensor:?}: bytes [{begin}, {end}) overlap tensor {other:?}")]
    Overlap { tensor: String, begin: u64, end: u64, other: String },
    #[error("bytes [{begin}, {end}) of the data section belong to no tensor")]
    Gap { begin: u64, end: u64 },
}

/// A JSON object read entry by entry, in file order, refusing a key given twice.
struct Unique<V>(Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Unique<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Unique<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<Unique<V>, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format_args!("{DUPLICATE}{k}")));
                    }
                    // The key goes with the value's own error, to name the entry.
                    let v =
                        m.next_value().map_err(|e| serde::de::Error::custom(format_args!("{MALFORMED}{k}\0{e}")))?;
                    out.push((k, v));
                }
                Ok(Unique(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

// Markers that carry a duplicate key or a malformed entry's name through serde's errors.
const DUPLICATE: &str = "\u{1}duplicate:";
const MALFORMED: &str = "\u{1}malformed:";

/// A header value: the optional `__metadata__` string map, or a tensor entry.
enum HeaderValue {
    Metadata,
    Tensor(RawEntry),
}

impl<'de> serde::Deserialize<'de> for HeaderValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Either {
            Tensor(RawEntry),
            // Parsed only to check it is an object of strings (as the crate requires).
            Metadata(#[allow(dead_code)] Unique<String>),
        }
        match Either::deserialize(d) {
            Ok(Either::Tensor(e)) => Ok(Self::Tensor(e)),
            Ok(Either::Metadata(_)) => Ok(Self::Metadata),
            Err(_) => Err(serde::de::Error::custom(
                "expected {\"dtype\", \"shape\", \"data_offsets\"} (each once), or for __metadata__ an object of strings",
            )),
        }
    }
}

/// The [`HeaderError`] a `serde_json` error stands for.
fn json_error(e: &serde_json::Error) -> HeaderError {
    let s = e.to_string();
    let s = s.rsplit_once(" at line ").map_or(s.as_str(), |(m, _)| m);
    if let Some(k) = s.strip_prefix(DUPLICATE) {
        return HeaderError::DuplicateKey(k.to_string());
    }
    if let Some((tensor, reason)) = s.strip_prefix(MALFORMED).and_then(|r| r.split_once('\0')) {
        let reason = reason.rsplit_once(" at line ").map_or(reason, |(m, _)| m);
        return HeaderError::Malformed { tensor: tensor.to_string(), reason: reason.to_string() };
    }
    HeaderError::NotJson(s.to_string())
}

/// Parses a safetensors header — `header`, the JSON after the 8-byte length, of a file of
/// `file_len` bytes — and checks every entry's dtype, shape and byte range, and that the
/// tensors tile the data section exactly. Entries are returned sorted by name.
///
/// # Errors
/// The first [`HeaderError`] found.
pub fn parse_header(
    header: &[u8],
    file_len: u64,
    file: usize,
) -> std::result::Result<Vec<(String, Entry)>, HeaderError> {
    let n = header.len() as u64;
    let data_start = 8 + n;
    let map: Unique<HeaderValue> = serde_json::from_slice(header).map_err(|e| json_error(&e))?;
    let mut out = Vec::with_capacity(map.0.len());
    for (name, v) in map.0 {
        let e = match v {
            HeaderValue::Metadata if name == "__metadata__" => continue,
            HeaderValue::Metadata => {
                return Err(HeaderError::Malformed { tensor: name, reason: "not a tensor entry".into() });
            }
            HeaderValue::Tensor(_) if name == "__metadata__" => {
                return Err(HeaderError::Malformed {
                    tensor: name,
                    reason: "__metadata__ must map strings to strings".into(),
                });
            }
            HeaderValue::Tensor(e) => e,
        };
        let Some(bits) = DTYPES.iter().find(|(d, _)| *d == e.dtype).map(|&(_, b)| b) else {
            return Err(HeaderError::UnknownDtype { tensor: name, dtype: e.dtype });
        };
        let [begin, end] = e.data_offsets;
        if begin > end {
            return Err(HeaderError::Reversed { tensor: name, begin, end });
        }
        let len = end - begin;
        if data_start.checked_add(end).is_none_or(|x| x > file_len) {
            return Err(HeaderError::Truncated { tensor: name, begin, end, file_len });
        }
        // As the crate: a whole number of bytes (4- and 6-bit types in multiples of 8 bits).
        let needed = e.shape.iter().try_fold(bits, |a, &d| a.checked_mul(d)).filter(|b| b % 8 == 0).map(|b| b / 8);
        if needed != Some(len) {
            let needed = match e.shape.iter().try_fold(bits, |a, &d| a.checked_mul(d)) {
                None => "more than 2^64".into(),
                Some(b) if b % 8 != 0 => format!("{b} bits, not a whole number of bytes"),
                Some(b) => (b / 8).to_string(),
            };
            return Err(HeaderError::WrongSize { tensor: name, len, dtype: e.dtype, shape: e.shape, needed });
        }
        out.push((name, Entry { file, dtype: e.dtype, shape: e.shape, start: data_start + begin, len }));
    }
    // The tensors must tile [0, data length) in offset order: no overlap, no gap, nothing after.
    let mut by_offset: Vec<&(String, Entry)> = out.iter().collect();
    by_offset.sort_by_key(|(_, e)| (e.start, e.start + e.len));
    let mut pos = data_start;
    let mut prev: Option<&str> = None;
    for (name, e) in by_offset {
        if e.start < pos {
            return Err(HeaderError::Overlap {
                tensor: name.clone(),
                begin: e.start - data_start,
                end: e.start + e.len - data_start,
                other: prev.unwrap_or_default().to_string(),
            });
        }
        if e.start > pos {
            return Err(HeaderError::Gap { begin: pos - data_start, end: e.start - data_start });
        }
        pos = e.start + e.len;
        prev = Some(name);
    }
    if pos < file_len {
        return Err(HeaderError::Gap { begin: pos - data_start, end: file_len - data_start });
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads one file's header (8-byte little-endian length, then a JSON object) and checks it
/// against the file ([`parse_header`]).
fn read_header(f: &File, file: usize) -> Result<Vec<(String, Entry)>> {
    let file_len = f.metadata()?.len();
    if file_len < 8 {
        return Err(HeaderError::TooShort(file_len).into());
    }
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong(n).into());
    }
    if 8 + n > file_len {
        return Err(HeaderError::PastEnd { len: n, file_len }.into());
    }
    let mut raw = vec![0u8; n as usize];
    f.read_exact_at(&mut raw, 8)?;
    Ok(parse_header(&raw, file_len, file)?)
}

/// Parses `model.safetensors.index.json`: tensor name → shard file name.
///
/// # Errors
/// Not JSON, no `weight_map` object of strings, or a tensor listed twice.
pub fn parse_index(text: &str) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: Unique<String>,
    }
    let index: Index = serde_json::from_str(text).map_err(|e| match json_error(&e) {
        HeaderError::DuplicateKey(k) => anyhow::anyhow!("weight_map lists tensor {k:?} twice"),
        e => anyhow::anyhow!("not a safetensors index (no weight_map of strings): {e}"),
    })?;
    Ok(index.weight_map.0.into_iter().collect())
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
        let mut ck =
            Self { files: Vec::new(), tensors: BTreeMap::new(), virtuals: BTreeMap::new(), parts: Default::default() };
        if single.is_file() {
            ck.add_file(single)?;
            return Ok(ck);
        }
        if !index_path.is_file() {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        }
        let text = super::read_capped(&index_path, super::MAX_INDEX_JSON)?;
        let weight_map = parse_index(&text).with_context(|| index_path.display().to_string())?;
        let mut shards: Vec<&str> = weight_map.values().map(String::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            let plain = Path::new(shard).file_name().is_some_and(|n| n == shard) && shard != "..";
            ensure!(plain, "{}: shard name {shard:?} is not a plain file name", index_path.display());
            ck.add_file(dir.join(shard))?;
        }
        for (name, shard) in &weight_map {
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

    /// Names every tensor `from…` as `to…` from now on (before [`Self::dequantize`], which
    /// pairs quantized parts by name).
    ///
    /// # Errors
    /// A renamed tensor would take the name of one the checkpoint already holds.
    pub fn rename_prefix(&mut self, from: &str, to: &str) -> Result<()> {
        let moved: Vec<String> = self.tensors.keys().filter(|n| n.starts_with(from)).cloned().collect();
        for old in moved {
            let new = format!("{to}{}", &old[from.len()..]);
            ensure!(
                !self.tensors.contains_key(&new),
                "tensor {old:?} is read as {new:?}, but the checkpoint also holds a tensor of that name"
            );
            let e = self.tensors.remove(&old).expect("listed above");
            self.tensors.insert(new, e);
        }
        Ok(())
    }

    /// Reads the quantized weights of a release quantized as `method` (`None`: declared
    /// unquantized) as virtual tensors: from then on [`Self::get`], [`Self::names`] and
    /// [`Self::read_f32`] see each as the unquantized tensor it stands for.
    ///
    /// # Errors
    /// [`super::quantized::QuantError`]: tensors that do not fit the method, or quantized
    /// tensors in a checkpoint that declares none.
    pub fn dequantize(&mut self, method: Option<&super::quantized::Method>) -> Result<()> {
        let v = super::quantized::virtuals(&self.tensors, method)?;
        for (name, q) in v {
            let main = &self.tensors[q.parts()[0]];
            let entry =
                Entry { file: main.file, dtype: main.dtype.clone(), shape: q.shape(), start: main.start, len: 0 };
            self.parts.extend(q.parts().into_iter().map(String::from));
            self.virtuals.insert(name, (entry, q));
        }
        Ok(())
    }

    /// The quantized weight named `name` (see [`Self::dequantize`]).
    pub fn quantized(&self, name: &str) -> Option<&super::quantized::Virtual> {
        self.virtuals.get(name).map(|(_, q)| q)
    }

    /// The tensor named `name` (a quantized weight by its unquantized name and shape).
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.virtuals
            .get(name)
            .map(|(e, _)| e)
            .or_else(|| self.tensors.get(name).filter(|_| !self.parts.contains(name)))
    }

    /// All tensor names, sorted (quantized weights by their unquantized names; their parts
    /// are not listed).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let mut v: Vec<&str> = self
            .tensors
            .keys()
            .filter(|n| !self.parts.contains(*n))
            .chain(self.virtuals.keys())
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v.into_iter()
    }

    /// Total number of values in all tensors (what a config's sizes are checked against).
    pub fn elements(&self) -> u64 {
        self.names().filter_map(|n| self.get(n)).fold(0u64, |a, e| {
            a.saturating_add(e.shape.iter().try_fold(1u64, |x, &d| x.checked_mul(d)).unwrap_or(u64::MAX))
        })
    }

    /// All bytes of raw tensor `name`, as stored.
    ///
    /// # Errors
    /// Unknown tensor, I/O.
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        let len = self.tensors.get(name).with_context(|| format!("checkpoint has no tensor {name:?}"))?.len;
        self.read_range(name, 0, len)
    }

    /// `len` bytes of raw tensor `name` from byte `first`, as stored.
    ///
    /// # Errors
    /// Unknown tensor, a range outside it, I/O.
    pub fn read_range(&self, name: &str, first: u64, len: u64) -> Result<Vec<u8>> {
        let e = self.tensors.get(name).with_context(|| format!("checkpoint has no tensor {name:?}"))?;
        ensure!(
            first.checked_add(len).is_some_and(|end| end <= e.len),
            "tensor {name:?}: bytes [{first}, +{len}) outside its {} bytes",
            e.len
        );
        let mut out = vec![0u8; usize::try_from(len).context("tensor too large for this machine")?];
        self.files[e.file]
            .1
            .read_exact_at(&mut out, e.start + first)
            .with_context(|| format!("{}: reading tensor {name:?}", self.files[e.file].0.display()))?;
        Ok(out)
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.len).sum()
    }

    /// The safetensors files, in the order entries index them.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
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
        // Parts of quantized weights too (their scales are read through here).
        let e = self.virtuals.get(name).map(|(e, _)| e).or_else(|| self.tensors.get(name));
        let n = e.with_context(|| format!("checkpoint has no tensor {name:?}"))?.numel();
        self.read_f32(name, 0, n)
    }

    /// `count` elements of tensor `name` from element `first`, as f32.
    ///
    /// # Errors
    /// Unknown tensor, range out of bounds, unsupported dtype, I/O, a NaN or infinite value
    /// ([`NonFinite`], naming the tensor and element).
    pub fn read_f32(&self, name: &str, first: u64, count: u64) -> Result<Vec<f32>> {
        if let Some((_, q)) = self.virtuals.get(name) {
            return q.read(self, name, first, count);
        }
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
            if let Some(k) = o.iter().position(|x| !x.is_finite()) {
                let element = first + (at - e.start - first * width as u64) / width as u64 + k as u64;
                return Err(NonFinite { tensor: name.to_string(), element, value: o[k] }.into());
            }
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
    fn renamed_prefix_reads_under_the_new_name_and_refuses_a_collision() {
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let header = r#"{"model.language_model.norm.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"model.visual.w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let mut ck = open_one(&st(header, &data)).unwrap();
        ck.rename_prefix("model.language_model.", "model.").unwrap();
        assert_eq!(ck.names().collect::<Vec<_>>(), ["model.norm.weight", "model.visual.w"]);
        assert_eq!(ck.read_all("model.norm.weight").unwrap(), [1.0]);
        let header = r#"{"a.x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b.x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let mut ck = open_one(&st(header, &data)).unwrap();
        let e = format!("{:#}", ck.rename_prefix("a.", "b.").unwrap_err());
        assert!(e.contains("\"a.x\"") && e.contains("\"b.x\""), "{e}");
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

    /// `open_one`'s error as the typed header error.
    fn header_err(bytes: &[u8]) -> HeaderError {
        let e = open_one(bytes).unwrap_err();
        e.downcast_ref::<HeaderError>().cloned().unwrap_or_else(|| panic!("not a HeaderError: {e:#}"))
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(matches!(header_err(&st(h, &[0; 12])), HeaderError::Overlap { tensor, .. } if tensor == "b"));
        // Two names for the same bytes.
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(matches!(header_err(&st(h, &[0; 8])), HeaderError::Overlap { .. }));
    }

    #[test]
    fn bytes_outside_every_tensor_are_refused() {
        // A gap before, between and after the tensors.
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert_eq!(header_err(&st(h, &[0; 8])), HeaderError::Gap { begin: 0, end: 4 });
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert_eq!(header_err(&st(h, &[0; 12])), HeaderError::Gap { begin: 4, end: 8 });
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert_eq!(header_err(&st(h, &[0; 9])), HeaderError::Gap { begin: 4, end: 9 });
        // 4-bit values must fill whole bytes, as the crate requires.
        let h = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert!(matches!(header_err(&st(h, &[0; 2])), HeaderError::WrongSize { .. }));
    }

    #[test]
    fn duplicate_json_keys_are_refused() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert_eq!(header_err(&st(h, &[0; 4])), HeaderError::DuplicateKey("a".into()));
        // Inside an entry: which dtype would it be?
        let h = r#"{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(matches!(header_err(&st(h, &[0; 4])), HeaderError::Malformed { tensor, .. } if tensor == "a"));
        let e = parse_index(r#"{"weight_map":{"a":"s1.safetensors","a":"s2.safetensors"}}"#).unwrap_err();
        assert!(e.to_string().contains("\"a\" twice"), "{e}");
        assert_eq!(parse_index(r#"{"weight_map":{"a":"s1.safetensors"}}"#).unwrap().len(), 1);
    }

    #[test]
    fn accepted_headers_are_accepted_by_the_safetensors_crate() {
        // The crate's own validation agrees with ours on a valid file, metadata included.
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let bytes = st(h, &[0; 8]);
        assert_eq!(parse_header(h.as_bytes(), bytes.len() as u64, 0).unwrap().len(), 2);
        safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    }

    #[test]
    fn non_finite_weights_are_named() {
        let mut data = Vec::new();
        for x in [1.0f32, f32::NAN, 2.0, f32::INFINITY] {
            data.extend_from_slice(&x.to_le_bytes());
        }
        let ck = open_one(&st(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &data)).unwrap();
        let e = ck.read_all("w").unwrap_err();
        let nf = e.downcast_ref::<NonFinite>().expect("typed error");
        assert_eq!((nf.tensor.as_str(), nf.element), ("w", 1));
        let e = ck.read_f32("w", 2, 2).unwrap_err();
        assert_eq!(e.downcast_ref::<NonFinite>().unwrap().element, 3);
        assert_eq!(ck.read_f32("w", 0, 1).unwrap(), vec![1.0]);
    }
}
