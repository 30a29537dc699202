//! Every type that crosses a process boundary, in one place.
//!
//! The wire formats are those of DESIGN.md §2 and §3. A role never builds JSON
//! by hand for another role: it serialises one of these types, so the two sides
//! cannot drift apart.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// The API version every daemon reports in its health answer.
pub const API_VERSION: &str = "v1";

/// `GET /health` on every daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub api_version: String,
    pub role: String,
}

impl Health {
    pub fn alive(role: &str) -> Health {
        Health {
            status: "alive".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION.into(),
            role: role.into(),
        }
    }
}

/// The body of every JSON error: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `POST /v1/inference` on a worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    pub prompt: String,
    /// Absent: generate until end of sequence or until the slot's context is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// Absent: 0.8, llama.cpp's default. 0 is greedy and deterministic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// OpenAI's penalties: 0 (off) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// The queen's job id, echoed in `started`; the worker makes one up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    Eos,
    StopSequence,
    Cancelled,
}

/// One event of an inference stream (DESIGN.md §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InferenceEvent {
    Started {
        job_id: String,
        model: String,
        started_at: String,
    },
    Token {
        t: String,
        i: u32,
    },
    End {
        tokens_out: u32,
        decode_time_ms: u64,
        stop_reason: StopReason,
    },
    Error {
        code: String,
        message: String,
    },
}

/// One event of a worker's `GET /v1/loading/progress` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum LoadingEvent {
    /// Weights going to a GPU.
    LoadingToVram {
        layers_loaded: u32,
        layers_total: u32,
        vram_mb: u64,
    },
    /// Weights going to main memory (a CPU worker).
    LoadingToRam {
        layers_loaded: u32,
        layers_total: u32,
        ram_mb: u64,
    },
    Ready,
    Failed {
        message: String,
    },
}

/// `GET /v1/ready` on a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadyStatus {
    pub ready: bool,
    /// `loading`, `ready` or `failed`.
    pub state: String,
    pub progress_url: String,
    pub model: String,
    pub slots_total: u32,
    pub slots_busy: u32,
    pub queue_len: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a worker POSTs to its `--callback-url` once loading has ended, either way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReadyCallback {
    pub worker_id: String,
    pub url: String,
    pub model: String,
    pub slots: u32,
    /// `ready` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    pub state: String,
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
}

/// A worker as its hive knows it (`GET /v1/workers/list`, and the spawn answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub url: String,
    pub model: String,
    pub model_path: String,
    pub pid: u32,
    /// `loading`, `ready`, `stopping` or `failed`.
    pub state: String,
    pub slots: u32,
    pub backend: String,
    pub device: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
}

/// `GET /v1/capabilities` on a hive: what a scheduler needs to place a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    pub hostname: String,
    pub cores: u32,
    pub ram_total_mb: u64,
    pub ram_available_mb: u64,
    pub disk_free_mb: u64,
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

/// `POST /v1/hives` on the queen: register a hive by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddHive {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A hive as the queen knows it (`GET /v1/hives`). The token is never shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveStatus {
    pub name: String,
    pub url: String,
    /// `reachable`, `unreachable` or `unknown` (not checked yet).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Started by the queen itself on this machine; it stops with the queen.
    pub managed: bool,
}

/// `POST /v1/jobs` on the queen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The hive to run on; absent: any registered hive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub model: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
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

/// The current time as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm, valid for the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A fresh random 64-bit number, from the standard library's per-process random keys.
pub fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A short random id with a prefix, such as `job-3f9a1c2b7e4d5a60`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_431_723), "2026-11-23T11:02:03Z");
    }

    #[test]
    fn job_events_read_back_as_what_was_sent() {
        let events = [
            JobEvent::Cluster(ClusterEvent::Narration {
                actor: "queen".into(),
                action: "spawn".into(),
                human: "starting a worker".into(),
            }),
            JobEvent::Cluster(ClusterEvent::Download(DownloadEvent::Downloading {
                bytes_downloaded: 1,
                bytes_total: 2,
                speed_mbps: 3.5,
            })),
            JobEvent::Cluster(ClusterEvent::Loading(LoadingEvent::Ready)),
            JobEvent::Inference(InferenceEvent::Token {
                t: "x".into(),
                i: 0,
            }),
        ];
        for e in events {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(
                serde_json::from_str::<JobEvent>(&json).unwrap(),
                e,
                "{json}"
            );
        }
        let json = serde_json::to_string(&ClusterEvent::Loading(LoadingEvent::Ready)).unwrap();
        assert_eq!(json, r#"{"type":"loading","stage":"ready"}"#);
    }

    #[test]
    fn events_have_the_design_shape() {
        let e = InferenceEvent::Token {
            t: " upon".into(),
            i: 1,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"token","t":" upon","i":1}"#
        );
        let e = InferenceEvent::End {
            tokens_out: 20,
            decode_time_ms: 1234,
            stop_reason: StopReason::MaxTokens,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"end","tokens_out":20,"decode_time_ms":1234,"stop_reason":"max_tokens"}"#
        );
        let l = LoadingEvent::Ready;
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"stage":"ready"}"#);
    }
}
