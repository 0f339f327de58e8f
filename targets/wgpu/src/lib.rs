//! meo's GPU target: the model's layer recipe run by WGSL compute kernels through wgpu
//! (Vulkan, Metal, DX12, GL), implementing [`meo::Target`].
//!
//! Every recipe the CPU target runs, read from the plan as data (no family names): GQA and
//! multi-head latent attention, RoPE on halves or interleaved pairs, sliding windows, sinks,
//! relative position bias and bidirectional attention ([`Target::encode`] for encoders),
//! embedding/residual/logit multipliers, gated (SiLU, clamped SwiGLU) and ungated
//! (ReLU, GELU) MLPs with optional biases, a gated attention output, MEO-native banks merged
//! or not, and gated DeltaNet layers (hybrid models: the recurrent state stays on the GPU
//! beside the KV cache) (`docs/GPU.md`).
//!
//! - Weights: dense tensors (attention, norms, routers, shared experts, dense MLPs, the LM
//!   head) are uploaded once when the target opens, each straight from the mapped `.meo` file.
//!   Routed experts are uploaded only when routing selects them, into an LRU cache with a
//!   byte budget ([`ExpertStats`]).
//! - The residual stream, activations and the KV cache stay on the GPU. Per MoE layer the
//!   normalised input and the router logits (`[T, experts]`, small) are read back and routed
//!   on the host with the runtime's own router ([`meo::route::route_token`]), so this target
//!   selects exactly what the CPU target selects from the same logits (same code, same tie
//!   rule), and reports routing through [`meo::Trace`] as the CPU does.
//! - Int8 (Q8_0) and 4-bit (Q4_0, MXFP4) weights stay as stored on the GPU: activations are
//!   quantized per 32-block as the CPU does and multiplied with `dot4I8Packed` where the
//!   adapter has it (a portable shift and multiply otherwise); 4-bit codes are turned into
//!   int8 in the kernel. f16/bf16 weights are decoded to f32 in the kernel.
//! - MEO modes: merged experts (task merges stored in the file, prompt merges made from the
//!   prompt's routing, MEO-native banks) are merged on the host with the runtime's merge code
//!   and uploaded once per task / prompt.

mod gpu;
mod shaders;

pub use gpu::{AdapterSummary, GpuError, list_adapters};

use gpu::{Enc, Gpu};
use meo::config::{FfnKind, NormKind, SharedGate};
use meo::kernels::Serial;
use meo::model::exec::{bank_slots, prompt_merge_weights};
use meo::model::plan::{
    Attention, AttnPlan, Bank, BankExpert, DeltaPlan, FfnPlan, LayerPlan, Mamba2Plan, Mat, MeoFfn, MlaPlan, Mlp,
    MoePlan, Vector, relative_bucket,
};
use meo::model::{MergedBank, merge_bank, sequence_gate};
use meo::route::{Choice, RouteScratch, apply_capacity, route_token};
use meo::{
    Activation, DType, ExecPlan, ForwardError, LayerExec, Logits, MergeOptions, MergedUse, Model, Target, TargetError,
    Trace,
};
use std::collections::HashMap;
use std::sync::Arc;

const NAME: &str = "wgpu";

/// Options of a [`WgpuTarget`].
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Adapter by index (as [`list_adapters`] numbers them) or part of its name; `None`: the
    /// first (real GPUs before software ones).
    pub adapter: Option<String>,
    /// Bytes of routed experts kept on the GPU; 0 = [`DEFAULT_EXPERT_BUDGET`].
    pub expert_budget: usize,
    /// Most positions the target holds; 0 = the model's `max_position_embeddings`.
    pub max_context: usize,
    /// Use the portable int8 dot product even where the adapter has `dot4I8Packed` (to test
    /// the fallback on any adapter).
    pub portable_dot: bool,
}

/// Default byte budget of the expert cache.
pub const DEFAULT_EXPERT_BUDGET: usize = 1 << 30;

/// Expert residency counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    /// Experts uploaded (cache misses).
    pub uploads: u64,
    /// Selections served from the cache.
    pub hits: u64,
    /// Experts dropped to stay within the budget.
    pub evictions: u64,
    pub bytes_uploaded: u64,
    /// Bytes of experts resident now.
    pub resident_bytes: u64,
    pub budget: u64,
}

fn dev(e: GpuError) -> TargetError {
    TargetError::Device { target: NAME.into(), reason: e.to_string() }
}

fn unsupported(what: impl Into<String>) -> TargetError {
    TargetError::Unsupported { target: NAME.into(), what: what.into() }
}

/// A matrix on the GPU.
struct GMat {
    buf: wgpu::Buffer,
    dtype: DType,
    rows: usize,
    cols: usize,
}

/// An MLP on the GPU: gated (`gate` present) or not, with optional gate/up/down biases.
struct GMlp {
    gate: Option<GMat>,
    up: GMat,
    down: GMat,
    bias: Option<[wgpu::Buffer; 3]>,
    act: Activation,
}

impl GMlp {
    fn bytes(&self) -> u64 {
        let b = self.bias.as_ref().map_or(0, |b| b.iter().map(wgpu::Buffer::size).sum());
        self.gate.as_ref().map_or(0, |g| g.buf.size()) + self.up.buf.size() + self.down.buf.size() + b
    }
}

/// Grouped-query attention weights.
struct GAttn {
    q: GMat,
    k: GMat,
    v: GMat,
    o: GMat,
    bias: Option<[wgpu::Buffer; 3]>,
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
    o_bias: Option<wgpu::Buffer>,
    sinks: Option<wgpu::Buffer>,
    /// The output gate (`model.attention_output_gate`).
    gate: Option<GMat>,
}

/// Gated DeltaNet weights (see `DeltaPlan`).
struct GDelta {
    q: GMat,
    k: GMat,
    v: GMat,
    z: GMat,
    b: GMat,
    a: GMat,
    /// `[conv_dim, conv_kernel]` f32.
    conv: wgpu::Buffer,
    /// dt_bias `[v_heads]`, a_log `[v_heads]`, the gated RMSNorm's weight `[v_dim]`, side by side.
    consts: wgpu::Buffer,
    out: GMat,
}

/// LFM2's gated short convolution weights (see `ShortConvPlan`).
struct GShortConv {
    b: GMat,
    c: GMat,
    x: GMat,
    /// `[h, kernel]` f32.
    conv: wgpu::Buffer,
    out: GMat,
}

/// Mamba2 weights (see `Mamba2Plan`).
struct GMamba {
    z: GMat,
    xbc: GMat,
    dt: GMat,
    /// `[conv_dim, conv_kernel]` f32, and its bias `[conv_dim]`.
    conv: wgpu::Buffer,
    conv_bias: Option<wgpu::Buffer>,
    /// dt_bias, a_log, D `[heads]` each, side by side.
    consts: wgpu::Buffer,
    /// The gated RMSNorm's weight `[inner]`.
    norm: wgpu::Buffer,
    out: GMat,
}

/// Largest key head of a gated DeltaNet layer the step kernel holds (workgroup memory).
const MAX_DELTA_KEY_DIM: usize = 256;

/// Multi-head latent attention weights (see `MlaPlan`).
struct GMla {
    q_a: Option<(GMat, wgpu::Buffer)>,
    q: GMat,
    kv_a: GMat,
    kv_norm: wgpu::Buffer,
    kv_b: GMat,
    o: GMat,
}

enum GAttnKind {
    Gqa(GAttn),
    Mla(GMla),
    Delta(GDelta),
    ShortConv(GShortConv),
    Mamba(GMamba),
}

struct GToken {
    down: GMat,
    down_b: wgpu::Buffer,
    up: GMat,
    up_b: wgpu::Buffer,
}

enum GFfn {
    Dense(GMlp),
    Moe {
        router: GMat,
        router_bias: Option<wgpu::Buffer>,
        /// Selection bias on the host (the router runs there).
        selection_bias: Option<Vec<f32>>,
        shared: Option<GMlp>,
        shared_gate: Option<GMat>,
    },
    Meo {
        tokens: [Option<GToken>; 2],
    },
}

struct GLayer {
    attn_norm: wgpu::Buffer,
    attn_norm_b: Option<wgpu::Buffer>,
    attn: GAttnKind,
    ffn_norm: wgpu::Buffer,
    ffn_norm_b: Option<wgpu::Buffer>,
    ffn: GFfn,
}

/// A merged bank on the GPU: weight, bias, and the gate it came from.
struct GBank {
    w: GMat,
    bias: wgpu::Buffer,
    gate: Vec<Choice>,
}

/// One expert of an MEO bank run unmerged: its gate choice and its weight and bias, resident
/// in the expert cache.
struct GBankPart {
    choice: Choice,
    res: Arc<Resident>,
}

/// What the expert cache holds: a routed expert's MLP, or one linear expert of an MEO bank
/// (weight and bias).
enum Resident {
    Mlp(GMlp),
    Linear(GMat, wgpu::Buffer),
}

impl Resident {
    /// A bank expert's weight and bias.
    fn linear(&self) -> Result<(&GMat, &wgpu::Buffer), TargetError> {
        match self {
            Self::Linear(w, b) => Ok((w, b)),
            Self::Mlp(_) => Err(unsupported("an MEO bank expert cached as an MLP")),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Self::Mlp(m) => m.bytes(),
            Self::Linear(w, b) => w.buf.size() + b.size(),
        }
    }
}

/// A layer's merged form on the GPU, per the execution plan: a task merge from the file
/// (uploaded when the mode is set) or what was built from the prompt (dropped on reset).
enum GMerged {
    /// A merged expert, and its size in bytes on the host (what `Trace::on_merged` reports).
    Mlp(Box<GMlp>, usize),
    /// MEO-native banks merged (fc1, fc2), and their merged weights' bytes.
    Banks(Box<[GBank; 2]>, usize),
    /// MEO-native banks run unmerged with these gates (`LayerExec::MeoSequence { merged: false }`).
    Gates(Box<[Vec<Choice>; 2]>),
}

/// The LRU expert cache.
struct ExpertCache {
    budget: u64,
    clock: u64,
    /// (layer, expert) → the expert and when it was last used. In an MEO-native layer the
    /// expert is the slot `b·E + e` of expert `e` of bank `b` (as `Trace` numbers them).
    map: HashMap<(usize, usize), (Arc<Resident>, u64)>,
    stats: ExpertStats,
}

