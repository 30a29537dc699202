//! Machines joining over TLS (issue 28): hives in network namespaces join a
//! queen here with `rbee hive --join TOKEN` alone — one by the address in
//! the token, one finding the queen on the LAN — and what crosses the bridge
//! between them is captured.

use crate::chain::{file_model, Cluster};
use crate::resilience::Net;
use crate::support::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `tcpdump` writing what crosses `interface` to a file until dropped.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    /// `None` (said on stderr) where tcpdump is missing.
    fn start(interface: &str, dir: &TempDir) -> Option<Capture> {
        let file = dir.path().join("bridge.pcap");
        let child = Command::new("tcpdump")
            .args(["-i", interface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("SKIPPED: tcpdump is not installed (make testdeps installs it)");
            return None;
        };
        // tcpdump says it is listening on stderr once it captures.
        let stderr = child.stderr.take().expect("piped");
        let (said, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = said.send(());
                }
            }
        });
        listening
            .recv_timeout(Duration::from_secs(10))
            .expect("tcpdump listens");
        Some(Capture { child, file })
    }

    /// Stops capturing; every byte captured.
    fn finish(mut self) -> Vec<u8> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("the capture is written")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn hive<'a>(hives: &'a [Value], name: &str) -> &'a Value {
    hives
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no hive {name}: {hives:?}"))
}

/// `curl` from this machine to `url` over TLS without checking its
/// certificate (as a stranger would), showing `cert` if given: the status.
fn stranger(url: &str, cert: Option<&std::path::Path>) -> String {
    let mut command = Command::new("curl");
    command.args([
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some(dir) = cert {
        command
            .arg("--cert")
            .arg(dir.join("hive-identity.crt"))
            .arg("--key")
            .arg(dir.join("hive-identity.key"));
    }
    let out = command.arg(url).output().expect("curl runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn hives_join_by_token_and_by_mdns_talk_tls_only_and_a_removed_hive_is_refused() {
    let _turn = serial();
    let Some(net) = Net::new(2) else {
        return;
    };
    let c = Cluster::listening("join");
    let model = file_model();

    // By the address in the token.
    let token = c.join_token(&[]);
    assert!(
        token.starts_with("rbee1:") && token.contains('@'),
        "{token}"
    );
    let _a = net.join(0, &c, &token, "a", "2GiB");

    // The token is spent: a second machine is refused, and nothing registered.
    let home_b = TempDir::new("join-b");
    let mut again = net.join_in(1, &home_b, &token, "b", &[]);
    let status = again.wait_exit(Duration::from_secs(60)).expect("it exits");
    assert!(!status.success());
    assert!(
        again.stderr().contains("has been used"),
        "{}",
        again.stderr()
    );
    let expired = c.join_token(&["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let mut late = net.join_in(1, &home_b, &expired, "b", &[]);
    let status = late.wait_exit(Duration::from_secs(60)).expect("it exits");
    assert!(!status.success());
    assert!(late.stderr().contains("has expired"), "{}", late.stderr());
    assert_eq!(c.listed(&["hive", "list"]).len(), 1);

    // Found on the LAN: the token names no address.
    let lan = c.join_token(&["--no-addresses"]);
    assert!(!lan.contains('@'), "{lan}");
    let mut b = net.join_in(1, &home_b, &lan, "b", &["--max-memory", "2GiB"]);
    wait_until("b to join", Duration::from_secs(60), || {
        let hives = c.listed(&["hive", "list"]);
        hives
            .iter()
            .any(|h| h["name"] == "b" && h["status"] == "reachable")
            || b.stderr().contains("error")
    });
    let hives = c.listed(&["hive", "list"]);
    let (a_listed, b_listed) = (hive(&hives, "a"), hive(&hives, "b"));
    assert_eq!(a_listed["found"], "token");
    assert_eq!(b_listed["found"], "mdns");
    assert_eq!(a_listed["url"], format!("https://{}:8080", net.host(0)));
    assert_eq!(b_listed["url"], format!("https://{}:8080", net.host(1)));
    let (code, table, err) = c.keeper(&["hive", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("joined (mDNS)"), "{table}");

    // Everything that crosses the bridge during two jobs is captured.
    let dir = TempDir::new("join-capture");
    let Some(capture) = Capture::start(&net.bridge_name(), &dir) else {
        return;
    };
    let prompt = "Tell me about the violet harbour of Quillamoor";
    let mut answers = Vec::new();
    for node in ["a", "b"] {
        let (code, out, err) = c.keeper(&crate::chain::infer_args(node, &model, prompt));
        assert_eq!(code, 0, "{node}: {err}");
        assert!(out.trim().len() >= 8, "{node}: {out:?}");
        answers.push(out.trim().to_string());
    }
    // A plain request from this machine is answered in clear: what the
    // capture would show of anything sent without TLS.
    let plain = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .arg(format!("http://{}:8080/v1/models", net.host(0)))
        .output()
        .expect("curl runs");
    let plain = String::from_utf8_lossy(&plain.stdout).to_string();
    assert!(plain.contains("over https://"), "{plain}");
    let wire = capture.finish();
    assert!(
        contains(&wire, "over https://"),
        "the capture sees plain text"
    );
    assert!(
        !contains(&wire, "violet harbour"),
        "the prompt crossed in clear"
    );
    for answer in &answers {
        assert!(
            !contains(&wire, answer),
            "an answer crossed in clear: {answer}"
        );
    }
    let secret = lan
        .trim_start_matches("rbee1:")
        .split(':')
        .nth(1)
        .unwrap_or("-");
    for secret in ["s3cret-queen-token", secret, "Bearer"] {
        assert!(!contains(&wire, secret), "{secret} crossed in clear");
    }

    // Certificates other than the pinned ones are refused, both ways: the
    // queen told to expect a's certificate where b answers, …
    let a_fp = a_listed["fingerprint"]
        .as_str()
        .expect("a is pinned")
        .to_string();
    let b_url = format!("https://{}:8080", net.host(1));
    let (code, _, err) = c.keeper(&[
        "hive",
        "add",
        "fake",
        "--url",
        &b_url,
        "--fingerprint",
        &a_fp,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("presents") && err.contains(&a_fp), "{err}");
    // … and a hive shown a certificate it has not pinned (b's, a member of
    // the cluster but not a's queen), or none, by a client from this machine.
    let a_models = format!("https://{}:8080/v1/models", net.host(0));
    assert_eq!(stranger(&a_models, Some(home_b.path())), "401");
    assert_eq!(stranger(&a_models, None), "401");

    // Removed, b is refused when it comes back without a new token …
    let (code, _, err) = c.keeper(&["hive", "remove", "b"]);
    assert_eq!(code, 0, "{err}");
    b.signal("TERM");
    b.wait_exit(Duration::from_secs(20)).expect("b stops");
    let mut back = net.join_in(1, &home_b, &lan, "b", &[]);
    let status = back.wait_exit(Duration::from_secs(60)).expect("it exits");
    assert!(!status.success());
    let said = back.stderr();
    assert!(
        said.contains("not part of the cluster") && said.contains("has been used"),
        "{said}"
    );
    assert!(c.listed(&["hive", "list"]).iter().all(|h| h["name"] != "b"));
    // … and joins again with one.
    let fresh = c.join_token(&[]);
    let _b = net.join_in(1, &home_b, &fresh, "b", &["--max-memory", "2GiB"]);
    wait_until("b to join again", Duration::from_secs(60), || {
        let hives = c.listed(&["hive", "list"]);
        hives
            .iter()
            .any(|h| h["name"] == "b" && h["status"] == "reachable")
    });
}
