//! `cargo +nightly fuzz run hf_config -- -max_total_time=60`: `config.json` → model config
//! (`meo_converter::hf::parse_config`), then the tensor list it implies within a budget, on
//! arbitrary bytes. It must return `Ok` or `Err`, never panic, never hang, never allocate
//! without bound (libFuzzer's `-malloc_limit_mb` catches one large allocation). Seeds:
//! `fuzz/seeds/hf_config/` (the fixtures' `config.json` files).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meo_converter::{canonical, hf};

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Object(raw)) = serde_json::from_slice(data) else { return };
    if let Ok(p) = hf::parse_config(&raw, vec![2]) {
        // A budget like a small checkpoint's: large sizes must fail here, not allocate.
        let _ = canonical::tensors_within(&p.config, 1 << 24, "the fuzz budget");
        let _ = canonical::task_tensors(&p.config, &p.tasks);
    }
});
