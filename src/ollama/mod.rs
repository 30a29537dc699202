//! Ollama's API (its docs/api.md): the requests of `/api/chat` and
//! `/api/generate` read into rbee's inference request — `options` into the one
//! set of sampling fields, `format` and `tools` into constraints —, and errors
//! in its shape, `{"error": "…"}`. The queen serves it for every model in the
//! cluster, the worker for its own; `answer.rs` puts answers and listings into
//! Ollama's shapes.

mod answer;

pub use answer::{
    alias_tagged, embed, embeddings, loaded, model_details, ps, respond, show, tagged, tags, Answer,
};

use crate::http::{self, Body};
use crate::protocol::{
    ApiError, ChatMessage, Constraint, FunctionCall, InferenceRequest, SamplingParams, Tool,
    ToolCall,
};
use hyper::Response;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;

/// The Ollama version rbee's API matches, for clients that check it.
pub const VERSION: &str = "0.12.0";

/// An error in Ollama's shape, with the status of its code.
pub fn error(e: ApiError) -> Response<Body> {
    http::json(
        http::status_of(e.code),
        &serde_json::json!({ "error": e.message }),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Generate,
}

/// How long the worker stays after the request (`keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// `0`: stopped once the answer is sent.
    Unload,
    For(Duration),
    /// A negative value: until it is stopped.
    Forever,
}

/// A request rbee can run, and how to answer it.
#[derive(Debug)]
pub struct Prepared {
    pub model: String,
    pub inference: InferenceRequest,
    pub stream: bool,
    /// The answer may hold tool calls.
    pub tool_calls: bool,
    pub keep_alive: Option<KeepAlive>,
    /// `/api/generate` with no prompt: load the model (or, with `keep_alive` 0, unload it).
    pub load_only: bool,
    /// The answer carries its tokens' log-probabilities.
    pub logprobs: bool,
}

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    /// Everything else: refused unless harmless.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<OllamaCall>>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    /// The tool a `tool` message answers.
    #[serde(default)]
    tool_name: Option<String>,
    /// A thinking model's reasoning, sent back: not shown to the model again.
    #[serde(default)]
    #[allow(dead_code)]
    thinking: Option<String>,
}

/// A call as Ollama writes it: the arguments as an object.
#[derive(Debug, Deserialize)]
struct OllamaCall {
    function: OllamaFunction,
}

#[derive(Debug, Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Options that only tune how a model is loaded and run (rbee places and
/// sizes its workers itself): accepted, since they cannot change an answer.
const LOAD_OPTIONS: &[&str] = &[
    "numa",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
];

/// Ollama's defaults where they differ from llama.cpp's.
const DEFAULT_TOP_P: f32 = 0.9;
const DEFAULT_REPEAT_PENALTY: f32 = 1.1;

/// The model a request names, read without judging the rest.
pub fn model_of(body: &[u8]) -> String {
    crate::openai::model_of(body).unwrap_or_default()
}

/// Checks an `/api/chat` or `/api/generate` request.
pub fn parse(body: &[u8], kind: Kind) -> Result<Prepared, ApiError> {
    let req: Request = crate::protocol::parse_json(body)?;
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "model is required"));
    }
    let mut rest = req.rest;
    // Fields of the other endpoint, or ones Ollama itself ignores here.
    let foreign = match kind {
        Kind::Chat => ["prompt", "system", "raw"],
        Kind::Generate => ["messages", "tools", "tool_choice"],
    };
    rest.remove("think")
        .filter(|t| t != &Value::Bool(false) && !t.is_null())
        .map_or(Ok(()), |_| {
            Err(ApiError::invalid(
                "think",
                "think is not supported by rbee: its models do not reason apart from their answer",
            ))
        })?;
    crate::protocol::refuse_unhonoured(&rest, &[])?;
    let keep_alive = req.keep_alive.as_ref().map(keep_alive).transpose()?;
    let logprobs = logprobs_of(req.logprobs, req.top_logprobs)?;
    let (sampling, context_limit) = options(req.options.unwrap_or_default())?;
    let constraint = format(req.format.as_ref())?;
    let (tools, _) = crate::openai::tools_of(req.tools.unwrap_or_default(), None, None)?;
    let (prompt, messages) = match kind {
        Kind::Chat => {
            if req.prompt.is_some() || req.system.is_some() || req.raw.is_some() {
                return Err(ApiError::invalid(
                    foreign[0],
                    "prompt, system and raw belong to /api/generate: /api/chat takes messages",
                ));
            }
            let messages = chat_messages(req.messages.unwrap_or_default())?;
            (String::new(), Some(messages))
        }
        Kind::Generate => {
            if req.messages.is_some() || !tools.is_empty() {
                return Err(ApiError::invalid(
                    foreign[0],
                    "messages and tools belong to /api/chat: /api/generate takes a prompt",
                ));
            }
            generated(req.prompt.unwrap_or_default(), req.system, req.raw)?
        }
    };
    let load_only = match (&messages, kind) {
        (Some(m), Kind::Chat) => m.is_empty(),
        _ => prompt.is_empty(),
    };
    let messages = messages.filter(|_| !load_only);
    let prompt = if messages.is_some() {
        String::new()
    } else {
        prompt
    };
    Ok(Prepared {
        model: req.model,
        tool_calls: !tools.is_empty(),
        inference: InferenceRequest {
            prompt,
            messages,
            sampling,
            context_limit,
            tools,
            constraint,
            logprobs,
            ..InferenceRequest::default()
        },
        logprobs: logprobs.is_some(),
        stream: req.stream.unwrap_or(true),
        keep_alive,
        load_only,
    })
}

