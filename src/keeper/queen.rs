//! Talking to the queen: calls with the token, and waking a queen that is
//! asleep (a detached `rbee queen` that reports when it is ready, or why not).

use super::config::Config;
use crate::http::client;
use crate::process::{self, Lifetime};
use crate::protocol::{Health, JobCancelled};
use hyper::Method;
use std::time::Duration;

/// How long a woken queen may take to report ready: it binds and opens its registry.
const WAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a queen may take to answer `/health`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a queen may take to stop, its local hive and workers first.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// The queen this keeper talks to, and how it reports to the person.
pub struct Queen {
    /// Base URL, no trailing slash.
    pub url: String,
    pub token: Option<String>,
    /// Nothing on stderr but a final error (`infer -q`).
    pub quiet: bool,
}

impl Queen {
    /// A line of narration on stderr, unless quiet.
    pub fn say(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Whether a queen answers `/health` (within [`HEALTH_TIMEOUT`]: a host
    /// that drops packets must not hang the keeper).
    pub async fn alive(&self) -> bool {
        matches!(self.answers().await, Ok(true))
    }

    /// [`Queen::alive`], or the error of a queen that answers with a
    /// certificate other than the one pinned.
    async fn answers(&self) -> Result<bool, String> {
        let url = self.url("/health");
        let health = tokio::time::timeout(HEALTH_TIMEOUT, client::get::<Health>(&url, None)).await;
        match health {
            Ok(Ok(h)) => Ok(h.role == "queen"),
            Ok(Err(e)) if e.message.contains("not the one pinned") => {
                Err(explain(e.to_string(), &self.url))
            }
            _ => Ok(false),
        }
    }

    /// One JSON call; the error is the queen's message.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, String> {
        client::call(method, &self.url(path), self.token.as_deref(), body)
            .await
            .map_err(|e| match e.code {
                crate::protocol::ErrorCode::Unauthorized if self.token.is_none() => format!(
                    "{e} (this keeper has no token for the queen: give it with --token-file, \
                     RBEE_TOKEN or `rbee keeper config set token-file FILE`)"
                ),
                _ => explain(e.to_string(), &self.url),
            })
    }

    /// The queen answers, or the error says none runs and how to start one
    /// (for commands that only look: they never start a queen).
    pub async fn require(&self) -> Result<(), String> {
        if self.answers().await? {
            return Ok(());
        }
        Err(format!(
            "no queen running at {} (start one with `rbee keeper queen start`)",
            self.url
        ))
    }

    /// The queen, woken if asleep; true if this call started it.
    pub async fn wake(&self) -> Result<bool, String> {
        if self.answers().await? {
            return Ok(false);
        }
        let port = wakeable_port(&self.url)?;
        self.say("queen is asleep, waking queen");
        let data_dir = crate::data_dir(None);
        crate::create_data_dir(&data_dir)?;
        let log = data_dir.join("queen.log");
        let mut command = process::own_command("queen").map_err(|e| e.message)?;
        command.args(["--port", &port.to_string()]);
        // The queen this keeper wakes asks for the token the keeper holds
        // (from --token-file, RBEE_TOKEN or the config file alike).
        if let Some(token) = &self.token {
            command.env("RBEE_TOKEN", token);
        }
        // The queen outlives this call, so the next one is warm; its Child is
        // dropped here and the queen left to init.
        process::start_daemon(command, "the queen", &log, Lifetime::Detached, WAKE_TIMEOUT)
            .await
            .map_err(|e| e.message)?;
        self.say(&format!(
            "queen is up at {} (log: {})",
            self.url,
            log.display()
        ));
        Ok(true)
    }

    /// Asks the queen to stop and waits until it no longer answers.
    pub async fn stop(&self) -> Result<(), String> {
        if !self.alive().await {
            return Ok(());
        }
        let _: Health = self
            .call(Method::POST, "/v1/admin/shutdown", None::<&()>)
            .await?;
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while self.alive().await {
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the queen did not stop within {}s",
                    STOP_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Cancels a job; a queen that does not answer has no job to cancel.
    pub async fn cancel(&self, job_id: &str) {
        let path = format!("/v1/jobs/{job_id}");
        let _: Result<JobCancelled, _> = self.call(Method::DELETE, &path, None::<&()>).await;
    }
}

/// Sets up TLS for a queen reached over `https://`: the fingerprint pinned
/// for it in the config file, else (the first time) the one it presents,
/// shown and pinned there. A queen that later presents another is refused
/// by the TLS handshake ([`explain`] says what to do).
pub async fn trust(url: &str, config: &mut Config, path: &std::path::Path) -> Result<(), String> {
    if !crate::http::tls::is_tls_url(url) {
        return Ok(());
    }
    let authority = authority(url);
    let pinned = match config.queen_pins.get(&authority) {
        Some(fp) => fp.clone(),
        None => {
            // A queen that does not answer pins nothing: a command that needs
            // it says it is not answering, one that does not (config) runs.
            let Ok(seen) = client::probe_identity(url).await else {
                let nobody = crate::http::tls::Pins::default();
                return crate::http::tls::install(None, nobody).map(|_| ());
            };
            config.queen_pins.insert(authority, seen.clone());
            config.save(path)?;
            eprintln!(
                "the queen at {url} presents {seen}: pinned in {} (compare with \
                 `rbee queen --show-identity` on its machine)",
                path.display()
            );
            seen
        }
    };
    crate::http::tls::install(None, crate::http::tls::Pins::new([pinned])).map(|_| ())
}

/// An error from a queen whose certificate is not the pinned one, with what to do.
pub fn explain(e: String, url: &str) -> String {
    if !e.contains("not the one pinned") {
        return e;
    }
    format!(
        "{e}. The queen at {url} is not the one this keeper pinned: if its identity changed on \
         purpose, remove its line under [queen_pins] in {} and run again",
        super::config::path().display()
    )
}

fn authority(url: &str) -> String {
    url.parse::<hyper::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()))
        .unwrap_or_default()
}

/// The port to start a queen on for `url`: only a queen on this machine can be
/// woken, so any other host is an error.
fn wakeable_port(url: &str) -> Result<u16, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("bad queen URL {url}: {e}"))?;
    let host = uri.host().unwrap_or("127.0.0.1");
    // A woken queen listens on 127.0.0.1, its default.
    let loopback = host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!("the queen at {url} is not answering"));
    }
    Ok(uri.port_u16().unwrap_or(8500))
}

