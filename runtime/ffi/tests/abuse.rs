//! The C API given NULL pointers, invalid handles, invalid UTF-8 and out-of-range token ids
//! returns error codes with a message, and never crashes. Also: trim, fd opening, threads.

use meo::DType;
use meo_ffi::*;
use meo_tests::conformance::{convert_fixture, reference};
use std::ffi::{CStr, CString, c_char};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(meo_last_error()) }.to_string_lossy().into_owned()
}

fn fixture(dir: &std::path::Path) -> (CString, std::path::PathBuf) {
    let p = convert_fixture("mixtral", DType::F32, DType::F32, dir);
    (CString::new(p.to_str().unwrap()).unwrap(), p)
}

#[test]
fn bad_arguments_give_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = fixture(dir.path());
    unsafe {
        let mut m: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open(null(), &mut m), MeoStatus::NullPointer);
        assert!(last_error().contains("path"), "{}", last_error());
        assert_eq!(meo_model_open(path.as_ptr(), null_mut()), MeoStatus::NullPointer);
        let bad_utf8 = b"\xff\xfe.meo\0";
        assert_eq!(meo_model_open(bad_utf8.as_ptr().cast(), &mut m), MeoStatus::InvalidUtf8);
        assert_eq!(meo_model_open(c"/nonexistent/x.meo".as_ptr(), &mut m), MeoStatus::Io);
        assert!(last_error().contains("/nonexistent/x.meo"), "{}", last_error());
        assert_eq!(meo_model_open_bytes(b"not a model".as_ptr(), 11, &mut m), MeoStatus::InvalidModel);
        assert_eq!(meo_model_open_fd(-1, 0, 0, &mut m), MeoStatus::Io);
        assert!(m.is_null());

        // Made-up and freed handles are refused without being read.
        let fake = 0x1000 as *mut MeoModel;
        let mut info = MeoModelInfo::default();
        assert_eq!(meo_model_info(fake, &mut info), MeoStatus::InvalidHandle);
        let mut s: *mut MeoSession = null_mut();
        assert_eq!(meo_session_new(fake, null(), &mut s), MeoStatus::InvalidHandle);
        assert_eq!(meo_session_feed(0x2000 as *mut MeoSession, [1u32].as_ptr(), 1), MeoStatus::InvalidHandle);
        assert_eq!(meo_model_free(fake), MeoStatus::InvalidHandle);

        assert_eq!(meo_model_open(path.as_ptr(), &mut m), MeoStatus::Ok, "{}", last_error());
        assert_eq!(meo_model_info(m, null_mut()), MeoStatus::NullPointer);
        assert_eq!(meo_model_info(m, &mut info), MeoStatus::Ok);
        assert_eq!(info.file_backed, 1);
        assert_eq!(meo_session_new(m, null(), null_mut()), MeoStatus::NullPointer);
        assert_eq!(meo_session_new(m, null(), &mut s), MeoStatus::Ok);

        // Tokenizer: invalid UTF-8, small buffers, unknown ids.
        let mut n = 0usize;
        assert_eq!(meo_tokenize(m, bad_utf8.as_ptr().cast(), null_mut(), 0, &mut n), MeoStatus::InvalidUtf8);
        assert_eq!(meo_tokenize(m, null(), null_mut(), 0, &mut n), MeoStatus::NullPointer);
        assert_eq!(meo_tokenize(m, c"hello world".as_ptr(), null_mut(), 0, &mut n), MeoStatus::BufferTooSmall);
        assert!(n > 0);
        let mut ids = vec![0u32; n];
        assert_eq!(meo_tokenize(m, c"hello world".as_ptr(), ids.as_mut_ptr(), n, &mut n), MeoStatus::Ok);
        let mut text = [0 as c_char; 64];
        let mut len = 0usize;
        assert_eq!(meo_detokenize(m, ids.as_ptr(), n, text.as_mut_ptr(), 64, &mut len), MeoStatus::Ok);
        assert_eq!(CStr::from_ptr(text.as_ptr()).to_str().unwrap(), "hello world");
        assert_eq!(meo_detokenize(m, ids.as_ptr(), n, text.as_mut_ptr(), 3, &mut len), MeoStatus::BufferTooSmall);
        assert_eq!(len, 11);
        let bad = [u32::MAX];
        assert_eq!(meo_detokenize(m, bad.as_ptr(), 1, text.as_mut_ptr(), 64, &mut len), MeoStatus::TokenOutOfRange);

        // Feeding and sampling.
        let mut tok = 0u32;
        assert_eq!(meo_session_sample(s, &mut tok), MeoStatus::BadState);
        assert_eq!(meo_session_feed(s, null(), 1), MeoStatus::NullPointer);
        assert_eq!(meo_session_feed(s, [info.vocab_size].as_ptr(), 1), MeoStatus::TokenOutOfRange);
        assert!(last_error().contains("out of range"), "{}", last_error());
        assert_eq!(meo_session_set_mode(s, c"turbo".as_ptr(), null(), 0.25), MeoStatus::InvalidArgument);
        assert_eq!(meo_session_set_mode(s, c"vanilla".as_ptr(), null(), f64::NAN), MeoStatus::InvalidArgument);
        assert_eq!(meo_session_set_mode(s, c"vanilla".as_ptr(), null(), 0.25), MeoStatus::Ok);
        assert_eq!(meo_session_set_target(s, c"cpu".as_ptr()), MeoStatus::Ok);
        assert_eq!(meo_session_set_target(s, c"wgpu".as_ptr()), MeoStatus::Unsupported);
        let bad_sampler = MeoSamplerOptions { temperature: -1.0, ..MeoSamplerOptions::default() };
        assert_eq!(meo_session_set_sampler(s, &bad_sampler), MeoStatus::InvalidArgument);
        assert_eq!(meo_session_feed(s, [1u32, 2, 3].as_ptr(), 3), MeoStatus::Ok);
        assert_eq!(meo_session_set_threads(s, 1), MeoStatus::BadState);
        assert_eq!(meo_session_sample(s, &mut tok), MeoStatus::Ok);
        assert!(tok < info.vocab_size);
        let (mut lp, mut ln) = (null::<f32>(), 0usize);
        assert_eq!(meo_session_logits(s, &mut lp, &mut ln), MeoStatus::Ok);
        assert_eq!(ln, info.vocab_size as usize);

        // Cancel flag set before the call: nothing generated.
        let cancel = 1i32;
        let mut out = [0u32; 4];
        let mut got = 7usize;
        let st =
            meo_session_generate(s, [1u32].as_ptr(), 1, 4, None, null_mut(), &cancel, out.as_mut_ptr(), 4, &mut got);
        assert_eq!((st, got), (MeoStatus::Cancelled, 0));
        assert_eq!(
            meo_session_generate(s, null(), 0, 4, None, null_mut(), null(), null_mut(), 4, null_mut()),
            MeoStatus::NullPointer
        );

        // Model freed first: the session keeps it alive.
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
        assert_eq!(meo_model_free(m), MeoStatus::InvalidHandle);
        assert_eq!(meo_session_reset(s), MeoStatus::Ok);
        assert_eq!(meo_session_set_threads(s, 1), MeoStatus::Ok);
        assert_eq!(meo_session_set_memory_budget(s, 1), MeoStatus::Ok);
        let mut got = 0usize;
        let st =
            meo_session_generate(s, [1u32, 2].as_ptr(), 2, 4, None, null_mut(), null(), out.as_mut_ptr(), 4, &mut got);
        assert_eq!((st, got), (MeoStatus::Ok, 4), "{}", last_error());
        let mut stats = MeoStats::default();
        assert_eq!(meo_session_stats(s, &mut stats), MeoStatus::Ok);
        assert_eq!(stats.residency_available, 1);
        assert!(stats.released_slabs > 0, "a 1-byte budget releases slabs: {stats:?}");
        let mut released = 0u64;
        assert_eq!(meo_session_trim(s, &mut released), MeoStatus::Ok, "{}", last_error());
        assert_eq!(released, stats.expert_bytes_in_file);
        assert_eq!(meo_session_free(s), MeoStatus::Ok);
        assert_eq!(meo_session_free(s), MeoStatus::InvalidHandle);
        assert_eq!(meo_session_free(null_mut()), MeoStatus::Ok);
    }
}

