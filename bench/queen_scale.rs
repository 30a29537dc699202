//! The queen at scale (`make bench`'s queen section, or on its own:
//! `cargo run --release --example queen_scale -- --hives 1000`): the real
//! `rbee queen` binary against simulated hives and workers that speak rbee's
//! own hive and worker protocol — a hive's health and state stream (its
//! snapshot at once, again every `--resend-ms`, as a hive re-sends on every
//! change), a worker's readiness and token stream (`--tokens` tokens, one every
//! `--token-ms`) — many in this one process, each hive with its worker on a
//! loopback port of its own. Then `--jobs` chat completions through the
//! queen's OpenAI front, `--concurrency` at a time.
//!
//! Printed, one line per run: the routing overhead per job (the client's time
//! to its first token; the simulated worker sends its first token at once, so
//! this is the queen's placement, routing and relaying, and two loopback hops)
//! at p50 and p99, the queen's CPU seconds per 1,000 jobs, its resident memory,
//! how long registering the hives took, and the state streams' bytes a second.
//! `--json FILE` writes the same figures.

use argh::FromArgs;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(FromArgs)]
/// The real queen against simulated hives and workers.
struct Args {
    /// the rbee binary (default target/release/rbee)
    #[argh(option, default = "String::from(\"target/release/rbee\")")]
    rbee: String,
    /// simulated hives, one worker each (default 100)
    #[argh(option, default = "100")]
    hives: usize,
    /// jobs to run through the queen (default 10000)
    #[argh(option, default = "10000")]
    jobs: usize,
    /// jobs in flight at once (default 500)
    #[argh(option, default = "500")]
    concurrency: usize,
    /// tokens each simulated answer has (default 8)
    #[argh(option, default = "8")]
    tokens: usize,
    /// milliseconds between a simulated worker's tokens (default 5)
    #[argh(option, default = "5")]
    token_ms: u64,
    /// milliseconds between a simulated hive's snapshots (default 2000)
    #[argh(option, default = "2000")]
    resend_ms: u64,
    /// where to write the figures as JSON
    #[argh(option)]
    json: Option<String>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What every simulated hive shares.
struct Sim {
    tokens: usize,
    token_ms: u64,
    resend: Duration,
    /// Bytes sent on state streams.
    state_bytes: AtomicU64,
}

const MODEL: &str = "sim-model";

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// An SSE response fed by the returned sender.
fn sse() -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = StreamBody::new(tokio_stream::StreamExt::map(stream, |b| {
        Ok::<_, Infallible>(Frame::data(b))
    }));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    (tx, r)
}

fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Hive `i`'s snapshot: its one model, and its one ready worker at `url`.
fn snapshot(i: usize, url: &str) -> Value {
    let version = env!("CARGO_PKG_VERSION");
    json!({
        "version": version, "backends": ["cpu"], "hostname": format!("sim-{i}"), "cores": 16,
        "ram": {"name": "ram", "total_mb": 65536, "available_mb": 60000, "budget_mb": 60000, "used_mb": 600},
        "gpus": [],
        "models": [{
            "name": MODEL, "model_ref": format!("file:/sim/{MODEL}.gguf"), "path": format!("/sim/{MODEL}.gguf"),
            "size": 500_000_000u64, "sha256": "0".repeat(64), "architecture": "llama",
            "parameters": 1_000_000_000u64, "quantization": "Q4_0", "context_length": 8192, "layers": 16,
            "owned": false, "added_at": "2026-12-04T00:00:00Z", "memory_estimate_mb": 600
        }],
        "workers": [{
            "worker_id": format!("worker-sim-{i}"), "url": url, "model": MODEL,
            "model_path": format!("/sim/{MODEL}.gguf"), "pid": 1, "state": "ready", "slots": 64,
            "backend": "cpu", "device": 0, "started_at": "2026-12-04T00:00:00Z", "ctx_size": 4096,
            "threads": 16, "memory_mb": 600, "memory_measured": true
        }]
    })
}

