//! The queen's Ollama front (DESIGN.md §16): `/api/*` for every model in the
//! cluster. Chat and generate run as jobs, like OpenAI's requests, so they
//! fail over; `keep_alive` is handed to the hive of the worker that answered;
//! the listings come from the live view; `pull` fetches onto the hive with the
//! most room, its progress in Ollama's lines.

use super::front::{run_job, with_job, Events};
use super::{hives, placement, scheduler, status, Queen};
use crate::http::{self, Body};
use crate::ollama::{self, KeepAlive, Kind};
use crate::protocol::{ApiError, DownloadEvent, ErrorCode, InferenceEvent, ModelEntry};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

/// `POST /api/chat` and `POST /api/generate`.
pub(super) async fn chat(q: &Queen, req: Request<Incoming>, kind: Kind) -> Response<Body> {
    let arrived = Instant::now();
    let key = http::auth::key_of(&req);
    let read = async {
        let body = http::read_body(req).await?;
        let prepared = ollama::parse(&body, kind)?;
        let model = q.aliases.resolve(&prepared.model)?;
        Ok::<_, ApiError>((prepared, model))
    };
    let (prepared, model) = match read.await {
        Ok(read) => read,
        Err(e) => return ollama::error(e),
    };
    if prepared.load_only {
        return match load(q, &model, prepared.keep_alive).await {
            Ok(()) => {
                let reason = match prepared.keep_alive {
                    Some(KeepAlive::Unload) => "unload",
                    _ => "load",
                };
                http::json(
                    StatusCode::OK,
                    &ollama::loaded(kind, &prepared.model, reason),
                )
            }
            Err(e) => ollama::error(e),
        };
    }
    let (job, prompt_tokens, events) = match run_job(q, key, &model, prepared.inference).await {
        Ok(started) => started,
        Err(e) => return ollama::error(e),
    };
    let events = keeping_alive(q, events, prepared.keep_alive);
    let mut answer = ollama::Answer::new(kind, &prepared.model, prompt_tokens, arrived);
    answer.logprobs = prepared.logprobs;
    let pieces = crate::answer::Pieces::new(events, prepared.tool_calls);
    with_job(ollama::respond(answer, pieces, prepared.stream).await, &job)
}

/// The job's events, passed on; once its answer has ended, the worker that
/// gave it is kept as `keep_alive` asked, or stopped for `0`.
fn keeping_alive(q: &Queen, mut events: Events, keep_alive: Option<KeepAlive>) -> Events {
    let Some(keep_alive) = keep_alive else {
        return events;
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let q = q.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let served = match &event {
                InferenceEvent::End { figures, .. } => figures.clone(),
                _ => None,
            };
            let ended = matches!(
                event,
                InferenceEvent::End { .. } | InferenceEvent::Error { .. }
            );
            if tx.send(event).is_err() {
                return;
            }
            if let Some(f) = served {
                if let Err(e) = keep(&q, &f.hive, &f.worker, keep_alive).await {
                    tracing::warn!("keep_alive for worker {}: {e}", f.worker);
                }
            }
            if ended {
                return;
            }
        }
    });
    rx
}

/// Tells `hive` how long to keep `worker`, or to stop it.
async fn keep(q: &Queen, hive: &str, worker: &str, keep_alive: KeepAlive) -> Result<(), ApiError> {
    let conn = q
        .cluster
        .view
        .hive(hive)
        .map(|h| h.conn.clone())
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownNode, format!("hive {hive} is gone")))?;
    let client = conn.client();
    match keep_alive {
        KeepAlive::Unload => client.stop_worker(worker).await.map(drop),
        KeepAlive::Forever => client.keep_alive(worker, None).await.map(drop),
        KeepAlive::For(d) => client
            .keep_alive(worker, Some(d.as_secs().max(1)))
            .await
            .map(drop),
    }
}

