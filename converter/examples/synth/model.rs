//! Synthetic `.meo` models: a Mixtral-like config with random weights, written tensor by
//! tensor with the real writer ([`MeoWriter`]) in the canonical layout
//! ([`meo_converter::canonical`]), so the runtime opens them like converted checkpoints.
//!
//! Weights are deterministic for a seed and scaled so activations stay O(1): every matrix is
//! uniform with standard deviation `1/sqrt(cols)`, norms are 1, routers give logits of
//! standard deviation ≈ 1 (so routing spreads over the experts). Q8_0 experts are written
//! directly as random int8 values with one scale per block, not quantized from f32.
//!
//! Shared by `examples/synth/main.rs` and the laziness test (`tests/tests/laziness.rs`).

#![allow(dead_code)] // each includer uses a part

use meo::format::{DEFAULT_ALIGNMENT, MetaValue, Metadata};
use meo::sample::{Pcg32, splitmix64};
use meo::{DType, FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring, quant};
use meo_converter::canonical::{self, Role};
use meo_converter::writer::{AtomicFile, MeoWriter, TensorSpec};
use std::io::BufWriter;
use std::path::Path;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Shape and storage of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_intermediate: usize,
    pub experts_dtype: DType,
    pub dense_dtype: DType,
    pub seed: u64,
    pub alignment: u32,
}

impl Default for SynthSpec {
    /// Mixtral-shaped, about 1.5 GB: hidden 1024, 32 experts of width 1024 (top-4), 14 layers.
    fn default() -> Self {
        Self {
            vocab: 32000,
            hidden: 1024,
            heads: 16,
            kv_heads: 4,
            head_dim: 64,
            layers: 14,
            experts: 32,
            top_k: 4,
            expert_intermediate: 1024,
            experts_dtype: DType::Q8_0,
            dense_dtype: DType::F16,
            seed: 0x5EED,
            alignment: DEFAULT_ALIGNMENT,
        }
    }
}

impl SynthSpec {
    /// The model config (all layers MoE, Mixtral routing: softmax, top-k, renormalised).
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            architecture: "mixtral".into(),
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            max_position_embeddings: 4096,
            attention_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            tie_word_embeddings: false,
            intermediate_size: 0,
            expert_intermediate_size: self.expert_intermediate,
            shared_expert_intermediate_size: 0,
            layer_ffn: vec![FfnKind::Moe; self.layers],
            layer_window: vec![0; self.layers],
            eos_token_ids: vec![2],
            router: RouterSpec {
                norm_topk_prob: true,
                ..RouterSpec::plain(self.experts, self.top_k, Scoring::Softmax)
            },
            recipe: meo::config::Recipe::default(),
        }
    }

    /// The tensors, in file order, with their dtypes.
    pub fn tensors(&self) -> Vec<(TensorSpec, Role)> {
        canonical::tensors(&self.config())
            .into_iter()
            .map(|c| {
                let dtype = c.dtype(self.dense_dtype, self.experts_dtype);
                (TensorSpec { name: c.name, dtype, shape: c.shape }, c.role)
            })
            .collect()
    }

    /// Approximate file size in bytes (tensor bytes, without padding).
    pub fn approx_bytes(&self) -> u64 {
        self.tensors().iter().map(|(t, _)| t.dtype.byte_len(&t.shape).unwrap_or(0)).sum()
    }

    /// Sets `layers` so the file is about `bytes` long (at least one layer).
    pub fn fit_layers(&mut self, bytes: u64) {
        self.layers = 1;
        let one = self.approx_bytes();
        self.layers = 2;
        let per_layer = self.approx_bytes() - one;
        let fixed = one - per_layer;
        self.layers = (bytes.saturating_sub(fixed) as f64 / per_layer as f64).round().max(1.0) as usize;
    }
}

