//! The OpenAI-compatible API: its wire types, request checks, and the shapes
//! of its answers, streamed (`chat.completion.chunk` / `text_completion`) or
//! whole. The worker serves it for its one model; the queen routes it by
//! `model`, runs it as a job (so a lost worker is replaced mid-answer), and
//! answers from the job's inference events with the same shapes.

use crate::http::{self, Body};
use crate::protocol::{
    ApiError, ChatMessage, Constraint, ErrorCode, InferenceEvent, InferenceRequest, SamplingParams,
    StopReason, Tool, ToolCall,
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
    /// The calls an assistant made (on a later turn, sent back).
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
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
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// `auto`, `none`, `required`, or `{"type":"function","function":{"name"}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type":"text"|"json_object"}` or `{"type":"json_schema","json_schema":{"schema"}}`.
    #[serde(default)]
    pub response_format: Option<Value>,
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
    /// The answer may hold tool calls, to be found in its text.
    pub tool_calls: bool,
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
                    "tool" => "tool",
                    other => {
                        return Err(bad(
                            format!("unknown role {other:?}: use system, user, assistant or tool"),
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
                let mut message = ChatMessage::new(role, text);
                message.tool_calls = m.tool_calls.unwrap_or_default();
                message.tool_call_id = m.tool_call_id;
                chat.push(message);
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
    let (tools, tool_constraint) = tools_of(
        req.tools.unwrap_or_default(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let format = response_format(req.response_format.as_ref())?;
    if tool_constraint.is_some() && format.is_some() {
        return Err(bad(
            "a tool_choice that requires a call and a response_format cannot both hold: give one"
                .into(),
            "response_format",
        ));
    }
    if kind == Kind::Completion && !tools.is_empty() {
        return Err(bad("tools need /v1/chat/completions".into(), "tools"));
    }
    Ok(Prepared {
        tool_calls: !tools.is_empty(),
        inference: InferenceRequest {
            prompt,
            messages: chat,
            sampling,
            cache_prompt: req.cache_prompt,
            job_id: None,
            resume_tokens: Vec::new(),
            tools,
            constraint: tool_constraint.or(format),
        },
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The tools the model is shown, and the constraint `tool_choice` asks for:
/// none for `auto`; a call of any tool for `required`, of that one for a name;
/// `none` shows no tools at all.
fn tools_of(
    tools: Vec<Tool>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<(Vec<Tool>, Option<Constraint>), ApiError> {
    let bad = |m: String| ApiError::invalid("tools", m);
    for t in &tools {
        if t.kind != "function" {
            return Err(bad(format!(
                "tool type {:?} is not supported: use \"function\"",
                t.kind
            )));
        }
        if t.function.name.is_empty() {
            return Err(bad("a tool's function has no name".into()));
        }
        if let Some(p) = &t.function.parameters {
            crate::schema::check(p, "tools")?;
        }
    }
    // One call unless asked for more, as llama-server does: a small model
    // offered more calls tends to repeat the first until its tokens run out.
    let parallel = parallel.unwrap_or(false);
    let choice_bad = |m: String| ApiError::invalid("tool_choice", m);
    match choice {
        None if tools.is_empty() => Ok((tools, None)),
        Some(Value::String(c)) if c == "none" => Ok((Vec::new(), None)),
        None => Ok((tools, None)),
        Some(Value::String(c)) if c == "auto" => Ok((tools, None)),
        Some(_) if tools.is_empty() => Err(choice_bad("tool_choice needs tools".into())),
        Some(Value::String(c)) if c == "required" => {
            let constraint = Constraint::ToolCalls {
                tools: tools.clone(),
                parallel,
            };
            Ok((tools, Some(constraint)))
        }
        Some(named @ Value::Object(_)) => {
            let name = named
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| choice_bad("tool_choice must name a function: {\"type\":\"function\",\"function\":{\"name\":…}}".into()))?;
            let Some(tool) = tools.iter().find(|t| t.function.name == name) else {
                let names: Vec<&str> = tools.iter().map(|t| t.function.name.as_str()).collect();
                return Err(choice_bad(format!(
                    "tool_choice names {name:?}, which is not among the tools: {}",
                    names.join(", ")
                )));
            };
            let constraint = Constraint::ToolCalls {
                tools: vec![tool.clone()],
                parallel: false,
            };
            Ok((tools, Some(constraint)))
        }
        Some(other) => Err(choice_bad(format!(
            "tool_choice must be auto, none, required or a function, not {other}"
        ))),
    }
}

/// The constraint `response_format` asks for, its schema checked first.
fn response_format(format: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    let bad = |m: String| ApiError::invalid("response_format", m);
    let Some(format) = format else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .ok_or_else(|| bad("json_schema needs a schema: {\"type\":\"json_schema\",\"json_schema\":{\"name\",\"schema\"}}".into()))?;
            crate::schema::check(schema, "response_format")?;
            Ok(Some(Constraint::JsonSchema {
                schema: schema.clone(),
            }))
        }
        Some(other) => Err(bad(format!(
            "response_format type {other:?} is not supported: use text, json_object or json_schema"
        ))),
    }
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
    /// Tool calls are looked for in the text (the request had tools).
    pub tool_calls: bool,
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
            tool_calls: false,
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

    /// The streamed chunks of tool calls, as OpenAI streams them: per call,
    /// its id and name, then its arguments, both under the call's `index`.
    fn call_chunks(&self, calls: &[ToolCall]) -> Vec<Value> {
        let chunk = |delta: Value| {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": null}]})
        };
        calls
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                [
                    chunk(json!({"index": i, "id": c.id, "type": "function",
                                 "function": {"name": c.function.name, "arguments": ""}})),
                    chunk(json!({"index": i, "function": {"arguments": c.function.arguments}})),
                ]
            })
            .collect()
    }

    /// The text's tool calls, when the request had tools and the model made some.
    fn calls_in(&self, text: &str) -> Option<(String, Vec<ToolCall>)> {
        if self.tool_calls {
            crate::tool_calls::parse(text)
        } else {
            None
        }
    }

    /// The whole answer, not streamed.
    pub fn whole(&self, text: &str, reason: StopReason, completion: u32, cached: u32) -> Value {
        let finish = finish_reason(reason);
        match self.kind {
            Kind::Chat => {
                let (message, finish) = match self.calls_in(text) {
                    Some((content, calls)) => (
                        json!({"role": "assistant", "content": if content.is_empty() { Value::Null } else { json!(content) },
                               "tool_calls": calls}),
                        "tool_calls",
                    ),
                    None => (json!({"role": "assistant", "content": text}), finish),
                };
                json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
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
        // With tools, text that may be the start of a call is held until it is
        // known; a call is sent whole at the end.
        let mut held = String::new();
        let mut holding = answer.tool_calls;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(InferenceEvent::Token { t, .. }) => {
                        let text = if holding {
                            held.push_str(&t);
                            if crate::tool_calls::may_start_a_call(&held) {
                                continue;
                            }
                            holding = false;
                            std::mem::take(&mut held)
                        } else {
                            t
                        };
                        if tx.send(send(&answer.chunk(Some(&text), None))).await.is_err() {
                            return;
                        }
                    }
                    Some(InferenceEvent::End { tokens_out, stop_reason, cached_tokens, .. }) => {
                        let mut finish = finish_reason(stop_reason);
                        match answer.calls_in(&held) {
                            Some((content, calls)) => {
                                if !content.is_empty() {
                                    let _ = tx.send(send(&answer.chunk(Some(&content), None))).await;
                                }
                                for chunk in answer.call_chunks(&calls) {
                                    let _ = tx.send(send(&chunk)).await;
                                }
                                finish = "tool_calls";
                            }
                            None if !held.is_empty() => {
                                let _ = tx.send(send(&answer.chunk(Some(&held), None))).await;
                            }
                            None => {}
                        }
                        let _ = tx.send(send(&answer.chunk(None, Some(finish)))).await;
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

/// The answer to `POST /v1/embeddings`: a vector per input, as floats or as
/// base64 of their little-endian bytes.
pub fn embeddings(model: &str, vectors: &[Vec<f32>], tokens: u32, base64: bool) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
}

/// Standard base64 with padding (RFC 4648).
fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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

    #[test]
    fn embeddings_come_as_floats_or_base64_of_their_bytes() {
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
        let v = embeddings("m", &[vec![1.0, 0.0]], 3, false);
        assert_eq!(v["data"][0]["embedding"], json!([1.0, 0.0]));
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        let b = embeddings("m", &[vec![1.0]], 1, true);
        assert_eq!(b["data"][0]["embedding"], "AACAPw==");
    }

    const TOOLS: &str = r#""tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;

    fn chat_with(extra: &str) -> Result<Prepared, ApiError> {
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#);
        parse(body.as_bytes(), Kind::Chat)
    }

    #[test]
    fn tool_choice_and_response_format_become_constraints() {
        let auto = chat_with(TOOLS).unwrap();
        assert!(auto.tool_calls && auto.inference.constraint.is_none());
        assert_eq!(auto.inference.tools.len(), 1);
        let none = chat_with(&format!(r#"{TOOLS},"tool_choice":"none""#)).unwrap();
        assert!(!none.tool_calls && none.inference.tools.is_empty());
        let required = chat_with(&format!(r#"{TOOLS},"tool_choice":"required""#)).unwrap();
        assert!(matches!(
            required.inference.constraint,
            Some(Constraint::ToolCalls {
                parallel: false,
                ..
            })
        ));
        let named = chat_with(&format!(
            r#"{TOOLS},"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}"#
        ))
        .unwrap();
        assert!(matches!(
            named.inference.constraint,
            Some(Constraint::ToolCalls {
                parallel: false,
                ..
            })
        ));
        let json = chat_with(r#""response_format":{"type":"json_object"}"#).unwrap();
        assert_eq!(json.inference.constraint, Some(Constraint::JsonObject));
        let schema = chat_with(r#""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}"#).unwrap();
        assert!(matches!(
            schema.inference.constraint,
            Some(Constraint::JsonSchema { .. })
        ));
        for (extra, said) in [
            (format!(r#"{TOOLS},"tool_choice":{{"type":"function","function":{{"name":"nope"}}}}"#), "not among the tools: get_weather"),
            (r#""tool_choice":"required""#.to_string(), "tool_choice needs tools"),
            (r#""response_format":{"type":"yaml"}"#.to_string(), "response_format type \"yaml\" is not supported"),
            (r#""response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object","patternProperties":{}}}}"#.to_string(), "\"patternProperties\" (at #) is not supported"),
            (format!(r#"{TOOLS},"tool_choice":"required","response_format":{{"type":"json_object"}}"#), "cannot both hold"),
        ] {
            let e = chat_with(&extra).unwrap_err();
            assert!(e.message.contains(said), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn an_answer_with_a_call_has_tool_calls_and_their_finish_reason() {
        let mut answer = Answer::new(Kind::Chat, "m", 3);
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        // Without tools in the request, the text is just text.
        let plain = answer.whole(text, StopReason::Eos, 9, 0);
        assert_eq!(plain["choices"][0]["message"]["content"], text);
        answer.tool_calls = true;
        let whole = answer.whole(text, StopReason::Eos, 9, 0);
        let choice = &whole["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        let id = call["id"].as_str().unwrap();
        assert!(
            id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{id}"
        );
        let chunks = answer.call_chunks(&crate::tool_calls::parse(text).unwrap().1);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"],
            0
        );
    }

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
        let system = ChatMessage::new("system", "ab");
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
