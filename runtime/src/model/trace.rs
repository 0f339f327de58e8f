//! [`Trace`]: what a forward pass reports as it runs, in its own file because both the
//! session's layer loop and the feed-forward code (`ffn`) call it.

use super::bank::MergedUse;
use crate::route::Choice;

/// Observes routing as it happens, without the model knowing what is done with it
/// (dumps, prefetch, residency statistics). Both methods default to doing nothing.
pub trait Trace {
    /// Routing of MoE layer `layer` is known for every token of the current call: `experts`
    /// are the distinct experts selected (ascending). Called before any of them runs, so an
    /// implementation can prefetch their slabs ([`Model::expert_slab`]). In an MEO-native layer
    /// `b·E + e` stands for expert `e` of bank `b` ([`Model::bank_expert_slab`]), reported when a
    /// bank's experts are about to be merged or run unmerged.
    ///
    /// [`Model::expert_slab`]: super::Model::expert_slab
    /// [`Model::bank_expert_slab`]: super::Model::bank_expert_slab
    fn on_experts_selected(&mut self, _layer: usize, _experts: &[u32]) {}
    /// The choices of the token at absolute position `pos` (0 = first token since
    /// [`Session::reset`]) in MoE layer `layer`: `top_k` experts in ascending order with the
    /// weights their outputs are multiplied by (0 for a token dropped by capacity).
    ///
    /// [`Session::reset`]: super::Session::reset
    fn on_route(&mut self, _layer: usize, _pos: usize, _choices: &[Choice]) {}
    /// The input of MoE layer `layer` (the normalised hidden states, `[T, hidden]`, the
    /// router's input) for the tokens at positions `pos0..pos0 + T`, before the layer runs.
    fn on_moe_input(&mut self, _layer: usize, _pos0: usize, _x: &[f32]) {}
    /// Whether this observer wants next-layer predictions ([`on_experts_predicted`]); the
    /// session computes them only then (one extra router product per MoE layer).
    ///
    /// [`on_experts_predicted`]: Self::on_experts_predicted
    fn wants_prediction(&self) -> bool {
        false
    }
    /// Before MoE layer `from` runs, the experts MoE layer `layer` (the next one that runs
    /// routed experts) is predicted to select: `layer`'s router applied to `from`'s router
    /// input, distinct and ascending, in the numbering of
    /// [`on_experts_selected`](Self::on_experts_selected). Advice only: what `layer` then
    /// selects is reported as usual and is never changed by it.
    fn on_experts_predicted(&mut self, _from: usize, _layer: usize, _experts: &[u32]) {}
    /// Which experts of MoE layer `layer` are resident now: sets `resident[e]` for each of its
    /// experts (the vector is resized to their number) and returns true, or returns false when
    /// this observer does not know (the layer then runs exact). Asked only by a session with an
    /// on-miss fallback ([`OnMiss`](super::OnMiss)), before the layer's experts run and before
    /// [`on_experts_selected`](Self::on_experts_selected).
    fn resident_experts(&mut self, _layer: usize, _resident: &mut alloc::vec::Vec<bool>) -> bool {
        false
    }
    /// Under an on-miss fallback, MoE layer `layer` served `choices` token choices of the
    /// experts `missed` (distinct, ascending; not resident) by the fallback instead: fetch them
    /// for later tokens. [`on_experts_selected`](Self::on_experts_selected) then reports only
    /// the experts that run.
    fn on_fallback(&mut self, _layer: usize, _missed: &[u32], _choices: usize) {}
    /// MoE layer `layer` ran merged for `tokens` tokens, reading `expert` (no routing, no
    /// per-expert slab).
    fn on_merged(&mut self, _layer: usize, _tokens: usize, _expert: &MergedUse) {}
}

/// A [`Trace`] that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTrace;

impl Trace for NoTrace {}
