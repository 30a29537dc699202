//! Bad input from every side (issue "Hardening"): damaged stores, numbers
//! that would wrap, client mistakes, spawn storms, doors left open, idle
//! connections, FIFOs, streams cut short — and a seeded fuzz of every route
//! of every daemon. Each answer is a clear 4xx or a refusal to start that
//! says what is wrong; nothing is lost and the daemon keeps serving.

use crate::chain::{file_model, workers_of, Cluster};
use crate::support::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One request written by hand (`Connection: close`), for headers and bodies
/// no client library would send: the status and the body.
fn raw(url: &str, request: &[u8]) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a timeout");
    s.write_all(request).expect("the request is written");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn http(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        r.push_str("Host: 127.0.0.1\r\n");
    }
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// Runs `rbee ARGS` with `RBEE_HOME=home` until it exits: its status and stderr.
fn run_until_exit(args: &[&str], home: &TempDir) -> (i32, String) {
    let mut p = Proc::start_with_env(args, 0, &[("RBEE_HOME", home.str())]);
    let status = p
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("rbee {args:?} kept running:\n{}", p.stderr()));
    (status.code().unwrap_or(-1), p.stderr())
}

/// Empties every file of a sled store, as a crash or a careless hand might.
fn empty_store(dir: &std::path::Path) {
    for item in std::fs::read_dir(dir)
        .expect("the store is there")
        .flatten()
    {
        if item.path().is_file() {
            std::fs::write(item.path(), b"").expect("emptied");
        }
    }
}

#[test]
fn a_damaged_catalog_stops_the_hive_and_can_be_rebuilt_from_the_model_files() {
    let home = TempDir::new("damaged-catalog");
    // A model as a download leaves it: <data dir>/models/<org>/<repo>/<file>.
    let dir = home
        .path()
        .join("models/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF");
    std::fs::create_dir_all(&dir).expect("models dir");
    let file = dir.join("smollm2-135m-instruct-q4_1.gguf");
    std::fs::copy(model_path(), &file).expect("copied");
    {
        let mut hive = start_hive(&home, &[], &[]);
        let body = json!({"model_ref": format!("file:{}", file.display())}).to_string();
        let (status, answer) = post(&format!("{}/v1/models/download", hive.url), &body);
        assert_eq!(status, 202, "{answer}");
        hive.signal("TERM");
        hive.wait_exit(Duration::from_secs(20))
            .expect("the hive stops");
    }
    empty_store(&home.path().join("hive-catalog"));

    let port = free_port().to_string();
    let args = ["hive", "--port", &port, "--data-dir", home.str()];
    let (code, err) = run_until_exit(&args, &home);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("model catalog") && err.contains("is damaged"),
        "{err}"
    );
    assert!(
        err.contains("smollm2-135m-instruct-q4_1"),
        "names what it lost: {err}"
    );
    assert!(err.contains("--rebuild-catalog"), "says what to do: {err}");

    let hive = start_hive_on(
        port.parse().expect("a port"),
        &home,
        &["--rebuild-catalog"],
        &[],
    );
    let (_, models) = get(&format!("{}/v1/models", hive.url));
    let names: Vec<&str> = models
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["smollm2-135m-instruct-q4_1"], "{models}");
    assert_eq!(
        models[0]["model_ref"],
        "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf"
    );
    // Its stderr is read by a thread of ours: the line may come a moment after the answer.
    wait_until(
        "the hive to say it rebuilt the catalog",
        Duration::from_secs(10),
        || hive.stderr().contains("rebuilt the model catalog"),
    );
}