impl ExpertCache {
    /// Routed expert `expert` of MoE layer `layer`, uploaded from its slab if not resident.
    fn get(
        &mut self,
        gpu: &Gpu,
        bytes: &[u8],
        layer: usize,
        expert: usize,
        ex: &meo::model::plan::Expert,
    ) -> Result<Arc<Resident>, TargetError> {
        self.fetch((layer, expert), || {
            let slab = bytes.get(ex.slab.clone()).ok_or_else(|| unsupported("expert slab outside the file"))?;
            Ok(Resident::Mlp(upload_mlp(gpu, slab, &ex.mlp, "expert")?))
        })
    }

    /// Linear expert `e` of bank `bk` of MEO-native layer `layer` (`ne` experts per bank).
    #[allow(clippy::too_many_arguments)]
    fn bank_expert(
        &mut self,
        gpu: &Gpu,
        bytes: &[u8],
        layer: usize,
        bk: usize,
        ne: usize,
        e: usize,
        ex: &BankExpert,
    ) -> Result<Arc<Resident>, TargetError> {
        self.fetch((layer, bk * ne + e), || {
            let slab = bytes.get(ex.slab.clone()).ok_or_else(|| unsupported("bank expert outside the file"))?;
            Ok(Resident::Linear(
                upload_mat(gpu, slab, &ex.weight, "bank expert")?,
                upload_vec(gpu, slab, &ex.bias, "bank expert bias")?,
            ))
        })
    }

    fn fetch(
        &mut self,
        key: (usize, usize),
        upload: impl FnOnce() -> Result<Resident, TargetError>,
    ) -> Result<Arc<Resident>, TargetError> {
        self.clock += 1;
        if let Some((m, used)) = self.map.get_mut(&key) {
            *used = self.clock;
            self.stats.hits += 1;
            return Ok(m.clone());
        }
        let m = Arc::new(upload()?);
        let size = m.bytes();
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += size;
        self.stats.resident_bytes += size;
        // Least recently used first; an expert evicted while this layer still uses it stays
        // alive (the layer holds its own reference) until the layer's commands are done.
        while self.stats.resident_bytes > self.budget {
            let Some((&key, _)) = self.map.iter().min_by_key(|(_, (_, used))| *used) else { break };
            if let Some((old, _)) = self.map.remove(&key) {
                self.stats.resident_bytes -= old.bytes();
                self.stats.evictions += 1;
            }
        }
        self.map.insert(key, (m.clone(), self.clock));
        Ok(m)
    }
}

fn upload_mat(gpu: &Gpu, bytes: &[u8], m: &Mat, label: &str) -> Result<GMat, TargetError> {
    let data = bytes.get(m.range.clone()).ok_or_else(|| unsupported(format!("{label}: outside the file")))?;
    Ok(GMat { buf: gpu.upload(label, data).map_err(dev)?, dtype: m.dtype, rows: m.rows, cols: m.cols })
}

fn upload_vec(gpu: &Gpu, bytes: &[u8], v: &Vector, label: &str) -> Result<wgpu::Buffer, TargetError> {
    let data = bytes.get(v.range.clone()).ok_or_else(|| unsupported(format!("{label}: outside the file")))?;
    gpu.upload(label, data).map_err(dev)
}

/// `bytes`: the file, or the expert's slab (expert matrices and biases are relative to it).
fn upload_mlp(gpu: &Gpu, bytes: &[u8], m: &Mlp, label: &str) -> Result<GMlp, TargetError> {
    Ok(GMlp {
        gate: m.gate.as_ref().map(|g| upload_mat(gpu, bytes, g, label)).transpose()?,
        up: upload_mat(gpu, bytes, &m.up, label)?,
        down: upload_mat(gpu, bytes, &m.down, label)?,
        bias: match m.bias.as_deref() {
            Some([g, u, d]) => Some([
                upload_vec(gpu, bytes, g, label)?,
                upload_vec(gpu, bytes, u, label)?,
                upload_vec(gpu, bytes, d, label)?,
            ]),
            None => None,
        },
        act: m.act,
    })
}

fn read_vec(bytes: &[u8], v: &Vector) -> Vec<f32> {
    bytes
        .get(v.range.clone())
        .map_or_else(Vec::new, |b| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn mat_ref<'a>(bytes: &'a [u8], m: &Mat) -> Result<meo::kernels::MatRef<'a>, TargetError> {
    bytes
        .get(m.range.clone())
        .and_then(|b| meo::kernels::MatRef::new(m.dtype, m.rows, m.cols, b))
        .ok_or_else(|| unsupported("matrix does not fit its range"))
}

/// The model on a GPU, one sequence at a time.
pub struct WgpuTarget<'m> {
    model: &'m Model,
    gpu: Gpu,
    layers: Vec<GLayer>,
    out_norm: wgpu::Buffer,
    out_norm_b: Option<wgpu::Buffer>,
    head: GMat,
    /// Per layer: keys and values of every position, `[kv_cap, width]` each.
    kv: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    kv_cap: usize,
    /// Per recurrent layer: its fixed-size state (gated DeltaNet: the convolution's last inputs
    /// `[kernel − 1, conv_dim]` and the delta-rule state `[v_heads, k_dim, v_dim]`), zeroed when
    /// a sequence starts (position 0), as the KV cache is emptied.
    rec: Vec<Option<(wgpu::Buffer, wgpu::Buffer)>>,
    experts: ExpertCache,
    /// The execution plan (the runtime's; this target resolves no mode itself).
    plan: ExecPlan,
    /// Per layer: its merged form (see [`GMerged`]).
    merged: Vec<Option<GMerged>>,
    pos: usize,
    max_context: usize,
    logits: Vec<f32>,
}

impl std::fmt::Debug for WgpuTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuTarget").field("adapter", &self.gpu.info.name).field("pos", &self.pos).finish()
    }
}

/// The `ew` kernel's code of an ungated activation (as the CPU: SiLU for the gated kinds).
fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Silu | Activation::ClampedSwiglu { .. } => 0,
        Activation::GeluTanh => 1,
        Activation::Relu => 2,
    }
}

impl<'m> WgpuTarget<'m> {
    /// Opens the adapter and uploads the model's dense weights.
    ///
    /// # Errors
    /// No (matching) adapter, a device failure, or a model this target cannot run.
    pub fn new(model: &'m Model, opts: WgpuOptions) -> Result<Self, TargetError> {
        let c = model.config();
        supports(model)?;
        let gpu = Gpu::open(opts.adapter.as_deref(), opts.portable_dot).map_err(dev)?;
        let b = model.bytes();
        let mut layers = Vec::with_capacity(model.layer_plans().len());
        for (l, lp) in model.layer_plans().iter().enumerate() {
            layers.push(Self::upload_layer(&gpu, b, lp, l)?);
        }
        let (on, onb) = model.output_norm();
        let out_norm = upload_vec(&gpu, b, on, "output_norm")?;
        let out_norm_b = onb.map(|v| upload_vec(&gpu, b, v, "output_norm.bias")).transpose()?;
        let head = upload_mat(&gpu, b, model.output_head(), "output")?;
        let max = c.max_position_embeddings;
        let max_context = match (opts.max_context, max) {
            (0, m) => m,
            (o, 0) => o,
            (o, m) => o.min(m),
        };
        let budget = if opts.expert_budget == 0 { DEFAULT_EXPERT_BUDGET } else { opts.expert_budget } as u64;
        let rec = model
            .layer_plans()
            .iter()
            .map(|lp| {
                state_floats(&lp.attn).map(|(conv, s)| {
                    (gpu.buffer("rec.conv_state", conv as u64 * 4), gpu.buffer("rec.state", s as u64 * 4))
                })
            })
            .collect();
        let t = Self {
            model,
            layers,
            out_norm,
            out_norm_b,
            head,
            kv: Vec::new(),
            kv_cap: 0,
            rec,
            experts: ExpertCache {
                budget,
                clock: 0,
                map: HashMap::new(),
                stats: ExpertStats { budget, ..Default::default() },
            },
            merged: model.layer_plans().iter().map(|_| None).collect(),
            plan: ExecPlan::vanilla(model),
            pos: 0,
            max_context,
            logits: Vec::new(),
            gpu,
        };
        t.gpu.check().map_err(dev)?;
        Ok(t)
    }

