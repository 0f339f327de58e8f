//! The canonical model description stored in a file's `model.*` and `routing.*` metadata.
//!
//! The converter fills a [`ModelConfig`] from a checkpoint's `config.json` and writes it with
//! [`ModelConfig::to_metadata`]; the runtime reads it back with [`ModelConfig::from_metadata`].
//! A family is data here (a router spec and a layer recipe), not a branch in the code.

use crate::format::{MetaArray, MetaValue, Metadata};
use alloc::borrow::ToOwned;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// A missing, mistyped or out-of-range metadata value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("metadata key {key:?} is missing")]
    Missing { key: &'static str },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType { key: &'static str, expected: &'static str, found: &'static str },
    #[error("metadata key {key:?} has invalid value {value}")]
    Invalid { key: &'static str, value: String },
}

/// Largest `top_k` the runtime supports (real models use ≤ 8; keeps routing allocation-free).
pub const MAX_TOP_K: usize = 64;
/// Most layers a config may declare (real models have ≤ 128). Per-layer tables are sized
/// from this count, so it is bounded before anything is allocated from it.
pub const MAX_LAYERS: usize = 1 << 12;
/// Most routed experts per layer (real models have ≤ 512).
pub const MAX_EXPERTS: usize = 1 << 14;
/// Largest width a config may declare (vocabulary, hidden, head and FFN sizes, ranks;
/// real models stay below 2^20). Keeps every product of two widths far inside `u64`.
pub const MAX_WIDTH: usize = 1 << 24;
/// Largest `max_position_embeddings` (real models claim up to about 10^7 positions).
pub const MAX_POSITIONS: usize = u32::MAX as usize;

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// softmax over all experts, then top-k of the probabilities (Mixtral, Qwen-MoE, OLMoE, Switch).
    Softmax,
    /// top-k of the logits, then softmax over the k selected (GPT-OSS).
    SoftmaxAfterTopK,
    /// element-wise sigmoid (DeepSeek-V3).
    Sigmoid,
    /// Phi-3.5-MoE's sparsemixer at inference: `k` rounds, each choosing the best remaining
    /// logit `m` and weighting it by a softmax over the remaining experts whose relative gap
    /// `(m − l_j) / max(|l_j|, m)` is at most `2 · RouterSpec::sparsemixer_eps`.
    SparseMixer,
}

/// How group-limited selection scores a group of experts (from the selection scores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupScore {
    /// Sum of the group's two best scores (DeepSeek-V3 `noaux_tc`).
    #[default]
    TopTwoSum,
    /// The group's best score (DeepSeek-V2 `group_limited_greedy`).
    Max,
}

impl GroupScore {
    /// Metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::TopTwoSum => "top2_sum",
            Self::Max => "max",
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3, `model.mla.*`): q from a plain or low-rank
/// projection; keys and values decompressed per head from one shared latent; a rotary part
/// (`model.head_dim` wide) shared by all heads' keys. See `docs/FORMAT.md` for the tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mla {
    /// Width of q's low-rank bottleneck (`q_a` → norm → `q_b`); 0 = one plain q projection.
    pub q_lora_rank: usize,
    /// Width of the compressed key/value latent.
    pub kv_lora_rank: usize,
    /// Per head: q/k dimensions without position (the rotary ones are `model.head_dim`).
    pub qk_nope_head_dim: usize,
    /// Per head: value dimensions.
    pub v_head_dim: usize,
    /// Epsilon of the RMSNorms on the q and kv latents.
    pub latent_norm_eps: f32,
}

/// Gate applied to the shared expert's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedGate {
    /// Shared experts added unweighted (DeepSeek).
    None,
    /// `sigmoid(w · x)` with a `[1, hidden]` weight (Qwen2-MoE).
    Sigmoid,
}

/// Normalisation applied to q and k before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` values (Qwen3-MoE).
    PerHead,
    /// RMSNorm over the whole projection, before splitting into heads (OLMoE).
    Full,
}

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
    /// MEO-native (`docs/MEO-NATIVE.md` §2.1): `fc2(act(fc1(x)))` where fc1 and fc2 are each a bank
    /// of linear experts (weight + bias) with its own router, gated from a pooled vector
    /// (sequence or task, never per token) and executed merged.
    MeoBank,
}

/// The normalisation layers (attention, FFN, final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormKind {
    /// `x / rms(x) · w` (Llama-style families).
    #[default]
    Rms,
    /// `(x − mean) / sqrt(var + eps) · w + b` (GPT-2): every norm has a bias.
    Layer,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Positions {
    /// Rotary embedding of q and k.
    #[default]
    Rope,
    /// A learned `[max_positions, hidden]` table added to the token embedding
    /// (`pos_embed.weight`).
    Learned,
    /// T5-style relative position bias added to every attention score: a learned
    /// `[buckets, heads]` table (`rel_bias.weight`) indexed by the bucket of `key − query`
    /// (see `meo::model::relative_bucket`), shared by all layers. No RoPE.
    Relative,
    /// No positional encoding at all (Granite-4 hybrid's `position_embedding_type` other than
    /// `rope`: its recurrent layers carry the order).
    None,
}

/// The activation between an FFN's input and output projections.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    /// SiLU-gated (`silu(gate x) ⊙ up x`).
    #[default]
    Silu,
    /// GPT-2's `gelu_new` (tanh approximation), ungated.
    GeluTanh,
    /// `down(relu(up x))`, ungated, for dense FFNs and experts (T5 / Switch `wo(relu(wi x))`):
    /// no `gate` matrices are stored.
    Relu,
    /// GPT-OSS's gated activation: `g = min(gate, limit)`, `u = clamp(up, −limit, limit)`,
    /// `(u + 1) ⊙ g ⊙ σ(alpha · g)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

impl Activation {
    /// Whether FFNs with this activation have a gate projection (`gate`, `up`, `down`) or
    /// only `up`, `down`.
    pub fn gated(self) -> bool {
        matches!(self, Self::Silu | Self::ClampedSwiglu { .. })
    }
}

/// The token mixer of one decoder layer: what replaces (or is) self-attention. Attention keeps
/// a KV cache that grows with the context; the recurrent mixers keep a fixed-size state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mixer {
    /// Self-attention (GQA or MLA, as the rest of the recipe says).
    #[default]
    Attention,
    /// Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE): a causal depthwise convolution over q, k, v,
    /// then the gated delta rule over a `[v_heads, k_dim, v_dim]` state, a gated RMSNorm and an
    /// output projection (`docs/FORMAT.md`, gated DeltaNet).
    GatedDeltaNet,
    /// Mamba2 (Granite-4 hybrid): a causal depthwise convolution over x, B, C, then the
    /// selective state space recurrence over a `[heads, head_dim, state]` state, the D skip,
    /// a gated RMSNorm and an output projection (`docs/FORMAT.md`, Mamba2).
    Mamba2,
    /// LFM2's gated short convolution: `out · (c ⊙ conv(b ⊙ x))` with b, c, x projections of
    /// the input and a causal depthwise convolution over the hidden channels
    /// (`docs/FORMAT.md`, short convolution).
    ShortConv,
}

impl Mixer {
    /// Metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::GatedDeltaNet => "gated_deltanet",
            Self::Mamba2 => "mamba2",
            Self::ShortConv => "short_conv",
        }
    }
}

/// Sizes of the gated DeltaNet layers (`model.delta_net.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaNet {
    /// Query/key heads (each serves `num_v_heads / num_k_heads` consecutive value heads).
    pub num_k_heads: usize,
    pub num_v_heads: usize,
    pub k_head_dim: usize,
    pub v_head_dim: usize,
    /// Width of the causal depthwise convolution over q, k and v.
    pub conv_kernel: usize,
}

impl DeltaNet {
    /// Channels of the convolution: q, k and v side by side.
    pub fn conv_dim(&self) -> usize {
        2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim
    }

    /// Floats of one layer's recurrent state: the last `conv_kernel − 1` convolution inputs and
    /// the `[v_heads, k_dim, v_dim]` delta-rule state.
    pub fn state_floats(&self) -> usize {
        self.conv_dim() * (self.conv_kernel - 1) + self.num_v_heads * self.k_head_dim * self.v_head_dim
    }
}

/// Sizes of the Mamba2 layers (`model.mamba2.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mamba2 {
    pub num_heads: usize,
    pub head_dim: usize,
    /// Size `N` of each head channel's state (`d_state`).
    pub state_size: usize,
    /// B and C groups: head `h` reads group `h / (num_heads / n_groups)`; the gated norm is
    /// taken per group of `num_heads · head_dim / n_groups` channels.
    pub n_groups: usize,
    /// Width of the causal depthwise convolution over x, B and C.
    pub conv_kernel: usize,
    /// The convolution has a bias (`mixer.conv.bias`).
    pub conv_bias: bool,
}

