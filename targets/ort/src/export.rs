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
//! `past`. Opset 17, standard domain only.
//!
//! int8 matrices (`q8_0` in the file) are written as `DequantizeLinear` with per-axis scales
//! ([`WeightFormat`]); other matrices as f32.

use meo::config::{Activation, NormKind, QkNorm, Scoring, SharedGate};
use meo::kernels::MatRef;
use meo::model::plan::{Attention, AttnPlan, Bank, BankExpert, FfnPlan, Mat, Mlp, MoePlan, Vector};
use meo::{DType, LayerSelect, MergeOptions, Mode, Model};
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
/// The IR version written (ONNX 1.13+, ORT 1.14+, tract 0.23).
pub const IR_VERSION: i64 = 8;
/// Above this many bytes of weights, [`write`] puts them in an external-data file (protobuf
/// messages are limited to 2 GiB).
pub const EXTERNAL_DATA_THRESHOLD: usize = 1 << 30;

/// How int8 (`q8_0`) matrices are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Exact: the file's blocks of 32 as int8 `[rows · blocks, 32]` with one scale per block,
    /// `DequantizeLinear(axis = 0)` then `Reshape` to `[rows, cols]`. Matches the CPU target.
    #[default]
    Block,
    /// Requantised to one symmetric scale per output row, `DequantizeLinear(axis = 0)` straight
    /// into the `Gemm`: the QDQ weight pattern NPU EPs (QNN HTP, NNAPI) fold into int8 kernels.
    /// Adds a second rounding (within one int8 step of the block values).
    Channel,
    /// Dequantised to f32 initializers (4× the size; for EPs that take no `DequantizeLinear`).
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

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Routing mode and layers: `Vanilla`, or `Task(name)` with `All` or listed layers.
    pub merge: MergeOptions,
    pub weights: WeightFormat,
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
    /// The mode names a task or layer the file does not have.
    #[error(transparent)]
    Mode(#[from] meo::ModeError),
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("encoding the ONNX protobuf: {0}")]
    Encode(String),
}

/// The graph's interface, as a runtime needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphInfo {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// MoE layers routed in the graph (with `route.L.*` outputs), ascending.
    pub routed: Vec<usize>,
    pub top_k: usize,
    /// Layers running a stored task merge, ascending.
    pub merged: Vec<usize>,
    /// Maximum positions (past + seq); 0 = unbounded.
    pub max_positions: usize,
}

impl GraphInfo {
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
    check_recipe(model)?;
    let merged = merged_layers(model, &opts.merge)?;
    let mut g = Builder { model: Some(model), bytes: model.bytes(), weights: opts.weights, ..Default::default() };
    let (h, vocab) = (c.hidden_size, c.vocab_size);
    let (nkv, hd) = (c.num_kv_heads, c.head_dim);
    let eps = c.rms_norm_eps;
    let kind = c.recipe.norm;
    let gp = model.global_plans();

    // Inputs and positions.
    g.input("input_ids", DataType::INT64, &[Dim::Sym("seq")]);
    for l in 0..c.num_layers {
        for name in [GraphInfo::past_key(l), GraphInfo::past_value(l)] {
            g.input(&name, DataType::FLOAT, &[Dim::Fixed(nkv), Dim::Sym("past"), Dim::Fixed(hd)]);
        }
    }
    let one = g.const_i64("one", &[], &[1]);
    let zero = g.const_i64("zero", &[], &[0]);
    let seq_shape = g.op("Shape", &["input_ids"], &[]);
    let seq = g.op("Gather", &[&seq_shape, &zero], &[int("axis", 0)]);
    let past_shape = g.op("Shape", &[&GraphInfo::past_key(0)], &[]);
    let past = g.op("Gather", &[&past_shape, &one], &[int("axis", 0)]);
    let total = g.op("Add", &[&past, &seq], &[]);
    let positions = g.op("Range", &[&past, &total, &one], &[]); // [T] int64
    let keys = g.op("Range", &[&zero, &total, &one], &[]); // [S] int64

