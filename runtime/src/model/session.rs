//! A [`Session`]: one sequence's KV cache and scratch over a shared [`Model`].

use super::Model;
use super::attention::{AttnScratch, LayerCache, attention};
use super::bank::{MergeOptions, MergedUse, Mode, ModeError, PromptPool};
use super::ffn::{FfnScratch, dense, last_choices, merged, moe, route_one};
use super::meo::{self, BankSrc, MergedBank};
use super::mla::{self, MlaScratch};
use super::plan::{Attention, FfnPlan};
use crate::kernels::{Parallel, Serial, add_into, matmul};
use crate::merge::{ExpertRef, MergedExpert};
use crate::route::Choice;
use alloc::string::String;
use alloc::vec::Vec;

/// Observes routing as it happens, without the model knowing what is done with it
/// (dumps, prefetch, residency statistics). Both methods default to doing nothing.
pub trait Trace {
    /// Routing of MoE layer `layer` is known for every token of the current call: `experts`
    /// are the distinct experts selected (ascending). Called before any of them runs, so an
    /// implementation can prefetch their slabs ([`Model::expert_slab`]). In an MEO-native layer
    /// `b·E + e` stands for expert `e` of bank `b` ([`Model::bank_expert_slab`]), reported when a
    /// bank's experts are about to be merged or run unmerged.
    fn on_experts_selected(&mut self, _layer: usize, _experts: &[u32]) {}
    /// The choices of the token at absolute position `pos` (0 = first token since
    /// [`Session::reset`]) in MoE layer `layer`: `top_k` experts in ascending order with the
    /// weights their outputs are multiplied by (0 for a token dropped by capacity).
    fn on_route(&mut self, _layer: usize, _pos: usize, _choices: &[Choice]) {}
    /// The input of MoE layer `layer` (the normalised hidden states, `[T, hidden]`, the
    /// router's input) for the tokens at positions `pos0..pos0 + T`, before the layer runs.
    fn on_moe_input(&mut self, _layer: usize, _pos0: usize, _x: &[f32]) {}
    /// MoE layer `layer` ran merged for `tokens` tokens, reading `expert` (no routing, no
    /// per-expert slab).
    fn on_merged(&mut self, _layer: usize, _tokens: usize, _expert: &MergedUse) {}
}

/// A [`Trace`] that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTrace;

impl Trace for NoTrace {}

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
    meo: meo::MeoScratch,
    attn: AttnScratch,
    mla: MlaScratch,
    ffn: FfnScratch,
}

/// One sequence being run: KV cache, scratch buffers, thread pool. Create as many as needed
/// over one [`Model`]; each is used from one thread at a time.
pub struct Session<'m> {
    model: &'m Model,
    pool: Pool,
    max_context: usize,
    pos: usize,
    cache: Vec<LayerCache>,
    buf: Buffers,
    logits: Vec<f32>,
    /// Output of the last [`Session::encode`], `[T, hidden]`.
    hidden: Vec<f32>,
    bank: BankState,
}

/// How one MoE layer runs in this session.
#[derive(Debug)]
enum Exec {
    /// Per-token mixture (vanilla).
    Mixture,
    /// Task merge `layers[index]` of task `task` of the model.
    Stored { task: usize, index: usize },
    /// Prompt mode before the prompt: run vanilla and pool the routing.
    Pending,
    /// Prompt mode after the prompt: the merged expert.
    Cached(MergedExpert),
    /// MEO-native layer, sequence level, before the prompt: the next forward call pools each
    /// bank's gate from its input and merges it.
    MeoPending,
    /// MEO-native layer, sequence level, after the prompt: fc1 and fc2 merged.
    MeoCached(alloc::boxed::Box<[MergedBank; 2]>),
    /// MEO-native layer, task level: `layers[index]` of the model's MEO task `task`.
    MeoStored { task: usize, index: usize },
    /// MEO-native layer run unmerged (`Mode::Vanilla`): the gates pooled from the prompt
    /// (`None` until it has run), then each bank as `Σ g_i (W_i x + b_i)`.
    MeoMixture(Option<alloc::boxed::Box<[Vec<Choice>; 2]>>),
}

