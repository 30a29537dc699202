//! The queen's routes: its one table of `(method, path, Endpoint)` rows, the
//! `match` with a line per endpoint, and the handlers of rbee's own API
//! (hives, jobs, workers, a hive's models, keys, aliases); the client APIs'
//! handlers are in `front.rs` and `ollama.rs`.

use super::*;

/// A hive's error answer, passed on as it was; silence becomes `HIVE_UNREACHABLE`.
fn relayed(e: ApiError, hive: &str) -> ApiError {
    if e.code == ErrorCode::Unreachable {
        ApiError::new(
            ErrorCode::HiveUnreachable,
            format!("hive {hive} is not answering: {e}"),
        )
    } else {
        e
    }
}

/// The queen's endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Endpoint {
    Health,
    Hives,
    AddHive,
    RemoveHive,
    CreateJob,
    JobStream,
    CancelJob,
    Workers,
    StopWorker,
    HiveModels,
    HiveDownload,
    HiveDownloadProgress,
    HiveDeleteModel,
    HiveModelSettings,
    HiveRemovePartials,
    Shutdown,
    Page,
    Status,
    StatusStream,
    Login,
    LoginLink,
    Metrics,
    Keys,
    AddKey,
    RevokeKey,
    AddJoinToken,
    Join,
    CheckIn,
    Aliases,
    SetAlias,
    RemoveAlias,
    /// The client APIs (OpenAI's, Ollama's, Anthropic's, llama-server's).
    Client(Client),
}

/// The endpoints of the client APIs the queen serves for the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Client {
    ChatCompletions,
    Embeddings,
    Completions,
    Models,
    Probe,
    OllamaVersion,
    OllamaTags,
    OllamaPs,
    OllamaShow,
    OllamaPull,
    OllamaDelete,
    OllamaCopy,
    OllamaCreate,
    /// Pushing to, or creating from blobs of, a registry rbee does not have.
    OllamaRegistry,
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    OllamaEmbeddings,
    Messages,
    CountTokens,
    Completion,
    Tokenize,
    Model,
    Responses,
    GetResponse,
    DeleteResponse,
}

