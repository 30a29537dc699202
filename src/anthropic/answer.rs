//! Anthropic's answers: the whole message, or its typed event stream
//! (`message_start`, `content_block_*`, `ping`, `message_delta`,
//! `message_stop`), with its stop reasons and usage.

use super::{error, error_body};
use crate::answer::{Ending, Piece, Pieces};
use crate::http::{self, Body};
use crate::protocol::{StopReason, ToolCall};
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

/// One answer being put into Anthropic's shape.
pub struct Answer {
    pub id: String,
    pub model: String,
    pub input_tokens: u32,
    /// The request's stop sequences: one that ended the answer is named.
    pub stop: Vec<String>,
}

impl Answer {
    pub fn new(model: &str, input_tokens: u32, stop: Vec<String>) -> Answer {
        Answer {
            id: crate::protocol::new_id("msg").replace('-', "_"),
            model: model.to_string(),
            input_tokens,
            stop,
        }
    }

    fn stop_reason(&self, end: &Ending) -> (&'static str, Option<&str>) {
        match end.reason {
            _ if !end.calls.is_empty() => ("tool_use", None),
            StopReason::MaxTokens => ("max_tokens", None),
            // Which sequence it was is known when there was only one.
            StopReason::StopSequence => (
                "stop_sequence",
                self.stop
                    .first()
                    .filter(|_| self.stop.len() == 1)
                    .map(String::as_str),
            ),
            StopReason::Eos | StopReason::Cancelled => ("end_turn", None),
        }
    }

    fn usage(&self, end: Option<&Ending>) -> Value {
        json!({"input_tokens": self.input_tokens,
               "output_tokens": end.map_or(0, |e| e.tokens_out),
               "cache_read_input_tokens": end.map_or(0, |e| e.cached_tokens)})
    }

    /// The whole message.
    pub fn whole(&self, text: &str, end: &Ending) -> Value {
        let mut content = Vec::new();
        if !text.is_empty() || end.calls.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        content.extend(end.calls.iter().map(tool_use));
        let (reason, sequence) = self.stop_reason(end);
        json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
               "content": content, "stop_reason": reason, "stop_sequence": sequence,
               "usage": self.usage(Some(end))})
    }

    fn start(&self) -> Value {
        json!({"type": "message_start", "message": {"id": self.id, "type": "message", "role": "assistant",
               "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
               "usage": self.usage(None)}})
    }
}

/// A call as Anthropic writes it: `tool_use` with its input as an object.
fn tool_use(c: &ToolCall) -> Value {
    let input: Value = serde_json::from_str(&c.function.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": c.id, "name": c.function.name, "input": input})
}

fn event(name: &str, value: &Value) -> Bytes {
    http::sse::named_event(name, value)
}

/// Turns an answer's pieces into Anthropic's answer, streamed or whole.
pub async fn respond(answer: Answer, mut pieces: Pieces, stream: bool) -> Response<Body> {
    if !stream {
        return match pieces.whole().await {
            Ok((text, end)) => http::json(StatusCode::OK, &answer.whole(&text, &end)),
            Err(e) => error(e),
        };
    }
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        let frames = [
            event("message_start", &answer.start()),
            event("ping", &json!({"type": "ping"})),
        ];
        for f in frames {
            if tx.send(f).await.is_err() {
                return;
            }
        }
        // The text block opens with the first text; calls follow it, one block each.
        let mut text_open = false;
        loop {
            let Some(piece) = pieces.next_for(&tx).await else {
                return;
            };
            let mut out = Vec::new();
            let last = match piece {
                Piece::Text(text) => {
                    open_text(&mut out, &mut text_open);
                    out.push(event(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text}}),
                    ));
                    false
                }
                Piece::End(end) => {
                    ending(&answer, &end, &mut out, &mut text_open);
                    true
                }
                Piece::Failed(e) => {
                    out.push(event("error", &error_body(&e)));
                    true
                }
            };
            for f in out {
                if tx.send(f).await.is_err() {
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    resp
}

/// The text block's start, unless it is open already.
fn open_text(out: &mut Vec<Bytes>, open: &mut bool) {
    if !*open {
        *open = true;
        out.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ));
    }
}

/// The end of a streamed message: the text block closed (opened first when
/// there is neither text nor a call), each call as a block, the stop reason.
fn ending(answer: &Answer, end: &Ending, out: &mut Vec<Bytes>, text_open: &mut bool) {
    if end.calls.is_empty() {
        open_text(out, text_open);
    }
    if *text_open {
        out.push(event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ));
    }
    let first = usize::from(*text_open);
    for (i, call) in end.calls.iter().enumerate() {
        let index = first + i;
        let mut start = tool_use(call);
        start["input"] = json!({});
        out.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        out.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": call.function.arguments}}),
        ));
        out.push(event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }
    let (reason, sequence) = answer.stop_reason(end);
    out.push(event(
        "message_delta",
        &json!({"type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": {"output_tokens": end.tokens_out}}),
    ));
    out.push(event("message_stop", &json!({"type": "message_stop"})));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FunctionCall;

    #[test]
    fn the_whole_message_has_anthropics_shape() {
        let a = Answer::new("m", 7, vec!["###".into()]);
        let end = |reason, calls| Ending {
            calls,
            reason,
            tokens_out: 3,
            cached_tokens: 2,
            decode_time_ms: 1,
            decoded_tokens: 3,
            logprobs: vec![],
        };
        let v = a.whole("hi", &end(StopReason::StopSequence, vec![]));
        assert_eq!(v["content"], json!([{"type": "text", "text": "hi"}]));
        assert_eq!(
            (v["stop_reason"].clone(), v["stop_sequence"].clone()),
            (json!("stop_sequence"), json!("###"))
        );
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2})
        );
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "f".into(),
                arguments: r#"{"a":1}"#.into(),
            },
        };
        let v = a.whole("", &end(StopReason::Eos, vec![call]));
        assert_eq!(
            v["content"],
            json!([{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}])
        );
        assert_eq!(v["stop_reason"], "tool_use");
    }
}
