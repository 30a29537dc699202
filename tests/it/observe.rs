//! Seeing the cluster (DESIGN.md §13): a real Prometheus scrapes a queen, a
//! hive and a worker and its answers match what ran; the status page, loaded
//! in a real headless browser, shows the hive, the worker and the job; with
//! a token, the page logs in for a session cookie that opens its doors only.

use crate::chain::{file_model, Cluster};
use crate::support::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A greedy job through the job API: its `end` event.
fn job(queen: &str, max_tokens: u32) -> Value {
    let body = json!({"model": file_model(), "prompt": "Once upon a time",
                      "max_tokens": max_tokens, "temperature": 0});
    let (status, created) = post(&format!("{queen}/v1/jobs"), &body.to_string());
    assert_eq!(status, 201, "{created}");
    let url = format!("{queen}{}", created["sse_url"].as_str().expect("a url"));
    let events = stream(&url, None).expect("the job streams").rest();
    events
        .into_iter()
        .find(|e| e["type"] == "end")
        .expect("the job ends")
}

/// A program this test needs, or why the test cannot run here.
fn program(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED: {name} is not installed (make test installs it with apt-get)");
    }
    found
}

/// A child killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// One instant query to Prometheus: the value of each series, by its labels.
fn query(prometheus: &str, q: &str) -> Vec<(Value, f64)> {
    let url = format!("{prometheus}/api/v1/query?query={}", encode(q));
    let Ok((200, answer)) = try_get(&url) else {
        return Vec::new();
    };
    answer["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let v = r["value"][1].as_str()?.parse().ok()?;
            Some((r["metric"].clone(), v))
        })
        .collect()
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_queen_hive_and_worker_and_its_figures_match_what_ran() {
    let Some(prometheus) = program("prometheus") else {
        return;
    };
    let _turn = serial();
    let home = TempDir::new("prom-hive");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("prom", &[("h", &hive)]);
    let ends = [job(&c.queen, 12), job(&c.queen, 7)];
    let streamed: u64 = ends.iter().filter_map(|e| e["tokens_out"].as_u64()).sum();
    let (_, workers) = get(&format!("{}/v1/workers", c.queen));
    let worker = workers[0]["url"].as_str().expect("a worker").to_string();

    let dir = TempDir::new("prom");
    let config = dir.path().join("prometheus.yml");
    let targets = [
        ("queen", &c.queen),
        ("hive", &hive.url),
        ("worker", &worker),
    ]
    .iter()
    .map(|(job, url)| {
        format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{}']\n",
            host_port(url)
        )
    })
    .collect::<String>();
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{targets}"),
    )
    .expect("config written");
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let _prometheus = Killed(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    wait_until(
        "Prometheus to scrape all three",
        Duration::from_secs(60),
        || {
            let up = query(&server, "up");
            up.len() == 3 && up.iter().all(|(_, v)| *v == 1.0)
        },
    );
    let one = |q: &str| {
        let mut found = None;
        wait_until(q, Duration::from_secs(30), || {
            found = query(&server, q).first().map(|(_, v)| *v);
            found.is_some()
        });
        found.unwrap_or_default()
    };
    // llama-server's names, with what the two jobs streamed.
    assert_eq!(one("llamacpp:tokens_predicted_total"), streamed as f64);
    assert!(one("llamacpp:prompt_tokens_total") > 0.0);
    assert!(one("llamacpp:n_decode_total") >= streamed as f64);
    assert_eq!(one("rbee_worker_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(one("rbee_queen_jobs_total{outcome=\"ok\"}"), 2.0);
    assert_eq!(one("rbee_queen_hives{state=\"up\"}"), 1.0);
    assert_eq!(one("rbee_hive_workers{state=\"ready\"}"), 1.0);
    assert!(one("rbee_hive_memory_budget_bytes") > 0.0);
}

#[test]
fn the_status_page_in_a_real_browser_shows_the_hive_the_worker_and_the_job() {
    let Some(chromium) = program("chromium") else {
        return;
    };
    let _turn = serial();
    let home = TempDir::new("page-hive");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("page", &[("garden", &hive)]);
    // Screenshots for a person to look at, kept with the build's test files.
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (chromium, shots_dir) = (chromium.display().to_string(), shots.display().to_string());
    let stdout = python(
        "browser/status_page.py",
        &[&chromium, &c.queen, "garden", &file_model(), &shots_dir],
    );
    assert!(stdout.contains("all ok"), "{stdout}");
    for name in ["laptop", "phone"] {
        let path = shots.join(format!("status-page-{name}.png"));
        assert!(path.is_file(), "no screenshot at {}", path.display());
        eprintln!("status page screenshot: {}", path.display());
    }
}

#[test]
fn with_a_token_the_page_trades_it_for_a_cookie_that_opens_its_doors_only() {
    let home = TempDir::new("page-token");
    let token_file = home.path().join("token");
    std::fs::write(&token_file, "page-secret\n").expect("token written");
    let token = token_file.display().to_string();
    let queen = start_queen(&home, &["--token-file", &token]);
    let url = |p: &str| format!("{}{p}", queen.url);
    let (status, _, page) = call("GET", &url("/"), &[], None);
    assert_eq!(status, 200, "the page itself holds no data");
    assert!(page.contains("<title>rbee cluster</title>"));
    assert_eq!(call("GET", &url("/v1/status"), &[], None).0, 401);
    assert_eq!(call("GET", &url("/metrics"), &[], None).0, 401);
    let bearer = [("authorization", "Bearer page-secret")];
    let (status, _, metrics) = call("GET", &url("/metrics"), &bearer, None);
    assert_eq!(status, 200);
    assert!(metrics.contains("rbee_queen_jobs_running 0"), "{metrics}");

    let wrong = json!({"token": "guess"}).to_string();
    assert_eq!(call("POST", &url("/v1/session"), &[], Some(&wrong)).0, 401);
    let right = json!({"token": "page-secret"}).to_string();
    let (status, set_cookie, _) = call("POST", &url("/v1/session"), &[], Some(&right));
    assert_eq!(status, 200);
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("a cookie").to_string();
    let with_cookie = [("cookie", cookie.as_str())];
    let (status, _, body) = call("GET", &url("/v1/status"), &with_cookie, None);
    assert_eq!(status, 200, "{body}");
    // The cookie opens the page's doors and no other.
    assert_eq!(call("GET", &url("/v1/hives"), &with_cookie, None).0, 401);
    let job = json!({"model": file_model(), "prompt": "hi"}).to_string();
    assert_eq!(
        call("POST", &url("/v1/jobs"), &with_cookie, Some(&job)).0,
        401
    );

    // `keeper status --web` prints a link whose code logs in once.
    let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args([
            "keeper",
            "--queen-url",
            &queen.url,
            "--token-file",
            &token,
            "status",
            "--web",
        ])
        .output()
        .expect("the keeper runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let code = link
        .split("?code=")
        .nth(1)
        .unwrap_or_else(|| panic!("no code in {link:?}"));
    assert!(link.starts_with(&queen.url), "{link}");
    let by_code = json!({"code": code}).to_string();
    let (status, set_cookie, _) = call("POST", &url("/v1/session"), &[], Some(&by_code));
    assert_eq!(status, 200);
    assert!(set_cookie.starts_with("rbee_session="), "{set_cookie}");
    assert_eq!(
        call("POST", &url("/v1/session"), &[], Some(&by_code)).0,
        401,
        "used up"
    );

    // And the terminal picture, with the token.
    let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args([
            "keeper",
            "--queen-url",
            &queen.url,
            "--token-file",
            &token,
            "status",
        ])
        .output()
        .expect("the keeper runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("0/0 hives up") && text.contains("HIVES\n  none"),
        "{text}"
    );
}

/// A request with headers: status, `Set-Cookie`, body.
fn call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String, String) {
    call_header(method, url, headers, body, "set-cookie")
}
