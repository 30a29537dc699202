//! Running one job: pick hives, find a ready worker or provision one
//! (download, spawn, load), then relay the worker's tokens into the job stream.
//! Every step narrates on the job stream.
//!
//! The cluster comes in through [`Cluster`], so each rule below is tested
//! against a fake one (see the tests at the end). The rules as they stand:
//! the least busy ready worker wins; a worker lost before its first token is
//! excluded and the job retried once; lost after tokens is `WORKER_LOST`; a
//! full worker is waited for ([`BUSY_WAITS`] times) before `BUSY`.

use super::cluster::Cluster;
use super::jobs::Job;
use super::registry::{HiveConn, LOCALHOST};
use crate::protocol::{
    ApiError, ClusterEvent, DownloadEvent, DownloadState, ErrorCode, InferenceEvent,
    InferenceRequest, JobEvent, JobRequest, LoadingEvent, ModelEntry, SpawnRequest, WorkerInfo,
    WorkerState,
};
use std::time::Duration;

/// How many times a job waits for a full worker before giving up with `BUSY`.
const BUSY_WAITS: u32 = 50;
/// How long each of those waits is.
const BUSY_PAUSE: Duration = Duration::from_millis(200);
/// How long a new worker may take to open its loading-progress stream.
const LOADING_STREAM_WAIT: Duration = Duration::from_secs(30);

/// A worker chosen for a job.
#[derive(Debug, Clone)]
pub struct Target {
    pub hive: HiveConn,
    pub url: String,
    pub worker_id: String,
}

/// A ready worker for `model` on any hive, provisioned if need be (the OpenAI front).
pub async fn worker_for(
    cluster: &impl Cluster,
    job: &Job,
    model: &str,
) -> Result<Target, ApiError> {
    let hives = candidates(cluster, job, None).await?;
    match find_ready(cluster, &hives, model, &[]).await {
        Some(t) => Ok(t),
        None => provision(cluster, &hives, job, model).await,
    }
}

/// Runs a job to its end: a worker, the inference relayed, and what follows a
/// failed attempt as [`Attempts::decide`] rules.
pub async fn run(cluster: &impl Cluster, job: &Job, req: &JobRequest) -> Result<(), ApiError> {
    let hives = candidates(cluster, job, req.node.as_deref()).await?;
    let mut attempts = Attempts::default();
    loop {
        let target = pick_worker(cluster, &hives, job, &req.model, &attempts.excluded).await?;
        let outcome = relay(cluster, &target, job, req).await;
        match attempts.decide(outcome, &target) {
            Decision::Finished(result) => return result,
            Decision::WaitBusy => tokio::time::sleep(BUSY_PAUSE).await,
            Decision::Retry => job.narrate(
                "queen",
                "retry",
                format!(
                    "worker {} was lost before answering; retrying on another worker",
                    target.worker_id
                ),
            ),
        }
    }
}

/// How an attempt at inference ended, when it did not succeed.
#[derive(Debug)]
enum Relay {
    /// The worker vanished; `tokens` were already relayed.
    Lost {
        tokens: u32,
    },
    /// Every slot and the queue were full.
    Busy,
    Failed(ApiError),
}

/// What the job does after an attempt.
#[derive(Debug)]
enum Decision {
    Finished(Result<(), ApiError>),
    /// Sleep [`BUSY_PAUSE`], then try again.
    WaitBusy,
    /// Try again; the lost worker is excluded.
    Retry,
}

/// The job's attempts so far: the memory its retry rules need.
#[derive(Debug, Default)]
struct Attempts {
    /// Workers (by URL) lost during this job: never picked again for it.
    excluded: Vec<String>,
    /// A lost worker has been retried once already.
    retried: bool,
    busy_waits: u32,
}

