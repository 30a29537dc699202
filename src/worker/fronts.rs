//! The client APIs a worker serves for its one model, each a thin handler
//! over the engine: OpenAI's Chat Completions, completions, embeddings and
//! Responses, Ollama's chat, generate and embed, Anthropic's Messages and
//! count_tokens, llama-server's `/completion`, `/tokenize`, `/detokenize`,
//! `/props` and `/slots`. Each reads its request with its protocol's module
//! and answers in its shapes; the worker's own API stays in `mod.rs`.

use super::engine::{self, ToTokenize};
use super::routes::{loaded, start, Endpoint};
use super::Worker;
use crate::http::{self, Body};
use crate::protocol::{ApiError, ErrorCode};
use crate::{anthropic, llama_server, ollama, openai, responses};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

/// `POST /v1/chat/completions` and `POST /v1/completions`.
pub(super) async fn openai_completion(
    w: &Worker,
    req: Request<Incoming>,
    kind: openai::Kind,
) -> Response<Body> {
    let started = async {
        let body = http::read_body(req).await?;
        let prepared = openai::parse(&body, kind)?;
        let (tool_calls, logprobs) = (prepared.tool_calls, prepared.logprobs);
        let (prompt_tokens, events) = start(w, prepared.inference).await?;
        Ok::<_, ApiError>((
            (prepared.stream, prepared.include_usage),
            (tool_calls, logprobs),
            prompt_tokens,
            events,
        ))
    };
    match started.await {
        Ok(((stream, include_usage), (tool_calls, logprobs), prompt_tokens, events)) => {
            let mut answer = openai::Answer::new(kind, &w.model, prompt_tokens);
            answer.logprobs = logprobs;
            let pieces = crate::answer::Pieces::new(events, tool_calls);
            openai::respond(answer, pieces, stream, include_usage).await
        }
        Err(e) => openai::error(e),
    }
}

/// Ollama's `POST /api/chat` and `/api/generate` for this worker's model. A
/// worker is stopped by its hive, so `keep_alive: 0` is for the queen.
pub(super) async fn ollama_chat(
    w: &Worker,
    req: Request<Incoming>,
    kind: ollama::Kind,
) -> Response<Body> {
    let arrived = std::time::Instant::now();
    let started = async {
        let body = http::read_body(req).await?;
        let prepared = ollama::parse(&body, kind)?;
        if prepared.keep_alive == Some(ollama::KeepAlive::Unload) {
            return Err(ApiError::invalid(
                "keep_alive",
                "keep_alive 0 stops a worker through its hive: send it to the queen",
            ));
        }
        if prepared.load_only {
            return Ok((prepared, None));
        }
        let inference = prepared.inference.clone();
        Ok::<_, ApiError>((prepared, Some(start(w, inference).await?)))
    };
    match started.await {
        Ok((prepared, Some((prompt_tokens, events)))) => {
            let mut answer = ollama::Answer::new(kind, &prepared.model, prompt_tokens, arrived);
            answer.logprobs = prepared.logprobs;
            let pieces = crate::answer::Pieces::new(events, prepared.tool_calls);
            ollama::respond(answer, pieces, prepared.stream).await
        }
        Ok((prepared, None)) => http::json(
            StatusCode::OK,
            &ollama::loaded(kind, &prepared.model, "load"),
        ),
        Err(e) => ollama::error(e),
    }
}

/// Ollama's `POST /api/embed` for this worker's model.
pub(super) async fn ollama_embed(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let arrived = std::time::Instant::now();
    let answered = async {
        let body = http::read_body(req).await?;
        let (model, request) = ollama::embed_request(&body, false)?;
        let (texts, _) = request.texts()?;
        loaded(w)?;
        let (vectors, tokens) = w
            .engine
            .embed(texts)
            .await
            .map_err(|_| ApiError::new(ErrorCode::InferenceFailed, "the engine stopped"))??;
        Ok::<_, ApiError>(ollama::embed(&model, &vectors, tokens, arrived))
    };
    match answered.await {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => ollama::error(e),
    }
}

