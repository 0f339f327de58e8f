//! Conformance of the CPU target: the shared suite (`meo_tests::conformance`) with a
//! [`Runner`] over [`meo::Session`], the CPU [`meo::Target`].

use meo::{Model, Session, SessionOptions};
use meo_tests::conformance::{Runner, TargetRunner};
use std::path::Path;

/// Opens `path` on the CPU with 2 threads (so the threaded kernels are what is checked).
fn open_cpu(path: &Path) -> Box<dyn Runner> {
    // Tests open a handful of tiny models: leaking them gives the session a 'static model.
    let model: &'static Model = Box::leak(Box::new(Model::open(path).expect("open model")));
    Box::new(TargetRunner(Session::new(model, SessionOptions { threads: 2, ..Default::default() }).expect("session")))
}

meo_tests::conformance_suite!(&open_cpu);
meo_tests::recurrent_suite!(&open_cpu);
meo_tests::cpu_only_suite!(&open_cpu);

/// A hybrid model's session state: a KV cache for the attention layers only, a fixed-size
/// recurrent state for the others; truncation and reset semantics.
mod recurrent_state {
    use meo::{DType, Model, Session, SessionOptions};
    use meo_tests::conformance::{convert_fixture, reference};

    #[test]
    fn state_is_fixed_size_and_cannot_be_rewound() {
        let tmp = tempfile::tempdir().unwrap();
        let path = convert_fixture("qwen3_next", DType::F32, DType::F32, tmp.path());
        let m = Model::open(&path).unwrap();
        let c = m.config().clone();
        let rf = reference("qwen3_next");
        let mut s = Session::new(&m, SessionOptions::default()).unwrap();
        assert!(s.has_recurrent_state());
        // 3 gated DeltaNet layers: conv history 3 × 128 channels + state 4 heads × 16 × 16.
        assert_eq!(c.recurrent_state_bytes(), 3 * (3 * 128 + 4 * 16 * 16) * 4);
        assert_eq!(s.recurrent_state_bytes(), c.recurrent_state_bytes());
        // One attention layer of 2 kv heads × 16 keys and values per position.
        assert_eq!(c.kv_bytes_per_position(s.kv_options()), 2 * 2 * 16 * 4);
        let first = s.forward(&rf.input_ids).unwrap().to_vec();
        let t = rf.input_ids.len();
        assert_eq!(s.kv_cache_bytes(), c.kv_cache_bytes(t, s.kv_options()));
        assert_eq!(s.recurrent_state_bytes(), c.recurrent_state_bytes(), "the state does not grow");
        // A recurrent state has no per-position history: a partial rewind is refused, unchanged.
        assert!(!s.truncate(5));
        assert_eq!(s.position(), t);
        assert!(s.truncate(t), "no-op at the current length");
        let next = s.forward(&rf.greedy[..1]).unwrap().to_vec();
        // Truncating to 0 resets every state: the prompt gives the same logits again.
        assert!(s.truncate(0));
        assert_eq!(s.position(), 0);
        assert_eq!(s.forward(&rf.input_ids).unwrap(), &first[..]);
        assert_eq!(s.forward(&rf.greedy[..1]).unwrap(), &next[..]);
    }

    /// MEO prompt mode merges the MoE layers of a hybrid as of any model; the mixers are not
    /// experts. The prompt runs vanilla (same logits), later tokens run merged experts.
    #[test]
    fn prompt_mode_merges_only_the_moe_layers() {
        for name in ["qwen3_next", "qwen3_5_moe"] {
            let tmp = tempfile::tempdir().unwrap();
            let path = convert_fixture(name, DType::F32, DType::F32, tmp.path());
            let m = Model::open(&path).unwrap();
            let rf = reference(name);
            let mut vanilla = Session::new(&m, SessionOptions::default()).unwrap();
            let mut s = Session::new(&m, SessionOptions::default()).unwrap();
            let opts = meo::MergeOptions { mode: meo::Mode::Prompt(Default::default()), ..Default::default() };
            assert_eq!(s.set_mode(opts).unwrap(), vec![0, 1, 2, 3], "{name}");
            assert_eq!(s.forward(&rf.input_ids).unwrap(), vanilla.forward(&rf.input_ids).unwrap(), "{name}");
            assert_eq!(s.merged_layers(), vec![0, 1, 2, 3], "{name}");
            let merged = s.forward(&rf.greedy[..1]).unwrap().to_vec();
            let exact = vanilla.forward(&rf.greedy[..1]).unwrap();
            assert!(merged.iter().all(|v| v.is_finite()), "{name}");
            assert_ne!(&merged[..], exact, "{name}: merged experts are an approximation");
        }
    }
}

