//! `meo serve` on a loopback port: the OpenAI-compatible endpoints answered over plain HTTP
//! (non-streamed with usage, streamed as server-sent events), 4xx errors for out-of-range
//! requests and oversized bodies, concurrent requests; and, when `MEO_OPENAI_PYTHON` names a
//! Python with the official `openai` client (PyPI `openai`; ci/setup installs it into the
//! repository's `.py/`, which the test puts on `PYTHONPATH`), `openai_client.py` run against it.
#![cfg(feature = "serve")]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Converts the Mixtral fixture with a chat template to `dir/chat.meo`.
fn model(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
    let ck = dir.join("ck");
    std::fs::create_dir(&ck).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    let cfg = serde_json::json!({
        "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        "bos_token": "<|endoftext|>",
    });
    std::fs::write(ck.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let out = dir.join("chat.meo");
    let o = Command::new(env!("CARGO_BIN_EXE_meo"))
        .args(["convert", ck.to_str().unwrap(), "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A running `meo serve`, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meo"))
        .arg("serve")
        .arg(model)
        .args(["--port", "0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.rsplit(':').next().and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("{line}"));
    assert!(line.contains("http://127.0.0.1:"), "bound to loopback by default: {line}");
    Server { child, port }
}

/// One HTTP/1.1 request; (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn openai_endpoints_streaming_limits_and_concurrency() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let srv = serve(&m, &["--parallel", "2", "--max-tokens-limit", "32", "--max-body", "4096"]);
    let p = srv.port;

    assert_eq!(http(p, "GET", "/health", "").0, 200);
    let (st, body) = http(p, "GET", "/v1/models", "");
    assert_eq!((st, json(&body)["data"][0]["id"].as_str()), (200, Some("chat")));

    let req = r#"{"model": "chat", "messages": [{"role": "user", "content": "The value"}], "max_tokens": 6, "temperature": 0}"#;
    let (st, body) = http(p, "POST", "/v1/chat/completions", req);
    assert_eq!(st, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["object"], "chat.completion");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let u = &r["usage"];
    // bos + "<user>The value\n<assistant>" in the fixture's byte-level BPE.
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5, "{u}");
    assert_eq!(u["completion_tokens"], 6);
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + 6));

    // Streamed: the same text in chunks, the finish reason, usage on request, [DONE].
    let sreq = req.replace(
        "\"temperature\": 0}",
        "\"temperature\": 0, \"stream\": true, \"stream_options\": {\"include_usage\": true}}",
    );
    let (st, body) = http(p, "POST", "/v1/chat/completions", &sreq);
    assert_eq!(st, 200);
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| json(e)).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect::<Vec<_>>(), ["length"]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    // The same prompt again: all but its last token come from the session's cache.
    let p1 = u["prompt_tokens"].as_u64().unwrap();
    assert_eq!(chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(p1 - 1));
    // The next turn of the conversation, resent whole: turn 1's prompt is reused.
    let turn2 = serde_json::json!({"messages": [{"role": "user", "content": "The value"},
        {"role": "assistant", "content": text}, {"role": "user", "content": "is returned."}],
        "max_tokens": 4, "temperature": 0});
    let (st, body) = http(p, "POST", "/v1/chat/completions", &turn2.to_string());
    assert_eq!(st, 200, "{body}");
    let u2 = &json(&body)["usage"];
    let cached = u2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= p1 && cached < u2["prompt_tokens"].as_u64().unwrap(), "{u2} after a first prompt of {p1}");

    let (st, body) = http(p, "POST", "/v1/completions", r#"{"prompt": "The value", "max_tokens": 3}"#);
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["usage"]["prompt_tokens"], 2);

    // Limits: clear 4xx errors in the OpenAI shape.
    for (bad, want) in [
        (r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 33}"#, "at most 32"),
        (r#"{"messages": []}"#, "must not be empty"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "top_p": 0}"#, "top-p"),
        (r#"{"messages": "x"}"#, "must be a list"),
        (r#"{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": 3}"#, "must be an object"),
        ("{not json", ""),
    ] {
        let (st, body) = http(p, "POST", "/v1/chat/completions", bad);
        assert_eq!(st, 400, "{bad}: {body}");
        let e = json(&body);
        assert!(e["error"]["message"].as_str().unwrap().contains(want), "{bad}: {body}");
    }
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5000));
    assert_eq!(http(p, "POST", "/v1/completions", &huge).0, 413);
    let long = format!(r#"{{"prompt": "{}", "max_tokens": 1}}"#, "The value ".repeat(300));
    let (st, body) = http(p, "POST", "/v1/completions", &long);
    assert!(st == 400 || st == 413, "{st} {body}");

    // Concurrent requests (two sessions, the rest queued) all get the greedy answer.
    let answers: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| http(p, "POST", "/v1/chat/completions", req))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .map(|(st, b)| {
                assert_eq!(st, 200, "{b}");
                json(&b)["choices"][0]["message"]["content"].as_str().unwrap().to_string()
            })
            .collect()
    });
    assert!(answers.iter().all(|a| *a == text), "{answers:?} vs {text:?}");

    match std::env::var_os("MEO_OPENAI_PYTHON") {
        Some(py) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
            let mut cmd = Command::new(py);
            // ci/setup installs the client into the repository's .py/ (as the ONNX checker).
            let dot_py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.py");
            if dot_py.join("openai").is_dir() {
                cmd.env("PYTHONPATH", dot_py);
            }
            let o = cmd.arg(script).arg(format!("http://127.0.0.1:{p}/v1")).output().unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "the openai client test failed:\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(out.contains("ok concurrent") && out.contains("ok chat stream usage"), "{out}");
        }
        None => eprintln!(
            "NOTE: the openai-client half of this test did not run: set MEO_OPENAI_PYTHON to a Python with `pip install openai`"
        ),
    }
}
