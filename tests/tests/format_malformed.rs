//! One test per class of malformed file. Each writes a valid file with the real writer, patches
//! the bytes so that exactly the intended rule is broken, and asserts the specific
//! [`FormatError`] the reader returns (from `parse`, or from `verify` for what only a full read
//! can see).

use meo::MeoFile;
use meo::format::{self, DType, FormatError, MAX_METADATA_LEN, MAX_NAMES_LEN, MAX_TENSORS, Metadata};
use meo_tests::{MeoBytes, every_type_metadata, hdr, moe_specs, rec, spec, write_specs};

const ALIGN: u64 = 16384;

/// The MoE-shaped sample at 16 KiB alignment. Tensors: 0 `embed.weight`, 1
/// `layers.0.attn_norm.weight`, 2 `layers.0.router.weight`, 3–5 expert 0 (gate, up, down),
/// 6–8 expert 1, 9 `output_norm.weight`, 10 `output.weight`.
fn moe() -> MeoBytes {
    let b = MeoBytes(write_specs(&every_type_metadata(), &moe_specs(), ALIGN as u32));
    MeoFile::parse(&b.0).unwrap().verify().unwrap();
    b
}

fn parse_err(b: &MeoBytes) -> FormatError {
    match MeoFile::parse(&b.0) {
        Ok(_) => panic!("malformed file parsed"),
        Err(e) => e,
    }
}

fn verify_err(b: &MeoBytes) -> FormatError {
    let f = MeoFile::parse(&b.0).expect("the damage is only visible to verify");
    f.verify().expect_err("verify accepted a damaged file")
}

fn name(s: &str) -> String {
    s.to_string()
}

// ---------------------------------------------------------------- truncation

#[test]
fn truncated_at_every_section() {
    let b = moe();
    let h = b.header();
    let file_len = b.0.len() as u64;
    let table_end = h.table_offset + h.tensor_count * 64;
    // (section, end) in file order; a cut before `end` must name the first such section.
    let ends = [
        ("metadata", h.metadata.0 + h.metadata.1),
        ("names", h.names.0 + h.names.1),
        ("tensor table", table_end),
        ("data", file_len),
    ];
    let mut cuts: Vec<u64> = (0..h.data_offset + 256).collect();
    cuts.extend((h.data_offset + 256..file_len).step_by(97));
    cuts.extend(file_len - 8..file_len);
    let mut hit = std::collections::BTreeMap::new();
    for cut in cuts {
        let e = MeoFile::parse(&b.0[..cut as usize]).expect_err("truncated file parsed");
        if cut < hdr::LEN as u64 {
            assert_eq!(e, FormatError::TooSmall { len: cut, min: 96 });
            *hit.entry("header").or_insert(0) += 1;
            continue;
        }
        let (section, _) = *ends.iter().find(|(_, end)| cut < *end).unwrap();
        match e {
            FormatError::SectionOutOfBounds { section: s, file_len, .. } if s == section && file_len == cut => {}
            other => panic!("cut at {cut}: expected {section} out of bounds, got {other:?}"),
        }
        *hit.entry(section).or_insert(0) += 1;
    }
    assert_eq!(hit.len(), 5, "every section was cut: {hit:?}");
}

#[test]
fn metadata_section_cut_short_inside() {
    // The header agrees with the shorter section: the metadata parser itself runs out of bytes.
    let b = moe();
    let len = b.hdr(hdr::METADATA_LEN);
    for k in 0..len {
        let mut m = b.clone();
        m.set_u64(hdr::METADATA_LEN, k);
        match parse_err(&m) {
            FormatError::MetadataTruncated { .. } | FormatError::MetadataCount { .. } => {}
            other => panic!("metadata cut to {k}: {other:?}"),
        }
    }
}

#[test]
fn names_section_cut_short_inside() {
    let b = moe();
    let len = b.hdr(hdr::NAMES_LEN);
    for k in 0..len {
        let mut m = b.clone();
        m.set_u64(hdr::NAMES_LEN, k);
        // The first record whose name no longer fits.
        let index = (0..11).find(|&i| {
            let r = b.record(i);
            u64::from(b.u32_at(r + rec::NAME_OFFSET)) + u64::from(b.u32_at(r + rec::NAME_LEN)) > k
        });
        let index = index.unwrap() as u64;
        assert!(
            matches!(parse_err(&m), FormatError::NameOutOfBounds { index: i, .. } if i == index),
            "names cut to {k}"
        );
    }
}

