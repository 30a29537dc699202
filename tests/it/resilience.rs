//! Nothing lost when a machine fails (DESIGN.md §11): a worker killed
//! mid-answer is replaced and the answer goes on from the tokens already
//! streamed, with the same greedy text; hives in network namespaces of their
//! own, on addresses of their own and behind a token, lose their link
//! mid-answer; a queen restarted under running hives keeps its registry.

use crate::chain::{file_model, Cluster};
use crate::support::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const PROMPT: &str = "Once upon a time";

/// A greedy job through the queen's job API, read as it streams; `at`
/// is called with the number of token events seen, after each one (and with
/// 0 at `started`), so a test can break something mid-answer.
pub fn job_with(c: &Cluster, max_tokens: u32, at: impl FnMut(usize)) -> Vec<Value> {
    let body = json!({
        "model": file_model(), "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
    });
    job_of(c, &body, at)
}

/// The job `body` through the queen's job API, read to `[DONE]`, with `at` as in [`job_with`].
pub fn job_of(c: &Cluster, body: &Value, mut at: impl FnMut(usize)) -> Vec<Value> {
    let bearer = c.token().map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let url = format!("{}/v1/jobs", c.queen);
    let (status, _, created) = call_header("POST", &url, &headers, Some(&body.to_string()), "-");
    assert_eq!(status, 201, "{created}");
    let created: Value = serde_json::from_str(&created).expect("JSON");
    let url = format!("{}{}", c.queen, created["sse_url"].as_str().expect("a url"));
    let mut sse = stream_as(&url, None, c.token()).expect("the job streams");
    let mut events = Vec::new();
    let mut tokens = 0;
    loop {
        match sse.next_frame() {
            Some(rbee::http::sse::Frame::Data(d)) => {
                let event: Value = serde_json::from_str(&d).expect("JSON");
                match event["type"].as_str() {
                    Some("started") => at(0),
                    Some("token") => {
                        tokens += 1;
                        at(tokens);
                    }
                    _ => {}
                }
                events.push(event);
            }
            Some(rbee::http::sse::Frame::Done) => return events,
            None => panic!("the job stream closed without [DONE] after {events:?}"),
        }
    }
}

pub fn text(events: &[Value]) -> String {
    events.iter().filter_map(|e| e["t"].as_str()).collect()
}

pub fn of_type<'e>(events: &'e [Value], kind: &str) -> Vec<&'e Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

pub fn narrated(events: &[Value], action: &str) -> bool {
    events.iter().any(|e| e["action"] == action)
}

/// Checks a finished answer: one `started`, one `end` counting every
/// generated token (those behind the text and those that never became text),
/// token events numbered 0, 1, 2… across any failover.
pub fn assert_whole(events: &[Value], max_tokens: u64) {
    assert_eq!(of_type(events, "started").len(), 1, "{events:?}");
    let ends = of_type(events, "end");
    assert_eq!(ends.len(), 1, "{events:?}");
    let tokens = of_type(events, "token");
    let numbers: Vec<u64> = tokens.iter().filter_map(|t| t["i"].as_u64()).collect();
    let expected: Vec<u64> = (0..tokens.len() as u64).collect();
    assert_eq!(numbers, expected, "token events are numbered in order");
    let ids = |e: &Value| e["ids"].as_array().map_or(0, Vec::len) as u64;
    let generated: u64 = tokens.iter().map(|t| ids(t)).sum::<u64>() + ids(ends[0]);
    assert_eq!(ends[0]["tokens_out"], generated, "{:?}", ends[0]);
    assert_eq!(ends[0]["tokens_out"], max_tokens, "{:?}", ends[0]);
}

/// The ready workers the queen sees: (hive, pid).
fn ready_workers(c: &Cluster) -> Vec<(String, u32)> {
    let bearer = c.token().map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let url = format!("{}/v1/workers", c.queen);
    let (status, _, list) = call_header("GET", &url, &headers, None, "-");
    assert_eq!(status, 200, "{list}");
    let list: Value = serde_json::from_str(&list).expect("JSON");
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["state"] == "ready")
        .map(|w| {
            let hive = w["hive"].as_str().unwrap_or_default().to_string();
            (hive, w["pid"].as_u64().unwrap_or_default() as u32)
        })
        .collect()
}