const ROUTES: &[Route<Endpoint>] = &[
    (Method::GET, "/health", Endpoint::Health),
    (Method::GET, "/v1/health", Endpoint::Health),
    (Method::GET, "/v1/hives", Endpoint::Hives),
    (Method::POST, "/v1/hives", Endpoint::AddHive),
    (Method::DELETE, "/v1/hives/{}", Endpoint::RemoveHive),
    (Method::POST, "/v1/jobs", Endpoint::CreateJob),
    (Method::GET, "/v1/jobs/{}/stream", Endpoint::JobStream),
    (Method::DELETE, "/v1/jobs/{}", Endpoint::CancelJob),
    (Method::GET, "/v1/workers", Endpoint::Workers),
    (
        Method::POST,
        "/v1/workers/{}/shutdown",
        Endpoint::StopWorker,
    ),
    (Method::GET, "/v1/hives/{}/models", Endpoint::HiveModels),
    (
        Method::POST,
        "/v1/hives/{}/models/download",
        Endpoint::HiveDownload,
    ),
    (
        Method::GET,
        "/v1/hives/{}/models/download/progress",
        Endpoint::HiveDownloadProgress,
    ),
    (
        Method::DELETE,
        "/v1/hives/{}/models/{}",
        Endpoint::HiveDeleteModel,
    ),
    (
        Method::PUT,
        "/v1/hives/{}/models/{}/settings",
        Endpoint::HiveModelSettings,
    ),
    (
        Method::DELETE,
        "/v1/hives/{}/models/download/partial",
        Endpoint::HiveRemovePartials,
    ),
    (
        Method::POST,
        "/v1/chat/completions",
        Endpoint::Client(Client::ChatCompletions),
    ),
    (
        Method::POST,
        "/v1/completions",
        Endpoint::Client(Client::Completions),
    ),
    (
        Method::POST,
        "/v1/embeddings",
        Endpoint::Client(Client::Embeddings),
    ),
    (Method::GET, "/v1/models", Endpoint::Client(Client::Models)),
    (Method::POST, "/v1/admin/shutdown", Endpoint::Shutdown),
    (Method::GET, "/", Endpoint::Page),
    (Method::GET, "/v1/status", Endpoint::Status),
    (Method::GET, "/v1/status/stream", Endpoint::StatusStream),
    (Method::POST, "/v1/session", Endpoint::Login),
    (Method::POST, "/v1/session/link", Endpoint::LoginLink),
    (Method::GET, "/metrics", Endpoint::Metrics),
    (Method::GET, "/v1/keys", Endpoint::Keys),
    (Method::POST, "/v1/keys", Endpoint::AddKey),
    (Method::POST, "/v1/join-tokens", Endpoint::AddJoinToken),
    (Method::POST, "/v1/join", Endpoint::Join),
    (Method::POST, "/v1/hives/checkin", Endpoint::CheckIn),
    (Method::DELETE, "/v1/keys/{}", Endpoint::RevokeKey),
    // Ollama's API (DESIGN.md §16).
    (Method::HEAD, "/", Endpoint::Client(Client::Probe)),
    (
        Method::GET,
        "/api/version",
        Endpoint::Client(Client::OllamaVersion),
    ),
    (
        Method::GET,
        "/api/tags",
        Endpoint::Client(Client::OllamaTags),
    ),
    (Method::GET, "/api/ps", Endpoint::Client(Client::OllamaPs)),
    (
        Method::POST,
        "/api/show",
        Endpoint::Client(Client::OllamaShow),
    ),
    (
        Method::POST,
        "/api/pull",
        Endpoint::Client(Client::OllamaPull),
    ),
    (
        Method::DELETE,
        "/api/delete",
        Endpoint::Client(Client::OllamaDelete),
    ),
    (
        Method::POST,
        "/api/copy",
        Endpoint::Client(Client::OllamaCopy),
    ),
    (
        Method::POST,
        "/api/create",
        Endpoint::Client(Client::OllamaCreate),
    ),
    (
        Method::POST,
        "/api/push",
        Endpoint::Client(Client::OllamaRegistry),
    ),
    (
        Method::HEAD,
        "/api/blobs/{}",
        Endpoint::Client(Client::OllamaRegistry),
    ),
    (
        Method::POST,
        "/api/blobs/{}",
        Endpoint::Client(Client::OllamaRegistry),
    ),
    (
        Method::POST,
        "/api/chat",
        Endpoint::Client(Client::OllamaChat),
    ),
    (
        Method::POST,
        "/api/generate",
        Endpoint::Client(Client::OllamaGenerate),
    ),
    (
        Method::POST,
        "/api/embed",
        Endpoint::Client(Client::OllamaEmbed),
    ),
    (
        Method::POST,
        "/api/embeddings",
        Endpoint::Client(Client::OllamaEmbeddings),
    ),
    // Anthropic's Messages API.
    (
        Method::POST,
        "/v1/messages",
        Endpoint::Client(Client::Messages),
    ),
    (
        Method::POST,
        "/v1/messages/count_tokens",
        Endpoint::Client(Client::CountTokens),
    ),
    // llama-server's own endpoints, by `model`.
    (
        Method::POST,
        "/completion",
        Endpoint::Client(Client::Completion),
    ),
    (
        Method::POST,
        "/tokenize",
        Endpoint::Client(Client::Tokenize),
    ),
    (
        Method::GET,
        "/v1/models/{}",
        Endpoint::Client(Client::Model),
    ),
    // OpenAI's Responses API.
    (
        Method::POST,
        "/v1/responses",
        Endpoint::Client(Client::Responses),
    ),
    (
        Method::GET,
        "/v1/responses/{}",
        Endpoint::Client(Client::GetResponse),
    ),
    (
        Method::DELETE,
        "/v1/responses/{}",
        Endpoint::Client(Client::DeleteResponse),
    ),
    (Method::GET, "/v1/aliases", Endpoint::Aliases),
    (Method::PUT, "/v1/aliases/{}", Endpoint::SetAlias),
    (Method::DELETE, "/v1/aliases/{}", Endpoint::RemoveAlias),
];

