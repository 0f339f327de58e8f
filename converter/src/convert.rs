//! Checkpoint directory → `.meo` file, one tensor at a time.
//!
//! Everything is resolved and checked (config, tensor names, shapes, unused tensors) before
//! the output is created. Then each tensor is read, converted and written before the next is
//! read, so peak memory is one tensor (as f32, plus its encoded bytes) and a constant. The
//! output is written to a temporary file beside the target and renamed over it only when
//! complete: an error or a cancellation leaves nothing behind.

use crate::canonical::{self, Canon};
use crate::hf::HfModel;
use crate::hf::checkpoint::summarize;
use crate::writer::{AtomicFile, MeoWriter, TensorSpec, WriteError};
use anyhow::{Context, Result, bail, ensure};
use meo::format::{DEFAULT_ALIGNMENT, MetaValue, Metadata};
use meo::{DType, quant};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Metadata key of the embedded `tokenizer.json`.
pub const TOKENIZER_KEY: &str = "tokenizer.huggingface.json";

/// A conversion stopped because its cancellation flag was set (Ctrl-C in `meo convert`).
/// Every long loop (reading, alignment, calibration, merging, writing) checks the flag at
/// least once a second; nothing is left at the output path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interrupted{}", .output.as_ref().map(|p| format!("; {} was not written", p.display())).unwrap_or_default())]
pub struct Cancelled {
    /// The output that was not written, once known.
    pub output: Option<std::path::PathBuf>,
}

/// `Err(Cancelled)` once `cancel` is set.
///
/// # Errors
/// [`Cancelled`].
pub fn check_cancel(cancel: &AtomicBool) -> Result<(), Cancelled> {
    if cancel.load(Ordering::Relaxed) { Err(Cancelled { output: None }) } else { Ok(()) }
}

/// A [`Cancelled`] anywhere in `e` becomes one naming `out`.
fn name_output(e: anyhow::Error, out: &Path) -> anyhow::Error {
    // Alignment's cancellation is turned into a plain `Cancelled` where it is called.
    if e.downcast_ref::<Cancelled>().is_some() { Cancelled { output: Some(out.to_path_buf()) }.into() } else { e }
}

/// Output dtypes and expert layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Routed expert matrices: `Q8_0`, `Q4_0`, `MXFP4`, `F16` or `F32`.
    pub experts: DType,
    /// Embeddings, attention, dense and shared FFN, LM head: `Q8_0`, `Q4_0`, `F16` or `F32`.
    pub dense: DType,
    /// Store every expert with its intermediate units aligned to expert 0 of its layer
    /// ([`crate::align`]; the model's function is unchanged). What uses it: task merges
    /// (`--task`, whose first pass aligns when this is set) and prompt-mode merges at run time;
    /// a plain conversion does not need it, and it is the costliest step of one (`O(i³)` per
    /// expert), so it is off unless asked for (`meo convert` turns it on with `--task`).
    pub align: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { experts: DType::Q8_0, dense: DType::F16, align: false }
    }
}

/// An owned metadata value (borrowed into [`MetaValue`] when the file is written).
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    Bool(bool),
    U64(u64),
    Str(String),
    Bytes(Vec<u8>),
    U64s(Vec<u64>),
    F64s(Vec<f64>),
    Strs(Vec<String>),
}

impl Owned {
    /// The borrowed value.
    pub fn value(&self) -> MetaValue<'_> {
        use meo::format::MetaArray;
        match self {
            Self::Bool(b) => MetaValue::Bool(*b),
            Self::U64(x) => MetaValue::U64(*x),
            Self::Str(s) => MetaValue::Str(s),
            Self::Bytes(b) => MetaValue::Bytes(b),
            Self::U64s(v) => MetaValue::Array(MetaArray::U64(v.clone())),
            Self::F64s(v) => MetaValue::Array(MetaArray::F64(v.clone())),
            Self::Strs(v) => MetaValue::Array(MetaArray::Str(v.iter().map(String::as_str).collect())),
        }
    }
}

/// Per MoE layer, per expert: the order its units are stored in (see [`crate::align`]).
pub type Orders = std::collections::BTreeMap<usize, Vec<Vec<u32>>>;

