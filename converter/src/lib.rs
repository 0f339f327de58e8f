//! meo-converter: Hugging Face MoE checkpoints → `.meo` files, and the `meo` command line.
//!
//! - [`hf`]: checkpoint directories (family tables, `config.json`, safetensors).
//! - [`canonical`]: the tensors a `.meo` file holds for a model config.
//! - [`convert`]: the streaming conversion.
//! - [`align`]: expert alignment (unit permutations) before merging.
//! - [`merges`]: precomputed task merges from calibration text.
//! - [`writer`]: the `.meo` writer.
//! - [`cmd`]: one module per `meo` subcommand.
pub mod align;
pub mod canonical;
pub mod cmd;
pub mod convert;
pub mod hf;
pub mod merges;
pub mod writer;
