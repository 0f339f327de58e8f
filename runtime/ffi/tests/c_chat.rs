//! `tests/c/chat.c` compiled with gcc against the static library and run on the Mixtral
//! fixture converted with a chat template (and once without): `meo_chat_apply_template`
//! renders what the Rust renderer renders and refuses bad input with the documented
//! statuses, `meo_session_generate_with` honours stop strings and stop tokens, and the new
//! sampler fields (penalties, min-p) are applied and range-checked.

mod common;

use meo_converter::convert::{Options, convert};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

const TEMPLATE: &str = "{% if shout %}!!{% endif %}{{ bos_token }}{% for m in messages %}\
    {% if m.role == 'tool' %}{{ raise_exception('no tool messages here') }}{% endif %}\
    <{{ m.role }}>{{ m.content }}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

/// The Mixtral fixture converted to `dir/NAME.meo`, with `tokenizer_config` beside it if given.
fn convert_with(dir: &Path, name: &str, tokenizer_config: Option<&str>) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
    let ck = dir.join(name);
    std::fs::create_dir(&ck).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    if let Some(c) = tokenizer_config {
        std::fs::write(ck.join("tokenizer_config.json"), c).unwrap();
    }
    let out = dir.join(format!("{name}.meo"));
    convert(&ck, &out, Options::default(), &AtomicBool::new(false), |_| {}).unwrap();
    out
}

#[test]
fn c_chat_template_stop_strings_and_penalties() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("chat-test");
    common::build_c(&root.join("tests/c/chat.c"), &exe);
    let cfg = format!(r#"{{"chat_template": {}, "bos_token": "<|endoftext|>"}}"#, serde_json_str(TEMPLATE));
    let model = convert_with(dir.path(), "chat", Some(&cfg));
    let bare = convert_with(dir.path(), "bare", None);

    let out = Command::new(&exe).arg(&model).arg(&bare).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the C chat test failed ({}):\n{stdout}\n{stderr}", out.status);
    let passed: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("ok ")).collect();
    assert_eq!(passed, ["template", "generate", "penalties"], "{stdout}\n{stderr}");

    // What C rendered is what the Rust renderer renders.
    let prompt = stdout.split("--- prompt\n").nth(1).and_then(|s| s.split("\n--- end").next()).unwrap();
    let m = meo::Model::from_vec(std::fs::read(&model).unwrap()).unwrap();
    let t = meo::chat::ChatTemplate::from_model(&m).unwrap();
    let msgs = [
        meo::chat::Message::new("system", "Be brief."),
        meo::chat::Message::new("user", "The value of the object"),
        meo::chat::Message::new("assistant", "is returned."),
        meo::chat::Message::new("user", "Ünïcödé?"),
    ];
    assert_eq!(prompt, t.render(&msgs, true, None).unwrap());
    assert!(prompt.starts_with("<|endoftext|><system>Be brief.\n"), "{prompt}");
}

/// `s` as a JSON string literal.
fn serde_json_str(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
