//! Chat templates as models ship them: the GGUF's `tokenizer.chat_template`
//! (Jinja) rendered with minijinja the way Hugging Face's `apply_chat_template`
//! does (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`,
//! `strftime_now`), with `messages`, `tools`, `add_generation_prompt`,
//! `bos_token` and `eos_token`.
//!
//! Tools a template cannot show are described in a system message in one
//! documented format (Hermes': a `<tools>` block of function signatures, and
//! calls answered as `<tool_call>{"name", "arguments"}</tool_call>`), and tool
//! results and past calls become plain messages the template can show.
//! No llama types here: the engine hands in the template's text.

use crate::protocol::{ChatMessage, Tool, ToolCall};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::json;

/// A model's template, compiled once.
pub struct Template {
    env: Environment<'static>,
    /// What the template can show itself: the `tools` variable, a `tool`
    /// role, and assistants' `tool_calls`.
    knows_tools: bool,
    knows_tool_role: bool,
    knows_tool_calls: bool,
    /// A BOS the template writes first, to take off again: the tokenizer adds its own.
    strip: Option<String>,
}

/// How much work one render may do, in minijinja's instructions: SmolLM2's
/// template over 10,000 messages takes about a tenth of it; a template that
/// loops without end stops here, on the engine thread, in about a second.
const TEMPLATE_FUEL: u64 = 5_000_000;

impl Template {
    /// Compiles `source`; the error says why it cannot be used.
    /// `tokenizer_adds_bos`: the tokenizer puts a BOS first by itself.
    pub fn new(
        source: &str,
        bos: &str,
        eos: &str,
        tokenizer_adds_bos: bool,
    ) -> Result<Template, String> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_global("bos_token", bos.to_string());
        env.add_global("eos_token", eos.to_string());
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(Template {
            env,
            knows_tools: source.contains("tools"),
            knows_tool_role: source.contains("'tool'") || source.contains("\"tool\""),
            knows_tool_calls: source.contains("tool_calls"),
            strip: (tokenizer_adds_bos && !bos.is_empty()).then(|| bos.to_string()),
        })
    }

    /// The prompt for `messages` (and `tools`), ending where the assistant's
    /// answer starts. A leading BOS is left to the tokenizer, which adds its own.
    pub fn render(&self, messages: &[ChatMessage], tools: &[Tool]) -> Result<String, String> {
        let messages = self.shown(messages, tools);
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let context = json!({
            "messages": messages.iter().map(message_value).collect::<Vec<_>>(),
            "tools": if tools.is_empty() || !self.knows_tools { serde_json::Value::Null } else { json!(tools) },
            "add_generation_prompt": true,
        });
        let rendered = template
            .render(Value::from_serialize(&context))
            .map_err(|e| format!("the chat template failed: {e}"))?;
        Ok(
            match self.strip.as_deref().and_then(|b| rendered.strip_prefix(b)) {
                Some(rest) => rest.to_string(),
                None => rendered,
            },
        )
    }

    /// The messages as this template can show them (see [`plain`]).
    fn shown(&self, messages: &[ChatMessage], tools: &[Tool]) -> Vec<ChatMessage> {
        if self.knows_tools && self.knows_tool_role && self.knows_tool_calls {
            return messages.to_vec();
        }
        let tools = if self.knows_tools { &[][..] } else { tools };
        plain(messages, tools)
    }
}

/// `messages` for a renderer that knows nothing of tools (a template without
/// them, llama.cpp's built-in formats, ChatML): the tools described in the
/// first system message, past calls as `<tool_call>` text, tool results as
/// user messages in `<tool_response>`.
pub fn plain(messages: &[ChatMessage], tools: &[Tool]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let described = describe_tools(tools);
        match messages.first() {
            Some(first) if first.role == "system" => out.push(ChatMessage::new(
                "system",
                format!("{}\n\n{described}", first.content),
            )),
            _ => out.push(ChatMessage::new("system", described)),
        }
    }
    let skip =
        usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        let text = match m.role.as_str() {
            "tool" => ChatMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            ),
            "assistant" if !m.tool_calls.is_empty() => {
                let calls: Vec<String> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        let arguments = arguments_value(c);
                        format!(
                            "<tool_call>\n{}\n</tool_call>",
                            json!({"name": c.function.name, "arguments": arguments})
                        )
                    })
                    .collect();
                let content = [m.content.as_str()]
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .chain(calls.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join("\n");
                ChatMessage::new("assistant", content)
            }
            _ => ChatMessage::new(&m.role, m.content.clone()),
        };
        out.push(text);
    }
    out
}

