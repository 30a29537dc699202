//! OpenAI's Responses API (`/v1/responses`): a string or items as input,
//! `instructions`, function tools, `text.format`, streaming with its typed
//! events, and `previous_response_id`: the conversation of each stored response
//! is kept a while (an hour, at most [`MAX_STORED`] of them and
//! [`MAX_STORED_BYTES`] of text, least recently used first out), so a client
//! sends only its new turn; its prefix routes it to the worker that holds it.

mod answer;
mod store;

pub use answer::{respond, Answer};
use store::not_found;
pub use store::{Store, KEEP_FOR, MAX_STORED, MAX_STORED_BYTES};

use crate::protocol::{
    ApiError, ChatMessage, Constraint, FunctionCall, InferenceRequest, SamplingParams, Tool,
    ToolCall,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub use crate::openai::error;

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    model: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f32>,
    top_logprobs: Option<u32>,
    top_p: Option<f32>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Fields that cannot change the answer.
const HARMLESS: &[&str] = &[
    "user",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// A request rbee can run, and what its response object repeats.
#[derive(Debug)]
pub struct Prepared {
    pub model: String,
    pub inference: InferenceRequest,
    pub stream: bool,
    pub tool_calls: bool,
    /// The output text carries its tokens' log-probabilities.
    logprobs: bool,
    /// The conversation so far, with this turn's input (not the instructions).
    conversation: Vec<ChatMessage>,
    /// What the response object echoes of the request.
    echo: Value,
    store: bool,
}

/// Checks a `/v1/responses` request; `previous_response_id` is looked up in `store`.
pub fn parse(body: &[u8], store: &Store) -> Result<Prepared, ApiError> {
    let mut req: Request = crate::protocol::parse_json(body)?;
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "model is required"));
    }
    let mut rest = std::mem::take(&mut req.rest);
    let logprobs = logprobs_of(rest.remove("include"), req.top_logprobs)?;
    refuse_unhonoured(rest)?;
    let sampling = sampling_of(&req)?;
    let mut conversation = match &req.previous_response_id {
        Some(id) => store
            .take_messages(id)
            .ok_or_else(|| ApiError::invalid("previous_response_id", not_found(id).message))?,
        None => Vec::new(),
    };
    conversation.extend(input(req.input)?);
    if conversation.is_empty() {
        return Err(ApiError::invalid("input", "input is required"));
    }
    let tools: Vec<Tool> = req.tools.iter().map(tool).collect::<Result<_, _>>()?;
    let choice = req.tool_choice.as_ref().map(tool_choice).transpose()?;
    let (tools, tool_constraint) =
        crate::openai::tools_of(tools, choice.as_ref(), req.parallel_tool_calls)?;
    let format = text_format(req.text.as_ref())?;
    if tool_constraint.is_some() && format.is_some() {
        return Err(ApiError::invalid(
            "text",
            "a tool_choice that requires a call and a text.format cannot both hold: give one",
        ));
    }
    let mut messages: Vec<ChatMessage> = req
        .instructions
        .iter()
        .map(|i| ChatMessage::new("system", i.clone()))
        .collect();
    messages.extend(conversation.iter().cloned());
    let echo = json!({"instructions": req.instructions, "previous_response_id": req.previous_response_id,
        "max_output_tokens": req.max_output_tokens, "temperature": req.temperature.unwrap_or(1.0),
        "top_p": req.top_p.unwrap_or(1.0), "tools": req.tools, "tool_choice": req.tool_choice.unwrap_or(json!("auto")),
        "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(false),
        "text": req.text.unwrap_or(json!({"format": {"type": "text"}})),
        "metadata": req.metadata.unwrap_or(json!({})), "store": req.store.unwrap_or(true)});
    Ok(Prepared {
        model: req.model,
        tool_calls: !tools.is_empty(),
        inference: InferenceRequest {
            messages: Some(messages),
            sampling,
            tools,
            constraint: tool_constraint.or(format),
            logprobs,
            ..InferenceRequest::default()
        },
        stream: req.stream,
        logprobs: logprobs.is_some(),
        conversation,
        echo,
        store: req.store.unwrap_or(true),
    })
}

/// Fields rbee does not honour refused by name; `truncation` and
/// `reasoning` pass only at their off values (no truncation, no reasoning).
fn refuse_unhonoured(mut rest: Map<String, Value>) -> Result<(), ApiError> {
    for name in ["truncation", "reasoning"] {
        let off = match rest.get(name) {
            Some(Value::String(s)) => s == "disabled",
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.values().all(Value::is_null),
            _ => true,
        };
        if off {
            rest.remove(name);
        }
    }
    crate::protocol::refuse_unhonoured(&rest, HARMLESS)
}

