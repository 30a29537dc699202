//! Machines joining (issue 28): join tokens, a hive proving one, and a
//! joined hive checking in when it restarts.
//!
//! `rbee keeper join-token` makes a token ([`JoinTokens::make`]): the queen
//! keeps only the SHA-256 of its secret, with an expiry and a number of uses,
//! in a [`Store`] of its own (`queen-join-tokens`). `rbee hive --join` comes
//! over TLS with its own certificate and the secret (`POST /v1/join`); the
//! queen finds an address it can reach the hive at (the one the hive's
//! connection came from first, then those the hive names), checks that the
//! certificate there is the one the hive showed, spends a use of the token,
//! and registers the hive with its certificate pinned. From then on the hive
//! restarts with no token: it checks in (`POST /v1/hives/checkin`) with the
//! same certificate, which is refused once `hive remove` forgot it.

use super::registry::{HiveConn, Registry};
use super::Queen;
use crate::http::{self, Reply};
use crate::join_token::JoinToken;
use crate::protocol::{ApiError, ErrorCode, JoinTokenRequest};
use crate::store::Store;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::path::Path;

/// How long a token may be used when nobody says (`--expires`).
const DEFAULT_EXPIRY_S: u64 = 3600;
/// How long a spent or expired token is remembered, so its refusal can say
/// which it was.
const REMEMBER_S: u64 = 7 * 24 * 3600;

/// A token as the store keeps it, under the hash of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Unix seconds.
    expires: u64,
    uses_left: u32,
}

/// The join tokens, in a store opened at the first token made or used.
#[derive(Clone)]
pub struct JoinTokens {
    store: crate::store::Lazy,
}

impl JoinTokens {
    pub fn open(data_dir: &Path) -> Result<JoinTokens, String> {
        let path = data_dir.join("queen-join-tokens");
        let recovery = format!(
            "Move it away (mv {0} {0}.damaged; mv {0}.check {0}.check.damaged) and start the \
             queen again; tokens not yet used must be made again",
            path.display()
        );
        let store = crate::store::Lazy::open(&path, "join tokens", "queen", &recovery)?;
        Ok(JoinTokens { store })
    }

    fn store(&self) -> Result<&Store, ApiError> {
        self.store.get().map_err(ApiError::internal)
    }

    /// A new token for `req`, naming the queen by `fingerprint` and `addresses`.
    pub fn make(
        &self,
        req: &JoinTokenRequest,
        fingerprint: &str,
        addresses: Vec<String>,
    ) -> Result<(JoinToken, u64, u32), ApiError> {
        let uses = req.uses.unwrap_or(1);
        if uses == 0 {
            return Err(ApiError::invalid("uses", "a token needs at least one use"));
        }
        if req.expires_s == Some(0) {
            return Err(ApiError::invalid(
                "expires",
                "a token needs at least a second to be used in",
            ));
        }
        let expires = crate::protocol::unix_now() + req.expires_s.unwrap_or(DEFAULT_EXPIRY_S);
        let mut bytes = [0u8; 16];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| ApiError::internal("no randomness for a secret"))?;
        let secret = crate::disk::hex(&bytes);
        let store = self.store()?;
        prune(store);
        let record = Record {
            expires,
            uses_left: uses,
        };
        store
            .put(&hash(&secret), &record)
            .map_err(ApiError::internal)?;
        let token = JoinToken {
            fingerprint: fingerprint.to_string(),
            secret,
            addresses,
        };
        Ok((token, expires, uses))
    }

    /// Whether `secret` may join now; [`JoinTokens::spend`] takes the use.
    pub fn check(&self, secret: &str) -> Result<(), ApiError> {
        self.usable(secret).map(|_| ())
    }

    /// Takes one use of the token whose secret is `secret`.
    pub fn spend(&self, secret: &str) -> Result<(), ApiError> {
        let mut record = self.usable(secret)?;
        record.uses_left -= 1;
        let store = self.store()?;
        store
            .put(&hash(secret), &record)
            .map_err(ApiError::internal)
    }

    fn usable(&self, secret: &str) -> Result<Record, ApiError> {
        let refused = |why: &str| {
            ApiError::new(
                ErrorCode::Unauthorized,
                format!(
                    "this join token {why}: make a new one with `rbee keeper join-token` on the \
                     queen's machine"
                ),
            )
        };
        let record: Record = self
            .store()?
            .get(&hash(secret))
            .ok_or_else(|| refused("is not one this queen made"))?;
        if crate::protocol::unix_now() >= record.expires {
            return Err(refused("has expired"));
        }
        if record.uses_left == 0 {
            return Err(refused("has been used"));
        }
        Ok(record)
    }
}

/// Forgets tokens past their expiry by more than [`REMEMBER_S`].
fn prune(store: &Store) {
    let now = crate::protocol::unix_now();
    for key in store.keys() {
        let old = store
            .get::<Record>(&key)
            .is_some_and(|r| r.expires + REMEMBER_S < now);
        if old {
            let _ = store.remove::<Record>(&key);
        }
    }
}

