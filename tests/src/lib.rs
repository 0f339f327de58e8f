//! Helpers shared by the integration tests: build `.meo` files with the real writer
//! ([`meo_converter::writer::MeoWriter`]) and patch their bytes field by field.
//!
//! Field offsets come from `docs/FORMAT.md`; they are written out here (not taken from the
//! reader) so the tests check the reader against the spec, not against itself.

pub mod conformance;

use meo::format::{self, DType, Header, MetaArray, MetaValue, Metadata};
use meo_converter::writer::{MeoWriter, TensorSpec};

/// Byte offsets of the header fields (format version 1).
pub mod hdr {
    pub const MAGIC: usize = 0;
    pub const FORMAT_VERSION: usize = 8;
    pub const QUANT_VERSION: usize = 12;
    pub const BYTE_ORDER: usize = 16;
    pub const HEADER_LEN: usize = 20;
    pub const METADATA_OFFSET: usize = 24;
    pub const METADATA_LEN: usize = 32;
    pub const NAMES_OFFSET: usize = 40;
    pub const NAMES_LEN: usize = 48;
    pub const TABLE_OFFSET: usize = 56;
    pub const TENSOR_COUNT: usize = 64;
    pub const DATA_OFFSET: usize = 72;
    pub const DATA_LEN: usize = 80;
    pub const ALIGNMENT: usize = 88;
    pub const STRUCTURE_CRC: usize = 92;
    pub const LEN: usize = 96;
}

/// Byte offsets of the fields of one tensor-table record.
pub mod rec {
    pub const NAME_OFFSET: usize = 0;
    pub const NAME_LEN: usize = 4;
    pub const DTYPE: usize = 8;
    pub const NDIM: usize = 9;
    pub const FLAGS: usize = 10;
    pub const CRC32: usize = 12;
    /// Four u64 dimensions follow.
    pub const DIMS: usize = 16;
    pub const OFFSET: usize = 48;
    pub const LEN: usize = 56;
    /// Size of one record.
    pub const SIZE: usize = 64;
}

/// Shorthand for a [`TensorSpec`].
pub fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
    TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
}

/// A small deterministic generator (xorshift64*), so helpers need no `rand`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Plausible bytes for a tensor of this spec: encoded random values (Q8_0 through the real
/// quantizer, so row padding is zero as the spec requires).
pub fn tensor_bytes(s: &TensorSpec, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let cols = *s.shape.last().expect("rank >= 1") as usize;
    let rows = s.shape[..s.shape.len() - 1].iter().product::<u64>() as usize;
    let vals: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    meo::merge::encode(&vals, rows, cols, s.dtype)
}

/// Writes a file with the real writer from tensors and their bytes.
///
/// # Panics
/// If the writer refuses (the caller passed an invalid set).
pub fn write_file(meta: &Metadata<'_>, tensors: &[(TensorSpec, Vec<u8>)], alignment: u32) -> Vec<u8> {
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = MeoWriter::new(std::io::Cursor::new(Vec::new()), meta, specs, alignment).expect("valid specs");
    for (_, data) in tensors {
        w.write_tensor(data).expect("planned size");
    }
    w.finish().expect("complete").into_inner()
}

/// Writes a file whose tensors hold [`tensor_bytes`].
pub fn write_specs(meta: &Metadata<'_>, specs: &[TensorSpec], alignment: u32) -> Vec<u8> {
    let tensors: Vec<_> = specs.iter().enumerate().map(|(i, s)| (s.clone(), tensor_bytes(s, i as u64 + 1))).collect();
    write_file(meta, &tensors, alignment)
}

/// Metadata with one entry of every value type and every array element type.
pub fn every_type_metadata() -> Metadata<'static> {
    Metadata::from_entries(vec![
        ("general.architecture", MetaValue::Str("mixtral")),
        ("t.bool", MetaValue::Bool(true)),
        ("t.bytes", MetaValue::Bytes(&[0, 1, 2, 0xff])),
        ("t.f64", MetaValue::F64(-0.5)),
        ("t.i64", MetaValue::I64(-7)),
        ("t.u64", MetaValue::U64(42)),
        ("t.z.bools", MetaValue::Array(MetaArray::Bool(vec![true, false, true]))),
        ("t.z.f64s", MetaValue::Array(MetaArray::F64(vec![1.5, f64::INFINITY]))),
        ("t.z.i64s", MetaValue::Array(MetaArray::I64(vec![-1, i64::MIN]))),
        ("t.z.strs", MetaValue::Array(MetaArray::Str(vec!["dense", "", "moe"]))),
        ("t.z.u64s", MetaValue::Array(MetaArray::U64(vec![0, u64::MAX]))),
    ])
}

