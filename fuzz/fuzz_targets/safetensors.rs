//! `cargo +nightly fuzz run safetensors -- -max_total_time=60`: the converter's safetensors
//! parsers on arbitrary bytes. The first byte picks the parser: even, a shard header
//! (`parse_header`); odd, a `model.safetensors.index.json` (`parse_index`). For a header, the
//! next 4 bytes are the data section's length and the rest is the header JSON. Both must
//! return `Ok` or `Err`, never panic or allocate without bound. A header the converter
//! accepts must also be accepted by the `safetensors` crate (the converter is the stricter
//! of the two: it also refuses duplicate keys). Seeds: `fuzz/seeds/safetensors/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meo_converter::hf::checkpoint::{parse_header, parse_index};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    if kind % 2 == 1 {
        if let Ok(text) = std::str::from_utf8(rest) {
            let _ = parse_index(text);
        }
        return;
    }
    let Some((len, header)) = rest.split_first_chunk::<4>() else { return };
    let data_len = u64::from(u32::from_le_bytes(*len));
    let file_len = 8 + header.len() as u64 + data_len;
    if parse_header(header, file_len, 0).is_ok() && data_len <= 1 << 20 {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.resize(file_len as usize, 0);
        if let Err(e) = safetensors::SafeTensors::read_metadata(&file) {
            panic!("accepted by the converter, refused by the safetensors crate: {e:?}");
        }
    }
});
