//! llama-server's own `/completion`, for scripts written against llama.cpp
//! (its `tools/server` README): its request fields and its answer (`content`,
//! `stop`, `tokens_predicted`, `timings`, `completion_probabilities`, …), on
//! the queen and on a worker. (`/tokenize`, `/detokenize`, `/props` and
//! `/slots` describe a worker's own engine: the worker answers them.) Errors
//! use OpenAI's shape, as llama-server's do.

use crate::answer::{Ending, Piece, Pieces};
use crate::http::{self, Body};
use crate::protocol::{
    ApiError, Constraint, InferenceRequest, SamplingParams, StopReason, TokenLogprob,
};
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::time::Instant;

pub use crate::openai::error;

/// `POST /completion`: llama-server's fields; `n_predict` is `max_tokens`.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: Value,
    n_predict: Option<i64>,
    #[serde(flatten)]
    sampling: SamplingParams,
    #[serde(default)]
    stream: bool,
    cache_prompt: Option<bool>,
    /// Each token's likeliest alternatives, with their log-probabilities.
    n_probs: Option<u32>,
    /// Probabilities after the sampler chain instead of the model's own.
    post_sampling_probs: Option<bool>,
    grammar: Option<String>,
    json_schema: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A `/completion` request rbee can run.
#[derive(Debug)]
pub struct Prepared {
    pub model: String,
    pub inference: InferenceRequest,
    pub stream: bool,
}

/// Fields that cannot change the answer: the slot a request would like, how
/// the answer's figures are sent.
const HARMLESS: &[&str] = &[
    "id_slot",
    "timings_per_token",
    "return_tokens",
    "t_max_predict_ms",
];

/// Checks a `/completion` request.
pub fn parse_completion(body: &[u8]) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = crate::protocol::parse_json(body)?;
    crate::protocol::refuse_unhonoured(&req.rest, HARMLESS)?;
    let prompt = match req.prompt {
        Value::String(s) if !s.is_empty() => s,
        Value::Array(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "a prompt of token ids is not supported by rbee: send the text",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a non-empty string",
            ))
        }
    };
    let mut sampling = req.sampling;
    // -1: until the end (llama-server's default).
    sampling.max_tokens = req.n_predict.filter(|&n| n >= 0).or(sampling.max_tokens);
    let n_probs = req
        .n_probs
        .map(|n| crate::protocol::check_alternatives("n_probs", n))
        .transpose()?;
    if req.post_sampling_probs == Some(true) {
        return Err(ApiError::invalid(
            "post_sampling_probs",
            "rbee gives the model's own log-probabilities (before sampling), not those after \
             the sampler chain: leave post_sampling_probs out",
        ));
    }
    sampling.validate()?;
    let constraint = match (req.grammar, req.json_schema) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "grammar",
                "a grammar and a json_schema cannot both hold: give one",
            ))
        }
        (Some(gbnf), None) => {
            crate::gbnf::check(&gbnf).map_err(|e| ApiError::invalid("grammar", e))?;
            Some(Constraint::Grammar { gbnf })
        }
        (None, Some(schema)) => {
            crate::schema::check(&schema, "json_schema")?;
            Some(Constraint::JsonSchema { schema })
        }
        (None, None) => None,
    };
    Ok(Prepared {
        model: req.model,
        inference: InferenceRequest {
            prompt,
            sampling,
            cache_prompt: req.cache_prompt,
            constraint,
            // A token's own log-probability comes with its alternatives, as llama-server's does.
            logprobs: n_probs.filter(|&n| n > 0),
            ..InferenceRequest::default()
        },
        stream: req.stream,
    })
}

/// One `/completion` answer being put into llama-server's shape.
pub struct Answer {
    pub model: String,
    pub prompt_tokens: u32,
    pub arrived: Instant,
    /// The request's stop sequences: one that ended the answer is named.
    pub stop: Vec<String>,
    /// `n_probs` was asked: each event carries its tokens' `completion_probabilities`.
    pub probs: bool,
}

impl Answer {
    /// `event` with its tokens' probabilities in llama-server's shape, when asked.
    fn with_probs(&self, mut event: Value, lps: &[TokenLogprob]) -> Value {
        if self.probs {
            event["completion_probabilities"] = crate::answer::logprob_list(lps, true).into();
        }
        event
    }

