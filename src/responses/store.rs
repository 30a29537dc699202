//! The responses kept for `previous_response_id` and `GET /v1/responses/{id}`:
//! an hour each, at most [`MAX_STORED`] of them and [`MAX_STORED_BYTES`] of
//! text, least recently used first out.

use crate::protocol::{ApiError, ChatMessage, ErrorCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a stored response can be continued or fetched.
pub const KEEP_FOR: Duration = Duration::from_secs(3600);
pub const MAX_STORED: usize = 1024;
pub const MAX_STORED_BYTES: usize = 64 << 20;

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<HashMap<String, Stored>>>,
}

struct Stored {
    /// The response object as it was answered.
    response: Value,
    /// The whole conversation up to and with its answer (no instructions).
    messages: Vec<ChatMessage>,
    bytes: usize,
    used: Instant,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn put(&self, id: &str, response: Value, messages: Vec<ChatMessage>) {
        let bytes = messages.iter().map(|m| m.content.len() + 64).sum::<usize>()
            + response.to_string().len();
        let mut all = self.lock();
        all.retain(|_, s| s.used.elapsed() < KEEP_FOR);
        all.insert(
            id.to_string(),
            Stored {
                response,
                messages,
                bytes,
                used: Instant::now(),
            },
        );
        // Least recently used out first, until both bounds hold.
        while all.len() > MAX_STORED
            || all.values().map(|s| s.bytes).sum::<usize>() > MAX_STORED_BYTES
        {
            let Some(oldest) = all
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            all.remove(&oldest);
        }
    }

    pub(super) fn take_messages(&self, id: &str) -> Option<Vec<ChatMessage>> {
        let mut all = self.lock();
        let stored = all.get_mut(id).filter(|s| s.used.elapsed() < KEEP_FOR)?;
        stored.used = Instant::now();
        Some(stored.messages.clone())
    }

    /// `GET /v1/responses/{id}`.
    pub fn get(&self, id: &str) -> Result<Value, ApiError> {
        let all = self.lock();
        all.get(id)
            .filter(|s| s.used.elapsed() < KEEP_FOR)
            .map(|s| s.response.clone())
            .ok_or_else(|| not_found(id))
    }

    /// `DELETE /v1/responses/{id}`.
    pub fn delete(&self, id: &str) -> Result<Value, ApiError> {
        self.lock()
            .remove(id)
            .map(|_| json!({"id": id, "object": "response", "deleted": true}))
            .ok_or_else(|| not_found(id))
    }
}

pub(super) fn not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no response {id}: responses are kept for an hour, the {MAX_STORED} most recent"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_the_most_recent_within_its_bounds() {
        let store = Store::default();
        for i in 0..MAX_STORED + 5 {
            store.put(
                &format!("r{i}"),
                json!({}),
                vec![ChatMessage::new("user", "x")],
            );
        }
        assert!(store.get("r0").is_err(), "the oldest went");
        assert!(store.get(&format!("r{}", MAX_STORED + 4)).is_ok());
        assert_eq!(store.lock().len(), MAX_STORED);
    }
}
