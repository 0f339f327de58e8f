//! [`OrtTarget`]: a [`meo::Target`] running an exported graph in ONNX Runtime.

use crate::export::{self, ExportOptions, GraphInfo, POSITION_INPUT, StaticShape, WeightFormat};
use meo::{Choice, ExecPlan, LayerExec, Logits, MergeOptions, MergedUse, Model, Target, TargetError, Trace};
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::value::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// An ONNX Runtime execution provider meo can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ep {
    Cpu,
    Xnnpack,
    Nnapi,
    CoreMl,
    Qnn,
    Cuda,
    TensorRt,
}

impl Ep {
    pub const ALL: [Ep; 7] = [Ep::Cpu, Ep::Xnnpack, Ep::Nnapi, Ep::CoreMl, Ep::Qnn, Ep::Cuda, Ep::TensorRt];

    /// The CLI name (`cpu`, `xnnpack`, `nnapi`, `coreml`, `qnn`, `cuda`, `tensorrt`).
    pub fn name(self) -> &'static str {
        match self {
            Ep::Cpu => "cpu",
            Ep::Xnnpack => "xnnpack",
            Ep::Nnapi => "nnapi",
            Ep::CoreMl => "coreml",
            Ep::Qnn => "qnn",
            Ep::Cuda => "cuda",
            Ep::TensorRt => "tensorrt",
        }
    }

    /// ONNX Runtime's identifier (`CPUExecutionProvider`, …), as profiles and logs name it.
    pub fn ort_name(self) -> &'static str {
        match self {
            Ep::Cpu => ep::CPU::NAME,
            Ep::Xnnpack => ep::XNNPACK::NAME,
            Ep::Nnapi => ep::NNAPI::NAME,
            Ep::CoreMl => ep::CoreML::NAME,
            Ep::Qnn => ep::QNN::NAME,
            Ep::Cuda => ep::CUDA::NAME,
            Ep::TensorRt => ep::TensorRT::NAME,
        }
    }

    pub fn parse(s: &str) -> Option<Ep> {
        Ep::ALL.into_iter().find(|e| e.name() == s)
    }

    fn dispatch(self) -> ep::ExecutionProviderDispatch {
        match self {
            Ep::Cpu => ep::CPU::default().build(),
            Ep::Xnnpack => ep::XNNPACK::default().build(),
            Ep::Nnapi => ep::NNAPI::default().build(),
            Ep::CoreMl => ep::CoreML::default().build(),
            Ep::Qnn => ep::QNN::default().build(),
            Ep::Cuda => ep::CUDA::default().build(),
            Ep::TensorRt => ep::TensorRT::default().build(),
        }
    }
}

/// One requested EP: `required` ones fail session creation when absent; others are skipped
/// (and the skip is reported in [`OrtTarget::describe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpChoice {
    pub ep: Ep,
    pub required: bool,
}

impl EpChoice {
    /// Parses a comma-separated preference list: `xnnpack,cpu`; a trailing `!` makes an EP
    /// required (`qnn!,cpu`).
    ///
    /// # Errors
    /// An unknown EP name (the message lists the known ones).
    pub fn parse_list(s: &str) -> Result<Vec<EpChoice>, OrtError> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let p = p.trim();
                let (name, required) = match p.strip_suffix('!') {
                    Some(n) => (n, true),
                    None => (p, false),
                };
                let ep = Ep::parse(name).ok_or_else(|| OrtError::UnknownEp {
                    name: name.into(),
                    known: Ep::ALL.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
                })?;
                Ok(EpChoice { ep, required })
            })
            .collect()
    }
}

/// Options of an [`OrtTarget`].
#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// EPs in order of preference; the CPU EP is always ONNX Runtime's last fallback.
    pub eps: Vec<EpChoice>,
    /// Intra-op threads (0 = ONNX Runtime's default).
    pub threads: usize,
    /// How int8 weights are written into the graph.
    pub weights: WeightFormat,
    /// Record an ONNX Runtime profile, from which [`OrtTarget::node_placement`] reads which EP
    /// ran each node.
    pub profile: bool,
    /// Run the fixed-shape export (what NPU EPs compile): calls are split into chunks of
    /// `seq` tokens, padded, over a `context`-slot cache.
    pub static_shape: Option<StaticShape>,
}

