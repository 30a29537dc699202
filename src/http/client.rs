//! The async HTTP client the roles use to talk to each other: one plain
//! HTTP/1.1 connection per request (rbee's traffic is a handful of long
//! streams, not many small calls), JSON helpers, and an SSE reader.

use super::sse::{Decoder, Frame};
use crate::protocol::{ApiError, ErrorBody, ErrorCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a plain (non-streaming) call may take, answer included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Nobody answered at `url`, or the exchange broke: `UNREACHABLE`, which the
/// caller turns into `HIVE_UNREACHABLE` or `WORKER_LOST` as it knows which.
fn unreachable(url: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unreachable, format!("{url}: {why}"))
}

/// Sends one request; the answer's body is left to read.
pub async fn send(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Response<Incoming>, ApiError> {
    send_with(method, url, token, body, &[]).await
}

/// [`send`] with more headers; the connection can be upgraded
/// ([`super::tunnel::connect`]).
pub async fn send_with(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Result<Response<Incoming>, ApiError> {
    let unreachable = |e: String| unreachable(url, e);
    let uri: Uri = url
        .parse()
        .map_err(|e| unreachable(format!("bad URL: {e}")))?;
    let tunnel = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("upgrade"));
    let stream = connect(&uri, tunnel).await.map_err(unreachable)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(h) = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req = req.header(HOST, h);
    }
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| unreachable(e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// A connection to `uri`'s host: plain for `http://`, TLS for `https://`
/// with this process's TLS (its identity presented, the server's pinned).
pub async fn connect(uri: &Uri, tunnel: bool) -> Result<Box<dyn super::Io>, String> {
    let secure = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("only http:// and https:// URLs are supported".into()),
    };
    let stream = tcp(uri, tunnel).await?;
    if !secure {
        return Ok(Box::new(stream));
    }
    let tls = super::tls::installed().ok_or("this process has no TLS set up for https://")?;
    Ok(Box::new(handshake(uri, stream, tls.client.clone()).await?))
}

async fn tcp(uri: &Uri, tunnel: bool) -> Result<TcpStream, String> {
    let host = uri.host().ok_or("no host")?;
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    if tunnel {
        super::keepalive_tunnel(&stream);
    } else {
        super::keepalive(&stream);
    }
    Ok(stream)
}

async fn handshake(
    uri: &Uri,
    stream: TcpStream,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad host name: {e}"))?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| "the TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS refused: {e}"))
}

/// The fingerprint of the certificate the server at `url` (`https://`)
/// presents, whatever it is: what a first contact shows and pins.
pub async fn probe_identity(url: &str) -> Result<String, ApiError> {
    let unreachable = |e: String| unreachable(url, e);
    let uri: Uri = url
        .parse()
        .map_err(|e| unreachable(format!("bad URL: {e}")))?;
    let config = super::tls::probing().map_err(unreachable)?;
    let stream = tcp(&uri, false).await.map_err(unreachable)?;
    let tls = handshake(&uri, stream, config).await.map_err(unreachable)?;
    super::tls::presented(tls.get_ref().1.peer_certificates())
        .ok_or_else(|| unreachable("it presented no certificate".into()))
}

/// Reads an answer: the JSON body when the status is 2xx, else the error it carries.
pub async fn read_json<T: DeserializeOwned>(resp: Response<Incoming>) -> Result<T, ApiError> {
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unreachable, format!("the answer broke off: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => body.error,
            Err(_) => ApiError::new(
                ErrorCode::Unknown,
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
            ),
        });
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::Unreachable, format!("unreadable answer: {e}")))
}

/// A JSON call with a time limit.
pub async fn call<T: DeserializeOwned>(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&impl Serialize>,
) -> Result<T, ApiError> {
    call_within(CALL_TIMEOUT, method, url, token, body).await
}

/// A JSON call that may take up to `limit` (work whose length the request
/// sets, such as embeddings; its caller leaving ends it sooner).
pub async fn call_within<T: DeserializeOwned>(
    limit: Duration,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&impl Serialize>,
) -> Result<T, ApiError> {
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    let exchange = async { read_json(send(method, url, token, body).await?).await };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(unreachable(url, "no answer in time")))
}

pub async fn get<T: DeserializeOwned>(url: &str, token: Option<&str>) -> Result<T, ApiError> {
    call(Method::GET, url, token, None::<&()>).await
}

pub async fn post<T: DeserializeOwned>(
    url: &str,
    token: Option<&str>,
    body: &impl Serialize,
) -> Result<T, ApiError> {
    call(Method::POST, url, token, Some(body)).await
}

/// Opens an SSE stream (POST with a body, or GET).
pub async fn stream(
    url: &str,
    token: Option<&str>,
    body: Option<&impl Serialize>,
) -> Result<SseStream, ApiError> {
    let method = if body.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    let resp = tokio::time::timeout(CALL_TIMEOUT, send(method, url, token, body))
        .await
        .unwrap_or_else(|_| Err(unreachable(url, "no answer in time")))?;
    if !resp.status().is_success() {
        return Err(read_json::<serde_json::Value>(resp)
            .await
            .err()
            .unwrap_or(unreachable(url, "unexpected answer")));
    }
    Ok(SseStream {
        body: resp.into_body(),
        decoder: Decoder::new(),
        ready: VecDeque::new(),
    })
}

/// The events of an SSE answer, as they arrive.
pub struct SseStream {
    body: Incoming,
    decoder: Decoder,
    ready: VecDeque<Frame>,
}

/// Nothing, not even a keep-alive, arrived on a stream for the time allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silent;

impl SseStream {
    /// The next event, or [`Silent`] when no bytes at all (keep-alives
    /// included) arrive for `silence`: a peer gone without closing.
    pub async fn next_within(&mut self, silence: Duration) -> Result<Option<Frame>, Silent> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Ok(Some(f));
            }
            match tokio::time::timeout(silence, self.body.frame()).await {
                Err(_) => return Err(Silent),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.ready.extend(self.decoder.push(&data));
                    }
                }
                Ok(Some(Err(_)) | None) => return Ok(None),
            }
        }
    }

    /// The next event; `None` when the connection ends (or breaks) without one.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(f);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.ready.extend(self.decoder.push(&data));
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }
}
