//! meo-converter: Hugging Face MoE checkpoints → `.meo` files.
pub mod writer;
