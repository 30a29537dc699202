//! The shapes of OpenAI's answers: streamed chunks (`chat.completion.chunk`,
//! `text_completion`) or whole ones, text or the tool calls found in it, the
//! usage with its cached tokens, embeddings, the model list.

use super::{error, error_event, Kind};
use crate::answer::{Ending, Piece, Pieces};
use crate::http::{self, Body};
use crate::protocol::{StopReason, TokenLogprob, ToolCall};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens => "length",
        StopReason::Eos | StopReason::StopSequence | StopReason::Cancelled => "stop",
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds the answer's pieces for one request.
pub struct Answer {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub prompt_tokens: u32,
    /// The request asked for its tokens' log-probabilities.
    pub logprobs: bool,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptTokensDetails,
}

/// How much of the prompt came from the prompt cache, as OpenAI reports it.
#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: u32,
}

impl Answer {
    pub fn new(kind: Kind, model: &str, prompt_tokens: u32) -> Answer {
        let prefix = if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Answer {
            kind,
            id: crate::protocol::new_id(prefix),
            model: model.to_string(),
            created: created(),
            prompt_tokens,
            logprobs: false,
        }
    }

    fn usage(&self, completion: u32, cached: u32) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }

    /// One streamed chunk carrying `text` (or the role, first), or the finish reason.
    pub fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = match (text, finish) {
                    (_, Some(_)) => json!({}),
                    (Some(t), None) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                };
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
            }
        }
    }

    /// The last streamed chunk when usage was asked for: no choices, just usage.
    pub fn usage_chunk(&self, completion: u32, cached: u32) -> Value {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [], "usage": self.usage(completion, cached)})
    }

    /// The streamed chunks of tool calls, as OpenAI streams them: per call,
    /// its id and name, then its arguments, both under the call's `index`.
    fn call_chunks(&self, calls: &[ToolCall]) -> Vec<Value> {
        let chunk = |delta: Value| {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": null}]})
        };
        calls
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                [
                    chunk(json!({"index": i, "id": c.id, "type": "function",
                                 "function": {"name": c.function.name, "arguments": ""}})),
                    chunk(json!({"index": i, "function": {"arguments": c.function.arguments}})),
                ]
            })
            .collect()
    }

    /// A choice's `logprobs`, in the shape of the answer's kind: chat's
    /// `content` list, or completions' parallel lists; `null` when not asked.
    fn logprobs(&self, lps: &[TokenLogprob]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                json!({"content": crate::answer::logprob_list(lps, false), "refusal": null})
            }
            Kind::Completion => {
                let top: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        l.top
                            .iter()
                            .map(|t| (t.token.clone(), json!(t.logprob)))
                            .collect::<serde_json::Map<_, _>>()
                            .into()
                    })
                    .collect();
                let mut offset = 0;
                let offsets: Vec<usize> = lps
                    .iter()
                    .map(|l| {
                        let at = offset;
                        offset += l.token.len();
                        at
                    })
                    .collect();
                json!({"tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                       "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                       "top_logprobs": top, "text_offset": offsets})
            }
        }
    }

    /// A streamed chunk with the log-probabilities of its text, when asked.
    fn with_logprobs(&self, mut chunk: Value, lps: &[TokenLogprob]) -> Value {
        if self.logprobs {
            chunk["choices"][0]["logprobs"] = self.logprobs(lps);
        }
        chunk
    }

    /// The whole answer, not streamed.
    pub fn whole(&self, text: &str, end: &Ending) -> Value {
        let mut finish = finish_reason(end.reason);
        let usage = self.usage(end.tokens_out, end.cached_tokens);
        match self.kind {
            Kind::Chat => {
                let message = if end.calls.is_empty() {
                    json!({"role": "assistant", "content": text})
                } else {
                    finish = "tool_calls";
                    json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) },
                           "tool_calls": end.calls})
                };
                json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": self.logprobs(&end.logprobs), "finish_reason": finish}],
                "usage": usage})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": self.logprobs(&end.logprobs), "finish_reason": finish}],
                "usage": usage})
            }
        }
    }
}