pub(super) async fn route(q: Queen, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let found = http::find(ROUTES, req.method(), &path);
    let (endpoint, params) = match found {
        Ok(found) => found,
        Err(e) => return crate::answer::route_error(&path, e),
    };
    let param = params.first().map(String::as_str).unwrap_or_default();
    http::reply(match endpoint {
        Endpoint::Health => Ok(http::json(StatusCode::OK, &Health::alive("queen"))),
        Endpoint::Hives => Ok(http::json(StatusCode::OK, &status::hive_list(&q).await)),
        Endpoint::AddHive => add_hive(&q, req).await,
        Endpoint::RemoveHive => remove_hive(&q, param).await,
        Endpoint::CreateJob => create_job(&q, req).await,
        Endpoint::JobStream => job_stream(&q, param, &req),
        Endpoint::CancelJob => cancel_job(&q, param, &req),
        Endpoint::Workers => Ok(http::json(StatusCode::OK, &status::workers(&q))),
        Endpoint::StopWorker => stop_worker(&q, param).await,
        Endpoint::HiveModels
        | Endpoint::HiveDownload
        | Endpoint::HiveDownloadProgress
        | Endpoint::HiveDeleteModel
        | Endpoint::HiveModelSettings
        | Endpoint::HiveRemovePartials => match hive_for(&q, param).await {
            Ok(hive) => hive_models(&hive, &q.cluster.view, endpoint, &params, req).await,
            Err(e) => Err(e),
        },
        Endpoint::Shutdown => {
            q.shutdown.notify_one();
            Ok(http::json(StatusCode::ACCEPTED, &Health::stopping("queen")))
        }
        Endpoint::Page => Ok(status::page()),
        Endpoint::Status => Ok(http::json(StatusCode::OK, &status::status(&q).await)),
        Endpoint::StatusStream => status::stream(&q, &req),
        Endpoint::Login => status::login(&q, req).await,
        Endpoint::LoginLink => status::link(&q),
        Endpoint::Metrics => Ok(status::metrics(&q)),
        Endpoint::Keys => Ok(http::json(StatusCode::OK, &q.cluster.keys.list())),
        Endpoint::AddKey => add_key(&q, req).await,
        Endpoint::AddJoinToken => join::add_token(&q, req).await,
        Endpoint::Join => join::join(&q, req)
            .await
            .inspect_err(|e| tracing::warn!("a hive's join was refused: {e}")),
        Endpoint::CheckIn => join::check_in(&q, req)
            .await
            .inspect_err(|e| tracing::warn!("a hive's check-in was refused: {e}")),
        Endpoint::RevokeKey => q
            .cluster
            .keys
            .revoke(param)
            .map(|k| http::json(StatusCode::OK, &k)),
        Endpoint::Aliases => q.aliases.list().map(|a| http::json(StatusCode::OK, &a)),
        Endpoint::SetAlias => set_alias(&q, param, req).await,
        Endpoint::RemoveAlias => q
            .aliases
            .remove(param)
            .map(|a| http::json(StatusCode::OK, &a)),
        Endpoint::Client(c) => return client_api(&q, c, req, param).await,
    })
}

