//! `meo inspect FILE [--json]`: metadata, per-layer expert tables and totals, read from the
//! header and tensor table only (no weight page is touched). The JSON form is documented in
//! `docs/CLI.md`.

use super::alignment_of;
use anyhow::Result;
use meo::MeoFile;
use meo::format::{MetaArray, MetaValue};
use meo_converter::convert::TOKENIZER_KEY;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Show what a .meo file holds.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .meo file.
    pub file: PathBuf,
    /// Print one JSON object (format documented in docs/CLI.md) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A metadata value as JSON (bytes become an array of numbers; non-finite floats null).
pub fn meta_json(v: &MetaValue<'_>) -> Value {
    let f = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match v {
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F64(x) => f(*x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::Str(s) => json!(s),
        MetaValue::Bytes(b) => json!(b),
        MetaValue::Array(a) => match a {
            MetaArray::U64(v) => json!(v),
            MetaArray::I64(v) => json!(v),
            MetaArray::F64(v) => Value::Array(v.iter().map(|&x| f(x)).collect()),
            MetaArray::Bool(v) => json!(v),
            MetaArray::Str(v) => json!(v),
        },
    }
}

/// What an expert slab holds, from its key.
#[derive(Debug, PartialEq, Eq)]
enum SlabKind<'a> {
    /// A routed expert: `layers.L.experts.E`, or `layers.L.BANK.experts.E` (MEO-native banks).
    Routed { layer: usize, bank: Option<&'a str>, expert: usize },
    /// A task's precomputed merged expert: `tasks.T.layers.L[.BANK].experts.merged`.
    Merged { task: &'a str, layer: usize },
    /// Any other slab (counted as routed, shown in no layer).
    Other,
}

/// `L.rest` → `(L, rest)`.
/// The layers `inspect` lists: every layer the config describes, and any other layer a slab
/// names. Never a dense range up to the largest named layer: a crafted slab name
/// (`layers.4000000000.experts.0`) would make that billions of rows.
fn layer_rows(described: usize, named: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut rows: std::collections::BTreeSet<usize> = (0..described).collect();
    rows.extend(named);
    rows.into_iter().collect()
}

fn layer_of(s: &str) -> Option<(usize, &str)> {
    let (l, rest) = s.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

fn slab_kind(key: &str) -> SlabKind<'_> {
    if let Some(rest) = key.strip_prefix("tasks.") {
        // Task names have no dots (`names::valid_task_name`).
        if let Some((task, (layer, _))) = rest.split_once(".layers.").and_then(|(t, r)| Some((t, layer_of(r)?))) {
            return SlabKind::Merged { task, layer };
        }
    } else if let Some((layer, rest)) = key.strip_prefix("layers.").and_then(layer_of) {
        let (bank, e) = match rest.strip_prefix("experts.") {
            Some(e) => (None, e),
            None => match rest.split_once(".experts.") {
                Some((b, e)) => (Some(b), e),
                None => return SlabKind::Other,
            },
        };
        if let Ok(expert) = e.parse() {
            return SlabKind::Routed { layer, bank, expert };
        }
    }
    SlabKind::Other
}

/// A task merge's per-layer numbers: bytes of its merged slabs and the measured merge errors.
#[derive(Default)]
struct TaskLayer {
    bytes: u64,
    error: Option<f64>,
    error_unaligned: Option<f64>,
}

/// The task merges of a file: `merge.tasks` (in its order) and every task that only has slabs,
/// with their metadata (`merge.task.<name>.*`) and slab bytes per layer.
fn tasks_json(f: &MeoFile<'_>, merged: &BTreeMap<(&str, usize), u64>) -> Vec<Value> {
    use meo::names::merge_keys;
    let m = &f.metadata;
    let mut names: Vec<&str> = match m.get(merge_keys::TASKS) {
        Some(MetaValue::Array(MetaArray::Str(v))) => v.clone(),
        _ => Vec::new(),
    };
    for (t, _) in merged.keys() {
        if !names.contains(t) {
            names.push(t);
        }
    }
    let num = |v: Option<&MetaValue<'_>>| match v {
        Some(MetaValue::Array(MetaArray::F64(v))) => v.clone(),
        _ => Vec::new(),
    };
    let finite = |x: Option<&f64>| x.copied().filter(|x| x.is_finite());
    names
        .into_iter()
        .map(|name| {
            let key = |field: &str| merge_keys::task(name, field);
            let listed: Vec<usize> = match m.get(&key("layers")) {
                Some(MetaValue::Array(MetaArray::U64(v))) => v.iter().filter_map(|&l| usize::try_from(l).ok()).collect(),
                _ => Vec::new(),
            };
            let (errors, unaligned) = (num(m.get(&key("errors"))), num(m.get(&key("errors_unaligned"))));
            let mut layers: BTreeMap<usize, TaskLayer> = BTreeMap::new();
            for (j, &l) in listed.iter().enumerate() {
                let e = layers.entry(l).or_default();
                e.error = finite(errors.get(j));
                e.error_unaligned = finite(unaligned.get(j));
            }
            for (&(_, l), &bytes) in merged.iter().filter(|((t, _), _)| *t == name) {
                layers.entry(l).or_default().bytes = bytes;
            }
            let bytes: u64 = layers.values().map(|l| l.bytes).sum();
            let layers: Vec<Value> = layers
                .into_iter()
                .map(|(l, t)| json!({"layer": l, "bytes": t.bytes, "error": t.error, "error_unaligned": t.error_unaligned}))
                .collect();
            json!({
                "name": name,
                "weighting": match m.get(&key("weighting")) { Some(MetaValue::Str(s)) => json!(s), _ => Value::Null },
                "tokens": match m.get(&key("tokens")) { Some(MetaValue::U64(x)) => json!(x), _ => Value::Null },
                "bytes": bytes,
                "layers": layers,
            })
        })
        .collect()
}

/// The JSON report of `f` (documented in `docs/CLI.md`).
pub fn report(f: &MeoFile<'_>) -> Value {
    let m = &f.metadata;
    let h = &f.header;
    let mut config = Map::new();
    let mut quant = Map::new();
    let mut compression = Map::new();
    for (k, v) in m.entries() {
        if let Some(c) = k.strip_prefix("compress.") {
            compression.insert(c.to_string(), meta_json(v));
        }
        if k.starts_with("model.") || k.starts_with("routing.") || k.starts_with("generation.") {
            config.insert((*k).to_string(), meta_json(v));
        } else if let Some(q) = k.strip_prefix("quant.") {
            quant.insert(q.to_string(), meta_json(v));
        }
    }
    // Routed expert tables grouped by layer; task-merged slabs apart (they are not experts a
    // router selects, and a file holds one per task and MoE layer on top of the experts).
    let mut by_layer: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let mut merged: BTreeMap<(&str, usize), u64> = BTreeMap::new();
    let (mut expert_bytes, mut expert_count, mut merged_bytes, mut merged_count) = (0u64, 0u64, 0u64, 0u64);
    let mut in_slab = vec![false; f.tensors().len()];
    for s in f.slabs() {
        in_slab[s.tensors.clone()].iter_mut().for_each(|b| *b = true);
        let offset = h.data_offset + s.offset;
        match slab_kind(s.key) {
            SlabKind::Merged { task, layer } => {
                merged_bytes += s.len;
                merged_count += 1;
                *merged.entry((task, layer)).or_default() += s.len;
            }
            kind => {
                expert_bytes += s.len;
                expert_count += 1;
                if let SlabKind::Routed { layer, bank, expert } = kind {
                    let mut e = json!({
                        "expert": expert,
                        "offset": offset,
                        "bytes": s.len,
                        "alignment": alignment_of(offset),
                    });
                    if let Some(b) = bank {
                        e["bank"] = json!(b);
                    }
                    by_layer.entry(layer).or_default().push(e);
                }
            }
        }
    }
    let dense_bytes: u64 = f.tensors().iter().zip(&in_slab).filter(|(_, s)| !**s).map(|(t, _)| t.len).sum();
    let ffn: Vec<&str> = match m.get("model.layer_ffn") {
        Some(MetaValue::Array(MetaArray::Str(v))) => v.clone(),
        _ => Vec::new(),
    };
    let layers: Vec<Value> = layer_rows(ffn.len(), by_layer.keys().copied())
        .into_iter()
        .map(|l| {
            let experts = by_layer.remove(&l).unwrap_or_default();
            let kind = ffn.get(l).copied().unwrap_or(if experts.is_empty() { "unknown" } else { "moe" });
            json!({"layer": l, "ffn": kind, "experts": experts})
        })
        .collect();
    let architecture = match m.get("general.architecture") {
        Some(MetaValue::Str(s)) => json!(s),
        _ => Value::Null,
    };
    json!({
        "format_version": h.format_version,
        "quant_version": h.quant_version,
        "file_bytes": f.bytes().len(),
        "alignment": h.alignment,
        "architecture": architecture,
        "config": config,
        "quant": quant,
        "tokenizer": m.get(TOKENIZER_KEY).is_some(),
        "chat_templates": chat_templates(m),
        "tensors": f.tensors().len(),
        "dense_bytes": dense_bytes,
        "expert_bytes": expert_bytes,
        "expert_count": expert_count,
        "bytes_per_expert": expert_bytes.checked_div(expert_count).unwrap_or(0),
        "merged_bytes": merged_bytes,
        "merged_count": merged_count,
        "tasks": tasks_json(f, &merged),
        "compression": if compression.is_empty() { Value::Null } else { Value::Object(compression) },
        "layers": layers,
    })
}

/// The chat templates a file holds: `default` first if there is one, then the named ones.
fn chat_templates(m: &meo::Metadata<'_>) -> Vec<String> {
    let mut v: Vec<String> = meo::chat::has_template(m).then(|| "default".to_string()).into_iter().collect();
    v.extend(meo::chat::template_names(m));
    v
}

fn text(r: &Value, path: &std::path::Path) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let g = |k: &str| r[k].to_string();
    let _ = writeln!(s, "file            {} ({} bytes)", path.display(), g("file_bytes"));
    let _ = writeln!(s, "format          version {}, quant version {}", g("format_version"), g("quant_version"));
    let _ = writeln!(s, "architecture    {}", r["architecture"].as_str().unwrap_or("(none)"));
    if let Some(q) = r["quant"].as_object().filter(|q| !q.is_empty()) {
        let q: Vec<String> =
            q.iter().map(|(k, v)| format!("{k} {}", v.as_str().map_or(v.to_string(), String::from))).collect();
        let _ = writeln!(s, "quant           {}", q.join(", "));
    }
    let _ = writeln!(s, "tokenizer       {}", if r["tokenizer"] == true { "embedded" } else { "none" });
    let names: Vec<&str> = r["chat_templates"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let _ = writeln!(s, "chat templates  {}", if names.is_empty() { "none".to_string() } else { names.join(", ") });
    let _ = writeln!(s, "tensors         {}", g("tensors"));
    let _ = writeln!(s, "dense bytes     {}", g("dense_bytes"));
    let _ = writeln!(
        s,
        "expert bytes    {} ({} experts, {} bytes per expert)",
        g("expert_bytes"),
        g("expert_count"),
        g("bytes_per_expert")
    );
    if r["merged_count"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(s, "merged bytes    {} ({} task-merged experts)", g("merged_bytes"), g("merged_count"));
    }
    if let Some(c) = r["compression"].as_object() {
        // `meo convert --compress`: what was removed, on which text, at what measured error.
        let _ = writeln!(s, "compression");
        for (k, v) in c {
            let _ = writeln!(s, "  {k:<40} {v}");
        }
    }
    if let Some(c) = r["config"].as_object() {
        let _ = writeln!(s, "config");
        for (k, v) in c {
            // Values stored from f32 read best as f32 (1e-5, not 9.999999747378752e-6).
            let v = match v.as_f64() {
                Some(x) if v.is_f64() && f64::from(x as f32) == x => format!("{}", x as f32),
                _ => v.to_string(),
            };
            let _ = writeln!(s, "  {k:<40} {v}");
        }
    }
    for l in r["layers"].as_array().into_iter().flatten() {
        let experts = l["experts"].as_array().map_or(&[][..], Vec::as_slice);
        let _ = writeln!(
            s,
            "layer {} ({}){}",
            l["layer"],
            l["ffn"].as_str().unwrap_or("?"),
            if experts.is_empty() { "" } else { ":" }
        );
        if !experts.is_empty() {
            let _ = writeln!(s, "  {:>6} {:>14} {:>12} {:>10}", "expert", "offset", "bytes", "alignment");
            for e in experts {
                let n = |k: &str| e[k].as_u64().unwrap_or(0);
                // MEO-native bank experts read `fc1.3`.
                let id = e["bank"].as_str().map_or_else(|| n("expert").to_string(), |b| format!("{b}.{}", n("expert")));
                let _ = writeln!(s, "  {:>6} {:>14} {:>12} {:>10}", id, n("offset"), n("bytes"), n("alignment"));
            }
        }
    }
    for t in r["tasks"].as_array().into_iter().flatten() {
        let layers = t["layers"].as_array().map_or(&[][..], Vec::as_slice);
        let mut about = vec![format!("{} bytes", t["bytes"])];
        if let Some(w) = t["weighting"].as_str() {
            about.push(format!("{w} weights"));
        }
        if let Some(n) = t["tokens"].as_u64() {
            about.push(format!("{n} calibration tokens"));
        }
        let _ = writeln!(s, "task {} ({}):", t["name"].as_str().unwrap_or("?"), about.join(", "));
        let _ = writeln!(s, "  {:>6} {:>12} {:>12} {:>16}", "layer", "bytes", "merge error", "error unaligned");
        let err = |v: &Value| v.as_f64().map_or_else(|| String::from("-"), |x| format!("{x:.4}"));
        for l in layers {
            let _ = writeln!(
                s,
                "  {:>6} {:>12} {:>12} {:>16}",
                l["layer"].as_u64().unwrap_or(0),
                l["bytes"].as_u64().unwrap_or(0),
                err(&l["error"]),
                err(&l["error_unaligned"])
            );
        }
    }
    s
}

pub fn run(args: &Args) -> Result<()> {
    let mapped = super::open_meo(&args.file)?;
    let f = mapped.parse()?;
    let r = report(&f);
    let out = if args.json { serde_json::to_string_pretty(&r)? + "\n" } else { text(&r, &args.file) };
    super::print_stdout(&out)
}

#[cfg(test)]
mod tests {
    use super::layer_rows;

    #[test]
    fn listed_layers_are_the_described_and_the_named_ones() {
        assert_eq!(layer_rows(3, [1, 2].into_iter()), [0, 1, 2]);
        // A crafted layer number is one row, not a range up to it.
        assert_eq!(layer_rows(2, [4_000_000_000, 1].into_iter()), [0, 1, 4_000_000_000]);
        assert_eq!(layer_rows(0, std::iter::empty()), Vec::<usize>::new());
    }
}
