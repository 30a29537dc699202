//! Running one job: pick hives, route to a ready worker or provision one
//! (place, make room, fetch, spawn, load), then relay the worker's tokens
//! into the job stream. Every step narrates on the job stream.
//!
//! Decisions come from the live view through [`super::placement`]; nothing
//! here asks a hive anything to route a job. The cluster comes in through
//! [`Cluster`], so each rule below is tested against a fake one (see the
//! tests at the end); the hives a job may use come from [`super::hives`]. The
//! rules as they stand: see `placement.rs` for where a
//! request and a new worker go; a lost worker is excluded and the job
//! continued on another from the tokens already sent (up to [`MAX_LOSSES`]
//! workers); a full worker is waited for ([`BUSY_WAITS`] times) before `BUSY`.

use super::affinity::prefix_hashes;
use super::cluster::Cluster;
use super::hives;
use super::jobs::Job;
use super::placement::{self, Allowed, Route};
use super::provision;
use super::view::{InFlight, POISON_WINDOW};
use crate::protocol::{
    ApiError, EmbeddingsRequest, ErrorCode, InferenceEvent, InferenceRequest, JobEvent, JobFigures,
    JobRequest, StopReason,
};
use std::time::Duration;

pub use super::placement::Target;

/// How many times a job waits for a full worker before giving up with `BUSY`.
const BUSY_WAITS: u32 = 50;
/// How long each of those waits is.
const BUSY_PAUSE: Duration = Duration::from_millis(200);

/// What a job asks for: a model, perhaps a hive, and the inference (prompt
/// or chat messages, sampling) every worker that takes part is sent.
#[derive(Debug, Clone)]
pub struct Work {
    pub node: Option<String>,
    pub model: String,
    pub inference: InferenceRequest,
}

impl From<JobRequest> for Work {
    fn from(req: JobRequest) -> Work {
        Work {
            node: req.node,
            model: req.model,
            inference: InferenceRequest {
                prompt: req.prompt,
                messages: req.messages,
                constraint: req.constraint,
                sampling: req.sampling,
                cache_prompt: req.cache_prompt,
                ..InferenceRequest::default()
            },
        }
    }
}

impl Work {
    /// What identifies the request whatever job carries it: the model and
    /// everything the worker is sent, for refusing one that crashed a worker.
    fn content_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.model.hash(&mut hasher);
        serde_json::to_string(&self.inference)
            .unwrap_or_default()
            .hash(&mut hasher);
        hasher.finish()
    }
}

/// What a request's prompt starts with, for routing it to the worker that
/// holds its conversation: the messages in order, or the prompt.
fn prefix_text(req: &InferenceRequest) -> String {
    match &req.messages {
        Some(messages) => messages
            .iter()
            .map(|m| format!("{}\n{}\n", m.role, m.content))
            .collect(),
        None => req.prompt.clone(),
    }
}

/// Runs a job to its end: a worker, the inference relayed, and what follows a
/// failed attempt as [`Attempts::decide`] rules. A worker lost mid-answer is
/// replaced: the next one gets the tokens streamed so far and continues
/// after them (DESIGN.md §11).
pub async fn run(cluster: &impl Cluster, job: &Job, work: &Work) -> Result<(), ApiError> {
    let content = work.content_hash();
    if let Some(ago) = cluster.view().poisoned(content) {
        return Err(ApiError::new(
            ErrorCode::RequestCrashedWorker,
            format!(
                "this request crashed a worker {} s ago; the same request is refused for \
                 another {} s",
                ago.as_secs(),
                POISON_WINDOW.saturating_sub(ago).as_secs()
            ),
        ));
    }
    let hives = hives::candidates(cluster, job, work.node.as_deref()).await?;
    let prefix = prefix_hashes(&prefix_text(&work.inference));
    let mut attempts = Attempts::default();
    let mut sent = Sent::default();
    loop {
        let picked = pick_worker(
            cluster,
            &hives,
            job,
            &work.model,
            &prefix,
            &attempts.excluded,
        )
        .await;
        let (target, in_flight) = picked.map_err(|e| attempts.nobody_left(e))?;
        cluster.view().remember(&prefix, &target.url);
        job.serving(&target.hive.name, &target.worker_id);
        let streamed = sent.events;
        let mut outcome = relay(cluster, &target, job, &work.inference, &mut sent).await;
        // Lost before its first token, the newest request its worker had, and
        // the worker died of a fault: this request is the likely cause.
        if matches!(outcome, Err(Relay::Lost))
            && sent.events == streamed
            && in_flight.newest()
            && cluster.view().crashed(&target.hive.name, &target.url).await
        {
            outcome = Err(Relay::Crashed);
        }
        drop(in_flight);
        match attempts.decide(outcome, &target) {
            Decision::Finished(result) => return result,
            Decision::Poisoned(e) => {
                cluster.metrics().poison_request();
                cluster.view().poison(content);
                job.narrate("queen", "poison", e.message.clone());
                return Err(e);
            }
            Decision::WaitBusy => tokio::time::sleep(BUSY_PAUSE).await,
            Decision::Failover => {
                cluster.metrics().failover();
                job.narrate(
                    "queen",
                    "failover",
                    format!(
                        "worker {} on hive {} was lost after {} tokens; continuing on another worker",
                        target.worker_id,
                        target.hive.name,
                        sent.ids.len()
                    ),
                );
            }
        }
    }
}

