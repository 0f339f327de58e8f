//! Layer recipes: which tensors each block uses, resolved and validated once at open.
//!
//! Everything here is plain data (byte ranges, shapes, flags). New families add fields or
//! variants here (an MLA attention kind, a relative-position bias, sinks, a ReLU expert
//! activation, RoPE scaling) and the matching arm in the runner; nothing tests a family name.

use super::ModelError;
use crate::config::{FfnKind, ModelConfig, QkNorm, SharedGate};
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

/// Rotary position embedding: the frequencies of each pair of a head's dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `theta^(-2i/d)` for `i < d/2`, computed in f32 as transformers does.
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(c: &ModelConfig) -> Self {
        let d = c.head_dim;
        let inv_freq =
            (0..d / 2).map(|i| 1.0 / libm::powf(c.rope_theta, (2 * i) as f32 / d as f32)).collect::<Vec<f32>>();
        Self { inv_freq }
    }

    /// cos and sin of every frequency at position `pos` (`d/2` values each).
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = p * f;
            *c = libm::cosf(a);
            *s = libm::sinf(a);
        }
    }
}

/// Self-attention of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnPlan {
    pub norm: Vector,
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
    /// Multiplies q·k (`head_dim^-0.5`).
    pub scale: f32,
}

/// A SiLU-gated MLP: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mlp {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

/// One routed expert: its slab (absolute) and its matrices (ranges relative to the slab).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expert {
    pub slab: Range<usize>,
    pub mlp: Mlp,
}

/// A mixture-of-experts block.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FfnPlan {
    Dense(Mlp),
    Moe(MoePlan),
}

/// One decoder layer: `x += attn(norm(x)); x += ffn(norm(x))`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    pub attn: AttnPlan,
    pub ffn_norm: Vector,
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
        if !c.head_dim.is_multiple_of(2) {
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
        Ok(Mlp {
            gate: self.layer_mat(l, &alloc::format!("{prefix}.gate.weight"), inter, h)?,
            up: self.layer_mat(l, &alloc::format!("{prefix}.up.weight"), inter, h)?,
            down: self.layer_mat(l, &alloc::format!("{prefix}.down.weight"), h, inter)?,
        })
    }

    /// Embedding, final norm, LM head.
    pub(crate) fn globals(&self) -> Result<(Mat, Vector, Mat), ModelError> {
        let (v, h) = (self.c.vocab_size, self.h);
        let embed = self.mat(names::EMBED, v, h)?;
        let norm = self.vector(names::OUTPUT_NORM, h)?;
        let output = if self.c.tie_word_embeddings { embed.clone() } else { self.mat(names::OUTPUT, v, h)? };
        Ok((embed, norm, output))
    }

    pub(crate) fn layer(&self, l: usize) -> Result<LayerPlan, ModelError> {
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
            scale: 1.0 / libm::sqrtf(hd as f32),
        };
        let ffn = match c.layer_ffn[l] {
            FfnKind::Dense => FfnPlan::Dense(self.mlp(l, "ffn", c.intermediate_size)?),
            FfnKind::Moe => FfnPlan::Moe(self.moe(l)?),
        };
        Ok(LayerPlan { attn, ffn_norm: self.layer_vec(l, "ffn_norm.weight", h)?, ffn })
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
        let (h, i) = (self.h, self.c.expert_intermediate_size);
        let key = alloc::format!("layers.{l}.experts.{x}");
        let first = names::expert(l, x, names::EXPERT_PARTS[0]);
        let slab = self.slabs.get(key.as_str()).cloned().ok_or(ModelError::NotInSlab { name: first })?;
        let part = |p: &str, rows, cols| -> Result<Mat, ModelError> {
            let name = names::expert(l, x, p);
            let m = self.mat(&name, rows, cols)?;
            if m.range.start < slab.start || m.range.end > slab.end {
                return Err(ModelError::NotInSlab { name });
            }
            let rel = m.range.start - slab.start..m.range.end - slab.start;
            Ok(Mat { range: rel, ..m })
        };
        let mlp = Mlp { gate: part("gate", i, h)?, up: part("up", i, h)?, down: part("down", h, i)? };
        Ok(Expert { slab, mlp })
    }
}
