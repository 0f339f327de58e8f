//! A session's KV cache storage (f32, f16, int8; MLA's latent) and its state saved and loaded
//! (issue 20 point 5, issue 21 point 3).

use meo::sample::argmax;
use meo::{DType, KvDtype, KvOptions, MergeOptions, MlaCache, Model, Session, SessionOptions, StateError};
use meo_tests::conformance::{convert_fixture, reference};
use std::path::Path;

fn open(name: &str, dir: &Path) -> Model {
    Model::open(convert_fixture(name, DType::F32, DType::F32, dir)).expect("open model")
}

fn session(m: &Model, kv: KvOptions) -> Session<'_> {
    Session::new(m, SessionOptions { threads: 2, kv, ..Default::default() }).expect("session")
}

/// `n` greedy steps from the session's last logits: the tokens and every step's logits.
fn continue_greedy(s: &mut Session<'_>, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let vocab = s.model().config().vocab_size;
    let (mut toks, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let last = &s.logits()[s.logits().len() - vocab..];
        let t = argmax(last);
        toks.push(t);
        logits.push(s.forward(&[t]).expect("forward").to_vec());
    }
    (toks, logits)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Save after the prompt, load into a fresh session, continue: the same tokens and the same
/// logits, bit for bit, as the session that was never interrupted. Attention (GQA with
/// sinks and windows, MLA's latent) and a hybrid with a recurrent state, in every KV dtype.
#[test]
fn save_then_load_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen3_next"] {
        let m = open(name, tmp.path());
        let prompt = reference(name).input_ids;
        for dtype in KvDtype::ALL {
            let kv = KvOptions { dtype, ..Default::default() };
            let what = format!("{name}, kv {dtype}");
            let mut a = session(&m, kv);
            a.forward(&prompt).unwrap();
            let state = a.save_state(&[7, 8, 9]).unwrap();
            assert_eq!(state.len(), a.state_size(3), "{what}: state_size");
            assert!(state.starts_with(&meo::STATE_MAGIC), "{what}");
            let want = continue_greedy(&mut a, 6);

            let mut b = session(&m, kv);
            assert_eq!(b.load_state(&state).unwrap(), [7, 8, 9], "{what}: token history");
            assert_eq!(b.position(), prompt.len(), "{what}");
            assert_eq!(b.kv_cache_bytes(), m.config().kv_cache_bytes(prompt.len(), kv), "{what}: KV bytes");
            assert_eq!(continue_greedy(&mut b, 6), want, "{what}: continuation");

            // A state saved mid-generation loads into a used session too (replacing its state).
            let mid = b.save_state(&[]).unwrap();
            let want = continue_greedy(&mut b, 3);
            a.reset();
            a.forward(&prompt[..2]).unwrap();
            assert_eq!(a.load_state(&mid).unwrap(), Vec::<u32>::new());
            assert_eq!(continue_greedy(&mut a, 3), want, "{what}: continuation into a used session");
        }
        // A fresh session's state (nothing fed) loads as a fresh session.
        let fresh = session(&m, KvOptions::default()).save_state(&[]).unwrap();
        let mut s = session(&m, KvOptions::default());
        s.forward(&prompt).unwrap();
        s.load_state(&fresh).unwrap();
        assert_eq!(s.position(), 0, "{name}");
        assert_eq!(s.kv_cache_bytes(), 0, "{name}");
    }
}

