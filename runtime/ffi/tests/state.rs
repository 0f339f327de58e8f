//! Session state save/restore and the KV dtype through the C API: save → new session → load
//! → continue generating equals the generation that was never interrupted, for an attention
//! family and a hybrid with recurrent layers; damaged buffers are refused.

use meo::DType;
use meo_ffi::*;
use meo_tests::conformance::{convert_fixture, reference};
use std::ffi::CString;
use std::path::Path;
use std::ptr::{null, null_mut};

fn c(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

unsafe fn new_session(m: *const MeoModel, kv: u32) -> *mut MeoSession {
    let mut s: *mut MeoSession = null_mut();
    unsafe {
        assert_eq!(meo_session_new(m, null(), &mut s), MeoStatus::Ok);
        let greedy = MeoSamplerOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 0,
        };
        assert_eq!(meo_session_set_sampler(s, &greedy), MeoStatus::Ok);
        assert_eq!(meo_session_set_kv_dtype(s, kv), MeoStatus::Ok);
    }
    s
}

/// `n` tokens generated from the session's last logits (no prompt).
unsafe fn generate(s: *mut MeoSession, n: usize) -> Vec<u32> {
    let mut out = vec![0u32; n];
    let mut got = 0usize;
    let st = unsafe { meo_session_generate(s, null(), 0, n, None, null_mut(), null(), out.as_mut_ptr(), n, &mut got) };
    assert_eq!(st, MeoStatus::Ok);
    out.truncate(got);
    out
}

unsafe fn save(s: *mut MeoSession) -> Vec<u8> {
    unsafe {
        let mut size = 0usize;
        assert_eq!(meo_session_state_size(s, &mut size), MeoStatus::Ok);
        let mut written = 0usize;
        assert_eq!(meo_session_state_save(s, null_mut(), 0, &mut written), MeoStatus::BufferTooSmall);
        assert_eq!(written, size, "the size needed");
        let mut buf = vec![0u8; size];
        assert_eq!(meo_session_state_save(s, buf.as_mut_ptr(), buf.len(), &mut written), MeoStatus::Ok);
        assert_eq!(written, size);
        buf
    }
}

#[test]
fn saved_state_continues_the_generation_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3_moe", "qwen3_next"] {
        let path = convert_fixture(name, DType::F32, DType::F32, tmp.path());
        let prompt = reference(name).input_ids;
        unsafe {
            let mut m: *mut MeoModel = null_mut();
            assert_eq!(meo_model_open(c(&path).as_ptr(), &mut m), MeoStatus::Ok);
            for kv in [MEO_KV_F32, MEO_KV_F16, MEO_KV_INT8] {
                let a = new_session(m, kv);
                assert_eq!(meo_session_feed(a, prompt.as_ptr(), prompt.len()), MeoStatus::Ok);
                let state = save(a);
                let want = generate(a, 8);
                assert_eq!(want.len(), 8, "{name}");

                let b = new_session(m, kv);
                assert_eq!(meo_session_state_load(b, state.as_ptr(), state.len()), MeoStatus::Ok);
                let mut pos = 0usize;
                assert_eq!(meo_session_position(b, &mut pos), MeoStatus::Ok);
                assert_eq!(pos, prompt.len());
                assert_eq!(generate(b, 8), want, "{name}, kv {kv}: continuation after load");

                // Damaged buffers: refused, nothing changed.
                let mut bad = state.clone();
                let mid = bad.len() / 2;
                bad[mid] ^= 0x10;
                assert_eq!(meo_session_state_load(b, bad.as_ptr(), bad.len()), MeoStatus::InvalidState);
                assert_eq!(meo_session_state_load(b, state.as_ptr(), state.len() - 1), MeoStatus::InvalidState);
                assert_eq!(meo_session_state_load(b, null(), 4), MeoStatus::NullPointer);
                assert_eq!(meo_session_position(b, &mut pos), MeoStatus::Ok);
                assert_eq!(pos, prompt.len() + 8);
                // Another KV dtype's session refuses the state.
                let other = new_session(m, (kv + 1) % 3);
                assert_eq!(meo_session_state_load(other, state.as_ptr(), state.len()), MeoStatus::InvalidState);
                for s in [a, b, other] {
                    assert_eq!(meo_session_free(s), MeoStatus::Ok);
                }
            }
            assert_eq!(meo_model_free(m), MeoStatus::Ok);
        }
    }
}

#[test]
fn kv_dtype_is_checked_and_set_before_feeding() {
    let tmp = tempfile::tempdir().unwrap();
    let path = convert_fixture("mixtral", DType::F32, DType::F32, tmp.path());
    unsafe {
        let mut m: *mut MeoModel = null_mut();
        assert_eq!(meo_model_open(c(&path).as_ptr(), &mut m), MeoStatus::Ok);
        let s = new_session(m, MEO_KV_INT8);
        assert_eq!(meo_session_set_kv_dtype(s, 3), MeoStatus::InvalidArgument);
        assert_eq!(meo_session_feed(s, [1u32, 2].as_ptr(), 2), MeoStatus::Ok);
        assert_eq!(meo_session_set_kv_dtype(s, MEO_KV_F16), MeoStatus::BadState);
        assert_eq!(meo_session_reset(s), MeoStatus::Ok);
        assert_eq!(meo_session_set_kv_dtype(s, MEO_KV_F16), MeoStatus::Ok);
        // Prompt mode merges from the prompt: its state is not saved.
        assert_eq!(meo_session_set_mode(s, c"prompt".as_ptr(), null(), 0.25), MeoStatus::Ok);
        let mut size = 0usize;
        assert_eq!(meo_session_state_save(s, null_mut(), 0, &mut size), MeoStatus::BadState);
        assert_eq!(meo_session_free(s), MeoStatus::Ok);
        assert_eq!(meo_model_free(m), MeoStatus::Ok);
    }
}
