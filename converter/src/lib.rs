//! meo-converter: Hugging Face MoE checkpoints → `.meo` files (the `meo` command line is the
//! `meo-cli` crate).
//!
//! - [`hf`]: checkpoint directories (family tables, `config.json`, safetensors).
//! - [`canonical`]: the tensors a `.meo` file holds for a model config.
//! - [`convert`]: the streaming conversion.
//! - [`align`]: expert alignment (unit permutations) before merging.
//! - [`merges`]: precomputed task merges from calibration text.
//! - [`calib`]: calibration statistics for quantizing experts (`--calib`, `--hot-experts`).
//! - [`writer`]: the `.meo` writer.
pub mod align;
pub mod calib;
pub mod canonical;
pub mod compress;
pub mod convert;
pub mod hf;
pub mod merges;
pub mod writer;