/// Granite-4 hybrid (Mamba2) and LFM2-MoE (short convolutions): the same state semantics as
/// the other recurrent mixers, and MEO modes on their MoE layers.
mod hybrid_state {
    use meo::{DType, Model, Session, SessionOptions};
    use meo_tests::conformance::{convert_fixture, reference};

    /// The session state's size (recurrent bytes fixed, KV bytes per position) and its
    /// truncation semantics.
    fn check_state(name: &str, recurrent_bytes: u64, kv_per_position: u64) {
        let tmp = tempfile::tempdir().unwrap();
        let path = convert_fixture(name, DType::F32, DType::F32, tmp.path());
        let m = Model::open(&path).unwrap();
        let c = m.config().clone();
        let rf = reference(name);
        let mut s = Session::new(&m, SessionOptions::default()).unwrap();
        assert!(s.has_recurrent_state());
        assert_eq!(c.recurrent_state_bytes(), recurrent_bytes);
        assert_eq!(s.recurrent_state_bytes(), recurrent_bytes);
        assert_eq!(c.kv_bytes_per_position(s.kv_options()), kv_per_position);
        let first = s.forward(&rf.input_ids).unwrap().to_vec();
        let t = rf.input_ids.len();
        assert_eq!(s.kv_cache_bytes(), c.kv_cache_bytes(t, s.kv_options()));
        assert_eq!(s.recurrent_state_bytes(), recurrent_bytes, "the state does not grow");
        assert!(!s.truncate(5), "a partial rewind of a recurrent state is refused");
        assert_eq!(s.position(), t);
        let next = s.forward(&rf.greedy[..1]).unwrap().to_vec();
        assert!(s.truncate(0));
        assert_eq!(s.forward(&rf.input_ids).unwrap(), &first[..]);
        assert_eq!(s.forward(&rf.greedy[..1]).unwrap(), &next[..]);
    }

    /// MEO prompt mode merges exactly the MoE layers `moe` (never a mixer): the prompt runs
    /// vanilla, later tokens run merged experts.
    fn check_prompt_mode(name: &str, moe: &[usize]) {
        let tmp = tempfile::tempdir().unwrap();
        let path = convert_fixture(name, DType::F32, DType::F32, tmp.path());
        let m = Model::open(&path).unwrap();
        let rf = reference(name);
        let mut vanilla = Session::new(&m, SessionOptions::default()).unwrap();
        let mut s = Session::new(&m, SessionOptions::default()).unwrap();
        let opts = meo::MergeOptions { mode: meo::Mode::Prompt(Default::default()), ..Default::default() };
        assert_eq!(s.set_mode(opts).unwrap(), moe);
        assert_eq!(s.forward(&rf.input_ids).unwrap(), vanilla.forward(&rf.input_ids).unwrap());
        assert_eq!(s.merged_layers(), moe);
        let merged = s.forward(&rf.greedy[..1]).unwrap().to_vec();
        let exact = vanilla.forward(&rf.greedy[..1]).unwrap();
        assert!(merged.iter().all(|v| v.is_finite()));
        assert_ne!(&merged[..], exact, "merged experts are an approximation");
    }

    #[test]
    fn mamba2_state_is_fixed_size_and_cannot_be_rewound() {
        // 3 Mamba2 layers: conv history 3 × (128 + 2 groups × 2 × 16) channels + state
        // 8 heads × 16 × 16; one attention layer of 2 kv heads × 16 keys and values.
        check_state("granitemoehybrid", 3 * (3 * 192 + 8 * 16 * 16) * 4, 2 * 2 * 16 * 4);
    }

    #[test]
    fn short_conv_state_is_fixed_size_and_cannot_be_rewound() {
        // 3 short convolution layers: 2 past inputs × 64 channels; one attention layer.
        check_state("lfm2_moe", 3 * 2 * 64 * 4, 2 * 2 * 16 * 4);
    }

