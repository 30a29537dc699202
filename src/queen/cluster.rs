//! The cluster as the scheduler sees it: the live [`View`] it decides from,
//! and the few calls that change something (fetch, spawn, stop, infer). The
//! scheduler takes it through [`Cluster`], so its decisions can be tested
//! against a fake cluster in milliseconds; the real one is [`Live`].

use super::jobs::Job;
use super::registry::{HiveConn, Registry};
use super::view::{View, SILENCE};
use crate::clients::{Events, HiveClient, WorkerClient};
use crate::protocol::{
    ApiError, DownloadEvent, DownloadStarted, EmbeddingsRequest, ErrorCode, InferenceEvent,
    InferenceRequest, LeaseInfo, LeaseRequest, LoadingEvent, SpawnRequest, WorkerInfo,
};
use std::future::Future;
use std::time::Duration;

/// How often the view is brought in line with the registry, as a backstop to
/// the changes the queen makes itself.
const RETRACK_EVERY: Duration = Duration::from_secs(1);

/// Everything the scheduler asks of the cluster. Workers are named by URL and
/// reached with their hive's token.
pub trait Cluster: Sync {
    /// The live view: hives, their snapshots, in-flight counts, prefixes.
    fn view(&self) -> &View;
    /// What the queen counts for `GET /metrics`.
    fn metrics(&self) -> &crate::metrics::QueenMetrics;
    /// `tokens` were generated for a job of client key `key`.
    fn tokens_used(&self, _key: &str, _tokens: u64) {}
    /// Whether the queen may start a hive on its own machine.
    fn local_hive_allowed(&self) -> bool {
        true
    }
    /// The hive on this machine, started now if none runs, once the view has
    /// heard from it; `job` hears how it goes.
    fn local_hive(&self, job: &Job) -> impl Future<Output = Result<HiveConn, ApiError>> + Send;
    fn download(
        &self,
        hive: &HiveConn,
        model: &str,
    ) -> impl Future<Output = Result<DownloadStarted, ApiError>> + Send;
    fn download_progress(
        &self,
        hive: &HiveConn,
        id: &str,
    ) -> impl Future<Output = Result<Events<DownloadEvent>, ApiError>> + Send;
    fn spawn(
        &self,
        hive: &HiveConn,
        req: &SpawnRequest,
    ) -> impl Future<Output = Result<WorkerInfo, ApiError>> + Send;
    fn stop_worker(
        &self,
        hive: &HiveConn,
        id: &str,
    ) -> impl Future<Output = Result<WorkerInfo, ApiError>> + Send;
    /// A lending hive's share of a split worker (DESIGN.md §12).
    fn lend(
        &self,
        hive: &HiveConn,
        req: &LeaseRequest,
    ) -> impl Future<Output = Result<LeaseInfo, ApiError>> + Send;
    fn end_lease(
        &self,
        hive: &HiveConn,
        id: &str,
    ) -> impl Future<Output = Result<LeaseInfo, ApiError>> + Send;
    fn loading_progress(
        &self,
        hive: &HiveConn,
        worker: &str,
    ) -> impl Future<Output = Result<Events<LoadingEvent>, ApiError>> + Send;
    fn infer(
        &self,
        hive: &HiveConn,
        worker: &str,
        req: &InferenceRequest,
    ) -> impl Future<Output = Result<Events<InferenceEvent>, ApiError>> + Send;
    /// The worker's `POST /v1/embeddings` answer.
    fn embed(
        &self,
        hive: &HiveConn,
        worker: &str,
        req: &EmbeddingsRequest,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
}

impl HiveConn {
    pub fn client(&self) -> HiveClient {
        HiveClient::new(&self.url, self.token.as_deref())
    }

