//! Every type that crosses a process boundary, in one place.
//!
//! The wire formats are those of DESIGN.md §2 and §3. A role never builds JSON
//! by hand for another role: it serialises one of these types, so the two sides
//! cannot drift apart.

mod error;
mod join;
mod stamps;

pub use error::{parse_json, ApiError, ErrorBody, ErrorCode};
pub use join::{CheckIn, JoinRequest, JoinToken, JoinTokenRequest, Joined};
pub use stamps::{
    check_name, new_id, new_secret, now_rfc3339, parse_rfc3339, random_u64, rfc3339_at, unix_now,
};

use serde::{Deserialize, Serialize};

/// The API version every daemon reports in its health answer.
pub const API_VERSION: &str = "v1";

/// `GET /health` on every daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub api_version: String,
    pub role: String,
}

impl Health {
    pub fn alive(role: &str) -> Health {
        Health {
            status: "alive".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION.into(),
            role: role.into(),
        }
    }

    /// The answer to a shutdown request: still alive, on its way out.
    pub fn stopping(role: &str) -> Health {
        Health {
            status: "shutting_down".into(),
            ..Health::alive(role)
        }
    }
}

/// How a request samples its tokens: one set of fields and one rule set for
/// every entry point (the worker's native API, OpenAI's, the queen's jobs),
/// flattened into each request type. The ranges are OpenAI's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Absent: generate until end of sequence or until the slot's context is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy and deterministic. Absent: the entry point's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// 0 (off) or more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// A string or a list of at most [`MAX_STOP_SEQUENCES`] non-empty strings.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many"
    )]
    pub stop: Vec<String>,
    /// OpenAI's penalties, -2 to 2: 0 (off) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// llama.cpp's and Ollama's: tokens below this fraction of the likeliest one's
    /// probability are dropped (0 to 1; 0 is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Locally typical sampling (0 to 1; 1 is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typical_p: Option<f32>,
    /// The repetition penalty of llama.cpp and Ollama (1 is off), over the last
    /// `repeat_last_n` tokens (0 off, -1 the whole context; 64 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<i32>,
    /// Mirostat (1 or 2; 0 off) with its target entropy and learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirostat: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirostat_tau: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirostat_eta: Option<f32>,
    /// Added to a token's logit before sampling, -100 to 100: OpenAI's map of
    /// token id to bias, or llama-server's `[[id, bias], …]`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "logit_biases"
    )]
    pub logit_bias: Vec<(i32, f32)>,
}

/// No GGUF model's context comes near this; above it is a client bug.
pub const MAX_TOKENS_LIMIT: i64 = 1 << 20;
pub const MAX_STOP_SEQUENCES: usize = 16;

impl SamplingParams {
    /// The one rule set; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), ApiError> {
        fn range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
            match v {
                Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
                    param,
                    format!("{param} must be between {lo} and {hi}, got {x}"),
                )),
                _ => Ok(()),
            }
        }
        if let Some(n) = self.max_tokens {
            if !(1..=MAX_TOKENS_LIMIT).contains(&n) {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {n}"),
                ));
            }
        }
        range("temperature", self.temperature, 0.0, 2.0)?;
        range("top_p", self.top_p, 0.0, 1.0)?;
        range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        range("min_p", self.min_p, 0.0, 1.0)?;
        range("typical_p", self.typical_p, 0.0, 1.0)?;
        range("repeat_penalty", self.repeat_penalty, 0.0, 10.0)?;
        range("mirostat_tau", self.mirostat_tau, 0.0, 100.0)?;
        range("mirostat_eta", self.mirostat_eta, 0.0, 1.0)?;
        if let Some(m) = self.mirostat.filter(|&m| m > 2) {
            return Err(ApiError::invalid(
                "mirostat",
                format!("mirostat must be 0 (off), 1 or 2, got {m}"),
            ));
        }
        if let Some(n) = self.repeat_last_n.filter(|&n| n < -1) {
            return Err(ApiError::invalid(
                "repeat_last_n",
                format!("repeat_last_n must be -1 (the whole context), 0 (off) or more, got {n}"),
            ));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIASES {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias may name at most {MAX_LOGIT_BIASES} tokens"),
            ));
        }
        for &(token, bias) in &self.logit_bias {
            if token < 0 || !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias maps token ids (0 or more) to -100 to 100, got {token}: {bias}"
                    ),
                ));
            }
        }
        if let Some(k) = self.top_k.filter(|&k| k < 0) {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be 0 (off) or more, got {k}"),
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES || self.stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                format!("stop must be at most {MAX_STOP_SEQUENCES} non-empty strings"),
            ));
        }
        Ok(())
    }
}

