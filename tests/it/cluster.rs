//! The queen's live view of several hives on loopback (DESIGN.md §10): a model
//! lands where its memory fits, an idle worker makes room for another model,
//! a model that fits nowhere says so, a killed hive leaves the routing and a
//! restarted one comes back, and routing asks no hive anything.
//!
//! A SmolLM2 worker as a hive spawns it (4 slots of 4,096 tokens, a host
//! cache as large as its KV cache) is estimated at 967 MiB: the budgets below
//! sit either side of that.

use crate::chain::{file_model, infer_args, workers_of, Cluster};
use crate::support::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A hive with its own data dir and this memory budget.
fn hive(label: &str, budget: &str) -> (TempDir, Proc) {
    let home = TempDir::new(label);
    let p = start_hive(&home, &["--max-memory", budget], &[]);
    (home, p)
}

/// `keeper infer` of a few greedy tokens of `model` on any hive.
fn infer(c: &Cluster, model: &str) -> (i32, String, String) {
    let mut args = infer_args("", model, "Hello there");
    args.drain(1..3); // no --node: the queen places it
    c.keeper(&args)
}

#[test]
fn a_model_lands_where_it_fits_and_a_second_evicts_the_idle_first() {
    let _turn = serial();
    let (_h1, tiny) = hive("mem-tiny", "300MiB");
    let (_h2, small) = hive("mem-small", "600MiB");
    let (_h3, big) = hive("mem-big", "1200MiB");
    let c = Cluster::with_hives("mem", &[("tiny", &tiny), ("small", &small), ("big", &big)]);
    let (code, _, err) = infer(&c, &file_model());
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("placing") && err.contains("on hive big"),
        "{err}"
    );
    assert_eq!(workers_of(&big.url).len(), 1);
    assert!(workers_of(&tiny.url).is_empty() && workers_of(&small.url).is_empty());
    let (_, table, _) = c.keeper(&["hive", "list"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("big "))
        .unwrap_or_default();
    assert!(line.contains(" 967 MB/1.2 GB "), "{table}");

    // The same weights under another name: a second model that fits only
    // once the first model's idle worker is gone.
    let dir = TempDir::new("mem-other");
    let other = dir.path().join("other-model.gguf");
    std::fs::copy(model_path(), &other).expect("the model copies");
    let (code, _, err) = infer(&c, &format!("file:{}", other.display()));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stopping idle worker"), "{err}");
    let left = workers_of(&big.url);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["model"], "other-model");
}

#[test]
fn a_model_that_fits_nowhere_names_its_need_and_the_most_room() {
    let _turn = serial();
    // Not even split: the file goes to b, which can keep 3 of the 30 layers
    // beside what stays with the worker; a can take 22 of the rest.
    let (_h1, a) = hive("mem-a", "500MiB");
    let (_h2, b) = hive("mem-b", "600MiB");
    let c = Cluster::with_hives("mem-none", &[("a", &a), ("b", &b)]);
    let (code, _, err) = infer(&c, &file_model());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("INSUFFICIENT_MEMORY"), "{err}");
    assert!(
        err.contains("needs 967 MB; the most any hive can free is hive b with 600 MB"),
        "{err}"
    );
    assert!(workers_of(&a.url).is_empty() && workers_of(&b.url).is_empty());
}

#[test]
fn a_killed_hive_leaves_the_routing_and_comes_back_when_restarted() {
    let _turn = serial();
    let (home_one, one) = hive("kill-one", "2GiB");
    let (_h2, two) = hive("kill-two", "2GiB");
    let c = Cluster::with_hives("kill", &[("one", &one), ("two", &two)]);
    let (code, _, err) = infer(&c, &file_model());
    assert_eq!(code, 0, "{err}");
    let on_one = !workers_of(&one.url).is_empty();
    let (victim, survivor, survivor_name) = if on_one {
        (one, &two, "two")
    } else {
        (two, &one, "one")
    };
    let victim_name = if on_one { "one" } else { "two" };
    let url = victim.url.clone();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    victim.signal("KILL");
    let killed = std::time::Instant::now();
    wait_until(
        "the killed hive to be unreachable",
        Duration::from_secs(10),
        || c.hive_status(victim_name) == "unreachable",
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    let (code, _, err) = infer(&c, &file_model());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("on hive {survivor_name}")), "{err}");
    drop(victim);

    // Back on its port; the other one goes: jobs use it again.
    let home = if on_one { home_one } else { _h2 };
    let back = start_hive_on(port, &home, &["--max-memory", "2GiB"], &[]);
    assert_eq!(back.url, url);
    wait_until(
        "the restarted hive to be reachable",
        Duration::from_secs(15),
        || c.hive_status(victim_name) == "reachable",
    );
    survivor.signal("KILL");
    wait_until(
        "the other hive to be unreachable",
        Duration::from_secs(10),
        || c.hive_status(survivor_name) == "unreachable",
    );
    let (code, _, err) = infer(&c, &file_model());
    assert_eq!(code, 0, "{err}");
    assert_eq!(workers_of(&back.url).len(), 1, "{err}");
}

