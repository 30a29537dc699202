//! Typed clients for the hive's and the worker's APIs: one method per
//! endpoint, sending and reading only `protocol` types over `http::client`,
//! so no role builds another role's URLs or JSON by hand.
//!
//! Every method fails with an [`ApiError`]: the peer's own error as it sent
//! it, or `UNREACHABLE` when nobody answered. The caller knows what silence
//! means (a hive down, a worker lost), so the clients do not guess.

use crate::http::client::{self, Silent, SseStream};
use crate::http::segment;
use crate::http::sse::Frame;
use crate::protocol::{
    ApiError, DownloadEvent, DownloadRequest, DownloadStarted, Health, HiveSnapshot,
    InferenceEvent, InferenceRequest, KeepAliveRequest, LeaseInfo, LeaseRequest, LoadingEvent,
    ModelEntry, PartialsRemoved, ReadyStatus, SpawnRequest, WorkerInfo, WorkerReadyCallback,
};
use hyper::Method;
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use std::time::Duration;

/// A hive's API at its base URL, with the token it wants.
#[derive(Debug, Clone)]
pub struct HiveClient {
    url: String,
    token: Option<String>,
}

impl HiveClient {
    pub fn new(url: &str, token: Option<&str>) -> HiveClient {
        HiveClient {
            url: url.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
        }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health, ApiError> {
        client::get(&self.at("/v1/health"), self.token()).await
    }

    /// `GET /v1/models`: the catalog.
    pub async fn models(&self) -> Result<Vec<ModelEntry>, ApiError> {
        client::get(&self.at("/v1/models"), self.token()).await
    }

    /// `DELETE /v1/models/{name}`: the entry that was removed.
    pub async fn delete_model(&self, name: &str) -> Result<ModelEntry, ApiError> {
        let url = self.at(&format!("/v1/models/{}", segment(name)));
        client::call(Method::DELETE, &url, self.token(), None::<&()>).await
    }

    /// `PUT /v1/models/{name}/settings`: the entry with its new settings.
    pub async fn set_model_settings(
        &self,
        name: &str,
        settings: &crate::protocol::ModelSettings,
    ) -> Result<ModelEntry, ApiError> {
        let url = self.at(&format!("/v1/models/{}/settings", segment(name)));
        client::call(Method::PUT, &url, self.token(), Some(settings)).await
    }

    /// `DELETE /v1/models/download/partial`: the partial downloads removed.
    pub async fn remove_partials(&self) -> Result<PartialsRemoved, ApiError> {
        let url = self.at("/v1/models/download/partial");
        client::call(Method::DELETE, &url, self.token(), None::<&()>).await
    }

    /// `POST /v1/models/download`.
    pub async fn download(&self, model_ref: &str) -> Result<DownloadStarted, ApiError> {
        let body = DownloadRequest {
            model_ref: model_ref.to_string(),
        };
        client::post(&self.at("/v1/models/download"), self.token(), &body).await
    }

    /// `GET /v1/models/download/progress?id=`: the download's events.
    pub async fn download_progress(&self, id: &str) -> Result<Events<DownloadEvent>, ApiError> {
        let url = self.at(&format!("/v1/models/download/progress?id={id}"));
        Events::open(&url, self.token(), None::<&()>).await
    }

    /// `POST /v1/workers/spawn`: the new worker, still loading.
    pub async fn spawn(&self, req: &SpawnRequest) -> Result<WorkerInfo, ApiError> {
        client::post(&self.at("/v1/workers/spawn"), self.token(), req).await
    }

    /// `POST /v1/leases`: lend this hive's devices for a share of a split worker.
    pub async fn lend(&self, req: &LeaseRequest) -> Result<LeaseInfo, ApiError> {
        client::post(&self.at("/v1/leases"), self.token(), req).await
    }

    /// `DELETE /v1/leases/{id}`.
    pub async fn end_lease(&self, id: &str) -> Result<LeaseInfo, ApiError> {
        let url = self.at(&format!("/v1/leases/{id}"));
        client::call(Method::DELETE, &url, self.token(), None::<&()>).await
    }

    /// `GET /v1/workers/list`.
    /// `GET /v1/state/stream`: the hive's snapshots as they change.
    pub async fn state(&self) -> Result<Events<HiveSnapshot>, ApiError> {
        Events::open(&self.at("/v1/state/stream"), self.token(), None::<&()>).await
    }

    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ApiError> {
        client::get(&self.at("/v1/workers/list"), self.token()).await
    }

    /// `POST /v1/workers/{id}/shutdown`: the worker, now stopping.
    pub async fn stop_worker(&self, id: &str) -> Result<WorkerInfo, ApiError> {
        let url = self.at(&format!("/v1/workers/{id}/shutdown"));
        client::post(&url, self.token(), &()).await
    }

    /// `POST /v1/workers/{id}/keep-alive`: idle this long before it is stopped
    /// (`None`: until stopped).
    pub async fn keep_alive(&self, id: &str, seconds: Option<u64>) -> Result<WorkerInfo, ApiError> {
        let url = self.at(&format!("/v1/workers/{id}/keep-alive"));
        client::post(&url, self.token(), &KeepAliveRequest { seconds }).await
    }
}

/// A worker's report to its hive (`POST /v1/workers/ready`). The hive hands
/// the worker this URL whole (`--callback-url`), so it is no [`HiveClient`]
/// method: the worker never learns its hive's base URL.
pub async fn report_ready(
    callback_url: &str,
    token: Option<&str>,
    report: &WorkerReadyCallback,
) -> Result<WorkerInfo, ApiError> {
    client::post(callback_url, token, report).await
}

/// A worker's API at its base URL, with the token it wants.
#[derive(Debug, Clone)]
pub struct WorkerClient {
    url: String,
    token: Option<String>,
}

impl WorkerClient {
    pub fn new(url: &str, token: Option<&str>) -> WorkerClient {
        WorkerClient {
            url: url.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
        }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `GET /v1/ready`: its state and how busy it is.
    pub async fn ready(&self) -> Result<ReadyStatus, ApiError> {
        client::get(&self.at("/v1/ready"), self.token()).await
    }

    /// `GET /v1/loading/progress`: loading events up to `ready` or `failed`.
    pub async fn loading_progress(&self) -> Result<Events<LoadingEvent>, ApiError> {
        Events::open(&self.at("/v1/loading/progress"), self.token(), None::<&()>).await
    }

    /// `POST /v1/inference`: the generation's events.
    pub async fn infer(&self, req: &InferenceRequest) -> Result<Events<InferenceEvent>, ApiError> {
        Events::open(&self.at("/v1/inference"), self.token(), Some(req)).await
    }

    /// `POST /tokenize`: llama-server's answer, as the worker gave it.
    pub async fn tokenize(
        &self,
        req: &crate::protocol::TokenizeRequest,
    ) -> Result<serde_json::Value, ApiError> {
        client::post(&self.at("/tokenize"), self.token(), req).await
    }

    /// `POST /v1/embeddings`: OpenAI's answer, as the worker gave it.
    pub async fn embed(
        &self,
        req: &crate::protocol::EmbeddingsRequest,
    ) -> Result<serde_json::Value, ApiError> {
        // As long as the worker takes: it computes them a slice at a time
        // beside other work, and stops when this call is dropped.
        client::call_within(
            EMBEDDINGS_TIMEOUT,
            Method::POST,
            &self.at("/v1/embeddings"),
            self.token(),
            Some(req),
        )
        .await
    }
}

/// How long an embeddings call may take: the most tokens a request may
/// bring (32,768) on a slow CPU, shared with other work.
const EMBEDDINGS_TIMEOUT: Duration = Duration::from_secs(3600);

/// The typed events of an SSE answer, as they arrive.
pub struct Events<T> {
    /// Events known before any are read: all of them for a fake peer in tests.
    queued: VecDeque<T>,
    /// The live stream, until it ends.
    sse: Option<SseStream>,
}

impl<T: DeserializeOwned> Events<T> {
    async fn open(
        url: &str,
        token: Option<&str>,
        body: Option<&impl serde::Serialize>,
    ) -> Result<Events<T>, ApiError> {
        Ok(Events {
            queued: VecDeque::new(),
            sse: Some(client::stream(url, token, body).await?),
        })
    }