/// The port a queen's address without one means.
const DEFAULT_QUEEN_PORT: u16 = 8500;

/// A queen's address as people write it (`OLLAMA_HOST`'s habits included):
/// `http://mac:8500`, `mac:8500`, `127.0.0.1`, `[::1]:8500`; no port is
/// 8500's, no trailing slash. A queen on this machine is reached over
/// `http://`, any other over `https://` (whichever was written: the token
/// and the prompts never cross a network in clear). Anything else is
/// refused saying what was wrong.
pub fn queen_url(given: &str) -> Result<String, String> {
    let url = given.trim().trim_end_matches('/');
    let rest = match url.split_once("://") {
        Some((scheme, rest))
            if ["http", "https"].contains(&scheme.to_ascii_lowercase().as_str()) =>
        {
            rest
        }
        Some((scheme, _)) => {
            return Err(format!(
                "queen URL {given:?}: the queen speaks https:// (http:// on this machine), not \
                 {scheme}://"
            ))
        }
        None => url,
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // The OpenAI base URL (`http://mac:8500/v1`) names the same queen.
    let path = match path.trim_end_matches('/') {
        "" | "/v1" => "",
        other => {
            return Err(format!(
                "queen URL {given:?}: a queen is named by its address alone, not a path ({other})"
            ))
        }
    };
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{}", DEFAULT_QUEEN_PORT)
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority.as_str(), |(h, _)| h)
        .trim_matches(['[', ']']);
    let here = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let scheme = if here { "http" } else { "https" };
    let url = format!("{scheme}://{authority}{path}");
    match url.parse::<hyper::Uri>() {
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) && uri.port_u16().is_some() => Ok(url),
        _ => Err(format!(
            "queen URL {given:?} is not an address: write it as http://HOST:PORT (or HOST:PORT)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_queen_on_this_machine_is_woken() {
        assert_eq!(wakeable_port("http://127.0.0.1:9000"), Ok(9000));
        assert_eq!(wakeable_port("http://localhost"), Ok(8500));
        let remote = wakeable_port("http://mac.home.arpa:8500").unwrap_err();
        assert_eq!(
            remote,
            "the queen at http://mac.home.arpa:8500 is not answering"
        );
        assert!(wakeable_port("not a url").is_err());
    }

    #[test]
    fn a_queen_url_is_read_as_people_write_it() {
        for (given, url) in [
            ("http://mac:8500", "https://mac:8500"),
            ("https://mac:8500/", "https://mac:8500"),
            ("127.0.0.1:8500", "http://127.0.0.1:8500"),
            ("127.0.0.1", "http://127.0.0.1:8500"),
            ("localhost:9", "http://localhost:9"),
            ("mac.lan", "https://mac.lan:8500"),
            ("HTTP://mac:9", "https://mac:9"),
            ("[::1]:8500", "http://[::1]:8500"),
            ("[::1]", "http://[::1]:8500"),
            ("[fd00::1]:1", "https://[fd00::1]:1"),
            (" mac:1 ", "https://mac:1"),
            ("http://127.0.0.1:8500/v1", "http://127.0.0.1:8500"),
            ("mac:8500/v1/", "https://mac:8500"),
            ("10.0.0.5", "https://10.0.0.5:8500"),
        ] {
            assert_eq!(queen_url(given).as_deref(), Ok(url), "{given}");
        }
        for bad in ["ftp://x", "", "http://", "mac:port", "a b:1", "mac:1/api"] {
            assert!(queen_url(bad).is_err(), "{bad:?}");
        }
    }
}