/// The one refusal of a request field rbee does not honour (DESIGN.md §16):
/// `fields` are those left over after a front read what it knows; one that is
/// null, false or in `harmless` (it cannot change the answer) passes.
pub fn refuse_unhonoured(
    fields: &serde_json::Map<String, serde_json::Value>,
    harmless: &[&str],
) -> Result<(), ApiError> {
    use serde_json::Value;
    let unhonoured = fields.iter().find(|(name, value)| {
        !matches!(value, Value::Null | Value::Bool(false)) && !harmless.contains(&name.as_str())
    });
    match unhonoured {
        Some((name, _)) => Err(ApiError::invalid(
            name,
            format!("{name} is not supported by rbee: leave it out"),
        )),
        None => Ok(()),
    }
}

/// OpenAI allows 300 entries in `logit_bias`; llama-server no limit. A bound all the same.
pub const MAX_LOGIT_BIASES: usize = 1024;

/// `{"15339": -100}` (OpenAI), or `[[15339, -100]]` (llama-server), or null.
fn logit_biases<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(i32, f32)>, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Biases {
        Map(std::collections::BTreeMap<String, f32>),
        Pairs(Vec<(i32, f32)>),
    }
    match Option::<Biases>::deserialize(d)? {
        None => Ok(Vec::new()),
        Some(Biases::Pairs(pairs)) => Ok(pairs),
        Some(Biases::Map(map)) => map
            .into_iter()
            .map(|(k, v)| {
                k.trim().parse::<i32>().map(|id| (id, v)).map_err(|_| {
                    D::Error::custom(format!("logit_bias keys are token ids, not {k:?}"))
                })
            })
            .collect(),
    }
}

/// `"stop": "x"` or `"stop": ["x", "y"]` (or null).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

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

/// A short name for a model (`GET /v1/aliases`; `PUT /v1/aliases/{name}` sets one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub name: String,
    /// The reference it stands for, in its canonical spelling.
    pub model: String,
}

/// `PUT /v1/aliases/{name}` on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    pub model: String,
}

/// `POST /v1/workers/{id}/keep-alive` on a hive: how long the worker may stay
/// idle before it is stopped, in seconds; `null`, until it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepAliveRequest {
    pub seconds: Option<u64>,
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

/// A grammar on the output: sampling can only pick tokens that keep it valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// JSON valid against this schema (already checked to be one rbee can enforce).
    JsonSchema { schema: serde_json::Value },
    /// One or more calls (`parallel`) of these tools, as `<tool_call>{"name","arguments"}</tool_call>`.
    ToolCalls { tools: Vec<Tool>, parallel: bool },
    /// A GBNF grammar the client wrote (llama-server's `grammar`), its rule `root` first.
    Grammar { gbnf: String },
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

/// Where a job's answer came from and how long it took to start, as the
/// queen saw it (the keeper's `--verbose` summary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFigures {
    /// The hive and worker that sent the last tokens (after a failover, the last one).
    pub hive: String,
    pub worker: String,
    /// From the job's creation to its first token: placement, loading and prompt included.
    pub time_to_first_token_ms: u64,
}

impl From<ApiError> for InferenceEvent {
    fn from(e: ApiError) -> InferenceEvent {
        InferenceEvent::Error {
            code: e.code,
            message: e.message,
        }
    }
}

