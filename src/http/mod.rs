//! The HTTP plumbing every daemon shares: the accept loop with graceful
//! shutdown, body helpers, JSON errors, bearer-token auth and SSE responses.
//!
//! Each role declares its endpoints in one route table ([`Route`]); [`find`]
//! matches a request against it, so 404 and 405 come from the table and
//! cannot drift from what is served.

pub mod auth;
pub mod budget;
pub mod client;
mod routes;
pub mod session;
pub mod sse;
pub mod tls;
pub mod tunnel;

use crate::protocol::{ApiError, ErrorBody, ErrorCode};
use auth::with_cors;
pub use auth::{constant_time_eq, Auth};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
#[cfg(test)]
pub use routes::assert_routes_are_consistent;
pub use routes::{find, percent_decode, query_param, segment, Route};
use serde::de::DeserializeOwned;
use serde::Serialize;
pub use sse::{sse_from_watch, sse_response, sse_response_every};
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body any endpoint reads: prompts are text, 1 MiB is plenty.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How long a stopping server waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a connection may take to send a request's headers, and how long
/// an idle kept-alive connection stays open: a client that sends nothing
/// holds no file descriptor for long. Streams being answered are not idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a request's body may take to arrive once its headers have.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// `resp` with `held` kept until its body has been sent (or dropped).
fn holding(resp: Response<Body>, held: Box<dyn auth::KeyUse>) -> Response<Body> {
    struct Holding {
        body: Body,
        _held: Box<dyn auth::KeyUse>,
    }
    impl hyper::body::Body for Holding {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }
        fn size_hint(&self) -> hyper::body::SizeHint {
            self.body.size_hint()
        }
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, BodyExt::boxed(Holding { body, _held: held }))
}

/// The address a request came from (in its extensions, put there by [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// The address a request came to: this machine's address as the client
/// reached it (in its extensions, put there by [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct Local(pub std::net::SocketAddr);

/// Serves `handler` on `listener` behind `door` (token, host names, origins:
/// [`Auth::admit`]) until `shutdown` resolves, then stops accepting and waits
/// for open connections (streams included) to finish. Connections are held
/// within a [`budget::Budget`]: beyond it new ones wait to be accepted; beyond
/// an address's share they are closed at once.
pub async fn serve<H, F>(
    listener: TcpListener,
    door: Auth,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // Connections hear of the shutdown here and finish what they are
    // answering; the drain waits for every connection slot to come back.
    let (stopping, _) = tokio::sync::watch::channel(false);
    let budget = budget::Budget::for_this_process();
    let most = budget.total();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(most));
    let tls = tls::installed().and_then(|t| t.server.clone());
    tokio::pin!(shutdown);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::warn!("{most} connections open, the most served at once: new ones wait");
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some((place, header_timeout)) = budget.admit(peer.ip(), HEADER_TIMEOUT) else {
                    tracing::debug!("{} holds its share of connections: closed", peer.ip());
                    continue;
                };
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                let accepted = Accepted { stream, peer, header_timeout };
                let (handler, door, tls) = (handler.clone(), door.clone(), tls.clone());
                let stop = stopping.subscribe();
                tokio::spawn(async move {
                    let _held = (permit, place);
                    connection(accepted, tls, door, handler, stop).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    stopping.send_replace(true);
    let all = most as u32;
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// A connection just accepted, and how long its client has to send headers.
struct Accepted {
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    header_timeout: Duration,
}

/// Serves one connection's requests until it ends, or until the shutdown
/// (`stop`) lets it finish what it is answering.
async fn connection<H, F>(
    c: Accepted,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    door: Auth,
    handler: H,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let (peer, local) = (c.peer, c.stream.local_addr().ok());
    let Some((io, secure)) = open(c.stream, tls, c.header_timeout).await else {
        return;
    };
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(Peer(peer));
        if let Some(local) = local {
            req.extensions_mut().insert(Local(local));
        }
        if let Some(peer_cert) = &secure {
            req.extensions_mut().insert(tls::Secure);
            if let Some(fp) = peer_cert {
                req.extensions_mut().insert(tls::PeerCert(fp.clone()));
            }
        }
        through_door(req, &door, &handler)
    });
    // Upgrades (the hive's `/v1/rpc` tunnels) leave the connection
    // and its slot when switched: no timeout of this loop cuts them.
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(c.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!("connection ended: {e}");
    }
}

