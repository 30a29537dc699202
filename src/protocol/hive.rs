//! The queen ↔ a hive: what a hive has (its snapshot: models, workers,
//! memory, GPUs), downloads, spawn requests, and the leases of a split model
//! (with the name of the RPC protocol their tunnels carry).

use super::*;
use serde::{Deserialize, Serialize};

/// `POST /v1/workers/{id}/keep-alive` on a hive: how long the worker may stay
/// idle before it is stopped, in seconds; `null`, until it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepAliveRequest {
    pub seconds: Option<u64>,
}

/// A worker's life, as the worker, its hive and the queen see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Loading,
    Ready,
    /// Told to stop, not gone yet (only its hive says this).
    Stopping,
    Failed,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Loading => "loading",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
            WorkerState::Failed => "failed",
        })
    }
}

/// Whether the queen can reach a hive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiveState {
    Reachable,
    Unreachable,
    /// Not checked yet.
    Unknown,
}

impl std::fmt::Display for HiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HiveState::Reachable => "reachable",
            HiveState::Unreachable => "unreachable",
            HiveState::Unknown => "unknown",
        })
    }
}

/// `DELETE /v1/models/download/partial` on a hive: the partial downloads
/// removed (those not being downloaded right now) and the space freed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialsRemoved {
    pub removed: Vec<String>,
    pub freed_mb: u64,
}

/// `POST /v1/models/download` on a hive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadRequest {
    pub model_ref: String,
}

/// The answer to a download request. `state` is `complete` when the hive
/// already had the model (the progress stream then says so at once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadStarted {
    pub download_id: String,
    pub local_path: String,
    pub state: DownloadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadState {
    Downloading,
    Complete,
}

/// One event of a hive's `GET /v1/models/download/progress?id=` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum DownloadEvent {
    Downloading {
        bytes_downloaded: u64,
        bytes_total: u64,
        /// Megabits per second, over the last second or so.
        speed_mbps: f64,
    },
    Complete {
        local_path: String,
    },
    Error {
        message: String,
    },
}

/// A model in a hive's catalog (`GET /v1/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The catalog name: the file stem, lower-case.
    pub name: String,
    /// The reference it was added by.
    pub model_ref: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub context_length: u64,
    pub layers: u64,
    /// The file lives in the hive's own models directory and goes when the entry does;
    /// a `file:` model registered in place is never deleted by the hive.
    pub owned: bool,
    pub added_at: String,
    /// A file registered in place whose sha256 is being computed: how far
    /// (`sha256` is empty until it is done). Not stored: `GET /v1/models` says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashing: Option<Hashing>,
    /// What a worker of it starts with where a spawn does not say (`keeper
    /// models set`); each unset: the hive's default.
    #[serde(default, skip_serializing_if = "ModelSettings::is_default")]
    pub settings: ModelSettings,
}

/// A model's worker settings in a hive's catalog: `PUT /v1/models/{name}/settings`
/// (`rbee keeper models set`). The memory estimate, placement, and every worker
/// of the model follow them; a request's own (Ollama's `num_ctx`) still goes
/// through the same checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Context of each slot, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// The KV cache's cells, K and V alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
}

impl ModelSettings {
    pub fn is_default(&self) -> bool {
        *self == ModelSettings::default()
    }
}

/// How far the sha256 of a registered file has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashing {
    pub bytes_hashed: u64,
    pub bytes_total: u64,
}

/// `POST /v1/workers/spawn` on a hive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub model_ref: String,
    /// `cpu`, `cuda` or `metal`; absent: the best this hive has.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub device: u32,
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub ctx_size: Option<u32>,
    /// The KV cache's cells; absent: the model's setting, else f16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Other hives' devices holding part of its layers (DESIGN.md §12): the
    /// worker keeps the rest on its own machine, the first layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<RemoteShare>,
}

/// One lending hive's share of a split worker, as the queen planned it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteShare {
    pub hive: String,
    /// The lending hive's base URL; the worker tunnels through its `/v1/rpc`.
    pub url: String,
    /// The lease the lending hive made for it (`POST /v1/leases`).
    pub lease: String,
    pub layers: u32,
    /// The lending hive's token, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The lending hive's certificate fingerprint, which the worker pins
    /// (a hive that joined over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Where a split worker's layers are: its own hive's share and each lender's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitPart {
    pub hive: String,
    pub layers: u32,
}

/// `POST /v1/leases` on a hive: lend this hive's devices to a worker on
/// another hive, through llama.cpp's RPC server (DESIGN.md §12).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub lease: String,
    pub model: String,
    /// The hive whose worker uses it.
    pub borrower: String,
    pub layers: u32,
    /// What its share takes here, counted against this hive's budget.
    pub memory_mb: u64,
    /// The borrowing hive's certificate fingerprint: its worker's tunnels
    /// present it, and are let in by it while the lease lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub borrower_fingerprint: Option<String>,
}

/// A lease as its lending hive shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub lease: String,
    pub model: String,
    pub borrower: String,
    pub layers: u32,
    /// Its RPC server's resident set, never less than the share's estimate.
    pub memory_mb: u64,
    /// Whether a tunnel to it is open now.
    pub connected: bool,
    pub since: String,
}

