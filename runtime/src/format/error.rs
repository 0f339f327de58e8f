//! The one error type of the `.meo` reader: one variant per way a file can be wrong.

use alloc::string::String;

/// Why a byte buffer is not a valid `.meo` file (or fails verification).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("file is {len} bytes, smaller than the {min}-byte header")]
    TooSmall { len: u64, min: u64 },
    #[error("bad magic: not a .meo file")]
    BadMagic,
    #[error("format version {found} is not supported (this reader reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("quantization version {found} is not supported (this reader reads version {supported})")]
    UnsupportedQuantVersion { found: u32, supported: u32 },
    #[error("byte-order mark {found:#010x}: file was written big-endian or is corrupt")]
    BadByteOrder { found: u32 },
    #[error("header length {found} does not match version 1 ({expected})")]
    BadHeaderLen { found: u32, expected: u32 },
    #[error("alignment {found} is not a power of two in [{min}, {max}]")]
    BadAlignment { found: u32, min: u32, max: u32 },
    #[error("{section} section [{offset}, +{len}) lies outside the {file_len}-byte file")]
    SectionOutOfBounds { section: &'static str, offset: u64, len: u64, file_len: u64 },
    #[error("{section} section at {offset} overlaps the previous section or is out of order")]
    SectionOrder { section: &'static str, offset: u64 },
    #[error("{section} section offset {offset} is not aligned to {align}")]
    SectionMisaligned { section: &'static str, offset: u64, align: u64 },
    #[error("{section} section is {len} bytes, more than the limit {max}")]
    SectionTooLarge { section: &'static str, len: u64, max: u64 },
    #[error("data section ends at {data_end} but the file is {file_len} bytes")]
    DataLenMismatch { data_end: u64, file_len: u64 },
    #[error("metadata truncated while reading {what}")]
    MetadataTruncated { what: &'static str },
    #[error("metadata has {count} entries, more than its {len} bytes can hold")]
    MetadataCount { count: u64, len: u64 },
    #[error("metadata section has {extra} unused trailing bytes")]
    MetadataTrailing { extra: u64 },
    #[error("metadata key of {len} bytes (must be 1..={max})")]
    BadKeyLen { len: u32, max: u32 },
    #[error("metadata key is not valid UTF-8")]
    KeyNotUtf8,
    #[error("metadata key {key:?} is out of order or duplicated (keys must be strictly ascending)")]
    KeyOrder { key: String },
    #[error("metadata key {key:?} has unknown value type {ty}")]
    BadValueType { key: String, ty: u8 },
    #[error("metadata key {key:?} holds a string that is not valid UTF-8")]
    ValueNotUtf8 { key: String },
    #[error("metadata key {key:?} holds a bool byte {byte} (must be 0 or 1)")]
    BadBool { key: String, byte: u8 },
    #[error("{count} tensors is more than the limit {max}")]
    TooManyTensors { count: u64, max: u64 },
    #[error("tensor #{index}: name [{offset}, +{len}) is outside the names section")]
    NameOutOfBounds { index: u64, offset: u32, len: u32 },
    #[error("tensor #{index}: name is empty, longer than {max} bytes, or not valid UTF-8")]
    BadName { index: u64, max: u32 },
    #[error("tensor {name:?}: unknown dtype code {code}")]
    BadDType { name: String, code: u8 },
    #[error("tensor {name:?}: rank {ndim} (must be 1..=4)")]
    BadRank { name: String, ndim: u8 },
    #[error("tensor {name:?}: a dimension is zero, or an unused dimension slot is not zero")]
    BadDims { name: String },
    #[error("tensor {name:?}: reserved flags {flags:#x} are set")]
    BadFlags { name: String, flags: u16 },
    #[error("tensor {name:?}: shape × dtype size overflows 64 bits")]
    ShapeOverflow { name: String },
    #[error("tensor {name:?}: {found} bytes, but shape and dtype need {expected}")]
    SizeMismatch { name: String, expected: u64, found: u64 },
    #[error("tensor {name:?}: [{offset}, +{len}) lies outside the {data_len}-byte data section")]
    TensorOutOfBounds { name: String, offset: u64, len: u64, data_len: u64 },
    #[error("tensor {name:?}: offset {offset} is not aligned to {align}")]
    TensorMisaligned { name: String, offset: u64, align: u64 },
    #[error("tensor {name:?} overlaps or precedes tensor {previous:?} (table must be in offset order)")]
    TensorOverlap { name: String, previous: String },
    #[error("tensor {name:?}: {gap}-byte hole before it (holes are padding only, < {max})")]
    OversizedGap { name: String, gap: u64, max: u64 },
    #[error("tensor name {name:?} appears twice")]
    DuplicateName { name: String },
    #[error("expert slab {slab:?}: its tensors are not consecutive in the table")]
    SlabNotContiguous { slab: String },
    #[error("expert slab {slab:?}: starts at data offset {offset}, not aligned to {align}")]
    SlabMisaligned { slab: String, offset: u64, align: u64 },
    #[error("expert slab {slab:?}: tensor {other:?} shares its last page")]
    SlabShared { slab: String, other: String },
    #[error("tensor {name:?}: checksum {found:#010x}, table says {expected:#010x}")]
    ChecksumMismatch { name: String, expected: u32, found: u32 },
    #[error("structure checksum {found:#010x}, header says {expected:#010x}")]
    StructureChecksum { expected: u32, found: u32 },
    #[error("padding byte at file offset {offset} is not zero")]
    PaddingNotZero { offset: u64 },
}
