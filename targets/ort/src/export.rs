//! ONNX export of a `.meo` model: one static graph per routing mode, built from the model's
//! layer recipes ([`meo::model::plan`]), never from a family name.
//!
//! - **Task-merged** (`task: Some(name)`): every MoE layer the task stores runs its merged
//!   expert as a dense SiLU-gated MLP (plus the shared expert): a dense decoder of
//!   single-expert cost, the form an NPU compiles. MEO-native layers run their stored task
//!   banks (token block + merged linear).
//! - **Vanilla** (`task: None`, or MoE layers the task does not store): routing in the graph
//!   (router → scores → TopK → weights), every expert computed as a subgraph and weighted by a
//!   dense `[T, E]` matrix that is zero for unselected experts. Exact, E× the compute: for
//!   validation and for EPs that cannot gather weights dynamically. The chosen experts and
//!   weights are graph outputs (`route.L.experts`, `route.L.weights`).
//!
//! Graph interface (batch 1): input `input_ids` int64 `[seq]`; per layer `past_key.L`,
//! `past_value.L` f32 `[kv_heads, past, head_dim]`; outputs `logits` f32 `[seq, vocab]`,
//! `present_key.L`, `present_value.L` `[kv_heads, past + seq, head_dim]`. Positions start at
//! `past`. Opset 17, standard domain only (but `com.microsoft` `MatMulNBits` for `q4_0`
//! matrices in [`WeightFormat::Block`]).
//!
//! int8 matrices (`q8_0` in the file) are written as `DequantizeLinear` with per-axis scales,
//! 4-bit ones (`q4_0`, `mxfp4`) as `MatMulNBits` or their planes decoded in the graph
//! ([`WeightFormat`]); other matrices as f32.

use meo::config::{Activation, GroupScore, NormKind, QkNorm, Scoring, SharedGate};
use meo::kernels::MatRef;
use meo::model::plan::{
    Attention, AttnPlan, Bank, BankExpert, DeltaPlan, FfnPlan, Mamba2Plan, Mat, MlaPlan, Mlp, MoePlan, ShortConvPlan,
    Vector,
};
use meo::{DType, ExecPlan, LayerExec, MergeOptions, Mode, Model};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::tensor_shape_proto::{Dimension, dimension};
use onnx_protobuf::type_proto::{Tensor as TypeTensor, Value as TypeValue};
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::BTreeMap;
use std::path::Path;

/// The opset of every exported graph.
pub const OPSET: i64 = 17;
/// ONNX Runtime's contrib domain (`MatMulNBits`, for `q4_0` matrices in [`WeightFormat::Block`]).
pub const MS_DOMAIN: &str = "com.microsoft";
/// The IR version written (ONNX 1.13+, ORT 1.14+, tract 0.23).
pub const IR_VERSION: i64 = 8;
/// Above this many bytes of weights, [`write`] puts them in an external-data file (protobuf
/// messages are limited to 2 GiB).
pub const EXTERNAL_DATA_THRESHOLD: usize = 1 << 30;

/// How block-quantised matrices (`q8_0`, `q4_0`, `mxfp4` in the file) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Exact, the file's blocks of 32 kept:
    /// - `q8_0`: int8 `[rows · blocks, 32]` with one scale per block, `DequantizeLinear(axis = 0)`
    ///   then `Reshape` to `[rows, cols]`;
    /// - `q4_0`: `com.microsoft` `MatMulNBits` (`bits = 4`, `block_size = 32`, no zero-point
    ///   input, so ORT's default 8): its packing is the file's code plane byte for byte (value
    ///   `2j` in the low nibble of byte `j`), the f16 scales widened to f32;
    /// - `mxfp4`: the code plane as stored (uint8 `[rows · blocks, 16]`) and the E8M0 scale bytes,
    ///   decoded in the graph with standard ops (nibbles by `Mod`/`Div`, values and scales by
    ///   `Gather` from a 16- and a 256-entry table): MXFP4's values are not on `MatMulNBits`'s
    ///   affine grid.
    ///
    /// The graph multiplies these exact weights by f32 activations (the CPU target quantises
    /// activations to int8 per block).
    #[default]
    Block,
    /// Requantised to one symmetric int8 scale per output row, `DequantizeLinear(axis = 0)`
    /// straight into the `Gemm`: the QDQ weight pattern NPU EPs (QNN HTP, NNAPI) fold into int8
    /// kernels. Adds a second rounding (within one int8 step of the block values); 4-bit
    /// matrices take the same form (their values fit int8 per row only approximately).
    Channel,
    /// Dequantised to f32 initializers (4× the int8 size, 8× the 4-bit size; for EPs that take
    /// no `DequantizeLinear`).
    F32,
}

impl WeightFormat {
    /// Parses `block` | `channel` | `f32`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "block" => Self::Block,
            "channel" => Self::Channel,
            "f32" => Self::F32,
            _ => return None,
        })
    }
}

/// A fixed-shape graph (for NPU EPs, which compile static shapes only): every call takes
/// exactly `seq` tokens (pad the last chunk; padded rows' outputs are ignored) and the KV cache
/// is `context` slots, written in place. See [`export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticShape {
    pub seq: usize,
    pub context: usize,
}

impl StaticShape {
    /// Parses `SEQ:CONTEXT` (`1:256` a decode graph, `32:256` a prompt-chunk graph).
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once(':')?;
        let (seq, context) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        (seq > 0 && context > 0).then_some(Self { seq, context })
    }
}

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Routing mode and layers: `Vanilla`, or `Task(name)` with `All` or listed layers.
    pub merge: MergeOptions,
    pub weights: WeightFormat,
    /// `None`: dynamic `seq`/`past` dimensions; `Some`: the fixed-shape form.
    pub static_shape: Option<StaticShape>,
}

impl ExportOptions {
    /// Task-merged export of task `name`, every stored layer.
    pub fn task(name: &str) -> Self {
        Self { merge: MergeOptions { mode: Mode::Task(name.into()), ..Default::default() }, ..Default::default() }
    }
}

/// Why a model could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A recipe feature or mode the exporter does not write yet (names it).
    #[error("unsupported in export: {0}")]
    Unsupported(String),
    /// A layer's token mixer the exporter does not write yet (a recurrent layer type).
    #[error("unsupported in export: layer {layer}: the {} mixer (the cpu target runs it)", mixer.name())]
    UnsupportedMixer { layer: usize, mixer: meo::Mixer },
    /// The mode names a task or layer the file does not have.
    #[error(transparent)]
    Mode(#[from] meo::ModeError),
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("encoding the ONNX protobuf: {0}")]
    Encode(String),
}

/// What one layer carries from call to call: graph inputs `past_*.L`, outputs `present_*.L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerState {
    /// A KV cache: `past_key.L`, `past_value.L` `[kv_heads, past, width]` (see [`GraphInfo`]).
    Kv,
    /// A recurrent layer's fixed-size state, zeros before the first token: `past_conv.L`
    /// `[conv_kernel − 1, channels]` (its causal convolution's last inputs, oldest first) and,
    /// for a mixer with a recurrence of its own, `past_state.L` (gated DeltaNet: the delta
    /// rule's `[v_heads, k_dim, v_dim]`; Mamba2: the SSM state `[heads, head_dim, N]`). A short
    /// convolution has no `past_state`.
    Recurrent { conv: [usize; 2], state: Option<[usize; 3]> },
}

/// The graph's interface, as a runtime needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphInfo {
    pub num_layers: usize,
    /// Per layer: its cache or recurrent state (empty for an encoder).
    pub layers: Vec<LayerState>,
    /// Heads of the KV cache (`num_heads` for MLA, whose cache holds decompressed keys).
    pub kv_heads: usize,
    /// Width of a cached key per head.
    pub head_dim: usize,
    /// Width of a cached value per head (`head_dim` except for MLA).
    pub value_dim: usize,
    pub vocab: usize,
    /// MoE layers routed in the graph (with `route.L.*` outputs), ascending.
    pub routed: Vec<usize>,
    pub top_k: usize,
    /// Layers running a stored task merge, ascending.
    pub merged: Vec<usize>,
    /// Maximum positions (past + seq); 0 = unbounded.
    pub max_positions: usize,
    /// The fixed-shape form: `seq` tokens per call, `context` cache slots, an int64 `[1]`
    /// input [`POSITION_INPUT`] (positions already cached), caches `[kv_heads, context, d]`.
    pub static_shape: Option<StaticShape>,
    /// An encoder graph (`Some(hidden size)`): `input_ids` → [`ENCODER_OUTPUT`] `[seq, hidden]`
    /// and the route outputs, no cache, no logits; the whole sequence in one call.
    pub encoder: Option<usize>,
}

impl GraphInfo {
    /// An empty KV cache for this graph, `(keys, values)` per layer: zeros over every slot in
    /// the fixed-shape form, empty otherwise (and no layers for an encoder).
    /// A recurrent layer's pair is its zero state (`past_conv.L`, `past_state.L`; the second
    /// empty for a layer without `past_state`).
    pub fn empty_cache(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        if self.encoder.is_some() {
            return Vec::new();
        }
        let slots = self.static_shape.map_or(0, |s| s.context) * self.kv_heads;
        self.layers
            .iter()
            .map(|s| match s {
                LayerState::Kv => (vec![0.0; slots * self.head_dim], vec![0.0; slots * self.value_dim]),
                LayerState::Recurrent { conv, state } => {
                    (vec![0.0; conv.iter().product()], vec![0.0; state.map_or(0, |s| s.iter().product())])
                }
            })
            .collect()
    }

    /// Layer `l`'s `past_*` inputs (two, or one for a recurrent layer without `past_state`) and
    /// their shapes, the cache holding `slots` positions; the same order as
    /// [`empty_cache`](Self::empty_cache)'s pair.
    pub fn past(&self, l: usize, slots: usize) -> Vec<(String, Vec<usize>)> {
        match self.layers.get(l) {
            Some(LayerState::Recurrent { conv, state }) => {
                let mut v = vec![(Self::past_conv(l), conv.to_vec())];
                v.extend(state.map(|s| (Self::past_state(l), s.to_vec())));
                v
            }
            _ => vec![
                (Self::past_key(l), vec![self.kv_heads, slots, self.head_dim]),
                (Self::past_value(l), vec![self.kv_heads, slots, self.value_dim]),
            ],
        }
    }

    /// Layer `l`'s `present_*` outputs (the same names and order as [`past`](Self::past)'s).
    pub fn present(&self, l: usize) -> Vec<String> {
        match self.layers.get(l) {
            Some(LayerState::Recurrent { state, .. }) => {
                let mut v = vec![Self::present_conv(l)];
                v.extend(state.map(|_| Self::present_state(l)));
                v
            }
            _ => vec![Self::present_key(l), Self::present_value(l)],
        }
    }

    pub fn past_key(l: usize) -> String {
        format!("past_key.{l}")
    }
    pub fn past_value(l: usize) -> String {
        format!("past_value.{l}")
    }
    pub fn present_key(l: usize) -> String {
        format!("present_key.{l}")
    }
    pub fn present_value(l: usize) -> String {
        format!("present_value.{l}")
    }
    pub fn past_conv(l: usize) -> String {
        format!("past_conv.{l}")
    }
    pub fn past_state(l: usize) -> String {
        format!("past_state.{l}")
    }
    pub fn present_conv(l: usize) -> String {
        format!("present_conv.{l}")
    }
    pub fn present_state(l: usize) -> String {
        format!("present_state.{l}")
    }
    pub fn route_experts(l: usize) -> String {
        format!("route.{l}.experts")
    }
    pub fn route_weights(l: usize) -> String {
        format!("route.{l}.weights")
    }
}

/// An exported graph.
#[derive(Debug, Clone)]
pub struct Exported {
    pub model: ModelProto,
    pub info: GraphInfo,
}

impl Exported {
    /// The model as one protobuf message (weights inline).
    ///
    /// # Errors
    /// The message exceeds protobuf's 2 GiB limit (use [`write`] with external data).
    pub fn to_bytes(&self) -> Result<Vec<u8>, ExportError> {
        self.model.write_to_bytes().map_err(|e| ExportError::Encode(e.to_string()))
    }
}

/// Writes `e` to `path`; with `external` (or when the weights exceed
/// [`EXTERNAL_DATA_THRESHOLD`]) the large initializers go to `<path>.data` beside it, referenced
/// by relative location as the ONNX external-data convention says. Returns whether external
/// data was written.
///
/// # Errors
/// An I/O error, or an encoding error.
pub fn write(e: &Exported, path: &Path, external: bool) -> Result<bool, ExportError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| ExportError::Io { path: p, source }
    };
    let weight_bytes: usize = e.model.graph.initializer.iter().map(|t| t.raw_data.len()).sum();
    let external = external || weight_bytes > EXTERNAL_DATA_THRESHOLD;
    let mut model = e.model.clone();
    if external {
        let data_path = path.with_file_name(format!(
            "{}.data",
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.onnx".into())
        ));
        let location = data_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut data = Vec::new();
        for t in model.graph.as_mut().map(|g| &mut g.initializer).into_iter().flatten() {
            if t.raw_data.len() < 1024 {
                continue;
            }
            // 4 KiB-aligned offsets let a runtime map each tensor (as onnx's own writer does).
            data.resize(data.len().next_multiple_of(4096), 0);
            let offset = data.len();
            data.extend_from_slice(&t.raw_data);
            let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v, ..Default::default() };
            t.external_data = vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", t.raw_data.len().to_string()),
            ];
            t.data_location = DataLocation::EXTERNAL.into();
            t.raw_data = Vec::new();
        }
        std::fs::write(&data_path, &data).map_err(io(&data_path))?;
    }
    let bytes = model.write_to_bytes().map_err(|e| ExportError::Encode(e.to_string()))?;
    std::fs::write(path, bytes).map_err(io(path))?;
    Ok(external)
}