impl Mamba2 {
    /// Channels of x (and of the gate z, the norm and the output projection's input).
    pub fn inner(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Channels of the convolution: x, B and C side by side.
    pub fn conv_dim(&self) -> usize {
        self.inner() + 2 * self.n_groups * self.state_size
    }

    /// Floats of one layer's recurrent state: the last `conv_kernel − 1` convolution inputs and
    /// the `[heads, head_dim, state]` SSM state.
    pub fn state_floats(&self) -> usize {
        self.conv_dim() * (self.conv_kernel - 1) + self.inner() * self.state_size
    }
}

/// Largest convolution width of a recurrent mixer (real models use 3 or 4).
pub const MAX_CONV_KERNEL: usize = 64;

/// Layer-recipe choices beyond the Llama-style defaults. Every field defaults to the
/// standard families' choice, and its metadata key is written only when it differs, so
/// files of standard families are unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// `model.norm`: `rms` | `layer`.
    pub norm: NormKind,
    /// `model.positions`: `rope` | `learned`.
    pub positions: Positions,
    /// `model.attention_out_bias`: the attention output projection has a bias (`attn.o.bias`).
    pub attention_out_bias: bool,
    /// `model.ffn_activation`: `silu` | `gelu_tanh` (MEO banks).
    pub ffn_activation: Activation,
    /// `model.meo_token_bottleneck`: width `r` of the MEO token block (0 = none).
    pub meo_token_bottleneck: usize,
    /// `model.relative_buckets`, `model.relative_max_distance`: the relative position bias
    /// buckets and the distance from which all positions share the last bucket
    /// (`positions = relative`; 0 otherwise).
    pub relative_buckets: usize,
    pub relative_max_distance: usize,
    /// `model.attention_unscaled`: q·k is not multiplied by `head_dim^-0.5` (T5/Switch fold
    /// the scale into the weights).
    pub attention_unscaled: bool,
    /// `model.encoder_only`: a bidirectional encoder stack (every token attends to every
    /// token, no KV cache, no LM head): run with `Session::encode`, which returns the final
    /// normalised hidden states; `forward` refuses it.
    pub encoder_only: bool,
    /// `model.mla.*`: multi-head latent attention instead of q/k/v projections.
    pub mla: Option<Mla>,
    /// `model.rope_interleave`: RoPE rotates adjacent pairs `(2i, 2i+1)` instead of the
    /// halves `(i, i + d/2)` (DeepSeek).
    pub rope_interleave: bool,
    /// `model.rope_inv_freq`: the RoPE frequencies, precomputed by the converter for a scaled
    /// RoPE (YaRN); `None` = `rope_theta^(-2i/d)`.
    pub rope_inv_freq: Option<Vec<f32>>,
    /// `model.rope_attention_factor`: multiplies RoPE's cos and sin (YaRN); `None` = 1.
    pub rope_attention_factor: Option<f32>,
    /// `model.embedding_multiplier`: token embeddings are multiplied by it (Granite).
    pub embedding_multiplier: f32,
    /// `model.residual_multiplier`: each block's output is multiplied by it before it is added
    /// to the residual stream (Granite).
    pub residual_multiplier: f32,
    /// `model.attention_scale`: multiplies q·k; `None` = `1/sqrt(q·k width per head)`
    /// (DeepSeek's YaRN-corrected scale, Granite's `attention_multiplier`).
    pub attention_scale: Option<f32>,
    /// `model.logits_scaling`: the logits are divided by it (Granite).
    pub logits_scaling: f32,
    /// `model.attention_sinks`: each head has a learned sink logit (`attn.sinks`, `[heads]`)
    /// that joins the attention softmax and takes no value (GPT-OSS).
    pub attention_sinks: bool,
    /// `model.mlp_activation`: the gated MLPs' activation, `silu` | `clamped_swiglu`
    /// (+ `model.swiglu_alpha`, `model.swiglu_limit`).
    pub mlp_activation: Activation,
    /// `model.expert_bias`: routed experts have biases (`experts.X.{gate,up,down}_bias`).
    pub expert_bias: bool,
    /// `model.output_bias`: the LM head has a bias (`output.bias`, `[vocab]`; Phi-3.5-MoE's
    /// `lm_head_bias`).
    pub output_bias: bool,
    /// `model.rope_dim`: RoPE rotates only each head's first `rope_dim` dimensions (rotate-half
    /// within them) and passes the rest through (GLM-4.5's `partial_rotary_factor`); 0 = the
    /// whole head.
    pub rope_dim: usize,
    /// `model.layer_mixer`: each layer's token mixer (see [`Mixer`]); empty = every layer is
    /// attention (the key is written only when some layer is not, so attention-only files are
    /// unchanged).
    pub layer_mixer: Vec<Mixer>,
    /// `model.delta_net.*`: the sizes of the gated DeltaNet layers (with any
    /// [`Mixer::GatedDeltaNet`] layer).
    pub delta_net: Option<DeltaNet>,
    /// `model.mamba2.*`: the sizes of the Mamba2 layers (with any [`Mixer::Mamba2`] layer).
    pub mamba2: Option<Mamba2>,
    /// `model.short_conv.kernel`: the width of the [`Mixer::ShortConv`] layers' convolution
    /// (0 = no such layer).
    pub short_conv_kernel: usize,
    /// `model.attention_output_gate`: the attention output is multiplied by
    /// `sigmoid(attn.gate · x)` (per head dimension) before the output projection (Qwen3-Next).
    pub attention_output_gate: bool,
    /// `model.layer_nope`: per layer, true where attention applies no RoPE (Llama-4's NoPE
    /// layers); empty = RoPE in every layer.
    pub layer_nope: Vec<bool>,
    /// `model.layer_chunk`: per layer, attention within aligned chunks of this many positions
    /// (position `i` attends to `j ≤ i` with `j / chunk = i / chunk`; Llama-4's
    /// `chunked_attention`); 0 or empty = unchunked.
    pub layer_chunk: Vec<usize>,
    /// `model.qk_rms_after_rope`: each q and k head of every layer with RoPE is RMS-normalised
    /// without a weight (eps `model.rms_norm_eps`) after RoPE (Llama-4's `use_qk_norm`).
    pub qk_rms_after_rope: bool,
    /// `model.qk_norm_after_rope`: the q/k norm (`model.qk_norm`) is applied after RoPE
    /// instead of before (Hunyuan-MoE's `query_layernorm` / `key_layernorm`).
    pub qk_norm_after_rope: bool,
    /// `model.nope_temperature_floor_scale`, `model.nope_temperature_scale`: `(f, s)`; in NoPE
    /// layers the query at position `p` is multiplied by `1 + s · ln(1 + floor((p + 1) / f))`
    /// (Llama-4's `attn_temperature_tuning`).
    pub nope_temperature: Option<(f32, f32)>,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            norm: NormKind::Rms,
            positions: Positions::Rope,
            attention_out_bias: false,
            ffn_activation: Activation::Silu,
            meo_token_bottleneck: 0,
            relative_buckets: 0,
            relative_max_distance: 0,
            attention_unscaled: false,
            encoder_only: false,
            mla: None,
            rope_interleave: false,
            rope_inv_freq: None,
            rope_attention_factor: None,
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            attention_scale: None,
            logits_scaling: 1.0,
            attention_sinks: false,
            mlp_activation: Activation::Silu,
            expert_bias: false,
            output_bias: false,
            rope_dim: 0,
            layer_mixer: Vec::new(),
            delta_net: None,
            mamba2: None,
            short_conv_kernel: 0,
            attention_output_gate: false,
            layer_nope: Vec::new(),
            layer_chunk: Vec::new(),
            qk_rms_after_rope: false,
            qk_norm_after_rope: false,
            nope_temperature: None,
        }
    }
}

/// Everything that defines one family's routing (see `docs/ROUTING.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    /// Divide the selected weights by their sum (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Added to the denominator of that renormalisation (0 for the families here).
    pub norm_eps: f32,
    /// Multiplies the final weights (`routed_scaling_factor`).
    pub scaling_factor: f32,
    /// The router linear has a bias (`layers.L.router.bias`).
    pub router_bias: bool,
    /// A per-expert bias added to scores for selection only (`layers.L.router.selection_bias`).
    pub selection_bias: bool,
    /// Group-limited selection: experts in `n_group` groups, only `topk_group` groups eligible.
    pub n_group: usize,
    pub topk_group: usize,
    /// How a group is scored for that limit.
    pub group_score: GroupScore,
    pub num_shared_experts: usize,
    pub shared_gate: SharedGate,
    /// Most tokens of one sequence an expert takes, first come first served; later tokens
    /// routed to a full expert are dropped (Switch `expert_capacity`). 0 = unlimited.
    pub expert_capacity: usize,
    /// [`Scoring::SparseMixer`]'s `ε` (Phi-3.5-MoE's `router_jitter_noise`); 0 otherwise.
    pub sparsemixer_eps: f32,
    /// Each selected expert gets its weight on its input, `E_i(w_i · x)`, instead of on its
    /// output (Llama-4).
    pub weight_on_input: bool,
}

/// The canonical model description.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family name (`general.architecture`), e.g. `mixtral`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// q, k and v projections have biases.
    pub attention_bias: bool,
    pub qk_norm: QkNorm,
    /// Clamp q, k, v to ±clip after projection (OLMoE `clip_qkv`); `None` = no clamp.
    pub clip_qkv: Option<f32>,
    pub tie_word_embeddings: bool,
    /// Dense FFN intermediate size (dense layers).
    pub intermediate_size: usize,
    /// Routed expert intermediate size.
    pub expert_intermediate_size: usize,
    /// Shared expert intermediate size (0 = no shared expert).
    pub shared_expert_intermediate_size: usize,
    /// Per layer: dense FFN or MoE.
    pub layer_ffn: Vec<FfnKind>,
    /// Per layer: sliding attention window in tokens, 0 = full attention.
    pub layer_window: Vec<usize>,
    pub eos_token_ids: Vec<u64>,
    pub router: RouterSpec,
    /// Norm, positions, biases and activation choices (defaults: the Llama-style recipe).
    pub recipe: Recipe,
}

