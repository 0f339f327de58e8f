//! The seam between a model and the hardware that runs it.
//!
//! A [`Target`] runs one sequence of one model: the CPU [`Session`] is the reference
//! implementation; GPU (`meo-wgpu`) and ONNX Runtime (`meo-ort`) targets implement the same
//! trait in their own crates. Every target passes the one conformance suite against the CPU
//! (`meo-tests`), so callers (the CLI, apps) treat them alike.
//!
//! Contract:
//! - [`Target::forward`] feeds tokens after the ones already fed and returns logits
//!   (`[T, vocab]` for [`Logits::All`], `[vocab]` for [`Logits::Last`]); on error nothing changed.
//! - Routing is reported through [`Trace`] exactly as the CPU reports it, when the target routes
//!   (a graph with routing compiled in, or a task-merged graph, may report none: say so in
//!   [`Target::describe`]).
//! - An op or mode the target cannot run is a [`TargetError::Unsupported`], never a panic or a
//!   silent fallback.

use crate::model::{ForwardError, Logits, MergeOptions, ModeError, Session, Trace};
use alloc::string::String;
use alloc::vec::Vec;

/// Why a target could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The input was refused (token out of range, context full); nothing changed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The routing mode could not be set.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// The target cannot run this model, op or mode (names which).
    #[error("{target}: unsupported: {what}")]
    Unsupported { target: String, what: String },
    /// The target does not run this layer's token mixer (a recurrent layer type).
    #[error("{target}: layer {layer}: the {} mixer is not supported by this target (the cpu target runs it)", mixer.name())]
    UnsupportedMixer { target: String, layer: usize, mixer: crate::config::Mixer },
    /// The device or its runtime failed (lost device, driver or library error).
    #[error("{target}: device error: {reason}")]
    Device { target: String, reason: String },
}

/// A backend running one sequence of a model. See the module docs for the contract.
pub trait Target {
    /// Short name of the target kind: `cpu`, `wgpu`, `ort`, `tract`.
    fn name(&self) -> &str;
    /// What it runs on, in words (adapter, execution providers, threads).
    fn describe(&self) -> String;
    /// Feeds `tokens` after those already fed; see the module docs.
    ///
    /// # Errors
    /// Refused input, or a device failure.
    fn forward(&mut self, tokens: &[u32], which: Logits, trace: &mut dyn Trace) -> Result<&[f32], TargetError>;
    /// Forgets the sequence (keeps the mode).
    fn reset(&mut self);
    /// Keeps only the first `len` positions (a no-op when `len >= position()`), e.g. to
    /// reuse the shared start of a conversation; returns false when the target cannot (the
    /// default, except for `len` 0, which is [`reset`](Self::reset)).
    fn truncate(&mut self, len: usize) -> bool {
        if len == 0 {
            self.reset();
            return true;
        }
        len >= self.position()
    }
    /// Tokens fed since the last reset.
    fn position(&self) -> usize;
    /// Most positions this target holds (a longer sequence is refused with
    /// [`ForwardError::ContextOverflow`]).
    fn max_context(&self) -> usize;
    /// Sets the routing mode (and resets the sequence); returns the layers that run merged.
    ///
    /// # Errors
    /// An invalid mode for this model, or one the target does not run.
    fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, TargetError>;
    /// Runs `tokens` as one whole new sequence (resetting it) and returns the final
    /// normalised hidden states `[T, hidden]` (an encoder's output; see [`Session::encode`]).
    /// Targets that do not implement it return [`TargetError::Unsupported`].
    ///
    /// # Errors
    /// Refused input, a device failure, or not implemented by this target.
    fn encode(&mut self, tokens: &[u32], trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        let _ = (tokens, trace);
        Err(TargetError::Unsupported { target: self.name().into(), what: "encode (encoder models)".into() })
    }
}

impl Target for Session<'_> {
    fn name(&self) -> &str {
        "cpu"
    }

    fn describe(&self) -> String {
        alloc::format!("cpu, {} threads", self.threads())
    }

    fn forward(&mut self, tokens: &[u32], which: Logits, trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        Ok(self.forward_with(tokens, which, trace)?)
    }

    fn reset(&mut self) {
        Session::reset(self);
    }

    fn truncate(&mut self, len: usize) -> bool {
        Session::truncate(self, len)
    }

    fn position(&self) -> usize {
        Session::position(self)
    }

    fn max_context(&self) -> usize {
        Session::max_context(self)
    }

    fn set_mode(&mut self, opts: MergeOptions) -> Result<Vec<usize>, TargetError> {
        Ok(Session::set_mode(self, opts)?)
    }

    fn encode(&mut self, tokens: &[u32], trace: &mut dyn Trace) -> Result<&[f32], TargetError> {
        Ok(Session::encode(self, tokens, trace)?)
    }
}
