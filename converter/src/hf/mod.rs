//! Hugging Face checkpoint directories: which family a `config.json` describes, the
//! canonical [`ModelConfig`] it gives, and where each canonical tensor's values live in the
//! safetensors files (a whole tensor, or one expert's rows of a fused 3-D tensor).
//!
//! A family is data (one [`Family`] table per file), not branches in the code.

pub mod chat;
pub mod checkpoint;
pub mod config;
mod deepseek_v2;
mod deepseek_v3;
mod dots1;
mod ernie4_5_moe;
mod glm4_moe;
mod gpt_oss;
mod granitemoe;
mod granitemoehybrid;
mod hunyuan_v1_moe;
mod lfm2_moe;
mod llama4;
pub mod meo_gpt2;
mod mixtral;
mod olmoe;
mod phimoe;
pub mod quantized;
mod qwen2_moe;
mod qwen3_5_moe;
mod qwen3_moe;
mod qwen3_next;
pub mod switch_transformers;

use crate::canonical::{Canon, Place};
use anyhow::{Context, Result, bail, ensure};
use checkpoint::Checkpoint;
use meo::{FfnKind, ModelConfig, QkNorm, Scoring};
use std::collections::BTreeSet;
use std::path::Path;

/// A boolean setting of a family.
#[derive(Debug, Clone, Copy)]
pub enum Flag {
    /// Always this value.
    Fixed(bool),
    /// `config.json` key, with the value when absent or null.
    Key(&'static str, bool),
    /// `config.json` key that must be false or absent (true is an unsupported variant).
    MustBeFalse(&'static str),
}

/// Which layers use sliding-window attention.
#[derive(Debug, Clone, Copy)]
pub enum Window {
    /// Never.
    None,
    /// Every layer uses `sliding_window` when it is set (and `enabled_by` is true, if named).
    AllLayers { enabled_by: Option<&'static str> },
    /// Per `layer_types` (or transformers' rule for it), when `use_sliding_window`.
    LayerTypes,
    /// Per `layer_types`; without it every even-numbered layer slides (GPT-OSS). No
    /// `use_sliding_window` switch.
    Alternating,
}

/// Everything that distinguishes one supported checkpoint family.
#[derive(Debug)]
pub struct Family {
    /// `general.architecture` of the output, and transformers' `model_type`.
    pub name: &'static str,
    /// The transformers class in `architectures`.
    pub hf_class: &'static str,
    /// `rope_theta` when the config names none (transformers' `default_theta`).
    pub default_rope_theta: f32,
    /// Names of the MoE block under `model.layers.L.`, tried in order.
    pub moe_prefixes: &'static [&'static str],
    /// Per-expert layout: HF names of the gate, up and down projections
    /// (`<moe>.experts.N.<name>.weight`).
    pub expert_names: [&'static str; 3],
    /// `config.json` key of the routed experts' intermediate size.
    pub expert_intermediate_key: &'static str,
    /// Dense MLP layers via `mlp_only_layers` / `decoder_sparse_step`.
    pub dense_layers: bool,
    /// Shared expert with a sigmoid gate (`shared_expert_intermediate_size`).
    pub shared_expert: bool,
    pub qk_norm: QkNorm,
    /// q/k/v biases.
    pub attention_bias: Flag,
    /// Honours `clip_qkv`.
    pub clip_qkv: bool,
    pub window: Window,
    pub norm_topk_prob: Flag,
    /// Family-specific canonical layer suffix → HF name under `model.layers.L.`
    /// (`{moe}` stands for the layer's MoE prefix); looked up before [`COMMON`].
    pub tensors: &'static [(&'static str, &'static str)],
    /// Which layout the rest of the table describes.
    pub kind: Kind,
}

/// The overall layout of a family's checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Llama-style decoder with standard token-routed MoE layers (the fields above).
    Standard,
    /// An MEO-native GPT-2 ([`meo_gpt2`]): its own config keys and tensor names.
    MeoNative,
    /// A Switch Transformers encoder ([`switch_transformers`]): its own config keys and
    /// tensor names.
    Switch,
    /// A DeepSeek-style decoder ([`deepseek_v3`]): MLA attention, its own config keys;
    /// tensors named through the table above like [`Kind::Standard`].
    DeepSeek,
    /// A standard decoder plus the [`Features`] given (Granite-MoE, GPT-OSS).
    Extended(&'static Features),
    /// A decoder whose `config.json` has its own reader ([`OwnConfig`]); tensors named through
    /// the table above like [`Kind::Standard`] (GLM-4.5).
    Own(&'static OwnConfig),
}

/// The config reader of a [`Kind::Own`] family: the model config and the checkpoint layers
/// past the decoder's that are known to be unused (multi-token-prediction modules).
pub type ConfigReader =
    fn(&config::Json<'_>, &'static Family, Vec<u64>) -> Result<(ModelConfig, std::ops::Range<usize>)>;

/// A family's own `config.json` reader and its expert layout features.
pub struct OwnConfig {
    /// Names it in debug output and comparisons.
    pub name: &'static str,
    pub read: ConfigReader,
    /// Its recipe features, known-unused tensor prefixes included.
    pub features: Features,
}

impl std::fmt::Debug for OwnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnConfig({})", self.name)
    }
}

impl PartialEq for OwnConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for OwnConfig {}

impl Kind {
    /// The recipe features of a standard-layout family ([`Features::STANDARD`] for `Standard`).
    pub fn features(self) -> &'static Features {
        match self {
            Self::Extended(f) => f,
            Self::Own(o) => &o.features,
            Self::Standard | Self::MeoNative | Self::Switch | Self::DeepSeek => &Features::STANDARD,
        }
    }
}

/// How a fused expert layout stores one layer's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedLayout {
    /// `gate_up [E, 2I, H]` (gate rows first, then up) and `down [E, H, I]`.
    GateUpRows,
    /// GPT-OSS: transposed, `gate_up [E, H, 2I]` with gate at even and up at odd columns,
    /// `down [E, I, H]`, plus `<gate_up>_bias [E, 2I]` (interleaved alike) and `<down>_bias [E, H]`.
    TransposedInterleaved,
    /// Llama-4: transposed, `gate_up [E, H, 2I]` with gate the first I columns and up the
    /// last I, `down [E, I, H]`; no biases.
    TransposedHalves,
}