/// Embeddings for `req` from a worker of the job's model, routed or
/// provisioned as an inference would be (no failover: the request is short
/// and the client can send it again).
pub async fn embed(
    cluster: &impl Cluster,
    job: &Job,
    work: &Work,
    req: &EmbeddingsRequest,
) -> Result<serde_json::Value, ApiError> {
    let hives = hives::candidates(cluster, job, work.node.as_deref()).await?;
    let (target, in_flight) = pick_worker(cluster, &hives, job, &work.model, &[], &[]).await?;
    job.serving(&target.hive.name, &target.worker_id);
    let answer = cluster.embed(&target.hive, &target.url, req).await;
    drop(in_flight);
    answer
}

/// A ready worker of `work.model`, routed to or provisioned as a job's would
/// be, with nothing sent to it (Ollama's load without a prompt).
pub async fn load(cluster: &impl Cluster, job: &Job, work: &Work) -> Result<Target, ApiError> {
    let hives = hives::candidates(cluster, job, work.node.as_deref()).await?;
    let (target, _in_flight) = pick_worker(cluster, &hives, job, &work.model, &[], &[]).await?;
    Ok(target)
}

/// How many workers one job may lose before it fails.
const MAX_LOSSES: usize = 3;

/// What the client has been sent so far, across the workers a job used.
#[derive(Debug, Default)]
struct Sent {
    /// The `started` event went out (one per job, whichever worker sent it).
    started: bool,
    /// The generated tokens behind the text sent: what a failover resumes from.
    ids: Vec<i32>,
    /// Token events sent: where the next worker's `i` count starts.
    events: u32,
    /// When the first token went out, from the job's creation.
    first_token_ms: u64,
}

impl Sent {
    /// The queen's part of the `end` event: who answered, how soon.
    /// The `end`'s figures; `decoded`: the tokens the last worker generated.
    fn figures(&self, target: &Target, decoded: u32) -> Option<JobFigures> {
        Some(JobFigures {
            hive: target.hive.name.clone(),
            worker: target.worker_id.clone(),
            time_to_first_token_ms: self.first_token_ms,
            decoded_tokens: Some(decoded),
        })
    }
}

/// How an attempt at inference ended, when it did not succeed.
#[derive(Debug)]
enum Relay {
    /// The worker vanished mid-stream.
    Lost,
    /// The worker died of a fault before this request's first token, with
    /// no request sent to it after this one.
    Crashed,
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
    /// Continue on another worker; the lost one is excluded.
    Failover,
    /// The request crashed its worker: it goes to no other, and ends with this.
    Poisoned(ApiError),
}

/// The job's attempts so far: the memory its retry rules need.
#[derive(Debug, Default)]
struct Attempts {
    /// Workers (by URL) lost during this job: never picked again for it.
    excluded: Vec<String>,
    /// The lost workers, in words, for the error when none is left.
    lost: Vec<String>,
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
            Err(Relay::Crashed) => Decision::Poisoned(ApiError::new(
                ErrorCode::RequestCrashedWorker,
                format!(
                    "this request crashed worker {} on hive {} before its first token; it \
                     is not sent to another worker, and the same request is refused for {} \
                     minutes",
                    target.worker_id,
                    target.hive.name,
                    POISON_WINDOW.as_secs() / 60
                ),
            )),
            Err(Relay::Lost) => {
                self.excluded.push(target.url.clone());
                self.lost.push(format!(
                    "worker {} on hive {}",
                    target.worker_id, target.hive.name
                ));
                if self.lost.len() < MAX_LOSSES {
                    Decision::Failover
                } else {
                    Decision::Finished(Err(ApiError::new(
                        ErrorCode::WorkerLost,
                        format!(
                            "lost {}, one after another; giving up",
                            self.lost.join(", ")
                        ),
                    )))
                }
            }
        }
    }

    /// No worker could be had: after a loss, the error says what was tried.
    fn nobody_left(&self, e: ApiError) -> ApiError {
        if self.lost.is_empty() {
            return e;
        }
        ApiError::new(
            ErrorCode::WorkerLost,
            format!(
                "lost {}, and no other worker could take over: {e}",
                self.lost.join(", ")
            ),
        )
    }
}

