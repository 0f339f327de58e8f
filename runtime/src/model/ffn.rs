//! Feed-forward blocks: the SiLU-gated MLP (dense layers, shared experts, routed experts)
//! and the mixture-of-experts block around it.

use super::plan::{Mlp, MoePlan};
use super::trace::Trace;
use crate::config::{Activation, RouterSpec, SharedGate};
use crate::kernels::{
    Acts, Gemv, MatRef, Parallel, Serial, gemv_many, matmul, matmul_acts, matmul_glu, silu, silu_mul,
};
use crate::route::{Choice, RouteScratch, apply_capacity, route_token};
use alloc::vec::Vec;

/// Reusable buffers of the feed-forward blocks.
#[derive(Debug, Default)]
pub(crate) struct FfnScratch {
    mlp: MlpScratch,
    logits: Vec<f32>,
    bias: Vec<f32>,
    sel_bias: Vec<f32>,
    choices: Vec<Choice>,
    dropped: Vec<bool>,
    counts: Vec<usize>,
    route: RouteScratch,
    /// Per expert, the start of its entries in `assign` (counting sort by expert).
    starts: Vec<usize>,
    /// (token, weight) pairs grouped by expert, tokens ascending within an expert.
    assign: Vec<(usize, f32)>,
    selected: Vec<u32>,
    xs: Vec<f32>,
    ys: Vec<f32>,
    shared: Vec<f32>,
    shared_gate: Vec<f32>,
    /// On-miss fallback: which experts are resident, masked router logits, re-routed
    /// choices, which choices go to the merged expert, and the missed experts.
    resident: Vec<bool>,
    masked: Vec<f32>,
    rerouted: Vec<Choice>,
    to_merged: Vec<bool>,
    missed: Vec<u32>,
}

/// The on-miss fallback a routed layer runs with ([`super::OnMiss`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fallback<'a> {
    /// Route among the resident experts only.
    Resident,
    /// Run this merged expert (slab bytes, matrices) for missed choices, their gate times
    /// `inv_mass` (1 / the merge's mass: the stored merge's output carries it).
    Merged { bytes: &'a [u8], mlp: &'a Mlp, inv_mass: f32 },
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// The intermediate activations of an MLP, `[T, intermediate]`.
#[derive(Debug, Default)]
pub(crate) struct MlpScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    bias: Vec<f32>,
}

/// Adds `bias` (read from `bytes` into `tmp`) to every row of `rows`.
fn add_bias(bytes: &[u8], bias: &super::plan::Vector, tmp: &mut Vec<f32>, rows: &mut [f32]) {
    bias.read(bytes, tmp);
    for row in rows.chunks_mut(tmp.len().max(1)) {
        crate::kernels::add_into(row, tmp);
    }
}

/// `out[T, H] = down(act(gate(x), up(x)))`, or `down(act(up(x)))` for an ungated MLP (plus
/// the biases, when the MLP has them), with matrices read from `bytes`.
pub(crate) fn mlp(par: &dyn Parallel, bytes: &[u8], m: &Mlp, x: &[f32], t: usize, s: &mut MlpScratch, out: &mut [f32]) {
    let d = m.down.view(bytes);
    let h = hidden(par, bytes, m, x, t, s);
    matmul(par, h, t, &d, out);
    if let Some([_, _, bd]) = m.bias.as_deref() {
        add_bias(bytes, bd, &mut s.bias, out);
    }
}

