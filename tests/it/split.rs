//! One model across machines (DESIGN.md §12): two hives whose budgets each
//! hold less than SmolLM2 but together hold it get one worker split across
//! them through llama.cpp's RPC backend, answering exactly as one roomy
//! worker does; the lending hive's RPC server is reached only through its
//! own port, behind its token; a lending hive that dies is a lost worker.
//!
//! A hive's worker of SmolLM2 is estimated at 967 MiB whole; split, the
//! worker's own hive takes 544 MiB plus 14.1 per layer (its prompt cache
//! stays there) and a lender 182 MiB (the output layer and a compute buffer)
//! plus 14.1 per layer. 800 + 700 MiB hold it as 16 + 14 layers.

use crate::chain::Cluster;
use crate::resilience::{job_with, narrated, of_type, text};
use crate::support::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// What one roomy worker of its own answers to the resilience prompt, greedy.
fn one_worker_text(max_tokens: u32) -> String {
    let roomy = ready_worker(&[]);
    worker_text(&roomy.url, max_tokens)
}

/// The text a worker gives for the resilience prompt, greedy, `max_tokens` long.
fn worker_text(url: &str, max_tokens: u32) -> String {
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0});
    let sse = stream(&format!("{url}/v1/inference"), Some(&body.to_string())).expect("it streams");
    sse.rest()
        .iter()
        .filter_map(|e| e["t"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_model_no_hive_can_hold_is_split_across_two_and_answers_as_one_worker_does() {
    let _turn = serial();
    let one = one_worker_text(120);
    let (_h1, desk) = {
        let home = TempDir::new("split-desk");
        let p = start_hive(&home, &["--max-memory", "800MiB"], &[]);
        (home, p)
    };
    let (_h2, mac) = {
        let home = TempDir::new("split-mac");
        let p = start_hive(&home, &["--max-memory", "700MiB"], &[]);
        (home, p)
    };
    let c = Cluster::with_hives("split", &[("desk", &desk), ("mac", &mac)]);
    // The file goes to the roomier hive, which keeps its first layers.
    let events = job_with(&c, 120, |_| {});
    let split = events
        .iter()
        .find(|e| e["action"] == "split")
        .unwrap_or_else(|| panic!("no split narrated: {events:?}"));
    let said = split["human"].as_str().unwrap_or_default();
    assert!(
        said.contains("16 layers on hive desk") && said.contains("14 on hive mac"),
        "{said}"
    );
    assert!(narrated(&events, "lend"), "{events:?}");
    assert_eq!(
        text(&events),
        one,
        "the split worker answers as one worker does"
    );
    assert_eq!(of_type(&events, "end").len(), 1);

    // Who holds what: the worker names both hives; the lender counts its share.
    let (_, ps, _) = c.keeper(&["ps"]);
    assert!(ps.contains("desk 16 + mac 14"), "{ps}");
    let (_, hives, _) = c.keeper(&["hive", "list"]);
    let mac_line = hives
        .lines()
        .find(|l| l.starts_with("mac "))
        .unwrap_or_default();
    assert!(
        mac_line.contains("14 layers of smollm2-135m-instruct.q4_1 to desk"),
        "{hives}"
    );
    let (_, state) = get(&format!("{}/v1/workers/list", mac.url));
    assert_eq!(state, json!([]), "the lender runs no worker of its own");

    // Idle longer than any connection timeout of the hive's port: the tunnel
    // stays open, and a second job reuses the split worker.
    std::thread::sleep(rbee::http::HEADER_TIMEOUT + Duration::from_secs(2));
    let again = job_with(&c, 20, |_| {});
    assert!(!narrated(&again, "split"), "{again:?}");
    assert!(one.starts_with(&text(&again)), "{again:?}");

    // The lender dies mid-answer: the worker is lost, and with no room left
    // anywhere the answer ends with an error that says so, not a hang.
    let events = job_with(&c, 120, |tokens| {
        if tokens == 20 {
            mac.signal("KILL");
        }
    });
    assert!(narrated(&events, "failover"), "{events:?}");
    let error = of_type(&events, "error");
    let message = error
        .first()
        .and_then(|e| e["message"].as_str())
        .unwrap_or_default();
    assert!(
        message.contains("no other worker could take over"),
        "{events:?}"
    );
    wait_until("the split worker to go", Duration::from_secs(10), || {
        crate::chain::workers_of(&desk.url)
            .iter()
            .all(|w| w["state"] == "failed")
    });
}

#[test]
fn a_model_three_hives_hold_only_together_is_split_three_ways_as_planned() {
    let _turn = serial();
    let one = one_worker_text(40);
    // desk keeps 11 layers at most; a lender holds 15 with the output layer,
    // 24 without: two hives are not enough, three are.
    let hives: Vec<(TempDir, Proc)> = [
        ("split3-desk", "700MiB"),
        ("split3-a", "400MiB"),
        ("split3-b", "400MiB"),
    ]
    .iter()
    .map(|(label, budget)| {
        let home = TempDir::new(label);
        let p = start_hive(&home, &["--max-memory", budget], &[]);
        (home, p)
    })
    .collect();
    let c = Cluster::with_hives(
        "split3",
        &[
            ("desk", &hives[0].1),
            ("a", &hives[1].1),
            ("b", &hives[2].1),
        ],
    );
    let events = job_with(&c, 40, |_| {});
    assert_eq!(text(&events), one, "{events:?}");
    let (_, ps, _) = c.keeper(&["ps", "--json"]);
    let workers: serde_json::Value = serde_json::from_str(&ps).expect("JSON");
    let split = workers[0]["split"].as_array().cloned().unwrap_or_default();
    let layers: Vec<u64> = split.iter().filter_map(|p| p["layers"].as_u64()).collect();
    assert_eq!(layers.len(), 3, "{ps}");
    assert_eq!(layers.iter().sum::<u64>(), 30, "{ps}");
    assert!(layers[0] <= 11, "{ps}");
    // Each lender holds a lease for exactly its share of the plan.
    let (_, hive_list, _) = c.keeper(&["hive", "list", "--json"]);
    let hive_list: serde_json::Value = serde_json::from_str(&hive_list).expect("JSON");
    for part in &split[1..] {
        let name = part["hive"].as_str().unwrap_or_default();
        let lender = hive_list
            .as_array()
            .and_then(|l| l.iter().find(|h| h["name"] == name))
            .unwrap_or_else(|| panic!("no hive {name} in {hive_list}"));
        assert_eq!(lender["leases"][0]["layers"], part["layers"], "{hive_list}");
    }
}

#[test]
fn a_split_between_network_namespaces_answers_alike_and_a_lender_whose_link_is_cut_is_given_up() {
    let _turn = serial();
    let one = one_worker_text(60);
    let Some(net) = crate::resilience::Net::new(2) else {
        return;
    };
    // Both joined with a token: the tunnel between them is TLS, each side
    // pinning the other.
    let c = Cluster::listening("split-net");
    let token = c.join_token(&["--uses", "2"]);
    let desk = net.join(0, &c, &token, "desk", "800MiB");
    let mac = net.join(1, &c, &token, "mac", "700MiB");
    let events = job_with(&c, 60, |_| {});
    assert!(narrated(&events, "split"), "{events:?}");
    assert_eq!(
        text(&events),
        one,
        "split across two network stacks, the same answer"
    );

    // The lender's cable is pulled mid-answer: no reset reaches anyone. The
    // queen gives the worker up when the lender goes silent, and the worker,
    // stuck on a device that no longer answers, exits on its own.
    let events = job_with(&c, 400, |tokens| {
        if tokens == 10 {
            net.cut(1);
        }
    });
    assert!(narrated(&events, "failover"), "{events:?}");
    assert_eq!(of_type(&events, "error").len(), 1, "{events:?}");
    wait_until(
        "the stuck split worker to exit",
        Duration::from_secs(40),
        || {
            let list = net.get_inside(0, "/v1/workers/list");
            list.as_array()
                .is_some_and(|l| !l.is_empty() && l.iter().all(|w| w["state"] == "failed"))
        },
    );
    drop((desk, mac));
}

/// The upgrade to the RPC tunnel, written by hand; the status line's code.
pub fn upgrade(hive: &str, lease: &str, token: Option<&str>) -> (u16, TcpStream) {
    let addr = hive.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connects");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET /v1/rpc?lease={lease} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: upgrade\r\nUpgrade: ggml-rpc\r\n\r\n"
    )
    .expect("written");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, s)
}

