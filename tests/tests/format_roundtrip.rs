//! Round trips through the real writer and reader: random metadata of every value type,
//! random tensor sets (dense tensors and expert slabs, every dtype, rank 1–4) →
//! `MeoWriter` → `MeoFile::parse` → every field equal, every byte equal, `verify` ok.

use meo::format::{self, DType, MetaArray, MetaValue, Metadata, align_up};
use meo::{MeoFile, quant};
use meo_converter::writer::{MeoWriter, TensorSpec, WriteError};
use meo_tests::{Rng, hdr, spec, tensor_bytes, write_file};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// An owned metadata value (the reader's `MetaValue` borrows from the file).
#[derive(Debug, Clone)]
enum Val {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    U64s(Vec<u64>),
    I64s(Vec<i64>),
    F64s(Vec<f64>),
    Bools(Vec<bool>),
    Strs(Vec<String>),
}

impl Val {
    fn borrow(&self) -> MetaValue<'_> {
        match self {
            Val::U64(x) => MetaValue::U64(*x),
            Val::I64(x) => MetaValue::I64(*x),
            Val::F64(x) => MetaValue::F64(*x),
            Val::Bool(x) => MetaValue::Bool(*x),
            Val::Str(s) => MetaValue::Str(s),
            Val::Bytes(b) => MetaValue::Bytes(b),
            Val::U64s(v) => MetaValue::Array(MetaArray::U64(v.clone())),
            Val::I64s(v) => MetaValue::Array(MetaArray::I64(v.clone())),
            Val::F64s(v) => MetaValue::Array(MetaArray::F64(v.clone())),
            Val::Bools(v) => MetaValue::Array(MetaArray::Bool(v.clone())),
            Val::Strs(v) => MetaValue::Array(MetaArray::Str(v.iter().map(String::as_str).collect())),
        }
    }
}

/// Equality that compares floats by their bits (NaN payloads and -0.0 must survive).
fn same_value(a: &MetaValue<'_>, b: &MetaValue<'_>) -> bool {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    match (a, b) {
        (MetaValue::F64(x), MetaValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::Array(MetaArray::F64(x)), MetaValue::Array(MetaArray::F64(y))) => bits(x) == bits(y),
        _ => a == b,
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[ -~]{0,24}", 1 => "\\PC{0,12}", 1 => Just(String::new())]
}

fn val() -> impl Strategy<Value = Val> {
    let f = prop_oneof![any::<f64>(), Just(f64::NAN), Just(-0.0), Just(f64::NEG_INFINITY)];
    prop_oneof![
        any::<u64>().prop_map(Val::U64),
        any::<i64>().prop_map(Val::I64),
        f.clone().prop_map(Val::F64),
        any::<bool>().prop_map(Val::Bool),
        text().prop_map(Val::Str),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Val::Bytes),
        prop::collection::vec(any::<u64>(), 0..8).prop_map(Val::U64s),
        prop::collection::vec(any::<i64>(), 0..8).prop_map(Val::I64s),
        prop::collection::vec(f, 0..8).prop_map(Val::F64s),
        prop::collection::vec(any::<bool>(), 0..8).prop_map(Val::Bools),
        prop::collection::vec(text(), 0..6).prop_map(Val::Strs),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z]{1,8}(\\.[a-z0-9_]{1,10}){0,3}",
        1 => "\\PC{1,16}".prop_filter("1..=256 bytes", |k| k.len() <= 256),
        1 => "[a-z]{256}",
    ]
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, Val>> {
    prop::collection::btree_map(key(), val(), 0..12)
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16), Just(DType::Q8_0)]
}

/// Rank 1–4; the last (input) dimension crosses Q8_0 block boundaries.
fn shape() -> impl Strategy<Value = Vec<u64>> {
    (prop::collection::vec(1u64..=5, 0..=3), 1u64..=70).prop_map(|(mut outer, last)| {
        outer.push(last);
        outer
    })
}