    #[test]
    fn prompt_mode_merges_only_the_moe_layers_of_a_mamba2_hybrid() {
        // Every layer is MoE; three of them follow a Mamba2 mixer.
        check_prompt_mode("granitemoehybrid", &[0, 1, 2, 3]);
    }

    #[test]
    fn prompt_mode_merges_only_the_moe_layers_of_a_short_conv_hybrid() {
        // Layer 0 is dense (not merged); 1 and 3 follow a short convolution, 2 attention.
        check_prompt_mode("lfm2_moe", &[1, 2, 3]);
    }
}

/// Behaviour of the model runtime beyond the fixtures, on synthetic models.
mod model {
    use meo::config::{FfnKind, QkNorm};
    use meo::route::Choice;
    use meo::{DType, ForwardError, MetaValue, Model, ModelError, Session, SessionOptions, Trace};
    use meo_converter::canonical::{Canon, Place};
    use meo_tests::conformance::{mla_config, synthetic_config, synthetic_model};
    use std::collections::{BTreeMap, BTreeSet};

    fn model(bytes: Vec<u8>) -> Model {
        Model::from_vec(bytes).expect("synthetic model opens")
    }

    fn session(m: &Model, threads: usize) -> Session<'_> {
        Session::new(m, SessionOptions { threads, ..Default::default() }).unwrap()
    }

    fn tokens(n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
    }

    #[derive(Default)]
    struct Record {
        /// (layer, pos) → experts.
        routes: BTreeMap<(usize, usize), Vec<u32>>,
        /// (layer, experts) in call order, and how many routes had been seen then.
        selected: Vec<(usize, Vec<u32>, usize)>,
    }

    impl Trace for Record {
        fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
            self.selected.push((layer, experts.to_vec(), self.routes.len()));
        }
        fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
            assert!(choices.windows(2).all(|w| w[0].expert < w[1].expert), "ascending experts");
            self.routes.insert((layer, pos), choices.iter().map(|c| c.expert).collect());
        }
    }

    #[test]
    fn model_is_send_sync_and_session_is_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Model>();
        send::<Session<'static>>();
    }

    #[test]
    fn prompt_decode_chunks_and_threads_give_identical_logits() {
        let c = synthetic_config();
        for (dense, experts) in [(DType::F32, DType::F32), (DType::F16, DType::Q8_0)] {
            let m = model(synthetic_model(&c, dense, experts, 1, &|_| false, &[]));
            let toks = tokens(23, c.vocab_size);
            let all = session(&m, 1).forward(&toks).unwrap().to_vec();
            assert!(all.iter().all(|v| v.is_finite()));
            // Token by token, on 2 threads.
            let mut s = session(&m, 2);
            let mut one = Vec::new();
            for &t in &toks {
                one.extend_from_slice(s.forward(&[t]).unwrap());
            }
            assert_eq!(one, all, "{dense:?}/{experts:?}: decode vs prompt");
            // Two chunks, then reset and again.
            let mut s = session(&m, 3);
            for _ in 0..2 {
                s.reset();
                let mut chunks = s.forward(&toks[..9]).unwrap().to_vec();
                chunks.extend_from_slice(s.forward(&toks[9..]).unwrap());
                assert_eq!(chunks, all, "{dense:?}/{experts:?}: chunks vs prompt");
            }
            // Last-position logits only.
            let mut s = session(&m, 2);
            let last = s.forward_with(&toks, meo::Logits::Last, &mut meo::NoTrace).unwrap().to_vec();
            assert_eq!(last, all[all.len() - c.vocab_size..]);
        }
    }

    #[test]
    fn mla_prompt_decode_chunks_and_truncate_give_identical_logits() {
        for q_lora in [0, 12] {
            let c = mla_config(q_lora);
            let m = model(synthetic_model(&c, DType::F32, DType::Q8_0, 7, &|_| false, &[]));
            let toks = tokens(13, c.vocab_size);
            let all = session(&m, 1).forward(&toks).unwrap().to_vec();
            assert!(all.iter().all(|v| v.is_finite()));
            let mut s = session(&m, 2);
            let mut one = Vec::new();
            for &t in &toks {
                one.extend_from_slice(s.forward(&[t]).unwrap());
            }
            assert_eq!(one, all, "q_lora {q_lora}: decode vs prompt");
            // Truncating drops exactly the cached keys and values of the dropped positions.
            s.truncate(5);
            let rest = s.forward(&toks[5..]).unwrap().to_vec();
            assert_eq!(rest, all[5 * c.vocab_size..], "q_lora {q_lora}: after truncate");
        }
        // The layer window bounds MLA too: one layer of window 4, position 9 cannot see token 2.
        let mut c = mla_config(12);
        (c.num_layers, c.layer_ffn, c.layer_window) = (1, vec![FfnKind::Dense], vec![4]);
        let m = model(synthetic_model(&c, DType::F32, DType::F32, 8, &|_| false, &[]));
        let a = tokens(10, c.vocab_size);
        let mut b = a.clone();
        b[2] = (b[2] + 1) % c.vocab_size as u32;
        let (la, lb) = (session(&m, 1).forward(&a).unwrap().to_vec(), session(&m, 1).forward(&b).unwrap().to_vec());
        let v = c.vocab_size;
        assert_ne!(la[2 * v..3 * v], lb[2 * v..3 * v]);
        assert_eq!(la[9 * v..], lb[9 * v..]);
    }

    #[test]
    fn sliding_window_bounds_what_a_position_sees() {
        // One layer: position i sees tokens i-w+1..=i only.
        let mut c = synthetic_config();
        c.num_layers = 1;
        c.layer_ffn = vec![FfnKind::Dense];
        for (window, should_differ) in [(4, false), (0, true)] {
            c.layer_window = vec![window];
            let m = model(synthetic_model(&c, DType::F32, DType::F32, 2, &|_| false, &[]));
            let a = tokens(10, c.vocab_size);
            let mut b = a.clone();
            b[2] = (b[2] + 1) % c.vocab_size as u32;
            let la = session(&m, 1).forward(&a).unwrap().to_vec();
            let lb = session(&m, 1).forward(&b).unwrap().to_vec();
            let v = c.vocab_size;
            assert_ne!(la[2 * v..3 * v], lb[2 * v..3 * v]);
            assert_eq!(la[9 * v..] != lb[9 * v..], should_differ, "window {window}");
        }
    }

    #[test]
    fn unselected_experts_are_never_read() {
        let c = synthetic_config();
        let toks = tokens(17, c.vocab_size);
        let m = model(synthetic_model(&c, DType::F16, DType::Q8_0, 3, &|_| false, &[]));
        let mut rec = Record::default();
        let want = session(&m, 2).forward_traced(&toks, &mut rec).unwrap().to_vec();
        let used: BTreeSet<(usize, usize)> =
            rec.routes.iter().flat_map(|(&(l, _), e)| e.iter().map(move |&x| (l, x as usize))).collect();
        assert!(used.len() < c.router.num_experts * 2, "some expert must stay unselected");
        // Same weights, every unselected expert's matrices NaN: nothing changes.
        let poisoned =
            |t: &Canon| matches!(t.place, Place::Expert { layer, expert, .. } if !used.contains(&(layer, expert)));
        let m2 = model(synthetic_model(&c, DType::F16, DType::Q8_0, 3, &poisoned, &[]));
        let got = session(&m2, 2).forward(&toks).unwrap().to_vec();
        assert_eq!(got, want);
    }

    #[test]
    fn trace_reports_every_route_and_selection_before_use() {
        let c = synthetic_config();
        let m = model(synthetic_model(&c, DType::F32, DType::F32, 4, &|_| false, &[]));
        let toks = tokens(6, c.vocab_size);
        let mut s = session(&m, 1);
        let mut rec = Record::default();
        s.forward_traced(&toks[..4], &mut rec).unwrap();
        s.forward_traced(&toks[4..], &mut rec).unwrap();
        let moe: Vec<usize> = m.moe_layers().collect();
        assert_eq!(moe, [0, 2]);
        assert_eq!(rec.routes.len(), moe.len() * toks.len());
        assert_eq!(rec.selected.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 2, 0, 2]);
        for (i, (layer, experts, seen)) in rec.selected.iter().enumerate() {
            let (lo, hi) = if i < 2 { (0, 4) } else { (4, 6) };
            let union: BTreeSet<u32> = (lo..hi).flat_map(|p| rec.routes[&(*layer, p)].clone()).collect();
            assert_eq!(experts, &union.into_iter().collect::<Vec<_>>());
            // All routes of this layer and call were reported before the selection.
            assert_eq!(*seen, i / 2 * 8 + (i % 2 + 1) * (hi - lo));
        }
        for l in moe {
            for e in 0..c.router.num_experts {
                let r = m.expert_slab(l, e).unwrap();
                assert_eq!(r.start % meo::format::MIN_ALIGNMENT as usize, 0);
            }
        }
        assert!(m.expert_slab(1, 0).is_none() && m.expert_slab(0, 6).is_none());
    }

    #[test]
    fn bad_tokens_and_context_overflow_are_typed_errors_and_change_nothing() {
        let c = synthetic_config();
        let m = model(synthetic_model(&c, DType::F32, DType::F32, 5, &|_| false, &[]));
        let mut s = Session::new(&m, SessionOptions { threads: 1, max_context: 8, ..Default::default() }).unwrap();
        assert_eq!(s.max_context(), 8);
        let err = s.forward(&[1, 2, c.vocab_size as u32]).unwrap_err();
        assert_eq!(err, ForwardError::TokenOutOfRange { index: 2, token: c.vocab_size as u32, vocab: c.vocab_size });
        assert_eq!(s.position(), 0);
        let first = s.forward(&tokens(6, c.vocab_size)).unwrap().to_vec();
        assert_eq!(s.forward(&[1, 2, 3]).unwrap_err(), ForwardError::ContextOverflow { cached: 6, tokens: 3, max: 8 });
        assert_eq!(s.position(), 6);
        s.forward(&[1, 2]).unwrap();
        assert!(matches!(s.forward(&[1]), Err(ForwardError::ContextOverflow { .. })));
        s.reset();
        assert_eq!(s.forward(&tokens(6, c.vocab_size)).unwrap(), &first[..]);
        assert_eq!(s.forward(&[]).unwrap().len(), 0);
    }

    #[test]
    fn expert_biases_and_clamped_swiglu_run_and_refuse_merging() {
        use meo::config::Activation;
        use meo::{LayerSelect, MergeOptions, Mode, ModeError, PromptPool};
        let mut c = synthetic_config();
        c.recipe.expert_bias = true;
        c.recipe.mlp_activation = Activation::ClampedSwiglu { alpha: 1.702, limit: 0.5 };
        let m = model(synthetic_model(&c, DType::F32, DType::F32, 7, &|_| false, &[]));
        let toks = tokens(9, c.vocab_size);
        let with = session(&m, 2).forward(&toks).unwrap().to_vec();
        assert!(with.iter().all(|v| v.is_finite()));
        // The biases are read: poisoning one selected expert's down bias changes the logits.
        let mut rec = Record::default();
        session(&m, 1).forward_traced(&toks, &mut rec).unwrap();
        let (&(layer, _), experts) = rec.routes.iter().next().unwrap();
        let expert = experts[0] as usize;
        let poisoned = |t: &Canon| matches!(t.place, Place::ExpertBias { layer: l, expert: x, part: 2 } if l == layer && x == expert);
        let m2 = model(synthetic_model(&c, DType::F32, DType::F32, 7, &poisoned, &[]));
        assert!(session(&m2, 1).forward(&toks).unwrap().iter().any(|v| v.is_nan()));
        // Prompt-mode merges have no rule for biases: refused, the session unchanged.
        let mut s = session(&m, 1);
        let e = s
            .set_mode(MergeOptions { mode: Mode::Prompt(PromptPool::MeanGate), layers: LayerSelect::All })
            .unwrap_err();
        assert!(matches!(e, ModeError::NotMergeable { layer: 0, .. }), "{e}");
        assert_eq!(s.forward(&toks).unwrap(), &with[..]);
    }

    fn open_err(bytes: Vec<u8>) -> ModelError {
        Model::from_vec(bytes).expect_err("model must be refused")
    }

    #[test]
    fn structural_problems_are_typed_errors_at_open() {
        let c = synthetic_config();
        let ok = |extra: &[(&'static str, MetaValue<'static>)]| {
            synthetic_model(&c, DType::F32, DType::F32, 6, &|_| false, extra)
        };
        // Unsupported RoPE.
        let e = open_err(ok(&[("model.rope_type", MetaValue::Str("longrope"))]));
        assert!(matches!(&e, ModelError::Unsupported(m) if m.contains("longrope")), "{e}");
        // A scaled RoPE (YaRN) only with its precomputed frequencies (`model.rope_inv_freq`).
        let e = open_err(ok(&[("model.rope_type", MetaValue::Str("yarn"))]));
        assert!(matches!(&e, ModelError::Unsupported(m) if m.contains("yarn")), "{e}");
        assert!(Model::from_vec(ok(&[("model.rope_type", MetaValue::Str("default"))])).is_ok());
        // The file says one thing, the config another: missing, mis-shaped, mistyped tensors.
        let mut wants_bias = c.clone();
        wants_bias.router.router_bias = true;
        let bytes = synthetic_model(&c, DType::F32, DType::F32, 6, &|_| false, &[]);
        let with_cfg = |cfg: &meo::ModelConfig| {
            // Re-label the same tensors with another config's metadata.
            let file = meo::MeoFile::parse(&bytes).unwrap();
            let meta = meo::Metadata::from_entries(cfg.to_metadata());
            let tensors: Vec<_> = file
                .tensors()
                .iter()
                .map(|t| (meo_tests::spec(t.name, t.dtype, t.shape()), file.data(t).to_vec()))
                .collect();
            meo_tests::write_file(&meta, &tensors, meo::format::MIN_ALIGNMENT)
        };
        let e = open_err(with_cfg(&wants_bias));
        assert!(matches!(&e, ModelError::MissingTensor { name } if name == "layers.0.router.bias"), "{e}");
        let mut wider = c.clone();
        wider.expert_intermediate_size = 41;
        let e = open_err(with_cfg(&wider));
        assert!(matches!(&e, ModelError::WrongShape { name, .. } if name == "layers.0.experts.0.gate"), "{e}");
        let mut per_head = c.clone();
        per_head.qk_norm = QkNorm::PerHead;
        let e = open_err(with_cfg(&per_head));
        assert!(matches!(&e, ModelError::WrongShape { name, .. } if name == "layers.0.attn.q_norm.weight"), "{e}");
        // A norm weight stored f16 (the runtime reads norms and biases as f32 only).
        let f16_norms = synthetic_model(&c, DType::F16, DType::F32, 6, &|_| false, &[]);
        let file = meo::MeoFile::parse(&f16_norms).unwrap();
        let tensors: Vec<_> = file
            .tensors()
            .iter()
            .map(|t| {
                if t.name == "output_norm.weight" {
                    let v = vec![0u8; t.len as usize / 2];
                    (meo_tests::spec(t.name, DType::F16, t.shape()), v)
                } else {
                    (meo_tests::spec(t.name, t.dtype, t.shape()), file.data(t).to_vec())
                }
            })
            .collect();
        let meta = meo::Metadata::from_entries(c.to_metadata());
        let e = open_err(meo_tests::write_file(&meta, &tensors, meo::format::MIN_ALIGNMENT));
        assert!(matches!(&e, ModelError::WrongDType { name, .. } if name == "output_norm.weight"), "{e}");
        // Not a .meo file at all.
        assert!(matches!(open_err(vec![0; 200]), ModelError::Format(_)));
        // A file with no model metadata.
        let e = open_err(meo_tests::write_file(&meo::Metadata::default(), &[], meo::format::MIN_ALIGNMENT));
        assert!(matches!(e, ModelError::Config(_)), "{e}");
    }
}