/// The request's sampling, OpenAI's defaults (temperature 1, no top-k), checked.
fn sampling_of(req: &Request) -> Result<SamplingParams, ApiError> {
    let sampling = SamplingParams {
        max_tokens: req.max_output_tokens,
        temperature: Some(req.temperature.unwrap_or(1.0)),
        top_p: req.top_p,
        top_k: Some(0),
        ..SamplingParams::default()
    };
    sampling.validate().map_err(|e| match e.param.as_deref() {
        Some("max_tokens") => ApiError::invalid(
            "max_output_tokens",
            e.message.replace("max_tokens", "max_output_tokens"),
        ),
        _ => e,
    })?;
    Ok(sampling)
}

/// What `include` may name: the output text's log-probabilities, which
/// rbee gives, and what belongs to outputs rbee never makes (so there is
/// nothing to add).
const INCLUDABLE: &[&str] = &[
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
];

/// `include` and `top_logprobs`: how many alternatives each output token's
/// log-probability comes with, or `None` when they are not asked for.
fn logprobs_of(include: Option<Value>, top: Option<u32>) -> Result<Option<u32>, ApiError> {
    let names: Vec<String> = match include {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v)
            .map_err(|_| ApiError::invalid("include", "include must be a list of names"))?,
    };
    if let Some(bad) = names.iter().find(|n| !INCLUDABLE.contains(&n.as_str())) {
        return Err(ApiError::invalid(
            "include",
            format!("include cannot name {bad:?}: {}", INCLUDABLE.join(", ")),
        ));
    }
    let top = top
        .map(|n| crate::protocol::check_alternatives("top_logprobs", n))
        .transpose()?;
    let asked = names.iter().any(|n| n == "message.output_text.logprobs");
    Ok((asked || top.is_some_and(|n| n > 0)).then(|| top.unwrap_or(0)))
}

/// `input`: a string (one user message) or a list of items: messages (text
/// parts), `function_call`s and their `function_call_output`s.
fn input(input: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::invalid("input", m);
    let items = match input {
        Value::String(s) => return Ok(vec![ChatMessage::new("user", s)]),
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => {
            return Err(bad(format!(
                "input must be text or a list of items, not {other}"
            )))
        }
    };
    let mut out: Vec<ChatMessage> = Vec::new();
    for item in items {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer" | "system") => "system",
                    Some(r @ ("user" | "assistant")) => r,
                    other => return Err(bad(format!("unknown role {other:?}: use user, assistant, system or developer"))),
                };
                out.push(ChatMessage::new(role, content(item.get("content").unwrap_or(&Value::Null))?));
            }
            "function_call" => {
                let call = ToolCall {
                    id: text(&item["call_id"]),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: text(&item["name"]),
                        arguments: text(&item["arguments"]),
                    },
                };
                match out.last_mut().filter(|m| m.role == "assistant") {
                    Some(m) => m.tool_calls.push(call),
                    None => {
                        let mut m = ChatMessage::new("assistant", "");
                        m.tool_calls.push(call);
                        out.push(m);
                    }
                }
            }
            "function_call_output" => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    other => content(other)?,
                };
                let mut m = ChatMessage::new("tool", output);
                m.tool_call_id = item["call_id"].as_str().map(str::to_string);
                out.push(m);
            }
            other => return Err(bad(format!("input items of type {other:?} are not supported by rbee: use messages, function_call and function_call_output"))),
        }
    }
    Ok(out)
}

/// A message's content: text, or its text parts (`input_text`, `output_text`).
fn content(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("input_text" | "output_text" | "text") => {
                    Ok(p.get("text").and_then(Value::as_str).unwrap_or_default())
                }
                other => Err(ApiError::invalid(
                    "input",
                    format!(
                        "content parts of type {} are not supported: rbee's workers read text",
                        other.unwrap_or("untyped")
                    ),
                )),
            })
            .collect(),
        other => Err(ApiError::invalid(
            "input",
            format!("content must be text or parts, not {other}"),
        )),
    }
}

/// A Responses function tool (`{"type":"function","name",…}`, flat) as rbee's.
fn tool(t: &Value) -> Result<Tool, ApiError> {
    match t.get("type").and_then(Value::as_str) {
        Some("function") => Ok(Tool {
            kind: "function".into(),
            function: crate::protocol::FunctionDef {
                name: t
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                parameters: t.get("parameters").cloned().filter(|p| !p.is_null()),
            },
        }),
        other => Err(ApiError::invalid(
            "tools",
            format!(
                "tools of type {} are not supported: rbee runs the client's own functions",
                other.unwrap_or("untyped")
            ),
        )),
    }
}

