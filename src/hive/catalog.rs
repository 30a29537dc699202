//! The hive's model catalog: which models this machine has, one entry per
//! catalog name, in a [`Store`]: every write on disk before it returns, and
//! a damaged catalog found at start (`rbee hive --rebuild-catalog`).

use super::state::Changes;
use crate::protocol::ModelEntry;
use crate::store::Store;
use std::path::Path;

#[derive(Clone)]
pub struct Catalog {
    store: Store,
    /// Told of every write, for the hive's state stream.
    changes: Changes,
}

impl Catalog {
    /// Opens the catalog at `path`, in the data dir `data_dir`.
    pub fn open(path: &Path, data_dir: &Path, changes: Changes) -> Result<Catalog, String> {
        let recovery = format!(
            "Run `rbee hive --rebuild-catalog --data-dir {}` to rebuild it from the model files there \
             (models registered in place from elsewhere are then added again on their next use)",
            data_dir.display()
        );
        let store = Store::open(path, "model catalog", "hive", &recovery)?;
        Ok(Catalog { store, changes })
    }

    /// A new, empty catalog at `path`, the old one moved aside; where it went.
    pub fn replace(path: &Path, changes: Changes) -> Result<(Catalog, std::path::PathBuf), String> {
        let aside = crate::store::set_aside(path)?;
        let store = Store::open(path, "model catalog", "hive", "")?;
        Ok((Catalog { store, changes }, aside))
    }

    pub fn list(&self) -> Vec<ModelEntry> {
        self.store.list()
    }

    pub fn get(&self, name: &str) -> Option<ModelEntry> {
        self.store.get(name)
    }

    /// The entry added by this reference, or for this file.
    pub fn find(&self, model_ref: &str, path: Option<&Path>) -> Option<ModelEntry> {
        self.list()
            .into_iter()
            .find(|m| m.model_ref == model_ref || path.is_some_and(|p| Path::new(&m.path) == p))
    }

    pub fn put(&self, entry: &ModelEntry) -> Result<(), String> {
        self.store.put(&entry.name, entry)?;
        self.changes.bump();
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<Option<ModelEntry>, String> {
        let old = self.store.remove(name)?;
        self.changes.bump();
        Ok(old)
    }
}