#[test]
fn empty_file() {
    assert_eq!(MeoFile::parse(&[]).unwrap_err(), FormatError::TooSmall { len: 0, min: 96 });
}

// ---------------------------------------------------------------- header

#[test]
fn bad_magic() {
    let b = moe();
    for i in 0..8 {
        let mut m = b.clone();
        m.0[hdr::MAGIC + i] ^= 0x20;
        assert_eq!(parse_err(&m), FormatError::BadMagic, "byte {i}");
    }
    let mut m = b.clone();
    m.0[..8].copy_from_slice(b"GGUF\x03\0\0\0");
    assert_eq!(parse_err(&m), FormatError::BadMagic);
    // Text-mode CRLF → LF mangling is what the PNG-style magic catches.
    let mangled: Vec<u8> = b.0.iter().copied().filter(|&c| c != b'\r').collect();
    assert_eq!(MeoFile::parse(&mangled).unwrap_err(), FormatError::BadMagic);
}

#[test]
fn future_format_version() {
    let mut m = moe();
    m.set_u32(hdr::FORMAT_VERSION, 2);
    assert_eq!(parse_err(&m), FormatError::UnsupportedVersion { found: 2, supported: 1 });
    m.set_u32(hdr::FORMAT_VERSION, 0);
    assert_eq!(parse_err(&m), FormatError::UnsupportedVersion { found: 0, supported: 1 });
}

#[test]
fn future_quant_version() {
    let mut m = moe();
    m.set_u32(hdr::QUANT_VERSION, 2);
    assert_eq!(parse_err(&m), FormatError::UnsupportedQuantVersion { found: 2, supported: 1 });
}

#[test]
fn wrong_byte_order() {
    let b = moe();
    let mut m = b.clone();
    m.0[hdr::BYTE_ORDER..hdr::BYTE_ORDER + 4].reverse();
    assert_eq!(parse_err(&m), FormatError::BadByteOrder { found: 0x0D0C_0B0A });
    // A whole header written big-endian is reported as such, not as a strange version.
    let mut be = b.clone();
    for (at, size) in [(8, 4), (12, 4), (16, 4), (20, 4), (88, 4), (92, 4)] {
        be.0[at..at + size].reverse();
    }
    for at in (24..88).step_by(8) {
        be.0[at..at + 8].reverse();
    }
    assert_eq!(parse_err(&be), FormatError::BadByteOrder { found: 0x0D0C_0B0A });
}

#[test]
fn bad_header_len() {
    let mut m = moe();
    m.set_u32(hdr::HEADER_LEN, 128);
    assert_eq!(parse_err(&m), FormatError::BadHeaderLen { found: 128, expected: 96 });
}

#[test]
fn bad_alignment() {
    let b = moe();
    for a in [0, 1, 2048, 3000, 4095, 16383, 16385, 1 << 21, u32::MAX] {
        let mut m = b.clone();
        m.set_u32(hdr::ALIGNMENT, a);
        assert_eq!(parse_err(&m), FormatError::BadAlignment { found: a, min: 4096, max: 1 << 20 }, "{a}");
    }
}

#[test]
fn data_section_misaligned() {
    // A valid alignment that the data section offset (16384) is not a multiple of.
    let mut m = moe();
    assert_eq!(m.hdr(hdr::DATA_OFFSET), 16384);
    m.set_u32(hdr::ALIGNMENT, 32768);
    assert_eq!(parse_err(&m), FormatError::SectionMisaligned { section: "data", offset: 16384, align: 32768 });
}