impl Attempts {
    fn decide(&mut self, outcome: Result<(), Relay>, target: &Target) -> Decision {
        match outcome {
            Ok(()) => Decision::Finished(Ok(())),
            Err(Relay::Failed(e)) => Decision::Finished(Err(e)),
            Err(Relay::Busy) if self.busy_waits < BUSY_WAITS => {
                self.busy_waits += 1;
                Decision::WaitBusy
            }
            Err(Relay::Busy) => Decision::Finished(Err(ApiError::new(
                ErrorCode::Busy,
                "every worker for this model stayed busy",
            ))),
            // Nothing reached the client yet, so another worker can answer in full.
            Err(Relay::Lost { tokens: 0 }) if !self.retried => {
                self.retried = true;
                self.excluded.push(target.url.clone());
                Decision::Retry
            }
            Err(Relay::Lost { .. }) => Decision::Finished(Err(ApiError::new(
                ErrorCode::WorkerLost,
                format!(
                    "worker {} on hive {} stopped mid-stream",
                    target.worker_id, target.hive.name
                ),
            ))),
        }
    }
}

/// A ready worker (narrated as reused), else a new one.
async fn pick_worker(
    cluster: &impl Cluster,
    hives: &[HiveConn],
    job: &Job,
    model: &str,
    excluded: &[String],
) -> Result<Target, ApiError> {
    match find_ready(cluster, hives, model, excluded).await {
        Some(t) => {
            job.narrate(
                "queen",
                "reuse",
                format!("using worker {} on hive {}", t.worker_id, t.hive.name),
            );
            Ok(t)
        }
        None => provision(cluster, hives, job, model).await,
    }
}

/// The hives this job may use, checked alive.
async fn candidates(
    cluster: &impl Cluster,
    job: &Job,
    node: Option<&str>,
) -> Result<Vec<HiveConn>, ApiError> {
    let hives = named_hives(cluster, job, node).await?;
    preflight(cluster, job, hives).await
}

/// The hive `node` names, or every hive; `localhost`, or no hive at all,
/// starts the local one.
async fn named_hives(
    cluster: &impl Cluster,
    job: &Job,
    node: Option<&str>,
) -> Result<Vec<HiveConn>, ApiError> {
    let all = cluster.hives().await;
    match node {
        Some(name) => match all.iter().find(|h| h.name == name) {
            Some(h) => Ok(vec![h.clone()]),
            None if name == LOCALHOST => Ok(vec![cluster.local_hive(job).await?]),
            None => Err(unknown_node(name, &all)),
        },
        None if all.is_empty() => Ok(vec![cluster.local_hive(job).await?]),
        None => Ok(all),
    }
}

fn unknown_node(name: &str, known: &[HiveConn]) -> ApiError {
    let known: Vec<&str> = known.iter().map(|h| h.name.as_str()).collect();
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    ApiError::new(
        ErrorCode::UnknownNode,
        format!("no hive named {name}; registered: {known} (add one with `rbee keeper hive add`)"),
    )
}