/// Fills `out` with bytes from `rng`.
fn fill_bytes(rng: &mut Pcg32, out: &mut [u8]) {
    let mut chunks = out.chunks_exact_mut(4);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u32().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = rng.next_u32().to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// Uniform in `[-a, a)`.
fn uniform(rng: &mut Pcg32, a: f32) -> f32 {
    (rng.next_f32() * 2.0 - 1.0) * a
}

/// The bytes of one tensor.
fn tensor_bytes(t: &TensorSpec, role: Role, rng: &mut Pcg32, buf: &mut Vec<u8>) {
    let len = t.dtype.byte_len(&t.shape).expect("valid shape") as usize;
    buf.clear();
    buf.resize(len, 0);
    let cols = *t.shape.last().expect("rank >= 1") as usize;
    let rows = t.shape[..t.shape.len() - 1].iter().product::<u64>() as usize;
    // Uniform with standard deviation 1/sqrt(cols) (router logits then have std ≈ 1 on
    // unit-RMS inputs); norms are 1 and biases 0.
    let a = (3.0 / cols as f32).sqrt();
    let value = |rng: &mut Pcg32| match role {
        Role::Norm => 1.0,
        Role::Bias => 0.0,
        Role::Router | Role::Dense | Role::Expert => uniform(rng, a),
    };
    match t.dtype {
        DType::F32 => {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&value(rng).to_le_bytes());
            }
        }
        DType::F16 => {
            for c in buf.chunks_exact_mut(2) {
                c.copy_from_slice(&half::f16::from_f32(value(rng)).to_le_bytes());
            }
        }
        DType::BF16 => {
            for c in buf.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(value(rng)).to_le_bytes());
            }
        }
        DType::Q8_0 => {
            // Random int8 in [-127, 127] with scale a/127: uniform on [-a, a], as above.
            let stride = quant::row_stride(cols as u64).expect("fits") as usize;
            let soff = quant::scales_offset(rows as u64, cols as u64).expect("fits") as usize;
            for r in 0..rows {
                let row = &mut buf[r * stride..r * stride + cols];
                fill_bytes(rng, row);
                for b in row.iter_mut() {
                    if *b == 0x80 {
                        *b = 0x81; // -128 → -127: symmetric, as the quantizer writes
                    }
                }
            }
            let d = half::f16::from_f32(a / 127.0).to_le_bytes();
            for s in buf[soff..].chunks_exact_mut(2) {
                s.copy_from_slice(&d);
            }
        }
        DType::Q4_0 | DType::MXFP4 => {
            // Random codes; Q4_0 with scale a/8 (uniform on [-a, a)), MXFP4 with the power of
            // two nearest to a/6 (its codes are not uniform, but span ±6 × scale like ±a).
            let p = quant::Planar::of(t.dtype).expect("block dtype");
            let soff = p.scales_offset(rows as u64, cols as u64).expect("fits") as usize;
            let codes = rows * p.row_stride(cols as u64).expect("fits") as usize;
            fill_bytes(rng, &mut buf[..codes]);
            if t.dtype == DType::Q4_0 {
                let d = half::f16::from_f32(a / 8.0).to_le_bytes();
                for s in buf[soff..].chunks_exact_mut(2) {
                    s.copy_from_slice(&d);
                }
            } else {
                let e = ((a / 6.0).log2().round() as i32 + 127).clamp(1, 254) as u8;
                buf[soff..].fill(e);
            }
        }
    }
}

/// Writes the model to `path` (through a temporary file renamed into place) and returns the
/// file's size. `progress(done, total)` is called after each tensor with bytes of tensor data.
///
/// # Errors
/// I/O or an invalid spec.
pub fn write(spec: &SynthSpec, path: &Path, mut progress: impl FnMut(u64, u64)) -> Result<u64, Error> {
    let config = spec.config();
    config.validate()?;
    let mut meta = config.to_metadata();
    meta.push(("quant.experts", MetaValue::Str(spec.experts_dtype.name())));
    meta.push(("quant.dense", MetaValue::Str(spec.dense_dtype.name())));
    meta.push(("quant.block_size", MetaValue::U64(quant::QK as u64)));
    meta.push(("general.name", MetaValue::Str("synthetic (random weights)")));
    meta.push(("synth.seed", MetaValue::U64(spec.seed)));
    let meta = Metadata::from_entries(meta);
    let tensors = spec.tensors();
    let total: u64 = tensors.iter().map(|(t, _)| t.dtype.byte_len(&t.shape).unwrap_or(0)).sum();
    let specs = tensors.iter().map(|(t, _)| t.clone()).collect();
    let (atomic, file) = AtomicFile::create(path)?;
    let mut w = MeoWriter::new(BufWriter::with_capacity(1 << 20, file), &meta, specs, spec.alignment)?;
    let mut buf = Vec::new();
    let mut done = 0;
    for (i, (t, role)) in tensors.iter().enumerate() {
        let mut s = spec.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = Pcg32::new(splitmix64(&mut s), splitmix64(&mut s));
        tensor_bytes(t, *role, &mut rng, &mut buf);
        w.write_tensor(&buf)?;
        done += buf.len() as u64;
        progress(done, total);
    }
    let file = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    let len = file.metadata()?.len();
    atomic.commit(file)?;
    Ok(len)
}