    // Embedding (+ learned positions).
    let embed = g.matrix("embed", gp.embed)?;
    let mut x = g.op("Gather", &[&embed, "input_ids"], &[int("axis", 0)]);
    if let Some(pe) = gp.pos_embed {
        let pe = g.matrix("pos_embed", pe)?;
        let p = g.op("Gather", &[&pe, &positions], &[int("axis", 0)]);
        x = g.op("Add", &[&x, &p], &[]);
    }

    // RoPE tables `[T, 1, hd]` (cos and sin, each half repeated), shared by every layer.
    let rope = if model.layer_plans().iter().any(|l| gqa(&l.attn).is_ok_and(|a| a.rope)) {
        let inv = g.const_f32("rope.inv_freq", &[1, gp.rope.inv_freq.len()], &gp.rope.inv_freq);
        let pf = g.op("Cast", &[&positions], &[int("to", DataType::FLOAT as i64)]);
        let axes1 = g.const_i64("axes1", &[1], &[1]);
        let pf = g.op("Unsqueeze", &[&pf, &axes1], &[]);
        let ang = g.op("Mul", &[&pf, &inv], &[]);
        let (cos, sin) = (g.op("Cos", &[&ang], &[]), g.op("Sin", &[&ang], &[]));
        let cos = g.op("Concat", &[&cos, &cos], &[int("axis", 1)]);
        let sin = g.op("Concat", &[&sin, &sin], &[int("axis", 1)]);
        Some((g.op("Unsqueeze", &[&cos, &axes1], &[]), g.op("Unsqueeze", &[&sin, &axes1], &[])))
    } else {
        None
    };

    // Causal masks `[T, S]` (0 or -1e30), one per window size.
    let mut masks: BTreeMap<usize, String> = BTreeMap::new();
    let axes1 = g.const_i64("axes1", &[1], &[1]);
    let axes0 = g.const_i64("axes0", &[1], &[0]);
    let qpos = g.op("Unsqueeze", &[&positions, &axes1], &[]); // [T, 1]
    let kpos = g.op("Unsqueeze", &[&keys, &axes0], &[]); // [1, S]
    let neg = g.const_f32("mask.neg", &[], &[-1e30]);
    let zf = g.const_f32("mask.zero", &[], &[0.0]);
    for plan in model.layer_plans() {
        let w = gqa(&plan.attn)?.window;
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

    let mut routed = Vec::new();
    for (l, plan) in model.layer_plans().iter().enumerate() {
        let p = format!("layers.{l}");
        let attn = gqa(&plan.attn)?;
        let hn = g.norm(&format!("{p}.attn_norm"), &x, &attn.norm, attn.norm_bias.as_ref(), kind, eps)?;
        let y = g.attention(l, attn, &hn, rope.as_ref(), &masks[&attn.window], eps)?;
        x = g.op("Add", &[&x, &y], &[]);
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
                _ => {
                    return Err(ExportError::Unsupported(format!(
                        "MEO-native layer {l} without a task merge (sequence-level gates are computed from \
                         the prompt at run time; export a task: --task NAME)"
                    )));
                }
            },
        };
        x = g.op("Add", &[&x, &y], &[]);
    }
    let hn = g.norm("output_norm", &x, gp.output_norm, gp.output_norm_bias, kind, eps)?;
    let head = if c.tie_word_embeddings { embed } else { g.matrix("output", gp.output)? };
    let logits = g.gemm(&hn, &head, None);
    g.rename(&logits, "logits");
    g.output("logits", DataType::FLOAT, &[Dim::Sym("seq"), Dim::Fixed(vocab)]);
    for l in 0..c.num_layers {
        for name in [GraphInfo::present_key(l), GraphInfo::present_value(l)] {
            g.output(&name, DataType::FLOAT, &[Dim::Fixed(nkv), Dim::Sym("total"), Dim::Fixed(hd)]);
        }
    }
    let k = c.router.top_k;
    for &l in &routed {
        g.output(&GraphInfo::route_experts(l), DataType::INT64, &[Dim::Sym("seq"), Dim::Fixed(k)]);
        g.output(&GraphInfo::route_weights(l), DataType::FLOAT, &[Dim::Sym("seq"), Dim::Fixed(k)]);
    }
    let _ = h;
    let info = GraphInfo {
        num_layers: c.num_layers,
        kv_heads: nkv,
        head_dim: hd,
        vocab,
        routed,
        top_k: k,
        merged: merged.keys().copied().collect(),
        max_positions: c.max_position_embeddings,
    };
    let doc = match &opts.merge.mode {
        Mode::Task(t) => format!("meo export: task-merged ({t}), layers {:?} merged", info.merged),
        _ => "meo export: vanilla routing".to_string(),
    };
    Ok(Exported { model: g.finish(&c.architecture, doc), info })
}

