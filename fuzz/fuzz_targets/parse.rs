//! `cargo +nightly fuzz run parse -- -max_total_time=60`: the `.meo` reader on arbitrary bytes.
//! It must return `Ok` or `Err`, never panic, never read out of bounds, never allocate
//! without bound. Seeds: `fuzz/seeds/parse/` (small valid files; see `docs/FORMAT.md`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meo::MeoFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = MeoFile::parse(data) {
        for t in f.tensors() {
            let _ = f.data(t);
        }
        for s in f.slabs() {
            let _ = f.slab_range(s);
        }
        let _ = meo::ModelConfig::from_metadata(&f.metadata);
        let _ = f.verify();
    }
});
