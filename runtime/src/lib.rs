//! meo: run Mixture-of-Experts models from one lazily memory-mapped `.meo` file.
//!
//! The core (format reader, quantization, routing, model graphs) is `no_std` + `alloc`;
//! the `std` feature (default) adds memory-mapped files, threads and residency queries.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod config;
pub mod format;
pub mod names;
pub mod quant;
pub mod route;

#[cfg(feature = "std")]
pub mod file;

pub use config::{ConfigError, FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};
pub use format::{DType, FormatError, MeoFile, MetaValue, Metadata, Slab, TensorInfo};