/// One event of a worker's `GET /v1/loading/progress` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum LoadingEvent {
    /// Weights going to a GPU.
    LoadingToVram {
        layers_loaded: u32,
        layers_total: u32,
        vram_mb: u64,
    },
    /// Weights going to main memory (a CPU worker).
    LoadingToRam {
        layers_loaded: u32,
        layers_total: u32,
        ram_mb: u64,
    },
    Ready,
    Failed {
        message: String,
    },
}

/// A worker's life, as the worker, its hive and the queen see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Loading,
    Ready,
    /// Told to stop, not gone yet (only its hive says this).
    Stopping,
    Failed,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Loading => "loading",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
            WorkerState::Failed => "failed",
        })
    }
}

/// Whether the queen can reach a hive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiveState {
    Reachable,
    Unreachable,
    /// Not checked yet.
    Unknown,
}

impl std::fmt::Display for HiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HiveState::Reachable => "reachable",
            HiveState::Unreachable => "unreachable",
            HiveState::Unknown => "unknown",
        })
    }
}

/// `GET /v1/ready` on a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadyStatus {
    pub ready: bool,
    pub state: WorkerState,
    pub progress_url: String,
    pub model: String,
    pub slots_total: u32,
    pub slots_busy: u32,
    pub queue_len: u32,
    /// Idle conversations kept in the prompt cache, and their tokens.
    #[serde(default)]
    pub cached_sequences: u32,
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a worker POSTs to its `--callback-url` once loading has ended, either way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReadyCallback {
    pub worker_id: String,
    /// The secret its hive started it with (`RBEE_WORKER_SECRET`): only the
    /// worker itself can report on itself.
    #[serde(default)]
    pub secret: String,
    pub url: String,
    pub model: String,
    pub slots: u32,
    /// `Ready` or `Failed`.
    pub state: WorkerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `DELETE /v1/models/download/partial` on a hive: the partial downloads
/// removed (those not being downloaded right now) and the space freed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialsRemoved {
    pub removed: Vec<String>,
    pub freed_mb: u64,
}

/// `POST /v1/models/download` on a hive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadRequest {
    pub model_ref: String,
}

/// The answer to a download request. `state` is `complete` when the hive
/// already had the model (the progress stream then says so at once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadStarted {
    pub download_id: String,
    pub local_path: String,
    pub state: DownloadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadState {
    Downloading,
    Complete,
}

/// One event of a hive's `GET /v1/models/download/progress?id=` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum DownloadEvent {
    Downloading {
        bytes_downloaded: u64,
        bytes_total: u64,
        /// Megabits per second, over the last second or so.
        speed_mbps: f64,
    },
    Complete {
        local_path: String,
    },
    Error {
        message: String,
    },
}

/// A model in a hive's catalog (`GET /v1/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The catalog name: the file stem, lower-case.
    pub name: String,
    /// The reference it was added by.
    pub model_ref: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub context_length: u64,
    pub layers: u64,
    /// The file lives in the hive's own models directory and goes when the entry does;
    /// a `file:` model registered in place is never deleted by the hive.
    pub owned: bool,
    pub added_at: String,
    /// A file registered in place whose sha256 is being computed: how far
    /// (`sha256` is empty until it is done). Not stored: `GET /v1/models` says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashing: Option<Hashing>,
}

/// How far the sha256 of a registered file has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashing {
    pub bytes_hashed: u64,
    pub bytes_total: u64,
}

/// What a client key may reach: `use`, inference, models and embeddings;
/// `admin`, everything (hives, workers, keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyScope {
    #[default]
    Use,
    Admin,
}

impl std::fmt::Display for KeyScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyScope::Use => "use",
            KeyScope::Admin => "admin",
        })
    }
}

/// `POST /v1/keys` on the queen: a new client key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub name: String,
    #[serde(default)]
    pub scope: KeyScope,
    /// How long it is good for (`30d`, `12h`); absent: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Requests it may make (`60/min`); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Requests it may hold open at once (streams included); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
}

