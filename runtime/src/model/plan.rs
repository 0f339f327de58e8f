//! Layer recipes: which tensors each block uses, resolved and validated once at open.
//!
//! Everything here is plain data (byte ranges, shapes, flags). New families add fields or
//! variants here (an MLA attention kind, a relative-position bias, sinks, a ReLU expert
//! activation, RoPE scaling) and the matching arm in the runner; nothing tests a family name.

use super::ModelError;
use crate::config::{Activation, FfnKind, Mla, ModelConfig, NormKind, Positions, QkNorm, SharedGate};
use crate::format::{DType, MeoFile, TensorInfo};
use crate::kernels::MatRef;
use crate::names;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

/// A validated matrix: dtype, `[rows, cols]`, and its byte range (absolute in the file, or
/// relative to its expert slab for expert matrices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mat {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub range: Range<usize>,
}

impl Mat {
    /// The matrix over `bytes` (the file, or the slab for expert matrices).
    pub(crate) fn view<'a>(&self, bytes: &'a [u8]) -> MatRef<'a> {
        // Validated at open: the range lies inside `bytes` and has exactly the length the
        // dtype and shape need.
        MatRef::validated(self.dtype, self.rows, self.cols, &bytes[self.range.clone()])
    }
}

/// A validated f32 vector (norm weight, bias) by absolute byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vector {
    pub len: usize,
    pub range: Range<usize>,
}

impl Vector {
    /// Decodes into `out` (resized to `len`).
    pub(crate) fn read(&self, bytes: &[u8], out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.len, 0.0);
        crate::kernels::read_f32s(&bytes[self.range.clone()], out);
    }
}

/// Learned positions, the final norm's bias and the LM head's bias ([`Builder::extras`]).
pub(crate) type Extras = (Option<Mat>, Option<Vector>, Option<Vector>);

/// Rotary position embedding: the frequencies of each pair of a head's dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `theta^(-2i/d)` for `i < d/2`, computed in f32 as transformers does, or the file's
    /// precomputed table (`model.rope_inv_freq`, scaled RoPE).
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
    /// Pairs are adjacent dimensions `(2i, 2i+1)`, not halves `(i, i + d/2)`.
    pub interleave: bool,
}

impl Rope {
    pub fn new(c: &ModelConfig) -> Self {
        let d = c.rotary_dim();
        let inv_freq = match &c.recipe.rope_inv_freq {
            Some(f) => f.clone(),
            None => (0..d / 2).map(|i| 1.0 / libm::powf(c.rope_theta, (2 * i) as f32 / d as f32)).collect(),
        };
        Self {
            inv_freq,
            attention_factor: c.recipe.rope_attention_factor.unwrap_or(1.0),
            interleave: c.recipe.rope_interleave,
        }
    }

    /// cos and sin of every frequency at position `pos` (`d/2` values each), times the
    /// attention factor.
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = p * f;
            *c = libm::cosf(a) * self.attention_factor;
            *s = libm::sinf(a) * self.attention_factor;
        }
    }

    /// Rotates one head vector's first `d` values (`d` = twice the frequencies; the rest
    /// pass through) by the angles of [`angles`](Self::angles).
    pub fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let d = (2 * self.inv_freq.len()).min(x.len());
        let x = &mut x[..d];
        if self.interleave {
            crate::kernels::rope_rotate_pairs(x, cos, sin);
        } else {
            crate::kernels::rope_rotate_half(x, cos, sin);
        }
    }
}

/// Self-attention of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnPlan {
    pub norm: Vector,
    /// LayerNorm bias (`model.norm = layer`).
    pub norm_bias: Option<Vector>,
    /// Output projection bias.
    pub o_bias: Option<Vector>,
    /// Rotate q and k (RoPE); false with learned absolute positions.
    pub rope: bool,
    /// Dimensions of each head RoPE rotates, from the first (`head_dim` unless partial).
    pub rope_dim: usize,
    pub q: Mat,
    pub k: Mat,
    pub v: Mat,
    pub o: Mat,
    /// q, k, v biases.
    pub bias: Option<[Vector; 3]>,
    pub qk_norm: QkNorm,
    /// q and k norm weights (length `head_dim` per head, or the full width).
    pub q_norm: Option<Vector>,
    pub k_norm: Option<Vector>,
    /// Clamp q, k, v to ±clip after projection and norm.
    pub clip: Option<f32>,
    /// Attend to the last `window` positions (the query's own included); 0 = all.
    pub window: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k (`head_dim^-0.5`, the recipe's `attention_scale`, or 1 with
    /// `model.attention_unscaled`).
    pub scale: f32,
    /// Each query attends to the keys up to itself (decoder); false: to every key (encoder).
    pub causal: bool,
    /// Relative position bias added to the scores (`model.positions = relative`).
    pub rel_bias: Option<RelBias>,
    /// Per-head sink logits `[num_heads]` that join each softmax (`model.attention_sinks`).
    pub sinks: Option<Vector>,
    /// `[heads · head_dim, h]`: the output is multiplied by `sigmoid(gate · x)` before `o`
    /// (`model.attention_output_gate`).
    pub gate: Option<Mat>,
    /// Attend within aligned chunks of this many positions (`model.layer_chunk`); 0 = all.
    pub chunk: usize,
    /// RMS-normalise each q and k head without a weight after RoPE (`model.qk_rms_after_rope`,
    /// on layers with RoPE).
    pub qk_rms_after_rope: bool,
    /// Apply `qk_norm` after RoPE instead of before (`model.qk_norm_after_rope`).
    pub qk_norm_after_rope: bool,
    /// `(floor_scale, scale)` of the query temperature (`model.nope_temperature_*`, on NoPE
    /// layers).
    pub temperature: Option<(f32, f32)>,
}

/// A gated DeltaNet layer (`Mixer::GatedDeltaNet`; `docs/FORMAT.md`, gated DeltaNet).
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaPlan {
    pub norm: Vector,
    /// `[k_heads · k_dim, h]`, `[k_heads · k_dim, h]`, `[v_heads · v_dim, h]`.
    pub q: Mat,
    pub k: Mat,
    pub v: Mat,
    /// `[v_heads · v_dim, h]`: the output gate of the gated RMSNorm.
    pub z: Mat,
    /// `[v_heads, h]`: the write strength `β = sigmoid(b · x)` and the decay input `a · x`.
    pub b: Mat,
    pub a: Mat,
    /// `[conv_dim, conv_kernel]` f32: the depthwise causal convolution over q, k, v channels.
    pub conv: Mat,
    /// `[v_heads]`: decay `g = −exp(a_log) · softplus(a · x + dt_bias)`.
    pub dt_bias: Vector,
    pub a_log: Vector,
    /// `[v_dim]`: the gated RMSNorm's weight (shared by the heads).
    pub out_norm: Vector,
    /// `[h, v_heads · v_dim]`.
    pub out: Mat,
    pub dims: crate::config::DeltaNet,
    /// Epsilon of the gated RMSNorm.
    pub eps: f32,
}