/// A TCP relay that records the request line of every HTTP request passing
/// through it towards the hive.
struct Counting {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Counting {
    fn to(upstream: &str) -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let (mut s_in, mut c_out) = (server, client);
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n @ 1..) = c_in.read(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        for line in text.split("\r\n").filter(|l| l.ends_with(" HTTP/1.1")) {
                            seen.lock().unwrap().push(line.to_string());
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Counting { url, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

#[test]
fn routing_a_job_asks_no_hive_anything() {
    let _turn = serial();
    let (_home, hive) = hive("count", "2GiB");
    let relay = Counting::to(&hive.url);
    let c = Cluster::new("count", &[]);
    let (code, _, err) = c.keeper(&["hive", "add", "counted", "--url", &relay.url]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = infer(&c, &file_model());
    assert_eq!(code, 0, "{err}");
    let before = relay.requests();
    for _ in 0..3 {
        let (code, _, err) = infer(&c, &file_model());
        assert_eq!(code, 0, "{err}");
    }
    let after = relay.requests();
    assert_eq!(after, before, "jobs on a ready worker called the hive");
    assert!(
        before.iter().any(|r| r.starts_with("GET /v1/state/stream")),
        "{before:?}"
    );
}

/// One greedy job through the queen's job API: the worker that served it
/// (from the narration), its answer, and the prompt tokens that came from the
/// worker's prompt cache.
fn job(c: &Cluster, prompt: &str, max_tokens: u32) -> (String, String, u64) {
    let body = serde_json::json!({
        "model": file_model(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
    });
    let (status, created) = post(&format!("{}/v1/jobs", c.queen), &body.to_string());
    assert_eq!(status, 201, "{created}");
    let url = format!("{}{}", c.queen, created["sse_url"].as_str().expect("a url"));
    let events = stream(&url, None).expect("the job streams").rest();
    let worker = events
        .iter()
        .find_map(|e| {
            let human = e["human"].as_str()?;
            (e["action"] == "reuse").then(|| human.split_whitespace().nth(2).map(String::from))?
        })
        .unwrap_or_else(|| panic!("no worker narrated: {events:?}"));
    let answer: String = events.iter().filter_map(|e| e["t"].as_str()).collect();
    let end = events
        .iter()
        .find(|e| e["type"] == "end")
        .unwrap_or_else(|| panic!("no end: {events:?}"));
    (
        worker,
        answer,
        end["cached_tokens"].as_u64().expect("cached_tokens"),
    )
}

#[test]
fn interleaved_conversations_land_on_the_worker_that_holds_their_cache() {
    let _turn = serial();
    // One single-slot worker of the model on each of two hives.
    let (_h1, one) = hive("affinity-one", "2GiB");
    let (_h2, two) = hive("affinity-two", "2GiB");
    let spawn = serde_json::json!({"model_ref": file_model(), "slots": 1, "ctx_size": 2048});
    for h in [&one, &two] {
        let (status, w) = post(&format!("{}/v1/workers/spawn", h.url), &spawn.to_string());
        assert!(status < 300, "{w}");
    }
    let c = Cluster::with_hives("affinity", &[("one", &one), ("two", &two)]);
    wait_until(
        "both workers ready in the queen's view",
        Duration::from_secs(60),
        || {
            let (_, list) = get(&format!("{}/v1/workers", c.queen));
            let ready = list
                .as_array()
                .map_or(0, |l| l.iter().filter(|w| w["state"] == "ready").count());
            ready == 2
        },
    );

    // Four conversations over their own documents; each first turn runs
    // beside another, so they spread over both workers.
    let mut prompts: Vec<String> = (0..4)
        .map(|k| {
            let facts: Vec<String> = (0..24)
                .map(|i| {
                    format!(
                        "In town {k}, street {i} has {} houses.",
                        (i * 7 + k) % 13 + 2
                    )
                })
                .collect();
            format!(
                "{}\nQuestion: which street is first?\nAnswer:",
                facts.join(" ")
            )
        })
        .collect();
    let mut holders = Vec::new();
    for pair in [[0, 1], [2, 3]] {
        let turns: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = pair
                .iter()
                .map(|&k| {
                    let (c, p) = (&c, prompts[k].clone());
                    s.spawn(move || job(c, &p, 24))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a turn"))
                .collect()
        });
        for (&k, (worker, answer, _)) in pair.iter().zip(turns) {
            prompts[k].push_str(&format!(
                "{answer}\nQuestion: how many houses on street 3?\nAnswer:"
            ));
            holders.push((k, worker));
        }
    }
    holders.sort();
    let used: std::collections::BTreeSet<_> = holders.iter().map(|(_, w)| w.clone()).collect();
    assert_eq!(
        used.len(),
        2,
        "the first turns used one worker: {holders:?}"
    );

    // Later turns one at a time, interleaved: each goes back to its cache
    // holder (with both idle, least-outstanding alone would pick the same
    // worker every time) and finds its conversation there.
    for round in 0..2 {
        for (k, holder) in &holders {
            let (worker, answer, cached) = job(&c, &prompts[*k], 8);
            assert_eq!(&worker, holder, "conversation {k}, round {round}");
            assert!(
                cached > 100,
                "conversation {k}, round {round}: {cached} cached tokens"
            );
            prompts[*k].push_str(&format!("{answer}\nQuestion: and on street 5?\nAnswer:"));
        }
    }
}

#[test]
fn a_hive_followed_by_a_queen_stops_at_once_when_told() {
    let (_home, mut h) = hive("stop-followed", "1GiB");
    let c = Cluster::with_hives("stop-followed", &[("followed", &h)]);
    assert_eq!(c.hive_status("followed"), "reachable");
    // The queen follows its state stream; SIGTERM ends that stream, so the
    // hive does not wait out the connections' drain (15 s).
    h.signal("TERM");
    assert!(
        h.wait_exit(Duration::from_secs(10)).is_some(),
        "the hive is still running"
    );
}