/// `tool_choice` in Chat Completions' terms, which `openai::tools_of` reads.
fn tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => Ok(
            json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}}),
        ),
        other => Err(ApiError::invalid(
            "tool_choice",
            format!("tool_choice must be auto, none, required or a function, not {other}"),
        )),
    }
}

/// `text.format`: text, `json_object`, or `json_schema` with its `schema`.
fn text_format(text: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    let Some(format) = text.and_then(|t| t.get("format")) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = format.get("schema").cloned().unwrap_or(Value::Null);
            crate::schema::check(&schema, "text")?;
            Ok(Some(Constraint::JsonSchema { schema }))
        }
        Some(other) => Err(ApiError::invalid(
            "text",
            format!(
                "text.format type {other:?} is not supported: use text, json_object or json_schema"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Ending;
    use crate::protocol::StopReason;

    fn parse_json(v: Value, store: &Store) -> Result<Prepared, ApiError> {
        parse(v.to_string().as_bytes(), store)
    }

    #[test]
    fn input_items_become_messages_and_a_previous_response_continues() {
        let store = Store::default();
        let p = parse_json(json!({"model": "m", "instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "max_output_tokens": 9, "store": true, "user": "u", "truncation": "disabled"}), &store)
        .unwrap();
        let m = p.inference.messages.as_ref().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(p.inference.sampling.max_tokens, Some(9));
        assert!(p.tool_calls);

        let answer = Answer::new("m", 10, p, store.clone());
        let end = Ending {
            calls: vec![],
            reason: StopReason::Eos,
            tokens_out: 2,
            cached_tokens: 0,
            decode_time_ms: 1,
            decoded_tokens: 2,
            logprobs: vec![],
        };
        let response = answer.finish("It is sunny.", &end);
        assert_eq!(response["status"], "completed");
        assert_eq!(response["output"][0]["content"][0]["text"], "It is sunny.");
        let id = response["id"].as_str().unwrap();
        assert_eq!(store.get(id).unwrap()["id"], id);

        let next = parse_json(
            json!({"model": "m", "input": "And tomorrow?", "previous_response_id": id}),
            &store,
        )
        .unwrap();
        let m = next.inference.messages.unwrap();
        // The earlier turns without the earlier instructions, then the new one.
        assert_eq!(m.len(), 5);
        assert_eq!(
            (m[3].role.as_str(), m[4].content.as_str()),
            ("assistant", "And tomorrow?")
        );
        assert!(parse_json(
            json!({"model": "m", "input": "x", "previous_response_id": "resp_nope"}),
            &store
        )
        .is_err());
        assert!(store.delete(id).is_ok() && store.get(id).is_err());
    }

    #[test]
    fn what_rbee_does_not_honour_is_named() {
        let store = Store::default();
        for (extra, param) in [
            (json!({"reasoning": {"effort": "high"}}), "reasoning"),
            (json!({"tools": [{"type": "web_search"}]}), "tools"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input",
            ),
            (json!({"text": {"format": {"type": "yaml"}}}), "text"),
            (json!({"max_output_tokens": 0}), "max_output_tokens"),
            (
                json!({"include": ["message.output_txt.logprobs"]}),
                "include",
            ),
            (json!({"include": "everything"}), "include"),
            (json!({"top_logprobs": 21}), "top_logprobs"),
        ] {
            let mut body = json!({"model": "m", "input": "hi"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = parse_json(body, &store).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
    }

    #[test]
    fn logprobs_are_given_when_include_or_top_logprobs_asks() {
        let store = Store::default();
        for (extra, asked) in [
            (json!({}), None),
            (json!({"include": []}), None),
            (json!({"include": ["reasoning.encrypted_content"]}), None),
            (json!({"top_logprobs": 0}), None),
            (
                json!({"include": ["message.output_text.logprobs"]}),
                Some(0),
            ),
            (
                json!({"include": ["message.output_text.logprobs"], "top_logprobs": 3}),
                Some(3),
            ),
            (json!({"top_logprobs": 2}), Some(2)),
        ] {
            let mut body = json!({"model": "m", "input": "hi"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let p = parse_json(body, &store).unwrap();
            assert_eq!(p.inference.logprobs, asked, "{extra}");
            assert_eq!(p.logprobs, asked.is_some());
        }
    }
}
