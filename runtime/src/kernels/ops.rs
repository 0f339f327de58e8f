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
    // Two loops: the first vectorises; the sum keeps its sequential order.
    x.iter_mut().for_each(|v| *v = exp(*v - m));
    let sum = x.iter().fold(0.0f32, |a, &b| a + b);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x · sigmoid(x)`, with [`exp`].
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `g[i] = silu(g[i]) · u[i]`: the SiLU-gated activation over a chunk (vectorised: [`exp`] has
/// no branches or calls).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = silu(*a) * b;
    }
}

/// `eˣ` within 2 ulp for |x| ≤ 87 (Cephes' `expf`: x = n·ln2 + r, a degree-6 polynomial in r,
/// 2ⁿ from the exponent bits). Below −87.3 (eˣ < 1.2e−38) it is 0, so `exp(−∞) = 0`; above
/// 88.3 it is e^88.3 (finite). Branch-free, so loops over it vectorise; libm's `expf` is a call
/// per element and was ~5 % of prompt processing in SiLU alone.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let under = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    // ln 2 in two parts, so n·ln2 is exact enough for r.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let e = y * f32::from_bits(((k + 127) as u32) << 23);
    if under { 0.0 } else { e }
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
        // exp within 2 ulp of the correctly rounded value over the range SiLU and softmax use.
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max(((exp(x) as f64 - want) / ulp as f64).abs());
        }
        assert!(worst <= 2.0, "exp: {worst} ulp");
        assert!(exp(f32::NEG_INFINITY) == 0.0 && exp(-1000.0) == 0.0 && exp(1000.0).is_finite());
        assert!(silu(-1000.0) <= 0.0 && silu(-1000.0) > -1e-30);
        assert_eq!(silu(1000.0), 1000.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
