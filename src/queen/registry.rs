//! The queen's hives: the registered ones (in sled, surviving restarts) and
//! the local hive the queen may start itself (`local_hive.rs`). How each is
//! doing is the live view's business (`view.rs`).
//!
//! The registered hives live in a [`Store`]: a damaged registry stops the
//! queen, naming the hives it lost.

use super::local_hive::LocalHive;
use crate::protocol::{AddHive, ApiError};
use crate::store::Store;
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
    store: Store,
    /// The hive this queen starts itself on `localhost`.
    local: LocalHive,
    /// Whether it may (`--no-local-hive` says not).
    local_allowed: bool,
}

impl Registry {
    pub fn open(
        data_dir: PathBuf,
        token: Option<String>,
        local_allowed: bool,
    ) -> Result<Registry, String> {
        let path = data_dir.join("queen-hives");
        let recovery = format!(
            "Move it away (mv {0} {0}.damaged; mv {0}.check {0}.check.damaged), start the queen \
             again and add the hives again with `rbee keeper hive add NAME --url URL`",
            path.display()
        );
        let store = Store::open(&path, "hive registry", "queen", &recovery)?;
        Ok(Registry {
            store,
            local: LocalHive::new(data_dir, token)?,
            local_allowed,
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
        self.store
            .put(&conn.name, &conn)
            .map_err(ApiError::internal)?;
        Ok(conn)
    }

    /// Forgets a registered hive; false if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, ApiError> {
        let old: Option<HiveConn> = self.store.remove(name).map_err(ApiError::internal)?;
        Ok(old.is_some())
    }

    fn registered(&self) -> Vec<HiveConn> {
        self.store.list()
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
        if !self.local_allowed {
            return Err(
                "this queen starts no hive of its own (--no-local-hive, RBEE_LOCAL_HIVE=off): \
                 register one with `rbee keeper hive add`"
                    .into(),
            );
        }
        self.local.ensure(narrate).await
    }

    /// Whether this queen may start a hive on its own machine.
    pub fn local_allowed(&self) -> bool {
        self.local_allowed
    }

    /// Stops the local hive, which stops its workers first; waits a bounded time.
    pub async fn stop_local(&self) {
        self.local.stop().await;
    }
}
