//! The queen's OpenAI front: `GET /v1/models` from every hive's catalog,
//! chat and completions run as jobs (so they fail over like one), and
//! embeddings routed by `model` to a worker of it.

use super::jobs::Job;
use super::{scheduler, start_job, Queen};
use crate::http::{self, Body};
use crate::protocol::{ApiError, ErrorCode, InferenceEvent};
use crate::{anthropic, openai};
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
    let (prepared, model) = match read_openai(req, kind).await {
        Ok(checked) => checked,
        Err(e) => return openai::error(e),
    };
    let (job, prompt_tokens, events) = match run_job(q, key, &model, prepared.inference).await {
        Ok(started) => started,
        Err(e) => return openai::error(e),
    };
    let answer = openai::Answer::new(kind, &model, prompt_tokens);
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
        let model = crate::hive::model_ref::canonical(&prepared.model)?;
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
        request.model = crate::hive::model_ref::canonical(&request.model)?;
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
    req: Request<Incoming>,
    kind: openai::Kind,
) -> Result<(openai::Prepared, String), ApiError> {
    let body = http::read_body(req).await?;
    let prepared = openai::parse(&body, kind)?;
    let model = openai::model_of(&body).unwrap_or_default();
    if model.is_empty() {
        return Err(ApiError::invalid("model", "model is required"));
    }
    let model = crate::hive::model_ref::canonical(&model)?;
    Ok((prepared, model))
}
