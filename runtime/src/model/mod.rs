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
mod ffn;
pub mod plan;
mod session;

pub use session::{ForwardError, Logits, NoTrace, Session, SessionError, SessionOptions, Trace};

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
    #[error("not a valid .meo file: {0}")]
    Format(#[from] FormatError),
    #[error("invalid model metadata: {0}")]
    Config(#[from] ConfigError),
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
        let (config, embed, output_norm, output, layers, rope) = {
            let file = MeoFile::parse(storage.bytes())?;
            let config = ModelConfig::from_metadata(&file.metadata)?;
            check_rope_type(&file)?;
            let b = plan::Builder::new(&file, &config)?;
            let (embed, output_norm, output) = b.globals()?;
            let layers = (0..config.num_layers).map(|l| b.layer(l)).collect::<Result<Vec<_>, _>>()?;
            let rope = Rope::new(&config);
            (config, embed, output_norm, output, layers, rope)
        };
        Ok(Self { storage, config, embed, output_norm, output, layers, rope })
    }

    /// The model description from the file's metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
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
            plan::FfnPlan::Dense(_) => None,
        }
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().enumerate().filter(|(_, l)| matches!(l.ffn, plan::FfnPlan::Moe(_))).map(|(i, _)| i)
    }

    /// A new session (KV cache and scratch) over this model.
    ///
    /// # Errors
    /// The thread pool could not be started.
    pub fn session(&self, opts: SessionOptions) -> Result<Session<'_>, SessionError> {
        Session::new(self, opts)
    }
}

/// Only the default RoPE is implemented; a file that asks for another is refused at open.
fn check_rope_type(file: &MeoFile<'_>) -> Result<(), ModelError> {
    match file.metadata.get("model.rope_type") {
        None => Ok(()),
        Some(MetaValue::Str(s)) if *s == "default" => Ok(()),
        Some(MetaValue::Str(other)) => {
            Err(ModelError::Unsupported(alloc::format!("RoPE type {other:?} (only \"default\" is implemented)")))
        }
        Some(v) => {
            Err(ConfigError::WrongType { key: "model.rope_type", expected: "string", found: v.type_name() }.into())
        }
    }
}

#[cfg(test)]
mod tests;