/// Recipe features beyond the Llama-style decoder, as data (`Kind::Extended`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// How router logits become weights.
    pub scoring: Scoring,
    /// The router has a bias (`{moe}.router.bias` style, from [`Family::tensors`]).
    pub router_bias: bool,
    /// `o_proj` has a bias whenever q/k/v have one (`attention_bias` covers all four).
    pub out_bias_with_qkv_bias: bool,
    /// `embedding_multiplier`, `residual_multiplier`, `attention_multiplier` (the attention
    /// scale) and `logits_scaling` from the config (Granite).
    pub multipliers: bool,
    /// Per-head attention sink logits (`attn.sinks`, from [`Family::tensors`]).
    pub attention_sinks: bool,
    /// Clamped SwiGLU experts (`swiglu_limit`, `swiglu_alpha`; GPT-OSS).
    pub clamped_swiglu: bool,
    pub fused_layout: FusedLayout,
    /// Fused expert tensor names `(gate_up, down)` under the MoE prefix, tried in order.
    pub fused_names: &'static [(&'static str, &'static str)],
    /// Norm weights are zero-centred (`x̂ · (1 + w)`; Qwen3-Next, Qwen3.5): stored as `1 + w`.
    /// The gated DeltaNet's own output norm is a plain one.
    pub zero_centred_norms: bool,
    /// `q_proj` holds, per head, the query then a gate (`[heads · 2 · head_dim, h]`): the
    /// attention output is gated (`model.attention_output_gate`).
    pub gated_attention: bool,
    /// `partial_rotary_factor` (top level or in `rope_parameters`) is honoured
    /// (`model.rope_dim`).
    pub partial_rotary: bool,
    /// Gated DeltaNet layers where `layer_types` says `linear_attention`, stored this way.
    pub delta_net: Option<DeltaLayout>,
    /// Checkpoint tensor name prefixes the model does not run (multi-token-prediction heads).
    pub ignored_prefixes: &'static [&'static str],
    /// Mamba2 layers where `layer_types` says `mamba` / `linear_attention` (`mamba.*`: a fused
    /// `in_proj` `[inner + conv_dim + heads, h]` = z, then x, B, C, then dt; Granite-4 hybrid).
    pub mamba2: bool,
    /// Every MoE layer adds an ungated shared MLP `shared_intermediate_size` wide
    /// (`shared_mlp.input_linear` `[2S, h]`: gate rows, then up rows; `shared_mlp.output_linear`).
    pub shared_mlp: bool,
    /// RoPE only when `position_embedding_type` is `"rope"`; otherwise no positional encoding
    /// (Granite-4 hybrid).
    pub position_embedding_type: bool,
    /// Gated short convolution layers where `layer_types` says `conv` (`conv.*`: a fused
    /// `in_proj` `[3h, h]` = b, c, x; LFM2).
    pub short_conv: bool,
    /// The final norm's checkpoint name when not `model.norm.weight` (LFM2's
    /// `model.embedding_norm.weight`).
    pub output_norm: Option<&'static str>,
    /// `(from, to)` pairs: checkpoint tensors named `from…` are read as `to…` (a multimodal
    /// checkpoint's text model, e.g. under `model.language_model.`, is the causal LM's `model.`).
    pub renamed_prefixes: &'static [(&'static str, &'static str)],
}

/// How a checkpoint stores a gated DeltaNet layer's input projections (under
/// `model.layers.L.linear_attn.`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaLayout {
    /// Qwen3-Next: `in_proj_qkvz` `[k_heads · (2 k_dim + 2 r v_dim), h]` with per key head its
    /// q, k, then the `r = v_heads / k_heads` value heads' v, then their z; `in_proj_ba`
    /// `[k_heads · 2r, h]` with per key head its r b rows, then its r a rows.
    FusedPerKeyHead,
    /// Qwen3.5: `in_proj_qkv` `[2 k_heads · k_dim + v_heads · v_dim, h]` (all q rows, all k
    /// rows, all v rows), `in_proj_z` `[v_heads · v_dim, h]`, `in_proj_b` and `in_proj_a`
    /// `[v_heads, h]`; value head `j` reads key head `j / r`.
    Separate,
}

impl Features {
    /// The Llama-style families' choices.
    pub const STANDARD: Self = Self {
        scoring: Scoring::Softmax,
        router_bias: false,
        out_bias_with_qkv_bias: false,
        multipliers: false,
        attention_sinks: false,
        clamped_swiglu: false,
        fused_layout: FusedLayout::GateUpRows,
        fused_names: &[("experts.gate_up_proj", "experts.down_proj")],
        zero_centred_norms: false,
        gated_attention: false,
        partial_rotary: false,
        delta_net: None,
        ignored_prefixes: &[],
        mamba2: false,
        shared_mlp: false,
        position_embedding_type: false,
        short_conv: false,
        output_norm: None,
        renamed_prefixes: &[],
    };
}

/// Every supported family.
pub const FAMILIES: &[&Family] = &[
    &mixtral::FAMILY,
    &qwen2_moe::FAMILY,
    &qwen3_moe::FAMILY,
    &olmoe::FAMILY,
    &meo_gpt2::FAMILY,
    &switch_transformers::FAMILY,
    &switch_transformers::FAMILY_MODEL,
    &switch_transformers::FAMILY_GENERATION,
    &deepseek_v3::FAMILY,
    &deepseek_v2::FAMILY,
    &granitemoe::FAMILY,
    &gpt_oss::FAMILY,
    &glm4_moe::FAMILY,
    &phimoe::FAMILY,
    &phimoe::FAMILY_HUB,
    &qwen3_next::FAMILY,
    &granitemoehybrid::FAMILY,
    &lfm2_moe::FAMILY,
    &ernie4_5_moe::FAMILY,
    &qwen3_5_moe::FAMILY,
    &qwen3_5_moe::FAMILY_MULTIMODAL,
    &llama4::FAMILY,
    &llama4::FAMILY_MULTIMODAL,
    &hunyuan_v1_moe::FAMILY,
    &dots1::FAMILY,
];

/// Tensors outside the layers: canonical name → HF name.
const GLOBAL: &[(&str, &str)] = &[
    (meo::names::EMBED, "model.embed_tokens.weight"),
    (meo::names::OUTPUT_NORM, "model.norm.weight"),
    (meo::names::OUTPUT, "lm_head.weight"),
    (meo::names::OUTPUT_NORM_BIAS, "model.norm.bias"),
    (meo::names::OUTPUT_BIAS, "lm_head.bias"),
];

/// Layer tensors named alike in every family: canonical suffix → HF suffix.
const COMMON: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.q.weight", "self_attn.q_proj.weight"),
    ("attn.k.weight", "self_attn.k_proj.weight"),
    ("attn.v.weight", "self_attn.v_proj.weight"),
    ("attn.o.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("router.weight", "{moe}.gate.weight"),
];