/// The addresses a queen listening on `host:port` puts in its tokens: the
/// address it is bound to, or, bound to every address, this machine's
/// addresses beyond loopback. Empty when it listens on loopback alone.
pub fn reachable_addresses(host: &str, port: u16) -> Vec<String> {
    let authority = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => crate::machine::addresses()
            .into_iter()
            .filter(|a| ip.is_ipv6() || a.is_ipv4())
            .map(authority)
            .collect(),
        Ok(ip) if ip.is_loopback() => Vec::new(),
        Ok(ip) => vec![authority(ip)],
        Err(_) if host == "localhost" => Vec::new(),
        Err(_) => vec![format!("{host}:{port}")],
    }
}

/// The URLs a hive listening on `port` may be reached at: the address its
/// connection came from first, then those it names; each once.
pub fn candidates(from: Option<IpAddr>, named: &[String], port: u16) -> Vec<String> {
    let mut urls = Vec::new();
    let named = named
        .iter()
        .filter_map(|a| a.trim().trim_matches(['[', ']']).parse::<IpAddr>().ok());
    for ip in from.into_iter().map(|ip| ip.to_canonical()).chain(named) {
        if ip.is_loopback() || ip.is_unspecified() {
            continue;
        }
        let url = match ip {
            IpAddr::V4(v4) => format!("https://{v4}:{port}"),
            IpAddr::V6(v6) => format!("https://[{v6}]:{port}"),
        };
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    urls
}

/// The first of `urls` where the certificate `fingerprint` answers.
pub async fn reach(urls: &[String], fingerprint: &str) -> Result<String, ApiError> {
    let mut tried = Vec::new();
    for url in urls {
        match crate::http::client::probe_identity(url).await {
            Ok(seen) if seen == fingerprint => return Ok(url.clone()),
            Ok(seen) => tried.push(format!("{url} presents {seen}")),
            Err(e) => tried.push(e.message),
        }
    }
    Err(ApiError::new(
        ErrorCode::HiveUnreachable,
        format!(
            "the queen cannot reach this hive with its certificate at any of its addresses ({}); \
             name the one to use with --advertise-host, or open its port",
            if tried.is_empty() {
                "none given".to_string()
            } else {
                tried.join("; ")
            }
        ),
    ))
}

/// Registers a hive that proved a join token or checked in: at the first
/// address where its certificate answers.
pub async fn register(
    registry: &Registry,
    name: &str,
    fingerprint: &str,
    urls: &[String],
    found: &str,
) -> Result<HiveConn, ApiError> {
    let url = reach(urls, fingerprint).await?;
    registry.register(HiveConn {
        name: name.to_string(),
        url,
        token: None,
        fingerprint: Some(fingerprint.to_string()),
        found: found.to_string(),
    })
}

/// `POST /v1/join-tokens`: a token for `rbee keeper join-token`.
pub(super) async fn add_token(q: &Queen, req: Request<Incoming>) -> Reply {
    let body: crate::protocol::JoinTokenRequest = http::read_json(req).await?;
    let reachable = reachable_addresses(&q.listen.0, q.listen.1);
    if reachable.is_empty() {
        return Err(ApiError::invalid(
            "addresses",
            format!(
                "this queen listens on {} only, which no other machine reaches: start it with \
                 --host 0.0.0.0 (and a token)",
                q.listen.0
            ),
        ));
    }
    // Without addresses, the hive finds the queen on the LAN (where it announces itself).
    let addresses = if body.no_addresses {
        Vec::new()
    } else {
        reachable
    };
    let (token, expires, uses) = q.join_tokens.make(&body, &q.fingerprint, addresses)?;
    tracing::info!("join token made ({uses} uses)");
    let expires_at = crate::protocol::rfc3339_at(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires),
    );
    Ok(http::json(
        StatusCode::CREATED,
        &crate::protocol::JoinToken {
            token: token.encode(),
            expires_at,
            uses,
        },
    ))
}

/// The certificate a joining or checking-in hive showed, and where its
/// connection came from: joining is over TLS with a certificate, or not at all.
fn hive_cert(req: &Request<Incoming>) -> Result<(String, Option<std::net::IpAddr>), ApiError> {
    let cert = req
        .extensions()
        .get::<http::tls::PeerCert>()
        .map(|c| c.0.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "a hive joins over TLS, showing its certificate (rbee hive --join TOKEN)",
            )
        })?;
    let from = req.extensions().get::<http::Peer>().map(|p| p.0.ip());
    Ok((cert, from))
}

