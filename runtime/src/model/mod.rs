//! The model graph: a validated, immutable [`Model`] over a `.meo` file's bytes, and
//! [`Session`]s that run it.
//!
//! A model is a list of *layer recipes* ([`plan`]): data saying which tensors each block uses
//! and how (attention with optional biases, q/k norm, clipping and a window; a dense or MoE
//! feed-forward block with optional shared expert). The code that runs a recipe has no
//! per-family branches: a family is its config plus its tensors.
//!
//! Opening validates structure only: every tensor the config needs is present, with the
//! shape the config implies and a dtype the kernels read. No weight byte is read, so on a
//! memory-mapped file no weight page is touched; an expert's bytes are read only when
//! routing selects it, and only through its slab.

mod attention;
pub mod bank;
mod delta;
pub mod exec;
mod ffn;
pub mod kv;
mod mamba;
mod meo;
mod mla;
pub mod plan;
mod recurrent;
mod session;
mod short_conv;
mod trace;

pub use bank::{
    Execution, Granularity, LayerSelect, MISS_TASK, MergeOptions, MergedUse, Mode, ModeError, OnMiss, PromptPool,
};
pub use exec::{ExecPlan, LayerExec};
pub use kv::{KvDtype, KvOptions, KvParseError, MlaCache};
pub use meo::{MergedBank, merge_bank, sequence_gate, topk_softmax};
pub use session::{
    DEFAULT_MAX_CONTEXT, ForwardError, Logits, STATE_MAGIC, STATE_VERSION, Session, SessionError, SessionOptions,
    StateError,
};
pub use trace::{NoTrace, Trace};

use crate::config::{ConfigError, ModelConfig};
use crate::format::{FormatError, MeoFile, MetaValue};
use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use plan::{LayerPlan, Mat, Rope, Vector};

/// Why a file cannot be run as a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[cfg(feature = "std")]
    #[error(transparent)]
    Open(#[from] crate::file::OpenError),
    // Format and Config show their cause in the message (C API and `to_string` users see only
    // the message), so the cause is not also a `source`: an error-chain printer (`{:#}`) would
    // repeat it. Hence the hand-written `From` impls below instead of `#[from]`.
    #[error("not a valid .meo file: {0}")]
    Format(FormatError),
    #[error("invalid model metadata: {0}")]
    Config(ConfigError),
    #[error("tensor {name:?} is missing (the model config needs it)")]
    MissingTensor { name: String },
    #[error("tensor {name:?} has shape {found:?}, the model config needs {expected:?}")]
    WrongShape { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("tensor {name:?} is {found}, expected {expected}")]
    WrongDType { name: String, found: &'static str, expected: &'static str },
    #[error("expert tensor {name:?} does not lie inside its expert slab")]
    NotInSlab { name: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid MEO merge data: {0}")]
    Merge(String),
}

impl From<FormatError> for ModelError {
    fn from(e: FormatError) -> Self {
        Self::Format(e)
    }
}

impl From<ConfigError> for ModelError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// Where the bytes live.
enum Storage {
    Static(&'static [u8]),
    Owned(Vec<u8>),
    #[cfg(feature = "std")]
    Mapped(crate::file::Mapped),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Static(b) => b,
            Self::Owned(v) => v,
            #[cfg(feature = "std")]
            Self::Mapped(m) => m.bytes(),
        }
    }
}

/// An opened model: the file's bytes, its config and the validated layer recipes.
/// Immutable, `Send + Sync`: share one across threads and run a [`Session`] per thread.
pub struct Model {
    storage: Storage,
    config: ModelConfig,
    pub(crate) embed: Mat,
    pub(crate) output_norm: Vector,
    /// The LM head (the embedding matrix when tied).
    pub(crate) output: Mat,
    pub(crate) layers: Vec<LayerPlan>,
    pub(crate) rope: Rope,
    /// Learned absolute positions (`model.positions = learned`).
    pub(crate) pos_embed: Option<Mat>,
    /// Final LayerNorm bias (`model.norm = layer`).
    pub(crate) output_norm_bias: Option<Vector>,
    /// LM head bias (`model.output_bias`).
    pub(crate) output_bias: Option<Vector>,
    /// Precomputed task merges of an MEO-native model's banks.
    pub(crate) meo_tasks: Vec<plan::MeoTask>,
    /// Precomputed task merges stored in the file.
    pub(crate) tasks: Vec<plan::TaskMerge>,
    /// Measured prompt-mode merge error per MoE layer (converter calibration).
    pub(crate) prompt_errors: Vec<(usize, f64)>,
}

