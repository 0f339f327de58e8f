//! The `.meo` container, read zero-copy from a `&[u8]` (see `docs/FORMAT.md`).
//!
//! [`MeoFile::parse`] validates the header, metadata, names and tensor table with checked
//! arithmetic and never reads a tensor's bytes: on a memory-mapped file no weight page is
//! touched. [`MeoFile::verify`] additionally reads everything and checks every checksum.

mod error;
mod meta;

pub use crate::align::align_up;
pub use error::FormatError;
pub use meta::{MetaArray, MetaType, MetaValue, Metadata};

use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::ops::Range;

/// First eight bytes of every file (PNG-style: catches text-mode and 7-bit mangling).
pub const MAGIC: [u8; 8] = *b"\x89MEO\r\n\x1a\n";
/// Structural version of the container; bumped only for incompatible layout changes.
pub const FORMAT_VERSION: u32 = 1;
/// Version of the quantized block layouts (`Q8_0`, `Q4_0`, `MXFP4`); bumped when their bytes change.
pub const QUANT_VERSION: u32 = 1;
/// Written little-endian; a reader that sees other bytes has the wrong byte order.
pub const BYTE_ORDER_MARK: u32 = 0x0A0B_0C0D;
/// Size of the fixed header in format version 1.
pub const HEADER_LEN: u64 = 96;
/// Size of one tensor-table record.
pub const RECORD_LEN: u64 = 64;
/// Every tensor starts at a multiple of this (cache line / widest SIMD load).
pub const TENSOR_ALIGN: u64 = 64;
/// Alignment the writer uses for the data section and expert slabs (iOS / Android 16 KiB pages).
pub const DEFAULT_ALIGNMENT: u32 = 16 * 1024;
/// Smallest and largest alignment a reader accepts.
pub const MIN_ALIGNMENT: u32 = 4096;
pub const MAX_ALIGNMENT: u32 = 1 << 20;
/// Caps that keep a crafted header from making the reader allocate or scan without bound.
pub const MAX_METADATA_LEN: u64 = 256 << 20;
pub const MAX_NAMES_LEN: u64 = 64 << 20;
pub const MAX_TENSORS: u64 = 1 << 22;
pub const MAX_NAME_LEN: u32 = 1024;
pub const MAX_RANK: usize = 4;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    /// Symmetric int8, blocks of 32 along the last dimension, f16 scale per block, stored
    /// as a quantized plane followed by a scale plane (see [`crate::quant`]).
    Q8_0 = 3,
    /// Symmetric int4 in the same planar layout: 16 bytes of nibbles (value `2j` low, `2j + 1`
    /// high, code `n` = `n − 8`) and an f16 scale per block of 32.
    Q4_0 = 4,
    /// OCP MXFP4: E2M1 nibbles in `Q4_0`'s order and one E8M0 scale byte per block of 32.
    MXFP4 = 5,
}

impl DType {
    /// The dtype with this on-disk code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::BF16,
            3 => Self::Q8_0,
            4 => Self::Q4_0,
            5 => Self::MXFP4,
            _ => return None,
        })
    }

    /// Lower-case name used in docs, CLI flags and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::MXFP4 => "mxfp4",
        }
    }

    /// Bytes a tensor of this dtype and shape occupies, or `None` on overflow or empty shape.
    pub fn byte_len(self, shape: &[u64]) -> Option<u64> {
        let (&cols, outer) = shape.split_last()?;
        let rows = outer.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        match self {
            Self::F32 => rows.checked_mul(cols)?.checked_mul(4),
            Self::F16 | Self::BF16 => rows.checked_mul(cols)?.checked_mul(2),
            Self::Q8_0 | Self::Q4_0 | Self::MXFP4 => crate::quant::Planar::of(self)?.len(rows, cols),
        }
    }
}

/// One tensor-table record, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    pub dtype: DType,
    ndim: u8,
    dims: [u64; MAX_RANK],
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    pub len: u64,
    /// CRC-32 (IEEE) of the tensor's `len` bytes.
    pub crc32: u32,
}

impl TensorInfo<'_> {
    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[u64] {
        &self.dims[..self.ndim as usize]
    }
}

