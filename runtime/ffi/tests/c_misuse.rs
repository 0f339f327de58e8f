//! `tests/c/misuse.c` compiled with gcc against the static library and run twice, plainly and
//! under valgrind (memcheck): re-entrant and concurrent calls on a session are refused with
//! `MEO_STATUS_BUSY`, freed handles stay invalid, `meo_status_string` takes any int, and
//! several threads running sessions over one model get the single-thread tokens, which are
//! the reference greedy continuation. Any memory error fails the test, and so does a missing
//! gcc or valgrind: nothing is skipped.

use meo::DType;
use meo_tests::conformance::{convert_fixture, reference};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target directory's profile folder (`target/release`), where cargo put `libmeo_ffi.a`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap(); // target/release/deps/c_misuse-…
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Exit status valgrind gives when it saw a memory error (the program's own is 0 or 1).
const VALGRIND_ERROR: i32 = 97;

#[test]
fn c_misuse_is_refused_under_valgrind() {
    assert!(
        Command::new("gcc").arg("--version").output().is_ok(),
        "gcc is not installed: the C API misuse test cannot run (install gcc; ci/setup does)"
    );
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()),
        "valgrind is not installed: the C API misuse test cannot run (install valgrind; ci/setup does)"
    );
    let lib = profile_dir().join("libmeo_ffi.a");
    assert!(lib.exists(), "{} is missing (`cargo build -p meo-ffi --lib` builds it)", lib.display());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `cargo test` does not rebuild the static library: an old one would test old code.
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).unwrap();
    assert!(
        modified(&lib) >= modified(&root.join("src/lib.rs")),
        "{} is older than src/lib.rs: run `cargo build --release -p meo-ffi --lib` first",
        lib.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("misuse");
    let gcc = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g", "-pthread", "-I"])
        .arg(root.join("include"))
        .arg(root.join("tests/c/misuse.c"))
        .arg(&lib)
        .args(["-lpthread", "-lm", "-ldl", "-o"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(gcc.status.success(), "gcc failed:\n{}", String::from_utf8_lossy(&gcc.stderr));

    let r = reference("mixtral");
    let model = convert_fixture("mixtral", DType::F32, DType::F32, dir.path());
    let prompt = r.input_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let args = [model.as_os_str(), "8".as_ref(), prompt.as_ref()];
    // Plainly first: the system allocator hands a freed block's address to the next object at
    // once, which is what made freed handles live again (valgrind's holds freed blocks back).
    check_run(&exe.display().to_string(), Command::new(&exe).args(args), &r.greedy);
    let mut valgrind = Command::new("valgrind");
    valgrind
        .arg("--tool=memcheck")
        .arg(format!("--error-exitcode={VALGRIND_ERROR}"))
        .args(["--leak-check=full", "--errors-for-leak-kinds=definite", "--fair-sched=yes", "-q"])
        .arg(&exe)
        .args(args);
    check_run("valgrind", &mut valgrind, &r.greedy);
}

/// Runs the misuse program: every check passes, and its single-thread tokens are the
/// reference greedy continuation.
fn check_run(what: &str, cmd: &mut Command, greedy: &[u32]) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(VALGRIND_ERROR), "valgrind found memory errors:\n{stderr}");
    assert!(out.status.success(), "the C misuse test failed under {what} ({}):\n{stdout}\n{stderr}", out.status);
    let mut lines = stdout.lines();
    let ids: Vec<u32> = lines.next().unwrap_or("").split_whitespace().map(|s| s.parse().unwrap()).collect();
    let k = ids.len().min(greedy.len());
    assert!(k > 0 && ids[..k] == greedy[..k], "C single-thread {ids:?} vs reference greedy {greedy:?}");
    let passed: Vec<&str> = lines.filter_map(|l| l.strip_prefix("ok ")).collect();
    assert_eq!(
        passed,
        ["status_string", "stale_handles", "reentrancy", "concurrent", "threads"],
        "checks that passed under {what}:\n{stdout}\n{stderr}"
    );
}