#[test]
fn section_misaligned() {
    let b = moe();
    let mut m = b.clone();
    m.set_u64(hdr::METADATA_OFFSET, 100);
    assert_eq!(parse_err(&m), FormatError::SectionMisaligned { section: "metadata", offset: 100, align: 8 });
    let mut m = b.clone();
    let t = b.hdr(hdr::TABLE_OFFSET) + 4;
    m.set_u64(hdr::TABLE_OFFSET, t);
    assert_eq!(parse_err(&m), FormatError::SectionMisaligned { section: "tensor table", offset: t, align: 8 });
}

#[test]
fn sections_overlap_or_out_of_order() {
    let b = moe();
    let mut m = b.clone();
    m.set_u64(hdr::NAMES_OFFSET, 96);
    assert_eq!(parse_err(&m), FormatError::SectionOrder { section: "names", offset: 96 });
    let mut m = b.clone();
    m.set_u64(hdr::TABLE_OFFSET, b.hdr(hdr::NAMES_OFFSET));
    assert!(matches!(parse_err(&m), FormatError::SectionOrder { section: "tensor table", .. }));
    let mut m = b.clone();
    m.set_u64(hdr::METADATA_OFFSET, 88);
    assert_eq!(parse_err(&m), FormatError::SectionOrder { section: "metadata", offset: 88 });
    let mut m = b.clone();
    m.set_u64(hdr::DATA_OFFSET, 0);
    assert_eq!(parse_err(&m), FormatError::SectionOrder { section: "data", offset: 0 });
}

#[test]
fn section_offset_past_eof() {
    let b = moe();
    let len = b.0.len() as u64;
    let mut m = b.clone();
    m.set_u64(hdr::NAMES_OFFSET, len);
    assert!(
        matches!(parse_err(&m), FormatError::SectionOutOfBounds { section: "names", file_len, .. } if file_len == len)
    );
    let mut m = b.clone();
    m.set_u64(hdr::METADATA_OFFSET, u64::MAX - 7); // offset + len overflows
    assert!(matches!(parse_err(&m), FormatError::SectionOutOfBounds { section: "metadata", .. }));
    let mut m = b.clone();
    m.set_u64(hdr::DATA_LEN, b.hdr(hdr::DATA_LEN) + 1);
    assert!(matches!(parse_err(&m), FormatError::SectionOutOfBounds { section: "data", .. }));
}

#[test]
fn huge_tensor_count() {
    let b = moe();
    for count in [u64::MAX, MAX_TENSORS + 1] {
        let mut m = b.clone();
        m.set_u64(hdr::TENSOR_COUNT, count);
        assert_eq!(parse_err(&m), FormatError::TooManyTensors { count, max: MAX_TENSORS });
    }
    // Under the cap, but the table would run past the end of the file.
    let mut m = b.clone();
    m.set_u64(hdr::TENSOR_COUNT, MAX_TENSORS);
    assert!(matches!(parse_err(&m), FormatError::SectionOutOfBounds { section: "tensor table", .. }));
}

#[test]
fn huge_metadata_length() {
    let b = moe();
    for len in [u64::MAX, MAX_METADATA_LEN + 1] {
        let mut m = b.clone();
        m.set_u64(hdr::METADATA_LEN, len);
        assert_eq!(parse_err(&m), FormatError::SectionTooLarge { section: "metadata", len, max: MAX_METADATA_LEN });
    }
    let mut m = b.clone();
    m.set_u64(hdr::NAMES_LEN, u64::MAX);
    assert_eq!(parse_err(&m), FormatError::SectionTooLarge { section: "names", len: u64::MAX, max: MAX_NAMES_LEN });
}

#[test]
fn huge_metadata_counts_and_lengths() {
    let b = moe();
    let meta = b.hdr(hdr::METADATA_OFFSET) as usize;
    // Entry count far beyond what the section can hold: refused before allocating.
    let mut m = b.clone();
    m.set_u64(meta, u64::MAX);
    assert!(matches!(parse_err(&m), FormatError::MetadataCount { count: u64::MAX, .. }));
    // A string length past the end of the section.
    let mut m = b.clone();
    let at = b.find(b"general.architecture") + 20 + 1; // key, type byte, then u64 length
    assert_eq!(b.u64_at(at), 7);
    m.set_u64(at, u64::MAX);
    assert_eq!(parse_err(&m), FormatError::MetadataTruncated { what: "string bytes" });
    // An array length that the remaining bytes cannot hold: refused up front, before
    // allocating, counting 8 bytes per u64 element (the last entry has 16 bytes left: 2).
    let mut m = b.clone();
    let at = b.find(b"t.z.u64s") + 8 + 2; // key, type, element type, then u64 length
    assert_eq!(b.u64_at(at), 2);
    m.set_u64(at, 3);
    assert_eq!(parse_err(&m), FormatError::MetadataTruncated { what: "array elements" });
    m.set_u64(at, u64::MAX);
    assert_eq!(parse_err(&m), FormatError::MetadataTruncated { what: "array elements" });
}

