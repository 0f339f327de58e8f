//! Issue 19, items 6 and 14: a model file truncated under a live mapping gives a typed error
//! (C API and `meo run`), not a SIGBUS; checksums of the dense tensors at open; what a
//! context costs; `meo_model_info` does not parse the tokenizer.
//!
//! The truncation tests run in a child process (this test binary again, with
//! `MEO_LIMITS_CHILD` set): without the guard the child dies by SIGBUS, and the parent
//! reports that as a failure instead of dying with it.

use meo::DType;
use meo_ffi::*;
use meo_tests::MeoBytes;
use meo_tests::conformance::convert_fixture;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(meo_last_error()) }.to_string_lossy().into_owned()
}

fn c(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// Runs test `name` in a child process; asserts it exited 0, not by a signal.
fn run_in_child(name: &str, dir: &Path) {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("MEO_LIMITS_CHILD", dir)
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.signal(), None, "the child died by signal\n{out}\n{err}");
    assert!(o.status.success(), "{}\n{out}\n{err}", o.status);
    assert!(out.contains("1 passed"), "the child ran no test:\n{out}");
}

/// In the child: the directory the parent made. In the parent: `None`.
fn child_dir() -> Option<PathBuf> {
    std::env::var_os("MEO_LIMITS_CHILD").map(PathBuf::from)
}

fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(len).unwrap();
}

#[test]
fn truncated_model_file_is_an_io_error_in_the_c_api() {
    let Some(dir) = child_dir() else {
        let tmp = tempfile::tempdir().unwrap();
        return run_in_child("truncated_model_file_is_an_io_error_in_the_c_api", tmp.path());
    };
    let path = convert_fixture("mixtral", DType::F32, DType::F32, &dir);
    unsafe {
        assert_eq!(meo_file_guard_install(), MeoStatus::Ok);
        let mut m: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open(c(&path).as_ptr(), &mut m), MeoStatus::Ok, "{}", last_error());
        let mut s: *mut MeoSession = null_mut();
        assert_eq!(meo_session_new(m, null(), &mut s), MeoStatus::Ok);
        assert_eq!(meo_session_feed(s, [1u32, 2, 3].as_ptr(), 3), MeoStatus::Ok, "{}", last_error());
        // The app (wrongly) truncates the file while the model is open.
        truncate(&path, 4096);
        assert_eq!(meo_session_feed(s, [4u32].as_ptr(), 1), MeoStatus::Io);
        assert!(last_error().contains("changed on disk"), "{}", last_error());
        // And it stays refused: the bytes are gone.
        assert_eq!(meo_session_feed(s, [4u32].as_ptr(), 1), MeoStatus::Io);
        assert_eq!(meo_session_free(s), MeoStatus::Ok);
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
    }
}

/// Truncates the model file on the first write (`meo run --stats` writes its first stderr
/// line after opening the model and before running the prompt).
struct TruncateOnWrite(PathBuf, bool, Vec<u8>);

impl Write for TruncateOnWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.1 {
            truncate(&self.0, 4096);
            self.1 = true;
        }
        self.2.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `meo run`'s code path, in process, with the guard `meo`'s `main` installs: the file
/// truncated mid-run ends in an error naming the problem, not in SIGBUS.
#[test]
fn meo_run_reports_a_truncated_file_instead_of_dying() {
    let Some(dir) = child_dir() else {
        let tmp = tempfile::tempdir().unwrap();
        return run_in_child("meo_run_reports_a_truncated_file_instead_of_dying", tmp.path());
    };
    use meo_cli::cmd::run::{Args, run_to};
    let path = convert_fixture("mixtral", DType::F32, DType::F32, &dir);
    meo::guard::install().unwrap();
    let a = Args::parse_from([path.to_str().unwrap(), "--tokens", "1,2,3", "--stats", "--memory-budget", "1"]).unwrap();
    let mut err = TruncateOnWrite(path.clone(), false, Vec::new());
    let e = run_to(&a, &mut Vec::new(), &mut err).unwrap_err();
    assert!(err.1, "meo run wrote nothing to stderr before failing: {e:#}");
    assert!(format!("{e:#}").contains("changed on disk"), "{e:#}");
}

#[test]
fn dense_checksums_are_verified_at_open_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let path = convert_fixture("mixtral", DType::F32, DType::F32, tmp.path());
    let mut b = MeoBytes(std::fs::read(&path).unwrap());
    // Flip a byte of a dense tensor (the final norm) and, apart, one of an expert slab.
    let norm = b.tensor_start(b.index_of("output_norm.weight"));
    b.0[norm] ^= 0x40;
    let bad_dense = tmp.path().join("bad-dense.meo");
    std::fs::write(&bad_dense, &b.0).unwrap();
    let mut b = MeoBytes(std::fs::read(&path).unwrap());
    let expert = b.tensor_start(b.index_of("layers.0.experts.0.up"));
    b.0[expert] ^= 0x40;
    let bad_expert = tmp.path().join("bad-expert.meo");
    std::fs::write(&bad_expert, &b.0).unwrap();
    unsafe {
        let verify = MeoOpenOptions { verify_dense: 1 };
        let mut m: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open_with(c(&path).as_ptr(), &verify, &mut m), MeoStatus::Ok, "{}", last_error());
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
        m = null_mut();
        assert_eq!(meo_model_open_with(c(&bad_dense).as_ptr(), &verify, &mut m), MeoStatus::InvalidModel);
        assert!(last_error().contains("output_norm.weight"), "{}", last_error());
        assert!(m.is_null());
        // Off by default; expert slabs are never read at open.
        assert_eq!(meo_model_open_with(c(&bad_dense).as_ptr(), null(), &mut m), MeoStatus::Ok);
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
        assert_eq!(meo_model_open_with(c(&bad_expert).as_ptr(), &verify, &mut m), MeoStatus::Ok);
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
    }
}

