//! `examples/c/main.c` compiled with gcc against the static library and run on a fixture:
//! its ids equal `meo run --tokens` (the Rust CLI) on the same file, which equal the
//! reference greedy continuation.

use meo::DType;
use meo_cli::cmd::run::{Args, run_to};
use meo_tests::conformance::{convert_fixture, reference};
mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn c_example_matches_the_rust_cli() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("meo-c");
    common::build_c(&root.join("examples/c/main.c"), &exe);

    let r = reference("mixtral");
    let model = convert_fixture("mixtral", DType::F32, DType::F32, dir.path());
    let prompt = r.input_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let n = "16";

    let args = Args::parse_from([model.to_str().unwrap(), "--tokens", &prompt, "--max-new-tokens", n]).unwrap();
    let (mut cli, mut cli_err) = (Vec::new(), Vec::new());
    run_to(&args, &mut cli, &mut cli_err).unwrap();
    let cli = String::from_utf8(cli).unwrap();

    let c = Command::new(&exe).arg(&model).arg(n).arg(&prompt).output().unwrap();
    let stderr = String::from_utf8_lossy(&c.stderr);
    assert!(c.status.success(), "the C example failed:\n{stderr}");
    let c_out = String::from_utf8(c.stdout).unwrap();
    assert_eq!(c_out, cli, "C example vs `meo run --tokens` (C stderr:\n{stderr})");
    let ids: Vec<u32> = c_out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let k = ids.len().min(r.greedy.len());
    assert!(k > 0 && ids[..k] == r.greedy[..k], "C example {ids:?} vs reference greedy {:?}", r.greedy);
    assert!(stderr.contains("trim released"), "{stderr}");
}