/// Every truncation and every flipped bit of a saved state is refused with an error, and the
/// session it was loaded into is unchanged.
#[test]
fn damaged_states_are_refused_without_change() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, dtype) in [("qwen3_next", KvDtype::Int8), ("deepseek_v2", KvDtype::F16)] {
        let m = open(name, tmp.path());
        let prompt = reference(name).input_ids;
        let kv = KvOptions { dtype, ..Default::default() };
        let mut src = session(&m, kv);
        src.forward(&prompt).unwrap();
        let state = src.save_state(&[1, 2]).unwrap();

        let mut s = session(&m, kv);
        s.forward(&prompt[..3]).unwrap();
        let before = s.save_state(&[]).unwrap();
        let n = state.len();
        let cuts = (0..64.min(n)).chain((64..n).step_by(n / 97 + 1)).chain(n.saturating_sub(9)..n);
        for len in cuts {
            let e = s.load_state(&state[..len]).expect_err("a truncated state loads");
            assert!(
                matches!(e, StateError::Truncated { .. } | StateError::Checksum { .. } | StateError::BadMagic),
                "{name}: cut at {len}: {e}"
            );
        }
        let flips = (0..64.min(n) * 8).chain((0..n * 8).step_by(n * 8 / 499 + 1));
        for bit in flips {
            let mut bad = state.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(s.load_state(&bad).is_err(), "{name}: bit {bit} flipped loads");
        }
        let mut longer = state.clone();
        longer.push(0);
        assert!(s.load_state(&longer).is_err(), "{name}: a trailing byte");
        assert_eq!(s.position(), 3, "{name}: unchanged");
        assert_eq!(s.save_state(&[]).unwrap(), before, "{name}: unchanged");

        // Well-formed (checksum recomputed) but wrong for this session.
        let reseal = |mut b: Vec<u8>| {
            let body = b.len() - 4;
            let crc = crc32fast::hash(&b[..body]);
            b[body..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut v = state.clone();
        v[8] = 2;
        assert!(matches!(s.load_state(&reseal(v)), Err(StateError::Version { found: 2, .. })), "{name}");
        let mut v = state.clone();
        v[12] ^= 1;
        assert!(matches!(s.load_state(&reseal(v)), Err(StateError::OtherModel { .. })), "{name}");
        let mut v = state.clone();
        v[16] += 1;
        assert!(matches!(s.load_state(&reseal(v)), Err(StateError::LayerCount { .. })), "{name}");
        let mut v = state.clone();
        v[20] = 9;
        assert!(matches!(s.load_state(&reseal(v)), Err(StateError::KvLayout { .. })), "{name}");
        let mut v = state.clone();
        v[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(s.load_state(&reseal(v)), Err(StateError::Context { .. })), "{name}");
        let mut v = state.clone();
        v[24..32].copy_from_slice(&(prompt.len() as u64 - 1).to_le_bytes());
        assert!(s.load_state(&reseal(v)).is_err(), "{name}: fewer positions than the rows");
        let mut v = state.clone();
        v[32..40].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(s.load_state(&reseal(v)), Err(StateError::Truncated { .. })), "{name}: token count");
        assert_eq!(s.save_state(&[]).unwrap(), before, "{name}: unchanged");

        // Another KV dtype.
        let other = KvDtype::ALL.into_iter().find(|&d| d != dtype).unwrap();
        let mut o = session(&m, KvOptions { dtype: other, ..Default::default() });
        assert!(matches!(o.load_state(&state), Err(StateError::KvLayout { .. })), "{name}");
    }
    // Another model.
    let a = open("qwen3_moe", tmp.path());
    let b = open("mixtral", tmp.path());
    let mut sa = session(&a, KvOptions::default());
    sa.forward(&[1, 2, 3]).unwrap();
    let state = sa.save_state(&[]).unwrap();
    let mut sb = session(&b, KvOptions::default());
    assert!(matches!(sb.load_state(&state), Err(StateError::OtherModel { .. })));
    // Prompt mode builds merges from the prompt, which a state does not hold.
    sa.set_mode(MergeOptions::from_spellings(&a, Some("prompt"), Default::default(), "all", 0.25).unwrap()).unwrap();
    assert_eq!(sa.save_state(&[]), Err(StateError::PromptMode));
    assert_eq!(sa.load_state(&state), Err(StateError::PromptMode));
}