impl Default for OrtOptions {
    fn default() -> Self {
        Self {
            eps: vec![EpChoice { ep: Ep::Cpu, required: false }],
            threads: 0,
            weights: WeightFormat::Block,
            profile: false,
            static_shape: None,
        }
    }
}

/// Why the ONNX Runtime target could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error(
        "could not load the ONNX Runtime library {path}: {reason} (set ORT_DYLIB_PATH, or run ci/setup to put \
         it in .ort/)"
    )]
    Library { path: PathBuf, reason: String },
    #[error("execution provider {ep} is required but not available in this ONNX Runtime build (it has: {available})")]
    EpMissing { ep: &'static str, available: String },
    #[error("unknown execution provider {name:?} (known: {known})")]
    UnknownEp { name: String, known: String },
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("onnxruntime: {0}")]
    Ort(String),
}

fn ort_err(e: impl std::fmt::Display) -> OrtError {
    OrtError::Ort(e.to_string())
}

static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime library (once per process) from [`crate::library_path`] and creates
/// the environment.
///
/// # Errors
/// The library is missing or cannot be loaded (ONNX Runtime older than 1.31 is refused).
pub fn init() -> Result<&'static ort::environment::Environment, OrtError> {
    let path = crate::library_path();
    let r = ENV.get_or_init(|| {
        let b = ort::init_from(&path).map_err(|e| e.to_string())?;
        b.with_name("meo").build().map_err(|e| e.to_string())
    });
    r.as_ref().map_err(|reason| OrtError::Library { path, reason: reason.clone() })
}

/// The EPs this ONNX Runtime library was built with (of those meo knows).
///
/// # Errors
/// The library cannot be loaded.
pub fn available_eps() -> Result<Vec<Ep>, OrtError> {
    init()?;
    let mut out = Vec::new();
    for e in Ep::ALL {
        let ok = match e {
            Ep::Cpu => ep::CPU::is_available(),
            Ep::Xnnpack => ep::XNNPACK::is_available(),
            Ep::Nnapi => ep::NNAPI::is_available(),
            Ep::CoreMl => ep::CoreML::is_available(),
            Ep::Qnn => ep::QNN::is_available(),
            Ep::Cuda => ep::CUDA::is_available(),
            Ep::TensorRt => ep::TensorRT::is_available(),
        }
        .map_err(ort_err)?;
        if ok {
            out.push(e);
        }
    }
    Ok(out)
}

/// A model exported to ONNX and run by ONNX Runtime, one sequence at a time.
pub struct OrtTarget<'m> {
    model: &'m Model,
    opts: OrtOptions,
    /// The runtime's execution plan the graph was exported from.
    plan: ExecPlan,
    session: Session,
    info: GraphInfo,
    /// EPs registered, and those asked for but absent (skipped).
    registered: Vec<Ep>,
    skipped: Vec<Ep>,
    /// Per layer (key, value) `[kv_heads, pos, width]` flattened (`[kv_heads, context, width]`
    /// in the fixed-shape form), or a recurrent layer's (convolution, delta-rule) state.
    kv: Vec<(Vec<f32>, Vec<f32>)>,
    pos: usize,
    logits: Vec<f32>,
    profile_dir: Option<tempfile_dir::Dir>,
}

