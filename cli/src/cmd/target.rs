//! `--target ort [--ep LIST]` for `meo run` and `meo bench`: the same loop over any
//! [`meo::Target`] (here the ONNX Runtime one; the CPU keeps its own, richer path).

#[cfg(not(feature = "ort"))]
use anyhow::{Result, bail};

/// The `--target` flags (shared with the GPU target).
pub use super::gpu::TargetArgs;

#[cfg(not(feature = "ort"))]
const NO_ORT: &str =
    "this meo was built without ONNX Runtime support: rebuild with `cargo build --release -p meo-cli --features ort`";

/// `meo run --target ort`.
///
/// # Errors
/// Always: this build has no ONNX Runtime support.
#[cfg(not(feature = "ort"))]
pub fn run_ort(_: &super::run::Args, _: &mut dyn std::io::Write, _: &mut dyn std::io::Write) -> Result<()> {
    bail!(NO_ORT)
}

/// `meo bench --target ort`.
///
/// # Errors
/// Always: this build has no ONNX Runtime support.
#[cfg(not(feature = "ort"))]
pub fn bench_ort(_: &super::bench::Args) -> Result<()> {
    bail!(NO_ORT)
}

#[cfg(feature = "ort")]
pub use with_ort::{bench_ort, run_ort};

#[cfg(feature = "ort")]
mod with_ort {
    use super::super::run::open_model;
    use super::TargetArgs;
    use anyhow::{Context, Result, bail};
    use meo::sample::{Pcg32, Sampler, SamplerConfig, argmax};
    use meo::tokenizer::Tokenizer;
    use meo::{Logits, NoTrace, Session, SessionOptions, Target};
    use meo_ort::{EpChoice, OrtOptions, OrtTarget, WeightFormat};
    use serde_json::json;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn open<'m>(
        model: &'m meo::Model,
        a: &TargetArgs,
        threads: usize,
        mode: meo::MergeOptions,
    ) -> Result<OrtTarget<'m>> {
        let eps = EpChoice::parse_list(&a.ep)?;
        let weights = WeightFormat::parse(&a.onnx_weights)
            .with_context(|| format!("--onnx-weights {:?}: use block, channel or f32", a.onnx_weights))?;
        let static_shape = match &a.onnx_static_shape {
            Some(s) => Some(
                meo_ort::export::StaticShape::parse(s)
                    .with_context(|| format!("--onnx-static-shape {s:?}: use SEQ:CONTEXT, both ≥ 1 (e.g. 1:512)"))?,
            ),
            None => None,
        };
        let opts = OrtOptions { eps, threads, weights, profile: a.ep_report, static_shape };
        Ok(OrtTarget::with_mode(model, opts, mode)?)
    }

    fn placement(t: &mut OrtTarget<'_>, out: &mut dyn Write) -> Result<()> {
        for (ep, nodes) in t.node_placement()? {
            writeln!(out, "ep {ep}: {} nodes", nodes.len())?;
        }
        Ok(())
    }

    fn rate(n: usize, d: Duration) -> f64 {
        if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
    }

    /// Prompt then `gen` greedy steps on `t`; (prompt time, decode time, generated ids).
    fn timed(t: &mut dyn Target, prompt: &[u32], gen_tokens: usize) -> Result<(Duration, Duration, Vec<u32>)> {
        t.reset();
        let t0 = Instant::now();
        let mut next = argmax(t.forward(prompt, Logits::Last, &mut NoTrace)?);
        let prompt_time = t0.elapsed();
        let mut out = vec![next];
        let t1 = Instant::now();
        for _ in 0..gen_tokens {
            next = argmax(t.forward(&[next], Logits::Last, &mut NoTrace)?);
            out.push(next);
        }
        Ok((prompt_time, t1.elapsed(), out))
    }

    /// `meo run --target ort`: prompt, then sample (as `meo run`) on ONNX Runtime.
    ///
    /// # Errors
    /// As `meo run`, or the ONNX Runtime target could not start.
    pub fn run_ort(a: &super::super::run::Args, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<()> {
        let sampling = SamplerConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
        let mut sampler = Sampler::new(sampling)?;
        let model = open_model(&a.file)?;
        let cfg = model.config().clone();
        let (tokenizer, prompt) = super::super::run::prompt_tokens(a, &model)?;
        let t_open = Instant::now();
        let mut t = open(&model, &a.target, a.threads, a.mode.options(&model)?)?;
        if a.stats {
            writeln!(
                stderr,
                "target: {} (exported and opened in {:.1} ms)",
                t.describe(),
                t_open.elapsed().as_secs_f64() * 1e3
            )?;
        }
        let t0 = Instant::now();
        let mut next = sampler.sample(t.forward(&prompt, Logits::Last, &mut NoTrace)?)?;
        let prompt_time = t0.elapsed();
        let eos: Vec<u32> = cfg.eos_token_ids.iter().filter_map(|&e| u32::try_from(e).ok()).collect();
        let mut generated = Vec::new();
        let mut text = tokenizer.as_ref().map(Tokenizer::stream);
        let (mut decode_time, mut steps) = (Duration::ZERO, 0usize);
        for i in 0..a.max_new_tokens {
            generated.push(next);
            let is_eos = eos.contains(&next);
            if let Some(s) = text.as_mut()
                && !is_eos
                && let Some(piece) = s.push(next)?
            {
                stdout.write_all(piece.as_bytes())?;
                stdout.flush()?;
            }
            if is_eos || i + 1 == a.max_new_tokens || t.position() >= cfg.max_position_embeddings {
                break;
            }
            let t1 = Instant::now();
            next = sampler.sample(t.forward(&[next], Logits::Last, &mut NoTrace)?)?;
            decode_time += t1.elapsed();
            steps += 1;
        }
        match text {
            Some(s) => {
                if let Some(rest) = s.finish()? {
                    stdout.write_all(rest.as_bytes())?;
                }
                writeln!(stdout)?;
            }
            None => {
                let ids: Vec<String> = generated.iter().map(u32::to_string).collect();
                writeln!(stdout, "{}", ids.join(" "))?;
            }
        }
        if a.stats {
            let n = prompt.len();
            writeln!(
                stderr,
                "prompt: {n} tokens in {:.3} s ({:.1} tokens/s)",
                prompt_time.as_secs_f64(),
                rate(n, prompt_time)
            )?;
            writeln!(
                stderr,
                "decode: {steps} tokens in {:.3} s ({:.1} tokens/s)",
                decode_time.as_secs_f64(),
                rate(steps, decode_time)
            )?;
        }
        if a.target.ep_report {
            placement(&mut t, stderr)?;
        }
        Ok(())
    }

    /// `meo bench --target ort [--compare-cpu]`.
    ///
    /// # Errors
    /// As `meo bench`, or the ONNX Runtime target could not start.
    pub fn bench_ort(a: &super::super::bench::Args) -> Result<()> {
        if a.prompt_len == 0 {
            bail!("--prompt-len must be at least 1");
        }
        let model = open_model(&a.file)?;
        let cfg = model.config().clone();
        if cfg.max_position_embeddings > 0 && a.prompt_len + a.gen_tokens > cfg.max_position_embeddings {
            bail!(
                "--prompt-len + --gen = {} exceeds the context of {}",
                a.prompt_len + a.gen_tokens,
                cfg.max_position_embeddings
            );
        }
        // The same seeded prompt as `meo bench` on the CPU.
        let mut rng = Pcg32::seed_from_u64(a.seed);
        let vocab = cfg.vocab_size as u64;
        let prompt: Vec<u32> = (0..a.prompt_len).map(|_| ((u64::from(rng.next_u32()) * vocab) >> 32) as u32).collect();
        let mode = a.mode.options(&model)?;
        let mut ort = open(&model, &a.target, a.threads, mode.clone())?;
        let (op, od, ogen) = timed(&mut ort, &prompt, a.gen_tokens)?;
        let cpu = if a.target.compare_cpu {
            let mut s = Session::new(&model, SessionOptions { threads: a.threads, ..SessionOptions::default() })?;
            s.set_mode(mode)?;
            let threads = s.threads();
            let (cp, cd, cgen) = timed(&mut s, &prompt, a.gen_tokens)?;
            Some((cp, cd, cgen, threads))
        } else {
            None
        };
        let agree = cpu.as_ref().map(|c| ogen.iter().zip(&c.2).take_while(|(x, y)| x == y).count());
        let mut out = std::io::stdout().lock();
        if a.json {
            let mut v = json!({
                "file": a.file.display().to_string(),
                "target": "ort",
                "describe": ort.describe(),
                "mode": mode_spelling(&a.mode, &model)?,
                "merged_layers": ort.info().merged,
                "prompt_tokens": a.prompt_len,
                "prompt_tokens_per_s": rate(a.prompt_len, op),
                "decode_tokens": a.gen_tokens,
                "decode_tokens_per_s": rate(a.gen_tokens, od),
            });
            if let Some((cp, cd, _, threads)) = &cpu {
                v["cpu"] = json!({
                    "threads": threads,
                    "prompt_tokens_per_s": rate(a.prompt_len, *cp),
                    "decode_tokens_per_s": rate(a.gen_tokens, *cd),
                    "greedy_tokens_agreeing_with_ort": agree,
                });
            }
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{}: {} ({} layers), mode {}",
                a.file.display(),
                cfg.architecture,
                cfg.num_layers,
                mode_spelling(&a.mode, &model)?
            )?;
            writeln!(out, "target: {}", ort.describe())?;
            writeln!(
                out,
                "ort prompt: {} tokens in {:.3} s = {:.1} tokens/s",
                a.prompt_len,
                op.as_secs_f64(),
                rate(a.prompt_len, op)
            )?;
            writeln!(
                out,
                "ort decode: {} tokens in {:.3} s = {:.1} tokens/s",
                a.gen_tokens,
                od.as_secs_f64(),
                rate(a.gen_tokens, od)
            )?;
            if let Some((cp, cd, _, threads)) = &cpu {
                writeln!(out, "cpu ({threads} threads) prompt: {:.1} tokens/s", rate(a.prompt_len, *cp))?;
                writeln!(out, "cpu ({threads} threads) decode: {:.1} tokens/s", rate(a.gen_tokens, *cd))?;
                writeln!(out, "greedy tokens agreeing (from the first): {} of {}", agree.unwrap_or(0), ogen.len())?;
            }
        }
        if a.target.ep_report {
            placement(&mut ort, &mut out)?;
        }
        Ok(())
    }

    fn mode_spelling(m: &super::super::mode::ModeArgs, model: &meo::Model) -> Result<String> {
        Ok(m.options(model)?.mode.spelling())
    }
}