/// SIGKILL, sent at once (no `kill` process to start: the answer goes on meanwhile).
fn kill(pid: u32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(sent, 0, "kill -KILL {pid}");
}

/// The pid of the process listening at `url`'s port (`ss` names it).
fn listening_pid(url: &str) -> u32 {
    let port = url.rsplit(':').next().expect("a port");
    let out = Command::new("ss")
        .args(["-ltnpH", &format!("sport = :{port}")])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("nobody listens on {port}: {text}"))
}

/// Two hives on loopback and a queen with both registered.
pub fn two_hives(label: &str) -> (TempDir, Proc, TempDir, Proc, Cluster) {
    let (h1, h2) = (
        TempDir::new(&format!("{label}-a")),
        TempDir::new(&format!("{label}-b")),
    );
    let a = start_hive(&h1, &["--max-memory", "2GiB"], &[]);
    let b = start_hive(&h2, &["--max-memory", "2GiB"], &[]);
    let c = Cluster::with_hives(label, &[("a", &a), ("b", &b)]);
    (h1, a, h2, b, c)
}

#[test]
fn a_worker_killed_after_0_1_or_30_tokens_is_continued_with_the_same_greedy_text() {
    let _turn = serial();
    let (_h1, _a, _h2, _b, c) = two_hives("failover");
    let max = 120;
    let whole = job_with(&c, max, |_| {});
    assert_whole(&whole, max.into());
    let reference = text(&whole);
    for n in [0, 1, 30] {
        let serving = ready_workers(&c);
        assert_eq!(serving.len(), 1, "one worker serves: {serving:?}");
        let (hive, pid) = serving[0].clone();
        let mut killed = false;
        let events = job_with(&c, max, |tokens| {
            if tokens == n && !killed {
                kill(pid);
                killed = true;
            }
        });
        assert!(killed, "the worker was killed after {n} tokens");
        assert!(
            narrated(&events, "failover"),
            "after {n} tokens: {events:?}"
        );
        assert_whole(&events, max.into());
        assert_eq!(
            text(&events),
            reference,
            "killed on hive {hive} after {n} tokens"
        );
    }
}

#[test]
fn the_official_client_streams_through_a_failover_without_a_break() {
    let _turn = serial();
    let (_h1, _a, _h2, _b, c) = two_hives("failover-openai");
    // A worker to kill: the first request provisions it.
    let (status, created) = post(
        &format!("{}/v1/completions", c.queen),
        &json!({"model": file_model(), "prompt": "Hi", "max_tokens": 2}).to_string(),
    );
    assert_eq!(status, 200, "{created}");
    let serving = ready_workers(&c);
    assert_eq!(serving.len(), 1, "{serving:?}");
    let pid = serving[0].1.to_string();
    let stdout = python("clients/failover_test.py", &[&c.queen, &file_model(), &pid]);
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");
}

#[test]
fn two_hundred_jobs_with_a_worker_killed_every_twenty_all_end_whole() {
    let _turn = serial();
    let (_h1, _a, _h2, _b, c) = two_hives("failover-200");
    let max = 24;
    let reference = text(&job_with(&c, max, |_| {}));
    let mut failovers = 0;
    let mut seed: u64 = 0x5eed;
    for n in 0..200 {
        let mut victim = (n % 20 == 10).then(|| {
            let workers = ready_workers(&c);
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            workers[(seed >> 33) as usize % workers.len()].1
        });
        let events = job_with(&c, max, |tokens| {
            if tokens == 2 {
                if let Some(pid) = victim.take() {
                    kill(pid);
                }
            }
        });
        assert_whole(&events, max.into());
        assert_eq!(text(&events), reference, "job {n}");
        failovers += usize::from(narrated(&events, "failover"));
    }
    assert_eq!(failovers, 10, "every kill was failed over");
}

