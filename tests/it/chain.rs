//! The whole flow from a shell: `rbee keeper` → queen → hive → worker.
//!
//! Each test starts its own queen (and hives) and checks one claim; the ones
//! that run the model take turns (`serial`), as every model test does.

use crate::hf_server::HfServer;
use crate::support::*;
use serde_json::Value;
use std::time::Duration;

/// A keeper run against its own RBEE_HOME and queen URL.
pub struct Cluster {
    /// RBEE_HOME for everything this cluster starts; removed at the end.
    _home: TempDir,
    pub queen: String,
    env: Vec<(String, String)>,
    /// A queen started here rather than woken by the keeper (one that
    /// listens beyond loopback); stopped with the cluster.
    _queen: Option<Proc>,
}

impl Cluster {
    pub fn new(label: &str, env: &[(&str, &str)]) -> Cluster {
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
            _queen: None,
        }
    }

    /// A cluster whose queen listens on every address (other machines join
    /// it), with a token, and starts no hive of its own; the keeper talks to
    /// it on loopback.
    pub fn listening(label: &str) -> Cluster {
        let mut c = Cluster::new(
            label,
            &[
                ("RBEE_TOKEN", "s3cret-queen-token"),
                ("RBEE_LOCAL_HIVE", "off"),
            ],
        );
        let port = free_port();
        c.queen = format!("http://127.0.0.1:{port}");
        let env: Vec<(&str, &str)> = c
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let port_s = port.to_string();
        let queen = Proc::start_with_env(
            &["queen", "--host", "0.0.0.0", "--port", &port_s],
            port,
            &env,
        );
        wait_until("the queen to answer", Duration::from_secs(30), || {
            matches!(try_get(&format!("{}/health", queen.url)), Ok((200, _)))
        });
        c._queen = Some(queen);
        c
    }

    /// The queen's token, when it has one.
    pub fn token(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == "RBEE_TOKEN")
            .map(|(_, v)| v.as_str())
    }

    /// `keeper join-token ARGS`: the token in the line it prints.
    pub fn join_token(&self, args: &[&str]) -> String {
        let mut all = vec!["join-token"];
        all.extend_from_slice(args);
        let (code, out, err) = self.keeper(&all);
        assert_eq!(code, 0, "{err}");
        let token = out.trim().strip_prefix("rbee hive --join ");
        token.unwrap_or_else(|| panic!("{out}")).to_string()
    }

    /// A cluster with these hives registered under these names.
    pub fn with_hives(label: &str, hives: &[(&str, &Proc)]) -> Cluster {
        let c = Cluster::new(label, &[]);
        for (name, hive) in hives {
            let (code, out, err) = c.keeper(&["hive", "add", name, "--url", &hive.url]);
            assert_eq!(code, 0, "{err}");
            assert!(out.ends_with(": reachable\n"), "{out}");
        }
        c
    }

    /// Starts `rbee keeper --queen-url … ARGS` without waiting.
    pub fn spawn(&self, args: &[&str]) -> Proc {
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
    pub fn keeper(&self, args: &[&str]) -> (i32, String, String) {
        let mut p = self.spawn(args);
        let status = p
            .wait_exit(Duration::from_secs(120))
            .unwrap_or_else(|| panic!("keeper {args:?} did not finish:\n{}", p.stderr()));
        (status.code().unwrap_or(-1), p.stdout(), p.stderr())
    }

    /// The RBEE_HOME everything this cluster starts uses.
    pub fn home(&self) -> String {
        self._home.str().to_string()
    }

    /// A list command's `--json` output, read.
    pub fn listed(&self, args: &[&str]) -> Vec<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let (code, out, err) = self.keeper(&all);
        assert_eq!(code, 0, "keeper {all:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("keeper {all:?}: {e}: {out}"))
    }

    /// `hive list`'s status of the hive `name` (`reachable`, `unreachable`).
    pub fn hive_status(&self, name: &str) -> String {
        let hives = self.listed(&["hive", "list"]);
        let hive = hives
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("no hive {name} listed: {hives:?}"));
        hive["status"].as_str().unwrap_or_default().to_string()
    }

    /// `keeper infer` of `prompt` (greedy, a few tokens) on the test model.
    fn infer(&self, node: &str, prompt: &str) -> (i32, String, String) {
        let model = file_model();
        self.keeper(&infer_args(node, &model, prompt))
    }

    /// `keeper infer` with the prompt written to its stdin (`-`).
    fn infer_piped(&self, prompt: &str) -> std::process::Output {
        use std::io::Write;
        let model = file_model();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args(["keeper", "--queen-url", &self.queen])
            .args(infer_args("localhost", &model, "-"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("keeper starts");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(prompt.as_bytes())
            .expect("the prompt is written");
        drop(stdin);
        child.wait_with_output().expect("keeper output")
    }

    /// A keeper generating a long answer on `node`, once its tokens flow.
    fn long_infer(&self, node: &str) -> Proc {
        let model = file_model();
        let p = self.spawn(&[
            "infer",
            "--node",
            node,
            "--model",
            &model,
            "--max-tokens",
            "3000",
            // Greedy and without the chat template the small model goes on
            // until cut; a sampled chat answer may end after a few words,
            // before the test has stopped it.
            "--raw",
            "--temperature",
            "0",
            "Once upon a time",
        ]);
        wait_until("tokens to flow", Duration::from_secs(60), || {
            p.stdout().len() > 20
        });
        p
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.keeper(&["queen", "stop"]);
    }
}

pub fn file_model() -> String {
    format!("file:{}", model_path().display())
}

pub fn infer_args<'a>(node: &'a str, model: &'a str, prompt: &'a str) -> Vec<&'a str> {
    vec![
        "infer",
        "--node",
        node,
        "--model",
        model,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        prompt,
    ]
}

