//! `meo chat` and `meo run --chat` on a tiny fixture model given a chat template: turns are
//! streamed, the second turn feeds only its new tokens (the first turn's are reused from the
//! KV cache), `/reset` starts over, and a model without a template is refused clearly.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ '\\n' }}{% endfor %}\
                        {% if add_generation_prompt %}<assistant>{% endif %}";

fn meo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meo"))
}

/// Converts a copy of the Mixtral fixture, with `tokenizer_config` written beside it (if
/// given), to `dir/NAME.meo`.
fn convert(dir: &Path, name: &str, tokenizer_config: Option<&str>) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
    let ck = dir.join(name);
    std::fs::create_dir(&ck).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    if let Some(c) = tokenizer_config {
        std::fs::write(ck.join("tokenizer_config.json"), c).unwrap();
    }
    let out = dir.join(format!("{name}.meo"));
    let o = meo().args(["convert", ck.to_str().unwrap(), "-o", out.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn with_template(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "chat_template": TEMPLATE,
        "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|endoftext|>", "special": true},
    });
    convert(dir, "chat", Some(&cfg.to_string()))
}

/// `[turn N] conversation C tokens, reused R, fed F, generated G (…)`: (C, R, F, G).
fn turn_line(line: &str) -> Option<(usize, usize, usize, usize)> {
    let rest = line.strip_prefix("[turn ")?;
    let num = |key: &str| -> Option<usize> {
        let at = rest.find(key)? + key.len();
        rest[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some((num("conversation")?, num("reused")?, num("fed")?, num("generated")?))
}

#[test]
fn chat_reuses_the_cache_across_turns() {
    let tmp = tempfile::tempdir().unwrap();
    let model = with_template(tmp.path());
    let mut child = meo()
        .args(["chat", model.to_str().unwrap(), "--verbose", "--max-new-tokens", "6", "--system", "Be brief."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let out = child.stdout.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(out), &mut s).unwrap();
        s
    });
    let mut stats = Vec::new();
    let mut others = Vec::new();
    // Type a turn, wait for its stats line (the reply was streamed before it), type the next.
    for msg in ["The value of the object", "is returned.", "/reset", "The value"] {
        writeln!(stdin, "{msg}").unwrap();
        stdin.flush().unwrap();
        let want = if msg == "/reset" { "(conversation reset" } else { "[turn" };
        loop {
            let line = rx.recv_timeout(Duration::from_secs(120)).expect("meo chat answered");
            if line.starts_with(want) {
                if let Some(t) = turn_line(&line) {
                    stats.push(t);
                }
                break;
            }
            others.push(line);
        }
    }
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let stdout = stdout_reader.join().unwrap();
    assert!(status.success(), "{others:?}");
    assert_eq!(stats.len(), 3, "{others:?}");
    let (c1, r1, f1, g1) = stats[0];
    assert_eq!((r1, f1), (0, c1), "turn 1 feeds the whole rendering");
    assert!(g1 >= 1);
    let (c2, r2, f2, _) = stats[1];
    // Turn 2 renders turn 1 (prompt and reply) and the new message: at least the whole
    // turn-1 prompt comes from the cache, only the rest is fed.
    assert!(r2 >= c1, "turn 2 reused {r2} tokens, turn 1's prompt was {c1}: {others:?}");
    assert_eq!(f2, c2 - r2);
    assert!(f2 < c2 && f2 > 0);
    // After /reset nothing is reused.
    let (c3, r3, f3, _) = stats[2];
    assert_eq!((r3, f3), (0, c3));
    assert!(c3 < c2);
    // The replies went to stdout, one line per turn.
    assert_eq!(stdout.lines().count(), 3, "{stdout:?}");
}

#[test]
fn run_chat_renders_one_turn_and_models_without_template_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = with_template(tmp.path());
    let m = model.to_str().unwrap();
    let o = meo()
        .args(["run", m, "--chat", "-p", "The value", "--system", "Be brief.", "--max-new-tokens", "4", "--stats"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The rendered prompt: bos + "<system>Be brief.\n<user>The value\n<assistant>", more tokens
    // than the plain "The value".
    let stats = String::from_utf8_lossy(&o.stderr);
    let n = |s: &str| -> usize {
        let at = s.find("prompt: ").unwrap() + 8;
        s[at..].split(' ').next().unwrap().parse().unwrap()
    };
    let plain = meo().args(["run", m, "-p", "The value", "--max-new-tokens", "1", "--stats"]).output().unwrap();
    assert!(n(&stats) > n(&String::from_utf8_lossy(&plain.stderr)) + 5, "{stats}");

    let bare = convert(tmp.path(), "bare", None);
    for args in [vec!["chat", bare.to_str().unwrap()], vec!["run", bare.to_str().unwrap(), "--chat", "-p", "hi"]] {
        let o = meo().args(&args).stdin(Stdio::null()).output().unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("no chat template") && e.contains("tokenizer_config.json"), "{e}");
    }
    // A template that raises is reported per turn; the chat goes on.
    let cfg = serde_json::json!({"chat_template": "{{ raise_exception('no ' + messages[-1].content) }}"});
    let raising = convert(tmp.path(), "raising", Some(&cfg.to_string()));
    let mut child = meo()
        .args(["chat", raising.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"one\ntwo\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("refused the conversation: no one") && e.contains("no two"), "{e}");
}

/// A template that renders the last message differently from earlier ones: the second turn's
/// rendering departs from the cache inside turn 1, so the cache is cut back to the shared
/// prefix (on the CPU target) and only the rest is fed.
#[test]
fn a_rerendered_history_rewinds_to_the_shared_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{% if loop.last %}[last]{% endif %}{{ m.content }}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        "bos_token": "<|endoftext|>",
    });
    let model = convert(tmp.path(), "rewind", Some(&cfg.to_string()));
    let mut child = meo()
        .args(["chat", model.to_str().unwrap(), "--verbose", "--max-new-tokens", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"The value of the object\nis returned.\n").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let stats: Vec<_> = err.lines().filter_map(turn_line).collect();
    assert_eq!(stats.len(), 2, "{err}");
    let (c1, _, _, _) = stats[0];
    let (c2, r2, f2, _) = stats[1];
    assert!(r2 > 0 && r2 < c1, "turn 2 reused {r2} of turn 1's {c1}: {err}");
    assert_eq!(f2, c2 - r2);
    assert!(err.contains("re-rendered differently after"), "{err}");
}

/// `meo chat` on a pseudo-terminal, as a user runs it: the greeting and the `> ` prompt appear
/// (the interactive path), a typed turn streams its reply, and the second turn feeds only its
/// new tokens.
#[test]
fn chat_on_a_pseudo_terminal() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let tmp = tempfile::tempdir().unwrap();
    let model = with_template(tmp.path());
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the given ints; the other arguments may
    // be null (no name, default termios and window size).
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = meo()
        .args(["chat", model.to_str().unwrap(), "--verbose", "--max-new-tokens", "6"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut writer = std::fs::File::from(master.try_clone().unwrap());
    let (tx, rx) = mpsc::channel::<String>();
    // The terminal's output, line by line (`\r\n` on a terminal); the prompt `> ` has no
    // newline, so partial lines are sent too.
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut f, &mut buf) {
                Ok(0) | Err(_) => break, // EIO once the child has closed the terminal
                Ok(n) => {
                    if tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut seen = String::new();
    // Reads until `pat` appears in `seen` after byte `from`; returns where it ends.
    let wait_for = |pat: &str, from: usize, seen: &mut String| -> usize {
        loop {
            if let Some(at) = seen[from..].find(pat) {
                return from + at + pat.len();
            }
            let chunk = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("no {pat:?} in {seen:?}"));
            seen.push_str(&chunk);
        }
    };
    let at = wait_for("/exit quits.", 0, &mut seen);
    let at = wait_for("> ", at, &mut seen);
    writer.write_all(b"The value of the object\n").unwrap();
    let at = wait_for("[turn 1]", at, &mut seen);
    let at = wait_for("> ", at, &mut seen);
    writer.write_all(b"is returned.\n").unwrap();
    let at = wait_for("[turn 2]", at, &mut seen);
    wait_for("\n", at, &mut seen);
    writer.write_all(b"/exit\n").unwrap();
    let status = child.wait().unwrap();
    drop(writer);
    reader.join().unwrap();
    assert!(status.success(), "{seen:?}");
    // Replies and stats share the terminal: each stats line runs from `[turn ` to its newline.
    let stats: Vec<_> =
        seen.match_indices("[turn ").filter_map(|(i, _)| turn_line(seen[i..].lines().next().unwrap())).collect();
    assert_eq!(stats.len(), 2, "{seen:?}");
    let ((c1, r1, f1, g1), (c2, r2, f2, _)) = (stats[0], stats[1]);
    assert_eq!((r1, f1), (0, c1), "{seen:?}");
    assert!(g1 >= 1);
    assert!(r2 >= c1 && f2 == c2 - r2 && f2 > 0, "turn 2: {:?} after turn 1 of {c1}: {seen:?}", stats[1]);
}
