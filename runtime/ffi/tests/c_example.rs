//! `examples/c/main.c` compiled with gcc against the static library and run on a fixture:
//! its ids equal `meo run --tokens` (the Rust CLI) on the same file, which equal the
//! reference greedy continuation.

use meo::DType;
use meo_cli::cmd::run::{Args, run_to};
use meo_tests::conformance::{convert_fixture, reference};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target directory's profile folder (`target/debug`), where cargo put `libmeo_ffi.a`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap(); // target/debug/deps/c_example-…
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

#[test]
fn c_example_matches_the_rust_cli() {
    if Command::new("gcc").arg("--version").output().is_err() {
        panic!("gcc is not installed: the C example cannot be checked (install gcc)");
    }
    let lib = profile_dir().join("libmeo_ffi.a");
    assert!(lib.exists(), "{} is missing (cargo builds it with the meo-ffi test)", lib.display());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("meo-c");
    let gcc = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root.join("runtime/ffi/include"))
        .arg(root.join("examples/c/main.c"))
        .arg(&lib)
        .args(["-lpthread", "-lm", "-ldl", "-o"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(gcc.status.success(), "gcc failed:\n{}", String::from_utf8_lossy(&gcc.stderr));

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
