//! Browser sessions for the queen's status page (DESIGN.md §7). A browser
//! cannot send the bearer token, so the page trades it once — or a one-time
//! code `rbee keeper status --web` got with the token — for a random session
//! id in an `HttpOnly`, `SameSite=Strict` cookie. The cookie opens only the
//! page's own doors ([`SESSION_DOORS`]); every other endpoint still wants the
//! token.

use hyper::Method;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The cookie's name.
pub const COOKIE: &str = "rbee_session";
/// How long a session lasts.
const SESSION_FOR: Duration = Duration::from_secs(12 * 3600);
/// How long a one-time code may wait to be used.
const CODE_FOR: Duration = Duration::from_secs(300);
/// At most this many live sessions (and codes): the oldest go first.
const MAX_LIVE: usize = 1024;

/// What a session cookie opens: the status page's data and its stream.
pub const SESSION_DOORS: &[(Method, &str)] = &[
    (Method::GET, "/v1/status"),
    (Method::GET, "/v1/status/stream"),
];

/// Doors open without the token when one is configured: the page itself
/// (static, holds no data) and the login, which checks the token itself.
pub const LOGIN_DOORS: &[(Method, &str)] = &[(Method::GET, "/"), (Method::POST, "/v1/session")];

/// Live session ids and unused codes, each with when it expires.
#[derive(Debug, Default, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<String, Instant>,
    codes: HashMap<String, Instant>,
    /// Status streams open per session.
    streams: HashMap<String, usize>,
    /// Wrong logins per address: how many in a row, and when the next is heard.
    failures: HashMap<std::net::IpAddr, (u32, Instant)>,
}

/// Status streams one session may hold open at once (a page needs one; a few
/// tabs, a few more). A cookie is view-only: it cannot hold a daemon's connections.
pub const STREAMS_PER_SESSION: usize = 4;
/// Wrong logins from one address that are answered at once; after them each
/// waits twice as long as the one before, up to [`MOST_BACKOFF`].
const FREE_FAILURES: u32 = 3;
const MOST_BACKOFF: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered (the oldest forgotten first).
const MAX_FAILING: usize = 4096;

/// A status stream's place in its session's share, given back when dropped.
#[derive(Debug)]
pub struct StreamPlace {
    sessions: Sessions,
    id: String,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut inner = self.sessions.lock();
        if let Some(n) = inner.streams.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                inner.streams.remove(&self.id);
            }
        }
    }
}

fn prune(map: &mut HashMap<String, Instant>) {
    let now = Instant::now();
    map.retain(|_, until| *until > now);
    while map.len() >= MAX_LIVE {
        let Some(oldest) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session: the `Set-Cookie` value that carries it.
    pub fn open(&self) -> String {
        let id = crate::protocol::new_secret();
        let mut inner = self.lock();
        prune(&mut inner.sessions);
        inner
            .sessions
            .insert(id.clone(), Instant::now() + SESSION_FOR);
        format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            SESSION_FOR.as_secs()
        )
    }

    /// A one-time code that opens a session once, within a few minutes.
    pub fn code(&self) -> String {
        let code = crate::protocol::new_secret();
        let mut inner = self.lock();
        prune(&mut inner.codes);
        inner.codes.insert(code.clone(), Instant::now() + CODE_FOR);
        code
    }

    /// Uses up a code: whether it was live.
    pub fn redeem(&self, code: &str) -> bool {
        let mut inner = self.lock();
        prune(&mut inner.codes);
        inner.codes.remove(code).is_some()
    }

    /// Whether a `Cookie` header carries a live session.
    pub fn admits(&self, cookie_header: Option<&str>) -> bool {
        let Some(id) = cookie_header.and_then(session_id) else {
            return false;
        };
        let mut inner = self.lock();
        prune(&mut inner.sessions);
        inner.sessions.contains_key(id)
    }
}

impl Sessions {
    /// A place for one more status stream of the session in `cookie_header`:
    /// `Ok(None)` when it carries no live session (the token opened the door),
    /// `TOO_MANY_REQUESTS` when the session holds [`STREAMS_PER_SESSION`] already.
    pub fn open_stream(
        &self,
        cookie_header: Option<&str>,
    ) -> Result<Option<StreamPlace>, crate::protocol::ApiError> {
        let Some(id) = cookie_header.and_then(session_id) else {
            return Ok(None);
        };
        let mut inner = self.lock();
        if !inner.sessions.contains_key(id) {
            return Ok(None);
        }
        let open = inner.streams.entry(id.to_string()).or_default();
        if *open >= STREAMS_PER_SESSION {
            return Err(crate::protocol::ApiError::new(
                crate::protocol::ErrorCode::TooManyRequests,
                format!(
                    "this session has {STREAMS_PER_SESSION} status streams open already; close \
                     one first"
                ),
            ));
        }
        *open += 1;
        Ok(Some(StreamPlace {
            sessions: self.clone(),
            id: id.to_string(),
        }))
    }

