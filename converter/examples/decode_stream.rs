//! Where decoding's memory bandwidth goes: one-token block-quantized (`--dtype`) products over matrices far larger
//! than the caches, against two reads of the same number of bytes, pass by pass in turn so
//! that all three see the same machine (on a shared VM the bandwidth moves minute by minute):
//!
//! - `probe`: one contiguous buffer, each thread summing its half (the bandwidth ceiling, as
//!   `examples/bandwidth.rs` measures it);
//! - `read`: the same matrices' bytes as the kernel (quants and scales), split into the same
//!   row tasks on the same pool, only summed;
//! - `kernel`: [`meo::kernels::gemv_many`] over `--experts` matrices per pass, as a decode step
//!   runs a layer's selected experts.
//!
//! So `kernel / read` is what the arithmetic costs, and `read / probe` what the file's layout
//! and the pass structure cost.
//!
//! ```text
//! cargo run --release -p meo-converter --example decode_stream -- --threads 2 [--dtype q4_0]
//! ```

use clap::Parser;
use meo::DType;
use meo::kernels::{Acts, Gemv, MatRef, Parallel, ThreadPool, gemv_many};
use std::time::Instant;

/// Decode kernel against reads of the same bytes.
#[derive(Parser, Debug)]
struct Args {
    /// Threads (the pool's, for all three).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Matrices per pass (a layer's selected experts).
    #[arg(long, default_value_t = 4)]
    experts: usize,
    /// Rows of each matrix.
    #[arg(long, default_value_t = 1280)]
    rows: usize,
    /// Columns of each matrix (a multiple of 32).
    #[arg(long, default_value_t = 1024)]
    cols: usize,
    /// MiB of matrices, walked in turn (well above the last-level cache).
    #[arg(long, default_value_t = 768)]
    mib: usize,
    /// Weight format: q8_0, q4_0 or mxfp4 (the file's layouts: quant plane, then scale plane).
    #[arg(long, default_value = "q8_0", value_parser = parse_dtype)]
    dtype: DType,
    /// Rounds; each runs every variant over the whole set of matrices.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
}