// ---------------------------------------------------------------- metadata entries

#[test]
fn metadata_key_out_of_order() {
    let b = moe();
    let mut m = b.clone();
    let at = b.find(b"t.i64");
    m.0[at..at + 5].copy_from_slice(b"t.a64"); // now sorts before the preceding "t.f64"
    assert_eq!(parse_err(&m), FormatError::KeyOrder { key: name("t.a64") });
}

#[test]
fn metadata_key_duplicate() {
    let b = moe();
    let mut m = b.clone();
    let at = b.find(b"t.i64");
    m.0[at..at + 5].copy_from_slice(b"t.f64");
    assert_eq!(parse_err(&m), FormatError::KeyOrder { key: name("t.f64") });
}

#[test]
fn metadata_key_length() {
    let b = moe();
    let at = b.find(b"t.i64") - 4;
    for len in [0, 257, u32::MAX] {
        let mut m = b.clone();
        m.set_u32(at, len);
        assert_eq!(parse_err(&m), FormatError::BadKeyLen { len, max: 256 });
    }
}

#[test]
fn non_utf8_metadata_key() {
    let b = moe();
    let mut m = b.clone();
    let at = b.find(b"t.i64");
    m.0[at + 2] = 0xFF;
    assert_eq!(parse_err(&m), FormatError::KeyNotUtf8);
}

#[test]
fn non_utf8_metadata_value() {
    let b = moe();
    let mut m = b.clone();
    let at = b.find(b"mixtral");
    m.0[at] = 0xC3; // a lone lead byte
    assert_eq!(parse_err(&m), FormatError::ValueNotUtf8 { key: name("general.architecture") });
    let mut m = b.clone();
    let at = b.find(b"dense");
    m.0[at + 1] = 0x80; // a lone continuation byte, inside a string array
    assert_eq!(parse_err(&m), FormatError::ValueNotUtf8 { key: name("t.z.strs") });
}

#[test]
fn unknown_metadata_type() {
    let b = moe();
    let ty = b.find(b"t.u64") + 5;
    assert_eq!(b.0[ty], 0);
    for code in [7, 255] {
        let mut m = b.clone();
        m.0[ty] = code;
        assert_eq!(parse_err(&m), FormatError::BadValueType { key: name("t.u64"), ty: code });
    }
    // Arrays hold scalars or strings only: no nested arrays, no byte strings.
    let ety = b.find(b"t.z.u64s") + 8 + 1;
    assert_eq!(b.0[ety], 0);
    for code in [5, 6, 9] {
        let mut m = b.clone();
        m.0[ety] = code;
        assert_eq!(parse_err(&m), FormatError::BadValueType { key: name("t.z.u64s"), ty: code });
    }
}

#[test]
fn bad_bool() {
    let b = moe();
    let mut m = b.clone();
    let at = b.find(b"t.bool") + 6 + 1;
    assert_eq!(m.0[at], 1);
    m.0[at] = 2;
    assert_eq!(parse_err(&m), FormatError::BadBool { key: name("t.bool"), byte: 2 });
    let mut m = b.clone();
    let at = b.find(b"t.z.bools") + 9 + 2 + 8; // key, type, element type, length
    assert_eq!(&m.0[at..at + 3], &[1, 0, 1]);
    m.0[at + 1] = 0xFF;
    assert_eq!(parse_err(&m), FormatError::BadBool { key: name("t.z.bools"), byte: 0xFF });
}

