//! The async HTTP client the roles use to talk to each other: one plain
//! HTTP/1.1 connection per request (rbee's traffic is a handful of long
//! streams, not many small calls), JSON helpers, and an SSE reader.

use super::sse::{Decoder, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a plain (non-streaming) call may take, answer included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed call: nobody answered, or the answer was an error.
#[derive(Debug, Clone)]
pub enum ClientError {
    /// No connection, or it broke.
    Unreachable(String),
    /// An HTTP error answer, with rbee's error code and message when it sent one.
    Status {
        status: StatusCode,
        code: String,
        message: String,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(m) => f.write_str(m),
            ClientError::Status { message, .. } => f.write_str(message),
        }
    }
}

/// Sends one request; the answer's body is left to read.
pub async fn send(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Response<Incoming>, ClientError> {
    let unreachable = |e: String| ClientError::Unreachable(format!("{url}: {e}"));
    let uri: Uri = url
        .parse()
        .map_err(|e| unreachable(format!("bad URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(unreachable("only http:// URLs are supported".into()));
    }
    let host = uri.host().ok_or_else(|| unreachable("no host".into()))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| unreachable("connection timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::builder().method(method).uri(path);
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

/// Reads an answer: the JSON body when the status is 2xx, else the error it carries.
pub async fn read_json<T: DeserializeOwned>(resp: Response<Incoming>) -> Result<T, ClientError> {
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Unreachable(format!("the answer broke off: {e}")))?
        .to_bytes();
    if !status.is_success() {
        let parsed: Option<crate::protocol::ErrorBody> = serde_json::from_slice(&bytes).ok();
        let (code, message) = match parsed {
            Some(e) => (e.error.code, e.error.message),
            None => (
                "HTTP".to_string(),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
            ),
        };
        return Err(ClientError::Status {
            status,
            code,
            message,
        });
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Unreachable(format!("unreadable answer: {e}")))
}

/// A JSON call with a time limit.
pub async fn call<T: DeserializeOwned>(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&impl Serialize>,
) -> Result<T, ClientError> {
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    let exchange = async { read_json(send(method, url, token, body).await?).await };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Unreachable(format!(
                "{url}: no answer in time"
            )))
        })
}

pub async fn get<T: DeserializeOwned>(url: &str, token: Option<&str>) -> Result<T, ClientError> {
    call(Method::GET, url, token, None::<&()>).await
}

pub async fn post<T: DeserializeOwned>(
    url: &str,
    token: Option<&str>,
    body: &impl Serialize,
) -> Result<T, ClientError> {
    call(Method::POST, url, token, Some(body)).await
}

/// Opens an SSE stream (POST with a body, or GET).
pub async fn stream(
    url: &str,
    token: Option<&str>,
    body: Option<&impl Serialize>,
) -> Result<SseStream, ClientError> {
    let method = if body.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    let resp = tokio::time::timeout(CALL_TIMEOUT, send(method, url, token, body))
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Unreachable(format!(
                "{url}: no answer in time"
            )))
        })?;
    if !resp.status().is_success() {
        return Err(read_json::<serde_json::Value>(resp).await.err().unwrap_or(
            ClientError::Unreachable(format!("{url}: unexpected answer")),
        ));
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

impl SseStream {
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