/// A tiny MoE-shaped tensor set: dense tensors, two expert slabs (Q8_0 gate/up/down), and a
/// dense tensor after the last slab.
pub fn moe_specs() -> Vec<TensorSpec> {
    vec![
        spec("embed.weight", DType::F16, &[16, 8]),
        spec("layers.0.attn_norm.weight", DType::F32, &[8]),
        spec("layers.0.router.weight", DType::F32, &[2, 8]),
        spec("layers.0.experts.0.gate", DType::Q8_0, &[4, 8]),
        spec("layers.0.experts.0.up", DType::Q8_0, &[4, 8]),
        spec("layers.0.experts.0.down", DType::Q8_0, &[8, 4]),
        spec("layers.0.experts.1.gate", DType::Q8_0, &[4, 8]),
        spec("layers.0.experts.1.up", DType::Q8_0, &[4, 8]),
        spec("layers.0.experts.1.down", DType::Q8_0, &[8, 4]),
        spec("output_norm.weight", DType::F32, &[8]),
        spec("output.weight", DType::BF16, &[16, 8]),
    ]
}

/// Small valid files of different structure, for mutation tests and fuzz seeds.
pub fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    let empty = Metadata::default();
    vec![
        ("empty", write_specs(&empty, &[], format::MIN_ALIGNMENT)),
        (
            "dense",
            write_specs(
                &every_type_metadata(),
                &[spec("a", DType::F32, &[3]), spec("b", DType::F16, &[2, 3, 1, 5]), spec("c", DType::Q8_0, &[3, 40])],
                format::MIN_ALIGNMENT,
            ),
        ),
        ("moe", write_specs(&every_type_metadata(), &moe_specs(), format::MIN_ALIGNMENT)),
    ]
}

/// A `.meo` file's bytes with typed accessors and patchers for header and record fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeoBytes(pub Vec<u8>);

impl MeoBytes {
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap())
    }
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap())
    }
    pub fn set_u8(&mut self, at: usize, v: u8) -> &mut Self {
        self.0[at] = v;
        self
    }
    pub fn set_u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
        self
    }
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    pub fn set_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
        self
    }

    /// A header field (u64 fields; use [`u32_at`](Self::u32_at) for the u32 ones).
    pub fn hdr(&self, field: usize) -> u64 {
        self.u64_at(field)
    }

    /// File offset of record `i` of the tensor table.
    pub fn record(&self, i: usize) -> usize {
        self.hdr(hdr::TABLE_OFFSET) as usize + i * rec::SIZE
    }

    /// A u64 field of record `i`.
    pub fn rec_u64(&self, i: usize, field: usize) -> u64 {
        self.u64_at(self.record(i) + field)
    }

    pub fn set_rec_u64(&mut self, i: usize, field: usize, v: u64) -> &mut Self {
        let at = self.record(i) + field;
        self.set_u64(at, v)
    }

    pub fn set_rec_u32(&mut self, i: usize, field: usize, v: u32) -> &mut Self {
        let at = self.record(i) + field;
        self.set_u32(at, v)
    }

    pub fn set_rec_u8(&mut self, i: usize, field: usize, v: u8) -> &mut Self {
        let at = self.record(i) + field;
        self.set_u8(at, v)
    }

    /// Absolute file offset of the first byte of tensor `i`.
    pub fn tensor_start(&self, i: usize) -> usize {
        (self.hdr(hdr::DATA_OFFSET) + self.rec_u64(i, rec::OFFSET)) as usize
    }

    /// Index of the record whose name is `name`.
    pub fn index_of(&self, name: &str) -> usize {
        let n = self.hdr(hdr::TENSOR_COUNT) as usize;
        (0..n).find(|&i| self.name(i) == name.as_bytes()).unwrap_or_else(|| panic!("no tensor {name:?}"))
    }

    /// Raw name bytes of record `i`.
    pub fn name(&self, i: usize) -> &[u8] {
        let r = self.record(i);
        let (off, len) = (self.u32_at(r + rec::NAME_OFFSET) as usize, self.u32_at(r + rec::NAME_LEN) as usize);
        let start = self.hdr(hdr::NAMES_OFFSET) as usize + off;
        &self.0[start..start + len]
    }

    /// File offset of the first occurrence of `needle` (a key, a string, a name).
    pub fn find(&self, needle: &[u8]) -> usize {
        self.0.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("{needle:?} not in file"))
    }

    /// Rewrites the structure checksum so `verify` gets past it to the check under test.
    pub fn fix_structure_crc(&mut self) -> &mut Self {
        let h = format::parse_header(&self.0).expect("header parses");
        let crc = format::structure_crc32(&self.0, &h);
        self.set_u32(hdr::STRUCTURE_CRC, crc)
    }

    /// The parsed header.
    pub fn header(&self) -> Header {
        format::parse_header(&self.0).expect("header parses")
    }
}