#[derive(Debug, Clone)]
enum Group {
    Dense {
        name: String,
        dtype: DType,
        shape: Vec<u64>,
    },
    /// Parts of one expert, in gate/up/down order (a prefix of it).
    Slab {
        parts: Vec<(DType, Vec<u64>)>,
    },
}

fn group() -> impl Strategy<Value = Group> {
    prop_oneof![
        ("[a-z_]{1,12}|\\PC{1,6}", dtype(), shape()).prop_map(|(name, dtype, shape)| Group::Dense {
            name,
            dtype,
            shape
        }),
        prop::collection::vec((dtype(), shape()), 1..=3).prop_map(|parts| Group::Slab { parts }),
    ]
}

/// Concrete tensor specs from groups: dense names made unique and dot-free (so never a slab),
/// slab names `<prefix>.experts.<id>.<part>` with fresh ids.
fn specs_of(groups: &[Group], layer_prefix: bool) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        match g {
            Group::Dense { name, dtype, shape } => {
                out.push(spec(&format!("d{i}_{}", name.replace('.', "_")), *dtype, shape));
            }
            Group::Slab { parts } => {
                for (part, (dtype, shape)) in meo::names::EXPERT_PARTS.iter().zip(parts) {
                    let name = if layer_prefix {
                        format!("layers.{}.experts.{i}.{part}", i % 3)
                    } else {
                        format!("experts.{i}.{part}")
                    };
                    out.push(spec(&name, *dtype, shape));
                }
            }
        }
    }
    out
}

