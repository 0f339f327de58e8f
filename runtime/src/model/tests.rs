//! Unit tests of the model pieces that need no file (files are built in `tests/`, whose
//! `conformance_cpu.rs` checks the whole model against transformers and synthetic models).

use super::plan::Rope;
use crate::config::{FfnKind, ModelConfig, QkNorm, RouterSpec, Scoring};

fn config(head_dim: usize, theta: f32) -> ModelConfig {
    ModelConfig {
        architecture: "t".into(),
        vocab_size: 8,
        hidden_size: 8,
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: theta,
        max_position_embeddings: 16,
        attention_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        tie_word_embeddings: true,
        intermediate_size: 8,
        expert_intermediate_size: 0,
        shared_expert_intermediate_size: 0,
        layer_ffn: alloc::vec![FfnKind::Dense],
        layer_window: alloc::vec![0],
        eos_token_ids: alloc::vec![],
        router: RouterSpec::plain(1, 1, Scoring::Softmax),
        recipe: crate::config::Recipe::default(),
    }
}

#[test]
fn rope_frequencies_follow_theta() {
    let r = Rope::new(&config(8, 1e4));
    assert_eq!(r.inv_freq.len(), 4);
    assert_eq!(r.inv_freq[0], 1.0);
    assert!((r.inv_freq[1] - 0.1).abs() < 1e-7);
    assert!((r.inv_freq[3] - 1e-3).abs() < 1e-9);
}

#[test]
fn rope_angles_are_position_times_frequency() {
    let r = Rope::new(&config(4, 100.0));
    let (mut c, mut s) = ([0.0; 2], [0.0; 2]);
    r.angles(0, &mut c, &mut s);
    assert_eq!((c, s), ([1.0; 2], [0.0; 2]));
    r.angles(3, &mut c, &mut s);
    assert!((c[0] - libm::cosf(3.0)).abs() < 1e-7 && (s[1] - libm::sinf(0.3)).abs() < 1e-7);
}

#[test]
fn clamped_swiglu_clamps_gate_above_and_up_both_sides() {
    use super::ffn::clamped_swiglu;
    let f = |g: f32, u: f32| clamped_swiglu(g, u, 1.702, 7.0);
    let reference = |g: f64, u: f64| (u + 1.0) * g / (1.0 + (-1.702 * g).exp());
    let close =
        |got: f32, want: f64| assert!((f64::from(got) - want).abs() <= 1e-6 * want.abs().max(1.0), "{got} vs {want}");
    close(f(0.5, -0.25), reference(0.5, -0.25));
    // gate is clamped above only, up on both sides.
    close(f(10.0, 0.5), reference(7.0, 0.5));
    close(f(-10.0, 0.5), reference(-10.0, 0.5));
    close(f(1.0, 100.0), reference(1.0, 7.0));
    close(f(1.0, -100.0), reference(1.0, -7.0));
}

#[test]
fn attention_sink_takes_probability_mass() {
    use super::attention::softmax_with_sink;
    let mut p = [1.0f32, 2.0, 3.0];
    softmax_with_sink(&mut p, 2.5);
    let z = libm::expf(1.0) + libm::expf(2.0) + libm::expf(3.0) + libm::expf(2.5);
    for (got, x) in p.iter().zip([1.0f32, 2.0, 3.0]) {
        assert!((got - libm::expf(x) / z).abs() < 1e-6);
    }
    let sum: f32 = p.iter().sum();
    assert!((sum - (1.0 - libm::expf(2.5) / z)).abs() < 1e-6 && sum < 1.0);
    // A very negative sink changes nothing measurable; a dominant one takes almost all.
    let mut q = [1.0f32, 2.0];
    softmax_with_sink(&mut q, -1e4);
    assert!((q[0] + q[1] - 1.0).abs() < 1e-6);
    softmax_with_sink(&mut q, 1e4);
    assert!(q.iter().all(|&v| v < 1e-6));
}

#[test]
fn sessions_default_to_a_capped_context() {
    use super::{DEFAULT_MAX_CONTEXT, SessionOptions};
    use crate::KvDtype;
    let mut c = config(8, 1e4);
    c.max_position_embeddings = 1 << 17;
    let opts = |max_context| SessionOptions { threads: 1, max_context, ..Default::default() };
    assert_eq!(SessionOptions::default().context_for(&c), DEFAULT_MAX_CONTEXT);
    assert_eq!(opts(usize::MAX).context_for(&c), 1 << 17);
    assert_eq!(opts(100).context_for(&c), 100);
    c.max_position_embeddings = 16;
    assert_eq!(SessionOptions::default().context_for(&c), 16);
    // 1 layer, 1 KV head of 8: keys and values, f32; f16 halves it; int8 is a byte per value
    // and a 4-byte scale per row.
    let kv = |dtype| crate::KvOptions { dtype, ..Default::default() };
    assert_eq!(c.kv_bytes_per_position(kv(KvDtype::F32)), 2 * 8 * 4);
    assert_eq!(c.kv_bytes_per_position(kv(KvDtype::F16)), 2 * 8 * 2);
    assert_eq!(c.kv_bytes_per_position(kv(KvDtype::Int8)), 2 * (8 + 4));
    assert_eq!(c.kv_cache_bytes(DEFAULT_MAX_CONTEXT, kv(KvDtype::F32)), 2 * 8 * 4 * DEFAULT_MAX_CONTEXT as u64);
    assert_eq!(c.kv_cache_bytes(usize::MAX, kv(KvDtype::F32)), u64::MAX);
}
