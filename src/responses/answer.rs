//! The response object, whole or as its typed event stream (numbered), and
//! what a finished response leaves in the store.

use super::{error, Prepared, Store};
use crate::answer::{Ending, Piece, Pieces};
use crate::http::{self, Body};
use crate::protocol::{ChatMessage, StopReason, TokenLogprob, ToolCall};
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

/// One response being made.
pub struct Answer {
    id: String,
    model: String,
    created_at: u64,
    prompt_tokens: u32,
    prepared: Prepared,
    store: Store,
    message_id: String,
}

impl Answer {
    pub fn new(model: &str, prompt_tokens: u32, prepared: Prepared, store: Store) -> Answer {
        let id = crate::protocol::new_id("resp").replace('-', "_");
        Answer {
            message_id: id.replacen("resp", "msg", 1),
            id,
            model: model.to_string(),
            created_at: crate::protocol::unix_now(),
            prompt_tokens,
            prepared,
            store,
        }
    }

    /// The response object: `output` so far, `status`, and at the end `usage`.
    fn object(&self, status: &str, output: Vec<Value>, end: Option<&Ending>) -> Value {
        let mut v = self.prepared.echo.clone();
        let fields = json!({"id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "output": output, "error": null,
            "incomplete_details": match end {
                Some(e) if e.reason == StopReason::MaxTokens => json!({"reason": "max_output_tokens"}),
                _ => Value::Null,
            },
            "usage": end.map(|e| json!({"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": e.cached_tokens},
                "output_tokens": e.tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + e.tokens_out}))});
        if let (Some(v), Value::Object(f)) = (v.as_object_mut(), fields) {
            v.extend(f);
        }
        v
    }

    fn message(&self, text: &str, lps: &[TokenLogprob], status: &str) -> Value {
        json!({"type": "message", "id": self.message_id, "status": status, "role": "assistant",
               "content": if status == "in_progress" { json!([]) } else { json!([self.text_part(text, lps)]) }})
    }

    /// An `output_text` part, with its tokens' log-probabilities when asked.
    fn text_part(&self, text: &str, lps: &[TokenLogprob]) -> Value {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs(lps)})
    }

    fn logprobs(&self, lps: &[TokenLogprob]) -> Vec<Value> {
        match self.prepared.logprobs {
            true => crate::answer::logprob_list(lps, false),
            false => Vec::new(),
        }
    }

    /// The finished response's output items: its text, then its calls.
    fn output(&self, text: &str, end: &Ending) -> Vec<Value> {
        let mut output = Vec::new();
        if !text.is_empty() || end.calls.is_empty() {
            output.push(self.message(text, &end.logprobs, "completed"));
        }
        output.extend(end.calls.iter().map(function_call));
        output
    }

    /// The finished response, kept for later turns unless `store` was false.
    pub(super) fn finish(&self, text: &str, end: &Ending) -> Value {
        let status = if end.reason == StopReason::MaxTokens {
            "incomplete"
        } else {
            "completed"
        };
        let response = self.object(status, self.output(text, end), Some(end));
        if self.prepared.store {
            let mut messages = self.prepared.conversation.clone();
            let mut said = ChatMessage::new("assistant", text);
            said.tool_calls = end.calls.clone();
            messages.push(said);
            self.store.put(&self.id, response.clone(), messages);
        }
        response
    }
}

fn function_call(c: &ToolCall) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", c.id), "call_id": c.id,
           "name": c.function.name, "arguments": c.function.arguments, "status": "completed"})
}

/// The typed events of a streamed response, numbered.
struct Events {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    n: u64,
}

impl Events {
    async fn send(&mut self, kind: &str, mut v: Value) -> bool {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.n);
        self.n += 1;
        self.tx.send(http::sse::named_event(kind, &v)).await.is_ok()
    }
}