fn get<'m>(m: &'m Metadata<'_>, key: &'static str) -> Result<&'m MetaValue<'m>, ConfigError> {
    m.get(key).ok_or(ConfigError::Missing { key })
}

fn wrong(key: &'static str, expected: &'static str, v: &MetaValue<'_>) -> ConfigError {
    ConfigError::WrongType { key, expected, found: v.type_name() }
}

fn usize_of(m: &Metadata<'_>, key: &'static str) -> Result<usize, ConfigError> {
    match get(m, key)? {
        MetaValue::U64(x) => usize::try_from(*x).map_err(|_| ConfigError::Invalid { key, value: x.to_string() }),
        v => Err(wrong(key, "u64", v)),
    }
}

fn f32_of(m: &Metadata<'_>, key: &'static str) -> Result<f32, ConfigError> {
    match get(m, key)? {
        // Finite as an f64 is not enough: 1e300 becomes f32 infinity.
        MetaValue::F64(x) if (*x as f32).is_finite() => Ok(*x as f32),
        // Debug prints 1e300, not 301 digits.
        MetaValue::F64(x) => Err(ConfigError::Invalid { key, value: alloc::format!("{x:?}") }),
        v => Err(wrong(key, "f64", v)),
    }
}

fn bool_of(m: &Metadata<'_>, key: &'static str) -> Result<bool, ConfigError> {
    match get(m, key)? {
        MetaValue::Bool(x) => Ok(*x),
        v => Err(wrong(key, "bool", v)),
    }
}

fn str_of<'m>(m: &'m Metadata<'_>, key: &'static str) -> Result<&'m str, ConfigError> {
    match get(m, key)? {
        MetaValue::Str(s) => Ok(s),
        v => Err(wrong(key, "string", v)),
    }
}

fn u64s_of(m: &Metadata<'_>, key: &'static str) -> Result<Vec<u64>, ConfigError> {
    match get(m, key)? {
        MetaValue::Array(MetaArray::U64(v)) => Ok(v.clone()),
        v => Err(wrong(key, "array of u64", v)),
    }
}

fn strs_of<'m>(m: &'m Metadata<'_>, key: &'static str) -> Result<&'m [&'m str], ConfigError> {
    match get(m, key)? {
        MetaValue::Array(MetaArray::Str(v)) => Ok(v),
        v => Err(wrong(key, "array of string", v)),
    }
}

/// `key`'s number, or `default` when absent.
fn opt_f32(m: &Metadata<'_>, key: &'static str, default: f32) -> Result<f32, ConfigError> {
    if m.get(key).is_none() { Ok(default) } else { f32_of(m, key) }
}

/// `key`'s flag, `false` when absent.
fn opt_bool(m: &Metadata<'_>, key: &'static str) -> Result<bool, ConfigError> {
    if m.get(key).is_none() { Ok(false) } else { bool_of(m, key) }
}

/// `key`'s string, or `default` when absent.
fn opt_str<'m>(m: &'m Metadata<'_>, key: &'static str, default: &'m str) -> Result<&'m str, ConfigError> {
    if m.get(key).is_none() { Ok(default) } else { str_of(m, key) }
}

