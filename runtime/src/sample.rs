//! Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded RNG.
//!
//! `no_std` + `alloc`. The pipeline follows Hugging Face `generate`'s order: logits are
//! divided by the temperature, the `top_k` best are kept, then the smallest set of those whose
//! probabilities sum to at least `top_p`, and one token is drawn from the renormalised
//! probabilities. Temperature 0 (or `top_k = 1`) is greedy: the highest logit, ties to the
//! lowest id, no random number drawn. So is any temperature below [`MIN_TEMPERATURE`]
//! (subnormals included): there `1/T` overflows, or scales ordinary logits past f32's range,
//! and the draw would turn uniform over the overflowed logits instead of greedy.
//!
//! The generator is PCG32 (PCG-XSH-RR 64/32, M. E. O'Neill, "PCG: A Family of Simple Fast
//! Space-Efficient Statistically Good Algorithms for Random Number Generation", 2014), its
//! state and stream seeded from the user's `u64` through SplitMix64 (Steele, Lea, Flood 2014).
//! Same seed, same logits → same tokens, on every platform.

use alloc::vec::Vec;

/// An invalid sampling setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("no logits to sample from")]
    Empty,
}

/// Temperatures in `(0, MIN_TEMPERATURE)` are treated as 0 (greedy); see the module docs.
pub const MIN_TEMPERATURE: f32 = 1e-6;

/// SplitMix64: one step. Used to spread a user seed over PCG32's state and stream.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// PCG32 (PCG-XSH-RR with 64-bit state, 32-bit output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    const MULT: u64 = 6_364_136_223_846_793_005;

    /// The reference `pcg32_srandom_r(initstate, initseq)`.
    pub fn new(initstate: u64, initseq: u64) -> Self {
        let mut r = Self { state: 0, inc: (initseq << 1) | 1 };
        r.next_u32();
        r.state = r.state.wrapping_add(initstate);
        r.next_u32();
        r
    }

    /// A generator whose state and stream both derive from `seed` (through SplitMix64).
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut s = seed;
        let a = splitmix64(&mut s);
        let b = splitmix64(&mut s);
        Self::new(a, b)
    }

    /// Next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MULT).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in `[0, 1)` with 24 random bits (every value exactly representable).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// Sampling settings. The default is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy (so is anything below [`MIN_TEMPERATURE`]). Logits are divided by it
    /// before the softmax. Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 = no limit.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to at least `top_p`; 1 = no limit.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplerConfig {
    /// Checks the ranges (temperature finite and ≥ 0, top-p in (0, 1]).
    ///
    /// # Errors
    /// The first out-of-range setting.
    pub fn validate(&self) -> Result<(), SampleError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SampleError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SampleError::TopP(self.top_p));
        }
        Ok(())
    }

    /// True when sampling always picks the highest logit: temperature below
    /// [`MIN_TEMPERATURE`] (0 included), or `top_k = 1`.
    pub fn is_greedy(&self) -> bool {
        self.temperature < MIN_TEMPERATURE || self.top_k == 1
    }
}

/// The index of the highest logit, ties to the lowest index; NaN never wins (index 0 if all
/// are NaN).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && (!found || v > best_v) {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

/// Draws token ids from logits; owns its RNG and scratch space (no allocation after the first
/// call for a given vocabulary size).
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Pcg32,
    /// (scaled logit, then probability; token id)
    cand: Vec<(f32, u32)>,
}

