//! The keeper as a person uses it, against the real model: the prompt through
//! the chat template, options after the words, exactly the model's text on
//! stdout, and the interactive chat driven in a pseudo-terminal.

use crate::chain::{file_model, Cluster};
use crate::support::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The worker a cluster's jobs ran on.
fn worker_url(c: &Cluster) -> String {
    let workers = c.listed(&["ps"]);
    assert_eq!(workers.len(), 1, "{workers:?}");
    workers[0]["url"].as_str().expect("a url").to_string()
}

/// The worker's own chat answer to `messages`, greedy.
fn workers_chat(worker: &str, messages: Value, max_tokens: u32) -> String {
    let body = json!({"messages": messages, "temperature": 0, "max_tokens": max_tokens});
    let (status, answer) = post(&format!("{worker}/v1/chat/completions"), &body.to_string());
    assert_eq!(status, 200, "{answer}");
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

#[test]
fn a_question_goes_through_the_chat_template_and_stdout_is_exactly_the_answer() {
    let _turn = serial();
    let c = Cluster::new("shell-ask", &[]);
    let model = file_model();
    let question = "What is the capital of France?";
    // Options after the words are options: -q after them silences stderr.
    let (code, out, err) = c.keeper(&[
        "infer",
        "--model",
        &model,
        question,
        "--max-tokens",
        "24",
        "-t",
        "0",
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "", "-q after the words was honoured");
    let worker = worker_url(&c);
    let expected = workers_chat(&worker, json!([{"role": "user", "content": question}]), 24);
    assert!(!expected.is_empty());
    assert_eq!(out, expected, "stdout holds exactly the model's text");

    // --raw: plain completion, the same text as the worker's own, and the summary on request.
    let prompt = "The capital of France is";
    let (code, out, err) = c.keeper(&[
        "run",
        &model,
        prompt,
        "--raw",
        "-n",
        "5",
        "--temperature",
        "0",
        "--verbose",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut sse = stream(
        &format!("{worker}/v1/inference"),
        Some(&json!({"prompt": prompt, "max_tokens": 5, "temperature": 0}).to_string()),
    )
    .expect("the worker streams");
    let mut text = String::new();
    loop {
        let e = sse.next_event();
        match e["type"].as_str() {
            Some("token") => text.push_str(e["t"].as_str().unwrap_or_default()),
            Some("started") => {}
            _ => break,
        }
    }
    assert_eq!(out, text);
    let summary = err.lines().last().unwrap_or_default();
    assert!(
        summary.contains("5 tokens out")
            && summary.contains("stopped: max_tokens")
            && summary.contains("hive localhost")
            && summary.contains("first token after"),
        "{err}"
    );
}

#[test]
fn the_short_verbs_pull_list_ps_stop_and_a_default_model() {
    let _turn = serial();
    let c = Cluster::new("shell-verbs", &[]);
    let path = model_path();
    let path = path.to_str().expect("a path");
    let (code, out, err) = c.keeper(&["pull", path]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("is at {path} on hive localhost")),
        "{out}"
    );
    let (_, table, _) = c.keeper(&["list"]);
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap_or_default().starts_with("NAME "),
        "{table}"
    );
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .starts_with("smollm2-135m-instruct.q4_1  localhost  Q4_1"),
        "{table}"
    );
    let (_, none, _) = c.keeper(&["ps"]);
    assert_eq!(
        none,
        "no workers (one starts with the first job for its model)\n"
    );

    // A short name: every command (and API) takes it for the model.
    let (code, out, err) = c.keeper(&["alias", "smol", "smollm2-135m-instruct:q4_1"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "smol is smollm2-135m-instruct.q4_1\n"),
        "{err}"
    );
    let (code, out, err) = c.keeper(&["run", "smol", "Say hello.", "-n", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty(), "{err}");
    let aliases = c.listed(&["alias"]);
    assert_eq!(
        aliases,
        [json!({"name": "smol", "model": "smollm2-135m-instruct.q4_1"})]
    );
    let (code, _, err) = c.keeper(&["alias", "smol", "--remove"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = c.keeper(&["run", "smol", "Say hello.", "-n", "4"]);
    assert_ne!(code, 0, "the alias is gone");
    assert!(err.contains("no model named smol"), "{err}");

    // With a default model in the config file, a question needs no flags.
    let (code, _, err) = c.keeper(&["config", "set", "model", "smollm2-135m-instruct.q4_1"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = c.keeper(&["infer", "Say hello.", "-n", "8"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty(), "{err}");
    let workers = c.listed(&["ps"]);
    assert_eq!(workers.len(), 1, "{workers:?}");
    let (code, out, err) = c.keeper(&["stop", "smollm2-135m-instruct.q4_1"]);
    assert_eq!(code, 0, "{err}");
    let id = workers[0]["worker_id"].as_str().unwrap_or_default();
    assert_eq!(err, format!("stopping {id}\n"));
    assert_eq!(out, format!("stopped {id}\n"));
    // It returned when the worker was gone: the next job starts a new one.
    assert!(c.listed(&["ps"]).is_empty());
}

#[test]
fn a_json_schema_from_a_file_shapes_the_answer() {
    let _turn = serial();
    let c = Cluster::new("shell-schema", &[]);
    let dir = TempDir::new("shell-schema-file");
    let schema = dir.path().join("person.json");
    let person = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"], "additionalProperties": false});
    std::fs::write(&schema, person.to_string()).expect("the schema is written");
    let schema = schema.to_str().expect("a path");
    let model = file_model();
    let (code, out, err) = c.keeper(&[
        "infer",
        "-m",
        &model,
        "Describe Ada, who is 36, as JSON.",
        "--json-schema",
        schema,
        "-n",
        "60",
        "-t",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let keys: Vec<&String> = answer.as_object().expect("an object").keys().collect();
    assert_eq!(keys, ["name", "age"], "{out}");
    assert!(answer["age"].is_i64(), "{out}");

    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"type": "object", "not": {}}"#,
    )
    .expect("written");
    let bad = dir.path().join("bad.json");
    let (code, _, err) = c.keeper(&[
        "infer",
        "-m",
        &model,
        "hi",
        "--json-schema",
        bad.to_str().unwrap_or_default(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("\"not\" (at #) is not supported"), "{err}");
}

#[test]
fn the_prompt_given_twice_is_refused_saying_so() {
    let c = Cluster::new("shell-twice", &[]);
    let (code, out, err) = c.keeper(&["infer", "-m", "x", "--prompt", "a", "b"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("the prompt is given twice"), "{err}");
}

/// `rbee ARGS` on a pseudo-terminal of its own (its controlling terminal, as
/// in a shell): what it writes, and keys typed to it.
struct Pty {
    child: Child,
    master: std::fs::File,
    screen: Arc<Mutex<String>>,
}

impl Pty {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Pty {
        use std::os::unix::process::CommandExt;
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors; the null pointers ask for defaults.
        let made = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(made, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here only.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // The child must not hold the master open.
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&master),
                libc::F_SETFD,
                libc::FD_CLOEXEC,
            )
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_rbee"));
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(slave.try_clone().expect("dup"))
            .stdout(slave.try_clone().expect("dup"))
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("rbee starts on the pty");
        drop(command);
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(String::new()));
        let (mut reader, sink) = (master.try_clone().expect("dup"), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child is gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&text);
            }
        });
        Pty {
            child,
            master,
            screen,
        }
    }

    /// What was written to the terminal, without its control sequences
    /// (the line editor's cursor moves, the progress bar's erasing).
    fn screen(&self) -> String {
        let raw = self.screen.lock().unwrap_or_else(|p| p.into_inner());
        let mut plain = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c != '\x1b' {
                plain.push(c);
                continue;
            }
            // CSI: ESC [ parameters, then a final byte in @..~ (an unfinished
            // one at the end is left out until it is finished).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        }
        plain
    }

    fn type_keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).expect("typed");
    }

    /// Waits until the screen, from `from` on, holds `what`; where it ends.
    fn wait_for(&self, from: usize, what: &str, timeout: Duration) -> usize {
        let mut found = 0;
        wait_until(&format!("{what:?} on the screen"), timeout, || {
            let screen = self.screen();
            match screen.get(from..).and_then(|s| s.find(what)) {
                Some(at) => {
                    found = from + at + what.len();
                    true
                }
                None => false,
            }
        });
        found
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answer to the line typed at `from`: the text between its echo and the summary.
fn answer_after(screen: &str, typed: &str, from: usize) -> String {
    let after = &screen[from..];
    let start = after
        .find(&format!("{typed}\n"))
        .unwrap_or_else(|| panic!("no echo of {typed:?} in:\n{after:?}"))
        + typed.len()
        + 1;
    let end = after[start..].find("\nprompt ").expect("the summary") + start;
    after[start..end].to_string()
}

/// `N tokens out` of the summary after `from`.
fn tokens_out(screen: &str, from: usize) -> u32 {
    let line = screen[from..]
        .lines()
        .find(|l| l.starts_with("prompt "))
        .expect("a summary");
    let before = line.split(" tokens out").next().unwrap_or_default();
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count")
}

/// `prompt N tokens (M cached)` of the summary after `from`.
fn prompt_figures(screen: &str, from: usize) -> (u32, u32) {
    let line = screen[from..]
        .lines()
        .find(|l| l.starts_with("prompt "))
        .expect("a summary");
    let numbers: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .take(2)
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn the_chat_keeps_the_conversation_survives_ctrl_c_leaves_on_bye_and_edits_lines_with_history() {
    let _turn = serial();
    let c = Cluster::new("shell-chat", &[]);
    let model = file_model();
    let home = c.home();
    let mut chat = Pty::start(
        &[
            "keeper",
            "run",
            &model,
            "--queen-url",
            &c.queen,
            "-t",
            "0",
            "-n",
            "60",
            "-v",
        ],
        &[("RBEE_HOME", home.as_str())],
    );
    let long = Duration::from_secs(120);
    let at = chat.wait_for(0, ">>> ", long);

    let first = "My name is Ada and I live in Paris.";
    chat.type_keys(&format!("{first}\n"));
    let end1 = chat.wait_for(at, "tokens/s, stopped:", long);
    let at2 = chat.wait_for(end1, ">>> ", long);
    let second = "What is my name?";
    chat.type_keys(&format!("{second}\n"));
    let end2 = chat.wait_for(at2, "tokens/s, stopped:", long);
    let at3 = chat.wait_for(end2, ">>> ", long);
    let screen = chat.screen();
    assert!(
        !answer_after(&screen, first, at).trim().is_empty(),
        "{screen}"
    );
    let answer2 = answer_after(&screen, second, at2);

    // The second turn was the whole conversation, most of it from the cache.
    let (prompt1, _) = prompt_figures(&screen, at);
    let (prompt2, cached2) = prompt_figures(&screen, at2);
    let out1 = tokens_out(&screen, at);
    assert!(
        prompt2 > prompt1 + out1,
        "the first turn was sent again:\n{screen}"
    );
    assert!(
        cached2 >= prompt1,
        "the first turn came from the cache:\n{screen}"
    );
    assert!(
        !answer2.trim().is_empty() && !answer2.contains("[queen]"),
        "{screen}"
    );
    let worker = worker_url(&c);

    // Ctrl+C stops the answer being written; the session goes on.
    let story = "Write a very long story about a dragon who learns to fly.";
    chat.type_keys(&format!("{story}\n"));
    let echoed = chat.wait_for(at3, &format!("{story}\n"), long);
    wait_until("the story to flow", long, || {
        chat.screen().len() > echoed + 20
    });
    chat.type_keys("\x03");
    let cancelled = chat.wait_for(echoed, "cancelled", Duration::from_secs(20));
    chat.wait_for(cancelled, ">>> ", Duration::from_secs(20));
    wait_until("the slot to be freed", Duration::from_secs(10), || {
        get(&format!("{worker}/v1/ready")).1["slots_busy"] == 0
    });

    // `/set` as `ollama run` has it: the next answer is 3 tokens long.
    let at4 = chat.screen().len();
    chat.type_keys("/set parameter num_predict 3\n");
    let set = chat.wait_for(
        at4,
        "(set parameter num_predict to 3)",
        Duration::from_secs(20),
    );
    chat.type_keys("/show info\n");
    let shown = chat.wait_for(set, "max_tokens 3", Duration::from_secs(20));
    chat.type_keys("Write a long story about a cat.\n");
    let end3 = chat.wait_for(shown, "tokens/s, stopped:", long);
    assert_eq!(tokens_out(&chat.screen(), shown), 3, "{}", chat.screen());
    chat.wait_for(end3, ">>> ", long);

    chat.type_keys("/bye\n");
    wait_until("the chat to end", Duration::from_secs(20), || {
        matches!(chat.child.try_wait(), Ok(Some(_)))
    });
    let status = chat.child.wait().expect("exit status");
    assert_eq!(status.code(), Some(0), "{}", chat.screen());

    // Lines are edited as in a shell and the history outlives the session:
    // in a new chat, Ctrl+R finds `/show info` typed above, Up brings it back.
    let mut again = Pty::start(
        &["keeper", "run", &model, "--queen-url", &c.queen],
        &[("RBEE_HOME", home.as_str())],
    );
    let short = Duration::from_secs(20);
    let at = again.wait_for(0, ">>> ", long);
    again.type_keys("\x12show i");
    again.wait_for(at, "/show info", short);
    again.type_keys("\r");
    let info = format!("model: {model}");
    let shown = again.wait_for(at, &info, short);
    let at = again.wait_for(shown, ">>> ", short);
    again.type_keys("\x1b[A\r");
    let shown = again.wait_for(at, &info, short);
    // Ctrl+C at the prompt drops the line typed so far; Ctrl+D leaves.
    again.type_keys("half a line\x03");
    let dropped = again.wait_for(shown, "(/bye or Ctrl+D leaves)", short);
    again.wait_for(dropped, ">>> ", short);
    again.type_keys("\x04");
    wait_until("the second chat to end", short, || {
        matches!(again.child.try_wait(), Ok(Some(_)))
    });
    let status = again.child.wait().expect("exit status");
    assert_eq!(status.code(), Some(0), "{}", again.screen());
    let history = std::fs::read_to_string(format!("{home}/history")).expect("the history file");
    assert!(
        history.contains("What is my name?") && !history.contains("half a line"),
        "{history}"
    );
}
