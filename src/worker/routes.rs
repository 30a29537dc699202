//! The worker's HTTP side: its one table of `(method, path, Endpoint)` rows,
//! the `match` with a line per endpoint, and rbee's own endpoints (health,
//! readiness, loading progress, inference as SSE); the client APIs' handlers
//! are in `fronts.rs`.

use super::engine::Submission;
use super::fronts::{
    completion, count_tokens, describe, detokenize, embeddings, messages, model, ollama_chat,
    ollama_embed, openai_completion, responses_route, tokenize,
};
use super::Worker;
use crate::http::{self, sse, Body, Reply, Route};
use crate::protocol::{
    new_id, now_rfc3339, ApiError, ErrorCode, Health, InferenceEvent, InferenceRequest,
    LoadingEvent, ReadyStatus, WorkerState,
};
use crate::{ollama, openai};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

/// The worker's endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Endpoint {
    Health,
    Ready,
    LoadingProgress,
    Inference,
    ChatCompletions,
    Embeddings,
    Completions,
    Models,
    Metrics,
    Shutdown,
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    OllamaVersion,
    Messages,
    CountTokens,
    Completion,
    Tokenize,
    Detokenize,
    Props,
    Slots,
    Model,
    Responses,
    GetResponse,
    DeleteResponse,
}

const ROUTES: &[Route<Endpoint>] = &[
    (Method::GET, "/health", Endpoint::Health),
    (Method::GET, "/v1/health", Endpoint::Health),
    (Method::GET, "/v1/ready", Endpoint::Ready),
    (
        Method::GET,
        "/v1/loading/progress",
        Endpoint::LoadingProgress,
    ),
    (Method::POST, "/v1/inference", Endpoint::Inference),
    (
        Method::POST,
        "/v1/chat/completions",
        Endpoint::ChatCompletions,
    ),
    (Method::POST, "/v1/completions", Endpoint::Completions),
    (Method::POST, "/v1/embeddings", Endpoint::Embeddings),
    (Method::GET, "/v1/models", Endpoint::Models),
    (Method::POST, "/v1/admin/shutdown", Endpoint::Shutdown),
    (Method::GET, "/metrics", Endpoint::Metrics),
    // Ollama's and Anthropic's faces, for this worker's model (DESIGN.md §16).
    (Method::POST, "/api/chat", Endpoint::OllamaChat),
    (Method::POST, "/api/generate", Endpoint::OllamaGenerate),
    (Method::POST, "/api/embed", Endpoint::OllamaEmbed),
    (Method::GET, "/api/version", Endpoint::OllamaVersion),
    (Method::POST, "/v1/messages", Endpoint::Messages),
    (
        Method::POST,
        "/v1/messages/count_tokens",
        Endpoint::CountTokens,
    ),
    // llama-server's own endpoints.
    (Method::POST, "/completion", Endpoint::Completion),
    (Method::POST, "/tokenize", Endpoint::Tokenize),
    (Method::POST, "/detokenize", Endpoint::Detokenize),
    (Method::GET, "/props", Endpoint::Props),
    (Method::GET, "/slots", Endpoint::Slots),
    (Method::GET, "/v1/models/{}", Endpoint::Model),
    (Method::POST, "/v1/responses", Endpoint::Responses),
    (Method::GET, "/v1/responses/{}", Endpoint::GetResponse),
    (Method::DELETE, "/v1/responses/{}", Endpoint::DeleteResponse),
];

pub(super) async fn route(w: Worker, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let found = http::find(ROUTES, req.method(), &path);
    let (endpoint, params) = match found {
        Ok(found) => found,
        Err(e) => return crate::answer::route_error(&path, e),
    };
    let param = params.first().map(String::as_str).unwrap_or_default();
    let reply = match endpoint {
        Endpoint::Health => Ok(http::json(StatusCode::OK, &Health::alive("worker"))),
        Endpoint::Ready => Ok(http::json(StatusCode::OK, &ready_status(&w))),
        Endpoint::Metrics => Ok(w.metrics.respond()),
        Endpoint::LoadingProgress => Ok(loading_progress(&w)),
        Endpoint::Inference => inference(&w, req).await,
        Endpoint::ChatCompletions => return openai_completion(&w, req, openai::Kind::Chat).await,
        Endpoint::Completions => return openai_completion(&w, req, openai::Kind::Completion).await,
        Endpoint::Embeddings => return embeddings(&w, req).await,
        Endpoint::OllamaChat => return ollama_chat(&w, req, ollama::Kind::Chat).await,
        Endpoint::OllamaGenerate => return ollama_chat(&w, req, ollama::Kind::Generate).await,
        Endpoint::OllamaEmbed => return ollama_embed(&w, req).await,
        Endpoint::OllamaVersion => Ok(http::json(
            StatusCode::OK,
            &serde_json::json!({ "version": ollama::VERSION }),
        )),
        Endpoint::Messages => return messages(&w, req).await,
        Endpoint::CountTokens => return count_tokens(&w, req).await,
        Endpoint::Completion => return completion(&w, req).await,
        Endpoint::Tokenize => return tokenize(&w, req).await,
        Endpoint::Detokenize => return detokenize(&w, req).await,
        Endpoint::Props | Endpoint::Slots => return describe(&w, endpoint).await,
        Endpoint::Model => return model(&w, param),
        Endpoint::Responses => return responses_route(&w, req).await,
        Endpoint::GetResponse => w
            .responses
            .get(param)
            .map(|v| http::json(StatusCode::OK, &v)),
        Endpoint::DeleteResponse => w
            .responses
            .delete(param)
            .map(|v| http::json(StatusCode::OK, &v)),
        Endpoint::Models => Ok(http::json(
            StatusCode::OK,
            &openai::model_list([(w.model.to_string(), "rbee".to_string())]),
        )),
        Endpoint::Shutdown => {
            w.shutdown.notify_one();
            Ok(http::json(
                StatusCode::ACCEPTED,
                &Health::stopping("worker"),
            ))
        }
    };
    http::reply(reply)
}