/// Checkpoint tensors that carry no weights (recomputed buffers some exporters save).
const IGNORED_SUFFIXES: &[&str] = &[".rotary_emb.inv_freq"];

/// Where a canonical tensor's values are: `count` elements of `tensor` from element `first`,
/// rearranged by `pick`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub tensor: String,
    pub first: u64,
    pub count: u64,
    pub pick: Pick,
}

/// How a [`Source`]'s elements become the canonical tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pick {
    /// As stored.
    #[default]
    Whole,
    /// The elements are a row-major `[rows, cols]` matrix; the canonical tensor is its
    /// columns `start, start + step, …` as rows: `[cols / step, rows]` (a transpose, of every
    /// `step`-th column).
    Columns { rows: u64, cols: u64, start: u64, step: u64 },
    /// The elements are a row-major matrix of `cols` columns made of blocks of `block` rows;
    /// the canonical tensor is rows `start..start + len` of every block, in block order
    /// (a projection fused per head group, e.g. Qwen3-Next's `in_proj_qkvz`).
    RowBlocks { cols: u64, block: u64, start: u64, len: u64 },
    /// The elements are a row-major `[rows, cols]` matrix; the canonical tensor is its columns
    /// `start..start + len` as rows: `[len, rows]` (a transpose of a column block).
    ColumnRange { rows: u64, cols: u64, start: u64, len: u64 },
    /// As stored, plus one: a zero-centred norm weight (`x̂ · (1 + w)`) stored as the plain
    /// weight `1 + w` (computed in f32, as transformers does).
    PlusOne,
}

impl Source {
    fn whole(tensor: String, first: u64, count: u64) -> Self {
        Self { tensor, first, count, pick: Pick::Whole }
    }

    /// Reads the canonical tensor's values (f32) from `ck`.
    ///
    /// # Errors
    /// Reading the checkpoint; a pick that does not fit the elements read.
    pub fn read(&self, ck: &Checkpoint) -> Result<Vec<f32>> {
        let v = ck.read_f32(&self.tensor, self.first, self.count)?;
        match self.pick {
            Pick::Whole => Ok(v),
            Pick::PlusOne => Ok(v.into_iter().map(|x| 1.0 + x).collect()),
            Pick::RowBlocks { cols, block, start, len } => {
                let (cols, block, start, len) = (cols as usize, block as usize, start as usize, len as usize);
                let row_len = block.checked_mul(cols).filter(|&r| r > 0);
                ensure!(
                    start.checked_add(len).is_some_and(|e| e <= block)
                        && row_len.is_some_and(|r| v.len().is_multiple_of(r)),
                    "{}: cannot take rows {start}..{start}+{len} of every {block}-row block of {cols} columns",
                    self.tensor
                );
                Ok(v.chunks_exact(block * cols).flat_map(|b| &b[start * cols..(start + len) * cols]).copied().collect())
            }
            Pick::ColumnRange { rows, cols, start, len } => {
                let (rows, cols, start, len) = (rows as usize, cols as usize, start as usize, len as usize);
                ensure!(
                    start.checked_add(len).is_some_and(|e| e <= cols) && rows.checked_mul(cols) == Some(v.len()),
                    "{}: cannot take columns {start}..{start}+{len} of a [{rows}, {cols}] block",
                    self.tensor
                );
                let mut out = vec![0.0f32; len * rows];
                for (r, row) in v.chunks_exact(cols).enumerate() {
                    for (j, &x) in row[start..start + len].iter().enumerate() {
                        out[j * rows + r] = x;
                    }
                }
                Ok(out)
            }
            Pick::Columns { rows, cols, start, step } => {
                let (rows, cols, start, step) = (rows as usize, cols as usize, start as usize, step as usize);
                ensure!(
                    step > 0 && start < step && cols % step == 0 && rows.checked_mul(cols) == Some(v.len()),
                    "{}: cannot take every {step}th column from {start} of a [{rows}, {cols}] block",
                    self.tensor
                );
                let out_rows = cols / step;
                let mut out = vec![0.0f32; out_rows * rows];
                for (r, row) in v.chunks_exact(cols).enumerate() {
                    for (j, &x) in row[start..].iter().step_by(step).enumerate() {
                        out[j * rows + r] = x;
                    }
                }
                Ok(out)
            }
        }
    }
}

/// How one MoE layer stores its experts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Experts {
    /// `<prefix>.experts.N.<name>.weight`, one tensor per expert and projection.
    PerExpert { prefix: String },
    /// Two 3-D tensors (full names) holding every expert, laid out as `layout` says.
    Fused { prefix: String, gate_up: String, down: String, layout: FusedLayout },
}

impl Experts {
    fn prefix(&self) -> &str {
        match self {
            Self::PerExpert { prefix } | Self::Fused { prefix, .. } => prefix,
        }
    }
}

/// An opened checkpoint directory.
pub struct HfModel {
    pub family: &'static Family,
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    /// The release's `quantization_config` (`None`: unquantized).
    pub quantization: Option<quantized::Method>,
    /// Sampling defaults from `generation_config.json`.
    pub generation: Generation,
    /// `tokenizer.json`, verbatim.
    pub tokenizer: Option<String>,
    /// The chat template(s) and special tokens' strings (`tokenizer_config.json`,
    /// `chat_template.jinja`).
    pub chat: chat::ChatMeta,
    /// Per layer: the expert layout (MoE layers only).
    experts: Vec<Option<Experts>>,
    /// MEO-native models: the task names (task-gate merges are precomputed for each).
    pub tasks: Vec<String>,
    /// Checkpoint layers past the decoder's that are known to be unused (DeepSeek-V3's
    /// multi-token-prediction modules): their tensors are not reported as unused.
    pub extra_layers: std::ops::Range<usize>,
    /// The checkpoint directory.
    dir: std::path::PathBuf,
}

/// The sampling defaults of a `generation_config.json`, each when it is given (stored in the
/// file as `generation.*`, see `docs/FORMAT.md`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generation {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub do_sample: Option<bool>,
}

