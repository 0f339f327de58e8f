//! The `meo` command line over three libraries: `meo_converter` (conversion), `meo` (the
//! runtime) and the targets (`meo_wgpu`, `meo_ort`, behind the cargo features `wgpu`, `onnx`
//! and `ort`).
//!
//! - [`cmd`]: one module per `meo` subcommand; `main.rs` only parses and dispatches.
//! - [`xdg`]: a private `XDG_RUNTIME_DIR` so GPU drivers do not complain (feature `wgpu`).
pub mod cmd;
pub mod xdg;
