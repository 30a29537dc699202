//! The one error type and every code any role sends: one table of code,
//! wire name and HTTP status, so a code is never sent with two statuses.

use serde::{Deserialize, Serialize};

/// Declares [`ErrorCode`] from one table: variant, wire name, HTTP status.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, $status:literal;)*) => {
        /// Every error code a role sends, on a plain endpoint or in a stream's
        /// `error` event. Each knows its HTTP status; roles match on these,
        /// never on strings.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ErrorCode {
            $($(#[$doc])* #[serde(rename = $name)] $variant,)*
            /// A code this build does not know, from a newer peer: its message still shows.
            #[serde(other, rename = "UNKNOWN")]
            Unknown,
        }

        impl ErrorCode {
            /// Every code but `Unknown`, for tests and docs.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The HTTP status a plain endpoint answers with.
            pub fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)*
                    ErrorCode::Unknown => 502,
                }
            }

            /// The name on the wire, as in `INVALID_REQUEST`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                    ErrorCode::Unknown => "UNKNOWN",
                }
            }
        }
    };
}

error_codes! {
    // The request itself is wrong.
    InvalidRequest = "INVALID_REQUEST", 400;
    BodyTooLarge = "BODY_TOO_LARGE", 413;
    Unauthorized = "UNAUTHORIZED", 401;
    /// Refused whoever asks: a host name or origin not allowed, a report not the worker's own.
    Forbidden = "FORBIDDEN", 403;
    NotFound = "NOT_FOUND", 404;
    MethodNotAllowed = "METHOD_NOT_ALLOWED", 405;
    InvalidModelRef = "INVALID_MODEL_REF", 400;
    /// The file is not a GGUF model rbee can load.
    InvalidModel = "INVALID_MODEL", 400;
    ContextOverflow = "CONTEXT_OVERFLOW", 400;
    BackendUnavailable = "BACKEND_UNAVAILABLE", 400;
    // What it names does not exist.
    ModelNotFound = "MODEL_NOT_FOUND", 404;
    RepoNotFound = "REPO_NOT_FOUND", 404;
    NoGguf = "NO_GGUF", 404;
    WorkerNotFound = "WORKER_NOT_FOUND", 404;
    JobNotFound = "JOB_NOT_FOUND", 404;
    DownloadNotFound = "DOWNLOAD_NOT_FOUND", 404;
    LeaseNotFound = "LEASE_NOT_FOUND", 404;
    UnknownNode = "UNKNOWN_NODE", 404;
    // Busy, or not ready yet: worth trying again.
    QueueFull = "QUEUE_FULL", 503;
    /// This client has asked too often, or holds too much, for now.
    TooManyRequests = "TOO_MANY_REQUESTS", 429;
    Busy = "BUSY", 503;
    Loading = "LOADING", 503;
    ShuttingDown = "SHUTTING_DOWN", 503;
    NoPort = "NO_PORT", 503;
    // Hugging Face and the disk.
    HfTokenNeeded = "HF_TOKEN_NEEDED", 401;
    HfTokenRefused = "HF_TOKEN_REFUSED", 403;
    Upstream = "UPSTREAM", 502;
    DiskFull = "DISK_FULL", 507;
    /// No hive has (or can free) the memory a model needs.
    InsufficientMemory = "INSUFFICIENT_MEMORY", 507;
    // Something failed on the way.
    DownloadFailed = "DOWNLOAD_FAILED", 502;
    SpawnFailed = "SPAWN_FAILED", 500;
    WorkerFailed = "WORKER_FAILED", 500;
    ModelLoadFailed = "MODEL_LOAD_FAILED", 503;
    InferenceFailed = "INFERENCE_FAILED", 500;
    WorkerLost = "WORKER_LOST", 502;
    HiveUnreachable = "HIVE_UNREACHABLE", 502;
    HiveStartFailed = "HIVE_START_FAILED", 502;
    /// Nobody answered at an address; the caller knows whether that was a hive or a worker.
    Unreachable = "UNREACHABLE", 502;
    Cancelled = "CANCELLED", 409;
    /// What it would make exists already (a key of that name).
    Conflict = "CONFLICT", 409;
    /// The request crashed a worker before its first token: it is not sent to
    /// another, and the same request is refused for a while.
    RequestCrashedWorker = "REQUEST_CRASHED_WORKER", 422;
    Internal = "INTERNAL", 500;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one error type: what every handler returns, what every client call
/// fails with, and what an `error` event carries. `param` names the request
/// field at fault, when one is (OpenAI's clients show it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// Seconds after which asking again may succeed: the answer's
    /// `Retry-After` header (not in the body).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// A bad request field: `INVALID_REQUEST`, naming the field.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.into()),
            ..ApiError::new(ErrorCode::InvalidRequest, message)
        }
    }

    /// The same error, saying when to ask again (whole seconds, at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> ApiError {
        self.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        self
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }

    /// The same error with context in front: `hive mac: <message>`.
    pub fn context(mut self, what: impl std::fmt::Display) -> ApiError {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// The body of every JSON error: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// A request body read as `T`; malformed JSON (or a wrong field) is
/// `INVALID_REQUEST` saying what serde found.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid JSON body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_read_back_and_unknown_ones_survive() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            assert!((400..600).contains(&code.status()), "{code}");
        }
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"SOMETHING_NEW","message":"m"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unknown);
        assert_eq!(body.error.message, "m");
    }
}
