//! Expert compression at conversion (`--compress`, issue 23): a pruned file stores exactly the
//! kept experts and router rows, records what was done, passes `verify`, and routes by the
//! documented rule (docs/ROUTING.md, "Compressed files"): the top-k over the survivors'
//! router logits, weighted by the family's rule (Mixtral: softmax over the survivors,
//! renormalised over the top-k).

use meo::format::{MetaArray, MetaValue};
use meo::route::Choice;
use meo::{DType, Logits, Model, Session, SessionOptions, Trace};
use meo_converter::compress::{CompressSpec, Method, keys};
use meo_converter::convert::{self, Options};
use meo_converter::merges::MergeSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn trained(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trained").join(name)
}

/// Real text (the routing spec), enough tokens to route every expert.
fn calib(dir: &Path) -> PathBuf {
    let p = dir.join("calib.txt");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ROUTING.md")).unwrap();
    std::fs::write(&p, &text[..text.len().min(12_000)]).unwrap();
    p
}

fn opts() -> Options {
    Options { experts: DType::Q8_0, dense: DType::F16, align: false }
}

fn compressed(model: &str, method: Method, fraction: f64, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{model}-{}-{fraction}.meo", method.name()));
    let spec =
        MergeSpec { calib: Some(calib(dir)), compress: Some(CompressSpec { method, fraction }), ..Default::default() };
    convert::convert_with(&trained(model), &out, opts(), &spec, &AtomicBool::new(false), |_| {})
        .unwrap_or_else(|e| panic!("convert --compress: {e:#}"));
    out
}

fn u64s(m: &Model, key: &str) -> Vec<u64> {
    match m.file().unwrap().metadata.get(key) {
        Some(MetaValue::Array(MetaArray::U64(v))) => v.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

fn f32_tensor(m: &Model, name: &str) -> Vec<f32> {
    let f = m.file().unwrap();
    let t = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(t.dtype, DType::F32, "{name}: routers stay f32");
    f.data(t).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[derive(Default)]
struct Rec {
    x: BTreeMap<usize, Vec<f32>>,
    routes: BTreeMap<usize, Vec<Choice>>,
}

impl Trace for Rec {
    fn on_moe_input(&mut self, layer: usize, _pos0: usize, x: &[f32]) {
        self.x.entry(layer).or_default().extend_from_slice(x);
    }
    fn on_route(&mut self, layer: usize, _pos: usize, choices: &[Choice]) {
        self.routes.entry(layer).or_default().extend_from_slice(choices);
    }
}

#[test]
fn pruned_files_keep_the_chosen_experts_and_route_over_the_survivors() {
    let tmp = tempfile::tempdir().unwrap();
    let full_path = tmp.path().join("full.meo");
    convert::convert(&trained("mixtral-upcycled"), &full_path, opts(), &AtomicBool::new(false), |_| {}).unwrap();
    let full = Model::open(&full_path).unwrap();
    let (e, k, h) = (8, 2, full.config().hidden_size);
    for (method, fraction, keep) in [(Method::Reap, 0.5, 4), (Method::Prune, 0.75, 2), (Method::Eep, 0.5, 4)] {
        let path = compressed("mixtral-upcycled", method, fraction, tmp.path());
        let m = Model::open(&path).unwrap();
        m.file().unwrap().verify().unwrap();
        assert_eq!(m.config().router.num_experts, keep);
        let meta = &m.file().unwrap().metadata;
        assert_eq!(meta.get(keys::METHOD), Some(&MetaValue::Str(method.name())));
        assert_eq!(meta.get(keys::EXPERTS_BEFORE), Some(&MetaValue::U64(e as u64)));
        let sha = std::fs::read(calib(tmp.path())).map(|b| meo_converter::compress::sha256(&b)).unwrap();
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(meta.get(keys::CALIB_SHA256), Some(&MetaValue::Str(&hex)));
        let Some(MetaValue::Array(MetaArray::F64(errors))) = meta.get(keys::ERRORS) else { panic!("no errors") };
        assert_eq!(errors.len(), 4);
        assert!(errors.iter().all(|&x| x > 0.0 && x < 1.0), "{errors:?}");

        let mut rec = Rec::default();
        let mut s = Session::new(&m, SessionOptions::default()).unwrap();
        let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 512).collect();
        s.forward_with(&prompt, Logits::Last, &mut rec).unwrap();
        for l in m.moe_layers() {
            let kept = u64s(&m, &keys::kept(l));
            assert_eq!(kept.len(), keep);
            assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept.iter().all(|&x| x < e as u64), "{kept:?}");
            // The kept experts are the original slabs, byte for byte.
            for (j, &orig) in kept.iter().enumerate() {
                let a = &m.bytes()[m.expert_slab(l, j).unwrap()];
                let b = &full.bytes()[full.expert_slab(l, orig as usize).unwrap()];
                assert!(a == b, "layer {l}: stored expert {j} is not original expert {orig}");
            }
            // The routing rule, from the ORIGINAL router's rows of the survivors.
            let router = f32_tensor(&full, &format!("layers.{l}.router.weight"));
            let x = &rec.x[&l];
            for (t, got) in rec.routes[&l].chunks(k).enumerate() {
                let xt = &x[t * h..(t + 1) * h];
                let logits: Vec<f32> = kept
                    .iter()
                    .map(|&o| router[o as usize * h..][..h].iter().zip(xt).map(|(a, b)| a * b).sum())
                    .collect();
                let mut order: Vec<usize> = (0..keep).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                let top = &order[..k];
                let mx = logits[top[0]];
                let z: f32 = top.iter().map(|&j| (logits[j] - mx).exp()).sum();
                let mut want: Vec<(u32, f32)> = top.iter().map(|&j| (j as u32, (logits[j] - mx).exp() / z)).collect();
                want.sort_by_key(|w| w.0);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.expert, w.0, "layer {l} token {t}");
                    assert!((g.weight - w.1).abs() < 1e-5, "layer {l} token {t}: {} vs {}", g.weight, w.1);
                }
            }
        }
    }
}

