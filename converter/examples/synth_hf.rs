//! Writes a synthetic Mixtral-shaped Hugging Face checkpoint directory (bf16, sharded, random
//! weights), to measure `meo convert` on a model larger than the fixtures:
//!
//! ```text
//! cargo run --release -p meo-converter --example synth_hf -- /tmp/synth-hf
//! /usr/bin/time -v target/release/meo convert /tmp/synth-hf -o /tmp/synth.meo
//! ```
//!
//! Deterministic for a given set of flags. Nothing is held in memory beyond one tensor.

use clap::Parser;
use half::bf16;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

/// Write a synthetic Mixtral-shaped bf16 checkpoint (config.json, sharded safetensors + index).
#[derive(Parser, Debug)]
struct Args {
    /// Output directory (created).
    dir: PathBuf,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 3584)]
    intermediate: usize,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Write the transformers-5 fused expert tensors instead of per-expert ones.
    #[arg(long)]
    fused: bool,
    /// Approximate shard size in MB.
    #[arg(long, default_value_t = 512)]
    shard_mb: u64,
}

struct Rng(u64);

impl Rng {
    /// Roughly N(0, 0.02) from the sum of four uniforms; xorshift64*.
    fn next(&mut self) -> f32 {
        let mut s = 0.0;
        for _ in 0..4 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            s += u - 0.5;
        }
        s * 0.035
    }
}

fn main() -> std::io::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.dir)?;
    let (h, i, e, v) = (a.hidden as u64, a.intermediate as u64, a.experts as u64, a.vocab as u64);
    let (heads, kv, hd) = (8u64, 2u64, h / 8);
    let mut tensors: Vec<(String, Vec<u64>)> = vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..a.layers {
        let p = format!("model.layers.{l}");
        let moe = if a.fused { "mlp" } else { "block_sparse_moe" };
        tensors.push((format!("{p}.input_layernorm.weight"), vec![h]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![heads * hd, h]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, h]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, h]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![h, heads * hd]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        tensors.push((format!("{p}.{moe}.gate.weight"), vec![e, h]));
        if a.fused {
            tensors.push((format!("{p}.mlp.experts.gate_up_proj"), vec![e, 2 * i, h]));
            tensors.push((format!("{p}.mlp.experts.down_proj"), vec![e, h, i]));
        } else {
            for x in 0..e {
                for (w, shape) in [("w1", vec![i, h]), ("w2", vec![h, i]), ("w3", vec![i, h])] {
                    tensors.push((format!("{p}.{moe}.experts.{x}.{w}.weight"), shape));
                }
            }
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![v, h]));

    // Split into shards of about shard_mb.
    let mut shards: Vec<Vec<(String, Vec<u64>)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let bytes = t.1.iter().product::<u64>() * 2;
        if size > 0 && size + bytes > a.shard_mb << 20 {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push(t);
    }
    let n = shards.len();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for (t, shape) in shard {
            let len = shape.iter().product::<u64>() * 2;
            header.insert(
                t.clone(),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len]}),
            );
            weight_map.insert(t.clone(), name.clone().into());
            off += len;
        }
        let mut hj = serde_json::to_vec(&header)?;
        while hj.len() % 8 != 0 {
            hj.push(b' ');
        }
        let mut w = BufWriter::with_capacity(1 << 20, File::create(a.dir.join(&name))?);
        w.write_all(&(hj.len() as u64).to_le_bytes())?;
        w.write_all(&hj)?;
        for (t, shape) in shard {
            let norm = t.ends_with("layernorm.weight") || t.ends_with("norm.weight");
            for _ in 0..shape.iter().product::<u64>() {
                let x = if norm { 1.0 + rng.next() } else { rng.next() };
                w.write_all(&bf16::from_f32(x).to_le_bytes())?;
            }
        }
        w.flush()?;
        total += off;
        eprintln!("{name}: {} tensors, {off} bytes", shard.len());
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(a.dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": a.layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_local_experts": e, "num_experts_per_tok": a.top_k,
        "vocab_size": v, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "rope_theta": 1e6, "sliding_window": null, "tie_word_embeddings": false,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "eos_token_id": 2, "bos_token_id": 1
    });
    std::fs::write(a.dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    eprintln!("{}: {n} shards, {total} bytes of weights", a.dir.display());
    Ok(())
}
