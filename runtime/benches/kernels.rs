//! Matmul kernel throughput: `cargo bench -p meo-runtime --bench kernels`.
//!
//! - `decode/*`: one token (`T = 1`), memory bound: throughput is weight bytes/s (GB/s).
//! - `prompt/*`: 64 tokens, compute bound: throughput "elements" are operations
//!   (2·out·in·T, a multiply-add counting two), so criterion's `Gelem/s` reads as GOP/s.
//! - `<q>_decode/<kernel>/*` and `<q>_gemm_t128/<kernel>/*` for `q` in `q8_0`, `q4_0`,
//!   `mxfp4`: each block dtype with each micro-kernel this CPU runs for it (AVX2, AVX-VNNI,
//!   AVX-512 VNNI, NEON, …): decode in GB/s of weights, 128 tokens in GOP/s;
//!   `<q>_expert_t16/*`: the shape of one expert of a small MoE in prompt processing
//!   (1280 × 1024, 16 tokens routed to it). Compare dtypes by time, not GB/s: a 4-bit matrix
//!   has about half the bytes of a Q8_0 one.
//!
//! `1t` is one thread, `ntN` a pool of N threads.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meo::DType;
use meo::kernels::{
    MatRef, Parallel, Serial, ThreadPool, block_kernel_names, default_threads, matmul, matmul_block_kernel,
};
use std::hint::black_box;
use std::time::Duration;

const OUT: usize = 2048;
const IN: usize = 2048;
const PROMPT: usize = 64;
const GEMM_T: usize = 128;

fn weights(dtype: DType, out: usize, inp: usize) -> Vec<u8> {
    let vals: Vec<f32> = (0..out * inp).map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5).collect();
    match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        DType::Q8_0 | DType::Q4_0 | DType::MXFP4 => meo::quant::quantize_as(dtype, &vals, out, inp, None),
    }
}

fn acts(t: usize, inp: usize) -> Vec<f32> {
    (0..t * inp).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect()
}

fn bench(c: &mut Criterion) {
    let threads = default_threads();
    let pool = ThreadPool::new(threads).expect("thread pool");
    let nt = format!("nt{threads}");
    let pars: [(&str, &dyn Parallel); 2] = [("1t", &Serial), (&nt, &pool)];
    let x = acts(GEMM_T, IN);
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0] {
        let bytes = weights(dtype, OUT, IN);
        let w = MatRef::new(dtype, OUT, IN, &bytes).expect("shape");
        let mut g = c.benchmark_group("decode");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        for (name, par) in pars {
            let mut y = vec![0.0; OUT];
            g.bench_function(BenchmarkId::new(dtype.name(), name), |b| {
                b.iter(|| matmul(par, black_box(&x[..IN]), 1, &w, &mut y))
            });
        }
        g.finish();
        let mut g = c.benchmark_group("prompt");
        g.throughput(Throughput::Elements((2 * OUT * IN * PROMPT) as u64));
        g.sample_size(10);
        for (name, par) in pars {
            let mut y = vec![0.0; OUT * PROMPT];
            g.bench_function(BenchmarkId::new(dtype.name(), name), |b| {
                b.iter(|| matmul(par, black_box(&x[..PROMPT * IN]), PROMPT, &w, &mut y))
            });
        }
        g.finish();
    }

    // The block dtypes, every micro-kernel this CPU runs for each.
    for dtype in [DType::Q8_0, DType::Q4_0, DType::MXFP4] {
        block_dtype(c, dtype, &pars, &x);
    }
}

fn block_dtype(c: &mut Criterion, dtype: DType, pars: &[(&str, &dyn Parallel); 2], x: &[f32]) {
    let (pars, q) = (*pars, dtype.name());
    let bytes = weights(dtype, OUT, IN);
    let w = MatRef::new(dtype, OUT, IN, &bytes).expect("shape");
    let (eo, ei, et) = (1280, 1024, 16);
    let ebytes = weights(dtype, eo, ei);
    let ew = MatRef::new(dtype, eo, ei, &ebytes).expect("shape");
    let ex = acts(et, ei);
    for kern in block_kernel_names(dtype) {
        let mut g = c.benchmark_group(format!("{q}_decode"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.measurement_time(Duration::from_secs(3));
        for (name, par) in pars {
            let mut y = vec![0.0; OUT];
            g.bench_function(BenchmarkId::new(&kern, name), |b| {
                b.iter(|| assert!(matmul_block_kernel(&kern, par, black_box(&x[..IN]), 1, &w, &mut y)))
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("{q}_gemm_t128"));
        g.throughput(Throughput::Elements((2 * OUT * IN * GEMM_T) as u64));
        g.sample_size(10);
        for (name, par) in pars {
            let mut y = vec![0.0; OUT * GEMM_T];
            g.bench_function(BenchmarkId::new(&kern, name), |b| {
                b.iter(|| assert!(matmul_block_kernel(&kern, par, black_box(x), GEMM_T, &w, &mut y)))
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("{q}_expert_t16"));
        g.throughput(Throughput::Elements((2 * eo * ei * et) as u64));
        g.measurement_time(Duration::from_secs(3));
        for (name, par) in pars {
            let mut y = vec![0.0; eo * et];
            g.bench_function(BenchmarkId::new(&kern, name), |b| {
                b.iter(|| assert!(matmul_block_kernel(&kern, par, black_box(&ex), et, &ew, &mut y)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