/// Turns an answer's pieces into a response, whole or as its event stream.
pub async fn respond(answer: Answer, mut pieces: Pieces) -> Response<Body> {
    if !answer.prepared.stream {
        return match pieces.whole().await {
            Ok((text, end)) => http::json(StatusCode::OK, &answer.finish(&text, &end)),
            Err(e) => error(e),
        };
    }
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        let mut s = Streaming {
            ev: Events { tx, n: 0 },
            answer,
            text: String::new(),
            logprobs: Vec::new(),
            opened: false,
        };
        if !s.start().await {
            return;
        }
        loop {
            let Some(piece) = pieces.next_for(&s.ev.tx).await else {
                return;
            };
            match piece {
                Piece::Text(t) => {
                    let these = pieces.take_logprobs();
                    if !s.text(&t, these).await {
                        return;
                    }
                }
                Piece::End(end) => return s.end(end).await,
                Piece::Failed(e) => {
                    let failed =
                        json!({"code": e.code.as_str(), "message": e.message, "param": e.param});
                    s.ev.send("error", failed).await;
                    return;
                }
            }
        }
    });
    resp
}

/// A response streamed as its events: the message item opened at its first
/// text (or at the end, when there is neither text nor a call), its text
/// deltas, then its calls and the finished response.
struct Streaming {
    ev: Events,
    answer: Answer,
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// The message item and its text part were announced.
    opened: bool,
}

impl Streaming {
    /// `response.created` and `response.in_progress`; false once the client left.
    async fn start(&mut self) -> bool {
        let started = self.answer.object("in_progress", vec![], None);
        self.ev
            .send("response.created", json!({"response": started}))
            .await
            && self
                .ev
                .send("response.in_progress", json!({"response": started}))
                .await
    }

    /// The message item and its text part announced.
    async fn open(&mut self) -> bool {
        self.opened = true;
        let item = &self.answer.message_id;
        let open = json!({"output_index": 0, "item": self.answer.message("", &[], "in_progress")});
        let part = json!({"item_id": item, "output_index": 0, "content_index": 0,
                          "part": self.answer.text_part("", &[])});
        self.ev.send("response.output_item.added", open).await
            && self.ev.send("response.content_part.added", part).await
    }

    /// A piece of text as its delta (with its tokens' log-probabilities).
    async fn text(&mut self, t: &str, these: Vec<TokenLogprob>) -> bool {
        if !self.opened && !self.open().await {
            return false;
        }
        self.text.push_str(t);
        let delta = json!({"item_id": self.answer.message_id, "output_index": 0, "content_index": 0,
                           "delta": t, "logprobs": self.answer.logprobs(&these)});
        self.logprobs.extend(these);
        self.ev.send("response.output_text.delta", delta).await
    }

    /// The text's `done` events, the calls as items, and the finished response.
    async fn end(mut self, end: Ending) {
        if !self.opened && end.calls.is_empty() {
            self.open().await;
        }
        if self.opened {
            self.close_text().await;
        }
        for (i, call) in end.calls.iter().enumerate() {
            self.call(i + usize::from(self.opened), call).await;
        }
        let end = Ending {
            logprobs: std::mem::take(&mut self.logprobs),
            ..end
        };
        let response = self.answer.finish(&self.text, &end);
        let kind = if response["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.ev.send(kind, json!({ "response": response })).await;
    }

    async fn close_text(&mut self) {
        let (a, item, text, lps) = (
            &self.answer,
            &self.answer.message_id,
            &self.text,
            &self.logprobs,
        );
        let done = json!({"item_id": item, "output_index": 0, "content_index": 0, "text": text,
                          "logprobs": a.logprobs(lps)});
        let part = json!({"item_id": item, "output_index": 0, "content_index": 0,
                          "part": a.text_part(text, lps)});
        let message = json!({"output_index": 0, "item": a.message(text, lps, "completed")});
        self.ev.send("response.output_text.done", done).await;
        self.ev.send("response.content_part.done", part).await;
        self.ev.send("response.output_item.done", message).await;
    }

    /// A function call as an item: added, its arguments, done.
    async fn call(&mut self, index: usize, call: &ToolCall) {
        let done = function_call(call);
        let mut added = done.clone();
        added["arguments"] = json!("");
        added["status"] = json!("in_progress");
        let id = done["id"].clone();
        let arguments = &call.function.arguments;
        self.ev
            .send(
                "response.output_item.added",
                json!({"output_index": index, "item": added}),
            )
            .await;
        self.ev
            .send(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": index, "delta": arguments}),
            )
            .await;
        self.ev
            .send(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": index, "arguments": arguments}),
            )
            .await;
        self.ev
            .send(
                "response.output_item.done",
                json!({"output_index": index, "item": done}),
            )
            .await;
    }
}