/// Computes the alignment of every MoE layer's experts to its expert 0, layer by layer, the
/// experts of a layer on all cores (each worker reads and aligns one expert at a time, so
/// memory is the reference plus one expert and its similarity matrix per core). Reports
/// [`Event::AlignStart`] and one [`Event::Aligned`] per expert, from the calling thread.
///
/// # Errors
/// Reading the checkpoint; similarities outside f32; cancellation.
pub fn alignment_orders(p: &Plan, cancel: &AtomicBool, progress: &mut dyn FnMut(Event<'_>)) -> Result<Orders> {
    use crate::canonical::Place;
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;
    let c = &p.model.config;
    let (h, i) = (c.hidden_size, c.expert_intermediate_size);
    // Per layer, per expert: the sources of gate (absent for ungated experts), up, down.
    let mut layers: BTreeMap<usize, BTreeMap<usize, [Option<&crate::hf::Source>; 3]>> = BTreeMap::new();
    for (canon, src) in p.canon.iter().zip(&p.sources) {
        if let Place::Expert { layer, expert, part } = canon.place {
            layers.entry(layer).or_default().entry(expert).or_default()[part] = Some(src);
        }
    }
    let read = |srcs: &[Option<&crate::hf::Source>; 3]| -> Result<[Vec<f32>; 3]> {
        let mut out: [Vec<f32>; 3] = Default::default();
        for (o, s) in out.iter_mut().zip(srcs) {
            if let Some(s) = s {
                *o = s.read(&p.model.checkpoint)?;
            }
        }
        Ok(out)
    };
    let total = layers.values().map(|e| e.len().saturating_sub(1)).sum();
    progress(Event::AlignStart { experts: total });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut orders = Orders::new();
    for (&layer, experts) in &layers {
        let ids: Vec<usize> = experts.keys().copied().collect();
        let Some((&first, rest)) = ids.split_first() else { continue };
        check_cancel(cancel)?;
        // The layer's first expert (expert 0) is the reference: identity.
        let r = read(&experts[&first])?;
        let reference = crate::align::ExpertF32 { gate: &r[0], up: &r[1], down: &r[2] };
        let mut by_expert = BTreeMap::from([(first, (0..i as u32).collect::<Vec<u32>>())]);
        let next = AtomicUsize::new(0);
        // Set when a worker failed: the others stop after their current expert.
        let failed = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Vec<u32>>)>();
        std::thread::scope(|s| -> Result<()> {
            for _ in 0..threads.min(rest.len()) {
                let tx = tx.clone();
                let (next, failed, read) = (&next, &failed, &read);
                s.spawn(move || {
                    while !failed.load(Ordering::Relaxed) && !cancel.load(Ordering::Relaxed) {
                        let Some(&x) = rest.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                        let res = read(&experts[&x]).and_then(|[g, u, d]| {
                            let other = crate::align::ExpertF32 { gate: &g, up: &u, down: &d };
                            crate::align::align_order(reference, other, i, h, cancel).map_err(|e| match e {
                                crate::align::AlignError::Cancelled(c) => anyhow::Error::new(c),
                                e => anyhow::Error::new(e).context(format!(
                                    "aligning expert {x} of layer {layer} to expert {first} (--align-experts off \
                                     stores experts unaligned)"
                                )),
                            })
                        });
                        if res.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        if tx.send((x, res)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let mut error = None;
            for (x, res) in rx {
                match res {
                    Ok(order) => {
                        by_expert.insert(x, order);
                        progress(Event::Aligned);
                    }
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
            error.map_or(Ok(()), Err)
        })?;
        check_cancel(cancel)?;
        orders.insert(layer, by_expert.into_values().collect());
    }
    Ok(orders)
}

/// The `merge.aligned` and `merge.align.layer.<l>.order` entries.
pub fn alignment_metadata(orders: Option<&Orders>) -> Vec<(String, Owned)> {
    let mut v = vec![(meo::names::merge_keys::ALIGNED.to_string(), Owned::Bool(orders.is_some()))];
    for (l, per_expert) in orders.into_iter().flatten() {
        let bytes = per_expert.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
        v.push((meo::names::merge_keys::align_order(*l), Owned::Bytes(bytes)));
    }
    v
}

/// Progress reports.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Something the user should know that does not stop the conversion (no tokenizer).
    Warning { message: &'a str },
    /// Expert alignment starts: `experts` experts to align (every MoE layer's but its first).
    AlignStart { experts: usize },
    /// One more expert was aligned.
    Aligned,
    /// About to write `tensors` tensors holding `bytes` bytes of data.
    Start { tensors: usize, bytes: u64 },
    /// Tensor `name` (`bytes` bytes) was written.
    Tensor { name: &'a str, bytes: u64 },
}

/// What a conversion produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub architecture: String,
    pub tensors: usize,
    pub file_bytes: u64,
    /// Bytes of tensor data in the checkpoint.
    pub checkpoint_bytes: u64,
}

/// A resolved plan: metadata, tensor specs and where each tensor comes from.
pub struct Plan {
    pub model: HfModel,
    pub canon: Vec<Canon>,
    pub sources: Vec<crate::hf::Source>,
    pub specs: Vec<TensorSpec>,
}

/// Opens `dir` and resolves every output tensor to its source.
///
/// # Errors
/// Anything wrong with the checkpoint: unsupported family, bad config, missing or
/// mis-shaped tensors, tensors the family does not use.
pub fn plan(dir: &Path, opts: Options) -> Result<Plan> {
    if !matches!(opts.experts, DType::Q8_0 | DType::Q4_0 | DType::MXFP4 | DType::F16 | DType::F32) {
        bail!("expert dtype {} is not supported (q8_0, q4_0, mxfp4, f16 or f32)", opts.experts.name());
    }
    if !matches!(opts.dense, DType::Q8_0 | DType::Q4_0 | DType::F16 | DType::F32) {
        bail!("dense dtype {} is not supported (q8_0, q4_0, f16 or f32)", opts.dense.name());
    }
    let model = HfModel::open(dir)?;
    let mut canon = canonical::tensors(&model.config);
    canon.extend(canonical::task_tensors(&model.config, &model.tasks));
    let sources = canon.iter().map(|c| model.source(c)).collect::<Result<Vec<_>>>()?;
    let used: BTreeSet<&str> = sources.iter().map(|s| s.tensor.as_str()).collect();
    let unused = model.unused(&used);
    if !unused.is_empty() {
        bail!(
            "{} checkpoint tensor(s) have no place in a {} model as configured: {}",
            unused.len(),
            model.family.name,
            summarize(&unused, 5)
        );
    }
    let specs = canon
        .iter()
        .map(|c| TensorSpec { name: c.name.clone(), dtype: c.dtype(opts.dense, opts.experts), shape: c.shape.clone() })
        .collect();
    Ok(Plan { model, canon, sources, specs })
}

/// The file's metadata: model config, quantization, tokenizer, and `extra` (alignment and
/// merge entries). Nothing about the source layout, paths or time, so equal weights give
/// equal files.
pub fn metadata<'a>(model: &'a HfModel, opts: Options, extra: &'a [(String, Owned)]) -> Metadata<'a> {
    let mut m = model.config.to_metadata();
    m.push(("quant.experts", MetaValue::Str(opts.experts.name())));
    m.push(("quant.dense", MetaValue::Str(opts.dense.name())));
    m.push(("quant.block_size", MetaValue::U64(quant::QK as u64)));
    if let Some(t) = &model.tokenizer {
        m.push((TOKENIZER_KEY, MetaValue::Str(t)));
    }
    m.extend(model.chat.entries());
    m.extend(model.generation.metadata());
    m.extend(extra.iter().map(|(k, v)| (k.as_str(), v.value())));
    Metadata::from_entries(m)
}

/// Checks that `out` can be written as a `.meo` file: it is not a directory, its parent folder
/// exists and a file can be created there (a probe, removed at once). Called before any
/// conversion work, so a bad `-o` fails in milliseconds, not after the whole conversion.
///
/// # Errors
/// `out` is a directory or has no file name, its folder is missing or not writable; the
/// message names the path.
pub fn check_output(out: &Path) -> Result<()> {
    if out.is_dir() {
        bail!("output {}: is a directory; give the path of the .meo file to write", out.display());
    }
    if out.file_name().is_none() {
        bail!("output {}: not a file path; give the path of the .meo file to write", out.display());
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("output {}: folder {} does not exist", out.display(), dir.display());
    }
    // The temporary file the conversion writes is created the same way; dropping it removes it.
    AtomicFile::create(out)
        .map(drop)
        .with_context(|| format!("output {}: cannot create a file in {}", out.display(), dir.display()))
}

/// [`encode`], with activation-aware rounding where `importance` (per input column) is given
/// and `dtype` is a block format that uses it (the 4-bit formats; Q8_0 keeps ggml's rule).
pub fn encode_with<'a>(w: &'a [f32], shape: &[u64], dtype: DType, importance: Option<&[f32]>) -> Cow<'a, [u8]> {
    match (importance, quant::Planar::of(dtype)) {
        (Some(imp), Some(_)) => {
            let cols = *shape.last().expect("non-empty shape") as usize;
            Cow::Owned(quant::quantize_as(dtype, w, w.len() / cols, cols, Some(imp)))
        }
        _ => encode(w, shape, dtype),
    }
}

/// Encodes `w` (a row-major tensor of `shape`) as `dtype`.
pub fn encode<'a>(w: &'a [f32], shape: &[u64], dtype: DType) -> Cow<'a, [u8]> {
    match dtype {
        DType::F32 if cfg!(target_endian = "little") => Cow::Borrowed(bytemuck::cast_slice(w)),
        DType::F32 => Cow::Owned(w.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::F16 => {
            let mut out = vec![0u8; w.len() * 2];
            let mut h = [half::f16::ZERO; 1024];
            for (o, x) in out.chunks_mut(2 * h.len()).zip(w.chunks(h.len())) {
                let h = &mut h[..x.len()];
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(h, x);
                for (o, v) in o.chunks_exact_mut(2).zip(h.iter()) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            Cow::Owned(out)
        }
        DType::BF16 => Cow::Owned(w.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()),
        DType::Q8_0 | DType::Q4_0 | DType::MXFP4 => {
            let cols = *shape.last().expect("non-empty shape") as usize;
            Cow::Owned(quant::quantize_as(dtype, w, w.len() / cols, cols, None))
        }
    }
}

/// An expert matrix read from a release's MXFP4 blocks, as the file's `MXFP4` tensor holding
/// the release's own codes and scales (the same nibble order and E8M0 bytes: a byte copy,
/// lossless); `None` when `src` is not MXFP4.
///
/// # Errors
/// I/O; a scale byte of 255 (NaN in E8M0, refused as the dequantizing path refuses it).
fn mxfp4_passthrough(
    ck: &crate::hf::checkpoint::Checkpoint,
    src: &crate::hf::Source,
    shape: &[u64],
) -> Result<Option<Vec<u8>>> {
    use crate::hf::quantized::Virtual;
    let Some(q @ Virtual::Mxfp4 { .. }) = ck.quantized(&src.tensor) else { return Ok(None) };
    // The canonical matrix is rows `start, start + step, …` of the release's expert (gate:
    // even rows of gate_up, up: odd rows, down: all), transposed back by the pick.
    let crate::hf::Pick::Columns { start, step, .. } = src.pick else { return Ok(None) };
    let &[rows, cols] = shape else { bail!("{}: MXFP4 expert of shape {shape:?}, not a matrix", src.tensor) };
    let x = src.first / src.count.max(1);
    let (codes, scales) = q.mxfp4_rows(ck, x, start, step)?;
    let p = quant::Planar::of(DType::MXFP4).context("MXFP4 layout")?;
    let (stride, nb) = (p.row_stride(cols).context("size")?, quant::blocks(cols).context("size")?);
    anyhow::ensure!(
        codes.len() as u64 == rows * stride && scales.len() as u64 == rows * nb && cols % quant::QK as u64 == 0,
        "{}: expert {x} rows do not make a [{rows}, {cols}] MXFP4 matrix",
        src.tensor
    );
    if let Some(k) = scales.iter().position(|&s| s == 255) {
        let scales_name = src.tensor.clone() + "_scales";
        return Err(crate::hf::checkpoint::NonFinite { tensor: scales_name, element: k as u64, value: f32::NAN }.into());
    }
    let off = p.scales_offset(rows, cols).context("size")? as usize;
    let mut out = vec![0u8; p.len(rows, cols).context("size")? as usize];
    out[..codes.len()].copy_from_slice(&codes);
    out[off..off + scales.len()].copy_from_slice(&scales);
    Ok(Some(out))
}

/// Converts the checkpoint in `dir` to `out`. `cancel` is checked between tensors; when it
/// is set the conversion stops with an error and no output is left.
///
/// # Errors
/// See [`plan`]; I/O; cancellation.
pub fn convert(
    dir: &Path,
    out: &Path,
    opts: Options,
    cancel: &AtomicBool,
    progress: impl FnMut(Event<'_>),
) -> Result<Summary> {
    convert_with(dir, out, opts, &crate::merges::MergeSpec::default(), cancel, progress)
}

/// [`convert`], plus precomputed task merges from calibration text (see [`crate::merges`]).
///
/// Without tasks the conversion is one streaming pass. With tasks it is two: an f32
/// conversion to a temporary file beside `out` (the calibration model), then the final file,
/// transcoded from it, with each task's merged experts appended. Both temporary files are
/// removed on success, error and cancellation.
///
/// Everything that can be checked cheaply is checked before any conversion work: the output
/// path ([`check_output`]), the checkpoint's config and tensors, and with tasks the tokenizer
/// and the calibration texts.
///
/// # Errors
/// See [`plan`] and [`check_output`]; a missing tokenizer or unreadable calibration text; I/O;
/// cancellation.
pub fn convert_with(
    dir: &Path,
    out: &Path,
    opts: Options,
    merges: &crate::merges::MergeSpec,
    cancel: &AtomicBool,
    progress: impl FnMut(Event<'_>),
) -> Result<Summary> {
    check_output(out)?;
    convert_inner(dir, out, opts, merges, cancel, progress).map_err(|e| name_output(e, out))
}

fn convert_inner(
    dir: &Path,
    out: &Path,
    opts: Options,
    merges: &crate::merges::MergeSpec,
    cancel: &AtomicBool,
    progress: impl FnMut(Event<'_>),
) -> Result<Summary> {
    if merges.hot_experts > 0.0 {
        ensure!(merges.calib.is_some(), "--hot-experts needs --calib TEXT: hot experts are the most selected on it");
        ensure!(
            merges.hot_experts <= 1.0 && matches!(opts.experts, DType::Q4_0 | DType::MXFP4),
            "--hot-experts {} keeps a share (0 to 1) of the experts at int8 beside 4-bit ones: use it with \
             --experts int4 or mxfp4",
            merges.hot_experts
        );
    }
    crate::compress::check_flags(merges)?;
    if merges.calib.is_some() && merges.compress.is_none() && !matches!(opts.experts, DType::Q4_0 | DType::MXFP4) {
        bail!(
            "--calib tunes the rounding of 4-bit experts (--experts int4 or mxfp4); with {} experts it would \
             change nothing",
            opts.experts.name()
        );
    }
    if !merges.calibrates() {
        return convert_single(dir, out, opts, cancel, progress);
    }
    let hf = crate::hf::HfModel::open(dir)?;
    let texts: Vec<&Path> = merges.tasks.iter().map(|t| t.text.as_path()).chain(merges.calib.as_deref()).collect();
    crate::writer::refuse_overwriting(out, hf.input_paths().iter().map(|p| p.as_path()).chain(texts))?;
    if hf.family.kind == crate::hf::Kind::MeoNative {
        bail!(
            "--task, --calib and --compress are for standard MoEs (token-routed experts); an MEO-native model's task merges \
             come from its own task gate and are always stored"
        );
    }
    let recipe = &hf.config.recipe;
    if !merges.tasks.is_empty() && (recipe.expert_bias || recipe.mlp_activation != meo::config::Activation::Silu) {
        bail!("--task merges need bias-free SiLU experts; this model's experts have biases or another activation");
    }
    // The calibration text is tokenized after the first pass; a missing or unloadable
    // tokenizer must fail before it, not after.
    let Some(tok) = &hf.tokenizer else {
        bail!(
            "--task, --calib and --compress need the checkpoint's tokenizer.json to tokenize the calibration text; {} has none",
            dir.display()
        );
    };
    meo::tokenizer::Tokenizer::from_json(tok)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
    if merges.compress.is_some() {
        return crate::compress::convert_compressed(dir, out, opts, merges, cancel, progress);
    }
    crate::merges::convert_with_tasks(dir, out, opts, merges, cancel, progress)
}

pub(crate) fn convert_single(
    dir: &Path,
    out: &Path,
    opts: Options,
    cancel: &AtomicBool,
    mut progress: impl FnMut(Event<'_>),
) -> Result<Summary> {
    let p = plan(dir, opts)?;
    let has_experts = p.canon.iter().any(|c| matches!(c.place, crate::canonical::Place::Expert { .. }));
    crate::writer::refuse_overwriting(out, p.model.input_paths().iter().map(|p| p.as_path()))?;
    if let Some(w) = p.model.tokenizer_warning() {
        progress(Event::Warning { message: &w });
    }
    let orders = if opts.align && has_experts { Some(alignment_orders(&p, cancel, &mut progress)?) } else { None };
    let mut extra = alignment_metadata(orders.as_ref());
    // MEO-native task merges: the gates (cheap) now, the merged banks when they are written.
    let gates = if p.model.tasks.is_empty() {
        Vec::new()
    } else {
        crate::hf::meo_gpt2::task_gates(&p.model.checkpoint, &p.model.config, &p.model.tasks)?
    };
    extra.extend(crate::hf::meo_gpt2::merge_metadata(&p.model.tasks, &gates));
    let Plan { model, canon, sources, specs } = p;
    let meta = metadata(&model, opts, &extra);
    let data_bytes: u64 = specs.iter().map(|s| s.dtype.byte_len(&s.shape).unwrap_or(0)).sum();
    let (atomic, file) =
        AtomicFile::create(out).with_context(|| format!("{}: cannot create the output file", out.display()))?;
    let tmp = atomic.tmp_path().display().to_string();
    let io = |e: WriteError| anyhow::Error::new(e).context(format!("writing {tmp}"));
    let mut w =
        MeoWriter::new(BufWriter::with_capacity(1 << 20, file), &meta, specs.clone(), DEFAULT_ALIGNMENT).map_err(io)?;
    progress(Event::Start { tensors: specs.len(), bytes: data_bytes });
    let keeps_mxfp4 = opts.experts == DType::MXFP4 && model.quantization == Some(crate::hf::quantized::Method::Mxfp4);
    if keeps_mxfp4 && orders.is_some() {
        // Alignment permutes down's input columns across MXFP4 blocks: no byte copy possible.
        progress(Event::Warning {
            message: "--align-experts on: the release's MXFP4 experts are dequantized, permuted and re-quantized \
                      (with alignment off their codes and scales are kept as they are)",
        });
    }
    for ((c, src), spec) in canon.iter().zip(&sources).zip(&specs) {
        check_cancel(cancel)?;
        if keeps_mxfp4
            && orders.is_none()
            && matches!(c.place, crate::canonical::Place::Expert { .. })
            && let Some(bytes) = mxfp4_passthrough(&model.checkpoint, src, &c.shape)?
        {
            w.write_tensor(&bytes).map_err(io)?;
            progress(Event::Tensor { name: &c.name, bytes: bytes.len() as u64 });
            continue;
        }
        let mut values = match c.place {
            crate::canonical::Place::TaskBank { task, layer, bank, part } => {
                crate::hf::meo_gpt2::task_bank_values(&model.checkpoint, layer, bank, part, &gates[task][layer][bank])?
            }
            _ => src.read(&model.checkpoint)?,
        };
        if let (Some(o), crate::canonical::Place::Expert { layer, expert, part }) = (&orders, c.place) {
            let (h, i) = (model.config.hidden_size, model.config.expert_intermediate_size);
            values = crate::align::permute(&values, &o[&layer][expert], i, h, part == 2);
        }
        // Gate and up biases follow their rows; the down bias is per output, unpermuted.
        if let (Some(o), crate::canonical::Place::ExpertBias { layer, expert, part: 0 | 1 }) = (&orders, c.place) {
            values =
                crate::align::permute(&values, &o[&layer][expert], model.config.expert_intermediate_size, 1, false);
        }
        let bytes = encode(&values, &c.shape, spec.dtype);
        w.write_tensor(&bytes).map_err(io)?;
        progress(Event::Tensor { name: &c.name, bytes: bytes.len() as u64 });
    }
    let file = w.finish().map_err(io)?.into_inner().map_err(|e| io(WriteError::Io(e.into_error())))?;
    let file_bytes = file.metadata().map_err(|e| io(e.into()))?.len();
    atomic.commit(file).with_context(|| format!("{}: cannot move the finished file into place", out.display()))?;
    Ok(Summary {
        architecture: model.config.architecture.clone(),
        tensors: specs.len(),
        file_bytes,
        checkpoint_bytes: model.checkpoint.data_bytes(),
    })
}
