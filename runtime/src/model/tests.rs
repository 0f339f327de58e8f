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