/// An expert slab: the contiguous, aligned run of tensors named `<prefix>.experts.<id>.<part>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slab<'a> {
    /// `<prefix>.experts.<id>`, e.g. `layers.3.experts.5`.
    pub key: &'a str,
    /// Offset of the first byte relative to the data section (a multiple of the alignment).
    pub offset: u64,
    /// Bytes from the first tensor's start to the last tensor's end.
    pub len: u64,
    /// Indices into [`MeoFile::tensors`].
    pub tensors: Range<usize>,
}

/// Parsed header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub quant_version: u32,
    pub metadata: (u64, u64),
    pub names: (u64, u64),
    pub table_offset: u64,
    pub tensor_count: u64,
    pub data_offset: u64,
    pub data_len: u64,
    pub alignment: u32,
    pub structure_crc32: u32,
}

/// A validated `.meo` file borrowed from its bytes.
#[derive(Debug)]
pub struct MeoFile<'a> {
    bytes: &'a [u8],
    pub header: Header,
    pub metadata: Metadata<'a>,
    tensors: Vec<TensorInfo<'a>>,
    by_name: BTreeMap<&'a str, usize>,
    slabs: Vec<Slab<'a>>,
}

pub(crate) fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn section(name: &'static str, offset: u64, len: u64, file_len: u64) -> Result<Range<usize>, FormatError> {
    let oob = FormatError::SectionOutOfBounds { section: name, offset, len, file_len };
    let end = offset.checked_add(len).ok_or(oob.clone())?;
    if end > file_len {
        return Err(oob);
    }
    if !offset.is_multiple_of(8) {
        return Err(FormatError::SectionMisaligned { section: name, offset, align: 8 });
    }
    // end <= file_len, which came from a usize, so both fit.
    Ok(offset as usize..end as usize)
}

/// Parses the fixed header.
///
/// # Errors
/// Any [`FormatError`] about the header: size, magic, versions, byte order, alignment.
pub fn parse_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let file_len = bytes.len() as u64;
    if file_len < HEADER_LEN {
        return Err(FormatError::TooSmall { len: file_len, min: HEADER_LEN });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    // The byte-order mark first: a big-endian file would otherwise be reported as a
    // (nonsensical) unsupported version.
    let bom = rd_u32(bytes, 16);
    if bom != BYTE_ORDER_MARK {
        return Err(FormatError::BadByteOrder { found: bom });
    }
    let format_version = rd_u32(bytes, 8);
    if format_version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { found: format_version, supported: FORMAT_VERSION });
    }
    let quant_version = rd_u32(bytes, 12);
    if quant_version != QUANT_VERSION {
        return Err(FormatError::UnsupportedQuantVersion { found: quant_version, supported: QUANT_VERSION });
    }
    let header_len = rd_u32(bytes, 20);
    if u64::from(header_len) != HEADER_LEN {
        return Err(FormatError::BadHeaderLen { found: header_len, expected: HEADER_LEN as u32 });
    }
    let alignment = rd_u32(bytes, 88);
    if !alignment.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&alignment) {
        return Err(FormatError::BadAlignment { found: alignment, min: MIN_ALIGNMENT, max: MAX_ALIGNMENT });
    }
    Ok(Header {
        format_version,
        quant_version,
        metadata: (rd_u64(bytes, 24), rd_u64(bytes, 32)),
        names: (rd_u64(bytes, 40), rd_u64(bytes, 48)),
        table_offset: rd_u64(bytes, 56),
        tensor_count: rd_u64(bytes, 64),
        data_offset: rd_u64(bytes, 72),
        data_len: rd_u64(bytes, 80),
        alignment,
        structure_crc32: rd_u32(bytes, 92),
    })
}

/// The validated byte ranges of a file's structure (see [`check_sections`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sections {
    pub header: Header,
    pub metadata: Range<usize>,
    pub names: Range<usize>,
    pub table: Range<usize>,
}

impl Sections {
    /// Bytes `0..end` hold everything [`MeoFile::parse`] reads: header, metadata, names and
    /// tensor table (no tensor data).
    pub fn structure_end(&self) -> usize {
        self.table.end
    }
}