#[derive(Debug, Default)]
struct BankState {
    opts: MergeOptions,
    /// Per layer (dense layers `Mixture`, never used).
    exec: Vec<Exec>,
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
            pos: 0,
            cache: (0..model.layers.len()).map(|_| LayerCache::default()).collect(),
            buf: Buffers::default(),
            logits: Vec::new(),
            hidden: Vec::new(),
            bank: BankState { opts: MergeOptions::default(), exec: default_exec(model) },
        })
    }

    /// Sets the routing mode and merge policy, and resets the sequence. Returns the layers
    /// that will run merged (ascending; in prompt mode, once the prompt has run).
    ///
    /// # Errors
    /// An unknown task (the error lists the file's tasks), a listed layer that is not an MoE
    /// layer or has no stored merge for the task, or `auto` without measured errors. On error
    /// the session is unchanged.
    pub fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, ModeError> {
        let m = self.model;
        let moe: Vec<usize> = m.moe_layers().collect();
        let pick = |candidates: &[(usize, Option<f64>)], what: &'static str| opts.pick_layers(&moe, candidates, what);
        let mut exec = default_exec(m);
        let meo_layers: Vec<usize> = m.meo_layers().collect();
        let mut layers = match &opts.mode {
            // An MEO-native model's gate is its own (sequence) gate in every mode: prompt merges
            // each bank once (the model as defined, `default_exec`); vanilla runs the same gates
            // unmerged (same function, k× the expert bytes: the baseline merging is measured
            // against).
            Mode::Prompt(_) if !meo_layers.is_empty() => meo_layers,
            Mode::Vanilla if !meo_layers.is_empty() => {
                for &l in &meo_layers {
                    exec[l] = Exec::MeoMixture(None);
                }
                Vec::new()
            }
            Mode::Task(name) if !meo_layers.is_empty() => {
                let ti = m.meo_tasks.iter().position(|t| t.name == *name).ok_or_else(|| ModeError::UnknownTask {
                    name: name.clone(),
                    available: m.meo_tasks.iter().map(|t| t.name.clone()).collect(),
                })?;
                for (index, tl) in m.meo_tasks[ti].layers.iter().enumerate() {
                    exec[tl.layer] = Exec::MeoStored { task: ti, index };
                }
                meo_layers
            }
            Mode::Vanilla => Vec::new(),
            Mode::Task(name) => {
                let task = m.task(name)?;
                let ti = m.tasks.iter().position(|t| t.name == *name).unwrap_or(0);
                let cands: Vec<(usize, Option<f64>)> = task.layers.iter().map(|tl| (tl.layer, tl.error)).collect();
                let layers = pick(&cands, "task")?;
                for &l in &layers {
                    let index = task.layers.iter().position(|tl| tl.layer == l).unwrap_or(0);
                    exec[l] = Exec::Stored { task: ti, index };
                }
                layers
            }
            Mode::Prompt(_) => {
                // Experts with biases have no merge rule (`Model::merge_layer` refuses them).
                let biased = m
                    .layers
                    .iter()
                    .position(|l| matches!(&l.ffn, FfnPlan::Moe(p) if p.experts.iter().any(|e| e.mlp.bias.is_some())));
                if let Some(layer) = biased {
                    return Err(ModeError::NotMergeable { layer, what: "experts with biases" });
                }
                let cands: Vec<(usize, Option<f64>)> =
                    moe.iter().map(|&l| (l, m.prompt_errors.iter().find(|e| e.0 == l).map(|e| e.1))).collect();
                let layers = pick(&cands, "prompt")?;
                for &l in &layers {
                    exec[l] = Exec::Pending;
                }
                layers
            }
        };
        layers.sort_unstable();
        layers.dedup();
        self.bank = BankState { opts, exec };
        self.truncate(0);
        Ok(layers)
    }

    /// The routing mode and merge policy.
    pub fn mode(&self) -> &MergeOptions {
        &self.bank.opts
    }

    /// The layers that run merged now (prompt mode: empty until the prompt has run).
    pub fn merged_layers(&self) -> Vec<usize> {
        (0..self.bank.exec.len())
            .filter(|&l| {
                let mixture = matches!(self.bank.exec[l], Exec::MeoMixture(_));
                self.merged_expert(l).is_some() || (!mixture && self.bank_gates(l).is_some())
            })
            .collect()
    }

    /// The gates of MEO-native layer `layer`'s banks (fc1, fc2): the selected experts,
    /// ascending, with their weights. `None` for other layers, and in sequence mode until the
    /// prompt has run.
    pub fn bank_gates(&self, layer: usize) -> Option<[Vec<Choice>; 2]> {
        match self.bank.exec.get(layer)? {
            Exec::MeoCached(b) => Some([b[0].gate.clone(), b[1].gate.clone()]),
            Exec::MeoMixture(Some(g)) => Some((**g).clone()),
            Exec::MeoStored { task, index } => {
                let tl = &self.model.meo_tasks[*task].layers[*index];
                let g = |w: &[f32]| {
                    w.iter()
                        .enumerate()
                        .filter(|(_, w)| **w != 0.0)
                        .map(|(e, &weight)| Choice { expert: e as u32, weight })
                        .collect()
                };
                Some([g(&tl.banks[0].1), g(&tl.banks[1].1)])
            }
            _ => None,
        }
    }

    /// The merged expert layer `layer` runs now, if it runs merged.
    pub fn merged_expert(&self, layer: usize) -> Option<ExpertRef<'_>> {
        match self.bank.exec.get(layer)? {
            Exec::Stored { task, index } => {
                let tl = &self.model.tasks[*task].layers[*index];
                Some(ExpertRef { bytes: &self.model.bytes()[tl.expert.slab.clone()], mlp: &tl.expert.mlp })
            }
            Exec::Cached(me) => Some(me.as_ref()),
            _ => None,
        }
    }

    /// The merge weights of a merged layer (per expert).
    pub fn merge_weights(&self, layer: usize) -> Option<Vec<f32>> {
        match self.bank.exec.get(layer)? {
            Exec::Stored { task, index } => {
                Some(self.model.tasks[*task].layers[*index].weights.iter().map(|&w| w as f32).collect())
            }
            Exec::Cached(me) => Some(me.weights.clone()),
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
        let floats: usize = self.cache.iter().flat_map(|c| c.k.iter().chain(&c.v)).map(Vec::len).sum();
        floats as u64 * 4
    }

    /// Worker threads in use.
    pub fn threads(&self) -> usize {
        self.pool.par().threads()
    }

    /// Forgets the sequence (keeps the buffers' memory).
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` positions of the cache (no-op if `len >= position()`).
    /// Truncating to 0 is a reset: prompt-mode merges are dropped and redone from the next
    /// call.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.pos {
            return;
        }
        for (c, layer) in self.cache.iter_mut().zip(&self.model.layers) {
            let (kw, vw) = layer.attn.cache_widths();
            c.truncate(len, kw, vw);
        }
        self.pos = len;
        if len == 0 {
            // A new sequence: prompt merges are redone from its prompt.
            for e in &mut self.bank.exec {
                if matches!(e, Exec::Cached(_)) {
                    *e = Exec::Pending;
                }
                if matches!(e, Exec::MeoCached(_)) {
                    *e = Exec::MeoPending;
                }
                if matches!(e, Exec::MeoMixture(Some(_))) {
                    *e = Exec::MeoMixture(None);
                }
            }
        }
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
        let scaling = c.recipe.logits_scaling;
        if scaling != 1.0 {
            // Divided, not multiplied by the reciprocal, as transformers does.
            self.logits.iter_mut().for_each(|v| *v /= scaling);
        }
        self.pos += t;
        if m.file_changed() {
            self.truncate(self.pos - t); // drop what the zeros produced
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
        for (l, (layer, cache)) in m.layers.iter().zip(&mut self.cache).enumerate() {
            layer.attn.norm().read(bytes, &mut b.norm_w);
            read_bias(layer.attn.norm_bias(), bytes, h, &mut b.norm_b);
            for (o, i) in b.h.chunks_mut(h).zip(b.x.chunks(h)) {
                meo::norm(kind, i, &b.norm_w, &b.norm_b, eps, o);
            }
            match &layer.attn {
                Attention::Gqa(a) => {
                    attention(par, bytes, a, &m.rope, eps, cache, self.pos, &b.h, t, &mut b.attn, &mut b.y)
                }
                Attention::Mla(a) => {
                    mla::attention(par, bytes, a, &m.rope, cache, self.pos, &b.h, t, &mut b.mla, &mut b.y)
                }
            }
            add_residual(&mut b.x, &mut b.y, recipe.residual_multiplier);

            layer.ffn_norm.read(bytes, &mut b.norm_w);
            read_bias(layer.ffn_norm_bias.as_ref(), bytes, h, &mut b.norm_b);
            for (o, i) in b.h.chunks_mut(h).zip(b.x.chunks(h)) {
                meo::norm(kind, i, &b.norm_w, &b.norm_b, eps, o);
            }
            match &layer.ffn {
                FfnPlan::Meo(p) => {
                    let (act, k) = (c.recipe.ffn_activation, c.router.top_k);
                    let exec = &mut self.bank.exec[l];
                    let ne = p.banks[0].experts.len();
                    let src = match &*exec {
                        Exec::MeoCached(mb) => Some([BankSrc::Session(&mb[0]), BankSrc::Session(&mb[1])]),
                        Exec::MeoMixture(Some(g)) => {
                            // Slot of expert e of bank b in the residency index: b·E + e.
                            let slots: Vec<u32> =
                                (0..2).flat_map(|bk| g[bk].iter().map(move |c| (bk * ne) as u32 + c.expert)).collect();
                            trace.on_experts_selected(l, &slots);
                            Some([BankSrc::Mixture(&g[0]), BankSrc::Mixture(&g[1])])
                        }
                        Exec::MeoStored { task, index } => {
                            let tl = &m.meo_tasks[*task].layers[*index];
                            let f = |i: usize| BankSrc::File(&bytes[tl.banks[i].0.slab.clone()], &tl.banks[i].0);
                            Some([f(0), f(1)])
                        }
                        _ => None,
                    };
                    let stored = matches!(exec, Exec::MeoStored { .. });
                    let merge = !matches!(exec, Exec::MeoMixture(_));
                    let mut on_gate = |bk: usize, g: &[Choice]| {
                        let slots: Vec<u32> = g.iter().map(|c| (bk * ne) as u32 + c.expert).collect();
                        trace.on_experts_selected(l, &slots);
                    };
                    let made = meo::ffn(par, bytes, p, act, k, src, merge, &mut on_gate, &b.h, t, &mut b.meo, &mut b.y);
                    match made {
                        Some(meo::Made::Merged(mb)) => *exec = Exec::MeoCached(alloc::boxed::Box::new(mb)),
                        Some(meo::Made::Gates(g)) => *exec = Exec::MeoMixture(Some(alloc::boxed::Box::new(g))),
                        None => {}
                    }
                    match &*exec {
                        Exec::MeoStored { task, index } if stored => {
                            for (bank, _) in &m.meo_tasks[*task].layers[*index].banks {
                                trace.on_merged(l, t, &MergedUse::File(bank.slab.clone()));
                            }
                        }
                        Exec::MeoCached(mb) => {
                            trace.on_merged(l, t, &MergedUse::Session(mb[0].bytes.len() + mb[1].bytes.len()));
                        }
                        _ => {}
                    }
                }
                FfnPlan::Dense(mlp) => dense(par, bytes, mlp, &b.h, t, &mut b.ffn, &mut b.y),
                FfnPlan::Moe(p) => {
                    trace.on_moe_input(l, self.pos, &b.h);
                    let spec = &c.router;
                    match &mut self.bank.exec[l] {
                        Exec::Mixture => moe(par, bytes, p, spec, l, self.pos, &b.h, t, &mut b.ffn, trace, &mut b.y),
                        Exec::Stored { task, index } => {
                            let ex = &m.tasks[*task].layers[*index].expert;
                            let eb = &bytes[ex.slab.clone()];
                            merged(par, bytes, eb, &ex.mlp, p, spec, &b.h, t, &mut b.ffn, &mut b.y);
                            trace.on_merged(l, t, &MergedUse::File(ex.slab.clone()));
                        }
                        Exec::Cached(me) => {
                            merged(par, bytes, &me.bytes, &me.mlp, p, spec, &b.h, t, &mut b.ffn, &mut b.y);
                            trace.on_merged(l, t, &MergedUse::Session(me.bytes.len()));
                        }
                        exec @ Exec::Pending => {
                            // The prompt: vanilla, then merge this layer once from its routing.
                            moe(par, bytes, p, spec, l, self.pos, &b.h, t, &mut b.ffn, trace, &mut b.y);
                            let pool = match &self.bank.opts.mode {
                                Mode::Prompt(pool) => *pool,
                                _ => PromptPool::default(),
                            };
                            let w = pooled_weights(pool, par, bytes, p, spec, &b.h, t, &mut b.ffn);
                            // Shapes were validated at open and the weights are finite: the
                            // merge cannot fail; if it did, the layer would stay vanilla.
                            *exec = match m.merge_layer(l, &w, None) {
                                Ok(me) => Exec::Cached(me),
                                Err(_) => Exec::Mixture,
                            };
                        }
                        // MEO states only ever sit on MEO layers (set by `default_exec`/`set_mode`).
                        Exec::MeoPending | Exec::MeoCached(_) | Exec::MeoStored { .. } | Exec::MeoMixture(_) => {
                            moe(par, bytes, p, spec, l, self.pos, &b.h, t, &mut b.ffn, trace, &mut b.y)
                        }
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

/// The default execution of every layer: MEO-native layers at their own (sequence) level,
/// MoE layers as a per-token mixture.
fn default_exec(model: &Model) -> Vec<Exec> {
    model
        .layers
        .iter()
        .map(|l| if matches!(l.ffn, FfnPlan::Meo(_)) { Exec::MeoPending } else { Exec::Mixture })
        .collect()
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

/// Prompt-mode merge weights of one layer from its prompt `x` (`[t, hidden]`) and the
/// choices the vanilla pass just made (in `s`).
#[allow(clippy::too_many_arguments)]
fn pooled_weights(
    pool: PromptPool,
    par: &dyn Parallel,
    bytes: &[u8],
    p: &super::plan::MoePlan,
    spec: &crate::RouterSpec,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
) -> Vec<f32> {
    let e = spec.num_experts;
    let mut w = alloc::vec![0.0f64; e];
    let n = t.max(1) as f64;
    match pool {
        PromptPool::MeanGate => {
            for c in last_choices(s) {
                w[c.expert as usize] += f64::from(c.weight);
            }
        }
        PromptPool::PooledInput => {
            let h = x.len() / t.max(1);
            let mut mean = alloc::vec![0.0f64; h];
            for row in x.chunks(h) {
                for (m, &v) in mean.iter_mut().zip(row) {
                    *m += f64::from(v);
                }
            }
            let mean: Vec<f32> = mean.iter().map(|&v| (v / n) as f32).collect();
            for c in route_one(par, bytes, p, spec, &mean, s) {
                w[c.expert as usize] += f64::from(c.weight) * n;
            }
        }
    }
    w.iter().map(|&v| (v / n) as f32).collect()
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