/// A client API's request (OpenAI's, Ollama's, Anthropic's, llama-server's),
/// answered in that API's own shape.
async fn client_api(q: &Queen, c: Client, req: Request<Incoming>, param: &str) -> Response<Body> {
    match c {
        Client::ChatCompletions => front::openai_route(q, req, openai::Kind::Chat).await,
        Client::Embeddings => front::embeddings_route(q, req).await,
        Client::Completions => front::openai_route(q, req, openai::Kind::Completion).await,
        Client::Models => http::json(StatusCode::OK, &front::models(q)),
        Client::Probe => Response::new(http::full("")),
        Client::OllamaVersion => http::json(
            StatusCode::OK,
            &serde_json::json!({ "version": crate::ollama::VERSION }),
        ),
        Client::OllamaTags => ollama::tags(q),
        Client::OllamaPs => ollama::ps(q),
        Client::OllamaShow => ollama::show(q, req).await,
        Client::OllamaPull => ollama::pull(q, req).await,
        Client::OllamaDelete => ollama::delete(q, req).await,
        Client::OllamaCopy => ollama::copy(q, req).await,
        Client::OllamaCreate => ollama::create(q, req).await,
        Client::OllamaRegistry => crate::ollama::error(ApiError::new(
            ErrorCode::InvalidRequest,
            "rbee has no model registry to push to or create from blobs: models come from \
                 Hugging Face (pull hf.co/ORG/REPO:QUANT) or a GGUF file on a hive \
                 (rbee keeper pull file:/path/model.gguf)",
        )),
        Client::OllamaChat => ollama::chat(q, req, crate::ollama::Kind::Chat).await,
        Client::OllamaGenerate => ollama::chat(q, req, crate::ollama::Kind::Generate).await,
        Client::OllamaEmbed => ollama::embed(q, req, false).await,
        Client::OllamaEmbeddings => ollama::embed(q, req, true).await,
        Client::Messages => front::anthropic_route(q, req).await,
        Client::CountTokens => front::count_tokens_route(q, req).await,
        Client::Completion => front::completion_route(q, req).await,
        Client::Tokenize => front::tokenize_route(q, req).await,
        Client::Model => front::model_route(q, param),
        Client::Responses => front::responses_route(q, req).await,
        Client::GetResponse => front::stored_response(q, param, false),
        Client::DeleteResponse => front::stored_response(q, param, true),
    }
}

async fn set_alias(q: &Queen, name: &str, req: Request<Incoming>) -> Reply {
    let body: crate::protocol::SetAlias = http::read_json(req).await?;
    let alias = q.aliases.set(name, &body.model)?;
    tracing::info!("alias {} is {}", alias.name, alias.model);
    Ok(http::json(StatusCode::OK, &alias))
}

async fn add_key(q: &Queen, req: Request<Incoming>) -> Reply {
    if q.auth.token().is_none() {
        return Err(ApiError::invalid(
            "name",
            "this queen has no token (--token-file or RBEE_TOKEN), so it answers this machine \
             without one and a key would restrict nothing: give it a token first",
        ));
    }
    let body: crate::protocol::KeyRequest = http::read_json(req).await?;
    let added = q.cluster.keys.add(&body)?;
    tracing::info!("key {} made ({} scope)", added.info.name, added.info.scope);
    Ok(http::json(StatusCode::CREATED, &added))
}

async fn add_hive(q: &Queen, req: Request<Incoming>) -> Reply {
    let body: AddHive = http::read_json(req).await?;
    let conn = q.registry.add(body).await?;
    q.cluster.retrack().await;
    // Its status as of its first answer, or its first failure to answer.
    let name = conn.name.clone();
    q.cluster
        .view
        .wait_until(std::time::Duration::from_secs(3), |s| {
            s.hives
                .named(&name)
                .is_some_and(|h| h.snapshot.is_some() || h.error.is_some())
        })
        .await;
    let status = status::hive_list(q)
        .await
        .into_iter()
        .find(|h| h.name == conn.name)
        .ok_or_else(|| {
            ApiError::internal(format!("hive {} vanished as it was added", conn.name))
        })?;
    Ok(http::json(StatusCode::CREATED, &status))
}