/// The MLP's intermediate activations `act(gate(x), up(x))` (`[T, intermediate]`, the input
/// of `down`), in one of `s`'s buffers.
pub(crate) fn hidden<'s>(
    par: &dyn Parallel,
    bytes: &[u8],
    m: &Mlp,
    x: &[f32],
    t: usize,
    s: &'s mut MlpScratch,
) -> &'s [f32] {
    let MlpScratch { gate, up, bias } = s;
    let u = m.up.view(bytes);
    let inter = u.rows();
    if let (Some(g), None) = (&m.gate, &m.bias) {
        let g = g.view(bytes);
        if g.dtype() == u.dtype() && g.rows() == inter && g.cols() == u.cols() {
            // The common case: gate, up and the activation in one threaded pass.
            resize(gate, t * inter);
            let act = |g: &mut [f32], u: &[f32]| match m.act {
                Activation::ClampedSwiglu { alpha, limit } => {
                    g.iter_mut().zip(u).for_each(|(a, &b)| *a = clamped_swiglu(*a, b, alpha, limit))
                }
                _ => silu_mul(g, u),
            };
            matmul_glu(par, &Acts::new(x, t), &g, &u, &act, gate);
            return gate;
        }
    }
    // Gate and up read the same input: quantized once.
    let xa = Acts::new(x, t);
    resize(up, t * inter);
    matmul_acts(par, &xa, &u, up);
    if let Some([_, bu, _]) = m.bias.as_deref() {
        add_bias(bytes, bu, bias, up);
    }
    match &m.gate {
        Some(g) => {
            resize(gate, t * inter);
            matmul_acts(par, &xa, &g.view(bytes), gate);
            if let Some([bg, _, _]) = m.bias.as_deref() {
                add_bias(bytes, bg, bias, gate);
            }
            match m.act {
                Activation::ClampedSwiglu { alpha, limit } => {
                    for (a, &b) in gate.iter_mut().zip(up.iter()) {
                        *a = clamped_swiglu(*a, b, alpha, limit);
                    }
                }
                // A gated MLP is SiLU-gated unless it says otherwise.
                _ => silu_mul(gate, up),
            }
            gate
        }
        None => {
            for v in up.iter_mut() {
                *v = match m.act {
                    Activation::Relu => v.max(0.0),
                    Activation::GeluTanh => super::meo::gelu_tanh(*v),
                    // Ungated SwiGLU variants have no meaning; SiLU alone.
                    Activation::Silu | Activation::ClampedSwiglu { .. } => silu(*v),
                };
            }
            up
        }
    }
}

/// GPT-OSS's gated activation, in transformers' order of operations:
/// `g = min(gate, limit)`, `u = clamp(up, −limit, limit)`, `(u + 1) · (g · σ(alpha · g))`.
pub(crate) fn clamped_swiglu(gate: f32, up: f32, alpha: f32, limit: f32) -> f32 {
    let g = gate.min(limit);
    let u = up.clamp(-limit, limit);
    let glu = g * (1.0 / (1.0 + libm::expf(-(g * alpha))));
    (u + 1.0) * glu
}

/// A dense layer's FFN.
pub(crate) fn dense(
    par: &dyn Parallel,
    bytes: &[u8],
    m: &Mlp,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
    out: &mut [f32],
) {
    mlp(par, bytes, m, x, t, &mut s.mlp, out);
}

