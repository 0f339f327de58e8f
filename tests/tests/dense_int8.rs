//! `meo convert --dense int8`: every dense matrix (embeddings, attention, dense/shared FFN, LM
//! head) stored Q8_0 like the experts. Not exact; measured against the reference on every
//! fixture: next-token top-1 and routing (top-k sets) agreement over the prompt.

use meo::{DType, Model, Session, SessionOptions, Trace};
use meo_tests::conformance::{FIXTURES, convert_fixture, reference};
use std::collections::BTreeMap;

#[derive(Default)]
struct Routes(BTreeMap<(usize, usize), Vec<u32>>);

impl Trace for Routes {
    fn on_route(&mut self, layer: usize, pos: usize, choices: &[meo::Choice]) {
        self.0.insert((layer, pos), choices.iter().map(|c| c.expert).collect());
    }
}

#[test]
fn dense_int8_keeps_top1_and_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut top1, mut top1_all, mut routed, mut routed_all) = (0, 0, 0, 0);
    for name in FIXTURES {
        let path = convert_fixture(name, DType::Q8_0, DType::Q8_0, tmp.path());
        let model = Model::open(&path).unwrap();
        let file = model.file().unwrap();
        assert_eq!(file.tensor(meo::names::EMBED).map(|t| t.dtype), Some(DType::Q8_0), "{name}: embedding int8");
        let rf = reference(name);
        let mut s = Session::new(&model, SessionOptions { threads: 2, ..Default::default() }).unwrap();
        let mut routes = Routes::default();
        let logits = s.forward_traced(&rf.input_ids, &mut routes).unwrap().to_vec();
        for (a, b) in logits.chunks(rf.vocab).zip(rf.logits.chunks(rf.vocab)) {
            top1_all += 1;
            top1 += usize::from(meo::sample::argmax(a) == meo::sample::argmax(b));
        }
        for (l, (idx, _)) in &rf.routing {
            for p in 0..rf.input_ids.len() {
                let mut want = idx[p * rf.top_k..][..rf.top_k].to_vec();
                want.sort_unstable();
                routed_all += 1;
                routed += usize::from(routes.0.get(&(*l, p)) == Some(&want));
            }
        }
    }
    let (t, r) = (top1 as f64 / top1_all as f64, routed as f64 / routed_all as f64);
    eprintln!("dense int8: top-1 {top1}/{top1_all} ({t:.3}), routing {routed}/{routed_all} ({r:.3})");
    assert!(t >= 0.9, "top-1 agreement {t}");
    assert!(r >= 0.9, "routing agreement {r}");
}
