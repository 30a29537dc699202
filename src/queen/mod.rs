//! `rbee queen`: the orchestrator. It takes jobs, picks a machine, streams
//! results back, and keeps the registry of hives.

pub mod jobs;
pub mod local_hive;
pub mod registry;
pub mod scheduler;

use crate::http::client;
use crate::http::{self, sse, Auth, Body, Reply, Route};
use crate::openai;
use crate::protocol::{
    AddHive, ApiError, DownloadRequest, ErrorCode, Health, HiveRemoved, HiveWorker, JobCancelled,
    JobCreated, JobRequest, ModelEntry, WorkerInfo,
};
use argh::FromArgs;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use jobs::Jobs;
use registry::{HiveConn, Registry, LOCALHOST};
use std::path::PathBuf;
use std::sync::Arc;

/// Orchestrate the cluster: jobs, scheduling, the hive registry.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "queen")]
pub struct Args {
    /// address to listen on (default 127.0.0.1; others need a token)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    pub host: String,
    /// port to listen on (default 8500)
    #[argh(option, default = "8500")]
    pub port: u16,
    /// where the hive registry lives (default $RBEE_HOME, else ~/.local/share/rbee)
    #[argh(option)]
    pub data_dir: Option<PathBuf>,
    /// file holding the shared bearer token (else RBEE_TOKEN)
    #[argh(option)]
    pub token_file: Option<PathBuf>,
}

#[derive(Clone)]
struct Queen {
    registry: Registry,
    jobs: Jobs,
    auth: Auth,
    shutdown: Arc<tokio::sync::Notify>,
}

pub async fn run(args: Args) -> Result<(), String> {
    let auth = Auth::load(args.token_file.as_deref())?;
    auth.check_bind(&args.host)?;
    let listener = crate::process::bind(&args.host, args.port).await?;
    let data_dir = crate::data_dir(args.data_dir.as_deref());
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        format!(
            "cannot create the data directory {}: {e}",
            data_dir.display()
        )
    })?;
    let registry = Registry::open(data_dir.clone(), auth.token().map(str::to_string))?;
    tokio::spawn(registry.clone().watch_health());
    let queen = Queen {
        registry: registry.clone(),
        jobs: Jobs::default(),
        auth,
        shutdown: Arc::new(tokio::sync::Notify::new()),
    };
    tracing::info!(
        "queen listening on http://{}:{}, data in {}",
        args.host,
        args.port,
        data_dir.display()
    );
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    crate::process::report_ready(addr);
    let admin = queen.shutdown.clone();
    let jobs = queen.jobs.clone();
    http::serve(listener, move |req| route(queen.clone(), req), async move {
        http::stop_signal(&admin).await;
        tracing::info!("queen shutting down");
        jobs.cancel_all();
        // Still answering health while the local hive and its workers stop, so
        // `rbee keeper queen stop` returns only once everything is gone.
        registry.stop_local().await;
    })
    .await;
    Ok(())
}

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
    ChatCompletions,
    Completions,
    Models,
    Shutdown,
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
        Method::POST,
        "/v1/chat/completions",
        Endpoint::ChatCompletions,
    ),
    (Method::POST, "/v1/completions", Endpoint::Completions),
    (Method::GET, "/v1/models", Endpoint::Models),
    (Method::POST, "/v1/admin/shutdown", Endpoint::Shutdown),
];

async fn route(q: Queen, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let found = q
        .auth
        .check(&req)
        .and_then(|()| http::find(ROUTES, req.method(), &path));
    let (endpoint, params) = match found {
        Ok(found) => found,
        Err(e) => return http::error(e),
    };
    let param = params.first().copied().unwrap_or_default();
    http::reply(match endpoint {
        Endpoint::Health => Ok(http::json(StatusCode::OK, &Health::alive("queen"))),
        Endpoint::Hives => Ok(http::json(StatusCode::OK, &q.registry.list().await)),
        Endpoint::AddHive => add_hive(&q, req).await,
        Endpoint::RemoveHive => remove_hive(&q, param),
        Endpoint::CreateJob => create_job(&q, req).await,
        Endpoint::JobStream => job_stream(&q, param),
        Endpoint::CancelJob => cancel_job(&q, param),
        Endpoint::Workers => Ok(http::json(StatusCode::OK, &workers(&q).await)),
        Endpoint::StopWorker => stop_worker(&q, param).await,
        Endpoint::HiveModels
        | Endpoint::HiveDownload
        | Endpoint::HiveDownloadProgress
        | Endpoint::HiveDeleteModel => match hive_for(&q, param).await {
            Ok(hive) => hive_models(&hive, endpoint, &params, req).await,
            Err(e) => Err(e),
        },
        Endpoint::ChatCompletions => return openai_route(&q, req, openai::Kind::Chat).await,
        Endpoint::Completions => return openai_route(&q, req, openai::Kind::Completion).await,
        Endpoint::Models => Ok(http::json(StatusCode::OK, &models(&q).await)),
        Endpoint::Shutdown => {
            q.shutdown.notify_one();
            Ok(http::json(StatusCode::ACCEPTED, &Health::stopping("queen")))
        }
    })
}