impl core::fmt::Debug for Model {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.config.architecture)
            .field("bytes", &self.storage.bytes().len())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Memory-maps `path` and validates it (no weight page is read).
    ///
    /// # Errors
    /// The file cannot be opened, is not a valid `.meo` file, or does not describe a model
    /// this runtime can run.
    #[cfg(feature = "std")]
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self, ModelError> {
        Self::from_mapped(crate::file::Mapped::open(path)?)
    }

    /// A model over an existing mapping.
    ///
    /// # Errors
    /// As [`Model::open`].
    #[cfg(feature = "std")]
    pub fn from_mapped(map: crate::file::Mapped) -> Result<Self, ModelError> {
        Self::from_storage(Storage::Mapped(map))
    }

    /// A model over bytes that live for the whole program (e.g. `include_bytes!`).
    ///
    /// # Errors
    /// Not a valid `.meo` file, or not a model this runtime can run.
    pub fn from_static(bytes: &'static [u8]) -> Result<Self, ModelError> {
        Self::from_storage(Storage::Static(bytes))
    }

    /// A model over owned bytes (no alignment requirement).
    ///
    /// # Errors
    /// Not a valid `.meo` file, or not a model this runtime can run.
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self, ModelError> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<Self, ModelError> {
        let (
            config,
            embed,
            output_norm,
            output,
            layers,
            rope,
            (tasks, prompt_errors),
            (pos_embed, output_norm_bias, output_bias),
            meo_tasks,
        ) = {
            let file = MeoFile::parse(storage.bytes())?;
            // A mapped file: prefetch the tensors every token uses (norms, attention,
            // routers), never the experts. Advice only: if the OS refuses it, pages still
            // fault in on first use.
            #[cfg(feature = "std")]
            if let Storage::Mapped(map) = &storage {
                let _ = crate::residency::advise_lazy(map, &file);
            }
            let config = ModelConfig::from_metadata(&file.metadata)?;
            check_rope_type(&file, config.recipe.rope_inv_freq.is_some())?;
            let b = plan::Builder::new(&file, &config)?;
            let (embed, output_norm, output) = b.globals()?;
            let layers = (0..config.num_layers).map(|l| b.layer(l)).collect::<Result<Vec<_>, _>>()?;
            let rope = Rope::new(&config);
            let merges = b.merges()?;
            let extras = b.extras()?;
            let meo_tasks =
                if config.layer_ffn.contains(&crate::FfnKind::MeoBank) { b.meo_tasks()? } else { Vec::new() };
            (config, embed, output_norm, output, layers, rope, merges, extras, meo_tasks)
        };
        Ok(Self {
            storage,
            config,
            embed,
            output_norm,
            output,
            layers,
            rope,
            pos_embed,
            output_norm_bias,
            output_bias,
            meo_tasks,
            tasks,
            prompt_errors,
        })
    }

    /// The model description from the file's metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// [`MeoFile::verify_dense`] on this model's file: the checksums of everything but the
    /// expert slabs (opt-in at open: it reads those bytes, which every token reads anyway).
    ///
    /// # Errors
    /// A checksum does not match.
    pub fn verify_dense(&self) -> Result<(), FormatError> {
        self.file()?.verify_dense()
    }

    /// Whether the model's file changed on disk while mapped (truncated or rewritten in
    /// place), as detected by the SIGBUS guard ([`crate::guard`]); the bytes read since then
    /// are zeros, not the model's. Always false for bytes in memory or without the guard.
    pub fn file_changed(&self) -> bool {
        #[cfg(all(feature = "std", unix))]
        return crate::guard::changed(self.storage.bytes());
        #[cfg(not(all(feature = "std", unix)))]
        false
    }

    /// The whole file (touching weight bytes pages them in).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The mapping, when the model was opened from a file (for residency queries).
    #[cfg(feature = "std")]
    pub fn mapped(&self) -> Option<&crate::file::Mapped> {
        match &self.storage {
            Storage::Mapped(m) => Some(m),
            _ => None,
        }
    }

    /// Parses the file again (header, metadata, table; no weights), e.g. to read the
    /// embedded tokenizer or list slabs.
    ///
    /// # Errors
    /// Never for a model that opened; the `Result` is the reader's.
    pub fn file(&self) -> Result<MeoFile<'_>, FormatError> {
        MeoFile::parse(self.storage.bytes())
    }

    /// Absolute byte range in the file of expert `expert`'s slab in layer `layer` (all of
    /// its matrices), or `None` if that layer has no such expert.
    pub fn expert_slab(&self, layer: usize, expert: usize) -> Option<Range<usize>> {
        match &self.layers.get(layer)?.ffn {
            plan::FfnPlan::Moe(m) => m.experts.get(expert).map(|e| e.slab.clone()),
            plan::FfnPlan::Dense(_) | plan::FfnPlan::Meo(_) => None,
        }
    }

    /// Absolute byte range of expert `expert`'s slab in bank `bank` (0 = fc1, 1 = fc2) of MEO
    /// layer `layer`.
    pub fn bank_expert_slab(&self, layer: usize, bank: usize, expert: usize) -> Option<Range<usize>> {
        match &self.layers.get(layer)?.ffn {
            plan::FfnPlan::Meo(m) => m.banks.get(bank)?.experts.get(expert).map(|e| e.slab.clone()),
            _ => None,
        }
    }

    /// The global tensors' plans: embedding, final norm (and its LayerNorm bias), LM head
    /// (the embedding when tied), learned positions, and the RoPE frequencies.
    pub fn global_plans(&self) -> GlobalPlans<'_> {
        GlobalPlans {
            embed: &self.embed,
            output_norm: &self.output_norm,
            output_norm_bias: self.output_norm_bias.as_ref(),
            output: &self.output,
            output_bias: self.output_bias.as_ref(),
            pos_embed: self.pos_embed.as_ref(),
            rope: &self.rope,
        }
    }

    /// Indices of the MEO-native layers (expert banks, always merged).
    pub fn meo_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().enumerate().filter(|(_, l)| matches!(l.ffn, plan::FfnPlan::Meo(_))).map(|(i, _)| i)
    }

    /// The task merges of an MEO-native model stored in the file, in file order.
    pub fn meo_tasks(&self) -> &[plan::MeoTask] {
        &self.meo_tasks
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().enumerate().filter(|(_, l)| matches!(l.ffn, plan::FfnPlan::Moe(_))).map(|(i, _)| i)
    }

    /// The task merges stored in the file (`meo convert --task`), in file order.
    pub fn tasks(&self) -> &[plan::TaskMerge] {
        &self.tasks
    }

    /// The task named `name`.
    ///
    /// # Errors
    /// [`ModeError::UnknownTask`] listing the tasks the file has.
    pub fn task(&self, name: &str) -> Result<&plan::TaskMerge, ModeError> {
        self.tasks.iter().find(|t| t.name == name).ok_or_else(|| ModeError::UnknownTask {
            name: name.into(),
            available: self.tasks.iter().map(|t| t.name.clone()).collect(),
        })
    }

    /// Prompt-mode merge error per MoE layer as measured by the converter (may be empty).
    pub fn prompt_errors(&self) -> &[(usize, f64)] {
        &self.prompt_errors
    }

    /// Routed expert `expert` of MoE layer `layer`: its slab's bytes and matrices (using the
    /// view reads those bytes).
    pub fn expert(&self, layer: usize, expert: usize) -> Option<crate::merge::ExpertRef<'_>> {
        match &self.layers.get(layer)?.ffn {
            plan::FfnPlan::Moe(m) => {
                let e = m.experts.get(expert)?;
                Some(crate::merge::ExpertRef { bytes: &self.bytes()[e.slab.clone()], mlp: &e.mlp })
            }
            plan::FfnPlan::Dense(_) | plan::FfnPlan::Meo(_) => None,
        }
    }

    /// The stored merged expert of task `task`, layer `layer`.
    pub fn task_expert(&self, task: &str, layer: usize) -> Option<crate::merge::ExpertRef<'_>> {
        let task = self.tasks.iter().find(|t| t.name == task)?;
        let tl = task.layers.iter().find(|t| t.layer == layer)?;
        Some(crate::merge::ExpertRef { bytes: self.bytes().get(tl.expert.slab.clone())?, mlp: &tl.expert.mlp })
    }

    /// Merges the routed experts of MoE layer `layer` with weights `w` (one per expert; see
    /// [`crate::merge`]) in f32 and stores the result as `dtype` (default: the dtype the
    /// file stores the layer's experts in). Experts with weight 0 are not read.
    ///
    /// # Errors
    /// `layer` is not an MoE layer or `w` has the wrong length.
    pub fn merge_layer(
        &self,
        layer: usize,
        w: &[f32],
        dtype: Option<crate::DType>,
    ) -> Result<crate::merge::MergedExpert, ModeError> {
        let e = self.config.router.num_experts;
        let experts: Vec<_> = (0..e).map_while(|x| self.expert(layer, x)).collect();
        if experts.len() != e || experts.is_empty() {
            return Err(ModeError::NotMoe { layer });
        }
        if w.len() != e || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(ModeError::BadWeights { layer, expected: e });
        }
        if experts[0].mlp.bias.is_some() {
            // The merge rule (`crate::merge`) covers the three matrices only.
            return Err(ModeError::NotMergeable { layer, what: "experts with biases" });
        }
        let dtype = dtype.unwrap_or(experts[0].mlp.up.dtype);
        Ok(crate::merge::merge_expert(&experts, w, dtype, crate::merge::Mass::of(&self.config.router)))
    }

    /// Runs one expert on `x` (`[t, hidden]`) into `out` (`[t, hidden]`), on this thread.
    pub fn run_expert(&self, expert: crate::merge::ExpertRef<'_>, x: &[f32], t: usize, out: &mut [f32]) {
        let mut s = ffn::MlpScratch::default();
        ffn::mlp(&crate::kernels::Serial, expert.bytes, expert.mlp, x, t, &mut s, out);
    }

    /// One expert's intermediate activations on `x` (`[t, hidden]`): `act(gate x, up x)`,
    /// `[t, intermediate]`, the input of its `down` matrix (calibration statistics), on this
    /// thread.
    pub fn expert_hidden(&self, expert: crate::merge::ExpertRef<'_>, x: &[f32], t: usize) -> Vec<f32> {
        let mut s = ffn::MlpScratch::default();
        ffn::hidden(&crate::kernels::Serial, expert.bytes, expert.mlp, x, t, &mut s).to_vec()
    }

    /// The routed mixture `Σ_i w_i E_i(x_t)` of MoE layer `layer` for `t` tokens with the
    /// given choices (`[t, top_k]`, as [`Trace::on_route`] reports them; shared experts not
    /// included), into `out` (`[t, hidden]`), on this thread.
    ///
    /// # Errors
    /// `layer` is not an MoE layer, or the choices do not fit.
    pub fn mixture(
        &self,
        layer: usize,
        x: &[f32],
        t: usize,
        choices: &[crate::route::Choice],
        out: &mut [f32],
    ) -> Result<(), ModeError> {
        let h = self.config.hidden_size;
        let k = self.config.router.top_k;
        if choices.len() != t * k || x.len() != t * h || out.len() != t * h {
            return Err(ModeError::BadShape { layer });
        }
        out.fill(0.0);
        let mut y = alloc::vec![0.0f32; h];
        for (tok, ch) in choices.chunks(k).enumerate() {
            for c in ch {
                if c.weight == 0.0 {
                    continue;
                }
                let ex = self.expert(layer, c.expert as usize).ok_or(ModeError::NotMoe { layer })?;
                self.run_expert(ex, &x[tok * h..][..h], 1, &mut y);
                for (o, &v) in out[tok * h..][..h].iter_mut().zip(&y) {
                    *o += c.weight * v;
                }
            }
        }
        Ok(())
    }

    /// A new session (KV cache and scratch) over this model.
    ///
    /// # Errors
    /// The thread pool could not be started.
    pub fn session(&self, opts: SessionOptions) -> Result<Session<'_>, SessionError> {
        Session::new(self, opts)
    }
}

