//! The door every request passes before its handler (DESIGN.md §7): the
//! bearer token when one is set, else this machine's host names and no
//! cross-site page that was not allowed; CORS for the pages that are; and,
//! on the queen, the status page's session cookie (`session.rs`).

use super::{error, full, session, Body};
use crate::protocol::{ApiError, ErrorCode};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use std::net::IpAddr;

/// Who may come in (DESIGN.md §7): with a token, whoever presents it;
/// without one, requests whose `Host` is one of this machine's names (no DNS
/// rebinding) and, from a browser, whose `Origin` is this daemon itself, a
/// page on this machine, or one of `--allowed-origins` (no cross-site
/// requests). `/health` is always open.
#[derive(Clone, Default)]
pub struct Auth {
    token: Option<std::sync::Arc<str>>,
    /// Browser sessions, where this daemon has a page (the queen).
    sessions: Option<session::Sessions>,
    /// Client keys, where this daemon has them (the queen).
    keys: Option<std::sync::Arc<dyn KeyDoor>>,
    /// Certificates let in as the token is (a hive's queen, a worker's): a
    /// request over TLS whose client certificate is pinned here.
    peers: Option<super::tls::Pins>,
    /// Certificates let in at one path only (a lending hive's borrowers, at
    /// its `/v1/rpc` tunnels, while their leases live).
    tunnel_peers: Option<(super::tls::Pins, &'static str)>,
    /// Paths open at the door, whose handlers check who came themselves
    /// (a hive joining with a token's secret and its certificate).
    open: &'static [&'static str],
    doors: std::sync::Arc<Doors>,
}

/// What every client key starts with: a key is told from the token by it.
pub const KEY_PREFIX: &str = "rbee-key-";

/// Client keys (the queen's `keys.rs`): whether a key may make this request.
pub trait KeyDoor: Send + Sync {
    fn admit(&self, key: &str, method: &hyper::Method, path: &str) -> Result<Grant, ApiError>;
}

/// A request let in by a client key: the key's name (in the request's
/// extensions as [`KeyName`]), and its use, told the answer's status and
/// dropped when the answer has been sent, stream and all.
pub struct Grant {
    pub key: String,
    /// An admin key reaches what the token reaches; a use key its own jobs only.
    pub admin: bool,
    pub held: Box<dyn KeyUse>,
}

/// A key's request in flight.
pub trait KeyUse: Send + Sync {
    /// The handler answered with this status (the body may still be streaming).
    fn answered(&self, status: u16);
}

/// A request let in: the origin to name in its CORS headers, and a client
/// key's grant when it came with one.
pub type Admitted = (Option<HeaderValue>, Option<Grant>);

/// The client key a request came with (in its extensions).
#[derive(Debug, Clone)]
pub struct KeyName {
    pub name: String,
    pub admin: bool,
}

/// The client key `req` came with, if any.
pub fn key_of<B>(req: &Request<B>) -> Option<String> {
    req.extensions().get::<KeyName>().map(|k| k.name.clone())
}

/// The `use` key `req` came with, if any: one limited to its own jobs.
pub fn use_key_of<B>(req: &Request<B>) -> Option<String> {
    req.extensions()
        .get::<KeyName>()
        .filter(|k| !k.admin)
        .map(|k| k.name.clone())
}

