//! `rbee worker` against the real SmolLM2 model.

use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn body(v: Value) -> String {
    v.to_string()
}

/// The text of a finished stream's token events, and its `end` event.
fn text_and_end(events: &[Value]) -> (String, Value) {
    let text = events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["t"].as_str().expect("t is a string"))
        .collect();
    let end = events.last().expect("an end event").clone();
    assert_eq!(end["type"], "end", "last event: {end}");
    (text, end)
}

fn infer(w: &Proc, req: Value) -> Vec<Value> {
    stream(&format!("{}/v1/inference", w.url), Some(&body(req)))
        .unwrap_or_else(|e| panic!("inference refused: {e:?}"))
        .rest()
}

#[test]
fn loading_progress_counts_real_layers_then_ready() {
    let _turn = serial();
    let w = start_worker(&[]);
    // Subscribe as soon as the server answers, while the model loads.
    wait_until("the worker to answer", Duration::from_secs(30), || {
        matches!(try_get(&format!("{}/health", w.url)), Ok((200, _)))
    });
    let sse = stream(&format!("{}/v1/loading/progress", w.url), None).expect("progress stream");
    let events = sse.rest();
    let (last, progress) = events.split_last().expect("events");
    assert_eq!(last, &json!({"stage": "ready"}));
    assert!(
        !progress.is_empty(),
        "no progress seen before ready: {events:?}"
    );
    let mut previous = 0;
    for e in progress {
        assert_eq!(e["stage"], "loading_to_ram", "{e}");
        // SmolLM2-135M has 30 transformer blocks.
        assert_eq!(e["layers_total"], 30, "{e}");
        let loaded = e["layers_loaded"].as_u64().expect("layers_loaded");
        assert!(loaded >= previous && loaded <= 30, "{events:?}");
        previous = loaded;
    }
    let (_, ready) = get(&format!("{}/v1/ready", w.url));
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["state"], "ready");
    assert_eq!(ready["slots_total"], 4);
    assert_eq!(ready["slots_busy"], 0);
    assert_eq!(ready["queue_len"], 0);

    // A subscriber who comes after loading gets `ready` and [DONE] at once.
    let late = stream(&format!("{}/v1/loading/progress", w.url), None)
        .expect("progress stream")
        .rest();
    assert_eq!(late, vec![json!({"stage": "ready"})]);
}

#[test]
fn inference_streams_started_tokens_end_then_done() {
    let _turn = serial();
    let w = ready_worker(&[]);
    let events = infer(
        &w,
        json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "job_id": "job-42"}),
    );
    let started = &events[0];
    assert_eq!(started["type"], "started");
    assert_eq!(started["job_id"], "job-42");
    assert_eq!(started["model"], "smollm2-135m-instruct.q4_1");
    let at = started["started_at"].as_str().expect("started_at");
    assert!(
        at.len() == 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );

    let tokens: Vec<&Value> = events[1..events.len() - 1].iter().collect();
    assert!(!tokens.is_empty());
    for (n, t) in tokens.iter().enumerate() {
        assert_eq!(t["type"], "token", "{t}");
        assert_eq!(t["i"], n, "token events count from 0: {events:?}");
        assert!(!t["t"].as_str().expect("t").is_empty());
    }
    let (text, end) = text_and_end(&events);
    assert_eq!(end["tokens_out"], 12, "{end}");
    assert_eq!(end["stop_reason"], "max_tokens");
    assert!(end["decode_time_ms"].as_u64().is_some(), "{end}");
    assert!(tokens.len() <= 12);
    assert!(!text.trim().is_empty());
}

#[test]
fn greedy_output_is_identical_across_runs_and_seeds_repeat() {
    let _turn = serial();
    let w = ready_worker(&[]);
    let greedy = json!({"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0});
    let (a, _) = text_and_end(&infer(&w, greedy.clone()));
    let (b, _) = text_and_end(&infer(&w, greedy));
    assert_eq!(a, b);

    let seeded =
        json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "seed": 7});
    let (c, _) = text_and_end(&infer(&w, seeded.clone()));
    let (d, _) = text_and_end(&infer(&w, seeded));
    assert_eq!(c, d, "the same seed gives the same text");
}

#[test]
fn stop_sequences_end_generation_without_sending_the_stop() {
    let _turn = serial();
    let w = ready_worker(&[]);
    let prompt = "Count: 1, 2, 3, 4, 5, 6,";
    let (free, _) = text_and_end(&infer(
        &w,
        json!({"prompt": prompt, "max_tokens": 20, "temperature": 0}),
    ));
    // Stop on a piece of text the model is known (greedy) to produce.
    let chars: Vec<char> = free.chars().collect();
    assert!(chars.len() > 8, "{free:?}");
    let stop: String = chars[4..7].iter().collect();
    let stop = stop.as_str();
    let events = infer(
        &w,
        json!({"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": [stop]}),
    );
    let (text, end) = text_and_end(&events);
    assert_eq!(end["stop_reason"], "stop_sequence", "{events:?}");
    assert_eq!(text, &free[..free.find(stop).expect("stop in text")]);
    assert!(!text.contains(stop));
}

