//! The `meo` command: parses arguments and dispatches to `meo_converter::cmd::*`.

use clap::{Parser, Subcommand};
use meo_converter::cmd;
use std::process::ExitCode;

/// meo: Mixture-of-Experts models in one lazily mapped, int8, page-aligned file.
#[derive(Parser, Debug)]
#[command(name = "meo", version)]
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
    Bench(cmd::bench::Args),
    Eval(cmd::eval::Args),
    /// List the devices models can run on (`--target`, `--adapter`).
    Devices(cmd::gpu::DevicesArgs),
    #[cfg(feature = "onnx")]
    ExportOnnx(cmd::export_onnx::Args),
}

fn main() -> ExitCode {
    // A model file truncated while mapped: an error naming it, not death by SIGBUS.
    #[cfg(unix)]
    let _ = meo::guard::install();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Convert(a) => cmd::convert::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Devices(a) => cmd::gpu::devices(a),
        #[cfg(feature = "onnx")]
        Command::ExportOnnx(a) => cmd::export_onnx::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
