//! Choosing the next token from logits: penalties, greedy, temperature, top-k, top-p, min-p,
//! with a seeded RNG.
//!
//! `no_std` + `alloc`. The pipeline follows Hugging Face `generate`'s order: the repetition
//! penalty first (a logit `l` of a token seen in the history becomes `l / r` if positive,
//! `l · r` otherwise), then OpenAI's presence and frequency penalties (`l − presence − count ·
//! frequency` for a token seen `count` times); logits are divided by the temperature, the
//! `top_k` best are kept, then the smallest set of those whose probabilities sum to at least
//! `top_p`, then those whose probability is at least `min_p` times the most likely one's, and
//! one token is drawn from the renormalised probabilities.
//!
//! The history the penalties count is every token [`Sampler::observe`]d (the generation loop
//! observes each token it feeds: the prompt, then each generated token) since
//! [`Sampler::clear_history`], or its last [`SamplerConfig::penalty_last_n`] tokens. Temperature 0 (or `top_k = 1`) is greedy: the highest logit, ties to the
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
    #[error("min-p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("the repetition penalty must be a finite number > 0 (1 = none), got {0}")]
    RepetitionPenalty(f32),
    #[error("the {which} penalty must be a finite number (0 = none), got {value}")]
    Penalty { which: &'static str, value: f32 },
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
    /// Keep only tokens whose probability is at least `min_p` times the most likely token's;
    /// 0 = no limit. In `[0, 1]`.
    pub min_p: f32,
    /// Hugging Face's repetition penalty over the history: 1 = none; > 1 discourages repeats.
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token in the
    /// history; 0 = none.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per occurrence in the
    /// history; 0 = none.
    pub frequency_penalty: f32,
    /// How many of the most recent history tokens the penalties count; 0 = all of them.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Checks the ranges (temperature finite and ≥ 0, top-p in (0, 1], min-p in [0, 1],
    /// repetition penalty finite and > 0, presence and frequency penalties finite).
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
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SampleError::MinP(self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SampleError::RepetitionPenalty(self.repetition_penalty));
        }
        for (which, value) in [("presence", self.presence_penalty), ("frequency", self.frequency_penalty)] {
            if !value.is_finite() {
                return Err(SampleError::Penalty { which, value });
            }
        }
        Ok(())
    }

    /// True when some penalty changes the logits of tokens in the history.
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
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
    /// Tokens observed (see the module docs), at most `penalty_last_n` of them when that is set.
    history: Vec<u32>,
    /// The logits with penalties applied.
    penalized: Vec<f32>,
    /// (token, occurrences) of the history, sorted by token.
    counts: Vec<(u32, u32)>,
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
        Ok(Self {
            cfg,
            rng: Pcg32::seed_from_u64(cfg.seed),
            cand: Vec::new(),
            history: Vec::new(),
            penalized: Vec::new(),
            counts: Vec::new(),
        })
    }

    /// New settings (the RNG reseeded from `cfg.seed`), keeping the history.
    ///
    /// # Errors
    /// `cfg` is out of range; the sampler is unchanged then.
    pub fn reconfigure(&mut self, cfg: SamplerConfig) -> Result<(), SampleError> {
        cfg.validate()?;
        self.cfg = cfg;
        self.rng = Pcg32::seed_from_u64(cfg.seed);
        self.trim_history();
        Ok(())
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Adds tokens fed to the model to the history the penalties count.
    pub fn observe(&mut self, tokens: &[u32]) {
        self.history.extend_from_slice(tokens);
        self.trim_history();
    }

    /// Forgets the history (a new sequence).
    pub fn clear_history(&mut self) {
        self.history.clear();
    }

    /// The history the penalties count (oldest first).
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    fn trim_history(&mut self) {
        let n = self.cfg.penalty_last_n;
        if n > 0 && self.history.len() > n {
            let cut = self.history.len() - n;
            self.history.drain(..cut);
        }
    }

    /// Writes `logits` with the penalties applied to the history's tokens into `out` (ids
    /// past the end of `logits` are ignored).
    fn penalize(&mut self, logits: &[f32], out: &mut Vec<f32>) {
        self.counts.clear();
        self.counts.extend(self.history.iter().map(|&t| (t, 1)));
        self.counts.sort_unstable_by_key(|c| c.0);
        self.counts.dedup_by(|b, a| {
            let same = a.0 == b.0;
            if same {
                a.1 += b.1;
            }
            same
        });
        out.clear();
        out.extend_from_slice(logits);
        let (r, pres, freq) = (self.cfg.repetition_penalty, self.cfg.presence_penalty, self.cfg.frequency_penalty);
        for &(t, n) in &self.counts {
            let Some(l) = out.get_mut(t as usize) else { continue };
            if r != 1.0 {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
            *l -= pres + freq * n as f32;
        }
    }

    /// Picks the next token from one row of logits (the penalties applied first).
    ///
    /// # Errors
    /// `logits` is empty.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SampleError> {
        if logits.is_empty() {
            return Err(SampleError::Empty);
        }
        if !self.cfg.penalizes() || self.history.is_empty() {
            return self.draw(logits);
        }
        let mut buf = core::mem::take(&mut self.penalized);
        self.penalize(logits, &mut buf);
        let r = self.draw(&buf);
        self.penalized = buf;
        r
    }

    fn draw(&mut self, logits: &[f32]) -> Result<u32, SampleError> {
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
        let need_sorted = self.cfg.top_p < 1.0 || self.cfg.min_p > 0.0;
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
            // min-p: probability at least min_p times the most likely one's (the first, sorted).
            let floor = self.cfg.min_p * self.cand[0].0;
            let keep = self.cand.iter().take_while(|c| c.0 >= floor).count().max(1);
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
        SamplerConfig { temperature, top_k, top_p, seed, ..SamplerConfig::default() }
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

    #[test]
    fn min_p_keeps_tokens_near_the_best() {
        // Probabilities ∝ [1, 1/2, 1/4, 1/8, …]: min-p 0.3 keeps the first two.
        let l: Vec<f32> = (0..8).map(|i| -(i as f32) * core::f32::consts::LN_2).collect();
        let mut s = Sampler::new(SamplerConfig { min_p: 0.3, ..cfg(1.0, 0, 1.0, 5) }).unwrap();
        let mut seen = [0u32; 8];
        for _ in 0..1000 {
            seen[s.sample(&l).unwrap() as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2..].iter().all(|&n| n == 0), "{seen:?}");
        assert!(matches!(
            Sampler::new(SamplerConfig { min_p: 1.5, ..SamplerConfig::default() }),
            Err(SampleError::MinP(_))
        ));
    }

    #[test]
    fn penalties_follow_hf_and_openai() {
        let l = [2.0f32, -1.0, 1.5, 0.5];
        // Repetition: token 0 (positive) divided, token 1 (negative) multiplied.
        let mut s = Sampler::new(SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::default() }).unwrap();
        let mut out = Vec::new();
        s.observe(&[0, 1, 0]);
        s.penalize(&l, &mut out);
        assert_eq!(out, [1.0, -2.0, 1.5, 0.5]);
        // Greedy sees the penalised logits: 2.0 / 2 < 1.5.
        assert_eq!(s.sample(&l).unwrap(), 2);
        // Presence once per seen token, frequency per occurrence; ids past the vocabulary ignored.
        let c = SamplerConfig { presence_penalty: 0.25, frequency_penalty: 0.5, ..SamplerConfig::default() };
        let mut s = Sampler::new(c).unwrap();
        s.observe(&[0, 0, 3, 99]);
        s.penalize(&l, &mut out);
        assert_eq!(out, [2.0 - 0.25 - 1.0, -1.0, 1.5, 0.5 - 0.25 - 0.5]);
        // The window: only the last token counts.
        let mut s = Sampler::new(SamplerConfig { penalty_last_n: 1, ..c }).unwrap();
        s.observe(&[0, 0, 3]);
        assert_eq!(s.history(), [3]);
        s.clear_history();
        assert_eq!(s.sample(&l).unwrap(), 0);
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let c = SamplerConfig { repetition_penalty: bad, ..SamplerConfig::default() };
            assert!(matches!(Sampler::new(c), Err(SampleError::RepetitionPenalty(_))), "{bad}");
        }
        let c = SamplerConfig { frequency_penalty: f32::NAN, ..SamplerConfig::default() };
        assert!(matches!(Sampler::new(c), Err(SampleError::Penalty { which: "frequency", .. })));
    }

    #[test]
    fn reconfigure_keeps_the_history_and_reseeds() {
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 1)).unwrap();
        s.observe(&[1, 2, 3]);
        let rows: Vec<Vec<f32>> = (0..16).map(|i| logits(50, i)).collect();
        let a: Vec<u32> = rows.iter().map(|l| s.sample(l).unwrap()).collect();
        s.reconfigure(cfg(1.0, 0, 1.0, 1)).unwrap();
        let b: Vec<u32> = rows.iter().map(|l| s.sample(l).unwrap()).collect();
        assert_eq!(a, b);
        assert_eq!(s.history(), [1, 2, 3]);
        assert!(s.reconfigure(cfg(-1.0, 0, 1.0, 1)).is_err());
        assert_eq!(s.config().temperature, 1.0);
    }
}