/// `/api/generate` without a prompt: a worker of `model` made ready (kept as
/// `keep_alive` says), or with `keep_alive` 0 every worker of it stopped.
async fn load(q: &Queen, model: &str, keep_alive: Option<KeepAlive>) -> Result<(), ApiError> {
    if keep_alive == Some(KeepAlive::Unload) {
        let state = q.cluster.view.state();
        for h in state.hives.iter().filter(|h| h.reachable) {
            let Some(snapshot) = &h.snapshot else {
                continue;
            };
            let Some(entry) = placement::entry(snapshot, model) else {
                continue;
            };
            for w in snapshot
                .workers
                .iter()
                .filter(|w| w.model == entry.entry.name)
            {
                h.conn.client().stop_worker(&w.worker_id).await?;
            }
        }
        return Ok(());
    }
    let job = q.jobs.create();
    let work = scheduler::Work {
        node: None,
        model: model.to_string(),
        inference: Default::default(),
    };
    job.describe(model);
    let loaded = scheduler::load(&q.cluster, &job, &work).await;
    job.finish();
    let target = loaded?;
    if let Some(k) = keep_alive {
        keep(q, &target.hive.name, &target.worker_id, k).await?;
    }
    Ok(())
}

/// Every catalog entry of every reachable hive, each model once.
fn catalog(q: &Queen) -> Vec<ModelEntry> {
    let mut seen: Vec<ModelEntry> = Vec::new();
    for h in q.cluster.view.state().hives.iter().filter(|h| h.reachable) {
        for m in h.snapshot.iter().flat_map(|s| &s.models) {
            if !seen.iter().any(|e| e.name == m.entry.name) {
                seen.push(m.entry.clone());
            }
        }
    }
    seen
}

/// `GET /api/tags`: every model, and every alias of one a hive has.
pub(super) fn tags(q: &Queen) -> Response<Body> {
    let entries = catalog(q);
    let aliased = |model: &str| {
        let found = entry_of(q, model).ok()?;
        entries.iter().find(|e| e.name == found.name)
    };
    let aliases = q.aliases.list().unwrap_or_default();
    let named = entries.iter().map(|e| (ollama::tagged(&e.name), e)).chain(
        aliases
            .iter()
            .filter_map(|a| Some((ollama::alias_tagged(&a.name), aliased(&a.model)?))),
    );
    http::json(StatusCode::OK, &ollama::tags(named))
}

/// `POST /api/copy` (`ollama cp SOURCE DESTINATION`): DESTINATION becomes an
/// alias of SOURCE; no file is copied (the same weights answer both names).
pub(super) async fn copy(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    struct Copy {
        source: String,
        destination: String,
    }
    let copied = async {
        let c: Copy = http::read_json(req).await?;
        alias_of(q, &c.destination, &c.source).await
    };
    match copied.await {
        Ok(()) => http::json(StatusCode::OK, &json!({})),
        Err(e) => ollama::error(e),
    }
}

/// `POST /api/create` with `from` alone: `model` becomes an alias of `from`.
/// rbee keeps no models of its own making: a system message, parameters, a
/// template or files are refused, naming the field (send them per request).
pub(super) async fn create(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    struct Create {
        model: Option<String>,
        /// The older name of `model`.
        name: Option<String>,
        from: Option<String>,
        #[serde(default)]
        stream: Option<bool>,
        #[serde(flatten)]
        rest: serde_json::Map<String, serde_json::Value>,
    }
    let created = async {
        let c: Create = http::read_json(req).await?;
        crate::protocol::refuse_unhonoured(&c.rest, &[])?;
        let model = c.model.or(c.name).filter(|m| !m.is_empty());
        let model = model.ok_or_else(|| ApiError::invalid("model", "model is required"))?;
        let from = c.from.filter(|f| !f.is_empty()).ok_or_else(|| {
            ApiError::invalid(
                "from",
                "from is required: rbee makes a new name for a model it has (FROM), not a model",
            )
        })?;
        alias_of(q, &model, &from).await?;
        Ok::<_, ApiError>(c.stream.unwrap_or(true))
    };
    match created.await {
        // Streamed, the one status line Ollama ends its own with.
        Ok(true) => {
            let (tx, resp) = http::sse::ndjson_response();
            let _ = tx.try_send(http::sse::json_line(&json!({"status": "success"})));
            resp
        }
        Ok(false) => http::json(StatusCode::OK, &json!({"status": "success"})),
        Err(e) => ollama::error(e),
    }
}

/// `name` set as an alias of `model`, which some hive must have.
async fn alias_of(q: &Queen, name: &str, model: &str) -> Result<(), ApiError> {
    let model = q.aliases.resolve(model)?;
    let alias = q.aliases.set(name, &entry_of(q, &model)?.name)?;
    tracing::info!("alias {} is {} (Ollama's copy)", alias.name, alias.model);
    Ok(())
}