/// The MoE block on `t` tokens at absolute positions `pos0..pos0 + t`:
/// router (f32) → [`route_token`] per token → (capacity) → each selected expert once over
/// all of its tokens → weighted scatter-add in ascending expert order (as transformers sums)
/// → plus the (gated) shared expert. Unselected experts' bytes are never read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    spec: &RouterSpec,
    layer: usize,
    pos0: usize,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
    trace: &mut dyn Trace,
    fallback: Option<Fallback<'_>>,
    out: &mut [f32],
) {
    let (e, k) = (spec.num_experts, spec.top_k);
    let h = x.len() / t.max(1);

    route_tokens(par, bytes, p, spec, x, t, s);
    s.to_merged.clear();
    s.to_merged.resize(t * k, false);
    if let Some(fb) = fallback
        && trace.resident_experts(layer, &mut s.resident)
        && s.resident.len() == e
    {
        apply_fallback(fb, p, spec, t, s);
        if !s.missed.is_empty() {
            let n = s.missed.len();
            s.missed.sort_unstable();
            s.missed.dedup();
            trace.on_fallback(layer, &s.missed, n);
        }
    }
    s.dropped.clear();
    s.dropped.resize(t * k, false);
    apply_capacity(spec, &mut s.choices, &mut s.dropped, &mut s.counts);
    for (i, ch) in s.choices.chunks(k).enumerate() {
        trace.on_route(layer, pos0 + i, ch);
    }

    // Group (token, weight) by expert: counting sort, tokens stay in order. Choices the
    // fallback sends to the merged expert form group `e`.
    let inv_mass = match fallback {
        Some(Fallback::Merged { inv_mass, .. }) => inv_mass,
        _ => 1.0,
    };
    let bucket = |c: &Choice, m: bool| if m { e } else { c.expert as usize };
    s.starts.clear();
    s.starts.resize(e + 2, 0);
    for ((c, &d), &m) in s.choices.iter().zip(&s.dropped).zip(&s.to_merged) {
        if !d {
            s.starts[bucket(c, m) + 1] += 1;
        }
    }
    for i in 0..=e {
        s.starts[i + 1] += s.starts[i];
    }
    s.assign.clear();
    s.assign.resize(s.starts[e + 1], (0, 0.0));
    let mut fill = s.starts.clone();
    for (i, ((c, &d), &m)) in s.choices.iter().zip(&s.dropped).zip(&s.to_merged).enumerate() {
        if !d {
            let slot = &mut fill[bucket(c, m)];
            s.assign[*slot] = (i / k, if m { c.weight * inv_mass } else { c.weight });
            *slot += 1;
        }
    }
    s.selected.clear();
    s.selected.extend((0..e).filter(|&i| s.starts[i + 1] > s.starts[i]).map(|i| i as u32));
    trace.on_experts_selected(layer, &s.selected);

    out.fill(0.0);
    // Weights on the inputs: each expert reads its own scaled copy of x.
    let on_input = spec.weight_on_input;
    let ran = (t == 1 && !on_input && decode_experts(par, bytes, p, x, s, out))
        || (t > 1
            && par.threads() > 1
            && s.selected.len() >= 2 * par.threads()
            && prompt_experts(par, bytes, p, x, t, on_input, s, out));
    if !ran {
        let selected = core::mem::take(&mut s.selected);
        for &ei in &selected {
            let ei = ei as usize;
            let ex = &p.experts[ei];
            // The expert's matrices are read only through its slab.
            run_group(par, &bytes[ex.slab.clone()], &ex.mlp, ei, x, h, on_input, s, out);
        }
        s.selected = selected;
    }
    if let Some(Fallback::Merged { bytes: mb, mlp: mm, .. }) = fallback
        && s.starts[e + 1] > s.starts[e]
    {
        run_group(par, mb, mm, e, x, h, on_input, s, out);
    }

    shared(par, bytes, p, spec, x, t, s, out);
}

/// Runs expert `slab`/`m` on the tokens of group `g` of `s.assign` and adds their weighted
/// outputs to `out` (the weights on the inputs instead when `on_input`).
#[allow(clippy::too_many_arguments)]
fn run_group(
    par: &dyn Parallel,
    slab: &[u8],
    m: &Mlp,
    g: usize,
    x: &[f32],
    h: usize,
    on_input: bool,
    s: &mut FfnScratch,
    out: &mut [f32],
) {
    let group = &s.assign[s.starts[g]..s.starts[g + 1]];
    let n = group.len();
    resize(&mut s.xs, n * h);
    for (row, &(tok, w)) in s.xs.chunks_mut(h).zip(group) {
        gather_row(row, &x[tok * h..][..h], on_input.then_some(w));
    }
    resize(&mut s.ys, n * h);
    mlp(par, slab, m, &s.xs, n, &mut s.mlp, &mut s.ys);
    for (row, &(tok, w)) in s.ys.chunks(h).zip(group) {
        scatter_row(&mut out[tok * h..][..h], row, (!on_input).then_some(w));
    }
}

