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
/// `[hidden]` final norm bias (`model.norm = layer`).
pub const OUTPUT_NORM_BIAS: &str = "output_norm.bias";
/// LM head bias (`model.output_bias`).
pub const OUTPUT_BIAS: &str = "output.bias";
/// `[max_position_embeddings, hidden]` learned positions (`model.positions = learned`).
pub const POS_EMBED: &str = "pos_embed.weight";
/// `[buckets, heads]` relative position bias (`model.positions = relative`), f32, shared by
/// every layer (T5/Switch keep it in the first layer).
pub const REL_BIAS: &str = "rel_bias.weight";

/// The two expert banks of an MEO-native layer (`model.layer_ffn = meo_bank`), in order.
pub const MEO_BANKS: [&str; 2] = ["fc1", "fc2"];
/// Order of a bank expert's tensors inside its slab: `weight` `[out, in]` (`--experts` dtype),
/// then `bias` `[out]` (f32).
pub const BANK_EXPERT_PARTS: [&str; 2] = ["weight", "bias"];

/// Expert `e` of MEO bank `bank` (`fc1`/`fc2`) of layer `l`:
/// `layers.{l}.{bank}.experts.{e}.{weight|bias}`, one slab per expert.
pub fn bank_expert(l: usize, bank: &str, e: usize, part: &str) -> String {
    format!("layers.{l}.{bank}.experts.{e}.{part}")
}

/// A task's precomputed merged MEO bank: `tasks.{task}.layers.{l}.{bank}.experts.merged.{part}`
/// (slab `tasks.{task}.layers.{l}.{bank}.experts.merged`), shapes as [`bank_expert`].
pub fn task_bank_expert(task: &str, l: usize, bank: &str, part: &str) -> String {
    format!("tasks.{task}.layers.{l}.{bank}.experts.merged.{part}")
}

/// `layers.{l}.{suffix}`, e.g. `layer(3, "attn.q.weight")`.
///
/// Per-layer suffixes: `attn_norm.weight` `[h]`; `attn.{q,k,v}.weight` `[heads·hd, h]` and
/// `attn.{q,k,v}.bias` (when `model.attention_bias`); `attn.o.weight` `[h, heads·hd]`;
/// `attn.{q,k}_norm.weight` (`[hd]` per-head or `[heads·hd]` full); `ffn_norm.weight` `[h]`;
/// dense FFN `ffn.{gate,up}.weight` `[i, h]`, `ffn.down.weight` `[h, i]`; MoE
/// `router.weight` `[experts, h]` (+ `router.bias`, `router.selection_bias` `[experts]`);
/// shared expert `shared.{gate,up,down}.weight` and `shared_gate.weight` `[1, h]`;
/// `attn.sinks` `[heads]` (when `model.attention_sinks`).
///
/// With `model.norm = layer`: `attn_norm.bias`, `ffn_norm.bias` `[h]`. With
/// `model.attention_out_bias`: `attn.o.bias` `[h]`. MEO banks (`{bank}` = `fc1` `[h → i]`,
/// `fc2` `[i → h]`): `{bank}.router.weight` `[experts, in]` (f32) and, when
/// `model.meo_token_bottleneck` r > 0, `{bank}.token.down.weight` `[r, in]`,
/// `{bank}.token.down.bias` `[r]`, `{bank}.token.up.weight` `[in, r]`, `{bank}.token.up.bias`
/// `[in]`; experts as [`bank_expert`].
pub fn layer(l: usize, suffix: &str) -> String {
    format!("layers.{l}.{suffix}")
}

/// Routed expert matrix: `part` is `gate` or `up` (`[i, h]`) or `down` (`[h, i]`).
pub fn expert(l: usize, e: usize, part: &str) -> String {
    format!("layers.{l}.experts.{e}.{part}")
}

/// Order of an expert's matrices inside its slab (ungated experts, `model.ffn_activation =
/// relu`, have no `gate`).
pub const EXPERT_PARTS: [&str; 3] = ["gate", "up", "down"];

/// An expert's biases (`model.expert_bias`; f32, `[i]`, `[i]`, `[h]`), in its slab after its
/// matrices, in this order.
pub const EXPERT_BIAS_PARTS: [&str; 3] = ["gate_bias", "up_bias", "down_bias"];

/// Longest task name, in bytes (keeps metadata keys and tensor names short).
pub const MAX_TASK_NAME: usize = 64;

/// Whether `name` may name a task: 1–64 bytes of `[A-Za-z0-9_-]`.
pub fn valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TASK_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A precomputed (task) merged expert's matrix: `tasks.<task>.layers.<l>.experts.merged.<part>`,
/// shapes as [`expert`]. Its slab key is `tasks.<task>.layers.<l>.experts.merged`.
pub fn task_expert(task: &str, l: usize, part: &str) -> String {
    format!("tasks.{task}.layers.{l}.experts.merged.{part}")
}

/// Metadata keys of the generation defaults, from the checkpoint's `generation_config.json`
/// (see `docs/FORMAT.md` §6). Each is present only when the checkpoint names it.
pub mod generation_keys {
    /// f64: sampling temperature.
    pub const TEMPERATURE: &str = "generation.temperature";
    /// f64: nucleus sampling threshold.
    pub const TOP_P: &str = "generation.top_p";
    /// u64: keep the `top_k` most likely tokens (0 = no limit).
    pub const TOP_K: &str = "generation.top_k";
    /// f64: min-p threshold (when sampling).
    pub const MIN_P: &str = "generation.min_p";
    /// f64: repetition penalty (greedy decoding too, as transformers).
    pub const REPETITION_PENALTY: &str = "generation.repetition_penalty";
    /// bool: sample (true) or decode greedily (false, transformers' default).
    pub const DO_SAMPLE: &str = "generation.do_sample";
}

/// Metadata keys of MEO merges (see `docs/FORMAT.md` §6 and `docs/MEO-MERGING.md`).
pub mod merge_keys {
    use alloc::format;
    use alloc::string::String;

    /// array of str: the task names, in file order.
    pub const TASKS: &str = "merge.tasks";
    /// bool: experts are stored with their intermediate units aligned to expert 0.
    pub const ALIGNED: &str = "merge.aligned";
    /// array of u64: MoE layers with a measured prompt-mode merge error.
    pub const PROMPT_LAYERS: &str = "merge.prompt.layers";
    /// array of f64: their errors, same order.
    pub const PROMPT_ERRORS: &str = "merge.prompt.errors";

    /// `merge.task.<task>.<field>`; fields: `layers` (array u64), `weights` (array f64,
    /// `layers × experts`), `errors` and `errors_unaligned` (array f64 per layer), `tokens`
    /// (u64), `weighting` (str).
    pub fn task(task: &str, field: &str) -> String {
        format!("merge.task.{task}.{field}")
    }

    /// `merge.align.layer.<l>.order`: bytes, `experts × intermediate` u32 little-endian; row
    /// `e` lists, for each stored unit of expert `e`, its index in the checkpoint.
    pub fn align_order(l: usize) -> String {
        format!("merge.align.layer.{l}.order")
    }
}
