//! The OpenAI-compatible API: its wire types, request checks, and the shapes
//! of its answers, streamed (`chat.completion.chunk` / `text_completion`) or
//! whole. The worker serves it for its one model; the queen routes it by
//! `model`, runs it as a job (so a lost worker is replaced mid-answer), and
//! answers from the job's inference events with the same shapes.

mod answer;

pub use answer::{embeddings, model_list, model_object, respond, Answer};

use crate::http::{self, Body};
use crate::protocol::{
    ApiError, ChatMessage, Constraint, InferenceRequest, SamplingParams, Tool, ToolCall,
};
use hyper::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
            400 | 413 | 422 => "invalid_request_error",
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

/// `POST /v1/chat/completions` and `POST /v1/completions`. A field rbee does
/// not honour is refused naming it, unless it cannot change the answer.
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
    /// llama-server's GBNF grammar on the output (rule `root` first).
    #[serde(default)]
    pub grammar: Option<String>,
    /// Chat: `true` for each token's log-probability; completions: a number,
    /// how many alternatives with it.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Chat: how many alternatives with each token's log-probability.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Every other field: refused unless it leaves the answer as it is.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// Fields OpenAI's clients send that do not change an answer: accepted.
pub const HARMLESS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

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
    /// The answer carries its tokens' log-probabilities.
    pub logprobs: bool,
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
    let req: CompletionRequest = crate::protocol::parse_json(body)?;
    crate::protocol::refuse_unhonoured(&req.rest, HARMLESS)?;
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
        Kind::Chat => (String::new(), Some(chat_messages(req.messages)?)),
        Kind::Completion => (completion_prompt(req.prompt)?, None),
    };
    let (tools, tool_constraint) = tools_of(
        req.tools.unwrap_or_default(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let format = format_of(req.grammar, req.response_format.as_ref())?;
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
    let logprobs = logprobs_of(kind, req.logprobs.as_ref(), req.top_logprobs)?;
    Ok(Prepared {
        tool_calls: !tools.is_empty(),
        logprobs: logprobs.is_some(),
        inference: InferenceRequest {
            prompt,
            messages: chat,
            sampling,
            cache_prompt: req.cache_prompt,
            tools,
            constraint: tool_constraint.or(format),
            logprobs,
            ..InferenceRequest::default()
        },
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Chat's `messages`, each role read as the chat template knows it.
fn chat_messages(messages: Option<Vec<Message>>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::invalid("messages", m);
    let messages = messages.ok_or_else(|| bad("messages is required".into()))?;
    if messages.is_empty() {
        return Err(bad("messages is empty".into()));
    }
    let mut chat = Vec::new();
    for m in messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(bad(format!(
                    "unknown role {other:?}: use system, user, assistant or tool"
                )))
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
    Ok(chat)
}

/// Completions' `prompt`: one string (alone, or alone in a list).
fn completion_prompt(prompt: Option<Value>) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::invalid("prompt", m);
    let prompt = match prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or("").to_string()
        }
        Some(Value::Array(_)) => return Err(bad("only one prompt per request is supported")),
        _ => return Err(bad("prompt must be a string")),
    };
    if prompt.is_empty() {
        return Err(bad("prompt is empty"));
    }
    Ok(prompt)
}

/// The answer's shape: a GBNF `grammar` (llama-server's field), or `response_format`.
fn format_of(
    grammar: Option<String>,
    format: Option<&Value>,
) -> Result<Option<Constraint>, ApiError> {
    match grammar {
        Some(_) if format.is_some() => Err(ApiError::invalid(
            "grammar",
            "a grammar and a response_format cannot both hold: give one",
        )),
        Some(gbnf) => {
            crate::gbnf::check(&gbnf).map_err(|e| ApiError::invalid("grammar", e))?;
            Ok(Some(Constraint::Grammar { gbnf }))
        }
        None => response_format(format),
    }
}

/// How many alternatives to send with each token's log-probability, if any:
/// chat's `logprobs: true` with `top_logprobs`, completions' `logprobs: N`.
fn logprobs_of(
    kind: Kind,
    logprobs: Option<&Value>,
    top: Option<u32>,
) -> Result<Option<u32>, ApiError> {
    let asked = match (kind, logprobs) {
        (_, None | Some(Value::Null) | Some(Value::Bool(false))) => {
            if top.is_some_and(|t| t > 0) {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
            return Ok(None);
        }
        (Kind::Chat, Some(Value::Bool(true))) => top.unwrap_or(0),
        (Kind::Completion, Some(Value::Number(n))) => n
            .as_u64()
            .map_or(u32::MAX, |n| n.min(u64::from(u32::MAX)) as u32),
        (Kind::Chat, Some(other)) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be true or false, not {other}"),
            ))
        }
        (Kind::Completion, Some(other)) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be a number of alternatives (0 to 20), not {other}"),
            ))
        }
    };
    let param = if kind == Kind::Chat {
        "top_logprobs"
    } else {
        "logprobs"
    };
    crate::protocol::check_alternatives(param, asked).map(Some)
}

/// The tools the model is shown, and the constraint `tool_choice` asks for:
/// none for `auto`; a call of any tool for `required`, of that one for a name;
/// `none` shows no tools at all.
pub(crate) fn tools_of(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;
    use serde_json::json;

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
            (
                chat(r#","min_p":0.1,"repeat_penalty":1.1,"repeat_last_n":-1,"typical_p":0.9"#),
                Kind::Chat,
                None,
            ),
            (
                chat(r#","mirostat":2,"mirostat_tau":4,"logit_bias":{"42":-100,"7":5}"#),
                Kind::Chat,
                None,
            ),
            (chat(r#","logit_bias":[[42,-100]]"#), Kind::Chat, None),
            (
                chat(r#","logit_bias":{"42":-101}"#),
                Kind::Chat,
                Some("logit_bias"),
            ),
            (chat(r#","min_p":2"#), Kind::Chat, Some("min_p")),
            (
                chat(r#","repeat_last_n":-2"#),
                Kind::Chat,
                Some("repeat_last_n"),
            ),
            (chat(r#","mirostat":3"#), Kind::Chat, Some("mirostat")),
            (
                chat(
                    r#","user":"u1","store":true,"metadata":{"a":"b"},"logprobs":false,"echo":null"#,
                ),
                Kind::Chat,
                None,
            ),
            (chat(r#","audio":{"voice":"x"}"#), Kind::Chat, Some("audio")),
            (
                chat(r#","logprobs":true,"top_logprobs":5"#),
                Kind::Chat,
                None,
            ),
            (
                chat(r#","logprobs":true,"top_logprobs":21"#),
                Kind::Chat,
                Some("top_logprobs"),
            ),
            (
                chat(r#","top_logprobs":2"#),
                Kind::Chat,
                Some("top_logprobs"),
            ),
            (
                r#"{"model":"m","prompt":"x","logprobs":3}"#.into(),
                Kind::Completion,
                None,
            ),
            (
                r#"{"model":"m","prompt":"x","logprobs":true}"#.into(),
                Kind::Completion,
                Some("logprobs"),
            ),
            (
                chat(r#","reasoning_effort":"low""#),
                Kind::Chat,
                Some("reasoning_effort"),
            ),
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