/// The global tensors of a [`Model`] (see [`Model::global_plans`]).
#[derive(Debug, Clone, Copy)]
pub struct GlobalPlans<'m> {
    pub embed: &'m Mat,
    pub output_norm: &'m Vector,
    pub output_norm_bias: Option<&'m Vector>,
    pub output: &'m Mat,
    /// The LM head's bias (`model.output_bias`), added to the logits before any scaling.
    pub output_bias: Option<&'m Vector>,
    pub pos_embed: Option<&'m Mat>,
    pub rope: &'m Rope,
}

/// RoPE is the default one, or any scaled one whose frequencies the file precomputes
/// (`model.rope_inv_freq`, `model.rope_attention_factor`); anything else is refused at open.
fn check_rope_type(file: &MeoFile<'_>, has_table: bool) -> Result<(), ModelError> {
    match file.metadata.get("model.rope_type") {
        None => Ok(()),
        Some(MetaValue::Str(s)) if *s == "default" || has_table => Ok(()),
        Some(MetaValue::Str(other)) => Err(ModelError::Unsupported(alloc::format!(
            "RoPE type {other:?} without model.rope_inv_freq (only \"default\" is computed at run time)"
        ))),
        Some(v) => {
            Err(ConfigError::WrongType { key: "model.rope_type", expected: "string", found: v.type_name() }.into())
        }
    }
}

