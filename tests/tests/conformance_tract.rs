//! Conformance of the exported ONNX graphs in pure Rust (tract): the shared suite over the
//! vanilla export, so the export is checked on machines without ONNX Runtime. The tract
//! target is test-only (tract is a dev-dependency: slow to build, not shipped).

use meo::{Logits, MergeOptions, Model, Target, TargetError, Trace};
use meo_ort::export::{self, ExportOptions, GraphInfo, StaticShape, WeightFormat};
use meo_tests::conformance::{Runner, TargetRunner};
use std::path::Path;
use tract_onnx::prelude::*;

type Plan = std::sync::Arc<TypedRunnableModel>;

/// An exported graph run by tract, one sequence at a time.
pub struct TractTarget<'m> {
    model: &'m Model,
    weights: WeightFormat,
    static_shape: Option<StaticShape>,
    plan: Plan,
    info: GraphInfo,
    kv: Vec<(Vec<f32>, Vec<f32>)>,
    pos: usize,
    logits: Vec<f32>,
}

fn device(e: impl std::fmt::Display) -> TargetError {
    TargetError::Device { target: "tract".into(), reason: format!("{e:#}") }
}

fn compile(
    model: &Model,
    mode: &MergeOptions,
    weights: WeightFormat,
    static_shape: Option<StaticShape>,
) -> Result<(Plan, GraphInfo), TargetError> {
    let e = export::export(model, &ExportOptions { merge: mode.clone(), weights, static_shape })
        .map_err(|e| TargetError::Unsupported { target: "tract".into(), what: e.to_string() })?;
    let bytes = e.to_bytes().map_err(device)?;
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(device)?;
    Ok((plan, e.info))
}

impl<'m> TractTarget<'m> {
    pub fn new(model: &'m Model, mode: MergeOptions, weights: WeightFormat) -> Result<Self, TargetError> {
        Self::with_static_shape(model, mode, weights, None)
    }

    /// The fixed-shape export (`static_shape`), or the dynamic one.
    pub fn with_static_shape(
        model: &'m Model,
        mode: MergeOptions,
        weights: WeightFormat,
        static_shape: Option<StaticShape>,
    ) -> Result<Self, TargetError> {
        let (plan, info) = compile(model, &mode, weights, static_shape)?;
        let kv = GraphInfo::empty_cache(&info);
        Ok(Self { model, weights, static_shape, plan, info, kv, pos: 0, logits: Vec::new() })
    }

    /// One graph call on at most `seq` tokens (padded in the fixed-shape form): appends the
    /// logits of `tokens` to `all`.
    fn step(&mut self, tokens: &[u32], trace: &mut dyn Trace, all: &mut Vec<f32>) -> Result<(), TargetError> {
        let t = tokens.len();
        let (nkv, kd, vd) = (self.info.kv_heads, self.info.head_dim, self.info.value_dim);
        let mut ids: Vec<i64> = tokens.iter().map(|&x| i64::from(x)).collect();
        let mut inputs: TVec<TValue> = tvec![];
        let slots = match self.info.static_shape {
            Some(s) => {
                ids.resize(s.seq, 0);
                s.context
            }
            None => self.pos,
        };
        inputs.push(Tensor::from_shape(&[ids.len()], &ids).map_err(device)?.into());
        if self.info.static_shape.is_some() {
            inputs.push(Tensor::from_shape(&[1], &[self.pos as i64]).map_err(device)?.into());
        }
        for (k, v) in &self.kv {
            inputs.push(Tensor::from_shape(&[nkv, slots, kd], k).map_err(device)?.into());
            inputs.push(Tensor::from_shape(&[nkv, slots, vd], v).map_err(device)?.into());
        }
        let out = self.plan.run(inputs).map_err(device)?;
        let f32s = |i: usize| -> Result<Vec<f32>, TargetError> {
            Ok(out[i].to_plain_array_view::<f32>().map_err(device)?.iter().copied().collect())
        };
        // Outputs in graph order: logits, (present key, value) per layer, (experts, weights) per routed layer.
        let logits = f32s(0)?;
        let width = self.info.encoder.unwrap_or(self.info.vocab);
        all.extend_from_slice(&logits[..t * width]);
        for l in 0..self.kv.len() {
            self.kv[l] = (f32s(1 + 2 * l)?, f32s(2 + 2 * l)?);
        }
        let base = 1 + 2 * self.kv.len();
        for (j, &l) in self.info.routed.iter().enumerate() {
            let idx: Vec<i64> =
                out[base + 2 * j].to_plain_array_view::<i64>().map_err(device)?.iter().copied().collect();
            let w = f32s(base + 2 * j + 1)?;
            meo_ort::report_routes(trace, l, self.pos, t, self.info.top_k, &idx, &w);
        }
        self.pos += t;
        Ok(())
    }
}