/// The on-miss fallback on `s.choices` (routed, before capacity) given `s.resident`: re-routes
/// tokens among resident experts, or marks missed choices for the merged expert
/// (`s.to_merged`); `s.missed` gets the missed expert of every choice served otherwise.
fn apply_fallback(fb: Fallback<'_>, p: &MoePlan, spec: &RouterSpec, t: usize, s: &mut FfnScratch) {
    let (e, k) = (spec.num_experts, spec.top_k);
    s.missed.clear();
    match fb {
        Fallback::Merged { .. } => {
            for (c, m) in s.choices.iter().zip(s.to_merged.iter_mut()) {
                if !s.resident[c.expert as usize] {
                    *m = true;
                    s.missed.push(c.expert);
                }
            }
        }
        Fallback::Resident => {
            if s.resident.iter().filter(|&&r| r).count() < k {
                return;
            }
            let sel = p.selection_bias.as_ref().map(|_| &s.sel_bias[..]);
            s.rerouted.clear();
            s.rerouted.resize(k, Choice { expert: 0, weight: 0.0 });
            for (row, ch) in s.logits.chunks(e).zip(s.choices.chunks_mut(k)).take(t) {
                if ch.iter().all(|c| s.resident[c.expert as usize]) {
                    continue;
                }
                s.masked.clear();
                s.masked.extend(row.iter().zip(&s.resident).map(|(&v, &r)| if r { v } else { f32::NEG_INFINITY }));
                route_token(spec, &s.masked, sel, &mut s.route, &mut s.rerouted);
                // A scoring that lets a masked expert through (a selection bias added after
                // scoring) leaves the token exact.
                if s.rerouted.iter().all(|c| s.resident[c.expert as usize]) {
                    s.missed.extend(ch.iter().filter(|c| !s.resident[c.expert as usize]).map(|c| c.expert));
                    ch.copy_from_slice(&s.rerouted);
                }
            }
        }
    }
}

/// The router on `t` tokens, then [`route_token`] per token: `s.choices` (`[t, top_k]`, before
/// capacity).
fn route_tokens(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    spec: &RouterSpec,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
) {
    let (e, k) = (spec.num_experts, spec.top_k);
    router_logits(par, bytes, p, x, t, e, s);
    let sel = p.selection_bias.as_ref().map(|b| {
        b.read(bytes, &mut s.sel_bias);
        &s.sel_bias[..]
    });
    s.choices.clear();
    s.choices.resize(t * k, Choice { expert: 0, weight: 0.0 });
    for (row, ch) in s.logits.chunks(e).zip(s.choices.chunks_mut(k)) {
        route_token(spec, row, sel, &mut s.route, ch);
    }
}

/// The experts MoE layer `p` would select for inputs `x` (`[t, hidden]`), ascending and distinct,
/// into `out`: its router applied to another layer's router input (next-layer prediction).
/// Uses `s`'s routing scratch only; capacity is not applied (a prediction may include experts
/// capacity would drop).
#[allow(clippy::too_many_arguments)]
pub(crate) fn predict(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    spec: &RouterSpec,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
    out: &mut Vec<u32>,
) {
    route_tokens(par, bytes, p, spec, x, t, s);
    let e = spec.num_experts;
    s.counts.clear();
    s.counts.resize(e, 0);
    for c in &s.choices {
        s.counts[c.expert as usize] += 1;
    }
    out.clear();
    out.extend((0..e).filter(|&i| s.counts[i] > 0).map(|i| i as u32));
}

