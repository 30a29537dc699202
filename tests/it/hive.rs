//! `rbee hive` against the Hugging Face stand-in and the real SmolLM2 model.

use crate::hf_server::HfServer;
use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SIZE: u64 = 98_362_432;
const REF: &str = "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1";

fn hf() -> HfServer {
    let hf = HfServer::start();
    hf.add_repo(REPO, FILE, &model_path(), SHA256);
    hf.add_repo_without_gguf("someone/just-docs");
    hf
}

/// A hive on a free port with its own data directory, answering.
fn hive(data: &TempDir, hf: &HfServer, extra: &[&str]) -> Proc {
    start_hive(data, extra, &[("HF_ENDPOINT", &hf.url), ("HF_TOKEN", "")])
}

fn download(h: &Proc, model_ref: &str) -> (u16, Value) {
    post(
        &format!("{}/v1/models/download", h.url),
        &json!({"model_ref": model_ref}).to_string(),
    )
}

fn progress(h: &Proc, id: &str) -> Vec<Value> {
    stream(
        &format!("{}/v1/models/download/progress?id={id}", h.url),
        None,
    )
    .expect("progress stream")
    .rest()
}

fn models(h: &Proc) -> Vec<Value> {
    get(&format!("{}/v1/models", h.url))
        .1
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Checks a finished progress stream: rising byte counts, then `complete`.
fn assert_completed(events: &[Value]) -> String {
    let (last, rest) = events.split_last().expect("events");
    assert_eq!(last["stage"], "complete", "{last}");
    let mut previous = 0;
    for e in rest {
        assert_eq!(e["stage"], "downloading", "{e}");
        assert_eq!(e["bytes_total"], SIZE);
        let b = e["bytes_downloaded"].as_u64().expect("bytes");
        assert!(b >= previous && b <= SIZE, "{e}");
        assert!(e["speed_mbps"].as_f64().is_some());
        previous = b;
    }
    last["local_path"].as_str().expect("local_path").to_string()
}

#[test]
fn a_download_is_shared_watched_by_two_and_lands_in_the_catalog_across_restarts() {
    let _turn = serial();
    let hf = hf();
    hf.faults(|f| f.bytes_per_sec = Some(60 << 20));
    let data = TempDir::new("hive-dl");
    let mut h = hive(&data, &hf, &[]);

    let (status, started) = download(&h, REF);
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["state"], "downloading");
    let id = started["download_id"].as_str().expect("id").to_string();
    let (_, again) = download(&h, REF);
    assert_eq!(
        again["download_id"],
        id.as_str(),
        "the same model shares one download"
    );

    let watchers: Vec<_> = (0..2)
        .map(|_| {
            let url = format!("{}/v1/models/download/progress?id={id}", h.url);
            std::thread::spawn(move || stream(&url, None).expect("stream").rest())
        })
        .collect();
    for w in watchers {
        let events = w.join().expect("watcher");
        assert!(
            events.len() > 2,
            "progress was seen while downloading: {events:?}"
        );
        let path = assert_completed(&events);
        assert_eq!(path, started["local_path"].as_str().unwrap());
    }
    let path = started["local_path"].as_str().unwrap().to_string();
    assert!(path.ends_with(&format!("models/{REPO}/{FILE}")), "{path}");
    assert_eq!(std::fs::metadata(&path).expect("the file").len(), SIZE);
    assert!(!std::path::Path::new(&format!("{path}.part")).exists());
    assert_eq!(
        hf.file_requests().len(),
        1,
        "downloaded once: {:?}",
        hf.file_requests()
    );

    // A late subscriber hears that it is complete, at once.
    assert_completed(&progress(&h, &id));

    let expected = json!({
        "name": "smollm2-135m-instruct.q4_1", "model_ref": REF, "path": path, "size": SIZE,
        "sha256": SHA256, "architecture": "llama", "parameters": 134_515_008u64,
        "quantization": "Q4_1", "context_length": 8192, "layers": 30, "owned": true,
    });
    let check = |entries: Vec<Value>| {
        assert_eq!(entries.len(), 1, "{entries:?}");
        for (k, v) in expected.as_object().unwrap() {
            assert_eq!(&entries[0][k], v, "{k}");
        }
    };
    check(models(&h));

    // The catalog survives a restart; asking again needs no download.
    h.signal("TERM");
    assert!(h
        .wait_exit(Duration::from_secs(30))
        .expect("stops")
        .success());
    let h = hive(&data, &hf, &[]);
    check(models(&h));
    let (_, again) = download(&h, REF);
    assert_eq!(again["state"], "complete");
    assert_eq!(hf.file_requests().len(), 1);

    // Deleting an owned model removes entry and file.
    let (status, _) = request(
        "DELETE",
        &format!("{}/v1/models/smollm2-135m-instruct.q4_1", h.url),
    );
    assert_eq!(status, 200);
    assert!(models(&h).is_empty());
    assert!(!std::path::Path::new(&path).exists());
    let (status, err) = request(
        "DELETE",
        &format!("{}/v1/models/smollm2-135m-instruct.q4_1", h.url),
    );
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("MODEL_NOT_FOUND"))
    );
}

