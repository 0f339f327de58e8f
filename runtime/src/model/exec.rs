//! The execution plan: how every layer's feed-forward block runs for one routing mode and
//! merge policy, resolved once from (model, [`MergeOptions`]).
//!
//! Every target consumes the same plan — the CPU [`Session`](super::Session), the GPU target,
//! the ONNX exporter — and supplies only its kernels and where it keeps a merged expert. A new
//! mode or per-layer execution is added here and to each backend's kernels, never to a
//! target's own mode resolver.
//!
//! The helpers a target needs to follow a plan (the prompt merge's weights, an MEO bank's
//! sequence gate, a bank merge, a stored task's gates) are public functions here, so no
//! target copies them.

use super::Model;
use super::bank::{MergeOptions, Mode, ModeError, PromptPool};
use super::ffn::{FfnScratch, route_one};
use super::plan::{FfnPlan, MeoTaskLayer, MoePlan};
use crate::RouterSpec;
use crate::kernels::Parallel;
use crate::route::Choice;
use alloc::vec::Vec;

/// How one layer's feed-forward block runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerExec {
    /// A dense feed-forward block (no experts).
    Dense,
    /// Routed experts as a per-token mixture `Σ g_i E_i(x)` (the model as trained).
    Mixture,
    /// Routed experts merged from the prompt: the prompt (the first forward call after a
    /// reset) runs as a mixture while its routing is pooled; later calls run one expert merged
    /// from the pooled gate.
    PromptMerge(PromptPool),
    /// Routed experts replaced by a merge stored in the file: layer entry `index` of
    /// [`Model::tasks`]`[task]`. No per-expert slab is read.
    TaskMerge { task: usize, index: usize },
    /// MEO-native banks, gates pooled from the prompt (each bank's own input). `merged`: each
    /// bank is merged once (the model as defined); otherwise each runs as `Σ g_i (W_i x + b_i)`
    /// (the same function at k× the bytes: the baseline merging is measured against).
    MeoSequence { merged: bool },
    /// MEO-native banks merged for a task and stored in the file: layer entry `index` of
    /// [`Model::meo_tasks`]`[task]`.
    MeoTask { task: usize, index: usize },
}

impl LayerExec {
    /// Whether the layer's execution is built from the prompt (state a target makes on the
    /// first forward call after a reset and drops on the next reset).
    pub fn from_prompt(&self) -> bool {
        matches!(self, Self::PromptMerge(_) | Self::MeoSequence { .. })
    }

    /// Whether the layer runs merged experts rather than a mixture (prompt merges: once the
    /// prompt has run).
    pub fn merged(&self) -> bool {
        match self {
            Self::Dense | Self::Mixture => false,
            Self::MeoSequence { merged } => *merged,
            Self::PromptMerge(_) | Self::TaskMerge { .. } | Self::MeoTask { .. } => true,
        }
    }
}

/// The per-layer execution of a model for one [`MergeOptions`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExecPlan {
    opts: MergeOptions,
    layers: Vec<LayerExec>,
}

