//! The queen's OpenAI front: `GET /v1/models` from every hive's catalog,
//! chat and completions run as jobs (so they fail over like one), and
//! embeddings routed by `model` to a worker of it.

use super::jobs::Job;
use super::routes::start_job;
use super::{scheduler, Queen};
use crate::http::{self, Body};
use crate::protocol::{ApiError, ErrorCode, InferenceEvent};
use crate::{anthropic, llama_server, openai, responses};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

/// The models of every reachable hive, for OpenAI's `GET /v1/models`.
pub(super) fn models(q: &Queen) -> serde_json::Value {
    let mut seen: Vec<(String, String)> = Vec::new();
    for h in q.cluster.view.state().hives.iter().filter(|h| h.reachable) {
        for m in h.snapshot.iter().flat_map(|s| &s.models) {
            if !seen.iter().any(|(id, _)| *id == m.entry.name) {
                seen.push((m.entry.name.clone(), h.conn.name.clone()));
            }
        }
    }
    openai::model_list(seen)
}

/// Runs an OpenAI request as a job, routed by its `model` (the job stream,
/// named in the `x-rbee-job` header, narrates it), and answers from the
/// job's inference events: a worker lost mid-answer is replaced without the
/// client seeing a break (DESIGN.md §11). Until a worker has started, a
/// failure is the answer's status; a client that leaves cancels the job.
pub(super) async fn openai_route(
    q: &Queen,
    req: Request<Incoming>,
    kind: openai::Kind,
) -> Response<Body> {
    let key = http::auth::key_of(&req);
    let (prepared, model) = match read_openai(q, req, kind).await {
        Ok(checked) => checked,
        Err(e) => return openai::error(e),
    };
    let (job, prompt_tokens, events) = match run_job(q, key, &model, prepared.inference).await {
        Ok(started) => started,
        Err(e) => return openai::error(e),
    };
    let mut answer = openai::Answer::new(kind, &model, prompt_tokens);
    answer.logprobs = prepared.logprobs;
    let pieces = crate::answer::Pieces::new(events, prepared.tool_calls);
    let resp = openai::respond(answer, pieces, prepared.stream, prepared.include_usage).await;
    with_job(resp, &job)
}

/// Anthropic's `POST /v1/messages`, run as a job like OpenAI's requests.
pub(super) async fn anthropic_route(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let key = http::auth::key_of(&req);
    let read = async {
        let body = http::read_body(req).await?;
        let prepared = anthropic::parse(&body)?;
        let model = q.aliases.resolve(&prepared.model)?;
        Ok::<_, ApiError>((prepared, model))
    };
    let (prepared, model) = match read.await {
        Ok(read) => read,
        Err(e) => return anthropic::error(e),
    };
    let stop = prepared.inference.sampling.stop.clone();
    let (job, prompt_tokens, events) = match run_job(q, key, &model, prepared.inference).await {
        Ok(started) => started,
        Err(e) => return anthropic::error(e),
    };
    let answer = anthropic::Answer::new(&prepared.model, prompt_tokens, stop);
    let pieces = crate::answer::Pieces::new(events, prepared.tool_calls);
    with_job(
        anthropic::respond(answer, pieces, prepared.stream).await,
        &job,
    )
}

/// OpenAI's `POST /v1/responses`, run as a job; `previous_response_id`
/// continues a conversation the queen kept, routed by its prefix to the worker
/// that holds it.
pub(super) async fn responses_route(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let key = http::auth::key_of(&req);
    let read = async {
        let body = http::read_body(req).await?;
        let prepared = responses::parse(&body, &q.responses)?;
        let model = q.aliases.resolve(&prepared.model)?;
        Ok::<_, ApiError>((prepared, model))
    };
    let (mut prepared, model) = match read.await {
        Ok(read) => read,
        Err(e) => return responses::error(e),
    };
    let inference = std::mem::take(&mut prepared.inference);
    let tool_calls = prepared.tool_calls;
    let (job, prompt_tokens, events) = match run_job(q, key, &model, inference).await {
        Ok(started) => started,
        Err(e) => return responses::error(e),
    };
    let name = prepared.model.clone();
    let answer = responses::Answer::new(&name, prompt_tokens, prepared, q.responses.clone());
    let pieces = crate::answer::Pieces::new(events, tool_calls);
    with_job(responses::respond(answer, pieces).await, &job)
}