/// Expected slabs: (key, first tensor index, tensor count).
fn expected_slabs(specs: &[TensorSpec]) -> Vec<(String, usize, usize)> {
    let mut slabs: Vec<(String, usize, usize)> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        if let Some((key, _)) = s.name.rsplit_once('.').filter(|_| s.name.contains("experts.")) {
            match slabs.last_mut() {
                Some((k, _, n)) if *k == key => *n += 1,
                _ => slabs.push((key.to_string(), i, 1)),
            }
        }
    }
    slabs
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.next_u64() as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn write_parse_round_trip(
        meta in metadata(),
        groups in prop::collection::vec(group(), 0..8),
        layer_prefix in any::<bool>(),
        alignment in prop_oneof![3 => Just(4096u32), 2 => Just(16384u32), 1 => Just(65536u32)],
        seed in any::<u64>(),
        raw_q8 in any::<bool>(),
    ) {
        let meta_in = Metadata::from_entries(meta.iter().map(|(k, v)| (k.as_str(), v.borrow())).collect());
        let specs = specs_of(&groups, layer_prefix);
        // Q8_0 either through the quantizer (padding zero) or as arbitrary bytes: the container
        // does not look inside a tensor.
        let tensors: Vec<(TensorSpec, Vec<u8>)> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n = s.dtype.byte_len(&s.shape).unwrap() as usize;
                let data = if s.dtype == DType::Q8_0 && !raw_q8 {
                    tensor_bytes(s, seed ^ i as u64)
                } else {
                    random_bytes(n, seed ^ i as u64)
                };
                (s.clone(), data)
            })
            .collect();
        let bytes = write_file(&meta_in, &tensors, alignment);
        prop_assert_eq!(&bytes, &write_file(&meta_in, &tensors, alignment), "writer is deterministic");

        let f = MeoFile::parse(&bytes).unwrap();
        f.verify().unwrap();

        // Header.
        let h = &f.header;
        prop_assert_eq!(&bytes[..8], &format::MAGIC[..]);
        prop_assert_eq!((h.format_version, h.quant_version), (1, 1));
        prop_assert_eq!(h.alignment, alignment);
        prop_assert_eq!(h.metadata.0, hdr::LEN as u64);
        prop_assert_eq!(h.tensor_count, specs.len() as u64);
        prop_assert_eq!(h.names.0 % 8, 0);
        prop_assert_eq!(h.table_offset % 8, 0);
        prop_assert_eq!(h.data_offset % u64::from(alignment), 0);
        prop_assert_eq!(h.data_offset + h.data_len, bytes.len() as u64);
        let last_end = f.tensors().last().map_or(0, |t| t.offset + t.len);
        prop_assert_eq!(h.data_len, last_end);

        // Metadata: same keys, in order, same values.
        let got = f.metadata.entries();
        prop_assert_eq!(got.len(), meta.len());
        for ((k, v), (gk, gv)) in meta.iter().zip(got) {
            prop_assert_eq!(k.as_str(), *gk);
            prop_assert!(same_value(&v.borrow(), gv), "{:?}: {:?} != {:?}", k, v, gv);
            prop_assert!(f.metadata.get(k).is_some());
        }

        // Tensors: every record field and every byte.
        prop_assert_eq!(f.tensors().len(), tensors.len());
        let mut prev_end = 0;
        for (t, (s, data)) in f.tensors().iter().zip(&tensors) {
            prop_assert_eq!(t.name, s.name.as_str());
            prop_assert_eq!(t.dtype, s.dtype);
            prop_assert_eq!(t.shape(), &s.shape[..]);
            prop_assert_eq!(t.len, data.len() as u64);
            prop_assert_eq!(t.crc32, crc32fast::hash(data));
            prop_assert_eq!(f.data(t), &data[..]);
            prop_assert_eq!(t.offset % 64, 0);
            prop_assert!(t.offset >= prev_end && t.offset - prev_end < u64::from(alignment));
            prop_assert_eq!(f.tensor(t.name), Some(t));
            prev_end = t.offset + t.len;
        }

        // Expert slabs: grouping, alignment, contiguity, exclusive pages.
        let want = expected_slabs(&specs);
        prop_assert_eq!(f.slabs().len(), want.len());
        let align = u64::from(alignment);
        for (s, (key, first, n)) in f.slabs().iter().zip(&want) {
            prop_assert_eq!(s.key, key.as_str());
            prop_assert_eq!(s.tensors.clone(), *first..first + n);
            prop_assert_eq!(s.offset % align, 0);
            prop_assert_eq!(s.offset, f.tensors()[*first].offset);
            let last = &f.tensors()[first + n - 1];
            prop_assert_eq!(s.offset + s.len, last.offset + last.len);
            let r = f.slab_range(s);
            prop_assert_eq!(r.start % alignment as usize, 0);
            if let Some(next) = f.tensors().get(first + n) {
                prop_assert!(next.offset >= align_up(s.offset + s.len, align).unwrap());
            }
        }
    }

    #[test]
    fn metadata_section_round_trip(meta in metadata()) {
        let m = Metadata::from_entries(meta.iter().map(|(k, v)| (k.as_str(), v.borrow())).collect());
        let bytes = m.to_bytes();
        let back = Metadata::parse(&bytes).unwrap();
        prop_assert_eq!(back.entries().len(), m.entries().len());
        for ((k, v), (bk, bv)) in m.entries().iter().zip(back.entries()) {
            prop_assert_eq!(k, bk);
            prop_assert!(same_value(v, bv));
        }
    }
}

#[test]
fn q8_0_tensor_layout_is_planar() {
    // [3, 40]: row stride 64 (40 values + 24 zero bytes), quantized plane 192 bytes, the scale
    // plane at offset 192 (already 64-aligned), 3 rows × 2 blocks × 2 bytes.
    let rows = 3;
    let cols = 40;
    let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 50.0) / 7.0).collect();
    let q = quant::quantize(&w, rows, cols);
    assert_eq!(q.len() as u64, DType::Q8_0.byte_len(&[3, 40]).unwrap());
    assert_eq!(q.len(), 192 + 12);
    for r in 0..rows {
        assert!(q[r * 64 + 40..r * 64 + 64].iter().all(|&b| b == 0), "row {r} padding is zero");
    }
    // [5, 8]: quantized plane 5 × 32 = 160 bytes, scales at the next 64-byte boundary (192).
    assert_eq!(quant::scales_offset(5, 8), Some(192));
    let q = quant::quantize(&[1.0; 40], 5, 8);
    assert_eq!(q.len(), 192 + 10);
    assert!(q[160..192].iter().all(|&b| b == 0), "gap before the scale plane is zero");
    // Rank > 2: rows are the product of the outer dimensions.
    assert_eq!(DType::Q8_0.byte_len(&[2, 3, 40]), quant::q8_0_len(6, 40));
    assert_eq!(DType::Q8_0.byte_len(&[40]), quant::q8_0_len(1, 40));
}