/// Prompt processing with many selected experts: whole experts are the parallel tasks (each
/// runs on one thread over all of its tokens), largest first, in one fork/join per layer
/// instead of two per expert; then the weighted scatter-add in ascending expert order, as the
/// general path. Each value is computed by the same kernels as there, so the results are equal.
/// False (nothing done) when the padded output buffer would exceed [`PROMPT_EXPERTS_MAX_BYTES`]
/// (very long prompts): the caller then runs the experts one by one.
#[allow(clippy::too_many_arguments)]
fn prompt_experts(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    x: &[f32],
    t: usize,
    on_input: bool,
    s: &mut FfnScratch,
    out: &mut [f32],
) -> bool {
    let h = x.len() / t;
    let (selected, assign, starts) = (&s.selected, &s.assign, &s.starts);
    let group = |ei: u32| &assign[starts[ei as usize]..starts[ei as usize + 1]];
    // Largest first, so the last task to finish is a small one.
    let mut order: Vec<u32> = selected.clone();
    order.sort_by_key(|&e| core::cmp::Reverse(group(e).len()));
    let most = order.first().map_or(0, |&e| group(e).len());
    // Every expert's output is padded to the largest one's.
    if order.len() * most * h * core::mem::size_of::<f32>() > PROMPT_EXPERTS_MAX_BYTES {
        return false;
    }
    resize(&mut s.ys, order.len() * most * h);
    let task = |i: usize, o: &mut [f32]| {
        let ei = order[i];
        let g = group(ei);
        let mut xs = alloc::vec![0.0f32; g.len() * h];
        for (row, &(tok, w)) in xs.chunks_mut(h).zip(g) {
            gather_row(row, &x[tok * h..][..h], on_input.then_some(w));
        }
        let ex = &p.experts[ei as usize];
        // The expert's matrices are read only through its slab.
        let slab = &bytes[ex.slab.clone()];
        mlp(&Serial, slab, &ex.mlp, &xs, g.len(), &mut MlpScratch::default(), &mut o[..g.len() * h]);
    };
    par.for_each_chunk(&mut s.ys, most * h, &task);
    let mut rank: Vec<(u32, usize)> = order.iter().enumerate().map(|(i, &e)| (e, i)).collect();
    rank.sort_unstable();
    for (ei, i) in rank {
        for (row, &(tok, w)) in s.ys[i * most * h..].chunks(h).zip(group(ei)) {
            scatter_row(&mut out[tok * h..][..h], row, (!on_input).then_some(w));
        }
    }
    true
}

/// An expert's input row: `x`, times the routing weight when it applies to the input.
fn gather_row(row: &mut [f32], x: &[f32], w: Option<f32>) {
    match w {
        Some(w) => row.iter_mut().zip(x).for_each(|(r, &v)| *r = v * w),
        None => row.copy_from_slice(x),
    }
}

/// Adds an expert's output row to `out`, times the routing weight when it applies to the output.
fn scatter_row(out: &mut [f32], row: &[f32], w: Option<f32>) {
    match w {
        Some(w) => out.iter_mut().zip(row).for_each(|(o, &v)| *o += v * w),
        None => out.iter_mut().zip(row).for_each(|(o, &v)| *o += v),
    }
}

/// Largest output buffer [`prompt_experts`] allocates (longer prompts take the general path).
const PROMPT_EXPERTS_MAX_BYTES: usize = 64 << 20;

/// One token's selected experts (`s.selected`, weights in `s.assign`) in two parallel passes:
/// every gate/up/activation, then every down projection; then the weighted sum in ascending
/// expert order, as the general path. False (nothing done) when the experts are not all plain
/// gated MLPs of one shape without biases: the caller then runs them one by one.
fn decode_experts(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    x: &[f32],
    s: &mut FfnScratch,
    out: &mut [f32],
) -> bool {
    let h = x.len();
    let mut mats = Vec::with_capacity(s.selected.len());
    for &ei in &s.selected {
        let ex = &p.experts[ei as usize];
        let slab = &bytes[ex.slab.clone()];
        let (Some(g), None) = (&ex.mlp.gate, &ex.mlp.bias) else { return false };
        let (g, u, d) = (g.view(slab), ex.mlp.up.view(slab), ex.mlp.down.view(slab));
        let same =
            |a: &MatRef<'_>, b: &MatRef<'_>| a.dtype() == b.dtype() && a.rows() == b.rows() && a.cols() == b.cols();
        if !same(&g, &u) || g.cols() != h || d.rows() != h || d.cols() != g.rows() {
            return false;
        }
        if mats.first().is_some_and(|(g0, _, d0): &(MatRef<'_>, _, MatRef<'_>)| !same(g0, &g) || !same(d0, &d)) {
            return false;
        }
        mats.push((g, u, d));
    }
    let Some(inter) = mats.first().map(|m| m.0.rows()) else { return false };
    let act_kind = p.experts[s.selected[0] as usize].mlp.act;
    let act = |g: &mut [f32], u: &[f32]| match act_kind {
        Activation::ClampedSwiglu { alpha, limit } => {
            g.iter_mut().zip(u).for_each(|(a, &b)| *a = clamped_swiglu(*a, b, alpha, limit))
        }
        _ => silu_mul(g, u),
    };
    let xa = Acts::new(x, 1);
    let jobs: Vec<Gemv<'_, '_>> = mats.iter().map(|(g, u, _)| Gemv { x: &xa, w: *g, glu: Some((*u, &act)) }).collect();
    resize(&mut s.xs, mats.len() * inter);
    gemv_many(par, &jobs, &mut s.xs);
    let hs: Vec<Acts<'_>> = s.xs.chunks_exact(inter).map(|hrow| Acts::new(hrow, 1)).collect();
    let jobs: Vec<Gemv<'_, '_>> =
        mats.iter().zip(&hs).map(|((_, _, d), hx)| Gemv { x: hx, w: *d, glu: None }).collect();
    resize(&mut s.ys, mats.len() * h);
    gemv_many(par, &jobs, &mut s.ys);
    for (row, &ei) in s.ys.chunks_exact(h).zip(&s.selected) {
        let w = s.assign[s.starts[ei as usize]].1;
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v * w;
        }
    }
    true
}