/// `GET` and `DELETE /v1/responses/{id}`.
pub(super) fn stored_response(q: &Queen, id: &str, delete: bool) -> Response<Body> {
    let found = match delete {
        true => q.responses.delete(id),
        false => q.responses.get(id),
    };
    match found {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => responses::error(e),
    }
}

/// llama-server's `POST /completion`, routed by `model` and run as a job.
pub(super) async fn completion_route(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let arrived = std::time::Instant::now();
    let key = http::auth::key_of(&req);
    let read = async {
        let body = http::read_body(req).await?;
        let prepared = llama_server::parse_completion(&body)?;
        if prepared.model.is_empty() {
            return Err(ApiError::invalid(
                "model",
                "model is required (the queen routes by it)",
            ));
        }
        let model = q.aliases.resolve(&prepared.model)?;
        Ok::<_, ApiError>((prepared, model))
    };
    let (prepared, model) = match read.await {
        Ok(read) => read,
        Err(e) => return llama_server::error(e),
    };
    let stop = prepared.inference.sampling.stop.clone();
    let probs = prepared.inference.logprobs.is_some();
    let (job, prompt_tokens, events) = match run_job(q, key, &model, prepared.inference).await {
        Ok(started) => started,
        Err(e) => return llama_server::error(e),
    };
    let answer = llama_server::Answer {
        model: prepared.model,
        prompt_tokens,
        arrived,
        stop,
        probs,
    };
    let pieces = crate::answer::Pieces::new(events, false);
    with_job(
        llama_server::respond(answer, pieces, prepared.stream).await,
        &job,
    )
}

/// Tokens of a text or of chat messages, counted by a worker of `model`
/// (routed to, or provisioned as a job's would be).
async fn tokenize_on(
    q: &Queen,
    model: &str,
    mut req: crate::protocol::TokenizeRequest,
) -> Result<serde_json::Value, ApiError> {
    let job = q.jobs.create();
    job.describe(model);
    let work = scheduler::Work {
        node: None,
        model: model.to_string(),
        inference: Default::default(),
    };
    let target = scheduler::load(&q.cluster, &job, &work).await;
    job.finish();
    let target = target?;
    req.model.clear();
    let worker = crate::clients::WorkerClient::new(&target.url, target.hive.token.as_deref());
    worker.tokenize(&req).await
}

/// llama-server's `POST /tokenize`, with the `model` whose tokens are wanted.
pub(super) async fn tokenize_route(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let answered = async {
        let r: crate::protocol::TokenizeRequest = http::read_json(req).await?;
        if r.model.is_empty() {
            return Err(ApiError::invalid(
                "model",
                "model is required (the queen routes by it)",
            ));
        }
        let model = q.aliases.resolve(&r.model)?;
        tokenize_on(q, &model, r).await
    };
    match answered.await {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => llama_server::error(e),
    }
}

/// Anthropic's `POST /v1/messages/count_tokens`: the prompt the messages and
/// tools make with the model's own template, counted by a worker of it.
pub(super) async fn count_tokens_route(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let counted = async {
        let body = http::read_body(req).await?;
        let prepared = anthropic::parse_count(&body)?;
        let model = q.aliases.resolve(&prepared.model)?;
        let request = crate::protocol::TokenizeRequest {
            messages: prepared.inference.messages,
            tools: prepared.inference.tools,
            ..Default::default()
        };
        let answer = tokenize_on(q, &model, request).await?;
        Ok::<_, ApiError>(answer["tokens"].as_array().map_or(0, Vec::len))
    };
    match counted.await {
        Ok(n) => http::json(StatusCode::OK, &anthropic::counted(n)),
        Err(e) => anthropic::error(e),
    }
}