#[test]
fn a_damaged_registry_stops_the_queen_naming_the_hives_it_lost() {
    let home = TempDir::new("damaged-registry");
    let port = free_port();
    let port_s = port.to_string();
    {
        let mut queen = Proc::start_with_env(
            &["queen", "--port", &port_s],
            port,
            &[("RBEE_HOME", home.str())],
        );
        wait_until("the queen", Duration::from_secs(30), || {
            matches!(try_get(&format!("{}/health", queen.url)), Ok((200, _)))
        });
        let body = json!({"name": "mac", "url": "http://127.0.0.1:9"}).to_string();
        let (status, answer) = post(&format!("{}/v1/hives", queen.url), &body);
        assert!(status < 300, "{answer}");
        queen.signal("TERM");
        queen
            .wait_exit(Duration::from_secs(20))
            .expect("the queen stops");
    }
    empty_store(&home.path().join("queen-hives"));
    let (code, err) = run_until_exit(&["queen", "--port", &port_s], &home);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("hive registry") && err.contains("is damaged"),
        "{err}"
    );
    assert!(err.contains("missing: mac"), "{err}");
    assert!(err.contains("rbee keeper hive add"), "{err}");
}

#[test]
fn data_dirs_are_for_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let home = TempDir::new("private");
    let dir = home.path().join("data");
    let data = TempDir(dir.clone());
    let _hive = start_hive(&data, &[], &[]);
    let mode = std::fs::metadata(&dir).expect("made").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // And what is inside is for its owner too: the catalog's files, its check file.
    let mut files = vec![dir.clone()];
    let mut seen = 0;
    while let Some(d) = files.pop() {
        for entry in std::fs::read_dir(&d).expect("readable").flatten() {
            let meta = entry.metadata().expect("a file");
            if meta.is_dir() {
                files.push(entry.path());
            } else {
                seen += 1;
                let mode = meta.permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.path().display());
            }
        }
    }
    assert!(seen > 0, "the hive wrote its catalog");
}

#[test]
fn sizes_that_would_wrap_are_refused_naming_the_limit() {
    let home = TempDir::new("wrap");
    let hive = start_hive(&home, &[], &[]);
    let spawn = |slots: u64, ctx: u64| {
        let body = json!({"model_ref": file_model(), "slots": slots, "ctx_size": ctx}).to_string();
        post(&format!("{}/v1/workers/spawn", hive.url), &body)
    };
    let (status, e) = spawn(4, 2_147_483_648);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("ctx_size")),
        "{e}"
    );
    let message = e["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("training context of 8192 tokens"), "{e}");
    let (status, e) = spawn(4, 4_294_967_296);
    assert_eq!(status, 400, "beyond u32: {e}");
    let (status, e) = spawn(100_000, 512);
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("slots")),
        "{e}"
    );
    assert!(workers_of(&hive.url).is_empty());

    let model = model_path();
    let model = model.to_str().expect("utf-8");
    for flag in [
        ["--queue-size", "4294967295"],
        ["--queue-size", "4294967296"],
        ["--slots", "100000"],
    ] {
        let mut args = vec!["worker", "--model", model, "--port", "0"];
        args.extend_from_slice(&flag);
        let (code, err) = run_until_exit(&args, &home);
        assert_ne!(code, 0, "{flag:?}: {err}");
        assert!(err.contains(flag[0]), "{flag:?}: {err}");
    }
}

#[test]
fn a_worker_asked_for_more_context_than_its_model_has_refuses_to_start() {
    let _turn = serial();
    let home = TempDir::new("ctx-flag");
    let model = model_path();
    let args = [
        "worker",
        "--model",
        model.to_str().expect("utf-8"),
        "--port",
        "0",
        "--slots",
        "1",
        "--ctx-size",
        "100000",
    ];
    let (code, err) = run_until_exit(&args, &home);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("training context of 8192 tokens"), "{err}");
}

