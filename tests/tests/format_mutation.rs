//! Byte-mutation tests of the reader: whatever the bytes, `MeoFile::parse` (and `verify` when
//! parse succeeds) returns `Ok` or `Err` and never panics or reads out of bounds; and whatever
//! it accepts satisfies the layout rules. Runs everywhere (the `cargo fuzz` target in `fuzz/`
//! explores further where a nightly toolchain is available).

use meo::format::{DType, align_up};
use meo::{MeoFile, ModelConfig};
use meo_tests::{hdr, sample_files};
use proptest::prelude::*;
use std::sync::OnceLock;

fn samples() -> &'static [(&'static str, Vec<u8>)] {
    static S: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    S.get_or_init(sample_files)
}

/// Parses, and if that succeeds checks what the reader promises about an accepted file,
/// touches every accessor, and verifies. Returns whether parse and verify both succeeded.
fn exercise(bytes: &[u8]) -> bool {
    let Ok(f) = MeoFile::parse(bytes) else { return false };
    let h = &f.header;
    let align = u64::from(h.alignment);
    assert!(h.alignment.is_power_of_two() && (4096..=1 << 20).contains(&h.alignment));
    assert_eq!(h.data_offset % align, 0);
    assert_eq!(h.data_offset + h.data_len, bytes.len() as u64);
    let mut prev_end = 0;
    for (i, t) in f.tensors().iter().enumerate() {
        assert_eq!(t.offset % 64, 0);
        assert!(t.offset >= prev_end && t.offset - prev_end < align);
        assert_eq!(Some(t.len), t.dtype.byte_len(t.shape()));
        assert!(t.offset + t.len <= h.data_len);
        assert!(!t.shape().is_empty() && t.shape().len() <= 4 && !t.shape().contains(&0));
        assert_eq!(f.data(t).len() as u64, t.len);
        assert_eq!(f.tensor(t.name), Some(t), "tensor {i} is found by its unique name");
        prev_end = t.offset + t.len;
    }
    for s in f.slabs() {
        assert_eq!(s.offset % align, 0);
        assert!(f.slab_range(s).end <= bytes.len());
        if let Some(next) = f.tensors().get(s.tensors.end) {
            assert!(next.offset >= align_up(s.offset + s.len, align).unwrap());
        }
    }
    for (k, v) in f.metadata.entries() {
        assert!(f.metadata.get(k).is_some());
        let _ = v.type_name();
    }
    let _ = ModelConfig::from_metadata(&f.metadata);
    let _ = DType::Q8_0.name();
    f.verify().is_ok()
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit at a position (a fraction of the file, or of the part before the data).
    Flip {
        at: u32,
        bit: u8,
        structure: bool,
    },
    /// Overwrite one byte.
    Set {
        at: u32,
        byte: u8,
        structure: bool,
    },
    /// Overwrite an aligned u32/u64 word with an interesting value.
    Word {
        at: u32,
        value: u64,
        wide: bool,
        structure: bool,
    },
    Truncate {
        to: u32,
    },
    Extend {
        bytes: Vec<u8>,
    },
    Insert {
        at: u32,
        bytes: Vec<u8>,
    },
    Remove {
        at: u32,
        n: u8,
    },
}

fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(63),
        Just(64),
        Just(96),
        Just(4096),
        Just(16384),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(1 << 63),
        Just(1 << 32),
        any::<u64>(),
        0u64..70_000,
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<u32>(), 0u8..8, any::<bool>()).prop_map(|(at, bit, structure)| Mutation::Flip { at, bit, structure }),
        2 => (any::<u32>(), any::<u8>(), any::<bool>()).prop_map(|(at, byte, structure)| Mutation::Set { at, byte, structure }),
        4 => (any::<u32>(), interesting(), any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(at, value, wide, structure)| Mutation::Word { at, value, wide, structure }),
        1 => any::<u32>().prop_map(|to| Mutation::Truncate { to }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(|bytes| Mutation::Extend { bytes }),
        1 => (any::<u32>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<u32>(), 1u8..16).prop_map(|(at, n)| Mutation::Remove { at, n }),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    if b.is_empty() {
        return;
    }
    // Most of a sample file is tensor data and padding; header, metadata, names and table
    // (everything before the data section) get half of the point mutations.
    let structure_len = if b.len() >= hdr::LEN {
        (u64::from_le_bytes(b[hdr::DATA_OFFSET..hdr::DATA_OFFSET + 8].try_into().unwrap()) as usize).clamp(1, b.len())
    } else {
        b.len()
    };
    let pos = |at: u32, structure: bool| at as usize % if structure { structure_len } else { b.len() };
    match m {
        Mutation::Flip { at, bit, structure } => {
            let p = pos(*at, *structure);
            b[p] ^= 1 << bit;
        }
        Mutation::Set { at, byte, structure } => {
            let p = pos(*at, *structure);
            b[p] = *byte;
        }
        Mutation::Word { at, value, wide, structure } => {
            let size = if *wide { 8 } else { 4 };
            let p = pos(*at, *structure) / size * size;
            let bytes = value.to_le_bytes();
            let end = (p + size).min(b.len());
            b[p..end].copy_from_slice(&bytes[..end - p]);
        }
        Mutation::Truncate { to } => b.truncate(*to as usize % (b.len() + 1)),
        Mutation::Extend { bytes } => b.extend(bytes),
        Mutation::Insert { at, bytes } => {
            let p = *at as usize % (b.len() + 1);
            b.splice(p..p, bytes.iter().copied());
        }
        Mutation::Remove { at, n } => {
            let p = *at as usize % b.len();
            let end = (p + *n as usize).min(b.len());
            b.drain(p..end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(which in 0usize..3, muts in prop::collection::vec(mutation(), 1..6)) {
        let (_, sample) = &samples()[which];
        let mut b = sample.clone();
        for m in &muts {
            apply(&mut b, m);
        }
        exercise(&b);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        which in 0usize..3,
        keep in 0usize..4096,
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let (_, sample) = &samples()[which];
        let mut b = sample[..keep.min(sample.len())].to_vec();
        b.extend(tail);
        exercise(&b);
    }
}

/// Every single-byte change outside the header is caught by `parse` or by `verify` (the
/// structure checksum covers metadata, names and table; tensor checksums the data; the zero
/// rule the padding). The header is not checksummed: its fields are checked one by one by
/// `parse`, and a change that still describes the same sections (say the offset of an empty
/// section) is harmless; there it must only never panic.
#[test]
fn every_single_byte_change_is_detected() {
    for (what, sample) in samples() {
        assert!(exercise(sample), "{what} is valid");
        let mut b = sample.clone();
        for p in 0..b.len() {
            for x in [0x01, 0x80, 0xFF] {
                b[p] ^= x;
                let accepted = exercise(&b);
                assert!(p < hdr::LEN || !accepted, "{what}: byte {p} ^ {x:#x} went unnoticed");
                b[p] ^= x;
            }
        }
    }
}

/// Every truncation and every one-byte extension of every sample is refused.
#[test]
fn every_truncation_is_refused() {
    for (what, sample) in samples() {
        for cut in 0..sample.len() {
            assert!(MeoFile::parse(&sample[..cut]).is_err(), "{what} cut at {cut}");
        }
        let mut longer = sample.clone();
        longer.push(0);
        assert!(MeoFile::parse(&longer).is_err(), "{what} + 1 byte");
    }
}

/// The fuzz seeds (`fuzz/seeds/parse/*.meo`) are the current sample files, so the fuzzer
/// starts from valid files of this format version. `MEO_BLESS=1` rewrites them.
#[test]
fn fuzz_seeds_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/parse");
    let bless = std::env::var_os("MEO_BLESS").is_some();
    for (what, sample) in samples() {
        let path = dir.join(format!("{what}.meo"));
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, sample).unwrap();
        }
        let seed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run with MEO_BLESS=1)", path.display()));
        assert!(seed == *sample, "{} is stale: rerun with MEO_BLESS=1", path.display());
    }
    // Anything else kept there (e.g. minimized crash inputs) must still be handled.
    for entry in std::fs::read_dir(&dir).unwrap() {
        exercise(&std::fs::read(entry.unwrap().path()).unwrap());
    }
}