/// Router logits `[t, E]` (f32, plus the router bias) into `s.logits`.
fn router_logits(par: &dyn Parallel, bytes: &[u8], p: &MoePlan, x: &[f32], t: usize, e: usize, s: &mut FfnScratch) {
    resize(&mut s.logits, t * e);
    matmul(par, x, t, &p.router.view(bytes), &mut s.logits);
    if let Some(b) = &p.router_bias {
        b.read(bytes, &mut s.bias);
        for row in s.logits.chunks_mut(e) {
            crate::kernels::add_into(row, &s.bias);
        }
    }
}

/// Adds the (gated) shared expert's output to `out`.
#[allow(clippy::too_many_arguments)]
fn shared(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    spec: &RouterSpec,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
    out: &mut [f32],
) {
    let h = x.len() / t.max(1);
    if let Some(m) = &p.shared {
        resize(&mut s.shared, t * h);
        mlp(par, bytes, m, x, t, &mut s.mlp, &mut s.shared);
        if let (Some(g), SharedGate::Sigmoid) = (&p.shared_gate, spec.shared_gate) {
            resize(&mut s.shared_gate, t);
            matmul(par, x, t, &g.view(bytes), &mut s.shared_gate);
            for (row, &gl) in s.shared.chunks_mut(h).zip(&s.shared_gate) {
                let gate = 1.0 / (1.0 + libm::expf(-gl));
                row.iter_mut().for_each(|v| *v *= gate);
            }
        }
        crate::kernels::add_into(out, &s.shared);
    }
}

/// A merged MoE block: one merged expert (`expert` over `expert_bytes`) applied to every
/// token, plus the shared expert. No routing, no per-expert slab.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merged(
    par: &dyn Parallel,
    bytes: &[u8],
    expert_bytes: &[u8],
    expert: &Mlp,
    p: &MoePlan,
    spec: &RouterSpec,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
    out: &mut [f32],
) {
    mlp(par, expert_bytes, expert, x, t, &mut s.mlp, out);
    shared(par, bytes, p, spec, x, t, s, out);
}

/// The choices of the last [`moe`] call, `[t, top_k]` (weight 0 for dropped choices).
pub(crate) fn last_choices(s: &FfnScratch) -> &[Choice] {
    &s.choices
}

/// Routes one pooled router input `x` (`[hidden]`) as a token: its `top_k` choices.
pub(crate) fn route_one(
    par: &dyn Parallel,
    bytes: &[u8],
    p: &MoePlan,
    spec: &RouterSpec,
    x: &[f32],
    s: &mut FfnScratch,
) -> Vec<Choice> {
    let e = spec.num_experts;
    router_logits(par, bytes, p, x, 1, e, s);
    let sel = p.selection_bias.as_ref().map(|b| {
        b.read(bytes, &mut s.sel_bias);
        &s.sel_bias[..]
    });
    let mut out = alloc::vec![Choice { expert: 0, weight: 0.0 }; spec.top_k];
    route_token(spec, &s.logits, sel, &mut s.route, &mut out);
    out
}
