//! Server-sent events: the encoder every daemon streams with, the responses
//! that carry them (keep-alives when idle, an end when the producer stops),
//! and the incremental decoder its clients read with.
//!
//! Only the part of the SSE format rbee uses: `data:` lines, comments for
//! keep-alives, a blank line ending each event. Other fields are ignored, as
//! the format requires.

use super::Body;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_stream::Stream;

/// The frame that ends every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";
/// What an idle stream sends every [`KEEPALIVE_EVERY`].
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";
pub const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One `data: <json>\n\n` frame.
pub fn event<T: Serialize>(value: &T) -> Bytes {
    // Serialising our own protocol types cannot fail: no maps with non-string keys.
    let json = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    Bytes::from(format!("data: {json}\n\n"))
}

/// One `event: <name>\ndata: <json>\n\n` frame: the typed events of
/// Anthropic's and OpenAI's Responses streams.
pub fn named_event<T: Serialize>(name: &str, value: &T) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

/// One line of newline-delimited JSON (Ollama's streams).
pub fn json_line<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    line.push(b'\n');
    Bytes::from(line)
}

/// A stream of JSON lines (`application/x-ndjson`) fed by the returned sender,
/// as [`sse_response`] is; the format has no keep-alive, so none is sent.
pub fn ndjson_response() -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let stream = SseStream {
        rx,
        every: None,
        keepalive: Box::pin(tokio::time::sleep(KEEPALIVE_EVERY)),
    };
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    (tx, resp)
}

/// What a decoded event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The payload of one event: its `data:` lines joined with newlines.
    Data(String),
    /// `data: [DONE]`: the stream is over.
    Done,
}

/// Turns bytes as they arrive, split anywhere, into whole events.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Bytes of a line not yet ended.
    line: Vec<u8>,
    /// `data:` lines of the event being read.
    data: Vec<String>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Feeds bytes in; returns the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            if line.is_empty() {
                if !self.data.is_empty() {
                    let data = self.data.join("\n");
                    self.data.clear();
                    frames.push(if data == "[DONE]" {
                        Frame::Done
                    } else {
                        Frame::Data(data)
                    });
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
            // Comments (`:`) and other fields carry nothing rbee reads.
        }
        frames
    }
}

/// An SSE response fed by the returned sender. Keep-alive comments go out on
/// their own whenever the stream is idle for [`KEEPALIVE_EVERY`]. When the
/// client goes away the body is dropped, so `send` fails and `closed()`
/// resolves: that is how producers learn to stop.
pub fn sse_response() -> (mpsc::Sender<Bytes>, Response<Body>) {
    sse_response_every(KEEPALIVE_EVERY)
}

/// [`sse_response`] with keep-alives every `every` instead.
pub fn sse_response_every(every: std::time::Duration) -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let stream = SseStream {
        rx,
        every: Some(every),
        keepalive: Box::pin(tokio::time::sleep(every)),
    };
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    (tx, resp)
}

/// Streams a `watch` channel's values as SSE, from the current one until one
/// for which `is_last` holds, then `[DONE]`: progress that any number of
/// subscribers follow, a late one starting from where things stand.
pub fn sse_from_watch<T>(
    mut rx: tokio::sync::watch::Receiver<T>,
    is_last: fn(&T) -> bool,
) -> Response<Body>
where
    T: Serialize + Clone + Send + Sync + 'static,
{
    let (tx, resp) = sse_response();
    tokio::spawn(async move {
        loop {
            let value = rx.borrow_and_update().clone();
            if tx.send(event(&value)).await.is_err() {
                return;
            }
            if is_last(&value) {
                break;
            }
            tokio::select! {
                // The sender is gone: no value will ever end the stream.
                changed = rx.changed() => if changed.is_err() { break },
                () = tx.closed() => return,
            }
        }
        let _ = tx.send(DONE.into()).await;
    });
    resp
}

struct SseStream {
    rx: mpsc::Receiver<Bytes>,
    /// How often an idle stream sends a keep-alive; `None`: never.
    every: Option<std::time::Duration>,
    keepalive: Pin<Box<tokio::time::Sleep>>,
}

impl Stream for SseStream {
    type Item = Result<hyper::body::Frame<Bytes>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(every) = self.every else {
            let next = self.rx.poll_recv(cx);
            return next.map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))));
        };
        let next = tokio::time::Instant::now() + every;
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(bytes)) => {
                self.keepalive.as_mut().reset(next);
                Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.keepalive.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.keepalive.as_mut().reset(next);
                    Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                        KEEPALIVE,
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_one_data_frame() {
        #[derive(Serialize)]
        struct T {
            t: &'static str,
        }
        assert_eq!(&event(&T { t: "hi\n" })[..], b"data: {\"t\":\"hi\\n\"}\n\n");
    }

    #[test]
    fn decodes_what_it_encodes_split_at_every_byte() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&event(&serde_json::json!({"a": 1})));
        wire.extend_from_slice(KEEPALIVE);
        wire.extend_from_slice(&event(&serde_json::json!({"b": "é"})));
        wire.extend_from_slice(DONE);
        let mut d = Decoder::new();
        let mut frames = Vec::new();
        for b in &wire {
            frames.extend(d.push(std::slice::from_ref(b)));
        }
        assert_eq!(
            frames,
            vec![
                Frame::Data(r#"{"a":1}"#.into()),
                Frame::Data(r#"{"b":"é"}"#.into()),
                Frame::Done
            ]
        );
    }

    #[test]
    fn joins_multi_line_data_and_accepts_crlf() {
        let mut d = Decoder::new();
        let frames = d.push(b"data: one\r\ndata:two\r\nevent: x\r\n\r\n");
        assert_eq!(frames, vec![Frame::Data("one\ntwo".into())]);
    }

    #[test]
    fn a_comment_alone_is_no_event() {
        let mut d = Decoder::new();
        assert!(d.push(KEEPALIVE).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_sse_stream_sends_keep_alives_and_ends_when_the_sender_does() {
        let (tx, resp) = sse_response();
        let mut body = resp.into_body();
        tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"data: 1\n\n");
        let started = tokio::time::Instant::now();
        let idle = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&idle[..], KEEPALIVE);
        assert_eq!(started.elapsed(), KEEPALIVE_EVERY);
        drop(tx);
        assert!(body.frame().await.is_none());
    }
}