#[test]
fn client_mistakes_at_the_queen_are_4xx_before_anything_runs() {
    let c = Cluster::new("door-queen", &[]);
    let (code, _, err) = c.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    let jobs = format!("{}/v1/jobs", c.queen);
    let base = json!({"model": file_model(), "prompt": "Hi"});
    for (field, value) in [
        ("temperature", json!(-1)),
        ("temperature", json!(1e308)),
        ("top_p", json!(2)),
        ("top_k", json!(-1)),
        ("stop", json!([""])),
        ("max_tokens", json!(1_000_000_000_000_i64)),
        ("model", json!("hf:../../x")),
        ("model", json!("")),
    ] {
        let mut body = base.clone();
        body[field] = value.clone();
        let (status, e) = post(&jobs, &body.to_string());
        assert_eq!(status, 400, "{field}={value}: {e}");
        assert_eq!(e["error"]["param"], field, "{field}={value}: {e}");
    }
    let chat = format!("{}/v1/chat/completions", c.queen);
    for model in ["hf:../../x", "file:/etc/passwd"] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]});
        let (status, e) = post(&chat, &body.to_string());
        assert_eq!(status, 400, "{model}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{model}: {e}");
    }
    // A FIFO named as a model is refused at once, not read forever.
    let dir = TempDir::new("fifo");
    let fifo = dir.path().join("model.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let started = Instant::now();
    let body = json!({"model": format!("file:{}", fifo.display()), "messages": [{"role": "user", "content": "Hi"}]});
    let (status, e) = post(&chat, &body.to_string());
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not a regular file"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn eight_jobs_at_once_for_a_new_model_start_one_worker() {
    let _turn = serial();
    let home = TempDir::new("storm");
    let hive = start_hive(&home, &["--max-memory", "4GiB"], &[]);
    let c = Cluster::with_hives("storm", &[("h", &hive)]);
    let answers: Vec<(u16, Vec<Value>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let body = json!({"model": file_model(), "prompt": format!("Story {i}:"), "max_tokens": 4, "temperature": 0});
                    let (status, created) = post(&format!("{}/v1/jobs", c.queen), &body.to_string());
                    let url = format!("{}{}", c.queen, created["sse_url"].as_str().unwrap_or_default());
                    (status, stream(&url, None).map(|s| s.rest()).unwrap_or_default())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a job"))
            .collect()
    });
    for (status, events) in &answers {
        assert_eq!(*status, 201);
        assert!(events.iter().any(|e| e["type"] == "end"), "{events:?}");
    }
    assert_eq!(
        workers_of(&hive.url).len(),
        1,
        "one worker for one model on one CPU"
    );
}

#[test]
fn only_the_worker_itself_can_report_that_it_loaded() {
    let _turn = serial();
    let home = TempDir::new("secret");
    let hive = start_hive(&home, &[], &[]);
    let body = json!({"model_ref": file_model(), "slots": 1, "ctx_size": 512}).to_string();
    let (status, w) = post(&format!("{}/v1/workers/spawn", hive.url), &body);
    assert!(status < 300, "{w}");
    let forged = json!({
        "worker_id": w["worker_id"], "url": w["url"], "model": w["model"], "slots": 1,
        "state": "failed", "error": "forged",
    });
    let (status, e) = post(
        &format!("{}/v1/workers/ready", hive.url),
        &forged.to_string(),
    );
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{e}"
    );
    wait_until(
        "the worker to report itself ready",
        Duration::from_secs(60),
        || {
            workers_of(&hive.url)
                .first()
                .is_some_and(|w| w["state"] == "ready")
        },
    );
}