impl Generation {
    /// Reads the keys from a parsed `generation_config.json` (absent or null: not given).
    ///
    /// # Errors
    /// A key of the wrong type or a negative or non-finite number; the message names it.
    pub fn from_json(g: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        use serde_json::Value;
        let num = |k: &str| -> Result<Option<f64>> {
            match g.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    let x = v.as_f64().filter(|x| x.is_finite() && *x >= 0.0);
                    x.map(Some).with_context(|| format!("{k}: {v} is not a non-negative number"))
                }
            }
        };
        let top_k = match g.get("top_k") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().with_context(|| format!("top_k: {v} is not a non-negative integer"))?),
        };
        let do_sample = match g.get("do_sample") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => bail!("do_sample: {v} is not a boolean"),
        };
        Ok(Self {
            temperature: num("temperature")?,
            top_p: num("top_p")?,
            top_k,
            min_p: num("min_p")?,
            repetition_penalty: num("repetition_penalty")?,
            do_sample,
        })
    }

    /// The `generation.*` metadata entries of the values given.
    pub fn metadata(&self) -> Vec<(&'static str, meo::MetaValue<'static>)> {
        use meo::MetaValue::{Bool, F64, U64};
        use meo::names::generation_keys as k;
        let mut v = Vec::new();
        let f = [
            (k::TEMPERATURE, self.temperature),
            (k::TOP_P, self.top_p),
            (k::MIN_P, self.min_p),
            (k::REPETITION_PENALTY, self.repetition_penalty),
        ];
        v.extend(f.into_iter().filter_map(|(key, x)| x.map(|x| (key, F64(x)))));
        v.extend(self.top_k.map(|x| (k::TOP_K, U64(x))));
        v.extend(self.do_sample.map(|x| (k::DO_SAMPLE, Bool(x))));
        v
    }
}

/// Largest `config.json` / `generation_config.json` read (real ones are a few KiB).
pub const MAX_CONFIG_JSON: u64 = 4 << 20;
/// Largest `model.safetensors.index.json` read (DeepSeek-V3's, 91 000 tensors, is 9 MB).
pub const MAX_INDEX_JSON: u64 = 64 << 20;
/// Largest `tokenizer.json` read (the largest common ones, Gemma's, are about 35 MB).
pub const MAX_TOKENIZER_JSON: u64 = 64 << 20;

/// A file larger than the converter reads for its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {len} bytes, larger than the {cap}-byte limit for this file", path.display())]
pub struct TooLarge {
    pub path: std::path::PathBuf,
    pub len: u64,
    pub cap: u64,
}

