//! Client keys (`rbee keeper keys add NAME`): a key per person or program,
//! each with a scope, an expiry, a rate and a number of streams it may hold.
//!
//! A key is shown once, when made; the queen keeps its SHA-256 only, in a
//! store of its own (`queen-keys`). A request presents a key as
//! `Authorization: Bearer …` or `x-api-key: …` (what Anthropic's clients
//! send); the queen's token (`--token-file`) stays what it was, an admin key.
//! `use` keys reach inference, models and embeddings; `admin` keys
//! everything, hives, workers and keys included. Over its rate or its streams
//! a key gets 429 with `Retry-After`.

use crate::http::auth::{Grant, KeyDoor, KeyUse, KEY_PREFIX as PREFIX};
use crate::metrics::QueenMetrics;
use crate::protocol::{ApiError, ErrorCode, KeyAdded, KeyInfo, KeyRequest, KeyScope};
use crate::store::Lazy;
use hyper::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// A key as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    info: KeyInfo,
    /// SHA-256 of the key, hex.
    hash: String,
    /// Unix seconds; none: never.
    expires: Option<u64>,
}

/// What a key is doing now (not stored): its rate's bucket and open streams.
#[derive(Debug)]
struct Now {
    /// Requests it may still make now, refilled continuously.
    allowance: f64,
    refilled: Instant,
    streams: u32,
}

/// How often the use of keys is written to disk.
const SAVE_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Keys {
    store: Lazy,
    /// By key hash: records, read once and kept in step with the store.
    records: Arc<Mutex<HashMap<String, Record>>>,
    now: Arc<Mutex<HashMap<String, Now>>>,
    /// Keys whose use (last used, requests, tokens) is not on disk yet: written
    /// every [`SAVE_EVERY`], not on each request.
    unsaved: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Requests by key and outcome, tokens by key.
    metrics: QueenMetrics,
}