    fn upload_gqa(gpu: &Gpu, b: &[u8], a: &AttnPlan, lbl: &dyn Fn(&str) -> String) -> Result<GAttn, TargetError> {
        Ok(GAttn {
            q: upload_mat(gpu, b, &a.q, &lbl("q"))?,
            k: upload_mat(gpu, b, &a.k, &lbl("k"))?,
            v: upload_mat(gpu, b, &a.v, &lbl("v"))?,
            o: upload_mat(gpu, b, &a.o, &lbl("o"))?,
            bias: match &a.bias {
                Some([q, k, v]) => Some([
                    upload_vec(gpu, b, q, &lbl("q.bias"))?,
                    upload_vec(gpu, b, k, &lbl("k.bias"))?,
                    upload_vec(gpu, b, v, &lbl("v.bias"))?,
                ]),
                None => None,
            },
            q_norm: a.q_norm.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("q_norm"))).transpose()?,
            k_norm: a.k_norm.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("k_norm"))).transpose()?,
            o_bias: a.o_bias.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("o.bias"))).transpose()?,
            sinks: a.sinks.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("sinks"))).transpose()?,
            gate: a.gate.as_ref().map(|m| upload_mat(gpu, b, m, &lbl("gate"))).transpose()?,
        })
    }

    fn upload_delta(
        gpu: &Gpu,
        b: &[u8],
        p: &DeltaPlan,
        l: usize,
        lbl: &dyn Fn(&str) -> String,
    ) -> Result<GDelta, TargetError> {
        let d = &p.dims;
        if d.num_k_heads == 0 || !d.num_v_heads.is_multiple_of(d.num_k_heads) || d.conv_kernel == 0 {
            return Err(unsupported(format!(
                "layer {l}: gated DeltaNet with {} value heads over {} key heads, convolution width {}",
                d.num_v_heads, d.num_k_heads, d.conv_kernel
            )));
        }
        if d.k_head_dim > MAX_DELTA_KEY_DIM {
            return Err(unsupported(format!(
                "layer {l}: gated DeltaNet key heads of {} (at most {MAX_DELTA_KEY_DIM})",
                d.k_head_dim
            )));
        }
        let mut consts = read_vec(b, &p.dt_bias);
        consts.extend(read_vec(b, &p.a_log));
        consts.extend(read_vec(b, &p.out_norm));
        if consts.len() != 2 * d.num_v_heads + d.v_head_dim {
            return Err(unsupported(format!("layer {l}: gated DeltaNet vectors outside the file")));
        }
        Ok(GDelta {
            q: upload_mat(gpu, b, &p.q, &lbl("mixer.q"))?,
            k: upload_mat(gpu, b, &p.k, &lbl("mixer.k"))?,
            v: upload_mat(gpu, b, &p.v, &lbl("mixer.v"))?,
            z: upload_mat(gpu, b, &p.z, &lbl("mixer.z"))?,
            b: upload_mat(gpu, b, &p.b, &lbl("mixer.b"))?,
            a: upload_mat(gpu, b, &p.a, &lbl("mixer.a"))?,
            conv: upload_mat(gpu, b, &p.conv, &lbl("mixer.conv"))?.buf,
            consts: gpu.upload_f32(&lbl("mixer.consts"), &consts).map_err(dev)?,
            out: upload_mat(gpu, b, &p.out, &lbl("mixer.out"))?,
        })
    }

    fn upload_mamba(
        gpu: &Gpu,
        b: &[u8],
        p: &Mamba2Plan,
        l: usize,
        lbl: &dyn Fn(&str) -> String,
    ) -> Result<GMamba, TargetError> {
        let d = &p.dims;
        if d.n_groups == 0 || !d.num_heads.is_multiple_of(d.n_groups) || d.conv_kernel == 0 {
            return Err(unsupported(format!(
                "layer {l}: Mamba2 with {} heads over {} groups, convolution width {}",
                d.num_heads, d.n_groups, d.conv_kernel
            )));
        }
        let mut consts = read_vec(b, &p.dt_bias);
        consts.extend(read_vec(b, &p.a_log));
        consts.extend(read_vec(b, &p.d));
        if consts.len() != 3 * d.num_heads {
            return Err(unsupported(format!("layer {l}: Mamba2 vectors outside the file")));
        }
        Ok(GMamba {
            z: upload_mat(gpu, b, &p.z, &lbl("mixer.z"))?,
            xbc: upload_mat(gpu, b, &p.xbc, &lbl("mixer.xbc"))?,
            dt: upload_mat(gpu, b, &p.dt, &lbl("mixer.dt"))?,
            conv: upload_mat(gpu, b, &p.conv, &lbl("mixer.conv"))?.buf,
            conv_bias: p.conv_bias.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("mixer.conv.bias"))).transpose()?,
            consts: gpu.upload_f32(&lbl("mixer.consts"), &consts).map_err(dev)?,
            norm: upload_vec(gpu, b, &p.out_norm, &lbl("mixer.norm"))?,
            out: upload_mat(gpu, b, &p.out, &lbl("mixer.out"))?,
        })
    }

    fn upload_layer(gpu: &Gpu, b: &[u8], lp: &LayerPlan, l: usize) -> Result<GLayer, TargetError> {
        let lbl = |s: &str| format!("layers.{l}.{s}");
        let attn = match &lp.attn {
            Attention::Gqa(a) => GAttnKind::Gqa(Self::upload_gqa(gpu, b, a, &lbl)?),
            Attention::GatedDeltaNet(p) => GAttnKind::Delta(Self::upload_delta(gpu, b, p, l, &lbl)?),
            Attention::Mamba2(p) => GAttnKind::Mamba(Self::upload_mamba(gpu, b, p, l, &lbl)?),
            Attention::ShortConv(p) => {
                if p.kernel == 0 {
                    return Err(unsupported(format!("layer {l}: short convolution of width 0")));
                }
                GAttnKind::ShortConv(GShortConv {
                    b: upload_mat(gpu, b, &p.b, &lbl("mixer.b"))?,
                    c: upload_mat(gpu, b, &p.c, &lbl("mixer.c"))?,
                    x: upload_mat(gpu, b, &p.x, &lbl("mixer.x"))?,
                    conv: upload_mat(gpu, b, &p.conv, &lbl("mixer.conv"))?.buf,
                    out: upload_mat(gpu, b, &p.out, &lbl("mixer.out"))?,
                })
            }
            Attention::Mla(a) => GAttnKind::Mla(GMla {
                q_a: match &a.q_a {
                    Some((m, n)) => {
                        Some((upload_mat(gpu, b, m, &lbl("q_a"))?, upload_vec(gpu, b, n, &lbl("q_a_norm"))?))
                    }
                    None => None,
                },
                q: upload_mat(gpu, b, &a.q, &lbl("q"))?,
                kv_a: upload_mat(gpu, b, &a.kv_a, &lbl("kv_a"))?,
                kv_norm: upload_vec(gpu, b, &a.kv_norm, &lbl("kv_norm"))?,
                kv_b: upload_mat(gpu, b, &a.kv_b, &lbl("kv_b"))?,
                o: upload_mat(gpu, b, &a.o, &lbl("o"))?,
            }),
            // A mixer kind without kernels here (`supports` refuses it first).
            #[allow(unreachable_patterns)]
            _ => return Err(TargetError::UnsupportedMixer { target: NAME.into(), layer: l, mixer: lp.attn.mixer() }),
        };
        let ffn = match &lp.ffn {
            FfnPlan::Dense(m) => GFfn::Dense(upload_mlp(gpu, b, m, &lbl("ffn"))?),
            FfnPlan::Moe(p) => GFfn::Moe {
                router: upload_mat(gpu, b, &p.router, &lbl("router"))?,
                router_bias: p.router_bias.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("router.bias"))).transpose()?,
                selection_bias: p.selection_bias.as_ref().map(|v| read_vec(b, v)),
                shared: p.shared.as_ref().map(|m| upload_mlp(gpu, b, m, &lbl("shared"))).transpose()?,
                shared_gate: p.shared_gate.as_ref().map(|m| upload_mat(gpu, b, m, &lbl("shared_gate"))).transpose()?,
            },
            FfnPlan::Meo(p) => {
                let tok = |bank: &Bank| -> Result<Option<GToken>, TargetError> {
                    bank.token
                        .as_ref()
                        .map(|tb| {
                            Ok(GToken {
                                down: upload_mat(gpu, b, &tb.down, &lbl("token.down"))?,
                                down_b: upload_vec(gpu, b, &tb.down_bias, &lbl("token.down.bias"))?,
                                up: upload_mat(gpu, b, &tb.up, &lbl("token.up"))?,
                                up_b: upload_vec(gpu, b, &tb.up_bias, &lbl("token.up.bias"))?,
                            })
                        })
                        .transpose()
                };
                GFfn::Meo { tokens: [tok(&p.banks[0])?, tok(&p.banks[1])?] }
            }
        };
        Ok(GLayer {
            attn_norm: upload_vec(gpu, b, lp.attn.norm(), &lbl("attn_norm"))?,
            attn_norm_b: lp.attn.norm_bias().map(|v| upload_vec(gpu, b, v, &lbl("attn_norm.bias"))).transpose()?,
            attn,
            ffn_norm: upload_vec(gpu, b, &lp.ffn_norm, &lbl("ffn_norm"))?,
            ffn_norm_b: lp.ffn_norm_bias.as_ref().map(|v| upload_vec(gpu, b, v, &lbl("ffn_norm.bias"))).transpose()?,
            ffn,
        })
    }

    /// The adapter this target runs on.
    pub fn adapter(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    /// Whether the int8 kernels use the adapter's packed dot product (`dot4I8Packed`).
    pub fn packed_dot(&self) -> bool {
        self.gpu.packed_dot
    }

    /// Bytes of recurrent state this target holds for the sequence, whatever its length (the
    /// recurrent layers' GPU buffers, f32): what `meo::Session::recurrent_state_bytes` reports
    /// on the CPU.
    pub fn recurrent_state_bytes(&self) -> u64 {
        let floats: usize = self
            .model
            .layer_plans()
            .iter()
            .zip(&self.rec)
            .filter(|(_, r)| r.is_some())
            .filter_map(|(lp, _)| state_floats(&lp.attn))
            .map(|(c, s)| c + s)
            .sum();
        floats as u64 * 4
    }

    /// Expert residency counters.
    pub fn expert_stats(&self) -> ExpertStats {
        self.experts.stats
    }

    /// The routing mode.
    pub fn mode(&self) -> &MergeOptions {
        self.plan.options()
    }

    /// Follows the runtime's execution plan for `opts`; merged experts stored in the file are
    /// uploaded now, once per task.
    fn set_mode_inner(&mut self, opts: MergeOptions) -> Result<Vec<usize>, TargetError> {
        let m = self.model;
        let b = m.bytes();
        let plan = ExecPlan::new(m, opts)?;
        let mut merged: Vec<Option<GMerged>> = plan.layers().iter().map(|_| None).collect();
        for (l, exec) in plan.layers().iter().enumerate() {
            merged[l] = match exec {
                LayerExec::TaskMerge { task, index } => {
                    let tl = &m.tasks()[*task].layers[*index];
                    let slab =
                        b.get(tl.expert.slab.clone()).ok_or_else(|| unsupported("merged expert outside the file"))?;
                    let mlp = upload_mlp(&self.gpu, slab, &tl.expert.mlp, "merged expert")?;
                    Some(GMerged::Mlp(Box::new(mlp), slab.len()))
                }
                LayerExec::MeoTask { task, index } => {
                    let tl = &m.meo_tasks()[*task].layers[*index];
                    let gates = tl.gates();
                    let up = |i: usize, gate: Vec<Choice>| -> Result<GBank, TargetError> {
                        let ex = &tl.banks[i].0;
                        let slab = b.get(ex.slab.clone()).ok_or_else(|| unsupported("merged bank outside the file"))?;
                        Ok(GBank {
                            w: upload_mat(&self.gpu, slab, &ex.weight, "merged bank")?,
                            bias: upload_vec(&self.gpu, slab, &ex.bias, "merged bank bias")?,
                            gate,
                        })
                    };
                    let [g0, g1] = gates;
                    let size = tl.banks[0].0.slab.len() + tl.banks[1].0.slab.len();
                    Some(GMerged::Banks(Box::new([up(0, g0)?, up(1, g1)?]), size))
                }
                _ => None,
            };
        }
        let layers = plan.merged_layers();
        self.plan = plan;
        self.merged = merged;
        self.reset_inner();
        Ok(layers)
    }

    fn reset_inner(&mut self) {
        self.pos = 0;
        for (m, exec) in self.merged.iter_mut().zip(self.plan.layers()) {
            if exec.from_prompt() {
                *m = None;
            }
        }
    }

    /// The gates of MEO-native layer `layer`'s merged banks (fc1, fc2), as
    /// `meo::Session::bank_gates` reports them; `None` before the prompt and for other layers.
    pub fn bank_gates(&self, layer: usize) -> Option<[Vec<Choice>; 2]> {
        match self.merged.get(layer)? {
            Some(GMerged::Banks(banks, _)) => Some([banks[0].gate.clone(), banks[1].gate.clone()]),
            Some(GMerged::Gates(gates)) => Some((**gates).clone()),
            _ => None,
        }
    }

    /// The layers that run merged now.
    pub fn merged_layers(&self) -> Vec<usize> {
        self.merged
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Some(GMerged::Mlp(..) | GMerged::Banks(..))))
            .map(|(l, _)| l)
            .collect()
    }

    /// Runs the layer stack on `tokens` at positions `pos..pos + T` and reads back either the
    /// logits (`Some(which)`) or the final normalised hidden states of every token (`None`,
    /// an encoder's output) into `self.logits`.
    fn forward_inner(
        &mut self,
        tokens: &[u32],
        which: Option<Logits>,
        trace: &mut dyn Trace,
    ) -> Result<(), TargetError> {
        let m = self.model;
        let c = m.config();
        let bytes = m.bytes();
        let (t, h, vocab) = (tokens.len(), c.hidden_size, c.vocab_size);
        let eps = c.rms_norm_eps;
        let recipe = &c.recipe;
        let norm_kind = match recipe.norm {
            NormKind::Rms => 0u32,
            NormKind::Layer => 1,
        };
        if t > 65535 {
            return Err(unsupported(format!("{t} tokens in one call (at most 65535)")));
        }
        // Embedding (and learned positions) on the host: T rows, uploaded once; multiplied
        // before the positions are added, as the CPU does.
        let mut x0 = vec![0.0f32; t * h];
        let embed = mat_ref(bytes, m.embedding())?;
        for (o, &tok) in x0.chunks_mut(h).zip(tokens) {
            embed.row(tok as usize, o);
        }
        if recipe.embedding_multiplier != 1.0 {
            x0.iter_mut().for_each(|v| *v *= recipe.embedding_multiplier);
        }
        if let Some(pe) = m.position_embedding().map(|p| mat_ref(bytes, p)).transpose()? {
            let mut row = vec![0.0f32; h];
            for (i, o) in x0.chunks_mut(h).enumerate() {
                pe.row(self.pos + i, &mut row);
                meo::kernels::add_into(o, &row);
            }
        }
        let gpu = &self.gpu;
        let mut enc = gpu.encoder();
        // RoPE angles on the host, as the CPU computes them: `[T, 2, nf]` for each rotary width
        // in use (`nf` = half the rotated dimensions: the head for GQA, the rope part for MLA;
        // entries past the frequency table stay 0 as in the CPU's buffers).
        let mut rope_tables: HashMap<usize, wgpu::Buffer> = HashMap::new();
        for lp in m.layer_plans() {
            let nf = match &lp.attn {
                Attention::Gqa(a) if a.rope => a.rope_dim / 2,
                Attention::Mla(a) => a.rope / 2,
                _ => continue,
            };
            if nf == 0 || rope_tables.contains_key(&nf) {
                continue;
            }
            let mut cs = vec![0.0f32; t * 2 * nf];
            for (i, r) in cs.chunks_mut(2 * nf).enumerate() {
                let (co, si) = r.split_at_mut(nf);
                m.rope().angles(self.pos + i, co, si);
            }
            rope_tables.insert(nf, enc.data("rope", bytemuck::cast_slice(&cs)));
        }
        let need = self.pos + t;
        if need > self.kv_cap {
            let cap = need.next_power_of_two().max(16).min(self.max_context.max(need));
            let mut kv = Vec::with_capacity(self.layers.len());
            for (l, lp) in m.layer_plans().iter().enumerate() {
                let (kw, vw) = lp.attn.cache_widths();
                let (kw, vw) = (kw as u64 * 4, vw as u64 * 4);
                let (k, v) = (gpu.buffer("kcache", cap as u64 * kw), gpu.buffer("vcache", cap as u64 * vw));
                if let Some((ok, ov)) = self.kv.get(l) {
                    enc.copy(ok, 0, &k, 0, self.pos as u64 * kw);
                    enc.copy(ov, 0, &v, 0, self.pos as u64 * vw);
                }
                kv.push((k, v));
            }
            self.kv = kv;
            self.kv_cap = cap;
        }
        if self.pos == 0 {
            // A new sequence: recurrent states start from zero.
            for (conv, s) in self.rec.iter().flatten() {
                enc.clear(conv, conv.size());
                enc.clear(s, s.size());
            }
        }
        let x = enc.data("x", bytemuck::cast_slice(&x0));
        let f4 = |n: usize| n as u64 * 4;
        let hbuf = gpu.scratch("h", f4(t * h)).map_err(dev)?;
        let ybuf = gpu.scratch("y", f4(t * h)).map_err(dev)?;
        let ops = Ops { gpu, t, pos0: self.pos, interleave: m.rope().interleave, rope: &rope_tables };
        let residual = recipe.residual_multiplier;
        // `x += y · multiplier` (the CPU scales y, then adds).
        let add_residual = |enc: &mut Enc<'_>| {
            if residual == 1.0 {
                ops.ew(enc, 0, &ybuf, &x, t * h, 0, 0.0);
            } else {
                ops.ew(enc, 8, &ybuf, &x, t * h, 0, residual);
            }
        };
        for (l, (gl, lp)) in self.layers.iter().zip(m.layer_plans()).enumerate() {
            // Attention.
            ops.norm(&mut enc, &x, t, h, &gl.attn_norm, gl.attn_norm_b.as_ref(), eps, norm_kind, &hbuf);
            match (&gl.attn, &lp.attn) {
                (GAttnKind::Gqa(ga), Attention::Gqa(a)) => {
                    ops.attention(&mut enc, bytes, ga, a, &self.kv[l], &hbuf, eps, &ybuf)?
                }
                (GAttnKind::Mla(ga), Attention::Mla(a)) => ops.mla(&mut enc, ga, a, &self.kv[l], &hbuf, &ybuf)?,
                (GAttnKind::Delta(gd), Attention::GatedDeltaNet(p)) => {
                    let state =
                        self.rec[l].as_ref().ok_or_else(|| unsupported(format!("layer {l}: no recurrent state")))?;
                    ops.delta(&mut enc, gd, p, state, &hbuf, &ybuf)?
                }
                (GAttnKind::Mamba(gm), Attention::Mamba2(p)) => {
                    let state =
                        self.rec[l].as_ref().ok_or_else(|| unsupported(format!("layer {l}: no recurrent state")))?;
                    ops.mamba(&mut enc, gm, p, state, &hbuf, &ybuf)?
                }
                (GAttnKind::ShortConv(gs), Attention::ShortConv(p)) => {
                    let state =
                        self.rec[l].as_ref().ok_or_else(|| unsupported(format!("layer {l}: no recurrent state")))?;
                    ops.short_conv(&mut enc, gs, p.kernel, &state.0, &hbuf, &ybuf)?
                }
                _ => return Err(unsupported(format!("layer {l}: attention kind does not match its plan"))),
            }
            add_residual(&mut enc);
            // Feed-forward.
            ops.norm(&mut enc, &x, t, h, &gl.ffn_norm, gl.ffn_norm_b.as_ref(), eps, norm_kind, &hbuf);
            match (&gl.ffn, &lp.ffn) {
                (GFfn::Dense(mlp), _) => ops.mlp(&mut enc, mlp, &hbuf, t, &ybuf)?,
                (GFfn::Moe { router, router_bias, selection_bias, shared, shared_gate }, FfnPlan::Moe(p)) => {
                    let e = c.router.num_experts;
                    let rl = gpu.scratch("router", f4(t * e)).map_err(dev)?;
                    ops.mm(&mut enc, &hbuf, t, router, &rl)?;
                    if let Some(b) = router_bias {
                        ops.ew(&mut enc, 1, b, &rl, t * e, e as u32, 0.0);
                    }
                    let back = enc.read(&[(&hbuf, t * h), (&rl, t * e)]).map_err(dev)?;
                    let (hx, logits) = (&back[0], &back[1]);
                    trace.on_moe_input(l, self.pos, hx);
                    let spec = &c.router;
                    let exec = &self.plan.layers()[l];
                    let merged = &mut self.merged[l];
                    match (exec, &*merged) {
                        (LayerExec::TaskMerge { task, index }, Some(GMerged::Mlp(mlp, _))) => {
                            ops.mlp(&mut enc, mlp, &hbuf, t, &ybuf)?;
                            let slab = m.tasks()[*task].layers[*index].expert.slab.clone();
                            trace.on_merged(l, t, &MergedUse::File(slab));
                        }
                        (_, Some(GMerged::Mlp(mlp, size))) => {
                            ops.mlp(&mut enc, mlp, &hbuf, t, &ybuf)?;
                            trace.on_merged(l, t, &MergedUse::Session(*size));
                        }
                        _ => {
                            let choices = ops.mixture(
                                &mut enc,
                                &mut self.experts,
                                bytes,
                                p,
                                spec,
                                l,
                                logits,
                                selection_bias.as_deref(),
                                &hbuf,
                                &ybuf,
                                trace,
                            )?;
                            if let LayerExec::PromptMerge(pool) = exec {
                                let w = prompt_merge_weights(*pool, &Serial, bytes, p, spec, hx, t, &choices);
                                // As on the CPU: weights are finite, so the merge cannot fail;
                                // if it did the layer would stay vanilla.
                                if let Ok(me) = m.merge_layer(l, &w, None) {
                                    let mlp = upload_mlp(gpu, &me.bytes, &me.mlp, "prompt merge")?;
                                    *merged = Some(GMerged::Mlp(Box::new(mlp), me.bytes.len()));
                                }
                            }
                        }
                    }
                    if let Some(sm) = shared {
                        let sh = gpu.scratch("shared", f4(t * h)).map_err(dev)?;
                        ops.mlp(&mut enc, sm, &hbuf, t, &sh)?;
                        if let (Some(g), SharedGate::Sigmoid) = (shared_gate, spec.shared_gate) {
                            let sg = gpu.scratch("shared_gate", f4(t)).map_err(dev)?;
                            ops.mm(&mut enc, &hbuf, t, g, &sg)?;
                            ops.ew(&mut enc, 5, &sg, &sh, t * h, h as u32, 0.0);
                        }
                        ops.ew(&mut enc, 0, &sh, &ybuf, t * h, 0, 0.0);
                    }
                }
                (GFfn::Meo { tokens: tb }, FfnPlan::Meo(p)) => {
                    let (act, k) = (recipe.ffn_activation, c.router.top_k);
                    let inter = p.banks[0].experts.first().map_or(0, |e| e.weight.rows);
                    let ne = p.banks[0].experts.len();
                    let mid = gpu.scratch("mid", f4(t * inter)).map_err(dev)?;
                    let exec = &self.plan.layers()[l];
                    let merged = &mut self.merged[l];
                    match (exec, &*merged) {
                        (LayerExec::MeoSequence { merged: true }, None) => {
                            // The prompt: pool each bank's gate from its input, merge, upload.
                            let hx = enc.read(&[(&hbuf, t * h)]).map_err(dev)?.remove(0);
                            let g0 = sequence_gate(&Serial, bytes, &p.banks[0], &hx, t, k);
                            trace.on_experts_selected(l, &bank_slots(0, ne, &g0));
                            let b0 = upload_bank(gpu, merge_bank(bytes, &p.banks[0], g0))?;
                            ops.bank(&mut enc, tb[0].as_ref(), &b0.0, &hbuf, t, &mid)?;
                            ops.ew(&mut enc, 3, gpu.dummy(), &mid, t * inter, act_code(act), 0.0);
                            let mx = enc.read(&[(&mid, t * inter)]).map_err(dev)?.remove(0);
                            let g1 = sequence_gate(&Serial, bytes, &p.banks[1], &mx, t, k);
                            trace.on_experts_selected(l, &bank_slots(1, ne, &g1));
                            let b1 = upload_bank(gpu, merge_bank(bytes, &p.banks[1], g1))?;
                            ops.bank(&mut enc, tb[1].as_ref(), &b1.0, &mid, t, &ybuf)?;
                            *merged = Some(GMerged::Banks(Box::new([b0.0, b1.0]), b0.1 + b1.1));
                            trace.on_merged(l, t, &MergedUse::Session(b0.1 + b1.1));
                        }
                        (_, Some(GMerged::Banks(banks, size))) => {
                            ops.bank(&mut enc, tb[0].as_ref(), &banks[0], &hbuf, t, &mid)?;
                            ops.ew(&mut enc, 3, gpu.dummy(), &mid, t * inter, act_code(act), 0.0);
                            ops.bank(&mut enc, tb[1].as_ref(), &banks[1], &mid, t, &ybuf)?;
                            if let LayerExec::MeoTask { task, index } = exec {
                                for (bank, _) in &m.meo_tasks()[*task].layers[*index].banks {
                                    trace.on_merged(l, t, &MergedUse::File(bank.slab.clone()));
                                }
                            } else {
                                trace.on_merged(l, t, &MergedUse::Session(*size));
                            }
                        }
                        (LayerExec::MeoSequence { merged: false }, None) => {
                            // Vanilla, the prompt: each bank's gate pooled from its input, its
                            // experts fetched through the expert cache and run unmerged.
                            let hx = enc.read(&[(&hbuf, t * h)]).map_err(dev)?.remove(0);
                            let g0 = sequence_gate(&Serial, bytes, &p.banks[0], &hx, t, k);
                            trace.on_experts_selected(l, &bank_slots(0, ne, &g0));
                            let p0 = bank_parts(&mut self.experts, gpu, bytes, l, p, 0, &g0)?;
                            ops.bank_mixture(&mut enc, tb[0].as_ref(), &p0, &hbuf, t, &mid)?;
                            ops.ew(&mut enc, 3, gpu.dummy(), &mid, t * inter, act_code(act), 0.0);
                            let mx = enc.read(&[(&mid, t * inter)]).map_err(dev)?.remove(0);
                            let g1 = sequence_gate(&Serial, bytes, &p.banks[1], &mx, t, k);
                            trace.on_experts_selected(l, &bank_slots(1, ne, &g1));
                            let p1 = bank_parts(&mut self.experts, gpu, bytes, l, p, 1, &g1)?;
                            ops.bank_mixture(&mut enc, tb[1].as_ref(), &p1, &mid, t, &ybuf)?;
                            *merged = Some(GMerged::Gates(Box::new([g0, g1])));
                        }
                        (_, Some(GMerged::Gates(gates))) => {
                            let all = [bank_slots(0, ne, &gates[0]), bank_slots(1, ne, &gates[1])].concat();
                            trace.on_experts_selected(l, &all);
                            let p0 = bank_parts(&mut self.experts, gpu, bytes, l, p, 0, &gates[0])?;
                            let p1 = bank_parts(&mut self.experts, gpu, bytes, l, p, 1, &gates[1])?;
                            ops.bank_mixture(&mut enc, tb[0].as_ref(), &p0, &hbuf, t, &mid)?;
                            ops.ew(&mut enc, 3, gpu.dummy(), &mid, t * inter, act_code(act), 0.0);
                            ops.bank_mixture(&mut enc, tb[1].as_ref(), &p1, &mid, t, &ybuf)?;
                        }
                        _ => return Err(unsupported(format!("MEO layer {l}: execution {exec:?} has no merged form"))),
                    }
                }
                _ => return Err(unsupported(format!("layer {l}: feed-forward kind does not match its plan"))),
            }
            add_residual(&mut enc);
        }
        let (rows, first) = match which {
            Some(Logits::Last) => (1, t - 1),
            Some(Logits::All) | None => (t, 0),
        };
        let last = gpu.scratch("last", f4(rows * h)).map_err(dev)?;
        enc.copy(&x, f4(first * h), &last, 0, f4(rows * h));
        let hn = gpu.scratch("final", f4(rows * h)).map_err(dev)?;
        ops.norm(&mut enc, &last, rows, h, &self.out_norm, self.out_norm_b.as_ref(), eps, norm_kind, &hn);
        if which.is_none() {
            self.logits = enc.read(&[(&hn, rows * h)]).map_err(dev)?.remove(0);
            return Ok(());
        }
        let lg = gpu.scratch("logits", f4(rows * vocab)).map_err(dev)?;
        ops.mm(&mut enc, &hn, rows, &self.head, &lg)?;
        self.logits = enc.read(&[(&lg, rows * vocab)]).map_err(dev)?.remove(0);
        if let Some(ob) = m.global_plans().output_bias {
            // Phi-3.5-MoE's LM head bias: one add per logit, on the host as the scaling below.
            let mut bias = vec![0.0f32; ob.len];
            meo::kernels::read_f32s(&bytes[ob.range.clone()], &mut bias);
            for row in self.logits.chunks_mut(vocab) {
                row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
            }
        }
        let scaling = recipe.logits_scaling;
        if scaling != 1.0 {
            // Divided, not multiplied by the reciprocal, as the CPU (and transformers) does.
            self.logits.iter_mut().for_each(|v| *v /= scaling);
        }
        Ok(())
    }
}

