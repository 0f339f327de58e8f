//! Issue 20: one memory budget per model through the C API — set on the model, it bounds
//! every session's expert cache, lowering it (a memory warning) evicts at once, and results
//! never change.

use meo::DType;
use meo_ffi::*;
use meo_tests::conformance::{convert_fixture, reference};
use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(meo_last_error()) }.to_string_lossy().into_owned()
}

/// Greedy ids after `prompt` on a new session of `m`, and the session (for its stats).
unsafe fn generate(m: *mut MeoModel, prompt: &[u32], n: usize) -> (Vec<u32>, *mut MeoSession) {
    let mut s: *mut MeoSession = null_mut();
    unsafe {
        assert_eq!(meo_session_new(m, null(), &mut s), MeoStatus::Ok, "{}", last_error());
        let mut out = vec![0u32; n];
        let mut got = 0usize;
        let st = meo_session_generate(
            s,
            prompt.as_ptr(),
            prompt.len(),
            n,
            None,
            null_mut(),
            null(),
            out.as_mut_ptr(),
            n,
            &mut got,
        );
        assert_eq!(st, MeoStatus::Ok, "{}", last_error());
        out.truncate(got);
        (out, s)
    }
}

unsafe fn stats(s: *mut MeoSession) -> MeoStats {
    let mut st = MeoStats::default();
    assert_eq!(unsafe { meo_session_stats(s, &mut st) }, MeoStatus::Ok);
    st
}

#[test]
fn one_budget_for_all_sessions_of_a_model() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let name = "trained/mixtral-scratch";
    std::fs::create_dir_all(dir.path().join("trained")).unwrap(); // the output is named after the fixture
    let path = convert_fixture(name, DType::Q8_0, DType::F32, dir.path());
    let prompt: Vec<u32> = reference(name).input_ids.into_iter().take(16).collect();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    unsafe {
        // Without a limit.
        let mut free: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open(cpath.as_ptr(), &mut free), MeoStatus::Ok);
        assert_eq!(meo_model_set_memory_budget(free, 0), MeoStatus::Ok);
        let (exact, s0) = generate(free, &prompt, 24);
        assert_eq!(stats(s0).released_slabs, 0);
        meo_session_free(s0);
        meo_model_free(free);

        // A budget below one token's experts, set on the model before its sessions exist: both
        // sessions evict under it and decode the same tokens.
        let mut m: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open(cpath.as_ptr(), &mut m), MeoStatus::Ok);
        assert_eq!(meo_model_set_memory_budget(m, 1), MeoStatus::Ok, "{}", last_error());
        let (a, sa) = generate(m, &prompt, 24);
        let (b, sb) = generate(m, &prompt, 24);
        assert_eq!(a, exact, "a budget changed the tokens");
        assert_eq!(b, exact);
        let (st_a, st_b) = (stats(sa), stats(sb));
        assert!(st_a.released_slabs > 0, "the model's budget evicted nothing");
        // One tracker: both sessions see the model's counts, the second's include the first's.
        assert!(st_b.released_slabs >= st_a.released_slabs);
        // A memory warning: the budget set through a session is the model's, effective at once.
        assert_eq!(meo_session_set_memory_budget(sa, MEO_MEMORY_BUDGET_AUTO), MeoStatus::Ok);
        assert_eq!(meo_model_set_memory_budget(m, 1), MeoStatus::Ok);
        let after = stats(sb);
        assert!(after.released_slabs >= st_b.released_slabs);
        meo_session_free(sa);
        meo_session_free(sb);
        assert_eq!(meo_model_set_memory_budget(null(), 1), MeoStatus::NullPointer);
        meo_model_free(m);
        assert_eq!(meo_model_set_memory_budget(m, 1), MeoStatus::InvalidHandle);
    }
}
