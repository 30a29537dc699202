//! Every type that crosses a process boundary, one file per boundary (each
//! opens with who sends what to whom), all re-exported here so a call site
//! names `protocol::JobRequest`, not the file it lives in.
//!
//! The wire formats are those of DESIGN.md §2 and §3. A role never builds JSON
//! by hand for another role: it serialises one of these types, so the two sides
//! cannot drift apart.

mod error;
mod hive;
mod inference;
mod jobs;
mod join;
mod sampling;
mod stamps;
mod worker;

pub use error::{parse_json, ApiError, ErrorBody, ErrorCode};
pub use hive::*;
pub use inference::*;
pub use jobs::*;
pub use join::{CheckIn, JoinRequest, JoinToken, JoinTokenRequest, Joined};
pub use sampling::*;
pub use stamps::{
    check_name, new_id, new_secret, now_rfc3339, parse_rfc3339, random_u64, rfc3339_at, unix_now,
};
pub use worker::*;

use serde::{Deserialize, Serialize};

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

    /// The answer to a shutdown request: still alive, on its way out.
    pub fn stopping(role: &str) -> Health {
        Health {
            status: "shutting_down".into(),
            ..Health::alive(role)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                ids: vec![87],
                logprobs: vec![],
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
    fn sampling_is_flattened_and_unknown_fields_are_refused() {
        let r: InferenceRequest = serde_json::from_str(
            r#"{"prompt":"p","max_tokens":5,"temperature":0,"stop":"x","seed":-1}"#,
        )
        .unwrap();
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.stop, vec!["x".to_string()]);
        assert_eq!(r.sampling.seed, Some(-1));
        let e = serde_json::from_str::<InferenceRequest>(r#"{"prompt":"p","temprature":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("temprature"), "{e}");
        let j: JobRequest =
            serde_json::from_str(r#"{"model":"m","prompt":"p","stop":["a","b"],"top_k":3}"#)
                .unwrap();
        assert_eq!(j.sampling.stop.len(), 2);
        assert_eq!(j.sampling.top_k, Some(3));
        assert!(serde_json::from_str::<JobRequest>(r#"{"model":"m","prompt":"p","x":1}"#).is_err());
    }

    /// One table of inputs and the field each one is refused for.
    #[test]
    fn one_rule_set_for_sampling() {
        let ok = |json: &str| {
            let p: SamplingParams = serde_json::from_str(json).unwrap();
            p.validate().map_err(|e| {
                assert_eq!(e.code, ErrorCode::InvalidRequest);
                e.param.unwrap_or_default()
            })
        };
        let cases: &[(&str, Result<(), &str>)] = &[
            (r#"{}"#, Ok(())),
            (
                r#"{"temperature":0,"top_p":1,"top_k":0,"max_tokens":1}"#,
                Ok(()),
            ),
            (
                r#"{"temperature":2,"presence_penalty":-2,"frequency_penalty":2}"#,
                Ok(()),
            ),
            (r#"{"temperature":-1}"#, Err("temperature")),
            (r#"{"temperature":2.5}"#, Err("temperature")),
            (r#"{"temperature":100}"#, Err("temperature")),
            (r#"{"temperature":1e308}"#, Err("temperature")),
            (r#"{"top_p":2}"#, Err("top_p")),
            (r#"{"top_p":-0.1}"#, Err("top_p")),
            (r#"{"top_k":-1}"#, Err("top_k")),
            (r#"{"max_tokens":0}"#, Err("max_tokens")),
            (r#"{"max_tokens":-5}"#, Err("max_tokens")),
            (r#"{"max_tokens":1000000000000}"#, Err("max_tokens")),
            (r#"{"stop":[""]}"#, Err("stop")),
            (r#"{"presence_penalty":3}"#, Err("presence_penalty")),
            (r#"{"frequency_penalty":-2.5}"#, Err("frequency_penalty")),
        ];
        for (json, want) in cases {
            assert_eq!(ok(json), want.map_err(str::to_string), "{json}");
        }
        let many = format!(r#"{{"stop":{:?}}}"#, vec!["s"; MAX_STOP_SEQUENCES + 1]);
        assert_eq!(ok(&many), Err("stop".to_string()));
    }

    #[test]
    fn events_have_the_design_shape() {
        let e = InferenceEvent::Token {
            t: " upon".into(),
            i: 1,
            ids: vec![2402],
            logprobs: vec![],
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"token","t":" upon","i":1,"ids":[2402]}"#
        );
        let e = InferenceEvent::End {
            tokens_out: 20,
            decode_time_ms: 1234,
            stop_reason: StopReason::MaxTokens,
            cached_tokens: 7,
            ids: Vec::new(),
            figures: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"end","tokens_out":20,"decode_time_ms":1234,"stop_reason":"max_tokens","cached_tokens":7}"#
        );
        let l = LoadingEvent::Ready;
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"stage":"ready"}"#);
    }
}