/// Records kernels for `t` tokens at positions `pos0..pos0 + t`.
struct Ops<'g> {
    gpu: &'g Gpu,
    t: usize,
    pos0: usize,
    /// RoPE rotates adjacent pairs (DeepSeek) instead of halves.
    interleave: bool,
    /// cos/sin tables of this call by half rotary width.
    rope: &'g HashMap<usize, wgpu::Buffer>,
}

/// The experts `gate` selects in bank `bk` of MEO-native layer `layer`, through the cache.
fn bank_parts(
    cache: &mut ExpertCache,
    gpu: &Gpu,
    bytes: &[u8],
    layer: usize,
    p: &MeoFfn,
    bk: usize,
    gate: &[Choice],
) -> Result<Vec<GBankPart>, TargetError> {
    let bank = &p.banks[bk];
    let ne = bank.experts.len();
    gate.iter()
        .map(|&choice| {
            let e = choice.expert as usize;
            let ex = bank.experts.get(e).ok_or_else(|| unsupported("gate selects a missing expert"))?;
            Ok(GBankPart { choice, res: cache.bank_expert(gpu, bytes, layer, bk, ne, e, ex)? })
        })
        .collect()
}

/// A bank merged on the host by the runtime ([`merge_bank`]), uploaded; with the merged
/// weight's size in bytes.
fn upload_bank(gpu: &Gpu, mb: MergedBank) -> Result<(GBank, usize), TargetError> {
    let size = mb.bytes.len();
    let w =
        GMat { buf: gpu.upload("merged bank", &mb.bytes).map_err(dev)?, dtype: mb.dtype, rows: mb.rows, cols: mb.cols };
    let bias = gpu.upload_f32("merged bank bias", &mb.bias).map_err(dev)?;
    Ok((GBank { w, bias, gate: mb.gate }, size))
}