/// A private temporary directory for profiles (removed on drop).
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl<'m> OrtTarget<'m> {
    /// Exports `model` in vanilla mode and opens it (see [`OrtTarget::set_mode`] for others).
    ///
    /// # Errors
    /// The library cannot be loaded, a required EP is absent, the model cannot be exported, or
    /// ONNX Runtime refuses the graph.
    pub fn new(model: &'m Model, opts: OrtOptions) -> Result<Self, OrtError> {
        Self::with_mode(model, opts, MergeOptions::default())
    }

    /// As [`new`](Self::new), in routing mode `mode`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_mode(model: &'m Model, opts: OrtOptions, mode: MergeOptions) -> Result<Self, OrtError> {
        let (session, info, registered, skipped, profile_dir) = open(model, &opts, &mode)?;
        let plan = ExecPlan::new(model, mode).map_err(|e| OrtError::Export(export::ExportError::Mode(e)))?;
        let kv = GraphInfo::empty_cache(&info);
        Ok(Self { model, opts, plan, session, info, registered, skipped, kv, pos: 0, logits: Vec::new(), profile_dir })
    }

    /// The graph's interface.
    pub fn info(&self) -> &GraphInfo {
        &self.info
    }

    /// EPs registered for this session, in order.
    pub fn registered_eps(&self) -> &[Ep] {
        &self.registered
    }

    /// Which EP ran each node, read from ONNX Runtime's profile (needs `profile: true` and at
    /// least one forward call): EP identifier → node names. Ends the profile; later calls
    /// are not profiled.
    ///
    /// # Errors
    /// Profiling was off, or the profile could not be read.
    pub fn node_placement(&mut self) -> Result<BTreeMap<String, Vec<String>>, OrtError> {
        if self.profile_dir.is_none() {
            return Err(OrtError::Ort("profiling is off (OrtOptions::profile)".into()));
        }
        let file = self.session.end_profiling().map_err(ort_err)?;
        let text = std::fs::read_to_string(&file).map_err(ort_err)?;
        placement_from_profile(&text)
    }

    /// One graph call on `tokens` (in the fixed-shape form: at most `seq`, padded here).
    fn run(&mut self, tokens: &[u32]) -> Result<Outputs, OrtError> {
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::new();
        let mut ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let slots = match self.info.static_shape {
            Some(s) => {
                ids.resize(s.seq, 0);
                let pos = Tensor::from_array(([1usize], vec![self.pos as i64])).map_err(ort_err)?;
                inputs.push((POSITION_INPUT.into(), pos.into()));
                s.context
            }
            None => self.pos,
        };
        inputs.push(("input_ids".into(), Tensor::from_array(([ids.len()], ids)).map_err(ort_err)?.into()));
        for (l, (k, v)) in self.kv.iter().enumerate() {
            for ((name, shape), data) in self.info.past(l, slots).into_iter().zip([k, v]) {
                let t = Tensor::from_array((shape, data.clone())).map_err(ort_err)?;
                inputs.push((name, t.into()));
            }
        }
        let outputs = self.session.run(inputs).map_err(ort_err)?;
        let mut out = BTreeMap::new();
        for (name, value) in outputs.iter() {
            if name.starts_with("route.") && name.ends_with(".experts") {
                let (shape, data) = value.try_extract_tensor::<i64>().map_err(ort_err)?;
                let shape = shape.iter().map(|&d| d as usize).collect();
                out.insert(name.to_string(), (shape, Vec::new(), data.to_vec()));
            } else {
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err)?;
                let shape = shape.iter().map(|&d| d as usize).collect();
                out.insert(name.to_string(), (shape, data.to_vec(), Vec::new()));
            }
        }
        Ok(out)
    }
}