/// `GET /api/ps`: the workers, each with its catalog entry.
pub(super) fn ps(q: &Queen) -> Response<Body> {
    let entries = catalog(q);
    let workers = status::workers(q);
    let running = workers.iter().map(|w| {
        let entry = entries.iter().find(|e| e.name == w.worker.model);
        (&w.worker, entry)
    });
    http::json(StatusCode::OK, &ollama::ps(running))
}

#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    model: Option<String>,
    /// The older name of `model`.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

impl Named {
    async fn read(q: &Queen, req: Request<Incoming>) -> Result<(Named, String), ApiError> {
        let named: Named = http::read_json(req).await?;
        let model = q.aliases.resolve(&named.given()?)?;
        Ok((named, model))
    }

    /// The name as the client gave it.
    fn given(&self) -> Result<String, ApiError> {
        let given = self.model.clone().or_else(|| self.name.clone());
        given
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ApiError::invalid("model", "model is required"))
    }
}

/// The catalog entry of `model` on a reachable hive, as the first that has it lists it.
fn entry_of(q: &Queen, model: &str) -> Result<ModelEntry, ApiError> {
    let state = q.cluster.view.state();
    state
        .hives
        .iter()
        .filter(|h| h.reachable)
        .find_map(|h| placement::entry(h.snapshot.as_ref()?, model))
        .map(|m| m.entry.clone())
        .ok_or_else(|| not_found(model))
}

fn not_found(model: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ModelNotFound,
        format!("model '{model}' not found: `rbee keeper list` shows the models the hives have"),
    )
}

/// Waits (a moment at most) until the view lists `model` on some hive, or on
/// none: what a client lists next shows what it just pulled or deleted.
async fn listed(q: &Queen, model: &str, wanted: bool) {
    let has = |s: &super::view::ClusterState| {
        s.hives
            .iter()
            .filter_map(|h| h.snapshot.as_ref())
            .any(|snapshot| placement::entry(snapshot, model).is_some())
    };
    q.cluster
        .view
        .wait_until(super::VIEW_WAIT, |s| has(s) == wanted)
        .await;
}

/// `POST /api/show`.
pub(super) async fn show(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let shown = async {
        let (_, model) = Named::read(q, req).await?;
        Ok::<_, ApiError>(ollama::show(&entry_of(q, &model)?))
    };
    match shown.await {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => ollama::error(e),
    }
}

/// `DELETE /api/delete`: the model removed from every hive that has it.
pub(super) async fn delete(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let deleted = async {
        let given = http::read_json::<Named>(req).await?.given()?;
        // An alias is only a name: removing it leaves the model, as `ollama rm`
        // of a copy leaves the original.
        match q.aliases.remove(&given) {
            Ok(alias) => {
                tracing::info!("alias {} removed (Ollama's delete)", alias.name);
                return Ok(());
            }
            Err(e) if e.code != ErrorCode::NotFound => return Err(e),
            Err(_) => {}
        }
        let model = q.aliases.resolve(&given)?;
        let state = q.cluster.view.state();
        let mut any = false;
        for h in state.hives.iter().filter(|h| h.reachable) {
            let Some(entry) = h
                .snapshot
                .as_ref()
                .and_then(|s| placement::entry(s, &model))
            else {
                continue;
            };
            h.conn.client().delete_model(&entry.entry.name).await?;
            any = true;
        }
        if !any {
            return Err(not_found(&model));
        }
        listed(q, &model, false).await;
        Ok::<_, ApiError>(())
    };
    match deleted.await {
        Ok(()) => http::json(StatusCode::OK, &json!({})),
        Err(e) => ollama::error(e),
    }
}

/// `POST /api/pull`: a model no hive has fetched onto the one with the most
/// room, its progress as Ollama's lines (`pulling …` with `completed` and
/// `total`, then `success`); one a hive has already is a `success` at once.
pub(super) async fn pull(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let (named, progress) = match start_pull(q, req).await {
        Ok(started) => started,
        Err(e) => return ollama::error(e),
    };
    let stream = named.stream.unwrap_or(true);
    let Some((model, progress)) = progress else {
        let done = json!({"status": "success"});
        return match stream {
            true => {
                let (tx, resp) = http::sse::ndjson_response();
                let _ = tx.send(http::sse::json_line(&done)).await;
                resp
            }
            false => http::json(StatusCode::OK, &done),
        };
    };
    match stream {
        true => pull_lines(q.clone(), model, progress),
        false => pull_whole(q, &model, progress).await,
    }
}