/// The local hive's URL and pid, from the queen's narration.
fn local_hive(stderr: &str) -> (String, u32) {
    let line = stderr
        .lines()
        .find(|l| l.contains("local hive is up at"))
        .unwrap_or_else(|| panic!("no local hive narrated:\n{stderr}"));
    let rest = line
        .split("local hive is up at ")
        .nth(1)
        .unwrap_or_default();
    let url = rest.split_whitespace().next().unwrap_or_default();
    let pid = rest
        .split("(pid ")
        .nth(1)
        .and_then(|p| p.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    (url.to_string(), pid)
}

pub fn workers_of(hive: &str) -> Vec<Value> {
    let (status, list) = get(&format!("{hive}/v1/workers/list"));
    assert_eq!(status, 200, "{list}");
    list.as_array().cloned().unwrap_or_default()
}

/// The one worker a hive runs: its pid and URL.
pub fn only_worker(hive: &str) -> (u32, String) {
    let workers = workers_of(hive);
    assert_eq!(workers.len(), 1, "{workers:?}");
    let pid = workers[0]["pid"].as_u64().expect("a pid") as u32;
    let url = workers[0]["url"].as_str().expect("a url").to_string();
    (pid, url)
}

#[test]
fn from_nothing_running_tokens_reach_stdout_and_every_step_is_narrated() {
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
    let (code, out, err) = c.keeper(&infer_args("localhost", model, "Once upon a time"));
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().len() > 5, "tokens reach stdout: {out:?}");
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
}

#[test]
fn a_second_call_reuses_the_worker_and_repeats_the_greedy_answer() {
    let _turn = serial();
    let c = Cluster::new("chain-warm", &[]);
    let (code, first, err) = c.infer("localhost", "Once upon a time");
    assert_eq!(code, 0, "{err}");
    let (hive, _) = local_hive(&err);
    let (code, again, err) = c.infer("localhost", "Once upon a time");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("using worker") && !err.contains("starting a worker"),
        "{err}"
    );
    assert!(!err.contains("waking"), "the queen was still up: {err}");
    assert_eq!(again, first);
    assert_eq!(workers_of(&hive).len(), 1);
}

#[test]
fn a_prompt_piped_on_stdin_gets_the_same_answer_as_an_argument() {
    let _turn = serial();
    let c = Cluster::new("chain-pipe", &[]);
    let (code, from_arg, err) = c.infer("localhost", "Once upon a time");
    assert_eq!(code, 0, "{err}");
    let from_pipe = c.infer_piped("Once upon a time");
    let err = String::from_utf8_lossy(&from_pipe.stderr);
    assert!(from_pipe.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&from_pipe.stdout), from_arg);
}

#[test]
fn an_empty_piped_prompt_is_refused() {
    let c = Cluster::new("chain-empty", &[]);
    let empty = c.infer_piped("  \n");
    assert_eq!(empty.status.code(), Some(1));
    let err = String::from_utf8_lossy(&empty.stderr);
    assert!(err.contains("the prompt is empty"), "{err}");
    assert!(empty.stdout.is_empty());
}

