//! The OpenAI-compatible API: its wire types, request checks, and the shapes
//! of its answers, streamed (`chat.completion.chunk` / `text_completion`) or
//! whole. The worker serves it for its one model; the queen routes it by
//! `model`, runs it as a job (so a lost worker is replaced mid-answer), and
//! answers from the job's inference events with the same shapes.

use crate::http::{self, Body};
use crate::protocol::{
    ApiError, ChatMessage, ErrorCode, InferenceEvent, InferenceRequest, SamplingParams, StopReason,
};
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error":{"message","type","param","code"}}`,
/// with the status of its code.
pub fn error(e: ApiError) -> Response<Body> {
    let status = http::status_of(e.code);
    http::json(status, &OpenAiError::from(e))
}

/// An error as one event of a stream, in OpenAI's shape: what its client
/// libraries raise when a stream carries one.
pub fn error_event(e: ApiError) -> hyper::body::Bytes {
    http::sse::event(&OpenAiError::from(e))
}

/// OpenAI's error body.
#[derive(Serialize)]
struct OpenAiError {
    error: OpenAiErrorDetail,
}

#[derive(Serialize)]
struct OpenAiErrorDetail {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<String>,
    code: &'static str,
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> OpenAiError {
        let kind = match e.status() {
            400 | 413 => "invalid_request_error",
            401 => "authentication_error",
            404 => "not_found_error",
            429 | 503 => "server_busy",
            _ => "server_error",
        };
        OpenAiError {
            error: OpenAiErrorDetail {
                message: e.message,
                kind,
                param: e.param,
                code: e.code.as_str(),
            },
        }
    }
}

/// A message's content: text, or a list of parts of which the text ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions` and `POST /v1/completions`; fields OpenAI has
/// and rbee does not use are accepted and ignored, as its clients send many.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub prompt: Option<Value>,
    /// The newer name for `max_tokens`; it wins when both are given.
    pub max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingParams,
    pub n: Option<u32>,
    /// llama-server's opt-out of the prompt cache.
    pub cache_prompt: Option<bool>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A request rbee can run: the inference (with the chat messages, if any)
/// and how to answer it.
#[derive(Debug)]
pub struct Prepared {
    pub inference: InferenceRequest,
    pub stream: bool,
    pub include_usage: bool,
}

/// The model a request names, read without judging the rest (the queen routes by it).
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct M {
        model: String,
    }
    serde_json::from_slice::<M>(body).ok().map(|m| m.model)
}

/// Checks a request, sampling with the one rule set (`SamplingParams`).
pub fn parse(body: &[u8], kind: Kind) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid JSON body: {e}")))?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n=1 is supported"));
    }
    let mut sampling = req.sampling;
    sampling.max_tokens = req.max_completion_tokens.or(sampling.max_tokens);
    sampling.validate()?;
    // OpenAI's defaults, which differ from llama.cpp's: temperature 1, no top-k.
    sampling.temperature.get_or_insert(1.0);
    sampling.top_k.get_or_insert(0);
    let bad = |m: String, param: &str| ApiError::invalid(param, m);
    let (prompt, chat) = match kind {
        Kind::Chat => {
            let messages = req
                .messages
                .ok_or_else(|| bad("messages is required".into(), "messages"))?;
            if messages.is_empty() {
                return Err(bad("messages is empty".into(), "messages"));
            }
            let mut chat = Vec::new();
            for m in messages {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(bad(
                            format!("unknown role {other:?}: use system, user or assistant"),
                            "messages",
                        ))
                    }
                };
                let text = match m.content {
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(""),
                    None => String::new(),
                };
                chat.push(ChatMessage {
                    role: role.to_string(),
                    content: text,
                });
            }
            (String::new(), Some(chat))
        }
        Kind::Completion => {
            let prompt = match req.prompt {
                Some(Value::String(s)) => s,
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or("").to_string()
                }
                Some(Value::Array(_)) => {
                    return Err(bad(
                        "only one prompt per request is supported".into(),
                        "prompt",
                    ))
                }
                _ => return Err(bad("prompt must be a string".into(), "prompt")),
            };
            if prompt.is_empty() {
                return Err(bad("prompt is empty".into(), "prompt"));
            }
            (prompt, None)
        }
    };
    Ok(Prepared {
        inference: InferenceRequest {
            prompt,
            messages: chat,
            sampling,
            cache_prompt: req.cache_prompt,
            job_id: None,
            resume_tokens: Vec::new(),
        },
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens => "length",
        StopReason::Eos | StopReason::StopSequence | StopReason::Cancelled => "stop",
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds the answer's pieces for one request.
pub struct Answer {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub prompt_tokens: u32,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptTokensDetails,
}

/// How much of the prompt came from the prompt cache, as OpenAI reports it.
#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: u32,
}

impl Answer {
    pub fn new(kind: Kind, model: &str, prompt_tokens: u32) -> Answer {
        let prefix = if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Answer {
            kind,
            id: crate::protocol::new_id(prefix),
            model: model.to_string(),
            created: created(),
            prompt_tokens,
        }
    }

    fn usage(&self, completion: u32, cached: u32) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }

    /// One streamed chunk carrying `text` (or the role, first), or the finish reason.
    pub fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = match (text, finish) {
                    (_, Some(_)) => json!({}),
                    (Some(t), None) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                };
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
            }
        }
    }

    /// The last streamed chunk when usage was asked for: no choices, just usage.
    pub fn usage_chunk(&self, completion: u32, cached: u32) -> Value {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [], "usage": self.usage(completion, cached)})
    }

    /// The whole answer, not streamed.
    pub fn whole(&self, text: &str, reason: StopReason, completion: u32, cached: u32) -> Value {
        let finish = finish_reason(reason);
        match self.kind {
            Kind::Chat => {
                json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": self.usage(completion, cached)})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": self.usage(completion, cached)})
            }
        }
    }
}