/// Turns an answer's pieces into the OpenAI answer, streamed or whole.
///
/// Not streamed, the answer is awaited here: a client that leaves drops this
/// future and with it the events, which cancels the generation.
pub async fn respond(
    answer: Answer,
    mut pieces: Pieces,
    stream: bool,
    include_usage: bool,
) -> Response<Body> {
    if !stream {
        return match pieces.whole().await {
            Ok((text, end)) => http::json(StatusCode::OK, &answer.whole(&text, &end)),
            Err(e) => error(e),
        };
    }
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        let send = |v: &Value| crate::http::sse::event(v);
        // Chat streams open with the assistant's role, as OpenAI's do.
        if answer.kind == Kind::Chat && tx.send(send(&answer.chunk(None, None))).await.is_err() {
            return;
        }
        loop {
            let Some(piece) = pieces.next_for(&tx).await else {
                return;
            };
            match piece {
                Piece::Text(text) => {
                    let lps = pieces.take_logprobs();
                    let chunk = answer.with_logprobs(answer.chunk(Some(&text), None), &lps);
                    if tx.send(send(&chunk)).await.is_err() {
                        return;
                    }
                }
                Piece::End(end) => {
                    let mut finish = finish_reason(end.reason);
                    if !end.calls.is_empty() {
                        for chunk in answer.call_chunks(&end.calls) {
                            let _ = tx.send(send(&chunk)).await;
                        }
                        finish = "tool_calls";
                    }
                    let _ = tx.send(send(&answer.chunk(None, Some(finish)))).await;
                    if include_usage {
                        let usage = answer.usage_chunk(end.tokens_out, end.cached_tokens);
                        let _ = tx.send(send(&usage)).await;
                    }
                    break;
                }
                Piece::Failed(e) => {
                    let _ = tx.send(error_event(e)).await;
                    break;
                }
            }
        }
        let _ = tx.send(crate::http::sse::DONE.into()).await;
    });
    resp
}

/// The answer to `POST /v1/embeddings`: a vector per input, as floats or as
/// base64 of their little-endian bytes.
pub fn embeddings(model: &str, vectors: &[Vec<f32>], tokens: u32, base64: bool) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
}

/// Standard base64 with padding (RFC 4648).
fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /v1/models` entries.
pub fn model_list(names: impl IntoIterator<Item = (String, String)>) -> Value {
    let data: Vec<Value> = names
        .into_iter()
        .map(|(id, owner)| model_object(&id, &owner))
        .collect();
    json!({"object": "list", "data": data})
}

/// One model, as `GET /v1/models/{id}` answers it.
pub fn model_object(id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_come_as_floats_or_base64_of_their_bytes() {
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
        let v = embeddings("m", &[vec![1.0, 0.0]], 3, false);
        assert_eq!(v["data"][0]["embedding"], json!([1.0, 0.0]));
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        let b = embeddings("m", &[vec![1.0]], 1, true);
        assert_eq!(b["data"][0]["embedding"], "AACAPw==");
    }

    #[test]
    fn an_answer_with_a_call_has_tool_calls_and_their_finish_reason() {
        let answer = Answer::new(Kind::Chat, "m", 3);
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let ending = |calls| Ending {
            calls,
            reason: StopReason::Eos,
            tokens_out: 9,
            cached_tokens: 0,
            decode_time_ms: 1,
            decoded_tokens: 9,
            logprobs: vec![],
        };
        // Without tools in the request, the text is just text.
        let plain = answer.whole(text, &ending(vec![]));
        assert_eq!(plain["choices"][0]["message"]["content"], text);
        let (content, calls) = crate::tool_calls::parse(text).unwrap();
        let whole = answer.whole(&content, &ending(calls));
        let choice = &whole["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        let id = call["id"].as_str().unwrap();
        assert!(
            id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{id}"
        );
        let chunks = answer.call_chunks(&crate::tool_calls::parse(text).unwrap().1);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"],
            0
        );
    }

    fn ending(reason: StopReason, tokens_out: u32) -> Ending {
        Ending {
            calls: vec![],
            reason,
            tokens_out,
            cached_tokens: 0,
            decode_time_ms: 1,
            decoded_tokens: tokens_out,
            logprobs: vec![],
        }
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let chat = Answer::new(Kind::Chat, "m", 3);
        let first = chat.chunk(None, None);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text = chat.chunk(Some("hi"), None);
        assert_eq!(text["choices"][0]["delta"], json!({"content": "hi"}));
        assert_eq!(text["choices"][0]["finish_reason"], Value::Null);
        let last = chat.chunk(None, Some("length"));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = chat.usage_chunk(4, 2);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
        let whole = chat.whole("hello", &ending(StopReason::Eos, 2));
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(
            whole["choices"][0]["message"],
            json!({"role": "assistant", "content": "hello"})
        );
        assert_eq!(whole["choices"][0]["finish_reason"], "stop");
        let completion = Answer::new(Kind::Completion, "m", 1);
        let chunk = completion.chunk(Some("x"), None);
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["text"], "x");
        let whole = completion.whole("x", &ending(StopReason::MaxTokens, 1));
        assert_eq!(whole["choices"][0]["finish_reason"], "length");
    }
}
