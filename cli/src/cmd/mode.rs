//! The routing-mode options shared by `meo run`, `meo bench` and `meo eval`.

use anyhow::Result;
use meo::{MergeOptions, PromptPool};

/// How prompt mode pools the prompt's routing.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolArg {
    /// Mean of the per-token gate weights over the prompt.
    MeanGate,
    /// The router applied to the mean of the prompt's router inputs.
    PooledInput,
}

/// `--mode`, `--merge-layers`, `--merge-budget`, `--prompt-pool`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModeArgs {
    /// Routing mode: `vanilla` (the model as trained), `prompt` (merge the experts once per
    /// layer from the prompt's routing, reuse for every generated token) or `task:NAME` (the
    /// merged experts `meo convert --task NAME=...` stored). Merged modes approximate a
    /// standard MoE: see docs/MEO-MERGING.md. Default: `vanilla`, or for an MEO-native model its own
    /// granularity, `prompt` (its vanilla runs the same gates unmerged).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// MoE layers that run merged: `all`, a list (`0,2,5`), or `auto` (the layers whose
    /// measured merge error is at most --merge-budget; the others stay vanilla).
    #[arg(long, value_name = "all|LIST|auto", default_value = "all")]
    pub merge_layers: String,
    /// Largest relative merge error a layer may have to be merged with `--merge-layers auto`.
    #[arg(long, value_name = "X", default_value_t = 0.25)]
    pub merge_budget: f64,
    /// How `--mode prompt` pools the prompt's routing.
    #[arg(long, value_enum, default_value_t = PoolArg::MeanGate)]
    pub prompt_pool: PoolArg,
}

impl Default for ModeArgs {
    fn default() -> Self {
        Self { mode: None, merge_layers: "all".into(), merge_budget: 0.25, prompt_pool: PoolArg::MeanGate }
    }
}

impl ModeArgs {
    /// The session options these flags select for `model`.
    ///
    /// # Errors
    /// A misspelt mode or layer list, or a budget that is not a finite number ≥ 0.
    pub fn options(&self, model: &meo::Model) -> Result<MergeOptions> {
        if !(self.merge_budget.is_finite() && self.merge_budget >= 0.0) {
            anyhow::bail!("--merge-budget must be a number >= 0, got {}", self.merge_budget);
        }
        let pool = match self.prompt_pool {
            PoolArg::MeanGate => PromptPool::MeanGate,
            PoolArg::PooledInput => PromptPool::PooledInput,
        };
        Ok(MergeOptions::from_spellings(model, self.mode.as_deref(), pool, &self.merge_layers, self.merge_budget)?)
    }

    /// Sets the mode on `session`; returns the layers that run merged.
    ///
    /// # Errors
    /// As [`options`](Self::options), or the model refuses the mode (unknown task: the message
    /// lists the file's tasks).
    pub fn apply(&self, session: &mut meo::Session<'_>) -> Result<Vec<usize>> {
        let opts = self.options(session.model())?;
        Ok(session.set_mode(opts)?)
    }
}