#[test]
fn ctrl_c_cancels_the_job_and_frees_the_workers_slot() {
    let _turn = serial();
    let c = Cluster::new("chain-cancel", &[]);
    let (code, _, err) = c.infer("localhost", "Hello");
    assert_eq!(code, 0, "{err}");
    let (_, worker) = only_worker(&local_hive(&err).0);
    let mut long = c.long_infer("localhost");
    assert_eq!(get(&format!("{worker}/v1/ready")).1["slots_busy"], 1);
    long.signal("INT");
    let status = long
        .wait_exit(Duration::from_secs(20))
        .expect("the keeper exits");
    assert_eq!(status.code(), Some(130), "{}", long.stderr());
    wait_until("the slot to be freed", Duration::from_secs(10), || {
        get(&format!("{worker}/v1/ready")).1["slots_busy"] == 0
    });
}

#[test]
fn queen_stop_leaves_nothing_the_queen_started() {
    let _turn = serial();
    let c = Cluster::new("chain-stop", &[]);
    let (code, _, err) = c.infer("localhost", "Hello");
    assert_eq!(code, 0, "{err}");
    let (hive, hive_pid) = local_hive(&err);
    let (worker_pid, _) = only_worker(&hive);
    let (code, out, _) = c.keeper(&["queen", "stop"]);
    assert_eq!((code, out.trim()), (0, "queen stopped"));
    wait_until("hive and worker to stop", Duration::from_secs(30), || {
        !alive(hive_pid) && !alive(worker_pid)
    });
    let (code, status, _) = c.keeper(&["queen", "status"]);
    assert_eq!(code, 3, "{status}");
    assert!(status.ends_with(": not running\n"), "{status}");
}

#[test]
fn a_job_runs_on_the_node_it_names_and_the_tables_show_it_there() {
    let _turn = serial();
    let (one_home, two_home) = (TempDir::new("hive-one"), TempDir::new("hive-two"));
    let one = start_hive(&one_home, &[], &[]);
    let two = start_hive(&two_home, &[], &[]);
    let c = Cluster::with_hives("chain-route", &[("one", &one), ("two", &two)]);
    assert_eq!(c.listed(&["hive", "list"]).len(), 2);
    let (code, out, err) = c.infer("two", "Hello there");
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().len() > 5, "{out:?}");
    assert_eq!(workers_of(&two.url).len(), 1, "ran on two");
    assert!(workers_of(&one.url).is_empty(), "not on one");
    let workers = c.listed(&["ps"]);
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(
        (
            &workers[0]["hive"],
            &workers[0]["model"],
            &workers[0]["state"]
        ),
        (
            &"two".into(),
            &"smollm2-135m-instruct.q4_1".into(),
            &"ready".into()
        )
    );
    // The estimate placement counted, and the resident set once the hive has measured it.
    assert!(
        workers[0]["estimate_mb"].as_u64() > Some(100),
        "{workers:?}"
    );
    let resident = (0..20).find_map(|_| {
        let r = c.listed(&["ps"])[0]["resident_mb"]
            .as_u64()
            .filter(|&r| r > 0);
        r.or_else(|| {
            std::thread::sleep(Duration::from_millis(250));
            None
        })
    });
    assert!(resident.is_some_and(|r| r > 50), "{:?}", c.listed(&["ps"]));
    let (_, table, _) = c.keeper(&["workers", "list"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ID")
            && header.contains("  MODEL  ")
            && header.contains("  ESTIMATE  RSS  "),
        "{table}"
    );
    let models = c.listed(&["models", "list", "--node", "two"]);
    assert_eq!(
        models[0]["name"], "smollm2-135m-instruct.q4_1",
        "{models:?}"
    );
    assert_eq!(models[0]["quantization"], "Q4_1");
}

