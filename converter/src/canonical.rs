//! The tensors a `.meo` file holds for a [`ModelConfig`]: canonical names (see
//! `meo::names`), shapes, and the role that decides each one's dtype, in file order.

use anyhow::{Context, Result, bail, ensure};
use meo::config::SharedGate;
use meo::config::{NormKind, Positions};
use meo::names::{self, BANK_EXPERT_PARTS, EXPERT_BIAS_PARTS, EXPERT_PARTS, MEO_BANKS};
use meo::{DType, FfnKind, MeoFile, ModelConfig, QkNorm};

/// What a tensor is, which decides its dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// RMSNorm weight: f32.
    Norm,
    /// Projection bias: f32.
    Bias,
    /// Router (and shared-expert gate) weights: f32, never quantized.
    Router,
    /// Embedding, attention, dense FFN, shared expert, LM head: `--dense`.
    Dense,
    /// Routed expert matrix: `--experts`.
    Expert,
}

/// Where a tensor sits in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Outside the decoder layers (`embed.weight`, `output_norm.weight`, `output.weight`).
    Global,
    /// `layers.{layer}.{suffix}`.
    Layer { layer: usize, suffix: &'static str },
    /// `layers.{layer}.experts.{expert}.{EXPERT_PARTS[part]}`.
    Expert { layer: usize, expert: usize, part: usize },
    /// `layers.{layer}.experts.{expert}.{EXPERT_BIAS_PARTS[part]}` (`model.expert_bias`).
    ExpertBias { layer: usize, expert: usize, part: usize },
    /// `layers.{layer}.{MEO_BANKS[bank]}.experts.{expert}.{BANK_EXPERT_PARTS[part]}`.
    BankExpert { layer: usize, bank: usize, expert: usize, part: usize },
    /// A task's merged MEO bank, computed by the converter:
    /// `tasks.{task}.layers.{layer}.{MEO_BANKS[bank]}.experts.merged.{BANK_EXPERT_PARTS[part]}`
    /// (`task` indexes the model's task list).
    TaskBank { task: usize, layer: usize, bank: usize, part: usize },
}

/// Static `{bank}.{rest}` layer suffixes of the MEO banks (canonical names are `&'static`).
const BANK_SUFFIXES: [[&str; 5]; 2] = [
    ["fc1.router.weight", "fc1.token.down.weight", "fc1.token.down.bias", "fc1.token.up.weight", "fc1.token.up.bias"],
    ["fc2.router.weight", "fc2.token.down.weight", "fc2.token.down.bias", "fc2.token.up.weight", "fc2.token.up.bias"],
];

fn lay(l: usize, suffix: &'static str, shape: Vec<u64>, role: Role) -> Canon {
    Canon { name: names::layer(l, suffix), shape, role, place: Place::Layer { layer: l, suffix } }
}

/// The merged banks of each of `tasks` (MEO-native models), in file order after [`tensors`]:
/// per task, per MEO layer, per bank, weight then bias (one slab per bank).
pub fn task_tensors(c: &ModelConfig, tasks: &[String]) -> Vec<Canon> {
    let mut out = Vec::new();
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    for (ti, task) in tasks.iter().enumerate() {
        for l in (0..c.num_layers).filter(|&l| c.layer_ffn[l] == FfnKind::MeoBank) {
            for (b, bank) in MEO_BANKS.iter().enumerate() {
                let (inp, o) = if b == 0 { (h, i) } else { (i, h) };
                for (p, part) in BANK_EXPERT_PARTS.iter().enumerate() {
                    out.push(Canon {
                        name: names::task_bank_expert(task, l, bank, part),
                        shape: if p == 0 { vec![o, inp] } else { vec![o] },
                        role: if p == 0 { Role::Expert } else { Role::Bias },
                        place: Place::TaskBank { task: ti, layer: l, bank: b, part: p },
                    });
                }
            }
        }
    }
    out
}

/// One tensor of the output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canon {
    pub name: String,
    /// Outermost dimension first (`[out, in]` for matrices).
    pub shape: Vec<u64>,
    pub role: Role,
    pub place: Place,
}

