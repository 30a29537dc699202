//! The job table: each job's events, kept from the moment the job starts so a
//! client that attaches late misses nothing, and its cancellation.

use crate::http::sse;
use crate::protocol::{
    now_rfc3339, ApiError, ClusterEvent, ErrorCode, InferenceEvent, JobEvent, JobState, JobSummary,
};
use hyper::body::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long a finished job's events stay for a client to read.
const KEEP_FINISHED: Duration = Duration::from_secs(600);

pub struct Job {
    pub id: String,
    /// When it arrived: its age, and its time to first token.
    pub created: Instant,
    /// What the status page shows of it.
    summary: Mutex<JobSummary>,
    /// Every SSE frame so far, `[DONE]` last once finished.
    frames: Mutex<Vec<Bytes>>,
    /// Their bytes, together.
    frame_bytes: std::sync::atomic::AtomicUsize,
    /// The number of frames, for streams waiting on new ones.
    count: watch::Sender<usize>,
    /// Set when the job has ended, either way.
    finished: watch::Sender<Option<Instant>>,
    cancelled: watch::Sender<bool>,
    /// Where its inference events also go, typed, for a reader in this
    /// process (the OpenAI front); a reader that has gone cancels the job.
    tap: Mutex<Option<mpsc::UnboundedSender<InferenceEvent>>>,
    /// The client key it came with, whose tokens it counts.
    key: Mutex<Option<String>>,
}

impl Job {
    fn new(id: String) -> Job {
        Job {
            summary: Mutex::new(JobSummary {
                job_id: id.clone(),
                model: String::new(),
                state: JobState::Running,
                hive: None,
                worker: None,
                tokens: 0,
                started_at: now_rfc3339(),
                seconds: 0.0,
                error: None,
            }),
            created: Instant::now(),
            id,
            frames: Mutex::default(),
            frame_bytes: Default::default(),
            count: watch::channel(0).0,
            finished: watch::channel(None).0,
            cancelled: watch::channel(false).0,
            tap: Mutex::default(),
            key: Mutex::default(),
        }
    }

    /// The client key it came with, if any.
    pub fn for_key(&self, key: Option<String>) {
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = key;
    }