/// A client key as `GET /v1/keys` lists it (never the key itself).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    pub scope: KeyScope,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub rate: Option<String>,
    pub streams: Option<u32>,
    pub last_used: Option<String>,
    pub requests: u64,
    pub tokens_used: u64,
}

/// `POST /v1/keys`'s answer: the key, shown this once, and its record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyAdded {
    pub key: String,
    pub info: KeyInfo,
}

/// `POST /v1/workers/spawn` on a hive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub model_ref: String,
    /// `cpu`, `cuda` or `metal`; absent: the best this hive has.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub device: u32,
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub ctx_size: Option<u32>,
    /// Other hives' devices holding part of its layers (DESIGN.md §12): the
    /// worker keeps the rest on its own machine, the first layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<RemoteShare>,
}

/// One lending hive's share of a split worker, as the queen planned it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteShare {
    pub hive: String,
    /// The lending hive's base URL; the worker tunnels through its `/v1/rpc`.
    pub url: String,
    /// The lease the lending hive made for it (`POST /v1/leases`).
    pub lease: String,
    pub layers: u32,
    /// The lending hive's token, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The lending hive's certificate fingerprint, which the worker pins
    /// (a hive that joined over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Where a split worker's layers are: its own hive's share and each lender's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitPart {
    pub hive: String,
    pub layers: u32,
}

/// `POST /v1/leases` on a hive: lend this hive's devices to a worker on
/// another hive, through llama.cpp's RPC server (DESIGN.md §12).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub lease: String,
    pub model: String,
    /// The hive whose worker uses it.
    pub borrower: String,
    pub layers: u32,
    /// What its share takes here, counted against this hive's budget.
    pub memory_mb: u64,
    /// The borrowing hive's certificate fingerprint: its worker's tunnels
    /// present it, and are let in by it while the lease lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub borrower_fingerprint: Option<String>,
}

/// A lease as its lending hive shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub lease: String,
    pub model: String,
    pub borrower: String,
    pub layers: u32,
    /// Its RPC server's resident set, never less than the share's estimate.
    pub memory_mb: u64,
    /// Whether a tunnel to it is open now.
    pub connected: bool,
    pub since: String,
}

/// A worker as its hive knows it (`GET /v1/workers/list`, and the spawn answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub url: String,
    pub model: String,
    pub model_path: String,
    pub pid: u32,
    pub state: WorkerState,
    pub slots: u32,
    pub backend: String,
    pub device: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    /// Tokens of context per slot.
    #[serde(default)]
    pub ctx_size: u32,
    /// CPU threads it decodes with.
    #[serde(default)]
    pub threads: u32,
    /// The memory it takes, in MiB: the estimate while loading, then what the
    /// OS measures (its resident set), never less than the estimate.
    #[serde(default)]
    pub memory_mb: u64,
    /// Whether `memory_mb` was measured.
    #[serde(default)]
    pub memory_measured: bool,
    /// Since when it has had nothing to do (RFC 3339), as its hive last saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<String>,
    /// When the hive will stop it if it stays idle (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stops_at: Option<String>,
    /// A split worker's layers, this hive's share first; empty when whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitPart>,
    /// It ended on a signal a fault raises (abort, segmentation fault, …),
    /// not one sent to stop it: what it was reading may have crashed it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub crashed: bool,
}

/// `GET /v1/state/stream` on a hive: everything the queen places and routes
/// by, sent whole at the start and again whenever something changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveSnapshot {
    /// The hive's rbee version and compiled backends.
    pub version: String,
    pub backends: Vec<String>,
    pub hostname: String,
    pub cores: u32,
    pub ram: MemoryPool,
    /// One pool per GPU, by index.
    pub gpus: Vec<MemoryPool>,
    pub models: Vec<HiveModel>,
    pub workers: Vec<WorkerInfo>,
    /// Shares of other hives' workers this hive holds (DESIGN.md §12).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseInfo>,
}

