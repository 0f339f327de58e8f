//! `meo export-onnx FILE [--task NAME] -o model.onnx`: the model as a static ONNX graph
//! (task-merged: a dense decoder of single-expert cost; vanilla: routing in the graph). See
//! docs/ONNX.md.

use super::{human_bytes, open_model};
use anyhow::{Context, Result};
use meo::{LayerSelect, MergeOptions, Mode};
use meo_ort::export::{self, ExportOptions, StaticShape, WeightFormat};
use std::path::PathBuf;

/// Export a .meo model to ONNX (opset 17, KV cache as explicit inputs/outputs).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
    /// Export the task merge `NAME` (stored by `meo convert --task NAME=...`); without it the
    /// graph routes every MoE layer (vanilla, every expert as a subgraph).
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
    /// With --task: the MoE layers that run merged (`all` or a list `0,2,5`); the others route.
    #[arg(long, value_name = "all|LIST", default_value = "all")]
    pub merge_layers: String,
    /// How int8 and 4-bit matrices are written: `block` (exact: the file's 32-wide blocks;
    /// int8 per-axis DequantizeLinear, int4 com.microsoft MatMulNBits, mxfp4 decoded in the
    /// graph), `channel` (requantised to int8 per output row: the QDQ form NPU EPs fold), `f32`
    /// (dequantised).
    #[arg(long, value_name = "block|channel|f32", default_value = "block")]
    pub weights: String,
    /// A fixed-shape graph for NPU EPs (NNAPI, QNN HTP, Core ML compile static shapes only):
    /// `SEQ` tokens per call (padded) over a `CONTEXT`-slot KV cache written in place, with an
    /// int64 `[1]` input `position`. E.g. `1:512` (decode) and `64:512` (prompt chunks).
    #[arg(long, value_name = "SEQ:CONTEXT")]
    pub static_shape: Option<String>,
    /// Write the weights to `<OUT>.data` (ONNX external data); automatic above 1 GiB.
    #[arg(long)]
    pub external_data: bool,
    /// Output file.
    #[arg(short = 'o', long = "output", value_name = "OUT.onnx")]
    pub output: PathBuf,
}

/// Runs `meo export-onnx`.
///
/// # Errors
/// An unreadable model, an unknown task or layer, a recipe feature the exporter does not
/// write yet ("unsupported in export: …"), or I/O.
pub fn run(a: &Args) -> Result<()> {
    let model = open_model(&a.file)?;
    let weights = WeightFormat::parse(&a.weights)
        .with_context(|| format!("--weights {:?}: use block, channel or f32", a.weights))?;
    let merge = match &a.task {
        Some(t) => MergeOptions { mode: Mode::Task(t.clone()), layers: LayerSelect::parse(&a.merge_layers, 0.0)? },
        None => MergeOptions::default(),
    };
    let static_shape = match &a.static_shape {
        Some(s) => Some(
            StaticShape::parse(s)
                .with_context(|| format!("--static-shape {s:?}: use SEQ:CONTEXT, both ≥ 1 (e.g. 1:512)"))?,
        ),
        None => None,
    };
    let e = export::export(&model, &ExportOptions { merge, weights, static_shape })?;
    let external = export::write(&e, &a.output, a.external_data)?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({}{}): {} nodes, merged layers {:?}, routed layers {:?}",
        a.output.display(),
        human_bytes(size),
        if external { ", weights in .data beside it" } else { "" },
        e.model.graph.node.len(),
        e.info.merged,
        e.info.routed
    );
    Ok(())
}