impl Canon {
    /// The dtype this tensor is stored in.
    pub fn dtype(&self, dense: DType, experts: DType) -> DType {
        match self.role {
            Role::Norm | Role::Bias | Role::Router => DType::F32,
            Role::Dense => dense,
            Role::Expert => experts,
        }
    }
}

/// A config whose tensors hold more values than the file or checkpoint they are read from:
/// some size in it is wrong (checked before the tensor list is built, so a crafted size
/// cannot make it allocate without bound).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the config describes far more weights than {source_name} holds (tensor budget {budget} exceeded): a size in it \
     (layers, experts, widths) is wrong"
)]
pub struct TooLarge {
    pub budget: u64,
    pub source_name: &'static str,
}

/// What one tensor costs in [`tensors_within`]'s budget beyond its values.
const ENTRY_COST: u64 = 64;

/// The budget for [`tensors_within`] when the tensors are read from weights holding
/// `elements` values: generous (a config off by a layer still reaches the tensor checks,
/// which name what is missing), but proportional to the weights, never to the config.
pub fn budget(elements: u64) -> u64 {
    elements.saturating_mul(4).saturating_add(1 << 16)
}

/// Number of values in all tensors of `f`.
pub fn file_elements(f: &meo::MeoFile<'_>) -> u64 {
    f.tensors()
        .iter()
        .map(|t| t.shape().iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX))
        .fold(0, u64::saturating_add)
}

/// Canon list that stops growing once its tensors' elements exceed a budget.
struct Budgeted {
    out: Vec<Canon>,
    left: u64,
    over: bool,
}

impl Budgeted {
    fn push(&mut self, c: Canon) {
        // Each entry costs its values plus a fixed overhead, so a config of many tiny (or
        // empty) tensors is bounded too.
        let n = c.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX).saturating_add(ENTRY_COST);
        match self.left.checked_sub(n) {
            Some(left) if !self.over => {
                self.left = left;
                self.out.push(c);
            }
            _ => self.over = true,
        }
    }
}

/// Every tensor of a model with config `c`, in file order (see [`tensors_within`]). For a
/// config already checked against its weights, or built by this converter.
pub fn tensors(c: &ModelConfig) -> Vec<Canon> {
    tensors_within(c, u64::MAX, "").unwrap_or_default()
}