async fn handle(sim: Arc<Sim>, i: usize, url: Arc<str>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/health" | "/v1/health" => full(
            StatusCode::OK,
            json!({"status": "alive", "version": env!("CARGO_PKG_VERSION"), "api_version": "v1", "role": "hive"}),
        ),
        "/v1/state/stream" => {
            let (tx, resp) = sse();
            let frame = data(&snapshot(i, &url));
            tokio::spawn(async move {
                loop {
                    sim.state_bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                    if tx.send(frame.clone()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(sim.resend).await;
                }
            });
            resp
        }
        "/v1/workers/list" => full(StatusCode::OK, snapshot(i, &url)["workers"].clone()),
        "/v1/ready" => full(
            StatusCode::OK,
            json!({"ready": true, "state": "ready", "progress_url": "/v1/loading/progress", "model": MODEL,
                   "slots_total": 64, "slots_busy": 0, "queue_len": 0}),
        ),
        "/v1/inference" => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let max = body
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["sampling"]["max_tokens"].as_u64())
                .map_or(sim.tokens, |m| (m as usize).min(sim.tokens));
            let (tx, resp) = sse();
            tokio::spawn(async move {
                let started = json!({"type": "started", "job_id": "sim", "model": MODEL,
                                     "started_at": "2026-12-04T00:00:00Z", "prompt_tokens": 12});
                let _ = tx.send(data(&started)).await;
                for t in 0..max {
                    if t > 0 {
                        tokio::time::sleep(Duration::from_millis(sim.token_ms)).await;
                    }
                    let token = json!({"type": "token", "t": " word", "i": t, "ids": [100 + t]});
                    if tx.send(data(&token)).await.is_err() {
                        return;
                    }
                }
                let end = json!({"type": "end", "tokens_out": max, "decode_time_ms": sim.token_ms * max as u64,
                                 "stop_reason": "max_tokens", "cached_tokens": 0});
                let _ = tx.send(data(&end)).await;
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            });
            resp
        }
        _ => full(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "NOT_FOUND", "message": format!("no {path} here")}}),
        ),
    }
}