/// OpenAI's `GET /v1/models/{id}`: a model some reachable hive lists.
pub(super) fn model_route(q: &Queen, id: &str) -> Response<Body> {
    let found = q.aliases.resolve(id).ok().and_then(|model| {
        let state = q.cluster.view.state();
        state.hives.iter().filter(|h| h.reachable).find_map(|h| {
            let entry = super::placement::entry(h.snapshot.as_ref()?, &model)?;
            Some((entry.entry.name.clone(), h.conn.name.clone()))
        })
    });
    match found {
        Some((name, hive)) => http::json(StatusCode::OK, &openai::model_object(&name, &hive)),
        None => openai::error(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("no hive has a model {id} (GET /v1/models lists them)"),
        )),
    }
}

/// The job's inference events once a worker has started on it, and the
/// prompt's length; every front runs its requests through here.
pub(super) async fn run_job(
    q: &Queen,
    key: Option<String>,
    model: &str,
    inference: crate::protocol::InferenceRequest,
) -> Result<(Arc<Job>, u32, Events), ApiError> {
    let work = scheduler::Work {
        node: None,
        model: model.to_string(),
        inference,
    };
    let job = q.jobs.create();
    job.for_key(key);
    let mut events = job.tap();
    start_job(q, job.clone(), work);
    loop {
        match events.recv().await {
            Some(InferenceEvent::Started { prompt_tokens, .. }) => {
                return Ok((job, prompt_tokens, events))
            }
            Some(InferenceEvent::Error { code, message }) => {
                return Err(ApiError::new(code, message))
            }
            Some(_) => {}
            None => {
                return Err(ApiError::new(
                    ErrorCode::InferenceFailed,
                    "the job ended without an answer",
                ))
            }
        }
    }
}

/// Names the job behind an answer in its `x-rbee-job` header.
pub(super) fn with_job(mut resp: Response<Body>, job: &Job) -> Response<Body> {
    if let Ok(id) = hyper::header::HeaderValue::from_str(&job.id) {
        resp.headers_mut().insert("x-rbee-job", id);
    }
    resp
}

/// A job's inference events, typed.
pub(super) type Events = tokio::sync::mpsc::UnboundedReceiver<InferenceEvent>;

/// `POST /v1/embeddings`, routed by `model` to a worker of it (provisioned
/// like a job's, and shown as a job on the status page).
pub(super) async fn embeddings_route(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let checked = async {
        let body = http::read_body(req).await?;
        let mut request = crate::protocol::EmbeddingsRequest::read(&body)?;
        request.texts()?;
        if request.model.is_empty() {
            return Err(ApiError::invalid("model", "model is required"));
        }
        request.model = q.aliases.resolve(&request.model)?;
        Ok::<_, ApiError>(request)
    };
    let request = match checked.await {
        Ok(r) => r,
        Err(e) => return openai::error(e),
    };
    let work = scheduler::Work {
        node: None,
        model: request.model.clone(),
        inference: crate::protocol::InferenceRequest::default(),
    };
    let job = q.jobs.create();
    job.describe(&work.model);
    let answer = scheduler::embed(&q.cluster, &job, &work, &request).await;
    let resp = match answer {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => {
            job.fail(e.clone());
            openai::error(e)
        }
    };
    job.finish();
    resp
}

/// An OpenAI request checked, and its `model`.
async fn read_openai(
    q: &Queen,
    req: Request<Incoming>,
    kind: openai::Kind,
) -> Result<(openai::Prepared, String), ApiError> {
    let body = http::read_body(req).await?;
    let prepared = openai::parse(&body, kind)?;
    let model = openai::model_of(&body).unwrap_or_default();
    if model.is_empty() {
        return Err(ApiError::invalid("model", "model is required"));
    }
    let model = q.aliases.resolve(&model)?;
    Ok((prepared, model))
}