/// RAM or one GPU's memory, in MiB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPool {
    /// `ram`, or the GPU's name.
    pub name: String,
    pub total_mb: u64,
    /// What the OS (or driver) says is free now.
    pub available_mb: u64,
    /// What rbee may use of it (`rbee hive --max-memory` for RAM).
    pub budget_mb: u64,
    /// What this hive's workers take.
    pub used_mb: u64,
}

impl MemoryPool {
    /// What a new worker may still take: the budget left, and never more than the OS has.
    pub fn free_mb(&self) -> u64 {
        self.budget_mb
            .saturating_sub(self.used_mb)
            .min(self.available_mb)
    }
}

/// A catalog entry with the memory a worker of it would take with the hive's
/// default slots and context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveModel {
    #[serde(flatten)]
    pub entry: ModelEntry,
    pub memory_estimate_mb: u64,
    /// What each share takes when the model is split across hives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitCostMb>,
}

/// [`crate::gguf::SplitCost`] in MiB, with the hive's default slots and context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitCostMb {
    pub layers: u32,
    pub layer_mb: f64,
    pub host_mb: u64,
    pub output_mb: u64,
    pub device_mb: u64,
}

impl SplitCostMb {
    pub fn of(cost: &crate::gguf::SplitCost, cache_ram_mb: u64) -> SplitCostMb {
        let mb = |b: u64| b.div_ceil(1 << 20);
        SplitCostMb {
            layers: u32::try_from(cost.layers).unwrap_or(u32::MAX),
            layer_mb: cost.per_layer as f64 / f64::from(1 << 20),
            // The host-memory prompt cache stays with the worker.
            host_mb: mb(cost.host) + cache_ram_mb,
            output_mb: mb(cost.output),
            device_mb: mb(cost.device),
        }
    }

    /// The worker's own machine with `layers` of them.
    pub fn host_need(&self, layers: u32) -> u64 {
        self.host_mb + (f64::from(layers) * self.layer_mb).ceil() as u64
    }

    /// A lending hive with `layers` of them (and the output layer if `last`).
    pub fn lender_need(&self, layers: u32, last: bool) -> u64 {
        let output = if last { self.output_mb } else { 0 };
        self.device_mb + output + (f64::from(layers) * self.layer_mb).ceil() as u64
    }
}

/// `GET /v1/capabilities` on a hive: what a scheduler needs to place a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    pub hostname: String,
    pub cores: u32,
    pub ram_total_mb: u64,
    pub ram_available_mb: u64,
    pub disk_free_mb: u64,
    /// Space taken by partial downloads (`DELETE /v1/models/download/partial` frees it).
    #[serde(default)]
    pub partial_downloads_mb: u64,
    /// The llama.cpp backends this binary was built with.
    pub backends: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub description: String,
    pub memory_total_mb: u64,
    pub memory_free_mb: u64,
}

/// `POST /v1/hives` on the queen: register a hive by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddHive {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// For an `https://` URL: the certificate fingerprint the hive must
    /// present (`rbee hive --show-identity` there); absent, the one it
    /// presents now is pinned and shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// A hive as the queen knows it (`GET /v1/hives`). The token is never shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveStatus {
    pub name: String,
    pub url: String,
    /// How it came to the cluster: `local`, `added` (`hive add`), `token`
    /// (joined, the queen's address in the token) or `mdns` (joined, the
    /// queen found on the LAN).
    #[serde(default)]
    pub found: String,
    /// Its pinned certificate fingerprint, when reached over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub status: HiveState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Started by the queen itself on this machine; it stops with the queen.
    pub managed: bool,
    /// Why it is unreachable, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its rbee version, when known; `version_matches` compares it with the queen's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub version_matches: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MemoryPool>,
    #[serde(default)]
    pub gpus: Vec<MemoryPool>,
    #[serde(default)]
    pub workers: u32,
    /// Shares of split workers on other hives it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseInfo>,
}

