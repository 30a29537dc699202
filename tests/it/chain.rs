//! The whole flow from a shell: `rbee keeper` → queen → hive → worker.

use crate::hf_server::HfServer;
use crate::support::*;
use serde_json::Value;
use std::time::Duration;

/// A keeper run against its own RBEE_HOME and queen URL.
struct Cluster {
    /// RBEE_HOME for everything this cluster starts; removed at the end.
    _home: TempDir,
    queen: String,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn new(label: &str, env: &[(&str, &str)]) -> Cluster {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let home = TempDir::new(label);
        env.push(("RBEE_HOME".into(), home.str().into()));
        Cluster {
            queen: format!("http://127.0.0.1:{}", free_port()),
            _home: home,
            env,
        }
    }

    /// Starts `rbee keeper --queen-url … ARGS` without waiting.
    fn spawn(&self, args: &[&str]) -> Proc {
        let mut all = vec!["keeper", "--queen-url", &self.queen];
        all.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Proc::start_with_env(&all, 0, &env)
    }

    /// Runs a keeper command to its end: exit code, stdout, stderr.
    fn keeper(&self, args: &[&str]) -> (i32, String, String) {
        let mut p = self.spawn(args);
        let status = p
            .wait_exit(Duration::from_secs(120))
            .unwrap_or_else(|| panic!("keeper {args:?} did not finish:\n{}", p.stderr()));
        (status.code().unwrap_or(-1), p.stdout(), p.stderr())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.keeper(&["queen", "stop"]);
    }
}

/// The local hive's URL and pid, from the queen's narration.
fn local_hive(stderr: &str) -> (String, u32) {
    let line = stderr
        .lines()
        .find(|l| l.contains("local hive is up at"))
        .unwrap_or_else(|| panic!("no local hive narrated:\n{stderr}"));
    let rest = line.split("local hive is up at ").nth(1).unwrap();
    let url = rest.split_whitespace().next().unwrap().to_string();
    let pid = rest
        .split("(pid ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap();
    (url, pid)
}

fn workers_of(hive: &str) -> Vec<Value> {
    get(&format!("{hive}/v1/workers/list"))
        .1
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn from_nothing_running_tokens_reach_the_shell_and_the_next_call_is_warm() {
    let _turn = serial();
    let hf = HfServer::start();
    hf.add_repo(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        &model_path(),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    );
    let c = Cluster::new("chain-cold", &[("HF_ENDPOINT", &hf.url)]);
    let model = "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1";
    let infer = [
        "infer",
        "--node",
        "localhost",
        "--model",
        model,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let mut args = infer.to_vec();
    args.push("Once upon a time");
    let (code, out, err) = c.keeper(&args);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty(), "tokens reach stdout");
    assert!(
        !out.contains("[queen]") && !out.contains("waking"),
        "only tokens on stdout: {out}"
    );
    for said in [
        "queen is asleep, waking queen",
        "starting one on port",
        "is fetching",
        "starting a worker",
        "is ready",
    ] {
        assert!(err.contains(said), "stderr should narrate {said:?}:\n{err}");
    }
    let (hive, hive_pid) = local_hive(&err);
    let workers = workers_of(&hive);
    assert_eq!(workers.len(), 1);
    let worker_pid = workers[0]["pid"].as_u64().unwrap() as u32;
    let worker_url = workers[0]["url"].as_str().unwrap().to_string();

    // Warm: the same worker, no spawn; and greedy output is the same.
    let (code, again, err) = c.keeper(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("using worker") && !err.contains("starting a worker"),
        "{err}"
    );
    assert!(!err.contains("waking"), "{err}");
    assert_eq!(again, out);
    assert_eq!(workers_of(&hive).len(), 1);

    // The prompt can come from a pipe; an empty one is refused.
    let piped = |prompt: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args([
                "keeper",
                "--queen-url",
                &c.queen,
                "infer",
                "--model",
                model,
                "--max-tokens",
                "12",
                "--temperature",
                "0",
                "-",
            ])
            .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("keeper");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(prompt.as_bytes())
            .unwrap();
        child.wait_with_output().expect("keeper output")
    };
    let from_pipe = piped("Once upon a time");
    assert!(
        from_pipe.status.success(),
        "{}",
        String::from_utf8_lossy(&from_pipe.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&from_pipe.stdout), out);
    let empty = piped("  ");
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("the prompt is empty"));

    // Ctrl+C cancels the job and frees the worker's slot.
    let mut long = c.spawn(&[
        "infer",
        "--model",
        model,
        "--max-tokens",
        "3000",
        "Once upon a time",
    ]);
    wait_until("tokens to flow", Duration::from_secs(60), || {
        long.stdout().len() > 20
    });
    long.signal("INT");
    let status = long
        .wait_exit(Duration::from_secs(20))
        .expect("the keeper exits");
    assert_eq!(status.code(), Some(130), "{}", long.stderr());
    wait_until("the slot to be freed", Duration::from_secs(10), || {
        get(&format!("{worker_url}/v1/ready")).1["slots_busy"] == 0
    });

    // `queen stop` leaves nothing the queen started.
    let (code, out, _) = c.keeper(&["queen", "stop"]);
    assert_eq!((code, out.trim()), (0, "queen stopped"));
    wait_until("hive and worker to stop", Duration::from_secs(30), || {
        !alive(hive_pid) && !alive(worker_pid)
    });
    let (_, status, _) = c.keeper(&["queen", "status"]);
    assert!(status.starts_with("queen\tasleep"), "{status}");
}

