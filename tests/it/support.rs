//! Starting `rbee` processes and talking to them, for the tests.

use rbee::http::sse::{Decoder, Frame};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The SmolLM2 test model: `RBEE_TEST_MODEL`, else where `make model` puts it.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("RBEE_TEST_MODEL").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".models/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "test model {} is missing: run `make model`",
        path.display()
    );
    path
}

/// One model-running test at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Below the ephemeral range (32768 and up), from which the kernel takes the
    // source port of every outgoing connection: a port found by binding port 0
    // could be taken by another test's next connection before its server binds
    // it. Each call steps by 16, so a hive counting up from a worker port it was
    // given stays clear of the next one handed out.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    let offset = std::process::id() * 16 * 37;
    for _ in 0..SPAN / 16 {
        let n = NEXT.fetch_add(16, std::sync::atomic::Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// A running `rbee` process, killed when dropped (a failing test leaves nothing behind).
pub struct Proc {
    child: Child,
    pub url: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

/// Collects a pipe's text as it comes, so the child never blocks on a full pipe.
fn collect(pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

impl Proc {
    pub fn start(args: &[&str], port: u16) -> Proc {
        Proc::start_with_env(args, port, &[])
    }

    pub fn start_with_env(args: &[&str], port: u16, env: &[(&str, &str)]) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rbee"));
        command.args(args).envs(env.iter().copied());
        Proc::spawn(command, format!("http://127.0.0.1:{port}"))
    }

    /// `rbee ARGS` inside network namespace `netns`, answering at `url`.
    pub fn start_in(netns: &str, args: &[&str], url: &str) -> Proc {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns, env!("CARGO_BIN_EXE_rbee")])
            .args(args);
        Proc::spawn(command, url.to_string())
    }

    fn spawn(mut command: Command, url: String) -> Proc {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rbee starts");
        let stdout = collect(child.stdout.take().expect("stdout is piped"));
        let stderr = collect(child.stderr.take().expect("stderr is piped"));
        Proc {
            child,
            url,
            stdout,
            stderr,
        }
    }

    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the stderr thread drain the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rbee worker` on the test model and a free port, not yet waited for.
pub fn start_worker(extra: &[&str]) -> Proc {
    let port = free_port();
    let model = model_path();
    let port_s = port.to_string();
    let mut args = vec![
        "worker",
        "--model",
        model.to_str().expect("a UTF-8 path"),
        "--port",
        &port_s,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, port)
}

/// `rbee worker` that has loaded its model.
pub fn ready_worker(extra: &[&str]) -> Proc {
    let w = start_worker(extra);
    wait_ready(&w);
    w
}

pub fn wait_ready(p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok((200, v)) = try_get(&format!("{}/v1/ready", p.url)) {
            match v["state"].as_str() {
                Some("ready") => return,
                Some("failed") => panic!("worker failed to load: {v}\n{}", p.stderr()),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("worker not ready in time:\n{}", p.stderr());
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn status_and_json(resp: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn try_get(url: &str) -> Result<(u16, Value), ureq::Error> {
    agent().get(url).call().map(status_and_json)
}

pub fn get(url: &str) -> (u16, Value) {
    try_get(url).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub fn try_post(url: &str, body: &str) -> Result<(u16, Value), ureq::Error> {
    agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .map(status_and_json)
}

pub fn post(url: &str, body: &str) -> (u16, Value) {
    try_post(url, body).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

pub fn request(method: &str, url: &str) -> (u16, Value) {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .body(())
        .expect("a request");
    agent()
        .run(req)
        .map(status_and_json)
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// An SSE response being read event by event.
pub struct Sse {
    reader: ureq::BodyReader<'static>,
    decoder: Decoder,
    ready: VecDeque<Frame>,
}

impl Sse {
    /// The next event, `None` when the connection ends.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(f);
            }
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.ready.extend(self.decoder.push(&buf[..n])),
            }
        }
    }

    /// The next data event as JSON; panics on `[DONE]` or a closed stream.
    pub fn next_event(&mut self) -> Value {
        match self.next_frame() {
            Some(Frame::Data(d)) => serde_json::from_str(&d).expect("events are JSON"),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Every remaining event up to `[DONE]`; panics if the stream ends without it
    /// or sends anything after it.
    pub fn rest(mut self) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            match self.next_frame() {
                Some(Frame::Data(d)) => events.push(serde_json::from_str(&d).expect("JSON")),
                Some(Frame::Done) => break,
                None => panic!("stream closed without [DONE] after {events:?}"),
            }
        }
        assert_eq!(self.next_frame(), None, "nothing may follow [DONE]");
        events
    }
}

/// Opens an SSE stream with GET (body `None`) or POST; a non-200 answer is the error.
pub fn stream(url: &str, body: Option<&str>) -> Result<Sse, (u16, Value)> {
    stream_as(url, body, None)
}

/// [`stream`], presenting `token` when given.
pub fn stream_as(url: &str, body: Option<&str>, token: Option<&str>) -> Result<Sse, (u16, Value)> {
    let agent = agent();
    let bearer = token.map(|t| format!("Bearer {t}"));
    let resp = match body {
        Some(b) => {
            let mut req = agent.post(url).header("content-type", "application/json");
            if let Some(b) = &bearer {
                req = req.header("authorization", b);
            }
            req.send(b)
        }
        None => {
            let mut req = agent.get(url);
            if let Some(b) = &bearer {
                req = req.header("authorization", b);
            }
            req.call()
        }
    }
    .unwrap_or_else(|e| panic!("{url}: {e}"));
    if resp.status() != 200 {
        return Err(status_and_json(resp));
    }
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(ct, "text/event-stream");
    Ok(Sse {
        reader: resp.into_body().into_reader(),
        decoder: Decoder::new(),
        ready: VecDeque::new(),
    })
}

/// A one-endpoint HTTP server that records the JSON bodies POSTed to it, like
/// a hive waiting for its workers' callbacks.
pub struct CallbackServer {
    pub url: String,
    bodies: mpsc::Receiver<Value>,
}

impl CallbackServer {
    pub fn start() -> CallbackServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/v1/workers/ready",
            listener.local_addr().expect("addr")
        );
        let (tx, bodies) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                if let Ok(v) = serde_json::from_slice(&body) {
                    let _ = tx.send(v);
                }
            }
        });
        CallbackServer { url, bodies }
    }

    pub fn next(&self, timeout: Duration) -> Option<Value> {
        self.bodies.recv_timeout(timeout).ok()
    }
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rbee-it-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn str(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use rbee::process::alive;

/// `rbee hive` on a free port with its own data directory, answering.
pub fn start_hive(home: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    start_hive_on(free_port(), home, extra, env)
}

/// `rbee hive` on this port (a restart keeps its address), answering.
pub fn start_hive_on(port: u16, home: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let (port_s, worker_port) = (port.to_string(), free_port().to_string());
    let mut args = vec![
        "hive",
        "--port",
        &port_s,
        "--data-dir",
        home.str(),
        "--worker-port",
        &worker_port,
    ];
    args.extend_from_slice(extra);
    let p = Proc::start_with_env(&args, port, env);
    wait_until("the hive to answer", Duration::from_secs(30), || {
        matches!(try_get(&format!("{}/health", p.url)), Ok((200, _)))
    });
    p
}

/// `rbee queen` on a free port with its own data directory, answering.
pub fn start_queen(home: &TempDir, extra: &[&str]) -> Proc {
    let port = free_port();
    let port_s = port.to_string();
    let mut args = vec!["queen", "--port", &port_s, "--data-dir", home.str()];
    args.extend_from_slice(extra);
    let p = Proc::start(&args, port);
    wait_until("the queen to answer", Duration::from_secs(30), || {
        matches!(try_get(&format!("{}/health", p.url)), Ok((200, _)))
    });
    p
}

/// Polls `check` every 2 ms (tests watch short-lived states, such as a model
/// loading) until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs one of the Python scripts under `tests/` with these arguments, with
/// the official `openai` package that `make test` installs on its path
/// (`RBEE_TEST_PYTHONPATH`, else `.models/py`); its stdout, once it succeeded.
pub fn python(script: &str, args: &[&str]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pythonpath = std::env::var("RBEE_TEST_PYTHONPATH")
        .unwrap_or_else(|_| root.join(".models/py").display().to_string());
    for package in ["openai", "ollama", "anthropic"] {
        assert!(
            std::path::Path::new(&pythonpath).join(package).is_dir(),
            "the {package} package is missing from {pythonpath}: run `make test` (it installs it)"
        );
    }
    let out = Command::new("python3")
        .arg(root.join("tests").join(script))
        .args(args)
        .env("PYTHONPATH", &pythonpath)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A small seeded generator (xorshift), so a failing case can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[(self.next() % from.len() as u64) as usize]
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A request with these headers, whatever its status: the status, the
/// value of the answer's `header` (empty if absent), and the body.
pub fn call_header(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    header: &str,
) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = match body {
        Some(b) => agent.run(
            req.header("content-type", "application/json")
                .body(b.to_string())
                .expect("a request"),
        ),
        None => agent.run(req.body(()).expect("a request")),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let value = resp
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap_or_default();
    (status, value, text)
}
