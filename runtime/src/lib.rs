//! meo: run Mixture-of-Experts models from one lazily memory-mapped `.meo` file.
//!
//! The core (format reader, quantization, routing, model graphs) is `no_std` + `alloc`;
//! the `std` feature (default) adds memory-mapped files, threads and residency queries.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod align;
#[cfg(feature = "chat")]
pub mod chat;
pub mod config;
pub mod format;
pub mod kernels;
pub mod merge;
pub mod model;
pub mod names;
pub mod quant;
pub mod route;
pub mod sample;
pub mod target;

#[cfg(feature = "tokenizer")]
pub mod eval;
#[cfg(feature = "std")]
pub mod file;
#[cfg(feature = "tokenizer")]
pub mod generate;
#[cfg(all(feature = "std", unix))]
pub mod guard;
#[cfg(all(feature = "std", unix))]
pub mod platform;
#[cfg(feature = "std")]
pub mod residency;
#[cfg(feature = "tokenizer")]
pub mod tokenizer;

pub use config::{
    Activation, ConfigError, DeltaNet, FfnKind, Mamba2, Mixer, ModelConfig, NormKind, Positions, QkNorm, Recipe,
    RouterSpec, Scoring,
};
pub use format::{DType, FormatError, MeoFile, MetaValue, Metadata, Slab, TensorInfo};
pub use model::{
    DEFAULT_MAX_CONTEXT, ExecPlan, Execution, ForwardError, Granularity, KvDtype, KvOptions, KvParseError, LayerExec,
    LayerSelect, Logits, MISS_TASK, MergeOptions, MergedUse, MlaCache, Mode, ModeError, Model, ModelError, NoTrace,
    OnMiss, PromptPool, STATE_MAGIC, STATE_VERSION, Session, SessionError, SessionOptions, StateError, Trace,
};
pub use route::Choice;
pub use target::{Target, TargetError};
