//! Ollama's shapes: a chat or generate answer as JSON lines while it streams
//! (the last one `done` with Ollama's counts and durations in nanoseconds) or
//! whole; embeddings; the model list, a model's details, the running models.

use super::{error, Kind};
use crate::answer::{Ending, Piece, Pieces};
use crate::http::{self, Body};
use crate::protocol::{ModelEntry, StopReason, TokenLogprob, ToolCall, WorkerInfo};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use std::time::Instant;

/// One answer being put into Ollama's shape.
pub struct Answer {
    pub kind: Kind,
    pub model: String,
    pub prompt_tokens: u32,
    /// When the request arrived (Ollama's `total_duration` counts from it).
    pub arrived: Instant,
    /// When the first piece came: the prompt's evaluation ends there.
    first: Option<Instant>,
    /// The request asked for its tokens' log-probabilities.
    pub logprobs: bool,
}

impl Answer {
    pub fn new(kind: Kind, model: &str, prompt_tokens: u32, arrived: Instant) -> Answer {
        Answer {
            kind,
            model: model.to_string(),
            prompt_tokens,
            arrived,
            first: None,
            logprobs: false,
        }
    }

    /// One line: the text so far (or the calls), not done.
    fn part(&self, text: &str, calls: &[ToolCall]) -> Value {
        let mut v = self.head(false);
        match self.kind {
            Kind::Chat => v["message"] = message(text, calls),
            Kind::Generate => v["response"] = json!(text),
        }
        v
    }

    /// Ollama's `logprobs` for these tokens, when asked.
    fn with_logprobs(&self, mut v: Value, lps: &[TokenLogprob]) -> Value {
        if self.logprobs {
            let one = |l: &TokenLogprob| json!({"token": l.token, "logprob": l.logprob});
            let all: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let mut v = one(l);
                    v["top_logprobs"] = l.top.iter().map(one).collect();
                    v
                })
                .collect();
            v["logprobs"] = json!(all);
        }
        v
    }

    fn head(&self, done: bool) -> Value {
        json!({"model": self.model, "created_at": crate::protocol::now_rfc3339(), "done": done})
    }

    /// The last line (or the whole answer, with all its text): done, with the
    /// reason and Ollama's counts and durations.
    fn done(&self, text: &str, end: &Ending) -> Value {
        let mut v = self.part(text, &end.calls);
        let nanos = |d: std::time::Duration| d.as_nanos() as u64;
        let total = self.arrived.elapsed();
        let decode = std::time::Duration::from_millis(end.decode_time_ms);
        let prompt = self
            .first
            .map_or(total.saturating_sub(decode), |f| f - self.arrived);
        v["done"] = json!(true);
        v["done_reason"] = json!(match end.reason {
            StopReason::MaxTokens => "length",
            _ => "stop",
        });
        v["total_duration"] = json!(nanos(total));
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(self.prompt_tokens);
        v["prompt_eval_duration"] = json!(nanos(prompt));
        v["eval_count"] = json!(end.tokens_out);
        // After a failover the last worker's decode time covers only its share
        // of the tokens: the answer's generation is then the time since its
        // first token, so eval_count / eval_duration stays a true rate.
        let generating = match (end.decoded_tokens < end.tokens_out, self.first) {
            (true, Some(first)) => first.elapsed(),
            _ => decode,
        };
        v["eval_duration"] = json!(nanos(generating));
        v
    }
}

/// An assistant's message: its text and the calls it made, their arguments
/// as objects (Ollama's form).
fn message(text: &str, calls: &[ToolCall]) -> Value {
    let mut m = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        let calls: Vec<Value> = calls
            .iter()
            .map(|c| {
                let arguments: Value =
                    serde_json::from_str(&c.function.arguments).unwrap_or_else(|_| json!({}));
                json!({"id": c.id, "function": {"name": c.function.name, "arguments": arguments}})
            })
            .collect();
        m["tool_calls"] = json!(calls);
    }
    m
}

/// Turns an answer's pieces into Ollama's answer: JSON lines, or one object.
/// A client that leaves drops the events, which cancels the generation.
pub async fn respond(mut answer: Answer, mut pieces: Pieces, stream: bool) -> Response<Body> {
    if !stream {
        return match pieces.whole().await {
            Ok((text, end)) => {
                let whole = answer.with_logprobs(answer.done(&text, &end), &end.logprobs);
                http::json(StatusCode::OK, &whole)
            }
            Err(e) => error(e),
        };
    }
    let (tx, resp) = http::sse::ndjson_response();
    tokio::spawn(async move {
        let line = |v: &Value| http::sse::json_line(v);
        loop {
            let Some(piece) = pieces.next_for(&tx).await else {
                return;
            };
            answer.first.get_or_insert_with(Instant::now);
            let (out, last) = match piece {
                Piece::Text(text) => {
                    let lps = pieces.take_logprobs();
                    (answer.with_logprobs(answer.part(&text, &[]), &lps), false)
                }
                Piece::End(end) => (answer.done("", &end), true),
                Piece::Failed(e) => (json!({"error": e.message}), true),
            };
            if tx.send(line(&out)).await.is_err() || last {
                return;
            }
        }
    });
    resp
}

