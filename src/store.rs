//! The one way rbee keeps state on disk (the hive's catalog, the queen's
//! registry): a sled tree of JSON values, each write flushed before it
//! returns, with a check file beside it so that a damaged store is found at
//! start and named, never served as empty (DESIGN.md §5).
//!
//! The check file (`<store>.check`, written whole and renamed into place)
//! records the keys the store holds and a digest of its keys and values. A
//! write records the state it is about to make as pending first, then writes
//! and flushes sled, then records it as done: a crash between the two leaves
//! a store that matches one of them, which opens; anything else is damage.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    check_path: PathBuf,
    /// What it holds, in words: "model catalog", "hive registry".
    what: &'static str,
    /// One write at a time, so the check file follows them in order.
    writing: std::sync::Arc<std::sync::Mutex<()>>,
}

/// What the check file says the store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Check {
    keys: Vec<String>,
    digest: String,
    /// The state a write in progress is making.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Box<Check>>,
}

type Contents = BTreeMap<Vec<u8>, Vec<u8>>;

impl Check {
    fn of(contents: &Contents) -> Check {
        Check {
            keys: contents
                .keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect(),
            digest: digest(contents),
            pending: None,
        }
    }

    fn matches(&self, found: &Check) -> bool {
        (self.keys == found.keys && self.digest == found.digest)
            || self.pending.as_deref().is_some_and(|p| p.matches(found))
    }
}

/// FNV-1a over length-prefixed keys and values: stable across builds, unlike
/// std's hasher, and plenty to tell a damaged store from a whole one.
fn digest(contents: &Contents) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (k, v) in contents {
        eat(k);
        eat(v);
    }
    format!("{h:016x}")
}

/// Why sled did not open a store.
enum Opened {
    /// Another process holds it, or the file system refused: said in words.
    Refused(String),
    /// sled could not read what is there.
    Unreadable(sled::Error),
}

/// sled's database at `path`; on a full disk, the space set aside (`reserve`) lets it open.
fn open_sled(path: &Path, reserve: &Path, what: &str, owner: &str) -> Result<sled::Db, Opened> {
    let db = match sled::open(path) {
        // sled writes as it opens: on a full disk, the space set aside lets it.
        Err(sled::Error::Io(io)) if crate::disk::is_full(&io) && reserve.exists() => {
            tracing::warn!(
                "the disk under {} is full: using the {} MiB set aside to open the {what}; free some space",
                path.display(),
                RESERVE_BYTES >> 20
            );
            let _ = std::fs::remove_file(reserve);
            sled::open(path)
        }
        opened => opened,
    };
    db.map_err(|e| match &e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            Opened::Refused(format!(
                "cannot open the {what} at {}: is another {owner} using this --data-dir?",
                path.display()
            ))
        }
        sled::Error::Io(io) => Opened::Refused(format!(
            "cannot open the {what} at {}: {io}",
            path.display()
        )),
        _ => Opened::Unreadable(e),
    })
}

