//! The residency flags `meo run` and `meo bench` share: the model's memory budget, the
//! eviction policy, and next-layer prediction.

use meo::OnMiss;
use meo::residency::{self, MissRead, Policy, PredictIo, TrackerOptions};

/// `--memory-budget`'s value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// The process's memory limit less room for the rest ([`residency::default_budget`]).
    Auto,
    /// No budget.
    Unlimited,
    /// This many bytes.
    Bytes(u64),
}

fn parse_budget(s: &str) -> Result<Budget, String> {
    match s {
        "auto" => Ok(Budget::Auto),
        "none" => Ok(Budget::Unlimited),
        _ => super::parse_bytes(s).map(Budget::Bytes),
    }
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Policy::ALL.iter().map(|p| p.name()).collect();
        format!("unknown policy {s:?} (one of: {})", names.join(", "))
    })
}

/// Residency flags.
#[derive(clap::Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Most bytes of the model's weights to keep in memory: the tensors every token reads are
    /// kept resident (mlock where permitted) and counted, expert slabs are cached under the
    /// rest and evicted by --cache-policy (re-read from the file when needed again). BYTES
    /// (e.g. 512M, 2G), `auto` (the process's memory limit — its cgroup limit or the
    /// machine's available memory — less an eighth, at least 32 MiB, for the rest), or `none`.
    #[arg(long, value_name = "BYTES|auto|none", default_value = "auto", value_parser = parse_budget)]
    pub memory_budget: Budget,
    /// Which cached expert is evicted first under the budget: lru, lfu, freq-recency.
    #[arg(long, value_name = "POLICY", default_value = "freq-recency", value_parser = parse_policy)]
    pub cache_policy: Policy,
    /// Next-layer prediction: the next layer's router on this layer's input; the experts it
    /// picks are read while this layer computes (off by default: it measured slower under
    /// memory limits on a 2-core machine, docs/PERFORMANCE.md).
    #[arg(long)]
    pub predict: bool,
    /// With --predict, how predicted experts are read: `thread` (madvise WILLNEED from an I/O thread),
    /// `read-thread` (positioned reads on an I/O thread), `inline` (WILLNEED from the
    /// computing thread).
    #[arg(long, value_name = "HOW", default_value = "thread", value_parser = parse_predict_io)]
    pub predict_io: PredictIo,
    /// How the slab of a selected expert that is not in memory is read before the layer runs
    /// it: `populate` (large read requests, then the pages mapped: no page faults),
    /// `willneed` (large read requests, not waited for), `pread` (positioned reads into a
    /// scratch buffer), `willneed-once` (one WILLNEED call, which the kernel truncates: how meo
    /// read before; for measurements).
    #[arg(long, value_name = "HOW", default_value = "populate", value_parser = parse_miss_read)]
    pub miss_read: MissRead,
    /// What a layer does with a selected expert that is not in memory (under the budget):
    /// `exact` (read it and run it: the model's output), or, approximate and opt-in,
    /// `merged` (run the layer's stored merged expert instead — `meo convert --task
    /// miss=CALIB.txt --merge-weighting frequency` stores it; `merged:TASK` names another
    /// task — and fetch the missed expert for later tokens) or `resident` (route among the
    /// resident experts only). CPU target only.
    #[arg(long, value_name = "exact|merged|merged:TASK|resident", default_value = "exact", value_parser = parse_on_miss)]
    pub on_miss: OnMiss,
}

fn parse_on_miss(s: &str) -> Result<OnMiss, String> {
    OnMiss::parse(s).map_err(|e| e.to_string())
}

impl Default for MemoryArgs {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            memory_budget: Budget::Auto,
            cache_policy: Policy::default(),
            predict: false,
            predict_io: PredictIo::default(),
            miss_read: MissRead::default(),
            on_miss: OnMiss::Exact,
        }
    }
}

fn parse_miss_read(s: &str) -> Result<MissRead, String> {
    MissRead::from_name(s).ok_or_else(|| {
        let names: Vec<_> = MissRead::ALL.iter().map(|m| m.name()).collect();
        format!("unknown --miss-read {s:?} (one of: {})", names.join(", "))
    })
}

fn parse_predict_io(s: &str) -> Result<PredictIo, String> {
    PredictIo::from_name(s).ok_or_else(|| {
        let names: Vec<_> = PredictIo::ALL.iter().map(|p| p.name()).collect();
        format!("unknown --predict-io {s:?} (one of: {})", names.join(", "))
    })
}

impl MemoryArgs {
    /// Whether a budget in bytes was given (not `auto` or `none`).
    pub fn explicit(&self) -> bool {
        matches!(self.memory_budget, Budget::Bytes(_))
    }

    /// The budget in bytes, if any.
    pub fn budget(&self) -> Option<u64> {
        match self.memory_budget {
            Budget::Auto => residency::default_budget(),
            Budget::Unlimited => None,
            Budget::Bytes(b) => Some(b),
        }
    }

    /// Sets `--on-miss` on the session `opened` runs (only `exact` on other targets).
    ///
    /// # Errors
    /// An approximate fallback on a target other than the CPU, or `merged` on a file without
    /// the merged experts it names.
    pub fn apply_on_miss(&self, opened: &mut super::target::Opened<'_>) -> anyhow::Result<()> {
        match opened {
            super::target::Opened::Cpu(s) => Ok(s.set_on_miss(self.on_miss.clone())?),
            #[allow(unreachable_patterns)] // only the CPU target without the GPU or ONNX features
            _ if self.on_miss.approximate() => {
                anyhow::bail!("--on-miss {} runs on the CPU target only", self.on_miss.spelling())
            }
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// The tracker settings these flags ask for.
    pub fn tracker_options(&self) -> TrackerOptions {
        TrackerOptions {
            budget: self.budget(),
            policy: self.cache_policy,
            predict: self.predict,
            predict_io: self.predict_io,
            miss_read: self.miss_read,
            ..TrackerOptions::default()
        }
    }
}