impl Recipe {
    fn from_metadata(m: &Metadata<'_>) -> Result<Self, ConfigError> {
        let norm = match opt_str(m, "model.norm", "rms")? {
            "rms" => NormKind::Rms,
            "layer" => NormKind::Layer,
            s => return Err(invalid("model.norm", s)),
        };
        let positions = match opt_str(m, "model.positions", "rope")? {
            "rope" => Positions::Rope,
            "learned" => Positions::Learned,
            "relative" => Positions::Relative,
            "none" => Positions::None,
            s => return Err(invalid("model.positions", s)),
        };
        let ffn_activation = match opt_str(m, "model.ffn_activation", "silu")? {
            "silu" => Activation::Silu,
            "gelu_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            s => return Err(invalid("model.ffn_activation", s)),
        };
        let attention_out_bias =
            if m.get("model.attention_out_bias").is_some() { bool_of(m, "model.attention_out_bias")? } else { false };
        let meo_token_bottleneck =
            if m.get("model.meo_token_bottleneck").is_some() { usize_of(m, "model.meo_token_bottleneck")? } else { 0 };
        let opt_usize = |key| if m.get(key).is_some() { usize_of(m, key) } else { Ok(0) };
        let (relative_buckets, relative_max_distance) = if positions == Positions::Relative {
            (usize_of(m, "model.relative_buckets")?, usize_of(m, "model.relative_max_distance")?)
        } else {
            (opt_usize("model.relative_buckets")?, opt_usize("model.relative_max_distance")?)
        };
        let mla = if m.get("model.mla.kv_lora_rank").is_some() {
            Some(Mla {
                q_lora_rank: usize_of(m, "model.mla.q_lora_rank")?,
                kv_lora_rank: usize_of(m, "model.mla.kv_lora_rank")?,
                qk_nope_head_dim: usize_of(m, "model.mla.qk_nope_head_dim")?,
                v_head_dim: usize_of(m, "model.mla.v_head_dim")?,
                latent_norm_eps: f32_of(m, "model.mla.latent_norm_eps")?,
            })
        } else {
            None
        };
        let opt_f32_some = |key| if m.get(key).is_some() { f32_of(m, key).map(Some) } else { Ok(None) };
        let rope_inv_freq = match m.get("model.rope_inv_freq") {
            None => None,
            Some(MetaValue::Array(MetaArray::F64(v))) => Some(v.iter().map(|&x| x as f32).collect()),
            Some(v) => return Err(wrong("model.rope_inv_freq", "array of f64", v)),
        };
        let positive = |key: &'static str, v: f32| if v > 0.0 { Ok(v) } else { Err(invalid(key, v)) };
        let attention_scale = match m.get("model.attention_scale") {
            None => None,
            Some(_) => Some(positive("model.attention_scale", f32_of(m, "model.attention_scale")?)?),
        };
        let mlp_activation = match opt_str(m, "model.mlp_activation", "silu")? {
            "silu" => Activation::Silu,
            "clamped_swiglu" => Activation::ClampedSwiglu {
                alpha: f32_of(m, "model.swiglu_alpha")?,
                limit: positive("model.swiglu_limit", f32_of(m, "model.swiglu_limit")?)?,
            },
            s => return Err(invalid("model.mlp_activation", s)),
        };
        let layer_mixer = match m.get("model.layer_mixer") {
            None => Vec::new(),
            Some(_) => strs_of(m, "model.layer_mixer")?
                .iter()
                .map(|s| match *s {
                    "attention" => Ok(Mixer::Attention),
                    "gated_deltanet" => Ok(Mixer::GatedDeltaNet),
                    "mamba2" => Ok(Mixer::Mamba2),
                    "short_conv" => Ok(Mixer::ShortConv),
                    other => Err(invalid("model.layer_mixer", other)),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let delta_net = if m.get("model.delta_net.num_k_heads").is_some() {
            Some(DeltaNet {
                num_k_heads: usize_of(m, "model.delta_net.num_k_heads")?,
                num_v_heads: usize_of(m, "model.delta_net.num_v_heads")?,
                k_head_dim: usize_of(m, "model.delta_net.k_head_dim")?,
                v_head_dim: usize_of(m, "model.delta_net.v_head_dim")?,
                conv_kernel: usize_of(m, "model.delta_net.conv_kernel")?,
            })
        } else {
            None
        };
        let mamba2 = if m.get("model.mamba2.num_heads").is_some() {
            Some(Mamba2 {
                num_heads: usize_of(m, "model.mamba2.num_heads")?,
                head_dim: usize_of(m, "model.mamba2.head_dim")?,
                state_size: usize_of(m, "model.mamba2.state_size")?,
                n_groups: usize_of(m, "model.mamba2.n_groups")?,
                conv_kernel: usize_of(m, "model.mamba2.conv_kernel")?,
                conv_bias: opt_bool(m, "model.mamba2.conv_bias")?,
            })
        } else {
            None
        };
        let layer_nope = match m.get("model.layer_nope") {
            None => Vec::new(),
            Some(MetaValue::Array(MetaArray::Bool(v))) => v.clone(),
            Some(v) => return Err(wrong("model.layer_nope", "array of bool", v)),
        };
        let layer_chunk = match m.get("model.layer_chunk") {
            None => Vec::new(),
            Some(_) => u64s_of(m, "model.layer_chunk")?
                .into_iter()
                .map(|w| usize::try_from(w).map_err(|_| invalid("model.layer_chunk", w)))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let nope_temperature = match opt_f32_some("model.nope_temperature_floor_scale")? {
            None => None,
            Some(f) => Some((f, f32_of(m, "model.nope_temperature_scale")?)),
        };
        Ok(Self {
            layer_nope,
            layer_chunk,
            qk_rms_after_rope: opt_bool(m, "model.qk_rms_after_rope")?,
            qk_norm_after_rope: opt_bool(m, "model.qk_norm_after_rope")?,
            nope_temperature,
            layer_mixer,
            delta_net,
            mamba2,
            short_conv_kernel: if m.get("model.short_conv.kernel").is_some() {
                usize_of(m, "model.short_conv.kernel")?
            } else {
                0
            },
            attention_output_gate: opt_bool(m, "model.attention_output_gate")?,
            norm,
            positions,
            attention_out_bias,
            ffn_activation,
            meo_token_bottleneck,
            relative_buckets,
            relative_max_distance,
            attention_unscaled: opt_bool(m, "model.attention_unscaled")?,
            encoder_only: opt_bool(m, "model.encoder_only")?,
            mla,
            rope_interleave: if m.get("model.rope_interleave").is_some() {
                bool_of(m, "model.rope_interleave")?
            } else {
                false
            },
            rope_inv_freq,
            rope_attention_factor: opt_f32_some("model.rope_attention_factor")?,
            embedding_multiplier: opt_f32(m, "model.embedding_multiplier", 1.0)?,
            residual_multiplier: opt_f32(m, "model.residual_multiplier", 1.0)?,
            attention_scale,
            logits_scaling: positive("model.logits_scaling", opt_f32(m, "model.logits_scaling", 1.0)?)?,
            attention_sinks: opt_bool(m, "model.attention_sinks")?,
            mlp_activation,
            expert_bias: opt_bool(m, "model.expert_bias")?,
            output_bias: opt_bool(m, "model.output_bias")?,
            rope_dim: opt_usize("model.rope_dim")?,
        })
    }

    /// The entries that differ from the defaults.
    fn to_metadata(&self) -> Vec<(&'static str, MetaValue<'static>)> {
        let mut v = Vec::new();
        if self.norm == NormKind::Layer {
            v.push(("model.norm", MetaValue::Str("layer")));
        }
        if self.positions == Positions::Learned {
            v.push(("model.positions", MetaValue::Str("learned")));
        }
        if self.positions == Positions::None {
            v.push(("model.positions", MetaValue::Str("none")));
        }
        if self.positions == Positions::Relative {
            v.push(("model.positions", MetaValue::Str("relative")));
            v.push(("model.relative_buckets", MetaValue::U64(self.relative_buckets as u64)));
            v.push(("model.relative_max_distance", MetaValue::U64(self.relative_max_distance as u64)));
        }
        if self.attention_unscaled {
            v.push(("model.attention_unscaled", MetaValue::Bool(true)));
        }
        if self.encoder_only {
            v.push(("model.encoder_only", MetaValue::Bool(true)));
        }
        if self.attention_out_bias {
            v.push(("model.attention_out_bias", MetaValue::Bool(true)));
        }
        if self.ffn_activation == Activation::GeluTanh {
            v.push(("model.ffn_activation", MetaValue::Str("gelu_tanh")));
        }
        if self.ffn_activation == Activation::Relu {
            v.push(("model.ffn_activation", MetaValue::Str("relu")));
        }
        if self.meo_token_bottleneck > 0 {
            v.push(("model.meo_token_bottleneck", MetaValue::U64(self.meo_token_bottleneck as u64)));
        }
        let f = |x: f32| MetaValue::F64(f32_to_f64_decimal(x));
        if let Some(a) = &self.mla {
            v.push(("model.mla.q_lora_rank", MetaValue::U64(a.q_lora_rank as u64)));
            v.push(("model.mla.kv_lora_rank", MetaValue::U64(a.kv_lora_rank as u64)));
            v.push(("model.mla.qk_nope_head_dim", MetaValue::U64(a.qk_nope_head_dim as u64)));
            v.push(("model.mla.v_head_dim", MetaValue::U64(a.v_head_dim as u64)));
            v.push(("model.mla.latent_norm_eps", f(a.latent_norm_eps)));
        }
        if self.rope_interleave {
            v.push(("model.rope_interleave", MetaValue::Bool(true)));
        }
        if let Some(freq) = &self.rope_inv_freq {
            // Exact: every f32 is an f64.
            let freq = freq.iter().map(|&x| f64::from(x)).collect();
            v.push(("model.rope_inv_freq", MetaValue::Array(MetaArray::F64(freq))));
        }
        if let Some(a) = self.rope_attention_factor {
            v.push(("model.rope_attention_factor", f(a)));
        }
        for (key, x) in [
            ("model.embedding_multiplier", self.embedding_multiplier),
            ("model.residual_multiplier", self.residual_multiplier),
            ("model.logits_scaling", self.logits_scaling),
        ] {
            if x != 1.0 {
                v.push((key, f(x)));
            }
        }
        if let Some(s) = self.attention_scale {
            v.push(("model.attention_scale", f(s)));
        }
        if self.attention_sinks {
            v.push(("model.attention_sinks", MetaValue::Bool(true)));
        }
        if let Activation::ClampedSwiglu { alpha, limit } = self.mlp_activation {
            v.push(("model.mlp_activation", MetaValue::Str("clamped_swiglu")));
            v.push(("model.swiglu_alpha", f(alpha)));
            v.push(("model.swiglu_limit", f(limit)));
        }
        if self.expert_bias {
            v.push(("model.expert_bias", MetaValue::Bool(true)));
        }
        if self.output_bias {
            v.push(("model.output_bias", MetaValue::Bool(true)));
        }
        if self.layer_mixer.iter().any(|&k| k != Mixer::Attention) {
            let kinds = self.layer_mixer.iter().map(|k| k.name()).collect();
            v.push(("model.layer_mixer", MetaValue::Array(MetaArray::Str(kinds))));
        }
        if let Some(d) = &self.delta_net {
            let u = |x: usize| MetaValue::U64(x as u64);
            v.push(("model.delta_net.num_k_heads", u(d.num_k_heads)));
            v.push(("model.delta_net.num_v_heads", u(d.num_v_heads)));
            v.push(("model.delta_net.k_head_dim", u(d.k_head_dim)));
            v.push(("model.delta_net.v_head_dim", u(d.v_head_dim)));
            v.push(("model.delta_net.conv_kernel", u(d.conv_kernel)));
        }
        if self.short_conv_kernel > 0 {
            v.push(("model.short_conv.kernel", MetaValue::U64(self.short_conv_kernel as u64)));
        }
        if let Some(d) = &self.mamba2 {
            let u = |x: usize| MetaValue::U64(x as u64);
            v.push(("model.mamba2.num_heads", u(d.num_heads)));
            v.push(("model.mamba2.head_dim", u(d.head_dim)));
            v.push(("model.mamba2.state_size", u(d.state_size)));
            v.push(("model.mamba2.n_groups", u(d.n_groups)));
            v.push(("model.mamba2.conv_kernel", u(d.conv_kernel)));
            if d.conv_bias {
                v.push(("model.mamba2.conv_bias", MetaValue::Bool(true)));
            }
        }
        if self.rope_dim > 0 {
            v.push(("model.rope_dim", MetaValue::U64(self.rope_dim as u64)));
        }
        if self.attention_output_gate {
            v.push(("model.attention_output_gate", MetaValue::Bool(true)));
        }
        if self.layer_nope.contains(&true) {
            v.push(("model.layer_nope", MetaValue::Array(MetaArray::Bool(self.layer_nope.clone()))));
        }
        if self.layer_chunk.iter().any(|&c| c > 0) {
            let c = self.layer_chunk.iter().map(|&c| c as u64).collect();
            v.push(("model.layer_chunk", MetaValue::Array(MetaArray::U64(c))));
        }
        if self.qk_rms_after_rope {
            v.push(("model.qk_rms_after_rope", MetaValue::Bool(true)));
        }
        if self.qk_norm_after_rope {
            v.push(("model.qk_norm_after_rope", MetaValue::Bool(true)));
        }
        if let Some((floor, scale)) = self.nope_temperature {
            v.push(("model.nope_temperature_floor_scale", f(floor)));
            v.push(("model.nope_temperature_scale", f(scale)));
        }
        v
    }
}

fn invalid(key: &'static str, value: impl ToString) -> ConfigError {
    ConfigError::Invalid { key, value: value.to_string() }
}

impl Scoring {
    /// Metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::SoftmaxAfterTopK => "softmax_after_topk",
            Self::Sigmoid => "sigmoid",
            Self::SparseMixer => "sparsemixer",
        }
    }
}

impl QkNorm {
    /// Metadata spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PerHead => "per_head",
            Self::Full => "full",
        }
    }
}

impl RouterSpec {
    /// `top_k` of `num_experts` scored by `scoring`, and nothing else: no renormalisation,
    /// bias, groups, shared experts or capacity. Start here and set what a family adds.
    pub fn plain(num_experts: usize, top_k: usize, scoring: Scoring) -> Self {
        Self {
            num_experts,
            top_k,
            scoring,
            norm_topk_prob: false,
            norm_eps: 0.0,
            scaling_factor: 1.0,
            router_bias: false,
            selection_bias: false,
            n_group: 1,
            topk_group: 1,
            group_score: GroupScore::TopTwoSum,
            num_shared_experts: 0,
            shared_gate: SharedGate::None,
            expert_capacity: 0,
            sparsemixer_eps: 0.0,
            weight_on_input: false,
        }
    }

