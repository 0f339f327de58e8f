//! The `meo` command: parses arguments and dispatches to `meo_cli::cmd::*`.

use clap::{Parser, Subcommand};
use meo_cli::cmd;
use std::process::ExitCode;

/// meo: Mixture-of-Experts models in one lazily mapped, int8, page-aligned file.
#[derive(Parser, Debug)]
#[command(name = "meo", version, long_version = cmd::long_version())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Convert(cmd::convert::Args),
    Inspect(cmd::inspect::Args),
    Verify(cmd::verify::Args),
    Run(cmd::run::Args),
    /// Chat with a model in the terminal (its chat template, multi-turn, streamed).
    Chat(cmd::chat::Args),
    /// Serve a model over an OpenAI-compatible HTTP API.
    #[cfg(feature = "serve")]
    Serve(cmd::serve::Args),
    Bench(cmd::bench::Args),
    Eval(cmd::eval::Args),
    /// List the devices models can run on (`--target`, `--adapter`).
    Devices(cmd::devices::Args),
    #[cfg(feature = "onnx")]
    ExportOnnx(cmd::export_onnx::Args),
}

fn main() -> ExitCode {
    // Before anything else, while this is the only thread (it sets an environment variable);
    // the guard removes the directory at the end of main.
    #[cfg(feature = "wgpu")]
    // SAFETY: no other thread exists yet.
    let _runtime_dir = unsafe { meo_cli::xdg::ensure_runtime_dir() };
    // A model file truncated under a running command is reported ("changed on disk"), not a
    // death by SIGBUS.
    #[cfg(unix)]
    let _ = meo::guard::install();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Convert(a) => cmd::convert::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        #[cfg(feature = "serve")]
        Command::Serve(a) => cmd::serve::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Devices(a) => cmd::devices::run(a),
        #[cfg(feature = "onnx")]
        Command::ExportOnnx(a) => cmd::export_onnx::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`meo run … | head`): stop quietly with success, as
        // Unix tools do. Rust ignores SIGPIPE, so a write to the closed pipe returns EPIPE.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` was caused by writing to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// `e` and its causes on one line, outermost first, as anyhow's `{:#}` prints them, except
/// that a cause whose message already ends the line is not repeated: library errors put
/// their cause in their own message (C API users see only that), and where one also reports
/// it as its `source`, `{:#}` would print it twice.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for c in e.chain() {
        let m = c.to_string();
        if line.is_empty() {
            line = m;
        } else if !line.ends_with(&m) {
            line.push_str(": ");
            line.push_str(&m);
        }
    }
    line
}
