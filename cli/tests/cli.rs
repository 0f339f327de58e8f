//! The `meo` binary: convert, inspect --json, verify, and its error reporting.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn meo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meo")).args(args).output().expect("run meo")
}

fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    assert!(p.join("config.json").is_file(), "fixture {} is missing", p.display());
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn convert_inspect_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q2.meo");
    let o = meo(&["convert", s(&fixture("qwen2_moe")), "-o", s(&out), "--experts", "int8", "--dense", "f16"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = meo(&["verify", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("OK"));

    let o = meo(&["inspect", "--json", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["format_version"], 1);
    assert_eq!(r["quant_version"], 1);
    assert_eq!(r["file_bytes"], std::fs::metadata(&out).unwrap().len());
    assert_eq!(r["architecture"], "qwen2_moe");
    assert_eq!(r["config"]["model.num_layers"], 3);
    assert_eq!(r["config"]["routing.num_experts"], 8);
    assert_eq!(r["quant"]["experts"], "q8_0");
    assert_eq!(r["quant"]["dense"], "f16");
    assert_eq!(r["quant"]["block_size"], 32);
    assert_eq!(r["tokenizer"], true);
    assert_eq!(r["tensors"], 91);
    assert!(r["dense_bytes"].as_u64().unwrap() > 0);
    let layers = r["layers"].as_array().unwrap();
    let ffn: Vec<&str> = layers.iter().map(|l| l["ffn"].as_str().unwrap()).collect();
    assert_eq!(ffn, ["moe", "dense", "moe"]);
    let mut slab_bytes = 0;
    for l in layers {
        let experts = l["experts"].as_array().unwrap();
        assert_eq!(experts.len(), if l["ffn"] == "moe" { 8 } else { 0 });
        for (i, e) in experts.iter().enumerate() {
            assert_eq!(e["expert"], i);
            assert!(e["alignment"].as_u64().unwrap() >= 16384, "{e}");
            assert_eq!(e["offset"].as_u64().unwrap() % 16384, 0);
            assert_eq!(e["bytes"], r["bytes_per_expert"]);
            slab_bytes += e["bytes"].as_u64().unwrap();
        }
    }
    assert_eq!(r["expert_bytes"], slab_bytes);
    assert_eq!(r["expert_count"], 16);

    let o = meo(&["inspect", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("architecture    qwen2_moe") && text.contains("layer 2 (moe):"), "{text}");
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("config.json"), r#"{"architectures": ["JambaForCausalLM"], "model_type": "jamba"}"#)
        .unwrap();
    let out = tmp.path().join("x.meo");
    let o = meo(&["convert", s(&src), "-o", s(&out)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.starts_with("error: ") && e.trim_end().lines().count() == 1, "{e}");
    assert!(e.contains("JambaForCausalLM") && e.contains("supported: MixtralForCausalLM"), "{e}");
    assert!(!out.exists());

    // verify: a corrupted byte in the data section fails with exit code 1.
    let good = tmp.path().join("good.meo");
    assert!(meo(&["convert", s(&fixture("olmoe")), "-o", s(&good)]).status.success());
    let mut bytes = std::fs::read(&good).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x55;
    let bad = tmp.path().join("bad.meo");
    std::fs::write(&bad, bytes).unwrap();
    let o = meo(&["verify", s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("error: ") && e.contains("checksum"), "{e}");

    let o = meo(&["inspect", s(&src.join("config.json"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("config.json"));
}

#[test]
fn bench_counts_the_kv_cache_it_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixtral.meo");
    let o = meo(&["convert", s(&fixture("mixtral")), "-o", s(&out), "--experts", "int8", "--dense", "int8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = meo(&["bench", s(&out), "--prompt-len", "5", "--gen", "3", "--threads", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    // 2 layers × 2 kv heads × 16 values, keys and values, f32; decode steps read 6, 7 and 8
    // positions.
    let per_position = 2.0 * 2.0 * 16.0 * 2.0 * 4.0;
    assert_eq!(r["kv_bytes_per_token"].as_f64().unwrap(), per_position * 7.0);
    let parts: f64 = ["dense_bytes_per_token", "expert_bytes_per_token", "kv_bytes_per_token"]
        .iter()
        .map(|k| r[*k].as_f64().unwrap())
        .sum();
    assert_eq!(r["bytes_per_token"].as_f64().unwrap(), parts);
}

/// Issue 25: `meo verify` rejected every `--dense int8` file ("dtype q8_0 is not allowed for a
/// Dense tensor") that `meo run` accepts.
#[test]
fn dense_int8_files_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixtral-dense-int8.meo");
    let o = meo(&["convert", s(&fixture("mixtral")), "-o", s(&out), "--dense", "int8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = meo(&["verify", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("OK"));
}

/// A calibration text for `--task` (a few hundred tokens).
fn calibration(dir: &Path) -> PathBuf {
    let p = dir.join("docs.txt");
    let text = "The value of the object is returned. If the argument is a string, it is parsed as a \
                number; otherwise the object must define an index method. A list is a mutable sequence. ";
    std::fs::write(&p, text.repeat(4)).unwrap();
    p
}

/// Issue 25: `meo inspect` showed no task merges and counted their slabs as experts.
#[test]
fn inspect_shows_task_merges_apart_from_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixtral-tasks.meo");
    let calib = calibration(tmp.path());
    let task = format!("docs={}", s(&calib));
    let o = meo(&["convert", s(&fixture("mixtral")), "-o", s(&out), "--task", &task]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = meo(&["inspect", "--json", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = r["layers"].as_array().unwrap();
    let moe_layers: Vec<u64> =
        layers.iter().filter(|l| l["ffn"] == "moe").map(|l| l["layer"].as_u64().unwrap()).collect();
    let routed: u64 = layers.iter().map(|l| l["experts"].as_array().unwrap().len() as u64).sum();
    let experts = r["config"]["routing.num_experts"].as_u64().unwrap();
    assert_eq!(routed, moe_layers.len() as u64 * experts);
    assert_eq!(r["expert_count"], routed, "merged slabs are not experts");
    assert_eq!(r["merged_count"], moe_layers.len());
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1);
    let t = &tasks[0];
    assert_eq!(t["name"], "docs");
    assert_eq!(t["weighting"], "mean_gate");
    assert!(t["tokens"].as_u64().unwrap() > 0);
    let tl = t["layers"].as_array().unwrap();
    assert_eq!(tl.iter().map(|l| l["layer"].as_u64().unwrap()).collect::<Vec<_>>(), moe_layers);
    for l in tl {
        // Measured on the calibration tokens: a relative error, finite and above 0.
        let e = l["error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 10.0, "{l}");
        assert!(l["error_unaligned"].as_f64().is_some(), "{l}");
        assert_eq!(l["bytes"], r["bytes_per_expert"], "a merged expert is one expert's size");
    }
    assert_eq!(t["bytes"], r["merged_bytes"]);
    let slabs = r["expert_bytes"].as_u64().unwrap() + r["merged_bytes"].as_u64().unwrap();
    assert!(slabs + r["dense_bytes"].as_u64().unwrap() <= r["file_bytes"].as_u64().unwrap());

    let o = meo(&["inspect", s(&out)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("task docs (") && text.contains("merge error"), "{text}");
    assert!(text.contains(&format!("({} task-merged experts)", moe_layers.len())), "{text}");
    assert!(text.contains(&format!("({routed} experts,")), "{text}");
}

/// Issue 25: `-o DIR` (or a path in a missing or unwritable folder) failed only after the
/// whole conversion. The checkpoint here is not even readable: the output path must be the
/// first thing checked, with an error naming it.
#[test]
fn convert_checks_the_output_path_first() {
    let tmp = tempfile::tempdir().unwrap();
    let no_checkpoint = tmp.path().join("no-checkpoint");
    let expect = |out: &Path, what: &str, extra: &[&str]| {
        let mut args = vec!["convert", s(&no_checkpoint), "-o", s(out)];
        args.extend_from_slice(extra);
        let o = meo(&args);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(e.contains(&format!("output {}", out.display())) && e.contains(what), "{e}");
        assert!(!e.contains("config.json"), "the checkpoint was read first: {e}");
    };
    expect(tmp.path(), "is a directory", &[]);
    expect(tmp.path(), "is a directory", &["--task", "t=x.txt"]);
    expect(&tmp.path().join("missing/x.meo"), "does not exist", &[]);
    let ro = tmp.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root writes anyway: then there is nothing to check.
        if std::fs::write(ro.join("probe"), b"").is_err() {
            expect(&ro.join("x.meo"), "cannot create a file in", &[]);
        }
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "nothing was left behind");
}

/// The same through the library, with cancellation already requested: a bad output path (or,
/// with `--task`, a missing tokenizer) must be reported before the conversion does any work,
/// where cancellation would be noticed ("interrupted").
#[test]
fn convert_checks_come_before_any_work() {
    use meo_converter::convert::{Options, convert_with};
    use meo_converter::merges::{MergeSpec, TaskSpec, Weighting};
    use std::sync::atomic::AtomicBool;
    let tmp = tempfile::tempdir().unwrap();
    let cancelled = AtomicBool::new(true);
    let calib = calibration(tmp.path());
    let tasks = MergeSpec {
        tasks: vec![TaskSpec { name: "docs".into(), text: calib }],
        weighting: Weighting::MeanGate,
        ..Default::default()
    };
    for spec in [MergeSpec::default(), tasks.clone()] {
        let e = convert_with(&fixture("mixtral"), tmp.path(), Options::default(), &spec, &cancelled, |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
    }

    // A checkpoint without tokenizer.json.
    let ckpt = tmp.path().join("mixtral");
    std::fs::create_dir(&ckpt).unwrap();
    for f in std::fs::read_dir(fixture("mixtral")).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "tokenizer.json" {
            std::fs::copy(f.path(), ckpt.join(f.file_name())).unwrap();
        }
    }
    let out = tmp.path().join("x.meo");
    let e = format!("{:#}", convert_with(&ckpt, &out, Options::default(), &tasks, &cancelled, |_| {}).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");
    // A missing calibration text, the tokenizer present.
    let missing =
        MergeSpec { tasks: vec![TaskSpec { name: "docs".into(), text: tmp.path().join("nope.txt") }], ..tasks };
    let e = format!(
        "{:#}",
        convert_with(&fixture("mixtral"), &out, Options::default(), &missing, &cancelled, |_| {}).unwrap_err()
    );
    assert!(e.contains("nope.txt"), "{e}");
    assert!(!out.exists());
}

/// `meo convert --task` without tokenizer.json fails at once, naming the file.
#[test]
fn task_without_tokenizer_fails_before_converting() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("mixtral");
    std::fs::create_dir(&ckpt).unwrap();
    for f in std::fs::read_dir(fixture("mixtral")).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "tokenizer.json" {
            std::fs::copy(f.path(), ckpt.join(f.file_name())).unwrap();
        }
    }
    let task = format!("docs={}", s(&calibration(tmp.path())));
    let out = tmp.path().join("x.meo");
    let o = meo(&["convert", s(&ckpt), "-o", s(&out), "--task", &task]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// Issue 25: `meo bench --json` reported the requested `--threads` (0) instead of the count the
/// session runs with; 0 means one per physical core (`meo::kernels::default_threads`).
#[test]
fn bench_reports_the_threads_it_ran_with() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixtral.meo");
    assert!(meo(&["convert", s(&fixture("mixtral")), "-o", s(&out)]).status.success());
    for (asked, used) in [("0", meo::kernels::default_threads()), ("3", 3)] {
        let o = meo(&["bench", s(&out), "--prompt-len", "4", "--gen", "2", "--threads", asked, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["threads"], used, "--threads {asked}");
        assert_eq!(r["target"], format!("cpu, {used} threads"));
    }
    for cmd in ["run", "bench"] {
        let o = meo(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(help.contains("0 = one per physical core"), "{help}");
    }
}

/// Runs `meo ARGS` with its stdout closed before it writes anything.
fn meo_closed_stdout(args: &[&str]) -> Output {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_meo"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meo");
    drop(child.stdout.take());
    child.wait_with_output().expect("wait for meo")
}

/// Issue 25: `meo run … | head` exited 1 with "Broken pipe" (and `meo bench` panicked):
/// a closed stdout ends a command quietly with status 0, as Unix tools do.
#[test]
fn closed_stdout_exits_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixtral.meo");
    assert!(meo(&["convert", s(&fixture("mixtral")), "-o", s(&out)]).status.success());
    let runs: [&[&str]; 5] = [
        &["run", s(&out), "-p", "The value of", "--max-new-tokens", "40"],
        &["run", s(&out), "--tokens", "1,2,3", "--max-new-tokens", "40"],
        &["bench", s(&out), "--prompt-len", "4", "--gen", "2"],
        &["bench", s(&out), "--prompt-len", "4", "--gen", "2", "--json"],
        &["inspect", s(&out)],
    ];
    for args in runs {
        let o = meo_closed_stdout(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

/// Issue 25: a truncated file's error repeated its message ("not a valid .meo file: X: X").
#[test]
fn a_truncated_file_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.meo");
    assert!(meo(&["convert", s(&fixture("mixtral")), "-o", s(&good)]).status.success());
    let bytes = std::fs::read(&good).unwrap();
    for len in [100, 4096, bytes.len() / 2] {
        let bad = tmp.path().join(format!("cut-{len}.meo"));
        std::fs::write(&bad, &bytes[..len]).unwrap();
        // The error type itself: no cause in the chain repeats what its parent already says.
        let e = meo::Model::open(&bad).err().unwrap();
        let mut chain: Vec<String> = vec![e.to_string()];
        let mut c: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(x) = c {
            chain.push(x.to_string());
            c = x.source();
        }
        for w in chain.windows(2) {
            assert!(!w[0].contains(&w[1]), "{len}: {chain:?}");
        }
        for args in [["run", s(&bad), "--tokens", "1"].as_slice(), &["bench", s(&bad)], &["inspect", s(&bad)]] {
            let o = meo(args);
            assert_eq!(o.status.code(), Some(1));
            let e = stderr(&o);
            let e = e.trim_end();
            assert!(e.starts_with("error: ") && e.lines().count() == 1, "{e}");
            // The innermost message (after the last ": ") appears once.
            let last = e.rsplit(": ").next().unwrap();
            assert_eq!(e.matches(last).count(), 1, "{args:?}: {e}");
        }
    }
}

/// Issue 25: `meo devices` printed Mesa's "XDG_RUNTIME_DIR is invalid or not set" when the
/// variable was unset (sudo, cron, CI); meo now points it at a private directory.
#[cfg(feature = "wgpu")]
#[test]
fn devices_without_xdg_runtime_dir_is_quiet() {
    for value in [None, Some("relative"), Some("/no/such/dir")] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meo"));
        c.arg("devices");
        match value {
            None => c.env_remove("XDG_RUNTIME_DIR"),
            Some(v) => c.env("XDG_RUNTIME_DIR", v),
        };
        let o = c.output().expect("run meo");
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!stderr(&o).contains("XDG_RUNTIME_DIR"), "{value:?}: {}", stderr(&o));
    }
}
