//! `meo run` end to end (argument parsing → output), in process through
//! `meo_cli::cmd::run::{Args::parse_from, run_to}` on converted fixtures (f32).

use meo::DType;
use meo::tokenizer::Tokenizer;
use meo_cli::cmd::run::{Args, run_to};
use meo_tests::conformance::{convert_fixture, reference};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

const FAMILIES: [&str; 4] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];

/// Runs `meo run ARGS…`; returns (stdout, stderr), or the error message.
fn meo_run(args: &[&str]) -> Result<(String, String), String> {
    let a = Args::parse_from(args).map_err(|e| e.to_string())?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    run_to(&a, &mut out, &mut err).map_err(|e| format!("{e:#}"))?;
    Ok((String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap()))
}

fn ids_csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn f32s(t: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn tokens_give_the_reference_greedy_continuation_and_dump_matches() {
    let dir = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let r = reference(name);
        let file = convert_fixture(name, DType::F32, DType::F32, dir.path());
        let dump = dir.path().join(format!("{name}.dump.safetensors"));
        let n = r.greedy.len().to_string();
        let prompt = ids_csv(&r.input_ids);
        let (out, err) = meo_run(&[
            file.to_str().unwrap(),
            "--tokens",
            &prompt,
            "--max-new-tokens",
            &n,
            "--dump",
            dump.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(err.is_empty(), "{name}: unexpected stderr {err:?}");
        let got: Vec<u32> = out.trim_end_matches('\n').split(' ').map(|s| s.parse().unwrap()).collect();
        assert_eq!(out.lines().count(), 1, "{name}: one line of ids");
        assert_eq!(got, r.greedy, "{name}: greedy continuation");

        let bytes = std::fs::read(&dump).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (t, v, k) = (r.input_ids.len(), r.vocab, r.top_k);
        let logits = st.tensor("logits").unwrap();
        assert_eq!((logits.dtype(), logits.shape()), (Dtype::F32, &[t, v][..]), "{name}: logits");
        let max_err = f32s(&logits).iter().zip(&r.logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_err <= 1e-4, "{name}: dumped logits differ from the reference by {max_err}");
        let mut layers: Vec<usize> = Vec::new();
        for n in st.names() {
            if let Some(l) = n.strip_prefix("layers.").and_then(|s| s.strip_suffix(".topk_indices")) {
                layers.push(l.parse().unwrap());
            }
        }
        layers.sort_unstable();
        assert_eq!(layers, r.routing.keys().copied().collect::<Vec<_>>(), "{name}: one entry per MoE layer");
        for (l, (ref_idx, ref_w)) in &r.routing {
            let idx = st.tensor(&format!("layers.{l}.topk_indices")).unwrap();
            let w = st.tensor(&format!("layers.{l}.topk_weights")).unwrap();
            assert_eq!((idx.dtype(), idx.shape()), (Dtype::I64, &[t, k][..]), "{name} layer {l}");
            assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[t, k][..]), "{name} layer {l}");
            let idx: Vec<i64> = idx.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
            for row in idx.chunks(k) {
                assert!(row.windows(2).all(|p| p[0] < p[1]), "{name} layer {l}: row {row:?} not ascending");
            }
            assert_eq!(idx.iter().map(|&x| x as u32).collect::<Vec<_>>(), *ref_idx, "{name} layer {l}: experts");
            for (a, b) in f32s(&w).iter().zip(ref_w) {
                assert!((a - b).abs() <= 1e-5, "{name} layer {l}: weight {a} vs {b}");
            }
        }
    }
}

fn fixture_tokenizer() -> Tokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mixtral/tokenizer.json");
    Tokenizer::from_json(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn prompt_text_gives_the_decoded_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference("mixtral");
    let file = convert_fixture("mixtral", DType::F32, DType::F32, dir.path());
    let (out, _) = meo_run(&[
        file.to_str().unwrap(),
        "-p",
        "The value of the object is returned.",
        "--max-new-tokens",
        &r.greedy.len().to_string(),
        "--temperature",
        "0",
    ])
    .unwrap();
    let want = fixture_tokenizer().decode(&r.greedy).unwrap();
    assert_eq!(out, format!("{want}\n"));
}