/// ggml's reference `quantize_row_q8_0` (ggml-quants.c), block by block, in its own
/// interleaved layout `{ f16 d; i8 qs[32] }`.
fn ggml_q8_0(x: &[f32]) -> Vec<(u16, [i8; 32])> {
    x.chunks(32)
        .map(|b| {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / ((1 << 7) - 1) as f32;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for (q, &v) in qs.iter_mut().zip(b) {
                *q = (v * id).round() as i8; // roundf: half away from zero
            }
            (half::f16::from_f32(d).to_bits(), qs)
        })
        .collect()
}

#[test]
fn q8_0_numerics_equal_ggml() {
    let mut rng = Rng::new(7);
    let (rows, cols) = (6usize, 96usize);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 4.0).collect();
    w[..32].fill(0.0); // an all-zero block: scale 0, quants 0
    w[40] = 3.5 * (w[40..64].iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0); // a tie
    let q = quant::quantize(&w, rows, cols);
    let soff = quant::scales_offset(rows as u64, cols as u64).unwrap() as usize;
    for r in 0..rows {
        for (b, (d, qs)) in ggml_q8_0(&w[r * cols..(r + 1) * cols]).into_iter().enumerate() {
            let at = soff + (r * cols / 32 + b) * 2;
            assert_eq!(u16::from_le_bytes([q[at], q[at + 1]]), d, "scale r{r} b{b}");
            let plane = &q[r * cols + b * 32..][..32];
            assert!(plane.iter().zip(qs).all(|(&a, b)| a as i8 == b), "quants r{r} b{b}");
        }
    }
}

#[test]
fn writer_refuses_what_the_reader_would_refuse() {
    let meta = Metadata::default();
    let cases: Vec<(Vec<TensorSpec>, u32)> = vec![
        (vec![spec("a", DType::F32, &[2]), spec("a", DType::F32, &[2])], 16384),
        (vec![spec("", DType::F32, &[2])], 16384),
        (vec![spec(&"x".repeat(1025), DType::F32, &[2])], 16384),
        (vec![spec("a", DType::F32, &[2, 0])], 16384),
        (vec![spec("a", DType::F32, &[1, 1, 1, 1, 1])], 16384),
        (vec![spec("a", DType::F32, &[u64::MAX, 2])], 16384),
        (
            vec![
                spec("experts.0.gate", DType::F32, &[2]),
                spec("b", DType::F32, &[2]),
                spec("experts.0.up", DType::F32, &[2]),
            ],
            16384,
        ),
        (vec![spec("a", DType::F32, &[2])], 3000),
        (vec![spec("a", DType::F32, &[2])], 2048),
    ];
    for (specs, alignment) in cases {
        let r = MeoWriter::new(std::io::Cursor::new(Vec::new()), &meta, specs.clone(), alignment);
        assert!(matches!(r, Err(WriteError::BadTensor { .. })), "{specs:?} at {alignment}");
    }
    // The longest allowed name still round-trips.
    let long = "x".repeat(1024);
    let bytes = meo_tests::write_specs(&meta, &[spec(&long, DType::F32, &[2])], 4096);
    assert_eq!(MeoFile::parse(&bytes).unwrap().tensors()[0].name, long);
}
