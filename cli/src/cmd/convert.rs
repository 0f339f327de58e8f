//! `meo convert HF_DIR -o OUT.meo [--experts int8|int4|mxfp4|f16|f32] [--dense int8|int4|f16|f32]`

use anyhow::Result;
use clap::builder::TypedValueParser;
use meo::DType;
use meo_converter::convert::{Event, Options, convert_with};
use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// Storage of the routed experts.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertType {
    /// Symmetric int8, blocks of 32 along the input dimension, f16 scales (Q8_0).
    Int8,
    /// Symmetric int4, blocks of 32, f16 scales (Q4_0): 0.53× the bytes of int8.
    Int4,
    /// OCP MXFP4 (E2M1 values, an E8M0 scale per 32; gpt-oss's format): 0.5× int8's bytes.
    /// An MXFP4 release (gpt-oss) keeps its own codes and scales, losslessly.
    Mxfp4,
    F16,
    F32,
}

/// Storage of the dense matrices (embeddings, attention, dense/shared FFN, LM head).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseType {
    /// Q8_0 (int8 with an f16 scale per 32 values, as the experts): the fewest bytes per
    /// token; slightly less exact than f16.
    Int8,
    /// Q4_0 (as `--experts int4`): the fewest bytes; embeddings and LM head included.
    Int4,
    F16,
    F32,
}

/// Convert a Hugging Face MoE checkpoint directory into one .meo file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory: config.json, model.safetensors or model.safetensors.index.json
    /// with its shards, and (optionally) tokenizer.json.
    pub hf_dir: PathBuf,
    /// Output file (written to a temporary file beside it, renamed when complete).
    #[arg(short, long, value_name = "OUT.meo")]
    pub output: PathBuf,
    /// Routed expert storage.
    #[arg(long, value_enum, default_value_t = ExpertType::Int8)]
    pub experts: ExpertType,
    /// Dense matrix storage (norms, biases and routers are always f32).
    #[arg(long, value_enum, default_value_t = DenseType::F16)]
    pub dense: DenseType,
    /// Store each expert's intermediate units aligned to expert 0 of its layer (the model's
    /// function is unchanged; merges then average matching units). `auto`: on with --task
    /// (task merges use it), off otherwise; turn it on for files run with `--mode prompt`.
    #[arg(long, value_enum, default_value_t = AlignExperts::Auto)]
    pub align_experts: AlignExperts,
    /// Precompute the MEO merge of task NAME from the calibration text in FILE (repeatable);
    /// run it with `meo run --mode task:NAME`.
    #[arg(long = "task", value_name = "NAME=FILE")]
    pub tasks: Vec<meo_converter::merges::TaskSpec>,
    /// How task merge weights are computed from the calibration routing.
    #[arg(long, default_value = "mean-gate", value_parser = clap::builder::PossibleValuesParser::new(
        meo_converter::merges::Weighting::ALL.map(|w| w.cli_name())
    ).try_map(|s| s.parse::<meo_converter::merges::Weighting>()))]
    pub merge_weighting: meo_converter::merges::Weighting,
    /// Calibration text: 4-bit experts choose their scales for the error of W·x on the
    /// inputs each expert sees on it (activation-aware rounding), and --hot-experts picks from
    /// its routing.
    #[arg(long, value_name = "TEXT")]
    pub calib: Option<PathBuf>,
    /// Keep this share (0 to 1) of each layer's experts, the most selected on --calib, at
    /// int8 beside 4-bit ones (--experts int4 or mxfp4).
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub hot_experts: f64,
    /// Compress the experts at conversion: METHOD:FRACTION removes FRACTION of each MoE
    /// layer's routed experts, chosen on --calib (needed). Methods: `prune` (the experts the
    /// calibration routing selects least), `reap` (the lowest mean gate weight × output norm),
    /// `mc-smoe` (merge them into the most used, by router similarity), `eep` (search the kept
    /// sets for the lowest KL against the original on the calibration text).
    /// The router's rows of removed experts are dropped (docs/ROUTING.md).
    #[arg(long, value_name = "METHOD:FRACTION")]
    pub compress: Option<meo_converter::compress::CompressSpec>,
    /// Store the merged experts `meo run --on-miss merged` runs in place of an expert that is
    /// not in memory: the task merge `miss` of --calib (needed), every expert weighted as
    /// --merge-weighting says (`frequency`: by how often the calibration text routes to it).
    #[arg(long)]
    pub miss_merge: bool,
}

