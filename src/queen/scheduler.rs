//! Running one job: pick hives, find a ready worker or provision one
//! (download, spawn, load), then relay the worker's tokens into the job stream.
//! Every step narrates on the job stream.

use super::jobs::Job;
use super::registry::{HiveConn, Registry, LOCALHOST};
use crate::http::client;
use crate::http::sse::Frame;
use crate::protocol::{
    ApiError, ClusterEvent, DownloadEvent, DownloadRequest, DownloadStarted, DownloadState,
    ErrorCode, InferenceEvent, InferenceRequest, JobEvent, JobRequest, LoadingEvent, ModelEntry,
    ReadyStatus, SpawnRequest, WorkerInfo, WorkerState,
};
use std::time::Duration;

/// A worker chosen for a job.
pub struct Target {
    pub hive: HiveConn,
    pub url: String,
    pub worker_id: String,
}

/// A ready worker for `model` on any hive, provisioned if need be (the OpenAI front).
pub async fn worker_for(registry: &Registry, job: &Job, model: &str) -> Result<Target, ApiError> {
    let hives = candidates(registry, job, None).await?;
    match find_ready(&hives, model, &[]).await {
        Some(t) => Ok(t),
        None => provision(&hives, job, model).await,
    }
}

/// How an attempt at inference ended, when it did not succeed.
enum Relay {
    /// The worker vanished; `tokens` were already relayed.
    Lost {
        tokens: u32,
    },
    /// Every slot and the queue were full.
    Busy,
    Failed(ApiError),
}

pub async fn run(registry: &Registry, job: &Job, req: &JobRequest) -> Result<(), ApiError> {
    let hives = candidates(registry, job, req.node.as_deref()).await?;
    let mut excluded: Vec<String> = Vec::new();
    let mut retried = false;
    let mut busy_waits = 0;
    loop {
        let target = match find_ready(&hives, &req.model, &excluded).await {
            Some(t) => {
                job.narrate(
                    "queen",
                    "reuse",
                    format!("using worker {} on hive {}", t.worker_id, t.hive.name),
                );
                t
            }
            None => provision(&hives, job, &req.model).await?,
        };
        match relay(&target, job, req).await {
            Ok(()) => return Ok(()),
            Err(Relay::Failed(e)) => return Err(e),
            Err(Relay::Busy) if busy_waits < 50 => {
                busy_waits += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(Relay::Busy) => {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    "every worker for this model stayed busy",
                ))
            }
            Err(Relay::Lost { tokens: 0 }) if !retried => {
                retried = true;
                job.narrate(
                    "queen",
                    "retry",
                    format!(
                        "worker {} was lost before answering; retrying on another worker",
                        target.worker_id
                    ),
                );
                excluded.push(target.url);
            }
            Err(Relay::Lost { .. }) => {
                return Err(ApiError::new(
                    ErrorCode::WorkerLost,
                    format!(
                        "worker {} on hive {} stopped mid-stream",
                        target.worker_id, target.hive.name
                    ),
                ))
            }
        }
    }
}

