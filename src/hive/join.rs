//! A hive joining a queen (`rbee hive --join TOKEN`) and, once joined,
//! checking in with it on every start (issue 28; the queen's side is
//! `queen/join.rs`).
//!
//! What a joined hive knows is kept in its data dir (`hive-queen.json`): the
//! queen's certificate fingerprint, which it pins, and where the queen
//! answered. So it restarts with no token, and a service that runs
//! `rbee hive --join TOKEN` finds itself joined already and checks in.

use crate::http::client;
use crate::join_token::JoinToken;
use crate::protocol::{ApiError, CheckIn, ErrorCode, JoinRequest, Joined};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file a joined hive keeps its queen in.
const QUEEN_FILE: &str = "hive-queen.json";
/// How long a hive listens for queens on the LAN (mDNS).
const BROWSE: Duration = Duration::from_secs(3);
/// How often a joined hive tries again to reach a queen that did not answer.
const RETRY: Duration = Duration::from_secs(30);

/// The queen this hive joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinedQueen {
    pub fingerprint: String,
    /// Where it answered last (`https://host:port`).
    pub url: String,
    /// The name the queen knows this hive by.
    pub name: String,
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(QUEEN_FILE)
}

/// The queen this hive joined, if it joined one.
pub fn joined(data_dir: &Path) -> Result<Option<JoinedQueen>, String> {
    match std::fs::read(path(data_dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "{} is damaged ({e}): join again with a new token",
                path(data_dir).display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path(data_dir).display())),
    }
}

fn remember(data_dir: &Path, queen: &JoinedQueen) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(queen).map_err(|e| e.to_string())?;
    let (file, part) = (path(data_dir), data_dir.join(format!("{QUEEN_FILE}.part")));
    std::fs::write(&part, bytes)
        .and_then(|()| std::fs::rename(&part, &file))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

/// What this hive tells the queen about where it listens.
#[derive(Debug, Clone)]
pub struct Here {
    pub port: u16,
    /// `--advertise-host` first, then this machine's addresses beyond loopback.
    pub addresses: Vec<String>,
}

/// A hive's part in its cluster at start: checking in with the queen it
/// joined (the same queen the token names, if one is given), joining anew
/// with the token when it has none or was removed, under `name` (else its
/// old name, else this machine's).
pub async fn take_part(
    data_dir: &Path,
    token: Option<JoinToken>,
    joined: Option<JoinedQueen>,
    name: Option<String>,
    here: &Here,
) -> Result<(), String> {
    let same_queen = |j: &JoinedQueen| {
        token
            .as_ref()
            .is_none_or(|t| t.fingerprint == j.fingerprint)
    };
    match (joined.filter(same_queen), token) {
        (Some(queen), token) => {
            let again = name.unwrap_or_else(|| queen.name.clone());
            match (check_in(data_dir, queen, here).await, token) {
                // Removed, and given a new token: it joins anew.
                (Err(refused), Some(token)) => {
                    tracing::warn!("{refused}; joining with the token given");
                    join(data_dir, &token, &again, here).await.map(|_| ())
                }
                (outcome, _) => outcome,
            }
        }
        (None, Some(token)) => {
            let name = name.unwrap_or_else(crate::machine::hostname);
            join(data_dir, &token, &name, here).await.map(|_| ())
        }
        (None, None) => Ok(()),
    }
}