impl Ops<'_> {
    fn scratch(&self, name: &'static str, floats: usize) -> Result<wgpu::Buffer, TargetError> {
        self.gpu.scratch(name, floats as u64 * 4).map_err(dev)
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ`.
    fn mm(&self, enc: &mut Enc<'_>, x: &wgpu::Buffer, t: usize, w: &GMat, y: &wgpu::Buffer) -> Result<(), TargetError> {
        let (n, k) = (w.rows as u32, w.cols as u32);
        let code = match w.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::Q8_0 | DType::Q4_0 | DType::MXFP4 => {
                // Activations quantized per 32-block as the CPU does, then exact int32 block
                // sums against the weights' planes as stored (§10, §10a of docs/FORMAT.md).
                let nb = w.cols.div_ceil(32);
                let xq = self.scratch("q8x", t * nb * 8)?;
                let xd = self.scratch("q8d", t * nb)?;
                enc.dispatch_1d("quant_q8", &[k, t as u32, nb as u32], &[x, &xq, &xd], t * nb);
                let soff = meo::quant::Planar::of(w.dtype)
                    .and_then(|p| p.scales_offset(w.rows as u64, w.cols as u64))
                    .and_then(|o| u32::try_from(o).ok())
                    .ok_or_else(|| {
                        unsupported(format!("{} matrix {}x{}: too large", w.dtype.name(), w.rows, w.cols))
                    })?;
                let (kernel, fmt) = match w.dtype {
                    DType::Q8_0 => ("matmul_q8", 0),
                    DType::Q4_0 => ("matmul_q4", 0),
                    _ => ("matmul_q4", 1),
                };
                enc.dispatch_rows(
                    kernel,
                    &[n, k, t as u32, nb as u32, soff, fmt],
                    &[&xq, &xd, &w.buf, y],
                    w.rows,
                    t as u32,
                );
                return Ok(());
            }
        };
        enc.dispatch_rows("matmul", &[n, k, t as u32, code], &[x, &w.buf, y], w.rows, t as u32);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        enc: &mut Enc<'_>,
        x: &wgpu::Buffer,
        rows: usize,
        width: usize,
        w: &wgpu::Buffer,
        b: Option<&wgpu::Buffer>,
        eps: f32,
        kind: u32,
        y: &wgpu::Buffer,
    ) {
        self.norm_strided(enc, x, rows, width, 0, w, b, eps, kind, y, 0);
    }

    /// [`norm`](Self::norm) of rows `xs` apart in `x` into rows `ys` apart in `y` (0: `width`).
    #[allow(clippy::too_many_arguments)]
    fn norm_strided(
        &self,
        enc: &mut Enc<'_>,
        x: &wgpu::Buffer,
        rows: usize,
        width: usize,
        xs: usize,
        w: &wgpu::Buffer,
        b: Option<&wgpu::Buffer>,
        eps: f32,
        kind: u32,
        y: &wgpu::Buffer,
        ys: usize,
    ) {
        let b = b.unwrap_or(w);
        let p = [width as u32, eps.to_bits(), kind, xs as u32, ys as u32];
        enc.dispatch_rows("norm", &p, &[x, w, b, y], rows, 1);
    }

    /// Element-wise op `op` (see the `ew` kernel) on `y` with operand `x`.
    #[allow(clippy::too_many_arguments)]
    fn ew(&self, enc: &mut Enc<'_>, op: u32, x: &wgpu::Buffer, y: &wgpu::Buffer, n: usize, a: u32, b: f32) {
        enc.dispatch_1d("ew", &[n as u32, op, a, b.to_bits()], &[x, y], n);
    }

    /// The CPU's MLP (`ffn::mlp`): `out = down(act(gate x + b_g, up x + b_u)) + b_d` when gated
    /// (SiLU, or GPT-OSS's clamped SwiGLU), else `down(act(up x + b_u)) + b_d`.
    fn mlp(
        &self,
        enc: &mut Enc<'_>,
        m: &GMlp,
        x: &wgpu::Buffer,
        t: usize,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let i = m.up.rows;
        let u = self.scratch("mlp_up", t * i)?;
        self.mm(enc, x, t, &m.up, &u)?;
        if let Some([_, bu, _]) = &m.bias {
            self.ew(enc, 1, bu, &u, t * i, i as u32, 0.0);
        }
        let mid = match &m.gate {
            Some(gw) => {
                let g = self.scratch("mlp_gate", t * i)?;
                self.mm(enc, x, t, gw, &g)?;
                if let Some([bg, _, _]) = &m.bias {
                    self.ew(enc, 1, bg, &g, t * i, i as u32, 0.0);
                }
                match m.act {
                    Activation::ClampedSwiglu { alpha, limit } => {
                        self.ew(enc, 7, &u, &g, t * i, alpha.to_bits(), limit)
                    }
                    // A gated MLP is SiLU-gated unless it says otherwise (as the CPU).
                    _ => self.ew(enc, 4, &u, &g, t * i, 0, 0.0),
                }
                g
            }
            None => {
                self.ew(enc, 3, self.gpu.dummy(), &u, t * i, act_code(m.act), 0.0);
                u
            }
        };
        self.mm(enc, &mid, t, &m.down, out)?;
        if let Some([_, _, bd]) = &m.bias {
            let h = m.down.rows;
            self.ew(enc, 1, bd, out, t * h, h as u32, 0.0);
        }
        Ok(())
    }

    /// One MEO bank run unmerged: `out = Σ g_i (W_i x' + b_i)` in gate order (as the CPU's
    /// `BankSrc::Mixture`), with the token block when the bank has one.
    fn bank_mixture(
        &self,
        enc: &mut Enc<'_>,
        tb: Option<&GToken>,
        parts: &[GBankPart],
        x: &wgpu::Buffer,
        t: usize,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let Some(first) = parts.first() else { return Err(unsupported("an MEO bank gate without experts")) };
        let (w0, _) = first.res.linear()?;
        let rows = w0.rows;
        let xin = self.token_block(enc, tb, x, t, w0.cols)?;
        enc.clear(out, (t * rows) as u64 * 4);
        let y = self.scratch("bank_y", t * rows)?;
        for p in parts {
            let (w, b) = p.res.linear()?;
            self.mm(enc, &xin, t, w, &y)?;
            self.ew(enc, 1, b, &y, t * rows, rows as u32, 0.0);
            self.ew(enc, 8, &y, out, t * rows, 0, p.choice.weight);
        }
        Ok(())
    }

    /// `x + up(relu(down x + b_down)) + b_up` when the bank has a token block, else `x`.
    fn token_block(
        &self,
        enc: &mut Enc<'_>,
        tb: Option<&GToken>,
        x: &wgpu::Buffer,
        t: usize,
        d: usize,
    ) -> Result<wgpu::Buffer, TargetError> {
        let Some(tb) = tb else { return Ok(x.clone()) };
        let r = tb.down.rows;
        let dn = self.scratch("tb_down", t * r)?;
        self.mm(enc, x, t, &tb.down, &dn)?;
        self.ew(enc, 1, &tb.down_b, &dn, t * r, r as u32, 0.0);
        self.ew(enc, 3, self.gpu.dummy(), &dn, t * r, 2, 0.0);
        let xt = self.scratch("tb_x", t * d)?;
        self.mm(enc, &dn, t, &tb.up, &xt)?;
        self.ew(enc, 1, &tb.up_b, &xt, t * d, d as u32, 0.0);
        self.ew(enc, 0, x, &xt, t * d, 0, 0.0);
        Ok(xt)
    }

    /// One MEO bank: optional token block, merged matmul, merged bias.
    fn bank(
        &self,
        enc: &mut Enc<'_>,
        tb: Option<&GToken>,
        b: &GBank,
        x: &wgpu::Buffer,
        t: usize,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let xin = self.token_block(enc, tb, x, t, b.w.cols)?;
        self.mm(enc, &xin, t, &b.w, out)?;
        self.ew(enc, 1, &b.bias, out, t * b.w.rows, b.w.rows as u32, 0.0);
        Ok(())
    }

    /// The `rope` kernel on `heads` vectors per token of `buf` (see the kernel's params).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        enc: &mut Enc<'_>,
        buf: &wgpu::Buffer,
        heads: usize,
        rd: usize,
        tok_stride: usize,
        head_stride: usize,
        off: usize,
    ) -> Result<(), TargetError> {
        let nf = rd / 2;
        let cs = self.rope.get(&nf).ok_or_else(|| unsupported(format!("no RoPE table for {rd} rotary dimensions")))?;
        let p = [
            heads as u32,
            rd as u32,
            self.t as u32,
            tok_stride as u32,
            head_stride as u32,
            off as u32,
            u32::from(self.interleave),
            nf as u32,
        ];
        enc.dispatch_1d("rope", &p, &[cs, buf], self.t * heads * nf);
        Ok(())
    }

    /// The `attn` kernel: queries `q` `[t, nh·dqk]` against the cache `kv` (keys `nkv·dqk`,
    /// values `nkv·dv` wide) into `ctx` `[t, nh·dv]`.
    #[allow(clippy::too_many_arguments)]
    fn attn_core(
        &self,
        enc: &mut Enc<'_>,
        q: &wgpu::Buffer,
        kv: &(wgpu::Buffer, wgpu::Buffer),
        (nh, nkv, dqk, dv): (usize, usize, usize, usize),
        window: usize,
        scale: f32,
        causal: bool,
        sinks: Option<&wgpu::Buffer>,
        rel: Option<&wgpu::Buffer>,
        ctx: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let (t, pos0) = (self.t, self.pos0);
        let total = pos0 + t;
        let sc = self.scratch("scores", nh * t * total)?;
        let flags = u32::from(causal) | (u32::from(sinks.is_some()) << 1) | (u32::from(rel.is_some()) << 2);
        let dummy = self.gpu.dummy();
        let p = [
            nh as u32,
            nkv as u32,
            dqk as u32,
            dv as u32,
            pos0 as u32,
            t as u32,
            window as u32,
            scale.to_bits(),
            total as u32,
            flags,
        ];
        let bufs = [q, &kv.0, &kv.1, sinks.unwrap_or(dummy), rel.unwrap_or(dummy), &sc, ctx];
        enc.dispatch("attn", &p, &bufs, [nh as u32, t as u32, 1]);
        Ok(())
    }

    /// Grouped-query self-attention of one layer on normalised `x`, appending to the KV cache;
    /// into `out` (the CPU's `attention::attention`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        enc: &mut Enc<'_>,
        bytes: &[u8],
        ga: &GAttn,
        a: &AttnPlan,
        kv: &(wgpu::Buffer, wgpu::Buffer),
        x: &wgpu::Buffer,
        eps: f32,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let (t, pos0) = (self.t, self.pos0);
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        if nkv == 0 || nh % nkv != 0 {
            return Err(unsupported(format!("{nh} heads over {nkv} KV heads")));
        }
        let (qd, kvd) = (nh * hd, nkv * hd);
        let q = self.scratch("q", t * qd)?;
        let k = self.scratch("k", t * kvd)?;
        let v = self.scratch("v", t * kvd)?;
        self.mm(enc, x, t, &ga.q, &q)?;
        self.mm(enc, x, t, &ga.k, &k)?;
        self.mm(enc, x, t, &ga.v, &v)?;
        if let Some([bq, bk, bv]) = &ga.bias {
            self.ew(enc, 1, bq, &q, t * qd, qd as u32, 0.0);
            self.ew(enc, 1, bk, &k, t * kvd, kvd as u32, 0.0);
            self.ew(enc, 1, bv, &v, t * kvd, kvd as u32, 0.0);
        }
        let (q, k) = match a.qk_norm {
            meo::QkNorm::None => (q, k),
            kind => {
                let (q2, k2) = (self.scratch("q_normed", t * qd)?, self.scratch("k_normed", t * kvd)?);
                let (wq, wk) = match (&ga.q_norm, &ga.k_norm) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(unsupported("q/k norm without weights")),
                };
                let (qw, kw) = if kind == meo::QkNorm::PerHead { (hd, hd) } else { (qd, kvd) };
                self.norm(enc, &q, t * qd / qw, qw, wq, None, eps, 0, &q2);
                self.norm(enc, &k, t * kvd / kw, kw, wk, None, eps, 0, &k2);
                (q2, k2)
            }
        };
        if let Some(clip) = a.clip {
            for (b, n) in [(&q, qd), (&k, kvd), (&v, kvd)] {
                self.ew(enc, 2, self.gpu.dummy(), b, t * n, 0, clip);
            }
        }
        if a.rope && a.rope_dim >= 2 {
            // The first `rope_dim` dimensions of each head (all of it unless partial).
            self.rope(enc, &q, nh, a.rope_dim, qd, hd, 0)?;
            self.rope(enc, &k, nkv, a.rope_dim, kvd, hd, 0)?;
        }
        let row = kvd as u64 * 4;
        enc.copy(&k, 0, &kv.0, pos0 as u64 * row, t as u64 * row);
        enc.copy(&v, 0, &kv.1, pos0 as u64 * row, t as u64 * row);
        // The relative position bias of every (head, key − query) in this call, from the
        // shared table and the CPU's bucket function.
        let rel = match &a.rel_bias {
            Some(rb) => {
                let total = pos0 + t;
                let span = 2 * total - 1;
                let tv = mat_ref(bytes, &rb.table)?;
                let mut table = vec![0.0f32; rb.buckets * nh];
                for (b, r) in table.chunks_mut(nh).enumerate() {
                    tv.row(b, r);
                }
                let mut bias = vec![0.0f32; nh * span];
                for (ri, rel) in (-(total as i64 - 1)..=(total as i64 - 1)).enumerate() {
                    let b = relative_bucket(rel, rb.bidirectional, rb.buckets, rb.max_distance);
                    for head in 0..nh {
                        bias[head * span + ri] = table[b * nh + head];
                    }
                }
                Some(enc.data("rel_bias", bytemuck::cast_slice(&bias)))
            }
            None => None,
        };
        let ctx = self.scratch("ctx", t * qd)?;
        let dims = (nh, nkv, hd, hd);
        self.attn_core(enc, &q, kv, dims, a.window, a.scale, a.causal, ga.sinks.as_ref(), rel.as_ref(), &ctx)?;
        if let Some(g) = &ga.gate {
            // Gated attention output: ctx ⊙ sigmoid(gate · x).
            let gv = self.scratch("attn_gate", t * qd)?;
            self.mm(enc, x, t, g, &gv)?;
            self.ew(enc, 5, &gv, &ctx, t * qd, 1, 0.0);
        }
        self.mm(enc, &ctx, t, &ga.o, out)?;
        if let Some(b) = &ga.o_bias {
            let hsz = ga.o.rows;
            self.ew(enc, 1, b, out, t * hsz, hsz as u32, 0.0);
        }
        Ok(())
    }

    /// The causal depthwise convolution of `self.t` rows of `x` `[t, cd]` continuing from
    /// `hist` (the last `kw − 1` inputs, updated) into `out` (the CPU's
    /// `recurrent::causal_conv`): `w` `[cd, kw]`, an optional bias, SiLU when `silu`.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        enc: &mut Enc<'_>,
        x: &wgpu::Buffer,
        cd: usize,
        kw: usize,
        w: &wgpu::Buffer,
        bias: Option<&wgpu::Buffer>,
        silu: bool,
        hist: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let t = self.t;
        let p = |phase: u32| [cd as u32, kw as u32, t as u32, phase, silu.into(), bias.is_some().into()];
        let b = bias.unwrap_or(w);
        enc.dispatch_1d("conv", &p(0), &[x, w, b, hist, out], t * cd);
        enc.dispatch_1d("conv", &p(1), &[x, w, b, hist, out], cd);
    }

    /// LFM2's gated short convolution on normalised `x`, continuing from `hist` (the last
    /// `kernel − 1` inputs of the convolution, updated) into `out` (the CPU's
    /// `short_conv::short_conv`): `b ⊙ x` through the convolution (no activation), times `c`,
    /// then the output projection.
    fn short_conv(
        &self,
        enc: &mut Enc<'_>,
        gs: &GShortConv,
        kernel: usize,
        hist: &wgpu::Buffer,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let t = self.t;
        let h = gs.out.rows;
        let (b, c, v) =
            (self.scratch("sconv_b", t * h)?, self.scratch("sconv_c", t * h)?, self.scratch("sconv_x", t * h)?);
        self.mm(enc, x, t, &gs.b, &b)?;
        self.mm(enc, x, t, &gs.c, &c)?;
        self.mm(enc, x, t, &gs.x, &v)?;
        self.ew(enc, 9, &v, &b, t * h, 0, 0.0);
        let conv = self.scratch("sconv_conv", t * h)?;
        self.conv(enc, &b, h, kernel, &gs.conv, None, false, hist, &conv);
        self.ew(enc, 9, &conv, &c, t * h, 0, 0.0);
        self.mm(enc, &c, t, &gs.out, out)
    }

    /// A Mamba2 layer on normalised `x`, continuing from `state` (updated) into `out` (the
    /// CPU's `mamba::mamba2`): the z, xBC and dt projections; the causal convolution with its
    /// bias and SiLU (`conv`); the selective scan over the tokens in order (`mamba_step`, one
    /// dispatch); `y ⊙ silu(z)`, RMS-normalised per group; the output projection.
    fn mamba(
        &self,
        enc: &mut Enc<'_>,
        gm: &GMamba,
        p: &Mamba2Plan,
        state: &(wgpu::Buffer, wgpu::Buffer),
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let t = self.t;
        let d = &p.dims;
        let (nh, inner, cd) = (d.num_heads, d.inner(), d.conv_dim());
        let z = self.scratch("mamba_z", t * inner)?;
        let xbc = self.scratch("mamba_xbc", t * cd)?;
        let dt = self.scratch("mamba_dt", t * nh)?;
        self.mm(enc, x, t, &gm.z, &z)?;
        self.mm(enc, x, t, &gm.xbc, &xbc)?;
        self.mm(enc, x, t, &gm.dt, &dt)?;
        let conv = self.scratch("mamba_conv", t * cd)?;
        self.conv(enc, &xbc, cd, d.conv_kernel, &gm.conv, gm.conv_bias.as_ref(), true, &state.0, &conv);
        let y = self.scratch("mamba_y", t * inner)?;
        let params = [nh, d.head_dim, d.state_size, d.n_groups, t, cd].map(|v| v as u32);
        enc.dispatch_1d("mamba_step", &params, &[&conv, &dt, &gm.consts, &state.1, &y], inner);
        // z ← silu(z) · y (the gate before the norm), then the norm per group into y.
        self.ew(enc, 4, &y, &z, t * inner, 0, 0.0);
        let (g, gs) = (d.n_groups, inner / d.n_groups);
        let p5 = [gs as u32, p.eps.to_bits(), 0, 0, 0, g as u32];
        enc.dispatch_rows("norm", &p5, &[&z, &gm.norm, &gm.norm, &y], t * g, 1);
        self.mm(enc, &y, t, &gm.out, out)
    }

    /// A gated DeltaNet layer on normalised `x`, continuing from `state` (updated) into `out`
    /// (the CPU's `delta::delta_net`): projections, the causal convolution (`delta_conv`), the
    /// delta rule over the tokens in order with the gated RMSNorm (`delta_step`), the output
    /// projection. A prompt runs the same per-token recurrence as decoding, in one dispatch.
    fn delta(
        &self,
        enc: &mut Enc<'_>,
        gd: &GDelta,
        p: &DeltaPlan,
        state: &(wgpu::Buffer, wgpu::Buffer),
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let t = self.t;
        let d = &p.dims;
        let (nk, nv, dk, dv, kw) = (d.num_k_heads, d.num_v_heads, d.k_head_dim, d.v_head_dim, d.conv_kernel);
        let (kd, vd, cd) = (nk * dk, nv * dv, d.conv_dim());
        // q, k, v side by side in one row per token: the convolution's channels.
        let qkv = self.scratch("delta_qkv", t * cd)?;
        for (m, off, width, name) in
            [(&gd.q, 0, kd, "delta_q"), (&gd.k, kd, kd, "delta_k"), (&gd.v, 2 * kd, vd, "delta_v")]
        {
            let y = self.scratch(name, t * width)?;
            self.mm(enc, x, t, m, &y)?;
            let cp = [width, 1, t, width, 0, 0, cd, 0, off].map(|v| v as u32);
            enc.dispatch_1d("copy2d", &cp, &[&y, &qkv], width * t);
        }
        let z = self.scratch("delta_z", t * vd)?;
        let b = self.scratch("delta_b", t * nv)?;
        let a = self.scratch("delta_a", t * nv)?;
        self.mm(enc, x, t, &gd.z, &z)?;
        self.mm(enc, x, t, &gd.b, &b)?;
        self.mm(enc, x, t, &gd.a, &a)?;
        let conv = self.scratch("delta_conv", t * cd)?;
        self.conv(enc, &qkv, cd, kw, &gd.conv, None, true, &state.0, &conv);
        let (cdu, tu) = (cd as u32, t as u32);
        let o = self.scratch("delta_o", t * vd)?;
        let scale = 1.0 / (dk as f32).sqrt();
        let params = [nk as u32, nv as u32, dk as u32, dv as u32, tu, cdu, p.eps.to_bits(), scale.to_bits()];
        enc.dispatch("delta_step", &params, &[&conv, &z, &b, &a, &gd.consts, &state.1, &o], [nv as u32, 1, 1]);
        self.mm(enc, &o, t, &gd.out, out)
    }

    /// Multi-head latent attention of one layer on normalised `x` (the CPU's `mla::attention`):
    /// the cache holds the decompressed keys `[H·(nope + rope)]` and values `[H·v]`, as there.
    #[allow(clippy::too_many_arguments)]
    fn mla(
        &self,
        enc: &mut Enc<'_>,
        ga: &GMla,
        a: &MlaPlan,
        kv: &(wgpu::Buffer, wgpu::Buffer),
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<(), TargetError> {
        let (t, pos0) = (self.t, self.pos0);
        let (nh, nope, rd, vd, r) = (a.num_heads, a.nope, a.rope, a.v_dim, a.kv_lora);
        let qk = nope + rd;
        let (kd, vdim) = (nh * qk, nh * vd);
        // Queries.
        let q = self.scratch("q", t * kd)?;
        match &ga.q_a {
            Some((q_a, norm)) => {
                let ql = q_a.rows;
                let lat = self.scratch("q_lat", t * ql)?;
                let latn = self.scratch("q_lat_n", t * ql)?;
                self.mm(enc, x, t, q_a, &lat)?;
                self.norm(enc, &lat, t, ql, norm, None, a.latent_eps, 0, &latn);
                self.mm(enc, &latn, t, &ga.q, &q)?;
            }
            None => self.mm(enc, x, t, &ga.q, &q)?,
        }
        // The latent and the shared rotary key; keys and values decompressed from the latent.
        let kva = self.scratch("kv_a", t * (r + rd))?;
        self.mm(enc, x, t, &ga.kv_a, &kva)?;
        let lat = self.scratch("kv_latent", t * r)?;
        self.norm_strided(enc, &kva, t, r, r + rd, &ga.kv_norm, None, a.latent_eps, 0, &lat, r);
        let kvb = self.scratch("kv_b", t * nh * (nope + vd))?;
        self.mm(enc, &lat, t, &ga.kv_b, &kvb)?;
        // RoPE on each head's q_rot and on the shared k_rot.
        if rd > 0 {
            self.rope(enc, &q, nh, rd, kd, qk, nope)?;
            self.rope(enc, &kva, 1, rd, r + rd, 0, r)?;
        }
        // Keys `[k_nope | k_rot]` and values per head, straight into the cache rows of this call.
        let copy = |enc: &mut Enc<'_>, x: &wgpu::Buffer, y: &wgpu::Buffer, n: usize, xs: [usize; 3], ys: [usize; 3]| {
            let p = [n, nh, t, xs[0], xs[1], xs[2], ys[0], ys[1], ys[2]].map(|v| v as u32);
            enc.dispatch_1d("copy2d", &p, &[x, y], n * nh * t);
        };
        let kvw = nope + vd;
        copy(enc, &kvb, &kv.0, nope, [nh * kvw, kvw, 0], [kd, qk, pos0 * kd]);
        copy(enc, &kva, &kv.0, rd, [r + rd, 0, r], [kd, qk, pos0 * kd + nope]);
        copy(enc, &kvb, &kv.1, vd, [nh * kvw, kvw, nope], [vdim, vd, pos0 * vdim]);
        let ctx = self.scratch("ctx", t * vdim)?;
        self.attn_core(enc, &q, kv, (nh, nh, qk, vd), a.window, a.scale, true, None, None, &ctx)?;
        self.mm(enc, &ctx, t, &ga.o, out)
    }

    /// The routed mixture of one MoE layer into `out` (shared expert not included): routes
    /// every token on the host from the GPU's router logits, reports it, then runs each
    /// selected expert once over its tokens in ascending expert order. Returns the choices.
    #[allow(clippy::too_many_arguments)]
    fn mixture(
        &self,
        enc: &mut Enc<'_>,
        cache: &mut ExpertCache,
        bytes: &[u8],
        p: &MoePlan,
        spec: &meo::RouterSpec,
        layer: usize,
        logits: &[f32],
        sel: Option<&[f32]>,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        trace: &mut dyn Trace,
    ) -> Result<Vec<Choice>, TargetError> {
        let (t, pos0) = (self.t, self.pos0);
        let (e, k) = (spec.num_experts, spec.top_k);
        let h = p.experts.first().map_or(0, |x| x.mlp.down.rows);
        let mut choices = vec![Choice { expert: 0, weight: 0.0 }; t * k];
        let mut rs = RouteScratch::default();
        for (row, ch) in logits.chunks(e).zip(choices.chunks_mut(k)) {
            route_token(spec, row, sel, &mut rs, ch);
        }
        let mut dropped = vec![false; t * k];
        apply_capacity(spec, &mut choices, &mut dropped, &mut Vec::new());
        for (i, ch) in choices.chunks(k).enumerate() {
            trace.on_route(layer, pos0 + i, ch);
        }
        // Tokens per expert, in token order.
        let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e];
        for (i, (c, &d)) in choices.iter().zip(&dropped).enumerate() {
            if !d && let Some(g) = groups.get_mut(c.expert as usize) {
                g.push(((i / k) as u32, c.weight));
            }
        }
        let selected: Vec<u32> = (0..e).filter(|&i| !groups[i].is_empty()).map(|i| i as u32).collect();
        trace.on_experts_selected(layer, &selected);
        enc.clear(out, t as u64 * h as u64 * 4);
        for &ei in &selected {
            let g = &groups[ei as usize];
            let n = g.len();
            let mut iw: Vec<u32> = g.iter().map(|p| p.0).collect();
            iw.extend(g.iter().map(|p| p.1.to_bits()));
            let iwb = enc.data("routes", bytemuck::cast_slice(&iw));
            let plan = p.experts.get(ei as usize).ok_or_else(|| unsupported("router selects a missing expert"))?;
            let res = cache.get(self.gpu, bytes, layer, ei as usize, plan)?;
            let Resident::Mlp(ex) = &*res else { return Err(unsupported("a routed expert cached as a bank expert")) };
            let xs = self.scratch("expert_in", n * h)?;
            let ys = self.scratch("expert_out", n * h)?;
            enc.dispatch_1d("gather", &[h as u32, n as u32], &[&iwb, x, &xs], n * h);
            self.mlp(enc, ex, &xs, n, &ys)?;
            enc.dispatch_1d("scatter", &[h as u32, n as u32], &[&iwb, &ys, out], n * h);
        }
        Ok(choices)
    }
}