/// Validates the fixed header and where its sections lie (caps, bounds, order, alignment,
/// the data section ending the file), reading only the header's bytes. [`MeoFile::parse`]
/// starts with it; a reader that advises the OS about a file's pages calls it first, so no
/// advice ever covers a range a crafted header made up.
///
/// # Errors
/// The first [`FormatError`] about the header or a section.
pub fn check_sections(bytes: &[u8]) -> Result<Sections, FormatError> {
    let h = parse_header(bytes)?;
    let file_len = bytes.len() as u64;
    let too_large = |section, len, max| FormatError::SectionTooLarge { section, len, max };
    if h.metadata.1 > MAX_METADATA_LEN {
        return Err(too_large("metadata", h.metadata.1, MAX_METADATA_LEN));
    }
    if h.names.1 > MAX_NAMES_LEN {
        return Err(too_large("names", h.names.1, MAX_NAMES_LEN));
    }
    if h.tensor_count > MAX_TENSORS {
        return Err(FormatError::TooManyTensors { count: h.tensor_count, max: MAX_TENSORS });
    }
    let table_len = h.tensor_count * RECORD_LEN; // both capped: no overflow
    let meta_r = section("metadata", h.metadata.0, h.metadata.1, file_len)?;
    let names_r = section("names", h.names.0, h.names.1, file_len)?;
    let table_r = section("tensor table", h.table_offset, table_len, file_len)?;
    let data_r = section("data", h.data_offset, h.data_len, file_len)?;
    // Sections follow one another in this order, without overlap.
    let order = [
        ("metadata", HEADER_LEN, h.metadata.0),
        ("names", meta_r.end as u64, h.names.0),
        ("tensor table", names_r.end as u64, h.table_offset),
        ("data", table_r.end as u64, h.data_offset),
    ];
    for (section, prev_end, offset) in order {
        if offset < prev_end {
            return Err(FormatError::SectionOrder { section, offset });
        }
    }
    if h.data_offset % u64::from(h.alignment) != 0 {
        return Err(FormatError::SectionMisaligned {
            section: "data",
            offset: h.data_offset,
            align: u64::from(h.alignment),
        });
    }
    if data_r.end as u64 != file_len {
        return Err(FormatError::DataLenMismatch { data_end: data_r.end as u64, file_len });
    }

    Ok(Sections { header: h, metadata: meta_r, names: names_r, table: table_r })
}

/// If `name` is `<prefix>.experts.<id>.<part>`, the slab key `<prefix>.experts.<id>`.
pub fn slab_key(name: &str) -> Option<&str> {
    let (key, part) = name.rsplit_once('.')?;
    let (rest, id) = key.rsplit_once('.')?;
    let is_experts = rest == "experts" || rest.ends_with(".experts");
    (is_experts && !id.is_empty() && !part.is_empty()).then_some(key)
}