async fn remove_hive(q: &Queen, name: &str) -> Reply {
    if q.registry.remove(name)? {
        tracing::info!("hive {name} removed (its certificate, if pinned, is refused from now on)");
        q.cluster.retrack().await;
        Ok(http::json(
            StatusCode::OK,
            &HiveRemoved {
                removed: name.to_string(),
            },
        ))
    } else {
        Err(ApiError::new(
            ErrorCode::UnknownNode,
            format!("no hive named {name}"),
        ))
    }
}

/// The job `id`, as `req` may see it: a use key sees its own jobs only
/// (another's are not found, so ids read off the status say nothing).
fn job_for(q: &Queen, id: &str, req: &Request<Incoming>) -> Result<Arc<jobs::Job>, ApiError> {
    let not_found = || ApiError::new(ErrorCode::JobNotFound, format!("no job {id}"));
    let job = q.jobs.get(id).ok_or_else(not_found)?;
    match http::auth::use_key_of(req) {
        Some(key) if job.key().as_deref() != Some(key.as_str()) => Err(not_found()),
        _ => Ok(job),
    }
}

fn job_stream(q: &Queen, id: &str, req: &Request<Incoming>) -> Reply {
    let job = job_for(q, id, req)?;
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        // A client that leaves before the end cancels the job.
        if !job.replay(&tx).await && !job.is_finished() {
            tracing::info!("{}: the client left; cancelling", job.id);
            job.cancel();
        }
    });
    Ok(resp)
}

fn cancel_job(q: &Queen, id: &str, req: &Request<Incoming>) -> Reply {
    let job = job_for(q, id, req)?;
    job.cancel();
    Ok(http::json(
        StatusCode::OK,
        &JobCancelled {
            job_id: id.to_string(),
            state: "cancelled".into(),
        },
    ))
}

/// Stops a worker on whichever hive has it.
async fn stop_worker(q: &Queen, id: &str) -> Reply {
    let found = status::workers(q)
        .into_iter()
        .find(|w| w.worker.worker_id == id);
    let Some(found) = found else {
        return Err(ApiError::new(
            ErrorCode::WorkerNotFound,
            format!("no hive has a worker {id}"),
        ));
    };
    let hive = q
        .cluster
        .view
        .hive(&found.hive)
        .map(|h| h.conn.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownNode,
                format!("hive {} is gone", found.hive),
            )
        })?;
    let w = hive
        .client()
        .stop_worker(id)
        .await
        .map_err(|e| relayed(e, &hive.name))?;
    Ok(http::json(
        StatusCode::ACCEPTED,
        &HiveWorker {
            hive: hive.name,
            worker: w,
            in_flight: found.in_flight,
            tokens_per_second: found.tokens_per_second,
        },
    ))
}

/// The named hive; `localhost` with none registered starts the local hive.
async fn hive_for(q: &Queen, name: &str) -> Result<HiveConn, ApiError> {
    if let Some(h) = q.registry.get(name).await {
        return Ok(h);
    }
    if name == LOCALHOST {
        return q
            .registry
            .ensure_local(|_, human| tracing::info!("{human}"))
            .await
            .map_err(|m| ApiError::new(ErrorCode::HiveStartFailed, m));
    }
    Err(ApiError::new(
        ErrorCode::UnknownNode,
        format!("no hive named {name}"),
    ))
}