meo_tests::encoder_suite!(&open_cpu);

/// The relative position buckets match transformers' `_relative_position_bucket` (recorded in
/// the Switch fixture for −300..=300, covering the exact, logarithmic and clamped ranges).
#[test]
fn relative_buckets_match_transformers() {
    let rf = meo_tests::conformance::encoder_reference("switch_transformers");
    let r = rf.relative_buckets.len() as i64 / 2;
    assert!(r >= 256, "the fixture records relative positions beyond max_distance");
    for (i, &want) in rf.relative_buckets.iter().enumerate() {
        let rel = i as i64 - r;
        // The fixture's config: 32 buckets, max distance 128 (switch-base-8's).
        assert_eq!(meo::model::plan::relative_bucket(rel, true, 32, 128), want, "relative position {rel}");
    }
}

/// Encoder models (`model.encoder_only`) beyond the fixture, on a synthetic Switch-style model.
mod encoder {
    use meo::config::{Activation, FfnKind, Positions, Recipe, RouterSpec, Scoring};
    use meo::route::Choice;
    use meo::{DType, ForwardError, Model, Session, SessionOptions, Trace};
    use meo_tests::conformance::{synthetic_config, synthetic_model};
    use std::collections::BTreeMap;

    const CAPACITY: usize = 2;