#[cfg(test)]
mod tests;

/// The validated recipe as data, for targets outside this crate (`meo-wgpu`, `meo-ort`) that
/// run the same graph on other hardware.
impl Model {
    /// The layer recipes, in order.
    pub fn layer_plans(&self) -> &[LayerPlan] {
        &self.layers
    }

    /// The token embedding `[vocab, hidden]`.
    pub fn embedding(&self) -> &Mat {
        &self.embed
    }

    /// Learned absolute positions `[max_positions, hidden]` (`model.positions = learned`).
    pub fn position_embedding(&self) -> Option<&Mat> {
        self.pos_embed.as_ref()
    }

    /// The final norm's weight and (LayerNorm) bias.
    pub fn output_norm(&self) -> (&Vector, Option<&Vector>) {
        (&self.output_norm, self.output_norm_bias.as_ref())
    }

    /// The LM head `[vocab, hidden]` (the embedding when tied).
    pub fn output_head(&self) -> &Mat {
        &self.output
    }

    /// The RoPE frequencies.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Bytes of cached keys and values the attention reads for the query at position `pos`
    /// from a cache stored as `kv` says (only the window of a sliding-window layer).
    pub fn kv_bytes_read(&self, pos: usize, kv: KvOptions) -> u64 {
        let per_layer = |attn: &plan::Attention| {
            let Some(shape) = attn.cache_shape() else { return 0 };
            let window = match attn {
                plan::Attention::Gqa(a) => a.window,
                plan::Attention::Mla(a) => a.window,
                plan::Attention::GatedDeltaNet(_) | plan::Attention::Mamba2(_) | plan::Attention::ShortConv(_) => {
                    return 0;
                }
            };
            let n = if window > 0 { window.min(pos + 1) } else { pos + 1 };
            kv.position_bytes(shape).saturating_mul(n as u64)
        };
        self.layers.iter().map(|l| per_layer(&l.attn)).sum()
    }

    /// Bytes of the non-expert tensors one decode step reads: every tensor outside expert and
    /// merged-expert slabs (those depend on routing: [`Trace`] reports them per step), except
    /// that an untied embedding table (and a learned position table) contributes one row.
    ///
    /// # Errors
    /// Never for a model that opened; the `Result` is the reader's.
    pub fn dense_bytes_per_token(&self) -> Result<u64, FormatError> {
        let file = self.file()?;
        let tied = self.config.tie_word_embeddings;
        let mut total = 0u64;
        for t in file.tensors() {
            if crate::format::slab_key(t.name).is_some() {
                continue;
            }
            let one_row = (t.name == crate::names::EMBED && !tied) || t.name == crate::names::POS_EMBED;
            let rows = t.shape().first().copied().unwrap_or(1).max(1);
            total += if one_row { t.len / rows } else { t.len };
        }
        Ok(total)
    }
}
