//! The hive's model catalog: which models this machine has, in sled.
//!
//! Only this module touches sled. Each entry is one JSON value keyed by the
//! catalog name; every write is flushed before it returns, so an entry that was
//! reported as added survives a crash of the hive.

use super::state::Changes;
use crate::protocol::ModelEntry;
use std::path::Path;

#[derive(Clone)]
pub struct Catalog {
    db: sled::Db,
    /// Told of every write, for the hive's state stream.
    changes: Changes,
}

impl Catalog {
    pub fn open(dir: &Path, changes: Changes) -> Result<Catalog, String> {
        let db = sled::open(dir).map_err(|e| {
            format!(
                "cannot open the model catalog at {} (is another hive using this --data-dir?): {e}",
                dir.display()
            )
        })?;
        Ok(Catalog { db, changes })
    }

    pub fn list(&self) -> Vec<ModelEntry> {
        self.db
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<ModelEntry> {
        let bytes = self.db.get(name).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// The entry added by this reference, or for this file.
    pub fn find(&self, model_ref: &str, path: Option<&Path>) -> Option<ModelEntry> {
        self.list()
            .into_iter()
            .find(|m| m.model_ref == model_ref || path.is_some_and(|p| Path::new(&m.path) == p))
    }

    pub fn put(&self, entry: &ModelEntry) -> Result<(), String> {
        let bytes = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        self.db
            .insert(entry.name.as_bytes(), bytes)
            .and_then(|_| self.db.flush())
            .map(|_| self.changes.bump())
            .map_err(|e| format!("cannot write the catalog: {e}"))
    }

    pub fn remove(&self, name: &str) -> Result<Option<ModelEntry>, String> {
        let old = self
            .db
            .remove(name)
            .map_err(|e| format!("cannot write the catalog: {e}"))?;
        self.db
            .flush()
            .map_err(|e| format!("cannot write the catalog: {e}"))?;
        self.changes.bump();
        Ok(old.and_then(|v| serde_json::from_slice(&v).ok()))
    }
}
