//! Finding the tool calls in a model's answer, in the formats the common
//! model families write them: Hermes and Qwen (`<tool_call>{…}</tool_call>`,
//! also what rbee's own tool description asks for), Mistral
//! (`[TOOL_CALLS][{…}]`) and Llama 3.x (the answer is one JSON object,
//! `{"name", "parameters"}`, maybe after `<|python_tag|>`).

use crate::protocol::{FunctionCall, ToolCall};
use serde_json::Value;

/// The answer's text outside its calls, and the calls; `None` when it makes none.
pub fn parse(text: &str) -> Option<(String, Vec<ToolCall>)> {
    hermes(text)
        .or_else(|| mistral(text))
        .or_else(|| llama(text))
}

/// How much of `text` (what a stream holds) can go out now: all of it, or
/// up to where a call starts, or may start once more tokens come. At the
/// answer's start (`at_start`) a Llama-style JSON call may be anything that
/// opens with `{`, so that is held whole.
pub fn sendable(text: &str, at_start: bool) -> usize {
    const MARKERS: [&str; 3] = ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"];
    if at_start && may_start_a_call(text) {
        return 0;
    }
    if let Some(at) = MARKERS.iter().filter_map(|m| text.find(m)).min() {
        return at;
    }
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| MARKERS.iter().any(|m| m.starts_with(&text[i..])))
        .unwrap_or(text.len())
}

/// Whether `text`, the start of an answer, may still become a tool call:
/// what a stream holds back until it knows.
pub fn may_start_a_call(text: &str) -> bool {
    let t = text.trim_start();
    ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{"]
        .iter()
        .any(|m| m.starts_with(t) || t.starts_with(m))
}

fn hermes(text: &str) -> Option<(String, Vec<ToolCall>)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        content.push_str(&rest[..at]);
        let after = &rest[at + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        calls.push(call(&serde_json::from_str(body.trim()).ok()?)?);
        rest = next;
    }
    content.push_str(rest);
    (!calls.is_empty()).then(|| (content.trim().to_string(), calls))
}

fn mistral(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let (before, after) = text.split_once("[TOOL_CALLS]")?;
    let list: Value = serde_json::Deserializer::from_str(after.trim_start())
        .into_iter::<Value>()
        .next()?
        .ok()?;
    let calls: Vec<ToolCall> = match list {
        Value::Array(items) => items.iter().map(call).collect::<Option<_>>()?,
        one => vec![call(&one)?],
    };
    (!calls.is_empty()).then(|| (before.trim().to_string(), calls))
}

fn llama(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let t = text.trim();
    let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
    let value: Value = serde_json::from_str(t).ok()?;
    Some((String::new(), vec![call(&value)?]))
}

/// One call from `{"name", "arguments"|"parameters"}` (or OpenAI's
/// `{"function": {…}}`); the arguments become a JSON string.
fn call(v: &Value) -> Option<ToolCall> {
    let v = v.get("function").filter(|f| f.is_object()).unwrap_or(v);
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "{}".to_string(),
    };
    Some(ToolCall {
        id: call_id(),
        kind: "function".into(),
        function: FunctionCall { name, arguments },
    })
}

/// A call's id: nine letters and digits, the form every template accepts
/// (Mistral's insists on it).
fn call_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut n = crate::protocol::random_u64();
    (0..9)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_and_args(text: &str) -> Option<(String, Vec<(String, String)>)> {
        parse(text).map(|(content, calls)| {
            let calls = calls
                .into_iter()
                .map(|c| (c.function.name, c.function.arguments))
                .collect();
            (content, calls)
        })
    }

    #[test]
    fn hermes_and_qwen_calls_one_or_several_with_text_around() {
        assert_eq!(
            names_and_args("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
            Some((String::new(), vec![("get_weather".into(), r#"{"city":"Paris"}"#.into())]))
        );
        let two = names_and_args(
            "Let me check.\n<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"b\",\"arguments\":{\"x\":1}}</tool_call>",
        )
        .unwrap();
        assert_eq!(two.0, "Let me check.");
        assert_eq!(
            two.1,
            [("a".into(), "{}".into()), ("b".into(), r#"{"x":1}"#.into())]
        );
        // Cut off before its closing tag, a whole object still counts.
        assert!(names_and_args("<tool_call>{\"name\":\"a\",\"arguments\":{}}").is_some());
        assert_eq!(names_and_args("<tool_call>{\"name\": broken"), None);
    }

    #[test]
    fn mistral_and_llama_calls() {
        assert_eq!(
            names_and_args(
                "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]"
            ),
            Some((
                String::new(),
                vec![("get_weather".into(), r#"{"city":"Paris"}"#.into())]
            ))
        );
        assert_eq!(
            names_and_args(
                "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"
            ),
            Some((
                String::new(),
                vec![("get_weather".into(), r#"{"city":"Paris"}"#.into())]
            ))
        );
        assert_eq!(
            names_and_args("{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": \"{\\\"a\\\":1}\"}}"),
            Some((String::new(), vec![("f".into(), r#"{"a":1}"#.into())]))
        );
    }

    #[test]
    fn plain_answers_are_not_calls_and_streams_hold_only_what_may_become_one() {
        assert_eq!(parse("The weather in Paris is mild."), None);
        assert_eq!(parse("{\"answer\": 42}"), None);
        assert!(may_start_a_call("  <tool"));
        assert!(may_start_a_call("<tool_call>{\"na"));
        assert!(may_start_a_call("[TOOL_"));
        assert!(!may_start_a_call("The weather"));
        assert!(!may_start_a_call("<b>bold</b>"));
    }

    #[test]
    fn a_stream_sends_text_up_to_where_a_call_may_begin() {
        assert_eq!(sendable("The weather", true), 11);
        assert_eq!(sendable("<tool", true), 0);
        assert_eq!(sendable("{\"name\"", true), 0);
        // After text, JSON is text; a marker, whole or begun, is held.
        assert_eq!(sendable("{\"a\": 1}", false), 8);
        assert_eq!(sendable("Let me check. <tool", false), 14);
        assert_eq!(sendable("Let me check. <tool_call>{\"na", false), 14);
        assert_eq!(sendable("a [TOOL_", false), 2);
        assert_eq!(sendable("x < y", false), 5);
    }
}
