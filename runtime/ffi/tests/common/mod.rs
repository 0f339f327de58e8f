//! Building a C program against the static library, for the tests that run C (`c_example`,
//! `c_misuse`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `libmeo_ffi.a` in the target directory's profile folder, checked to exist and to be newer
/// than `src/lib.rs` (`cargo test` does not rebuild the static library: an old one would test
/// old code).
///
/// # Panics
/// gcc is missing, or the library is missing or stale (the message says what to run).
pub fn static_lib() -> PathBuf {
    assert!(
        Command::new("gcc").arg("--version").output().is_ok(),
        "gcc is not installed: the C programs cannot be built (install gcc; ci/setup does)"
    );
    let exe = std::env::current_exe().unwrap(); // target/<profile>/deps/<test>-…
    let lib = exe.parent().and_then(Path::parent).unwrap().join("libmeo_ffi.a");
    assert!(lib.exists(), "{} is missing (`cargo build --release -p meo-ffi --lib` builds it)", lib.display());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).unwrap();
    assert!(
        modified(&lib) >= modified(&src),
        "{} is older than src/lib.rs: run `cargo build --release -p meo-ffi --lib` first",
        lib.display()
    );
    lib
}

/// Compiles `source` (C11, warnings are errors, with debug info and pthreads) against the
/// static library into `exe`.
///
/// # Panics
/// As [`static_lib`], or gcc fails (its messages are shown).
pub fn build_c(source: &Path, exe: &Path) {
    let lib = static_lib();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let gcc = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g", "-pthread", "-I"])
        .arg(include)
        .arg(source)
        .arg(&lib)
        .args(["-lpthread", "-lm", "-ldl", "-o"])
        .arg(exe)
        .output()
        .unwrap();
    assert!(gcc.status.success(), "gcc failed on {}:\n{}", source.display(), String::from_utf8_lossy(&gcc.stderr));
}
