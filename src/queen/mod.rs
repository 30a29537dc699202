//! `rbee queen`: the orchestrator. It takes jobs, picks a machine, streams
//! results back, and keeps the registry of hives.

pub mod jobs;
pub mod registry;
pub mod scheduler;

use crate::http::client::{self, ClientError};
use crate::http::{self, sse, Auth, Body};
use crate::openai;
use crate::protocol::{
    AddHive, DownloadRequest, Health, JobCreated, JobRequest, ModelEntry, WorkerInfo,
};
use argh::FromArgs;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use jobs::Jobs;
use registry::{HiveConn, Registry, LOCALHOST};
use serde::Serialize;
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
    let listener = http::bind(&args.host, args.port).await?;
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

fn failure(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    http::error(status, code, message)
}

/// Passes a hive's error answer on as it was.
fn relayed(e: ClientError, hive: &str) -> Response<Body> {
    match e {
        ClientError::Status {
            status,
            code,
            message,
        } => failure(status, &code, message),
        ClientError::Unreachable(m) => failure(
            StatusCode::BAD_GATEWAY,
            "HIVE_UNREACHABLE",
            format!("hive {hive} is not answering: {m}"),
        ),
    }
}

async fn route(q: Queen, req: Request<Incoming>) -> Response<Body> {
    if let Some(denied) = q.auth.reject(&req) {
        return denied;
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["health"] | ["v1", "health"]) => {
            http::json(StatusCode::OK, &Health::alive("queen"))
        }
        (&Method::GET, ["v1", "hives"]) => http::json(StatusCode::OK, &q.registry.list().await),
        (&Method::POST, ["v1", "hives"]) => {
            let body: AddHive = match http::read_json(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match q.registry.add(body) {
                Ok(conn) => {
                    let _ = q.registry.check(&conn).await;
                    let status = q
                        .registry
                        .list()
                        .await
                        .into_iter()
                        .find(|h| h.name == conn.name);
                    http::json(StatusCode::CREATED, &status)
                }
                Err(m) => failure(StatusCode::BAD_REQUEST, "INVALID_REQUEST", m),
            }
        }
        (&Method::DELETE, ["v1", "hives", name]) => match q.registry.remove(name) {
            Ok(true) => http::json(StatusCode::OK, &serde_json::json!({"removed": name})),
            Ok(false) => failure(
                StatusCode::NOT_FOUND,
                "UNKNOWN_NODE",
                format!("no hive named {name}"),
            ),
            Err(m) => failure(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", m),
        },
        (&Method::POST, ["v1", "jobs"]) => create_job(&q, req).await,
        (&Method::GET, ["v1", "jobs", id, "stream"]) => match q.jobs.get(id) {
            Some(job) => {
                let (tx, resp) = http::sse_response();
                tokio::spawn(async move {
                    // A client that leaves before the end cancels the job.
                    if !job.replay(&tx).await && !job.is_finished() {
                        tracing::info!("{}: the client left; cancelling", job.id);
                        job.cancel();
                    }
                });
                resp
            }
            None => failure(
                StatusCode::NOT_FOUND,
                "JOB_NOT_FOUND",
                format!("no job {id}"),
            ),
        },
        (&Method::DELETE, ["v1", "jobs", id]) => match q.jobs.get(id) {
            Some(job) => {
                job.cancel();
                http::json(
                    StatusCode::OK,
                    &serde_json::json!({"job_id": id, "state": "cancelled"}),
                )
            }
            None => failure(
                StatusCode::NOT_FOUND,
                "JOB_NOT_FOUND",
                format!("no job {id}"),
            ),
        },
        (&Method::GET, ["v1", "workers"]) => {
            let mut all = Vec::new();
            for hive in q.registry.all().await {
                let url = format!("{}/v1/workers/list", hive.url);
                if let Ok(list) = client::get::<Vec<WorkerInfo>>(&url, hive.token.as_deref()).await
                {
                    all.extend(list.into_iter().map(|w| HiveWorker {
                        hive: hive.name.clone(),
                        worker: w,
                    }));
                }
            }
            http::json(StatusCode::OK, &all)
        }
        (&Method::POST, ["v1", "workers", id, "shutdown"]) => {
            for hive in q.registry.all().await {
                let url = format!("{}/v1/workers/list", hive.url);
                let Ok(list) = client::get::<Vec<WorkerInfo>>(&url, hive.token.as_deref()).await
                else {
                    continue;
                };
                if list.iter().any(|w| w.worker_id == *id) {
                    let url = format!("{}/v1/workers/{id}/shutdown", hive.url);
                    return match client::post::<WorkerInfo>(&url, hive.token.as_deref(), &()).await
                    {
                        Ok(w) => http::json(
                            StatusCode::ACCEPTED,
                            &HiveWorker {
                                hive: hive.name,
                                worker: w,
                            },
                        ),
                        Err(e) => relayed(e, &hive.name),
                    };
                }
            }
            failure(
                StatusCode::NOT_FOUND,
                "WORKER_NOT_FOUND",
                format!("no hive has a worker {id}"),
            )
        }
        (_, ["v1", "hives", name, "models", rest @ ..]) => {
            let hive = match hive_for(&q, name).await {
                Ok(h) => h,
                Err(resp) => return resp,
            };
            hive_models(&hive, &method, rest, req).await
        }
        (&Method::POST, ["v1", "chat", "completions"]) => {
            openai_route(&q, req, openai::Kind::Chat).await
        }
        (&Method::POST, ["v1", "completions"]) => {
            openai_route(&q, req, openai::Kind::Completion).await
        }
        (&Method::GET, ["v1", "models"]) => {
            let mut seen = Vec::new();
            for hive in q.registry.all().await {
                let url = format!("{}/v1/models", hive.url);
                if let Ok(models) =
                    client::get::<Vec<ModelEntry>>(&url, hive.token.as_deref()).await
                {
                    for m in models {
                        if !seen.iter().any(|(id, _)| *id == m.name) {
                            seen.push((m.name, hive.name.clone()));
                        }
                    }
                }
            }
            http::json(StatusCode::OK, &openai::model_list(seen))
        }
        (&Method::POST, ["v1", "admin", "shutdown"]) => {
            q.shutdown.notify_one();
            http::json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"status": "shutting_down"}),
            )
        }
        (
            m,
            ["health"]
            | ["v1", "health"]
            | ["v1", "hives"]
            | ["v1", "hives", _]
            | ["v1", "jobs"]
            | ["v1", "jobs", ..]
            | ["v1", "workers"]
            | ["v1", "workers", _, "shutdown"]
            | ["v1", "admin", "shutdown"],
        ) => http::method_not_allowed(m, &path),
        _ => http::not_found(&path),
    }
}