/// The hives that answer; the others are narrated as skipped, or, when none
/// answers, named in the `HIVE_UNREACHABLE` error.
async fn preflight(
    cluster: &impl Cluster,
    job: &Job,
    hives: Vec<HiveConn>,
) -> Result<Vec<HiveConn>, ApiError> {
    let mut alive = Vec::new();
    let mut down = Vec::new();
    for hive in hives {
        match cluster.check(&hive).await {
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
async fn catalog_entry(cluster: &impl Cluster, hive: &HiveConn, model: &str) -> Option<ModelEntry> {
    let entries = cluster.models(hive).await.ok()?;
    let lower = model.to_lowercase();
    let path = model.strip_prefix("file:").unwrap_or(model);
    entries
        .into_iter()
        .find(|e| e.model_ref == model || e.name == lower || e.path == path)
}

/// A ready worker with this model and a free slot, least busy first.
async fn find_ready(
    cluster: &impl Cluster,
    hives: &[HiveConn],
    model: &str,
    excluded: &[String],
) -> Option<Target> {
    let mut best: Option<(u32, Target)> = None;
    for hive in hives {
        let Some(entry) = catalog_entry(cluster, hive, model).await else {
            continue;
        };
        for (load, target) in free_workers(cluster, hive, &entry, excluded).await {
            if best.as_ref().is_none_or(|(b, _)| load < *b) {
                best = Some((load, target));
            }
        }
    }
    best.map(|(_, t)| t)
}

/// The ready workers of `hive` serving `entry` with a free slot, each with its
/// load (busy slots + queue).
async fn free_workers(
    cluster: &impl Cluster,
    hive: &HiveConn,
    entry: &ModelEntry,
    excluded: &[String],
) -> Vec<(u32, Target)> {
    let workers = cluster.workers(hive).await.unwrap_or_default();
    let mut free = Vec::new();
    for w in workers {
        if w.state != WorkerState::Ready || w.model != entry.name || excluded.contains(&w.url) {
            continue;
        }
        let Ok(ready) = cluster.ready(hive, &w.url).await else {
            continue;
        };
        if ready.ready && ready.slots_busy < ready.slots_total {
            let target = Target {
                hive: hive.clone(),
                url: w.url,
                worker_id: w.worker_id,
            };
            free.push((ready.slots_busy + ready.queue_len, target));
        }
    }
    free
}

/// Gets the model onto a hive (downloading if needed), starts a worker, waits for it to load.
async fn provision(
    cluster: &impl Cluster,
    hives: &[HiveConn],
    job: &Job,
    model: &str,
) -> Result<Target, ApiError> {
    let (hive, entry) = place(cluster, hives, job, model).await?;
    let worker = spawn_worker(cluster, &hive, &entry, job).await?;
    wait_loaded(cluster, &hive, &worker, job).await?;
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

/// The first hive that has the model, else the first hive, made to fetch it.
async fn place(
    cluster: &impl Cluster,
    hives: &[HiveConn],
    job: &Job,
    model: &str,
) -> Result<(HiveConn, ModelEntry), ApiError> {
    for hive in hives {
        if let Some(entry) = catalog_entry(cluster, hive, model).await {
            return Ok((hive.clone(), entry));
        }
    }
    let hive = hives
        .first()
        .ok_or_else(|| ApiError::internal("no hive to place the model on"))?;
    fetch(cluster, hive, job, model).await?;
    let entry = catalog_entry(cluster, hive, model).await.ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("hive {} does not list {model} after fetching it", hive.name),
        )
    })?;
    Ok((hive.clone(), entry))
}

async fn spawn_worker(
    cluster: &impl Cluster,
    hive: &HiveConn,
    entry: &ModelEntry,
    job: &Job,
) -> Result<WorkerInfo, ApiError> {
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
    cluster.spawn(hive, &spawn).await.map_err(|e| {
        ApiError::new(
            ErrorCode::SpawnFailed,
            format!("hive {} could not start a worker: {e}", hive.name),
        )
    })
}

/// Has the hive download (or register) the model, relaying progress.
async fn fetch(
    cluster: &impl Cluster,
    hive: &HiveConn,
    job: &Job,
    model: &str,
) -> Result<(), ApiError> {
    job.narrate(
        "hive",
        "download",
        format!("hive {} is fetching {model}", hive.name),
    );
    let started = cluster.download(hive, model).await.map_err(|e| {
        // However the hive failed to find it, for the user the model is not there.
        let code = match e.code {
            ErrorCode::ModelNotFound | ErrorCode::RepoNotFound | ErrorCode::NoGguf => {
                ErrorCode::ModelNotFound
            }
            _ => ErrorCode::DownloadFailed,
        };
        ApiError::new(code, format!("hive {}: {e}", hive.name))
    })?;
    if started.state == DownloadState::Complete {
        return Ok(());
    }
    follow_download(cluster, hive, job, model, &started.download_id).await
}

/// Relays a download's progress until it completes or fails.
async fn follow_download(
    cluster: &impl Cluster,
    hive: &HiveConn,
    job: &Job,
    model: &str,
    id: &str,
) -> Result<(), ApiError> {
    let mut events = cluster
        .download_progress(hive, id)
        .await
        .map_err(|e| ApiError::new(ErrorCode::DownloadFailed, e.message))?;
    while let Some(event) = events.next().await {
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
async fn wait_loaded(
    cluster: &impl Cluster,
    hive: &HiveConn,
    worker: &WorkerInfo,
    job: &Job,
) -> Result<(), ApiError> {
    if let Some(mut events) = open_loading(cluster, hive, worker).await {
        while let Some(event) = events.next().await {
            job.push(&JobEvent::Cluster(ClusterEvent::Loading(event.clone())));
            match event {
                LoadingEvent::Ready => return Ok(()),
                LoadingEvent::Failed { message } => {
                    return Err(ApiError::new(ErrorCode::WorkerFailed, message))
                }
                LoadingEvent::LoadingToVram { .. } | LoadingEvent::LoadingToRam { .. } => {}
            }
        }
    }
    let why = worker_failed(cluster, hive, &worker.worker_id)
        .await
        .unwrap_or_else(|| "it stopped answering while loading".into());
    Err(ApiError::new(
        ErrorCode::WorkerFailed,
        format!("worker {} failed to load: {why}", worker.worker_id),
    ))
}

/// The worker's loading progress, once its server is up; `None` if it failed
/// first or did not come up within [`LOADING_STREAM_WAIT`].
async fn open_loading(
    cluster: &impl Cluster,
    hive: &HiveConn,
    worker: &WorkerInfo,
) -> Option<crate::clients::Events<LoadingEvent>> {
    let deadline = tokio::time::Instant::now() + LOADING_STREAM_WAIT;
    loop {
        match cluster.loading_progress(hive, &worker.url).await {
            Ok(events) => return Some(events),
            Err(_) if tokio::time::Instant::now() < deadline => {
                // A freshly spawned worker binds its port a moment after the spawn answer.
                if worker_failed(cluster, hive, &worker.worker_id)
                    .await
                    .is_some()
                {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => return None,
        }
    }
}

/// The hive's account of why a worker failed, if it has failed.
async fn worker_failed(cluster: &impl Cluster, hive: &HiveConn, id: &str) -> Option<String> {
    let workers = cluster.workers(hive).await.ok()?;
    match workers.into_iter().find(|w| w.worker_id == id) {
        Some(w) if w.state == WorkerState::Failed => {
            Some(w.error.unwrap_or_else(|| "failed".into()))
        }
        Some(_) => None,
        None => Some("the hive no longer lists it".into()),
    }
}

/// Sends the inference to the worker and relays its events into the job.
async fn relay(
    cluster: &impl Cluster,
    target: &Target,
    job: &Job,
    req: &JobRequest,
) -> Result<(), Relay> {
    let body = InferenceRequest {
        prompt: req.prompt.clone(),
        sampling: req.sampling.clone(),
        cache_prompt: req.cache_prompt,
        job_id: Some(job.id.clone()),
    };
    let mut events = cluster
        .infer(&target.hive, &target.url, &body)
        .await
        .map_err(refused)?;
    let mut tokens = 0;
    while let Some(event) = events.next().await {
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

/// What a worker's refusal to start an inference means for the job.
fn refused(e: ApiError) -> Relay {
    match e.code {
        ErrorCode::QueueFull => Relay::Busy,
        ErrorCode::Unreachable => Relay::Lost { tokens: 0 },
        // The request itself is at fault: another worker would say the same.
        ErrorCode::ContextOverflow | ErrorCode::InvalidRequest => Relay::Failed(e),
        _ => Relay::Failed(ApiError::new(ErrorCode::InferenceFailed, e.message)),
    }
}

/// The scheduler's rules, each against a fake cluster: no process, no network.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::Events;
    use crate::protocol::{DownloadStarted, ReadyStatus, StopReason};
    use crate::queen::jobs::Jobs;
    use std::sync::Mutex;

    const MODEL: &str = "smollm";

    /// What a fake worker does with its n-th inference request (the last one repeats).
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        /// n tokens, then `end`.
        Tokens(u32),
        /// n tokens, then the connection drops.
        LostAfter(u32),
        /// Refused before any event.
        Refuse(ErrorCode),
    }

    #[derive(Debug, Clone)]
    struct FakeWorker {
        hive: String,
        info: WorkerInfo,
        slots_busy: u32,
        script: Vec<Answer>,
        asked: usize,
    }

    /// A cluster that answers from tables and records what was asked of it.
    #[derive(Default)]
    struct Fake {
        hives: Vec<HiveConn>,
        /// Hives that do not answer their health check.
        down: Vec<String>,
        /// Models a hive can fetch (any hive).
        fetchable: Vec<String>,
        state: Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        catalog: Vec<(String, ModelEntry)>,
        workers: Vec<FakeWorker>,
        /// What was asked, in order: `infer w1`, `spawn a`, `download a`, `start local`.
        calls: Vec<String>,
    }

    fn hive(name: &str) -> HiveConn {
        HiveConn {
            name: name.into(),
            url: format!("http://{name}:8080"),
            token: None,
        }
    }

    fn entry(name: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            model_ref: format!("hf:org/{name}"),
            path: format!("/models/{name}.gguf"),
            size: 1,
            sha256: String::new(),
            architecture: "llama".into(),
            parameters: 1,
            quantization: "Q4_1".into(),
            context_length: 2048,
            layers: 30,
            owned: true,
            added_at: String::new(),
        }
    }

    fn info(id: &str, state: WorkerState) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            url: format!("http://{id}"),
            model: MODEL.into(),
            model_path: String::new(),
            pid: 1,
            state,
            slots: 4,
            backend: "cpu".into(),
            device: 0,
            error: None,
            started_at: String::new(),
        }
    }

    impl Fake {
        /// Hives by name, each with the model in its catalog.
        fn with_hives(names: &[&str]) -> Fake {
            let fake = Fake {
                hives: names.iter().map(|n| hive(n)).collect(),
                ..Fake::default()
            };
            for n in names {
                fake.lock().catalog.push((n.to_string(), entry(MODEL)));
            }
            fake
        }

        /// A ready worker on `hive`, `busy` slots of 4 taken, answering by `script`.
        fn worker(self, hive: &str, id: &str, busy: u32, script: &[Answer]) -> Fake {
            self.lock().workers.push(FakeWorker {
                hive: hive.into(),
                info: info(id, WorkerState::Ready),
                slots_busy: busy,
                script: script.to_vec(),
                asked: 0,
            });
            self
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        fn calls(&self) -> Vec<String> {
            self.lock().calls.clone()
        }

        fn call(&self, what: String) {
            self.lock().calls.push(what);
        }
    }

    impl Cluster for Fake {
        async fn hives(&self) -> Vec<HiveConn> {
            self.hives.clone()
        }

        async fn local_hive(&self, _job: &Job) -> Result<HiveConn, ApiError> {
            self.call("start local".into());
            Ok(hive(LOCALHOST))
        }

        async fn check(&self, hive: &HiveConn) -> Result<(), String> {
            match self.down.contains(&hive.name) {
                true => Err("connection refused".into()),
                false => Ok(()),
            }
        }

        async fn models(&self, hive: &HiveConn) -> Result<Vec<ModelEntry>, ApiError> {
            let state = self.lock();
            let on = state.catalog.iter().filter(|(h, _)| *h == hive.name);
            Ok(on.map(|(_, e)| e.clone()).collect())
        }

        async fn workers(&self, hive: &HiveConn) -> Result<Vec<WorkerInfo>, ApiError> {
            let state = self.lock();
            let on = state.workers.iter().filter(|w| w.hive == hive.name);
            Ok(on.map(|w| w.info.clone()).collect())
        }

        async fn ready(&self, _hive: &HiveConn, worker: &str) -> Result<ReadyStatus, ApiError> {
            let state = self.lock();
            let w = state.workers.iter().find(|w| w.info.url == worker);
            let w = w.ok_or_else(|| ApiError::new(ErrorCode::Unreachable, "gone"))?;
            Ok(ReadyStatus {
                ready: true,
                state: WorkerState::Ready,
                progress_url: String::new(),
                model: MODEL.into(),
                slots_total: 4,
                slots_busy: w.slots_busy,
                queue_len: 0,
                cached_sequences: 0,
                cached_tokens: 0,
                error: None,
            })
        }

        async fn download(
            &self,
            hive: &HiveConn,
            model: &str,
        ) -> Result<DownloadStarted, ApiError> {
            self.call(format!("download {}", hive.name));
            if !self.fetchable.iter().any(|m| m == model) {
                return Err(ApiError::new(ErrorCode::RepoNotFound, "no such repo"));
            }
            self.lock().catalog.push((hive.name.clone(), entry(model)));
            Ok(DownloadStarted {
                download_id: "dl-1".into(),
                local_path: String::new(),
                state: DownloadState::Downloading,
            })
        }

        async fn download_progress(
            &self,
            _hive: &HiveConn,
            _id: &str,
        ) -> Result<Events<DownloadEvent>, ApiError> {
            Ok(Events::from_events(vec![
                DownloadEvent::Downloading {
                    bytes_downloaded: 1,
                    bytes_total: 2,
                    speed_mbps: 1.0,
                },
                DownloadEvent::Complete {
                    local_path: "/models/x.gguf".into(),
                },
            ]))
        }

        async fn spawn(&self, hive: &HiveConn, req: &SpawnRequest) -> Result<WorkerInfo, ApiError> {
            self.call(format!("spawn {} {}", hive.name, req.model_ref));
            let new = info("new", WorkerState::Loading);
            self.lock().workers.push(FakeWorker {
                hive: hive.name.clone(),
                info: info("new", WorkerState::Ready),
                slots_busy: 0,
                script: vec![Answer::Tokens(2)],
                asked: 0,
            });
            Ok(new)
        }

        async fn loading_progress(
            &self,
            _hive: &HiveConn,
            _worker: &str,
        ) -> Result<Events<LoadingEvent>, ApiError> {
            Ok(Events::from_events(vec![
                LoadingEvent::LoadingToRam {
                    layers_loaded: 15,
                    layers_total: 30,
                    ram_mb: 100,
                },
                LoadingEvent::Ready,
            ]))
        }

        async fn infer(
            &self,
            _hive: &HiveConn,
            worker: &str,
            _req: &InferenceRequest,
        ) -> Result<Events<InferenceEvent>, ApiError> {
            let mut state = self.lock();
            state.calls.push(format!("infer {worker}"));
            let w = state.workers.iter_mut().find(|w| w.info.url == worker);
            let w = w.ok_or_else(|| ApiError::new(ErrorCode::Unreachable, "gone"))?;
            let answer = w.script[w.asked.min(w.script.len() - 1)];
            w.asked += 1;
            let tokens = |n: u32| (0..n).map(|i| InferenceEvent::Token { t: "x".into(), i });
            Ok(Events::from_events(match answer {
                Answer::Refuse(code) => return Err(ApiError::new(code, "refused")),
                Answer::LostAfter(n) => tokens(n).collect(),
                Answer::Tokens(n) => tokens(n)
                    .chain([InferenceEvent::End {
                        tokens_out: n,
                        decode_time_ms: 1,
                        stop_reason: StopReason::MaxTokens,
                        cached_tokens: 0,
                    }])
                    .collect(),
            }))
        }
    }

    fn job_request(node: Option<&str>) -> JobRequest {
        JobRequest {
            node: node.map(str::to_string),
            model: MODEL.into(),
            prompt: "Once upon a time".into(),
            ..JobRequest::default()
        }
    }

    /// Runs a job on `fake`: its outcome and the events its stream carried.
    async fn run_job(fake: &Fake, node: Option<&str>) -> (Result<(), ApiError>, Vec<JobEvent>) {
        let job = Jobs::default().create();
        let result = run(fake, &job, &job_request(node)).await;
        (result, job.events())
    }

    fn code(result: Result<(), ApiError>) -> ErrorCode {
        result.expect_err("the job should fail").code
    }

    fn tokens(events: &[JobEvent]) -> usize {
        let token = |e: &&JobEvent| matches!(e, JobEvent::Inference(InferenceEvent::Token { .. }));
        events.iter().filter(token).count()
    }

    fn narrated(events: &[JobEvent], action: &str) -> bool {
        events.iter().any(|e| {
            matches!(e, JobEvent::Cluster(ClusterEvent::Narration { action: a, .. }) if a == action)
        })
    }

    #[tokio::test]
    async fn the_least_busy_ready_worker_answers() {
        let fake = Fake::with_hives(&["a", "b"])
            .worker("a", "w-busy", 3, &[Answer::Tokens(2)])
            .worker("b", "w-idle", 0, &[Answer::Tokens(2)])
            .worker("a", "w-some", 1, &[Answer::Tokens(2)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["infer http://w-idle"]);
        assert_eq!(tokens(&events), 2);
        assert!(narrated(&events, "reuse"));
    }

    #[tokio::test]
    async fn a_worker_with_every_slot_busy_is_not_reused() {
        let fake = Fake::with_hives(&["a"]).worker("a", "w-full", 4, &[Answer::Tokens(1)]);
        let (result, _) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["spawn a smollm", "infer http://new"]);
    }

    #[tokio::test]
    async fn a_worker_lost_before_its_first_token_is_excluded_and_the_job_retried() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::LostAfter(0)])
            .worker("a", "w2", 2, &[Answer::Tokens(3)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the retry succeeds");
        // w1 is still the least busy, but lost once it is never picked again.
        assert_eq!(fake.calls(), ["infer http://w1", "infer http://w2"]);
        assert_eq!(tokens(&events), 3);
        assert!(narrated(&events, "retry"));
    }

    #[tokio::test]
    async fn a_lost_worker_is_retried_only_once() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::LostAfter(0)])
            .worker("a", "w2", 1, &[Answer::LostAfter(0)])
            .worker("a", "w3", 2, &[Answer::Tokens(1)]);
        let (result, _) = run_job(&fake, None).await;
        assert_eq!(code(result), ErrorCode::WorkerLost);
        assert_eq!(fake.calls(), ["infer http://w1", "infer http://w2"]);
    }

    #[tokio::test]
    async fn a_worker_lost_after_tokens_is_worker_lost_without_a_retry() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::LostAfter(2)])
            .worker("a", "w2", 1, &[Answer::Tokens(3)]);
        let (result, events) = run_job(&fake, None).await;
        let e = result.expect_err("the job fails");
        assert_eq!(e.code, ErrorCode::WorkerLost);
        assert!(e.message.contains("w1"), "{}", e.message);
        // The client already has two tokens: resending would repeat them.
        assert_eq!(fake.calls(), ["infer http://w1"]);
        assert_eq!(tokens(&events), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_worker_is_waited_for() {
        let full = Answer::Refuse(ErrorCode::QueueFull);
        let fake = Fake::with_hives(&["a"]).worker("a", "w1", 0, &[full, full, Answer::Tokens(1)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the third try succeeds");
        assert_eq!(fake.calls().len(), 3);
        assert_eq!(tokens(&events), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_stays_full_makes_the_job_busy() {
        let fake =
            Fake::with_hives(&["a"]).worker("a", "w1", 0, &[Answer::Refuse(ErrorCode::QueueFull)]);
        let (result, _) = run_job(&fake, None).await;
        assert_eq!(code(result), ErrorCode::Busy);
        assert_eq!(fake.calls().len(), BUSY_WAITS as usize + 1);
    }

    #[tokio::test]
    async fn a_request_the_worker_refuses_is_not_retried() {
        for (refusal, want) in [
            (ErrorCode::ContextOverflow, ErrorCode::ContextOverflow),
            (ErrorCode::InvalidRequest, ErrorCode::InvalidRequest),
            (ErrorCode::Internal, ErrorCode::InferenceFailed),
        ] {
            let fake = Fake::with_hives(&["a"])
                .worker("a", "w1", 0, &[Answer::Refuse(refusal)])
                .worker("a", "w2", 1, &[Answer::Tokens(1)]);
            let (result, _) = run_job(&fake, None).await;
            assert_eq!(code(result), want, "{refusal}");
            assert_eq!(fake.calls(), ["infer http://w1"], "{refusal}");
        }
    }

    #[tokio::test]
    async fn an_unknown_node_is_named_with_the_registered_ones() {
        let fake = Fake::with_hives(&["one", "two"]);
        let (result, _) = run_job(&fake, Some("nowhere")).await;
        let e = result.expect_err("the job fails");
        assert_eq!(e.code, ErrorCode::UnknownNode);
        assert!(
            e.message.contains("no hive named nowhere") && e.message.contains("one, two"),
            "{}",
            e.message
        );
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn a_job_runs_only_on_the_node_it_names() {
        let fake = Fake::with_hives(&["one", "two"])
            .worker("one", "w-one", 0, &[Answer::Tokens(1)])
            .worker("two", "w-two", 3, &[Answer::Tokens(1)]);
        let (result, _) = run_job(&fake, Some("two")).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["infer http://w-two"]);
    }

    #[tokio::test]
    async fn unreachable_hives_are_hive_unreachable_naming_each() {
        let mut fake = Fake::with_hives(&["one", "two"]);
        fake.down = vec!["one".into(), "two".into()];
        let (result, _) = run_job(&fake, None).await;
        let e = result.expect_err("the job fails");
        assert_eq!(e.code, ErrorCode::HiveUnreachable);
        for name in ["hive one at http://one:8080", "hive two at http://two:8080"] {
            assert!(e.message.contains(name), "{}", e.message);
        }
    }

    #[tokio::test]
    async fn a_hive_that_is_down_is_skipped_when_another_answers() {
        let mut fake = Fake::with_hives(&["one", "two"])
            .worker("one", "w-one", 0, &[Answer::Tokens(1)])
            .worker("two", "w-two", 2, &[Answer::Tokens(1)]);
        fake.down = vec!["one".into()];
        let (result, events) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["infer http://w-two"]);
        assert!(narrated(&events, "skip_hive"));
    }

    #[tokio::test]
    async fn a_model_no_hive_can_find_is_model_not_found() {
        let fake = Fake {
            hives: vec![hive("a")],
            ..Fake::default()
        };
        let (result, _) = run_job(&fake, None).await;
        assert_eq!(code(result), ErrorCode::ModelNotFound);
        assert_eq!(fake.calls(), ["download a"]);
    }

    #[tokio::test]
    async fn a_model_on_no_hive_is_fetched_then_a_worker_spawned_and_loaded() {
        let fake = Fake {
            hives: vec![hive("a")],
            fetchable: vec![MODEL.into()],
            ..Fake::default()
        };
        let (result, events) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(
            fake.calls(),
            ["download a", "spawn a smollm", "infer http://new"]
        );
        // The user sees the download, then the loading, then the tokens.
        let position = |what: fn(&JobEvent) -> bool| {
            events.iter().position(what).expect("the event is relayed")
        };
        let downloaded = position(|e| {
            matches!(
                e,
                JobEvent::Cluster(ClusterEvent::Download(DownloadEvent::Complete { .. }))
            )
        });
        let loaded = position(|e| {
            matches!(
                e,
                JobEvent::Cluster(ClusterEvent::Loading(LoadingEvent::Ready))
            )
        });
        let first_token =
            position(|e| matches!(e, JobEvent::Inference(InferenceEvent::Token { .. })));
        assert!(downloaded < loaded && loaded < first_token, "{events:?}");
    }

    #[tokio::test]
    async fn a_model_in_a_catalog_is_not_fetched_again() {
        let fake = Fake::with_hives(&["a", "b"]);
        fake.lock().catalog.retain(|(h, _)| h == "b");
        let (result, _) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["spawn b smollm", "infer http://new"]);
    }

    #[tokio::test]
    async fn with_no_hive_registered_the_local_one_is_started() {
        let fake = Fake::default();
        let job = Jobs::default().create();
        let hives = candidates(&fake, &job, None).await.expect("a hive");
        assert_eq!(hives, [hive(LOCALHOST)]);
        let hives = candidates(&fake, &job, Some(LOCALHOST))
            .await
            .expect("a hive");
        assert_eq!(hives, [hive(LOCALHOST)]);
        assert_eq!(fake.calls(), ["start local", "start local"]);
    }

    #[tokio::test]
    async fn the_openai_front_reuses_a_ready_worker_without_narrating_a_job() {
        let fake = Fake::with_hives(&["a"]).worker("a", "w1", 0, &[Answer::Tokens(1)]);
        let job = Jobs::default().create();
        let target = worker_for(&fake, &job, MODEL).await.expect("a worker");
        assert_eq!(target.worker_id, "w1");
        assert!(fake.calls().is_empty(), "no inference is sent for it");
    }
}