    fn last(&self, content: &str, end: &Ending) -> Value {
        let (stop_type, word) = match end.reason {
            StopReason::MaxTokens => ("limit", ""),
            StopReason::StopSequence => (
                "word",
                self.stop
                    .first()
                    .filter(|_| self.stop.len() == 1)
                    .map_or("", String::as_str),
            ),
            StopReason::Eos | StopReason::Cancelled => ("eos", ""),
        };
        let total_ms = self.arrived.elapsed().as_secs_f64() * 1000.0;
        let predicted_ms = end.decode_time_ms as f64;
        json!({"content": content, "stop": true, "model": self.model,
               "tokens_predicted": end.tokens_out, "tokens_evaluated": self.prompt_tokens,
               "tokens_cached": end.cached_tokens, "stop_type": stop_type, "stopping_word": word,
               "truncated": false,
               "timings": {"prompt_n": self.prompt_tokens.saturating_sub(end.cached_tokens),
                           "prompt_ms": (total_ms - predicted_ms).max(0.0),
                           "predicted_n": end.tokens_out, "predicted_ms": predicted_ms,
                           "predicted_per_second": end.tokens_per_second()}})
    }
}

/// Turns an answer's pieces into llama-server's `/completion` answer: whole,
/// or `data:` events of `content` ending with one that has `stop: true`.
pub async fn respond(answer: Answer, mut pieces: Pieces, stream: bool) -> Response<Body> {
    if !stream {
        return match pieces.whole().await {
            Ok((text, end)) => http::json(
                StatusCode::OK,
                &answer.with_probs(answer.last(&text, &end), &end.logprobs),
            ),
            Err(e) => error(e),
        };
    }
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        loop {
            let Some(piece) = pieces.next_for(&tx).await else {
                return;
            };
            let (event, last) = match piece {
                Piece::Text(text) => {
                    let lps = pieces.take_logprobs();
                    let event = json!({"content": text, "stop": false});
                    (answer.with_probs(event, &lps), false)
                }
                Piece::End(end) => (answer.last("", &end), true),
                Piece::Failed(e) => {
                    let _ = tx.send(crate::openai::error_event(e)).await;
                    return;
                }
            };
            if tx.send(http::sse::event(&event)).await.is_err() || last {
                return;
            }
        }
    });
    resp
}

/// `POST /tokenize`: llama-server's fields, and rbee's `messages` and `tools`
/// (the prompt a chat request makes: what Anthropic's `count_tokens` counts).
pub use crate::protocol::TokenizeRequest;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_reads_llama_servers_fields() {
        let p = parse_completion(
            br#"{"prompt":"hi","n_predict":5,"temperature":0,"min_p":0.1,"repeat_penalty":1.2,"id_slot":-1,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(p.inference.sampling.max_tokens, Some(5));
        assert_eq!(p.inference.sampling.repeat_penalty, Some(1.2));
        assert!(p.stream);
        assert_eq!(p.inference.logprobs, None);
        let p = parse_completion(br#"{"prompt":"hi","n_probs":3}"#).unwrap();
        assert_eq!(p.inference.logprobs, Some(3));
        let p =
            parse_completion(br#"{"prompt":"hi","n_predict":-1,"json_schema":{"type":"object"}}"#)
                .unwrap();
        assert_eq!(p.inference.sampling.max_tokens, None);
        assert!(matches!(
            p.inference.constraint,
            Some(Constraint::JsonSchema { .. })
        ));
        for (body, param) in [
            (r#"{"prompt":[1,2]}"#, "prompt"),
            (r#"{"prompt":"hi","n_probs":21}"#, "n_probs"),
            (
                r#"{"prompt":"hi","n_probs":2,"post_sampling_probs":true}"#,
                "post_sampling_probs",
            ),
            (
                r#"{"prompt":"hi","grammar":"root ::= \"a\"","json_schema":{}}"#,
                "grammar",
            ),
            (r#"{"prompt":"hi","top_p":3}"#, "top_p"),
        ] {
            let e = parse_completion(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