/// A worker as its hive knows it (`GET /v1/workers/list`, and the spawn answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub url: String,
    pub model: String,
    pub model_path: String,
    pub pid: u32,
    pub state: WorkerState,
    pub slots: u32,
    pub backend: String,
    pub device: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    /// Tokens of context per slot.
    #[serde(default)]
    pub ctx_size: u32,
    /// CPU threads it decodes with.
    #[serde(default)]
    pub threads: u32,
    /// The memory it takes, in MiB: the estimate while loading, then what the
    /// OS measures (its resident set), never less than the estimate.
    #[serde(default)]
    pub memory_mb: u64,
    /// Whether `memory_mb` was measured.
    #[serde(default)]
    pub memory_measured: bool,
    /// The hive's estimate for it before it started, in MiB (what placement
    /// counted; `memory_mb` is the larger of this and `resident_mb`).
    #[serde(default)]
    pub estimate_mb: u64,
    /// Its resident set as the OS measures it, in MiB; 0 until measured.
    #[serde(default)]
    pub resident_mb: u64,
    /// Since when it has had nothing to do (RFC 3339), as its hive last saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<String>,
    /// When the hive will stop it if it stays idle (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stops_at: Option<String>,
    /// A split worker's layers, this hive's share first; empty when whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitPart>,
    /// It ended on a signal a fault raises (abort, segmentation fault, …),
    /// not one sent to stop it: what it was reading may have crashed it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub crashed: bool,
}

/// `GET /v1/state/stream` on a hive: everything the queen places and routes
/// by, sent whole at the start and again whenever something changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveSnapshot {
    /// The hive's rbee version and compiled backends.
    pub version: String,
    pub backends: Vec<String>,
    pub hostname: String,
    pub cores: u32,
    pub ram: MemoryPool,
    /// One pool per GPU, by index.
    pub gpus: Vec<MemoryPool>,
    pub models: Vec<HiveModel>,
    pub workers: Vec<WorkerInfo>,
    /// Shares of other hives' workers this hive holds (DESIGN.md §12).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseInfo>,
}

/// RAM or one GPU's memory, in MiB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPool {
    /// `ram`, or the GPU's name.
    pub name: String,
    pub total_mb: u64,
    /// What the OS (or driver) says is free now.
    pub available_mb: u64,
    /// What rbee may use of it (`rbee hive --max-memory` for RAM).
    pub budget_mb: u64,
    /// What this hive's workers take.
    pub used_mb: u64,
}

impl MemoryPool {
    /// What a new worker may still take: the budget left, and never more than the OS has.
    pub fn free_mb(&self) -> u64 {
        self.budget_mb
            .saturating_sub(self.used_mb)
            .min(self.available_mb)
    }
}

/// A catalog entry with the memory a worker of it would take with the hive's
/// default slots and context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveModel {
    #[serde(flatten)]
    pub entry: ModelEntry,
    pub memory_estimate_mb: u64,
    /// What each share takes when the model is split across hives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitCostMb>,
}

/// [`crate::gguf::SplitCost`] in MiB, with the hive's default slots and context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitCostMb {
    pub layers: u32,
    pub layer_mb: f64,
    pub host_mb: u64,
    pub output_mb: u64,
    pub device_mb: u64,
}

impl SplitCostMb {
    pub fn of(cost: &crate::gguf::SplitCost, cache_ram_mb: u64) -> SplitCostMb {
        let mb = |b: u64| b.div_ceil(1 << 20);
        SplitCostMb {
            layers: u32::try_from(cost.layers).unwrap_or(u32::MAX),
            layer_mb: cost.per_layer as f64 / f64::from(1 << 20),
            // The host-memory prompt cache stays with the worker.
            host_mb: mb(cost.host) + cache_ram_mb,
            output_mb: mb(cost.output),
            device_mb: mb(cost.device),
        }
    }

    /// The worker's own machine with `layers` of them.
    pub fn host_need(&self, layers: u32) -> u64 {
        self.host_mb + (f64::from(layers) * self.layer_mb).ceil() as u64
    }

    /// A lending hive with `layers` of them (and the output layer if `last`).
    pub fn lender_need(&self, layers: u32, last: bool) -> u64 {
        let output = if last { self.output_mb } else { 0 };
        self.device_mb + output + (f64::from(layers) * self.layer_mb).ceil() as u64
    }
}

/// `GET /v1/capabilities` on a hive: what a scheduler needs to place a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    pub hostname: String,
    pub cores: u32,
    pub ram_total_mb: u64,
    pub ram_available_mb: u64,
    pub disk_free_mb: u64,
    /// Space taken by partial downloads (`DELETE /v1/models/download/partial` frees it).
    #[serde(default)]
    pub partial_downloads_mb: u64,
    /// The llama.cpp backends this binary was built with.
    pub backends: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub description: String,
    pub memory_total_mb: u64,
    pub memory_free_mb: u64,
}

/// The upgrade protocol `GET /v1/rpc` speaks.
pub const RPC_PROTOCOL: &str = "ggml-rpc";

/// A lease id is 1 to 64 ASCII letters, digits and dashes: it goes into a URL.
pub fn check_lease_id(id: &str) -> Result<(), ApiError> {
    let fine = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if fine {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "lease",
            format!("a lease id is 1 to 64 letters, digits and dashes, not {id:?}"),
        ))
    }
}

/// A new lease's id.
pub fn new_lease_id() -> String {
    new_id("lease")
}

#[cfg(test)]
impl WorkerInfo {
    /// A ready worker of `model`, for the tests of what reads workers.
    pub fn ready(id: &str, model: &str, memory_mb: u64) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            url: format!("http://{id}"),
            model: model.into(),
            model_path: String::new(),
            pid: 1,
            state: WorkerState::Ready,
            slots: 4,
            backend: "cpu".into(),
            device: 0,
            error: None,
            started_at: String::new(),
            ctx_size: 2048,
            threads: 2,
            memory_mb,
            memory_measured: true,
            estimate_mb: memory_mb,
            resident_mb: memory_mb,
            idle_since: None,
            stops_at: None,
            split: vec![],
            crashed: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_go_into_urls() {
        assert!(check_lease_id("lease-0a1b").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_lease_id(bad).is_err(), "{bad:?}");
        }
    }
}