/// Every tensor of a model with config `c`, in file order: embeddings; per layer the
/// attention norm, q/k/v weights, their biases, o, q/k norms, FFN norm, then either the
/// dense FFN or the router, shared expert, shared gate and the expert slabs (expert order,
/// each gate, up, down); then the output norm and (unless tied) the LM head.
///
/// # Errors
/// [`TooLarge`] once the tensors listed hold more than `budget` values in all (the values
/// `source_name` holds), before the list grows further.
pub fn tensors_within(c: &ModelConfig, budget: u64, source_name: &'static str) -> Result<Vec<Canon>, TooLarge> {
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let (q, kv) = (
        (c.num_heads as u64).saturating_mul(c.head_dim as u64),
        (c.num_kv_heads as u64).saturating_mul(c.head_dim as u64),
    );
    let too_large = TooLarge { budget, source_name };
    let mut out = Budgeted { out: Vec::new(), left: budget, over: false };
    let global = |name: &str, shape: Vec<u64>, role| Canon { name: name.into(), shape, role, place: Place::Global };
    out.push(global(names::EMBED, vec![v, h], Role::Dense));
    let layer_norm = c.recipe.norm == NormKind::Layer;
    if c.recipe.positions == Positions::Learned {
        out.push(global(names::POS_EMBED, vec![c.max_position_embeddings as u64, h], Role::Dense));
    }
    if c.recipe.positions == Positions::Relative {
        // Added to attention scores: kept f32 like a bias.
        let (b, heads) = (c.recipe.relative_buckets as u64, c.num_heads as u64);
        out.push(global(names::REL_BIAS, vec![b, heads], Role::Bias));
    }
    // Dense FFNs and experts: SiLU-gated unless ReLU (MEO banks' GELU is not an FFN kind here).
    let gated = c.recipe.ffn_activation != meo::config::Activation::Relu;
    for l in 0..c.num_layers.min(c.layer_ffn.len()) {
        if out.over {
            return Err(too_large);
        }
        let mut push = |suffix: &'static str, shape: Vec<u64>, role| {
            out.push(Canon { name: names::layer(l, suffix), shape, role, place: Place::Layer { layer: l, suffix } });
        };
        push("attn_norm.weight", vec![h], Role::Norm);
        if layer_norm {
            push("attn_norm.bias", vec![h], Role::Bias);
        }
        let delta = c.recipe.delta_net.filter(|_| c.mixer(l) == meo::Mixer::GatedDeltaNet);
        let mamba2 = c.recipe.mamba2.filter(|_| c.mixer(l) == meo::Mixer::Mamba2);
        if c.mixer(l) == meo::Mixer::ShortConv {
            // Gated short convolution: b, c, x projections, the convolution (f32), out.
            push("mixer.b.weight", vec![h, h], Role::Dense);
            push("mixer.c.weight", vec![h, h], Role::Dense);
            push("mixer.x.weight", vec![h, h], Role::Dense);
            push("mixer.conv.weight", vec![h, c.recipe.short_conv_kernel as u64], Role::Bias);
            push("mixer.out.weight", vec![h, h], Role::Dense);
        } else if let Some(d) = mamba2 {
            // Mamba2: the gate z, x/B/C and the step-size input dt (f32 like a router: it sets
            // how much is written and forgotten), the convolution and its bias (f32), the
            // per-head decay, step bias and skip, the gated norm, out.
            let (inner, cd, nh) = (d.inner() as u64, d.conv_dim() as u64, d.num_heads as u64);
            push("mixer.z.weight", vec![inner, h], Role::Dense);
            push("mixer.xbc.weight", vec![cd, h], Role::Dense);
            push("mixer.dt.weight", vec![nh, h], Role::Router);
            push("mixer.conv.weight", vec![cd, d.conv_kernel as u64], Role::Bias);
            if d.conv_bias {
                push("mixer.conv.bias", vec![cd], Role::Bias);
            }
            push("mixer.dt_bias", vec![nh], Role::Bias);
            push("mixer.a_log", vec![nh], Role::Bias);
            push("mixer.d", vec![nh], Role::Bias);
            push("mixer.norm.weight", vec![inner], Role::Norm);
            push("mixer.out.weight", vec![h, inner], Role::Dense);
        } else if let Some(d) = delta {
            // Gated DeltaNet: q, k, v, z projections, the b and a gate inputs (f32 like a
            // router: they set how much is written and forgotten), the convolution (f32, a few
            // values per channel), decay parameters, the gated norm, out.
            let (kd, vd, nv) =
                ((d.num_k_heads * d.k_head_dim) as u64, (d.num_v_heads * d.v_head_dim) as u64, d.num_v_heads as u64);
            push("mixer.q.weight", vec![kd, h], Role::Dense);
            push("mixer.k.weight", vec![kd, h], Role::Dense);
            push("mixer.v.weight", vec![vd, h], Role::Dense);
            push("mixer.z.weight", vec![vd, h], Role::Dense);
            push("mixer.b.weight", vec![nv, h], Role::Router);
            push("mixer.a.weight", vec![nv, h], Role::Router);
            push("mixer.conv.weight", vec![d.conv_dim() as u64, d.conv_kernel as u64], Role::Bias);
            push("mixer.dt_bias", vec![nv], Role::Bias);
            push("mixer.a_log", vec![nv], Role::Bias);
            push("mixer.norm.weight", vec![d.v_head_dim as u64], Role::Norm);
            push("mixer.out.weight", vec![h, vd], Role::Dense);
        } else if let Some(a) = &c.recipe.mla {
            // MLA (DeepSeek): low-rank q (or a plain q), the kv latent with the shared rotary
            // key, its decompression, and o. `model.head_dim` is the rotary width.
            let (nh, rope) = (c.num_heads as u64, c.head_dim as u64);
            let (nope, vd) = (a.qk_nope_head_dim as u64, a.v_head_dim as u64);
            let (qr, kvr) = (a.q_lora_rank as u64, a.kv_lora_rank as u64);
            if qr > 0 {
                push("attn.q_a.weight", vec![qr, h], Role::Dense);
                push("attn.q_a_norm.weight", vec![qr], Role::Norm);
                push("attn.q_b.weight", vec![nh * (nope + rope), qr], Role::Dense);
            } else {
                push("attn.q.weight", vec![nh * (nope + rope), h], Role::Dense);
            }
            push("attn.kv_a.weight", vec![kvr + rope, h], Role::Dense);
            push("attn.kv_a_norm.weight", vec![kvr], Role::Norm);
            push("attn.kv_b.weight", vec![nh * (nope + vd), kvr], Role::Dense);
            push("attn.o.weight", vec![h, nh * vd], Role::Dense);
        } else {
            push("attn.q.weight", vec![q, h], Role::Dense);
            push("attn.k.weight", vec![kv, h], Role::Dense);
            push("attn.v.weight", vec![kv, h], Role::Dense);
            if c.attention_bias {
                push("attn.q.bias", vec![q], Role::Bias);
                push("attn.k.bias", vec![kv], Role::Bias);
                push("attn.v.bias", vec![kv], Role::Bias);
            }
            push("attn.o.weight", vec![h, q], Role::Dense);
            if c.recipe.attention_out_bias {
                push("attn.o.bias", vec![h], Role::Bias);
            }
            if c.recipe.attention_sinks {
                push("attn.sinks", vec![c.num_heads as u64], Role::Bias);
            }
            if c.recipe.attention_output_gate {
                push("attn.gate.weight", vec![q, h], Role::Dense);
            }
            match c.qk_norm {
                QkNorm::None => {}
                QkNorm::PerHead => {
                    push("attn.q_norm.weight", vec![c.head_dim as u64], Role::Norm);
                    push("attn.k_norm.weight", vec![c.head_dim as u64], Role::Norm);
                }
                QkNorm::Full => {
                    push("attn.q_norm.weight", vec![q], Role::Norm);
                    push("attn.k_norm.weight", vec![kv], Role::Norm);
                }
            }
        }
        push("ffn_norm.weight", vec![h], Role::Norm);
        if layer_norm {
            push("ffn_norm.bias", vec![h], Role::Bias);
        }
        match c.layer_ffn[l] {
            FfnKind::MeoBank => {
                let (e, i, r) =
                    (c.router.num_experts, c.intermediate_size as u64, c.recipe.meo_token_bottleneck as u64);
                for (b, sfx) in BANK_SUFFIXES.iter().enumerate() {
                    let (inp, o) = if b == 0 { (h, i) } else { (i, h) };
                    out.push(lay(l, sfx[0], vec![e as u64, inp], Role::Router));
                    if r > 0 {
                        out.push(lay(l, sfx[1], vec![r, inp], Role::Dense));
                        out.push(lay(l, sfx[2], vec![r], Role::Bias));
                        out.push(lay(l, sfx[3], vec![inp, r], Role::Dense));
                        out.push(lay(l, sfx[4], vec![inp], Role::Bias));
                    }
                    for x in 0..e {
                        if out.over {
                            return Err(too_large);
                        }
                        for (p, part) in BANK_EXPERT_PARTS.iter().enumerate() {
                            out.push(Canon {
                                name: names::bank_expert(l, MEO_BANKS[b], x, part),
                                shape: if p == 0 { vec![o, inp] } else { vec![o] },
                                role: if p == 0 { Role::Expert } else { Role::Bias },
                                place: Place::BankExpert { layer: l, bank: b, expert: x, part: p },
                            });
                        }
                    }
                }
            }
            FfnKind::Dense => {
                let i = c.intermediate_size as u64;
                if gated {
                    push("ffn.gate.weight", vec![i, h], Role::Dense);
                }
                push("ffn.up.weight", vec![i, h], Role::Dense);
                push("ffn.down.weight", vec![h, i], Role::Dense);
            }
            FfnKind::Moe => {
                let r = &c.router;
                let e = r.num_experts as u64;
                push("router.weight", vec![e, h], Role::Router);
                if r.router_bias {
                    push("router.bias", vec![e], Role::Router);
                }
                if r.selection_bias {
                    push("router.selection_bias", vec![e], Role::Router);
                }
                if r.num_shared_experts > 0 {
                    let s = c.shared_expert_intermediate_size as u64;
                    push("shared.gate.weight", vec![s, h], Role::Dense);
                    push("shared.up.weight", vec![s, h], Role::Dense);
                    push("shared.down.weight", vec![h, s], Role::Dense);
                    if r.shared_gate == SharedGate::Sigmoid {
                        push("shared_gate.weight", vec![1, h], Role::Router);
                    }
                }
                let i = c.expert_intermediate_size as u64;
                for x in 0..r.num_experts {
                    if out.over {
                        return Err(too_large);
                    }
                    for (p, part) in EXPERT_PARTS.iter().enumerate().filter(|(_, p)| gated || **p != "gate") {
                        let shape = if *part == "down" { vec![h, i] } else { vec![i, h] };
                        out.push(Canon {
                            name: names::expert(l, x, part),
                            shape,
                            role: Role::Expert,
                            place: Place::Expert { layer: l, expert: x, part: p },
                        });
                    }
                    // Biases in the same slab, after the matrices.
                    for (p, part) in EXPERT_BIAS_PARTS.iter().enumerate().filter(|_| c.recipe.expert_bias) {
                        out.push(Canon {
                            name: names::expert(l, x, part),
                            shape: vec![if p == 2 { h } else { i }],
                            role: Role::Bias,
                            place: Place::ExpertBias { layer: l, expert: x, part: p },
                        });
                    }
                }
            }
        }
    }
    out.push(global(names::OUTPUT_NORM, vec![h], Role::Norm));
    if layer_norm {
        out.push(global(names::OUTPUT_NORM_BIAS, vec![h], Role::Bias));
    }
    // An encoder has no LM head.
    if !c.tie_word_embeddings && !c.recipe.encoder_only {
        out.push(global(names::OUTPUT, vec![v, h], Role::Dense));
    }
    if c.recipe.output_bias {
        out.push(global(names::OUTPUT_BIAS, vec![v], Role::Bias));
    }
    if out.over { Err(too_large) } else { Ok(out.out) }
}

