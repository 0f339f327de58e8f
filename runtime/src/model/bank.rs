//! Expert banks: how a session runs each MoE layer.
//!
//! An MoE feed-forward block is an *expert bank*: a router ([`crate::RouterSpec`]), a gate
//! [`Granularity`] (what the gate is computed from) and an [`Execution`] (how the selected
//! experts are applied). All of it is data chosen per session and per layer; the code that
//! runs a layer has one arm per execution, none per family.
//!
//! | [`Mode`] | granularity | execution | per-expert slabs read |
//! |---|---|---|---|
//! | `Vanilla` (default for standard MoEs) | token | per-token mixture `Σ g_i E_i(x)` | the selected ones, every token |
//! | `Prompt` | sequence (the prompt) | merged once per layer after the prompt, cached in the session | during the prompt only |
//! | `Task(name)` | task | merged at conversion time, stored in the file | never |
//!
//! For a standard token-routed MoE (Mixtral, Qwen-MoE, OLMoE) merged execution is an
//! approximation (SwiGLU is not linear): opt-in, per layer ([`LayerSelect`]), and measured
//! (`meo eval`, `docs/MEO-MERGING.md`).

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

/// What a bank's gate is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// Each token's own hidden state (standard MoEs).
    Token,
    /// The sequence (prompt): pooled over its tokens.
    Sequence,
    /// A task, fixed before the sequence is seen.
    Task,
}

/// How a bank applies its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// `y = Σ_i g_i E_i(x)` per token over the selected experts.
    Mixture,
    /// `y = E_θ̂(x)` with `θ̂ = Σ_i g_i θ_i` merged once (see [`crate::merge`]).
    Merged,
}

/// How prompt mode pools the prompt's routing into one gate per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptPool {
    /// The mean over the prompt tokens of each token's gate weights (0 where an expert was
    /// not selected): the merge weights are the average mixture the prompt actually used.
    #[default]
    MeanGate,
    /// The router applied to the mean of the prompt's router inputs (the MEO paper's
    /// sequence-level gate): top-k experts of the pooled state, with their weights.
    PooledInput,
}

impl PromptPool {
    /// CLI / JSON spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanGate => "mean-gate",
            Self::PooledInput => "pooled-input",
        }
    }
}

/// The routing mode of a session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// The model as trained: token gate, per-token mixture.
    #[default]
    Vanilla,
    /// The prompt (the first forward call after a reset) runs vanilla while its routing is
    /// pooled per layer; then each selected layer's experts are merged once, cached in the
    /// session, and used for every later token.
    Prompt(PromptPool),
    /// The merged experts the converter stored for this task; per-expert slabs are not read
    /// in the merged layers.
    Task(String),
}

impl Mode {
    /// The gate granularity of the merged layers.
    pub fn granularity(&self) -> Granularity {
        match self {
            Self::Vanilla => Granularity::Token,
            Self::Prompt(_) => Granularity::Sequence,
            Self::Task(_) => Granularity::Task,
        }
    }

    /// The execution of the merged layers.
    pub fn execution(&self) -> Execution {
        match self {
            Self::Vanilla => Execution::Mixture,
            _ => Execution::Merged,
        }
    }

    /// Parses `vanilla`, `prompt` or `task:NAME` (the task name is checked against a model
    /// when the mode is set).
    ///
    /// # Errors
    /// Any other spelling.
    pub fn parse(s: &str) -> Result<Self, ModeError> {
        match s {
            "vanilla" => Ok(Self::Vanilla),
            "prompt" => Ok(Self::Prompt(PromptPool::default())),
            _ => match s.strip_prefix("task:") {
                Some(name) if !name.is_empty() => Ok(Self::Task(name.into())),
                _ => Err(ModeError::BadSpelling {
                    what: "mode",
                    value: s.into(),
                    expected: "vanilla, prompt or task:NAME",
                }),
            },
        }
    }

    /// `vanilla`, `prompt` or `task:NAME`.
    pub fn spelling(&self) -> String {
        match self {
            Self::Vanilla => "vanilla".into(),
            Self::Prompt(_) => "prompt".into(),
            Self::Task(n) => alloc::format!("task:{n}"),
        }
    }
}