/// A worker for the request, counted in flight: routed from the view, or
/// provisioned (one provisioning per model at a time; requests that waited
/// for it route again first).
async fn pick_worker(
    cluster: &impl Cluster,
    hives: &Allowed,
    job: &Job,
    model: &str,
    prefix: &[u64],
    excluded: &[String],
) -> Result<(Target, InFlight), ApiError> {
    let view = cluster.view();
    if let Route::To(t) = route(cluster, hives, model, prefix, excluded) {
        return Ok(reuse(cluster, job, t));
    }
    let _one_at_a_time = view.provisioning(model).await;
    if let Route::To(t) = route(cluster, hives, model, prefix, excluded) {
        return Ok(reuse(cluster, job, t));
    }
    let target = provision::provision(cluster, hives, job, model).await?;
    let in_flight = view.begin(&target.url);
    Ok((target, in_flight))
}

fn route(
    cluster: &impl Cluster,
    hives: &Allowed,
    model: &str,
    prefix: &[u64],
    excluded: &[String],
) -> Route {
    let view = cluster.view();
    let preferred = view.affinity(prefix);
    placement::route(&view.state(), model, hives, preferred.as_deref(), excluded)
}

fn reuse(cluster: &impl Cluster, job: &Job, t: Target) -> (Target, InFlight) {
    job.narrate(
        "queen",
        "reuse",
        format!("using worker {} on hive {}", t.worker_id, t.hive.name),
    );
    let in_flight = cluster.view().begin(&t.url);
    (t, in_flight)
}

/// Sends the inference to the worker and relays its events into the job. After
/// a failover the request carries the tokens sent so far and asks only for the
/// rest; the events continue the stream as if one worker had answered.
async fn relay(
    cluster: &impl Cluster,
    target: &Target,
    job: &Job,
    inference: &InferenceRequest,
    sent: &mut Sent,
) -> Result<(), Relay> {
    let resumed = sent.ids.len() as u32;
    if inference
        .sampling
        .max_tokens
        .is_some_and(|n| n <= i64::from(resumed))
    {
        // Every token asked for went out before the loss; only `end` did not.
        job.push(&JobEvent::Inference(InferenceEvent::End {
            tokens_out: resumed,
            decode_time_ms: 0,
            stop_reason: StopReason::MaxTokens,
            cached_tokens: 0,
            ids: Vec::new(),
            figures: sent.figures(target, 0),
        }));
        return Ok(());
    }
    let mut body = inference.clone();
    body.sampling.max_tokens = body
        .sampling
        .max_tokens
        .map(|n| (n - i64::from(resumed)).max(1));
    body.job_id = Some(job.id.clone());
    body.resume_tokens = sent.ids.clone();
    let mut events = cluster
        .infer(&target.hive, &target.url, &body)
        .await
        .map_err(refused)?;
    let lost = cluster.view().worker_lost(&target.hive.name, &target.url);
    tokio::pin!(lost);
    let mut relaying = Relaying {
        first: sent.events,
        resumed,
        model: String::new(),
    };
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = &mut lost => None,
        };
        let Some(event) = event else {
            return Err(Relay::Lost);
        };
        // A worker that stops under the job (SIGTERM, its hive gone) cancels its
        // streams; that is a loss like any other. The queen's own cancel never
        // reaches here: it drops this relay.
        if matches!(
            event,
            InferenceEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            }
        ) {
            return Err(Relay::Lost);
        }
        let Some(event) = relaying.event(event, cluster, target, job, sent) else {
            continue;
        };
        let terminal = matches!(
            event,
            InferenceEvent::End { .. } | InferenceEvent::Error { .. }
        );
        job.push(&JobEvent::Inference(event));
        if terminal {
            return Ok(());
        }
    }
}

/// One worker's events becoming the job's: numbered on from what earlier
/// workers sent, counted in the metrics and the key's use.
struct Relaying {
    /// Events the job had before this worker.
    first: u32,
    /// Tokens the job had before this worker.
    resumed: u32,
    /// The worker's own name for its model: what the metrics are labelled with.
    model: String,
}