#[test]
fn four_streams_on_four_slots_decode_together() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "4"]);
    let prompts = [
        "Once upon a time",
        "The history of Rome",
        "My favourite recipe is",
        "In a galaxy far away",
    ];
    let url = format!("{}/v1/inference", w.url);
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let url = url.clone();
            let req = body(json!({"prompt": p, "max_tokens": 48, "temperature": 0.7, "seed": 1}));
            std::thread::spawn(move || stream(&url, Some(&req)).expect("accepted").rest())
        })
        .collect();
    let mut most_busy = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handles.iter().all(|h| h.is_finished()) && Instant::now() < deadline {
        let (_, ready) = get(&format!("{}/v1/ready", w.url));
        most_busy = most_busy.max(ready["slots_busy"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        let events = h.join().expect("stream thread");
        let (_, end) = text_and_end(&events);
        let tokens = events.iter().filter(|e| e["type"] == "token").count() as u64;
        let out = end["tokens_out"].as_u64().expect("tokens_out");
        match end["stop_reason"].as_str() {
            Some("max_tokens") => assert_eq!(out, 48, "{end}"),
            Some("eos") => assert!(out < 48, "{end}"),
            other => panic!("unexpected stop reason {other:?}"),
        }
        assert!(
            tokens >= 1 && tokens <= out,
            "{tokens} token events for {out} tokens"
        );
    }
    assert_eq!(most_busy, 4, "/v1/ready never showed all four slots busy");
    let (_, ready) = get(&format!("{}/v1/ready", w.url));
    assert_eq!(
        (ready["slots_busy"].clone(), ready["queue_len"].clone()),
        (json!(0), json!(0))
    );
}

#[test]
fn requests_beyond_slots_queue_and_beyond_the_queue_get_503() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "1", "--queue-size", "1"]);
    let url = format!("{}/v1/inference", w.url);
    let long = body(json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.7}));
    let mut first = stream(&url, Some(&long)).expect("first takes the slot");
    first.next_event();
    let queued_url = url.clone();
    let short = body(json!({"prompt": "Hello", "max_tokens": 4}));
    let queued =
        std::thread::spawn(move || stream(&queued_url, Some(&short)).expect("queued").rest());
    wait_until(
        "the second request to queue",
        Duration::from_secs(10),
        || get(&format!("{}/v1/ready", w.url)).1["queue_len"] == 1,
    );
    let (status, err) = post(&url, &body(json!({"prompt": "Hi", "max_tokens": 4})));
    assert_eq!(status, 503, "{err}");
    assert_eq!(err["error"]["code"], "QUEUE_FULL");
    drop(first);
    let events = queued.join().expect("queued request");
    assert_eq!(text_and_end(&events).1["type"], "end");
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "1"]);
    let url = format!("{}/v1/inference", w.url);
    let mut s = stream(
        &url,
        Some(&body(
            json!({"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0.8}),
        )),
    )
    .expect("accepted");
    assert_eq!(s.next_event()["type"], "started");
    for _ in 0..3 {
        assert_eq!(s.next_event()["type"], "token");
    }
    let (_, ready) = get(&format!("{}/v1/ready", w.url));
    assert_eq!(ready["slots_busy"], 1);
    drop(s);
    wait_until("the slot to be freed", Duration::from_secs(10), || {
        get(&format!("{}/v1/ready", w.url)).1["slots_busy"] == 0
    });
    let events = infer(
        &w,
        json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(text_and_end(&events).1["tokens_out"], 5);
}

#[test]
fn bad_requests_get_clear_errors_and_the_worker_keeps_serving() {
    let _turn = serial();
    let w = ready_worker(&["--ctx-size", "128"]);
    let url = format!("{}/v1/inference", w.url);
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("{not json".into(), 400, "INVALID_REQUEST", "invalid JSON"),
        (
            body(json!({"max_tokens": 5})),
            400,
            "INVALID_REQUEST",
            "prompt",
        ),
        (
            body(json!({"prompt": ""})),
            400,
            "INVALID_REQUEST",
            "prompt is empty",
        ),
        (
            body(json!({"prompt": "hi", "max_tokens": 0})),
            400,
            "INVALID_REQUEST",
            "max_tokens",
        ),
        (
            body(json!({"prompt": "hi", "max_tokens": -3})),
            400,
            "INVALID_REQUEST",
            "max_tokens",
        ),
        (
            body(json!({"prompt": "hi", "max_tokens": 1_000_000_000})),
            400,
            "INVALID_REQUEST",
            "between 1 and 1048576",
        ),
        (
            body(json!({"prompt": "hi", "temperature": 3})),
            400,
            "INVALID_REQUEST",
            "temperature must be between 0 and 2",
        ),
        (
            body(json!({"prompt": "hi", "temperature": -1})),
            400,
            "INVALID_REQUEST",
            "temperature",
        ),
        (
            body(json!({"prompt": "hi", "max_tokns": 5})),
            400,
            "INVALID_REQUEST",
            "max_tokns",
        ),
        (
            body(json!({"prompt": "word ".repeat(300)})),
            400,
            "CONTEXT_OVERFLOW",
            "128 tokens",
        ),
        (
            body(json!({"prompt": "x".repeat(2 << 20)})),
            413,
            "BODY_TOO_LARGE",
            "over",
        ),
    ];
    for (req, status, code, says) in cases {
        let (got, err) = post(&url, &req);
        let shown = &req[..req.len().min(60)];
        assert_eq!(got, status, "{shown}: {err}");
        assert_eq!(err["error"]["code"], code, "{shown}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(says),
            "{shown}: {message:?} should mention {says:?}"
        );
    }
    let (status, err) = get(&format!("{}/v1/nothing-here", w.url));
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let (status, err) = request("GET", &url);
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (405, Some("METHOD_NOT_ALLOWED"))
    );
    let (status, err) = request("DELETE", &format!("{}/v1/ready", w.url));
    assert_eq!(status, 405, "{err}");

    let events = infer(&w, json!({"prompt": "Hello", "max_tokens": 3}));
    assert_eq!(text_and_end(&events).1["tokens_out"], 3);
    let (_, health) = get(&format!("{}/health", w.url));
    assert_eq!(health["status"], "alive");
    assert_eq!(health["role"], "worker");
    assert_eq!(health["api_version"], "v1");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let _turn = serial();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let model = model_path();
    let mut w = Proc::start(
        &[
            "worker",
            "--model",
            model.to_str().expect("utf-8"),
            "--port",
            &port.to_string(),
        ],
        port,
    );
    let status = w.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(!status.success());
    let err = w.stderr();
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn a_model_that_cannot_load_is_reported_and_ends_the_worker() {
    let _turn = serial();
    let dir = std::env::temp_dir().join(format!("rbee-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, "these are not weights").expect("write");
    let missing = dir.join("missing.gguf");
    for (path, says) in [
        (&not_gguf, "not a GGUF model file"),
        (&missing, "cannot open model file"),
    ] {
        let hive = CallbackServer::start();
        let port = free_port();
        let mut w = Proc::start(
            &[
                "worker",
                "--model",
                path.to_str().expect("utf-8"),
                "--port",
                &port.to_string(),
                "--worker-id",
                "w-bad",
                "--callback-url",
                &hive.url,
            ],
            port,
        );
        let status = w.wait_exit(Duration::from_secs(30)).expect("exits");
        assert!(!status.success(), "{}", w.stderr());
        let last_line = w.stderr().lines().last().unwrap_or("").to_string();
        assert!(last_line.contains(says), "{last_line}");
        let report = hive.next(Duration::from_secs(5)).expect("the hive is told");
        assert_eq!(report["worker_id"], "w-bad");
        assert_eq!(report["state"], "failed");
        assert!(
            report["error"].as_str().unwrap_or("").contains(says),
            "{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loaded_worker_calls_its_hive_back() {
    let _turn = serial();
    let hive = CallbackServer::start();
    let w = start_worker(&[
        "--worker-id",
        "w-1",
        "--callback-url",
        &hive.url,
        "--slots",
        "2",
    ]);
    let report = hive.next(Duration::from_secs(60)).expect("callback");
    assert_eq!(report["worker_id"], "w-1");
    assert_eq!(report["state"], "ready");
    assert_eq!(report["url"], w.url.as_str());
    assert_eq!(report["model"], "smollm2-135m-instruct.q4_1");
    assert_eq!(report["slots"], 2);
    let (_, ready) = get(&format!("{}/v1/ready", w.url));
    assert_eq!(ready["ready"], true);
}

#[test]
fn shutdown_during_a_stream_cancels_it_and_exits_cleanly() {
    let _turn = serial();
    for how in ["admin", "TERM"] {
        let mut w = ready_worker(&[]);
        let url = format!("{}/v1/inference", w.url);
        let mut s = stream(
            &url,
            Some(&body(
                json!({"prompt": "Once upon a time", "max_tokens": 2000}),
            )),
        )
        .expect("accepted");
        assert_eq!(s.next_event()["type"], "started");
        assert_eq!(s.next_event()["type"], "token");
        if how == "admin" {
            let (status, _) = post(&format!("{}/v1/admin/shutdown", w.url), "");
            assert_eq!(status, 202);
        } else {
            w.signal(how);
        }
        let rest = s.rest();
        let last = rest.last().expect("a last event");
        assert_eq!(last["type"], "error", "{how}: {last}");
        assert_eq!(last["code"], "CANCELLED", "{how}: {last}");
        let status = w.wait_exit(Duration::from_secs(30)).expect("exits");
        assert!(status.success(), "{how}: {status:?}\n{}", w.stderr());
    }
}

#[test]
fn nonsensical_flags_are_refused_with_the_reason() {
    let model = model_path();
    let model = model.to_str().expect("utf-8");
    for (flag, value, says) in [
        ("--slots", "0", "--slots: slots must be between 1 and 256"),
        (
            "--slots",
            "4294967295",
            "--slots: slots must be between 1 and 256",
        ),
        (
            "--queue-size",
            "4294967295",
            "--queue-size must be at most 100000",
        ),
        (
            "--ctx-size",
            "8",
            "--ctx-size: a context of 8 tokens per slot is less than the least of 64",
        ),
        ("--host", "0.0.0.0", "without a token"),
    ] {
        let port = free_port();
        let mut w = Proc::start(
            &[
                "worker",
                "--model",
                model,
                "--port",
                &port.to_string(),
                flag,
                value,
            ],
            port,
        );
        let status = w.wait_exit(Duration::from_secs(30)).expect("exits");
        assert!(!status.success());
        assert!(w.stderr().contains(says), "{flag} {value}: {}", w.stderr());
    }
}

#[test]
fn rbee_attn_kernel_picks_the_attention_kernel_and_the_worker_says_which() {
    let _turn = serial();
    let kernel_of = |w: &Proc| {
        let (_, props) = get(&format!("{}/props", w.url));
        let metrics = ureq::get(&format!("{}/metrics", w.url))
            .call()
            .expect("metrics")
            .into_body()
            .read_to_string()
            .expect("text");
        (
            props["attention_kernel"].clone(),
            props["attention_kernel_self_test"].clone(),
            metrics,
        )
    };
    // A long prompt, then a turn after it: a few new tokens over a cache of
    // hundreds, the shape rbee's kernel takes.
    let story = "Once upon a time, in a small village by the sea, there lived a baker. ".repeat(12);
    let turn = |w: &Proc| {
        for prompt in [story.clone(), format!("{story} And one morning")] {
            let (text, end) = text_and_end(&infer(
                w,
                json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
            ));
            assert_eq!(end["tokens_out"], 4, "{text}");
        }
    };
    let ours = ready_worker(&[]);
    let (name, self_test, metrics) = kernel_of(&ours);
    assert_eq!(name, "fa-small");
    // The self-test ran on SmolLM2's own shape at the worker's threads, and passed.
    assert_eq!(self_test, "passed");
    assert!(
        metrics.contains(r#"rbee_worker_attention_kernel{kernel="fa-small",self_test="passed"} 1"#),
        "{metrics}"
    );
    let said = ours.stderr();
    assert!(
        said.contains("attention kernel: fa-small")
            && said.contains("self-test on head size 64, 9 query heads on 3 KV heads at ")
            && said.contains("threads: passed"),
        "{said}"
    );
    turn(&ours);
    drop(ours);

    let port = free_port();
    let model = model_path();
    let args = [
        "worker",
        "--model",
        model.to_str().expect("utf-8"),
        "--port",
        &port.to_string(),
    ];
    let upstream = Proc::start_with_env(&args, port, &[("RBEE_ATTN_KERNEL", "upstream")]);
    wait_ready(&upstream);
    let (name, self_test, metrics) = kernel_of(&upstream);
    assert_eq!(name, "upstream");
    assert_eq!(self_test, "not run (RBEE_ATTN_KERNEL=upstream)");
    assert!(
        metrics
            .contains(r#"rbee_worker_attention_kernel{kernel="upstream",self_test="not run"} 1"#),
        "{metrics}"
    );
    turn(&upstream);
    drop(upstream);

    let port = free_port();
    let args = [
        "worker",
        "--model",
        model.to_str().expect("utf-8"),
        "--port",
        &port.to_string(),
    ];
    let mut bad = Proc::start_with_env(&args, port, &[("RBEE_ATTN_KERNEL", "off")]);
    let status = bad.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(!status.success());
    assert!(
        bad.stderr().contains("RBEE_ATTN_KERNEL"),
        "{}",
        bad.stderr()
    );
}