/// Routes an OpenAI request by its `model` to a ready (or new) worker and
/// passes the worker's answer through. A client that leaves drops the
/// upstream connection, which cancels the generation on the worker.
async fn openai_route(q: &Queen, req: Request<Incoming>, kind: openai::Kind) -> Response<Body> {
    let path = req.uri().path().to_string();
    let body = match http::read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let prepared = match openai::parse(&body, kind) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let model = openai::model_of(&body).unwrap_or_default();
    if model.is_empty() {
        return openai::error(
            StatusCode::BAD_REQUEST,
            "model is required",
            Some("model"),
            "invalid_request",
        );
    }
    let job = q.jobs.create();
    let target = match scheduler::worker_for(&q.registry, &job, &model).await {
        Ok(t) => t,
        Err(e) => {
            let status = match e.code {
                "MODEL_NOT_FOUND" | "UNKNOWN_NODE" => StatusCode::NOT_FOUND,
                "HIVE_UNREACHABLE" | "HIVE_START_FAILED" => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            job.fail(e.code, e.message.clone());
            job.finish();
            return openai::error(status, e.message, Some("model"), e.code);
        }
    };
    job.finish();
    let url = format!("{}{path}", target.url);
    let upstream =
        match client::send(Method::POST, &url, target.hive.token.as_deref(), Some(body)).await {
            Ok(r) => r,
            Err(e) => {
                return openai::error(StatusCode::BAD_GATEWAY, e.to_string(), None, "WORKER_LOST")
            }
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
            Err(e) => openai::error(
                StatusCode::BAD_GATEWAY,
                format!("the worker's answer broke off: {e}"),
                None,
                "WORKER_LOST",
            ),
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

/// A worker with the hive it runs on (`GET /v1/workers`).
#[derive(Serialize)]
struct HiveWorker {
    hive: String,
    #[serde(flatten)]
    worker: WorkerInfo,
}

/// The named hive; `localhost` with none registered starts the local hive.
async fn hive_for(q: &Queen, name: &str) -> Result<HiveConn, Response<Body>> {
    if let Some(h) = q.registry.get(name).await {
        return Ok(h);
    }
    if name == LOCALHOST {
        return q
            .registry
            .ensure_local(|_, human| tracing::info!("{human}"))
            .await
            .map_err(|m| failure(StatusCode::BAD_GATEWAY, "HIVE_START_FAILED", m));
    }
    Err(failure(
        StatusCode::NOT_FOUND,
        "UNKNOWN_NODE",
        format!("no hive named {name}"),
    ))
}

/// The model endpoints of one hive, passed through with the queen's token for it.
async fn hive_models(
    hive: &HiveConn,
    method: &Method,
    rest: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    let token = hive.token.as_deref();
    match (method, rest) {
        (&Method::GET, []) => {
            match client::get::<serde_json::Value>(&format!("{}/v1/models", hive.url), token).await
            {
                Ok(v) => http::json(StatusCode::OK, &v),
                Err(e) => relayed(e, &hive.name),
            }
        }
        (&Method::POST, ["download"]) => {
            let body: DownloadRequest = match http::read_json(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let url = format!("{}/v1/models/download", hive.url);
            match client::post::<serde_json::Value>(&url, token, &body).await {
                Ok(v) => http::json(StatusCode::ACCEPTED, &v),
                Err(e) => relayed(e, &hive.name),
            }
        }
        (&Method::GET, ["download", "progress"]) => {
            let query = req.uri().query().unwrap_or("");
            let url = format!("{}/v1/models/download/progress?{query}", hive.url);
            match client::stream(&url, token, None::<&()>).await {
                Ok(mut upstream) => {
                    let (tx, resp) = http::sse_response();
                    tokio::spawn(async move {
                        while let Some(frame) = upstream.next().await {
                            let bytes = match frame {
                                sse::Frame::Data(d) => {
                                    hyper::body::Bytes::from(format!("data: {d}\n\n"))
                                }
                                sse::Frame::Done => hyper::body::Bytes::from_static(sse::DONE),
                            };
                            if tx.send(bytes).await.is_err() {
                                return;
                            }
                        }
                    });
                    resp
                }
                Err(e) => relayed(e, &hive.name),
            }
        }
        (&Method::DELETE, [name]) => {
            let url = format!("{}/v1/models/{name}", hive.url);
            match client::call::<serde_json::Value>(Method::DELETE, &url, token, None::<&()>).await
            {
                Ok(v) => http::json(StatusCode::OK, &v),
                Err(e) => relayed(e, &hive.name),
            }
        }
        _ => http::not_found(req.uri().path()),
    }
}

async fn create_job(q: &Queen, req: Request<Incoming>) -> Response<Body> {
    let body: JobRequest = match http::read_json(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if body.model.trim().is_empty() {
        return failure(StatusCode::BAD_REQUEST, "INVALID_REQUEST", "model is empty");
    }
    if body.prompt.is_empty() {
        return failure(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "prompt is empty",
        );
    }
    if let Some(n) = body.max_tokens.filter(|&n| n <= 0) {
        return failure(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("max_tokens must be at least 1, got {n}"),
        );
    }
    let job = q.jobs.create();
    let created = JobCreated {
        job_id: job.id.clone(),
        sse_url: format!("/v1/jobs/{}/stream", job.id),
    };
    let registry = q.registry.clone();
    tokio::spawn(async move {
        let outcome = tokio::select! {
            r = scheduler::run(&registry, &job, &body) => r,
            () = job.cancelled() => Err(scheduler::JobError {
                code: "CANCELLED",
                message: "the job was cancelled".into(),
            }),
        };
        if let Err(e) = outcome {
            job.fail(e.code, e.message);
        }
        job.finish();
    });
    http::json(StatusCode::CREATED, &created)
}