#[test]
fn jobs_route_by_node_and_failures_are_named() {
    let _turn = serial();
    let (one_home, two_home) = (TempDir::new("hive-one"), TempDir::new("hive-two"));
    let start = |home: &TempDir| start_hive(home, &[], &[]);
    let one = start(&one_home);
    let two = start(&two_home);
    let c = Cluster::new("chain-route", &[]);
    for (name, hive) in [("one", &one), ("two", &two)] {
        let (code, out, err) = c.keeper(&["hive", "add", name, "--url", &hive.url]);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with(&format!("{name}\treachable")), "{out}");
    }
    let (_, list, _) = c.keeper(&["hive", "list"]);
    assert_eq!(list.lines().count(), 2, "{list}");

    let model = format!("file:{}", model_path().display());
    let (code, out, err) = c.keeper(&[
        "infer",
        "--node",
        "two",
        "--model",
        &model,
        "--max-tokens",
        "6",
        "Hello there",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
    assert_eq!(workers_of(&two.url).len(), 1, "ran on two");
    assert!(workers_of(&one.url).is_empty(), "not on one");
    let (_, listed, _) = c.keeper(&["workers", "list"]);
    assert!(
        listed.contains("\ttwo\tsmollm2-135m-instruct.q4_1\tready"),
        "{listed}"
    );
    let (_, models, _) = c.keeper(&["models", "list", "--node", "two"]);
    assert!(
        models.starts_with("smollm2-135m-instruct.q4_1\tQ4_1\tllama"),
        "{models}"
    );

    // A worker killed mid-stream: WORKER_LOST and exit 1.
    let worker_pid = workers_of(&two.url)[0]["pid"].as_u64().unwrap() as u32;
    let mut long = c.spawn(&[
        "infer",
        "--node",
        "two",
        "--model",
        &model,
        "--max-tokens",
        "3000",
        "Once upon a time",
    ]);
    wait_until("tokens to flow", Duration::from_secs(60), || {
        long.stdout().len() > 20
    });
    std::process::Command::new("kill")
        .args(["-KILL", &worker_pid.to_string()])
        .status()
        .unwrap();
    let status = long
        .wait_exit(Duration::from_secs(30))
        .expect("the keeper exits");
    assert_eq!(status.code(), Some(1));
    assert!(long.stderr().contains("WORKER_LOST"), "{}", long.stderr());

    // Bad input: an unknown node, an unknown model.
    let (code, _, err) = c.keeper(&["infer", "--node", "nowhere", "--model", &model, "hi"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no hive named nowhere") && err.contains("one, two"),
        "{err}"
    );
    let (code, _, err) = c.keeper(&["infer", "--node", "two", "--model", "no-such-model", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("no model named no-such-model"), "{err}");

    // A hive that is down is named; the other still serves.
    drop(one);
    let (code, _, err) = c.keeper(&["infer", "--node", "one", "--model", &model, "hi"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("hive one at") && err.contains("not answering"),
        "{err}"
    );
    let (code, _, err) = c.keeper(&[
        "infer",
        "--node",
        "two",
        "--model",
        &model,
        "--max-tokens",
        "4",
        "Hello",
    ]);
    assert_eq!(code, 0, "{err}");

    // The queen's own API: a malformed job, a job that does not exist.
    let (status, e) = post(&format!("{}/v1/jobs", c.queen), "{\"prompt\": 3}");
    assert_eq!(status, 400, "{e}");
    let (status, e) = get(&format!("{}/v1/jobs/job-nope/stream", c.queen));
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("JOB_NOT_FOUND"))
    );
    let (status, _) = request("DELETE", &format!("{}/v1/jobs/job-nope", c.queen));
    assert_eq!(status, 404);
}
