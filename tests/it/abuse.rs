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
    assert!(
        busy < idle * 2,
        "a chat turn's first token took {busy:?} beside the embeddings, {idle:?} alone"
    );
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
