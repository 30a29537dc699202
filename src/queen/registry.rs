//! The queen's hives: the registered ones (in sled, surviving restarts) and
//! the local hive the queen may start itself (`local_hive.rs`). How each is
//! doing is the live view's business (`view.rs`).
//!
//! Only this module and the hive's catalog touch sled.

use super::local_hive::LocalHive;
use crate::protocol::{AddHive, ApiError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The name of the hive on the queen's own machine.
pub const LOCALHOST: &str = "localhost";

/// What the queen needs to talk to a hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveConn {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
}

#[derive(Clone)]
pub struct Registry {
    db: sled::Db,
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

    /// Whether `name` is the hive this queen started itself.
    pub async fn is_managed(&self, name: &str) -> bool {
        self.local.conn().await.is_some_and(|l| l.name == name)
    }

    /// The local hive, started now if it is not running. `narrate` hears what happens.
    pub async fn ensure_local(&self, narrate: impl Fn(&str, String)) -> Result<HiveConn, String> {
        self.local.ensure(narrate).await
    }

    /// Stops the local hive, which stops its workers first; waits a bounded time.
    pub async fn stop_local(&self) {
        self.local.stop().await;
    }
}
