//! The cluster as the scheduler sees it: the hives it may use and what each
//! hive and worker answers. The scheduler takes it through [`Cluster`], so its
//! decisions can be tested against a fake cluster in milliseconds; the real
//! one is the [`Registry`] and the typed clients.

use super::jobs::Job;
use super::registry::{HiveConn, Registry};
use crate::clients::{Events, HiveClient, WorkerClient};
use crate::protocol::{
    ApiError, DownloadEvent, DownloadStarted, ErrorCode, InferenceEvent, InferenceRequest,
    LoadingEvent, ModelEntry, ReadyStatus, SpawnRequest, WorkerInfo,
};
use std::future::Future;

/// Everything the scheduler asks of the cluster. Workers are named by URL and
/// reached with their hive's token.
pub trait Cluster: Sync {
    /// Every hive this queen can use.
    fn hives(&self) -> impl Future<Output = Vec<HiveConn>> + Send;
    /// The hive on this machine, started now if none runs; `job` hears how it goes.
    fn local_hive(&self, job: &Job) -> impl Future<Output = Result<HiveConn, ApiError>> + Send;
    /// Whether a hive answers as a hive; the error says why not.
    fn check(&self, hive: &HiveConn) -> impl Future<Output = Result<(), String>> + Send;
    fn models(
        &self,
        hive: &HiveConn,
    ) -> impl Future<Output = Result<Vec<ModelEntry>, ApiError>> + Send;
    fn workers(
        &self,
        hive: &HiveConn,
    ) -> impl Future<Output = Result<Vec<WorkerInfo>, ApiError>> + Send;
    fn ready(
        &self,
        hive: &HiveConn,
        worker: &str,
    ) -> impl Future<Output = Result<ReadyStatus, ApiError>> + Send;
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

impl Cluster for Registry {
    async fn hives(&self) -> Vec<HiveConn> {
        self.all().await
    }

    async fn local_hive(&self, job: &Job) -> Result<HiveConn, ApiError> {
        self.ensure_local(|action, human| job.narrate("queen", action, human))
            .await
            .map_err(|m| ApiError::new(ErrorCode::HiveStartFailed, m))
    }

    async fn check(&self, hive: &HiveConn) -> Result<(), String> {
        Registry::check(self, hive).await
    }

    async fn models(&self, hive: &HiveConn) -> Result<Vec<ModelEntry>, ApiError> {
        hive.client().models().await
    }

    async fn workers(&self, hive: &HiveConn) -> Result<Vec<WorkerInfo>, ApiError> {
        hive.client().workers().await
    }

    async fn ready(&self, hive: &HiveConn, worker: &str) -> Result<ReadyStatus, ApiError> {
        hive.worker(worker).ready().await
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
}