/// The hives this job may use, checked alive.
async fn candidates(
    registry: &Registry,
    job: &Job,
    node: Option<&str>,
) -> Result<Vec<HiveConn>, ApiError> {
    let narrate = |action: &str, human: String| job.narrate("queen", action, human);
    let hives = match node {
        Some(name) => match registry.get(name).await {
            Some(h) => vec![h],
            None if name == LOCALHOST => vec![registry
                .ensure_local(narrate)
                .await
                .map_err(|m| ApiError::new(ErrorCode::HiveStartFailed, m))?],
            None => {
                let known: Vec<String> = registry.all().await.into_iter().map(|h| h.name).collect();
                return Err(ApiError::new(ErrorCode::UnknownNode,
                    format!(
                        "no hive named {name}; registered: {} (add one with `rbee keeper hive add`)",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
        },
        None => {
            let all = registry.all().await;
            if all.is_empty() {
                vec![registry
                    .ensure_local(narrate)
                    .await
                    .map_err(|m| ApiError::new(ErrorCode::HiveStartFailed, m))?]
            } else {
                all
            }
        }
    };
    let mut alive = Vec::new();
    let mut down = Vec::new();
    for hive in hives {
        match registry.check(&hive).await {
            Ok(()) => alive.push(hive),
            Err(e) => down.push(format!(
                "hive {} at {} is not answering ({e})",
                hive.name, hive.url
            )),
        }
    }
    if alive.is_empty() {
        return Err(ApiError::new(ErrorCode::HiveUnreachable, down.join("; ")));
    }
    for d in down {
        job.narrate("queen", "skip_hive", d);
    }
    Ok(alive)
}

/// The catalog entry of `model` on `hive`, if it has it.
async fn catalog_entry(hive: &HiveConn, model: &str) -> Option<ModelEntry> {
    let entries: Vec<ModelEntry> =
        client::get(&format!("{}/v1/models", hive.url), hive.token.as_deref())
            .await
            .ok()?;
    let lower = model.to_lowercase();
    let path = model.strip_prefix("file:").unwrap_or(model);
    entries
        .into_iter()
        .find(|e| e.model_ref == model || e.name == lower || e.path == path)
}

/// A ready worker with this model and a free slot, least busy first.
async fn find_ready(hives: &[HiveConn], model: &str, excluded: &[String]) -> Option<Target> {
    let mut best: Option<(u32, Target)> = None;
    for hive in hives {
        let Some(entry) = catalog_entry(hive, model).await else {
            continue;
        };
        let workers: Vec<WorkerInfo> = client::get(
            &format!("{}/v1/workers/list", hive.url),
            hive.token.as_deref(),
        )
        .await
        .unwrap_or_default();
        for w in workers {
            if w.state != WorkerState::Ready || w.model != entry.name || excluded.contains(&w.url) {
                continue;
            }
            let Ok(ready) =
                client::get::<ReadyStatus>(&format!("{}/v1/ready", w.url), hive.token.as_deref())
                    .await
            else {
                continue;
            };
            let load = ready.slots_busy + ready.queue_len;
            if ready.ready
                && ready.slots_busy < ready.slots_total
                && best.as_ref().is_none_or(|(b, _)| load < *b)
            {
                best = Some((
                    load,
                    Target {
                        hive: hive.clone(),
                        url: w.url,
                        worker_id: w.worker_id,
                    },
                ));
            }
        }
    }
    best.map(|(_, t)| t)
}

/// Gets the model onto a hive (downloading if needed), starts a worker, waits for it to load.
async fn provision(hives: &[HiveConn], job: &Job, model: &str) -> Result<Target, ApiError> {
    let mut chosen = None;
    for hive in hives {
        if let Some(entry) = catalog_entry(hive, model).await {
            chosen = Some((hive.clone(), entry));
            break;
        }
    }
    let (hive, entry) = match chosen {
        Some(c) => c,
        None => {
            let hive = hives[0].clone();
            fetch(&hive, job, model).await?;
            let entry = catalog_entry(&hive, model).await.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ModelNotFound,
                    format!("hive {} does not list {model} after fetching it", hive.name),
                )
            })?;
            (hive, entry)
        }
    };
    job.narrate(
        "hive",
        "spawn",
        format!("starting a worker for {} on hive {}", entry.name, hive.name),
    );
    let spawn = SpawnRequest {
        model_ref: entry.name.clone(),
        backend: None,
        device: 0,
        slots: None,
        ctx_size: None,
    };
    let worker: WorkerInfo = client::post(
        &format!("{}/v1/workers/spawn", hive.url),
        hive.token.as_deref(),
        &spawn,
    )
    .await
    .map_err(|e| {
        ApiError::new(
            ErrorCode::SpawnFailed,
            format!("hive {} could not start a worker: {e}", hive.name),
        )
    })?;
    wait_loaded(&hive, &worker, job).await?;
    job.narrate(
        "worker",
        "ready",
        format!("worker {} is ready at {}", worker.worker_id, worker.url),
    );
    Ok(Target {
        hive,
        url: worker.url,
        worker_id: worker.worker_id,
    })
}

/// Has the hive download (or register) the model, relaying progress.
async fn fetch(hive: &HiveConn, job: &Job, model: &str) -> Result<(), ApiError> {
    job.narrate(
        "hive",
        "download",
        format!("hive {} is fetching {model}", hive.name),
    );
    let req = DownloadRequest {
        model_ref: model.to_string(),
    };
    let started: DownloadStarted = client::post(
        &format!("{}/v1/models/download", hive.url),
        hive.token.as_deref(),
        &req,
    )
    .await
    .map_err(|e| match e.code {
        ErrorCode::ModelNotFound | ErrorCode::RepoNotFound | ErrorCode::NoGguf => {
            ApiError::new(ErrorCode::ModelNotFound, format!("hive {}: {e}", hive.name))
        }
        _ => ApiError::new(
            ErrorCode::DownloadFailed,
            format!("hive {}: {e}", hive.name),
        ),
    })?;
    if started.state == DownloadState::Complete {
        return Ok(());
    }
    let url = format!(
        "{}/v1/models/download/progress?id={}",
        hive.url, started.download_id
    );
    let mut stream = client::stream(&url, hive.token.as_deref(), None::<&()>)
        .await
        .map_err(|e| ApiError::new(ErrorCode::DownloadFailed, e.to_string()))?;
    while let Some(Frame::Data(data)) = stream.next().await {
        let Ok(event) = serde_json::from_str::<DownloadEvent>(&data) else {
            continue;
        };
        job.push(&JobEvent::Cluster(ClusterEvent::Download(event.clone())));
        match event {
            DownloadEvent::Complete { local_path } => {
                job.narrate(
                    "hive",
                    "downloaded",
                    format!("{model} is at {local_path} on hive {}", hive.name),
                );
                return Ok(());
            }
            DownloadEvent::Error { message } => {
                return Err(ApiError::new(ErrorCode::DownloadFailed, message))
            }
            DownloadEvent::Downloading { .. } => {}
        }
    }
    Err(ApiError::new(
        ErrorCode::DownloadFailed,
        format!("hive {} stopped reporting the download", hive.name),
    ))
}

/// Relays a new worker's loading progress until it is ready.
async fn wait_loaded(hive: &HiveConn, worker: &WorkerInfo, job: &Job) -> Result<(), ApiError> {
    let url = format!("{}/v1/loading/progress", worker.url);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match client::stream(&url, hive.token.as_deref(), None::<&()>).await {
            Ok(s) => break Some(s),
            Err(_) if tokio::time::Instant::now() < deadline => {
                if worker_failed(hive, &worker.worker_id).await.is_some() {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => break None,
        }
    };
    if let Some(stream) = stream.as_mut() {
        while let Some(Frame::Data(data)) = stream.next().await {
            let Ok(event) = serde_json::from_str::<LoadingEvent>(&data) else {
                continue;
            };
            job.push(&JobEvent::Cluster(ClusterEvent::Loading(event.clone())));
            match event {
                LoadingEvent::Ready => return Ok(()),
                LoadingEvent::Failed { message } => {
                    return Err(ApiError::new(ErrorCode::WorkerFailed, message))
                }
                _ => {}
            }
        }
    }
    let why = worker_failed(hive, &worker.worker_id)
        .await
        .unwrap_or_else(|| "it stopped answering while loading".into());
    Err(ApiError::new(
        ErrorCode::WorkerFailed,
        format!("worker {} failed to load: {why}", worker.worker_id),
    ))
}

/// The hive's account of why a worker failed, if it has failed.
async fn worker_failed(hive: &HiveConn, id: &str) -> Option<String> {
    let workers: Vec<WorkerInfo> = client::get(
        &format!("{}/v1/workers/list", hive.url),
        hive.token.as_deref(),
    )
    .await
    .ok()?;
    match workers.into_iter().find(|w| w.worker_id == id) {
        Some(w) if w.state == WorkerState::Failed => {
            Some(w.error.unwrap_or_else(|| "failed".into()))
        }
        Some(_) => None,
        None => Some("the hive no longer lists it".into()),
    }
}

/// Sends the inference to the worker and relays its events into the job.
async fn relay(target: &Target, job: &Job, req: &JobRequest) -> Result<(), Relay> {
    let body = InferenceRequest {
        prompt: req.prompt.clone(),
        sampling: req.sampling.clone(),
        job_id: Some(job.id.clone()),
    };
    let url = format!("{}/v1/inference", target.url);
    let mut stream = match client::stream(&url, target.hive.token.as_deref(), Some(&body)).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.code {
                ErrorCode::QueueFull => Relay::Busy,
                ErrorCode::Unreachable => Relay::Lost { tokens: 0 },
                ErrorCode::ContextOverflow | ErrorCode::InvalidRequest => Relay::Failed(e),
                _ => Relay::Failed(ApiError::new(ErrorCode::InferenceFailed, e.message)),
            })
        }
    };
    let mut tokens = 0;
    while let Some(frame) = stream.next().await {
        let Frame::Data(data) = frame else { break };
        let Ok(event) = serde_json::from_str::<InferenceEvent>(&data) else {
            continue;
        };
        let terminal = matches!(
            event,
            InferenceEvent::End { .. } | InferenceEvent::Error { .. }
        );
        if matches!(event, InferenceEvent::Token { .. }) {
            tokens += 1;
        }
        job.push(&JobEvent::Inference(event));
        if terminal {
            return Ok(());
        }
    }
    Err(Relay::Lost { tokens })
}
