//! Where a model runs, for `meo run` and `meo bench`: one way to open any target
//! (`--target cpu|wgpu|ort`) with the same run options. A flag the chosen target cannot honour
//! is refused with an error naming it, never dropped. The GPU target is behind the cargo
//! feature `wgpu`, ONNX Runtime behind `ort`; a build without one refuses it and says how to
//! get it.

use anyhow::{Result, bail};
use meo::{KvOptions, MergeOptions, Model, Session, SessionOptions, Target};

/// Target selection flags.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Where to run: `cpu`, `wgpu` (the GPU through Vulkan/Metal/DX12/GL; see `meo devices`) or
    /// `ort` (the model exported to ONNX, run by ONNX Runtime). `meo --version` lists the
    /// targets this binary was built with.
    #[arg(long, value_name = "TARGET", default_value = "cpu")]
    pub target: String,
    /// GPU adapter for `--target wgpu`: its index in `meo devices`, or part of its name.
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: Option<String>,
    /// Bytes of routed experts kept in GPU memory (LRU) with `--target wgpu` (default 1 GiB).
    #[arg(long, value_name = "BYTES", value_parser = super::parse_bytes)]
    pub gpu_expert_budget: Option<u64>,
    /// With --target ort: execution providers in order of preference, comma-separated (`cpu`,
    /// `xnnpack`, `nnapi`, `coreml`, `qnn`, `cuda`, `tensorrt`); `NAME!` fails if that EP is
    /// absent, others are skipped when absent. ONNX Runtime falls back to CPU per node.
    #[arg(long = "ep", value_name = "LIST")]
    pub ep: Option<String>,
    /// With --target ort: how int8 and 4-bit weights go into the graph (`block`, `channel`, `f32`;
    /// default `block`).
    #[arg(long = "onnx-weights", value_name = "block|channel|f32")]
    pub onnx_weights: Option<String>,
    /// With --target ort: print which EP ran the graph's nodes (from ONNX Runtime's profile).
    #[arg(long = "ep-report")]
    pub ep_report: bool,
    /// With `meo bench --target ort`: also run meo's CPU target on the same prompt, in the
    /// same process, and report both.
    #[arg(long = "compare-cpu")]
    pub compare_cpu: bool,
    /// With --target ort: run the fixed-shape export (`SEQ:CONTEXT`, as `export-onnx
    /// --static-shape`): calls in padded chunks of SEQ tokens over a CONTEXT-slot cache.
    #[arg(long = "onnx-static-shape", value_name = "SEQ:CONTEXT")]
    pub onnx_static_shape: Option<String>,
}

/// The targets, by `--target` spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cpu,
    Wgpu,
    Ort,
}

/// The options every target is opened with (the same for `meo run` and `meo bench`).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--threads` (0 = the default).
    pub threads: usize,
    /// `--memory-budget` was given (it bounds the mapped file's resident expert pages).
    pub memory_budget: bool,
    /// The routing mode and merge policy.
    pub mode: MergeOptions,
    /// `--kv`, `--mla-cache`.
    pub kv: KvOptions,
}

impl TargetArgs {
    /// The target `--target` names.
    ///
    /// # Errors
    /// An unknown target name.
    pub fn kind(&self) -> Result<Kind> {
        match self.target.as_str() {
            "cpu" => Ok(Kind::Cpu),
            "wgpu" => Ok(Kind::Wgpu),
            "ort" => Ok(Kind::Ort),
            t => bail!("unknown --target {t:?} (use cpu, wgpu or ort)"),
        }
    }

    /// Refuses every flag the chosen target would not honour.
    ///
    /// # Errors
    /// The first such flag, named, with the target that takes it.
    pub fn check(&self, run: &RunOptions) -> Result<Kind> {
        let kind = self.kind()?;
        let t = &self.target;
        let only = |given: bool, flag: &str, needs: Kind| -> Result<()> {
            if given && kind != needs {
                let needs = match needs {
                    Kind::Cpu => "cpu",
                    Kind::Wgpu => "wgpu",
                    Kind::Ort => "ort",
                };
                bail!("{flag} needs --target {needs} (this run uses --target {t})");
            }
            Ok(())
        };
        only(self.adapter.is_some(), "--adapter", Kind::Wgpu)?;
        only(self.gpu_expert_budget.is_some(), "--gpu-expert-budget", Kind::Wgpu)?;
        only(self.ep.is_some(), "--ep", Kind::Ort)?;
        only(self.onnx_weights.is_some(), "--onnx-weights", Kind::Ort)?;
        only(self.ep_report, "--ep-report", Kind::Ort)?;
        only(self.compare_cpu, "--compare-cpu", Kind::Ort)?;
        only(self.onnx_static_shape.is_some(), "--onnx-static-shape", Kind::Ort)?;
        if kind != Kind::Cpu && run.kv != KvOptions::default() {
            bail!("--kv and --mla-cache need --target cpu (this run uses --target {t})");
        }
        if kind == Kind::Wgpu && run.threads != 0 {
            bail!("--threads has no effect on --target wgpu (the GPU runs the kernels); leave it out");
        }
        if kind == Kind::Ort && run.memory_budget {
            bail!(
                "--memory-budget bounds the mapped file's expert pages, which --target ort does not read \
                 (ONNX Runtime runs its own copy of the weights)"
            );
        }
        Ok(kind)
    }
}

