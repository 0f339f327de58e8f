//! Canonical tensor names inside a `.meo` file (the converter's output, the runtime's input).
//!
//! Shapes follow the `[out, in]` convention of the checkpoints. Norm weights, biases and
//! routers are always f32; dense matrices f16 or f32; expert matrices q8_0, f16 or f32.
//! Expert matrices are named `<layer>.experts.<e>.<gate|up|down>` so they form slabs.

use alloc::format;
use alloc::string::String;

/// `[vocab, hidden]` token embeddings.
pub const EMBED: &str = "embed.weight";
/// `[hidden]` final norm.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// `[vocab, hidden]` LM head (absent when `model.tie_word_embeddings`).
pub const OUTPUT: &str = "output.weight";

/// `layers.{l}.{suffix}`, e.g. `layer(3, "attn.q.weight")`.
///
/// Per-layer suffixes: `attn_norm.weight` `[h]`; `attn.{q,k,v}.weight` `[heads·hd, h]` and
/// `attn.{q,k,v}.bias` (when `model.attention_bias`); `attn.o.weight` `[h, heads·hd]`;
/// `attn.{q,k}_norm.weight` (`[hd]` per-head or `[heads·hd]` full); `ffn_norm.weight` `[h]`;
/// dense FFN `ffn.{gate,up}.weight` `[i, h]`, `ffn.down.weight` `[h, i]`; MoE
/// `router.weight` `[experts, h]` (+ `router.bias`, `router.selection_bias` `[experts]`);
/// shared expert `shared.{gate,up,down}.weight` and `shared_gate.weight` `[1, h]`.
pub fn layer(l: usize, suffix: &str) -> String {
    format!("layers.{l}.{suffix}")
}

/// Routed expert matrix: `part` is `gate` or `up` (`[i, h]`) or `down` (`[h, i]`).
pub fn expert(l: usize, e: usize, part: &str) -> String {
    format!("layers.{l}.experts.{e}.{part}")
}

/// Order of an expert's matrices inside its slab.
pub const EXPERT_PARTS: [&str; 3] = ["gate", "up", "down"];
