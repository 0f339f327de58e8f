//! A [`Session`]: one sequence's state (per layer a KV cache, or a fixed-size recurrent state
//! for a recurrent mixer) and scratch over a shared [`Model`].

use super::Model;
use super::attention::{AttnScratch, LayerCache, attention};
use super::bank::{MergeOptions, MergedUse, ModeError, OnMiss};
use super::delta::{self, DeltaScratch};
use super::exec::{ExecPlan, LayerExec, bank_slots, prompt_merge_weights};
use super::ffn::{Fallback, FfnScratch, dense, last_choices, merged, moe, predict};
use super::kv::KvOptions;
use super::mamba::{self, MambaScratch};
use super::meo::{self, BankSrc, MergedBank};
use super::mla::{self, MlaScratch};
use super::plan::{Attention, FfnPlan};
use super::recurrent::RecurrentState;
use super::short_conv::{self, ShortConvScratch};
use super::trace::{NoTrace, Trace};
use crate::kernels::{Parallel, Serial, add_into, matmul};
use crate::merge::{ExpertRef, MergedExpert};
use crate::route::Choice;
use alloc::string::String;
use alloc::vec::Vec;

mod state;
pub use state::{STATE_MAGIC, STATE_VERSION, StateError};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logits {
    /// Every position fed: `[T, vocab]`.
    #[default]
    All,
    /// Only the last position: `[vocab]` (skips the LM head for the others).
    Last,
}

/// Positions a session holds when [`SessionOptions::max_context`] is 0: a phone-sized KV
/// cache by default ([`ModelConfig::kv_cache_bytes`](crate::ModelConfig::kv_cache_bytes) gives
/// the bytes), not the model's maximum, which can be 128 Ki positions and gigabytes.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// Options of a [`Session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionOptions {
    /// Worker threads for the kernels; 0 = [`crate::kernels::default_threads`] (1 without `std`).
    pub threads: usize,
    /// Most positions the session holds, at most the model's `max_position_embeddings`:
    /// 0 = [`DEFAULT_MAX_CONTEXT`], `usize::MAX` = the model's maximum.
    pub max_context: usize,
    /// How the KV cache is stored (f32 and MLA latent by default).
    pub kv: KvOptions,
}

impl SessionOptions {
    /// The positions a session with these options holds over a model with config `c`.
    pub fn context_for(&self, c: &crate::ModelConfig) -> usize {
        let want = if self.max_context == 0 { DEFAULT_MAX_CONTEXT } else { self.max_context };
        match c.max_position_embeddings {
            0 => want,
            m => want.min(m),
        }
    }
}

/// Why a session could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("could not start {threads} worker threads: {reason}")]
    Threads { threads: usize, reason: String },
}

/// Why a forward pass was refused (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {token} at index {index} is out of range (vocabulary has {vocab} tokens)")]
    TokenOutOfRange { index: usize, token: u32, vocab: usize },
    #[error("context overflow: {cached} positions cached + {tokens} new > maximum {max}")]
    ContextOverflow { cached: usize, tokens: usize, max: usize },
    #[error("this model is an encoder (bidirectional, no LM head): run it with encode, not forward")]
    EncoderOnly,
    /// The SIGBUS guard ([`crate::guard`]) saw the mapped file shrink or change on disk: what
    /// was computed read zeros instead of weights. Reopen the model.
    #[error(
        "the model file changed on disk while in use (truncated or rewritten in place); \
         results would be wrong: reopen the model"
    )]
    FileChanged,
}

enum Pool {
    Serial(Serial),
    #[cfg(feature = "std")]
    Threads(crate::kernels::ThreadPool),
}

impl Pool {
    fn par(&self) -> &dyn Parallel {
        match self {
            Self::Serial(s) => s,
            #[cfg(feature = "std")]
            Self::Threads(p) => p,
        }
    }
}

