//! The keeper and the daemons it starts, without a model: waking a queen,
//! the reason a person sees when a daemon cannot start, commands that only
//! look, help and typos, the config file.

use crate::support::*;
use std::net::TcpListener;
use std::time::Duration;

/// Runs `rbee ARGS` with `RBEE_HOME=home` to its end: exit code, stdout, stderr.
fn rbee(home: &TempDir, args: &[&str]) -> (i32, String, String) {
    let mut p = Proc::start_with_env(args, 0, &[("RBEE_HOME", home.str())]);
    let status = p
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("rbee {args:?} did not finish:\n{}", p.stderr()));
    (status.code().unwrap_or(-1), p.stdout(), p.stderr())
}

/// `rbee keeper --queen-url … ARGS`.
fn keeper(home: &TempDir, queen: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["keeper", "--queen-url", queen];
    all.extend_from_slice(args);
    rbee(home, &all)
}

/// Stops, when dropped, the queen a test woke (it is detached: nothing else would).
struct StopQueen<'a>(&'a TempDir, &'a str);

impl Drop for StopQueen<'_> {
    fn drop(&mut self) {
        let _ = keeper(self.0, self.1, &["queen", "stop"]);
    }
}

/// A port held by something that is not a queen: it hangs up on every connection.
fn hold_port() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = listener.try_clone().expect("clone");
    std::thread::spawn(move || {
        for conn in acceptor.incoming() {
            drop(conn);
        }
    });
    (listener, port)
}