/// The system text that shows a model its tools, in Hermes' format.
pub fn describe_tools(tools: &[Tool]) -> String {
    let signatures: Vec<String> = tools.iter().map(|t| json!(t).to_string()).collect();
    format!(
        "You are a function calling AI model. You may call one or more functions to assist with \
         the user query. Here are the available tools:\n<tools>\n{}\n</tools>\n\
         For each function call, return a JSON object with the function name and arguments \
         within <tool_call></tool_call> tags:\n\
         <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        signatures.join("\n")
    )
}

/// A message as templates expect it: tool call arguments as an object, as
/// Hugging Face passes them.
fn message_value(m: &ChatMessage) -> serde_json::Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let arguments = arguments_value(c);
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.function.name, "arguments": arguments}})
            })
            .collect();
        v["tool_calls"] = json!(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// A call's arguments as the object they encode (as Hugging Face passes
/// them to templates), or the string itself when it is not JSON.
fn arguments_value(c: &ToolCall) -> serde_json::Value {
    serde_json::from_str(&c.function.arguments)
        .unwrap_or_else(|_| serde_json::Value::String(c.function.arguments.clone()))
}

/// Today's date (UTC) in the few `strftime` forms templates use (`%d %b %Y`).
fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil(secs / 86_400);
    let month = MONTHS[(m - 1) as usize];
    format
        .replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FunctionCall, FunctionDef};

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/templates/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn weather() -> Tool {
        Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: "get_weather".into(),
                description: Some("The weather in a city".into()),
                parameters: Some(
                    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
                ),
            },
        }
    }

    fn round_trip() -> Vec<ChatMessage> {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![ToolCall {
            id: "a1b2c3d4e".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        }];
        let mut result = ChatMessage::new("tool", r#"{"celsius": 18}"#);
        result.tool_call_id = Some("a1b2c3d4e".into());
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            call,
            result,
        ]
    }

    /// SmolLM2's own template (ChatML, with a default system message).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2s_template_renders_as_hugging_face_renders_it() {
        // SmolLM2's BOS is <|im_start|>, which its tokenizer does not add: it stays.
        let t = Template::new(SMOLLM2, "<|im_start|>", "<|im_end|>", false).unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], &[]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // Tools it cannot show: described in the system message, results as user turns.
        let out = t.render(&round_trip(), &[weather()]).unwrap();
        assert!(
            out.starts_with(
                "<|im_start|>system\nBe brief.\n\nYou are a function calling AI model."
            ),
            "{out}"
        );
        assert!(out.contains("\"name\":\"get_weather\""), "{out}");
        assert!(out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call><|im_end|>"), "{out}");
        assert!(
            out.contains(
                "<|im_start|>user\n<tool_response>\n{\"celsius\": 18}\n</tool_response><|im_end|>"
            ),
            "{out}"
        );
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
    }

    #[test]
    fn a_template_that_never_ends_is_stopped_and_ten_thousand_messages_are_not() {
        let endless =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = Template::new(endless, "", "", false).unwrap();
        let e = t
            .render(&[ChatMessage::new("user", "Hi")], &[])
            .unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        let t = Template::new(SMOLLM2, "<|im_start|>", "<|im_end|>", false).unwrap();
        let many = vec![ChatMessage::new("user", "Hi"); 10_000];
        assert!(t.render(&many, &[]).is_ok());
    }

    /// Each family's template (tests/fixtures/templates, from llama.cpp's
    /// models/templates) renders a tool round trip, its own way.
    #[test]
    fn real_templates_render_tools_and_tool_results_their_own_way() {
        let dir = format!("{}/tests/fixtures/templates", env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let t = Template::new(&fixture(&name), "<s>", "</s>", true)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let out = t
                .render(&round_trip(), &[weather()])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(out.contains("Weather in Paris?"), "{name}:\n{out}");
            assert!(
                out.contains("get_weather"),
                "{name}: the tools are shown:\n{out}"
            );
            assert!(
                out.contains("18"),
                "{name}: the tool's result is shown:\n{out}"
            );
            assert!(
                !out.starts_with("<s>"),
                "{name}: the BOS is the tokenizer's"
            );
            let plain = t
                .render(&[ChatMessage::new("user", "Hi")], &[])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(plain.contains("Hi"), "{name}:\n{plain}");
            seen += 1;
        }
        assert!(seen >= 4, "only {seen} fixtures in {dir}");
    }

    #[test]
    fn a_template_that_raises_or_does_not_compile_is_an_error() {
        let t = Template::new(
            "{{ raise_exception('roles must alternate') }}",
            "",
            "",
            true,
        )
        .unwrap();
        assert!(t
            .render(&[ChatMessage::new("user", "a")], &[])
            .unwrap_err()
            .contains("roles must alternate"));
        assert!(Template::new("{% for %}", "", "", true)
            .err()
            .unwrap_or_default()
            .contains("does not compile"));
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_423), (2025, 12, 1));
        assert_eq!(strftime_now("%Y").len(), 4);
    }
}