fn ready_status(w: &Worker) -> ReadyStatus {
    let (state, error) = match &*w.loading.borrow() {
        LoadingEvent::Ready => (WorkerState::Ready, None),
        LoadingEvent::Failed { message } => (WorkerState::Failed, Some(message.clone())),
        _ => (WorkerState::Loading, None),
    };
    let load = w.engine.load();
    let (cached_sequences, cached_tokens) = load.cached();
    ReadyStatus {
        ready: state == WorkerState::Ready,
        state,
        progress_url: "/v1/loading/progress".into(),
        model: w.model.to_string(),
        slots_total: w.slots,
        slots_busy: load.busy(),
        queue_len: load.queued(),
        cached_sequences,
        cached_tokens,
        error,
    }
}

/// Streams loading progress; a late subscriber gets where loading stands, which
/// after loading is `ready` (or `failed`) and `[DONE]` at once.
fn loading_progress(w: &Worker) -> Response<Body> {
    http::sse_from_watch(w.loading.clone(), |e| {
        matches!(e, LoadingEvent::Ready | LoadingEvent::Failed { .. })
    })
}

/// Checks a request's fields; the error says what is wrong.
fn validate(r: &InferenceRequest) -> Result<(), ApiError> {
    crate::protocol::check_prompt(&r.prompt, r.messages.as_deref())?;
    r.sampling.validate()
}

/// Whether the model is loaded, or why requests cannot run yet.
pub(super) fn loaded(w: &Worker) -> Result<(), ApiError> {
    match &*w.loading.borrow() {
        LoadingEvent::Ready => Ok(()),
        LoadingEvent::Failed { message } => Err(ApiError::new(
            ErrorCode::ModelLoadFailed,
            format!("the model failed to load: {message}"),
        )),
        _ => Err(ApiError::new(
            ErrorCode::Loading,
            "the model is still loading; watch /v1/loading/progress",
        )),
    }
}

/// Hands a checked request to the engine; its events, and the prompt's length in tokens.
pub(super) async fn start(
    w: &Worker,
    request: InferenceRequest,
) -> Result<(u32, mpsc::UnboundedReceiver<InferenceEvent>), ApiError> {
    validate(&request)?;
    loaded(w)?;
    let Some(reservation) = w.engine.reserve() else {
        return Err(ApiError::new(
            ErrorCode::QueueFull,
            "every slot is busy and the queue is full; try again shortly",
        ));
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let admission = w.engine.submit(Submission {
        request,
        events: events_tx,
        reservation,
    });
    match admission.await {
        Ok(Ok(prompt_tokens)) => Ok((prompt_tokens, events)),
        Ok(Err(rejection)) => Err(rejection),
        Err(_) => Err(ApiError::new(
            ErrorCode::ShuttingDown,
            "the worker is shutting down",
        )),
    }
}

async fn inference(w: &Worker, req: Request<Incoming>) -> Reply {
    let request: InferenceRequest = http::read_json(req).await?;
    let job_id = request.job_id.clone().unwrap_or_else(|| new_id("job"));
    let (prompt_tokens, mut events) = start(w, request).await?;
    let (tx, resp) = http::sse_response();
    let started = InferenceEvent::Started {
        job_id,
        model: w.model.to_string(),
        started_at: now_rfc3339(),
        prompt_tokens,
    };
    tokio::spawn(async move {
        if tx.send(sse::event(&started)).await.is_err() {
            return;
        }
        let mut ended = false;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        ended = matches!(event, InferenceEvent::End { .. } | InferenceEvent::Error { .. });
                        if tx.send(sse::event(&event)).await.is_err() {
                            return; // Dropping `events` tells the engine the client left.
                        }
                    }
                    None => break,
                },
                () = tx.closed() => return,
            }
        }
        if !ended {
            // The engine went away without a word: say so rather than end silently.
            let lost = InferenceEvent::Error {
                code: ErrorCode::InferenceFailed,
                message: "the engine stopped before the request finished".into(),
            };
            let _ = tx.send(sse::event(&lost)).await;
        }
        let _ = tx.send(sse::DONE.into()).await;
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_answers_a_wrong_method_with_405() {
        http::assert_routes_are_consistent(ROUTES);
    }
}
