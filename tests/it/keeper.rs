//! The keeper and the daemons it starts, without a model: waking a queen,
//! and the reason a person sees when a daemon cannot start.

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
    let (code, _, err) = keeper(&home, &queen, &["workers", "list"]);
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
    let (code, _, err) = keeper(&home, &queen, &["models", "list"]);
    assert_eq!(code, 0, "{err}");
    let (_, hives, _) = keeper(&home, &queen, &["hive", "list"]);
    let local = hives
        .lines()
        .find(|l| l.starts_with("localhost\t"))
        .unwrap_or_else(|| panic!("no local hive listed:\n{hives}"));
    let url = local.split('\t').nth(2).expect("a url column");
    assert!(url.starts_with("http://127.0.0.1:"), "{local}");
    assert!(!url.ends_with(":8080"), "{local}");
    assert!(local.contains("\tmanaged\t"), "{local}");
    let log = std::fs::read_to_string(home.path().join("hive.log")).expect("hive.log");
    assert!(log.contains("hive listening on"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log:?}");
}