/// `/api/generate` or `/api/chat` without a prompt: the model loaded (or unloaded).
pub fn loaded(kind: Kind, model: &str, reason: &str) -> Value {
    let mut v = json!({"model": model, "created_at": crate::protocol::now_rfc3339(),
                       "done": true, "done_reason": reason});
    match kind {
        Kind::Chat => v["message"] = json!({"role": "assistant", "content": ""}),
        Kind::Generate => v["response"] = json!(""),
    }
    v
}

/// `/api/embed`: a vector per input.
pub fn embed(model: &str, vectors: &[Vec<f32>], tokens: u32, arrived: Instant) -> Value {
    json!({"model": model, "embeddings": vectors,
           "total_duration": arrived.elapsed().as_nanos() as u64, "load_duration": 0,
           "prompt_eval_count": tokens})
}

/// The older `/api/embeddings`: one vector.
pub fn embeddings(vector: &[f32]) -> Value {
    json!({ "embedding": vector })
}

/// The name Ollama's clients see: the catalog name with its quantization as
/// the tag (`smollm2-135m-instruct.q4_1` is `smollm2-135m-instruct:q4_1`),
/// which rbee reads back as the catalog name.
pub fn tagged(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((base, tag)) if !base.is_empty() && !tag.is_empty() => format!("{base}:{tag}"),
        _ => format!("{name}:latest"),
    }
}

/// An alias as Ollama lists a name: with its tag, `:latest` when it has none.
pub fn alias_tagged(name: &str) -> String {
    match name.contains(':') {
        true => name.to_string(),
        false => format!("{name}:latest"),
    }
}

/// A parameter count as Ollama writes it: `135M`, `1.2B`.
fn parameter_size(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{}M", n / 1_000_000),
        n => format!("{}K", n / 1000),
    }
}

/// A model's `details`.
pub fn model_details(e: &ModelEntry) -> Value {
    json!({"parent_model": "", "format": "gguf", "family": e.architecture,
           "families": [e.architecture], "parameter_size": parameter_size(e.parameters),
           "quantization_level": e.quantization.to_uppercase()})
}

/// `GET /api/tags`: every model, once.
pub fn tags<'a>(models: impl IntoIterator<Item = (String, &'a ModelEntry)>) -> Value {
    let models: Vec<Value> = models
        .into_iter()
        .map(|(name, e)| {
            json!({"name": name, "model": name, "modified_at": e.added_at,
                   "size": e.size, "digest": e.sha256, "details": model_details(e)})
        })
        .collect();
    json!({ "models": models })
}

/// `POST /api/show`: what rbee knows of a model from its GGUF header.
pub fn show(e: &ModelEntry) -> Value {
    let arch = &e.architecture;
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert("general.parameter_count".into(), json!(e.parameters));
    info.insert(format!("{arch}.context_length"), json!(e.context_length));
    info.insert(format!("{arch}.block_count"), json!(e.layers));
    json!({"modelfile": format!("FROM {}\n", e.path), "parameters": "", "template": "",
           "details": model_details(e), "model_info": info, "modified_at": e.added_at,
           "capabilities": ["completion", "tools"]})
}

/// `GET /api/ps`: the running workers, each with its catalog entry if known.
pub fn ps<'a>(
    workers: impl IntoIterator<Item = (&'a WorkerInfo, Option<&'a ModelEntry>)>,
) -> Value {
    // Ollama's "forever": far in the future.
    const FOREVER: &str = "2318-01-01T00:00:00Z";
    let models: Vec<Value> = workers
        .into_iter()
        .map(|(w, e)| {
            let size = w.memory_mb * 1024 * 1024;
            let vram = if w.backend == "cpu" { 0 } else { size };
            json!({"name": tagged(&w.model), "model": tagged(&w.model), "size": size,
                   "digest": e.map_or("", |e| e.sha256.as_str()),
                   "details": e.map(model_details).unwrap_or_else(|| json!({})),
                   "expires_at": w.stops_at.as_deref().unwrap_or(FOREVER),
                   "size_vram": vram, "context_length": w.ctx_size})
        })
        .collect();
    json!({ "models": models })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_quantization_as_their_tag() {
        assert_eq!(
            tagged("smollm2-135m-instruct.q4_1"),
            "smollm2-135m-instruct:q4_1"
        );
        assert_eq!(tagged("plain"), "plain:latest");
        assert_eq!(parameter_size(134_515_008), "134M");
        assert_eq!(parameter_size(1_235_814_400), "1.2B");
    }

    #[test]
    fn the_last_line_has_ollamas_counts() {
        let mut a = Answer::new(Kind::Chat, "m:q", 5, Instant::now());
        a.first = Some(Instant::now());
        let end = Ending {
            calls: vec![],
            reason: StopReason::MaxTokens,
            tokens_out: 3,
            cached_tokens: 0,
            decode_time_ms: 2,
            decoded_tokens: 3,
            logprobs: vec![],
        };
        let v = a.done("hi", &end);
        assert_eq!(v["message"], json!({"role": "assistant", "content": "hi"}));
        assert_eq!(
            (v["done"].clone(), v["done_reason"].clone()),
            (json!(true), json!("length"))
        );
        assert_eq!(
            (v["prompt_eval_count"].clone(), v["eval_count"].clone()),
            (json!(5), json!(3))
        );
        assert_eq!(v["eval_duration"], json!(2_000_000));
        let g = Answer::new(Kind::Generate, "m:q", 5, Instant::now()).part("x", &[]);
        assert_eq!(
            (g["response"].clone(), g["done"].clone()),
            (json!("x"), json!(false))
        );
    }
}