impl OrtTarget<'_> {
    /// One graph call: updates the cache and position, reports routing, appends the logits of
    /// `tokens` (padded rows dropped) to `logits`.
    fn step(&mut self, tokens: &[u32], trace: &mut dyn Trace, logits: &mut Vec<f32>) -> Result<(), TargetError> {
        let device = |e: OrtError| TargetError::Device { target: "ort".into(), reason: e.to_string() };
        let mut out = self.run(tokens).map_err(device)?;
        let t = tokens.len();
        let take = |out: &mut Outputs, n: &str| {
            out.remove(n).ok_or_else(|| TargetError::Device { target: "ort".into(), reason: format!("no output {n}") })
        };
        for l in 0..self.info.num_layers {
            // A KV cache, or a recurrent layer's state (see `export::LayerState`).
            // (A layer with one `present_*` output keeps an empty second.)
            let mut names = self.info.present(l).into_iter();
            let mut next = |out: &mut Outputs| names.next().map_or(Ok(Vec::new()), |n| take(out, &n).map(|o| o.1));
            self.kv[l] = (next(&mut out)?, next(&mut out)?);
        }
        let k = self.info.top_k;
        for &l in &self.info.routed.clone() {
            let idx = take(&mut out, &GraphInfo::route_experts(l))?.2;
            let w = take(&mut out, &GraphInfo::route_weights(l))?.1;
            report_routes(trace, l, self.pos, t, k, &idx, &w);
        }
        for &l in &self.info.merged {
            match self.plan.layers().get(l) {
                Some(LayerExec::TaskMerge { task, index }) => {
                    let slab = self.model.tasks()[*task].layers[*index].expert.slab.clone();
                    trace.on_merged(l, t, &MergedUse::File(slab));
                }
                Some(LayerExec::MeoTask { task, index }) => {
                    for (bank, _) in &self.model.meo_tasks()[*task].layers[*index].banks {
                        trace.on_merged(l, t, &MergedUse::File(bank.slab.clone()));
                    }
                }
                _ => {}
            }
        }
        let all = take(&mut out, "logits")?.1;
        logits.extend_from_slice(&all[..t * self.info.vocab]);
        self.pos += t;
        Ok(())
    }
}

/// Graph outputs by name: (shape, f32 data, i64 data).
type Outputs = BTreeMap<String, (Vec<usize>, Vec<f32>, Vec<i64>)>;

type Opened = (Session, GraphInfo, Vec<Ep>, Vec<Ep>, Option<tempfile_dir::Dir>);

fn open(model: &Model, opts: &OrtOptions, mode: &MergeOptions) -> Result<Opened, OrtError> {
    let env = init()?;
    let available = available_eps()?;
    let (mut registered, mut skipped, mut dispatch) = (Vec::new(), Vec::new(), Vec::new());
    for c in &opts.eps {
        if available.contains(&c.ep) {
            registered.push(c.ep);
            let d = c.ep.dispatch();
            dispatch.push(if c.required { d.error_on_failure() } else { d });
        } else if c.required {
            return Err(OrtError::EpMissing {
                ep: c.ep.ort_name(),
                available: available.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
            });
        } else {
            skipped.push(c.ep);
        }
    }
    let exported = export::export(
        model,
        &ExportOptions { merge: mode.clone(), weights: opts.weights, static_shape: opts.static_shape },
    )?;
    let bytes = exported.to_bytes()?;
    let mut b = Session::builder(env).map_err(ort_err)?;
    b = b.with_execution_providers(dispatch).map_err(ort_err)?;
    if opts.threads > 0 {
        b = b.with_intra_threads(opts.threads).map_err(ort_err)?;
    }
    let profile_dir = if opts.profile {
        let dir = std::env::temp_dir().join(format!("meo-ort-profile-{}-{:p}", std::process::id(), &bytes));
        std::fs::create_dir_all(&dir).map_err(ort_err)?;
        b = b.with_profiling(dir.join("profile")).map_err(ort_err)?;
        Some(tempfile_dir::Dir(dir))
    } else {
        None
    };
    let session = b.commit_from_memory(&bytes).map_err(ort_err)?;
    Ok((session, exported.info, registered, skipped, profile_dir))
}