/// Hives on a network of their own: a bridge here, and a namespace with a
/// veth pair to it for each host, addresses 10.77.N.2, .3, …; all of it
/// removed on drop (after the processes inside have been killed).
pub struct Net {
    tag: String,
    subnet: u32,
    hosts: usize,
    /// The data dirs of the hives joined on it, removed with it.
    homes: std::sync::Mutex<Vec<TempDir>>,
}

impl Net {
    /// `None` (said on stderr) where namespaces cannot be made here.
    pub fn new(hosts: usize) -> Option<Net> {
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let net = Net {
            tag: format!("{}{}", pid % 10_000, n % 10),
            subnet: 77 + (pid * 7 + n) % 170,
            hosts,
            homes: std::sync::Mutex::default(),
        };
        let bridge = net.bridge();
        let gateway = format!("10.77.{}.1/24", net.subnet);
        let mut steps = vec![
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &gateway, "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
        .collect::<Vec<_>>();
        for i in 0..hosts {
            let (ns, outer, inner) = (net.ns(i), net.outer(i), net.inner(i));
            let addr = format!("{}/24", net.addr(i));
            for step in [
                vec!["netns", "add", &ns],
                vec![
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ],
                vec!["link", "set", &inner, "netns", &ns],
                vec!["link", "set", &outer, "master", &bridge, "up"],
                vec!["-n", &ns, "addr", "add", &addr, "dev", &inner],
                vec!["-n", &ns, "link", "set", &inner, "up"],
                vec!["-n", &ns, "link", "set", "lo", "up"],
            ] {
                steps.push(step.into_iter().map(String::from).collect());
            }
        }
        for step in steps {
            let out = Command::new("ip").args(&step).output();
            let ok = out.as_ref().is_ok_and(|o| o.status.success());
            if !ok {
                let why = out.map_or_else(
                    |e| e.to_string(),
                    |o| String::from_utf8_lossy(&o.stderr).trim().to_string(),
                );
                eprintln!(
                    "SKIPPED: network namespaces cannot be made here (ip {}: {why}); \
                     these tests need root and iproute2",
                    step.join(" ")
                );
                return None;
            }
        }
        Some(net)
    }

    fn bridge(&self) -> String {
        format!("rbbr{}", self.tag)
    }
    fn ns(&self, i: usize) -> String {
        format!("rbee-{}-{i}", self.tag)
    }
    fn outer(&self, i: usize) -> String {
        format!("rbo{}{i}", self.tag)
    }
    fn inner(&self, i: usize) -> String {
        format!("rbi{}{i}", self.tag)
    }
    fn addr(&self, i: usize) -> String {
        format!("10.77.{}.{}", self.subnet, i + 2)
    }

    /// Pulls host `i`'s cable: its processes live on, unreachable.
    pub fn cut(&self, i: usize) {
        let status = Command::new("ip")
            .args(["link", "set", &self.outer(i), "down"])
            .status()
            .expect("ip runs");
        assert!(status.success());
    }

    /// `rbee hive` inside host `i`'s namespace, listening on every address
    /// with a token and this memory budget (added by URL, not joined).
    pub fn hive(&self, i: usize, home: &TempDir, token_file: &str, budget: &str) -> Proc {
        let args = [
            "hive",
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
            "--token-file",
            token_file,
            "--data-dir",
            home.str(),
            "--max-memory",
            budget,
        ];
        let p = Proc::start_in(
            &self.ns(i),
            &args,
            &format!("https://{}:8080", self.addr(i)),
        );
        wait_until("the hive to listen", Duration::from_secs(30), || {
            p.stderr().contains("hive listening")
        });
        p
    }

    /// `rbee hive --join TOKEN` on host `i` under `name`, once the queen
    /// of cluster `c` lists it as reachable.
    pub fn join(&self, i: usize, c: &Cluster, token: &str, name: &str, budget: &str) -> Proc {
        let home = TempDir::new(&format!("{}-{name}", self.tag));
        let p = self.join_in(i, &home, token, name, &["--max-memory", budget]);
        wait_until("the hive to join", Duration::from_secs(60), || {
            let hives = c.listed(&["hive", "list"]);
            hives
                .iter()
                .any(|h| h["name"] == name && h["status"] == "reachable")
        });
        self.homes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(home);
        p
    }

    /// `rbee hive --join TOKEN --name NAME ARGS` on host `i` with data in
    /// `home`, on port 8080, not waited for.
    pub fn join_in(
        &self,
        i: usize,
        home: &TempDir,
        token: &str,
        name: &str,
        extra: &[&str],
    ) -> Proc {
        let mut args = vec![
            "hive",
            "--join",
            token,
            "--name",
            name,
            "--port",
            "8080",
            "--data-dir",
            home.str(),
        ];
        args.extend_from_slice(extra);
        Proc::start_in(
            &self.ns(i),
            &args,
            &format!("https://{}:8080", self.addr(i)),
        )
    }

    /// `GET path` of the hive on host `i`, asked on that host's loopback
    /// (plain, as a person on that machine would).
    pub fn get_inside(&self, i: usize, path: &str) -> serde_json::Value {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(i),
                "curl",
                "-s",
                "--max-time",
                "5",
            ])
            .arg(format!("http://127.0.0.1:8080{path}"))
            .output()
            .expect("curl runs");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Host `i`'s address.
    pub fn host(&self, i: usize) -> String {
        self.addr(i)
    }