/// Anthropic's `POST /v1/messages` for this worker's model.
pub(super) async fn messages(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let started = async {
        let body = http::read_body(req).await?;
        let prepared = anthropic::parse(&body)?;
        let inference = prepared.inference.clone();
        Ok::<_, ApiError>((prepared, start(w, inference).await?))
    };
    match started.await {
        Ok((prepared, (prompt_tokens, events))) => {
            let stop = prepared.inference.sampling.stop.clone();
            let answer = anthropic::Answer::new(&prepared.model, prompt_tokens, stop);
            let pieces = crate::answer::Pieces::new(events, prepared.tool_calls);
            anthropic::respond(answer, pieces, prepared.stream).await
        }
        Err(e) => anthropic::error(e),
    }
}

/// Anthropic's `POST /v1/messages/count_tokens`: the prompt the messages and
/// tools make with this model's template, counted.
pub(super) async fn count_tokens(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let counted = async {
        let body = http::read_body(req).await?;
        let prepared = anthropic::parse_count(&body)?;
        let what = ToTokenize::Chat {
            messages: prepared.inference.messages.unwrap_or_default(),
            tools: prepared.inference.tools,
        };
        engine_answer(w, w.engine.tokenize(what)).await?
    };
    match counted.await {
        Ok(t) => http::json(StatusCode::OK, &anthropic::counted(t.ids.len())),
        Err(e) => anthropic::error(e),
    }
}

/// What the engine answers, once the model is loaded.
async fn engine_answer<T>(
    w: &Worker,
    answer: tokio::sync::oneshot::Receiver<T>,
) -> Result<T, ApiError> {
    loaded(w)?;
    answer
        .await
        .map_err(|_| ApiError::new(ErrorCode::InferenceFailed, "the engine stopped"))
}

/// OpenAI's `POST /v1/responses` for this worker's model; it keeps its own
/// responses for `previous_response_id`.
pub(super) async fn responses_route(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let started = async {
        let body = http::read_body(req).await?;
        let mut prepared = responses::parse(&body, &w.responses)?;
        let inference = std::mem::take(&mut prepared.inference);
        Ok::<_, ApiError>((prepared, start(w, inference).await?))
    };
    match started.await {
        Ok((prepared, (prompt_tokens, events))) => {
            let pieces = crate::answer::Pieces::new(events, prepared.tool_calls);
            let name = prepared.model.clone();
            let answer =
                responses::Answer::new(&name, prompt_tokens, prepared, w.responses.clone());
            responses::respond(answer, pieces).await
        }
        Err(e) => responses::error(e),
    }
}

/// llama-server's `POST /completion`.
pub(super) async fn completion(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let arrived = std::time::Instant::now();
    let started = async {
        let body = http::read_body(req).await?;
        let prepared = llama_server::parse_completion(&body)?;
        let inference = prepared.inference.clone();
        Ok::<_, ApiError>((prepared, start(w, inference).await?))
    };
    match started.await {
        Ok((prepared, (prompt_tokens, events))) => {
            let answer = llama_server::Answer {
                model: w.model.to_string(),
                prompt_tokens,
                arrived,
                stop: prepared.inference.sampling.stop.clone(),
                probs: prepared.inference.logprobs.is_some(),
            };
            let pieces = crate::answer::Pieces::new(events, false);
            llama_server::respond(answer, pieces, prepared.stream).await
        }
        Err(e) => llama_server::error(e),
    }
}

/// llama-server's `POST /tokenize`, and rbee's chat form of it (`messages`, `tools`).
pub(super) async fn tokenize(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let answered = async {
        let r: crate::protocol::TokenizeRequest = http::read_json(req).await?;
        let what = match (r.content, r.messages) {
            (Some(content), None) => ToTokenize::Text {
                content,
                add_special: r.add_special,
                parse_special: r.parse_special,
            },
            (None, Some(messages)) => ToTokenize::Chat {
                messages,
                tools: r.tools,
            },
            _ => {
                return Err(ApiError::invalid(
                    "content",
                    "give content (a text) or messages, one of the two",
                ))
            }
        };
        let tokens = engine_answer(w, w.engine.tokenize(what)).await??;
        Ok::<_, ApiError>(tokens_json(&tokens, r.with_pieces))
    };
    match answered.await {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => llama_server::error(e),
    }
}