#[test]
fn a_connection_cut_mid_file_resumes_where_it_broke() {
    let _turn = serial();
    let hf = hf();
    hf.faults(|f| f.cut_after = Some(30 << 20));
    let data = TempDir::new("hive-cut");
    let h = hive(&data, &hf, &[]);
    let (_, started) = download(&h, REF);
    assert_completed(&progress(&h, started["download_id"].as_str().unwrap()));
    let requests = hf.file_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!((requests[0].from, requests[0].sent), (0, 30 << 20));
    assert_eq!(
        requests[1].from,
        30 << 20,
        "resumed with Range, not from zero"
    );
    assert_eq!(models(&h)[0]["sha256"], SHA256);
}

#[test]
fn a_hive_killed_mid_download_resumes_after_restart() {
    let _turn = serial();
    let hf = hf();
    hf.faults(|f| f.bytes_per_sec = Some(20 << 20));
    let data = TempDir::new("hive-restart");
    let mut h = hive(&data, &hf, &[]);
    let (_, started) = download(&h, REF);
    let part = format!("{}.part", started["local_path"].as_str().unwrap());
    wait_until("20 MB on disk", Duration::from_secs(30), || {
        std::fs::metadata(&part).map_or(0, |m| m.len()) > 20 << 20
    });
    h.signal("KILL");
    h.wait_exit(Duration::from_secs(10)).expect("killed");
    let kept = std::fs::metadata(&part)
        .expect("the .part file stays")
        .len();

    hf.faults(|f| f.bytes_per_sec = None);
    let h = hive(&data, &hf, &[]);
    let (_, again) = download(&h, REF);
    assert_completed(&progress(&h, again["download_id"].as_str().unwrap()));
    let requests = hf.file_requests();
    let resumed = requests.last().expect("a second request");
    assert!(
        resumed.from > 0 && resumed.from <= kept,
        "{requests:?}, kept {kept}"
    );
    assert_eq!(models(&h)[0]["sha256"], SHA256);
}

#[test]
fn a_wrong_checksum_fails_and_removes_the_file() {
    let _turn = serial();
    let hf = hf();
    hf.faults(|f| f.wrong_sha = true);
    let data = TempDir::new("hive-sha");
    let h = hive(&data, &hf, &[]);
    let (_, started) = download(&h, REF);
    let events = progress(&h, started["download_id"].as_str().unwrap());
    let last = events.last().expect("events");
    assert_eq!(last["stage"], "error", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{last}"
    );
    let path = started["local_path"].as_str().unwrap();
    assert!(!std::path::Path::new(path).exists());
    assert!(!std::path::Path::new(&format!("{path}.part")).exists());
    assert!(models(&h).is_empty());
}