/// A Mamba2 layer (`Mixer::Mamba2`; `docs/FORMAT.md`, Mamba2).
#[derive(Debug, Clone, PartialEq)]
pub struct Mamba2Plan {
    pub norm: Vector,
    /// `[inner, h]`: the gate of the gated RMSNorm.
    pub z: Mat,
    /// `[conv_dim, h]`: x, B and C (the convolution's channels).
    pub xbc: Mat,
    /// `[heads, h]`: the step size input.
    pub dt: Mat,
    /// `[conv_dim, conv_kernel]` f32 and its bias `[conv_dim]` (`model.mamba2.conv_bias`).
    pub conv: Mat,
    pub conv_bias: Option<Vector>,
    /// `[heads]`: `Δ = softplus(dt · x + dt_bias)`, `A = −exp(a_log)`, the skip `D`.
    pub dt_bias: Vector,
    pub a_log: Vector,
    pub d: Vector,
    /// `[inner]`: the gated RMSNorm's weight.
    pub out_norm: Vector,
    /// `[h, inner]`.
    pub out: Mat,
    pub dims: crate::config::Mamba2,
    /// Epsilon of the gated RMSNorm.
    pub eps: f32,
}

/// A gated short convolution layer (`Mixer::ShortConv`, LFM2; `docs/FORMAT.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShortConvPlan {
    pub norm: Vector,
    /// `[h, h]` each: the input gate b, the output gate c, the values x.
    pub b: Mat,
    pub c: Mat,
    pub x: Mat,
    /// `[h, kernel]` f32: the depthwise causal convolution over `b ⊙ x`.
    pub conv: Mat,
    /// `[h, h]`.
    pub out: Mat,
    pub kernel: usize,
}

/// Multi-head latent attention of one layer (DeepSeek-V2/V3; `docs/FORMAT.md`, MLA).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaPlan {
    pub norm: Vector,
    /// The low-rank q path: `q_a` `[q_lora, h]` and its RMSNorm; `None` = `q` is `[H·qk, h]`.
    pub q_a: Option<(Mat, Vector)>,
    /// `[H·(nope + rope), h or q_lora]`.
    pub q: Mat,
    /// `[kv_lora + rope, h]`: the latent, then the shared rotary key.
    pub kv_a: Mat,
    pub kv_norm: Vector,
    /// `[H·(nope + v), kv_lora]`: per head its non-rotary key, then its value.
    pub kv_b: Mat,
    /// `[h, H·v]`.
    pub o: Mat,
    pub num_heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    pub kv_lora: usize,
    pub latent_eps: f32,
    /// Attend to the last `window` positions (the query's own included); 0 = all.
    pub window: usize,
    /// Multiplies q·k.
    pub scale: f32,
}

/// The attention block of one layer.
#[derive(Debug, Clone, PartialEq)]
// One per layer, built once at open: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Attention {
    /// q/k/v projections, grouped-query attention.
    Gqa(AttnPlan),
    /// Multi-head latent attention.
    Mla(MlaPlan),
    /// Gated DeltaNet (a recurrent mixer: fixed-size state, no KV cache).
    GatedDeltaNet(alloc::boxed::Box<DeltaPlan>),
    /// Mamba2 (a recurrent mixer: fixed-size state, no KV cache).
    Mamba2(alloc::boxed::Box<Mamba2Plan>),
    /// A gated short convolution (a recurrent mixer: fixed-size state, no KV cache).
    ShortConv(alloc::boxed::Box<ShortConvPlan>),
}

impl Attention {
    /// The norm before the block.
    pub fn norm(&self) -> &Vector {
        match self {
            Self::Gqa(a) => &a.norm,
            Self::Mla(a) => &a.norm,
            Self::GatedDeltaNet(a) => &a.norm,
            Self::Mamba2(a) => &a.norm,
            Self::ShortConv(a) => &a.norm,
        }
    }

    /// The mixer kind (what a target that does not run it names in its error).
    pub fn mixer(&self) -> crate::config::Mixer {
        match self {
            Self::Gqa(_) | Self::Mla(_) => crate::config::Mixer::Attention,
            Self::GatedDeltaNet(_) => crate::config::Mixer::GatedDeltaNet,
            Self::Mamba2(_) => crate::config::Mixer::Mamba2,
            Self::ShortConv(_) => crate::config::Mixer::ShortConv,
        }
    }

    /// That norm's bias (LayerNorm only).
    pub fn norm_bias(&self) -> Option<&Vector> {
        match self {
            Self::Gqa(a) => a.norm_bias.as_ref(),
            Self::Mla(_) | Self::GatedDeltaNet(_) | Self::Mamba2(_) | Self::ShortConv(_) => None,
        }
    }

    /// Values per position of the cached keys and of the cached values when every head's
    /// keys and values are cached (MLA decompressed, as the GPU target caches them); 0 for a
    /// recurrent mixer: its state does not grow with the context.
    pub fn cache_widths(&self) -> (usize, usize) {
        match self {
            Self::Gqa(a) => (a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim),
            Self::Mla(a) => (a.num_heads * (a.nope + a.rope), a.num_heads * a.v_dim),
            Self::GatedDeltaNet(_) | Self::Mamba2(_) | Self::ShortConv(_) => (0, 0),
        }
    }

    /// The sizes of this layer's KV cache (`None` for a recurrent mixer: its state does not
    /// grow with the context).
    pub(crate) fn cache_shape(&self) -> Option<super::kv::CacheShape> {
        use super::kv::CacheShape;
        match self {
            Self::Gqa(a) => Some(CacheShape::Gqa { kv_heads: a.num_kv_heads, head_dim: a.head_dim }),
            Self::Mla(a) => {
                Some(CacheShape::Mla { heads: a.num_heads, nope: a.nope, rope: a.rope, v: a.v_dim, kv_lora: a.kv_lora })
            }
            Self::GatedDeltaNet(_) | Self::Mamba2(_) | Self::ShortConv(_) => None,
        }
    }
}