#[test]
fn metadata_trailing_bytes() {
    // One entry fewer than the section holds: the last entry is left over.
    let mut m = moe();
    let at = m.hdr(hdr::METADATA_OFFSET) as usize;
    let count = m.u64_at(at);
    m.set_u64(at, count - 1);
    assert!(matches!(parse_err(&m), FormatError::MetadataTrailing { extra } if extra > 0));
}

// ---------------------------------------------------------------- names

#[test]
fn duplicate_tensor_names() {
    let b = moe();
    let mut m = b.clone();
    let r1 = b.record(1);
    let (off, len) = (b.u32_at(r1 + rec::NAME_OFFSET), b.u32_at(r1 + rec::NAME_LEN));
    m.set_rec_u32(2, rec::NAME_OFFSET, off).set_rec_u32(2, rec::NAME_LEN, len);
    assert_eq!(parse_err(&m), FormatError::DuplicateName { name: name("layers.0.attn_norm.weight") });
}

#[test]
fn non_utf8_tensor_name() {
    let b = moe();
    let mut m = b.clone();
    let at = b.find(b"layers.0.attn_norm.weight");
    m.0[at + 3] = 0xFF;
    assert_eq!(parse_err(&m), FormatError::BadName { index: 1, max: 1024 });
}

#[test]
fn empty_or_overlong_tensor_name() {
    let b = moe();
    let mut m = b.clone();
    m.set_rec_u32(4, rec::NAME_LEN, 0);
    assert_eq!(parse_err(&m), FormatError::BadName { index: 4, max: 1024 });
    // 1024 bytes is the limit: a 1025-byte name inside the names section is refused.
    let long = "n".repeat(1024);
    let f = MeoBytes(write_specs(
        &Metadata::default(),
        &[spec(&long, DType::F32, &[1]), spec("b", DType::F32, &[1])],
        4096,
    ));
    MeoFile::parse(&f.0).unwrap();
    let mut m = f.clone();
    m.set_rec_u32(0, rec::NAME_LEN, 1025);
    assert_eq!(parse_err(&m), FormatError::BadName { index: 0, max: 1024 });
}

#[test]
fn tensor_name_out_of_bounds() {
    let b = moe();
    let names_len = b.hdr(hdr::NAMES_LEN) as u32;
    let mut m = b.clone();
    m.set_rec_u32(3, rec::NAME_OFFSET, names_len);
    assert!(matches!(parse_err(&m), FormatError::NameOutOfBounds { index: 3, .. }));
    let mut m = b.clone();
    m.set_rec_u32(3, rec::NAME_OFFSET, u32::MAX).set_rec_u32(3, rec::NAME_LEN, u32::MAX);
    assert!(matches!(parse_err(&m), FormatError::NameOutOfBounds { index: 3, .. }));
}

// ---------------------------------------------------------------- records

#[test]
fn unknown_dtype() {
    let b = moe();
    for code in [6, 255] {
        let mut m = b.clone();
        m.set_rec_u8(2, rec::DTYPE, code);
        assert_eq!(parse_err(&m), FormatError::BadDType { name: name("layers.0.router.weight"), code });
    }
}

#[test]
fn bad_rank() {
    let b = moe();
    for ndim in [0, 5, 255] {
        let mut m = b.clone();
        m.set_rec_u8(2, rec::NDIM, ndim);
        assert_eq!(parse_err(&m), FormatError::BadRank { name: name("layers.0.router.weight"), ndim });
    }
}

#[test]
fn reserved_flags_set() {
    let mut m = moe();
    let at = m.record(2) + rec::FLAGS;
    m.set_u16(at, 1);
    assert_eq!(parse_err(&m), FormatError::BadFlags { name: name("layers.0.router.weight"), flags: 1 });
}

#[test]
fn zero_dim() {
    let b = moe();
    let mut m = b.clone();
    m.set_rec_u64(2, rec::DIMS, 0); // [0, 8]
    assert_eq!(parse_err(&m), FormatError::BadDims { name: name("layers.0.router.weight") });
    // An unused dimension slot must be zero too.
    let mut m = b.clone();
    m.set_rec_u64(2, rec::DIMS + 16, 1); // ndim 2, dims[2] = 1
    assert_eq!(parse_err(&m), FormatError::BadDims { name: name("layers.0.router.weight") });
}