#[test]
fn references_that_cannot_be_had_get_clear_errors() {
    let _turn = serial();
    let hf = hf();
    let data = TempDir::new("hive-errors");
    let h = hive(&data, &hf, &[]);
    for (model_ref, status, code, says) in [
        (
            "hf:nobody/nothing-GGUF",
            404,
            "REPO_NOT_FOUND",
            "no such repository",
        ),
        (
            &format!("hf:{REPO}:Q8_0") as &str,
            404,
            "MODEL_NOT_FOUND",
            "the quantizations there are Q4_1",
        ),
        ("hf:someone/just-docs", 404, "NO_GGUF", "no .gguf file"),
        ("hf:broken", 400, "INVALID_MODEL_REF", "hf:ORG/REPO"),
        (
            "no-such-model",
            404,
            "MODEL_NOT_FOUND",
            "no model named no-such-model",
        ),
        (
            "file:/nowhere/x.gguf",
            404,
            "MODEL_NOT_FOUND",
            "cannot open model file",
        ),
    ] {
        let (got, err) = download(&h, model_ref);
        assert_eq!(got, status, "{model_ref}: {err}");
        assert_eq!(err["error"]["code"], code, "{model_ref}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(says), "{model_ref}: {message}");
    }
    let (status, err) = post(&format!("{}/v1/models/download", h.url), "{\"ref\": 1}");
    assert_eq!(status, 400, "{err}");
    let (status, _) = get(&format!("{}/v1/models/download/progress?id=dl-nope", h.url));
    assert_eq!(status, 404);

    // A gated repo: without a token the error says a token is needed.
    hf.faults(|f| f.token = Some("hf_secret".into()));
    let (status, err) = download(&h, REF);
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("HF_TOKEN_NEEDED")),
        "{err}"
    );
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("HF_TOKEN"));
}

#[test]
fn a_model_goes_from_download_to_worker_to_tokens_to_shutdown() {
    let _turn = serial();
    let hf = hf();
    let data = TempDir::new("hive-e2e");
    let h = hive(&data, &hf, &["--worker-flash-attn", "off"]);
    let (_, started) = download(&h, REF);
    assert_completed(&progress(&h, started["download_id"].as_str().unwrap()));

    let (status, w) = post(
        &format!("{}/v1/workers/spawn", h.url),
        &json!({"model_ref": "smollm2-135m-instruct.q4_1", "backend": "cpu", "device": 0})
            .to_string(),
    );
    assert_eq!(status, 202, "{w}");
    assert_eq!(w["state"], "loading");
    let id = w["worker_id"].as_str().unwrap().to_string();
    let url = w["url"].as_str().unwrap().to_string();
    let pid = w["pid"].as_u64().unwrap() as u32;
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the worker's argv");
    assert!(
        argv.windows(16).any(|w| w == b"--flash-attn\0off"),
        "the hive's --worker-flash-attn reaches the worker: {}",
        String::from_utf8_lossy(&argv)
    );
    wait_until("the worker to be ready", Duration::from_secs(60), || {
        get(&format!("{}/v1/workers/list", h.url)).1[0]["state"] == "ready"
    });
    // A CPU worker's memory is bounded, so a runaway request fails in it alone.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("its limits");
    let address_space = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .unwrap_or_default();
    assert!(!address_space.contains("unlimited"), "{address_space}");
    let events = stream(
        &format!("{url}/v1/inference"),
        Some(&json!({"prompt": "Hello", "max_tokens": 6, "temperature": 0}).to_string()),
    )
    .expect("inference")
    .rest();
    assert_eq!(events.last().unwrap()["tokens_out"], 6);

    let (status, _) = post(&format!("{}/v1/workers/{id}/shutdown", h.url), "");
    assert_eq!(status, 202);
    wait_until("the worker to exit", Duration::from_secs(20), || {
        !alive(pid)
    });
    wait_until("the list to forget it", Duration::from_secs(5), || {
        get(&format!("{}/v1/workers/list", h.url)).1 == json!([])
    });
    let (status, err) = post(&format!("{}/v1/workers/{id}/shutdown", h.url), "");
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("WORKER_NOT_FOUND"))
    );

    // Spawning what the catalog lacks, or on a backend this build lacks, is refused.
    for (body, status_wanted, code) in [
        (
            json!({"model_ref": "hf:someone/else-GGUF"}),
            404,
            "MODEL_NOT_FOUND",
        ),
        (
            json!({"model_ref": "smollm2-135m-instruct.q4_1", "backend": "cuda"}),
            400,
            "BACKEND_UNAVAILABLE",
        ),
        (
            json!({"model_ref": "smollm2-135m-instruct.q4_1", "program": "/bin/sh"}),
            400,
            "INVALID_REQUEST",
        ),
    ] {
        let (status, err) = post(&format!("{}/v1/workers/spawn", h.url), &body.to_string());
        assert_eq!(status, status_wanted, "{body}: {err}");
        assert_eq!(err["error"]["code"], code, "{body}: {err}");
    }
}