const ENGINE_STOPPED: &str = "the engine stopped before the answer was complete";

/// Turns a worker's inference events into the OpenAI answer, streamed or whole.
///
/// Not streamed, the answer is awaited here: a client that leaves drops this
/// future and with it `events`, which cancels the generation.
pub async fn respond(
    answer: Answer,
    mut events: tokio::sync::mpsc::UnboundedReceiver<InferenceEvent>,
    stream: bool,
    include_usage: bool,
) -> Response<Body> {
    if !stream {
        let mut text = String::new();
        return loop {
            match events.recv().await {
                Some(InferenceEvent::Token { t, .. }) => text.push_str(&t),
                Some(InferenceEvent::End {
                    tokens_out,
                    stop_reason,
                    cached_tokens,
                    ..
                }) => {
                    break http::json(
                        StatusCode::OK,
                        &answer.whole(&text, stop_reason, tokens_out, cached_tokens),
                    )
                }
                Some(InferenceEvent::Error { code, message }) => {
                    break error(ApiError::new(code, message))
                }
                Some(InferenceEvent::Started { .. }) => {}
                None => break error(ApiError::new(ErrorCode::InferenceFailed, ENGINE_STOPPED)),
            }
        };
    }
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        let send = |v: &Value| crate::http::sse::event(v);
        // Chat streams open with the assistant's role, as OpenAI's do.
        if answer.kind == Kind::Chat && tx.send(send(&answer.chunk(None, None))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(InferenceEvent::Token { t, .. }) => {
                        if tx.send(send(&answer.chunk(Some(&t), None))).await.is_err() {
                            return;
                        }
                    }
                    Some(InferenceEvent::End { tokens_out, stop_reason, cached_tokens, .. }) => {
                        let _ = tx.send(send(&answer.chunk(None, Some(finish_reason(stop_reason))))).await;
                        if include_usage {
                            let _ = tx.send(send(&answer.usage_chunk(tokens_out, cached_tokens))).await;
                        }
                        break;
                    }
                    Some(InferenceEvent::Error { code, message }) => {
                        let _ = tx.send(error_event(ApiError::new(code, message))).await;
                        break;
                    }
                    Some(InferenceEvent::Started { .. }) => {}
                    None => {
                        let e = ApiError::new(ErrorCode::InferenceFailed, ENGINE_STOPPED);
                        let _ = tx.send(error_event(e)).await;
                        break;
                    }
                },
                () = tx.closed() => return,
            }
        }
        let _ = tx.send(crate::http::sse::DONE.into()).await;
    });
    resp
}