    /// Reads `routing.*`.
    ///
    /// # Errors
    /// A missing, mistyped or inconsistent key.
    pub fn from_metadata(m: &Metadata<'_>) -> Result<Self, ConfigError> {
        let scoring = match str_of(m, "routing.scoring")? {
            "softmax" => Scoring::Softmax,
            "softmax_after_topk" => Scoring::SoftmaxAfterTopK,
            "sigmoid" => Scoring::Sigmoid,
            "sparsemixer" => Scoring::SparseMixer,
            s => return Err(invalid("routing.scoring", s)),
        };
        let shared_gate = match str_of(m, "routing.shared_gate")? {
            "none" => SharedGate::None,
            "sigmoid" => SharedGate::Sigmoid,
            s => return Err(invalid("routing.shared_gate", s)),
        };
        // Optional: files from before group scoring was a setting used the top-2 sum.
        let group_score = match opt_str(m, "routing.group_score", "top2_sum")? {
            "top2_sum" => GroupScore::TopTwoSum,
            "max" => GroupScore::Max,
            s => return Err(invalid("routing.group_score", s)),
        };
        let r = Self {
            num_experts: usize_of(m, "routing.num_experts")?,
            top_k: usize_of(m, "routing.top_k")?,
            scoring,
            norm_topk_prob: bool_of(m, "routing.norm_topk_prob")?,
            norm_eps: f32_of(m, "routing.norm_eps")?,
            scaling_factor: f32_of(m, "routing.scaling_factor")?,
            router_bias: bool_of(m, "routing.router_bias")?,
            selection_bias: bool_of(m, "routing.selection_bias")?,
            n_group: usize_of(m, "routing.n_group")?,
            topk_group: usize_of(m, "routing.topk_group")?,
            group_score,
            num_shared_experts: usize_of(m, "routing.num_shared_experts")?,
            shared_gate,
            expert_capacity: usize_of(m, "routing.expert_capacity")?,
            sparsemixer_eps: if scoring == Scoring::SparseMixer { f32_of(m, "routing.sparsemixer_eps")? } else { 0.0 },
            weight_on_input: opt_bool(m, "routing.weight_on_input")?,
        };
        if !(r.sparsemixer_eps.is_finite() && r.sparsemixer_eps >= 0.0) {
            return Err(invalid("routing.sparsemixer_eps", r.sparsemixer_eps));
        }
        // The sparsemixer selects on the raw logits: no bias or groups apply to it.
        if r.scoring == Scoring::SparseMixer && (r.selection_bias || r.n_group > 1) {
            return Err(invalid("routing.scoring", "sparsemixer with a selection bias or groups"));
        }
        if r.num_experts == 0 || r.top_k == 0 || r.top_k > r.num_experts || r.top_k > MAX_TOP_K {
            return Err(invalid("routing.top_k", r.top_k));
        }
        if r.n_group == 0 || !r.num_experts.is_multiple_of(r.n_group) || r.topk_group == 0 || r.topk_group > r.n_group {
            return Err(invalid("routing.n_group", r.n_group));
        }
        Ok(r)
    }

    /// The `routing.*` entries (`routing.group_score` only with groups).
    pub fn to_metadata(&self) -> Vec<(&'static str, MetaValue<'static>)> {
        let u = |x: usize| MetaValue::U64(x as u64);
        let f = |x: f32| MetaValue::F64(f32_to_f64_decimal(x));
        let mut v = vec_of([
            ("routing.num_experts", u(self.num_experts)),
            ("routing.top_k", u(self.top_k)),
            ("routing.scoring", MetaValue::Str(self.scoring.name())),
            ("routing.norm_topk_prob", MetaValue::Bool(self.norm_topk_prob)),
            ("routing.norm_eps", f(self.norm_eps)),
            ("routing.scaling_factor", f(self.scaling_factor)),
            ("routing.router_bias", MetaValue::Bool(self.router_bias)),
            ("routing.selection_bias", MetaValue::Bool(self.selection_bias)),
            ("routing.n_group", u(self.n_group)),
            ("routing.topk_group", u(self.topk_group)),
            ("routing.num_shared_experts", u(self.num_shared_experts)),
            (
                "routing.shared_gate",
                MetaValue::Str(match self.shared_gate {
                    SharedGate::None => "none",
                    SharedGate::Sigmoid => "sigmoid",
                }),
            ),
            ("routing.expert_capacity", u(self.expert_capacity)),
        ]);
        if self.n_group > 1 {
            v.push(("routing.group_score", MetaValue::Str(self.group_score.name())));
        }
        if self.scoring == Scoring::SparseMixer {
            v.push(("routing.sparsemixer_eps", f(self.sparsemixer_eps)));
        }
        if self.weight_on_input {
            v.push(("routing.weight_on_input", MetaValue::Bool(true)));
        }
        v
    }
}

/// Widens `x` to the f64 with the same shortest decimal form (1e-5f32 → 1e-5, not
/// 9.99999974e-6), so stored values read back as the numbers the checkpoint's config wrote.
fn f32_to_f64_decimal(x: f32) -> f64 {
    alloc::format!("{x}").parse().unwrap_or(f64::from(x))
}

fn vec_of<const N: usize>(a: [(&'static str, MetaValue<'static>); N]) -> Vec<(&'static str, MetaValue<'static>)> {
    a.into_iter().collect()
}

impl ModelConfig {
    /// Dimensions of each q/k head that RoPE rotates (from the first): `model.rope_dim`, or
    /// the whole `head_dim`.
    pub fn rotary_dim(&self) -> usize {
        if self.recipe.rope_dim > 0 { self.recipe.rope_dim } else { self.head_dim }
    }

    /// The token mixer of layer `l` (attention unless `model.layer_mixer` says otherwise).
    pub fn mixer(&self, l: usize) -> Mixer {
        self.recipe.layer_mixer.get(l).copied().unwrap_or_default()
    }

    /// Layers whose mixer is attention (the ones with a KV cache).
    pub fn attention_layers(&self) -> usize {
        (0..self.num_layers).filter(|&l| self.mixer(l) == Mixer::Attention).count()
    }

    /// Bytes of recurrent state a session holds whatever the context length: every recurrent
    /// layer's fixed-size state, f32. 0 for attention-only models. Saturates.
    pub fn recurrent_state_bytes(&self) -> u64 {
        let floats =
            (0..self.num_layers).map(|l| self.recurrent_state_floats(l) as u64).fold(0u64, |a, b| a.saturating_add(b));
        floats.saturating_mul(4)
    }

    /// Floats of layer `l`'s recurrent state (0 for attention, or sizes not given).
    pub fn recurrent_state_floats(&self, l: usize) -> usize {
        match self.mixer(l) {
            Mixer::Attention => 0,
            Mixer::GatedDeltaNet => self.recipe.delta_net.map_or(0, |d| d.state_floats()),
            Mixer::Mamba2 => self.recipe.mamba2.map_or(0, |d| d.state_floats()),
            Mixer::ShortConv => self.hidden_size * self.recipe.short_conv_kernel.saturating_sub(1),
        }
    }

    /// Bytes of KV cache one position costs a session storing its cache as `kv` says: every
    /// attention layer's keys and values (an MLA layer: its latent, or each head's
    /// decompressed keys and values); recurrent layers cost nothing per position. Saturates
    /// instead of overflowing.
    pub fn kv_bytes_per_position(&self, kv: crate::KvOptions) -> u64 {
        use crate::model::kv::CacheShape;
        let shape = match &self.recipe.mla {
            Some(m) => CacheShape::Mla {
                heads: self.num_heads,
                nope: m.qk_nope_head_dim,
                rope: self.head_dim,
                v: m.v_head_dim,
                kv_lora: m.kv_lora_rank,
            },
            None => CacheShape::Gqa { kv_heads: self.num_kv_heads, head_dim: self.head_dim },
        };
        kv.position_bytes(shape).saturating_mul(self.attention_layers() as u64)
    }

    /// Bytes of KV cache a session holding `positions` positions uses when it stores its
    /// cache as `kv` says (scratch buffers, which do not grow with the context, not
    /// included). Saturates instead of overflowing.
    pub fn kv_cache_bytes(&self, positions: usize, kv: crate::KvOptions) -> u64 {
        self.kv_bytes_per_position(kv).saturating_mul(positions as u64)
    }
}

