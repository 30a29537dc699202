//! A client (the keeper, the status page, a script) ↔ the queen: jobs and
//! their events, the cluster's status, hives added and removed, keys, aliases
//! and sessions.

use super::*;
use serde::{Deserialize, Serialize};

/// A short name for a model (`GET /v1/aliases`; `PUT /v1/aliases/{name}` sets one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub name: String,
    /// The reference it stands for, in its canonical spelling.
    pub model: String,
}

/// `PUT /v1/aliases/{name}` on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    pub model: String,
}

/// Where a job's answer came from and how long it took to start, as the
/// queen saw it (the keeper's `--verbose` summary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFigures {
    /// The hive and worker that sent the last tokens (after a failover, the last one).
    pub hive: String,
    pub worker: String,
    /// From the job's creation to its first token: placement, loading and prompt included.
    pub time_to_first_token_ms: u64,
    /// The tokens the last worker generated in the `end`'s `decode_time_ms`:
    /// after a failover fewer than `tokens_out`, which counts the whole job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded_tokens: Option<u32>,
}

/// The decode speed an `end` event gives, tokens/s: the tokens the last
/// worker generated over the time it spent generating them (`None` when it
/// spent none). A queen's `end` after a failover counts the whole job's tokens
/// in `tokens_out` and names the last worker's in its figures.
pub fn decode_rate(
    tokens_out: u32,
    decode_time_ms: u64,
    figures: Option<&JobFigures>,
) -> Option<f64> {
    let decoded = figures.and_then(|f| f.decoded_tokens).unwrap_or(tokens_out);
    (decode_time_ms > 0).then(|| f64::from(decoded) * 1000.0 / decode_time_ms as f64)
}

/// What a client key may reach: `use`, inference, models and embeddings;
/// `admin`, everything (hives, workers, keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyScope {
    #[default]
    Use,
    Admin,
}

impl std::fmt::Display for KeyScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyScope::Use => "use",
            KeyScope::Admin => "admin",
        })
    }
}

/// `POST /v1/keys` on the queen: a new client key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub name: String,
    #[serde(default)]
    pub scope: KeyScope,
    /// How long it is good for (`30d`, `12h`); absent: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Requests it may make (`60/min`); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Requests it may hold open at once (streams included); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
}

/// A client key as `GET /v1/keys` lists it (never the key itself).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    pub scope: KeyScope,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub rate: Option<String>,
    pub streams: Option<u32>,
    pub last_used: Option<String>,
    pub requests: u64,
    pub tokens_used: u64,
}

/// `POST /v1/keys`'s answer: the key, shown this once, and its record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyAdded {
    pub key: String,
    pub info: KeyInfo,
}

/// `POST /v1/hives` on the queen: register a hive by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddHive {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// For an `https://` URL: the certificate fingerprint the hive must
    /// present (`rbee hive --show-identity` there); absent, the one it
    /// presents now is pinned and shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// A hive as the queen knows it (`GET /v1/hives`). The token is never shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveStatus {
    pub name: String,
    pub url: String,
    /// How it came to the cluster: `local`, `added` (`hive add`), `token`
    /// (joined, the queen's address in the token) or `mdns` (joined, the
    /// queen found on the LAN).
    #[serde(default)]
    pub found: String,
    /// Its pinned certificate fingerprint, when reached over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub status: HiveState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Started by the queen itself on this machine; it stops with the queen.
    pub managed: bool,
    /// Why it is unreachable, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its rbee version, when known; `version_matches` compares it with the queen's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub version_matches: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MemoryPool>,
    #[serde(default)]
    pub gpus: Vec<MemoryPool>,
    #[serde(default)]
    pub workers: u32,
    /// Shares of split workers on other hives it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseInfo>,
}

/// `POST /v1/jobs` on the queen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The hive to run on; absent: any registered hive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub model: String,
    /// The prompt as text, or empty when `messages` are given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    /// Chat messages, rendered with the model's chat template: one of `prompt` and `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// What the output must be (`rbee keeper infer --json-schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// `false` opts out of the worker's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_prompt: Option<bool>,
}

/// `DELETE /v1/hives/{name}` on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HiveRemoved {
    pub removed: String,
}

/// `DELETE /v1/jobs/{id}` on the queen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCancelled {
    pub job_id: String,
    pub state: String,
}

/// A worker with the hive it runs on (the queen's `GET /v1/workers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveWorker {
    pub hive: String,
    #[serde(flatten)]
    pub worker: WorkerInfo,
    /// Requests the queen has in flight on it.
    #[serde(default)]
    pub in_flight: u32,
    /// The decode speed of the last answer the queen relayed from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// A job as the status page and `rbee keeper status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub job_id: String,
    /// The model as it was asked for.
    pub model: String,
    pub state: JobState,
    /// Where it runs (or ran last), once a worker took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Tokens generated so far.
    pub tokens: u32,
    pub started_at: String,
    /// How long it has run, or ran.
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A model in a hive's catalog, for the status page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogModel {
    pub hive: String,
    pub name: String,
    pub quantization: String,
    pub size: u64,
    pub memory_estimate_mb: u64,
}

/// `GET /v1/status` on the queen (and each event of `/v1/status/stream`):
/// the whole cluster at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueenStatus {
    pub version: String,
    pub hives: Vec<HiveStatus>,
    pub workers: Vec<HiveWorker>,
    pub models: Vec<CatalogModel>,
    /// Running jobs, then the most recent finished ones.
    pub jobs: Vec<JobSummary>,
}

/// `POST /v1/session` on the queen: a browser trades the token, or a
/// one-time code from `rbee keeper status --web`, for a session cookie.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// `POST /v1/session/link` on the queen (with the token): a one-time code
/// that logs a browser in, and the page's address with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionLink {
    pub code: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCreated {
    pub job_id: String,
    pub sse_url: String,
}

/// What the cluster says about a job besides the inference itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClusterEvent {
    Narration {
        actor: String,
        action: String,
        human: String,
    },
    /// A hive's download progress, relayed.
    Download(DownloadEvent),
    /// A worker's loading progress, relayed.
    Loading(LoadingEvent),
}

/// One event of a queen job stream: the worker's inference events, or the cluster's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobEvent {
    Inference(InferenceEvent),
    Cluster(ClusterEvent),
}

/// The one line a child daemon writes on its readiness pipe (`RBEE_READY_FD`)
/// to whoever started it: bound and ready, or why it could not start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Readiness {
    Ready {
        /// The address it listens on; with `--port 0`, the port it was given.
        addr: std::net::SocketAddr,
    },
    Failed {
        reason: StartFailure,
        message: String,
    },
}

/// Why a child daemon failed to start, where its starter can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFailure {
    /// Someone else listens on the port it was asked for (a local hive then takes any port).
    PortTaken,
    /// Anything else; the message says what.
    #[serde(other)]
    Other,
}