    pub fn key(&self) -> Option<String> {
        self.key.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn push(&self, event: &JobEvent) {
        self.push_frame(sse::event(event));
        if let JobEvent::Inference(InferenceEvent::Token { ids, .. }) = event {
            self.edit(|s| s.tokens += ids.len().max(1) as u32);
        }
        if let JobEvent::Inference(e) = event {
            let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
            if tap.as_ref().is_some_and(|t| t.send(e.clone()).is_err()) {
                *tap = None;
                drop(tap);
                self.cancel();
            }
        }
    }

    /// The job's inference events from now on, as they are pushed; the
    /// channel closes when the job finishes. Dropping the receiver cancels
    /// the job at its next event.
    pub fn tap(&self) -> mpsc::UnboundedReceiver<InferenceEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tap.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn push_frame(&self, frame: Bytes) {
        use std::sync::atomic::Ordering::Relaxed;
        self.frame_bytes.fetch_add(frame.len(), Relaxed);
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        frames.push(frame);
        self.count.send_replace(frames.len());
    }

    /// A narration line on the job stream.
    pub fn narrate(&self, actor: &str, action: &str, human: impl Into<String>) {
        let human = human.into();
        tracing::info!("{}: [{actor}] {human}", self.id);
        self.push(&JobEvent::Cluster(ClusterEvent::Narration {
            actor: actor.into(),
            action: action.into(),
            human,
        }));
    }

    fn edit(&self, f: impl FnOnce(&mut JobSummary)) {
        f(&mut self.summary.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The model it asks for, as asked.
    pub fn describe(&self, model: &str) {
        self.edit(|s| s.model = model.to_string());
    }

    /// The worker it runs on now.
    pub fn serving(&self, hive: &str, worker: &str) {
        self.edit(|s| {
            s.hive = Some(hive.to_string());
            s.worker = Some(worker.to_string());
        });
    }

    /// What the status page shows of it now.
    pub fn summary(&self) -> JobSummary {
        let mut s = self
            .summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if s.state == JobState::Running {
            s.seconds = self.created.elapsed().as_secs_f64();
        }
        s
    }

    pub fn fail(&self, e: ApiError) {
        tracing::warn!("{}: {}: {}", self.id, e.code, e.message);
        self.edit(|s| {
            s.state = if e.code == ErrorCode::Cancelled {
                JobState::Cancelled
            } else {
                JobState::Failed
            };
            s.error = Some(e.message.clone());
        });
        self.push(&JobEvent::Inference(e.into()));
    }

    /// Ends the stream with `[DONE]`; nothing is pushed after this.
    pub fn finish(&self) {
        self.tap.lock().unwrap_or_else(|p| p.into_inner()).take();
        let seconds = self.created.elapsed().as_secs_f64();
        self.edit(|s| {
            if s.state == JobState::Running {
                s.state = JobState::Done;
            }
            s.seconds = seconds;
        });
        self.push_frame(Bytes::from_static(sse::DONE));
        self.finished.send_replace(Some(Instant::now()));
    }

    /// What keeping it takes, about: its frames and the job itself.
    fn kept_bytes(&self) -> usize {
        self.frame_bytes.load(std::sync::atomic::Ordering::Relaxed) + JOB_BYTES
    }

    pub fn is_finished(&self) -> bool {
        self.finished.borrow().is_some()
    }

    pub fn cancel(&self) {
        self.cancelled.send_replace(true);
    }

    /// Resolves once the job is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.cancelled.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Every event pushed so far, read back: what a client of the job stream sees.
    #[cfg(test)]
    pub fn events(&self) -> Vec<JobEvent> {
        let frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let mut decoder = sse::Decoder::new();
        frames
            .iter()
            .flat_map(|f| decoder.push(f))
            .filter_map(|f| match f {
                sse::Frame::Data(d) => serde_json::from_str(&d).ok(),
                sse::Frame::Done => None,
            })
            .collect()
    }

    /// Sends every frame, from the first, into `tx` until `[DONE]`; returns false
    /// if the client left first.
    pub async fn replay(&self, tx: &tokio::sync::mpsc::Sender<Bytes>) -> bool {
        let mut count = self.count.subscribe();
        let mut sent = 0;
        loop {
            let pending: Vec<Bytes> = {
                let frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
                frames[sent..].to_vec()
            };
            for frame in pending {
                let done = frame == sse::DONE;
                if tx.send(frame).await.is_err() {
                    return false;
                }
                sent += 1;
                if done {
                    return true;
                }
            }
            tokio::select! {
                changed = count.changed() => if changed.is_err() { return true },
                () = tx.closed() => return false,
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct Jobs {
    jobs: Arc<Mutex<Table>>,
}

/// The jobs by id, and when finished ones were last forgotten.
#[derive(Default)]
struct Table {
    by_id: HashMap<String, Arc<Job>>,
    pruned: Option<Instant>,
}

/// How often the table is swept for jobs to forget: creating a job stays
/// O(1) however many the queen keeps (a sweep looks at them all).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// The most finished jobs kept (their streams replayable) however recent:
/// at hundreds of jobs a second, [`KEEP_FINISHED`] alone would keep hundreds
/// of thousands.
const MAX_FINISHED: usize = 10_000;
/// The most memory finished jobs are kept in, newest first: a job's stream
/// holds every token it sent (one of 500 tokens, ~75 kB), so a count alone
/// would let ten thousand long answers hold most of a gigabyte.
const MAX_FINISHED_BYTES: usize = 32 << 20;
/// A job's own share beside its frames: the table's entry, its summary, its
/// channels.
const JOB_BYTES: usize = 2 << 10;

impl Jobs {
    pub fn create(&self) -> Arc<Job> {
        let job = Arc::new(Job::new(crate::protocol::new_id("job")));
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            jobs.pruned = Some(Instant::now());
            prune(&mut jobs.by_id);
        }
        jobs.by_id.insert(job.id.clone(), job.clone());
        job
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(id)
            .cloned()
    }

    /// Running jobs, then the `recent` last finished ones, newest first.
    pub fn summaries(&self, recent: usize) -> Vec<JobSummary> {
        let mut jobs: Vec<Arc<Job>> = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .values()
            .cloned()
            .collect();
        jobs.sort_by_key(|j| (j.is_finished(), std::cmp::Reverse(j.created)));
        let running = jobs.iter().filter(|j| !j.is_finished()).count();
        jobs.iter()
            .take(running + recent)
            .map(|j| j.summary())
            .collect()
    }

    /// Cancels every job that is still running (the queen is stopping).
    pub fn cancel_all(&self) {
        for job in self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .values()
        {
            job.cancel();
        }
    }
}

/// Forgets jobs that finished more than [`KEEP_FINISHED`] ago, and the
/// oldest finished ones past [`MAX_FINISHED`] or [`MAX_FINISHED_BYTES`];
/// running jobs stay.
fn prune(jobs: &mut HashMap<String, Arc<Job>>) {
    jobs.retain(|_, j| {
        j.finished
            .borrow()
            .is_none_or(|at| at.elapsed() < KEEP_FINISHED)
    });
    let mut finished: Vec<(Instant, &String, usize)> = jobs
        .iter()
        .filter_map(|(id, j)| j.finished.borrow().map(|at| (at, id, j.kept_bytes())))
        .collect();
    // Newest first: the most recent are kept, within both caps.
    finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
    let mut kept = 0;
    let forget: Vec<String> = finished
        .iter()
        .enumerate()
        .filter(|(i, (_, _, bytes))| {
            kept += bytes;
            *i >= MAX_FINISHED || kept > MAX_FINISHED_BYTES
        })
        .map(|(_, (_, id, _))| (*id).clone())
        .collect();
    for id in forget {
        jobs.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn finished_jobs_are_kept_ten_minutes_but_never_more_than_the_cap() {
        let jobs = Jobs::default();
        let running = jobs.create();
        for _ in 0..MAX_FINISHED + 5 {
            jobs.create().finish();
        }
        let mut table = jobs.jobs.lock().unwrap();
        prune(&mut table.by_id);
        assert_eq!(
            table.by_id.len(),
            MAX_FINISHED + 1,
            "the cap, and the running one"
        );
        assert!(table.by_id.contains_key(&running.id));
    }

    #[test]
    fn finished_jobs_are_kept_within_a_memory_budget_newest_first() {
        let jobs = Jobs::default();
        let megabyte = "x".repeat(1 << 20);
        for _ in 0..40 {
            let job = jobs.create();
            job.narrate("worker", "token", megabyte.clone());
            job.finish();
        }
        let newest = jobs.create();
        newest.narrate("worker", "token", "a short answer");
        newest.finish();
        let mut table = jobs.jobs.lock().unwrap();
        prune(&mut table.by_id);
        let kept: usize = table.by_id.values().map(|j| j.kept_bytes()).sum();
        assert!(kept <= MAX_FINISHED_BYTES, "{kept}");
        assert_eq!(
            table.by_id.len(),
            1 + 31,
            "the short one and 31 of about 1 MiB"
        );
        assert!(table.by_id.contains_key(&newest.id));
    }

    #[tokio::test]
    async fn a_tap_gets_the_inference_events_and_a_reader_that_left_cancels_the_job() {
        let job = Jobs::default().create();
        let mut tap = job.tap();
        job.narrate("queen", "reuse", "using worker w1");
        let token = InferenceEvent::Token {
            t: "hi".into(),
            i: 0,
            ids: vec![7],
            logprobs: vec![],
        };
        job.push(&JobEvent::Inference(token.clone()));
        assert_eq!(
            tap.recv().await,
            Some(token.clone()),
            "narration is not tapped"
        );
        drop(tap);
        assert!(!*job.cancelled.borrow());
        job.push(&JobEvent::Inference(token));
        assert!(
            *job.cancelled.borrow(),
            "the reader left: the job is cancelled"
        );

        let job = Jobs::default().create();
        let mut tap = job.tap();
        job.fail(ApiError::new(ErrorCode::WorkerLost, "gone"));
        job.finish();
        assert!(matches!(
            tap.recv().await,
            Some(InferenceEvent::Error { .. })
        ));
        assert_eq!(tap.recv().await, None, "a finished job closes its tap");
    }
}