async fn add_hive(q: &Queen, req: Request<Incoming>) -> Reply {
    let body: AddHive = http::read_json(req).await?;
    let conn = q.registry.add(body)?;
    let _ = q.registry.check(&conn).await;
    let status = q
        .registry
        .list()
        .await
        .into_iter()
        .find(|h| h.name == conn.name);
    Ok(http::json(StatusCode::CREATED, &status))
}

fn remove_hive(q: &Queen, name: &str) -> Reply {
    if q.registry.remove(name)? {
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

fn job_stream(q: &Queen, id: &str) -> Reply {
    let job = q
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::JobNotFound, format!("no job {id}")))?;
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

fn cancel_job(q: &Queen, id: &str) -> Reply {
    let job = q
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::new(ErrorCode::JobNotFound, format!("no job {id}")))?;
    job.cancel();
    Ok(http::json(
        StatusCode::OK,
        &JobCancelled {
            job_id: id.to_string(),
            state: "cancelled".into(),
        },
    ))
}

/// Every worker of every hive that answers.
async fn workers(q: &Queen) -> Vec<HiveWorker> {
    let mut all = Vec::new();
    for hive in q.registry.all().await {
        let url = format!("{}/v1/workers/list", hive.url);
        if let Ok(list) = client::get::<Vec<WorkerInfo>>(&url, hive.token.as_deref()).await {
            all.extend(list.into_iter().map(|w| HiveWorker {
                hive: hive.name.clone(),
                worker: w,
            }));
        }
    }
    all
}

async fn stop_worker(q: &Queen, id: &str) -> Reply {
    for hive in q.registry.all().await {
        let url = format!("{}/v1/workers/list", hive.url);
        let Ok(list) = client::get::<Vec<WorkerInfo>>(&url, hive.token.as_deref()).await else {
            continue;
        };
        if list.iter().any(|w| w.worker_id == *id) {
            let url = format!("{}/v1/workers/{id}/shutdown", hive.url);
            let w = client::post::<WorkerInfo>(&url, hive.token.as_deref(), &())
                .await
                .map_err(|e| relayed(e, &hive.name))?;
            return Ok(http::json(
                StatusCode::ACCEPTED,
                &HiveWorker {
                    hive: hive.name,
                    worker: w,
                },
            ));
        }
    }
    Err(ApiError::new(
        ErrorCode::WorkerNotFound,
        format!("no hive has a worker {id}"),
    ))
}

/// The models of every hive, for OpenAI's `GET /v1/models`.
async fn models(q: &Queen) -> serde_json::Value {
    let mut seen = Vec::new();
    for hive in q.registry.all().await {
        let url = format!("{}/v1/models", hive.url);
        if let Ok(models) = client::get::<Vec<ModelEntry>>(&url, hive.token.as_deref()).await {
            for m in models {
                if !seen.iter().any(|(id, _)| *id == m.name) {
                    seen.push((m.name, hive.name.clone()));
                }
            }
        }
    }
    openai::model_list(seen)
}

