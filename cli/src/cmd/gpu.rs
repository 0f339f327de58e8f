//! Where a model runs: `--target cpu|wgpu` and `--adapter` for `meo run` / `meo bench`, and
//! `meo devices` (the GPU adapters wgpu finds). The GPU target is behind the default-on cargo
//! feature `wgpu`; without it `--target wgpu` is refused with a message saying so.

use anyhow::{Result, bail};
use meo::{Model, Session, SessionOptions, Target};

/// Target selection flags.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Where to run: `cpu`, `wgpu` (the GPU through Vulkan/Metal/DX12/GL; see `meo devices`) or
    /// `ort` (the model exported to ONNX, run by ONNX Runtime; build with `--features ort`).
    #[arg(long, value_name = "TARGET", default_value = "cpu")]
    pub target: String,
    /// GPU adapter for `--target wgpu`: its index in `meo devices`, or part of its name.
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: Option<String>,
    /// Bytes of routed experts kept in GPU memory (LRU) with `--target wgpu` (default 1 GiB).
    #[arg(long, value_name = "BYTES", value_parser = super::run::parse_bytes)]
    pub gpu_expert_budget: Option<u64>,
    /// With --target ort: execution providers in order of preference, comma-separated (`cpu`,
    /// `xnnpack`, `nnapi`, `coreml`, `qnn`, `cuda`, `tensorrt`); `NAME!` fails if that EP is
    /// absent, others are skipped when absent. ONNX Runtime falls back to CPU per node.
    #[arg(long = "ep", value_name = "LIST", default_value = "cpu")]
    pub ep: String,
    /// With --target ort: how int8 weights go into the graph (`block`, `channel`, `f32`).
    #[arg(long = "onnx-weights", value_name = "block|channel|f32", default_value = "block")]
    pub onnx_weights: String,
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

impl TargetArgs {
    /// True for `--target ort` (the ONNX Runtime path, `cmd::target`); `cpu` and `wgpu` go
    /// through [`open_target`].
    ///
    /// # Errors
    /// An unknown target name.
    pub fn is_ort(&self) -> Result<bool> {
        match self.target.as_str() {
            "cpu" | "wgpu" => Ok(false),
            "ort" => Ok(true),
            t => anyhow::bail!("unknown --target {t:?} (use cpu, wgpu or ort)"),
        }
    }
}

/// A model opened on the selected target.
pub enum Opened<'m> {
    Cpu(Box<Session<'m>>),
    #[cfg(feature = "wgpu")]
    Wgpu(Box<meo_wgpu::WgpuTarget<'m>>),
}

impl<'m> Opened<'m> {
    /// The target, to run.
    pub fn target(&mut self) -> &mut (dyn Target + 'm) {
        match self {
            Self::Cpu(s) => &mut **s,
            #[cfg(feature = "wgpu")]
            Self::Wgpu(w) => &mut **w,
        }
    }

    /// The CPU worker threads it runs with (`None` on the GPU).
    pub fn threads(&self) -> Option<usize> {
        match self {
            Self::Cpu(s) => Some(s.threads()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu(_) => None,
        }
    }

    /// The GPU expert cache's counters (`None` on the CPU).
    pub fn gpu_expert_stats(&self) -> Option<serde_json::Value> {
        match self {
            Self::Cpu(_) => None,
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
        }
    }
}

/// Opens `model` on the selected target (`threads` for the CPU).
///
/// # Errors
/// An unknown target, no (matching) GPU adapter, or a model the target cannot run.
pub fn open_target<'m>(model: &'m Model, t: &TargetArgs, threads: usize) -> Result<Opened<'m>> {
    match t.target.as_str() {
        "cpu" => {
            if t.adapter.is_some() {
                bail!("--adapter needs --target wgpu");
            }
            Ok(Opened::Cpu(Box::new(Session::new(model, SessionOptions { threads, ..SessionOptions::default() })?)))
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            let opts = meo_wgpu::WgpuOptions {
                adapter: t.adapter.clone(),
                expert_budget: t.gpu_expert_budget.map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX)),
                ..Default::default()
            };
            Ok(Opened::Wgpu(Box::new(meo_wgpu::WgpuTarget::new(model, opts)?)))
        }
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => bail!("this meo was built without the `wgpu` feature (the GPU target)"),
        other => bail!("unknown target {other:?} (expected cpu or wgpu)"),
    }
}

/// List the GPU adapters `--target wgpu --adapter` can use.
#[derive(clap::Args, Debug)]
pub struct DevicesArgs {}

/// Runs `meo devices`.
///
/// # Errors
/// Writing to stdout failed.
pub fn devices(_a: &DevicesArgs) -> Result<()> {
    let mut out = String::from("cpu: always available (--target cpu)\n");
    #[cfg(feature = "wgpu")]
    {
        let all = meo_wgpu::list_adapters();
        if all.is_empty() {
            out.push_str("wgpu: no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)\n");
        }
        for a in all {
            out.push_str(&format!("wgpu adapter {a}\n"));
        }
    }
    #[cfg(not(feature = "wgpu"))]
    out.push_str("wgpu: not built (cargo feature `wgpu` is off)\n");
    super::print_stdout(&out)
}