#[derive(Default)]
struct Buffers {
    /// Residual stream `[T, H]`.
    x: Vec<f32>,
    /// Normalised input of the current block `[T, H]`.
    h: Vec<f32>,
    /// Output of the current block `[T, H]`.
    y: Vec<f32>,
    norm_w: Vec<f32>,
    norm_b: Vec<f32>,
    /// The LM head's bias (`model.output_bias`).
    out_bias: Vec<f32>,
    meo: meo::MeoScratch,
    attn: AttnScratch,
    mla: MlaScratch,
    delta: DeltaScratch,
    mamba: MambaScratch,
    short_conv: ShortConvScratch,
    ffn: FfnScratch,
    /// Next-layer prediction ([`Trace::on_experts_predicted`]).
    predicted: Vec<u32>,
}

/// What a session keeps of one layer's past: the keys and values of every position
/// (attention), or a fixed-size recurrent state (the recurrent mixers).
#[derive(Debug)]
enum LayerState {
    Kv(LayerCache),
    Recurrent(RecurrentState),
}

impl LayerState {
    fn new(attn: &Attention, kv: KvOptions) -> Self {
        match attn {
            Attention::Gqa(_) | Attention::Mla(_) => Self::Kv(LayerCache::new(kv.dtype)),
            Attention::GatedDeltaNet(p) => Self::Recurrent(delta::zero_state(p)),
            Attention::Mamba2(p) => Self::Recurrent(mamba::zero_state(p)),
            Attention::ShortConv(p) => Self::Recurrent(short_conv::zero_state(p)),
        }
    }
}

/// One sequence being run: KV cache, scratch buffers, thread pool. Create as many as needed
/// over one [`Model`]; each is used from one thread at a time.
pub struct Session<'m> {
    model: &'m Model,
    pool: Pool,
    max_context: usize,
    kv: KvOptions,
    pos: usize,
    /// Per layer, in layer order.
    state: Vec<LayerState>,
    buf: Buffers,
    logits: Vec<f32>,
    /// Output of the last [`Session::encode`], `[T, hidden]`.
    hidden: Vec<f32>,
    bank: BankState,
    on_miss: OnMissState,
}

/// The session's on-miss fallback ([`OnMiss`]) and, for `Merged`, per layer the stored merged
/// expert it runs: (task index, layer index in the task, 1 / the merge's mass).
#[derive(Debug, Default)]
struct OnMissState {
    mode: OnMiss,
    merged: Vec<Option<(usize, usize, f32)>>,
}

/// What a session built from the prompt for a layer whose execution comes from it
/// ([`LayerExec::from_prompt`]); `None` until the prompt has run.
#[derive(Debug)]
enum Built {
    /// A prompt merge ([`LayerExec::PromptMerge`]).
    Merged(MergedExpert),
    /// MEO-native banks merged from their sequence gates.
    MeoMerged(alloc::boxed::Box<[MergedBank; 2]>),
    /// MEO-native banks' sequence gates, run unmerged.
    MeoGates(alloc::boxed::Box<[Vec<Choice>; 2]>),
}

#[derive(Debug)]
struct BankState {
    plan: ExecPlan,
    /// Per layer: what was built from the prompt (see [`Built`]).
    built: Vec<Option<Built>>,
}

impl BankState {
    fn new(plan: ExecPlan) -> Self {
        let built = plan.layers().iter().map(|_| None).collect();
        Self { plan, built }
    }
}

impl core::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("threads", &self.pool.par().threads())
            .field("pos", &self.pos)
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

impl<'m> Session<'m> {
    /// A fresh session over `model`.
    ///
    /// # Errors
    /// The worker threads could not be started.
    pub fn new(model: &'m Model, opts: SessionOptions) -> Result<Self, SessionError> {
        let pool = make_pool(opts.threads)?;
        let max_context = opts.context_for(model.config());
        Ok(Self {
            model,
            pool,
            max_context,
            kv: opts.kv,
            pos: 0,
            state: model.layers.iter().map(|l| LayerState::new(&l.attn, opts.kv)).collect(),
            buf: Buffers::default(),
            logits: Vec::new(),
            hidden: Vec::new(),
            bank: BankState::new(ExecPlan::vanilla(model)),
            on_miss: OnMissState::default(),
        })
    }