/// The host names and origins let in without a token.
#[derive(Debug, Default)]
struct Doors {
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl Auth {
    /// The token from `--token-file`, else `RBEE_TOKEN`, else none.
    pub fn load(token_file: Option<&std::path::Path>) -> Result<Auth, String> {
        let token = match token_file {
            Some(path) => Some(crate::read_token_file(path)?),
            None => std::env::var("RBEE_TOKEN").ok(),
        };
        match token {
            Some(t) if t.is_empty() => Err("the token is empty".into()),
            Some(t) => Ok(Auth {
                token: Some(t.into()),
                ..Auth::default()
            }),
            None => Ok(Auth::default()),
        }
    }

    /// The same, for a daemon bound to `bind`: besides `localhost`, the
    /// loopback addresses, `bind` and this machine's name, it answers to the
    /// host names in `hosts` and lets in browser pages from `origins` (both
    /// comma-separated; `*` lets in every origin).
    pub fn with_doors(mut self, bind: &str, hosts: Option<&str>, origins: Option<&str>) -> Auth {
        let list = |s: Option<&str>| -> Vec<String> {
            s.unwrap_or_default()
                .split(',')
                .map(|h| h.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect()
        };
        let mut allowed = vec![
            "localhost".to_string(),
            bind.to_ascii_lowercase(),
            crate::machine::hostname().to_ascii_lowercase(),
        ];
        allowed.extend(list(hosts));
        self.doors = std::sync::Arc::new(Doors {
            hosts: allowed,
            origins: list(origins),
        });
        self
    }

    /// Lets browser sessions in at the page's doors (`session::SESSION_DOORS`).
    pub fn with_sessions(mut self) -> Auth {
        self.sessions = Some(session::Sessions::default());
        self
    }

    pub fn sessions(&self) -> Option<&session::Sessions> {
        self.sessions.as_ref()
    }

    /// Lets requests in with a client key too (when a token is set).
    pub fn with_keys(mut self, keys: std::sync::Arc<dyn KeyDoor>) -> Auth {
        self.keys = Some(keys);
        self
    }

    /// Lets requests to `path` in over TLS from a client pinned in `peers`.
    pub fn with_tunnel_peers(mut self, peers: super::tls::Pins, path: &'static str) -> Auth {
        self.tunnel_peers = Some((peers, path));
        self
    }

    /// Opens `paths` at the door: their handlers decide.
    pub fn with_open(mut self, paths: &'static [&'static str]) -> Auth {
        self.open = paths;
        self
    }

    /// Lets requests in over TLS from a client whose certificate is pinned in `peers`.
    pub fn with_peers(mut self, peers: super::tls::Pins) -> Auth {
        self.peers = Some(peers);
        self
    }

    /// Whether `given` is the token (in constant time); always, without one.
    pub fn is_token(&self, given: &str) -> bool {
        self.token
            .as_deref()
            .is_none_or(|t| constant_time_eq(given.as_bytes(), t.as_bytes()))
    }

    /// The token to present to other roles, if one is configured.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Refuses to serve beyond loopback without a token.
    pub fn check_bind(&self, host: &str) -> Result<(), String> {
        let loopback = host == "localhost"
            || host
                .parse::<IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
        if loopback || self.token.is_some() || self.peers.is_some() {
            Ok(())
        } else {
            Err(format!(
                "refusing to listen on {host} without a token: pass --token-file or set RBEE_TOKEN"
            ))
        }
    }

    /// Lets a request in, with the origin to name in its CORS headers (a
    /// browser page from another origin that is allowed) and, for a client
    /// key, its grant; else the answer that refuses it. A browser's
    /// preflight for an allowed origin is answered here.
    pub fn admit(&self, req: &Request<Incoming>) -> Result<Admitted, Box<Response<Body>>> {
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let (host, origin) = (header(hyper::header::HOST), header(hyper::header::ORIGIN));
        let cross = origin.filter(|o| !same_origin(o, host));
        let allowed_cross = cross.filter(|o| self.doors.origin_allowed(o));
        if req.method() == hyper::Method::OPTIONS && cross.is_some() {
            return Err(Box::new(match allowed_cross {
                Some(o) => preflight(o),
                None => error(refused_origin(cross.unwrap_or_default())),
            }));
        }
        let cors = allowed_cross.and_then(|o| HeaderValue::from_str(o).ok());
        let secure = req.extensions().get::<super::tls::Secure>().is_some();
        let from_here = req
            .extensions()
            .get::<super::Peer>()
            .is_none_or(|p| p.0.ip().is_loopback());
        if !secure && !from_here && super::tls::installed().is_some_and(|t| t.server.is_some()) {
            return Err(Box::new(error(ApiError::new(
                ErrorCode::Forbidden,
                "from another machine this daemon is reached over https:// (TLS): plain http:// \
                 is answered on this machine only",
            ))));
        }
        if req.uri().path() == "/health" || self.open.contains(&req.uri().path()) {
            return Ok((cors, None));
        }
        let pinned = |fp: &super::tls::PeerCert| {
            let anywhere = self.peers.as_ref().is_some_and(|p| p.contains(&fp.0));
            let here = self
                .tunnel_peers
                .as_ref()
                .is_some_and(|(p, at)| *at == req.uri().path() && p.contains(&fp.0));
            anywhere || here
        };
        if req
            .extensions()
            .get::<super::tls::PeerCert>()
            .is_some_and(pinned)
        {
            return Ok((cors, None));
        }
        if self.peers.is_some() && self.token.is_none() && !from_here {
            return Err(Box::new(error(ApiError::new(
                ErrorCode::Unauthorized,
                "from another machine this daemon answers its queen only: a client certificate \
                 it pinned (machines join with `rbee hive --join`)",
            ))));
        }
        let verdict = match self.token.as_deref() {
            Some(token) => self.credential(req, token),
            None => self
                .doors
                .check(host, cross, allowed_cross.is_some())
                .map(|()| None),
        };
        verdict
            .map(|grant| (cors, grant))
            .map_err(|e| Box::new(error(e)))
    }
}

impl Auth {
    /// With a token: what the request presents (the token, a client key, the
    /// status page's session cookie at its doors), or none at the login doors.
    fn credential(&self, req: &Request<Incoming>, token: &str) -> Result<Option<Grant>, ApiError> {
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let (method, path) = (req.method(), req.uri().path());
        if self.sessions.is_some() && session::is_door(session::LOGIN_DOORS, method, path) {
            return Ok(None);
        }
        let presented = presented(
            header(hyper::header::AUTHORIZATION),
            header(hyper::header::HeaderName::from_static("x-api-key")),
        );
        if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            return Ok(None);
        }
        match &self.keys {
            Some(keys) if presented.starts_with(KEY_PREFIX) => {
                keys.admit(presented, method, path).map(Some)
            }
            _ => {
                let page = session::is_door(session::SESSION_DOORS, method, path);
                let sessions = self.sessions.as_ref().filter(|_| page);
                match sessions {
                    Some(s) if s.admits(header(hyper::header::COOKIE)) => Ok(None),
                    _ => Err(ApiError::new(
                        ErrorCode::Unauthorized,
                        "missing or wrong bearer token",
                    )),
                }
            }
        }
    }
}

