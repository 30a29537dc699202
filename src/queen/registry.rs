//! The queen's hives: the registered ones (in sled, surviving restarts), their
//! health, and the local hive the queen may start itself (`local_hive.rs`).
//!
//! Only this module and the hive's catalog touch sled.

use super::local_hive::LocalHive;
use crate::protocol::{now_rfc3339, AddHive, ApiError, HiveState, HiveStatus};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The name of the hive on the queen's own machine.
pub const LOCALHOST: &str = "localhost";
/// How often every hive is asked whether it is alive.
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// What the queen needs to talk to a hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveConn {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
}

/// Whether a hive answered its last health check, and when it last did.
type Seen = (bool, Option<String>);

#[derive(Clone)]
pub struct Registry {
    db: sled::Db,
    /// Last health check per hive name: reachable or not, and when last seen.
    health: Arc<Mutex<HashMap<String, Seen>>>,
    /// The hive this queen starts itself on `localhost`.
    local: LocalHive,
}

impl Registry {
    pub fn open(data_dir: PathBuf, token: Option<String>) -> Result<Registry, String> {
        let path = data_dir.join("queen-hives");
        let db = sled::open(&path).map_err(|e| {
            format!(
                "cannot open the hive registry at {} (is another queen using this --data-dir?): {e}",
                path.display()
            )
        })?;
        Ok(Registry {
            db,
            health: Arc::default(),
            local: LocalHive::new(data_dir, token)?,
        })
    }

    pub fn add(&self, hive: AddHive) -> Result<HiveConn, ApiError> {
        let valid_name = !hive.name.is_empty()
            && hive.name.len() <= 64
            && hive
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid_name {
            return Err(ApiError::invalid(
                "name",
                format!(
                    "hive name {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                    hive.name
                ),
            ));
        }
        let url = hive.url.trim_end_matches('/').to_string();
        let parsed: Result<hyper::Uri, _> = url.parse();
        if !parsed.is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some()) {
            return Err(ApiError::invalid(
                "url",
                format!("hive url {url:?} must look like http://host:port"),
            ));
        }
        let conn = HiveConn {
            name: hive.name,
            url,
            token: hive.token.filter(|t| !t.is_empty()),
        };
        let bytes = serde_json::to_vec(&conn).map_err(|e| ApiError::internal(e.to_string()))?;
        self.db
            .insert(conn.name.as_bytes(), bytes)
            .and_then(|_| self.db.flush())
            .map_err(|e| ApiError::internal(format!("cannot write the hive registry: {e}")))?;
        Ok(conn)
    }

    /// Forgets a registered hive; false if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, ApiError> {
        let old = self
            .db
            .remove(name)
            .and_then(|old| self.db.flush().map(|_| old))
            .map_err(|e| ApiError::internal(format!("cannot write the hive registry: {e}")))?;
        Ok(old.is_some())
    }

    fn registered(&self) -> Vec<HiveConn> {
        self.db
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Every hive this queen can use: the registered ones, then its local hive if running.
    pub async fn all(&self) -> Vec<HiveConn> {
        let mut all = self.registered();
        if let Some(local) = self.local.conn().await {
            if !all.iter().any(|h| h.name == local.name) {
                all.push(local);
            }
        }
        all
    }

    pub async fn get(&self, name: &str) -> Option<HiveConn> {
        self.all().await.into_iter().find(|h| h.name == name)
    }

    pub async fn list(&self) -> Vec<HiveStatus> {
        let local_name = self.local.conn().await.map(|l| l.name);
        let health = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.all()
            .await
            .into_iter()
            .map(|h| {
                let (status, last_seen) = match health.get(&h.name) {
                    Some((true, seen)) => (HiveState::Reachable, seen.clone()),
                    Some((false, seen)) => (HiveState::Unreachable, seen.clone()),
                    None => (HiveState::Unknown, None),
                };
                HiveStatus {
                    managed: local_name.as_deref() == Some(h.name.as_str()),
                    name: h.name,
                    url: h.url,
                    status,
                    last_seen,
                }
            })
            .collect()
    }

    /// Asks a hive whether it is alive, and remembers the answer.
    pub async fn check(&self, hive: &HiveConn) -> Result<(), String> {
        let client = hive.client();
        let answer = client.health();
        let result = match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(h)) if h.role == "hive" => Ok(()),
            Ok(Ok(h)) => Err(format!("{} answers as a {}, not a hive", hive.url, h.role)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{} did not answer within 5s", hive.url)),
        };
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let seen = health.get(&hive.name).and_then(|(_, s)| s.clone());
        let now = result.is_ok().then(now_rfc3339);
        health.insert(hive.name.clone(), (result.is_ok(), now.or(seen)));
        result
    }

    /// Checks every hive now and then, forever.
    pub async fn watch_health(self) {
        loop {
            for hive in self.all().await {
                if let Err(e) = self.check(&hive).await {
                    tracing::debug!("hive {} is unreachable: {e}", hive.name);
                }
            }
            tokio::time::sleep(HEALTH_EVERY).await;
        }
    }

    /// The local hive, started now if it is not running. `narrate` hears what happens.
    pub async fn ensure_local(&self, narrate: impl Fn(&str, String)) -> Result<HiveConn, String> {
        self.local.ensure(self, narrate).await
    }

    /// Stops the local hive, which stops its workers first; waits a bounded time.
    pub async fn stop_local(&self) {
        self.local.stop().await;
    }
}