/// `logprobs` and `top_logprobs`: how many alternatives each token's
/// log-probability comes with, or `None` when not asked.
fn logprobs_of(logprobs: Option<bool>, top: Option<u32>) -> Result<Option<u32>, ApiError> {
    let top = crate::protocol::check_alternatives("top_logprobs", top.unwrap_or(0))?;
    match (logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top)),
        (false, 0) => Ok(None),
        (false, _) => Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
    }
}

/// `/api/generate`'s prompt: as it is (`raw`), else a user message through
/// the chat template, after its `system` message if any.
fn generated(
    prompt: String,
    system: Option<String>,
    raw: Option<bool>,
) -> Result<(String, Option<Vec<ChatMessage>>), ApiError> {
    match (raw.unwrap_or(false), system) {
        (true, Some(_)) => Err(ApiError::invalid(
            "system",
            "a raw prompt goes to the model as it is: put the system text in it",
        )),
        (true, None) => Ok((prompt, None)),
        (false, system) => {
            let mut messages: Vec<ChatMessage> = system
                .map(|s| ChatMessage::new("system", s))
                .into_iter()
                .collect();
            messages.push(ChatMessage::new("user", prompt.clone()));
            Ok((prompt, Some(messages)))
        }
    }
}

/// Ollama's messages as rbee's: an assistant's calls with their arguments as
/// a JSON string, each given an id that the `tool` answers after it take in turn.
fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::invalid("messages", m);
    let mut out = Vec::with_capacity(messages.len());
    let mut unanswered: std::collections::VecDeque<ToolCall> = Default::default();
    for m in messages {
        if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::invalid(
                "images",
                "images are not supported by rbee: its workers run text models",
            ));
        }
        let role = match m.role.as_str() {
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => {
                return Err(bad(format!(
                    "unknown role {other:?}: use system, user, assistant or tool"
                )))
            }
        };
        let mut message = ChatMessage::new(role, m.content.unwrap_or_default());
        for (i, call) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
            let arguments = match call.function.arguments {
                Value::String(s) => s,
                Value::Null => "{}".to_string(),
                other => other.to_string(),
            };
            let call = ToolCall {
                id: format!("call_{}_{i}", out.len()),
                kind: "function".into(),
                function: FunctionCall {
                    name: call.function.name,
                    arguments,
                },
            };
            unanswered.push_back(call.clone());
            message.tool_calls.push(call);
        }
        if role == "tool" {
            let answered = match &m.tool_name {
                Some(name) => unanswered
                    .iter()
                    .position(|c| &c.function.name == name)
                    .and_then(|i| unanswered.remove(i)),
                None => unanswered.pop_front(),
            };
            message.tool_call_id = answered.map(|c| c.id);
        }
        out.push(message);
    }
    Ok(out)
}