impl Store {
    /// Opens (or creates) the store at `path`. A store that does not hold
    /// what its check file says it was last given is an error naming what is
    /// missing, with `recovery`: what the user can do about it.
    /// `owner` is the role that keeps it, for the message when another one
    /// has it open.
    pub fn open(
        path: &Path,
        what: &'static str,
        owner: &str,
        recovery: &str,
    ) -> Result<Store, String> {
        let check_path = PathBuf::from(format!("{}.check", path.display()));
        let damaged = |why: String| {
            format!(
                "the {what} at {} is damaged: {why}. {recovery}",
                path.display()
            )
        };
        let expected = match std::fs::read(&check_path) {
            Ok(bytes) => Some(serde_json::from_slice::<Check>(&bytes).map_err(|e| {
                damaged(format!(
                    "its check file {} is unreadable ({e})",
                    check_path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", check_path.display())),
        };
        if !path.exists() && expected.as_ref().is_some_and(|c| !c.keys.is_empty()) {
            return Err(damaged("it is missing".into()));
        }
        let existed = path.exists();
        let reserve = PathBuf::from(format!("{}.reserve", path.display()));
        let db = open_sled(path, &reserve, what, owner).map_err(|e| match e {
            Opened::Refused(said) => said,
            Opened::Unreadable(e) => damaged(format!(
                "sled cannot read it ({e}){}",
                held(expected.as_ref())
            )),
        })?;
        let store = Store {
            db,
            check_path,
            what,
            writing: Default::default(),
        };
        let contents = store.contents().map_err(|e| {
            damaged(format!(
                "sled cannot read it ({e}){}",
                held(expected.as_ref())
            ))
        })?;
        let found = Check::of(&contents);
        if expected.is_none() && existed && contents.is_empty() {
            // A store that was there holds nothing, and nothing says what it held.
            return Err(damaged(format!(
                "it holds nothing and its check file {} is missing, so what it held cannot be \
                 told; if it is meant to start empty, remove {} and start again",
                store.check_path.display(),
                path.display()
            )));
        }
        match expected {
            Some(expected) if !expected.matches(&found) => {
                return Err(damaged(describe_loss(&expected, &found)));
            }
            Some(expected) if expected.pending.is_none() => {}
            // New, from before check files, or a write interrupted: record what is there.
            _ => store.write_check(&found)?,
        }
        set_aside_space(&reserve);
        Ok(store)
    }

    fn contents(&self) -> Result<Contents, sled::Error> {
        self.db
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect()
    }

    /// Every value, in key order; one that does not parse is logged and left out.
    pub fn list<T: DeserializeOwned>(&self) -> Vec<T> {
        self.db
            .iter()
            .filter_map(|kv| match kv {
                Ok((k, v)) => match serde_json::from_slice(&v) {
                    Ok(value) => Some(value),
                    Err(e) => {
                        tracing::warn!(
                            "{} entry {} is unreadable: {e}",
                            self.what,
                            String::from_utf8_lossy(&k)
                        );
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!("cannot read the {}: {e}", self.what);
                    None
                }
            })
            .collect()
    }

    /// Every key, in order.
    pub fn keys(&self) -> Vec<String> {
        self.db
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect()
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes = self.db.get(key).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores `value` under `key`; on disk when this returns.
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.write(key, Some(bytes)).map(|_| ())
    }

    /// Removes `key`, returning what it held; on disk when this returns.
    pub fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        let old = self.write(key, None)?;
        Ok(old.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// One write: the check file told first, then sled written and flushed,
    /// then the check file told it is done.
    fn write(&self, key: &str, value: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, String> {
        let fail = |e: &dyn std::fmt::Display| format!("cannot write the {}: {e}", self.what);
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut contents = self.contents().map_err(|e| fail(&e))?;
        let before = Check::of(&contents);
        match &value {
            Some(v) => contents.insert(key.as_bytes().to_vec(), v.clone()),
            None => contents.remove(key.as_bytes()),
        };
        let after = Check::of(&contents);
        self.write_check(&Check {
            pending: Some(Box::new(after.clone())),
            ..before
        })?;
        let old = match value {
            Some(v) => self.db.insert(key, v),
            None => self.db.remove(key),
        }
        .and_then(|old| self.db.flush().map(|_| old))
        .map_err(|e| fail(&e))?;
        self.write_check(&after)?;
        Ok(old.map(|v| v.to_vec()))
    }

    /// Writes the check file whole: to a temporary file, synced, renamed.
    fn write_check(&self, check: &Check) -> Result<(), String> {
        use std::io::Write;
        let tmp = PathBuf::from(format!("{}.tmp", self.check_path.display()));
        let fail = |e: std::io::Error| format!("cannot write {}: {e}", self.check_path.display());
        let bytes = serde_json::to_vec(check).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        file.write_all(&bytes)
            .and_then(|_| file.sync_all())
            .map_err(fail)?;
        std::fs::rename(&tmp, &self.check_path).map_err(fail)
    }
}

/// Space kept beside each store so that it still opens on a full disk.
const RESERVE_BYTES: usize = 8 << 20;

/// Writes the reserve file if it is missing and there is room (best effort).
fn set_aside_space(reserve: &Path) {
    if reserve.exists() {
        return;
    }
    if std::fs::write(reserve, vec![0u8; RESERVE_BYTES]).is_err() {
        let _ = std::fs::remove_file(reserve);
    }
}

/// What the check file says the store held, in words, if anything.
fn held(expected: Option<&Check>) -> String {
    match expected {
        Some(c) if !c.keys.is_empty() => format!("; it held: {}", c.keys.join(", ")),
        _ => String::new(),
    }
}

/// What a damaged store lost, in words.
fn describe_loss(expected: &Check, found: &Check) -> String {
    let missing: Vec<&str> = expected
        .keys
        .iter()
        .filter(|k| !found.keys.contains(k))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        format!(
            "it holds {} entries whose contents differ from what was written",
            found.keys.len()
        )
    } else {
        format!(
            "it holds {} of the {} entries written; missing: {}",
            found.keys.len(),
            expected.keys.len(),
            missing.join(", ")
        )
    }
}

/// Moves a damaged store and its check file aside, to `<path>.damaged-<unix
/// seconds>`, so that a fresh one can take its place; where they went.
pub fn set_aside(path: &Path) -> Result<PathBuf, String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = PathBuf::from(format!("{}.damaged-{secs}", path.display()));
    let check = PathBuf::from(format!("{}.check", path.display()));
    for (from, to) in [
        (path.to_path_buf(), aside.clone()),
        (check, PathBuf::from(format!("{}.check", aside.display()))),
    ] {
        if from.exists() {
            std::fs::rename(&from, &to)
                .map_err(|e| format!("cannot move {} aside: {e}", from.display()))?;
        }
    }
    Ok(aside)
}

/// A store opened at its first use, or at start when it is on disk already
/// (so a damaged one still stops its daemon at once): a daemon that never
/// uses it carries none of sled's threads and caches (a third of an idle
/// queen's memory each).
#[derive(Clone)]
pub struct Lazy {
    path: PathBuf,
    what: &'static str,
    owner: &'static str,
    recovery: String,
    store: std::sync::Arc<std::sync::OnceLock<Store>>,
}

impl Lazy {
    pub fn open(
        path: &Path,
        what: &'static str,
        owner: &'static str,
        recovery: &str,
    ) -> Result<Lazy, String> {
        let lazy = Lazy {
            path: path.to_path_buf(),
            what,
            owner,
            recovery: recovery.to_string(),
            store: std::sync::Arc::default(),
        };
        if path.exists() {
            lazy.get()?;
        }
        Ok(lazy)
    }

    /// The store, opened now if it was not.
    pub fn get(&self) -> Result<&Store, String> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        let store = Store::open(&self.path, self.what, self.owner, &self.recovery)?;
        Ok(self.store.get_or_init(|| store))
    }

    /// The store if it is open: none means nothing was ever written.
    pub fn opened(&self) -> Option<&Store> {
        self.store.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rbee-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A store at `path` that was given these entries and closed.
    fn written(path: &Path, entries: &[(&str, &str)]) {
        let s = Store::open(path, "test store", "test", "Run the fixer.").unwrap();
        for (k, v) in entries {
            s.put(k, v).unwrap();
        }
    }

    #[test]
    fn what_was_written_opens_again() {
        let d = dir("reopen");
        let path = d.join("s");
        {
            let s = Store::open(&path, "test store", "test", "fix it").unwrap();
            s.put("a", &1).unwrap();
            s.put("b", &2).unwrap();
            assert_eq!(s.remove::<i32>("a").unwrap(), Some(1));
        }
        let s = Store::open(&path, "test store", "test", "fix it").unwrap();
        assert_eq!(s.list::<i32>(), vec![2]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_store_that_lost_entries_is_refused_naming_them() {
        let d = dir("lost");
        let path = d.join("s");
        written(
            &path,
            &[("mac", "http://mac:8080"), ("pc", "http://pc:8080")],
        );
        // sled starts empty where its files were: as if emptied.
        std::fs::remove_dir_all(&path).unwrap();
        std::fs::create_dir_all(&path).unwrap();
        let err = Store::open(&path, "test store", "test", "Run the fixer.")
            .err()
            .unwrap();
        assert!(
            err.contains(
                "is damaged: it holds 0 of the 2 entries written; missing: mac, pc. Run the fixer."
            ),
            "{err}"
        );
        // Gone altogether, too.
        std::fs::remove_dir_all(&path).unwrap();
        let err = Store::open(&path, "test store", "test", "Run the fixer.")
            .err()
            .unwrap();
        assert!(err.contains("is damaged: it is missing"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_write_cut_short_either_side_of_sled_opens() {
        let before: Contents = [(b"a".to_vec(), b"1".to_vec())].into();
        let after: Contents = [
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"2".to_vec()),
        ]
        .into();
        let pending = Check {
            pending: Some(Box::new(Check::of(&after))),
            ..Check::of(&before)
        };
        assert!(pending.matches(&Check::of(&before)));
        assert!(pending.matches(&Check::of(&after)));
        assert!(!pending.matches(&Check::of(&Contents::new())));
        let changed: Contents = [(b"a".to_vec(), b"9".to_vec())].into();
        assert!(!Check::of(&before).matches(&Check::of(&changed)));
    }

    #[test]
    fn an_emptied_store_without_its_check_file_does_not_start_empty() {
        let d = dir("nocheck");
        let path = d.join("s");
        written(&path, &[("mac", "http://mac:8080")]);
        std::fs::remove_file(d.join("s.check")).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
        std::fs::create_dir_all(&path).unwrap();
        let err = Store::open(&path, "test store", "test", "Run the fixer.")
            .err()
            .unwrap();
        assert!(
            err.contains("its check file") && err.contains("is missing"),
            "{err}"
        );
        // Told to (the store removed), it starts new.
        std::fs::remove_dir_all(&path).unwrap();
        assert!(Store::open(&path, "test store", "test", "Run the fixer.").is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_check_file_is_named() {
        let d = dir("check");
        let path = d.join("s");
        drop(Store::open(&path, "test store", "test", "fix it").unwrap());
        std::fs::write(d.join("s.check"), b"\0\0garbage").unwrap();
        let err = Store::open(&path, "test store", "test", "fix it")
            .err()
            .unwrap();
        assert!(
            err.contains("check file") && err.contains("unreadable"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