#[test]
fn a_worker_that_cannot_load_is_reported_failed_with_its_stderr() {
    let _turn = serial();
    let hf = hf();
    let data = TempDir::new("hive-fail");
    // A valid GGUF header whose weights are cut off: it registers, but cannot load.
    let truncated = data.path().join("truncated.gguf");
    let bytes = std::fs::read(model_path()).expect("model");
    std::fs::write(&truncated, &bytes[..10 << 20]).expect("write");
    let h = hive(&data, &hf, &[]);
    let (status, w) = post(
        &format!("{}/v1/workers/spawn", h.url),
        &json!({"model_ref": format!("file:{}", truncated.display())}).to_string(),
    );
    assert_eq!(status, 202, "{w}");
    let mut listed = Value::Null;
    wait_until("the worker to fail", Duration::from_secs(60), || {
        listed = get(&format!("{}/v1/workers/list", h.url)).1[0].clone();
        listed["state"] == "failed"
    });
    let error = listed["error"].as_str().unwrap_or("");
    assert!(error.contains("truncated.gguf"), "{error}");
    // It reports first, then exits.
    let pid = w["pid"].as_u64().unwrap() as u32;
    wait_until("the failed worker to exit", Duration::from_secs(20), || {
        !alive(pid)
    });
}

#[test]
fn idle_workers_are_stopped() {
    let _turn = serial();
    let hf = hf();
    let data = TempDir::new("hive-idle");
    let h = hive(&data, &hf, &["--idle-timeout", "1s"]);
    let model = format!("file:{}", model_path().display());
    let (_, w) = post(
        &format!("{}/v1/workers/spawn", h.url),
        &json!({"model_ref": model}).to_string(),
    );
    let pid = w["pid"].as_u64().expect("pid") as u32;
    // The file was registered at once; its checksum follows, computed aside.
    wait_until("the file's sha256", Duration::from_secs(30), || {
        models(&h).first().is_some_and(|m| m["sha256"] == SHA256)
    });
    wait_until(
        "the idle worker to be stopped",
        Duration::from_secs(60),
        || !alive(pid),
    );
    wait_until("the list to forget it", Duration::from_secs(5), || {
        get(&format!("{}/v1/workers/list", h.url)).1 == json!([])
    });
}

#[test]
fn a_hive_killed_with_sigkill_leaves_no_worker_behind() {
    let _turn = serial();
    let hf = hf();
    let data = TempDir::new("hive-kill");
    let mut h = hive(&data, &hf, &[]);
    let model = format!("file:{}", model_path().display());
    let pids: Vec<u32> = (0..2)
        .map(|_| {
            let (_, w) = post(
                &format!("{}/v1/workers/spawn", h.url),
                &json!({"model_ref": model}).to_string(),
            );
            w["pid"].as_u64().expect("pid") as u32
        })
        .collect();
    wait_until("both workers ready", Duration::from_secs(60), || {
        let list = get(&format!("{}/v1/workers/list", h.url)).1;
        list.as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|w| w["state"] == "ready"))
    });
    h.signal("KILL");
    h.wait_exit(Duration::from_secs(10)).expect("killed");
    wait_until(
        "the workers to die with their hive",
        Duration::from_secs(20),
        || pids.iter().all(|&p| !alive(p)),
    );
}