/// f16 and int8 caches: the bytes the config predicts, logits close to f32's, and the same
/// greedy continuation on the GQA fixtures; f32 is the default.
#[test]
fn kv_dtypes_cost_what_the_config_says_and_stay_close() {
    assert_eq!(SessionOptions::default().kv, KvOptions { dtype: KvDtype::F32, mla: MlaCache::Latent });
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3_moe", "mixtral", "gpt_oss"] {
        let m = open(name, tmp.path());
        let rf = reference(name);
        let t = rf.input_ids.len();
        let mut f32s = session(&m, KvOptions::default());
        let want = f32s.forward(&rf.input_ids).unwrap().to_vec();
        let want_next = continue_greedy(&mut f32s, 4);
        let f32_bytes = f32s.kv_cache_bytes();
        for (dtype, tol) in [(KvDtype::F16, 2e-3), (KvDtype::Int8, 5e-2)] {
            let kv = KvOptions { dtype, ..Default::default() };
            let mut s = session(&m, kv);
            let got = s.forward(&rf.input_ids).unwrap().to_vec();
            let d = max_diff(&got, &want);
            assert!(d <= tol, "{name} {dtype}: max |Δlogit| {d} > {tol}");
            assert!(d > 0.0, "{name} {dtype}: the cache is not stored in {dtype}");
            let next = continue_greedy(&mut s, 4);
            assert_eq!(next.0, want_next.0, "{name} {dtype}: greedy continuation");
            let positions = t + 4;
            assert_eq!(s.kv_cache_bytes(), m.config().kv_cache_bytes(positions, kv), "{name} {dtype}");
            let ratio = s.kv_cache_bytes() as f64 / f32_bytes as f64;
            let expected = match dtype {
                KvDtype::F16 => 0.5,
                _ => (m.config().head_dim as f64 + 4.0) / (4.0 * m.config().head_dim as f64),
            };
            assert!((ratio - expected).abs() < 1e-9, "{name} {dtype}: {ratio} of f32");
        }
    }
}

/// MLA caching its latent gives the decompressed cache's results within f32 rounding, for
/// less memory.
#[test]
fn mla_latent_cache_matches_the_decompressed_one() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["deepseek_v2", "deepseek_v3"] {
        let m = open(name, tmp.path());
        let rf = reference(name);
        let c = m.config();
        let mla = c.recipe.mla.as_ref().expect("an MLA model");
        let dec = KvOptions { mla: MlaCache::Decompressed, ..Default::default() };
        let lat = KvOptions::default();
        let layers = c.attention_layers() as u64;
        assert_eq!(c.kv_bytes_per_position(lat), layers * 4 * (mla.kv_lora_rank + c.head_dim) as u64, "{name}");
        assert_eq!(
            c.kv_bytes_per_position(dec),
            layers * 4 * (c.num_heads * (mla.qk_nope_head_dim + c.head_dim + mla.v_head_dim)) as u64,
            "{name}"
        );
        let mut a = session(&m, dec);
        let mut b = session(&m, lat);
        let la = a.forward(&rf.input_ids).unwrap().to_vec();
        let lb = b.forward(&rf.input_ids).unwrap().to_vec();
        assert!(max_diff(&la, &rf.logits) <= 1e-4, "{name}: decompressed vs transformers");
        assert!(max_diff(&lb, &rf.logits) <= 1e-4, "{name}: latent vs transformers");
        let (ta, sa) = continue_greedy(&mut a, 5);
        let (tb, sb) = continue_greedy(&mut b, 5);
        assert_eq!(ta, tb, "{name}: greedy");
        for (x, y) in sa.iter().zip(&sb) {
            assert!(max_diff(x, y) <= 1e-4, "{name}: decode step logits");
        }
        assert_eq!(b.kv_cache_bytes(), c.kv_cache_bytes(rf.input_ids.len() + 5, lat), "{name}");
        assert!(b.kv_cache_bytes() < a.kv_cache_bytes(), "{name}");
    }
}