/// `POST /v1/join`: a hive proving a token.
pub(super) async fn join(q: &Queen, req: Request<Incoming>) -> Reply {
    let (cert, from) = hive_cert(&req)?;
    let body: crate::protocol::JoinRequest = http::read_json(req).await?;
    q.join_tokens.check(&body.secret)?;
    let found = if body.found == "mdns" {
        "mdns"
    } else {
        "token"
    };
    let urls = candidates(from, &body.addresses, body.port);
    // Reachable first, then the token's use taken: a hive the queen cannot
    // reach keeps its token for another try.
    reach(&urls, &cert).await?;
    q.join_tokens.spend(&body.secret)?;
    let conn = register(&q.registry, &body.name, &cert, &urls, found).await?;
    tracing::info!("hive {} joined at {} ({cert})", conn.name, conn.url);
    q.cluster.retrack().await;
    Ok(http::json(
        StatusCode::CREATED,
        &crate::protocol::Joined {
            name: conn.name,
            url: conn.url,
        },
    ))
}

/// `POST /v1/hives/checkin`: a joined hive saying where it is now.
pub(super) async fn check_in(q: &Queen, req: Request<Incoming>) -> Reply {
    let (cert, from) = hive_cert(&req)?;
    let body: crate::protocol::CheckIn = http::read_json(req).await?;
    let Some(known) = q.registry.by_fingerprint(&cert) else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this hive is not part of the cluster (removed with `rbee keeper hive remove`, or \
             never joined): join it again with a token from `rbee keeper join-token`",
        ));
    };
    let mut urls = candidates(from, &body.addresses, body.port);
    // Where it was stays first when it is still there.
    if let Some(i) = urls.iter().position(|u| *u == known.url) {
        urls.swap(0, i);
    }
    let conn = register(&q.registry, &known.name, &cert, &urls, &known.found).await?;
    if conn.url != known.url {
        tracing::info!("hive {} is now at {}", conn.name, conn.url);
        q.cluster.retrack().await;
    }
    Ok(http::json(
        StatusCode::OK,
        &crate::protocol::Joined {
            name: conn.name,
            url: conn.url,
        },
    ))
}

fn hash(secret: &str) -> String {
    crate::disk::hex(&Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(label: &str) -> (JoinTokens, std::path::PathBuf) {
        let d = std::env::temp_dir().join(format!("rbee-join-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        (JoinTokens::open(&d).unwrap(), d)
    }

    #[test]
    fn a_token_is_spent_by_its_uses_and_refused_after_saying_why() {
        let (t, d) = tokens("spent");
        let req = JoinTokenRequest {
            uses: Some(2),
            ..JoinTokenRequest::default()
        };
        let (token, _, uses) = t.make(&req, "sha256:ab", vec![]).unwrap();
        assert_eq!(uses, 2);
        for _ in 0..2 {
            t.check(&token.secret).unwrap();
            t.spend(&token.secret).unwrap();
        }
        let e = t.check(&token.secret).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(e.message.contains("has been used"), "{e}");
        let e = t.check(&"0".repeat(32)).unwrap_err();
        assert!(e.message.contains("not one this queen made"), "{e}");
        let expired = JoinTokenRequest {
            expires_s: Some(1),
            ..JoinTokenRequest::default()
        };
        let (token, _, _) = t.make(&expired, "sha256:ab", vec![]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let e = t.spend(&token.secret).unwrap_err();
        assert!(e.message.contains("has expired"), "{e}");
        let now = JoinTokenRequest {
            expires_s: Some(0),
            ..JoinTokenRequest::default()
        };
        assert!(t.make(&now, "sha256:ab", vec![]).is_err());
        let zero = JoinTokenRequest {
            uses: Some(0),
            ..JoinTokenRequest::default()
        };
        assert!(t.make(&zero, "sha256:ab", vec![]).is_err());
        // Only the secret's hash is on disk.
        drop(t);
        let on_disk = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap_or_default())
            .any(|bytes| {
                bytes
                    .windows(token.secret.len())
                    .any(|w| w == token.secret.as_bytes())
            });
        assert!(!on_disk);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_hive_is_tried_first_where_its_connection_came_from() {
        let from = Some("10.0.0.7".parse().unwrap());
        let named = vec![
            "10.0.0.7".to_string(),
            "192.168.1.4".to_string(),
            "127.0.0.1".to_string(),
            "[fd00::4]".to_string(),
            "nonsense".to_string(),
        ];
        assert_eq!(
            candidates(from, &named, 8080),
            vec![
                "https://10.0.0.7:8080",
                "https://192.168.1.4:8080",
                "https://[fd00::4]:8080"
            ]
        );
        assert!(reachable_addresses("127.0.0.1", 8500).is_empty());
        assert_eq!(reachable_addresses("10.1.2.3", 8500), vec!["10.1.2.3:8500"]);
        assert!(reachable_addresses("0.0.0.0", 8500)
            .iter()
            .all(|a| !a.starts_with("127.") && a.ends_with(":8500")));
    }
}
