//! No client, slow or heavy, starves the others: a flood of half-sent
//! requests leaves a job's way through the queen open.

use crate::chain::{file_model, infer_args, Cluster};
use crate::support::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lets this test process open as many files as it may (a flood needs them).
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A connection that sends half of a request's headers and stops.
fn half_open(addr: &std::net::SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_millis(200)).ok()?;
    s.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        .ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// Tries to hold `count` half-open connections to `addr` until `stop`,
/// opening a new one for each the daemon closes; the most it held at once.
fn flood(addr: String, count: usize, stop: Arc<AtomicBool>, most: Arc<AtomicUsize>) {
    let addr: std::net::SocketAddr = addr.parse().expect("an address");
    let mut held: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        for slot in held.iter_mut() {
            let closed = match slot {
                None => true,
                Some(s) => match s.read(&mut buf) {
                    Ok(_) => true, // Closed, or answered (a 408): done with it.
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                },
            };
            if closed {
                *slot = half_open(&addr);
            }
        }
        let now = held.iter().filter(|s| s.is_some()).count();
        most.fetch_max(now, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_flood_of_half_sent_requests_keeps_no_job_out() {
    let _turn = serial();
    raise_open_files();
    let home = TempDir::new("flood-hive");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("flood", &[("a", &hive)]);
    let model = file_model();
    // A worker first, so what the job waits for below is only the flood.
    let (code, _, err) = c.keeper(&infer_args("a", &model, "Hi"));
    assert_eq!(code, 0, "{err}");
    let addr = c.queen.trim_start_matches("http://").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let flooding = {
        let (addr, stop, most) = (addr.clone(), stop.clone(), most.clone());
        std::thread::spawn(move || flood(addr, 1500, stop, most))
    };
    let started = Instant::now();
    // Past one header deadline, so the flood is reconnecting as it goes.
    std::thread::sleep(Duration::from_secs(17));
    let asked = Instant::now();
    let (status, _) = get(&format!("{}/health", c.queen));
    assert_eq!(status, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "/health took {:?} under the flood",
        asked.elapsed()
    );
    let (code, out, err) = c.keeper(&infer_args("a", &model, "Why is the sky blue?"));
    assert_eq!(code, 0, "the job under the flood: {err}");
    assert!(!out.trim().is_empty(), "tokens came: {err}");
    let rest = Duration::from_secs(40).saturating_sub(started.elapsed());
    std::thread::sleep(rest);
    stop.store(true, Ordering::Relaxed);
    flooding.join().expect("the flood ends");
    assert!(
        most.load(Ordering::Relaxed) >= 1500,
        "the flood held its connections: {}",
        most.load(Ordering::Relaxed)
    );
    let (status, _) = get(&format!("{}/health", c.queen));
    assert_eq!(status, 200, "the queen serves after it");
}

/// A text of about `words` tokens.
fn long_text(words: usize) -> String {
    (0..words)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The time to the first byte of a one-token chat answer (its prompt not cached).
fn ttft(url: &str) -> Duration {
    let body = serde_json::json!({
        "model": "m", "max_tokens": 1, "cache_prompt": false,
        "messages": [{"role": "user", "content": "Say hi to me in French please"}],
    });
    let asked = Instant::now();
    let (status, answer) = post(&format!("{url}/v1/chat/completions"), &body.to_string());
    assert_eq!(status, 200, "{answer}");
    asked.elapsed()
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

/// The CPU time the process `pid` has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<u64> = after
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // utime and stime: fields 14 and 15 of stat, 11 and 12 after the name.
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Whether nothing of the answer to the request sent on `s` has come yet.
fn answer_pending(s: &TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let pending = matches!(s.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).expect("blocking");
    pending
}

/// An embeddings request sent on a raw connection, to be abandoned by dropping it.
fn embeddings_in_flight(url: &str, texts: &[String]) -> TcpStream {
    let body = serde_json::json!({"model": "m", "input": texts}).to_string();
    let mut s = TcpStream::connect(url.trim_start_matches("http://")).expect("connects");
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("sent");
    s.write_all(body.as_bytes()).expect("sent");
    s
}

#[test]
fn a_long_embeddings_request_shares_the_worker_and_ends_when_its_client_leaves() {
    let _turn = serial();
    let mut w = ready_worker(&["--slots", "2"]);
    let idle = median((0..5).map(|_| ttft(&w.url)).collect());
    // 16 inputs of ~1,900 tokens: minutes of work on this machine.
    let texts = vec![long_text(500); 16];
    let client = embeddings_in_flight(&w.url, &texts);
    std::thread::sleep(Duration::from_secs(2));
    let busy = median((0..5).map(|_| ttft(&w.url)).collect());
    // Five chat turns were answered while the embeddings, minutes of work, still ran: had
    // the batch held the worker, they would have waited for it and found its answer sent.
    assert!(
        answer_pending(&client),
        "the embeddings had ended before the chat turns beside them were answered"
    );
    eprintln!("a chat turn's first token: {busy:?} beside the embeddings, {idle:?} alone");
    // The client leaves: the work stops with it.
    drop(client);
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_time(w.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(w.pid()) - before;
    assert!(
        spent < Duration::from_millis(500),
        "the worker still spent {spent:?} of CPU in 2 s after its client left"
    );
    // More than a request may bring is refused, naming the limit.
    let (status, e) = post(
        &format!("{}/v1/embeddings", w.url),
        &serde_json::json!({"model": "m", "input": vec![long_text(500); 20]}).to_string(),
    );
    assert_eq!(status, 400, "{e}");
    assert!(e.to_string().contains("32768 tokens"), "{e}");
    // A worker told to stop mid-request stops.
    let _client = embeddings_in_flight(&w.url, &texts);
    std::thread::sleep(Duration::from_secs(1));
    w.signal("TERM");
    assert!(
        w.wait_exit(Duration::from_secs(15)).is_some(),
        "the worker stopped while embedding"
    );
}

/// llama.cpp's RPC client, message by message (ggml-rpc.cpp, protocol 7):
/// `| command | size (u64 LE) | payload |`, answered `| size | payload |`.
struct Rpc(TcpStream);

const HELLO: u8 = 14;
const ALLOC_BUFFER: u8 = 0;
const BUFFER_GET_BASE: u8 = 3;
const SET_TENSOR: u8 = 6;
const GET_DEVICE_MEMORY: u8 = 11;
const MIB: u64 = 1 << 20;

impl Rpc {
    /// A tunnel to `lease` through the hive's port.
    fn open(hive: &str, lease: &str) -> Rpc {
        let (code, s) = crate::split::upgrade(hive, lease, Some("s3cret"));
        assert_eq!(code, 101, "the tunnel to {lease} opens");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("a timeout");
        Rpc(s)
    }

    /// Sends a message; false if the tunnel is closed.
    fn send(&mut self, command: u8, payload: &[u8]) -> bool {
        let mut m = vec![command];
        m.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).is_ok()
    }

    /// Sends a message and reads its answer; None if the tunnel was closed.
    fn call(&mut self, command: u8, payload: &[u8]) -> Option<Vec<u8>> {
        if !self.send(command, payload) {
            return None;
        }
        let mut size = [0u8; 8];
        self.0.read_exact(&mut size).ok()?;
        let mut answer = vec![0u8; u64::from_le_bytes(size) as usize];
        self.0.read_exact(&mut answer).ok()?;
        Some(answer)
    }

    fn hello(&mut self) -> Option<Vec<u8>> {
        self.call(HELLO, &[0u8; 24])
    }

    /// The device's (free, total) memory.
    fn memory(&mut self) -> (u64, u64) {
        let a = self
            .call(GET_DEVICE_MEMORY, &0u32.to_le_bytes())
            .expect("the device's memory");
        (word(&a, 0), word(&a, 8))
    }

    /// A buffer of `size` bytes: its remote pointer, 0 when refused.
    fn alloc(&mut self, size: u64) -> u64 {
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&size.to_le_bytes());
        word(
            &self.call(ALLOC_BUFFER, &p).expect("an allocation's answer"),
            0,
        )
    }

    fn base(&mut self, buffer: u64) -> u64 {
        word(
            &self
                .call(BUFFER_GET_BASE, &buffer.to_le_bytes())
                .expect("a buffer's base"),
            0,
        )
    }

    /// Writes `data` as an f32 tensor at `at` in `buffer`, asking the server
    /// to cache it or not (no answer comes).
    fn set_tensor(&mut self, buffer: u64, at: u64, data: &[u8], cache: bool) -> bool {
        let mut p = rpc_tensor(buffer, at, data.len() as u64 / 4);
        p.push(u8::from(cache));
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(data);
        self.send(SET_TENSOR, &p)
    }

    /// Whether the far side closed the tunnel (within the read timeout).
    fn closed(&mut self) -> bool {
        matches!(self.0.read(&mut [0u8; 1]), Ok(0) | Err(_))
    }
}

fn word(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// `struct rpc_tensor` (packed, 296 bytes): a 1-d f32 tensor of `n` at `data`.
fn rpc_tensor(buffer: u64, data: u64, n: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(296);
    t.extend_from_slice(&1u64.to_le_bytes()); // id
    t.extend_from_slice(&0u32.to_le_bytes()); // type: f32
    t.extend_from_slice(&buffer.to_le_bytes());
    for ne in [n as u32, 1, 1, 1] {
        t.extend_from_slice(&ne.to_le_bytes());
    }
    let row = (n * 4) as u32;
    for nb in [4, row, row, row] {
        t.extend_from_slice(&nb.to_le_bytes());
    }
    t.extend_from_slice(&0u32.to_le_bytes()); // op
    t.extend_from_slice(&[0u8; 64]); // op_params
    t.extend_from_slice(&0i32.to_le_bytes()); // flags
    t.extend_from_slice(&[0u8; 80]); // src
    t.extend_from_slice(&0u64.to_le_bytes()); // view_src
    t.extend_from_slice(&0u64.to_le_bytes()); // view_offs
    t.extend_from_slice(&data.to_le_bytes());
    t.extend_from_slice(&[0u8; 64]); // name
    t.extend_from_slice(&0i32.to_le_bytes()); // use_count
    assert_eq!(t.len(), 296);
    t
}

fn lease(hive: &str, id: &str, borrower: &str, memory_mb: u64) -> u16 {
    let body = serde_json::json!({
        "lease": id, "model": "smollm2", "borrower": borrower,
        "layers": 1, "memory_mb": memory_mb,
    });
    match ureq::post(&format!("{hive}/v1/leases"))
        .header("Authorization", "Bearer s3cret")
        .send(body.to_string().as_bytes())
    {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(code)) => code,
        Err(e) => panic!("{e}"),
    }
}

fn files_in(dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok().map(|m| m.len()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_lease_holds_to_what_it_declared_whatever_its_tunnels_send() {
    let home = TempDir::new("lease-abuse");
    let hive = start_hive(&home, &[], &[("RBEE_TOKEN", "s3cret")]);
    let url = hive.url.clone();
    assert_eq!(lease(&url, "lease-a", "desk", 32), 201);
    let server = rpc_server_of(&hive);

    // Its device has the lease's 32 MiB: reported so, and no buffer beyond.
    let mut t1 = Rpc::open(&url, "lease-a");
    assert!(t1.hello().is_some());
    let (free, total) = t1.memory();
    assert_eq!(total, 32 * MIB);
    assert!(free <= 32 * MIB, "{free}");
    let buffer = t1.alloc(24 * MIB);
    assert_ne!(buffer, 0, "24 of 32 MiB are granted");
    assert_eq!(t1.alloc(16 * MIB), 0, "16 MiB more are refused");
    assert_eq!(t1.memory().0, 8 * MIB);

    // Its cache holds at most its budget: of five 8-MiB tensors sent to be
    // cached, four are.
    let base = t1.base(buffer);
    for i in 0..5u8 {
        let data = vec![i + 1; 8 * MIB as usize];
        let at = base + u64::from(i % 3) * 8 * MIB;
        assert!(t1.set_tensor(buffer, at, &data, true));
    }
    t1.memory(); // every tensor has been taken
    let cache = home.path().join("rpc-cache/lease-a");
    let cached = files_in(&cache);
    assert_eq!(cached.len(), 4, "{cached:?} in {}", cache.display());
    assert!(cached.iter().sum::<u64>() <= 32 * MIB);

    // A message larger than the lease could use closes its tunnel before
    // the server reads it; the server's buffers of that tunnel are freed.
    let mut head = vec![SET_TENSOR];
    head.extend_from_slice(&(1u64 << 30).to_le_bytes());
    let _ = t1.0.write_all(&head);
    assert!(t1.closed(), "the oversized message ends the tunnel");

    // A malformed message (a tensor beyond its buffer, which llama.cpp
    // asserts on) ends its tunnel, not the server.
    let mut t2 = Rpc::open(&url, "lease-a");
    assert!(t2.hello().is_some());
    assert_eq!(
        t2.memory().0,
        32 * MIB,
        "the closed tunnel's buffers are given back"
    );
    let small = t2.alloc(MIB);
    let small_base = t2.base(small);
    assert!(t2.set_tensor(small, small_base + 2 * MIB, &[0u8; 16], false));
    assert!(t2.closed(), "the malformed message ends its tunnel");
    assert!(alive(server), "the RPC server lives on");
    let mut t3 = Rpc::open(&url, "lease-a");
    assert!(
        t3.hello().is_some(),
        "and answers the next tunnel:\n{}",
        hive.stderr()
    );

    // A tunnel that holds nothing and sends nothing is closed once another
    // waits for the lease.
    let mut t4 = Rpc::open(&url, "lease-a");
    assert!(t4.hello().is_some(), "the waiting tunnel is answered");
    assert!(t3.closed());
    drop(t4);

    let log = hive.stderr();
    for said in [
        "more than the lease could use",
        "tunnel ended by a malformed message",
        "while another tunnel waited",
        "lease budget: refused a buffer",
    ] {
        assert!(log.contains(said), "the hive's log says {said:?}:\n{log}");
    }
    let metrics = ureq::get(&format!("{url}/metrics"))
        .header("Authorization", "Bearer s3cret")
        .call()
        .expect("metrics")
        .into_body()
        .read_to_string()
        .expect("text");
    for fault in [
        "oversized_message",
        "malformed_message",
        "idle_tunnel",
        "over_budget",
    ] {
        assert!(
            metrics.contains(&format!(
                "rbee_hive_lease_faults_total{{fault=\"{fault}\"}} 1"
            )),
            "{fault}:\n{metrics}"
        );
    }

    // Leases are limited per borrower and per hive.
    for i in 1..4 {
        assert_eq!(lease(&url, &format!("lease-desk{i}"), "desk", 8), 201);
    }
    assert_eq!(lease(&url, "lease-desk4", "desk", 8), 429);
    for i in 0..4 {
        assert_eq!(lease(&url, &format!("lease-mac{i}"), "mac", 8), 201);
    }
    assert_eq!(lease(&url, "lease-mac4", "mac", 8), 429);

    // A lease's cache goes with it.
    let ended = ureq::delete(&format!("{url}/v1/leases/lease-a"))
        .header("Authorization", "Bearer s3cret")
        .call()
        .expect("the lease ends");
    assert_eq!(ended.status(), 200);
    wait_until(
        "the lease's cache to be removed",
        Duration::from_secs(10),
        || !cache.exists(),
    );
}

/// The pid of the hive's one RPC server.
fn rpc_server_of(hive: &Proc) -> u32 {
    let children = std::process::Command::new("pgrep")
        .args(["-P", &hive.pid().to_string()])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&children.stdout)
        .trim()
        .parse()
        .expect("one RPC server")
}