/// llama-server's `POST /detokenize`.
pub(super) async fn detokenize(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    #[derive(serde::Deserialize)]
    struct Tokens {
        tokens: Vec<i32>,
    }
    let answered = async {
        let r: Tokens = http::read_json(req).await?;
        let bytes = engine_answer(w, w.engine.detokenize(r.tokens)).await??;
        Ok::<_, ApiError>(String::from_utf8_lossy(&bytes).into_owned())
    };
    match answered.await {
        Ok(content) => http::json(StatusCode::OK, &serde_json::json!({ "content": content })),
        Err(e) => llama_server::error(e),
    }
}

/// llama-server's `GET /props` and `GET /slots`.
pub(super) async fn describe(w: &Worker, endpoint: Endpoint) -> Response<Body> {
    match engine_answer(w, w.engine.describe()).await {
        Ok(d) if endpoint == Endpoint::Slots => http::json(StatusCode::OK, &slots(&d)),
        Ok(d) => http::json(StatusCode::OK, &props(&d, w)),
        Err(e) => llama_server::error(e),
    }
}

/// OpenAI's `GET /v1/models/{id}`: this worker's model, by its name.
pub(super) fn model(w: &Worker, id: &str) -> Response<Body> {
    let named = crate::model_ref::canonical(id).is_ok_and(|c| c == *w.model);
    match named {
        true => http::json(StatusCode::OK, &openai::model_object(&w.model, "rbee")),
        false => openai::error(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("this worker serves {}, not {id}", w.model),
        )),
    }
}

/// `POST /v1/embeddings`: a vector per input, in OpenAI's shape.
pub(super) async fn embeddings(w: &Worker, req: Request<Incoming>) -> Response<Body> {
    let answered = async {
        let body = http::read_body(req).await?;
        let request = crate::protocol::EmbeddingsRequest::read(&body)?;
        let (texts, base64) = request.texts()?;
        loaded(w)?;
        let (vectors, tokens) = w
            .engine
            .embed(texts)
            .await
            .map_err(|_| ApiError::new(ErrorCode::InferenceFailed, "the engine stopped"))??;
        Ok(openai::embeddings(&w.model, &vectors, tokens, base64))
    };
    match answered.await {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => openai::error(e),
    }
}

/// The answer to `/tokenize`: ids, or with `with_pieces` each id and its text
/// (its bytes where they are not whole UTF-8), as llama-server gives them.
fn tokens_json(t: &engine::Tokenized, with_pieces: bool) -> Value {
    if !with_pieces {
        return json!({ "tokens": t.ids });
    }
    let tokens: Vec<Value> = t
        .ids
        .iter()
        .zip(&t.pieces)
        .map(|(id, piece)| match std::str::from_utf8(piece) {
            Ok(text) => json!({"id": id, "piece": text}),
            Err(_) => json!({"id": id, "piece": piece}),
        })
        .collect();
    json!({ "tokens": tokens })
}

/// `GET /props`.
fn props(d: &engine::Described, w: &Worker) -> Value {
    json!({"default_generation_settings": {"n_ctx": d.n_ctx, "model": &*w.model,
               "params": {"temperature": engine::DEFAULT_TEMPERATURE,
                          "top_k": engine::DEFAULT_TOP_K,
                          "top_p": engine::DEFAULT_TOP_P,
                          "n_predict": -1}},
           "total_slots": d.slots.len(), "model_path": &*w.model_path, "chat_template": d.chat_template,
           "attention_kernel": w.kernel, "attention_kernel_self_test": &*w.self_test,
           "cache_type_k": w.cache_types.0, "cache_type_v": w.cache_types.1,
           "n_vocab": d.n_vocab, "modalities": {"vision": false, "audio": false},
           "build_info": format!("rbee {}", env!("CARGO_PKG_VERSION"))})
}

/// `GET /slots`.
fn slots(d: &engine::Described) -> Value {
    let slots: Vec<Value> = d
        .slots
        .iter()
        .enumerate()
        .map(|(id, s)| match s {
            Some((prompt, decoded)) => json!({"id": id, "n_ctx": d.n_ctx, "is_processing": true,
                                              "n_prompt_tokens": prompt, "n_decoded": decoded}),
            None => json!({"id": id, "n_ctx": d.n_ctx, "is_processing": false}),
        })
        .collect();
    Value::Array(slots)
}
