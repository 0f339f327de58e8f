//! The worked example in `docs/FORMAT.md` §16 is exactly what the writer produces.

use meo::MeoFile;
use meo::format::{DType, MetaValue, Metadata};
use meo_tests::{spec, write_file};

fn example() -> Vec<u8> {
    let meta = Metadata::from_entries(vec![("general.architecture", MetaValue::Str("tiny"))]);
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_file(&meta, &[(spec("norm.weight", DType::F32, &[4]), data)], 16384)
}

/// `(address, bytes)` of each hex line between the example markers.
fn doc_lines() -> Vec<(usize, Vec<u8>)> {
    hex_lines("example-hex")
}

/// `(address, bytes)` of each hex line between `<!-- {marker}:begin -->` and `:end` in
/// docs/FORMAT.md (an address of 8 hex digits, then up to 16 bytes).
fn hex_lines(marker: &str) -> Vec<(usize, Vec<u8>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/FORMAT.md")).unwrap();
    let start = doc.find(&format!("<!-- {marker}:begin -->")).expect("begin marker");
    let end = doc.find(&format!("<!-- {marker}:end -->")).expect("end marker");
    let mut out = Vec::new();
    for line in doc[start..end].lines() {
        let mut tokens = line.split_whitespace();
        let Some(addr) = tokens.next().filter(|t| t.len() == 8) else { continue };
        let Ok(addr) = usize::from_str_radix(addr, 16) else { continue };
        let bytes: Vec<u8> =
            tokens.take(16).map_while(|t| (t.len() == 2).then(|| u8::from_str_radix(t, 16).ok()).flatten()).collect();
        out.push((addr, bytes));
    }
    out
}

#[test]
fn worked_example_matches_the_writer() {
    let file = example();
    assert_eq!(file.len(), 16400);
    let lines = doc_lines();
    assert!(lines.len() >= 15, "example found");
    assert!(lines.iter().all(|(_, b)| b.len() == 16), "16 bytes per line");
    let mut covered = 0;
    for (addr, bytes) in &lines {
        assert_eq!(&file[*addr..addr + 16], &bytes[..], "docs/FORMAT.md line {addr:08x}");
        covered += 16;
    }
    // Everything the doc elides is zero padding.
    let shown: Vec<usize> = lines.iter().map(|(a, _)| *a).collect();
    for (i, b) in file.iter().enumerate() {
        if !shown.contains(&(i / 16 * 16)) {
            assert_eq!(*b, 0, "byte {i:#x} not shown in the doc must be padding");
        }
    }
    assert!(covered >= 0xf0);
    let f = MeoFile::parse(&file).unwrap();
    f.verify().unwrap();
    assert_eq!(f.header.structure_crc32, 0x3501_40f4);
    assert_eq!(f.tensors()[0].crc32, 0x8ba7_1454);
}

#[test]
fn crc32_is_zlib_crc32() {
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
}

/// `docs/FORMAT.md` §10a's `q4_0` example is what the quantizer writes, byte for byte.
#[test]
fn q4_0_example_matches_the_quantizer() {
    let x: Vec<f32> = (0..40).map(|c| if c < 32 { ((c % 16) as f32 - 8.0) * 0.25 } else { 1.0 }).collect();
    let bytes = meo::quant::quantize_as(DType::Q4_0, &x, 1, 40, None);
    let mut want = Vec::new();
    for (addr, line) in hex_lines("q4-example-hex") {
        assert_eq!(addr, want.len(), "addresses follow each other");
        want.extend(line);
    }
    assert_eq!(bytes, want);
    // And it decodes to the values.
    let mut out = vec![0.0; 40];
    meo::quant::dequantize_row_as(DType::Q4_0, &bytes, 1, 40, 0, &mut out);
    assert_eq!(out, x);
}