impl<'a> MeoFile<'a> {
    /// Validates the structure of `bytes` without reading any tensor data.
    ///
    /// # Errors
    /// A [`FormatError`] naming the first problem found.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let Sections { header: h, metadata: meta_r, names: names_r, table: table_r } = check_sections(bytes)?;
        let metadata = Metadata::parse(&bytes[meta_r])?;
        let names = &bytes[names_r];
        let table = &bytes[table_r];
        let mut tensors = Vec::with_capacity(h.tensor_count as usize);
        for i in 0..h.tensor_count as usize {
            tensors.push(parse_record(
                &table[i * RECORD_LEN as usize..][..RECORD_LEN as usize],
                i as u64,
                names,
                h.data_len,
            )?);
        }
        let by_name = check_layout(&tensors, h.alignment)?;
        let slabs = find_slabs(&tensors, u64::from(h.alignment))?;
        Ok(Self { bytes, header: h, metadata, tensors, by_name, slabs })
    }

    /// All tensors, in table (= offset) order.
    pub fn tensors(&self) -> &[TensorInfo<'a>] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// All expert slabs, in offset order.
    pub fn slabs(&self) -> &[Slab<'a>] {
        &self.slabs
    }

    /// The whole file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The bytes of a tensor of this file (no copy; touching them pages them in).
    pub fn data(&self, t: &TensorInfo<'_>) -> &'a [u8] {
        // Bounds were validated in parse: data_offset + offset + len <= file_len.
        let start = (self.header.data_offset + t.offset) as usize;
        &self.bytes[start..start + t.len as usize]
    }

    /// Absolute file byte range of a slab (for madvise / mincore).
    pub fn slab_range(&self, s: &Slab<'_>) -> Range<usize> {
        let start = (self.header.data_offset + s.offset) as usize;
        start..start + s.len as usize
    }

    /// Checks the structure checksum and the checksums of the tensors outside expert slabs
    /// (what every token reads anyway: embeddings, attention, norms, routers, dense blocks).
    /// Expert slabs are not read, so a lazily mapped model stays lazy.
    ///
    /// # Errors
    /// The first mismatch found.
    pub fn verify_dense(&self) -> Result<(), FormatError> {
        let found = structure_crc32(self.bytes, &self.header);
        if found != self.header.structure_crc32 {
            return Err(FormatError::StructureChecksum { expected: self.header.structure_crc32, found });
        }
        for t in self.tensors.iter().filter(|t| slab_key(t.name).is_none()) {
            let found = crc32fast::hash(self.data(t));
            if found != t.crc32 {
                return Err(FormatError::ChecksumMismatch { name: t.name.to_string(), expected: t.crc32, found });
            }
        }
        Ok(())
    }

    /// Reads every byte: checks the structure checksum, every tensor checksum, and that
    /// all padding is zero.
    ///
    /// # Errors
    /// The first mismatch found.
    pub fn verify(&self) -> Result<(), FormatError> {
        self.verify_with(|_, _| {})
    }

    /// [`verify`](Self::verify), calling `progress(done_bytes, total_bytes)` after each tensor.
    ///
    /// # Errors
    /// The first mismatch found.
    pub fn verify_with(&self, mut progress: impl FnMut(u64, u64)) -> Result<(), FormatError> {
        let found = structure_crc32(self.bytes, &self.header);
        if found != self.header.structure_crc32 {
            return Err(FormatError::StructureChecksum { expected: self.header.structure_crc32, found });
        }
        let zero = |r: Range<usize>| -> Result<(), FormatError> {
            match self.bytes[r.clone()].iter().position(|&b| b != 0) {
                Some(p) => Err(FormatError::PaddingNotZero { offset: (r.start + p) as u64 }),
                None => Ok(()),
            }
        };
        let h = &self.header;
        zero(HEADER_LEN as usize..h.metadata.0 as usize)?;
        zero(h.metadata.0 as usize + h.metadata.1 as usize..h.names.0 as usize)?;
        zero(h.names.0 as usize + h.names.1 as usize..h.table_offset as usize)?;
        zero((h.table_offset + h.tensor_count * RECORD_LEN) as usize..h.data_offset as usize)?;
        let mut pos = h.data_offset as usize;
        for t in &self.tensors {
            let start = (h.data_offset + t.offset) as usize;
            zero(pos..start)?;
            let found = crc32fast::hash(self.data(t));
            if found != t.crc32 {
                return Err(FormatError::ChecksumMismatch { name: t.name.to_string(), expected: t.crc32, found });
            }
            pos = start + t.len as usize;
            progress(t.offset + t.len, h.data_len);
        }
        zero(pos..self.bytes.len())
    }
}

/// CRC-32 of the metadata, names and tensor-table sections, in that order.
pub fn structure_crc32(bytes: &[u8], h: &Header) -> u32 {
    let mut c = crc32fast::Hasher::new();
    for (off, len) in [h.metadata, h.names, (h.table_offset, h.tensor_count * RECORD_LEN)] {
        c.update(&bytes[off as usize..(off + len) as usize]);
    }
    c.finalize()
}

fn parse_record<'a>(r: &[u8], index: u64, names: &'a [u8], data_len: u64) -> Result<TensorInfo<'a>, FormatError> {
    let name_off = rd_u32(r, 0);
    let name_len = rd_u32(r, 4);
    let end = u64::from(name_off) + u64::from(name_len);
    if end > names.len() as u64 {
        return Err(FormatError::NameOutOfBounds { index, offset: name_off, len: name_len });
    }
    let raw = &names[name_off as usize..end as usize];
    let name = match core::str::from_utf8(raw) {
        Ok(s) if !s.is_empty() && name_len <= MAX_NAME_LEN => s,
        _ => return Err(FormatError::BadName { index, max: MAX_NAME_LEN }),
    };
    let err_name = || name.to_string();
    let code = r[8];
    let dtype = DType::from_code(code).ok_or_else(|| FormatError::BadDType { name: err_name(), code })?;
    let ndim = r[9];
    if ndim == 0 || ndim as usize > MAX_RANK {
        return Err(FormatError::BadRank { name: err_name(), ndim });
    }
    let flags = u16::from_le_bytes([r[10], r[11]]);
    if flags != 0 {
        return Err(FormatError::BadFlags { name: err_name(), flags });
    }
    let crc32 = rd_u32(r, 12);
    let mut dims = [0u64; MAX_RANK];
    for (k, d) in dims.iter_mut().enumerate() {
        *d = rd_u64(r, 16 + 8 * k);
        if (k < ndim as usize) == (*d == 0) {
            return Err(FormatError::BadDims { name: err_name() });
        }
    }
    let offset = rd_u64(r, 48);
    let len = rd_u64(r, 56);
    let expected =
        dtype.byte_len(&dims[..ndim as usize]).ok_or_else(|| FormatError::ShapeOverflow { name: err_name() })?;
    if expected != len {
        return Err(FormatError::SizeMismatch { name: err_name(), expected, found: len });
    }
    if offset.checked_add(len).is_none_or(|e| e > data_len) {
        return Err(FormatError::TensorOutOfBounds { name: err_name(), offset, len, data_len });
    }
    if !offset.is_multiple_of(TENSOR_ALIGN) {
        return Err(FormatError::TensorMisaligned { name: err_name(), offset, align: TENSOR_ALIGN });
    }
    Ok(TensorInfo { name, dtype, ndim, dims, offset, len, crc32 })
}

