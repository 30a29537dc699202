//! What the queen shows of the cluster (DESIGN.md §13): `GET /v1/status`,
//! the whole picture that `rbee keeper status` prints; `GET
//! /v1/status/stream`, the same again whenever it changes; the status page at
//! `/` that draws it in a browser (one HTML file, embedded); the page's login
//! (`POST /v1/session`, a session cookie for a token or a one-time code); and
//! `GET /metrics`.

use super::Queen;
use crate::http::{self, sse, Body, Reply};
use crate::protocol::{
    ApiError, CatalogModel, ErrorCode, HiveState, HiveStatus, HiveWorker, QueenStatus, SessionLink,
    SessionRequest,
};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, SET_COOKIE};
use hyper::{Request, Response, StatusCode};
use std::time::Duration;

/// The page: one file, no build step, no framework.
const PAGE: &str = include_str!("status.html");
/// Finished jobs the status keeps besides the running ones.
const RECENT_JOBS: usize = 20;
/// How often the stream looks for a change (the page itself never polls).
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// The whole cluster now.
pub(super) async fn status(q: &Queen) -> QueenStatus {
    let hives = hive_list(q).await;
    let state = q.cluster.view.state();
    let models = state
        .hives
        .iter()
        .filter(|h| h.reachable)
        .flat_map(|h| {
            h.snapshot
                .iter()
                .flat_map(|s| &s.models)
                .map(|m| CatalogModel {
                    hive: h.conn.name.clone(),
                    name: m.entry.name.clone(),
                    quantization: m.entry.quantization.clone(),
                    size: m.entry.size,
                    memory_estimate_mb: m.memory_estimate_mb,
                })
        })
        .collect();
    QueenStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        hives,
        workers: workers(q),
        models,
        jobs: q.jobs.summaries(RECENT_JOBS),
    }
}

/// `GET /v1/status/stream`: the status, then again each time it changes.
/// A session (the page's cookie) holds at most
/// [`crate::http::session::STREAMS_PER_SESSION`] of them at once.
pub(super) fn stream(q: &Queen, req: &Request<Incoming>) -> Reply {
    let cookie = req
        .headers()
        .get(hyper::header::COOKIE)
        .and_then(|v| v.to_str().ok());
    let place = match q.auth.sessions() {
        Some(sessions) => sessions.open_stream(cookie)?,
        None => None,
    };
    let (tx, resp) = http::sse_response();
    let q = q.clone();
    tokio::spawn(async move {
        let _place = place;
        let mut last = None;
        loop {
            let frame = sse::event(&status(&q).await);
            if last.as_ref() != Some(&frame) {
                if tx.send(frame.clone()).await.is_err() {
                    return;
                }
                last = Some(frame);
            }
            tokio::select! {
                () = tokio::time::sleep(LOOK_EVERY) => {}
                () = tx.closed() => return,
            }
        }
    });
    Ok(resp)
}

/// `GET /`: the status page.
pub(super) fn page() -> Response<Body> {
    let mut resp = Response::new(http::full(PAGE));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    resp
}

/// `POST /v1/session`: the token, or a one-time code, for a session cookie.
/// Wrong tries from one address wait longer and longer (`Sessions::login_failed`).
pub(super) async fn login(q: &Queen, req: Request<Incoming>) -> Reply {
    let sessions = q
        .auth
        .sessions()
        .ok_or_else(|| ApiError::internal("no sessions"))?;
    let address = req.extensions().get::<http::Peer>().map(|p| p.0.ip());
    if let Some(wait) = address.and_then(|a| sessions.login_wait(a)) {
        return Err(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "too many wrong logins from this address: try again in {} s",
                wait.as_secs() + 1
            ),
        ));
    }
    let body: SessionRequest = http::read_json(req).await?;
    let ok = match (&body.token, &body.code) {
        (Some(token), None) => q.auth.is_token(token.trim()),
        (None, Some(code)) => sessions.redeem(code.trim()),
        _ => {
            return Err(ApiError::invalid(
                "token",
                "give the token or a code, one of them",
            ))
        }
    };
    if let Some(a) = address {
        if ok {
            sessions.login_succeeded(a);
        } else {
            sessions.login_failed(a);
        }
    }
    if !ok {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "wrong token, or a code that is used up or expired (get another with `rbee keeper status --web`)",
        ));
    }
    let mut resp = http::json(StatusCode::OK, &serde_json::json!({"session": "open"}));
    let cookie = HeaderValue::from_str(&sessions.open())
        .map_err(|e| ApiError::internal(format!("a bad cookie: {e}")))?;
    resp.headers_mut().insert(SET_COOKIE, cookie);
    Ok(resp)
}

/// `POST /v1/session/link` (with the token): a one-time code for a browser.
pub(super) fn link(q: &Queen) -> Reply {
    let sessions = q
        .auth
        .sessions()
        .ok_or_else(|| ApiError::internal("no sessions"))?;
    let code = sessions.code();
    Ok(http::json(
        StatusCode::OK,
        &SessionLink {
            path: format!("/?code={code}"),
            code,
        },
    ))
}

/// `GET /metrics`: the queen's series, hives up and down as the view has them.
pub(super) fn metrics(q: &Queen) -> Response<Body> {
    let hives = q.cluster.view.state().hives;
    let up = hives.iter().filter(|h| h.reachable).count();
    q.cluster.metrics.respond(up, hives.len() - up)
}

/// Every hive, as the live view has it.
pub(super) async fn hive_list(q: &Queen) -> Vec<HiveStatus> {
    q.cluster.retrack().await;
    let mut list = Vec::new();
    for h in q.cluster.view.state().hives.iter() {
        let snapshot = h.snapshot.as_ref();
        list.push(HiveStatus {
            managed: q.registry.is_managed(&h.conn.name).await,
            name: h.conn.name.clone(),
            // A page with only a cookie sees no password in a hive's URL.
            url: http::without_credentials(&h.conn.url),
            found: h.conn.found.clone(),
            fingerprint: h.conn.fingerprint.clone(),
            status: match (h.reachable, &h.error) {
                (true, _) => HiveState::Reachable,
                (false, Some(_)) => HiveState::Unreachable,
                (false, None) => HiveState::Unknown,
            },
            last_seen: h.last_seen.get(),
            error: h.error.as_deref().map(http::without_credentials),
            version: snapshot.map(|s| s.version.clone()),
            version_matches: snapshot.is_some_and(|s| s.version == env!("CARGO_PKG_VERSION")),
            ram: snapshot.map(|s| s.ram.clone()),
            gpus: snapshot.map(|s| s.gpus.clone()).unwrap_or_default(),
            workers: snapshot.map_or(0, |s| s.workers.len() as u32),
            leases: snapshot.map(|s| s.leases.clone()).unwrap_or_default(),
        });
    }
    list
}

/// Every worker of every reachable hive, with what the queen has in flight on it.
pub(super) fn workers(q: &Queen) -> Vec<HiveWorker> {
    let state = q.cluster.view.state();
    let mut all = Vec::new();
    for h in state.hives.iter().filter(|h| h.reachable) {
        for w in h.snapshot.iter().flat_map(|s| &s.workers) {
            all.push(HiveWorker {
                hive: h.conn.name.clone(),
                in_flight: state.in_flight(&w.url),
                tokens_per_second: q.cluster.view.rate(&w.url),
                worker: w.clone(),
            });
        }
    }
    all
}
