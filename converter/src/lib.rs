//! meo-converter: Hugging Face MoE checkpoints → `.meo` files, and the `meo` command line.
//!
//! - [`hf`]: checkpoint directories (family tables, `config.json`, safetensors).
//! - [`canonical`]: the tensors a `.meo` file holds for a model config.
//! - [`convert`]: the streaming conversion.
//! - [`writer`]: the `.meo` writer.
//! - [`cmd`]: one module per `meo` subcommand.
pub mod canonical;
pub mod cmd;
pub mod convert;
pub mod hf;
pub mod writer;