#[test]
fn dimension_product_overflow() {
    let b = moe();
    // f32 [2^16, 2^16, 2^16, 2^16]: the element count overflows.
    let mut m = b.clone();
    m.set_rec_u8(1, rec::NDIM, 4);
    for k in 0..4 {
        m.set_rec_u64(1, rec::DIMS + 8 * k, 1 << 16);
    }
    assert_eq!(parse_err(&m), FormatError::ShapeOverflow { name: name("layers.0.attn_norm.weight") });
    // f32 [2^62, 2]: the element count fits, the byte count does not.
    let mut m = b.clone();
    m.set_rec_u64(2, rec::DIMS, 1 << 62).set_rec_u64(2, rec::DIMS + 8, 2);
    assert_eq!(parse_err(&m), FormatError::ShapeOverflow { name: name("layers.0.router.weight") });
    // Q8_0 [1, u64::MAX]: rounding the row up to whole blocks overflows.
    let mut m = b.clone();
    m.set_rec_u64(3, rec::DIMS, 1).set_rec_u64(3, rec::DIMS + 8, u64::MAX);
    assert_eq!(parse_err(&m), FormatError::ShapeOverflow { name: name("layers.0.experts.0.gate") });
    // Q8_0 [2^60, 32]: rows × stride overflows.
    let mut m = b.clone();
    m.set_rec_u64(3, rec::DIMS, 1 << 60).set_rec_u64(3, rec::DIMS + 8, 32);
    assert_eq!(parse_err(&m), FormatError::ShapeOverflow { name: name("layers.0.experts.0.gate") });
}

#[test]
fn size_mismatch() {
    let b = moe();
    let len = b.rec_u64(2, rec::LEN);
    for found in [len + 64, len - 1, 0] {
        let mut m = b.clone();
        m.set_rec_u64(2, rec::LEN, found);
        assert_eq!(
            parse_err(&m),
            FormatError::SizeMismatch { name: name("layers.0.router.weight"), expected: len, found }
        );
    }
}

#[test]
fn tensor_offset_past_end_of_data() {
    let b = moe();
    let data_len = b.hdr(hdr::DATA_LEN);
    let len = b.rec_u64(10, rec::LEN);
    for offset in [data_len, data_len - len + 64, u64::MAX - 63] {
        let mut m = b.clone();
        m.set_rec_u64(10, rec::OFFSET, offset);
        assert_eq!(
            parse_err(&m),
            FormatError::TensorOutOfBounds { name: name("output.weight"), offset, len, data_len },
            "offset {offset}"
        );
    }
}

#[test]
fn misaligned_tensor() {
    let b = moe();
    let mut m = b.clone();
    let off = b.rec_u64(1, rec::OFFSET) + 8;
    m.set_rec_u64(1, rec::OFFSET, off);
    assert_eq!(
        parse_err(&m),
        FormatError::TensorMisaligned { name: name("layers.0.attn_norm.weight"), offset: off, align: 64 }
    );
}

#[test]
fn overlapping_tensors() {
    let b = moe();
    let mut m = b.clone();
    m.set_rec_u64(2, rec::OFFSET, b.rec_u64(1, rec::OFFSET));
    assert_eq!(
        parse_err(&m),
        FormatError::TensorOverlap {
            name: name("layers.0.router.weight"),
            previous: name("layers.0.attn_norm.weight")
        }
    );
    // The table must be in offset order: swapping two records' offsets is an overlap too.
    let mut m = b.clone();
    let (o0, o1) = (b.rec_u64(0, rec::OFFSET), b.rec_u64(1, rec::OFFSET));
    m.set_rec_u64(0, rec::OFFSET, o1).set_rec_u64(1, rec::OFFSET, o0);
    assert!(matches!(parse_err(&m), FormatError::TensorOverlap { .. }));
}