    /// Sets what a routed layer does with a selected expert that is not resident
    /// ([`OnMiss`]; residency is what the forward call's [`Trace`] reports through
    /// [`Trace::resident_experts`]). `Exact`, the default, never changes results. Applies to
    /// the next forward call; the sequence is kept.
    ///
    /// # Errors
    /// [`ModeError::NoMissMerge`]: `Merged` names a task the file does not store merged experts
    /// for (the session is unchanged).
    pub fn set_on_miss(&mut self, on_miss: OnMiss) -> Result<(), ModeError> {
        let m = self.model;
        let mut merged = alloc::vec![None; m.layers.len()];
        if let OnMiss::Merged(task) = &on_miss {
            let Some(ti) = m.tasks.iter().position(|t| t.name == *task) else {
                return Err(ModeError::NoMissMerge {
                    task: task.clone(),
                    available: m.tasks.iter().map(|t| t.name.clone()).collect(),
                });
            };
            for (i, tl) in m.tasks[ti].layers.iter().enumerate() {
                let mass: f64 = tl.weights.iter().sum();
                if let Some(slot) = merged.get_mut(tl.layer)
                    && mass.is_finite()
                    && mass > 0.0
                {
                    *slot = Some((ti, i, (1.0 / mass) as f32));
                }
            }
        }
        self.on_miss = OnMissState { mode: on_miss, merged };
        Ok(())
    }

    /// The on-miss fallback ([`set_on_miss`](Self::set_on_miss)).
    pub fn on_miss(&self) -> &OnMiss {
        &self.on_miss.mode
    }

    /// Sets the routing mode and merge policy, and resets the sequence. Returns the layers
    /// that will run merged (ascending; in prompt mode, once the prompt has run).
    ///
    /// # Errors
    /// An unknown task (the error lists the file's tasks), a listed layer that is not an MoE
    /// layer or has no stored merge for the task, or `auto` without measured errors. On error
    /// the session is unchanged.
    pub fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, ModeError> {
        self.set_plan(ExecPlan::new(self.model, opts)?);
        Ok(self.bank.plan.merged_layers())
    }

    /// Runs `plan` (resolved for this session's model: its task indices are the model's) from
    /// now on, and resets the sequence.
    fn set_plan(&mut self, plan: ExecPlan) {
        self.bank = BankState::new(plan);
        self.truncate(0);
    }

    /// The execution plan this session follows.
    pub fn plan(&self) -> &ExecPlan {
        &self.bank.plan
    }

    /// The routing mode and merge policy.
    pub fn mode(&self) -> &MergeOptions {
        self.bank.plan.options()
    }

    /// The layers that run merged now (prompt mode: empty until the prompt has run).
    pub fn merged_layers(&self) -> Vec<usize> {
        let built = |l: usize| !self.bank.plan.layers()[l].from_prompt() || self.bank.built[l].is_some();
        self.bank.plan.merged_layers().into_iter().filter(|&l| built(l)).collect()
    }

    /// The gates of MEO-native layer `layer`'s banks (fc1, fc2): the selected experts,
    /// ascending, with their weights. `None` for other layers, and in sequence mode until the
    /// prompt has run.
    pub fn bank_gates(&self, layer: usize) -> Option<[Vec<Choice>; 2]> {
        match (self.bank.plan.layers().get(layer)?, self.bank.built.get(layer)?) {
            (_, Some(Built::MeoMerged(b))) => Some([b[0].gate.clone(), b[1].gate.clone()]),
            (_, Some(Built::MeoGates(g))) => Some((**g).clone()),
            (LayerExec::MeoTask { task, index }, _) => Some(self.model.meo_tasks[*task].layers[*index].gates()),
            _ => None,
        }
    }

