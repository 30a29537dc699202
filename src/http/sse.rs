//! Server-sent events: the encoder every daemon streams with, and the
//! incremental decoder its clients read with.
//!
//! Only the part of the SSE format rbee uses: `data:` lines, comments for
//! keep-alives, a blank line ending each event. Other fields are ignored, as
//! the format requires.

use hyper::body::Bytes;
use serde::Serialize;

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
}