impl Relaying {
    /// The job's event for the worker's `event`; `None` for one the client
    /// has had already (a failover's `started`).
    fn event(
        &mut self,
        event: InferenceEvent,
        cluster: &impl Cluster,
        target: &Target,
        job: &Job,
        sent: &mut Sent,
    ) -> Option<InferenceEvent> {
        Some(match event {
            // One `started` per job: a failover's is not news to the client.
            InferenceEvent::Started { model, .. } if sent.started => {
                self.model = model;
                return None;
            }
            InferenceEvent::Started { ref model, .. } => {
                self.model = model.clone();
                sent.started = true;
                event
            }
            InferenceEvent::Token {
                t,
                i,
                ids,
                logprobs,
            } => {
                if self.first + i == 0 {
                    let ttft = job.created.elapsed();
                    sent.first_token_ms = ttft.as_millis() as u64;
                    cluster.metrics().first_token(&self.model, ttft);
                }
                sent.ids.extend(&ids);
                sent.events = self.first + i + 1;
                InferenceEvent::Token {
                    t,
                    i: self.first + i,
                    ids,
                    logprobs,
                }
            }
            InferenceEvent::End {
                tokens_out,
                decode_time_ms,
                stop_reason,
                cached_tokens,
                ids,
                ..
            } => {
                self.ended(cluster, target, job, tokens_out, decode_time_ms);
                InferenceEvent::End {
                    tokens_out: tokens_out + self.resumed,
                    decode_time_ms,
                    stop_reason,
                    cached_tokens,
                    ids,
                    figures: sent.figures(target, tokens_out),
                }
            }
            other => other,
        })
    }

    /// The answer's figures counted: the model's metrics, the key's tokens,
    /// the worker's rate.
    fn ended(
        &self,
        cluster: &impl Cluster,
        target: &Target,
        job: &Job,
        tokens_out: u32,
        decode_time_ms: u64,
    ) {
        cluster
            .metrics()
            .decoded(&self.model, tokens_out, decode_time_ms);
        if let Some(key) = job.key() {
            cluster.tokens_used(&key, u64::from(tokens_out));
        }
        if decode_time_ms > 0 {
            let rate = f64::from(tokens_out) * 1000.0 / decode_time_ms as f64;
            cluster.view().record_rate(&target.url, rate);
        }
    }
}