    /// How long `address` must still wait before its next login is heard.
    pub fn login_wait(&self, address: std::net::IpAddr) -> Option<Duration> {
        let inner = self.lock();
        let (_, next) = inner.failures.get(&address)?;
        next.checked_duration_since(Instant::now())
    }

    /// Counts a wrong login from `address`: past [`FREE_FAILURES`] in a row,
    /// its next one waits 1 s, then 2 s, 4 s, … up to [`MOST_BACKOFF`].
    pub fn login_failed(&self, address: std::net::IpAddr) {
        let mut inner = self.lock();
        if inner.failures.len() >= MAX_FAILING && !inner.failures.contains_key(&address) {
            let oldest = inner
                .failures
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                inner.failures.remove(&oldest);
            }
        }
        let (count, next) = inner.failures.entry(address).or_insert((0, Instant::now()));
        *count += 1;
        let over = count.saturating_sub(FREE_FAILURES);
        let wait = if over == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1u64 << (over - 1).min(6)).min(MOST_BACKOFF)
        };
        *next = Instant::now() + wait;
    }

    /// A right login from `address`: its count starts again.
    pub fn login_succeeded(&self, address: std::net::IpAddr) {
        self.lock().failures.remove(&address);
    }
}

/// The session id in a `Cookie` header (`a=1; rbee_session=…`).
fn session_id(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Whether `(method, path)` is among `doors`.
pub fn is_door(doors: &[(Method, &str)], method: &Method, path: &str) -> bool {
    doors.iter().any(|(m, p)| m == method && *p == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_cookie_is_http_only_strict_and_admits_only_itself() {
        let s = Sessions::default();
        let set = s.open();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let id = set
            .split(';')
            .next()
            .and_then(|kv| kv.split_once('='))
            .map(|(_, v)| v.to_string())
            .unwrap();
        assert!(s.admits(Some(&format!("theme=dark; {COOKIE}={id}"))));
        assert!(!s.admits(Some(&format!("{COOKIE}={id}x"))));
        assert!(!s.admits(Some("theme=dark")));
        assert!(!s.admits(None));
    }

    #[test]
    fn a_session_holds_a_few_status_streams_and_gets_them_back() {
        let s = Sessions::default();
        let set = s.open();
        let cookie = set.split(';').next().unwrap().to_string();
        let held: Vec<_> = (0..STREAMS_PER_SESSION)
            .map(|_| s.open_stream(Some(&cookie)).unwrap().expect("counted"))
            .collect();
        assert!(
            s.open_stream(Some(&cookie)).is_err(),
            "no more for this session"
        );
        assert!(
            matches!(s.open_stream(None), Ok(None)),
            "a token holder is not counted"
        );
        drop(held);
        assert!(
            s.open_stream(Some(&cookie)).unwrap().is_some(),
            "given back"
        );
    }

    #[test]
    fn wrong_logins_from_an_address_wait_longer_and_longer() {
        let s = Sessions::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            s.login_failed(a);
        }
        assert_eq!(s.login_wait(a), None, "a few typos are free");
        s.login_failed(a);
        assert!(s
            .login_wait(a)
            .is_some_and(|w| w > Duration::from_millis(900)));
        s.login_failed(a);
        assert!(s
            .login_wait(a)
            .is_some_and(|w| w > Duration::from_millis(1900)));
        for _ in 0..20 {
            s.login_failed(a);
        }
        assert!(s.login_wait(a).is_some_and(|w| w <= MOST_BACKOFF));
        assert_eq!(s.login_wait(b), None, "another address is not held back");
        s.login_succeeded(a);
        assert_eq!(s.login_wait(a), None);
    }

    #[test]
    fn a_code_opens_once() {
        let s = Sessions::default();
        let code = s.code();
        assert!(s.redeem(&code));
        assert!(!s.redeem(&code), "used up");
        assert!(!s.redeem("made-up"));
    }

    #[test]
    fn the_cookie_opens_the_page_doors_only() {
        assert!(is_door(SESSION_DOORS, &Method::GET, "/v1/status/stream"));
        assert!(!is_door(SESSION_DOORS, &Method::POST, "/v1/jobs"));
        assert!(!is_door(SESSION_DOORS, &Method::GET, "/v1/hives"));
        assert!(is_door(LOGIN_DOORS, &Method::GET, "/"));
        assert!(!is_door(LOGIN_DOORS, &Method::GET, "/v1/status"));
    }
}