impl Keys {
    pub fn open(data_dir: &Path, metrics: QueenMetrics) -> Result<Keys, String> {
        let path = data_dir.join("queen-keys");
        let recovery = format!(
            "Move it away (mv {0} {0}.damaged; mv {0}.check {0}.check.damaged), start the queen \
             again and make the keys again with `rbee keeper keys add NAME`",
            path.display()
        );
        // Opened at the first key made (or now, when there are keys).
        let store = Lazy::open(&path, "key store", "queen", &recovery)?;
        let records = store
            .opened()
            .map(|s| s.list::<Record>())
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.hash.clone(), r))
            .collect();
        Ok(Keys {
            store,
            records: Arc::new(Mutex::new(records)),
            now: Arc::default(),
            unsaved: Arc::default(),
            metrics,
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a key: its record, and the key itself (shown this once).
    pub fn add(&self, req: &KeyRequest) -> Result<KeyAdded, ApiError> {
        crate::protocol::check_name("key", &req.name)?;
        let expires = match req.expires.as_deref() {
            None => None,
            Some(e) => {
                let d = crate::parse_duration(e).map_err(|m| ApiError::invalid("expires", m))?;
                Some(crate::protocol::unix_now().saturating_add(d.as_secs()))
            }
        };
        if let Some(rate) = req.rate.as_deref() {
            parse_rate(rate).map_err(|m| ApiError::invalid("rate", m))?;
        }
        if req.streams == Some(0) {
            return Err(ApiError::invalid(
                "streams",
                "a key needs at least one stream",
            ));
        }
        let mut records = self.records();
        if records.values().any(|r| r.info.name == req.name) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("a key named {} exists already (revoke it first)", req.name),
            ));
        }
        let key = format!("{PREFIX}{}", random_hex(24)?);
        let record = Record {
            info: KeyInfo {
                name: req.name.clone(),
                scope: req.scope,
                created_at: crate::protocol::now_rfc3339(),
                expires_at: expires
                    .map(|s| crate::protocol::rfc3339_at(UNIX_EPOCH + Duration::from_secs(s))),
                rate: req.rate.clone(),
                streams: req.streams,
                last_used: None,
                requests: 0,
                tokens_used: 0,
            },
            hash: hash(&key),
            expires,
        };
        self.store
            .get()
            .and_then(|s| s.put(&req.name, &record))
            .map_err(|m| ApiError::new(ErrorCode::Internal, m))?;
        let info = record.info.clone();
        records.insert(record.hash.clone(), record);
        Ok(KeyAdded { key, info })
    }

    /// Every key, by name.
    pub fn list(&self) -> Vec<KeyInfo> {
        let mut all: Vec<KeyInfo> = self.records().values().map(|r| r.info.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Forgets a key: refused from now on.
    pub fn revoke(&self, name: &str) -> Result<KeyInfo, ApiError> {
        let mut records = self.records();
        let hash = records
            .iter()
            .find(|(_, r)| r.info.name == name)
            .map(|(h, _)| h.clone())
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no key named {name}")))?;
        self.store
            .get()
            .and_then(|s| s.remove::<Record>(name))
            .map_err(|m| ApiError::new(ErrorCode::Internal, m))?;
        let record = records.remove(&hash);
        self.now
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
        Ok(record.map(|r| r.info).unwrap_or_default())
    }

    /// Counts `tokens` generated for the key named `name`.
    pub fn count_tokens(&self, name: &str, tokens: u64) {
        self.metrics.key_tokens(name, tokens);
        let mut records = self.records();
        if let Some(r) = records.values_mut().find(|r| r.info.name == name) {
            r.info.tokens_used += tokens;
            self.used(name);
        }
    }

    /// The key named `name` was used: its record is written at the next save.
    fn used(&self, name: &str) {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }

    /// Writes the use of keys to the store every [`SAVE_EVERY`]; runs for the
    /// life of the queen.
    pub async fn save_use(self) {
        loop {
            tokio::time::sleep(SAVE_EVERY).await;
            let names =
                std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
            let records = self.records();
            for r in records.values().filter(|r| names.contains(&r.info.name)) {
                if let Err(e) = self.store.get().and_then(|s| s.put(&r.info.name, r)) {
                    tracing::warn!("cannot record the use of key {}: {e}", r.info.name);
                }
            }
        }
    }

    /// Refuses a request of the key named `name`, counted.
    fn refuse(&self, name: &str, e: ApiError) -> ApiError {
        self.metrics.key_request(name, outcome(e.code.status()));
        e
    }
}

impl KeyDoor for Keys {
    fn admit(&self, key: &str, method: &Method, path: &str) -> Result<Grant, ApiError> {
        let refused = || ApiError::new(ErrorCode::Unauthorized, "unknown or revoked key");
        if !key.starts_with(PREFIX) {
            return Err(refused());
        }
        let h = hash(key);
        let mut records = self.records();
        let record = records.get_mut(&h).ok_or_else(refused)?;
        let name = record.info.name.clone();
        if record
            .expires
            .is_some_and(|e| crate::protocol::unix_now() >= e)
        {
            let at = record.info.expires_at.clone().unwrap_or_default();
            let e = ApiError::new(
                ErrorCode::Unauthorized,
                format!("key {name} expired at {at}"),
            );
            return Err(self.refuse(&name, e));
        }
        if !allows(record.info.scope, method, path) {
            let e = ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "key {name} is a use key: it reaches inference, models, embeddings and the cluster's status, not {method} {path}"
                ),
            );
            return Err(self.refuse(&name, e));
        }
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        let state = now.entry(h.clone()).or_insert_with(|| Now {
            allowance: f64::MAX,
            refilled: Instant::now(),
            streams: 0,
        });
        if let Some((count, per)) = record.info.rate.as_deref().and_then(|r| parse_rate(r).ok()) {
            if let Some(wait) = spend(state, count, per, Instant::now()) {
                let rate = record.info.rate.clone().unwrap_or_default();
                let e = ApiError::new(
                    ErrorCode::TooManyRequests,
                    format!("key {name} is over its rate of {rate}"),
                );
                return Err(self.refuse(&name, e.retry_after(wait)));
            }
        }
        if let Some(most) = record.info.streams {
            if state.streams >= most {
                let e = ApiError::new(
                    ErrorCode::TooManyRequests,
                    format!("key {name} holds its {most} streams already"),
                );
                return Err(self.refuse(&name, e.retry_after(Duration::from_secs(1))));
            }
        }
        state.streams += 1;
        drop(now);
        record.info.requests += 1;
        record.info.last_used = Some(crate::protocol::now_rfc3339());
        let admin = record.info.scope == KeyScope::Admin;
        drop(records);
        self.used(&name);
        let keys = self.clone();
        Ok(Grant {
            key: name.clone(),
            admin,
            held: Box::new(InFlight {
                keys,
                hash: h,
                name,
            }),
        })
    }
}

/// `ok`, `limited` (429), `refused` (401, 403) or `error`: a key's request's
/// outcome, as `rbee_queen_key_requests_total` counts it.
fn outcome(status: u16) -> &'static str {
    match status {
        0..=399 => "ok",
        429 => "limited",
        401 | 403 => "refused",
        _ => "error",
    }
}

/// A request of a key in flight: counted when answered, its stream given
/// back when dropped (when the response, streamed or not, has been sent).
struct InFlight {
    keys: Keys,
    hash: String,
    name: String,
}

impl KeyUse for InFlight {
    fn answered(&self, status: u16) {
        self.keys.metrics.key_request(&self.name, outcome(status));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut now = self.keys.now.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = now.get_mut(&self.hash) {
            state.streams = state.streams.saturating_sub(1);
        }
    }
}

/// Takes one request from a bucket of `count` per `per`, refilled
/// continuously; else how long until one is there.
fn spend(state: &mut Now, count: u32, per: Duration, at: Instant) -> Option<Duration> {
    let capacity = f64::from(count);
    let per_sec = capacity / per.as_secs_f64();
    let elapsed = at.saturating_duration_since(state.refilled).as_secs_f64();
    state.allowance = (state.allowance.min(capacity) + elapsed * per_sec).min(capacity);
    state.refilled = at;
    if state.allowance >= 1.0 {
        state.allowance -= 1.0;
        None
    } else {
        Some(Duration::from_secs_f64((1.0 - state.allowance) / per_sec))
    }
}

