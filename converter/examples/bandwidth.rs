//! Streaming-read memory bandwidth: `threads` threads each sum their share of a buffer much
//! larger than the caches, repeatedly; prints the best and median GB/s (10^9 bytes/s). This is
//! the ceiling decode speed is compared with (`ci/bench-vs-llamacpp.sh`):
//!
//! ```text
//! cargo run --release -p meo-converter --example bandwidth -- --threads 2
//! ```

use clap::Parser;
use std::time::Instant;

/// Measure streaming-read bandwidth.
#[derive(Parser, Debug)]
struct Args {
    /// Reader threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Buffer size in MiB (well above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Passes over the buffer.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Sums `words` 8 independent lanes at a time so the loop is bound by loads, not by one
/// dependency chain (the compiler vectorises it).
fn sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    for c in chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

fn main() {
    let a = Args::parse();
    let threads = a.threads.max(1);
    let words = a.mib * 1024 * 1024 / 8;
    // Non-zero contents so every page is really backed (not the shared zero page).
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let share = words.div_ceil(threads);
    let mut rates = Vec::with_capacity(a.reps);
    let mut check = 0u64;
    for _ in 0..a.reps.max(1) {
        let t = Instant::now();
        let s: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf.chunks(share).map(|c| sc.spawn(move || sum(c))).collect();
            hs.into_iter().map(|h| h.join().expect("reader thread")).fold(0, u64::wrapping_add)
        });
        let secs = t.elapsed().as_secs_f64();
        check ^= s;
        rates.push((words * 8) as f64 / secs / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    let best = rates[rates.len() - 1];
    let median = rates[rates.len() / 2];
    if a.json {
        println!(
            "{{\"threads\":{threads},\"mib\":{},\"reps\":{},\"best_gb_s\":{best:.3},\"median_gb_s\":{median:.3},\"check\":{check}}}",
            a.mib,
            rates.len()
        );
    } else {
        println!("{threads} threads, {} MiB: best {best:.2} GB/s, median {median:.2} GB/s", a.mib);
    }
}
