//! Writes a synthetic Mixtral-like `.meo` model of a chosen size (random int8 experts, f16
//! dense weights), e.g. for `meo bench`:
//!
//! ```text
//! cargo run --release -p meo-converter --example synth -- --size-gb 1.5 -o /tmp/big.meo
//! ```
//!
//! The file is deterministic for a given set of flags. With `--size-gb`, the number of layers
//! is chosen to reach that size; the other flags set the shape.

mod model;

use clap::Parser;
use meo::DType;
use model::SynthSpec;
use std::path::PathBuf;
use std::process::ExitCode;

/// Write a synthetic Mixtral-like .meo model with random weights.
#[derive(Parser, Debug)]
struct Args {
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
    /// Target file size in GB (10^9 bytes); sets --layers.
    #[arg(long)]
    size_gb: Option<f64>,
    /// Decoder layers (ignored with --size-gb).
    #[arg(long, default_value_t = 14)]
    layers: usize,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 32)]
    experts: usize,
    /// Experts selected per token.
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// Expert intermediate (FFN) width.
    #[arg(long, default_value_t = 1024)]
    expert_intermediate: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Expert dtype: q8_0, q4_0, mxfp4, f16 or f32.
    #[arg(long, default_value = "q8_0")]
    experts_dtype: String,
    /// Dense dtype: f16 or f32.
    #[arg(long, default_value = "f16")]
    dense_dtype: String,
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
}

fn dtype(s: &str) -> Result<DType, String> {
    match s {
        "q8_0" | "int8" => Ok(DType::Q8_0),
        "q4_0" | "int4" => Ok(DType::Q4_0),
        "mxfp4" => Ok(DType::MXFP4),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("unknown dtype {s:?} (q8_0, q4_0, mxfp4, f16, bf16, f32)")),
    }
}

fn run(a: &Args) -> Result<(), model::Error> {
    let mut spec = SynthSpec {
        vocab: a.vocab,
        hidden: a.hidden,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        layers: a.layers,
        experts: a.experts,
        top_k: a.top_k,
        expert_intermediate: a.expert_intermediate,
        experts_dtype: dtype(&a.experts_dtype)?,
        dense_dtype: dtype(&a.dense_dtype)?,
        seed: a.seed,
        ..SynthSpec::default()
    };
    if let Some(gb) = a.size_gb {
        if !(gb.is_finite() && gb > 0.0) {
            return Err(format!("--size-gb must be > 0, got {gb}").into());
        }
        spec.fit_layers((gb * 1e9) as u64);
    }
    eprintln!(
        "writing {}: {} layers × {} experts (top-{}), hidden {}, expert width {}, experts {}, dense {}, ≈ {:.2} GB",
        a.output.display(),
        spec.layers,
        spec.experts,
        spec.top_k,
        spec.hidden,
        spec.expert_intermediate,
        spec.experts_dtype.name(),
        spec.dense_dtype.name(),
        spec.approx_bytes() as f64 / 1e9
    );
    let t = std::time::Instant::now();
    let mut last = 0u64;
    let len = model::write(&spec, &a.output, |done, total| {
        if done * 10 / total.max(1) != last {
            last = done * 10 / total.max(1);
            eprint!("{}% ", last * 10);
        }
    })?;
    eprintln!();
    eprintln!("wrote {} bytes in {:.1} s", len, t.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