/// What a routed MoE layer does with a selected expert whose slab is not resident (a miss),
/// as the session's [`Trace`](crate::Trace) reports residency
/// ([`Trace::resident_experts`](crate::Trace::resident_experts)). Everything but `Exact` is
/// an approximation, opt-in: the output then depends on what was resident, and is the same
/// for the same residency sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnMiss {
    /// Read the missed expert and run it: the model's own output.
    #[default]
    Exact,
    /// Run the layer's merged expert (a stored task merge, [`MISS_TASK`] unless named
    /// otherwise) in its place, weighted by the missed expert's gate over the merge's mass;
    /// the missed expert is fetched for later tokens.
    Merged(String),
    /// Route among the resident experts only (top-k over their router logits); a token whose
    /// layer has fewer than top-k resident experts routes exactly. The missed experts are
    /// fetched for later tokens.
    Resident,
}

/// The task whose stored merged experts `OnMiss::Merged` uses unless told another:
/// `meo convert --task miss=CALIB.txt --merge-weighting frequency` stores it (every expert
/// weighted by how often the calibration text routes to it).
pub const MISS_TASK: &str = "miss";

impl OnMiss {
    /// Parses `exact`, `resident`, `merged` (task [`MISS_TASK`]) or `merged:TASK`.
    ///
    /// # Errors
    /// Any other spelling.
    pub fn parse(s: &str) -> Result<Self, ModeError> {
        match s {
            "exact" => Ok(Self::Exact),
            "resident" => Ok(Self::Resident),
            "merged" => Ok(Self::Merged(MISS_TASK.into())),
            _ => match s.strip_prefix("merged:") {
                Some(task) if !task.is_empty() => Ok(Self::Merged(task.into())),
                _ => Err(ModeError::BadSpelling {
                    what: "on-miss fallback",
                    value: s.into(),
                    expected: "exact, resident, merged or merged:TASK",
                }),
            },
        }
    }

    /// `exact`, `resident`, `merged` or `merged:TASK`.
    pub fn spelling(&self) -> String {
        match self {
            Self::Exact => "exact".into(),
            Self::Resident => "resident".into(),
            Self::Merged(t) if t == MISS_TASK => "merged".into(),
            Self::Merged(t) => alloc::format!("merged:{t}"),
        }
    }

    /// Whether results may differ from the model's (anything but `Exact`).
    pub fn approximate(&self) -> bool {
        *self != Self::Exact
    }
}

/// Which MoE layers run merged (the others stay vanilla).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum LayerSelect {
    /// Every MoE layer (every layer the task stores a merge for, in task mode).
    #[default]
    All,
    /// These layers (each must be an MoE layer; in task mode, one the task stores).
    Layers(Vec<usize>),
    /// The layers whose measured merge error is at most `budget`: the converter's per-layer
    /// error for the task (task mode) or its measured prompt-mode error (prompt mode). A
    /// layer without a measured error is never merged.
    Auto { budget: f64 },
}

impl LayerSelect {
    /// Parses `all`, `auto` (with `budget`) or a comma-separated list of layer indices.
    ///
    /// # Errors
    /// Any other spelling.
    pub fn parse(s: &str, budget: f64) -> Result<Self, ModeError> {
        match s {
            "all" => Ok(Self::All),
            "auto" => Ok(Self::Auto { budget }),
            _ => s
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Layers)
                .map_err(|_| ModeError::BadSpelling {
                    what: "merge layers",
                    value: s.into(),
                    expected: "all, auto or a comma-separated list of layer indices",
                }),
        }
    }
}

/// A session's routing mode and merge policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergeOptions {
    pub mode: Mode,
    pub layers: LayerSelect,
}

impl MergeOptions {
    /// The options spelled `mode` (`vanilla`, `prompt`, `task:NAME`; `None`: the model's own
    /// default, `prompt` for an MEO-native model and `vanilla` otherwise), `pool` for prompt
    /// mode, `layers` (`all`, `0,2,5`, `auto`) and `budget` (the largest merge error `auto`
    /// merges): what `--mode`, `--prompt-pool`, `--merge-layers` and `--merge-budget` mean in
    /// the CLI, the C API and the Python package alike.
    ///
    /// # Errors
    /// A misspelt mode or layer list, or a budget that is not a finite number >= 0.
    pub fn from_spellings(
        model: &super::Model,
        mode: Option<&str>,
        pool: PromptPool,
        layers: &str,
        budget: f64,
    ) -> Result<Self, ModeError> {
        if !(budget.is_finite() && budget >= 0.0) {
            return Err(ModeError::BadSpelling {
                what: "merge budget",
                value: alloc::format!("{budget}"),
                expected: "a number >= 0",
            });
        }
        let default = if model.meo_layers().next().is_some() { "prompt" } else { "vanilla" };
        let mut mode = Mode::parse(mode.unwrap_or(default))?;
        if let Mode::Prompt(p) = &mut mode {
            *p = pool;
        }
        Ok(Self { mode, layers: LayerSelect::parse(layers, budget)? })
    }