#[test]
fn sampling_is_seeded_and_stats_go_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let file = convert_fixture("olmoe", DType::Q8_0, DType::F16, dir.path());
    let f = file.to_str().unwrap();
    let run = |seed: &str| {
        let args = [
            f,
            "--tokens",
            "193,255,160",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
        ];
        let mut args = args.to_vec();
        args.extend(["--seed", seed, "--stats", "--threads", "1"]);
        meo_run(&args).unwrap()
    };
    let (a, err) = run("7");
    let (b, _) = run("7");
    let (c, _) = run("8");
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed, other tokens");
    assert_eq!(a.lines().count(), 1);
    for key in ["prompt:", "decode:", "tokens/s", "experts touched per layer:", "expert bytes resident:", "peak RSS:"] {
        assert!(err.contains(key), "--stats lacks {key:?}: {err}");
    }
}

#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    // Neither or both of -p and --tokens.
    assert!(Args::parse_from(["x.meo"]).is_err());
    assert!(Args::parse_from(["x.meo", "-p", "hi", "--tokens", "1"]).is_err());
    assert!(Args::parse_from(["x.meo", "--tokens", "1,a"]).is_err());
    let a = Args::parse_from(["x.meo", "--tokens", "1,2,3", "--memory-budget", "64M"]).unwrap();
    assert_eq!(a.tokens.as_deref(), Some(&[1, 2, 3][..]));
    assert_eq!(a.memory.memory_budget, meo_cli::cmd::memory::Budget::Bytes(64 << 20));
    assert_eq!(
        Args::parse_from(["x.meo", "--tokens", "1"]).unwrap().memory.memory_budget,
        meo_cli::cmd::memory::Budget::Auto
    );
    assert!(Args::parse_from(["x.meo", "--tokens", "1", "--memory-budget", "lots"]).is_err());
    assert!(Args::parse_from(["x.meo", "--tokens", "1", "--cache-policy", "mru"]).is_err());
    // A file without an embedded tokenizer: -p says to use --tokens.
    let file = dir.path().join("no-tokenizer.meo");
    let src = convert_fixture("mixtral", DType::F32, DType::F32, dir.path());
    strip_tokenizer(&src, &file);
    let e = meo_run(&[file.to_str().unwrap(), "-p", "hello"]).unwrap_err();
    assert!(e.contains("--tokens"), "{e}");
    let (out, _) = meo_run(&[file.to_str().unwrap(), "--tokens", "1,2", "--max-new-tokens", "3"]).unwrap();
    assert_eq!(out.split_whitespace().count(), 3);
    // Out-of-vocabulary ids and bad sampling settings are errors, not panics.
    assert!(meo_run(&[file.to_str().unwrap(), "--tokens", "999"]).is_err());
    assert!(meo_run(&[file.to_str().unwrap(), "--tokens", "1", "--top-p", "0"]).is_err());
}

/// Rewrites `src` without its tokenizer metadata (same tensors) into `dst`.
fn strip_tokenizer(src: &Path, dst: &Path) {
    use meo::format::Metadata;
    use meo_converter::writer::{MeoWriter, TensorSpec};
    let bytes = std::fs::read(src).unwrap();
    let f = meo::MeoFile::parse(&bytes).unwrap();
    let entries =
        f.metadata.entries().iter().filter(|(k, _)| *k != meo::tokenizer::METADATA_KEY).cloned().collect::<Vec<_>>();
    let meta = Metadata::from_entries(entries);
    let specs: Vec<TensorSpec> = f
        .tensors()
        .iter()
        .map(|t| TensorSpec { name: t.name.to_string(), dtype: t.dtype, shape: t.shape().to_vec() })
        .collect();
    let mut w = MeoWriter::new(std::fs::File::create(dst).unwrap(), &meta, specs, f.header.alignment).expect("writer");
    for t in f.tensors() {
        w.write_tensor(f.data(t)).unwrap();
    }
    w.finish().unwrap();
}