/// A model opened on the selected target.
pub enum Opened<'m> {
    Cpu(Box<Session<'m>>),
    #[cfg(feature = "wgpu")]
    Wgpu(Box<meo_wgpu::WgpuTarget<'m>>),
    #[cfg(feature = "ort")]
    Ort(Box<meo_ort::OrtTarget<'m>>),
}

impl<'m> Opened<'m> {
    /// The target, to run.
    pub fn target(&mut self) -> &mut (dyn Target + 'm) {
        match self {
            Self::Cpu(s) => &mut **s,
            #[cfg(feature = "wgpu")]
            Self::Wgpu(w) => &mut **w,
            #[cfg(feature = "ort")]
            Self::Ort(o) => &mut **o,
        }
    }

    /// The layers that run merged now (prompt merges: once the prompt has run).
    pub fn merged_layers(&self) -> Vec<usize> {
        match self {
            Self::Cpu(s) => s.merged_layers(),
            #[cfg(feature = "wgpu")]
            Self::Wgpu(w) => w.merged_layers(),
            #[cfg(feature = "ort")]
            Self::Ort(o) => o.info().merged.clone(),
        }
    }

    /// The GPU expert cache's counters (`None` on other targets).
    pub fn gpu_expert_stats(&self) -> Option<serde_json::Value> {
        match self {
            #[cfg(feature = "wgpu")]
            Self::Wgpu(w) => {
                let s = w.expert_stats();
                Some(serde_json::json!({
                    "uploads": s.uploads,
                    "hits": s.hits,
                    "evictions": s.evictions,
                    "bytes_uploaded": s.bytes_uploaded,
                    "resident_bytes": s.resident_bytes,
                    "budget": s.budget,
                }))
            }
            _ => None,
        }
    }

    /// With `--ep-report`: which EP ran the graph's nodes, one line per EP (`None` on other
    /// targets).
    ///
    /// # Errors
    /// The profile could not be read.
    pub fn ep_report(&mut self) -> Result<Option<String>> {
        match self {
            #[cfg(feature = "ort")]
            Self::Ort(o) => {
                let mut out = String::new();
                for (ep, nodes) in o.node_placement()? {
                    out.push_str(&format!("ep {ep}: {} nodes\n", nodes.len()));
                }
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }
}

/// Opens `model` on the target `t` selects, in `run.mode`; returns it with the layers that
/// run merged.
///
/// # Errors
/// A flag the target cannot honour, a target this build lacks, no (matching) GPU adapter, the
/// ONNX Runtime library missing, or a model or mode the target cannot run.
pub fn open_target<'m>(model: &'m Model, t: &TargetArgs, run: &RunOptions) -> Result<(Opened<'m>, Vec<usize>)> {
    let mut opened = match t.check(run)? {
        Kind::Cpu => Opened::Cpu(Box::new(Session::new(
            model,
            SessionOptions { threads: run.threads, kv: run.kv, ..Default::default() },
        )?)),
        Kind::Wgpu => open_wgpu(model, t)?,
        Kind::Ort => open_ort(model, t, run)?,
    };
    let merged = opened.target().set_mode(run.mode.clone())?;
    Ok((opened, merged))
}

#[cfg(feature = "wgpu")]
fn open_wgpu<'m>(model: &'m Model, t: &TargetArgs) -> Result<Opened<'m>> {
    let opts = meo_wgpu::WgpuOptions {
        adapter: t.adapter.clone(),
        expert_budget: t.gpu_expert_budget.map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX)),
        ..Default::default()
    };
    Ok(Opened::Wgpu(Box::new(meo_wgpu::WgpuTarget::new(model, opts)?)))
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu<'m>(_: &'m Model, _: &TargetArgs) -> Result<Opened<'m>> {
    bail!("this meo was built without the GPU target: rebuild with `cargo build --release -p meo-cli --features wgpu`")
}

#[cfg(feature = "ort")]
fn open_ort<'m>(model: &'m Model, a: &TargetArgs, run: &RunOptions) -> Result<Opened<'m>> {
    use anyhow::Context;
    use meo_ort::{EpChoice, OrtOptions, OrtTarget, WeightFormat};
    let eps = EpChoice::parse_list(a.ep.as_deref().unwrap_or("cpu"))?;
    let spelled = a.onnx_weights.as_deref().unwrap_or("block");
    let weights = WeightFormat::parse(spelled)
        .with_context(|| format!("--onnx-weights {spelled:?}: use block, channel or f32"))?;
    let static_shape = match &a.onnx_static_shape {
        Some(s) => Some(
            meo_ort::export::StaticShape::parse(s)
                .with_context(|| format!("--onnx-static-shape {s:?}: use SEQ:CONTEXT, both ≥ 1 (e.g. 1:512)"))?,
        ),
        None => None,
    };
    let opts = OrtOptions { eps, threads: run.threads, weights, profile: a.ep_report, static_shape };
    Ok(Opened::Ort(Box::new(OrtTarget::with_mode(model, opts, run.mode.clone())?)))
}

#[cfg(not(feature = "ort"))]
fn open_ort<'m>(_: &'m Model, _: &TargetArgs, _: &RunOptions) -> Result<Opened<'m>> {
    bail!(
        "this meo was built without ONNX Runtime support: rebuild with `cargo build --release -p meo-cli --features ort`"
    )
}