#[test]
fn the_hive_reports_what_this_machine_can_do() {
    let hf = hf();
    let data = TempDir::new("hive-caps");
    let h = hive(&data, &hf, &[]);
    let (status, caps) = get(&format!("{}/v1/capabilities", h.url));
    assert_eq!(status, 200);
    assert!(caps["cores"].as_u64().unwrap() >= 1);
    assert!(caps["ram_total_mb"].as_u64().unwrap() > 0);
    assert!(caps["disk_free_mb"].as_u64().unwrap() > 0);
    assert!(caps["backends"].as_array().unwrap().contains(&json!("cpu")));
    if !rbee::GPU_BACKEND {
        assert_eq!(caps["gpus"], json!([]), "a CPU build lists no GPUs");
    }
    let (_, health) = get(&format!("{}/v1/health", h.url));
    assert_eq!(health["role"], "hive");
    let (status, _) = get(&format!("{}/v1/nope", h.url));
    assert_eq!(status, 404);
    let (status, _) = request("DELETE", &format!("{}/v1/workers/list", h.url));
    assert_eq!(status, 405);
}

#[test]
fn with_a_token_every_endpoint_but_health_needs_it_and_workers_carry_it() {
    let _turn = serial();
    let hf = hf();
    let data = TempDir::new("hive-token");
    let port = free_port();
    let port_s = port.to_string();
    let h = Proc::start_with_env(
        &["hive", "--port", &port_s, "--data-dir", data.str()],
        port,
        &[("HF_ENDPOINT", &hf.url), ("RBEE_TOKEN", "s3cret")],
    );
    wait_until("the hive to answer", Duration::from_secs(30), || {
        matches!(try_get(&format!("{}/health", h.url)), Ok((200, _)))
    });
    let (status, err) = get(&format!("{}/v1/models", h.url));
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED"))
    );

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let authed_post = |path: &str, body: Value| {
        let resp = agent
            .post(&format!("{}{path}", h.url))
            .header("authorization", "Bearer s3cret")
            .send(body.to_string())
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.into_body().read_json::<Value>().expect("json"))
    };
    let model = format!("file:{}", model_path().display());
    let (status, w) = authed_post("/v1/workers/spawn", json!({"model_ref": model}));
    assert_eq!(status, 202, "{w}");
    let url = w["url"].as_str().unwrap().to_string();
    // The worker got the token too: its callback was accepted, and it guards its own API.
    wait_until(
        "the worker to report ready",
        Duration::from_secs(60),
        || {
            let resp = agent
                .get(&format!("{}/v1/workers/list", h.url))
                .header("authorization", "Bearer s3cret")
                .call()
                .expect("list");
            resp.into_body().read_json::<Value>().expect("json")[0]["state"] == "ready"
        },
    );
    let (status, _) = get(&format!("{url}/v1/ready"));
    assert_eq!(status, 401);
}