    /// The layers to merge among `candidates` (layer, measured merge error) of a model whose MoE
    /// layers are `moe`, per [`LayerSelect`]; `what` names the mode in errors. Shared by every
    /// target so they select alike.
    ///
    /// # Errors
    /// A listed layer that is not an MoE layer or has no stored merge for the task, or `auto`
    /// without measured errors.
    pub fn pick_layers(
        &self,
        moe: &[usize],
        candidates: &[(usize, Option<f64>)],
        what: &'static str,
    ) -> Result<Vec<usize>, ModeError> {
        match &self.layers {
            LayerSelect::All => Ok(candidates.iter().map(|c| c.0).collect()),
            LayerSelect::Layers(ls) => ls
                .iter()
                .map(|&l| {
                    if !moe.contains(&l) {
                        return Err(ModeError::NotMoe { layer: l });
                    }
                    if !candidates.iter().any(|c| c.0 == l) {
                        let Mode::Task(task) = &self.mode else { return Err(ModeError::NotMoe { layer: l }) };
                        let stored = candidates.iter().map(|c| c.0).collect();
                        return Err(ModeError::NotStored { task: task.clone(), layer: l, stored });
                    }
                    Ok(l)
                })
                .collect(),
            LayerSelect::Auto { budget } => {
                if candidates.iter().all(|c| c.1.is_none()) {
                    return Err(ModeError::NoErrors { mode: what });
                }
                // A layer without a measured error, or whose error exceeds the budget (NaN
                // included), stays vanilla.
                Ok(candidates.iter().filter(|c| c.1.is_some_and(|e| e <= *budget)).map(|c| c.0).collect())
            }
        }
    }
}

/// How a merged layer's expert was read (reported by [`crate::Trace::on_merged`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergedUse {
    /// A task merge: this slab of the file (absolute byte range).
    File(Range<usize>),
    /// A prompt merge cached in the session: this many bytes of memory.
    Session(usize),
}

impl MergedUse {
    /// Bytes of the merged expert.
    pub fn bytes(&self) -> usize {
        match self {
            Self::File(r) => r.len(),
            Self::Session(n) => *n,
        }
    }
}

/// Why a mode or merge could not be set up (the session is unchanged).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModeError {
    #[error("{}", unknown_task(name, available))]
    UnknownTask { name: String, available: Vec<String> },
    #[error("invalid {what} {value:?} (expected {expected})")]
    BadSpelling { what: &'static str, value: String, expected: &'static str },
    #[error("layer {layer} is not an MoE layer")]
    NotMoe { layer: usize },
    #[error("merge weights of layer {layer}: need {expected} finite values >= 0")]
    BadWeights { layer: usize, expected: usize },
    #[error("layer {layer}: inputs or choices do not match the layer's shapes")]
    BadShape { layer: usize },
    #[error("task {task:?} stores no merged expert for layer {layer} (it has layers {stored:?})")]
    NotStored { task: String, layer: usize, stored: Vec<usize> },
    #[error(
        "--merge-layers auto needs measured per-layer merge errors, and this file has none for {mode} mode \
         (convert with --task NAME=calibration.txt, or list the layers)"
    )]
    NoErrors { mode: &'static str },
    #[error(
        "--on-miss merged:{task} needs the merged experts of task {task:?} in the file, and it has {}",
        if available.is_empty() { "no task merges".into() } else { alloc::format!("only tasks {available:?}") }
    )]
    NoMissMerge { task: String, available: Vec<String> },
    #[error("layer {layer}: {what} cannot be merged (MEO merges need bias-free experts)")]
    NotMergeable { layer: usize, what: &'static str },
}

fn unknown_task(name: &str, available: &[String]) -> String {
    if available.is_empty() {
        alloc::format!("unknown task {name:?}: this file has no task merges (convert with --task NAME=calibration.txt)")
    } else {
        alloc::format!("unknown task {name:?}; the file has: {}", available.join(", "))
    }
}