    /// A worker on this hive, which takes the hive's token.
    pub fn worker(&self, url: &str) -> WorkerClient {
        WorkerClient::new(url, self.token.as_deref())
    }
}

/// The real cluster: the registry's hives, followed live.
#[derive(Clone)]
pub struct Live {
    pub registry: Registry,
    pub view: View,
    pub metrics: crate::metrics::QueenMetrics,
    /// Client keys, whose tokens are counted.
    pub keys: super::keys::Keys,
}

impl Live {
    /// Follows every hive of the registry (and the local one) from now on.
    pub async fn start(
        registry: Registry,
        metrics: crate::metrics::QueenMetrics,
        keys: super::keys::Keys,
    ) -> Live {
        let live = Live {
            registry,
            view: View::default(),
            metrics,
            keys,
        };
        live.retrack().await;
        let backstop = live.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RETRACK_EVERY).await;
                backstop.retrack().await;
            }
        });
        live
    }

    /// Brings the view in line with the registry now.
    pub async fn retrack(&self) {
        self.view.track(&self.registry.all().await);
    }

    /// At the queen's start, on a data dir where this machine's hive ran
    /// before: starts it again unless a registered hive runs here, so that
    /// this machine's models are listed without waiting for a job.
    pub async fn bring_back_local(self) {
        self.view
            .wait_until(SILENCE, |s| {
                s.hives
                    .iter()
                    .all(|h| h.snapshot.is_some() || h.error.is_some())
            })
            .await;
        if !super::hives::local_hive_wanted(&self.view.state()) {
            return;
        }
        match self
            .registry
            .ensure_local(|_, human| tracing::info!("{human}"))
            .await
        {
            Ok(_) => self.retrack().await,
            Err(e) => tracing::warn!("cannot start this machine's hive again: {e}"),
        }
    }
}

impl Cluster for Live {
    fn view(&self) -> &View {
        &self.view
    }

    fn tokens_used(&self, key: &str, tokens: u64) {
        self.keys.count_tokens(key, tokens);
    }

    fn local_hive_allowed(&self) -> bool {
        self.registry.local_allowed()
    }

    fn metrics(&self) -> &crate::metrics::QueenMetrics {
        &self.metrics
    }

    async fn local_hive(&self, job: &Job) -> Result<HiveConn, ApiError> {
        let conn = self
            .registry
            .ensure_local(|action, human| job.narrate("queen", action, human))
            .await
            .map_err(|m| ApiError::new(ErrorCode::HiveStartFailed, m))?;
        self.retrack().await;
        let name = conn.name.clone();
        let heard = self
            .view
            .wait_until(SILENCE, |s| {
                s.hives.named(&name).is_some_and(|h| h.reachable)
            })
            .await;
        if !heard {
            return Err(ApiError::new(
                ErrorCode::HiveStartFailed,
                format!(
                    "the local hive at {} started but its state stream did not answer",
                    conn.url
                ),
            ));
        }
        Ok(conn)
    }

    async fn download(&self, hive: &HiveConn, model: &str) -> Result<DownloadStarted, ApiError> {
        hive.client().download(model).await
    }

    async fn download_progress(
        &self,
        hive: &HiveConn,
        id: &str,
    ) -> Result<Events<DownloadEvent>, ApiError> {
        hive.client().download_progress(id).await
    }

    async fn spawn(&self, hive: &HiveConn, req: &SpawnRequest) -> Result<WorkerInfo, ApiError> {
        hive.client().spawn(req).await
    }

    async fn stop_worker(&self, hive: &HiveConn, id: &str) -> Result<WorkerInfo, ApiError> {
        hive.client().stop_worker(id).await
    }

    async fn lend(&self, hive: &HiveConn, req: &LeaseRequest) -> Result<LeaseInfo, ApiError> {
        hive.client().lend(req).await
    }

    async fn end_lease(&self, hive: &HiveConn, id: &str) -> Result<LeaseInfo, ApiError> {
        hive.client().end_lease(id).await
    }

    async fn loading_progress(
        &self,
        hive: &HiveConn,
        worker: &str,
    ) -> Result<Events<LoadingEvent>, ApiError> {
        hive.worker(worker).loading_progress().await
    }

    async fn infer(
        &self,
        hive: &HiveConn,
        worker: &str,
        req: &InferenceRequest,
    ) -> Result<Events<InferenceEvent>, ApiError> {
        hive.worker(worker).infer(req).await
    }

    async fn embed(
        &self,
        hive: &HiveConn,
        worker: &str,
        req: &EmbeddingsRequest,
    ) -> Result<serde_json::Value, ApiError> {
        hive.worker(worker).embed(req).await
    }
}