/// Sum of `b` as little-endian u64 words (tail bytes added one by one), vectorised.
fn sum_bytes(b: &[u8]) -> u64 {
    // SAFETY: every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let rest: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    for c in chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    let bytes = head.iter().chain(tail).fold(0u64, |a, &v| a.wrapping_add(u64::from(v)));
    acc.iter().fold(rest.wrapping_add(bytes), |a, &w| a.wrapping_add(w))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "q8_0" => Ok(DType::Q8_0),
        "q4_0" => Ok(DType::Q4_0),
        "mxfp4" => Ok(DType::MXFP4),
        _ => Err(format!("{s}: not one of q8_0, q4_0, mxfp4")),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = Args::parse();
    assert!(a.cols % 32 == 0 && a.rows > 0 && a.experts > 0, "--cols a multiple of 32, --rows and --experts > 0");
    let (rows, cols) = (a.rows, a.cols);
    // One matrix quantized as the converter does (quant plane, then the 64-byte aligned scale
    // plane), copied into every slot of the pool.
    let vals: Vec<f32> =
        (0..rows * cols).map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) % 1000) as f32 / 1000.0 - 0.5).collect();
    let one = meo::quant::quantize_as(a.dtype, &vals, rows, cols, None);
    let len = one.len();
    // Quant bytes per row and scale bytes per row: the two planes' row strides.
    let qrow = if a.dtype == DType::Q8_0 { cols } else { cols / 2 };
    let soff = (rows * qrow).div_ceil(64) * 64;
    let srow = (len - soff) / rows;
    let stride = len.div_ceil(4096) * 4096;
    let nmat = (a.mib << 20) / stride;
    assert!(nmat >= 2 * a.experts, "--mib too small for two passes");
    let mut pool = vec![0u8; nmat * stride];
    for m in pool.chunks_exact_mut(stride) {
        m[..len].copy_from_slice(&one);
    }
    let mats: Vec<MatRef<'_>> =
        pool.chunks_exact(stride).map(|m| MatRef::new(a.dtype, rows, cols, &m[..len]).expect("matrix shape")).collect();
    let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let acts = Acts::new(&x, 1);
    let par = ThreadPool::new(a.threads.max(1)).expect("thread pool");
    let threads = par.threads();
    let pass_bytes = a.experts * len;
    // At least 1 GiB and two passes: well above the caches, like the matrices.
    let probe_len = (1usize << 30).max(2 * pass_bytes);
    let probe: Vec<u8> = (0..probe_len).map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8).collect();
    // gemv_many's split (kernels/mod.rs): ≈ 8 tasks per thread, a multiple of 16 rows, at most
    // one matrix; one thread runs whole matrices.
    let total = a.experts * rows;
    let task_rows = if threads == 1 { rows } else { (total.div_ceil(8 * threads).div_ceil(16) * 16).min(rows) };
    let tasks_per_mat = rows.div_ceil(task_rows);
    let mut out = vec![0.0f32; a.experts * rows];
    let mut sink = 0u64;
    let (mut at_kernel, mut at_read, mut at_probe) = (0usize, nmat / 2, 0usize);
    let mut rates: [Vec<f64>; 3] = Default::default();
    println!(
        "{threads} threads, {} matrices of {rows}×{cols} {:?} per pass ({pass_bytes} bytes), {nmat} in turn",
        a.experts, a.dtype
    );
    for round in 0..a.rounds {
        let mut secs = [0.0f64; 3];
        let passes = nmat / a.experts;
        for p in 0..passes {
            for k in 0..3 {
                let v = (k + p) % 3; // rotate the order, so no variant always follows another
                let t = Instant::now();
                match v {
                    0 => {
                        if at_probe + pass_bytes > probe.len() {
                            at_probe = 0;
                        }
                        let seg = &probe[at_probe..][..pass_bytes];
                        at_probe += pass_bytes;
                        let share = pass_bytes.div_ceil(threads);
                        let mut sums = vec![0.0f32; threads];
                        par.for_each_chunk(&mut sums, 1, &|i, o: &mut [f32]| {
                            let s = &seg[(i * share).min(seg.len())..((i + 1) * share).min(seg.len())];
                            o[0] = sum_bytes(s) as f32;
                        });
                        sink = sink.wrapping_add(sums[0] as u64);
                    }
                    1 => {
                        if at_read + a.experts > nmat {
                            at_read = 0;
                        }
                        let first = at_read;
                        at_read += a.experts;
                        let mut sums = vec![0.0f32; a.experts * tasks_per_mat];
                        par.for_each_chunk(&mut sums, 1, &|i, o: &mut [f32]| {
                            let (m, r0) = (first + i / tasks_per_mat, (i % tasks_per_mat) * task_rows);
                            let n = task_rows.min(rows - r0);
                            let b = mats[m].bytes();
                            let q = sum_bytes(&b[r0 * qrow..(r0 + n) * qrow]);
                            let s = sum_bytes(&b[soff + r0 * srow..soff + (r0 + n) * srow]);
                            o[0] = q.wrapping_add(s) as f32;
                        });
                        sink = sink.wrapping_add(sums[0] as u64);
                    }
                    _ => {
                        if at_kernel + a.experts > nmat {
                            at_kernel = 0;
                        }
                        let jobs: Vec<Gemv<'_, '_>> =
                            mats[at_kernel..][..a.experts].iter().map(|&w| Gemv { x: &acts, w, glu: None }).collect();
                        at_kernel += a.experts;
                        gemv_many(&par, &jobs, &mut out);
                        sink = sink.wrapping_add(out[0].to_bits() as u64);
                    }
                }
                secs[v] += t.elapsed().as_secs_f64();
            }
        }
        let gb: Vec<f64> = secs.iter().map(|s| (passes * pass_bytes) as f64 / s / 1e9).collect();
        for (r, g) in rates.iter_mut().zip(&gb) {
            r.push(*g);
        }
        println!(
            "round {round}: probe {:.2}  read {:.2}  kernel {:.2} GB/s   kernel/read {:.3}  read/probe {:.3}  kernel/probe {:.3}",
            gb[0],
            gb[1],
            gb[2],
            gb[2] / gb[1],
            gb[1] / gb[0],
            gb[2] / gb[0]
        );
    }
    let ratio = |i: usize, j: usize| {
        let mut v: Vec<f64> = rates[i].iter().zip(&rates[j]).map(|(a, b)| a / b).collect();
        median(&mut v)
    };
    let (kr, rp, kp) = (ratio(2, 1), ratio(1, 0), ratio(2, 0));
    let med: Vec<f64> = rates.iter().map(|r| median(&mut r.clone())).collect();
    println!(
        "median GB/s: probe {:.2}, read {:.2}, kernel {:.2}; median ratios: kernel/read {kr:.3}, read/probe {rp:.3}, kernel/probe {kp:.3} (checksum {})",
        med[0],
        med[1],
        med[2],
        sink & 1
    );
}