#[test]
fn context_bytes_match_the_kv_cache_and_sessions_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["mixtral", "deepseek_v2", "qwen3_moe", "gpt_oss"] {
        let path = convert_fixture(name, DType::F32, DType::F32, tmp.path());
        let model = meo::Model::open(&path).unwrap();
        let cfg = model.config();
        let mut s = model.session(meo::SessionOptions::default()).unwrap();
        let max = cfg.max_position_embeddings;
        assert_eq!(s.max_context(), meo::DEFAULT_MAX_CONTEXT.min(max), "{name}");
        let n = 5.min(s.max_context());
        s.forward(&(1..=n as u32).collect::<Vec<_>>()).unwrap();
        assert_eq!(s.kv_cache_bytes(), cfg.kv_cache_bytes(n, s.kv_options()), "{name}: KV bytes after {n} positions");
        assert!(s.kv_cache_bytes() > 0, "{name}");
        unsafe {
            let mut m: *mut MeoModel = null_mut();
            assert_eq!(meo_model_open(c(&path).as_ptr(), &mut m), MeoStatus::Ok);
            let mut bytes = 0u64;
            assert_eq!(meo_model_context_bytes(m, 4096, &mut bytes), MeoStatus::Ok);
            assert_eq!(bytes, cfg.kv_cache_bytes(4096, meo::KvOptions::default()), "{name}");
            assert_eq!(meo_model_context_bytes(m, 1, null_mut()), MeoStatus::NullPointer);
            assert_eq!(meo_model_free(m), MeoStatus::Ok);
        }
    }
}

#[test]
fn model_info_does_not_parse_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let path = convert_fixture("mixtral", DType::F32, DType::F32, tmp.path());
    let mut b = MeoBytes(std::fs::read(&path).unwrap());
    // Break the embedded tokenizer's JSON (same length): only parsing it can notice.
    let at = b.find(b"\"added_tokens\"");
    b.0[at] = b'#';
    b.fix_structure_crc();
    let broken = tmp.path().join("broken-tokenizer.meo");
    std::fs::write(&broken, &b.0).unwrap();
    unsafe {
        let mut m: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open(c(&broken).as_ptr(), &mut m), MeoStatus::Ok, "{}", last_error());
        let mut info = MeoModelInfo::default();
        assert_eq!(meo_model_info(m, &mut info), MeoStatus::Ok);
        // Present: reported without loading it (before, info parsed it and said 0).
        assert_eq!(info.has_tokenizer, 1);
        let mut n = 0usize;
        assert_eq!(meo_tokenize(m, c"hello".as_ptr(), null_mut(), 0, &mut n), MeoStatus::InvalidModel);
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
    }
}

/// The cost of `verify_dense` at open, on the bundled trained model (int8 experts, f32 dense)
/// and the largest synthetic fixture: `cargo test --release -p meo-ffi --test limits --
/// --ignored --nocapture verify_dense_cost`.
#[test]
#[ignore = "a measurement, not a check"]
fn verify_dense_cost() {
    use meo::residency::drop_page_cache;
    use std::time::Instant;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("trained")).unwrap();
    for (name, experts) in [("trained/mixtral-upcycled", DType::Q8_0), ("qwen2_moe", DType::F32)] {
        let path = convert_fixture(name, experts, DType::F32, tmp.path());
        let file_len = std::fs::metadata(&path).unwrap().len();
        let model = meo::Model::open(&path).unwrap();
        let f = model.file().unwrap();
        let dense: u64 = f.tensors().iter().filter(|t| meo::format::slab_key(t.name).is_none()).map(|t| t.len).sum();
        drop(f);
        drop(model);
        let reps = 50;
        let time = |verify: bool, cold: bool| {
            let mut total = 0.0;
            for _ in 0..reps {
                if cold {
                    drop_page_cache(&path).unwrap();
                }
                let t = Instant::now();
                let m = meo::Model::from_mapped(meo::residency::map_lazy(&path).unwrap()).unwrap();
                if verify {
                    m.verify_dense().unwrap();
                }
                total += t.elapsed().as_secs_f64();
            }
            total / f64::from(reps) * 1e3
        };
        let (open_warm, verify_warm) = (time(false, false), time(true, false));
        let (open_cold, verify_cold) = (time(false, true), time(true, true));
        println!(
            "{name}: file {file_len} B, dense tensors {dense} B; open {open_warm:.3} ms, open + verify_dense \
             {verify_warm:.3} ms (page cache warm); cold: {open_cold:.3} ms, {verify_cold:.3} ms (mean of {reps})"
        );
    }
}
