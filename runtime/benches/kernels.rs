//! Matmul kernel throughput: `cargo bench -p meo-runtime --bench kernels`.
//!
//! - `decode/*`: one token (`T = 1`), memory bound: throughput is weight bytes/s (GB/s).
//! - `prompt/*`: 64 tokens, compute bound: throughput "elements" are floating-point
//!   operations (2·out·in·T), so criterion's `Kelem/s` reads as kFLOP/s (GFLOP/s = Gelem/s).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meo::DType;
use meo::kernels::{MatRef, Parallel, Serial, ThreadPool, default_threads, matmul};
use std::hint::black_box;

const OUT: usize = 2048;
const IN: usize = 2048;
const PROMPT: usize = 64;

fn weights(dtype: DType) -> Vec<u8> {
    let vals: Vec<f32> = (0..OUT * IN).map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5).collect();
    match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        DType::Q8_0 => meo::quant::quantize(&vals, OUT, IN),
    }
}

fn bench(c: &mut Criterion) {
    let threads = default_threads();
    let pool = ThreadPool::new(threads).expect("thread pool");
    let pars: [(&str, &dyn Parallel); 2] = [("1t", &Serial), ("nt", &pool)];
    let x: Vec<f32> = (0..PROMPT * IN).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0] {
        let bytes = weights(dtype);
        let w = MatRef::new(dtype, OUT, IN, &bytes).expect("shape");
        let mut g = c.benchmark_group("decode");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        for (name, par) in pars {
            let mut y = vec![0.0; OUT];
            g.bench_function(BenchmarkId::new(dtype.name(), format!("{name}{threads}")), |b| {
                b.iter(|| matmul(par, black_box(&x[..IN]), 1, &w, &mut y))
            });
        }
        g.finish();
        let mut g = c.benchmark_group("prompt");
        g.throughput(Throughput::Elements((2 * OUT * IN * PROMPT) as u64));
        g.sample_size(10);
        for (name, par) in pars {
            let mut y = vec![0.0; OUT * PROMPT];
            g.bench_function(BenchmarkId::new(dtype.name(), format!("{name}{threads}")), |b| {
                b.iter(|| matmul(par, black_box(&x), PROMPT, &w, &mut y))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