impl Doors {
    /// Without a token: the host must be one of ours, and a cross-origin page allowed.
    fn check(
        &self,
        host: Option<&str>,
        cross: Option<&str>,
        allowed: bool,
    ) -> Result<(), ApiError> {
        if let Some(host) = host.filter(|h| !self.host_allowed(h)) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "host {host:?} is not one of this machine's names; without a token only {} are \
                     answered (add names with --allowed-hosts)",
                    self.hosts.join(", ")
                ),
            ));
        }
        match cross {
            Some(origin) if !allowed => Err(refused_origin(origin)),
            _ => Ok(()),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || self.hosts.contains(&name)
    }

    /// A page on this machine (as Ollama lets in), or one of `--allowed-origins`.
    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        if self.origins.iter().any(|o| o == "*" || *o == origin) {
            return true;
        }
        let Some(rest) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        let name = strip_port(rest);
        name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// A page served by this daemon itself: its origin is the request's host.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    rest.zip(host)
        .is_some_and(|(r, h)| r.eq_ignore_ascii_case(h))
}

/// `name`, `name:port`, `[v6]:port` → the name or address alone.
fn strip_port(host: &str) -> &str {
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

fn refused_origin(origin: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "requests from web pages at {origin} are not allowed (allow it with --allowed-origins)"
        ),
    )
}

/// The token or key a request presents: `Authorization: Bearer <it>` (the
/// scheme in any case), else `x-api-key: <it>` (Anthropic's clients).
fn presented<'h>(authorization: Option<&'h str>, api_key: Option<&'h str>) -> &'h str {
    authorization
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .or(api_key.map(str::trim))
        .unwrap_or("")
}