    pub fn bridge_name(&self) -> String {
        self.bridge()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let ns = self.ns(i);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            let _ = Command::new("ip")
                .args(["link", "del", &self.outer(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

/// Two hives in namespaces of their own, joined with a token to a queen
/// here. Fields drop in order: the queen first, the network last.
struct Networked {
    c: Cluster,
    _hives: Vec<Proc>,
    net: Net,
}

fn networked(label: &str) -> Option<Networked> {
    let net = Net::new(2)?;
    // The queen's machine only orchestrates: every answer comes from the namespaces.
    let c = Cluster::listening(label);
    let token = c.join_token(&["--uses", "2"]);
    let hives = vec![
        net.join(0, &c, &token, "a", "2GiB"),
        net.join(1, &c, &token, "b", "2GiB"),
    ];
    Some(Networked {
        c,
        _hives: hives,
        net,
    })
}

#[test]
fn a_hive_whose_link_is_cut_mid_answer_is_failed_over_and_with_both_gone_the_error_says_so() {
    let _turn = serial();
    let Some(n) = networked("netns") else {
        return;
    };
    let (c, net) = (&n.c, &n.net);
    let max = 160;
    let reference = job_with(c, max, |_| {});
    assert_whole(&reference, max.into());
    let serving = ready_workers(c);
    assert_eq!(serving.len(), 1, "{serving:?}");
    let first = if serving[0].0 == "a" { 0 } else { 1 };
    let events = job_with(c, max, |tokens| {
        if tokens == 30 {
            net.cut(first);
        }
    });
    assert!(narrated(&events, "failover"), "{events:?}");
    assert_whole(&events, max.into());
    assert_eq!(text(&events), text(&reference));
    let name = ["a", "b"][first];
    assert_eq!(c.hive_status(name), "unreachable");

    // The other hive's link goes too, mid-answer: nobody is left to go on.
    let events = job_with(c, max, |tokens| {
        if tokens == 30 {
            net.cut(1 - first);
        }
    });
    let errors = of_type(&events, "error");
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0]["code"], "WORKER_LOST", "{events:?}");
    let message = errors[0]["message"].as_str().unwrap_or_default();
    let other = ["a", "b"][1 - first];
    assert!(
        message.contains(&format!("on hive {other}"))
            && message.contains("no other worker could take over"),
        "{message}"
    );
}

#[test]
fn a_queen_restarted_under_running_hives_keeps_its_registry_and_serves_the_next_job() {
    let _turn = serial();
    let Some(n) = networked("netns-queen") else {
        return;
    };
    let c = &n.c;
    let max = 8;
    let before = text(&job_with(c, max, |_| {}));
    let workers = ready_workers(c);
    // The queen dies as a machine's power cut would take it: no goodbye.
    kill(listening_pid(&c.queen));
    wait_until("the queen to be gone", Duration::from_secs(10), || {
        try_get(&format!("{}/health", c.queen)).is_err()
    });
    // Looking starts nothing; the next `queen start` wakes a new queen on the same data dir.
    let (code, _, err) = c.keeper(&["hive", "list"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no queen running at"), "{err}");
    let (code, _, err) = c.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("waking queen"), "{err}");
    wait_until("both hives reachable", Duration::from_secs(15), || {
        ["a", "b"]
            .iter()
            .all(|name| c.hive_status(name) == "reachable")
    });
    let after = job_with(c, max, |_| {});
    assert_whole(&after, max.into());
    assert_eq!(text(&after), before);
    // The worker from before the restart answered: the new queen found it.
    assert_eq!(ready_workers(c), workers);
    assert!(narrated(&after, "reuse"), "{after:?}");
}

#[test]
fn install_service_writes_a_unit_that_runs_this_role_with_its_flags_and_uninstall_removes_it() {
    let home = TempDir::new("service-home");
    let config = home.path().join("config");
    let rbee = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args(args)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("RBEE_TOKEN")
            .env_remove("RBEE_HOME")
            .output()
            .expect("rbee runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let flags = [
        "--port",
        "9999",
        "--max-memory",
        "1GiB",
        "--data-dir",
        "/srv/rbee data",
    ];
    let mut install = vec!["hive", "--install-service"];
    install.extend(flags);
    let (ok, said) = rbee(&install);
    assert!(ok, "{said}");
    let unit_path = config.join("systemd/user/rbee-hive.service");
    assert!(
        said.starts_with(&format!("wrote {}", unit_path.display())),
        "{said}"
    );
    // Here systemd may not run: then it says how to start it.
    assert!(
        said.contains("started and enabled")
            || said.contains("systemctl --user enable --now rbee-hive.service"),
        "{said}"
    );
    let unit = std::fs::read_to_string(&unit_path).expect("the unit is written");
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_rbee")).expect("the executable");
    let exec = format!(
        "ExecStart={} hive --port 9999 --max-memory 1GiB --data-dir \"/srv/rbee data\"\n",
        exe.display()
    );
    assert!(unit.contains(&exec), "{unit}");
    assert!(!unit.contains("--install-service"), "{unit}");
    assert!(unit.contains("WantedBy=default.target"), "{unit}");

    let (ok, said) = rbee(&["hive", "--uninstall-service"]);
    assert!(ok, "{said}");
    assert!(!unit_path.exists(), "{said}");
    // A token only in the environment would not reach the service.
    let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["queen", "--install-service"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", &config)
        .env("RBEE_TOKEN", "secret")
        .output()
        .expect("rbee runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pass it with --token-file"), "{err}");
    assert!(!config.join("systemd/user/rbee-queen.service").exists());
}

#[test]
fn a_restarted_queen_lists_this_machines_models_beside_a_remote_hive_of_the_same_host_name() {
    let _turn = serial();
    let Some(net) = Net::new(1) else {
        return;
    };
    let secrets = TempDir::new("local-back-secrets");
    let token = secrets.path().join("token");
    std::fs::write(&token, "s3cret-for-the-test\n").expect("token written");
    let token = token.display().to_string();
    let home = TempDir::new("local-back-remote");
    // The remote hive's machine has this machine's host name (a namespace shares it).
    let remote = net.hive(0, &home, &token, "2GiB");
    let c = Cluster::new("local-back", &[]);
    let model = crate::chain::file_model();
    let (code, _, err) = c.keeper(&crate::chain::infer_args("localhost", &model, "Hello"));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = c.keeper(&[
        "hive",
        "add",
        "far",
        "--url",
        &remote.url,
        "--token-file",
        &token,
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = c.keeper(&["queen", "stop"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = c.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    // No job has run since: this machine's hive is back all the same.
    wait_until(
        "this machine's models to be listed",
        Duration::from_secs(30),
        || {
            c.listed(&["list"])
                .iter()
                .any(|m| m["hive"] == "localhost" && m["name"] == "smollm2-135m-instruct.q4_1")
        },
    );
    let _ = c.keeper(&["queen", "stop"]);
    drop(remote);
}