    fn switch_like() -> Model {
        let mut c = synthetic_config();
        c.architecture = "switch_transformers".into();
        c.attention_bias = false;
        c.qk_norm = meo::QkNorm::None;
        c.clip_qkv = None;
        c.num_kv_heads = c.num_heads;
        c.shared_expert_intermediate_size = 0;
        c.layer_ffn = vec![FfnKind::Dense, FfnKind::Moe, FfnKind::Moe];
        c.layer_window = vec![0; 3];
        c.router = RouterSpec { expert_capacity: CAPACITY, ..RouterSpec::plain(4, 1, Scoring::Softmax) };
        c.recipe = Recipe {
            positions: Positions::Relative,
            ffn_activation: Activation::Relu,
            relative_buckets: 8,
            relative_max_distance: 16,
            attention_unscaled: true,
            encoder_only: true,
            ..Recipe::default()
        };
        let bytes = synthetic_model(&c, DType::F32, DType::F32, 7, &|_| false, &[]);
        Model::from_vec(bytes).expect("synthetic encoder opens")
    }

    #[derive(Default)]
    struct Routes(BTreeMap<(usize, usize), Vec<Choice>>);

    impl Trace for Routes {
        fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
            self.0.insert((layer, pos), choices.to_vec());
        }
    }

    fn tokens(n: usize) -> Vec<u32> {
        (0..n).map(|i| ((i * 29 + 5) % 96) as u32).collect()
    }

    #[test]
    fn forward_is_refused_and_encode_is_bidirectional_and_repeatable() {
        let m = switch_like();
        let mut s = Session::new(&m, SessionOptions { threads: 1, ..Default::default() }).unwrap();
        assert_eq!(s.forward(&[1, 2]).unwrap_err(), ForwardError::EncoderOnly);
        let toks = tokens(10);
        let a = s.encode(&toks, &mut meo::NoTrace).unwrap().to_vec();
        assert_eq!(a.len(), 10 * m.config().hidden_size);
        // encode starts a new sequence each time.
        assert_eq!(s.encode(&toks, &mut meo::NoTrace).unwrap(), &a[..]);
        // The first token sees the last one.
        let mut changed = toks.clone();
        changed[9] = (changed[9] + 1) % 96;
        let b = s.encode(&changed, &mut meo::NoTrace).unwrap();
        let h = m.config().hidden_size;
        assert_ne!(&a[..h], &b[..h], "position 0 must depend on a later token");
        // Out-of-range input is refused and changes nothing.
        assert!(matches!(s.encode(&[96], &mut meo::NoTrace), Err(ForwardError::TokenOutOfRange { .. })));
    }

    #[test]
    fn capacity_keeps_the_first_tokens_of_each_expert() {
        let m = switch_like();
        let mut s = Session::new(&m, SessionOptions { threads: 2, ..Default::default() }).unwrap();
        let t = 24;
        let mut r = Routes::default();
        s.encode(&tokens(t), &mut r).unwrap();
        let mut dropped = 0;
        for layer in [1, 2] {
            let mut taken = [0usize; 4];
            for pos in 0..t {
                let c = &r.0[&(layer, pos)];
                assert_eq!(c.len(), 1);
                let e = c[0].expert as usize;
                if taken[e] < CAPACITY {
                    taken[e] += 1;
                    assert!(c[0].weight > 0.0, "layer {layer} position {pos}: kept token has weight 0");
                } else {
                    assert_eq!(c[0].weight, 0.0, "layer {layer} position {pos}: over capacity but not dropped");
                    dropped += 1;
                }
            }
        }
        // 24 tokens over 4 experts of capacity 2: at least 16 per layer are dropped.
        assert!(dropped >= 32, "{dropped}");
    }
}
