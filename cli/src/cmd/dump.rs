//! `--dump`: the prompt's logits (or an encoder's hidden states) and each MoE layer's routing
//! as a safetensors file, and the routing observers that collect them.

use anyhow::{Context, Result};
use meo::Trace;
use meo::route::Choice;
use std::collections::BTreeMap;
use std::path::Path;

/// Sends the routing to several observers.
pub struct Tee<'a>(pub Vec<&'a mut dyn Trace>);

impl Trace for Tee<'_> {
    fn on_experts_selected(&mut self, layer: usize, experts: &[u32]) {
        for t in &mut self.0 {
            t.on_experts_selected(layer, experts);
        }
    }
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        for t in &mut self.0 {
            t.on_route(layer, pos, choices);
        }
    }
    fn on_moe_input(&mut self, layer: usize, pos0: usize, x: &[f32]) {
        for t in &mut self.0 {
            t.on_moe_input(layer, pos0, x);
        }
    }
    fn on_merged(&mut self, layer: usize, tokens: usize, expert: &meo::MergedUse) {
        for t in &mut self.0 {
            t.on_merged(layer, tokens, expert);
        }
    }
}

/// Records each MoE layer's choices for the positions `0..len` (the prompt).
#[derive(Debug, Default)]
pub struct RouteRecorder {
    len: usize,
    top_k: usize,
    /// layer → (`[len, k]` indices, `[len, k]` weights)
    pub layers: BTreeMap<usize, (Vec<i64>, Vec<f32>)>,
}

impl RouteRecorder {
    /// A recorder for positions `0..len` with `top_k` choices each.
    pub fn new(len: usize, top_k: usize) -> Self {
        Self { len, top_k, layers: BTreeMap::new() }
    }
}

impl Trace for RouteRecorder {
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[Choice]) {
        if pos >= self.len {
            return;
        }
        let (k, len) = (self.top_k, self.len);
        let (idx, w) = self.layers.entry(layer).or_insert_with(|| (vec![0; len * k], vec![0.0; len * k]));
        let mut sorted: Vec<Choice> = choices.to_vec();
        sorted.sort_by_key(|c| c.expert);
        for (j, c) in sorted.iter().take(k).enumerate() {
            idx[pos * k + j] = i64::from(c.expert);
            w[pos * k + j] = c.weight;
        }
    }
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Writes `logits` `[T, V]` and each layer's `topk_indices` / `topk_weights` `[T, k]`.
///
/// # Errors
/// I/O.
pub fn write_dump(path: &Path, logits: &[f32], t: usize, vocab: usize, rec: &RouteRecorder) -> Result<()> {
    write_dump_as(path, "logits", logits, [t, vocab], rec, false)
}

/// Writes `values` `[T, width]` as tensor `name` (`logits`, or `last_hidden_state` for an
/// encoder), each layer's `topk_indices` / `topk_weights` `[T, k]` and, with `dropped`, each
/// layer's `layers.L.dropped` `[T]` bool (every choice of the token dropped by capacity:
/// weight 0).
///
/// # Errors
/// I/O.
pub fn write_dump_as(
    path: &Path,
    name: &str,
    values: &[f32],
    [t, width]: [usize; 2],
    rec: &RouteRecorder,
    dropped: bool,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        vec![(name.into(), Dtype::F32, vec![t, width], le_bytes(values, f32::to_le_bytes))];
    for (l, (_, w)) in rec.layers.iter().filter(|_| dropped) {
        let d = w.chunks(rec.top_k.max(1)).map(|c| u8::from(c.iter().all(|&x| x == 0.0))).collect();
        owned.push((format!("layers.{l}.dropped"), Dtype::BOOL, vec![t], d));
    }
    for (l, (idx, w)) in &rec.layers {
        owned.push((
            format!("layers.{l}.topk_indices"),
            Dtype::I64,
            vec![t, rec.top_k],
            le_bytes(idx, i64::to_le_bytes),
        ));
        owned.push((format!("layers.{l}.topk_weights"), Dtype::F32, vec![t, rec.top_k], le_bytes(w, f32::to_le_bytes)));
    }
    let views = owned
        .iter()
        .map(|(name, dt, shape, data)| Ok((name.clone(), TensorView::new(*dt, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let info = std::collections::HashMap::from([("producer".to_string(), "meo run --dump".to_string())]);
    safetensors::serialize_to_file(views, Some(info), path).with_context(|| format!("cannot write {}", path.display()))
}