/// The model endpoints of one hive, passed through with the queen's token for it.
async fn hive_models(
    hive: &HiveConn,
    view: &View,
    endpoint: Endpoint,
    params: &[String],
    req: Request<Incoming>,
) -> Reply {
    let client = hive.client();
    let relayed = |e| relayed(e, &hive.name);
    match endpoint {
        Endpoint::HiveDownload => {
            let body: DownloadRequest = http::read_json(req).await?;
            let started = client.download(&body.model_ref).await.map_err(relayed)?;
            Ok(http::json(StatusCode::ACCEPTED, &started))
        }
        Endpoint::HiveDownloadProgress => {
            let id = http::query_param(req.uri().query(), "id").unwrap_or_default();
            let events = client.download_progress(&id).await.map_err(relayed)?;
            Ok(relay_download(hive.name.clone(), events, view.clone()))
        }
        Endpoint::HiveDeleteModel => {
            let name = params.get(1).map(String::as_str).unwrap_or_default();
            let entry = client.delete_model(name).await.map_err(relayed)?;
            Ok(http::json(StatusCode::OK, &entry))
        }
        Endpoint::HiveModelSettings => {
            let name = params.get(1).map(String::as_str).unwrap_or_default();
            let settings: crate::protocol::ModelSettings = http::read_json(req).await?;
            let entry = client
                .set_model_settings(name, &settings)
                .await
                .map_err(relayed)?;
            Ok(http::json(StatusCode::OK, &entry))
        }
        Endpoint::HiveRemovePartials => {
            let removed = client.remove_partials().await.map_err(relayed)?;
            Ok(http::json(StatusCode::OK, &removed))
        }
        _ => {
            let models = client.models().await.map_err(relayed)?;
            Ok(http::json(StatusCode::OK, &models))
        }
    }
}

/// A hive's download progress as the queen's own SSE stream. A hive that
/// stops reporting before the end is said so, so the stream still ends with
/// an outcome and `[DONE]`. `complete` goes out once the queen's view lists
/// the file, so a `list` right after a pull shows it.
fn relay_download(hive: String, mut events: Events<DownloadEvent>, view: View) -> Response<Body> {
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        let mut last = None;
        while let Some(event) = events.next().await {
            if let DownloadEvent::Complete { local_path } = &event {
                let listed = |s: &ClusterState| {
                    s.hives.named(&hive).is_some_and(|h| {
                        h.snapshot.as_ref().is_some_and(|snap| {
                            snap.models.iter().any(|m| &m.entry.path == local_path)
                        })
                    })
                };
                view.wait_until(VIEW_WAIT, listed).await;
            }
            if tx.send(sse::event(&event)).await.is_err() {
                return;
            }
            last = Some(event);
        }
        if matches!(last, None | Some(DownloadEvent::Downloading { .. })) {
            let lost = DownloadEvent::Error {
                message: format!("hive {hive} stopped reporting the download"),
            };
            if tx.send(sse::event(&lost)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(hyper::body::Bytes::from_static(sse::DONE)).await;
    });
    resp
}

async fn create_job(q: &Queen, req: Request<Incoming>) -> Reply {
    let key = http::auth::key_of(&req);
    let mut body: JobRequest = http::read_json(req).await?;
    body.model = q.aliases.resolve(&body.model)?;
    crate::protocol::check_prompt(&body.prompt, body.messages.as_deref())?;
    if let Some(crate::protocol::Constraint::JsonSchema { schema }) = &body.constraint {
        crate::schema::check(schema, "constraint")?;
    }
    body.sampling.validate()?;
    let job = q.jobs.create();
    job.for_key(key);
    start_job(q, job.clone(), body.into());
    let created = JobCreated {
        job_id: job.id.clone(),
        sse_url: format!("/v1/jobs/{}/stream", job.id),
    };
    Ok(http::json(StatusCode::CREATED, &created))
}

/// Runs `work` as `job` in a task of its own until it ends or is cancelled.
pub(super) fn start_job(q: &Queen, job: Arc<jobs::Job>, work: scheduler::Work) {
    let cluster = q.cluster.clone();
    job.describe(&work.model);
    cluster.metrics.job_started();
    tokio::spawn(async move {
        let outcome = tokio::select! {
            r = scheduler::run(&cluster, &job, &work) => r,
            () = job.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "the job was cancelled")),
        };
        cluster.metrics.job_ended(match &outcome {
            Ok(()) => "ok",
            Err(e) if e.code == ErrorCode::Cancelled => "cancelled",
            Err(_) => "error",
        });
        if let Err(e) = outcome {
            job.fail(e);
        }
        job.finish();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_answers_a_wrong_method_with_405() {
        http::assert_routes_are_consistent(ROUTES);
    }
}