impl Target for WgpuTarget<'_> {
    fn name(&self) -> &str {
        NAME
    }

    fn describe(&self) -> String {
        let i = &self.gpu.info;
        format!(
            "wgpu, {} ({:?}, {:?}), int8 dot: {}",
            i.name,
            i.backend,
            i.device_type,
            if self.gpu.packed_dot { "dot4I8Packed" } else { "portable" }
        )
    }

    fn forward(&mut self, tokens: &[u32], which: Logits, trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        if self.model.config().recipe.encoder_only {
            return Err(ForwardError::EncoderOnly.into());
        }
        let vocab = self.model.config().vocab_size;
        if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &tok)| tok as usize >= vocab) {
            return Err(ForwardError::TokenOutOfRange { index, token, vocab }.into());
        }
        let t = tokens.len();
        if self.pos.checked_add(t).is_none_or(|end| end > self.max_context) {
            return Err(ForwardError::ContextOverflow { cached: self.pos, tokens: t, max: self.max_context }.into());
        }
        self.logits.clear();
        if t == 0 {
            return Ok(&self.logits);
        }
        self.forward_inner(tokens, Some(which), trace)?;
        self.gpu.check().map_err(dev)?;
        self.pos += t;
        Ok(&self.logits)
    }

    fn reset(&mut self) {
        self.reset_inner();
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, TargetError> {
        self.set_mode_inner(opts)
    }

    fn encode(&mut self, tokens: &[u32], trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        let vocab = self.model.config().vocab_size;
        if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &tok)| tok as usize >= vocab) {
            return Err(ForwardError::TokenOutOfRange { index, token, vocab }.into());
        }
        let t = tokens.len();
        if t > self.max_context {
            return Err(ForwardError::ContextOverflow { cached: 0, tokens: t, max: self.max_context }.into());
        }
        // A whole new sequence, as the CPU's `Session::encode`.
        self.reset_inner();
        self.logits.clear();
        if t == 0 {
            return Ok(&self.logits);
        }
        self.forward_inner(tokens, None, trace)?;
        self.gpu.check().map_err(dev)?;
        self.pos = t;
        Ok(&self.logits)
    }
}