impl ModelConfig {
    /// Reads `general.architecture`, `model.*` and `routing.*`, and checks they agree.
    ///
    /// # Errors
    /// A missing, mistyped or inconsistent key.
    pub fn from_metadata(m: &Metadata<'_>) -> Result<Self, ConfigError> {
        let qk_norm = match str_of(m, "model.qk_norm")? {
            "none" => QkNorm::None,
            "per_head" => QkNorm::PerHead,
            "full" => QkNorm::Full,
            s => return Err(invalid("model.qk_norm", s)),
        };
        let layer_ffn = strs_of(m, "model.layer_ffn")?
            .iter()
            .map(|s| match *s {
                "dense" => Ok(FfnKind::Dense),
                "moe" => Ok(FfnKind::Moe),
                "meo_bank" => Ok(FfnKind::MeoBank),
                other => Err(invalid("model.layer_ffn", other)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let layer_window = u64s_of(m, "model.layer_window")?
            .into_iter()
            .map(|w| usize::try_from(w).map_err(|_| invalid("model.layer_window", w)))
            .collect::<Result<Vec<_>, _>>()?;
        let clip = f32_of(m, "model.clip_qkv")?;
        let c = Self {
            architecture: str_of(m, "general.architecture")?.to_owned(),
            vocab_size: usize_of(m, "model.vocab_size")?,
            hidden_size: usize_of(m, "model.hidden_size")?,
            num_layers: usize_of(m, "model.num_layers")?,
            num_heads: usize_of(m, "model.num_heads")?,
            num_kv_heads: usize_of(m, "model.num_kv_heads")?,
            head_dim: usize_of(m, "model.head_dim")?,
            rms_norm_eps: f32_of(m, "model.rms_norm_eps")?,
            rope_theta: f32_of(m, "model.rope_theta")?,
            max_position_embeddings: usize_of(m, "model.max_position_embeddings")?,
            attention_bias: bool_of(m, "model.attention_bias")?,
            qk_norm,
            clip_qkv: (clip > 0.0).then_some(clip),
            tie_word_embeddings: bool_of(m, "model.tie_word_embeddings")?,
            intermediate_size: usize_of(m, "model.intermediate_size")?,
            expert_intermediate_size: usize_of(m, "model.expert_intermediate_size")?,
            shared_expert_intermediate_size: usize_of(m, "model.shared_expert_intermediate_size")?,
            layer_ffn,
            layer_window,
            eos_token_ids: u64s_of(m, "model.eos_token_ids")?,
            router: RouterSpec::from_metadata(m)?,
            recipe: Recipe::from_metadata(m)?,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the relations between fields (non-zero sizes, per-layer lists, head grouping).
    ///
    /// # Errors
    /// The first inconsistent field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("model.vocab_size", self.vocab_size),
            ("model.hidden_size", self.hidden_size),
            ("model.num_layers", self.num_layers),
            ("model.num_heads", self.num_heads),
            ("model.num_kv_heads", self.num_kv_heads),
            ("model.head_dim", self.head_dim),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return Err(invalid(k, 0));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid("model.num_kv_heads", self.num_kv_heads));
        }
        if self.layer_ffn.len() != self.num_layers {
            return Err(invalid(
                "model.layer_ffn",
                alloc::format!("{} entries for {} layers", self.layer_ffn.len(), self.num_layers),
            ));
        }
        if self.layer_window.len() != self.num_layers {
            return Err(invalid(
                "model.layer_window",
                alloc::format!("{} entries for {} layers", self.layer_window.len(), self.num_layers),
            ));
        }
        if self.layer_ffn.contains(&FfnKind::MeoBank) && self.intermediate_size == 0 {
            return Err(invalid("model.intermediate_size", 0));
        }
        if self.layer_ffn.contains(&FfnKind::Moe) && self.expert_intermediate_size == 0 {
            return Err(invalid("model.expert_intermediate_size", 0));
        }
        if self.layer_ffn.contains(&FfnKind::Dense) && self.intermediate_size == 0 {
            return Err(invalid("model.intermediate_size", 0));
        }
        if self.recipe.positions == Positions::Relative {
            // Bidirectional bucketing halves the buckets and keeps an exact range of half of
            // those (≥ 1); the logarithmic range needs max_distance beyond the exact range.
            let (b, d) = (self.recipe.relative_buckets, self.recipe.relative_max_distance);
            if b < 4 {
                return Err(invalid("model.relative_buckets", b));
            }
            if d <= b / 2 {
                return Err(invalid("model.relative_max_distance", d));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(invalid("model.rms_norm_eps", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid("model.rope_theta", self.rope_theta));
        }
        self.validate_sizes()?;
        self.validate_mixers()?;
        self.validate_attention()
    }

    /// `model.layer_mixer` has one entry per layer, and every mixer it names has its sizes.
    fn validate_mixers(&self) -> Result<(), ConfigError> {
        let r = &self.recipe;
        if !r.layer_mixer.is_empty() && r.layer_mixer.len() != self.num_layers {
            return Err(invalid(
                "model.layer_mixer",
                alloc::format!("{} entries for {} layers", r.layer_mixer.len(), self.num_layers),
            ));
        }
        if r.layer_mixer.contains(&Mixer::GatedDeltaNet) {
            let d = r.delta_net.ok_or(ConfigError::Missing { key: "model.delta_net.num_k_heads" })?;
            for (k, v) in [
                ("model.delta_net.num_k_heads", d.num_k_heads),
                ("model.delta_net.num_v_heads", d.num_v_heads),
                ("model.delta_net.k_head_dim", d.k_head_dim),
                ("model.delta_net.v_head_dim", d.v_head_dim),
            ] {
                if v == 0 || v > MAX_WIDTH {
                    return Err(invalid(k, v));
                }
            }
            if !d.num_v_heads.is_multiple_of(d.num_k_heads) {
                return Err(invalid("model.delta_net.num_v_heads", "not a multiple of num_k_heads"));
            }
            if d.conv_kernel == 0 || d.conv_kernel > MAX_CONV_KERNEL {
                return Err(invalid("model.delta_net.conv_kernel", d.conv_kernel));
            }
            let widths = d
                .num_k_heads
                .checked_mul(d.k_head_dim)
                .zip(d.num_v_heads.checked_mul(d.v_head_dim))
                .zip(d.num_v_heads.checked_mul(d.k_head_dim).and_then(|x| x.checked_mul(d.v_head_dim)));
            if !matches!(widths, Some(((kd, vd), s)) if kd <= MAX_WIDTH && vd <= MAX_WIDTH && s <= MAX_WIDTH) {
                return Err(invalid("model.delta_net.v_head_dim", "heads × head sizes are too large"));
            }
        }
        if r.layer_mixer.contains(&Mixer::ShortConv) {
            let k = r.short_conv_kernel;
            if k == 0 || k > MAX_CONV_KERNEL {
                return Err(invalid("model.short_conv.kernel", k));
            }
        }
        if r.layer_mixer.contains(&Mixer::Mamba2) {
            let d = r.mamba2.ok_or(ConfigError::Missing { key: "model.mamba2.num_heads" })?;
            for (k, v) in [
                ("model.mamba2.num_heads", d.num_heads),
                ("model.mamba2.head_dim", d.head_dim),
                ("model.mamba2.state_size", d.state_size),
                ("model.mamba2.n_groups", d.n_groups),
            ] {
                if v == 0 || v > MAX_WIDTH {
                    return Err(invalid(k, v));
                }
            }
            if !d.num_heads.is_multiple_of(d.n_groups) {
                return Err(invalid("model.mamba2.num_heads", "not a multiple of n_groups"));
            }
            if d.conv_kernel == 0 || d.conv_kernel > MAX_CONV_KERNEL {
                return Err(invalid("model.mamba2.conv_kernel", d.conv_kernel));
            }
            let inner = d.num_heads.checked_mul(d.head_dim);
            let bc = d.n_groups.checked_mul(d.state_size).and_then(|x| x.checked_mul(2));
            let state = inner.and_then(|i| i.checked_mul(d.state_size));
            let conv = inner.zip(bc).and_then(|(i, b)| i.checked_add(b));
            if !matches!((conv, state), (Some(c), Some(s)) if c <= MAX_WIDTH && s <= MAX_WIDTH) {
                return Err(invalid("model.mamba2.head_dim", "heads × head sizes are too large"));
            }
        }
        Ok(())
    }

    /// Every size against its limit ([`MAX_LAYERS`], [`MAX_EXPERTS`], [`MAX_WIDTH`],
    /// [`MAX_POSITIONS`]) and the products tensors are sized by: nothing derived from a
    /// config can overflow or ask for an absurd allocation once this passes.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        if self.num_layers > MAX_LAYERS {
            return Err(invalid("model.num_layers", self.num_layers));
        }
        if self.router.num_experts > MAX_EXPERTS {
            return Err(invalid("routing.num_experts", self.router.num_experts));
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(invalid("model.max_position_embeddings", self.max_position_embeddings));
        }
        let r = &self.recipe;
        let mut widths = alloc::vec![
            ("model.vocab_size", self.vocab_size),
            ("model.hidden_size", self.hidden_size),
            ("model.num_heads", self.num_heads),
            ("model.num_kv_heads", self.num_kv_heads),
            ("model.head_dim", self.head_dim),
            ("model.intermediate_size", self.intermediate_size),
            ("model.expert_intermediate_size", self.expert_intermediate_size),
            ("model.shared_expert_intermediate_size", self.shared_expert_intermediate_size),
            ("model.meo_token_bottleneck", r.meo_token_bottleneck),
            ("model.relative_buckets", r.relative_buckets),
            ("model.relative_max_distance", r.relative_max_distance),
            ("routing.num_shared_experts", self.router.num_shared_experts),
            ("routing.expert_capacity", self.router.expert_capacity),
        ];
        if let Some(a) = &r.mla {
            widths.extend([
                ("model.mla.q_lora_rank", a.q_lora_rank),
                ("model.mla.kv_lora_rank", a.kv_lora_rank),
                ("model.mla.qk_nope_head_dim", a.qk_nope_head_dim),
                ("model.mla.v_head_dim", a.v_head_dim),
            ]);
        }
        if let Some((k, v)) = widths.into_iter().find(|(_, v)| *v > MAX_WIDTH) {
            return Err(invalid(k, v));
        }
        if self.layer_window.iter().any(|&w| w > MAX_POSITIONS) {
            return Err(invalid("model.layer_window", "a window beyond the largest context"));
        }
        // The attention widths (q and kv rows) are widths too.
        let heads = |n: usize, d: usize| n.checked_mul(d).filter(|&x| x <= MAX_WIDTH);
        if heads(self.num_heads, self.head_dim).is_none() {
            return Err(invalid("model.head_dim", "num_heads × head_dim is too large"));
        }
        if let Some(a) = &r.mla {
            let per = a.qk_nope_head_dim.max(a.v_head_dim) + self.head_dim;
            if heads(self.num_heads, per).is_none() {
                return Err(invalid("model.mla.qk_nope_head_dim", "num_heads × head width is too large"));
            }
        }
        Ok(())
    }

    /// The MLA and RoPE settings of the recipe against the sizes.
    fn validate_attention(&self) -> Result<(), ConfigError> {
        let r = &self.recipe;
        if let Some(a) = &r.mla {
            if a.kv_lora_rank == 0 || a.v_head_dim == 0 {
                return Err(invalid("model.mla.kv_lora_rank", alloc::format!("{a:?}")));
            }
            // Every head decompresses its own keys and values from the shared latent.
            if self.num_kv_heads != self.num_heads {
                return Err(invalid("model.num_kv_heads", "must equal model.num_heads with MLA"));
            }
            if a.latent_norm_eps.is_nan() || a.latent_norm_eps < 0.0 {
                return Err(invalid("model.mla.latent_norm_eps", a.latent_norm_eps));
            }
            // Options of the q/k/v path that MLA has no place for: refused, not ignored.
            let unused = [
                ("model.attention_bias", self.attention_bias),
                ("model.qk_norm", self.qk_norm != QkNorm::None),
                ("model.clip_qkv", self.clip_qkv.is_some()),
                ("model.attention_out_bias", r.attention_out_bias),
                ("model.norm", r.norm != NormKind::Rms),
                ("model.positions", r.positions != Positions::Rope),
            ];
            if let Some((key, _)) = unused.iter().find(|u| u.1) {
                return Err(invalid(key, "not supported with MLA"));
            }
        }
        if r.rope_dim > 0 {
            // MLA's rotary width is `model.head_dim` itself.
            if !r.rope_dim.is_multiple_of(2) || r.rope_dim > self.head_dim || r.mla.is_some() {
                return Err(invalid(
                    "model.rope_dim",
                    alloc::format!(
                        "{} (must be even, at most head_dim {}, and not with MLA)",
                        r.rope_dim,
                        self.head_dim
                    ),
                ));
            }
        }
        if let Some(f) = &r.rope_inv_freq
            && (f.len() != self.rotary_dim() / 2 || f.iter().any(|x| !x.is_finite()))
        {
            return Err(invalid(
                "model.rope_inv_freq",
                alloc::format!("{} values for {} rotary dimensions", f.len(), self.rotary_dim()),
            ));
        }
        for (key, v) in
            [("model.rope_attention_factor", r.rope_attention_factor), ("model.attention_scale", r.attention_scale)]
        {
            if let Some(x) = v
                && !(x.is_finite() && x > 0.0)
            {
                return Err(invalid(key, x));
            }
        }
        for (key, len) in [("model.layer_nope", r.layer_nope.len()), ("model.layer_chunk", r.layer_chunk.len())] {
            if len != 0 && len != self.num_layers {
                return Err(invalid(key, alloc::format!("{len} entries for {} layers", self.num_layers)));
            }
        }
        if r.layer_chunk.iter().any(|&c| c > MAX_POSITIONS) {
            return Err(invalid("model.layer_chunk", "a chunk beyond the largest context"));
        }
        if let Some((floor, scale)) = r.nope_temperature
            && !(floor.is_finite() && floor > 0.0 && scale.is_finite())
        {
            return Err(invalid("model.nope_temperature_floor_scale", alloc::format!("{floor}, scale {scale}")));
        }
        // NoPE layers, chunks and the post-RoPE norm belong to the q/k/v path.
        let gqa_only = [
            ("model.layer_nope", r.layer_nope.contains(&true)),
            ("model.layer_chunk", r.layer_chunk.iter().any(|&c| c > 0)),
            ("model.qk_rms_after_rope", r.qk_rms_after_rope),
            ("model.qk_norm_after_rope", r.qk_norm_after_rope),
        ];
        if r.mla.is_some()
            && let Some((key, _)) = gqa_only.iter().find(|u| u.1)
        {
            return Err(invalid(key, "not supported with MLA"));
        }
        Ok(())
    }

    /// Whether layer `l` applies RoPE (RoPE positions and not a NoPE layer).
    pub fn layer_rope(&self, l: usize) -> bool {
        self.recipe.positions == Positions::Rope && !self.recipe.layer_nope.get(l).copied().unwrap_or(false)
    }

    /// The attention chunk of layer `l` (0 = unchunked).
    pub fn layer_chunk(&self, l: usize) -> usize {
        self.recipe.layer_chunk.get(l).copied().unwrap_or(0)
    }

    /// The metadata key of the first attention or routing variant this config uses that only
    /// the CPU target runs so far (Llama-4's NoPE layers, chunked attention, post-RoPE q/k norm,
    /// NoPE query temperature and expert-input routing weights; Hunyuan-MoE's q/k norm after
    /// RoPE), if any: what the wgpu and ONNX targets refuse a model by.
    pub fn cpu_only_variant(&self) -> Option<&'static str> {
        let r = &self.recipe;
        [
            ("model.layer_nope", r.layer_nope.contains(&true)),
            ("model.layer_chunk", r.layer_chunk.iter().any(|&c| c > 0)),
            ("model.qk_rms_after_rope", r.qk_rms_after_rope),
            ("model.nope_temperature_floor_scale", r.nope_temperature.is_some()),
            ("model.qk_norm_after_rope", r.qk_norm_after_rope),
            ("routing.weight_on_input", self.router.weight_on_input),
        ]
        .into_iter()
        .find_map(|(key, on)| on.then_some(key))
    }

    /// The `general.architecture`, `model.*` and `routing.*` entries.
    pub fn to_metadata(&self) -> Vec<(&str, MetaValue<'_>)> {
        let u = |x: usize| MetaValue::U64(x as u64);
        let f = |x: f32| MetaValue::F64(f32_to_f64_decimal(x));
        let mut v: Vec<(&str, MetaValue<'_>)> = vec_of([
            ("model.vocab_size", u(self.vocab_size)),
            ("model.hidden_size", u(self.hidden_size)),
            ("model.num_layers", u(self.num_layers)),
            ("model.num_heads", u(self.num_heads)),
            ("model.num_kv_heads", u(self.num_kv_heads)),
            ("model.head_dim", u(self.head_dim)),
            ("model.rms_norm_eps", f(self.rms_norm_eps)),
            ("model.rope_theta", f(self.rope_theta)),
            ("model.max_position_embeddings", u(self.max_position_embeddings)),
            ("model.attention_bias", MetaValue::Bool(self.attention_bias)),
            ("model.qk_norm", MetaValue::Str(self.qk_norm.name())),
            ("model.clip_qkv", f(self.clip_qkv.unwrap_or(0.0))),
            ("model.tie_word_embeddings", MetaValue::Bool(self.tie_word_embeddings)),
            ("model.intermediate_size", u(self.intermediate_size)),
            ("model.expert_intermediate_size", u(self.expert_intermediate_size)),
            ("model.shared_expert_intermediate_size", u(self.shared_expert_intermediate_size)),
        ])
        .into_iter()
        .collect();
        v.push(("general.architecture", MetaValue::Str(&self.architecture)));
        let ffn = self
            .layer_ffn
            .iter()
            .map(|k| match k {
                FfnKind::Dense => "dense",
                FfnKind::Moe => "moe",
                FfnKind::MeoBank => "meo_bank",
            })
            .collect();
        v.push(("model.layer_ffn", MetaValue::Array(MetaArray::Str(ffn))));
        let win = self.layer_window.iter().map(|&w| w as u64).collect();
        v.push(("model.layer_window", MetaValue::Array(MetaArray::U64(win))));
        v.push(("model.eos_token_ids", MetaValue::Array(MetaArray::U64(self.eos_token_ids.clone()))));
        v.extend(self.router.to_metadata());
        v.extend(self.recipe.to_metadata());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ModelConfig {
        ModelConfig {
            architecture: "mixtral".into(),
            vocab_size: 256,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            max_position_embeddings: 512,
            attention_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            tie_word_embeddings: false,
            intermediate_size: 0,
            expert_intermediate_size: 16,
            shared_expert_intermediate_size: 0,
            layer_ffn: alloc::vec![FfnKind::Moe; 2],
            layer_window: alloc::vec![0; 2],
            eos_token_ids: alloc::vec![2],
            router: RouterSpec { norm_topk_prob: true, ..RouterSpec::plain(8, 2, Scoring::Softmax) },
            recipe: Recipe::default(),
        }
    }

    #[test]
    fn metadata_round_trip() {
        let c = sample();
        let bytes = Metadata::from_entries(c.to_metadata()).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert_eq!(ModelConfig::from_metadata(&m).unwrap(), c);
    }

    #[test]
    fn recipe_round_trips_and_defaults_write_nothing() {
        let c = sample();
        assert!(c.to_metadata().iter().all(|(k, _)| !k.starts_with("model.norm") && *k != "model.positions"));
        let mut c = sample();
        c.layer_ffn = alloc::vec![FfnKind::MeoBank; 2];
        c.intermediate_size = 32;
        c.recipe = Recipe {
            norm: NormKind::Layer,
            positions: Positions::Learned,
            attention_out_bias: true,
            ffn_activation: Activation::GeluTanh,
            meo_token_bottleneck: 8,
            ..Recipe::default()
        };
        let bytes = Metadata::from_entries(c.to_metadata()).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert_eq!(ModelConfig::from_metadata(&m).unwrap(), c);
        // The Switch encoder's recipe.
        let mut c = sample();
        c.layer_ffn = alloc::vec![FfnKind::Dense, FfnKind::Moe];
        c.intermediate_size = 32;
        c.router.expert_capacity = 3;
        c.recipe = Recipe {
            positions: Positions::Relative,
            ffn_activation: Activation::Relu,
            relative_buckets: 32,
            relative_max_distance: 128,
            attention_unscaled: true,
            encoder_only: true,
            ..Recipe::default()
        };
        let bytes = Metadata::from_entries(c.to_metadata()).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert_eq!(ModelConfig::from_metadata(&m).unwrap(), c);
    }

    #[test]
    fn mla_rope_and_group_keys_round_trip_and_mla_refuses_qkv_options() {
        let mut c = sample();
        c.num_kv_heads = c.num_heads;
        c.head_dim = 8;
        c.router.n_group = 4;
        c.router.topk_group = 2;
        c.router.group_score = GroupScore::Max;
        c.recipe = Recipe {
            mla: Some(Mla {
                q_lora_rank: 0,
                kv_lora_rank: 12,
                qk_nope_head_dim: 6,
                v_head_dim: 5,
                latent_norm_eps: 1e-6,
            }),
            rope_interleave: true,
            rope_inv_freq: Some(alloc::vec![1.0, 0.1, 0.01, 1e-3 / 3.0]),
            rope_attention_factor: Some(1.25),
            attention_scale: Some(0.3),
            ..Recipe::default()
        };
        let entries = c.to_metadata();
        assert!(entries.iter().any(|(k, v)| *k == "routing.group_score" && *v == MetaValue::Str("max")));
        let bytes = Metadata::from_entries(entries).to_bytes();
        assert_eq!(ModelConfig::from_metadata(&Metadata::parse(&bytes).unwrap()).unwrap(), c);
        // Without groups the key is not written, and reads back as the top-2 sum.
        assert!(sample().to_metadata().iter().all(|(k, _)| *k != "routing.group_score"));
        let mut bad = c.clone();
        bad.qk_norm = QkNorm::PerHead;
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.qk_norm", .. })));
        let mut bad = c.clone();
        bad.num_kv_heads = 2;
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.num_kv_heads", .. })));
        let mut bad = c;
        bad.recipe.rope_inv_freq = Some(alloc::vec![1.0; 3]);
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.rope_inv_freq", .. })));
    }

    #[test]
    fn granite_and_gpt_oss_recipe_round_trips() {
        let mut c = sample();
        c.recipe = Recipe {
            embedding_multiplier: 12.0,
            residual_multiplier: 0.22,
            attention_scale: Some(0.015625),
            logits_scaling: 6.0,
            attention_sinks: true,
            // YaRN, as the converter stores it: 16/2 frequencies and the cos/sin factor.
            rope_inv_freq: Some((0..8).map(|i| 1.0 / (1 << i) as f32 / 32.0).collect()),
            rope_attention_factor: Some(1.3465736),
            mlp_activation: Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 },
            expert_bias: true,
            ..Recipe::default()
        };
        let meta = c.to_metadata();
        let bytes = Metadata::from_entries(meta).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert_eq!(ModelConfig::from_metadata(&m).unwrap(), c);
        // A clamped SwiGLU missing its limit is refused, naming the key.
        let partial: Vec<_> = c.to_metadata().into_iter().filter(|(k, _)| *k != "model.swiglu_limit").collect();
        let bytes = Metadata::from_entries(partial).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert_eq!(ModelConfig::from_metadata(&m), Err(ConfigError::Missing { key: "model.swiglu_limit" }));
    }