/// T5-style relative position bias: `score(q, k) += table[bucket(k − q), head]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelBias {
    /// `[buckets, heads]`, f32.
    pub table: Mat,
    pub buckets: usize,
    pub max_distance: usize,
    /// Separate buckets for keys before and after the query (encoder).
    pub bidirectional: bool,
}

/// The bucket of relative position `rel = key − query` (T5's `_relative_position_bucket`,
/// computed in f32 as transformers does): half of the buckets (of each direction, when
/// `bidirectional`) hold exact distances, the others logarithmically wider ranges up to
/// `max_distance`, beyond which all distances share the last bucket. Unidirectional: keys
/// after the query (rel > 0) fall in bucket 0. Needs `buckets ≥ 4` and
/// `max_distance > buckets / 2` (checked when the config is read).
pub fn relative_bucket(rel: i64, bidirectional: bool, buckets: usize, max_distance: usize) -> usize {
    let (mut n, mut base) = (buckets, 0usize);
    let dist = if bidirectional {
        n /= 2;
        if rel > 0 {
            base = n;
        }
        rel.unsigned_abs()
    } else {
        // Only keys before the query are distinct.
        if rel < 0 { rel.unsigned_abs() } else { 0 }
    };
    let max_exact = (n / 2) as u64;
    if dist < max_exact {
        return base + dist as usize;
    }
    // Same f32 operations as torch: log(d / e) / ln(max_d / e) · (n − e), truncated.
    let e = max_exact as f32;
    let scale = libm::log(max_distance as f64 / max_exact as f64) as f32;
    let large = (libm::logf(dist as f32 / e) / scale * (n as f32 - e)) as usize;
    base + (max_exact as usize).saturating_add(large).min(n - 1)
}

/// A feed-forward MLP: gated `down(act(gate(x) + b_gate, up(x) + b_up)) + b_down` when `gate`
/// is present (SiLU, or GPT-OSS's clamped SwiGLU), else `down(act(up(x)))` (ReLU for
/// T5/Switch); biases optional.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    pub gate: Option<Mat>,
    pub up: Mat,
    pub down: Mat,
    /// Gate, up and down biases (`[i]`, `[i]`, `[h]`; routed experts with `model.expert_bias`,
    /// ranges relative to the slab). Boxed: most MLPs have none, and an `Mlp` is held by value
    /// in session state.
    pub bias: Option<alloc::boxed::Box<[Vector; 3]>>,
    /// The activation between `up` (with `gate`) and `down`.
    pub act: Activation,
}

/// One routed expert: its slab (absolute) and its matrices (ranges relative to the slab).
#[derive(Debug, Clone, PartialEq)]
pub struct Expert {
    pub slab: Range<usize>,
    pub mlp: Mlp,
}

/// A mixture-of-experts block.
#[derive(Debug, Clone, PartialEq)]
pub struct MoePlan {
    /// `[experts, hidden]`, run in f32.
    pub router: Mat,
    pub router_bias: Option<Vector>,
    pub selection_bias: Option<Vector>,
    pub shared: Option<Mlp>,
    /// `[1, hidden]`: the shared expert's output is scaled by `sigmoid(gate · x)`.
    pub shared_gate: Option<Mat>,
    pub experts: Vec<Expert>,
}

/// The feed-forward block of one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum FfnPlan {
    Dense(Mlp),
    Moe(MoePlan),
    /// MEO-native: `fc2(act(fc1(x)))`, each a bank (`docs/MEO-NATIVE.md` §2.1).
    Meo(MeoFfn),
}

/// One linear expert of an MEO bank: its slab (absolute) and its weight `[out, in]` and f32
/// bias `[out]` (ranges relative to the slab).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankExpert {
    pub slab: Range<usize>,
    pub weight: Mat,
    pub bias: Vector,
}

/// The MEO token block `x + up(relu(down x + b_down)) + b_up`, applied before the merged matmul.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBlock {
    pub down: Mat,
    pub down_bias: Vector,
    pub up: Mat,
    pub up_bias: Vector,
}

/// One MEO bank `in → out`: E linear experts, a router `[E, in]` (f32, no bias) and an
/// optional token block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bank {
    pub router: Mat,
    pub experts: Vec<BankExpert>,
    pub token: Option<TokenBlock>,
}

/// An MEO-native feed-forward block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeoFfn {
    pub banks: [Bank; 2],
}

/// One layer of a task's stored MEO merge: per bank the merged expert (its slab, weight and
/// bias relative to it) and the task gate `w` per expert (0 for unselected ones).
#[derive(Debug, Clone, PartialEq)]
pub struct MeoTaskLayer {
    pub layer: usize,
    pub banks: [(BankExpert, Vec<f32>); 2],
}

/// A task's precomputed MEO merges (`merge.task.<name>.*`, weighting `task_gate`).
#[derive(Debug, Clone, PartialEq)]
pub struct MeoTask {
    pub name: alloc::string::String,
    pub layers: Vec<MeoTaskLayer>,
}

/// One decoder layer: `x += attn(norm(x)); x += ffn(norm(x))`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    pub attn: Attention,
    pub ffn_norm: Vector,
    /// LayerNorm bias (`model.norm = layer`).
    pub ffn_norm_bias: Option<Vector>,
    pub ffn: FfnPlan,
}

/// Resolves names against a parsed file, checking shapes and dtypes.
pub(crate) struct Builder<'f, 'a> {
    file: &'f MeoFile<'a>,
    c: &'f ModelConfig,
    slabs: BTreeMap<&'a str, Range<usize>>,
    h: usize,
    q_dim: usize,
    kv_dim: usize,
}

fn dims_overflow(key: &'static str) -> ModelError {
    crate::config::ConfigError::Invalid { key, value: "size overflows".to_string() }.into()
}