/// Whether this target has kernels for token mixer `m` (one pattern per kind; any other kind is
/// refused by name, never run wrongly).
pub fn runs_mixer(m: meo::Mixer) -> bool {
    matches!(m, meo::Mixer::Attention | meo::Mixer::GatedDeltaNet | meo::Mixer::Mamba2 | meo::Mixer::ShortConv)
}

/// Floats of a recurrent layer's GPU state: the convolution's last `kernel − 1` inputs and
/// the recurrence's own state (none for a short convolution); `None` for attention.
fn state_floats(a: &Attention) -> Option<(usize, usize)> {
    match a {
        Attention::GatedDeltaNet(p) => {
            let d = &p.dims;
            Some((d.conv_kernel.saturating_sub(1) * d.conv_dim(), d.num_v_heads * d.k_head_dim * d.v_head_dim))
        }
        Attention::Mamba2(p) => {
            let d = &p.dims;
            Some((d.conv_kernel.saturating_sub(1) * d.conv_dim(), d.inner() * d.state_size))
        }
        Attention::ShortConv(p) => Some((p.kernel.saturating_sub(1) * p.conv.rows, 0)),
        Attention::Gqa(_) | Attention::Mla(_) => None,
    }
}

/// Whether `model` has only layer kinds this target runs.
pub fn supports(model: &Model) -> Result<(), TargetError> {
    for (l, lp) in model.layer_plans().iter().enumerate() {
        let mixer = lp.attn.mixer();
        if !runs_mixer(mixer) {
            return Err(TargetError::UnsupportedMixer { target: NAME.into(), layer: l, mixer });
        }
    }
    // Attention and routing variants without shaders yet (Llama-4, Hunyuan-MoE).
    if let Some(key) = model.config().cpu_only_variant() {
        return Err(unsupported(format!("{key} (the cpu target runs it)")));
    }
    for (l, k) in model.config().layer_ffn.iter().enumerate() {
        match k {
            FfnKind::Dense | FfnKind::Moe | FfnKind::MeoBank => {}
            #[allow(unreachable_patterns)]
            other => return Err(unsupported(format!("layer {l}: feed-forward kind {other:?}"))),
        }
    }
    Ok(())
}