/// Routes an OpenAI request by its `model` to a ready (or new) worker and
/// passes the worker's answer through. A client that leaves drops the
/// upstream connection, which cancels the generation on the worker.
async fn openai_route(q: &Queen, req: Request<Incoming>, kind: openai::Kind) -> Response<Body> {
    let path = req.uri().path().to_string();
    let checked = async {
        let body = http::read_body(req).await?;
        let prepared = openai::parse(&body, kind)?;
        let model = openai::model_of(&body).unwrap_or_default();
        if model.is_empty() {
            return Err(ApiError::invalid("model", "model is required"));
        }
        Ok((body, prepared, model))
    };
    let (body, prepared, model) = match checked.await {
        Ok(checked) => checked,
        Err(e) => return openai::error(e),
    };
    let job = q.jobs.create();
    let target = match scheduler::worker_for(&q.registry, &job, &model).await {
        Ok(t) => t,
        Err(e) => {
            job.fail(e.clone());
            job.finish();
            return openai::error(ApiError {
                param: Some("model".into()),
                ..e
            });
        }
    };
    job.finish();
    let url = format!("{}{path}", target.url);
    let upstream =
        match client::send(Method::POST, &url, target.hive.token.as_deref(), Some(body)).await {
            Ok(r) => r,
            Err(e) => return openai::error(ApiError::new(ErrorCode::WorkerLost, e.message)),
        };
    let status = upstream.status();
    if !prepared.stream || !status.is_success() {
        use http_body_util::BodyExt;
        return match upstream.into_body().collect().await {
            Ok(collected) => {
                let mut resp = Response::new(http::full(collected.to_bytes()));
                *resp.status_mut() = status;
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            Err(e) => openai::error(ApiError::new(
                ErrorCode::WorkerLost,
                format!("the worker's answer broke off: {e}"),
            )),
        };
    }
    let (tx, resp) = http::sse_response();
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = upstream.into_body();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if tx.send(data).await.is_err() {
                    return;
                }
            }
        }
    });
    resp
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
    endpoint: Endpoint,
    params: &[&str],
    req: Request<Incoming>,
) -> Reply {
    let token = hive.token.as_deref();
    let relayed = |e| relayed(e, &hive.name);
    match endpoint {
        Endpoint::HiveDownload => {
            let body: DownloadRequest = http::read_json(req).await?;
            let url = format!("{}/v1/models/download", hive.url);
            let started: crate::protocol::DownloadStarted =
                client::post(&url, token, &body).await.map_err(relayed)?;
            Ok(http::json(StatusCode::ACCEPTED, &started))
        }
        Endpoint::HiveDownloadProgress => {
            let query = req.uri().query().unwrap_or("");
            let url = format!("{}/v1/models/download/progress?{query}", hive.url);
            let mut upstream = client::stream(&url, token, None::<&()>)
                .await
                .map_err(relayed)?;
            let (tx, resp) = http::sse_response();
            tokio::spawn(async move {
                while let Some(frame) = upstream.next().await {
                    let bytes = match frame {
                        sse::Frame::Data(d) => hyper::body::Bytes::from(format!("data: {d}\n\n")),
                        sse::Frame::Done => hyper::body::Bytes::from_static(sse::DONE),
                    };
                    if tx.send(bytes).await.is_err() {
                        return;
                    }
                }
            });
            Ok(resp)
        }
        Endpoint::HiveDeleteModel => {
            let name = params.get(1).copied().unwrap_or_default();
            let url = format!("{}/v1/models/{name}", hive.url);
            let entry: ModelEntry = client::call(Method::DELETE, &url, token, None::<&()>)
                .await
                .map_err(relayed)?;
            Ok(http::json(StatusCode::OK, &entry))
        }
        _ => {
            let url = format!("{}/v1/models", hive.url);
            let models: Vec<ModelEntry> = client::get(&url, token).await.map_err(relayed)?;
            Ok(http::json(StatusCode::OK, &models))
        }
    }
}

async fn create_job(q: &Queen, req: Request<Incoming>) -> Reply {
    let body: JobRequest = http::read_json(req).await?;
    if body.model.trim().is_empty() {
        return Err(ApiError::invalid("model", "model is empty"));
    }
    if body.prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt is empty"));
    }
    body.sampling.validate()?;
    let job = q.jobs.create();
    let created = JobCreated {
        job_id: job.id.clone(),
        sse_url: format!("/v1/jobs/{}/stream", job.id),
    };
    let registry = q.registry.clone();
    tokio::spawn(async move {
        let outcome = tokio::select! {
            r = scheduler::run(&registry, &job, &body) => r,
            () = job.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "the job was cancelled")),
        };
        if let Err(e) = outcome {
            job.fail(e);
        }
        job.finish();
    });
    Ok(http::json(StatusCode::CREATED, &created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_answers_a_wrong_method_with_405() {
        http::assert_routes_are_consistent(ROUTES);
    }
}
