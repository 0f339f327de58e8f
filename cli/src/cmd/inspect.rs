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

/// `layers.L.experts.E` → `(L, E)`.
fn slab_ids(key: &str) -> Option<(usize, usize)> {
    let rest = key.strip_prefix("layers.")?;
    let (l, e) = rest.split_once(".experts.")?;
    Some((l.parse().ok()?, e.parse().ok()?))
}

/// The JSON report of `f` (documented in `docs/CLI.md`).
pub fn report(f: &MeoFile<'_>) -> Value {
    let m = &f.metadata;
    let h = &f.header;
    let mut config = Map::new();
    let mut quant = Map::new();
    for (k, v) in m.entries() {
        if k.starts_with("model.") || k.starts_with("routing.") {
            config.insert((*k).to_string(), meta_json(v));
        } else if let Some(q) = k.strip_prefix("quant.") {
            quant.insert(q.to_string(), meta_json(v));
        }
    }
    // Expert tables, grouped by layer.
    let mut by_layer: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let mut expert_bytes = 0u64;
    let mut slab_count = 0u64;
    let mut in_slab = vec![false; f.tensors().len()];
    for s in f.slabs() {
        in_slab[s.tensors.clone()].iter_mut().for_each(|b| *b = true);
        expert_bytes += s.len;
        slab_count += 1;
        let offset = h.data_offset + s.offset;
        let (layer, expert) = slab_ids(s.key).unwrap_or((usize::MAX, 0));
        by_layer.entry(layer).or_default().push(json!({
            "expert": expert,
            "offset": offset,
            "bytes": s.len,
            "alignment": alignment_of(offset),
        }));
    }
    let dense_bytes: u64 = f.tensors().iter().zip(&in_slab).filter(|(_, s)| !**s).map(|(t, _)| t.len).sum();
    let ffn: Vec<&str> = match m.get("model.layer_ffn") {
        Some(MetaValue::Array(MetaArray::Str(v))) => v.clone(),
        _ => Vec::new(),
    };
    let num_layers = ffn.len().max(by_layer.keys().filter(|&&l| l != usize::MAX).map(|l| l + 1).max().unwrap_or(0));
    let layers: Vec<Value> = (0..num_layers)
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
        "tensors": f.tensors().len(),
        "dense_bytes": dense_bytes,
        "expert_bytes": expert_bytes,
        "expert_count": slab_count,
        "bytes_per_expert": expert_bytes.checked_div(slab_count).unwrap_or(0),
        "layers": layers,
    })
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
    let _ = writeln!(s, "tensors         {}", g("tensors"));
    let _ = writeln!(s, "dense bytes     {}", g("dense_bytes"));
    let _ = writeln!(
        s,
        "expert bytes    {} ({} experts, {} bytes per expert)",
        g("expert_bytes"),
        g("expert_count"),
        g("bytes_per_expert")
    );
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
                let _ =
                    writeln!(s, "  {:>6} {:>14} {:>12} {:>10}", n("expert"), n("offset"), n("bytes"), n("alignment"));
            }
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