/// EP identifier → node names, from an ONNX Runtime profile (a JSON array of trace events whose
/// node events carry `args.provider`).
fn placement_from_profile(text: &str) -> Result<BTreeMap<String, Vec<String>>, OrtError> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| OrtError::Ort(format!("profile is not JSON: {e}")))?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ev in &events {
        let (Some(name), Some(p)) =
            (ev.get("name").and_then(|n| n.as_str()), ev.pointer("/args/provider").and_then(|p| p.as_str()))
        else {
            continue;
        };
        // Node events are named `<node>_kernel_time` (plus fence events); keep one per node.
        let Some(node) = name.strip_suffix("_kernel_time") else { continue };
        let v = out.entry(p.to_string()).or_default();
        if !v.iter().any(|n| n == node) {
            v.push(node.to_string());
        }
    }
    Ok(out)
}

impl Target for OrtTarget<'_> {
    fn name(&self) -> &str {
        "ort"
    }

    fn describe(&self) -> String {
        let reg: Vec<&str> = self.registered.iter().map(|e| e.name()).collect();
        let mut s = format!("ort (ONNX Runtime, EPs {}", if reg.is_empty() { "cpu".into() } else { reg.join(",") });
        if !self.skipped.is_empty() {
            let sk: Vec<&str> = self.skipped.iter().map(|e| e.name()).collect();
            s += &format!("; not in this build, skipped: {}", sk.join(","));
        }
        if !self.info.merged.is_empty() {
            s += &format!("; task-merged layers {:?}, no routing reported for them", self.info.merged);
        }
        if self.opts.threads > 0 {
            s += &format!("; {} threads", self.opts.threads);
        }
        s + ")"
    }

    fn forward(&mut self, tokens: &[u32], which: Logits, trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        let vocab = self.info.vocab;
        if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            return Err(meo::ForwardError::TokenOutOfRange { index, token, vocab }.into());
        }
        let max = self.info.max_positions;
        if max > 0 && self.pos + tokens.len() > max {
            return Err(meo::ForwardError::ContextOverflow { cached: self.pos, tokens: tokens.len(), max }.into());
        }
        if self.info.encoder.is_some() {
            return Err(meo::ForwardError::EncoderOnly.into());
        }
        self.logits.clear();
        if tokens.is_empty() {
            return Ok(&self.logits);
        }
        if let Some(s) = self.info.static_shape
            && self.pos + tokens.len() > s.context
        {
            return Err(
                meo::ForwardError::ContextOverflow { cached: self.pos, tokens: tokens.len(), max: s.context }.into()
            );
        }
        let chunk = self.info.static_shape.map_or(tokens.len(), |s| s.seq);
        let mut logits = Vec::with_capacity(tokens.len() * vocab);
        for part in tokens.chunks(chunk) {
            self.step(part, trace, &mut logits)?;
        }
        let t = tokens.len();
        self.logits = match which {
            Logits::All => logits,
            Logits::Last => logits[(t - 1) * vocab..].to_vec(),
        };
        Ok(&self.logits)
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.kv = GraphInfo::empty_cache(&self.info);
    }

    fn encode(&mut self, tokens: &[u32], trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        let Some(hidden) = self.info.encoder else {
            return Err(TargetError::Unsupported { target: "ort".into(), what: "encode (a decoder model)".into() });
        };
        let vocab = self.info.vocab;
        if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            return Err(meo::ForwardError::TokenOutOfRange { index, token, vocab }.into());
        }
        let max = self.info.max_positions;
        if max > 0 && tokens.len() > max {
            return Err(meo::ForwardError::ContextOverflow { cached: 0, tokens: tokens.len(), max }.into());
        }
        self.pos = 0;
        self.logits.clear();
        if tokens.is_empty() {
            return Ok(&self.logits);
        }
        let device = |e: OrtError| TargetError::Device { target: "ort".into(), reason: e.to_string() };
        let mut out = self.run(tokens).map_err(device)?;
        let take = |out: &mut Outputs, n: &str| {
            out.remove(n).ok_or_else(|| TargetError::Device { target: "ort".into(), reason: format!("no output {n}") })
        };
        let (t, k) = (tokens.len(), self.info.top_k);
        for &l in &self.info.routed.clone() {
            let idx = take(&mut out, &GraphInfo::route_experts(l))?.2;
            let w = take(&mut out, &GraphInfo::route_weights(l))?.1;
            report_routes(trace, l, 0, t, k, &idx, &w);
        }
        self.logits = take(&mut out, export::ENCODER_OUTPUT)?.1;
        if self.logits.len() != t * hidden {
            return Err(TargetError::Device { target: "ort".into(), reason: "encoder output shape".into() });
        }
        self.pos = t;
        Ok(&self.logits)
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn max_context(&self) -> usize {
        match (self.info.static_shape, self.info.max_positions) {
            (Some(s), 0) => s.context,
            (Some(s), m) => s.context.min(m),
            (None, 0) => usize::MAX,
            (None, m) => m,
        }
    }

    fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, TargetError> {
        let (session, info, registered, skipped, profile_dir) =
            open(self.model, &self.opts, &opts).map_err(|e| match e {
                OrtError::Export(export::ExportError::Mode(m)) => TargetError::Mode(m),
                OrtError::Export(export::ExportError::Unsupported(what)) => {
                    TargetError::Unsupported { target: "ort".into(), what }
                }
                e => TargetError::Device { target: "ort".into(), reason: e.to_string() },
            })?;
        self.kv = GraphInfo::empty_cache(&info);
        (self.session, self.info, self.registered, self.skipped, self.profile_dir) =
            (session, info, registered, skipped, profile_dir);
        self.plan = ExecPlan::new(self.model, opts)?;
        self.pos = 0;
        Ok(self.info.merged.clone())
    }
}

