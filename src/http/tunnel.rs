//! Raw byte tunnels over an HTTP upgrade: how a split worker reaches a lending
//! hive's RPC server through the hive's own authenticated port (DESIGN.md §12).
//!
//! The worker side: [`listen`] opens a loopback port that llama.cpp's RPC
//! client connects to; each connection is carried through `GET /v1/rpc` on
//! the lending hive ([`connect`]). The hive side: [`accept`] checks the
//! request and answers `101 Switching Protocols`; the upgraded connection is
//! then carried to the lease's loopback RPC server through the lease's door
//! ([`crate::hive::rpc_door`]). A tunnel that holds a loaded model's layers
//! stays open, idle or not, for the worker's life.

use super::client;
use super::Body;
use crate::protocol::{ApiError, ErrorCode};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upgraded connection, read and written as a byte stream.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Opens a tunnel: `GET url` with `Upgrade: protocol` and the token; the
/// answer's error when the other side refuses (401 for a wrong token).
pub async fn connect(url: &str, token: Option<&str>, protocol: &str) -> Result<Upgraded, ApiError> {
    let headers = [("connection", "upgrade"), ("upgrade", protocol)];
    let asked = client::send_with(Method::GET, url, token, None, &headers);
    let resp = tokio::time::timeout(client::CALL_TIMEOUT, asked)
        .await
        .map_err(|_| {
            ApiError::new(ErrorCode::Unreachable, format!("{url}: no answer in time"))
        })??;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(match client::read_json::<serde_json::Value>(resp).await {
            Err(e) => e,
            Ok(_) => ApiError::new(
                ErrorCode::Unknown,
                format!("{url} did not switch to {protocol}"),
            ),
        });
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(|e| {
        ApiError::new(
            ErrorCode::Unreachable,
            format!("{url}: the upgrade failed: {e}"),
        )
    })?;
    Ok(TokioIo::new(upgraded))
}

/// The hive side: whether `req` asks to switch to `protocol`; the pending
/// upgrade, to be awaited once the 101 answer ([`switching`]) is sent.
pub fn accept(
    req: &mut Request<Incoming>,
    protocol: &str,
) -> Result<hyper::upgrade::OnUpgrade, ApiError> {
    let asked = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(protocol));
    if !asked {
        return Err(ApiError::invalid(
            "upgrade",
            format!("{} is an upgrade to {protocol}: send `Connection: upgrade` and `Upgrade: {protocol}`", req.uri().path()),
        ));
    }
    Ok(hyper::upgrade::on(req))
}

/// `101 Switching Protocols` to `protocol`.
pub fn switching(protocol: &str) -> Response<Body> {
    let mut resp = Response::new(super::full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(
        CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(protocol) {
        headers.insert(UPGRADE, v);
    }
    resp
}

/// Connects to a loopback port, retrying while nobody listens yet (a server
/// just started binds a moment after it says so).
pub async fn connect_local(port: u16, wait: Duration) -> std::io::Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Which side of a splice closed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The first stream's (the caller's own side).
    Near,
    /// The second's (the other machine's).
    Far,
}

/// Copies bytes both ways until one side closes, then lets the other
/// direction finish for a moment; which side closed first. With a `delay`,
/// each chunk is held that long before it is passed on, in order, in each
/// direction: a slower network, for the benchmark (`tc netem` stands in).
pub async fn splice<A, B>(near: A, far: B, delay: Duration) -> Closed
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (near_r, near_w) = tokio::io::split(near);
    let (far_r, far_w) = tokio::io::split(far);
    let there = pass(near_r, far_w, delay);
    let back = pass(far_r, near_w, delay);
    tokio::pin!(there, back);
    let finish = Duration::from_secs(1);
    tokio::select! {
        () = &mut there => {
            let _ = tokio::time::timeout(finish, back).await;
            Closed::Near
        }
        () = &mut back => {
            let _ = tokio::time::timeout(finish, there).await;
            Closed::Far
        }
    }
}

/// One direction: bytes from `from` to `to` until `from` ends (or either
/// fails), then `to` is shut for writing.
async fn pass<R, W>(mut from: R, mut to: W, delay: Duration)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    if delay.is_zero() {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.shutdown().await;
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            let due = tokio::time::Instant::now() + delay;
            if n == 0 || tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&chunk).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
    reader.abort();
    let _ = to.shutdown().await;
}

/// The worker side: a loopback port whose connections are each carried
/// through `url` (the lending hive's `/v1/rpc?lease=…`). Its address, for
/// llama.cpp's RPC client. `lost` is called when the far side closes a
/// tunnel first: the lending hive (or its RPC server) is gone.
pub async fn listen(
    url: String,
    token: Option<String>,
    protocol: &'static str,
    delay: Duration,
    lost: fn(&str),
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((local, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let _ = local.set_nodelay(true);
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                match connect(&url, token.as_deref(), protocol).await {
                    Ok(remote) => {
                        if splice(local, remote, delay).await == Closed::Far {
                            lost(&url);
                        }
                    }
                    // Dropping `local` tells llama.cpp's client the device is gone.
                    Err(e) => tracing::warn!("cannot open a tunnel to {url}: {e}"),
                }
            });
        }
    });
    Ok(addr)
}