/// Whether experts are aligned.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignExperts {
    /// When something in this conversion uses it (task merges).
    Auto,
    On,
    Off,
}

impl Args {
    /// The conversion options these flags select.
    pub fn options(&self) -> Options {
        Options {
            experts: match self.experts {
                ExpertType::Int8 => DType::Q8_0,
                ExpertType::Int4 => DType::Q4_0,
                ExpertType::Mxfp4 => DType::MXFP4,
                ExpertType::F16 => DType::F16,
                ExpertType::F32 => DType::F32,
            },
            dense: match self.dense {
                DenseType::Int8 => DType::Q8_0,
                DenseType::Int4 => DType::Q4_0,
                DenseType::F16 => DType::F16,
                DenseType::F32 => DType::F32,
            },
            align: match self.align_experts {
                AlignExperts::On => true,
                AlignExperts::Off => false,
                AlignExperts::Auto => !self.tasks.is_empty() || self.miss_merge,
            },
        }
    }

    /// The task merges these flags ask for.
    pub fn merges(&self) -> meo_converter::merges::MergeSpec {
        let mut tasks = self.tasks.clone();
        if let (true, Some(calib)) = (self.miss_merge, &self.calib) {
            tasks.push(meo_converter::merges::TaskSpec { name: meo::MISS_TASK.into(), text: calib.clone() });
        }
        meo_converter::merges::MergeSpec {
            tasks,
            weighting: self.merge_weighting,
            calib: self.calib.clone(),
            hot_experts: self.hot_experts,
            compress: self.compress,
        }
    }
}

static CANCEL: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C set [`CANCEL`] (checked between tensors) instead of killing the process, so
/// the temporary output file is removed on the way out.
fn install_ctrlc() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // If a handler cannot be installed, Ctrl-C keeps its default action; the temporary
        // file is then left behind, but no partial output under the target name.
        let _ = ctrlc::set_handler(|| CANCEL.store(true, Ordering::Relaxed));
    });
}

pub fn run(args: &Args) -> Result<()> {
    if args.miss_merge && args.calib.is_none() {
        anyhow::bail!("--miss-merge needs --calib TEXT (the calibration text the merge is weighted on)");
    }
    install_ctrlc();
    let bar = super::byte_bar(0);
    let align_bar = std::cell::RefCell::new(None::<indicatif::ProgressBar>);
    let result = convert_with(&args.hf_dir, &args.output, args.options(), &args.merges(), &CANCEL, |e| match e {
        Event::AlignStart { experts } => {
            let b =
                indicatif::ProgressBar::with_draw_target(Some(experts as u64), indicatif::ProgressDrawTarget::stderr());
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} experts aligned ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            *align_bar.borrow_mut() = Some(b);
        }
        Event::Warning { message } => bar.suspend(|| eprintln!("warning: {message}")),
        Event::Aligned => {
            if let Some(b) = &*align_bar.borrow() {
                b.inc(1);
            }
        }
        Event::Start { bytes, .. } => {
            if let Some(b) = align_bar.borrow_mut().take() {
                b.finish_and_clear();
            }
            bar.set_length(bytes)
        }
        Event::Tensor { name, bytes } => {
            bar.inc(bytes);
            bar.set_message(name.to_string());
        }
    });
    bar.finish_and_clear();
    let s = result?;
    super::print_stdout(&format!(
        "wrote {}: {} ({} tensors, {} bytes; checkpoint tensor data {} bytes)\n",
        args.output.display(),
        s.architecture,
        s.tensors,
        s.file_bytes,
        s.checkpoint_bytes
    ))
}