/// `60/min`, `10/s`, `1000/h`, `5000/d`: a count per period.
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("{s:?} is not a rate (try 60/min, 10/s, 1000/h)");
    let (count, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match per.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!(
            "{s:?}: a rate of 0 lets nothing through (revoke the key instead)"
        ));
    }
    Ok((count, Duration::from_secs(per)))
}

/// What a `use` key may reach; an `admin` key reaches everything.
fn allows(scope: KeyScope, method: &Method, path: &str) -> bool {
    if scope == KeyScope::Admin {
        return true;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        // Inference: jobs and the OpenAI face.
        ("POST", ["v1", "jobs"])
        | ("GET", ["v1", "jobs", _, "stream"])
        | ("DELETE", ["v1", "jobs", _]) => true,
        ("POST", ["v1", "chat", "completions"] | ["v1", "completions"] | ["v1", "embeddings"]) => {
            true
        }
        // Ollama's and Anthropic's faces: inference, listings, fetching.
        ("POST", ["api", "chat" | "generate" | "embed" | "embeddings" | "show" | "pull"]) => true,
        ("GET", ["api", "tags" | "ps" | "version"]) => true,
        ("POST", ["v1", "messages"] | ["v1", "messages", "count_tokens"]) => true,
        ("POST", ["completion" | "tokenize"] | ["v1", "responses"]) => true,
        ("GET" | "DELETE", ["v1", "responses", _]) => true,
        ("GET", ["v1", "models", _] | ["v1", "aliases"]) => true,
        // Models: listing and fetching (not removing).
        ("GET", ["v1", "models"] | ["v1", "hives", _, "models"]) => true,
        ("POST", ["v1", "hives", _, "models", "download"]) => true,
        ("GET", ["v1", "hives", _, "models", "download", "progress"]) => true,
        // Looking at the cluster.
        ("GET", ["v1", "hives"] | ["v1", "workers"] | ["v1", "status"]) => true,
        _ => false,
    }
}

fn hash(key: &str) -> String {
    crate::disk::hex(&Sha256::digest(key.as_bytes()))
}

/// `bytes` random bytes from the kernel, hex.
fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("no randomness: {e}")))?;
    Ok(crate::disk::hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_as_people_write_them() {
        assert_eq!(parse_rate("60/min"), Ok((60, Duration::from_secs(60))));
        assert_eq!(parse_rate("10/s"), Ok((10, Duration::from_secs(1))));
        assert_eq!(
            parse_rate(" 1000 / h "),
            Ok((1000, Duration::from_secs(3600)))
        );
        for bad in ["60", "x/min", "60/fortnight", "0/min", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_lets_its_rate_through_then_says_when_the_next_may_come() {
        let t0 = Instant::now();
        let mut s = Now {
            allowance: f64::MAX,
            refilled: t0,
            streams: 0,
        };
        let per = Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(spend(&mut s, 3, per, t0), None);
        }
        let wait = spend(&mut s, 3, per, t0).expect("the fourth waits");
        assert!((wait.as_secs_f64() - 20.0).abs() < 0.01, "{wait:?}");
        // 20 s later one more is there, and only one.
        let later = t0 + Duration::from_secs(20);
        assert_eq!(spend(&mut s, 3, per, later), None);
        assert!(spend(&mut s, 3, per, later).is_some());
    }

    #[test]
    fn a_use_key_reaches_inference_models_and_embeddings_only() {
        let get = Method::GET;
        let post = Method::POST;
        let delete = Method::DELETE;
        for (m, p) in [
            (&post, "/v1/jobs"),
            (&get, "/v1/jobs/job-1/stream"),
            (&delete, "/v1/jobs/job-1"),
            (&post, "/v1/chat/completions"),
            (&post, "/v1/completions"),
            (&post, "/v1/embeddings"),
            (&get, "/v1/models"),
            (&get, "/v1/hives/mac/models"),
            (&post, "/v1/hives/mac/models/download"),
            (&get, "/v1/status"),
            (&post, "/api/chat"),
            (&get, "/api/tags"),
            (&post, "/v1/messages"),
        ] {
            assert!(allows(KeyScope::Use, m, p), "{m} {p}");
        }
        for (m, p) in [
            (&post, "/v1/hives"),
            (&delete, "/v1/hives/mac"),
            (&post, "/v1/workers/w-1/shutdown"),
            (&delete, "/v1/hives/mac/models/x"),
            (&post, "/v1/keys"),
            (&get, "/v1/keys"),
            (&get, "/metrics"),
            (&post, "/v1/admin/shutdown"),
            (&delete, "/api/delete"),
        ] {
            assert!(!allows(KeyScope::Use, m, p), "{m} {p}");
            assert!(allows(KeyScope::Admin, m, p), "{m} {p}");
        }
    }
}