/// One request past the door (its token or key, its origin): the handler's
/// answer with the CORS headers and the key's accounting, or the door's refusal.
fn through_door<H, F>(
    mut req: Request<Incoming>,
    door: &Auth,
    handler: &H,
) -> impl Future<Output = Result<Response<Body>, Infallible>>
where
    H: Fn(Request<Incoming>) -> F,
    F: Future<Output = Response<Body>>,
{
    let call = door.admit(&req).map(|(cors, grant)| {
        if let Some(g) = &grant {
            req.extensions_mut().insert(auth::KeyName {
                name: g.key.clone(),
                admin: g.admin,
            });
        }
        (handler(req), cors, grant)
    });
    async move {
        Ok::<_, Infallible>(match call {
            Ok((response, cors, grant)) => {
                let response = with_cors(response.await, cors);
                match grant {
                    Some(g) => {
                        g.held.answered(response.status().as_u16());
                        holding(response, g.held)
                    }
                    None => response,
                }
            }
            Err(refused) => *refused,
        })
    }
}

/// A connection's byte stream, plain or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// An accepted connection made ready to read requests from: over TLS when
/// its first byte opens a TLS handshake (and this process has TLS), else
/// plain. With it, for TLS, the fingerprint of the client's certificate if
/// it showed one. `None` when the peer sent nothing, or a broken handshake,
/// within `limit`.
async fn open(
    stream: tokio::net::TcpStream,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    limit: Duration,
) -> Option<(Box<dyn Io>, Option<Option<String>>)> {
    let Some(config) = tls else {
        return Some((Box::new(stream), None));
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(limit, stream.peek(&mut first)).await {
        Ok(Ok(1..)) if first[0] == tls::HANDSHAKE => {}
        Ok(Ok(1..)) => return Some((Box::new(stream), None)),
        _ => return None,
    }
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    match tokio::time::timeout(limit, accept).await {
        Ok(Ok(tls)) => {
            let peer = tls::presented(tls.get_ref().1.peer_certificates());
            Some((Box::new(tls), Some(peer)))
        }
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake refused: {e}");
            None
        }
        Err(_) => None,
    }
}

/// How long a silent peer may go unnoticed on a connection: TCP keep-alive
/// probes after [`KEEPALIVE_IDLE`] seconds of quiet, then every
/// [`KEEPALIVE_EVERY`], [`KEEPALIVE_PROBES`] times; on a tunnel, also
/// unacknowledged data for at most [`UNACKED_FOR`] ms. A machine that loses
/// power sends no reset; without these a long-lived stream or tunnel to it (a
/// split worker's RPC devices) would wait for it for hours.
const KEEPALIVE_IDLE: libc::c_int = 5;
const KEEPALIVE_EVERY: libc::c_int = 2;
const KEEPALIVE_PROBES: libc::c_int = 3;
#[cfg(target_os = "linux")]
const UNACKED_FOR: std::ffi::c_uint = 15_000;

/// Sets [`KEEPALIVE_IDLE`] and the rest on a connection; best effort.
pub fn keepalive(stream: &tokio::net::TcpStream) {
    socket_options(stream, false);
}

/// [`keepalive`], and [`UNACKED_FOR`]: for a tunnel, whose peer is expected
/// to read at once (a stream to a person may pause longer).
pub fn keepalive_tunnel(stream: &tokio::net::TcpStream) {
    socket_options(stream, true);
}

fn socket_options(stream: &tokio::net::TcpStream, tunnel: bool) {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = stream.as_raw_fd();
        let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
            // SAFETY: a valid socket and a pointer to an int that outlives the call.
            unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        };
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        #[cfg(target_os = "linux")]
        {
            set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE);
            if tunnel {
                set(
                    libc::IPPROTO_TCP,
                    libc::TCP_USER_TIMEOUT,
                    UNACKED_FOR as libc::c_int,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = tunnel;
        #[cfg(target_os = "macos")]
        set(libc::IPPROTO_TCP, libc::TCP_KEEPALIVE, KEEPALIVE_IDLE);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_EVERY);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES);
    }
}