    #[test]
    fn sparsemixer_and_output_bias_round_trip() {
        let mut c = sample();
        c.router.scoring = Scoring::SparseMixer;
        c.router.sparsemixer_eps = 0.01;
        c.recipe.output_bias = true;
        let entries = c.to_metadata();
        assert!(entries.iter().any(|(k, _)| *k == "routing.sparsemixer_eps"));
        let bytes = Metadata::from_entries(entries).to_bytes();
        assert_eq!(ModelConfig::from_metadata(&Metadata::parse(&bytes).unwrap()).unwrap(), c);
        // Other scorings write neither key.
        assert!(
            sample().to_metadata().iter().all(|(k, _)| *k != "routing.sparsemixer_eps" && *k != "model.output_bias")
        );
        // The eps is required with sparsemixer.
        let partial: Vec<_> = c.to_metadata().into_iter().filter(|(k, _)| *k != "routing.sparsemixer_eps").collect();
        let bytes = Metadata::from_entries(partial).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert_eq!(ModelConfig::from_metadata(&m), Err(ConfigError::Missing { key: "routing.sparsemixer_eps" }));
    }

    #[test]
    fn partial_rope_round_trips_and_is_checked() {
        // Absent by default: files of the other families are unchanged.
        assert!(sample().to_metadata().iter().all(|(k, _)| *k != "model.rope_dim"));
        let mut c = sample();
        c.recipe.rope_dim = 8;
        c.recipe.rope_inv_freq = Some(alloc::vec![1.0, 0.1, 0.01, 0.001]);
        assert_eq!(c.rotary_dim(), 8);
        let bytes = Metadata::from_entries(c.to_metadata()).to_bytes();
        assert_eq!(ModelConfig::from_metadata(&Metadata::parse(&bytes).unwrap()).unwrap(), c);
        // The table must have one frequency per rotated pair.
        let mut bad = c.clone();
        bad.recipe.rope_inv_freq = Some(alloc::vec![1.0; 8]);
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.rope_inv_freq", .. })));
        for d in [7, 18] {
            let mut bad = c.clone();
            bad.recipe.rope_inv_freq = None;
            bad.recipe.rope_dim = d;
            assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.rope_dim", .. })), "{d}");
        }
    }

