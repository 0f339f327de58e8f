//! The committed header `include/meo.h` is what cbindgen generates from the sources (drift
//! check), and the Kotlin and Swift wrappers declare only functions the header has.
//! `MEO_BLESS=1 cargo test -p meo-ffi --test header` rewrites the header.

use std::path::Path;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let config = cbindgen::Config::from_file(crate_dir().join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir())
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn committed_header_matches_the_sources() {
    let path = crate_dir().join("include/meo.h");
    let fresh = generate();
    if std::env::var_os("MEO_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let first = committed.lines().zip(fresh.lines()).position(|(a, b)| a != b);
        panic!(
            "runtime/ffi/include/meo.h is out of date with runtime/ffi/src/lib.rs (first difference at line {}). \
             Regenerate it with `MEO_BLESS=1 cargo test -p meo-ffi --test header` and commit it.",
            first.map_or_else(|| "end".to_string(), |l| (l + 1).to_string())
        );
    }
}

/// Function names `meo_…(` declared in the header (outside comments).
fn header_functions() -> std::collections::BTreeSet<String> {
    let path = crate_dir().join("include/meo.h");
    names_in(&path).into_iter().map(|(n, _)| n).collect()
}

/// Every `meo_…` name a wrapper file calls or declares, with the line it is on.
fn names_in(path: &Path) -> Vec<(String, usize)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with('*') || t.starts_with("/*") || t.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("meo_") {
            let boundary = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            if boundary && rest.trim_start().starts_with('(') {
                out.push((name, n + 1));
            }
        }
    }
    out
}

#[test]
fn wrappers_call_only_functions_the_header_declares() {
    let root = crate_dir().join("../..");
    let header = header_functions();
    assert!(header.contains("meo_session_generate") && header.contains("meo_session_trim"), "{header:?}");
    let files =
        ["examples/android/meo/src/main/cpp/meo_jni.c", "examples/ios/Sources/Meo/Meo.swift", "examples/c/main.c"];
    let mut checked = 0;
    for f in files {
        let path = root.join(f);
        let names = names_in(&path);
        assert!(!names.is_empty(), "{f} calls no meo_ function");
        for (name, line) in names {
            // JNI glue defines its own `Java_…` functions; C API calls must exist in the header.
            assert!(header.contains(&name), "{f}:{line}: {name} is not declared in runtime/ffi/include/meo.h");
            checked += 1;
        }
    }
    // The Kotlin `external fun` declarations match the JNI glue's exported functions.
    let kt = std::fs::read_to_string(root.join("examples/android/meo/src/main/kotlin/dev/meo/Meo.kt")).unwrap();
    let jni = std::fs::read_to_string(root.join("examples/android/meo/src/main/cpp/meo_jni.c")).unwrap();
    let mut externs = 0;
    for line in kt.lines() {
        let Some((_, rest)) = line.split_once("external fun ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        let symbol = format!("Java_dev_meo_Meo_{name}(");
        assert!(jni.contains(&symbol), "Meo.kt declares external fun {name}, meo_jni.c has no {symbol}");
        externs += 1;
    }
    assert!(externs > 0 && checked > 0);
}