    /// The merged expert layer `layer` runs now, if it runs merged.
    pub fn merged_expert(&self, layer: usize) -> Option<ExpertRef<'_>> {
        match (self.bank.plan.layers().get(layer)?, self.bank.built.get(layer)?) {
            (LayerExec::TaskMerge { task, index }, _) => {
                let tl = &self.model.tasks[*task].layers[*index];
                Some(ExpertRef { bytes: &self.model.bytes()[tl.expert.slab.clone()], mlp: &tl.expert.mlp })
            }
            (_, Some(Built::Merged(me))) => Some(me.as_ref()),
            _ => None,
        }
    }

    /// The merge weights of a merged layer (per expert).
    pub fn merge_weights(&self, layer: usize) -> Option<Vec<f32>> {
        match (self.bank.plan.layers().get(layer)?, self.bank.built.get(layer)?) {
            (LayerExec::TaskMerge { task, index }, _) => {
                Some(self.model.tasks[*task].layers[*index].weights.iter().map(|&w| w as f32).collect())
            }
            (_, Some(Built::Merged(me))) => Some(me.weights.clone()),
            _ => None,
        }
    }

    /// The model this session runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Positions in the KV cache (tokens fed since the last reset).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Most positions this session holds.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Bytes the KV cache holds now (see [`ModelConfig::kv_cache_bytes`](crate::ModelConfig::kv_cache_bytes)
    /// for what a context will cost).
    pub fn kv_cache_bytes(&self) -> u64 {
        let bytes: usize = self
            .state
            .iter()
            .map(|s| match s {
                LayerState::Kv(c) => c.bytes(),
                LayerState::Recurrent(_) => 0,
            })
            .sum();
        bytes as u64
    }

    /// How this session stores its KV cache.
    pub fn kv_options(&self) -> KvOptions {
        self.kv
    }

    /// Bytes of the recurrent layers' state (fixed: it does not grow with the context; see
    /// [`ModelConfig::recurrent_state_bytes`](crate::ModelConfig::recurrent_state_bytes)).
    pub fn recurrent_state_bytes(&self) -> u64 {
        let floats: usize = self
            .state
            .iter()
            .map(|s| match s {
                LayerState::Kv(_) => 0,
                LayerState::Recurrent(d) => d.floats(),
            })
            .sum();
        floats as u64 * 4
    }

    /// Whether some layer keeps a recurrent state (which cannot be rewound: see
    /// [`truncate`](Self::truncate)).
    pub fn has_recurrent_state(&self) -> bool {
        self.state.iter().any(|s| matches!(s, LayerState::Recurrent(_)))
    }

    /// Worker threads in use.
    pub fn threads(&self) -> usize {
        self.pool.par().threads()
    }

    /// Forgets the sequence (keeps the buffers' memory).
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` positions of the cache (no-op if `len >= position()`) and
    /// returns true. Truncating to 0 is a reset: prompt-mode merges are dropped and redone
    /// from the next call. A recurrent state holds no per-position history, so with recurrent
    /// layers (see [`has_recurrent_state`](Self::has_recurrent_state)) only `len` 0 (or
    /// `len >= position()`) is possible: other lengths return false and change nothing (reset,
    /// then feed the tokens again).
    pub fn truncate(&mut self, len: usize) -> bool {
        if len >= self.pos {
            return true;
        }
        if len > 0 && self.has_recurrent_state() {
            return false;
        }
        for c in &mut self.state {
            match c {
                LayerState::Kv(c) => c.truncate(len),
                LayerState::Recurrent(d) => d.clear(),
            }
        }
        self.pos = len;
        if len == 0 {
            // A new sequence: what was built from the prompt is built again from the next.
            self.bank.built.iter_mut().for_each(|b| *b = None);
        }
        true
    }

    /// Feeds `tokens` after the cached ones and returns the logits of every one of them,
    /// `[T, vocab]` row-major. `T > 1` is prompt processing, `T = 1` a decoding step.
    ///
    /// # Errors
    /// A token id ≥ vocabulary size, or more positions than the context holds.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ForwardError> {
        self.forward_with(tokens, Logits::All, &mut NoTrace)
    }

    /// [`forward`](Self::forward), reporting routing to `trace`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_traced(&mut self, tokens: &[u32], trace: &mut dyn Trace) -> Result<&[f32], ForwardError> {
        self.forward_with(tokens, Logits::All, trace)
    }

    /// The general form: choose which logits to compute (`[T, vocab]` or `[vocab]`).
    ///
    /// # Errors
    /// As [`forward`](Self::forward). On error the session is unchanged.
    pub fn forward_with(
        &mut self,
        tokens: &[u32],
        which: Logits,
        trace: &mut dyn Trace,
    ) -> Result<&[f32], ForwardError> {
        let m = self.model;
        let c = m.config();
        if c.recipe.encoder_only {
            return Err(ForwardError::EncoderOnly);
        }
        let vocab = c.vocab_size;
        self.check(tokens, self.pos)?;
        let t = tokens.len();
        self.logits.clear();
        if t == 0 {
            return Ok(&self.logits);
        }
        self.run_stack(tokens, trace);
        let bytes = m.bytes();
        let par = self.pool.par();
        let h = c.hidden_size;
        let eps = c.rms_norm_eps;
        let kind = c.recipe.norm;
        let b = &mut self.buf;
        let (rows, first) = match which {
            Logits::All => (t, 0),
            Logits::Last => (1, t - 1),
        };
        m.output_norm.read(bytes, &mut b.norm_w);
        read_bias(m.output_norm_bias.as_ref(), bytes, h, &mut b.norm_b);
        b.h.truncate(rows * h);
        for (o, i) in b.h.chunks_mut(h).zip(b.x[first * h..].chunks(h)) {
            meo::norm(kind, i, &b.norm_w, &b.norm_b, eps, o);
        }
        self.logits.resize(rows * vocab, 0.0);
        matmul(par, &b.h, rows, &m.output.view(bytes), &mut self.logits);
        if let Some(ob) = &m.output_bias {
            ob.read(bytes, &mut b.out_bias);
            for row in self.logits.chunks_mut(vocab) {
                crate::kernels::add_into(row, &b.out_bias);
            }
        }
        let scaling = c.recipe.logits_scaling;
        if scaling != 1.0 {
            // Divided, not multiplied by the reciprocal, as transformers does.
            self.logits.iter_mut().for_each(|v| *v /= scaling);
        }
        self.pos += t;
        if m.file_changed() {
            // Drop what the zeros produced (a recurrent state cannot be rewound: all of it).
            if !self.truncate(self.pos - t) {
                self.truncate(0);
            }
            return Err(ForwardError::FileChanged);
        }
        Ok(&self.logits)
    }

    /// Runs `tokens` as one whole new sequence (the session is reset first) and returns the
    /// final normalised hidden states, `[T, hidden]` row-major: the output of an encoder
    /// (`model.encoder_only`: every token attends to every token), or of a decoder's last
    /// norm before its LM head. Routing is reported to `trace` as in
    /// [`forward_traced`](Self::forward_traced) (weight 0 for a token dropped by capacity).
    ///
    /// # Errors
    /// A token id ≥ vocabulary size, or more tokens than the context holds. On error the
    /// session is unchanged.
    pub fn encode(&mut self, tokens: &[u32], trace: &mut dyn Trace) -> Result<&[f32], ForwardError> {
        self.check(tokens, 0)?;
        self.truncate(0);
        let m = self.model;
        let c = m.config();
        let (h, eps, kind) = (c.hidden_size, c.rms_norm_eps, c.recipe.norm);
        self.hidden.clear();
        if tokens.is_empty() {
            return Ok(&self.hidden);
        }
        self.run_stack(tokens, trace);
        let bytes = m.bytes();
        let b = &mut self.buf;
        m.output_norm.read(bytes, &mut b.norm_w);
        read_bias(m.output_norm_bias.as_ref(), bytes, h, &mut b.norm_b);
        self.hidden.resize(tokens.len() * h, 0.0);
        for (o, i) in self.hidden.chunks_mut(h).zip(b.x.chunks(h)) {
            meo::norm(kind, i, &b.norm_w, &b.norm_b, eps, o);
        }
        self.pos += tokens.len();
        if m.file_changed() {
            self.truncate(0);
            return Err(ForwardError::FileChanged);
        }
        Ok(&self.hidden)
    }

    /// Refuses out-of-vocabulary tokens and more than the context holds after `cached`.
    fn check(&self, tokens: &[u32], cached: usize) -> Result<(), ForwardError> {
        if self.model.file_changed() {
            return Err(ForwardError::FileChanged);
        }
        let vocab = self.model.config().vocab_size;
        if let Some((index, &token)) = tokens.iter().enumerate().find(|&(_, &tok)| tok as usize >= vocab) {
            return Err(ForwardError::TokenOutOfRange { index, token, vocab });
        }
        let t = tokens.len();
        if cached.checked_add(t).is_none_or(|end| end > self.max_context) {
            return Err(ForwardError::ContextOverflow { cached, tokens: t, max: self.max_context });
        }
        Ok(())
    }

    /// Embeds `tokens` (checked, non-empty) at positions `pos..pos + T` and runs every layer,
    /// leaving the residual stream `[T, hidden]` in `buf.x`.
    fn run_stack(&mut self, tokens: &[u32], trace: &mut dyn Trace) {
        let m = self.model;
        let c = m.config();
        let t = tokens.len();
        let bytes = m.bytes();
        let par = self.pool.par();
        let h = c.hidden_size;
        let eps = c.rms_norm_eps;
        let kind = c.recipe.norm;
        let b = &mut self.buf;
        for v in [&mut b.x, &mut b.h, &mut b.y] {
            v.clear();
            v.resize(t * h, 0.0);
        }
        let embed = m.embed.view(bytes);
        for (row, &tok) in b.x.chunks_mut(h).zip(tokens) {
            embed.row(tok as usize, row);
        }
        let recipe = &c.recipe;
        if recipe.embedding_multiplier != 1.0 {
            b.x.iter_mut().for_each(|v| *v *= recipe.embedding_multiplier);
        }
        if let Some(pe) = &m.pos_embed {
            let pe = pe.view(bytes);
            b.norm_w.clear();
            b.norm_w.resize(h, 0.0);
            for (i, row) in b.x.chunks_mut(h).enumerate() {
                pe.row(self.pos + i, &mut b.norm_w);
                add_into(row, &b.norm_w);
            }
        }
        for (l, (layer, state)) in m.layers.iter().zip(&mut self.state).enumerate() {
            layer.attn.norm().read(bytes, &mut b.norm_w);
            read_bias(layer.attn.norm_bias(), bytes, h, &mut b.norm_b);
            for (o, i) in b.h.chunks_mut(h).zip(b.x.chunks(h)) {
                meo::norm(kind, i, &b.norm_w, &b.norm_b, eps, o);
            }
            match (&layer.attn, state) {
                (Attention::Gqa(a), LayerState::Kv(cache)) => {
                    attention(par, bytes, a, &m.rope, eps, cache, self.pos, &b.h, t, &mut b.attn, &mut b.y)
                }
                (Attention::Mla(a), LayerState::Kv(cache)) => {
                    mla::attention(par, bytes, a, &m.rope, self.kv.mla, cache, self.pos, &b.h, t, &mut b.mla, &mut b.y)
                }
                (Attention::GatedDeltaNet(p), LayerState::Recurrent(st)) => {
                    delta::delta_net(par, bytes, p, st, &b.h, t, &mut b.delta, &mut b.y)
                }
                (Attention::Mamba2(p), LayerState::Recurrent(st)) => {
                    mamba::mamba2(par, bytes, p, st, &b.h, t, &mut b.mamba, &mut b.y)
                }
                (Attention::ShortConv(p), LayerState::Recurrent(st)) => {
                    short_conv::short_conv(par, bytes, p, st, &b.h, t, &mut b.short_conv, &mut b.y)
                }
                // `state` is built from these same layers in `Session::new`.
                _ => unreachable!("layer {l}: session state does not match the layer's mixer"),
            }
            add_residual(&mut b.x, &mut b.y, recipe.residual_multiplier);

            layer.ffn_norm.read(bytes, &mut b.norm_w);
            read_bias(layer.ffn_norm_bias.as_ref(), bytes, h, &mut b.norm_b);
            for (o, i) in b.h.chunks_mut(h).zip(b.x.chunks(h)) {
                meo::norm(kind, i, &b.norm_w, &b.norm_b, eps, o);
            }
            if matches!(layer.ffn, FfnPlan::Moe(_))
                && trace.wants_prediction()
                && let Some((next, np)) = next_routed(m, self.bank.plan.layers(), &self.bank.built, l)
            {
                // Before this layer's experts run, so the reads overlap their compute.
                predict(par, bytes, np, &c.router, &b.h, t, &mut b.ffn, &mut b.predicted);
                trace.on_experts_predicted(l, next, &b.predicted);
            }
            let exec = &self.bank.plan.layers()[l];
            let built = &mut self.bank.built[l];
            match &layer.ffn {
                FfnPlan::Meo(p) => {
                    let (act, k) = (c.recipe.ffn_activation, c.router.top_k);
                    let ne = p.banks[0].experts.len();
                    let src = match (exec, &*built) {
                        (_, Some(Built::MeoMerged(mb))) => Some([BankSrc::Session(&mb[0]), BankSrc::Session(&mb[1])]),
                        (_, Some(Built::MeoGates(g))) => {
                            let slots = [bank_slots(0, ne, &g[0]), bank_slots(1, ne, &g[1])].concat();
                            trace.on_experts_selected(l, &slots);
                            Some([BankSrc::Mixture(&g[0]), BankSrc::Mixture(&g[1])])
                        }
                        (LayerExec::MeoTask { task, index }, _) => {
                            let tl = &m.meo_tasks[*task].layers[*index];
                            let f = |i: usize| BankSrc::File(&bytes[tl.banks[i].0.slab.clone()], &tl.banks[i].0);
                            Some([f(0), f(1)])
                        }
                        _ => None,
                    };
                    let merge = !matches!(exec, LayerExec::MeoSequence { merged: false });
                    let mut on_gate = |bk: usize, g: &[Choice]| trace.on_experts_selected(l, &bank_slots(bk, ne, g));
                    let made = meo::ffn(par, bytes, p, act, k, src, merge, &mut on_gate, &b.h, t, &mut b.meo, &mut b.y);
                    match made {
                        Some(meo::Made::Merged(mb)) => *built = Some(Built::MeoMerged(alloc::boxed::Box::new(mb))),
                        Some(meo::Made::Gates(g)) => *built = Some(Built::MeoGates(alloc::boxed::Box::new(g))),
                        None => {}
                    }
                    match (exec, &*built) {
                        (LayerExec::MeoTask { task, index }, _) => {
                            for (bank, _) in &m.meo_tasks[*task].layers[*index].banks {
                                trace.on_merged(l, t, &MergedUse::File(bank.slab.clone()));
                            }
                        }
                        (_, Some(Built::MeoMerged(mb))) => {
                            trace.on_merged(l, t, &MergedUse::Session(mb[0].bytes.len() + mb[1].bytes.len()));
                        }
                        _ => {}
                    }
                }
                FfnPlan::Dense(mlp) => dense(par, bytes, mlp, &b.h, t, &mut b.ffn, &mut b.y),
                FfnPlan::Moe(p) => {
                    trace.on_moe_input(l, self.pos, &b.h);
                    let spec = &c.router;
                    let fallback = match &self.on_miss.mode {
                        OnMiss::Exact => None,
                        OnMiss::Resident => Some(Fallback::Resident),
                        // A layer the task stores no merge for runs exact.
                        OnMiss::Merged(_) => self.on_miss.merged.get(l).copied().flatten().map(|(ti, i, inv_mass)| {
                            let ex = &m.tasks[ti].layers[i].expert;
                            Fallback::Merged { bytes: &bytes[ex.slab.clone()], mlp: &ex.mlp, inv_mass }
                        }),
                    };
                    match (exec, &*built) {
                        (LayerExec::TaskMerge { task, index }, _) => {
                            let ex = &m.tasks[*task].layers[*index].expert;
                            let eb = &bytes[ex.slab.clone()];
                            merged(par, bytes, eb, &ex.mlp, p, spec, &b.h, t, &mut b.ffn, &mut b.y);
                            trace.on_merged(l, t, &MergedUse::File(ex.slab.clone()));
                        }
                        (_, Some(Built::Merged(me))) => {
                            merged(par, bytes, &me.bytes, &me.mlp, p, spec, &b.h, t, &mut b.ffn, &mut b.y);
                            trace.on_merged(l, t, &MergedUse::Session(me.bytes.len()));
                        }
                        (LayerExec::PromptMerge(pool), None) => {
                            // The prompt: vanilla, then merge this layer once from its routing.
                            moe(par, bytes, p, spec, l, self.pos, &b.h, t, &mut b.ffn, trace, fallback, &mut b.y);
                            let w = prompt_merge_weights(*pool, par, bytes, p, spec, &b.h, t, last_choices(&b.ffn));
                            // Shapes were validated at open and the weights are finite: the
                            // merge cannot fail; if it did, the layer would stay vanilla.
                            if let Ok(me) = m.merge_layer(l, &w, None) {
                                *built = Some(Built::Merged(me));
                            }
                        }
                        _ => moe(par, bytes, p, spec, l, self.pos, &b.h, t, &mut b.ffn, trace, fallback, &mut b.y),
                    }
                }
            }
            add_residual(&mut b.x, &mut b.y, recipe.residual_multiplier);
        }
    }

    /// The logits of the last call (empty before the first).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// The first layer after `l` that will run routed experts from their slabs (a mixture: not
/// merged, not a stored merge), and its plan.
fn next_routed<'p>(
    m: &'p Model,
    exec: &[LayerExec],
    built: &[Option<Built>],
    l: usize,
) -> Option<(usize, &'p super::plan::MoePlan)> {
    m.layers.iter().enumerate().skip(l + 1).find_map(|(i, layer)| match (&layer.ffn, &exec[i], &built[i]) {
        (FfnPlan::Moe(p), LayerExec::Mixture | LayerExec::PromptMerge(_), None) => Some((i, p)),
        _ => None,
    })
}

/// `x += y · multiplier` (the residual connection; `y` is scratch and is scaled in place).
fn add_residual(x: &mut [f32], y: &mut [f32], multiplier: f32) {
    if multiplier != 1.0 {
        y.iter_mut().for_each(|v| *v *= multiplier);
    }
    add_into(x, y);
}

/// A norm's bias into `out` (zeros when it has none; RMSNorm ignores it).
fn read_bias(v: Option<&super::plan::Vector>, bytes: &[u8], h: usize, out: &mut Vec<f32>) {
    match v {
        Some(v) => v.read(bytes, out),
        None => {
            out.clear();
            out.resize(h, 0.0);
        }
    }
}

#[cfg(feature = "std")]
fn make_pool(threads: usize) -> Result<Pool, SessionError> {
    let n = if threads == 0 { crate::kernels::default_threads() } else { threads };
    if n <= 1 {
        return Ok(Pool::Serial(Serial));
    }
    crate::kernels::ThreadPool::new(n)
        .map(Pool::Threads)
        .map_err(|e| SessionError::Threads { threads: n, reason: alloc::string::ToString::to_string(&e) })
}

#[cfg(not(feature = "std"))]
fn make_pool(_threads: usize) -> Result<Pool, SessionError> {
    Ok(Pool::Serial(Serial))
}
