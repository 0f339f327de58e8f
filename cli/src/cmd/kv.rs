//! `--kv` and `--mla-cache`: how the CPU target stores a session's KV cache (`meo run`,
//! `chat`, `bench`, `serve`, `eval`).

use meo::{KvDtype, KvOptions, MlaCache};

/// KV cache flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KvArgs {
    /// KV cache element type: `f32` (exact, the default), `f16`, or `int8` (one scale per
    /// position and kv head). CPU target only.
    #[arg(long = "kv", value_name = "f32|f16|int8", default_value = "f32")]
    pub kv: KvDtype,
    /// What MLA (DeepSeek) layers cache: `latent` (the compressed latent, the default) or
    /// `decompressed` (every head's keys and values). CPU target only.
    #[arg(long = "mla-cache", value_name = "latent|decompressed", default_value = "latent")]
    pub mla_cache: MlaCache,
}

impl KvArgs {
    /// The session option these flags select.
    pub fn options(&self) -> KvOptions {
        KvOptions { dtype: self.kv, mla: self.mla_cache }
    }
}