impl ExecPlan {
    /// The plan of `model` in vanilla mode: MoE layers as mixtures, MEO-native layers at
    /// their own (sequence) level, merged. Never fails.
    pub fn vanilla(model: &Model) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|l| match l.ffn {
                FfnPlan::Dense(_) => LayerExec::Dense,
                FfnPlan::Moe(_) => LayerExec::Mixture,
                FfnPlan::Meo(_) => LayerExec::MeoSequence { merged: true },
            })
            .collect();
        Self { opts: MergeOptions::default(), layers }
    }

    /// Resolves `opts` for `model`.
    ///
    /// An MEO-native model's gate is its own (sequence) gate in every mode: `prompt` merges
    /// each bank once (the model as defined), `vanilla` runs the same gates unmerged, `task`
    /// uses the task's stored banks. For standard MoEs, [`MergeOptions::layers`] picks the
    /// merged layers among the candidates (every MoE layer for `prompt`, the stored ones for
    /// `task`); the others stay mixtures.
    ///
    /// # Errors
    /// An unknown task (the error lists the file's tasks), a listed layer that is not an MoE
    /// layer or has no stored merge for the task, `auto` without measured errors, or prompt
    /// mode on experts with biases (no merge rule).
    pub fn new(model: &Model, opts: MergeOptions) -> Result<Self, ModeError> {
        let mut plan = Self::vanilla(model);
        let meo: Vec<usize> = model.meo_layers().collect();
        let moe: Vec<usize> = model.moe_layers().collect();
        let layers = &mut plan.layers;
        match &opts.mode {
            Mode::Vanilla if !meo.is_empty() => {
                for &l in &meo {
                    layers[l] = LayerExec::MeoSequence { merged: false };
                }
            }
            Mode::Prompt(_) if !meo.is_empty() => {}
            Mode::Task(name) if !meo.is_empty() => {
                let task =
                    model.meo_tasks.iter().position(|t| t.name == *name).ok_or_else(|| ModeError::UnknownTask {
                        name: name.clone(),
                        available: model.meo_tasks.iter().map(|t| t.name.clone()).collect(),
                    })?;
                for (index, tl) in model.meo_tasks[task].layers.iter().enumerate() {
                    layers[tl.layer] = LayerExec::MeoTask { task, index };
                }
            }
            Mode::Vanilla => {}
            Mode::Task(name) => {
                let stored = model.task(name)?;
                let task = model.tasks.iter().position(|t| t.name == *name).unwrap_or(0);
                let cands: Vec<(usize, Option<f64>)> = stored.layers.iter().map(|tl| (tl.layer, tl.error)).collect();
                for l in opts.pick_layers(&moe, &cands, "task")? {
                    if let Some(index) = stored.layers.iter().position(|tl| tl.layer == l) {
                        layers[l] = LayerExec::TaskMerge { task, index };
                    }
                }
            }
            Mode::Prompt(pool) => {
                // Experts with biases have no merge rule (`Model::merge_layer` refuses them).
                let biased = model
                    .layers
                    .iter()
                    .position(|l| matches!(&l.ffn, FfnPlan::Moe(p) if p.experts.iter().any(|e| e.mlp.bias.is_some())));
                if let Some(layer) = biased {
                    return Err(ModeError::NotMergeable { layer, what: "experts with biases" });
                }
                let errors = model.prompt_errors();
                let cands: Vec<(usize, Option<f64>)> =
                    moe.iter().map(|&l| (l, errors.iter().find(|e| e.0 == l).map(|e| e.1))).collect();
                for l in opts.pick_layers(&moe, &cands, "prompt")? {
                    layers[l] = LayerExec::PromptMerge(*pool);
                }
            }
        }
        plan.opts = opts;
        Ok(plan)
    }

    /// The mode and merge policy this plan was resolved from.
    pub fn options(&self) -> &MergeOptions {
        &self.opts
    }

    /// Each layer's execution, in layer order.
    pub fn layers(&self) -> &[LayerExec] {
        &self.layers
    }

    /// The layers that run merged, ascending (prompt merges: once the prompt has run).
    pub fn merged_layers(&self) -> Vec<usize> {
        self.layers.iter().enumerate().filter(|(_, e)| e.merged()).map(|(l, _)| l).collect()
    }

    /// Whether any layer is built from the prompt (see [`LayerExec::from_prompt`]).
    pub fn from_prompt(&self) -> bool {
        self.layers.iter().any(LayerExec::from_prompt)
    }
}

/// The prompt merge's weights for MoE layer `p` (one per expert) from the prompt: `x` is the
/// layer's input (`[t, hidden]`, the router's input) and `choices` the mixture's choices for
/// those tokens (`[t, top_k]`, as [`crate::Trace::on_route`] reports them).
#[allow(clippy::too_many_arguments)]
pub fn prompt_merge_weights(
    pool: PromptPool,
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    spec: &RouterSpec,
    x: &[f32],
    t: usize,
    choices: &[Choice],
) -> Vec<f32> {
    let mut w = alloc::vec![0.0f64; spec.num_experts];
    let n = t.max(1) as f64;
    match pool {
        PromptPool::MeanGate => {
            for c in choices {
                if let Some(v) = w.get_mut(c.expert as usize) {
                    *v += f64::from(c.weight);
                }
            }
        }
        PromptPool::PooledInput => {
            let h = x.len() / t.max(1);
            let mut mean = alloc::vec![0.0f64; h];
            for row in x.chunks(h.max(1)) {
                for (m, &v) in mean.iter_mut().zip(row) {
                    *m += f64::from(v);
                }
            }
            let mean: Vec<f32> = mean.iter().map(|&v| (v / n) as f32).collect();
            for c in route_one(par, bytes, p, spec, &mean, &mut FfnScratch::default()) {
                if let Some(v) = w.get_mut(c.expert as usize) {
                    *v += f64::from(c.weight) * n;
                }
            }
        }
    }
    w.iter().map(|&v| (v / n) as f32).collect()
}

impl MeoTaskLayer {
    /// The gates the stored banks were merged with (fc1, fc2): the experts with a non-zero
    /// weight, ascending.
    pub fn gates(&self) -> [Vec<Choice>; 2] {
        let g = |w: &[f32]| {
            w.iter()
                .enumerate()
                .filter(|(_, w)| **w != 0.0)
                .map(|(e, &weight)| Choice { expert: e as u32, weight })
                .collect()
        };
        [g(&self.banks[0].1), g(&self.banks[1].1)]
    }
}

/// The slot of expert `expert` of bank `bank` in an MEO-native layer with `experts` experts
/// per bank, as [`crate::Trace::on_experts_selected`] numbers them: `bank·E + expert`.
pub fn bank_slots(bank: usize, experts: usize, gate: &[Choice]) -> Vec<u32> {
    gate.iter().map(|c| (bank * experts) as u32 + c.expert).collect()
}