#[test]
fn a_queen_on_a_taken_port_fails_naming_the_port() {
    let home = TempDir::new("queen-port");
    let (_held, port) = hold_port();
    let (code, _, err) = rbee(
        &home,
        &[
            "queen",
            "--port",
            &port.to_string(),
            "--data-dir",
            home.str(),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn the_keeper_shows_that_the_queen_port_is_taken() {
    let home = TempDir::new("keeper-port");
    let (_held, port) = hold_port();
    let queen = format!("http://127.0.0.1:{port}");
    let (code, _, err) = keeper(&home, &queen, &["queen", "start"]);
    assert_ne!(code, 0);
    assert!(err.contains("waking queen"), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    let log = home.path().join("queen.log");
    assert!(err.contains(&log.display().to_string()), "{err}");
}

#[test]
fn the_keeper_shows_that_another_queen_holds_the_data_dir() {
    let home = TempDir::new("keeper-locked");
    let first_port = free_port();
    let first = Proc::start(
        &[
            "queen",
            "--port",
            &first_port.to_string(),
            "--data-dir",
            home.str(),
        ],
        first_port,
    );
    wait_until("the first queen", Duration::from_secs(30), || {
        matches!(try_get(&format!("{}/health", first.url)), Ok((200, _)))
    });
    let queen = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = keeper(&home, &queen, &["queen", "start"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is another queen using this --data-dir?"),
        "{err}"
    );
}

#[test]
fn a_woken_queen_answers_at_once_logs_without_colour_and_stops() {
    let home = TempDir::new("keeper-wake");
    let queen = format!("http://127.0.0.1:{}", free_port());
    let _stop = StopQueen(&home, &queen);
    let (code, out, err) = keeper(&home, &queen, &["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "");
    assert!(err.contains(&format!("queen is up at {queen}")), "{err}");
    // Ready was reported after the bind: no waiting loop is needed here.
    let (status, _) = get(&format!("{queen}/health"));
    assert_eq!(status, 200);

    let (code, out, _) = keeper(&home, &queen, &["queen", "start"]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("queen already running at {queen}").as_str())
    );

    let (code, out, _) = keeper(&home, &queen, &["queen", "stop"]);
    assert_eq!((code, out.trim()), (0, "queen stopped"));
    let log = std::fs::read_to_string(home.path().join("queen.log")).expect("queen.log");
    assert!(log.contains("queen listening on"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log:?}");
}

#[test]
fn the_local_hive_takes_another_port_when_8080_is_taken() {
    let home = TempDir::new("keeper-local-hive");
    // Held by this test, or by someone else already: taken either way.
    let _held = TcpListener::bind("127.0.0.1:8080");
    let queen = format!("http://127.0.0.1:{}", free_port());
    let _stop = StopQueen(&home, &queen);
    let (code, _, err) = keeper(&home, &queen, &["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    // Asking the queen about this machine's models starts its local hive.
    let (code, _, err) = keeper(&home, &queen, &["models", "list"]);
    assert_eq!(code, 0, "{err}");
    let (_, hives, _) = keeper(&home, &queen, &["hive", "list", "--json"]);
    let hives: serde_json::Value = serde_json::from_str(&hives).expect("JSON");
    let local = hives
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "localhost"))
        .unwrap_or_else(|| panic!("no local hive listed: {hives}"));
    let url = local["url"].as_str().unwrap_or_default();
    assert!(url.starts_with("http://127.0.0.1:"), "{local}");
    assert!(!url.ends_with(":8080"), "{local}");
    assert_eq!(local["managed"], true, "{local}");
    let log = std::fs::read_to_string(home.path().join("hive.log")).expect("hive.log");
    assert!(log.contains("hive listening on"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log:?}");
}

#[test]
fn commands_that_only_look_start_nothing_and_say_how_to_start_a_queen() {
    let home = TempDir::new("keeper-look");
    let port = free_port();
    let queen = format!("http://127.0.0.1:{port}");
    let said = format!("no queen running at {queen} (start one with `rbee keeper queen start`)");
    for args in [
        &["hive", "list"][..],
        &["models", "list"],
        &["workers", "list"],
        &["ps"],
        &["list"],
        &["status"],
        &["stop", "smollm"],
        &["workers", "stop", "worker-1"],
    ] {
        let (code, out, err) = keeper(&home, &queen, args);
        assert_eq!((code, out.as_str()), (1, ""), "{args:?}: {err}");
        assert!(err.contains(&said), "{args:?}: {err}");
    }
    let (code, out, _) = keeper(&home, &queen, &["queen", "status"]);
    assert_eq!(code, 3, "{out}");
    assert_eq!(out, format!("queen at {queen}: not running\n"));
    // Nothing was started: no daemon wrote a log, nothing listens on the port.
    let logs: Vec<_> = std::fs::read_dir(home.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(logs.is_empty(), "{logs:?}");
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
}

/// The subcommands a help text lists under `Commands:`.
fn commands_in(help: &str) -> Vec<String> {
    help.split("Commands:\n")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn minus_h_works_on_every_command() {
    let home = TempDir::new("keeper-help");
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("-h");
        let (code, out, err) = rbee(&home, &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let usage = format!("Usage: rbee {}", path.join(" "));
        assert!(out.starts_with(&usage), "{args:?}:\n{out}");
        for sub in commands_in(&out) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
        seen += 1;
    }
    // rbee, its roles, the keeper's verbs and their actions: every one answered.
    assert!(seen >= 26, "only {seen} commands");
}

#[test]
fn typos_get_the_nearest_name_and_the_help_to_read() {
    let home = TempDir::new("keeper-typo");
    for (args, meant, help) in [
        (&["kepper", "ps"][..], "\"keeper\"", "`rbee --help`"),
        (
            &["keeper", "workers", "ls"],
            "\"list\"",
            "`rbee keeper workers --help`",
        ),
        (
            &["keeper", "infer", "--max-token", "5", "hi"],
            "\"--max-tokens\"",
            "`rbee keeper infer --help`",
        ),
    ] {
        let (code, out, err) = rbee(&home, args);
        assert_eq!((code, out.as_str()), (2, ""), "{args:?}: {err}");
        assert!(
            err.contains(&format!("did you mean {meant}?")),
            "{args:?}: {err}"
        );
        assert!(err.contains(help), "{args:?}: {err}");
    }
}

#[test]
fn the_config_file_remembers_the_queen_and_a_default_model() {
    let home = TempDir::new("keeper-config");
    let queen = format!("http://127.0.0.1:{}", free_port());
    let (code, out, err) = rbee(&home, &["keeper", "config", "set", "queen-url", &queen]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("queen-url = {queen}\n"));
    // Without a flag, the keeper asks the queen the file names.
    let (code, out, _) = rbee(&home, &["keeper", "queen", "status"]);
    assert_eq!((code, out), (3, format!("queen at {queen}: not running\n")));
    let (code, _, err) = rbee(&home, &["keeper", "config", "get", "model"]);
    assert_eq!(code, 1);
    assert!(err.contains("model is not set"), "{err}");
    let (code, _, err) = rbee(
        &home,
        &[
            "keeper",
            "config",
            "set",
            "model",
            "smollm2-135m-instruct.q4_1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (_, all, _) = rbee(&home, &["keeper", "config", "get"]);
    assert!(all.contains("model = smollm2-135m-instruct.q4_1"), "{all}");
    let file = std::fs::read_to_string(home.path().join("config.toml")).expect("config.toml");
    assert!(file.contains(&format!("queen_url = \"{queen}\"")), "{file}");
    let (code, _, err) = rbee(&home, &["keeper", "config", "set", "modle", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown config key \"modle\""), "{err}");
}
