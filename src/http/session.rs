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
