//! A client or the queen → a worker: what is asked (a prompt or chat
//! messages, tools, embeddings, tokens to count) and what comes back (the
//! answer's events, each token's log-probability).

use super::*;
use serde::{Deserialize, Serialize};

/// `POST /v1/inference` on a worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// The prompt as text; empty when `messages` are given.
    #[serde(default)]
    pub prompt: String,
    /// Chat messages, rendered with the model's own chat template into the
    /// prompt (the queen's OpenAI front sends these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// `false` opts out of the prompt cache (DESIGN.md §9): the whole prompt is decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_prompt: Option<bool>,
    /// The queen's job id, echoed in `started`; the worker makes one up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// A failover (DESIGN.md §11): the tokens another worker generated before
    /// it was lost, appended to the prompt; generation continues after them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume_tokens: Vec<i32>,
    /// Functions the model may call (DESIGN.md §14), shown to it by the chat template.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// What the output must be, enforced by a grammar while sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// The most tokens of context the request may use, prompt and answer
    /// (Ollama's `num_ctx`); the worker's own context per slot when less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_limit: Option<u32>,
    /// Each generated token's log-probability is sent, with this many of the
    /// likeliest alternatives (0 to [`MAX_TOP_LOGPROBS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
}

/// `POST /tokenize` on a worker: llama-server's fields (`content`, `add_special`,
/// `parse_special`, `with_pieces`), or rbee's `messages` and `tools`: the
/// prompt a chat request would make (what Anthropic's `count_tokens` counts).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Which model, when sent to the queen.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default)]
    pub add_special: bool,
    #[serde(default = "yes")]
    pub parse_special: bool,
    #[serde(default)]
    pub with_pieces: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
}

fn yes() -> bool {
    true
}

/// `POST /v1/embeddings`, in OpenAI's shape, on a worker and on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingsRequest {
    #[serde(default)]
    pub model: String,
    pub input: EmbeddingInput,
    /// `float` (the default) or `base64` (little-endian f32s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

/// Inputs one embeddings request may carry, as OpenAI allows.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

impl EmbeddingsRequest {
    /// A request body read: a syntax error says so, a wrong `input` says what it must be.
    pub fn read(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
        let value: serde_json::Value = parse_json(body)?;
        let input_ok = match value.get("input") {
            Some(serde_json::Value::String(_)) => true,
            Some(serde_json::Value::Array(items)) => items.iter().all(|i| i.is_string()),
            _ => false,
        };
        if !input_ok {
            return Err(ApiError::invalid(
                "input",
                "input must be a string or a list of strings",
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid request: {e}")))
    }

    /// The texts to embed, checked; whether the answer is base64.
    pub fn texts(&self) -> Result<(Vec<String>, bool), ApiError> {
        let texts = match &self.input {
            EmbeddingInput::One(t) => vec![t.clone()],
            EmbeddingInput::Many(list) => list.clone(),
        };
        if texts.is_empty() || texts.len() > MAX_EMBEDDING_INPUTS {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input must hold 1 to {MAX_EMBEDDING_INPUTS} texts, got {}",
                    texts.len()
                ),
            ));
        }
        if texts.iter().any(String::is_empty) {
            return Err(ApiError::invalid("input", "an input text is empty"));
        }
        if self.dimensions.is_some() {
            return Err(ApiError::invalid(
                "dimensions",
                "dimensions is not supported: the model's own size is used",
            ));
        }
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("encoding_format {other:?} is not supported: use float or base64"),
                ))
            }
        };
        Ok((texts, base64))
    }
}

/// A function the model may call, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionDef,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

/// A call the model made, in OpenAI's shape: the arguments as a JSON string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// One chat message: its role (`system`, `user`, `assistant`, `tool`), its
/// text, and for tool calling the calls an assistant made or the call a
/// tool's result answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// The one check of a request's text: a prompt, or chat messages with known
/// roles, exactly one of the two and not empty.
pub fn check_prompt(prompt: &str, messages: Option<&[ChatMessage]>) -> Result<(), ApiError> {
    match messages {
        None if prompt.is_empty() => Err(ApiError::invalid("prompt", "prompt is empty")),
        None => Ok(()),
        Some(_) if !prompt.is_empty() => Err(ApiError::invalid(
            "messages",
            "give prompt or messages, not both",
        )),
        Some([]) => Err(ApiError::invalid("messages", "messages is empty")),
        Some(messages) => match messages
            .iter()
            .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool"))
        {
            Some(m) => Err(ApiError::invalid(
                "messages",
                format!(
                    "unknown role {:?}: use system, user, assistant or tool",
                    m.role
                ),
            )),
            None => Ok(()),
        },
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    Eos,
    StopSequence,
    Cancelled,
}

/// One event of an inference stream (DESIGN.md §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InferenceEvent {
    Started {
        job_id: String,
        model: String,
        started_at: String,
        /// The prompt's length in tokens (the OpenAI usage reports it).
        #[serde(default)]
        prompt_tokens: u32,
    },
    Token {
        t: String,
        i: u32,
        /// The tokens this text is made of (a failover resumes after them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<i32>,
        /// When the request asked (`logprobs`): each of `ids`' log-probability
        /// and the likeliest alternatives.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprob>,
    },
    End {
        tokens_out: u32,
        decode_time_ms: u64,
        stop_reason: StopReason,
        /// Prompt tokens that came from the prompt cache rather than being decoded.
        #[serde(default)]
        cached_tokens: u32,
        /// Generated tokens that never became text (a stop sequence's).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<i32>,
        /// What the queen adds to a job's `end`: who answered, how soon.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        figures: Option<JobFigures>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// A generated token's log-probability under the model (its logits before any
/// sampler), and the `top` likeliest tokens at that place with theirs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's id in the model's vocabulary (llama-server's `n_probs` names it).
    #[serde(default)]
    pub id: i32,
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TokenLogprob>,
}

/// The most alternatives a request may ask for, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A count of alternatives per token, as field `param` asks for it: within
/// [`MAX_TOP_LOGPROBS`], the one rule every front's field is read by.
pub fn check_alternatives(param: &str, n: u32) -> Result<u32, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
        ));
    }
    Ok(n)
}

impl From<ApiError> for InferenceEvent {
    fn from(e: ApiError) -> InferenceEvent {
        InferenceEvent::Error {
            code: e.code,
            message: e.message,
        }
    }
}