/// The router's logits and top-k weights of `rows` (`[n, h]`) for `x`, by the Mixtral rule.
fn mixtral_route(rows: &[f32], x: &[f32], k: usize) -> Vec<(u32, f32)> {
    let h = x.len();
    let logits: Vec<f32> = rows.chunks_exact(h).map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let top = &order[..k];
    let mx = logits[top[0]];
    let z: f32 = top.iter().map(|&j| (logits[j] - mx).exp()).sum();
    let mut want: Vec<(u32, f32)> = top.iter().map(|&j| (j as u32, (logits[j] - mx).exp() / z)).collect();
    want.sort_by_key(|w| w.0);
    want
}

#[test]
fn mc_smoe_groups_route_by_their_dominant_experts_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let full_path = tmp.path().join("full.meo");
    convert::convert(&trained("mixtral-scratch"), &full_path, opts(), &AtomicBool::new(false), |_| {}).unwrap();
    let full = Model::open(&full_path).unwrap();
    let path = compressed("mixtral-scratch", Method::McSmoe, 0.5, tmp.path());
    let m = Model::open(&path).unwrap();
    m.file().unwrap().verify().unwrap();
    let (k, h) = (2, m.config().hidden_size);
    assert_eq!(m.config().router.num_experts, 4);
    let mut rec = Rec::default();
    let mut s = Session::new(&m, SessionOptions::default()).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| (i * 53 + 5) % 512).collect();
    s.forward_with(&prompt, Logits::Last, &mut rec).unwrap();
    for l in m.moe_layers() {
        let kept = u64s(&m, &keys::kept(l));
        let group = u64s(&m, &keys::group(l));
        let Some(MetaValue::Array(MetaArray::F64(freq))) = m.file().unwrap().metadata.get(&keys::saliency(l)).cloned()
        else {
            panic!("no saliency")
        };
        // Every original expert is in one group; a group's dominant expert is its most used.
        assert_eq!(group.len(), 8);
        for (j, &d) in kept.iter().enumerate() {
            assert_eq!(group[d as usize], j as u64, "layer {l}: dominant {d} outside its group");
            for x in (0..8).filter(|&x| group[x] == j as u64) {
                assert!(freq[x] <= freq[d as usize], "layer {l}: {x} used more than its dominant {d}");
            }
        }
        // A stored expert that merged others is not its dominant expert's slab; one alone is.
        for (j, &d) in kept.iter().enumerate() {
            let alone = group.iter().filter(|&&g| g == j as u64).count() == 1;
            let same =
                m.bytes()[m.expert_slab(l, j).unwrap()] == full.bytes()[full.expert_slab(l, d as usize).unwrap()];
            assert_eq!(same, alone, "layer {l} stored expert {j}");
        }
        let router = f32_tensor(&full, &format!("layers.{l}.router.weight"));
        let rows: Vec<f32> = kept.iter().flat_map(|&d| router[d as usize * h..][..h].to_vec()).collect();
        assert_eq!(f32_tensor(&m, &format!("layers.{l}.router.weight")), rows, "layer {l}: group rows");
        for (t, got) in rec.routes[&l].chunks(k).enumerate() {
            let want = mixtral_route(&rows, &rec.x[&l][t * h..(t + 1) * h], k);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.expert, w.0, "layer {l} token {t}");
                assert!((g.weight - w.1).abs() < 1e-5, "layer {l} token {t}");
            }
        }
    }
}

#[test]
fn compress_refuses_what_it_cannot_do_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.meo");
    let c = |method, fraction| Some(CompressSpec { method, fraction });
    for (spec, want) in [
        (MergeSpec { compress: c(Method::Reap, 0.5), ..Default::default() }, "needs --calib"),
        (
            MergeSpec { calib: Some(calib(tmp.path())), compress: c(Method::Prune, 0.9), ..Default::default() },
            "fewer than",
        ),
        (
            MergeSpec { calib: Some(calib(tmp.path())), compress: c(Method::Prune, 0.01), ..Default::default() },
            "removes no expert",
        ),
    ] {
        let err =
            convert::convert_with(&trained("mixtral-scratch"), &out, opts(), &spec, &AtomicBool::new(false), |_| {})
                .unwrap_err();
        assert!(format!("{err:#}").contains(want), "{err:#}");
        let left: Vec<_> =
            std::fs::read_dir(tmp.path()).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "left behind: {left:?}");
    }
}