/// A model at an offset inside a bigger file (an APK asset) gives the same tokens as the
/// file itself; trim works on it; a model from bytes cannot be trimmed.
#[test]
fn fd_at_offset_and_bytes_give_the_reference_tokens() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = fixture(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let r = reference("mixtral");
    let offset = 16384 + 100; // deliberately not page-aligned
    let apk = dir.path().join("app.apk");
    let mut f = std::fs::File::create(&apk).unwrap();
    f.write_all(&vec![0xAB; offset]).unwrap();
    f.write_all(&bytes).unwrap();
    f.write_all(b"trailing zip directory").unwrap();
    drop(f);
    let f = std::fs::File::open(&apk).unwrap();
    unsafe {
        let mut via_fd: *mut MeoModel = null_mut();
        let st = meo_model_open_fd(f.as_raw_fd(), offset as u64, bytes.len() as u64, &mut via_fd);
        assert_eq!(st, MeoStatus::Ok, "{}", last_error());
        drop(f); // the library holds its own descriptor
        let mut too_far: *mut MeoModel = null_mut();
        let f2 = std::fs::File::open(&apk).unwrap();
        assert_eq!(meo_model_open_fd(f2.as_raw_fd(), offset as u64, 1 << 40, &mut too_far), MeoStatus::InvalidArgument);
        let mut via_bytes: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open_bytes(bytes.as_ptr(), bytes.len(), &mut via_bytes), MeoStatus::Ok);
        for (m, trim) in [(via_fd, MeoStatus::Ok), (via_bytes, MeoStatus::Unsupported)] {
            let mut s: *mut MeoSession = null_mut();
            assert_eq!(meo_session_new(m, null(), &mut s), MeoStatus::Ok);
            assert_eq!(meo_session_set_memory_budget(s, 1 << 20), MeoStatus::Unsupported);
            let mut out = vec![0u32; r.greedy.len()];
            let mut n = 0usize;
            let st = meo_session_generate(
                s,
                r.input_ids.as_ptr(),
                r.input_ids.len(),
                out.len(),
                None,
                null_mut(),
                null(),
                out.as_mut_ptr(),
                out.len(),
                &mut n,
            );
            assert_eq!(st, MeoStatus::Ok, "{}", last_error());
            assert_eq!(out[..n], r.greedy[..n]);
            assert_eq!(meo_session_trim(s, null_mut()), trim);
            assert_eq!(meo_session_free(s), MeoStatus::Ok);
            assert_eq!(meo_model_free(m), MeoStatus::Ok);
        }
    }
}

/// `meo_status_string` takes any int: the codes of `MeoStatus` have descriptions, every other
/// value gives "unknown status" (it took the enum by value, so an out-of-range int was UB).
#[test]
fn status_string_takes_any_int() {
    let text = |code: i32| {
        // SAFETY: never NULL, static and NUL-terminated.
        unsafe { CStr::from_ptr(meo_status_string(code)) }.to_str().unwrap()
    };
    assert_eq!(text(MeoStatus::Ok as i32), "ok");
    for code in 0..=MeoStatus::InvalidState as i32 {
        assert_ne!(text(code), "unknown status", "code {code}");
    }
    assert!(text(MeoStatus::Busy as i32).contains("in use"));
    for code in [-1, MeoStatus::InvalidState as i32 + 1, 99, i32::MAX, i32::MIN] {
        assert_eq!(text(code), "unknown status", "code {code}");
    }
}