/// SIGTERM, Ctrl+C, or `admin` being notified (`POST /v1/admin/shutdown`).
pub async fn stop_signal(admin: &tokio::sync::Notify) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
        () = admin.notified() => {}
    }
}

/// `text` with the user and password taken out of every URL in it
/// (`http://u:p@host/` → `http://host/`): what a page or a list shows.
pub fn without_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the path, the query, a blank or a quote.
        let end = tail
            .find(['/', '?', '#', ' ', '"', '\'', ')', ','])
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host),
        );
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Connections the kernel holds for a listener before it accepts them. Not
/// the 128 of `TcpListener::bind` (std's, and mio's): a queen with hundreds
/// of clients connecting at once overflowed that, and each connection lost
/// there waited a second for its SYN to be sent again. The kernel caps it at
/// `net.core.somaxconn`.
const BACKLOG: u32 = 1024;

/// Listens on `host:port` (its first address that can be bound), with a
/// [`BACKLOG`] of pending connections.
pub async fn listen(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

/// Binds `host:port`, with an error that says which address could not be had.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    listen(host, port)
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// What a handler returns: the answer, or the error to send as JSON.
pub type Reply = Result<Response<Body>, ApiError>;

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A JSON error: `{"error":{"code","message"}}`, with the code's status.
pub fn error(e: ApiError) -> Response<Body> {
    let retry_after = e.retry_after;
    let mut resp = json(status_of(e.code), &ErrorBody { error: e });
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

impl From<ApiError> for Response<Body> {
    fn from(e: ApiError) -> Response<Body> {
        error(e)
    }
}

/// A handler's result as the response to send.
pub fn reply(r: Reply) -> Response<Body> {
    r.unwrap_or_else(error)
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`]; the error is the response to send.
///
/// An oversized body is still read to its end (up to [`DRAIN_LIMIT`]) before the
/// 413 goes out: most clients send the whole body before they read, and would
/// see a broken pipe instead of the answer if the server hung up on them.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = read_body(req).await?;
    crate::protocol::parse_json(&bytes)
}

/// Reads a body of at most [`MAX_BODY_BYTES`], as [`read_json`] does.
pub async fn read_body(req: Request<Incoming>) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("request body is over {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the request body did not arrive within {}s",
                        BODY_TIMEOUT.as_secs()
                    ),
                ))
            }
        };
        let frame = frame.map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("could not read the request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= MAX_BODY_BYTES {
                bytes.extend_from_slice(&data);
            } else if total > DRAIN_LIMIT {
                break;
            }
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// How much of an oversized body is read (and thrown away) so the client hears the 413.
const DRAIN_LIMIT: usize = 64 << 20;

#[cfg(test)]
mod tests {

    /// What the kernel says a listening socket's backlog is (TCP_INFO's
    /// `tcpi_sacked` holds it for a listener).
    #[cfg(target_os = "linux")]
    fn backlog_of(listener: &TcpListener) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes of it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let fd = listener.as_raw_fd();
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        assert_eq!(got, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_sacked
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_listener_holds_a_thousand_pending_connections_not_128() {
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(BACKLOG);
        let listener = listen("127.0.0.1", 0).await.expect("a port");
        assert_eq!(backlog_of(&listener), BACKLOG.min(cap));
        // A port someone listens on is refused, as before.
        let port = listener.local_addr().unwrap().port();
        let taken = listen("127.0.0.1", port)
            .await
            .expect_err("the port is taken");
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    }

    #[test]
    fn credentials_are_taken_out_of_urls_shown() {
        assert_eq!(
            without_credentials("http://admin:hunter2@mac.home.arpa:8080"),
            "http://mac.home.arpa:8080"
        );
        assert_eq!(
            without_credentials("cannot reach https://u:p@x:1/v1/health (refused); http://y/"),
            "cannot reach https://x:1/v1/health (refused); http://y/"
        );
        assert_eq!(without_credentials("no url here"), "no url here");
    }

    use super::*;
}