/// `options` as rbee's sampling fields (Ollama's names and defaults), and
/// `num_ctx` as the most context the request may use.
fn options(mut o: Map<String, Value>) -> Result<(SamplingParams, Option<u32>), ApiError> {
    let num_ctx = match o.remove("num_ctx") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "num_ctx",
                        format!("num_ctx must be a positive number of tokens, got {v}"),
                    )
                })?,
        ),
    };
    let num_predict = o.remove("num_predict");
    for name in LOAD_OPTIONS {
        o.remove(*name);
    }
    let mut sampling: SamplingParams = serde_json::from_value(Value::Object(o.clone()))
        .map_err(|e| ApiError::invalid("options", format!("options: {e}")))?;
    // What SamplingParams knows is honoured; anything else is named.
    let known = serde_json::to_value(&sampling).unwrap_or_default();
    for name in o.keys() {
        let empty = o[name].is_null() || o[name] == Value::Array(Vec::new());
        let honoured = known.get(name).is_some() || empty;
        if !honoured || ["max_tokens", "logit_bias"].contains(&name.as_str()) {
            return Err(ApiError::invalid(
                name,
                format!("option {name} is not supported by rbee: leave it out"),
            ));
        }
    }
    sampling.max_tokens = match num_predict {
        None | Some(Value::Null) => None,
        // -1: until the end; -2: until the context is full.
        Some(v) if v.as_i64().is_some_and(|n| n == -1 || n == -2) => None,
        Some(v) => Some(v.as_i64().filter(|&n| n > 0).ok_or_else(|| {
            ApiError::invalid(
                "num_predict",
                format!("num_predict must be -1, -2 or a positive number, got {v}"),
            )
        })?),
    };
    if sampling.seed.is_some_and(|s| s < 0) {
        sampling.seed = None;
    }
    sampling.top_p.get_or_insert(DEFAULT_TOP_P);
    sampling
        .repeat_penalty
        .get_or_insert(DEFAULT_REPEAT_PENALTY);
    sampling.validate()?;
    Ok((sampling, num_ctx))
}

/// `format`: `"json"`, a JSON schema, or nothing.
fn format(format: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Constraint::JsonObject)),
        Some(schema @ Value::Object(_)) => {
            crate::schema::check(schema, "format")?;
            Ok(Some(Constraint::JsonSchema {
                schema: schema.clone(),
            }))
        }
        Some(other) => Err(ApiError::invalid(
            "format",
            format!("format must be \"json\" or a JSON schema, not {other}"),
        )),
    }
}

#[derive(Deserialize)]
struct EmbedRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    input: Option<Value>,
    /// `/api/embeddings`' one text.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `/api/embed` (`input`: a text or a list) or the older `/api/embeddings`
/// (`prompt`) as OpenAI's embeddings request, and the model it names. Inputs
/// longer than the model's context are refused, never truncated.
pub fn embed_request(
    body: &[u8],
    older: bool,
) -> Result<(String, crate::protocol::EmbeddingsRequest), ApiError> {
    let req: EmbedRequest = crate::protocol::parse_json(body)?;
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "model is required"));
    }
    if req.truncate == Some(true) {
        return Err(ApiError::invalid(
            "truncate",
            "truncate is not supported by rbee: an input longer than the context is refused; send truncate: false",
        ));
    }
    crate::protocol::refuse_unhonoured(&req.rest, &[])?;
    if let Some(k) = &req.keep_alive {
        keep_alive(k)?;
    }
    let mut options = req.options.unwrap_or_default();
    for name in LOAD_OPTIONS {
        options.remove(*name);
    }
    options.remove("num_ctx");
    crate::protocol::refuse_unhonoured(&options, &[])?;
    let input = match (older, req.input, req.prompt) {
        (true, _, Some(p)) => Value::String(p),
        (false, Some(i), _) => i,
        (true, _, None) => return Err(ApiError::invalid("prompt", "prompt is required")),
        (false, None, _) => return Err(ApiError::invalid("input", "input is required")),
    };
    let request = serde_json::from_value(serde_json::json!({"model": req.model, "input": input}))
        .map_err(|e| {
        ApiError::invalid(
            "input",
            format!("input must be a text or a list of texts: {e}"),
        )
    })?;
    Ok((req.model, request))
}

/// `keep_alive`: seconds, or a duration such as `"5m"`, `"1h30m"`, `"-1"`.
pub fn keep_alive(v: &Value) -> Result<KeepAlive, ApiError> {
    let bad = || {
        ApiError::invalid(
            "keep_alive",
            format!("keep_alive must be seconds or a duration such as \"5m\", not {v}"),
        )
    };
    let seconds: f64 = match v {
        Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(n) => n,
            Err(_) if s.trim().starts_with('-') => -1.0,
            Err(_) => go_duration(s.trim()).ok_or_else(bad)?,
        },
        _ => return Err(bad()),
    };
    Ok(if seconds < 0.0 {
        KeepAlive::Forever
    } else if seconds == 0.0 {
        KeepAlive::Unload
    } else {
        KeepAlive::For(Duration::from_secs_f64(seconds.min(1e9)))
    })
}