#[test]
fn models_set_starts_the_models_workers_with_its_context_slots_and_kv_cache() {
    let _turn = serial();
    let home = TempDir::new("hive-set");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("chain-set", &[("one", &hive)]);
    let (code, first, err) = c.infer("one", "Hello there");
    assert_eq!(code, 0, "{err}");
    let name = "smollm2-135m-instruct.q4_1";
    let worker = |field: &str| workers_of(&hive.url)[0][field].clone();
    let (default_mb, default_slots) = (worker("memory_mb"), worker("slots"));
    let (code, _, err) = c.keeper(&["stop", name]);
    assert_eq!(code, 0, "{err}");

    let set = ["models", "set", name, "--node", "one"];
    let (code, out, err) = c.keeper(&[&set[..], &["--ctx", "2048", "--slots", "2"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ctx 2048, 2 slots"), "{out}");
    // Options given later add to what is set.
    let (code, out, err) = c.keeper(&[&set[..], &["--cache-type", "q8_0"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ctx 2048, 2 slots, cache q8_0"), "{out}");
    let models = c.listed(&["models", "list", "--node", "one"]);
    assert_eq!(
        models[0]["settings"],
        serde_json::json!({"ctx_size": 2048, "slots": 2, "cache_type": "q8_0"})
    );
    // What cannot work is refused, naming the limit; nothing changes.
    for (bad, says) in [
        (&["--slots", "0"][..], "slots must be between 1 and"),
        (&["--ctx", "999999"], "training context of 8192"),
        (&["--cache-type", "q5"], "f16, q8_0 or q4_0"),
    ] {
        let (code, _, err) = c.keeper(&[&set[..], bad].concat());
        assert_ne!(code, 0, "{bad:?}");
        assert!(err.contains(says), "{bad:?}: {err}");
    }

    // The next worker starts so, and answers the same greedy question.
    let (code, again, err) = c.infer("one", "Hello there");
    assert_eq!(code, 0, "{err}");
    assert!(!again.trim().is_empty() && !first.trim().is_empty());
    assert_eq!(
        (worker("slots"), worker("ctx_size")),
        (2.into(), 2048.into()),
        "{default_slots}"
    );
    let (smaller, before) = (worker("memory_mb"), default_mb.as_u64().unwrap_or(0));
    assert!(
        smaller.as_u64().unwrap_or(u64::MAX) < before,
        "{smaller} MB against {before} MB with the defaults"
    );
    let (_, props) = get(&format!(
        "{}/props",
        worker("url").as_str().unwrap_or_default()
    ));
    assert_eq!(
        (&props["cache_type_k"], &props["cache_type_v"]),
        (&"q8_0".into(), &"q8_0".into()),
        "{props}"
    );
    assert_eq!(
        props["default_generation_settings"]["n_ctx"], 2048,
        "{props}"
    );

    // --reset: the hive's defaults again.
    let (code, out, err) = c.keeper(&[&set[..], &["--reset"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": - (new workers"), "{out}");
}

#[test]
fn an_unknown_node_is_refused_naming_the_registered_hives() {
    let (one_home, two_home) = (TempDir::new("hive-n1"), TempDir::new("hive-n2"));
    let one = start_hive(&one_home, &[], &[]);
    let two = start_hive(&two_home, &[], &[]);
    let c = Cluster::with_hives("chain-node", &[("one", &one), ("two", &two)]);
    let (code, out, err) = c.infer("nowhere", "hi");
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.contains("no hive named nowhere") && err.contains("one, two"),
        "{err}"
    );
}

#[test]
fn an_unknown_model_is_refused_by_name() {
    let home = TempDir::new("hive-model");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("chain-model", &[("solo", &hive)]);
    let (code, _, err) = c.keeper(&["infer", "--node", "solo", "--model", "no-such-model", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("no model named no-such-model"), "{err}");
    assert!(workers_of(&hive.url).is_empty(), "nothing was started");
}

#[test]
fn a_hive_that_is_down_is_named() {
    let home = TempDir::new("hive-down");
    let hive = start_hive(&home, &[], &[]);
    let c = Cluster::with_hives("chain-down", &[("gone", &hive)]);
    let url = hive.url.clone();
    drop(hive);
    let (code, _, err) = c.infer("gone", "hi");
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("hive gone at {url}")) && err.contains("not answering"),
        "{err}"
    );
}

#[test]
fn with_one_hive_down_a_job_for_any_node_runs_on_the_other() {
    let _turn = serial();
    let (one_home, two_home) = (TempDir::new("hive-d1"), TempDir::new("hive-d2"));
    let one = start_hive(&one_home, &[], &[]);
    let two = start_hive(&two_home, &[], &[]);
    let c = Cluster::with_hives("chain-failover", &[("one", &one), ("two", &two)]);
    drop(one);
    let model = file_model();
    let (code, out, err) = c.keeper(&["infer", "--model", &model, "--max-tokens", "4", "Hello"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty(), "{err}");
    assert!(err.contains("hive one at"), "the skip is narrated: {err}");
    assert_eq!(workers_of(&two.url).len(), 1);
}

#[test]
fn the_queen_refuses_bad_jobs_with_their_codes() {
    let c = Cluster::new("chain-api", &[]);
    let (code, _, err) = c.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    let (status, e) = post(&format!("{}/v1/jobs", c.queen), "{\"prompt\": 3}");
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{e}"
    );
    let (status, e) = get(&format!("{}/v1/jobs/job-nope/stream", c.queen));
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("JOB_NOT_FOUND"))
    );
    let (status, e) = request("DELETE", &format!("{}/v1/jobs/job-nope", c.queen));
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("JOB_NOT_FOUND"))
    );
}