    #[test]
    fn llama4_and_hunyuan_variants_round_trip_and_are_checked() {
        // Absent by default: files of the other families are unchanged.
        let keys = ["model.layer_nope", "model.layer_chunk", "model.qk_rms_after_rope", "model.qk_norm_after_rope"];
        let base = sample();
        let plain = base.to_metadata();
        assert!(plain.iter().all(|(k, _)| !keys.contains(k) && !k.starts_with("model.nope_temperature")));
        assert!(plain.iter().all(|(k, _)| *k != "routing.weight_on_input"));
        assert_eq!(sample().cpu_only_variant(), None);
        let mut c = sample();
        c.recipe.layer_nope = alloc::vec![false, true];
        c.recipe.layer_chunk = alloc::vec![8, 0];
        c.recipe.qk_rms_after_rope = true;
        c.recipe.qk_norm_after_rope = true;
        c.recipe.nope_temperature = Some((8192.0, 0.1));
        c.router.weight_on_input = true;
        let bytes = Metadata::from_entries(c.to_metadata()).to_bytes();
        assert_eq!(ModelConfig::from_metadata(&Metadata::parse(&bytes).unwrap()).unwrap(), c);
        assert_eq!((c.layer_rope(0), c.layer_rope(1), c.layer_chunk(0), c.layer_chunk(1)), (true, false, 8, 0));
        assert_eq!(c.cpu_only_variant(), Some("model.layer_nope"));
        let mut w = sample();
        w.router.weight_on_input = true;
        assert_eq!(w.cpu_only_variant(), Some("routing.weight_on_input"));
        // Per-layer lists must have one entry per layer; the temperature a positive floor scale.
        let mut bad = c.clone();
        bad.recipe.layer_chunk.push(0);
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.layer_chunk", .. })));
        let mut bad = c.clone();
        bad.recipe.nope_temperature = Some((0.0, 0.1));
        assert!(matches!(bad.validate(), Err(ConfigError::Invalid { key: "model.nope_temperature_floor_scale", .. })));
    }

    #[test]
    fn inconsistent_layers_rejected() {
        let mut c = sample();
        c.layer_ffn.pop();
        let bytes = Metadata::from_entries(c.to_metadata()).to_bytes();
        let m = Metadata::parse(&bytes).unwrap();
        assert!(matches!(ModelConfig::from_metadata(&m), Err(ConfigError::Invalid { key: "model.layer_ffn", .. })));
    }

    #[test]
    fn floats_beyond_f32_and_oversized_sizes_are_refused_by_key() {
        use crate::format::{MetaValue, Metadata};
        let c = sample();
        let with = |key: &'static str, v: MetaValue<'static>| {
            let mut m: Vec<_> = c.to_metadata().into_iter().filter(|(k, _)| *k != key).collect();
            m.push((key, v));
            ModelConfig::from_metadata(&Metadata::from_entries(m))
        };
        // Before: 1e300 was accepted (as f32 infinity).
        assert!(matches!(
            with("model.rms_norm_eps", MetaValue::F64(1e300)),
            Err(ConfigError::Invalid { key: "model.rms_norm_eps", .. })
        ));
        // Before: reported as model.rope_theta.
        assert!(matches!(
            with("model.rms_norm_eps", MetaValue::F64(-1.0)),
            Err(ConfigError::Invalid { key: "model.rms_norm_eps", .. })
        ));
        assert!(matches!(
            with("routing.num_experts", MetaValue::U64(u64::from(u32::MAX))),
            Err(ConfigError::Invalid { key: "routing.num_experts", .. })
        ));
        assert!(matches!(
            with("model.hidden_size", MetaValue::U64(1 << 40)),
            Err(ConfigError::Invalid { key: "model.hidden_size", .. })
        ));
        assert!(matches!(
            with("model.head_dim", MetaValue::U64((MAX_WIDTH / 2) as u64)),
            Err(ConfigError::Invalid { key: "model.head_dim", .. })
        ));
    }
}