/// Go's duration text, as Ollama reads it: `1h30m`, `90s`, `500ms`.
fn go_duration(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: &str) -> Result<Prepared, ApiError> {
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
        parse(body.as_bytes(), Kind::Chat)
    }

    #[test]
    fn options_become_sampling_with_ollamas_defaults() {
        let p = chat(r#","options":{"temperature":0,"num_predict":7,"top_k":5,"min_p":0.05,"seed":3,"stop":["x"],"num_ctx":2048,"num_thread":8}"#).unwrap();
        let s = &p.inference.sampling;
        assert_eq!(s.temperature, Some(0.0));
        assert_eq!(s.max_tokens, Some(7));
        assert_eq!((s.top_k, s.min_p, s.seed), (Some(5), Some(0.05), Some(3)));
        assert_eq!(s.stop, vec!["x".to_string()]);
        assert_eq!((s.top_p, s.repeat_penalty), (Some(0.9), Some(1.1)));
        assert_eq!(p.inference.context_limit, Some(2048));
        assert!(p.stream, "Ollama streams unless told not to");
        let p = chat(r#","options":{"num_predict":-1,"seed":-1},"stream":false"#).unwrap();
        assert_eq!(p.inference.sampling.max_tokens, None);
        assert_eq!(p.inference.sampling.seed, None);
        assert!(!p.stream);
    }

    #[test]
    fn what_rbee_does_not_honour_is_named() {
        for (extra, param) in [
            (r#","options":{"tfs_z":0.5}"#, "tfs_z"),
            (
                r#","options":{"penalize_newline":true}"#,
                "penalize_newline",
            ),
            (r#","options":{"temperature":9}"#, "temperature"),
            (r#","options":{"num_ctx":0}"#, "num_ctx"),
            (r#","think":true"#, "think"),
            (r#","logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#","format":"yaml""#, "format"),
            (r#","keep_alive":"soon""#, "keep_alive"),
            (r#","prompt":"x""#, "prompt"),
        ] {
            let e = chat(extra).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi","images":["aGk="]}]}"#;
        let e = parse(body.as_bytes(), Kind::Chat).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("images"));
        assert!(chat(r#","think":false,"format":"""#).is_ok());
    }

    #[test]
    fn generate_wraps_the_prompt_in_the_chat_template_unless_raw() {
        let p = parse(
            br#"{"model":"m","prompt":"hi","system":"be brief"}"#,
            Kind::Generate,
        )
        .unwrap();
        let m = p.inference.messages.unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[1].content.as_str()),
            ("system", "hi")
        );
        let p = parse(br#"{"model":"m","prompt":"hi","raw":true}"#, Kind::Generate).unwrap();
        assert_eq!(
            (p.inference.prompt.as_str(), p.inference.messages),
            ("hi", None)
        );
        let p = parse(br#"{"model":"m","keep_alive":0}"#, Kind::Generate).unwrap();
        assert!(p.load_only);
        assert_eq!(p.keep_alive, Some(KeepAlive::Unload));
        assert_eq!(p.inference.messages, None);
    }

    #[test]
    fn tool_calls_and_their_answers_are_paired() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"weather?"},
            {"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Paris"}}}]},
            {"role":"tool","content":"sunny","tool_name":"get_weather"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]}"#;
        let p = parse(body.as_bytes(), Kind::Chat).unwrap();
        let m = p.inference.messages.unwrap();
        assert_eq!(m[1].tool_calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert_eq!(
            m[2].tool_call_id.as_deref(),
            Some(m[1].tool_calls[0].id.as_str())
        );
        assert!(p.tool_calls);
    }

    #[test]
    fn keep_alive_reads_seconds_and_go_durations() {
        use serde_json::json;
        let k = |v: Value| keep_alive(&v).unwrap();
        assert_eq!(k(json!(0)), KeepAlive::Unload);
        assert_eq!(k(json!("0")), KeepAlive::Unload);
        assert_eq!(k(json!(-1)), KeepAlive::Forever);
        assert_eq!(k(json!("-1m")), KeepAlive::Forever);
        assert_eq!(k(json!("1h30m")), KeepAlive::For(Duration::from_secs(5400)));
        assert_eq!(k(json!("90s")), KeepAlive::For(Duration::from_secs(90)));
        assert_eq!(k(json!(300)), KeepAlive::For(Duration::from_secs(300)));
        assert!(keep_alive(&json!("5 minutes")).is_err());
    }
}