/// The answer to a browser's preflight from an allowed origin.
fn preflight(origin: &str) -> Response<Body> {
    let mut resp = with_cors(
        Response::new(full(Bytes::new())),
        HeaderValue::from_str(origin).ok(),
    );
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, DELETE"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("600"));
    resp
}

/// A response a page from `origin` (another, allowed origin) may read.
pub(super) fn with_cors(mut resp: Response<Body>, origin: Option<HeaderValue>) -> Response<Body> {
    if let Some(origin) = origin {
        let h = resp.headers_mut();
        h.insert("access-control-allow-origin", origin);
        h.insert("vary", HeaderValue::from_static("origin"));
    }
    resp
}

/// Compares without returning early, so timing says nothing about the secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= usize::from(x ^ a.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secretx", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn binding_beyond_loopback_needs_a_token() {
        let none = Auth::default();
        assert!(none.check_bind("127.0.0.1").is_ok());
        assert!(none.check_bind("localhost").is_ok());
        assert!(none.check_bind("::1").is_ok());
        assert!(none.check_bind("0.0.0.0").is_err());
        let some = Auth {
            token: Some("t".into()),
            ..Auth::default()
        };
        assert!(some.check_bind("0.0.0.0").is_ok());
    }

    #[test]
    fn without_a_token_only_this_machines_names_are_answered() {
        let doors = Auth::default()
            .with_doors("127.0.0.1", Some("rbee.lan, Box.Local"), None)
            .doors;
        for host in [
            "localhost:8080",
            "127.0.0.1:8500",
            "127.0.0.2",
            "[::1]:8081",
            "rbee.lan",
            "box.local:80",
        ] {
            assert!(doors.check(Some(host), None, false).is_ok(), "{host}");
        }
        assert!(
            doors.check(None, None, false).is_ok(),
            "HTTP/1.0 sends no Host"
        );
        // DNS rebinding: a name that now points at 127.0.0.1.
        let e = doors
            .check(Some("attacker.example:8080"), None, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("--allowed-hosts"), "{e}");
        assert!(doors
            .check(Some("localhost.attacker.example"), None, false)
            .is_err());
    }

    #[test]
    fn cross_origin_pages_need_to_be_allowed() {
        let doors = Auth::default()
            .with_doors("127.0.0.1", None, Some("https://chat.example.com/"))
            .doors;
        assert!(doors.origin_allowed("https://chat.example.com"));
        assert!(
            doors.origin_allowed("http://localhost:3000"),
            "a page on this machine"
        );
        assert!(doors.origin_allowed("http://127.0.0.1:5173"));
        assert!(!doors.origin_allowed("https://evil.example"));
        assert!(!doors.origin_allowed("null"), "sandboxed pages and files");
        let e = doors
            .check(Some("localhost:8500"), Some("https://evil.example"), false)
            .unwrap_err();
        assert!(
            e.message.contains("https://evil.example") && e.message.contains("--allowed-origins"),
            "{e}"
        );
        assert!(
            same_origin("http://localhost:8500", Some("localhost:8500")),
            "the daemon's own page"
        );
        assert!(!same_origin(
            "http://localhost:8501",
            Some("localhost:8500")
        ));
        let all = Auth::default()
            .with_doors("127.0.0.1", None, Some("*"))
            .doors;
        assert!(all.origin_allowed("https://anything.example"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_x_api_key_is_read_too() {
        assert_eq!(presented(Some("Bearer s3cret"), None), "s3cret");
        assert_eq!(presented(Some("bearer s3cret"), None), "s3cret");
        assert_eq!(presented(Some("BEARER s3cret "), None), "s3cret");
        assert_eq!(presented(Some("Basic s3cret"), None), "");
        assert_eq!(presented(None, Some("rbee-key-1")), "rbee-key-1");
        assert_eq!(presented(Some("Bearer a"), Some("b")), "a");
        assert_eq!(presented(None, None), "");
    }

    #[test]
    fn ports_come_off_host_names_and_addresses() {
        assert_eq!(strip_port("localhost:8080"), "localhost");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("::1"), "::1");
    }
}