impl Target for TractTarget<'_> {
    fn name(&self) -> &str {
        "tract"
    }
    fn describe(&self) -> String {
        format!("tract {} (pure Rust), merged layers {:?}", env!("CARGO_PKG_VERSION"), self.info.merged)
    }
    fn forward(&mut self, tokens: &[u32], which: Logits, trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        let vocab = self.info.vocab;
        if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            return Err(meo::ForwardError::TokenOutOfRange { index, token, vocab }.into());
        }
        if self.info.encoder.is_some() {
            return Err(meo::ForwardError::EncoderOnly.into());
        }
        if tokens.is_empty() {
            self.logits.clear();
            return Ok(&self.logits);
        }
        if let Some(s) = self.info.static_shape
            && self.pos + tokens.len() > s.context
        {
            return Err(
                meo::ForwardError::ContextOverflow { cached: self.pos, tokens: tokens.len(), max: s.context }.into()
            );
        }
        let t = tokens.len();
        let chunk = self.info.static_shape.map_or(t.max(1), |s| s.seq);
        let mut logits = Vec::with_capacity(t * vocab);
        for part in tokens.chunks(chunk) {
            self.step(part, trace, &mut logits)?;
        }
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
            return Err(TargetError::Unsupported { target: "tract".into(), what: "encode (a decoder model)".into() });
        };
        self.pos = 0;
        self.logits.clear();
        if !tokens.is_empty() {
            // Outputs in graph order: hidden, then (experts, weights) per routed layer; one call.
            let mut all = Vec::new();
            self.step(tokens, trace, &mut all)?;
            if all.len() != tokens.len() * hidden {
                return Err(device("encoder output shape"));
            }
            self.logits = all;
        }
        Ok(&self.logits)
    }
    fn position(&self) -> usize {
        self.pos
    }
    fn max_context(&self) -> usize {
        self.model.config().max_position_embeddings
    }
    fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, TargetError> {
        let (plan, info) = compile(self.model, &opts, self.weights, self.static_shape)?;
        self.kv = GraphInfo::empty_cache(&info);
        (self.plan, self.info, self.pos) = (plan, info, 0);
        Ok(self.info.merged.clone())
    }
}

fn open_tract(path: &Path) -> Box<dyn Runner> {
    let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open model")));
    let t = TractTarget::new(model, MergeOptions::default(), WeightFormat::Block)
        .unwrap_or_else(|e| panic!("tract target: {e}"));
    Box::new(TargetRunner(t))
}

meo_tests::conformance_suite!(&open_tract);
meo_tests::encoder_suite!(&open_tract);

/// The fixed-shape export (`--static-shape`) through the same suite in tract: 5-token calls
/// (padded) over a 32-slot cache written in place.
mod static_shape {
    use super::*;

    fn open_static(path: &Path) -> Box<dyn Runner> {
        let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open model")));
        let shape = StaticShape { seq: 5, context: 32 };
        let t = TractTarget::with_static_shape(model, MergeOptions::default(), WeightFormat::Block, Some(shape))
            .unwrap_or_else(|e| panic!("tract target: {e}"));
        assert_eq!(t.info.static_shape, Some(shape));
        Box::new(TargetRunner(t))
    }

    meo_tests::conformance_suite!(&open_static);
}

/// Every fixture exports (the suite above runs them all); what stays refused — a fixed-shape
/// encoder — is refused by name; an encoder graph refuses decoding and a decoder graph encoding.
#[test]
fn what_stays_refused_is_refused_by_name() {
    use meo::Target;
    let tmp = tempfile::tempdir().unwrap();
    let path =
        meo_tests::conformance::convert_fixture("switch_transformers", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let e = TractTarget::with_static_shape(
        &model,
        MergeOptions::default(),
        WeightFormat::Block,
        Some(StaticShape { seq: 5, context: 32 }),
    )
    .err()
    .expect("a fixed-shape encoder is refused")
    .to_string();
    assert!(e.contains("fixed-shape encoder"), "{e}");
    let mut t = TractTarget::new(&model, MergeOptions::default(), WeightFormat::Block).unwrap();
    let e = t.forward(&[1, 2], meo::Logits::All, &mut meo::NoTrace).unwrap_err().to_string();
    assert!(e.contains("encoder"), "{e}");
    let path = meo_tests::conformance::convert_fixture("qwen3_moe", meo::DType::F32, meo::DType::F32, tmp.path());
    let model = Model::open(&path).unwrap();
    let mut t = TractTarget::new(&model, MergeOptions::default(), WeightFormat::Block).unwrap();
    let e = t.encode(&[1, 2], &mut meo::NoTrace).unwrap_err().to_string();
    assert!(e.contains("encode"), "{e}");
}

/// Recipe combinations no fixture has (`portable_recipe_variants`), f32 weights (int8 experts
/// are compared with transformers by the int8 suite: the CPU also quantises activations), in the
/// dynamic and fixed-shape forms: the same logits (within the suite's tolerance) and the same
/// routing as the CPU target.
#[test]
fn synthetic_recipe_variants_match_the_cpu() {
    use meo_ort::export::StaticShape;
    meo_tests::conformance::check_recipe_variants(&|m, fixed| {
        let shape = fixed.then_some(StaticShape { seq: 5, context: 24 });
        let t = TractTarget::with_static_shape(m, MergeOptions::default(), WeightFormat::Block, shape);
        Box::new(TargetRunner(t.unwrap_or_else(|e| panic!("{e}"))))
    });
}