#[test]
fn oversized_hole_between_tensors() {
    // Grow the data section by one alignment unit and move the last tensor into it: the hole
    // before it is now >= the alignment, which no writer produces.
    let mut m = moe();
    m.0.extend(std::iter::repeat_n(0, ALIGN as usize));
    let data_len = m.hdr(hdr::DATA_LEN) + ALIGN;
    m.set_u64(hdr::DATA_LEN, data_len);
    let off = m.rec_u64(10, rec::OFFSET) + ALIGN;
    m.set_rec_u64(10, rec::OFFSET, off);
    assert!(matches!(
        parse_err(&m),
        FormatError::OversizedGap { name, gap, max: ALIGN } if name == "output.weight" && gap >= ALIGN
    ));
}

// ---------------------------------------------------------------- expert slabs

#[test]
fn misaligned_slab() {
    let b = moe();
    let mut m = b.clone();
    let off = b.rec_u64(3, rec::OFFSET);
    assert_eq!(off % ALIGN, 0);
    m.set_rec_u64(3, rec::OFFSET, off - 64); // still 64-aligned, no overlap, not page-aligned
    assert_eq!(
        parse_err(&m),
        FormatError::SlabMisaligned { slab: name("layers.0.experts.0"), offset: off - 64, align: ALIGN }
    );
}

#[test]
fn slab_sharing_a_page() {
    // Move the tensor after the last slab down onto the slab's last page.
    let b = moe();
    let mut m = b.clone();
    let slab_end = b.rec_u64(8, rec::OFFSET) + b.rec_u64(8, rec::LEN);
    let new = slab_end.next_multiple_of(64);
    assert!(new < b.rec_u64(9, rec::OFFSET));
    m.set_rec_u64(9, rec::OFFSET, new);
    assert_eq!(
        parse_err(&m),
        FormatError::SlabShared { slab: name("layers.0.experts.1"), other: name("output_norm.weight") }
    );
}

#[test]
fn slab_not_contiguous() {
    // A slab interrupted by another tensor: written as two different experts, then one renamed
    // (the writer itself refuses to produce this).
    let specs = [
        spec("layers.0.experts.0.gate", DType::Q8_0, &[4, 32]),
        spec("layers.0.experts.0.up", DType::Q8_0, &[4, 32]),
        spec("layers.0.ffn_norm.weight", DType::F32, &[32]),
        spec("layers.0.experts.1.down", DType::Q8_0, &[32, 4]),
    ];
    let b = MeoBytes(write_specs(&Metadata::default(), &specs, 4096));
    MeoFile::parse(&b.0).unwrap().verify().unwrap();
    let mut m = b.clone();
    let at = b.find(b"layers.0.experts.1.down");
    m.0[at + 17] = b'0';
    assert_eq!(parse_err(&m), FormatError::SlabNotContiguous { slab: name("layers.0.experts.0") });
    // Interrupted by another slab.
    let specs = [
        spec("experts.0.gate", DType::F32, &[8]),
        spec("experts.1.gate", DType::F32, &[8]),
        spec("experts.2.up", DType::F32, &[8]),
    ];
    let b = MeoBytes(write_specs(&Metadata::default(), &specs, 4096));
    let mut m = b.clone();
    let at = b.find(b"experts.2.up");
    m.0[at + 8] = b'0';
    assert_eq!(parse_err(&m), FormatError::SlabNotContiguous { slab: name("experts.0") });
}

// ---------------------------------------------------------------- end of file

#[test]
fn trailing_data() {
    let b = moe();
    let len = b.0.len() as u64;
    for extra in [1, 8, ALIGN] {
        let mut m = b.clone();
        m.0.extend(std::iter::repeat_n(0, extra as usize));
        assert_eq!(parse_err(&m), FormatError::DataLenMismatch { data_end: len, file_len: len + extra });
    }
    // A data section shorter than the rest of the file is the same thing.
    let mut m = b.clone();
    m.set_u64(hdr::DATA_LEN, b.hdr(hdr::DATA_LEN) - 1);
    assert_eq!(parse_err(&m), FormatError::DataLenMismatch { data_end: len - 1, file_len: len });
}

// ---------------------------------------------------------------- verify