/// Hive `i` (and its worker) on a loopback port of its own: its URL.
async fn start_hive(sim: Arc<Sim>, i: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let url: Arc<str> =
        format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port()).into();
    let served = url.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (sim, url) = (sim.clone(), served.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (sim, url) = (sim.clone(), url.clone());
                    async move { Ok::<_, Infallible>(handle(sim, i, url, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url.to_string()
}

/// The queen's process: its CPU seconds so far and resident memory in MiB.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb / 1024.0)
}

/// One streamed chat completion through the queen: milliseconds to its first token.
async fn job(queen: &str) -> Result<f64, String> {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 8, "stream": true});
    let t0 = Instant::now();
    let mut first = None;
    let seen = call(
        queen,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        |chunk| {
            if first.is_none() && chunk.windows(9).any(|w| w == b"\"content\"") {
                first = Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
        },
    )
    .await?;
    first.ok_or_else(|| format!("no token came: {}", String::from_utf8_lossy(&seen)))
}

/// One HTTP/1 request on a connection of its own to `base` (`http://host:port`):
/// each chunk of the answer's body to `chunk` as it comes; the whole body, or
/// the status and body of an answer other than 2xx.
async fn call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    mut chunk: impl FnMut(&[u8]),
) -> Result<Vec<u8>, String> {
    let authority = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map_or(String::new(), Value::to_string),
        )))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            chunk(data);
            seen.extend_from_slice(data);
        }
    }
    match status.is_success() {
        true => Ok(seen),
        false => Err(format!(
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&seen)
        )),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let a: Args = argh::from_env();
    let sim = Arc::new(Sim {
        tokens: a.tokens,
        token_ms: a.token_ms,
        resend: Duration::from_millis(a.resend_ms),
        state_bytes: AtomicU64::new(0),
    });
    let mut urls = Vec::with_capacity(a.hives);
    for i in 0..a.hives {
        urls.push(start_hive(sim.clone(), i).await);
    }

    let home = std::env::temp_dir().join(format!("rbee-queen-scale-{}", std::process::id()));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        l.local_addr().unwrap().port()
    };
    let mut queen = std::process::Command::new(&a.rbee)
        .args(["queen", "--port", &port.to_string()])
        .arg("--data-dir")
        .arg(&home)
        .env("RBEE_HOME", &home)
        .env("RBEE_LOCAL_HIVE", "off")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the queen starts");
    let queen_url = format!("http://127.0.0.1:{port}");
    let up = Instant::now();
    while call(&queen_url, "GET", "/health", None, |_| ())
        .await
        .is_err()
    {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "the queen did not answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Register every hive, as `rbee keeper hive add` does.
    let registering = Instant::now();
    for (i, url) in urls.iter().enumerate() {
        let body = json!({"name": format!("sim-{i}"), "url": url});
        if let Err(e) = call(&queen_url, "POST", "/v1/hives", Some(&body), |_| ()).await {
            panic!("adding hive {i}: {e}");
        }
    }
    let register_s = registering.elapsed().as_secs_f64();
    // Settle: every hive's first snapshot in, a full resend round.
    tokio::time::sleep(sim.resend + Duration::from_millis(500)).await;

    let (cpu0, _) = usage(queen.id());
    let bytes0 = sim.state_bytes.load(Ordering::Relaxed);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency.min(a.jobs) {
        let (next, queen_url) = (next.clone(), queen_url.clone());
        let jobs = a.jobs as u64;
        tasks.push(tokio::spawn(async move {
            let mut ttfts = Vec::new();
            let mut failed = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                match job(&queen_url).await {
                    Ok(ms) => ttfts.push(ms),
                    Err(e) => failed.push(e),
                }
            }
            (ttfts, failed)
        }));
    }
    let mut ttfts = Vec::new();
    let mut failed = Vec::new();
    for t in tasks {
        let (ok, bad) = t.await.expect("a client task");
        ttfts.extend(ok);
        failed.extend(bad);
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, rss) = usage(queen.id());
    let bytes = sim.state_bytes.load(Ordering::Relaxed) - bytes0;
    let _ = queen.kill();
    let _ = queen.wait();
    let _ = std::fs::remove_dir_all(&home);

    ttfts.sort_by(f64::total_cmp);
    let figures = json!({
        "hives": a.hives, "jobs": a.jobs, "concurrency": a.concurrency, "failed": failed.len(),
        "routing_p50_ms": percentile(&ttfts, 0.5), "routing_p99_ms": percentile(&ttfts, 0.99),
        "queen_cpu_s_per_1000_jobs": (cpu1 - cpu0) * 1000.0 / a.jobs as f64,
        "queen_rss_mb": rss, "register_s": register_s, "jobs_per_s": a.jobs as f64 / wall,
        "state_bytes_per_s": bytes as f64 / wall,
    });
    println!(
        "{:>6} hives {:>6} jobs ×{:<4} routing p50 {:>7.2} ms p99 {:>7.2} ms  queen CPU {:>5.2} s/1000 jobs  RSS {:>6.1} MB  registered in {:>6.2} s  {:>7.0} jobs/s  state {:>9.0} B/s  failed {}",
        a.hives, a.jobs, a.concurrency,
        figures["routing_p50_ms"].as_f64().unwrap_or(f64::NAN),
        figures["routing_p99_ms"].as_f64().unwrap_or(f64::NAN),
        figures["queen_cpu_s_per_1000_jobs"].as_f64().unwrap_or(f64::NAN),
        rss, register_s,
        figures["jobs_per_s"].as_f64().unwrap_or(f64::NAN),
        figures["state_bytes_per_s"].as_f64().unwrap_or(f64::NAN),
        failed.len()
    );
    if let Some(first) = failed.first() {
        eprintln!("first failure: {first}");
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap())
            .expect("the JSON written");
    }
}