/// Reads the text file `path`, refusing it beyond `cap` bytes (checked on the bytes read,
/// not only the size the file system reports, so a growing file or a FIFO is capped too).
///
/// # Errors
/// [`TooLarge`], I/O, or text that is not UTF-8.
pub fn read_capped(path: &Path, cap: u64) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let too_large = |len| TooLarge { path: path.to_path_buf(), len, cap };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > cap {
        return Err(too_large(len).into());
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(cap + 1).read_to_end(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
    if buf.len() as u64 > cap {
        return Err(too_large(buf.len() as u64).into());
    }
    String::from_utf8(buf).with_context(|| format!("{}: not UTF-8 text", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = read_capped(path, MAX_CONFIG_JSON)?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", path.display()))
}

/// What a `config.json` describes.
pub struct ParsedConfig {
    pub family: &'static Family,
    pub config: ModelConfig,
    /// MEO-native models: the task names.
    pub tasks: Vec<String>,
    /// Checkpoint layers past the decoder's that are known to be unused.
    pub extra_layers: std::ops::Range<usize>,
}

/// The family and model config of a parsed `config.json` (`gen_eos`: `generation_config.json`'s
/// `eos_token_id`, used when the config names none). A pure function of its input: sizes are
/// checked against the checkpoint afterwards, by [`HfModel::open`].
///
/// # Errors
/// Unsupported family, a missing, mistyped or out-of-range key, inconsistent sizes.
pub fn parse_config(raw: &serde_json::Map<String, serde_json::Value>, gen_eos: Vec<usize>) -> Result<ParsedConfig> {
    let j = config::Json(raw);
    let family = config::detect(&j)?;
    let eos = gen_eos.into_iter().map(|x| x as u64).collect();
    let mut extra_layers = 0..0;
    let (config, tasks) = match family.kind {
        Kind::Standard | Kind::Extended(_) => (config::model_config(&j, family, eos)?, vec![]),
        Kind::MeoNative => meo_gpt2::model_config(&j)?,
        Kind::Switch => (switch_transformers::model_config(&j)?, vec![]),
        Kind::DeepSeek => {
            extra_layers = deepseek_v3::mtp_layers(&j)?;
            let variant = if family.name == deepseek_v2::FAMILY.name { &deepseek_v2::V2 } else { &deepseek_v3::V3 };
            (deepseek_v3::model_config(&j, family, variant, eos)?.0, vec![])
        }
        Kind::Own(o) => {
            let (config, extra) = (o.read)(&j, family, eos)?;
            extra_layers = extra;
            (config, vec![])
        }
    };
    Ok(ParsedConfig { family, config, tasks, extra_layers })
}

impl HfModel {
    /// Reads `config.json`, the safetensors headers and `tokenizer.json` of `dir`.
    ///
    /// # Errors
    /// Unsupported family, bad config, corrupt or missing weights, or a layer whose experts
    /// are in neither known layout.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let raw = read_json(&cfg_path)?;
        let gen_path = dir.join("generation_config.json");
        let (gen_eos, generation) = if gen_path.is_file() {
            let g = read_json(&gen_path)?;
            let eos = config::Json(&g).usizes("eos_token_id").with_context(|| gen_path.display().to_string())?;
            (eos, Generation::from_json(&g).with_context(|| gen_path.display().to_string())?)
        } else {
            (Vec::new(), Generation::default())
        };
        let ParsedConfig { family, config, tasks, extra_layers } =
            parse_config(&raw, gen_eos).with_context(|| cfg_path.display().to_string())?;
        let quantization = quantized::Method::from_config(&raw).with_context(|| cfg_path.display().to_string())?;
        let mut checkpoint = Checkpoint::open(dir)?;
        for (from, to) in family.kind.features().renamed_prefixes {
            checkpoint.rename_prefix(from, to).with_context(|| dir.display().to_string())?;
        }
        checkpoint.dequantize(quantization.as_ref()).with_context(|| dir.display().to_string())?;
        // Everything sized from the config below (expert layouts, the tensor list) comes after
        // this: the sizes must describe no more weights than the checkpoint holds.
        crate::canonical::tensors_within(&config, crate::canonical::budget(checkpoint.elements()), "the checkpoint")
            .with_context(|| cfg_path.display().to_string())?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() { Some(read_capped(&tok_path, MAX_TOKENIZER_JSON)?) } else { None };
        let chat = chat::ChatMeta::read(dir)?;
        let mut m = Self {
            family,
            config,
            checkpoint,
            quantization,
            generation,
            tokenizer,
            chat,
            experts: Vec::new(),
            tasks,
            extra_layers,
            dir: dir.to_path_buf(),
        };
        m.experts = (0..m.config.num_layers)
            .map(|l| {
                (m.config.layer_ffn[l] == FfnKind::Moe && family.kind != Kind::Switch)
                    .then(|| m.detect_experts(l))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(m)
    }

    /// What the conversion should say about the tokenizer: none in the checkpoint (the file
    /// will have none, so `meo run -p` and `meo chat` will refuse it), with how to make one
    /// from a SentencePiece `tokenizer.model`.
    pub fn tokenizer_warning(&self) -> Option<String> {
        if self.tokenizer.is_some() {
            return None;
        }
        let d = self.dir.display();
        Some(if self.dir.join("tokenizer.model").is_file() {
            format!(
                "{d} has a SentencePiece tokenizer.model but no tokenizer.json, which meo embeds: the .meo file will \
                 have no tokenizer (meo run -p and meo chat need one; --tokens works). Write tokenizer.json with \
                 transformers (pip install transformers sentencepiece protobuf): python -c \"from transformers import \
                 AutoTokenizer as T; T.from_pretrained('{d}').save_pretrained('{d}')\", then convert again"
            )
        } else {
            format!(
                "{d} has no tokenizer.json: the .meo file will have no tokenizer (meo run -p and meo chat need one; \
                 --tokens works)"
            )
        })
    }

    /// Every file of the checkpoint directory a conversion reads (that exists): an output
    /// path must be none of them.
    pub fn input_paths(&self) -> Vec<std::path::PathBuf> {
        let dir = &self.dir;
        let mut v: Vec<_> = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"]
            .iter()
            .map(|n| dir.join(n))
            .filter(|p| p.exists())
            .collect();
        v.extend(self.chat.paths.iter().cloned());
        v.extend(self.checkpoint.paths().map(Path::to_path_buf));
        v
    }

    /// Finds the MoE prefix and expert layout of layer `l` from the tensor names.
    fn detect_experts(&self, l: usize) -> Result<Experts> {
        let ck = &self.checkpoint;
        let (e, h, i) = (
            self.config.router.num_experts as u64,
            self.config.hidden_size as u64,
            self.config.expert_intermediate_size as u64,
        );
        let features = self.family.kind.features();
        let mut tried = Vec::new();
        for p in self.family.moe_prefixes {
            let prefix = format!("model.layers.{l}.{p}");
            for (gu, dn) in features.fused_names {
                let (gate_up, down) = (format!("{prefix}.{gu}"), format!("{prefix}.{dn}"));
                let Some(t) = ck.get(&gate_up) else {
                    tried.push(gate_up);
                    continue;
                };
                let d = ck.get(&down).with_context(|| format!("checkpoint has {gate_up} but no {down}"))?;
                let (gu_shape, d_shape) = match features.fused_layout {
                    FusedLayout::GateUpRows => ([e, 2 * i, h], [e, h, i]),
                    FusedLayout::TransposedInterleaved | FusedLayout::TransposedHalves => ([e, h, 2 * i], [e, i, h]),
                };
                ensure!(t.shape == gu_shape, "{gate_up}: shape {:?}, expected {gu_shape:?}", t.shape);
                ensure!(d.shape == d_shape, "{down}: shape {:?}, expected {d_shape:?}", d.shape);
                if features.fused_layout == FusedLayout::TransposedInterleaved {
                    for (name, shape) in
                        [(format!("{gate_up}_bias"), vec![e, 2 * i]), (format!("{down}_bias"), vec![e, h])]
                    {
                        let b = ck.get(&name).with_context(|| format!("checkpoint has {gate_up} but no {name}"))?;
                        ensure!(b.shape == shape, "{name}: shape {:?}, expected {shape:?}", b.shape);
                    }
                }
                return Ok(Experts::Fused { prefix, gate_up, down, layout: features.fused_layout });
            }
            let first = format!("{prefix}.experts.0.{}.weight", self.family.expert_names[0]);
            if ck.get(&first).is_some() {
                return Ok(Experts::PerExpert { prefix });
            }
            tried.push(first);
        }
        bail!("layer {l}: no experts found in the checkpoint (looked for {})", tried.join(", "))
    }

    /// The checkpoint name for layer tensor `suffix` of layer `l`.
    fn layer_name(&self, l: usize, suffix: &str) -> Result<String> {
        let hf =
            self.family.tensors.iter().chain(COMMON).find(|(c, _)| *c == suffix).map(|&(_, hf)| hf).with_context(
                || format!("the {} family has no source for layer tensor {suffix:?}", self.family.name),
            )?;
        let hf = if hf.contains("{moe}") {
            let moe = self.experts[l].as_ref().with_context(|| format!("layer {l}: {suffix} in a dense layer"))?;
            let short = moe.prefix().rsplit_once('.').map_or(moe.prefix(), |(_, p)| p);
            hf.replace("{moe}", short)
        } else {
            hf.to_string()
        };
        // `a|b`: the checkpoint names it one way or the other (Hub vs transformers-5 names).
        let names: Vec<String> = hf.split('|').map(|n| format!("model.layers.{l}.{n}")).collect();
        Ok(names.iter().find(|n| self.checkpoint.get(n).is_some()).unwrap_or(&names[0]).clone())
    }

    /// The source of a layer tensor that the hybrid families (gated DeltaNet, gated attention,
    /// zero-centred norms) store in another form than the canonical one; `None` for the others.
    fn hybrid_source(&self, l: usize, suffix: &str, c: &Canon) -> Result<Option<Source>> {
        let x = self.family.kind.features();
        let numel: u64 = c.shape.iter().product();
        let expect = |name: &str, shape: &[u64]| -> Result<()> {
            let e = self
                .checkpoint
                .get(name)
                .with_context(|| format!("checkpoint has no tensor {name:?} (needed for {})", c.name))?;
            ensure!(e.shape == shape, "{name}: shape {:?}, expected {shape:?} (for {})", e.shape, c.name);
            Ok(())
        };
        let blocks = |name: String, shape: &[u64], block: u64, start: u64, len: u64| -> Result<Option<Source>> {
            expect(&name, shape)?;
            let count = shape.iter().product();
            let cols = shape[1];
            Ok(Some(Source { tensor: name, first: 0, count, pick: Pick::RowBlocks { cols, block, start, len } }))
        };
        let cfg = &self.config;
        let h = cfg.hidden_size as u64;
        if x.shared_mlp && matches!(suffix, "shared.gate.weight" | "shared.up.weight") {
            // `input_linear` `[2S, h]`: the gate's rows, then the up projection's.
            let name = format!("model.layers.{l}.shared_mlp.input_linear.weight");
            let s = cfg.shared_expert_intermediate_size as u64;
            expect(&name, &[2 * s, h])?;
            let first = if suffix == "shared.gate.weight" { 0 } else { s * h };
            return Ok(Some(Source::whole(name, first, numel)));
        }
        if let (true, Some(d)) = (x.mamba2, cfg.recipe.mamba2)
            && cfg.mixer(l) == meo::Mixer::Mamba2
            && matches!(suffix, "mixer.z.weight" | "mixer.xbc.weight" | "mixer.dt.weight" | "mixer.conv.weight")
        {
            let (inner, cd, nh) = (d.inner() as u64, d.conv_dim() as u64, d.num_heads as u64);
            if suffix == "mixer.conv.weight" {
                // nn.Conv1d's `[channels, 1, kernel]`: the same values as `[channels, kernel]`.
                let name = format!("model.layers.{l}.mamba.conv1d.weight");
                expect(&name, &[c.shape[0], 1, c.shape[1]])?;
                return Ok(Some(Source::whole(name, 0, numel)));
            }
            // `in_proj` rows: z, then x, B, C, then dt.
            let name = format!("model.layers.{l}.mamba.in_proj.weight");
            expect(&name, &[inner + cd + nh, h])?;
            let row = match suffix {
                "mixer.z.weight" => 0,
                "mixer.xbc.weight" => inner,
                _ => inner + cd,
            };
            return Ok(Some(Source::whole(name, row * h, numel)));
        }
        if x.short_conv
            && cfg.mixer(l) == meo::Mixer::ShortConv
            && matches!(suffix, "mixer.b.weight" | "mixer.c.weight" | "mixer.x.weight" | "mixer.conv.weight")
        {
            if suffix == "mixer.conv.weight" {
                // nn.Conv1d's `[channels, 1, kernel]`: the same values as `[channels, kernel]`.
                let name = format!("model.layers.{l}.conv.conv.weight");
                expect(&name, &[c.shape[0], 1, c.shape[1]])?;
                return Ok(Some(Source::whole(name, 0, numel)));
            }
            // `in_proj` rows: b, then c, then x (`chunk(3)`).
            let name = format!("model.layers.{l}.conv.in_proj.weight");
            expect(&name, &[3 * h, h])?;
            let part = match suffix {
                "mixer.b.weight" => 0,
                "mixer.c.weight" => 1,
                _ => 2,
            };
            return Ok(Some(Source::whole(name, part * h * h, numel)));
        }
        if x.zero_centred_norms
            && matches!(suffix, "attn_norm.weight" | "ffn_norm.weight" | "attn.q_norm.weight" | "attn.k_norm.weight")
        {
            let name = self.layer_name(l, suffix)?;
            expect(&name, &c.shape)?;
            return Ok(Some(Source { tensor: name, first: 0, count: numel, pick: Pick::PlusOne }));
        }
        if x.gated_attention && matches!(suffix, "attn.q.weight" | "attn.gate.weight") {
            // Per head: its query rows, then its gate rows.
            let hd = cfg.head_dim as u64;
            let name = format!("model.layers.{l}.self_attn.q_proj.weight");
            let start = if suffix == "attn.q.weight" { 0 } else { hd };
            return blocks(name, &[2 * cfg.num_heads as u64 * hd, h], 2 * hd, start, hd);
        }
        let (Some(layout), Some(d)) = (x.delta_net, cfg.recipe.delta_net) else { return Ok(None) };
        if !suffix.starts_with("mixer.") {
            return Ok(None);
        }
        let (nk, nv, dk, dv) = (d.num_k_heads as u64, d.num_v_heads as u64, d.k_head_dim as u64, d.v_head_dim as u64);
        let r = nv / nk;
        let p = |n: &str| format!("model.layers.{l}.linear_attn.{n}.weight");
        match (layout, suffix) {
            (_, "mixer.conv.weight") => {
                // nn.Conv1d's `[channels, 1, kernel]`: the same values as `[channels, kernel]`.
                let name = p("conv1d");
                expect(&name, &[c.shape[0], 1, c.shape[1]])?;
                Ok(Some(Source::whole(name, 0, numel)))
            }
            (
                DeltaLayout::FusedPerKeyHead,
                "mixer.q.weight" | "mixer.k.weight" | "mixer.v.weight" | "mixer.z.weight",
            ) => {
                let block = 2 * dk + 2 * r * dv;
                let (start, len) = match suffix {
                    "mixer.q.weight" => (0, dk),
                    "mixer.k.weight" => (dk, dk),
                    "mixer.v.weight" => (2 * dk, r * dv),
                    _ => (2 * dk + r * dv, r * dv),
                };
                blocks(p("in_proj_qkvz"), &[nk * block, h], block, start, len)
            }
            (DeltaLayout::FusedPerKeyHead, "mixer.b.weight" | "mixer.a.weight") => {
                let start = if suffix == "mixer.b.weight" { 0 } else { r };
                blocks(p("in_proj_ba"), &[nk * 2 * r, h], 2 * r, start, r)
            }
            (DeltaLayout::Separate, "mixer.q.weight" | "mixer.k.weight" | "mixer.v.weight") => {
                // Rows: every q head, every k head, then every v head.
                let name = p("in_proj_qkv");
                expect(&name, &[2 * nk * dk + nv * dv, h])?;
                let first = match suffix {
                    "mixer.q.weight" => 0,
                    "mixer.k.weight" => nk * dk * h,
                    _ => 2 * nk * dk * h,
                };
                Ok(Some(Source::whole(name, first, numel)))
            }
            (DeltaLayout::Separate, "mixer.z.weight" | "mixer.b.weight" | "mixer.a.weight") => {
                let name = p(&format!("in_proj_{}", &suffix["mixer.".len()..suffix.len() - ".weight".len()]));
                expect(&name, &c.shape)?;
                Ok(Some(Source::whole(name, 0, numel)))
            }
            _ => Ok(None),
        }
    }

    /// Where the values of canonical tensor `c` are, checking shapes against the checkpoint.
    ///
    /// # Errors
    /// The tensor is missing or has the wrong shape.
    pub fn source(&self, c: &Canon) -> Result<Source> {
        let numel: u64 = c.shape.iter().product();
        if self.family.kind == Kind::MeoNative {
            return match meo_gpt2::to_source(c, &self.config)? {
                Some(src) => {
                    let e = self.checkpoint.get(&src.tensor).with_context(|| {
                        format!("checkpoint has no tensor {:?} (needed for {})", src.tensor, c.name)
                    })?;
                    ensure!(
                        src.first + src.count <= e.numel() && (src.first > 0 || e.numel() % numel == 0),
                        "{}: shape {:?} does not hold {} (shape {:?})",
                        src.tensor,
                        e.shape,
                        c.name,
                        c.shape
                    );
                    Ok(src)
                }
                // Computed (task merge): marks the bank's experts as used, reads nothing.
                None => {
                    let Place::TaskBank { layer, bank, part, .. } = c.place else { bail!("no source for {}", c.name) };
                    let part = meo::names::BANK_EXPERT_PARTS[part];
                    Ok(Source::whole(format!("h.{layer}.mlp.{}.experts.{part}", meo::names::MEO_BANKS[bank]), 0, 0))
                }
            };
        }
        let whole = |name: String| -> Result<Source> {
            let e = self
                .checkpoint
                .get(&name)
                .with_context(|| format!("checkpoint has no tensor {name:?} (needed for {})", c.name))?;
            // Leading unit dimensions carry no layout (ERNIE-4.5's selection bias is `[1, E]`).
            let squeezed =
                e.shape.iter().skip_while(|&&d| d == 1).count() == c.shape.len() && e.shape.ends_with(&c.shape);
            ensure!(
                e.shape == c.shape || squeezed,
                "{name}: shape {:?}, expected {:?} (for {})",
                e.shape,
                c.shape,
                c.name
            );
            Ok(Source::whole(name, 0, numel))
        };
        if self.family.kind == Kind::Switch {
            return whole(switch_transformers::source_name(c, &|n| self.checkpoint.get(n).is_some())?);
        }
        match c.place {
            Place::Global => {
                let own_norm = self.family.kind.features().output_norm.filter(|_| c.name == meo::names::OUTPUT_NORM);
                let hf = own_norm.or_else(|| GLOBAL.iter().find(|(n, _)| *n == c.name).map(|&(_, hf)| hf));
                let src = whole(hf.with_context(|| format!("no source for {}", c.name))?.to_string())?;
                let zero_centred = self.family.kind.features().zero_centred_norms && c.name == meo::names::OUTPUT_NORM;
                Ok(if zero_centred { Source { pick: Pick::PlusOne, ..src } } else { src })
            }
            Place::Layer { layer, suffix } => match self.hybrid_source(layer, suffix, c)? {
                Some(src) => Ok(src),
                None => whole(self.layer_name(layer, suffix)?),
            },
            Place::BankExpert { .. } | Place::TaskBank { .. } => bail!("{}: not an MEO-native family", c.name),
            Place::Expert { layer, expert, part } => match self.experts[layer].as_ref() {
                Some(Experts::PerExpert { prefix }) => {
                    whole(format!("{prefix}.experts.{expert}.{}.weight", self.family.expert_names[part]))
                }
                Some(Experts::Fused { gate_up, down, layout: FusedLayout::GateUpRows, .. }) => {
                    // gate_up_proj[e] is [2I, H]: rows [0, I) gate, [I, 2I) up (transformers
                    // concatenates w1 then w3, and chunks gate, up in that order).
                    // down_proj[e] is [H, I].
                    Ok(match part {
                        0 | 1 => Source::whole(gate_up.clone(), (2 * expert as u64 + part as u64) * numel, numel),
                        _ => Source::whole(down.clone(), expert as u64 * numel, numel),
                    })
                }
                Some(Experts::Fused { gate_up, down, layout: FusedLayout::TransposedInterleaved, .. }) => {
                    // gate_up_proj[e] is [H, 2I]: gate = even columns, up = odd columns;
                    // down_proj[e] is [I, H]. Both transposed into the canonical [out, in].
                    let (h, i) = (self.config.hidden_size as u64, self.config.expert_intermediate_size as u64);
                    let x = expert as u64;
                    Ok(match part {
                        0 | 1 => Source {
                            tensor: gate_up.clone(),
                            first: x * h * 2 * i,
                            count: h * 2 * i,
                            pick: Pick::Columns { rows: h, cols: 2 * i, start: part as u64, step: 2 },
                        },
                        _ => Source {
                            tensor: down.clone(),
                            first: x * i * h,
                            count: i * h,
                            pick: Pick::Columns { rows: i, cols: h, start: 0, step: 1 },
                        },
                    })
                }
                Some(Experts::Fused { gate_up, down, layout: FusedLayout::TransposedHalves, .. }) => {
                    // gate_up_proj[e] is [H, 2I]: gate = columns [0, I), up = [I, 2I);
                    // down_proj[e] is [I, H]. Both transposed into the canonical [out, in].
                    let (h, i) = (self.config.hidden_size as u64, self.config.expert_intermediate_size as u64);
                    let x = expert as u64;
                    Ok(match part {
                        0 | 1 => Source {
                            tensor: gate_up.clone(),
                            first: x * h * 2 * i,
                            count: h * 2 * i,
                            pick: Pick::ColumnRange { rows: h, cols: 2 * i, start: part as u64 * i, len: i },
                        },
                        _ => Source {
                            tensor: down.clone(),
                            first: x * i * h,
                            count: i * h,
                            pick: Pick::Columns { rows: i, cols: h, start: 0, step: 1 },
                        },
                    })
                }
                None => bail!("layer {layer} has no experts"),
            },
            Place::ExpertBias { layer, expert, part } => match self.experts[layer].as_ref() {
                Some(Experts::Fused { gate_up, down, layout: FusedLayout::TransposedInterleaved, .. }) => {
                    let (h, i) = (self.config.hidden_size as u64, self.config.expert_intermediate_size as u64);
                    let x = expert as u64;
                    Ok(match part {
                        // `<gate_up>_bias[e]` is [2I], interleaved like the matrix's columns.
                        0 | 1 => Source {
                            tensor: format!("{gate_up}_bias"),
                            first: x * 2 * i,
                            count: 2 * i,
                            pick: Pick::Columns { rows: 1, cols: 2 * i, start: part as u64, step: 2 },
                        },
                        _ => Source::whole(format!("{down}_bias"), x * h, h),
                    })
                }
                _ => bail!("layer {layer}: the checkpoint's experts have no biases (needed for {})", c.name),
            },
        }
    }

    /// Checkpoint tensors that none of `used` reads and that are not known to be ignorable.
    pub fn unused<'a>(&'a self, used: &BTreeSet<&str>) -> Vec<&'a str> {
        let consumed = meo_gpt2::consumed(&self.config, &self.tasks);
        self.checkpoint
            .names()
            .filter(|n| !used.contains(n))
            .filter(|n| !IGNORED_SUFFIXES.iter().any(|s| n.ends_with(s)))
            .filter(|n| !(self.config.tie_word_embeddings && *n == "lm_head.weight"))
            .filter(|n| !consumed.iter().any(|c| c == n))
            .filter(|n| !(self.family.kind == Kind::Switch && switch_transformers::not_converted(n)))
            .filter(|n| !self.extra_layers.clone().any(|l| n.starts_with(&format!("model.layers.{l}."))))
            .filter(|n| !self.family.kind.features().ignored_prefixes.iter().any(|p| n.starts_with(p)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint directory with one safetensors file of f32 tensors `(name, shape, values)`.
    fn checkpoint_dir(tensors: &[(&str, Vec<u64>, Vec<f32>)]) -> tempfile::TempDir {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                (*name).into(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::Value::Object(header).to_string();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&data);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        dir
    }

    #[test]
    fn columns_pick_deinterleaves_and_transposes() {
        // Two blocks [2, 4]; the second block's even columns, as rows: [2, 2].
        let v: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let dir = checkpoint_dir(&[("t", vec![2, 2, 4], v)]);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let pick = |start, step| Source {
            tensor: "t".into(),
            first: 8,
            count: 8,
            pick: Pick::Columns { rows: 2, cols: 4, start, step },
        };
        // Block [[8, 9, 10, 11], [12, 13, 14, 15]]: even columns 8,10 / 12,14 → [[8, 12], [10, 14]].
        assert_eq!(pick(0, 2).read(&ck).unwrap(), vec![8.0, 12.0, 10.0, 14.0]);
        assert_eq!(pick(1, 2).read(&ck).unwrap(), vec![9.0, 13.0, 11.0, 15.0]);
        // Step 1 is a plain transpose.
        assert_eq!(pick(0, 1).read(&ck).unwrap(), vec![8.0, 12.0, 9.0, 13.0, 10.0, 14.0, 11.0, 15.0]);
        // A pick that does not fit the block is an error, not a panic.
        assert!(pick(0, 3).read(&ck).is_err());
    }

    #[test]
    fn malformed_mxfp4_experts_are_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "head_dim": 16, "hidden_size": 64,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 2, "num_experts_per_tok": 1, "vocab_size": 8, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 64, "sliding_window": 4, "layer_types": ["full_attention"],
            "quantization_config": {"quant_method": "mxfp4"}
        });
        // Blocks of rank 3 (the release's are [E, rows, nb, 16] u8).
        let ck = checkpoint_dir(&[
            ("model.layers.0.mlp.experts.gate_up_proj_blocks", vec![2, 32, 2], vec![0.0; 128]),
            ("model.layers.0.mlp.experts.gate_up_proj_scales", vec![2, 32], vec![0.0; 64]),
        ]);
        std::fs::copy(ck.path().join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let e = HfModel::open(dir.path()).err().expect("malformed MXFP4 must be refused");
        assert!(
            matches!(e.downcast_ref::<quantized::QuantError>(), Some(quantized::QuantError::Mismatch { tensor, .. })
                if tensor == "model.layers.0.mlp.experts.gate_up_proj_blocks"),
            "{e:#}"
        );
        // The same tensors with no quantization_config: named, not "tensors have no place".
        let mut config = config;
        config.as_object_mut().unwrap().remove("quantization_config");
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let e = HfModel::open(dir.path()).err().expect("undeclared MXFP4 must be refused");
        assert!(
            matches!(e.downcast_ref::<quantized::QuantError>(), Some(quantized::QuantError::Undeclared { .. })),
            "{e:#}"
        );
    }

    #[test]
    fn unsupported_quantization_names_method_and_bits() {
        let e =
            open_with("quantization_config", serde_json::json!({"quant_method": "gptq", "bits": 3, "group_size": 128}));
        let q = e.downcast_ref::<quantized::QuantError>().expect("typed error");
        assert_eq!(q, &quantized::QuantError::Unsupported { method: "gptq".into(), bits: Some(3) });
        let s = format!("{e:#}");
        assert!(s.contains("gptq with 3 bits") && s.contains("awq 4-bit"), "{s}");
        let e = open_with("quantization_config", serde_json::json!({"quant_method": "hqq", "nbits": 4}));
        assert!(format!("{e:#}").contains("quantization hqq is not supported"), "{e:#}");
    }

    #[test]
    fn oversized_json_is_refused_naming_file_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        // Before: read whole, whatever its size. A sparse file: no disk space used.
        std::fs::File::create(&p).unwrap().set_len(MAX_CONFIG_JSON + 1).unwrap();
        let e = HfModel::open(dir.path()).err().expect("refused");
        let t = e.downcast_ref::<TooLarge>().expect("typed error");
        assert_eq!((t.path.as_path(), t.cap), (p.as_path(), MAX_CONFIG_JSON));
        assert!(e.to_string().contains("config.json") && e.to_string().contains(&MAX_CONFIG_JSON.to_string()));
        std::fs::write(&p, "{}").unwrap();
        assert_eq!(read_capped(&p, 2).unwrap(), "{}");
        assert!(read_capped(&p, 1).is_err());
    }

    /// A Mixtral config with `key` set to the JSON `value`, parsed with a one-tensor checkpoint.
    fn open_with(key: &str, value: serde_json::Value) -> anyhow::Error {
        let mut config = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
            "num_experts_per_tok": 2, "intermediate_size": 16, "vocab_size": 256, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512
        });
        config[key] = value;
        let dir = checkpoint_dir(&[("model.embed_tokens.weight", vec![256, 64], vec![0.0; 256 * 64])]);
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        HfModel::open(dir.path()).err().expect("refused")
    }

    #[test]
    fn sizes_from_the_config_are_checked_before_anything_is_sized_from_them() {
        // Before: 1e10 layers aborted on allocation, u64::MAX panicked ("capacity overflow"),
        // and a million experts built a tensor list of billions of entries.
        for (key, v, says) in [
            ("num_hidden_layers", serde_json::json!(10_000_000_000u64), "num_hidden_layers"),
            ("num_hidden_layers", serde_json::json!(u64::MAX), "num_hidden_layers"),
            ("num_local_experts", serde_json::json!(u64::MAX), "routing.num_experts"),
            ("hidden_size", serde_json::json!(1u64 << 40), "head_dim"),
            ("vocab_size", serde_json::json!(u64::MAX), "model.vocab_size"),
        ] {
            let e = format!("{:#}", open_with(key, v.clone()));
            assert!(e.contains(says), "{key} = {v}: {e}");
        }
        // Within every limit, but far more weights than the checkpoint holds.
        let e = open_with("num_local_experts", serde_json::json!(16384));
        let e = e.downcast_ref::<crate::canonical::TooLarge>().map(|t| t.source_name);
        assert_eq!(e, Some("the checkpoint"));
    }
}