/// Exports `model` in the mode `opts` names.
///
/// # Errors
/// An unknown task or layer, or a recipe feature the exporter does not write yet.
pub fn export(model: &Model, opts: &ExportOptions) -> Result<Exported, ExportError> {
    let c = model.config();
    // Per layer: a KV cache, or a recurrent state; a mixer with no graph here is refused by name.
    let mut states = Vec::with_capacity(c.num_layers);
    for (layer, lp) in model.layer_plans().iter().enumerate() {
        states.push(match &lp.attn {
            Attention::Gqa(_) | Attention::Mla(_) => LayerState::Kv,
            Attention::GatedDeltaNet(p) => {
                let d = &p.dims;
                let conv = [d.conv_kernel.saturating_sub(1), d.conv_dim()];
                LayerState::Recurrent { conv, state: Some([d.num_v_heads, d.k_head_dim, d.v_head_dim]) }
            }
            Attention::Mamba2(p) => {
                let d = &p.dims;
                let conv = [d.conv_kernel.saturating_sub(1), d.conv_dim()];
                LayerState::Recurrent { conv, state: Some([d.num_heads, d.head_dim, d.state_size]) }
            }
            Attention::ShortConv(p) => {
                LayerState::Recurrent { conv: [p.kernel.saturating_sub(1), p.conv.rows], state: None }
            }
            #[allow(unreachable_patterns)]
            _ => return Err(ExportError::UnsupportedMixer { layer, mixer: lp.attn.mixer() }),
        });
    }
    let first_kv = states.iter().position(|s| *s == LayerState::Kv);
    if states.iter().any(|s| *s != LayerState::Kv) {
        if opts.static_shape.is_some() {
            return Err(ExportError::Unsupported(
                "a fixed-shape export of a recurrent mixer (the padding would enter its state)".into(),
            ));
        }
        if first_kv.is_none() {
            return Err(ExportError::Unsupported(
                "a model without attention layers (positions are read from a KV cache input)".into(),
            ));
        }
    }
    // Attention and routing variants without a graph yet (Llama-4, Hunyuan-MoE).
    if let Some(key) = c.cpu_only_variant() {
        return Err(ExportError::Unsupported(format!("{key} (the cpu target runs it)")));
    }
    let merged = merged_layers(model, &opts.merge)?;
    let mut g = Builder { model: Some(model), bytes: model.bytes(), weights: opts.weights, ..Default::default() };
    let vocab = c.vocab_size;
    let (nkv, kd, vd) = cache_dims(model)?;
    let eps = c.rms_norm_eps;
    let kind = c.recipe.norm;
    let gp = model.global_plans();
    let r = &c.recipe;
    let fixed = opts.static_shape;
    if let Some(s) = fixed
        && (s.seq == 0 || s.context == 0)
    {
        return Err(ExportError::Unsupported(format!("static shape {}:{} (both must be ≥ 1)", s.seq, s.context)));
    }
    // An encoder (bidirectional, no KV cache, no LM head): `input_ids` → `hidden` in one call.
    let encoder = r.encoder_only;
    if encoder && fixed.is_some() {
        return Err(ExportError::Unsupported(
            "a fixed-shape encoder (padding would join the bidirectional attention and the expert capacity)".into(),
        ));
    }

    // Inputs and positions: `positions` [T] (absolute), `keys` [S] (key slots).
    let (seq_dim, past_dim) = match fixed {
        Some(s) => (Dim::Fixed(s.seq), Dim::Fixed(s.context)),
        None => (Dim::Sym("seq"), Dim::Sym("past")),
    };
    g.input("input_ids", DataType::INT64, std::slice::from_ref(&seq_dim));
    if fixed.is_some() {
        g.input(POSITION_INPUT, DataType::INT64, &[Dim::Fixed(1)]);
    }
    for (l, st) in states.iter().enumerate().filter(|_| !encoder) {
        match *st {
            LayerState::Kv => {
                let (k, v) = (GraphInfo::past_key(l), GraphInfo::past_value(l));
                g.input(&k, DataType::FLOAT, &[Dim::Fixed(nkv), past_dim.clone(), Dim::Fixed(kd)]);
                g.input(&v, DataType::FLOAT, &[Dim::Fixed(nkv), past_dim.clone(), Dim::Fixed(vd)]);
            }
            LayerState::Recurrent { conv, state } => {
                g.input(&GraphInfo::past_conv(l), DataType::FLOAT, &conv.map(Dim::Fixed));
                if let Some(state) = state {
                    g.input(&GraphInfo::past_state(l), DataType::FLOAT, &state.map(Dim::Fixed));
                }
            }
        }
    }
    let one = g.const_i64("one", &[], &[1]);
    let zero = g.const_i64("zero", &[], &[0]);
    let (positions, keys) = match fixed {
        Some(s) => {
            // Fixed shapes: positions `position + 0..T`, keys the `context` cache slots.
            let ar: Vec<i64> = (0..s.seq as i64).collect();
            let ar = g.const_i64(&format!("arange.{}", s.seq), &[s.seq], &ar);
            let positions = g.op("Add", &[&ar, POSITION_INPUT], &[]);
            let kr: Vec<i64> = (0..s.context as i64).collect();
            (positions, g.const_i64(&format!("arange.{}", s.context), &[s.context], &kr))
        }
        None if encoder => {
            let seq_shape = g.op("Shape", &["input_ids"], &[]);
            let seq = g.op("Gather", &[&seq_shape, &zero], &[int("axis", 0)]);
            let positions = g.op("Range", &[&zero, &seq, &one], &[]);
            (positions.clone(), positions)
        }
        None => {
            let seq_shape = g.op("Shape", &["input_ids"], &[]);
            let seq = g.op("Gather", &[&seq_shape, &zero], &[int("axis", 0)]);
            let past_shape = g.op("Shape", &[&GraphInfo::past_key(first_kv.unwrap_or(0))], &[]);
            let past = g.op("Gather", &[&past_shape, &one], &[int("axis", 0)]);
            let total = g.op("Add", &[&past, &seq], &[]);
            (g.op("Range", &[&past, &total, &one], &[]), g.op("Range", &[&zero, &total, &one], &[]))
        }
    };
    let axes1 = g.const_i64("axes1", &[1], &[1]);
    let axes0 = g.const_i64("axes0", &[1], &[0]);
    let qpos = g.op("Unsqueeze", &[&positions, &axes1], &[]); // [T, 1]
    let kpos = g.op("Unsqueeze", &[&keys, &axes0], &[]); // [1, S]
    // Static form: the new keys and values are written into their cache slots by a one-hot
    // `[S, T]` matrix (MatMul, no scatter: every NPU EP takes it); `keep` `[S, 1]` zeroes the
    // slots they replace. Tokens past the last slot are dropped.
    let cache_write = fixed.map(|_| {
        let eq = g.op("Equal", &[&qpos, &kpos], &[]); // [T, S]
        let eq = g.op("Transpose", &[&eq], &[ints("perm", &[1, 0])]);
        let onehot = g.op("Cast", &[&eq], &[int("to", DataType::FLOAT as i64)]); // [S, T]
        let written = g.op("ReduceSum", &[&onehot, &axes1], &[int("keepdims", 1)]);
        let onef = g.const_f32("onef", &[], &[1.0]);
        let keep = g.op("Sub", &[&onef, &written], &[]);
        CacheWrite { onehot, keep }
    });

    // Embedding (× multiplier, + learned positions).
    let embed = g.matrix("embed", gp.embed)?;
    let mut x = g.op("Gather", &[&embed, "input_ids"], &[int("axis", 0)]);
    if r.embedding_multiplier != 1.0 {
        let m = g.const_f32("embedding_multiplier", &[], &[r.embedding_multiplier]);
        x = g.op("Mul", &[&x, &m], &[]);
    }
    if let Some(pe) = gp.pos_embed {
        let rows = pe.rows;
        let pe = g.matrix("pos_embed", pe)?;
        let pos = if fixed.is_some() {
            // Padded rows may sit past the table's end: clamp them (real rows never are: the
            // runners refuse more positions than the model has).
            let last = g.const_i64(&format!("pos_embed.last.{rows}"), &[], &[rows.saturating_sub(1) as i64]);
            g.op("Min", &[&positions, &last], &[])
        } else {
            positions.clone()
        };
        let p = g.op("Gather", &[&pe, &pos], &[int("axis", 0)]);
        x = g.op("Add", &[&x, &p], &[]);
    }

    // RoPE tables, one per rotated width, shared by every layer.
    let rope = &gp.rope;
    let mut tables: BTreeMap<usize, RopeTables> = BTreeMap::new();
    for plan in model.layer_plans() {
        let dim = match &plan.attn {
            Attention::Gqa(a) if a.rope => a.rope_dim,
            Attention::Mla(a) => a.rope,
            // No RoPE: attention without it, recurrent mixers.
            _ => continue,
        };
        if tables.contains_key(&dim) {
            continue;
        }
        if dim % 2 != 0 || rope.inv_freq.len() < dim / 2 {
            return Err(ExportError::Unsupported(format!(
                "RoPE over {dim} dimensions with {} frequencies",
                rope.inv_freq.len()
            )));
        }
        let half = dim / 2;
        let inv = g.const_f32(&format!("rope.inv_freq.{dim}"), &[1, half], &rope.inv_freq[..half]);
        let pf = g.op("Cast", &[&positions], &[int("to", DataType::FLOAT as i64)]);
        let pf = g.op("Unsqueeze", &[&pf, &axes1], &[]);
        let ang = g.op("Mul", &[&pf, &inv], &[]); // [T, d/2]
        let (mut cos, mut sin) = (g.op("Cos", &[&ang], &[]), g.op("Sin", &[&ang], &[]));
        if rope.attention_factor != 1.0 {
            let f = g.const_f32("rope.attention_factor", &[], &[rope.attention_factor]);
            cos = g.op("Mul", &[&cos, &f], &[]);
            sin = g.op("Mul", &[&sin, &f], &[]);
        }
        let t = if rope.interleave {
            // Pairs (2i, 2i+1): tables `[T, 1, d/2, 1]` against x viewed as `[T, H, d/2, 2]`.
            let s = g.shape(&format!("shape.rope.pairs.{half}"), &[-1, 1, half as i64, 1]);
            RopeTables {
                cos: g.op("Reshape", &[&cos, &s], &[]),
                sin: g.op("Reshape", &[&sin, &s], &[]),
                dim,
                pairs: true,
            }
        } else {
            // Halves (i, i + d/2): tables `[T, 1, d]`, each half repeated.
            let cos = g.op("Concat", &[&cos, &cos], &[int("axis", 1)]);
            let sin = g.op("Concat", &[&sin, &sin], &[int("axis", 1)]);
            let (cos, sin) = (g.op("Unsqueeze", &[&cos, &axes1], &[]), g.op("Unsqueeze", &[&sin, &axes1], &[]));
            RopeTables { cos, sin, dim, pairs: false }
        };
        tables.insert(dim, t);
    }

    // Causal masks `[T, S]` (0 or -1e30), one per window size.
    let mut masks: BTreeMap<usize, String> = BTreeMap::new();
    let neg = g.const_f32("mask.neg", &[], &[-1e30]);
    let zf = g.const_f32("mask.zero", &[], &[0.0]);
    for plan in model.layer_plans().iter().filter(|_| !encoder) {
        let w = window(&plan.attn);
        if masks.contains_key(&w) {
            continue;
        }
        let mut allowed = g.op("LessOrEqual", &[&kpos, &qpos], &[]);
        if w > 0 {
            let wc = g.const_i64(&format!("mask.window.{w}"), &[], &[w as i64]);
            let lo = g.op("Sub", &[&qpos, &wc], &[]);
            let after = g.op("Greater", &[&kpos, &lo], &[]);
            allowed = g.op("And", &[&allowed, &after], &[]);
        }
        let m = g.op("Where", &[&allowed, &zf, &neg], &[]);
        masks.insert(w, m);
    }

    // Relative position bias `[kv, g, T, S]` (T5/Switch), shared by the layers that have it:
    // `table[bucket(key − query), head]`, the buckets looked up in a constant table computed
    // by the CPU target's own `relative_bucket` (distances beyond `max_distance` all share
    // the last bucket, so relative positions are clamped to ±(max_distance + 1)).
    let rel_bias = match model.layer_plans().iter().find_map(|p| match &p.attn {
        Attention::Gqa(a) => a.rel_bias.as_ref().map(|rb| (rb, a)),
        _ => None,
    }) {
        Some((rb, a)) => Some(g.relative_bias(rb, a, &qpos, &kpos)?),
        None => None,
    };
    let residual = |g: &mut Builder<'_>, x: &str, y: &str| {
        if r.residual_multiplier != 1.0 {
            let m = g.const_f32("residual_multiplier", &[], &[r.residual_multiplier]);
            let y = g.op("Mul", &[y, &m], &[]);
            g.op("Add", &[x, &y], &[])
        } else {
            g.op("Add", &[x, y], &[])
        }
    };
    let mut routed = Vec::new();
    for (l, plan) in model.layer_plans().iter().enumerate() {
        let p = format!("layers.{l}");
        let hn = g.norm(&format!("{p}.attn_norm"), &x, plan.attn.norm(), plan.attn.norm_bias(), kind, eps)?;
        let ctx = AttnCtx {
            tables: &tables,
            mask: masks.get(&window(&plan.attn)).map(String::as_str),
            cache: match (&cache_write, encoder) {
                (_, true) => Cache::None,
                (Some(w), false) => Cache::Write(w),
                (None, false) => Cache::Concat,
            },
            bias: rel_bias.as_deref(),
        };
        let y = match &plan.attn {
            Attention::Gqa(a) => g.attention(l, a, &hn, &ctx, eps)?,
            Attention::Mla(a) => g.mla(l, a, &hn, &ctx)?,
            Attention::GatedDeltaNet(d) => g.delta_net(l, d, &hn)?,
            Attention::ShortConv(sc) => g.short_conv(l, sc, &hn)?,
            Attention::Mamba2(m) => g.mamba2(l, m, &hn)?,
            #[allow(unreachable_patterns)]
            _ => return Err(ExportError::UnsupportedMixer { layer: l, mixer: plan.attn.mixer() }),
        };
        x = residual(&mut g, &x, &y);
        let hn = g.norm(&format!("{p}.ffn_norm"), &x, &plan.ffn_norm, plan.ffn_norm_bias.as_ref(), kind, eps)?;
        let y = match &plan.ffn {
            FfnPlan::Dense(m) => g.mlp(&format!("{p}.ffn"), &hn, m, model.bytes())?,
            FfnPlan::Moe(moe) => {
                let out = match merged.get(&l) {
                    Some(Merged::Moe(ex)) => g.mlp(&format!("{p}.merged"), &hn, &ex.mlp, &g.bytes[ex.slab.clone()])?,
                    _ => {
                        routed.push(l);
                        g.routed(l, moe, &hn)?
                    }
                };
                g.shared(l, moe, &hn, out)?
            }
            FfnPlan::Meo(meo) => match merged.get(&l) {
                Some(Merged::Meo(banks)) => g.meo(l, &meo.banks, banks, &hn, c.recipe.ffn_activation)?,
                // `merged_layers` refuses every other execution of an MEO-native layer.
                _ => return Err(ExportError::Unsupported(format!("MEO-native layer {l} without a task merge"))),
            },
        };
        x = residual(&mut g, &x, &y);
    }
    let hn = g.norm("output_norm", &x, gp.output_norm, gp.output_norm_bias, kind, eps)?;
    // Route outputs come last in both graph kinds (runtimes read them by position).
    let k = c.router.top_k;
    let route_outputs = |g: &mut Builder<'_>| {
        for &l in &routed {
            g.output(&GraphInfo::route_experts(l), DataType::INT64, &[seq_dim.clone(), Dim::Fixed(k)]);
            g.output(&GraphInfo::route_weights(l), DataType::FLOAT, &[seq_dim.clone(), Dim::Fixed(k)]);
        }
    };
    let info = |static_shape, encoder: Option<usize>| GraphInfo {
        num_layers: c.num_layers,
        layers: if encoder.is_some() { Vec::new() } else { states.clone() },
        kv_heads: nkv,
        head_dim: kd,
        value_dim: vd,
        vocab,
        routed: routed.clone(),
        top_k: k,
        merged: merged.keys().copied().collect(),
        max_positions: c.max_position_embeddings,
        static_shape,
        encoder,
    };
    if encoder {
        g.rename(&hn, ENCODER_OUTPUT);
        g.output(ENCODER_OUTPUT, DataType::FLOAT, &[seq_dim.clone(), Dim::Fixed(c.hidden_size)]);
        route_outputs(&mut g);
        let info = info(None, Some(c.hidden_size));
        let doc = format!("meo export: encoder (`input_ids` → `{ENCODER_OUTPUT}`), merged layers {:?}", info.merged);
        return Ok(Exported { model: g.finish(&c.architecture, doc), info });
    }
    let head = if c.tie_word_embeddings { embed } else { g.matrix("output", gp.output)? };
    let out_bias = gp.output_bias.map(|b| g.vector("output.bias", b));
    let mut logits = g.gemm(&hn, &head, out_bias.as_deref());
    if r.logits_scaling != 1.0 {
        // Divided, as the CPU target and transformers do.
        let s = g.const_f32("logits_scaling", &[], &[r.logits_scaling]);
        logits = g.op("Div", &[&logits, &s], &[]);
    }
    g.rename(&logits, "logits");
    g.output("logits", DataType::FLOAT, &[seq_dim.clone(), Dim::Fixed(vocab)]);
    let total_dim = if fixed.is_some() { past_dim.clone() } else { Dim::Sym("total") };
    for (l, st) in states.iter().enumerate() {
        match *st {
            LayerState::Kv => {
                let (k, v) = (GraphInfo::present_key(l), GraphInfo::present_value(l));
                g.output(&k, DataType::FLOAT, &[Dim::Fixed(nkv), total_dim.clone(), Dim::Fixed(kd)]);
                g.output(&v, DataType::FLOAT, &[Dim::Fixed(nkv), total_dim.clone(), Dim::Fixed(vd)]);
            }
            LayerState::Recurrent { conv, state } => {
                g.output(&GraphInfo::present_conv(l), DataType::FLOAT, &conv.map(Dim::Fixed));
                if let Some(state) = state {
                    g.output(&GraphInfo::present_state(l), DataType::FLOAT, &state.map(Dim::Fixed));
                }
            }
        }
    }
    route_outputs(&mut g);
    let info = info(fixed, None);
    let mut doc = match &opts.merge.mode {
        Mode::Task(t) => format!("meo export: task-merged ({t}), layers {:?} merged", info.merged),
        _ => "meo export: vanilla routing".to_string(),
    };
    if let Some(s) = fixed {
        doc +=
            &format!("; static shape: {} tokens per call, {} cache slots (input `{POSITION_INPUT}`)", s.seq, s.context);
    }
    Ok(Exported { model: g.finish(&c.architecture, doc), info })
}