/// `a` ranks before `b`: higher value, then lower id.
fn ranks_before(a: &(f32, u32), b: &(f32, u32)) -> core::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl Sampler {
    /// A sampler for `cfg`, its RNG seeded with `cfg.seed`.
    ///
    /// # Errors
    /// `cfg` is out of range (see [`SamplerConfig::validate`]).
    pub fn new(cfg: SamplerConfig) -> Result<Self, SampleError> {
        cfg.validate()?;
        Ok(Self { cfg, rng: Pcg32::seed_from_u64(cfg.seed), cand: Vec::new() })
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Picks the next token from one row of logits.
    ///
    /// # Errors
    /// `logits` is empty.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SampleError> {
        if logits.is_empty() {
            return Err(SampleError::Empty);
        }
        if self.cfg.is_greedy() {
            return Ok(argmax(logits));
        }
        let inv_t = 1.0 / self.cfg.temperature;
        self.cand.clear();
        // NaN and -inf logits have probability 0: leave them out.
        self.cand.extend(logits.iter().enumerate().filter(|(_, v)| !v.is_nan() && **v != f32::NEG_INFINITY).map(
            |(i, &v)| {
                // +inf / t stays +inf; the softmax below treats the max specially.
                (v * inv_t, i as u32)
            },
        ));
        if self.cand.is_empty() {
            return Ok(argmax(logits));
        }
        let k = if self.cfg.top_k == 0 { self.cand.len() } else { self.cfg.top_k.min(self.cand.len()) };
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, ranks_before);
            self.cand.truncate(k);
        }
        let need_sorted = self.cfg.top_p < 1.0;
        if need_sorted {
            self.cand.sort_unstable_by(ranks_before);
        }
        // Softmax over the candidates.
        let m = self.cand.iter().fold(f32::NEG_INFINITY, |a, c| a.max(c.0));
        let mut sum = 0.0f32;
        for c in &mut self.cand {
            c.0 = if m == f32::INFINITY { if c.0 == f32::INFINITY { 1.0 } else { 0.0 } } else { libm::expf(c.0 - m) };
            sum += c.0;
        }
        for c in &mut self.cand {
            c.0 /= sum;
        }
        if need_sorted {
            // Smallest prefix (by descending probability) whose mass reaches top_p; at least one.
            let mut cum = 0.0f32;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += c.0;
                if cum >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep);
        }
        if self.cand.len() == 1 {
            return Ok(self.cand[0].1);
        }
        let total: f32 = self.cand.iter().map(|c| c.0).sum();
        let u = self.rng.next_f32() * total;
        let mut acc = 0.0f32;
        for c in &self.cand {
            acc += c.0;
            if u < acc {
                return Ok(c.1);
            }
        }
        // Rounding left u at or above the last sum: the last candidate with mass.
        Ok(self.cand.iter().rev().find(|c| c.0 > 0.0).unwrap_or(&self.cand[0]).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplerConfig {
        SamplerConfig { temperature, top_k, top_p, seed }
    }

    fn logits(n: usize, salt: u64) -> Vec<f32> {
        let mut s = salt;
        (0..n).map(|_| (splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0).collect()
    }

    #[test]
    fn pcg32_matches_reference_vector() {
        // pcg32-demo.c: pcg32_srandom_r(&rng, 42u, 54u) then six pcg32_random_r calls.
        let mut r = Pcg32::new(42, 54);
        let got: Vec<u32> = (0..6).map(|_| r.next_u32()).collect();
        assert_eq!(got, [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]);
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_ties() {
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, 1.0, 3.0]).unwrap(), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        for salt in 0..20 {
            let l = logits(300, salt);
            let mut g = Sampler::new(SamplerConfig::default()).unwrap();
            let mut k1 = Sampler::new(cfg(1.3, 1, 0.9, salt)).unwrap();
            assert_eq!(k1.sample(&l).unwrap(), g.sample(&l).unwrap());
        }
    }

    #[test]
    fn same_seed_same_output_different_seed_differs() {
        let rows: Vec<Vec<f32>> = (0..64).map(|i| logits(200, i)).collect();
        let run = |seed| {
            let mut s = Sampler::new(cfg(1.0, 50, 0.95, seed)).unwrap();
            rows.iter().map(|l| s.sample(l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_keeps_the_minimal_set() {
        // Probabilities ≈ [0.5, 0.25, 0.125, 0.0625, …]: top-p 0.7 needs exactly the first two.
        let l: Vec<f32> = (0..8).map(|i| -(i as f32) * core::f32::consts::LN_2).collect();
        let mut s = Sampler::new(cfg(1.0, 0, 0.7, 3)).unwrap();
        let mut seen = [0u32; 8];
        for _ in 0..2000 {
            seen[s.sample(&l).unwrap() as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert!(seen[2..].iter().all(|&n| n == 0), "{seen:?}");
        // Renormalised over the two kept: 2/3 vs 1/3.
        let frac = f64::from(seen[0]) / 2000.0;
        assert!((frac - 2.0 / 3.0).abs() < 0.05, "{frac}");
        // A top-p the first token alone reaches keeps only it.
        let mut s = Sampler::new(cfg(1.0, 0, 0.5, 3)).unwrap();
        assert!((0..200).all(|_| s.sample(&l).unwrap() == 0));
    }

    #[test]
    fn top_k_restricts_support() {
        let l = logits(100, 99);
        let mut order: Vec<u32> = (0..100).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let mut s = Sampler::new(cfg(5.0, 3, 1.0, 1)).unwrap();
        let mut seen = [false; 100];
        for _ in 0..500 {
            seen[s.sample(&l).unwrap() as usize] = true;
        }
        let got: Vec<u32> = (0..100).filter(|&i| seen[i as usize]).collect();
        let mut want = order[..3].to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn masked_logits_are_never_drawn() {
        let l = [f32::NEG_INFINITY, 0.0, f32::NAN, 0.0];
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 11)).unwrap();
        for _ in 0..200 {
            let t = s.sample(&l).unwrap();
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn invalid_settings_rejected() {
        assert_eq!(Sampler::new(cfg(-1.0, 0, 1.0, 0)).unwrap_err(), SampleError::Temperature(-1.0));
        assert!(matches!(Sampler::new(cfg(1.0, 0, 0.0, 0)), Err(SampleError::TopP(_))));
        assert!(matches!(Sampler::new(cfg(f32::NAN, 0, 1.0, 0)), Err(SampleError::Temperature(_))));
        assert!(matches!(Sampler::new(cfg(f32::INFINITY, 0, 1.0, 0)), Err(SampleError::Temperature(_))));
        assert!(matches!(Sampler::new(cfg(-0.0001, 0, 1.0, 0)), Err(SampleError::Temperature(_))));
        for p in [f32::NAN, -0.5, 1.0001, f32::INFINITY] {
            assert!(matches!(Sampler::new(cfg(1.0, 0, p, 0)), Err(SampleError::TopP(_))), "{p}");
        }
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert_eq!(s.sample(&[]), Err(SampleError::Empty));
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        // 1e-45 is subnormal: 1/T is +inf, and before the fix every positive logit became +inf
        // and shared the mass uniformly.
        for t in [1e-45f32, f32::MIN_POSITIVE, 1e-30, 1e-7] {
            for salt in 0..20 {
                let l = logits(300, salt);
                let mut s = Sampler::new(cfg(t, 0, 1.0, salt)).unwrap();
                assert_eq!(s.sample(&l).unwrap(), argmax(&l), "T = {t:e}, salt {salt}");
                assert!(s.config().is_greedy());
            }
        }
        assert!(!cfg(MIN_TEMPERATURE, 0, 1.0, 0).is_greedy());
    }
}