/// Unmounts a test's filesystem when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_download_saying_what_is_missing_and_the_hive_still_serves() {
    // A small disk of its own: a tmpfs (mounting needs root, as CI runs).
    let mnt = TempDir::new("full-disk");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=200m", "tmpfs", mnt.str()])
        .status();
    assert!(
        mounted.is_ok_and(|s| s.success()),
        "mounting a tmpfs for this test needs root"
    );
    let _unmount = Unmount(mnt.path().to_path_buf());
    let data = TempDir(mnt.path().join("data"));
    let hf = hf();
    hf.faults(|f| f.bytes_per_sec = Some(24 << 20));
    let h = hive(&data, &hf, &[]);
    let (status, started) = download(&h, REF);
    assert_eq!(status, 202, "{started}");
    let part = data.path().join(format!("models/{REPO}/{FILE}.part"));
    wait_until(
        "the download to be under way",
        Duration::from_secs(30),
        || std::fs::metadata(&part).is_ok_and(|m| m.len() > 8 << 20),
    );
    // Something else fills the disk meanwhile.
    {
        use std::io::Write;
        let mut ballast = std::fs::File::create(mnt.path().join("ballast")).expect("a file");
        let chunk = vec![0u8; 1 << 20];
        while ballast.write_all(&chunk).is_ok() {}
    }
    let events = progress(&h, started["download_id"].as_str().expect("an id"));
    let last = events.last().expect("events");
    let message = last["message"].as_str().unwrap_or_default();
    assert_eq!(last["stage"], "error", "{events:?}");
    assert!(
        message.contains("the disk is full") && message.contains("MB more are needed"),
        "{message}"
    );
    assert!(part.exists(), "the partial download is kept for resuming");

    // Restarted on the full disk, the hive serves, and says what the partial file takes.
    drop(h);
    let h = hive(&data, &hf, &[]);
    assert_eq!(get(&format!("{}/v1/models", h.url)).0, 200);
    let (_, caps) = get(&format!("{}/v1/capabilities", h.url));
    assert!(caps["partial_downloads_mb"].as_u64() > Some(8), "{caps}");
    let (status, cleaned) = request("DELETE", &format!("{}/v1/models/download/partial", h.url));
    assert_eq!(status, 200, "{cleaned}");
    assert_eq!(
        cleaned["removed"].as_array().map(Vec::len),
        Some(1),
        "{cleaned}"
    );
    assert!(!part.exists());
}

#[test]
fn a_large_file_is_registered_at_once_and_its_hash_follows_with_progress() {
    let hf = hf();
    let data = TempDir::new("hive-hashing");
    let h = hive(&data, &hf, &[]);
    // SmolLM2 followed by 3 GiB of holes: a large file that takes no disk.
    let big = data.path().join("Big Model.gguf");
    std::fs::copy(model_path(), &big).expect("copied");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .expect("opened");
    file.set_len(3 << 30).expect("extended");
    let (status, started) = download(&h, &format!("file:{}", big.display()));
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["state"], "complete", "usable at once: {started}");
    let listed = models(&h);
    let entry = &listed[0];
    assert_eq!(entry["name"], "big-model", "{entry}");
    assert_eq!(entry["sha256"], "", "{entry}");
    assert_eq!(entry["hashing"]["bytes_total"], 3u64 << 30, "{entry}");
    let mut seen = Vec::new();
    wait_until("the file's sha256", Duration::from_secs(120), || {
        let entry = models(&h)[0].clone();
        if let Some(done) = entry["hashing"]["bytes_hashed"].as_u64() {
            seen.push(done);
        }
        entry["sha256"].as_str().is_some_and(|s| s.len() == 64)
    });
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(models(&h)[0].get("hashing").is_none());
}

#[test]
fn a_hive_has_an_identity_from_its_first_start_and_keeps_it() {
    let hf = hf();
    let data = TempDir::new("hive-identity");
    let show = |role: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args([role, "--show-identity", "--data-dir", data.str()])
            .output()
            .expect("rbee runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let h = hive(&data, &hf, &[]);
    let said = h.stderr();
    let shown = show("hive");
    assert!(shown.starts_with("sha256:") && shown.len() == 71, "{shown}");
    assert!(said.contains(&format!("hive identity {shown}")), "{said}");
    drop(h);
    // Restarted, it is the same hive.
    let h = hive(&data, &hf, &[]);
    assert!(h.stderr().contains(&format!("hive identity {shown}")));
    assert_eq!(show("hive"), shown);
    // A queen on the same data dir (as with its local hive) is another identity.
    assert_ne!(show("queen"), shown);
}