/// Offset order, no overlap, bounded holes, unique names.
fn check_layout<'a>(tensors: &[TensorInfo<'a>], alignment: u32) -> Result<BTreeMap<&'a str, usize>, FormatError> {
    let mut by_name = BTreeMap::new();
    let mut prev_end = 0u64;
    let mut prev_name = "";
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 && t.offset < prev_end {
            return Err(FormatError::TensorOverlap { name: t.name.to_string(), previous: prev_name.to_string() });
        }
        let gap = t.offset - prev_end;
        if gap >= u64::from(alignment) {
            return Err(FormatError::OversizedGap { name: t.name.to_string(), gap, max: u64::from(alignment) });
        }
        if by_name.insert(t.name, i).is_some() {
            return Err(FormatError::DuplicateName { name: t.name.to_string() });
        }
        prev_end = t.offset + t.len;
        prev_name = t.name;
    }
    Ok(by_name)
}

/// Groups expert tensors into slabs and checks each is consecutive, aligned and alone on its pages.
fn find_slabs<'a>(tensors: &[TensorInfo<'a>], align: u64) -> Result<Vec<Slab<'a>>, FormatError> {
    let mut slabs: Vec<Slab<'a>> = Vec::new();
    let mut seen = BTreeMap::new();
    for (i, t) in tensors.iter().enumerate() {
        let Some(key) = slab_key(t.name) else { continue };
        match slabs.last_mut() {
            Some(s) if s.key == key && s.tensors.end == i => {
                s.tensors.end = i + 1;
                s.len = t.offset + t.len - s.offset;
            }
            _ => {
                if seen.insert(key, ()).is_some() {
                    return Err(FormatError::SlabNotContiguous { slab: key.to_string() });
                }
                if t.offset % align != 0 {
                    return Err(FormatError::SlabMisaligned { slab: key.to_string(), offset: t.offset, align });
                }
                slabs.push(Slab { key, offset: t.offset, len: t.len, tensors: i..i + 1 });
            }
        }
    }
    for s in &slabs {
        if let Some(next) = tensors.get(s.tensors.end) {
            // The next tensor must start on a later page, so releasing this slab's pages
            // never releases another tensor's bytes. (A following slab is aligned anyway.)
            let end = s.offset + s.len;
            if align_up(end, align).is_none_or(|e| next.offset < e) {
                return Err(FormatError::SlabShared { slab: s.key.to_string(), other: next.name.to_string() });
            }
        }
    }
    Ok(slabs)
}