/// The listening TCP sockets of these processes, as `ss` shows them.
fn listening(pids: &[u32]) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-ltnpH"])
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| pids.iter().any(|p| l.contains(&format!("pid={p},"))))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

#[test]
fn the_rpc_server_is_reached_only_through_the_hive_port_behind_its_token() {
    let home = TempDir::new("lend-door");
    let hive = start_hive(&home, &["--host", "0.0.0.0"], &[("RBEE_TOKEN", "s3cret")]);
    let lease = json!({
        "lease": "lease-door", "model": "smollm2", "borrower": "desk",
        "layers": 14, "memory_mb": 380,
    });
    let made = ureq::post(&format!("{}/v1/leases", hive.url))
        .header("Authorization", "Bearer s3cret")
        .send(lease.to_string().as_bytes())
        .expect("the lease is made");
    assert_eq!(made.status(), 201);

    // Only the hive's port listens beyond loopback; its RPC server is on 127.0.0.1.
    let children = std::process::Command::new("pgrep")
        .args(["-P", &hive.pid().to_string()])
        .output()
        .expect("pgrep runs");
    let child: u32 = String::from_utf8_lossy(&children.stdout)
        .trim()
        .parse()
        .expect("one RPC server");
    let port = hive.url.rsplit(':').next().unwrap_or_default().to_string();
    assert_eq!(listening(&[hive.pid()]), [format!("0.0.0.0:{port}")]);
    let rpc = listening(&[child]);
    assert!(
        rpc.len() == 1 && rpc[0].starts_with("127.0.0.1:"),
        "the RPC server listens on {rpc:?}"
    );

    // A wrong token, or none, is refused at the door: no byte reaches llama.cpp.
    for token in [Some("wrong"), None] {
        let (code, mut s) = upgrade(&hive.url, "lease-door", token);
        assert_eq!(code, 401, "token {token:?}");
        let _ = s.write_all(b"\x0e bytes for the RPC server");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !hive.stderr().contains("Accepted client connection"),
        "{}",
        hive.stderr()
    );
    // The right token opens the tunnel to it: its first message (llama.cpp's
    // HELLO) reaches the server.
    let (code, mut s) = upgrade(&hive.url, "lease-door", Some("s3cret"));
    assert_eq!(code, 101);
    let mut hello = vec![14u8];
    hello.extend_from_slice(&24u64.to_le_bytes());
    hello.extend_from_slice(&[0u8; 24]);
    s.write_all(&hello).expect("the HELLO is sent");
    wait_until(
        "the RPC server to take the tunnel",
        Duration::from_secs(10),
        || hive.stderr().contains("Accepted client connection"),
    );
    drop(s);
    let (code, _) = upgrade(&hive.url, "no-such-lease", Some("s3cret"));
    assert_eq!(code, 404);

    // Ending the lease stops its RPC server.
    let ended = ureq::delete(&format!("{}/v1/leases/lease-door", hive.url))
        .header("Authorization", "Bearer s3cret")
        .call()
        .expect("the lease ends");
    assert_eq!(ended.status(), 200);
    wait_until("the RPC server to stop", Duration::from_secs(10), || {
        !alive(child)
    });
}