/// `GET /v1/models` entries.
pub fn model_list(names: impl IntoIterator<Item = (String, String)>) -> Value {
    let data: Vec<Value> = names
        .into_iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One table of OpenAI requests and the field each is refused for.
    #[test]
    fn requests_are_checked_with_the_one_rule_set() {
        let chat = |extra: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
        };
        let cases: &[(String, Kind, Option<&str>)] = &[
            (chat(""), Kind::Chat, None),
            (
                chat(r#","temperature":2,"stop":"x","seed":-7"#),
                Kind::Chat,
                None,
            ),
            (
                chat(r#","temperature":2.5"#),
                Kind::Chat,
                Some("temperature"),
            ),
            (chat(r#","top_p":1.5"#), Kind::Chat, Some("top_p")),
            (chat(r#","max_tokens":0"#), Kind::Chat, Some("max_tokens")),
            (
                chat(r#","max_completion_tokens":-1"#),
                Kind::Chat,
                Some("max_tokens"),
            ),
            (
                chat(r#","presence_penalty":9"#),
                Kind::Chat,
                Some("presence_penalty"),
            ),
            (chat(r#","stop":[""]"#), Kind::Chat, Some("stop")),
            (chat(r#","n":2"#), Kind::Chat, Some("n")),
            (r#"{"model":"m"}"#.into(), Kind::Chat, Some("messages")),
            (
                r#"{"model":"m","messages":[]}"#.into(),
                Kind::Chat,
                Some("messages"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#.into(),
                Kind::Chat,
                Some("messages"),
            ),
            (
                r#"{"model":"m","prompt":"x"}"#.into(),
                Kind::Completion,
                None,
            ),
            (
                r#"{"model":"m","prompt":["x"]}"#.into(),
                Kind::Completion,
                None,
            ),
            (
                r#"{"model":"m","prompt":["x","y"]}"#.into(),
                Kind::Completion,
                Some("prompt"),
            ),
            (
                r#"{"model":"m","prompt":""}"#.into(),
                Kind::Completion,
                Some("prompt"),
            ),
            (
                r#"{"model":"m","prompt":5}"#.into(),
                Kind::Completion,
                Some("prompt"),
            ),
        ];
        for (body, kind, refused) in cases {
            let got = parse(body.as_bytes(), *kind).err().map(|e| {
                assert_eq!(e.code, ErrorCode::InvalidRequest, "{body}");
                e.param.unwrap_or_default()
            });
            assert_eq!(got.as_deref(), *refused, "{body}");
        }
        let e = parse(b"{not json", Kind::Chat).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn openai_defaults_and_the_newer_max_tokens_name_win() {
        let p = parse(
            br#"{"model":"m","prompt":"x","max_tokens":5,"max_completion_tokens":7}"#,
            Kind::Completion,
        )
        .unwrap();
        assert_eq!(p.inference.sampling.max_tokens, Some(7));
        assert_eq!(p.inference.sampling.temperature, Some(1.0));
        assert_eq!(p.inference.sampling.top_k, Some(0));
        let p = parse(
            br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
            Kind::Chat,
        )
        .unwrap();
        let system = ChatMessage {
            role: "system".into(),
            content: "ab".into(),
        };
        assert_eq!(p.inference.messages, Some(vec![system]));
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let chat = Answer::new(Kind::Chat, "m", 3);
        let first = chat.chunk(None, None);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text = chat.chunk(Some("hi"), None);
        assert_eq!(text["choices"][0]["delta"], json!({"content": "hi"}));
        assert_eq!(text["choices"][0]["finish_reason"], Value::Null);
        let last = chat.chunk(None, Some("length"));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = chat.usage_chunk(4, 2);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
        let whole = chat.whole("hello", StopReason::Eos, 2, 0);
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(
            whole["choices"][0]["message"],
            json!({"role": "assistant", "content": "hello"})
        );
        assert_eq!(whole["choices"][0]["finish_reason"], "stop");
        let completion = Answer::new(Kind::Completion, "m", 1);
        let chunk = completion.chunk(Some("x"), None);
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["text"], "x");
        let whole = completion.whole("x", StopReason::MaxTokens, 1, 0);
        assert_eq!(whole["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn errors_have_openai_shape_and_status() {
        let resp = error(ApiError::invalid("top_p", "top_p must be between 0 and 1"));
        assert_eq!(resp.status(), 400);
        let body = serde_json::to_value(OpenAiError::from(ApiError::new(
            ErrorCode::QueueFull,
            "busy",
        )))
        .unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "busy", "type": "server_busy", "param": null, "code": "QUEUE_FULL"}})
        );
    }
}
