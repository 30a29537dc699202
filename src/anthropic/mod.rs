//! Anthropic's Messages API (`POST /v1/messages`): its request read into
//! rbee's inference request — content blocks into chat messages, `tool_use`
//! and `tool_result` into calls and their answers, `tools` and `tool_choice`
//! into tools and constraints —, its answer whole or as its typed event stream
//! (`message_start` … `message_stop`, with pings: `answer.rs`), and its
//! error shape.

mod answer;

pub use answer::{respond, Answer};

use crate::http::{self, Body};
use crate::protocol::{
    ApiError, ChatMessage, FunctionCall, InferenceRequest, SamplingParams, Tool, ToolCall,
};
use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// An error in Anthropic's shape, with the status of its code.
pub fn error(e: ApiError) -> Response<Body> {
    http::json(http::status_of(e.code), &error_body(&e))
}

pub(crate) fn error_body(e: &ApiError) -> Value {
    let kind = match e.status() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": e.message}})
}

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    model: String,
    max_tokens: Option<i64>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    #[serde(default)]
    tools: Vec<AnthropicTool>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// Everything else: refused unless it cannot change the answer.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct AnthropicTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    /// Anthropic's own tools (`bash_…`, `web_search_…`) have a type.
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// Fields that cannot change the answer (rbee caches every prompt's prefix
/// anyway, so `cache_control` is a hint it already follows).
const HARMLESS: &[&str] = &[
    "metadata",
    "service_tier",
    "cache_control",
    "speed",
    "inference_geo",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
];

/// A request rbee can run, and how to answer it.
#[derive(Debug)]
pub struct Prepared {
    pub model: String,
    pub inference: InferenceRequest,
    pub stream: bool,
    pub tool_calls: bool,
}

/// Checks a `/v1/messages` request.
pub fn parse(body: &[u8]) -> Result<Prepared, ApiError> {
    let req: Request = crate::protocol::parse_json(body)?;
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "model: Field required"));
    }
    let max_tokens = req
        .max_tokens
        .ok_or_else(|| ApiError::invalid("max_tokens", "max_tokens: Field required"))?;
    let mut rest = req.rest;
    if let Some(t) = rest.remove("thinking") {
        if t.get("type").and_then(Value::as_str) != Some("disabled") {
            return Err(ApiError::invalid(
                "thinking",
                "thinking is not supported by rbee: its models do not reason apart from their answer",
            ));
        }
    }
    let format = output_format(rest.remove("output_config"))?;
    crate::protocol::refuse_unhonoured(&rest, HARMLESS)?;
    if let Some(t) = req.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 1, got {t}"),
        ));
    }
    let sampling = SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(req.temperature.unwrap_or(1.0)),
        top_p: req.top_p,
        top_k: Some(req.top_k.unwrap_or(0)),
        stop: req.stop_sequences,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let mut messages = system(req.system)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    for m in req.messages {
        messages.extend(message(m)?);
    }
    let tools: Vec<Tool> = req.tools.into_iter().map(tool).collect::<Result<_, _>>()?;
    let choice = tool_choice(req.tool_choice.as_ref())?;
    let (tools, constraint) = crate::openai::tools_of(tools, choice.as_ref(), None)?;
    if constraint.is_some() && format.is_some() {
        return Err(ApiError::invalid(
            "output_config",
            "a tool_choice that requires a call and an output format cannot both hold: give one",
        ));
    }
    let constraint = constraint.or(format);
    Ok(Prepared {
        model: req.model,
        tool_calls: !tools.is_empty(),
        inference: InferenceRequest {
            messages: Some(messages),
            sampling,
            tools,
            constraint,
            ..InferenceRequest::default()
        },
        stream: req.stream,
    })
}

/// `output_config`: its `format` (a JSON schema the answer follows); an
/// `effort` other than null is refused, as rbee's models have no such setting.
fn output_format(config: Option<Value>) -> Result<Option<crate::protocol::Constraint>, ApiError> {
    let Some(Value::Object(mut config)) = config else {
        return Ok(None);
    };
    let format = config.remove("format");
    crate::protocol::refuse_unhonoured(&config, &[])?;
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(f) if f.get("type").and_then(Value::as_str) == Some("json_schema") => {
            let schema = f.get("schema").cloned().unwrap_or(Value::Null);
            crate::schema::check(&schema, "output_config")?;
            Ok(Some(crate::protocol::Constraint::JsonSchema { schema }))
        }
        Some(other) => Err(ApiError::invalid(
            "output_config",
            format!("output_config.format must be {{\"type\": \"json_schema\", \"schema\": …}}, not {other}"),
        )),
    }
}

/// Checks a `/v1/messages/count_tokens` request (a message request without
/// `max_tokens`): the model, and the chat messages and tools to count.
pub fn parse_count(body: &[u8]) -> Result<Prepared, ApiError> {
    let mut v: Value = crate::protocol::parse_json(body)?;
    if let Some(o) = v.as_object_mut() {
        o.entry("max_tokens").or_insert(json!(1));
    }
    parse(v.to_string().as_bytes())
}