    /// A stream that sends these events and then ends as a peer that left would:
    /// without a terminal event unless one is among them. For fake peers in tests.
    pub fn from_events(events: Vec<T>) -> Events<T> {
        Events {
            queued: events.into(),
            sse: None,
        }
    }

    /// The next event, `None` once the stream has ended, or [`Silent`] when
    /// the peer sent nothing, not even a keep-alive, for `silence`.
    pub async fn next_within(&mut self, silence: Duration) -> Result<Option<T>, Silent> {
        if let Some(e) = self.queued.pop_front() {
            return Ok(Some(e));
        }
        loop {
            let Some(sse) = self.sse.as_mut() else {
                return Ok(None);
            };
            match sse.next_within(silence).await? {
                Some(Frame::Data(data)) => match serde_json::from_str(&data) {
                    Ok(event) => return Ok(Some(event)),
                    Err(e) => tracing::debug!("skipping an event this build cannot read: {e}"),
                },
                Some(Frame::Done) | None => {
                    self.sse = None;
                    return Ok(None);
                }
            }
        }
    }

    /// The next event; `None` once the stream has ended, with `[DONE]` or not.
    /// A frame that is not a `T` (from a newer peer) is skipped.
    pub async fn next(&mut self) -> Option<T> {
        if let Some(e) = self.queued.pop_front() {
            return Some(e);
        }
        loop {
            match self.sse.as_mut()?.next().await {
                Some(Frame::Data(data)) => match serde_json::from_str(&data) {
                    Ok(event) => return Some(event),
                    Err(e) => tracing::debug!("skipping an event this build cannot read: {e}"),
                },
                Some(Frame::Done) | None => {
                    self.sse = None;
                    return None;
                }
            }
        }
    }
}