/// `POST /v1/jobs` on the queen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The hive to run on; absent: any registered hive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub model: String,
    /// The prompt as text, or empty when `messages` are given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    /// Chat messages, rendered with the model's chat template: one of `prompt` and `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// What the output must be (`rbee keeper infer --json-schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// `false` opts out of the worker's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_prompt: Option<bool>,
}

/// `DELETE /v1/hives/{name}` on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HiveRemoved {
    pub removed: String,
}

/// `DELETE /v1/jobs/{id}` on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCancelled {
    pub job_id: String,
    pub state: String,
}

/// A worker with the hive it runs on (the queen's `GET /v1/workers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveWorker {
    pub hive: String,
    #[serde(flatten)]
    pub worker: WorkerInfo,
    /// Requests the queen has in flight on it.
    #[serde(default)]
    pub in_flight: u32,
    /// The decode speed of the last answer the queen relayed from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// A job as the status page and `rbee keeper status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub job_id: String,
    /// The model as it was asked for.
    pub model: String,
    pub state: JobState,
    /// Where it runs (or ran last), once a worker took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Tokens generated so far.
    pub tokens: u32,
    pub started_at: String,
    /// How long it has run, or ran.
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A model in a hive's catalog, for the status page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogModel {
    pub hive: String,
    pub name: String,
    pub quantization: String,
    pub size: u64,
    pub memory_estimate_mb: u64,
}

/// `GET /v1/status` on the queen (and each event of `/v1/status/stream`):
/// the whole cluster at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueenStatus {
    pub version: String,
    pub hives: Vec<HiveStatus>,
    pub workers: Vec<HiveWorker>,
    pub models: Vec<CatalogModel>,
    /// Running jobs, then the most recent finished ones.
    pub jobs: Vec<JobSummary>,
}

/// `POST /v1/session` on the queen: a browser trades the token, or a
/// one-time code from `rbee keeper status --web`, for a session cookie.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// `POST /v1/session/link` on the queen (with the token): a one-time code
/// that logs a browser in, and the page's address with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionLink {
    pub code: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCreated {
    pub job_id: String,
    pub sse_url: String,
}

/// What the cluster says about a job besides the inference itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClusterEvent {
    Narration {
        actor: String,
        action: String,
        human: String,
    },
    /// A hive's download progress, relayed.
    Download(DownloadEvent),
    /// A worker's loading progress, relayed.
    Loading(LoadingEvent),
}

/// One event of a queen job stream: the worker's inference events, or the cluster's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobEvent {
    Inference(InferenceEvent),
    Cluster(ClusterEvent),
}

/// The one line a child daemon writes on its readiness pipe (`RBEE_READY_FD`)
/// to whoever started it: bound and ready, or why it could not start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Readiness {
    Ready {
        /// The address it listens on; with `--port 0`, the port it was given.
        addr: std::net::SocketAddr,
    },
    Failed {
        reason: StartFailure,
        message: String,
    },
}