/// `count_tokens`' answer.
pub fn counted(input_tokens: usize) -> Value {
    json!({ "input_tokens": input_tokens })
}

/// The text of content: a string, or its `text` blocks (other kinds named).
fn text_of(content: &Value, field: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for b in blocks {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    other => return Err(unsupported_block(other, field)),
                }
            }
            Ok(text)
        }
        Value::Null => Ok(String::new()),
        other => Err(ApiError::invalid(
            field,
            format!("{field} must be text or a list of blocks, not {other}"),
        )),
    }
}

fn unsupported_block(kind: Option<&str>, field: &str) -> ApiError {
    let kind = kind.unwrap_or("untyped");
    let why = match kind {
        "image" | "document" => "rbee's workers run text models",
        _ => "rbee reads text, tool_use and tool_result blocks",
    };
    ApiError::invalid(field, format!("{kind} blocks are not supported: {why}"))
}

fn system(system: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    match system {
        None => Ok(Vec::new()),
        Some(s) => {
            let text = text_of(&s, "system")?;
            Ok(vec![ChatMessage::new("system", text)])
        }
    }
}

/// One of Anthropic's messages as rbee's: a user's `tool_result` blocks
/// become `tool` messages (before the text beside them), an assistant's
/// `tool_use` blocks its calls.
fn message(m: Message) -> Result<Vec<ChatMessage>, ApiError> {
    let role = match m.role.as_str() {
        r @ ("user" | "assistant") => r,
        other => {
            return Err(ApiError::invalid(
                "messages",
                format!(
                "unknown role {other:?}: use user or assistant (the system text goes in system)"
            ),
            ))
        }
    };
    let blocks = match m.content {
        Value::Array(blocks) => blocks,
        other => return Ok(vec![ChatMessage::new(role, text_of(&other, "messages")?)]),
    };
    let mut out = Vec::new();
    let mut said = ChatMessage::new(role, "");
    for b in blocks {
        match (role, b.get("type").and_then(Value::as_str)) {
            (_, Some("text")) => said
                .content
                .push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            ("assistant", Some("tool_use")) => said.tool_calls.push(ToolCall {
                id: b
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                kind: "function".into(),
                function: FunctionCall {
                    name: b
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    arguments: b.get("input").map_or("{}".to_string(), Value::to_string),
                },
            }),
            ("user", Some("tool_result")) => {
                let content = text_of(b.get("content").unwrap_or(&Value::Null), "messages")?;
                let mut answer = ChatMessage::new("tool", content);
                answer.tool_call_id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                out.push(answer);
            }
            // Earlier reasoning sent back is not shown to the model again.
            ("assistant", Some("thinking" | "redacted_thinking")) => {}
            (_, other) => return Err(unsupported_block(other, "messages")),
        }
    }
    if !said.content.is_empty() || !said.tool_calls.is_empty() || out.is_empty() {
        out.push(said);
    }
    Ok(out)
}

fn tool(t: AnthropicTool) -> Result<Tool, ApiError> {
    if let Some(kind) = t.kind.filter(|k| k != "custom") {
        return Err(ApiError::invalid(
            "tools",
            format!("tool type {kind:?} is not supported: rbee runs the client's own tools (name, description, input_schema)"),
        ));
    }
    Ok(Tool {
        kind: "function".into(),
        function: crate::protocol::FunctionDef {
            name: t.name,
            description: t.description,
            parameters: t.input_schema,
        },
    })
}

/// Anthropic's `tool_choice` in OpenAI's terms, which `openai::tools_of` reads.
fn tool_choice(choice: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(choice) = choice else {
        return Ok(None);
    };
    let kind = choice.get("type").and_then(Value::as_str);
    Ok(Some(match kind {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("tool_choice must be {{\"type\": auto, any, tool or none}}, not {choice}"),
            ))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn parse_json(v: Value) -> Result<Prepared, ApiError> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn blocks_become_messages_calls_and_answers() {
        let p = parse_json(json!({"model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "text", "text": "And?"}]}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}, "metadata": {"user_id": "u"}}))
        .unwrap();
        let m = p.inference.messages.unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(m[2].tool_calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert!(p.tool_calls && p.inference.constraint.is_some());
        assert_eq!(p.inference.sampling.max_tokens, Some(50));
    }

    #[test]
    fn what_rbee_does_not_honour_is_named() {
        let base =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        for (field, value, param) in [
            ("temperature", json!(1.5), "temperature"),
            (
                "thinking",
                json!({"type": "enabled", "budget_tokens": 1024}),
                "thinking",
            ),
            ("mcp_servers", json!([{}]), "mcp_servers"),
            (
                "messages",
                json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]),
                "messages",
            ),
            ("tool_choice", json!({"type": "sometimes"}), "tool_choice"),
        ] {
            let mut body = base.clone();
            body[field] = value;
            let e = parse_json(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{field}: {}", e.message);
        }
        let mut no_max = base.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(
            parse_json(no_max).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
        let e = error_body(&ApiError::new(ErrorCode::ModelNotFound, "no such model"));
        assert_eq!(
            e,
            json!({"type": "error", "error": {"type": "not_found_error", "message": "no such model"}})
        );
    }
}