/// The graph input holding, in the static form, how many positions the cache already holds.
pub const POSITION_INPUT: &str = "position";
/// The output of an encoder graph: the final normalised hidden states `[seq, hidden]`.
pub const ENCODER_OUTPUT: &str = "hidden";

/// The tables of one rotated width.
struct RopeTables {
    cos: String,
    sin: String,
    dim: usize,
    /// Interleaved pairs (tables `[T, 1, d/2, 1]`) rather than halves (`[T, 1, d]`).
    pairs: bool,
}

/// The static form's cache write (see [`export`]).
struct CacheWrite {
    /// `[S, T]` f32: 1 where slot s receives token t.
    onehot: String,
    /// `[S, 1]` f32: 1 where the slot keeps its past value.
    keep: String,
}

/// What every layer's attention shares.
struct AttnCtx<'a> {
    tables: &'a BTreeMap<usize, RopeTables>,
    /// The causal (windowed) mask `[T, S]`; `None` for an encoder (every key).
    mask: Option<&'a str>,
    cache: Cache<'a>,
    /// The relative position bias `[kv, g, T, S]`, for layers that have one.
    bias: Option<&'a str>,
}

/// How a layer's keys and values reach its attention.
#[derive(Clone, Copy)]
enum Cache<'a> {
    /// Appended to `past_*` (the dynamic form).
    Concat,
    /// Written into their slots of the fixed-size `past_*` (the fixed-shape form).
    Write(&'a CacheWrite),
    /// No cache: an encoder sees the whole sequence in one call.
    None,
}

/// The attention window of a layer (0 = every position).
fn window(a: &Attention) -> usize {
    match a {
        Attention::Gqa(a) => a.window,
        Attention::Mla(a) => a.window,
        // Recurrent mixers attend to nothing.
        _ => 0,
    }
}

/// (cache heads, key width, value width) per position, the same in every layer.
fn cache_dims(model: &Model) -> Result<(usize, usize, usize), ExportError> {
    let dims = |a: &Attention| match a {
        Attention::Gqa(a) => Some((a.num_kv_heads, a.head_dim, a.head_dim)),
        Attention::Mla(a) => Some((a.num_heads, a.nope + a.rope, a.v_dim)),
        // Recurrent layers keep no KV cache.
        _ => None,
    };
    let mut it = model.layer_plans().iter().filter_map(|p| dims(&p.attn));
    let first = it.next().ok_or_else(|| ExportError::Unsupported("a model without layers".into()))?;
    if let Some(other) = it.find(|d| *d != first) {
        return Err(ExportError::Unsupported(format!(
            "layers with different KV cache shapes ({first:?} and {other:?} heads × key × value widths)"
        )));
    }
    Ok(first)
}

/// A layer's stored merge.
enum Merged<'m> {
    Moe(&'m meo::model::plan::Expert),
    Meo(&'m [(BankExpert, Vec<f32>); 2]),
}

/// The stored merges the runtime's execution plan for `m` runs. A graph is fixed when it is
/// exported, so a plan with a layer built from the prompt is refused.
fn merged_layers<'m>(model: &'m Model, m: &MergeOptions) -> Result<BTreeMap<usize, Merged<'m>>, ExportError> {
    let plan = ExecPlan::new(model, m.clone())?;
    let mut out = BTreeMap::new();
    for (l, exec) in plan.layers().iter().enumerate() {
        match exec {
            LayerExec::Dense | LayerExec::Mixture => {}
            LayerExec::TaskMerge { task, index } => {
                out.insert(l, Merged::Moe(&model.tasks()[*task].layers[*index].expert));
            }
            LayerExec::MeoTask { task, index } => {
                out.insert(l, Merged::Meo(&model.meo_tasks()[*task].layers[*index].banks));
            }
            LayerExec::PromptMerge(_) => {
                return Err(ExportError::Unsupported(format!(
                    "prompt mode in layer {l} (its merge depends on the prompt; export a task merge instead)"
                )));
            }
            LayerExec::MeoSequence { .. } => {
                return Err(ExportError::Unsupported(format!(
                    "MEO-native layer {l} without a task merge (sequence-level gates are computed from the \
                     prompt at run time; export a task: --task NAME)"
                )));
            }
        }
    }
    Ok(out)
}

#[derive(Clone)]
enum Dim {
    Fixed(usize),
    Sym(&'static str),
}

fn attr(name: &str, t: AttributeType) -> AttributeProto {
    AttributeProto { name: name.into(), type_: t.into(), ..Default::default() }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { i: v, ..attr(name, AttributeType::INT) }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { ints: v.to_vec(), ..attr(name, AttributeType::INTS) }
}

fn value_info(name: &str, dt: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Sym(s) => dimension::Value::DimParam((*s).into()),
            }),
            ..Default::default()
        })
        .collect();
    let tt = TypeTensor {
        elem_type: dt as i32,
        shape: protobuf::MessageField::some(TensorShapeProto { dim, ..Default::default() }),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        type_: protobuf::MessageField::some(TypeProto { value: Some(TypeValue::TensorType(tt)), ..Default::default() }),
        ..Default::default()
    }
}

#[derive(Default)]
struct Builder<'m> {
    model: Option<&'m Model>,
    bytes: &'m [u8],
    weights: WeightFormat,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Initializer names already written (a tied matrix is written once).
    written: BTreeMap<String, String>,
    counter: usize,
}