/// Reports the routing of layer `l` for `t` tokens from the graph's route outputs (`[t, k]`
/// indices best-first and weights), ascending by expert as the CPU reports it.
pub fn report_routes(trace: &mut dyn Trace, l: usize, pos0: usize, t: usize, k: usize, idx: &[i64], w: &[f32]) {
    for i in 0..t.min(idx.len() / k.max(1)) {
        let mut ch: Vec<Choice> = (0..k)
            .map(|j| Choice { expert: idx[i * k + j] as u32, weight: w.get(i * k + j).copied().unwrap_or(0.0) })
            .collect();
        ch.sort_by_key(|c| c.expert);
        trace.on_route(l, pos0 + i, &ch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ep_lists_parse_in_order_with_required_marks() {
        let l = EpChoice::parse_list("qnn!, xnnpack,cpu").unwrap();
        let got: Vec<(Ep, bool)> = l.iter().map(|c| (c.ep, c.required)).collect();
        assert_eq!(got, [(Ep::Qnn, true), (Ep::Xnnpack, false), (Ep::Cpu, false)]);
        let e = EpChoice::parse_list("cpu,npu").unwrap_err().to_string();
        assert!(e.contains("\"npu\"") && e.contains("coreml"), "{e}");
        for ep in Ep::ALL {
            assert_eq!(Ep::parse(ep.name()), Some(ep));
            assert!(ep.ort_name().ends_with("ExecutionProvider"), "{}", ep.ort_name());
        }
    }

    #[test]
    fn placement_reads_node_events_once_per_node() {
        let profile = r#"[
            {"cat":"Session","name":"model_run","args":{}},
            {"cat":"Node","name":"Gemm_3_kernel_time","args":{"op_name":"Gemm","provider":"XnnpackExecutionProvider"}},
            {"cat":"Node","name":"Gemm_3_kernel_time","args":{"op_name":"Gemm","provider":"XnnpackExecutionProvider"}},
            {"cat":"Node","name":"TopK_9_fence_before","args":{"op_name":"TopK"}},
            {"cat":"Node","name":"TopK_9_kernel_time","args":{"op_name":"TopK","provider":"CPUExecutionProvider"}}
        ]"#;
        let p = placement_from_profile(profile).unwrap();
        assert_eq!(p["XnnpackExecutionProvider"], ["Gemm_3"]);
        assert_eq!(p["CPUExecutionProvider"], ["TopK_9"]);
        assert!(placement_from_profile("not json").is_err());
    }
}