impl<'f, 'a> Builder<'f, 'a> {
    pub(crate) fn new(file: &'f MeoFile<'a>, c: &'f ModelConfig) -> Result<Self, ModelError> {
        if c.recipe.positions == Positions::Rope && !c.head_dim.is_multiple_of(2) {
            return Err(ModelError::Unsupported(alloc::format!("odd head_dim {} (RoPE needs pairs)", c.head_dim)));
        }
        let q_dim = c.num_heads.checked_mul(c.head_dim).ok_or_else(|| dims_overflow("model.num_heads"))?;
        let kv_dim = c.num_kv_heads.checked_mul(c.head_dim).ok_or_else(|| dims_overflow("model.num_kv_heads"))?;
        let slabs = file.slabs().iter().map(|s| (s.key, file.slab_range(s))).collect();
        Ok(Self { file, c, slabs, h: c.hidden_size, q_dim, kv_dim })
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<(&'f TensorInfo<'a>, Range<usize>), ModelError> {
        let t = self.file.tensor(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        if t.shape().len() != shape.len() || t.shape().iter().zip(shape).any(|(&a, &b)| a != b as u64) {
            return Err(ModelError::WrongShape {
                name: name.to_string(),
                expected: shape.iter().map(|&d| d as u64).collect(),
                found: t.shape().to_vec(),
            });
        }
        let data = self.file.data(t);
        let start = data.as_ptr() as usize - self.file.bytes().as_ptr() as usize;
        Ok((t, start..start + data.len()))
    }

    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat, ModelError> {
        let (t, range) = self.tensor(name, &[rows, cols])?;
        let m = Mat { dtype: t.dtype, rows, cols, range };
        if MatRef::new(m.dtype, rows, cols, &self.file.bytes()[m.range.clone()]).is_none() {
            return Err(ModelError::WrongShape {
                name: name.to_string(),
                expected: vec![rows as u64, cols as u64],
                found: t.shape().to_vec(),
            });
        }
        Ok(m)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vector, ModelError> {
        let (t, range) = self.tensor(name, &[len])?;
        if t.dtype != DType::F32 {
            return Err(ModelError::WrongDType { name: name.to_string(), found: t.dtype.name(), expected: "f32" });
        }
        Ok(Vector { len, range })
    }

    fn layer_mat(&self, l: usize, suffix: &str, rows: usize, cols: usize) -> Result<Mat, ModelError> {
        self.mat(&names::layer(l, suffix), rows, cols)
    }

    fn layer_vec(&self, l: usize, suffix: &str, len: usize) -> Result<Vector, ModelError> {
        self.vector(&names::layer(l, suffix), len)
    }

    fn mlp(&self, l: usize, prefix: &str, inter: usize) -> Result<Mlp, ModelError> {
        let h = self.h;
        let act = self.ffn_act();
        let gate = if act.gated() {
            Some(self.layer_mat(l, &alloc::format!("{prefix}.gate.weight"), inter, h)?)
        } else {
            None
        };
        Ok(Mlp {
            gate,
            up: self.layer_mat(l, &alloc::format!("{prefix}.up.weight"), inter, h)?,
            down: self.layer_mat(l, &alloc::format!("{prefix}.down.weight"), h, inter)?,
            bias: None,
            act,
        })
    }

    /// The activation of dense FFNs and experts: SiLU-gated unless the recipe says ReLU
    /// (`gelu_tanh` is the MEO banks' activation; their dense/expert FFNs stay SiLU-gated).
    fn ffn_act(&self) -> Activation {
        match self.c.recipe.ffn_activation {
            Activation::Relu => Activation::Relu,
            // Gated: SiLU or the recipe's `mlp_activation` (clamped SwiGLU).
            _ => self.c.recipe.mlp_activation,
        }
    }

    /// The relative position bias table every layer shares (`positions = relative`).
    fn rel_bias(&self) -> Result<Option<RelBias>, ModelError> {
        let c = self.c;
        if c.recipe.positions != Positions::Relative {
            return Ok(None);
        }
        let buckets = c.recipe.relative_buckets;
        let table = self.mat(names::REL_BIAS, buckets, c.num_heads)?;
        if table.dtype != DType::F32 {
            return Err(ModelError::WrongDType {
                name: names::REL_BIAS.to_string(),
                found: table.dtype.name(),
                expected: "f32",
            });
        }
        Ok(Some(RelBias {
            table,
            buckets,
            max_distance: c.recipe.relative_max_distance,
            bidirectional: c.recipe.encoder_only,
        }))
    }

    /// Embedding, final norm, LM head.
    pub(crate) fn globals(&self) -> Result<(Mat, Vector, Mat), ModelError> {
        let (v, h) = (self.c.vocab_size, self.h);
        let embed = self.mat(names::EMBED, v, h)?;
        let norm = self.vector(names::OUTPUT_NORM, h)?;
        // An encoder has no LM head (its `forward` is refused); the embedding stands in.
        let output = if self.c.tie_word_embeddings || self.c.recipe.encoder_only {
            embed.clone()
        } else {
            self.mat(names::OUTPUT, v, h)?
        };
        Ok((embed, norm, output))
    }

    /// Learned positions, the final norm's bias and the LM head's bias, when the recipe has them.
    pub(crate) fn extras(&self) -> Result<Extras, ModelError> {
        let c = self.c;
        let pos = match c.recipe.positions {
            Positions::Learned => Some(self.mat(names::POS_EMBED, c.max_position_embeddings, self.h)?),
            Positions::Rope | Positions::Relative | Positions::None => None,
        };
        let bias = match c.recipe.norm {
            NormKind::Layer => Some(self.vector(names::OUTPUT_NORM_BIAS, self.h)?),
            NormKind::Rms => None,
        };
        let out_bias = if c.recipe.output_bias { Some(self.vector(names::OUTPUT_BIAS, c.vocab_size)?) } else { None };
        Ok((pos, bias, out_bias))
    }

    fn norm_bias(&self, l: usize, which: &str) -> Result<Option<Vector>, ModelError> {
        match self.c.recipe.norm {
            NormKind::Layer => Ok(Some(self.layer_vec(l, &alloc::format!("{which}.bias"), self.h)?)),
            NormKind::Rms => Ok(None),
        }
    }

    /// A bank expert whose tensors are `name(part)` and whose slab is `key`.
    fn bank_expert(
        &self,
        key: &str,
        name: &dyn Fn(&str) -> alloc::string::String,
        out: usize,
        inp: usize,
    ) -> Result<BankExpert, ModelError> {
        let first = name(names::BANK_EXPERT_PARTS[0]);
        let slab = self.slabs.get(key).cloned().ok_or(ModelError::NotInSlab { name: first })?;
        let rel = |n: alloc::string::String, r: &Range<usize>| -> Result<Range<usize>, ModelError> {
            if r.start < slab.start || r.end > slab.end {
                return Err(ModelError::NotInSlab { name: n });
            }
            Ok(r.start - slab.start..r.end - slab.start)
        };
        let w = self.mat(&name("weight"), out, inp)?;
        let b = self.vector(&name("bias"), out)?;
        Ok(BankExpert {
            weight: Mat { range: rel(name("weight"), &w.range)?, ..w },
            bias: Vector { range: rel(name("bias"), &b.range)?, ..b },
            slab,
        })
    }

    fn meo(&self, l: usize) -> Result<MeoFfn, ModelError> {
        let c = self.c;
        let (h, i, e, r) = (self.h, c.intermediate_size, c.router.num_experts, c.recipe.meo_token_bottleneck);
        let bank = |b: usize| -> Result<Bank, ModelError> {
            let name = names::MEO_BANKS[b];
            let (inp, out) = if b == 0 { (h, i) } else { (i, h) };
            let sfx = |s: &str| alloc::format!("{name}.{s}");
            let router = self.layer_mat(l, &sfx("router.weight"), e, inp)?;
            let token = if r > 0 {
                Some(TokenBlock {
                    down: self.layer_mat(l, &sfx("token.down.weight"), r, inp)?,
                    down_bias: self.layer_vec(l, &sfx("token.down.bias"), r)?,
                    up: self.layer_mat(l, &sfx("token.up.weight"), inp, r)?,
                    up_bias: self.layer_vec(l, &sfx("token.up.bias"), inp)?,
                })
            } else {
                None
            };
            let experts = (0..e)
                .map(|x| {
                    self.bank_expert(
                        &alloc::format!("layers.{l}.{name}.experts.{x}"),
                        &|p| names::bank_expert(l, name, x, p),
                        out,
                        inp,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Bank { router, experts, token })
        };
        Ok(MeoFfn { banks: [bank(0)?, bank(1)?] })
    }

    /// The precomputed task merges of an MEO-native model: `merge.tasks`, and per task
    /// `merge.task.<t>.layers` (every MEO layer once) and `merge.task.<t>.weights`
    /// (`layers × 2 banks × experts`, bank order fc1, fc2), with the merged banks' slabs.
    pub(crate) fn meo_tasks(&self) -> Result<Vec<MeoTask>, ModelError> {
        use crate::format::{MetaArray, MetaValue};
        use names::merge_keys as k;
        let m = &self.file.metadata;
        let c = self.c;
        let bad = |key: &str, what: &str| ModelError::Merge(alloc::format!("metadata {key:?}: {what}"));
        let names: Vec<&str> = match m.get(k::TASKS) {
            None => Vec::new(),
            Some(MetaValue::Array(MetaArray::Str(v))) => v.clone(),
            Some(MetaValue::Array(MetaArray::U64(v))) if v.is_empty() => Vec::new(),
            Some(v) => return Err(bad(k::TASKS, &alloc::format!("is {}, expected array of str", v.type_name()))),
        };
        let (h, i, e) = (self.h, c.intermediate_size, c.router.num_experts);
        let mut tasks: Vec<MeoTask> = Vec::new();
        for name in names {
            if !names::valid_task_name(name) || tasks.iter().any(|t| t.name == name) {
                return Err(bad(k::TASKS, &alloc::format!("invalid or repeated task name {name:?}")));
            }
            let lk = k::task(name, "layers");
            let layers = match m.get(&lk) {
                Some(MetaValue::Array(MetaArray::U64(v))) => v.clone(),
                _ => return Err(bad(&lk, "missing or not an array of u64")),
            };
            let wk = k::task(name, "weights");
            let weights = match m.get(&wk) {
                Some(MetaValue::Array(MetaArray::F64(v))) => v.clone(),
                _ => return Err(bad(&wk, "missing or not an array of f64")),
            };
            if Some(weights.len()) != layers.len().checked_mul(2 * e) {
                return Err(bad(&wk, "needs layers × 2 banks × experts values"));
            }
            let mut seen = alloc::collections::BTreeSet::new();
            let mut tl = Vec::with_capacity(layers.len());
            for (j, &l) in layers.iter().enumerate() {
                let l = usize::try_from(l).map_err(|_| bad(&lk, "layer out of range"))?;
                if c.layer_ffn.get(l) != Some(&FfnKind::MeoBank) || !seen.insert(l) {
                    return Err(bad(&lk, &alloc::format!("layer {l} is not an MEO layer, or is listed twice")));
                }
                let bank = |b: usize| -> Result<(BankExpert, Vec<f32>), ModelError> {
                    let bn = names::MEO_BANKS[b];
                    let (inp, out) = if b == 0 { (h, i) } else { (i, h) };
                    let key = alloc::format!("tasks.{name}.layers.{l}.{bn}.experts.merged");
                    let ex = self.bank_expert(&key, &|p| names::task_bank_expert(name, l, bn, p), out, inp)?;
                    let w = weights[(j * 2 + b) * e..][..e].iter().map(|&x| x as f32).collect();
                    Ok((ex, w))
                };
                tl.push(MeoTaskLayer { layer: l, banks: [bank(0)?, bank(1)?] });
            }
            let meo_layers = c.layer_ffn.iter().filter(|f| **f == FfnKind::MeoBank).count();
            if tl.len() != meo_layers {
                return Err(bad(&lk, "an MEO task must store every MEO layer"));
            }
            tasks.push(MeoTask { name: name.to_string(), layers: tl });
        }
        Ok(tasks)
    }

    pub(crate) fn layer(&self, l: usize) -> Result<LayerPlan, ModelError> {
        let c = self.c;
        let attn = match (c.mixer(l), &c.recipe.mla) {
            (crate::config::Mixer::GatedDeltaNet, _) => {
                Attention::GatedDeltaNet(alloc::boxed::Box::new(self.delta(l)?))
            }
            (crate::config::Mixer::Mamba2, _) => Attention::Mamba2(alloc::boxed::Box::new(self.mamba2(l)?)),
            (crate::config::Mixer::ShortConv, _) => Attention::ShortConv(alloc::boxed::Box::new(self.short_conv(l)?)),
            (crate::config::Mixer::Attention, Some(a)) => Attention::Mla(self.mla(l, a)?),
            (crate::config::Mixer::Attention, None) => Attention::Gqa(self.gqa(l)?),
        };
        let ffn = match c.layer_ffn[l] {
            FfnKind::Dense => FfnPlan::Dense(self.mlp(l, "ffn", c.intermediate_size)?),
            FfnKind::Moe => FfnPlan::Moe(self.moe(l)?),
            FfnKind::MeoBank => FfnPlan::Meo(self.meo(l)?),
        };
        Ok(LayerPlan {
            attn,
            ffn_norm: self.layer_vec(l, "ffn_norm.weight", self.h)?,
            ffn_norm_bias: self.norm_bias(l, "ffn_norm")?,
            ffn,
        })
    }

    /// The gated DeltaNet block of layer `l` (sizes validated with the config).
    fn delta(&self, l: usize) -> Result<DeltaPlan, ModelError> {
        let (c, h) = (self.c, self.h);
        let d = c.recipe.delta_net.ok_or(crate::config::ConfigError::Missing { key: "model.delta_net.num_k_heads" })?;
        let (kd, vd, nv) = (d.num_k_heads * d.k_head_dim, d.num_v_heads * d.v_head_dim, d.num_v_heads);
        let conv = self.layer_mat(l, "mixer.conv.weight", d.conv_dim(), d.conv_kernel)?;
        if conv.dtype != DType::F32 {
            let name = names::layer(l, "mixer.conv.weight");
            return Err(ModelError::WrongDType { name, found: conv.dtype.name(), expected: "f32" });
        }
        Ok(DeltaPlan {
            norm: self.layer_vec(l, "attn_norm.weight", h)?,
            q: self.layer_mat(l, "mixer.q.weight", kd, h)?,
            k: self.layer_mat(l, "mixer.k.weight", kd, h)?,
            v: self.layer_mat(l, "mixer.v.weight", vd, h)?,
            z: self.layer_mat(l, "mixer.z.weight", vd, h)?,
            b: self.layer_mat(l, "mixer.b.weight", nv, h)?,
            a: self.layer_mat(l, "mixer.a.weight", nv, h)?,
            conv,
            dt_bias: self.layer_vec(l, "mixer.dt_bias", nv)?,
            a_log: self.layer_vec(l, "mixer.a_log", nv)?,
            out_norm: self.layer_vec(l, "mixer.norm.weight", d.v_head_dim)?,
            out: self.layer_mat(l, "mixer.out.weight", h, vd)?,
            dims: d,
            eps: c.rms_norm_eps,
        })
    }

    /// The gated short convolution of layer `l` (kernel validated with the config).
    fn short_conv(&self, l: usize) -> Result<ShortConvPlan, ModelError> {
        let h = self.h;
        let kernel = self.c.recipe.short_conv_kernel;
        let conv = self.layer_mat(l, "mixer.conv.weight", h, kernel)?;
        if conv.dtype != DType::F32 {
            let name = names::layer(l, "mixer.conv.weight");
            return Err(ModelError::WrongDType { name, found: conv.dtype.name(), expected: "f32" });
        }
        Ok(ShortConvPlan {
            norm: self.layer_vec(l, "attn_norm.weight", h)?,
            b: self.layer_mat(l, "mixer.b.weight", h, h)?,
            c: self.layer_mat(l, "mixer.c.weight", h, h)?,
            x: self.layer_mat(l, "mixer.x.weight", h, h)?,
            conv,
            out: self.layer_mat(l, "mixer.out.weight", h, h)?,
            kernel,
        })
    }

    /// The Mamba2 block of layer `l` (sizes validated with the config).
    fn mamba2(&self, l: usize) -> Result<Mamba2Plan, ModelError> {
        let (c, h) = (self.c, self.h);
        let d = c.recipe.mamba2.ok_or(crate::config::ConfigError::Missing { key: "model.mamba2.num_heads" })?;
        let (inner, cd, nh) = (d.inner(), d.conv_dim(), d.num_heads);
        let conv = self.layer_mat(l, "mixer.conv.weight", cd, d.conv_kernel)?;
        if conv.dtype != DType::F32 {
            let name = names::layer(l, "mixer.conv.weight");
            return Err(ModelError::WrongDType { name, found: conv.dtype.name(), expected: "f32" });
        }
        Ok(Mamba2Plan {
            norm: self.layer_vec(l, "attn_norm.weight", h)?,
            z: self.layer_mat(l, "mixer.z.weight", inner, h)?,
            xbc: self.layer_mat(l, "mixer.xbc.weight", cd, h)?,
            dt: self.layer_mat(l, "mixer.dt.weight", nh, h)?,
            conv,
            conv_bias: if d.conv_bias { Some(self.layer_vec(l, "mixer.conv.bias", cd)?) } else { None },
            dt_bias: self.layer_vec(l, "mixer.dt_bias", nh)?,
            a_log: self.layer_vec(l, "mixer.a_log", nh)?,
            d: self.layer_vec(l, "mixer.d", nh)?,
            out_norm: self.layer_vec(l, "mixer.norm.weight", inner)?,
            out: self.layer_mat(l, "mixer.out.weight", h, inner)?,
            dims: d,
            eps: c.rms_norm_eps,
        })
    }

    /// The MLA block of layer `l`; sizes overflowing `usize` are errors, not panics.
    fn mla(&self, l: usize, a: &Mla) -> Result<MlaPlan, ModelError> {
        let (c, h) = (self.c, self.h);
        let (nh, rope) = (c.num_heads, c.head_dim);
        let sum = |x: usize, y: usize, key| x.checked_add(y).ok_or_else(|| dims_overflow(key));
        let mul = |x: usize, y: usize, key| x.checked_mul(y).ok_or_else(|| dims_overflow(key));
        let qk = sum(a.qk_nope_head_dim, rope, "model.mla.qk_nope_head_dim")?;
        let q_rows = mul(nh, qk, "model.mla.qk_nope_head_dim")?;
        let kv_rows = mul(nh, sum(a.qk_nope_head_dim, a.v_head_dim, "model.mla.v_head_dim")?, "model.mla.v_head_dim")?;
        let o_cols = mul(nh, a.v_head_dim, "model.mla.v_head_dim")?;
        let (q_a, q) = if a.q_lora_rank > 0 {
            let qa = self.layer_mat(l, "attn.q_a.weight", a.q_lora_rank, h)?;
            let norm = self.layer_vec(l, "attn.q_a_norm.weight", a.q_lora_rank)?;
            (Some((qa, norm)), self.layer_mat(l, "attn.q_b.weight", q_rows, a.q_lora_rank)?)
        } else {
            (None, self.layer_mat(l, "attn.q.weight", q_rows, h)?)
        };
        Ok(MlaPlan {
            norm: self.layer_vec(l, "attn_norm.weight", h)?,
            q_a,
            q,
            kv_a: self.layer_mat(l, "attn.kv_a.weight", sum(a.kv_lora_rank, rope, "model.mla.kv_lora_rank")?, h)?,
            kv_norm: self.layer_vec(l, "attn.kv_a_norm.weight", a.kv_lora_rank)?,
            kv_b: self.layer_mat(l, "attn.kv_b.weight", kv_rows, a.kv_lora_rank)?,
            o: self.layer_mat(l, "attn.o.weight", h, o_cols)?,
            num_heads: nh,
            nope: a.qk_nope_head_dim,
            rope,
            v_dim: a.v_head_dim,
            kv_lora: a.kv_lora_rank,
            latent_eps: a.latent_norm_eps,
            window: c.layer_window[l],
            scale: c.recipe.attention_scale.unwrap_or(1.0 / libm::sqrtf(qk as f32)),
        })
    }

    /// The q/k/v attention block of layer `l`.
    fn gqa(&self, l: usize) -> Result<AttnPlan, ModelError> {
        let c = self.c;
        let (h, qd, kvd, hd) = (self.h, self.q_dim, self.kv_dim, c.head_dim);
        let bias = if c.attention_bias {
            Some([
                self.layer_vec(l, "attn.q.bias", qd)?,
                self.layer_vec(l, "attn.k.bias", kvd)?,
                self.layer_vec(l, "attn.v.bias", kvd)?,
            ])
        } else {
            None
        };
        let (q_norm, k_norm) = match c.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => {
                (Some(self.layer_vec(l, "attn.q_norm.weight", hd)?), Some(self.layer_vec(l, "attn.k_norm.weight", hd)?))
            }
            QkNorm::Full => (
                Some(self.layer_vec(l, "attn.q_norm.weight", qd)?),
                Some(self.layer_vec(l, "attn.k_norm.weight", kvd)?),
            ),
        };
        let attn = AttnPlan {
            norm: self.layer_vec(l, "attn_norm.weight", h)?,
            norm_bias: self.norm_bias(l, "attn_norm")?,
            o_bias: if c.recipe.attention_out_bias { Some(self.layer_vec(l, "attn.o.bias", h)?) } else { None },
            rope: c.layer_rope(l),
            rope_dim: c.rotary_dim(),
            q: self.layer_mat(l, "attn.q.weight", qd, h)?,
            k: self.layer_mat(l, "attn.k.weight", kvd, h)?,
            v: self.layer_mat(l, "attn.v.weight", kvd, h)?,
            o: self.layer_mat(l, "attn.o.weight", h, qd)?,
            bias,
            qk_norm: c.qk_norm,
            q_norm,
            k_norm,
            clip: c.clip_qkv,
            window: c.layer_window[l],
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            scale: if c.recipe.attention_unscaled {
                1.0
            } else {
                c.recipe.attention_scale.unwrap_or(1.0 / libm::sqrtf(hd as f32))
            },
            causal: !c.recipe.encoder_only,
            rel_bias: self.rel_bias()?,
            sinks: if c.recipe.attention_sinks { Some(self.layer_vec(l, "attn.sinks", c.num_heads)?) } else { None },
            gate: if c.recipe.attention_output_gate {
                Some(self.layer_mat(l, "attn.gate.weight", qd, h)?)
            } else {
                None
            },
            chunk: c.layer_chunk(l),
            qk_rms_after_rope: c.recipe.qk_rms_after_rope && c.layer_rope(l),
            qk_norm_after_rope: c.recipe.qk_norm_after_rope,
            temperature: c.recipe.nope_temperature.filter(|_| c.recipe.layer_nope.get(l) == Some(&true)),
        };
        Ok(attn)
    }

    fn moe(&self, l: usize) -> Result<MoePlan, ModelError> {
        let (c, h) = (self.c, self.h);
        let r = &c.router;
        let e = r.num_experts;
        let shared = if r.num_shared_experts > 0 {
            if c.shared_expert_intermediate_size == 0 {
                return Err(crate::config::ConfigError::Invalid {
                    key: "model.shared_expert_intermediate_size",
                    value: "0 with shared experts".to_string(),
                }
                .into());
            }
            Some(self.mlp(l, "shared", c.shared_expert_intermediate_size)?)
        } else {
            None
        };
        let shared_gate = if shared.is_some() && r.shared_gate == SharedGate::Sigmoid {
            Some(self.layer_mat(l, "shared_gate.weight", 1, h)?)
        } else {
            None
        };
        // The router's shape bounds `e` by the file size before anything is sized by it.
        let router = self.layer_mat(l, "router.weight", e, h)?;
        let experts = (0..e).map(|x| self.expert(l, x)).collect::<Result<Vec<_>, _>>()?;
        Ok(MoePlan {
            router,
            router_bias: if r.router_bias { Some(self.layer_vec(l, "router.bias", e)?) } else { None },
            selection_bias: if r.selection_bias { Some(self.layer_vec(l, "router.selection_bias", e)?) } else { None },
            shared,
            shared_gate,
            experts,
        })
    }

    fn expert(&self, l: usize, x: usize) -> Result<Expert, ModelError> {
        self.slab_expert(&alloc::format!("layers.{l}.experts.{x}"), &|p| names::expert(l, x, p))
    }

    /// The expert whose matrices are `name(part)` and whose slab is `key`.
    fn slab_expert(&self, key: &str, name: &dyn Fn(&str) -> alloc::string::String) -> Result<Expert, ModelError> {
        let (h, i) = (self.h, self.c.expert_intermediate_size);
        let first = name(if self.ffn_act().gated() { "gate" } else { "up" });
        let slab = self.slabs.get(key).cloned().ok_or(ModelError::NotInSlab { name: first })?;
        let part = |p: &str, rows, cols| -> Result<Mat, ModelError> {
            let name = name(p);
            let m = self.mat(&name, rows, cols)?;
            if m.range.start < slab.start || m.range.end > slab.end {
                return Err(ModelError::NotInSlab { name });
            }
            let rel = m.range.start - slab.start..m.range.end - slab.start;
            Ok(Mat { range: rel, ..m })
        };
        let bias = if self.c.recipe.expert_bias {
            let vec = |p: &str, len: usize| -> Result<Vector, ModelError> {
                let name = name(p);
                let v = self.vector(&name, len)?;
                if v.range.start < slab.start || v.range.end > slab.end {
                    return Err(ModelError::NotInSlab { name });
                }
                Ok(Vector { len, range: v.range.start - slab.start..v.range.end - slab.start })
            };
            let [g, u, d] = names::EXPERT_BIAS_PARTS;
            Some(alloc::boxed::Box::new([vec(g, i)?, vec(u, i)?, vec(d, h)?]))
        } else {
            None
        };
        let act = self.ffn_act();
        let gate = if act.gated() { Some(part("gate", i, h)?) } else { None };
        let mlp = Mlp { gate, up: part("up", i, h)?, down: part("down", h, i)?, bias, act };
        Ok(Expert { slab, mlp })
    }

    /// The precomputed task merges (`merge.tasks`) and the measured prompt-mode merge errors
    /// (`merge.prompt.*`), validated against the layers: every listed layer is an MoE layer,
    /// listed once, with its merged expert's tensors in their slab and arrays of the right
    /// lengths. A file without `merge.*` keys has neither.
    pub(crate) fn merges(&self) -> Result<Merges, ModelError> {
        use crate::format::{MetaArray, MetaValue};
        use names::merge_keys as k;
        if self.c.layer_ffn.contains(&FfnKind::MeoBank) {
            // An MEO-native model's task merges are banks: see `meo_tasks`.
            return Ok((Vec::new(), Vec::new()));
        }
        let m = &self.file.metadata;
        let bad = |key: &str, what: &str| ModelError::Merge(alloc::format!("metadata {key:?}: {what}"));
        let u64s = |key: &str| -> Result<Option<Vec<u64>>, ModelError> {
            match m.get(key) {
                None => Ok(None),
                Some(MetaValue::Array(MetaArray::U64(v))) => Ok(Some(v.clone())),
                Some(v) => Err(bad(key, &alloc::format!("is {}, expected array of u64", v.type_name()))),
            }
        };
        let f64s = |key: &str| -> Result<Option<Vec<f64>>, ModelError> {
            match m.get(key) {
                None => Ok(None),
                Some(MetaValue::Array(MetaArray::F64(v))) => Ok(Some(v.clone())),
                // An empty array is written with some element type; accept any.
                Some(MetaValue::Array(MetaArray::U64(v))) if v.is_empty() => Ok(Some(Vec::new())),
                Some(v) => Err(bad(key, &alloc::format!("is {}, expected array of f64", v.type_name()))),
            }
        };
        let moe_layers = |key: &str, v: &[u64]| -> Result<Vec<usize>, ModelError> {
            let mut seen = alloc::collections::BTreeSet::new();
            v.iter()
                .map(|&l| {
                    let l = usize::try_from(l).map_err(|_| bad(key, "layer out of range"))?;
                    if self.c.layer_ffn.get(l) != Some(&FfnKind::Moe) {
                        return Err(bad(key, &alloc::format!("layer {l} is not an MoE layer")));
                    }
                    if !seen.insert(l) {
                        return Err(bad(key, &alloc::format!("layer {l} listed twice")));
                    }
                    Ok(l)
                })
                .collect()
        };
        let prompt = match (u64s(k::PROMPT_LAYERS)?, f64s(k::PROMPT_ERRORS)?) {
            (None, None) => Vec::new(),
            (Some(l), Some(e)) if l.len() == e.len() => moe_layers(k::PROMPT_LAYERS, &l)?.into_iter().zip(e).collect(),
            _ => return Err(bad(k::PROMPT_ERRORS, "needs merge.prompt.layers of the same length")),
        };
        let names: Vec<&str> = match m.get(k::TASKS) {
            None => Vec::new(),
            Some(MetaValue::Array(MetaArray::Str(v))) => v.clone(),
            Some(MetaValue::Array(MetaArray::U64(v))) if v.is_empty() => Vec::new(),
            Some(v) => return Err(bad(k::TASKS, &alloc::format!("is {}, expected array of str", v.type_name()))),
        };
        let e = self.c.router.num_experts;
        let mut tasks: Vec<TaskMerge> = Vec::with_capacity(names.len());
        for name in names {
            if !names::valid_task_name(name) {
                return Err(bad(k::TASKS, &alloc::format!("invalid task name {name:?} (use 1-64 of [A-Za-z0-9_-])")));
            }
            if tasks.iter().any(|t| t.name == name) {
                return Err(bad(k::TASKS, &alloc::format!("task {name:?} listed twice")));
            }
            let key = |f: &str| k::task(name, f);
            let lk = key("layers");
            let layers = moe_layers(&lk, &u64s(&lk)?.ok_or_else(|| bad(&lk, "missing"))?)?;
            let wk = key("weights");
            let weights = f64s(&wk)?.ok_or_else(|| bad(&wk, "missing"))?;
            if Some(weights.len()) != layers.len().checked_mul(e) {
                return Err(bad(&wk, "needs one weight per expert of every listed layer"));
            }
            let per_layer = |f: &str| -> Result<Option<Vec<f64>>, ModelError> {
                let kk = key(f);
                match f64s(&kk)? {
                    Some(v) if v.len() != layers.len() => Err(bad(&kk, "needs one value per listed layer")),
                    v => Ok(v),
                }
            };
            let errors = per_layer("errors")?;
            let unaligned = per_layer("errors_unaligned")?;
            let tokens = match m.get(&key("tokens")) {
                Some(MetaValue::U64(x)) => *x,
                _ => 0,
            };
            let weighting = match m.get(&key("weighting")) {
                Some(MetaValue::Str(s)) => (*s).to_string(),
                _ => alloc::string::String::new(),
            };
            let mut tl = Vec::with_capacity(layers.len());
            for (j, &l) in layers.iter().enumerate() {
                let slab = alloc::format!("tasks.{name}.layers.{l}.experts.merged");
                let expert = self.slab_expert(&slab, &|p| names::task_expert(name, l, p))?;
                tl.push(TaskLayer {
                    layer: l,
                    expert,
                    weights: weights[j * e..(j + 1) * e].to_vec(),
                    error: errors.as_ref().map(|v| v[j]),
                    error_unaligned: unaligned.as_ref().map(|v| v[j]),
                });
            }
            tasks.push(TaskMerge { name: name.to_string(), tokens, weighting, layers: tl });
        }
        Ok((tasks, prompt))
    }
}

/// A file's task merges and its measured prompt-mode errors `(layer, error)`.
pub(crate) type Merges = (Vec<TaskMerge>, Vec<(usize, f64)>);

/// One layer of a task merge stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskLayer {
    pub layer: usize,
    /// The merged expert's slab (absolute) and matrices (relative to the slab).
    pub expert: Expert,
    /// Merge weights `w` per expert (see [`crate::merge`]).
    pub weights: Vec<f64>,
    /// Relative merge error measured by the converter on the calibration tokens.
    pub error: Option<f64>,
    /// The same, had the experts not been aligned.
    pub error_unaligned: Option<f64>,
}

/// A task's precomputed merged experts (`merge.task.<name>.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMerge {
    pub name: alloc::string::String,
    /// Calibration tokens the merge weights were measured on.
    pub tokens: u64,
    /// How the weights were computed (`mean_gate` or `frequency`).
    pub weighting: alloc::string::String,
    /// Ascending by layer is not required; one entry per merged layer.
    pub layers: Vec<TaskLayer>,
}