#[test]
fn without_a_token_foreign_host_names_and_web_pages_are_refused() {
    let home = TempDir::new("doors");
    let hive = start_hive(
        &home,
        &["--allowed-origins", "https://chat.example.com"],
        &[],
    );
    let get_models =
        |headers: &[(&str, &str)]| raw(&hive.url, &http("GET", "/v1/models", headers, ""));
    assert_eq!(get_models(&[]).0, 200);
    assert_eq!(get_models(&[("Host", "localhost:8080")]).0, 200);
    // DNS rebinding: attacker.example now resolves to 127.0.0.1.
    let (status, body) = get_models(&[("Host", "attacker.example:8080")]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--allowed-hosts"), "{body}");
    // A cross-site page posting to the hive.
    let spawn = json!({"model_ref": file_model()}).to_string();
    let (status, body) = raw(
        &hive.url,
        &http(
            "POST",
            "/v1/workers/spawn",
            &[
                ("Origin", "https://evil.example"),
                ("Content-Type", "text/plain"),
            ],
            &spawn,
        ),
    );
    assert_eq!(status, 403, "{body}");
    assert!(workers_of(&hive.url).is_empty());
    // An allowed page: its preflight is answered, and it may read the answer.
    let (status, _) = raw(
        &hive.url,
        &http(
            "OPTIONS",
            "/v1/models",
            &[
                ("Origin", "https://chat.example.com"),
                ("Access-Control-Request-Method", "GET"),
            ],
            "",
        ),
    );
    assert_eq!(status, 204);
    assert_eq!(get_models(&[("Origin", "https://chat.example.com")]).0, 200);
    // With a token, the token is the guard, whatever the host name.
    let secret = TempDir::new("doors-token");
    let hive = start_hive(&secret, &[], &[("RBEE_TOKEN", "s3cret")]);
    let (status, _) = raw(
        &hive.url,
        &http(
            "GET",
            "/v1/models",
            &[("Host", "mac.lan"), ("Authorization", "bearer s3cret")],
            "",
        ),
    );
    assert_eq!(status, 200, "the scheme in any case");
}

#[test]
fn idle_and_half_sent_connections_are_closed() {
    let home = TempDir::new("idle");
    let hive = start_hive(&home, &[], &[]);
    let addr = hive.url.trim_start_matches("http://").to_string();
    let open = |first: &[u8]| {
        let mut s = TcpStream::connect(&addr).expect("connects");
        s.write_all(first).expect("written");
        s.set_read_timeout(Some(Duration::from_secs(40)))
            .expect("a timeout");
        s
    };
    let mut idle = open(b"");
    let mut half = open(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n");
    let started = Instant::now();
    for s in [&mut idle, &mut half] {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(25), "closed after {waited:?}");
    assert_eq!(
        get(&format!("{}/v1/models", hive.url)).0,
        200,
        "and it still serves"
    );
}

#[test]
fn an_openai_stream_whose_worker_dies_with_nobody_to_take_over_ends_with_an_error_and_done() {
    let _turn = serial();
    let home = TempDir::new("cut");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("cut", &[("h", &hive)]);
    let body = json!({
        "model": file_model(), "stream": true, "max_tokens": 2000,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
    });
    let mut sse = stream(
        &format!("{}/v1/chat/completions", c.queen),
        Some(&body.to_string()),
    )
    .expect("the stream opens");
    sse.next_event();
    sse.next_event();
    // The whole machine goes, workers with it (a lost worker alone is
    // replaced: see resilience.rs): nobody is left to finish the answer.
    hive.signal("KILL");
    let rest = sse.rest();
    let last = rest.last().expect("an event before [DONE]");
    assert_eq!(last["error"]["code"], "WORKER_LOST", "{rest:?}");
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no other worker could take over"),
        "{message}"
    );
}

/// Bodies that are wrong in one way or another: not JSON, wrong types,
/// numbers out of range, strings where lists go, fields missing.
fn bad_body(rng: &mut Rng) -> String {
    let values = [
        json!(null),
        json!(-1),
        json!(1e308),
        json!(-1e308),
        json!(4_294_967_296_u64),
        json!(18_446_744_073_709_551_615_u64),
        json!(""),
        json!("\u{0}"),
        json!([]),
        json!({}),
        json!([""]),
        json!("x".repeat(300)),
        json!(true),
        json!("../../etc/passwd"),
        json!("hf:"),
        json!("file:relative.gguf"),
        json!(0.5),
        json!([1, "a", null]),
    ];
    let fields = [
        "model",
        "model_ref",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "slots",
        "ctx_size",
        "name",
        "url",
        "token",
        "n",
        "stream",
        "backend",
        "device",
        "worker_id",
        "state",
        "cache_prompt",
        "presence_penalty",
        "input",
    ];
    match rng.next() % 6 {
        0 => [
            "",
            "{",
            "[1,",
            "{\"a\":}",
            "null",
            "\"str\"",
            "{\"model\": 1",
            "\u{feff}{}",
            "{}}",
        ][(rng.next() % 9) as usize]
            .to_string(),
        1 => (0..(rng.next() % 64))
            .map(|_| (rng.next() % 256) as u8 as char)
            .collect(),
        _ => {
            let mut body = serde_json::Map::new();
            for _ in 0..(1 + rng.next() % 4) {
                body.insert(rng.pick(&fields).to_string(), rng.pick(&values).clone());
            }
            // Never a valid request: what any endpoint needs is wrong in type.
            for field in [
                "prompt",
                "max_tokens",
                "model",
                "messages",
                "model_ref",
                "name",
                "input",
                "worker_id",
            ] {
                body.insert(field.to_string(), json!({"nested": [1]}));
            }
            Value::Object(body).to_string()
        }
    }
}

/// Sends `count` malformed requests to `paths` of the daemon at `url`: every
/// answer is a 4xx, and the daemon still answers `/health` at the end.
fn fuzz(url: &str, paths: &[&str], count: usize, seed: u64) {
    let mut rng = Rng(seed);
    let methods = [
        "GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "BREW", "POST",
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..count {
        let path = *rng.pick(paths);
        let long = "z".repeat(200);
        let segments = ["x", "%00", "..", "a%2Fb", long.as_str()];
        let segment = segments[(rng.next() % segments.len() as u64) as usize];
        let path = path.replace("{}", segment);
        let method = *rng.pick(&methods);
        let body = bad_body(&mut rng);
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        match rng.next() % 5 {
            0 => headers.push(("Content-Type", "text/plain")),
            1 => headers.push(("Transfer-Encoding", "gzip")),
            2 => headers.push(("X-Junk", "\u{7f}")),
            _ => {}
        }
        let request = if rng.next().is_multiple_of(10) {
            // Garbage on the wire, not HTTP at all.
            (0..(rng.next() % 200))
                .map(|_| (rng.next() % 256) as u8)
                .collect()
        } else {
            http(method, &path, &headers, &body)
        };
        let (status, answer) = raw(url, &request);
        assert!(
            !(500..600).contains(&status),
            "seed {seed}, request {i}: {method} {path} {body:?} answered {status}: {answer}"
        );
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(
        get(&format!("{url}/health")).0,
        200,
        "still serving after {statuses:?}"
    );
}

#[test]
fn a_fuzzed_hive_answers_every_mistake_with_a_4xx_and_keeps_serving() {
    let home = TempDir::new("fuzz-hive");
    let hive = start_hive(&home, &[], &[("HF_ENDPOINT", "http://127.0.0.1:9")]);
    let paths = [
        "/health",
        "/v1/capabilities",
        "/v1/models",
        "/v1/models/{}",
        "/v1/models/download",
        "/v1/models/download/progress?id={}",
        "/v1/workers/spawn",
        "/v1/workers/list",
        "/v1/workers/ready",
        "/v1/workers/{}/shutdown",
        "/nope",
        "/v1/{}",
    ];
    fuzz(&hive.url, &paths, 1500, 0x5eed_0001);
    assert!(
        workers_of(&hive.url).is_empty(),
        "no malformed spawn started a worker"
    );
}

#[test]
fn a_fuzzed_queen_answers_every_mistake_with_a_4xx_and_keeps_serving() {
    let c = Cluster::new("fuzz-queen", &[]);
    let (code, _, err) = c.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    let paths = [
        "/health",
        "/v1/hives",
        "/v1/hives/{}",
        "/v1/jobs",
        "/v1/jobs/{}/stream",
        "/v1/jobs/{}",
        "/v1/workers",
        "/v1/workers/{}/shutdown",
        "/v1/hives/{}/models",
        "/v1/hives/{}/models/download",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/nope",
    ];
    fuzz(&c.queen, &paths, 1500, 0x5eed_0002);
}

#[test]
fn a_fuzzed_worker_answers_every_mistake_with_a_4xx_and_keeps_serving() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "1", "--ctx-size", "512"]);
    let paths = [
        "/health",
        "/v1/ready",
        "/v1/loading/progress",
        "/v1/inference",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/nope",
    ];
    fuzz(&w.url, &paths, 1500, 0x5eed_0003);
}