/// A pulled model's download on the hive with the most room, or `None` when
/// a usable hive has the model already.
async fn start_pull(
    q: &Queen,
    req: Request<Incoming>,
) -> Result<
    (
        Named,
        Option<(String, crate::clients::Events<DownloadEvent>)>,
    ),
    ApiError,
> {
    let (named, model) = Named::read(q, req).await?;
    let job = q.jobs.create();
    job.describe(&model);
    let hives = hives::candidates(&q.cluster, &job, None).await;
    job.finish();
    let state = q.cluster.view.state();
    let had =
        placement::usable(&state, &hives?).any(|(_, s)| placement::entry(s, &model).is_some());
    if had {
        return Ok((named, None));
    }
    let hive = placement::fetch_onto(&state, &placement::Allowed::Any)
        .ok_or_else(|| ApiError::new(ErrorCode::HiveUnreachable, "no hive is reachable"))?;
    let client = hive.client();
    let download = client.download(&model).await?;
    let progress = client.download_progress(&download.download_id).await?;
    Ok((named, Some((model, progress))))
}

/// `stream: false`: one answer once the download ends.
async fn pull_whole(
    q: &Queen,
    model: &str,
    mut progress: crate::clients::Events<DownloadEvent>,
) -> Response<Body> {
    let mut last = None;
    while let Some(event) = progress.next().await {
        last = Some(event);
    }
    match last {
        Some(DownloadEvent::Complete { .. }) => {
            listed(q, model, true).await;
            http::json(StatusCode::OK, &json!({"status": "success"}))
        }
        Some(DownloadEvent::Error { message }) => {
            ollama::error(ApiError::new(ErrorCode::DownloadFailed, message))
        }
        _ => ollama::error(ApiError::new(
            ErrorCode::DownloadFailed,
            "the download ended without a word",
        )),
    }
}

/// The download's progress as Ollama's lines, `success` once the cluster lists it.
fn pull_lines(
    q: Queen,
    model: String,
    mut progress: crate::clients::Events<DownloadEvent>,
) -> Response<Body> {
    let (tx, resp) = http::sse::ndjson_response();
    tokio::spawn(async move {
        let line = |v: Value| http::sse::json_line(&v);
        if tx
            .send(line(json!({"status": "pulling manifest"})))
            .await
            .is_err()
        {
            return;
        }
        let digest = format!("rbee:{model}");
        while let Some(event) = progress.next().await {
            let out = match event {
                DownloadEvent::Downloading {
                    bytes_downloaded,
                    bytes_total,
                    ..
                } => {
                    json!({"status": format!("pulling {model}"), "digest": digest,
                           "total": bytes_total, "completed": bytes_downloaded})
                }
                DownloadEvent::Complete { .. } => {
                    let _ = tx
                        .send(line(json!({"status": "verifying sha256 digest"})))
                        .await;
                    listed(&q, &model, true).await;
                    json!({"status": "success"})
                }
                DownloadEvent::Error { message } => json!({"error": message}),
            };
            if tx.send(line(out)).await.is_err() {
                return;
            }
        }
    });
    resp
}

/// `POST /api/embed` (a vector per input) and the older `POST /api/embeddings`
/// (`prompt`, one vector), through a worker of the model like OpenAI's.
pub(super) async fn embed(q: &Queen, req: Request<Incoming>, older: bool) -> Response<Body> {
    let arrived = Instant::now();
    let answered = async {
        let body = http::read_body(req).await?;
        let (given, mut request) = ollama::embed_request(&body, older)?;
        let model = q.aliases.resolve(&given)?;
        request.model = model.clone();
        request.texts()?;
        let job = q.jobs.create();
        job.describe(&model);
        let work = scheduler::Work {
            node: None,
            model: model.clone(),
            inference: Default::default(),
        };
        let answer = scheduler::embed(&q.cluster, &job, &work, &request).await;
        job.finish();
        let answer = answer?;
        let vectors: Vec<Vec<f32>> = answer["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| serde_json::from_value(d["embedding"].clone()).ok())
            .collect();
        let tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32;
        Ok::<_, ApiError>(match older {
            true => ollama::embeddings(vectors.first().map_or(&[][..], |v| v)),
            false => ollama::embed(&given, &vectors, tokens, arrived),
        })
    };
    match answered.await {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => ollama::error(e),
    }
}