/// What a worker's refusal to start an inference means for the job.
fn refused(e: ApiError) -> Relay {
    match e.code {
        ErrorCode::QueueFull => Relay::Busy,
        ErrorCode::Unreachable => Relay::Lost,
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
    use crate::protocol::{
        ClusterEvent, DownloadEvent, DownloadStarted, DownloadState, LeaseInfo, LeaseRequest,
        LoadingEvent, SpawnRequest, StopReason, WorkerInfo, WorkerState,
    };
    use crate::queen::jobs::Jobs;
    use crate::queen::placement::fixtures::{self, hive as hive_view, model, worker};
    use crate::queen::registry::{HiveConn, LOCALHOST};
    use crate::queen::view::View;
    use std::collections::HashMap;
    use std::sync::Mutex;

    const MODEL: &str = "smollm";

    /// What a fake worker does with its n-th inference request (the last one repeats).
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        /// n tokens, then `end`.
        Tokens(u32),
        /// n tokens, then the connection drops.
        LostAfter(u32),
        /// n tokens, then the worker stops under the job (SIGTERM, its hive
        /// gone) and cancels its streams, as a worker does.
        StoppedAfter(u32),
        /// The connection drops before a token, and its hive says it crashed.
        Crash,
        /// Refused before any event.
        Refuse(ErrorCode),
    }

    /// A cluster whose view the test sets, and that records what was asked of it.
    #[derive(Default)]
    struct Fake {
        view: View,
        metrics: crate::metrics::QueenMetrics,
        /// Models a hive can fetch (any hive).
        fetchable: Vec<String>,
        /// Each worker's (by URL) script and how far it got.
        scripts: Mutex<HashMap<String, (Vec<Answer>, usize)>>,
        /// What was asked, in order: `infer w1`, `spawn a`, `download a`, `start local`.
        calls: Mutex<Vec<String>>,
    }

    fn hive(name: &str) -> HiveConn {
        fixtures::conn(name)
    }

    impl Fake {
        /// Hives by name, each with the model in its catalog and room for it.
        fn with_hives(names: &[&str]) -> Fake {
            let fake = Fake::default();
            for n in names {
                fake.view
                    .put(hive_view(n, 9000, vec![model(MODEL, 800)], vec![]));
            }
            fake
        }

        /// A ready worker on `hive`, `busy` requests in flight, answering by `script`.
        fn worker(self, hive: &str, id: &str, busy: u32, script: &[Answer]) -> Fake {
            self.view
                .edit(hive, |s| s.workers.push(worker(id, MODEL, 800)));
            let url = format!("http://{id}");
            for _ in 0..busy {
                std::mem::forget(self.view.begin(&url));
            }
            self.scripts
                .lock()
                .unwrap()
                .insert(url, (script.to_vec(), 0));
            self
        }

        fn down(self, name: &str) -> Fake {
            let mut h = std::sync::Arc::unwrap_or_clone(self.view.hive(name).expect("a hive"));
            h.reachable = false;
            h.error = Some("connection refused".into());
            self.view.put(h);
            self
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn call(&self, what: String) {
            self.calls.lock().unwrap().push(what);
        }
    }

    impl Cluster for Fake {
        fn view(&self) -> &View {
            &self.view
        }

        fn metrics(&self) -> &crate::metrics::QueenMetrics {
            &self.metrics
        }

        async fn local_hive(&self, _job: &Job) -> Result<HiveConn, ApiError> {
            self.call("start local".into());
            self.view.put(hive_view(LOCALHOST, 9000, vec![], vec![]));
            Ok(hive(LOCALHOST))
        }

        async fn download(
            &self,
            hive: &HiveConn,
            model_ref: &str,
        ) -> Result<DownloadStarted, ApiError> {
            self.call(format!("download {}", hive.name));
            if !self.fetchable.iter().any(|m| m == model_ref) {
                return Err(ApiError::new(ErrorCode::RepoNotFound, "no such repo"));
            }
            self.view
                .edit(&hive.name, |s| s.models.push(model(model_ref, 800)));
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
            let new = worker("new", &req.model_ref, 800);
            self.view.edit(&hive.name, |s| s.workers.push(new.clone()));
            self.scripts
                .lock()
                .unwrap()
                .insert(new.url.clone(), (vec![Answer::Tokens(2)], 0));
            Ok(WorkerInfo {
                state: WorkerState::Loading,
                ..new
            })
        }

        async fn lend(&self, hive: &HiveConn, req: &LeaseRequest) -> Result<LeaseInfo, ApiError> {
            self.call(format!("lend {} {}", hive.name, req.layers));
            Ok(LeaseInfo {
                lease: req.lease.clone(),
                model: req.model.clone(),
                borrower: req.borrower.clone(),
                layers: req.layers,
                memory_mb: req.memory_mb,
                connected: false,
                since: String::new(),
            })
        }

        async fn end_lease(&self, hive: &HiveConn, id: &str) -> Result<LeaseInfo, ApiError> {
            self.call(format!("end lease {}", hive.name));
            Err(ApiError::new(
                ErrorCode::LeaseNotFound,
                format!("no lease {id}"),
            ))
        }

        async fn stop_worker(&self, hive: &HiveConn, id: &str) -> Result<WorkerInfo, ApiError> {
            self.call(format!("stop {id}"));
            let mut stopped = None;
            self.view.edit(&hive.name, |s| {
                stopped = s
                    .workers
                    .iter()
                    .position(|w| w.worker_id == id)
                    .map(|i| s.workers.remove(i));
            });
            stopped.ok_or_else(|| ApiError::new(ErrorCode::WorkerNotFound, "no such worker"))
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

        async fn embed(
            &self,
            _hive: &HiveConn,
            worker: &str,
            _req: &EmbeddingsRequest,
        ) -> Result<serde_json::Value, ApiError> {
            self.call(format!("embed {worker}"));
            Ok(serde_json::json!({"object": "list"}))
        }

        async fn infer(
            &self,
            hive: &HiveConn,
            worker: &str,
            req: &InferenceRequest,
        ) -> Result<Events<InferenceEvent>, ApiError> {
            match req.resume_tokens.as_slice() {
                [] => self.call(format!("infer {worker}")),
                resume => self.call(format!("infer {worker} after {resume:?}")),
            }
            let mut scripts = self.scripts.lock().unwrap();
            let (script, asked) = scripts
                .get_mut(worker)
                .ok_or_else(|| ApiError::new(ErrorCode::Unreachable, "gone"))?;
            let answer = script[(*asked).min(script.len() - 1)];
            *asked += 1;
            let started = InferenceEvent::Started {
                job_id: "job".into(),
                model: MODEL.into(),
                started_at: String::new(),
                prompt_tokens: 4,
            };
            let tokens = |n: u32| {
                std::iter::once(started.clone()).chain((0..n).map(|i| InferenceEvent::Token {
                    logprobs: vec![],
                    t: "x".into(),
                    i,
                    ids: vec![100 + i as i32],
                }))
            };
            Ok(Events::from_events(match answer {
                Answer::Refuse(code) => return Err(ApiError::new(code, "refused")),
                Answer::LostAfter(n) => tokens(n).collect(),
                Answer::StoppedAfter(n) => tokens(n)
                    .chain([InferenceEvent::Error {
                        code: ErrorCode::Cancelled,
                        message: "the worker is shutting down".into(),
                    }])
                    .collect(),
                Answer::Crash => {
                    self.view.edit(&hive.name, |s| {
                        for w in s.workers.iter_mut().filter(|w| w.url == worker) {
                            w.state = WorkerState::Failed;
                            w.crashed = true;
                        }
                    });
                    tokens(0).collect()
                }
                Answer::Tokens(n) => tokens(n)
                    .chain([InferenceEvent::End {
                        tokens_out: n,
                        decode_time_ms: 1,
                        stop_reason: StopReason::MaxTokens,
                        cached_tokens: 0,
                        ids: Vec::new(),
                        figures: None,
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
        run_request(fake, job_request(node)).await
    }

    async fn run_request(fake: &Fake, req: JobRequest) -> (Result<(), ApiError>, Vec<JobEvent>) {
        let job = Jobs::default().create();
        let result = run(fake, &job, &req.into()).await;
        (result, job.events())
    }

    /// A model by its Hugging Face reference: what a hive can fetch.
    const HF_MODEL: &str = "hf:org/smollm";

    fn hf_request() -> JobRequest {
        JobRequest {
            model: HF_MODEL.into(),
            ..job_request(None)
        }
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
    async fn a_full_worker_queues_rather_than_share_its_cores_with_a_second() {
        let fake = Fake::with_hives(&["a"]).worker("a", "w-full", 4, &[Answer::Tokens(1)]);
        let (result, _) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["infer http://w-full"]);
    }

    #[tokio::test]
    async fn a_full_worker_gets_a_peer_on_a_hive_with_cores_of_its_own() {
        let fake = Fake::with_hives(&["a", "b"]).worker("a", "w-full", 4, &[Answer::Tokens(1)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["spawn b smollm", "infer http://new"]);
        assert!(narrated(&events, "place"));
    }

    #[tokio::test]
    async fn an_idle_worker_is_stopped_to_make_room_and_that_is_narrated() {
        let fake = Fake::with_hives(&[]);
        fake.view.put(hive_view(
            "a",
            1000,
            vec![model(MODEL, 800), model("other", 600)],
            vec![],
        ));
        let fake = fake;
        fake.view.edit("a", |s| {
            s.workers.push(worker("w-other", "other", 600));
            s.ram.used_mb = 600;
        });
        let (result, events) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(
            fake.calls(),
            ["stop w-other", "spawn a smollm", "infer http://new"]
        );
        assert!(narrated(&events, "evict"));
    }

    #[tokio::test]
    async fn a_model_that_fits_nowhere_is_insufficient_memory_and_nothing_is_stopped() {
        let fake = Fake::with_hives(&[]);
        fake.view
            .put(hive_view("a", 500, vec![model(MODEL, 800)], vec![]));
        let (result, _) = run_job(&fake, None).await;
        let e = result.expect_err("the job fails");
        assert_eq!(e.code, ErrorCode::InsufficientMemory);
        assert!(e.message.contains("needs 800 MB"), "{e}");
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn a_job_adds_no_call_to_any_hive_to_route() {
        let fake = Fake::with_hives(&["a", "b"]).worker("b", "w1", 0, &[Answer::Tokens(1)]);
        for _ in 0..3 {
            run_job(&fake, None).await.0.expect("the job succeeds");
        }
        // Only the inferences themselves: routing read the view.
        assert_eq!(fake.calls(), ["infer http://w1"; 3]);
    }

    // Paused time: the relay waits a moment for the hive to say how the worker ended.
    #[tokio::test(start_paused = true)]
    async fn a_worker_lost_before_its_first_token_is_excluded_and_the_job_continued() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::LostAfter(0)])
            .worker("a", "w2", 2, &[Answer::Tokens(3)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the failover succeeds");
        // w1 is still the least busy, but lost once it is never picked again.
        assert_eq!(fake.calls(), ["infer http://w1", "infer http://w2"]);
        assert_eq!(tokens(&events), 3);
        assert!(narrated(&events, "failover"));
    }

    #[tokio::test]
    async fn a_request_that_crashes_its_worker_before_a_token_goes_to_no_other() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::Crash])
            .worker("a", "w2", 1, &[Answer::Tokens(3)]);
        let (result, events) = run_job(&fake, None).await;
        let e = result.unwrap_err();
        assert_eq!(e.code, ErrorCode::RequestCrashedWorker);
        assert!(e.message.contains("crashed worker w1 on hive a"), "{e}");
        assert!(narrated(&events, "poison"));
        assert_eq!(fake.calls(), ["infer http://w1"], "not replayed on w2");
        // The same request again is refused without a worker; another is served.
        let (again, _) = run_job(&fake, None).await;
        assert_eq!(code(again), ErrorCode::RequestCrashedWorker);
        assert_eq!(fake.calls(), ["infer http://w1"]);
        let mut other = job_request(None);
        other.prompt = "Something else".into();
        run_request(&fake, other)
            .await
            .0
            .expect("another request is served");
        assert_eq!(fake.calls(), ["infer http://w1", "infer http://w2"]);
    }

    #[tokio::test]
    async fn a_worker_lost_after_tokens_is_continued_by_another_from_those_tokens() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::LostAfter(2)])
            .worker("a", "w2", 1, &[Answer::Tokens(3)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the failover succeeds");
        assert_eq!(
            fake.calls(),
            ["infer http://w1", "infer http://w2 after [100, 101]"]
        );
        // One stream: event numbers go on, one `started`, one `end` counting all.
        let numbers: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                JobEvent::Inference(InferenceEvent::Token { i, .. }) => Some(*i),
                _ => None,
            })
            .collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4]);
        let ends: Vec<(u32, Option<u32>)> = events
            .iter()
            .filter_map(|e| match e {
                JobEvent::Inference(InferenceEvent::End {
                    tokens_out,
                    figures,
                    ..
                }) => Some((*tokens_out, figures.as_ref().and_then(|f| f.decoded_tokens))),
                _ => None,
            })
            .collect();
        // The job's 5 tokens; the 3 the last worker generated in its decode time
        // (what a rate divides, not the job's).
        assert_eq!(ends, [(5, Some(3))]);
        let started =
            |e: &&JobEvent| matches!(e, JobEvent::Inference(InferenceEvent::Started { .. }));
        assert_eq!(
            events.iter().filter(started).count(),
            1,
            "one started per job"
        );
        assert!(narrated(&events, "failover"));
    }

    #[tokio::test]
    async fn a_worker_that_stops_under_the_job_is_a_loss_continued_by_another() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::StoppedAfter(2)])
            .worker("a", "w2", 1, &[Answer::Tokens(3)]);
        let (result, events) = run_job(&fake, None).await;
        result.expect("the failover succeeds");
        assert_eq!(
            fake.calls(),
            ["infer http://w1", "infer http://w2 after [100, 101]"]
        );
        let error = |e: &&JobEvent| matches!(e, JobEvent::Inference(InferenceEvent::Error { .. }));
        assert_eq!(events.iter().filter(error).count(), 0, "{events:?}");
        assert!(narrated(&events, "failover"));
    }

    #[tokio::test]
    async fn a_worker_lost_after_every_token_asked_for_is_not_replaced_just_ended() {
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[Answer::LostAfter(2)])
            .worker("a", "w2", 1, &[Answer::Tokens(3)]);
        let job = Jobs::default().create();
        let mut req = job_request(None);
        req.sampling.max_tokens = Some(2);
        run(&fake, &job, &req.into()).await.expect("the job ends");
        assert_eq!(
            fake.calls(),
            ["infer http://w1"],
            "nothing left to generate"
        );
        let ends: Vec<u32> = job
            .events()
            .iter()
            .filter_map(|e| match e {
                JobEvent::Inference(InferenceEvent::End { tokens_out, .. }) => Some(*tokens_out),
                _ => None,
            })
            .collect();
        assert_eq!(ends, [2]);
    }

    #[tokio::test]
    async fn a_job_goes_on_through_two_lost_workers_and_a_third_loss_names_all_three() {
        let lost = Answer::LostAfter(1);
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[lost])
            .worker("a", "w2", 1, &[lost])
            .worker("a", "w3", 2, &[Answer::Tokens(1)]);
        run_job(&fake, None)
            .await
            .0
            .expect("the third worker finishes");
        let fake = Fake::with_hives(&["a"])
            .worker("a", "w1", 0, &[lost])
            .worker("a", "w2", 1, &[lost])
            .worker("a", "w3", 2, &[lost])
            .worker("a", "w4", 3, &[Answer::Tokens(1)]);
        let e = run_job(&fake, None)
            .await
            .0
            .expect_err("three losses end it");
        assert_eq!(e.code, ErrorCode::WorkerLost);
        for w in ["w1", "w2", "w3"] {
            assert!(e.message.contains(w), "{}", e.message);
        }
    }

    #[tokio::test]
    async fn a_lost_worker_with_no_other_to_take_over_says_what_was_lost() {
        // Hive a has no room for another worker of the model.
        let fake = Fake::default();
        fake.view
            .put(hive_view("a", 500, vec![model(MODEL, 800)], vec![]));
        let fake = fake.worker("a", "w1", 0, &[Answer::LostAfter(2)]);
        let e = run_job(&fake, None).await.0.expect_err("nobody takes over");
        assert_eq!(e.code, ErrorCode::WorkerLost);
        assert!(
            e.message
                .contains("lost worker w1 on hive a, and no other worker could take over"),
            "{}",
            e.message
        );
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
        let fake = Fake::with_hives(&["one", "two"]).down("one").down("two");
        let (result, _) = run_job(&fake, None).await;
        let e = result.expect_err("the job fails");
        assert_eq!(e.code, ErrorCode::HiveUnreachable);
        for name in [
            "hive one at http://127.0.0.1:8080/one",
            "hive two at http://127.0.0.1:8080/two",
        ] {
            assert!(e.message.contains(name), "{}", e.message);
        }
    }

    #[tokio::test]
    async fn a_hive_that_is_down_is_skipped_when_another_answers() {
        let fake = Fake::with_hives(&["one", "two"])
            .worker("one", "w-one", 0, &[Answer::Tokens(1)])
            .worker("two", "w-two", 2, &[Answer::Tokens(1)])
            .down("one");
        let (result, events) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["infer http://w-two"]);
        assert!(narrated(&events, "skip_hive"));
    }

    #[tokio::test]
    async fn a_model_no_hive_can_find_is_model_not_found() {
        let fake = Fake::with_hives(&["a"]);
        fake.view.edit("a", |s| s.models.clear());
        let (result, _) = run_request(&fake, hf_request()).await;
        assert_eq!(code(result), ErrorCode::ModelNotFound);
        assert_eq!(fake.calls(), ["download a"]);
    }

    #[tokio::test]
    async fn a_mistyped_catalog_name_gets_the_closest_name_and_nothing_is_asked() {
        let fake = Fake::with_hives(&["a", "b"]);
        let (result, _) = run_request(
            &fake,
            JobRequest {
                model: "smolm".into(),
                ..job_request(None)
            },
        )
        .await;
        let e = result.expect_err("no such name");
        assert_eq!(e.code, ErrorCode::ModelNotFound);
        assert!(
            e.message.starts_with(
                "none of the hives (a, b) has a model named smolm; did you mean smollm?"
            ),
            "{}",
            e.message
        );
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
        // Asked of one hive, the error names that hive, and where the model is.
        fake.view.edit("a", |s| s.models.clear());
        let (result, _) = run_job(&fake, Some("a")).await;
        let e = result.expect_err("not on a");
        assert!(
            e.message
                .starts_with("hive a has no model named smollm; hive b has it"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn a_model_on_no_hive_is_fetched_then_a_worker_spawned_and_loaded() {
        let fake = Fake {
            fetchable: vec![HF_MODEL.into()],
            ..Fake::with_hives(&["a"])
        };
        fake.view.edit("a", |s| s.models.clear());
        let (result, events) = run_request(&fake, hf_request()).await;
        result.expect("the job succeeds");
        assert_eq!(
            fake.calls(),
            ["download a", "spawn a hf:org/smollm", "infer http://new"]
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
        fake.view.edit("a", |s| s.models.clear());
        let (result, _) = run_job(&fake, None).await;
        result.expect("the job succeeds");
        assert_eq!(fake.calls(), ["spawn b smollm", "infer http://new"]);
    }

    #[tokio::test]
    async fn with_no_hive_registered_the_local_one_is_started() {
        let fake = Fake::default();
        let job = Jobs::default().create();
        let hives = hives::candidates(&fake, &job, None).await.expect("a hive");
        assert_eq!(hives, Allowed::Any);
        assert!(fake.view.hive(LOCALHOST).is_some_and(|h| h.reachable));
        let hives = hives::candidates(&fake, &job, Some(LOCALHOST))
            .await
            .expect("a hive");
        assert_eq!(hives, Allowed::Only(vec![LOCALHOST.to_string()]));
        // Started once: the second job finds it up.
        assert_eq!(fake.calls(), ["start local"]);
    }
}
