//! `tests/c/misuse.c` compiled with gcc against the static library and run twice, plainly and
//! under valgrind (memcheck): re-entrant and concurrent calls on a session are refused with
//! `MEO_STATUS_BUSY`, freed handles stay invalid, `meo_status_string` takes any int, and
//! several threads running sessions over one model get the single-thread tokens, which are
//! the reference greedy continuation. Any memory error fails the test, and so does a missing
//! gcc or valgrind: nothing is skipped.

use meo::DType;
use meo_tests::conformance::{convert_fixture, reference};
mod common;

use std::path::Path;
use std::process::Command;

/// Exit status valgrind gives when it saw a memory error (the program's own is 0 or 1).
const VALGRIND_ERROR: i32 = 97;

#[test]
fn c_misuse_is_refused_under_valgrind() {
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()),
        "valgrind is not installed: the C API misuse test cannot run (install valgrind; ci/setup does)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("misuse");
    common::build_c(&root.join("tests/c/misuse.c"), &exe);

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