#[test]
fn checksum_mismatch() {
    let b = moe();
    // A flipped bit in a tensor's bytes: parse does not read data, verify does.
    let mut m = b.clone();
    let at = b.tensor_start(4) + 5;
    m.0[at] ^= 0x10;
    match verify_err(&m) {
        FormatError::ChecksumMismatch { name, expected, .. } => {
            assert_eq!(name, "layers.0.experts.0.up");
            assert_eq!(expected, b.u32_at(b.record(4) + rec::CRC32));
        }
        other => panic!("{other:?}"),
    }
    // A wrong checksum in the table (with the structure checksum updated to match).
    let mut m = b.clone();
    let crc = b.u32_at(b.record(7) + rec::CRC32);
    m.set_rec_u32(7, rec::CRC32, crc ^ 1).fix_structure_crc();
    assert!(matches!(verify_err(&m), FormatError::ChecksumMismatch { name, .. } if name == "layers.0.experts.1.up"));
}

#[test]
fn structure_checksum_mismatch() {
    let b = moe();
    let expected = b.u32_at(hdr::STRUCTURE_CRC);
    // A metadata value changed to another valid value.
    let mut m = b.clone();
    let at = b.find(b"t.u64") + 5 + 1;
    assert_eq!(m.u64_at(at), 42);
    m.set_u64(at, 43);
    assert!(matches!(verify_err(&m), FormatError::StructureChecksum { expected: e, .. } if e == expected));
    // A tensor renamed to another valid, unique name.
    let mut m = b.clone();
    let at = b.find(b"output_norm.weight");
    m.0[at] = b'O';
    assert!(matches!(verify_err(&m), FormatError::StructureChecksum { .. }));
    // The stored checksum itself damaged.
    let mut m = b.clone();
    m.set_u32(hdr::STRUCTURE_CRC, expected ^ 0x8000_0000);
    assert_eq!(verify_err(&m), FormatError::StructureChecksum { expected: expected ^ 0x8000_0000, found: expected });
}

#[test]
fn nonzero_padding() {
    let b = moe();
    let data = b.hdr(hdr::DATA_OFFSET) as usize;
    // The hole between the tensor table and the data section.
    let table_end = b.record(11);
    let mut m = b.clone();
    m.0[table_end + 3] = 1;
    assert_eq!(verify_err(&m), FormatError::PaddingNotZero { offset: table_end as u64 + 3 });
    // The hole before the first slab.
    let at = b.tensor_start(2) + b.rec_u64(2, rec::LEN) as usize + 1000;
    assert!(at < b.tensor_start(3));
    let mut m = b.clone();
    m.0[at] = 0x80;
    assert_eq!(verify_err(&m), FormatError::PaddingNotZero { offset: at as u64 });
    // The hole between two tensors of a slab.
    let at = b.tensor_start(3) + b.rec_u64(3, rec::LEN) as usize;
    assert!(at < b.tensor_start(4));
    let mut m = b.clone();
    m.0[at] = 1;
    assert_eq!(verify_err(&m), FormatError::PaddingNotZero { offset: at as u64 });
    assert!(data < at);
}

#[test]
fn nonzero_padding_between_header_and_metadata() {
    // Sections may be separated by zero padding; move metadata, names and table 8 bytes
    // later (taking 8 zero bytes from before the data section): still valid.
    let b = moe();
    let data = b.hdr(hdr::DATA_OFFSET) as usize;
    let mut v = b.0[..96].to_vec();
    v.extend([0; 8]);
    v.extend(&b.0[96..data - 8]);
    v.extend(&b.0[data..]);
    let mut m = MeoBytes(v);
    for f in [hdr::METADATA_OFFSET, hdr::NAMES_OFFSET, hdr::TABLE_OFFSET] {
        let o = m.hdr(f);
        m.set_u64(f, o + 8);
    }
    MeoFile::parse(&m.0).unwrap().verify().unwrap();
    m.0[100] = 7;
    assert_eq!(verify_err(&m), FormatError::PaddingNotZero { offset: 100 });
}

#[test]
fn verify_accepts_every_sample() {
    for (what, bytes) in meo_tests::sample_files() {
        let f = MeoFile::parse(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        f.verify().unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert!(format::HEADER_LEN == hdr::LEN as u64 && format::RECORD_LEN == rec::SIZE as u64);
}