impl<'m> Builder<'m> {
    fn finish(self, arch: &str, doc: String) -> ModelProto {
        let mut opset_import = vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }];
        if self.nodes.iter().any(|n| n.domain == MS_DOMAIN) {
            opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1, ..Default::default() });
        }
        let graph = GraphProto {
            name: format!("meo-{arch}"),
            node: self.nodes,
            initializer: self.inits,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        };
        ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: "meo".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc,
            graph: protobuf::MessageField::some(graph),
            ..Default::default()
        }
    }

    fn input(&mut self, name: &str, dt: DataType, dims: &[Dim]) {
        self.inputs.push(value_info(name, dt, dims));
    }

    fn output(&mut self, name: &str, dt: DataType, dims: &[Dim]) {
        self.outputs.push(value_info(name, dt, dims));
    }

    /// Renames the output of the node that produced `from` to `to` (for graph outputs).
    fn rename(&mut self, from: &str, to: &str) {
        for n in self.nodes.iter_mut().rev() {
            for o in &mut n.output {
                if o == from {
                    *o = to.into();
                    return;
                }
            }
        }
    }

    fn op_n(&mut self, op: &str, inputs: &[&str], attrs: &[AttributeProto], n: usize) -> Vec<String> {
        self.counter += 1;
        let name = format!("{op}_{}", self.counter);
        let outputs: Vec<String> = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name,
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: outputs.clone(),
            attribute: attrs.to_vec(),
            ..Default::default()
        });
        outputs
    }

    fn op(&mut self, op: &str, inputs: &[&str], attrs: &[AttributeProto]) -> String {
        self.op_n(op, inputs, attrs, 1).remove(0)
    }

    fn init(&mut self, name: &str, dt: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        if let Some(n) = self.written.get(name) {
            return n.clone();
        }
        self.inits.push(TensorProto {
            name: name.into(),
            data_type: dt as i32,
            dims: dims.iter().map(|&d| d as i64).collect(),
            raw_data: raw,
            ..Default::default()
        });
        self.written.insert(name.into(), name.into());
        name.into()
    }

    fn const_f32(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        self.init(name, DataType::FLOAT, dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn const_i64(&mut self, name: &str, dims: &[usize], v: &[i64]) -> String {
        self.init(name, DataType::INT64, dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn vector(&mut self, name: &str, v: &Vector) -> String {
        let mut out = vec![0.0f32; v.len];
        meo::kernels::read_f32s(&self.bytes[v.range.clone()], &mut out);
        self.const_f32(name, &[v.len], &out)
    }

    fn vector_in(&mut self, name: &str, v: &Vector, bytes: &[u8]) -> String {
        let mut out = vec![0.0f32; v.len];
        meo::kernels::read_f32s(&bytes[v.range.clone()], &mut out);
        self.const_f32(name, &[v.len], &out)
    }

    fn matrix(&mut self, name: &str, m: &Mat) -> Result<String, ExportError> {
        self.matrix_in(name, m, self.bytes)
    }

    /// A `[rows, cols]` f32 value for matrix `m` over `bytes` (an initializer, or the output of
    /// a `DequantizeLinear` for int8 matrices).
    fn matrix_in(&mut self, name: &str, m: &Mat, bytes: &[u8]) -> Result<String, ExportError> {
        if let Some(n) = self.written.get(name) {
            return Ok(n.clone());
        }
        let data = bytes
            .get(m.range.clone())
            .ok_or_else(|| ExportError::Unsupported(format!("matrix {name}: range outside its bytes")))?;
        let w = MatRef::new(m.dtype, m.rows, m.cols, data)
            .ok_or_else(|| ExportError::Unsupported(format!("matrix {name}: bytes do not match its shape")))?;
        let (rows, cols) = (m.rows, m.cols);
        let decoded = |w: &MatRef<'_>| {
            let mut out = vec![0.0f32; rows * cols];
            for (r, row) in out.chunks_mut(cols).enumerate() {
                w.row(r, row);
            }
            out
        };
        let out = match (m.dtype, self.weights) {
            (DType::Q8_0, WeightFormat::Block) => {
                const QK: usize = meo::quant::QK;
                let nb = cols.div_ceil(QK);
                let soff = meo::quant::scales_offset(rows as u64, cols as u64).unwrap_or(0) as usize;
                let q = data[..rows * nb * QK].to_vec();
                let scales: Vec<f32> = data[soff..soff + rows * nb * 2]
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect();
                let qn = self.init(&format!("{name}.q"), DataType::INT8, &[rows * nb, QK], q);
                let sn = self.const_f32(&format!("{name}.scale"), &[rows * nb], &scales);
                let zn = self.init(&format!("{name}.zero"), DataType::INT8, &[rows * nb], vec![0; rows * nb]);
                let dq = self.op("DequantizeLinear", &[&qn, &sn, &zn], &[int("axis", 0)]);
                let shape = self.const_i64(&format!("{name}.shape"), &[2], &[rows as i64, (nb * QK) as i64]);
                let mut w = self.op("Reshape", &[&dq, &shape], &[]);
                if nb * QK != cols {
                    let (s, e, a) = (
                        self.const_i64(&format!("{name}.s"), &[1], &[0]),
                        self.const_i64(&format!("{name}.e"), &[1], &[cols as i64]),
                        self.const_i64(&format!("{name}.a"), &[1], &[1]),
                    );
                    w = self.op("Slice", &[&w, &s, &e, &a], &[]);
                }
                w
            }
            (DType::MXFP4, WeightFormat::Block) => self.mxfp4_block(name, data, rows, cols)?,
            (DType::Q8_0 | DType::Q4_0 | DType::MXFP4, WeightFormat::Channel) => {
                let f = decoded(&w);
                let mut q = Vec::with_capacity(rows * cols);
                let mut scales = Vec::with_capacity(rows);
                for row in f.chunks(cols) {
                    let amax = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    scales.push(s);
                    q.extend(row.iter().map(|v| (v / s).round().clamp(-127.0, 127.0) as i8 as u8));
                }
                let qn = self.init(&format!("{name}.q"), DataType::INT8, &[rows, cols], q);
                let sn = self.const_f32(&format!("{name}.scale"), &[rows], &scales);
                let zn = self.init(&format!("{name}.zero"), DataType::INT8, &[rows], vec![0; rows]);
                self.op("DequantizeLinear", &[&qn, &sn, &zn], &[int("axis", 0)])
            }
            _ => {
                let f = decoded(&w);
                self.const_f32(name, &[rows, cols], &f)
            }
        };
        self.written.insert(name.into(), out.clone());
        Ok(out)
    }

    /// `x · Wᵀ (+ b)` for matrix `m` over `bytes` (see [`matrix_in`](Self::matrix_in)); a
    /// `q4_0` matrix in [`WeightFormat::Block`] is one `MatMulNBits` node.
    fn linear(&mut self, x: &str, name: &str, m: &Mat, bytes: &[u8], b: Option<&str>) -> Result<String, ExportError> {
        if m.dtype != DType::Q4_0 || self.weights != WeightFormat::Block {
            let w = self.matrix_in(name, m, bytes)?;
            return Ok(self.gemm(x, &w, b));
        }
        let (rows, cols) = (m.rows, m.cols);
        let data = bytes
            .get(m.range.clone())
            .filter(|d| MatRef::new(m.dtype, rows, cols, d).is_some())
            .ok_or_else(|| ExportError::Unsupported(format!("matrix {name}: bytes do not match its shape")))?;
        let nb = cols.div_ceil(meo::quant::QK);
        let soff = meo::quant::Planar::of(DType::Q4_0)
            .and_then(|p| p.scales_offset(rows as u64, cols as u64))
            .ok_or_else(|| ExportError::Unsupported(format!("matrix {name}: too large")))? as usize;
        let codes = data[..rows * nb * 16].to_vec();
        let scales: Vec<f32> = data[soff..soff + rows * nb * 2]
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let qn = self.init(&format!("{name}.q4"), DataType::UINT8, &[rows, nb, 16], codes);
        let sn = self.const_f32(&format!("{name}.scale"), &[rows * nb], &scales);
        let attrs = [int("K", cols as i64), int("N", rows as i64), int("bits", 4), int("block_size", 32)];
        let y = self.op("MatMulNBits", &[x, &qn, &sn], &attrs);
        if let Some(n) = self.nodes.last_mut() {
            n.domain = MS_DOMAIN.into();
        }
        Ok(match b {
            Some(b) => self.op("Add", &[&y, b], &[]),
            None => y,
        })
    }

    /// An `mxfp4` matrix `[rows, cols]` decoded in the graph from its planes as stored
    /// ([`WeightFormat::Block`]): exact (every E2M1 value times a power of two is an f32).
    fn mxfp4_block(&mut self, name: &str, data: &[u8], rows: usize, cols: usize) -> Result<String, ExportError> {
        let nb = cols.div_ceil(meo::quant::QK);
        let soff = meo::quant::Planar::of(DType::MXFP4)
            .and_then(|p| p.scales_offset(rows as u64, cols as u64))
            .ok_or_else(|| ExportError::Unsupported(format!("matrix {name}: too large")))? as usize;
        let q = self.init(&format!("{name}.mx"), DataType::UINT8, &[rows * nb, 16], data[..rows * nb * 16].to_vec());
        let e =
            self.init(&format!("{name}.e8m0"), DataType::UINT8, &[rows * nb, 1], data[soff..soff + rows * nb].to_vec());
        let e2m1 = meo::quant::E2M1;
        let lut: Vec<f32> = (0..16).map(|n| if n < 8 { e2m1[n] } else { -e2m1[n - 8] }).collect();
        let lut = self.const_f32("mxfp4.values", &[16], &lut);
        let pow: Vec<f32> = (0..=255u8).map(meo::quant::e8m0).collect();
        let pow = self.const_f32("mxfp4.e8m0", &[256], &pow);
        let sixteen = self.init("i32.16", DataType::INT32, &[], 16i32.to_le_bytes().to_vec());
        let ax2 = self.const_i64("axes.2", &[1], &[2]);
        let to_i32 = [int("to", DataType::INT32 as i64)];
        let qi = self.op("Cast", &[&q], &to_i32);
        let lo = self.op("Mod", &[&qi, &sixteen], &[]);
        let hi = self.op("Div", &[&qi, &sixteen], &[]);
        let lo = self.op("Unsqueeze", &[&lo, &ax2], &[]);
        let hi = self.op("Unsqueeze", &[&hi, &ax2], &[]);
        let codes = self.op("Concat", &[&lo, &hi], &[int("axis", 2)]); // [rows·nb, 16, 2]
        let flat = self.shape(&format!("shape.{}.32", rows * nb), &[(rows * nb) as i64, 32]);
        let codes = self.op("Reshape", &[&codes, &flat], &[]);
        let vals = self.op("Gather", &[&lut, &codes], &[int("axis", 0)]);
        let ei = self.op("Cast", &[&e], &to_i32);
        let sc = self.op("Gather", &[&pow, &ei], &[int("axis", 0)]); // [rows·nb, 1]
        let w = self.op("Mul", &[&vals, &sc], &[]);
        let shape = self.shape(&format!("{name}.shape"), &[rows as i64, (nb * 32) as i64]);
        let mut w = self.op("Reshape", &[&w, &shape], &[]);
        if nb * 32 != cols {
            w = self.slice(&w, 0, cols, 1);
        }
        Ok(w)
    }

    /// `x · Wᵀ (+ b)` for `x` `[T, in]` and `w` `[out, in]`.
    fn gemm(&mut self, x: &str, w: &str, b: Option<&str>) -> String {
        let mut ins = vec![x, w];
        ins.extend(b);
        self.op("Gemm", &ins, &[int("transB", 1)])
    }

    fn axes_last(&mut self) -> String {
        self.const_i64("axes_last", &[1], &[-1])
    }

    /// RMSNorm over the last axis, times `w` (no bias).
    fn rms(&mut self, x: &str, w: &str, eps: f32) -> String {
        let sq = self.op("Mul", &[x, x], &[]);
        let ms = self.op("ReduceMean", &[&sq], &[ints("axes", &[-1]), int("keepdims", 1)]);
        let e = self.const_f32(&format!("eps.{eps:e}"), &[], &[eps]);
        let ms = self.op("Add", &[&ms, &e], &[]);
        let r = self.op("Sqrt", &[&ms], &[]);
        let n = self.op("Div", &[x, &r], &[]);
        self.op("Mul", &[&n, w], &[])
    }

    fn norm(
        &mut self,
        name: &str,
        x: &str,
        w: &Vector,
        b: Option<&Vector>,
        kind: NormKind,
        eps: f32,
    ) -> Result<String, ExportError> {
        let wn = self.vector(&format!("{name}.weight"), w);
        match kind {
            NormKind::Rms => Ok(self.rms(x, &wn, eps)),
            NormKind::Layer => {
                let b = b.ok_or_else(|| ExportError::Unsupported(format!("{name}: LayerNorm without a bias")))?;
                let bn = self.vector(&format!("{name}.bias"), b);
                let mean = self.op("ReduceMean", &[x], &[ints("axes", &[-1]), int("keepdims", 1)]);
                let d = self.op("Sub", &[x, &mean], &[]);
                let sq = self.op("Mul", &[&d, &d], &[]);
                let var = self.op("ReduceMean", &[&sq], &[ints("axes", &[-1]), int("keepdims", 1)]);
                let e = self.const_f32(&format!("eps.{eps:e}"), &[], &[eps]);
                let var = self.op("Add", &[&var, &e], &[]);
                let r = self.op("Sqrt", &[&var], &[]);
                let n = self.op("Div", &[&d, &r], &[]);
                let n = self.op("Mul", &[&n, &wn], &[]);
                Ok(self.op("Add", &[&n, &bn], &[]))
            }
        }
    }

    fn shape(&mut self, name: &str, dims: &[i64]) -> String {
        self.const_i64(name, &[dims.len()], dims)
    }

    fn attention(
        &mut self,
        l: usize,
        a: &AttnPlan,
        x: &str,
        ctx: &AttnCtx<'_>,
        eps: f32,
    ) -> Result<String, ExportError> {
        let p = format!("layers.{l}.attn");
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        if nkv == 0 || nh % nkv != 0 {
            return Err(ExportError::Unsupported(format!("{p}: {nh} heads over {nkv} kv heads")));
        }
        let bias: Vec<Option<String>> = match &a.bias {
            Some([bq, bk, bv]) => vec![
                Some(self.vector(&format!("{p}.q.bias"), bq)),
                Some(self.vector(&format!("{p}.k.bias"), bk)),
                Some(self.vector(&format!("{p}.v.bias"), bv)),
            ],
            None => vec![None, None, None],
        };
        let mut proj = Vec::new();
        for (i, (m, part)) in [(&a.q, "q"), (&a.k, "k"), (&a.v, "v")].into_iter().enumerate() {
            let w = self.matrix(&format!("{p}.{part}.weight"), m)?;
            proj.push(self.gemm(x, &w, bias[i].as_deref()));
        }
        let (mut q, mut k, mut v) = (proj[0].clone(), proj[1].clone(), proj[2].clone());
        if a.qk_norm == QkNorm::Full {
            let (qn, kn) = self.qk_norm_weights(&p, a)?;
            q = self.rms(&q, &qn, eps);
            k = self.rms(&k, &kn, eps);
        }
        let qs = self.shape(&format!("shape.q.{nh}.{hd}"), &[-1, nh as i64, hd as i64]);
        let ks = self.shape(&format!("shape.q.{nkv}.{hd}"), &[-1, nkv as i64, hd as i64]);
        q = self.op("Reshape", &[&q, &qs], &[]);
        k = self.op("Reshape", &[&k, &ks], &[]);
        v = self.op("Reshape", &[&v, &ks], &[]);
        if a.qk_norm == QkNorm::PerHead {
            let (qn, kn) = self.qk_norm_weights(&p, a)?;
            q = self.rms(&q, &qn, eps);
            k = self.rms(&k, &kn, eps);
        }
        if let Some(c) = a.clip {
            let (lo, hi) =
                (self.const_f32(&format!("clip.-{c}"), &[], &[-c]), self.const_f32(&format!("clip.{c}"), &[], &[c]));
            q = self.op("Clip", &[&q, &lo, &hi], &[]);
            k = self.op("Clip", &[&k, &lo, &hi], &[]);
            v = self.op("Clip", &[&v, &lo, &hi], &[]);
        }
        if a.rope {
            let rd = a.rope_dim;
            let t = ctx.tables.get(&rd).ok_or_else(|| ExportError::Unsupported(format!("{p}: RoPE without tables")))?;
            if rd == hd {
                q = self.rotate(&q, t);
                k = self.rotate(&k, t);
            } else {
                // Partial RoPE: rotate each head's first `rd` dimensions, pass the rest.
                for x in [&mut q, &mut k] {
                    let (rot, pass) = (self.slice(x, 0, rd, 2), self.slice(x, rd, hd, 2));
                    let rot = self.rotate(&rot, t);
                    *x = self.op("Concat", &[&rot, &pass], &[int("axis", 2)]);
                }
            }
        }
        let sinks = match &a.sinks {
            Some(s) => {
                // Head h = kv·g + j: the sinks as `[kv, g, 1, 1]` against scores `[kv, g, T, S]`.
                let mut vals = vec![0.0f32; s.len];
                meo::kernels::read_f32s(&self.bytes[s.range.clone()], &mut vals);
                Some(self.const_f32(&format!("{p}.sinks"), &[nkv, nh / nkv, 1, 1], &vals))
            }
            None => None,
        };
        if a.rel_bias.is_some() && ctx.bias.is_none() {
            return Err(ExportError::Unsupported(format!("{p}: relative position bias without its table")));
        }
        let dims = HeadDims { heads: nh, kv_heads: nkv, key: hd, value: hd, rel_bias: a.rel_bias.is_some() };
        let mut o = self.attend(l, &q, &k, &v, dims, a.scale, sinks.as_deref(), ctx);
        if let Some(gm) = &a.gate {
            // Gated attention output: o ⊙ sigmoid(gate · x), per head dimension.
            let gv = self.linear(x, &format!("{p}.gate.weight"), gm, self.bytes, None)?;
            let gs = self.op("Sigmoid", &[&gv], &[]);
            o = self.op("Mul", &[&o, &gs], &[]);
        }
        let ow = self.matrix(&format!("{p}.o.weight"), &a.o)?;
        let ob = a.o_bias.as_ref().map(|b| self.vector(&format!("{p}.o.bias"), b));
        Ok(self.gemm(&o, &ow, ob.as_deref()))
    }

    /// The relative position bias `[kv, g, T, S]` of `rb` for queries at `qpos` `[T, 1]` and keys
    /// at `kpos` `[1, S]` (see [`export`]).
    fn relative_bias(
        &mut self,
        rb: &meo::model::plan::RelBias,
        a: &AttnPlan,
        qpos: &str,
        kpos: &str,
    ) -> Result<String, ExportError> {
        let (nh, nkv) = (a.num_heads, a.num_kv_heads);
        if nkv == 0 || nh % nkv != 0 {
            return Err(ExportError::Unsupported(format!("relative bias: {nh} heads over {nkv} kv heads")));
        }
        let d = rb.max_distance as i64 + 1;
        let buckets: Vec<i64> = (-d..=d)
            .map(|r| meo::model::plan::relative_bucket(r, rb.bidirectional, rb.buckets, rb.max_distance) as i64)
            .collect();
        if buckets.iter().any(|&b| b < 0 || b as usize >= rb.buckets) {
            return Err(ExportError::Unsupported("relative bias: a bucket outside the table".into()));
        }
        let table = self.const_i64("rel_bias.buckets", &[buckets.len()], &buckets);
        let rel = self.op("Sub", &[kpos, qpos], &[]); // [T, S]: key − query
        let (lo, hi) = (self.const_i64("rel_bias.lo", &[], &[-d]), self.const_i64("rel_bias.hi", &[], &[d]));
        let rel = self.op("Max", &[&rel, &lo], &[]);
        let rel = self.op("Min", &[&rel, &hi], &[]);
        let idx = self.op("Add", &[&rel, &hi], &[]); // 0 ..= 2d
        let bucket = self.op("Gather", &[&table, &idx], &[int("axis", 0)]); // [T, S]
        let w = self.matrix("rel_bias", &rb.table)?; // [buckets, heads]
        let b = self.op("Gather", &[&w, &bucket], &[int("axis", 0)]); // [T, S, heads]
        let s4 = self.shape(&format!("shape.rel_bias.{nkv}.{}", nh / nkv), &[0, 0, nkv as i64, (nh / nkv) as i64]);
        let b = self.op("Reshape", &[&b, &s4], &[]);
        Ok(self.op("Transpose", &[&b], &[ints("perm", &[2, 3, 0, 1])]))
    }

    /// Multi-head latent attention (`runtime/src/model/mla.rs`): q through the optional low-rank
    /// path, keys and values decompressed from the normalised latent, the shared rotary key
    /// broadcast over the heads; the cache holds the decompressed keys and values.
    fn mla(&mut self, l: usize, a: &MlaPlan, x: &str, ctx: &AttnCtx<'_>) -> Result<String, ExportError> {
        let p = format!("layers.{l}.attn");
        let (nh, nope, rd, vd, r) = (a.num_heads, a.nope, a.rope, a.v_dim, a.kv_lora);
        let qk = nope + rd;
        let q = match &a.q_a {
            Some((qa, norm)) => {
                let qaw = self.matrix(&format!("{p}.q_a.weight"), qa)?;
                let ql = self.gemm(x, &qaw, None);
                let nw = self.vector(&format!("{p}.q_a.norm"), norm);
                let ql = self.rms(&ql, &nw, a.latent_eps);
                let qw = self.matrix(&format!("{p}.q_b.weight"), &a.q)?;
                self.gemm(&ql, &qw, None)
            }
            None => {
                let qw = self.matrix(&format!("{p}.q.weight"), &a.q)?;
                self.gemm(x, &qw, None)
            }
        };
        let qs = self.shape(&format!("shape.q.{nh}.{qk}"), &[-1, nh as i64, qk as i64]);
        let q = self.op("Reshape", &[&q, &qs], &[]);
        let q_nope = self.slice(&q, 0, nope, 2);
        let q_rot = self.slice(&q, nope, qk, 2);
        let kvaw = self.matrix(&format!("{p}.kv_a.weight"), &a.kv_a)?;
        let kva = self.gemm(x, &kvaw, None); // [T, r + rd]
        let lat = self.slice(&kva, 0, r, 1);
        let k_rot = self.slice(&kva, r, r + rd, 1);
        let nw = self.vector(&format!("{p}.kv_a.norm"), &a.kv_norm);
        let lat = self.rms(&lat, &nw, a.latent_eps);
        let kvbw = self.matrix(&format!("{p}.kv_b.weight"), &a.kv_b)?;
        let kv = self.gemm(&lat, &kvbw, None); // [T, nh·(nope + vd)]
        let kvs = self.shape(&format!("shape.q.{nh}.{}", nope + vd), &[-1, nh as i64, (nope + vd) as i64]);
        let kv = self.op("Reshape", &[&kv, &kvs], &[]);
        let k_nope = self.slice(&kv, 0, nope, 2);
        let v = self.slice(&kv, nope, nope + vd, 2);
        let t = ctx.tables.get(&rd).ok_or_else(|| ExportError::Unsupported(format!("{p}: RoPE without tables")))?;
        let q_rot = self.rotate(&q_rot, t);
        let k1 = self.shape(&format!("shape.q.1.{rd}"), &[-1, 1, rd as i64]);
        let k_rot = self.op("Reshape", &[&k_rot, &k1], &[]);
        let k_rot = self.rotate(&k_rot, t);
        // A Gather of head 0 for every head, not Expand/Tile: tract's optimiser mis-shapes an
        // expanded operand split out of the static form's cache-write MatMul (tract-onnx 0.23.9).
        let heads = self.const_i64(&format!("heads.zero.{nh}"), &[nh], &vec![0; nh]);
        let k_rot = self.op("Gather", &[&k_rot, &heads], &[int("axis", 1)]);
        let q = self.op("Concat", &[&q_nope, &q_rot], &[int("axis", 2)]);
        let k = self.op("Concat", &[&k_nope, &k_rot], &[int("axis", 2)]);
        let dims = HeadDims { heads: nh, kv_heads: nh, key: qk, value: vd, rel_bias: false };
        let o = self.attend(l, &q, &k, &v, dims, a.scale, None, ctx);
        let ow = self.matrix(&format!("{p}.o.weight"), &a.o)?;
        Ok(self.gemm(&o, &ow, None))
    }

    /// The causal depthwise convolution of layer `l`'s recurrent mixer (the CPU's
    /// `recurrent::causal_conv`) on `x` `[T, cd]` with `w` `[cd, kw]`, continuing from `past_conv.L` and writing
    /// `present_conv.L` (the last `kw − 1` inputs): a grouped `Conv` (with `bias`) over the
    /// state's rows and this call's, SiLU after it when `silu`. Returns `[T, cd]`.
    fn causal_conv(
        &mut self,
        l: usize,
        x: &str,
        w: &Mat,
        bias: Option<&Vector>,
        silu: bool,
    ) -> Result<String, ExportError> {
        let pre = format!("layers.{l}.mixer");
        let (cd, kw) = (w.rows, w.cols);
        // The convolution's inputs: the state's rows, then this call's; the state keeps the last.
        let past_conv = GraphInfo::past_conv(l);
        let full = self.op("Concat", &[&past_conv, x], &[int("axis", 0)]); // [kw − 1 + T, cd]
        let present = if kw > 1 {
            let start = self.const_i64(&format!("slice.-{}", kw - 1), &[1], &[-((kw - 1) as i64)]);
            let end = self.const_i64("slice.end", &[1], &[i64::MAX]);
            let ax0 = self.const_i64("axes0", &[1], &[0]);
            self.op("Slice", &[&full, &start, &end, &ax0], &[])
        } else {
            self.op("Identity", &[&past_conv], &[])
        };
        self.rename(&present, &GraphInfo::present_conv(l));
        let ax0 = self.const_i64("axes0", &[1], &[0]);
        let xt = self.op("Transpose", &[&full], &[ints("perm", &[1, 0])]);
        let xt = self.op("Unsqueeze", &[&xt, &ax0], &[]); // [1, cd, kw − 1 + T]
        let w = self.matrix(&format!("{pre}.conv.weight"), w)?;
        let ws = self.shape(&format!("shape.conv.{cd}.{kw}"), &[cd as i64, 1, kw as i64]);
        let w = self.op("Reshape", &[&w, &ws], &[]);
        let mut inputs = vec![xt, w];
        inputs.extend(bias.map(|b| self.vector(&format!("{pre}.conv.bias"), b)));
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let conv = self.op("Conv", &inputs, &[int("group", cd as i64), ints("kernel_shape", &[kw as i64])]);
        let conv = self.op("Squeeze", &[&conv, &ax0], &[]);
        let conv = self.op("Transpose", &[&conv], &[ints("perm", &[1, 0])]); // [T, cd]
        if !silu {
            return Ok(conv);
        }
        let sg = self.op("Sigmoid", &[&conv], &[]);
        Ok(self.op("Mul", &[&conv, &sg], &[]))
    }

    /// LFM2's gated short convolution of layer `l` on normalised `x` `[T, h]` (the CPU's
    /// `short_conv::short_conv`), continuing from `past_conv.L` and writing `present_conv.L`:
    /// `b ⊙ x` through the causal convolution (no activation), times `c`, the output projection.
    fn short_conv(&mut self, l: usize, p: &ShortConvPlan, x: &str) -> Result<String, ExportError> {
        let pre = format!("layers.{l}.mixer");
        if p.kernel == 0 {
            return Err(ExportError::Unsupported(format!("{pre}: a short convolution of width 0")));
        }
        let bytes = self.bytes;
        let b = self.linear(x, &format!("{pre}.b.weight"), &p.b, bytes, None)?;
        let c = self.linear(x, &format!("{pre}.c.weight"), &p.c, bytes, None)?;
        let v = self.linear(x, &format!("{pre}.x.weight"), &p.x, bytes, None)?;
        let bx = self.op("Mul", &[&b, &v], &[]);
        let conv = self.causal_conv(l, &bx, &p.conv, None, false)?;
        let y = self.op("Mul", &[&c, &conv], &[]);
        self.linear(&y, &format!("{pre}.out.weight"), &p.out, bytes, None)
    }

    /// The Mamba2 layer `l` on normalised `x` `[T, h]` (the CPU's `mamba::mamba2`), continuing
    /// from `past_conv.L` and `past_state.L`, writing `present_conv.L` and `present_state.L`:
    /// the z, xBC and dt projections; the causal convolution (bias, SiLU) as a grouped `Conv`;
    /// `Δ = softplus(dt + dt_bias)` and the decay `exp(Δ·A)`; the selective scan over the tokens
    /// in order as a `Scan` carrying `S` `[heads, head_dim, N]` (`S ← decay·S + (Δ·B)·x`,
    /// `y = S·C`); `y + D·x`; `y ⊙ silu(z)` RMS-normalised per group; the output projection.
    fn mamba2(&mut self, l: usize, p: &Mamba2Plan, x: &str) -> Result<String, ExportError> {
        let pre = format!("layers.{l}.mixer");
        let d = &p.dims;
        let (nh, hd, n, ng, kw) = (d.num_heads, d.head_dim, d.state_size, d.n_groups, d.conv_kernel);
        if ng == 0 || !nh.is_multiple_of(ng) || kw == 0 {
            return Err(ExportError::Unsupported(format!(
                "{pre}: Mamba2 with {nh} heads over {ng} groups, convolution width {kw}"
            )));
        }
        let (inner, gn) = (d.inner(), ng * n);
        let bytes = self.bytes;
        let z = self.linear(x, &format!("{pre}.z.weight"), &p.z, bytes, None)?;
        let xbc = self.linear(x, &format!("{pre}.xbc.weight"), &p.xbc, bytes, None)?;
        let dt = self.linear(x, &format!("{pre}.dt.weight"), &p.dt, bytes, None)?;
        let conv = self.causal_conv(l, &xbc, &p.conv, p.conv_bias.as_ref(), true)?; // [T, cd]
        // x `[T, heads, head_dim]`; B and C `[T, heads, N]` (group h / (heads / groups) per head).
        let xs = self.slice(&conv, 0, inner, 1);
        let hs = self.shape(&format!("shape.heads.{nh}.{hd}"), &[-1, nh as i64, hd as i64]);
        let xs = self.op("Reshape", &[&xs, &hs], &[]);
        let gs = self.shape(&format!("shape.heads.{ng}.{n}"), &[-1, ng as i64, n as i64]);
        let groups: Vec<i64> = (0..nh).map(|h| (h / (nh / ng)) as i64).collect();
        let groups = self.const_i64(&format!("{pre}.groups"), &[nh], &groups);
        let mut bc = Vec::new();
        for lo in [inner, inner + gn] {
            let v = self.slice(&conv, lo, lo + gn, 1);
            let v = self.op("Reshape", &[&v, &gs], &[]);
            bc.push(self.op("Gather", &[&v, &groups], &[int("axis", 1)]));
        }
        let dtb = self.vector(&format!("{pre}.dt_bias"), &p.dt_bias);
        let u = self.op("Add", &[&dt, &dtb], &[]);
        let delta = self.softplus(&u); // [T, heads]
        let neg_a = self.neg_exp(&format!("{pre}.neg_a"), &p.a_log);
        let da = self.op("Mul", &[&delta, &neg_a], &[]);
        let decay = self.op("Exp", &[&da], &[]);
        // The scan, token by token: S ← decay·S + (Δ·B) ⊗ x; y = S·C.
        let body_in: Vec<String> =
            ["s", "x", "b", "c", "delta", "decay"].iter().map(|v| format!("{pre}.scan.{v}")).collect();
        let outer = std::mem::take(&mut self.nodes);
        let (s_in, xt, bt, ct, dlt, dct) =
            (&body_in[0], &body_in[1], &body_in[2], &body_in[3], &body_in[4], &body_in[5]);
        let col = self.shape(&format!("shape.{nh}.1.1"), &[nh as i64, 1, 1]);
        let ax1 = self.const_i64("axes1", &[1], &[1]);
        let ax2 = self.const_i64("axes.2", &[1], &[2]);
        let dr = self.op("Reshape", &[dct, &col], &[]);
        let s1 = self.op("Mul", &[s_in, &dr], &[]);
        let dl = self.op("Reshape", &[dlt, &col], &[]);
        let brow = self.op("Unsqueeze", &[bt, &ax1], &[]); // [heads, 1, N]
        let db = self.op("Mul", &[&dl, &brow], &[]);
        let xcol = self.op("Unsqueeze", &[xt, &ax2], &[]); // [heads, head_dim, 1]
        let upd = self.op("Mul", &[&db, &xcol], &[]);
        let s2 = self.op("Add", &[&s1, &upd], &[]);
        let ccol = self.op("Unsqueeze", &[ct, &ax2], &[]); // [heads, N, 1]
        let y = self.op("MatMul", &[&s2, &ccol], &[]);
        let y = self.op("Squeeze", &[&y, &ax2], &[]); // [heads, head_dim]
        let body_nodes = std::mem::replace(&mut self.nodes, outer);
        let f = DataType::FLOAT;
        let body = GraphProto {
            name: format!("{pre}.ssm"),
            node: body_nodes,
            input: vec![
                value_info(s_in, f, &[Dim::Fixed(nh), Dim::Fixed(hd), Dim::Fixed(n)]),
                value_info(xt, f, &[Dim::Fixed(nh), Dim::Fixed(hd)]),
                value_info(bt, f, &[Dim::Fixed(nh), Dim::Fixed(n)]),
                value_info(ct, f, &[Dim::Fixed(nh), Dim::Fixed(n)]),
                value_info(dlt, f, &[Dim::Fixed(nh)]),
                value_info(dct, f, &[Dim::Fixed(nh)]),
            ],
            output: vec![
                value_info(&s2, f, &[Dim::Fixed(nh), Dim::Fixed(hd), Dim::Fixed(n)]),
                value_info(&y, f, &[Dim::Fixed(nh), Dim::Fixed(hd)]),
            ],
            ..Default::default()
        };
        let body = AttributeProto { g: protobuf::MessageField::some(body), ..attr("body", AttributeType::GRAPH) };
        let past_state = GraphInfo::past_state(l);
        let out = self.op_n(
            "Scan",
            &[&past_state, &xs, &bc[0], &bc[1], &delta, &decay],
            &[body, int("num_scan_inputs", 5)],
            2,
        );
        self.rename(&out[0], &GraphInfo::present_state(l));
        // y + D·x, then the gate and the norm per group of inner / groups channels.
        let dv = self.vector(&format!("{pre}.d"), &p.d);
        let dcol = self.shape(&format!("shape.{nh}.1"), &[nh as i64, 1]);
        let dv = self.op("Reshape", &[&dv, &dcol], &[]);
        let dx = self.op("Mul", &[&xs, &dv], &[]);
        let y = self.op("Add", &[&out[1], &dx], &[]); // [T, heads, head_dim]
        let is = self.shape(&format!("shape.o.{inner}"), &[-1, inner as i64]);
        let y = self.op("Reshape", &[&y, &is], &[]);
        let zs = self.op("Sigmoid", &[&z], &[]);
        let zg = self.op("Mul", &[&z, &zs], &[]);
        let y = self.op("Mul", &[&y, &zg], &[]);
        let gw = inner / ng;
        let ys = self.shape(&format!("shape.heads.{ng}.{gw}"), &[-1, ng as i64, gw as i64]);
        let y = self.op("Reshape", &[&y, &ys], &[]);
        let nw = self.vector(&format!("{pre}.norm.weight"), &p.out_norm);
        let ws = self.shape(&format!("shape.{ng}.{gw}"), &[ng as i64, gw as i64]);
        let nw = self.op("Reshape", &[&nw, &ws], &[]);
        let y = self.rms(&y, &nw, p.eps);
        let y = self.op("Reshape", &[&y, &is], &[]);
        self.linear(&y, &format!("{pre}.out.weight"), &p.out, bytes, None)
    }

    /// The gated DeltaNet layer `l` on normalised `x` `[T, h]` (the CPU's `delta::delta_net`),
    /// continuing from `past_conv.L` and `past_state.L`, writing `present_conv.L` and
    /// `present_state.L`: the projections; the causal depthwise convolution as a grouped `Conv`
    /// over the last `kernel − 1` inputs and this call's (SiLU); q and k L2-normalised per head
    /// (q scaled); `β`, the decay; the delta rule over the tokens in order as a `Scan` carrying
    /// the state; the gated RMSNorm; the output projection.
    fn delta_net(&mut self, l: usize, p: &DeltaPlan, x: &str) -> Result<String, ExportError> {
        let pre = format!("layers.{l}.mixer");
        let d = &p.dims;
        let (nk, nv, dk, dv, kw) = (d.num_k_heads, d.num_v_heads, d.k_head_dim, d.v_head_dim, d.conv_kernel);
        if nk == 0 || !nv.is_multiple_of(nk) || kw == 0 {
            return Err(ExportError::Unsupported(format!(
                "{pre}: {nv} value heads over {nk} key heads, convolution width {kw}"
            )));
        }
        let (kd, vd, cd) = (nk * dk, nv * dv, d.conv_dim());
        let bytes = self.bytes;
        let mut proj = Vec::new();
        for (m, part) in [(&p.q, "q"), (&p.k, "k"), (&p.v, "v"), (&p.z, "z"), (&p.b, "b"), (&p.a, "a")] {
            proj.push(self.linear(x, &format!("{pre}.{part}.weight"), m, bytes, None)?);
        }
        let qkv = self.op("Concat", &[&proj[0], &proj[1], &proj[2]], &[int("axis", 1)]); // [T, cd]
        let conv = self.causal_conv(l, &qkv, &p.conv, None, true)?; // [T, cd]
        // q, k `[T, heads, dk]`, L2-normalised; key head h / (nv / nk) serves value head h.
        let axes = self.axes_last();
        let l2 = |g: &mut Self, v: &str| {
            let sq = g.op("Mul", &[v, v], &[]);
            let ss = g.op("ReduceSum", &[&sq, &axes], &[int("keepdims", 1)]);
            let e = g.const_f32("eps.l2", &[], &[1e-6]);
            let ss = g.op("Add", &[&ss, &e], &[]);
            let r = g.op("Sqrt", &[&ss], &[]);
            g.op("Div", &[v, &r], &[])
        };
        let hs = self.shape(&format!("shape.heads.{nk}.{dk}"), &[-1, nk as i64, dk as i64]);
        let heads: Vec<i64> = (0..nv).map(|h| (h / (nv / nk)) as i64).collect();
        let heads = self.const_i64(&format!("{pre}.key_heads"), &[nv], &heads);
        let mut qk = Vec::new();
        for (lo, hi) in [(0, kd), (kd, 2 * kd)] {
            let v = self.slice(&conv, lo, hi, 1);
            let v = self.op("Reshape", &[&v, &hs], &[]);
            let v = l2(self, &v);
            qk.push(self.op("Gather", &[&v, &heads], &[int("axis", 1)])); // [T, nv, dk]
        }
        let scale = self.const_f32(&format!("{pre}.scale"), &[], &[1.0 / (dk as f32).sqrt()]);
        let q = self.op("Mul", &[&qk[0], &scale], &[]);
        let vs = self.shape(&format!("shape.heads.{nv}.{dv}"), &[-1, nv as i64, dv as i64]);
        let v = self.slice(&conv, 2 * kd, cd, 1);
        let v = self.op("Reshape", &[&v, &vs], &[]);
        // β = sigmoid(b·x); decay = exp(−exp(a_log) · softplus(a·x + dt_bias)), softplus linear
        // above 20 as torch's.
        let beta = self.op("Sigmoid", &[&proj[4]], &[]);
        let dtb = self.vector(&format!("{pre}.dt_bias"), &p.dt_bias);
        let u = self.op("Add", &[&proj[5], &dtb], &[]);
        let sp = self.softplus(&u);
        let neg_a = self.neg_exp(&format!("{pre}.neg_a"), &p.a_log);
        let gdec = self.op("Mul", &[&sp, &neg_a], &[]);
        let decay = self.op("Exp", &[&gdec], &[]); // [T, nv]
        // The delta rule, token by token: a Scan over (q, k, v, β, decay) carrying S.
        let body_in: Vec<String> =
            ["s", "q", "k", "v", "beta", "decay"].iter().map(|n| format!("{pre}.scan.{n}")).collect();
        let outer = std::mem::take(&mut self.nodes);
        let (s_in, qt, kt, vt, bt, dt) = (&body_in[0], &body_in[1], &body_in[2], &body_in[3], &body_in[4], &body_in[5]);
        let col = self.shape(&format!("shape.{nv}.1.1"), &[nv as i64, 1, 1]);
        let ax1 = self.const_i64("axes1", &[1], &[1]);
        let ax2 = self.const_i64("axes.2", &[1], &[2]);
        let dr = self.op("Reshape", &[dt, &col], &[]);
        let s1 = self.op("Mul", &[s_in, &dr], &[]);
        let krow = self.op("Unsqueeze", &[kt, &ax1], &[]); // [nv, 1, dk]
        let ks = self.op("MatMul", &[&krow, &s1], &[]); // [nv, 1, dv]: Sᵀk
        let vrow = self.op("Unsqueeze", &[vt, &ax1], &[]);
        let br = self.op("Reshape", &[bt, &col], &[]);
        let delta = self.op("Sub", &[&vrow, &ks], &[]);
        let delta = self.op("Mul", &[&delta, &br], &[]);
        let kcol = self.op("Unsqueeze", &[kt, &ax2], &[]); // [nv, dk, 1]
        let upd = self.op("MatMul", &[&kcol, &delta], &[]);
        let s2 = self.op("Add", &[&s1, &upd], &[]);
        let qrow = self.op("Unsqueeze", &[qt, &ax1], &[]);
        let o = self.op("MatMul", &[&qrow, &s2], &[]);
        let o = self.op("Squeeze", &[&o, &ax1], &[]); // [nv, dv]
        let body_nodes = std::mem::replace(&mut self.nodes, outer);
        let f = DataType::FLOAT;
        let body = GraphProto {
            name: format!("{pre}.delta_rule"),
            node: body_nodes,
            input: vec![
                value_info(s_in, f, &[Dim::Fixed(nv), Dim::Fixed(dk), Dim::Fixed(dv)]),
                value_info(qt, f, &[Dim::Fixed(nv), Dim::Fixed(dk)]),
                value_info(kt, f, &[Dim::Fixed(nv), Dim::Fixed(dk)]),
                value_info(vt, f, &[Dim::Fixed(nv), Dim::Fixed(dv)]),
                value_info(bt, f, &[Dim::Fixed(nv)]),
                value_info(dt, f, &[Dim::Fixed(nv)]),
            ],
            output: vec![
                value_info(&s2, f, &[Dim::Fixed(nv), Dim::Fixed(dk), Dim::Fixed(dv)]),
                value_info(&o, f, &[Dim::Fixed(nv), Dim::Fixed(dv)]),
            ],
            ..Default::default()
        };
        let body = AttributeProto { g: protobuf::MessageField::some(body), ..attr("body", AttributeType::GRAPH) };
        let past_state = GraphInfo::past_state(l);
        let out =
            self.op_n("Scan", &[&past_state, &q, &qk[1], &v, &beta, &decay], &[body, int("num_scan_inputs", 5)], 2);
        self.rename(&out[0], &GraphInfo::present_state(l));
        // Gated RMSNorm per head: w · rmsnorm(o) · silu(z); then the output projection.
        let nw = self.vector(&format!("{pre}.norm.weight"), &p.out_norm);
        let on = self.rms(&out[1], &nw, p.eps); // [T, nv, dv]
        let z = self.op("Reshape", &[&proj[3], &vs], &[]);
        let zs = self.op("Sigmoid", &[&z], &[]);
        let z = self.op("Mul", &[&z, &zs], &[]);
        let o = self.op("Mul", &[&on, &z], &[]);
        let os = self.shape(&format!("shape.o.{vd}"), &[-1, vd as i64]);
        let o = self.op("Reshape", &[&o, &os], &[]);
        self.linear(&o, &format!("{pre}.out.weight"), &p.out, bytes, None)
    }

    /// torch's `softplus` of `u` (linear above 20).
    fn softplus(&mut self, u: &str) -> String {
        let twenty = self.const_f32("softplus.threshold", &[], &[20.0]);
        let big = self.op("Greater", &[u, &twenty], &[]);
        let sp = self.op("Softplus", &[u], &[]);
        self.op("Where", &[&big, u, &sp], &[])
    }

    /// The constant `−exp(v)` (a recurrent mixer's `A` from its stored `a_log`).
    fn neg_exp(&mut self, name: &str, v: &Vector) -> String {
        let mut a_log = vec![0.0f32; v.len];
        meo::kernels::read_f32s(&self.bytes[v.range.clone()], &mut a_log);
        let neg_a: Vec<f32> = a_log.iter().map(|&v| -v.exp()).collect();
        self.const_f32(name, &[v.len], &neg_a)
    }

    /// `x[.., start..end, ..]` on `axis`.
    fn slice(&mut self, x: &str, start: usize, end: usize, axis: usize) -> String {
        let (s, e, a) = (
            self.const_i64(&format!("slice.{start}"), &[1], &[start as i64]),
            self.const_i64(&format!("slice.{end}"), &[1], &[end as i64]),
            self.const_i64(&format!("slice.axis.{axis}"), &[1], &[axis as i64]),
        );
        self.op("Slice", &[x, &s, &e, &a], &[])
    }

    /// The attention core of layer `l` on q `[T, heads, key]`, k `[T, kv, key]`, v
    /// `[T, kv, value]`: appends k and v to the cache (the `present_*` outputs), then
    /// `softmax(q·k · scale + mask (+ sink)) v` per head; returns `[T, heads · value]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        l: usize,
        q: &str,
        k: &str,
        v: &str,
        d: HeadDims,
        scale: f32,
        sinks: Option<&str>,
        ctx: &AttnCtx<'_>,
    ) -> String {
        let p = format!("layers.{l}.attn");
        let (nh, nkv, has_bias) = (d.heads, d.kv_heads, d.rel_bias);
        let g = nh / nkv;
        // KV cache: [kv_heads, positions, width].
        let perm = [1, 0, 2];
        let kt = self.op("Transpose", &[k], &[ints("perm", &perm)]);
        let vt = self.op("Transpose", &[v], &[ints("perm", &perm)]);
        let (pk, pv) = match ctx.cache {
            Cache::None => (kt, vt),
            cache => {
                let (pk, pv) = match cache {
                    Cache::Write(w) => {
                        let mut write = |past: &str, new: &str| {
                            let kept = self.op("Mul", &[past, &w.keep], &[]);
                            let put = self.op("MatMul", &[&w.onehot, new], &[]); // [kv, S, width]
                            self.op("Add", &[&kept, &put], &[])
                        };
                        (write(&GraphInfo::past_key(l), &kt), write(&GraphInfo::past_value(l), &vt))
                    }
                    _ => (
                        self.op("Concat", &[&GraphInfo::past_key(l), &kt], &[int("axis", 1)]),
                        self.op("Concat", &[&GraphInfo::past_value(l), &vt], &[int("axis", 1)]),
                    ),
                };
                self.rename(&pk, &GraphInfo::present_key(l));
                self.rename(&pv, &GraphInfo::present_value(l));
                (GraphInfo::present_key(l), GraphInfo::present_value(l))
            }
        };
        // Grouped query: q [T, nh, dk] → [kv, g, T, dk]; k, v [kv, 1, S, d] broadcast over g.
        let q4s = self.shape(&format!("shape.q4.{nkv}.{g}.{}", d.key), &[-1, nkv as i64, g as i64, d.key as i64]);
        let q4 = self.op("Reshape", &[q, &q4s], &[]);
        let q4 = self.op("Transpose", &[&q4], &[ints("perm", &[1, 2, 0, 3])]);
        let ax1 = self.const_i64("axes1", &[1], &[1]);
        let k4 = self.op("Unsqueeze", &[&pk, &ax1], &[]);
        let k4 = self.op("Transpose", &[&k4], &[ints("perm", &[0, 1, 3, 2])]);
        let v4 = self.op("Unsqueeze", &[&pv, &ax1], &[]);
        let s = self.op("MatMul", &[&q4, &k4], &[]);
        let sc = self.const_f32(&format!("{p}.scale"), &[], &[scale]);
        let s = self.op("Mul", &[&s, &sc], &[]);
        let s = match ctx.mask {
            Some(m) => self.op("Add", &[&s, m], &[]),
            None => s,
        };
        let s = match (ctx.bias, has_bias) {
            (Some(b), true) => self.op("Add", &[&s, b], &[]),
            _ => s,
        };
        let s = match sinks {
            None => self.op("Softmax", &[&s], &[int("axis", -1)]),
            Some(sk) => {
                // Softmax with one more logit per head in the denominator (GPT-OSS attention
                // sinks), max-subtracted over the scores and the sink as the CPU target does.
                let m = self.op("ReduceMax", &[&s], &[ints("axes", &[-1]), int("keepdims", 1)]);
                let m = self.op("Max", &[&m, sk], &[]);
                let e = self.op("Sub", &[&s, &m], &[]);
                let e = self.op("Exp", &[&e], &[]);
                let axes = self.axes_last();
                let sum = self.op("ReduceSum", &[&e, &axes], &[int("keepdims", 1)]);
                let es = self.op("Sub", &[sk, &m], &[]);
                let es = self.op("Exp", &[&es], &[]);
                let sum = self.op("Add", &[&sum, &es], &[]);
                self.op("Div", &[&e, &sum], &[])
            }
        };
        let o = self.op("MatMul", &[&s, &v4], &[]); // [kv, g, T, dv]
        let o = self.op("Transpose", &[&o], &[ints("perm", &[2, 0, 1, 3])]);
        let os = self.shape(&format!("shape.o.{}", nh * d.value), &[-1, (nh * d.value) as i64]);
        self.op("Reshape", &[&o, &os], &[])
    }

    fn qk_norm_weights(&mut self, p: &str, a: &AttnPlan) -> Result<(String, String), ExportError> {
        match (&a.q_norm, &a.k_norm) {
            (Some(q), Some(k)) => Ok((self.vector(&format!("{p}.q_norm"), q), self.vector(&format!("{p}.k_norm"), k))),
            _ => Err(ExportError::Unsupported(format!("{p}: q/k norm without weights"))),
        }
    }

    /// RoPE on `x` `[T, heads, d]`, as the CPU target's `Rope::rotate`: halves
    /// `(x1 c − x2 s, x2 c + x1 s)` for `(i, i + d/2)`, or the same on adjacent pairs.
    fn rotate(&mut self, x: &str, t: &RopeTables) -> String {
        let d = t.dim;
        let half = d / 2;
        if t.pairs {
            let s4 = self.shape(&format!("shape.rope.x.{half}"), &[0, 0, half as i64, 2]);
            let x4 = self.op("Reshape", &[x, &s4], &[]);
            let xe = self.slice(&x4, 0, 1, 3);
            let xo = self.slice(&x4, 1, 2, 3);
            let (a, b) = (self.op("Mul", &[&xe, &t.cos], &[]), self.op("Mul", &[&xo, &t.sin], &[]));
            let re = self.op("Sub", &[&a, &b], &[]);
            let (a, b) = (self.op("Mul", &[&xo, &t.cos], &[]), self.op("Mul", &[&xe, &t.sin], &[]));
            let ro = self.op("Add", &[&a, &b], &[]);
            let r = self.op("Concat", &[&re, &ro], &[int("axis", 3)]);
            let s3 = self.shape(&format!("shape.rope.back.{d}"), &[0, 0, d as i64]);
            return self.op("Reshape", &[&r, &s3], &[]);
        }
        let x1 = self.slice(x, 0, half, 2);
        let x2 = self.slice(x, half, d, 2);
        let n2 = self.op("Neg", &[&x2], &[]);
        let r = self.op("Concat", &[&n2, &x1], &[int("axis", 2)]);
        let a = self.op("Mul", &[x, &t.cos], &[]);
        let b = self.op("Mul", &[&r, &t.sin], &[]);
        self.op("Add", &[&a, &b], &[])
    }

    /// `down(act(gate x + b) , up x + b) + b` (or `down(act(up x))` ungated) with the matrices
    /// over `bytes`: SiLU-gated, GPT-OSS's clamped SwiGLU, or ungated ReLU / GELU-tanh / SiLU.
    fn mlp(&mut self, p: &str, x: &str, m: &Mlp, bytes: &[u8]) -> Result<String, ExportError> {
        let bias = m.bias.as_deref().map(|[bg, bu, bd]| {
            [
                self.vector_in(&format!("{p}.gate.bias"), bg, bytes),
                self.vector_in(&format!("{p}.up.bias"), bu, bytes),
                self.vector_in(&format!("{p}.down.bias"), bd, bytes),
            ]
        });
        let b = |i: usize| bias.as_ref().map(|b| b[i].clone());
        let up = self.linear(x, &format!("{p}.up"), &m.up, bytes, b(1).as_deref())?;
        let hmid = match &m.gate {
            Some(gate) => {
                let gt = self.linear(x, &format!("{p}.gate"), gate, bytes, b(0).as_deref())?;
                match m.act {
                    Activation::ClampedSwiglu { alpha, limit } => {
                        let (lo, hi) = (
                            self.const_f32(&format!("swiglu.-{limit}"), &[], &[-limit]),
                            self.const_f32(&format!("swiglu.{limit}"), &[], &[limit]),
                        );
                        let gc = self.op("Min", &[&gt, &hi], &[]);
                        let uc = self.op("Clip", &[&up, &lo, &hi], &[]);
                        let al = self.const_f32(&format!("swiglu.alpha.{alpha}"), &[], &[alpha]);
                        let ga = self.op("Mul", &[&gc, &al], &[]);
                        let sg = self.op("Sigmoid", &[&ga], &[]);
                        let glu = self.op("Mul", &[&gc, &sg], &[]);
                        let onef = self.const_f32("onef", &[], &[1.0]);
                        let u1 = self.op("Add", &[&uc, &onef], &[]);
                        self.op("Mul", &[&u1, &glu], &[])
                    }
                    // A gated MLP is SiLU-gated unless it says otherwise (as the CPU target).
                    _ => {
                        let sg = self.op("Sigmoid", &[&gt], &[]);
                        let act = self.op("Mul", &[&gt, &sg], &[]);
                        self.op("Mul", &[&act, &up], &[])
                    }
                }
            }
            None => match m.act {
                Activation::Relu => self.op("Relu", &[&up], &[]),
                Activation::GeluTanh => self.gelu_tanh(&up),
                Activation::Silu | Activation::ClampedSwiglu { .. } => {
                    let sg = self.op("Sigmoid", &[&up], &[]);
                    self.op("Mul", &[&up, &sg], &[])
                }
            },
        };
        self.linear(&hmid, &format!("{p}.down"), &m.down, bytes, b(2).as_deref())
    }

    /// Adds the (gated) shared expert of `moe` to `out`.
    fn shared(&mut self, l: usize, moe: &MoePlan, x: &str, out: String) -> Result<String, ExportError> {
        let Some(m) = &moe.shared else { return Ok(out) };
        let bytes = self.bytes;
        let mut s = self.mlp(&format!("layers.{l}.shared"), x, m, bytes)?;
        let gate = self.model.map(|m| m.config().router.shared_gate);
        if let (Some(gm), Some(SharedGate::Sigmoid)) = (&moe.shared_gate, gate) {
            let gw = self.matrix(&format!("layers.{l}.shared_gate"), gm)?;
            let gl = self.gemm(x, &gw, None); // [T, 1]
            let gs = self.op("Sigmoid", &[&gl], &[]);
            s = self.op("Mul", &[&s, &gs], &[]);
        }
        Ok(self.op("Add", &[&out, &s], &[]))
    }

    /// The routed mixture of MoE layer `l` (shared expert not included), with the route outputs.
    fn routed(&mut self, l: usize, moe: &MoePlan, x: &str) -> Result<String, ExportError> {
        let p = format!("layers.{l}");
        let model = self.model.ok_or_else(|| ExportError::Unsupported("no model".into()))?;
        let spec = model.config().router.clone();
        let (e, k) = (spec.num_experts, spec.top_k);
        let rw = self.matrix(&format!("{p}.router"), &moe.router)?;
        let rb = moe.router_bias.as_ref().map(|b| self.vector(&format!("{p}.router.bias"), b));
        let logits = self.gemm(x, &rw, rb.as_deref());
        let scores = match spec.scoring {
            Scoring::Softmax => self.op("Softmax", &[&logits], &[int("axis", -1)]),
            Scoring::Sigmoid => self.op("Sigmoid", &[&logits], &[]),
            Scoring::SoftmaxAfterTopK => logits.clone(),
            // Selects on the raw logits; its weights are computed below.
            Scoring::SparseMixer => logits.clone(),
        };
        let select = match &moe.selection_bias {
            Some(b) => {
                let bn = self.vector(&format!("{p}.router.selection_bias"), b);
                self.op("Add", &[&scores, &bn], &[])
            }
            None => scores.clone(),
        };
        let select = if spec.n_group > 1 && spec.topk_group < spec.n_group {
            self.group_limit(&p, &select, e, spec.n_group, spec.topk_group, spec.group_score)?
        } else {
            select
        };
        let kk = self.const_i64(&format!("topk.{k}"), &[1], &[k as i64]);
        let tk = self.op_n("TopK", &[&select, &kk], &[int("axis", -1), int("largest", 1), int("sorted", 1)], 2);
        let idx = tk[1].clone();
        let mut w = self.op("GatherElements", &[&scores, &idx], &[int("axis", 1)]);
        if spec.scoring == Scoring::SparseMixer {
            w = self.sparse_mixer(&p, &logits, &w, &idx, e, k, spec.sparsemixer_eps);
        }
        if spec.scoring == Scoring::SoftmaxAfterTopK {
            w = self.op("Softmax", &[&w], &[int("axis", -1)]);
        }
        if spec.norm_topk_prob {
            let axes = self.axes_last();
            let s = self.op("ReduceSum", &[&w, &axes], &[int("keepdims", 1)]);
            let s = if spec.norm_eps != 0.0 {
                let ne = self.const_f32(&format!("{p}.norm_eps"), &[], &[spec.norm_eps]);
                self.op("Add", &[&s, &ne], &[])
            } else {
                s
            };
            w = self.op("Div", &[&w, &s], &[]);
        }
        if spec.scaling_factor != 1.0 {
            let sf = self.const_f32(&format!("{p}.scaling"), &[], &[spec.scaling_factor]);
            w = self.op("Mul", &[&w, &sf], &[]);
        }
        if spec.expert_capacity > 0 {
            w = self.capacity(&p, &idx, &w, e, k, spec.expert_capacity);
        }
        let idx_out = self.op("Identity", &[&idx], &[]);
        self.rename(&idx_out, &GraphInfo::route_experts(l));
        let w_out = self.op("Identity", &[&w], &[]);
        self.rename(&w_out, &GraphInfo::route_weights(l));
        // Dense [T, E] weights, zero for unselected experts.
        let dense = self.one_hot_sum(&idx, Some(&w), e);
        let mut out: Option<String> = None;
        for (ei, ex) in moe.experts.iter().enumerate() {
            let bytes = self.bytes;
            let y = self.mlp(&format!("{p}.experts.{ei}"), x, &ex.mlp, &bytes[ex.slab.clone()])?;
            let (s, en, a) = (
                self.const_i64(&format!("col.{ei}"), &[1], &[ei as i64]),
                self.const_i64(&format!("col.{}", ei + 1), &[1], &[ei as i64 + 1]),
                self.const_i64("col.axis", &[1], &[1]),
            );
            let c = self.op("Slice", &[&dense, &s, &en, &a], &[]); // [T, 1]
            let y = self.op("Mul", &[&y, &c], &[]);
            out = Some(match out {
                None => y,
                Some(o) => self.op("Add", &[&o, &y], &[]),
            });
        }
        let _ = e;
        out.ok_or_else(|| ExportError::Unsupported(format!("{p}: MoE layer without experts")))
    }

    /// Expert capacity over the sequence in token order (Switch, `route::apply_capacity`): a
    /// choice whose expert already took `capacity` earlier choices gets weight 0 (dropped; the
    /// token's residual passes). Per choice, the running count of its expert is a `CumSum` over
    /// the flattened `[T·k, E]` one-hots (a token never picks one expert twice, so the order of
    /// its own k choices does not matter).
    fn capacity(&mut self, p: &str, idx: &str, w: &str, e: usize, k: usize, capacity: usize) -> String {
        let ar: Vec<i64> = (0..e as i64).collect();
        let cols = self.const_i64(&format!("arange.cols.{e}"), &[1, 1, e], &ar);
        let axes = self.axes_last();
        let i3 = self.op("Unsqueeze", &[idx, &axes], &[]); // [T, k, 1]
        let eq = self.op("Equal", &[&i3, &cols], &[]);
        let oh = self.op("Cast", &[&eq], &[int("to", DataType::FLOAT as i64)]); // [T, k, E]
        let flat = self.shape(&format!("shape.flat.{e}"), &[-1, e as i64]);
        let oh2 = self.op("Reshape", &[&oh, &flat], &[]); // [T·k, E]
        let ax0 = self.const_i64("axis0", &[], &[0]);
        let run = self.op("CumSum", &[&oh2, &ax0], &[]); // counts including this choice
        let mine = self.op("Mul", &[&run, &oh2], &[]);
        let axes = self.axes_last();
        let count = self.op("ReduceSum", &[&mine, &axes], &[int("keepdims", 0)]); // [T·k]
        let tk = self.shape(&format!("shape.tk.{k}"), &[-1, k as i64]);
        let count = self.op("Reshape", &[&count, &tk], &[]); // [T, k]
        let cap = self.const_f32(&format!("{p}.capacity"), &[], &[capacity as f32]);
        let keep = self.op("LessOrEqual", &[&count, &cap], &[]);
        let zero = self.const_f32("mask.zero", &[], &[0.0]);
        self.op("Where", &[&keep, w, &zero], &[])
    }

    /// `[T, n]` f32 from indices `idx` `[T, k]` (distinct per row): `w[t, j]` (or 1) at column
    /// `idx[t, j]`, 0 elsewhere. Built from `Equal` against `0..n` and a sum, not a scatter: no
    /// `Shape`-dependent op (the fixed-shape form stays static) and every EP takes it. Exact:
    /// each output is one product by 1 plus zeros.
    fn one_hot_sum(&mut self, idx: &str, w: Option<&str>, n: usize) -> String {
        let ar: Vec<i64> = (0..n as i64).collect();
        let cols = self.const_i64(&format!("arange.cols.{n}"), &[1, 1, n], &ar);
        let axes = self.axes_last();
        let i3 = self.op("Unsqueeze", &[idx, &axes], &[]); // [T, k, 1]
        let eq = self.op("Equal", &[&i3, &cols], &[]); // [T, k, n]
        let mut oh = self.op("Cast", &[&eq], &[int("to", DataType::FLOAT as i64)]);
        if let Some(w) = w {
            let w3 = self.op("Unsqueeze", &[w, &axes], &[]);
            oh = self.op("Mul", &[&oh, &w3], &[]);
        }
        let ax1 = self.const_i64("axes1", &[1], &[1]);
        self.op("ReduceSum", &[&oh, &ax1], &[int("keepdims", 0)])
    }

    /// The sparsemixer's weights (Phi-3.5-MoE, `route.rs`): `idx` `[T, k]` are the top-k of the
    /// logits in order (round r takes the r-th best, ties to the lower index as `TopK` does),
    /// `top` their logits. Round r weights its expert `1 / Σ_j exp(l_j − m)` over the experts
    /// not taken in an earlier round with `(m − l_j) / max(|l_j|, m) ≤ 2ε`, `m = top[:, r]`.
    #[allow(clippy::too_many_arguments)]
    fn sparse_mixer(&mut self, p: &str, logits: &str, top: &str, idx: &str, e: usize, k: usize, eps: f32) -> String {
        let thr = self.const_f32(&format!("{p}.sparsemixer.threshold"), &[], &[2.0 * eps]);
        let zero = self.const_f32("sparsemixer.zero", &[], &[0.0]);
        let axes = self.axes_last();
        let abs = self.op("Abs", &[logits], &[]);
        let mut ws = Vec::new();
        for r in 0..k {
            let m = self.slice(top, r, r + 1, 1); // [T, 1]
            let gap = self.op("Sub", &[&m, logits], &[]);
            let den = self.op("Max", &[&abs, &m], &[]);
            let rel = self.op("Div", &[&gap, &den], &[]);
            let masked = self.op("Greater", &[&rel, &thr], &[]);
            let mut keep = self.op("Not", &[&masked], &[]);
            if r > 0 {
                let taken = self.slice(idx, 0, r, 1);
                let taken = self.one_hot_sum(&taken, None, e); // [T, E]: 1 where taken
                let left = self.op("Equal", &[&taken, &zero], &[]);
                keep = self.op("And", &[&keep, &left], &[]);
            }
            let d = self.op("Sub", &[logits, &m], &[]);
            let x = self.op("Exp", &[&d], &[]);
            let x = self.op("Where", &[&keep, &x, &zero], &[]);
            let sum = self.op("ReduceSum", &[&x, &axes], &[int("keepdims", 1)]);
            ws.push(self.op("Reciprocal", &[&sum], &[]));
        }
        let refs: Vec<&str> = ws.iter().map(String::as_str).collect();
        self.op("Concat", &refs, &[int("axis", 1)])
    }

    /// Group-limited selection (DeepSeek, `route.rs`): experts outside the `topk_group` best
    /// of `n_group` equal groups get −∞ selection scores. A group scores the sum of its two best
    /// selection scores (`TopTwoSum`, groups of ≥ 2) or its best one; ties go to the lower
    /// group (ONNX `TopK` keeps the lower index first, as the CPU target does).
    fn group_limit(
        &mut self,
        p: &str,
        select: &str,
        e: usize,
        n_group: usize,
        topk_group: usize,
        rule: GroupScore,
    ) -> Result<String, ExportError> {
        if !e.is_multiple_of(n_group) {
            return Err(ExportError::Unsupported(format!("{p}: {e} experts in {n_group} groups")));
        }
        let per = e / n_group;
        let s3 = self.shape(&format!("shape.groups.{n_group}.{per}"), &[-1, n_group as i64, per as i64]);
        let grouped = self.op("Reshape", &[select, &s3], &[]); // [T, G, per]
        let score = if matches!(rule, GroupScore::TopTwoSum) && per >= 2 {
            let two = self.const_i64("topk.2", &[1], &[2]);
            let best = self.op_n("TopK", &[&grouped, &two], &[int("axis", -1), int("largest", 1), int("sorted", 1)], 2);
            let axes = self.axes_last();
            self.op("ReduceSum", &[&best[0], &axes], &[int("keepdims", 0)])
        } else {
            self.op("ReduceMax", &[&grouped], &[ints("axes", &[-1]), int("keepdims", 0)])
        }; // [T, G]
        let kg = self.const_i64(&format!("topk.{topk_group}"), &[1], &[topk_group as i64]);
        let best = self.op_n("TopK", &[&score, &kg], &[int("axis", -1), int("largest", 1), int("sorted", 1)], 2);
        // Kept groups: a [T, G] mask scattered from the chosen group indices.
        let kept = self.one_hot_sum(&best[1], None, n_group);
        let axes = self.axes_last();
        let kept = self.op("Unsqueeze", &[&kept, &axes], &[]); // [T, G, 1]
        let half = self.const_f32("half", &[], &[0.5]);
        let kept = self.op("Greater", &[&kept, &half], &[]);
        let ninf = self.const_f32("neg_inf", &[], &[f32::NEG_INFINITY]);
        let masked = self.op("Where", &[&kept, &grouped, &ninf], &[]);
        let s2 = self.shape(&format!("shape.experts.{e}"), &[-1, e as i64]);
        Ok(self.op("Reshape", &[&masked, &s2], &[]))
    }

    /// An MEO-native layer with a stored task merge: per bank the token block (shared dense
    /// weights) then the merged linear; `fc2(act(fc1 x))`.
    fn meo(
        &mut self,
        l: usize,
        banks: &[Bank; 2],
        merged: &[(BankExpert, Vec<f32>); 2],
        x: &str,
        act: Activation,
    ) -> Result<String, ExportError> {
        let mut h = x.to_string();
        for (b, (bank, (ex, _))) in banks.iter().zip(merged).enumerate() {
            let p = format!("layers.{l}.bank{b}");
            let mut xin = h.clone();
            if let Some(tb) = &bank.token {
                let dw = self.matrix(&format!("{p}.token.down"), &tb.down)?;
                let db = self.vector(&format!("{p}.token.down.bias"), &tb.down_bias);
                let uw = self.matrix(&format!("{p}.token.up"), &tb.up)?;
                let ub = self.vector(&format!("{p}.token.up.bias"), &tb.up_bias);
                let d = self.gemm(&xin, &dw, Some(&db));
                let d = self.op("Relu", &[&d], &[]);
                let u = self.gemm(&d, &uw, Some(&ub));
                xin = self.op("Add", &[&xin, &u], &[]);
            }
            let bytes = self.bytes;
            let slab = &bytes[ex.slab.clone()];
            let bn = self.vector_in(&format!("{p}.merged.bias"), &ex.bias, slab);
            h = self.linear(&xin, &format!("{p}.merged.weight"), &ex.weight, slab, Some(&bn))?;
            if b == 0 {
                h = match act {
                    Activation::Silu => {
                        let s = self.op("Sigmoid", &[&h], &[]);
                        self.op("Mul", &[&h, &s], &[])
                    }
                    Activation::GeluTanh => self.gelu_tanh(&h),
                    Activation::Relu => self.op("Relu", &[&h], &[]),
                    other => {
                        return Err(ExportError::Unsupported(format!("MEO bank activation {other:?}")));
                    }
                };
            }
        }
        Ok(h)
    }

    /// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
    fn gelu_tanh(&mut self, x: &str) -> String {
        let c = self.const_f32("gelu.c", &[], &[0.797_884_6]);
        let a = self.const_f32("gelu.a", &[], &[0.044_715]);
        let half = self.const_f32("gelu.half", &[], &[0.5]);
        let onec = self.const_f32("gelu.one", &[], &[1.0]);
        let x2 = self.op("Mul", &[x, x], &[]);
        let x3 = self.op("Mul", &[&x2, x], &[]);
        let ax3 = self.op("Mul", &[&x3, &a], &[]);
        let inner = self.op("Add", &[x, &ax3], &[]);
        let inner = self.op("Mul", &[&inner, &c], &[]);
        let t = self.op("Tanh", &[&inner], &[]);
        let t = self.op("Add", &[&t, &onec], &[]);
        let hx = self.op("Mul", &[x, &half], &[]);
        self.op("Mul", &[&hx, &t], &[])
    }
}

/// Head counts and widths of one attention core.
#[derive(Clone, Copy)]
struct HeadDims {
    heads: usize,
    kv_heads: usize,
    key: usize,
    value: usize,
    /// The layer adds the relative position bias to its scores.
    rel_bias: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_formats_parse() {
        assert_eq!(WeightFormat::parse("block"), Some(WeightFormat::Block));
        assert_eq!(WeightFormat::parse("channel"), Some(WeightFormat::Channel));
        assert_eq!(WeightFormat::parse("f32"), Some(WeightFormat::F32));
        assert_eq!(WeightFormat::parse("int4"), None);
    }
}