/// Why a child daemon failed to start, where its starter can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFailure {
    /// Someone else listens on the port it was asked for (a local hive then takes any port).
    PortTaken,
    /// Anything else; the message says what.
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_events_read_back_as_what_was_sent() {
        let events = [
            JobEvent::Cluster(ClusterEvent::Narration {
                actor: "queen".into(),
                action: "spawn".into(),
                human: "starting a worker".into(),
            }),
            JobEvent::Cluster(ClusterEvent::Download(DownloadEvent::Downloading {
                bytes_downloaded: 1,
                bytes_total: 2,
                speed_mbps: 3.5,
            })),
            JobEvent::Cluster(ClusterEvent::Loading(LoadingEvent::Ready)),
            JobEvent::Inference(InferenceEvent::Token {
                t: "x".into(),
                i: 0,
                ids: vec![87],
                logprobs: vec![],
            }),
        ];
        for e in events {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(
                serde_json::from_str::<JobEvent>(&json).unwrap(),
                e,
                "{json}"
            );
        }
        let json = serde_json::to_string(&ClusterEvent::Loading(LoadingEvent::Ready)).unwrap();
        assert_eq!(json, r#"{"type":"loading","stage":"ready"}"#);
    }

    #[test]
    fn sampling_is_flattened_and_unknown_fields_are_refused() {
        let r: InferenceRequest = serde_json::from_str(
            r#"{"prompt":"p","max_tokens":5,"temperature":0,"stop":"x","seed":-1}"#,
        )
        .unwrap();
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.stop, vec!["x".to_string()]);
        assert_eq!(r.sampling.seed, Some(-1));
        let e = serde_json::from_str::<InferenceRequest>(r#"{"prompt":"p","temprature":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("temprature"), "{e}");
        let j: JobRequest =
            serde_json::from_str(r#"{"model":"m","prompt":"p","stop":["a","b"],"top_k":3}"#)
                .unwrap();
        assert_eq!(j.sampling.stop.len(), 2);
        assert_eq!(j.sampling.top_k, Some(3));
        assert!(serde_json::from_str::<JobRequest>(r#"{"model":"m","prompt":"p","x":1}"#).is_err());
    }

    /// One table of inputs and the field each one is refused for.
    #[test]
    fn one_rule_set_for_sampling() {
        let ok = |json: &str| {
            let p: SamplingParams = serde_json::from_str(json).unwrap();
            p.validate().map_err(|e| {
                assert_eq!(e.code, ErrorCode::InvalidRequest);
                e.param.unwrap_or_default()
            })
        };
        let cases: &[(&str, Result<(), &str>)] = &[
            (r#"{}"#, Ok(())),
            (
                r#"{"temperature":0,"top_p":1,"top_k":0,"max_tokens":1}"#,
                Ok(()),
            ),
            (
                r#"{"temperature":2,"presence_penalty":-2,"frequency_penalty":2}"#,
                Ok(()),
            ),
            (r#"{"temperature":-1}"#, Err("temperature")),
            (r#"{"temperature":2.5}"#, Err("temperature")),
            (r#"{"temperature":100}"#, Err("temperature")),
            (r#"{"temperature":1e308}"#, Err("temperature")),
            (r#"{"top_p":2}"#, Err("top_p")),
            (r#"{"top_p":-0.1}"#, Err("top_p")),
            (r#"{"top_k":-1}"#, Err("top_k")),
            (r#"{"max_tokens":0}"#, Err("max_tokens")),
            (r#"{"max_tokens":-5}"#, Err("max_tokens")),
            (r#"{"max_tokens":1000000000000}"#, Err("max_tokens")),
            (r#"{"stop":[""]}"#, Err("stop")),
            (r#"{"presence_penalty":3}"#, Err("presence_penalty")),
            (r#"{"frequency_penalty":-2.5}"#, Err("frequency_penalty")),
        ];
        for (json, want) in cases {
            assert_eq!(ok(json), want.map_err(str::to_string), "{json}");
        }
        let many = format!(r#"{{"stop":{:?}}}"#, vec!["s"; MAX_STOP_SEQUENCES + 1]);
        assert_eq!(ok(&many), Err("stop".to_string()));
    }

    #[test]
    fn events_have_the_design_shape() {
        let e = InferenceEvent::Token {
            t: " upon".into(),
            i: 1,
            ids: vec![2402],
            logprobs: vec![],
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"token","t":" upon","i":1,"ids":[2402]}"#
        );
        let e = InferenceEvent::End {
            tokens_out: 20,
            decode_time_ms: 1234,
            stop_reason: StopReason::MaxTokens,
            cached_tokens: 7,
            ids: Vec::new(),
            figures: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"end","tokens_out":20,"decode_time_ms":1234,"stop_reason":"max_tokens","cached_tokens":7}"#
        );
        let l = LoadingEvent::Ready;
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"stage":"ready"}"#);
    }
}