/// A layer's stored merge.
enum Merged<'m> {
    Moe(&'m meo::model::plan::Expert),
    Meo(&'m [(BankExpert, Vec<f32>); 2]),
}

fn merged_layers<'m>(model: &'m Model, m: &MergeOptions) -> Result<BTreeMap<usize, Merged<'m>>, ExportError> {
    let mut out = BTreeMap::new();
    match &m.mode {
        Mode::Vanilla => {}
        Mode::Prompt(_) => {
            return Err(ExportError::Unsupported(
                "prompt mode (its merge depends on the prompt; export a task merge instead)".into(),
            ));
        }
        Mode::Task(name) => {
            if let Some(t) = model.meo_tasks().iter().find(|t| t.name == *name) {
                for tl in &t.layers {
                    out.insert(tl.layer, Merged::Meo(&tl.banks));
                }
                return Ok(out);
            }
            let task = model.task(name)?;
            let layers: Vec<usize> = match &m.layers {
                LayerSelect::All => task.layers.iter().map(|t| t.layer).collect(),
                LayerSelect::Layers(ls) => ls.clone(),
                LayerSelect::Auto { budget } => {
                    task.layers.iter().filter(|t| t.error.is_some_and(|e| e <= *budget)).map(|t| t.layer).collect()
                }
            };
            for l in layers {
                let tl = task.layers.iter().find(|t| t.layer == l).ok_or_else(|| meo::ModeError::NotStored {
                    task: name.clone(),
                    layer: l,
                    stored: task.layers.iter().map(|t| t.layer).collect(),
                })?;
                out.insert(l, Merged::Moe(&tl.expert));
            }
        }
    }
    Ok(out)
}

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
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }],
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
            (DType::Q8_0, WeightFormat::Channel) => {
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
        rope: Option<&(String, String)>,
        mask: &str,
        eps: f32,
    ) -> Result<String, ExportError> {
        let p = format!("layers.{l}.attn");
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        if nkv == 0 || nh % nkv != 0 {
            return Err(ExportError::Unsupported(format!("{p}: {nh} heads over {nkv} kv heads")));
        }
        let g = nh / nkv;
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
            let (cos, sin) = rope.ok_or_else(|| ExportError::Unsupported(format!("{p}: RoPE without tables")))?;
            q = self.rotate(&q, cos, sin, hd);
            k = self.rotate(&k, cos, sin, hd);
        }
        // KV cache: [kv_heads, past + T, hd].
        let perm = [1, 0, 2];
        let kt = self.op("Transpose", &[&k], &[ints("perm", &perm)]);
        let vt = self.op("Transpose", &[&v], &[ints("perm", &perm)]);
        let pk = self.op("Concat", &[&GraphInfo::past_key(l), &kt], &[int("axis", 1)]);
        let pv = self.op("Concat", &[&GraphInfo::past_value(l), &vt], &[int("axis", 1)]);
        self.rename(&pk, &GraphInfo::present_key(l));
        self.rename(&pv, &GraphInfo::present_value(l));
        let (pk, pv) = (GraphInfo::present_key(l), GraphInfo::present_value(l));
        // Grouped query: q [T, nh, hd] → [kv, g, T, hd]; k, v [kv, 1, S, hd] broadcast over g.
        let q4s = self.shape(&format!("shape.q4.{nkv}.{g}.{hd}"), &[-1, nkv as i64, g as i64, hd as i64]);
        let q4 = self.op("Reshape", &[&q, &q4s], &[]);
        let q4 = self.op("Transpose", &[&q4], &[ints("perm", &[1, 2, 0, 3])]);
        let ax1 = self.const_i64("axes1", &[1], &[1]);
        let k4 = self.op("Unsqueeze", &[&pk, &ax1], &[]);
        let k4 = self.op("Transpose", &[&k4], &[ints("perm", &[0, 1, 3, 2])]);
        let v4 = self.op("Unsqueeze", &[&pv, &ax1], &[]);
        let s = self.op("MatMul", &[&q4, &k4], &[]);
        let sc = self.const_f32(&format!("{p}.scale"), &[], &[a.scale]);
        let s = self.op("Mul", &[&s, &sc], &[]);
        let s = self.op("Add", &[&s, mask], &[]);
        let s = self.op("Softmax", &[&s], &[int("axis", -1)]);
        let o = self.op("MatMul", &[&s, &v4], &[]); // [kv, g, T, hd]
        let o = self.op("Transpose", &[&o], &[ints("perm", &[2, 0, 1, 3])]);
        let os = self.shape(&format!("shape.o.{}", nh * hd), &[-1, (nh * hd) as i64]);
        let o = self.op("Reshape", &[&o, &os], &[]);
        let ow = self.matrix(&format!("{p}.o.weight"), &a.o)?;
        let ob = a.o_bias.as_ref().map(|b| self.vector(&format!("{p}.o.bias"), b));
        Ok(self.gemm(&o, &ow, ob.as_deref()))
    }

    fn qk_norm_weights(&mut self, p: &str, a: &AttnPlan) -> Result<(String, String), ExportError> {
        match (&a.q_norm, &a.k_norm) {
            (Some(q), Some(k)) => Ok((self.vector(&format!("{p}.q_norm"), q), self.vector(&format!("{p}.k_norm"), k))),
            _ => Err(ExportError::Unsupported(format!("{p}: q/k norm without weights"))),
        }
    }

    /// `x · cos + rotate_half(x) · sin` on `[T, heads, hd]`.
    fn rotate(&mut self, x: &str, cos: &str, sin: &str, hd: usize) -> String {
        let half = (hd / 2) as i64;
        let (z, hh, end, ax) = (
            self.const_i64("rot.zero", &[1], &[0]),
            self.const_i64(&format!("rot.half.{half}"), &[1], &[half]),
            self.const_i64(&format!("rot.end.{hd}"), &[1], &[hd as i64]),
            self.const_i64("rot.axis", &[1], &[2]),
        );
        let x1 = self.op("Slice", &[x, &z, &hh, &ax], &[]);
        let x2 = self.op("Slice", &[x, &hh, &end, &ax], &[]);
        let n2 = self.op("Neg", &[&x2], &[]);
        let r = self.op("Concat", &[&n2, &x1], &[int("axis", 2)]);
        let a = self.op("Mul", &[x, cos], &[]);
        let b = self.op("Mul", &[&r, sin], &[]);
        self.op("Add", &[&a, &b], &[])
    }

    /// `down(silu(gate x) ⊙ up x)` with the matrices over `bytes`.
    fn mlp(&mut self, p: &str, x: &str, m: &Mlp, bytes: &[u8]) -> Result<String, ExportError> {
        let gate =
            m.gate.as_ref().ok_or_else(|| ExportError::Unsupported(format!("{p}: ungated MLP (ReLU experts)")))?;
        if m.bias.is_some() || !matches!(m.act, Activation::Silu) {
            return Err(ExportError::Unsupported(format!("{p}: MLP biases or activation {:?}", m.act)));
        }
        let gw = self.matrix_in(&format!("{p}.gate"), gate, bytes)?;
        let uw = self.matrix_in(&format!("{p}.up"), &m.up, bytes)?;
        let dw = self.matrix_in(&format!("{p}.down"), &m.down, bytes)?;
        let gt = self.gemm(x, &gw, None);
        let sg = self.op("Sigmoid", &[&gt], &[]);
        let act = self.op("Mul", &[&gt, &sg], &[]);
        let up = self.gemm(x, &uw, None);
        let hmid = self.op("Mul", &[&act, &up], &[]);
        Ok(self.gemm(&hmid, &dw, None))
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
        if spec.n_group > 1 && spec.topk_group < spec.n_group {
            return Err(ExportError::Unsupported(format!("{p}: group-limited routing (n_group {})", spec.n_group)));
        }
        if spec.expert_capacity > 0 {
            return Err(ExportError::Unsupported(format!("{p}: expert capacity {}", spec.expert_capacity)));
        }
        let (e, k) = (spec.num_experts, spec.top_k);
        let rw = self.matrix(&format!("{p}.router"), &moe.router)?;
        let rb = moe.router_bias.as_ref().map(|b| self.vector(&format!("{p}.router.bias"), b));
        let logits = self.gemm(x, &rw, rb.as_deref());
        let scores = match spec.scoring {
            Scoring::Softmax => self.op("Softmax", &[&logits], &[int("axis", -1)]),
            Scoring::Sigmoid => self.op("Sigmoid", &[&logits], &[]),
            Scoring::SoftmaxAfterTopK => logits.clone(),
        };
        let select = match &moe.selection_bias {
            Some(b) => {
                let bn = self.vector(&format!("{p}.router.selection_bias"), b);
                self.op("Add", &[&scores, &bn], &[])
            }
            None => scores.clone(),
        };
        let kk = self.const_i64(&format!("topk.{k}"), &[1], &[k as i64]);
        let tk = self.op_n("TopK", &[&select, &kk], &[int("axis", -1), int("largest", 1), int("sorted", 1)], 2);
        let idx = tk[1].clone();
        let mut w = self.op("GatherElements", &[&scores, &idx], &[int("axis", 1)]);
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
        let idx_out = self.op("Identity", &[&idx], &[]);
        self.rename(&idx_out, &GraphInfo::route_experts(l));
        let w_out = self.op("Identity", &[&w], &[]);
        self.rename(&w_out, &GraphInfo::route_weights(l));
        // Dense [T, E] weights, zero for unselected experts.
        let shp = self.op("Shape", &[&scores], &[]);
        let zeros = self.op(
            "ConstantOfShape",
            &[&shp],
            &[AttributeProto {
                t: protobuf::MessageField::some(TensorProto {
                    data_type: DataType::FLOAT as i32,
                    dims: vec![1],
                    raw_data: 0f32.to_le_bytes().to_vec(),
                    ..Default::default()
                }),
                ..attr("value", AttributeType::TENSOR)
            }],
        );
        let dense = self.op("ScatterElements", &[&zeros, &idx, &w], &[int("axis", 1)]);
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
            let w = self.matrix_in(&format!("{p}.merged.weight"), &ex.weight, slab)?;
            let bn = self.vector_in(&format!("{p}.merged.bias"), &ex.bias, slab);
            h = self.gemm(&xin, &w, Some(&bn));
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

/// The q/k/v attention plan of a layer (the exporter does not write MLA yet).
fn gqa(a: &Attention) -> Result<&AttnPlan, ExportError> {
    match a {
        Attention::Gqa(a) => Ok(a),
        Attention::Mla(_) => Err(ExportError::Unsupported("multi-head latent attention (MLA, DeepSeek)".into())),
    }
}

/// Recipe features the graph writer does not implement yet: refused by name, never exported
/// wrong.
fn check_recipe(model: &Model) -> Result<(), ExportError> {
    let r = &model.config().recipe;
    let refuse = |what: &str| Err(ExportError::Unsupported(what.into()));
    if r.encoder_only || r.positions == meo::Positions::Relative {
        return refuse("encoder-only models with relative position bias (Switch Transformers)");
    }
    if model.global_plans().rope.interleave {
        return refuse("RoPE on interleaved pairs (DeepSeek)");
    }
    if r.embedding_multiplier != 1.0 || r.residual_multiplier != 1.0 || r.logits_scaling != 1.0 {
        return refuse("embedding/residual multipliers and logits scaling (Granite-MoE)");
    }
    if r.attention_sinks {
        return refuse("attention sinks (GPT-OSS)");
    }
    if r.expert_bias || !matches!(r.mlp_activation, Activation::Silu) {
        return refuse("expert biases or a clamped SwiGLU (GPT-OSS)");
    }
    for plan in model.layer_plans() {
        gqa(&plan.attn)?;
    }
    Ok(())
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