/// Joins the queen `token` names: at its addresses, else at queens found on
/// the LAN with its fingerprint. The name taken, and the queen.
pub async fn join(
    data_dir: &Path,
    token: &JoinToken,
    name: &str,
    here: &Here,
) -> Result<JoinedQueen, String> {
    let request = |found: &str| JoinRequest {
        secret: token.secret.clone(),
        name: name.to_string(),
        port: here.port,
        addresses: here.addresses.clone(),
        found: found.to_string(),
    };
    let at_token: Vec<String> = token
        .addresses
        .iter()
        .map(|a| format!("https://{a}"))
        .collect();
    let mut silent = Vec::new();
    for found in ["token", "mdns"] {
        let urls = match found {
            "mdns" => {
                tracing::info!("looking for the queen on the LAN (mDNS)");
                lan_queens(&token.fingerprint).await
            }
            _ => at_token.clone(),
        };
        // The addresses are tried at once: a token names every address of the
        // queen's machine, some of which (a VPN's, a container bridge's) drop
        // packets for seconds.
        let (answering, mut failed) = first_answering(&urls).await;
        silent.append(&mut failed);
        let Some(url) = answering else { continue };
        let body = request(found);
        match client::post::<Joined>(&format!("{url}/v1/join"), None, &body).await {
            Ok(joined) => {
                let queen = JoinedQueen {
                    fingerprint: token.fingerprint.clone(),
                    url,
                    name: joined.name,
                };
                remember(data_dir, &queen)?;
                tracing::info!(
                    "joined the queen at {} as hive {} (the queen reaches it at {})",
                    queen.url,
                    queen.name,
                    joined.url
                );
                return Ok(queen);
            }
            Err(e) if e.code == ErrorCode::Unreachable => silent.push(e.message),
            Err(e) => return Err(refused(&url, &e)),
        }
    }
    if let Some(other) = silent.iter().find(|e| e.contains("not the one pinned")) {
        return Err(format!(
            "a queen answered with another certificate than the token's {} ({other}): the token \
             is another queen's, or mistyped",
            token.fingerprint
        ));
    }
    Err(format!(
        "no queen with the token's certificate {} answered ({}); is this machine on the queen's \
         network, and does the queen listen beyond its own machine (--host 0.0.0.0)?",
        token.fingerprint,
        if silent.is_empty() {
            "none found on the LAN with it".to_string()
        } else {
            silent.join("; ")
        }
    ))
}

/// The first of `urls` where a queen with the pinned certificate answers,
/// all tried at once; and why each that was heard of before it failed.
async fn first_answering(urls: &[String]) -> (Option<String>, Vec<String>) {
    let mut tries = tokio::task::JoinSet::new();
    for url in urls {
        let url = url.clone();
        tries.spawn(async move {
            let at = format!("{url}/health");
            let health = client::get::<crate::protocol::Health>(&at, None).await;
            (health.map_err(|e| e.message), url)
        });
    }
    let mut failed = Vec::new();
    while let Some(Ok((health, url))) = tries.join_next().await {
        match health {
            Ok(_) => return (Some(url), failed),
            Err(e) => failed.push(e),
        }
    }
    (None, failed)
}

/// Tells the joined queen where this hive is now; a queen that does not
/// answer is tried again every [`RETRY`] (at its last address, then on the
/// LAN). A refusal (the hive was removed) is the error returned.
pub async fn check_in(data_dir: &Path, queen: JoinedQueen, here: &Here) -> Result<(), String> {
    let body = CheckIn {
        port: here.port,
        addresses: here.addresses.clone(),
    };
    let mut warned = false;
    loop {
        let mut urls = vec![queen.url.clone()];
        urls.extend(
            lan_queens(&queen.fingerprint)
                .await
                .into_iter()
                .filter(|u| *u != queen.url),
        );
        for url in urls {
            let at = format!("{url}/v1/hives/checkin");
            match client::post::<Joined>(&at, None, &body).await {
                Ok(joined) => {
                    if url != queen.url {
                        remember(
                            data_dir,
                            &JoinedQueen {
                                url: url.clone(),
                                ..queen.clone()
                            },
                        )?;
                    }
                    tracing::info!("checked in with the queen at {url} as hive {}", joined.name);
                    return Ok(());
                }
                Err(e) if e.code == ErrorCode::Unreachable => {}
                Err(e) => return Err(refused(&url, &e)),
            }
        }
        if !warned {
            tracing::warn!(
                "the queen at {} does not answer; trying again every {}s",
                queen.url,
                RETRY.as_secs()
            );
            warned = true;
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn refused(url: &str, e: &ApiError) -> String {
    format!("the queen at {url} refused this hive: {}", e.message)
}

/// Queens on the LAN with `fingerprint`, as URLs.
async fn lan_queens(fingerprint: &str) -> Vec<String> {
    let found = crate::discovery::browse(BROWSE).await;
    crate::discovery::matching(&found, fingerprint)
        .into_iter()
        .map(|addr| format!("https://{addr}"))
        .collect()
}
