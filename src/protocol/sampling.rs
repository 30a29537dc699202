//! How a request samples its tokens, and what may constrain them: one set of
//! fields and one rule set, flattened into every front's request (OpenAI's,
//! Ollama's, Anthropic's, llama-server's, the queen's jobs) on its way to a worker.

use super::*;
use serde::{Deserialize, Serialize};

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
