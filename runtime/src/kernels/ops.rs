//! Element-wise and row-wise ops, all f32 (math through `libm`, so they work without `std`).

/// `out = w ⊙ x / sqrt(mean(x²) + eps)` (the mean accumulated in f64, the rest f32, as
/// transformers' `RMSNorm` computes it in f32 with an accurate reduction).
///
/// # Panics
/// If the three lengths differ (caller bug).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == w.len() && x.len() == out.len(), "rmsnorm: lengths differ");
    let inv = inv_rms(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// [`rmsnorm`] in place.
pub fn rmsnorm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    assert!(x.len() == w.len(), "rmsnorm: lengths differ");
    let inv = inv_rms(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (ss / x.len().max(1) as f64) as f32;
    1.0 / libm::sqrtf(mean + eps)
}

/// Softmax of `x` in place (max-subtracted). An all `-inf` row becomes all zeros.
pub fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = libm::expf(*v - m);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

/// `y += x`.
pub fn add_into(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// Rotary embedding, rotate-half (non-interleaved) convention, on one head vector `x`
/// (`head_dim` values): for `i < d/2`, with `c = cos[i]`, `s = sin[i]`,
/// `x[i] ← x[i]·c − x[i+d/2]·s` and `x[i+d/2] ← x[i+d/2]·c + x[i]·s`.
/// `cos`/`sin` hold `d/2` values for the token's position.
pub fn rope_rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half.min(cos.len()) {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Rotary embedding, interleaved convention (DeepSeek), on one head vector `x`: for
/// `i < d/2`, with `c = cos[i]`, `s = sin[i]`, `x[2i] ← x[2i]·c − x[2i+1]·s` and
/// `x[2i+1] ← x[2i+1]·c + x[2i]·s`. transformers' `apply_rotary_pos_emb_interleave` writes the
/// same values de-interleaved (evens, then odds) into q and k alike, which leaves every q·k
/// unchanged.
pub fn rope_rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (p, (&c, &s)) in x.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
        let (x1, x2) = (p[0], p[1]);
        p[0] = x1 * c - x2 * s;
        p[1] = x2 * c + x1 * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_unit_weights_gives_unit_rms() {
        let x = [3.0, -4.0, 0.0, 1.0];
        let mut o = [0.0; 4];
        rmsnorm(&x, &[1.0; 4], 0.0, &mut o);
        let ms: f32 = o.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one_and_handles_masked_rows() {
        let mut x = [1.0, 2.0, f32::NEG_INFINITY];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6 && x[2] == 0.0);
        let mut m = [f32::NEG_INFINITY; 2];
        softmax_in_place(&mut m);
        assert_eq!(m, [0.0, 0.0]);
    }

    #[test]
    fn rope_at_angle_zero_is_identity_and_preserves_norm() {
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rope_rotate_half(&mut x, &[1.0, 1.0], &[0.0, 0.0]);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        let (c, s) = (libm::cosf(0.7), libm::sinf(0.7));
        rope_rotate_half(&mut x, &[c, 1.0], &[s, 0.0]);
        assert!((x[0] - (c - 3.0 * s)).abs() < 1e-6 && (x[2] - (3.0 * c + s)).abs() < 1e-6);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }

    #[test]
    fn rope_pairs_rotate_adjacent_dimensions() {
        // Pair 0 = (x0, x1) by 0.7, pair 1 = (x2, x3) by angle 0: a plain 2-D rotation each.
        let mut x = [1.0, 2.0, 3.0, 4.0];
        let (c, s) = (libm::cosf(0.7), libm::sinf(0.7));
        rope_rotate_pairs(&mut x, &[c, 1.0], &[s, 0.0]);
        assert!((x[0] - (c - 2.0 * s)).abs() < 1e-6 && (x[1] - (2.0 * c + s)).abs() < 1e-6);
        assert_eq!(x[2..], [3.0, 4.0]);
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