/// Checks that the tensors of `f` are the ones its model config needs, with their shapes
/// and dtypes a runtime accepts. Returns the config, or `None` if the file has no model
/// description.
///
/// # Errors
/// Bad config metadata, or a missing, mis-shaped or wrongly typed tensor.
pub fn check_model(f: &MeoFile<'_>) -> Result<Option<ModelConfig>> {
    if f.metadata.get("general.architecture").is_none() {
        return Ok(None);
    }
    let cfg = ModelConfig::from_metadata(&f.metadata).context("model metadata")?;
    // Sized from the file's own tensor table, never from the config alone (a crafted config
    // could claim billions of tensors).
    for c in tensors_within(&cfg, budget(file_elements(f)), "the file")? {
        let t = f.tensor(&c.name).with_context(|| format!("tensor {:?} is missing", c.name))?;
        ensure!(t.shape() == c.shape.as_slice(), "tensor {:?}: shape {:?}, expected {:?}", c.name, t.shape(), c.shape);
        let ok = match c.role {
            Role::Norm | Role::Bias | Role::Router => t.dtype == DType::F32,
            // `--dense int8` writes Q8_0 dense matrices; the runtime reads them.
            Role::Dense => matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0),
            Role::Expert => {
                matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_0 | DType::MXFP4)
            }
        };
        if !ok {
            bail!("tensor {:?}: dtype {} is not allowed for a {:?} tensor", c.name, t.dtype.name(), c.role);
        }
    }
    Ok(Some(cfg))
}
