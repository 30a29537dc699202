//! Getting models onto this machine: resolving a reference to a catalog entry,
//! registering local files in place, and downloading from Hugging Face.
//!
//! A download runs on a thread of its own with the blocking client
//! ([`super::hf`]) and reports on its progress channel ([`super::downloads`]).
//! The file is written as `<name>.part`: after a dropped connection (retried)
//! or a restarted hive (resumed on the next request) the transfer continues
//! from the bytes already on disk, and the file takes its final name only
//! when whole and verified.

use super::catalog::Catalog;
use super::downloads::{Downloads, Joined};
use super::hf::{HfClient, Remote};
use crate::disk;
use crate::model_ref::{HfPick, ModelRef};
use crate::protocol::{
    now_rfc3339, ApiError, DownloadEvent, DownloadStarted, DownloadState, ErrorCode, Hashing,
    ModelEntry, ModelSettings,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Clone)]
pub struct Models {
    catalog: Catalog,
    /// Where downloaded models go: `<dir>/<org>/<repo>/<file>`.
    dir: PathBuf,
    hf: Arc<HfClient>,
    downloads: Downloads,
    /// Registered files whose sha256 is being computed, by catalog name.
    hashing: HashingNow,
    /// Downloads counted for `GET /metrics`.
    metrics: crate::metrics::HiveMetrics,
}

type HashingNow = Arc<Mutex<HashMap<String, Hashing>>>;

impl Models {
    pub fn metrics(&self) -> &crate::metrics::HiveMetrics {
        &self.metrics
    }

    pub fn new(catalog: Catalog, dir: PathBuf) -> Models {
        Models {
            catalog,
            dir,
            hf: Arc::new(HfClient::from_env()),
            downloads: Downloads::default(),
            hashing: HashingNow::default(),
            metrics: crate::metrics::HiveMetrics::default(),
        }
    }

    /// The catalog, with how far each file being hashed has got.
    pub fn list(&self) -> Vec<ModelEntry> {
        let hashing = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.catalog.list();
        for entry in all.iter_mut().filter(|e| e.sha256.is_empty()) {
            entry.hashing = hashing.get(&entry.name).copied();
        }
        all
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn models_dir(&self) -> &Path {
        &self.dir
    }

    /// Makes sure the model is here: at once for catalog names, local files
    /// and models already downloaded, else by starting (or joining) a download.
    pub async fn download(&self, model_ref: &str) -> Result<DownloadStarted, ApiError> {
        let (repo, pick) = match parse(model_ref)? {
            ModelRef::HuggingFace { repo, pick } => (repo, pick),
            _ => return Ok(self.complete(self.find(model_ref).await?)),
        };
        if let Some(entry) = self.on_disk(model_ref, None) {
            return Ok(self.complete(entry));
        }
        let remote = self.resolve(repo, pick).await?;
        let local_path = self.dir.join(&remote.repo).join(&remote.file);
        if let Some(size) = remote.size {
            disk::ensure_room(&self.dir, size, &remote.file)
                .map_err(|m| ApiError::new(ErrorCode::DiskFull, m))?;
        }
        if let Some(entry) = self.on_disk("", Some(&local_path)) {
            return Ok(self.complete(entry));
        }
        let download_id = match self
            .downloads
            .join_or_start(&local_path, remote.size.unwrap_or(0))
        {
            Joined::Running(id) => id,
            Joined::New(id, progress) => {
                self.spawn_fetch(remote, model_ref, local_path.clone(), progress)?;
                id
            }
        };
        Ok(DownloadStarted {
            download_id,
            local_path: local_path.display().to_string(),
            state: DownloadState::Downloading,
        })
    }

    /// Registers every GGUF file under the models directory: what a
    /// rebuilt catalog holds. Downloads (`<org>/<repo>/<file>`) get their
    /// `hf:` reference back; anything else is registered as a file.
    pub fn rebuild(&self) -> Result<Vec<ModelEntry>, String> {
        let mut found = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(listing) = std::fs::read_dir(&dir) else {
                continue;
            };
            for item in listing.flatten() {
                let path = item.path();
                let Ok(kind) = item.file_type() else { continue };
                if kind.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let is_gguf = path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
                if !kind.is_file() || !is_gguf {
                    continue;
                }
                let parts: Vec<String> = path
                    .strip_prefix(&self.dir)
                    .map(|r| r.iter().map(|p| p.to_string_lossy().into_owned()).collect())
                    .unwrap_or_default();
                let model_ref = match parts.as_slice() {
                    [org, repo, file] => format!("hf:{org}/{repo}/{file}"),
                    _ => format!("file:{}", path.display()),
                };
                let info = match crate::gguf::read(&path) {
                    Ok(info) => info,
                    Err(e) => {
                        tracing::warn!("left {} out of the catalog: {e}", path.display());
                        continue;
                    }
                };
                let sha256 = disk::sha256_file(&path)?;
                let entry = entry_for(&path, &model_ref, sha256, info, true);
                self.catalog.put(&entry)?;
                found.push(entry);
            }
        }
        Ok(found)
    }

    /// Removes the partial downloads that are not running now.
    pub fn remove_partials(&self) -> crate::protocol::PartialsRemoved {
        let mut removed = Vec::new();
        let mut freed = 0;
        for (part, size) in disk::partial_files(&self.dir) {
            let whole = part.with_extension("");
            if self.downloads.running(&whole) {
                continue;
            }
            match std::fs::remove_file(&part) {
                Ok(()) => {
                    freed += size;
                    removed.push(part.display().to_string());
                }
                Err(e) => tracing::warn!("cannot remove {}: {e}", part.display()),
            }
        }
        crate::protocol::PartialsRemoved {
            removed,
            freed_mb: freed.div_ceil(1 << 20),
        }
    }

    /// The progress of a download, if there is one with that id.
    pub fn progress(&self, id: &str) -> Option<watch::Receiver<DownloadEvent>> {
        self.downloads.progress(id)
    }

    /// The catalog entry a reference names, registering a local file if needed.
    /// A Hugging Face model must have been downloaded first.
    pub async fn find(&self, model_ref: &str) -> Result<ModelEntry, ApiError> {
        match parse(model_ref)? {
            ModelRef::Name(name) => self.catalog.get(&name).ok_or_else(|| {
                ApiError::new(ErrorCode::ModelNotFound, format!("no model named {name} in this hive's catalog"),
                )
            }),
            ModelRef::File(path) => {
                let (catalog, hashing) = (self.catalog.clone(), self.hashing.clone());
                let model_ref = model_ref.to_string();
                blocking(move || register_file(&catalog, &hashing, &path, &model_ref)).await
            }
            ModelRef::HuggingFace { .. } => self.on_disk(model_ref, None).ok_or_else(|| {
                    ApiError::new(ErrorCode::ModelNotFound, format!(
                            "{model_ref} is not in this hive's catalog: download it first (POST /v1/models/download)"
                        ),
                    )
                }),
        }
    }

    /// Removes a model from the catalog, and its file when the hive owns it.
    pub fn delete(&self, name: &str) -> Result<ModelEntry, ApiError> {
        let internal = |m: String| ApiError::new(ErrorCode::Internal, m);
        let entry = self
            .catalog
            .remove(name)
            .map_err(internal)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ModelNotFound,
                    format!("no model named {name} in this hive's catalog"),
                )
            })?;
        if entry.owned {
            if let Err(e) = std::fs::remove_file(&entry.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(internal(format!("cannot remove {}: {e}", entry.path)));
                }
            }
        }
        Ok(entry)
    }

    /// Sets a model's worker settings (what `plan_for` starts its workers
    /// with); the entry as it now is. The caller has checked them.
    pub fn set_settings(
        &self,
        name: &str,
        settings: ModelSettings,
    ) -> Result<ModelEntry, ApiError> {
        let mut entry = self.catalog.get(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("no model named {name} in this hive's catalog"),
            )
        })?;
        entry.settings = settings;
        self.catalog
            .put(&entry)
            .map_err(|m| ApiError::new(ErrorCode::Internal, m))?;
        Ok(entry)
    }

    /// A catalog entry whose file is still there.
    fn on_disk(&self, model_ref: &str, path: Option<&Path>) -> Option<ModelEntry> {
        self.catalog
            .find(model_ref, path)
            .filter(|e| Path::new(&e.path).is_file())
    }

    /// Which file of the repository the reference means, as Hugging Face lists it.
    async fn resolve(&self, repo: String, pick: HfPick) -> Result<Remote, ApiError> {
        let hf = self.hf.clone();
        blocking(move || hf.resolve(&repo, &pick)).await
    }

    /// The answer for a model that is here already.
    fn complete(&self, entry: ModelEntry) -> DownloadStarted {
        DownloadStarted {
            download_id: self.downloads.complete(&entry.path),
            local_path: entry.path,
            state: DownloadState::Complete,
        }
    }

    /// Runs the transfer on a thread of its own; its last event says how it ended.
    fn spawn_fetch(
        &self,
        remote: Remote,
        model_ref: &str,
        path: PathBuf,
        progress: watch::Sender<DownloadEvent>,
    ) -> Result<(), ApiError> {
        let this = self.clone();
        let model_ref = model_ref.to_string();
        std::thread::Builder::new()
            .name("download".into())
            .spawn(move || {
                let have = |p: &watch::Sender<DownloadEvent>| match &*p.borrow() {
                    DownloadEvent::Downloading {
                        bytes_downloaded, ..
                    } => *bytes_downloaded,
                    _ => 0,
                };
                let before = have(&progress);
                let outcome = this.fetch_and_register(&remote, &model_ref, &path, &progress);
                this.metrics
                    .downloaded(have(&progress).saturating_sub(before));
                let last = match outcome {
                    Ok(entry) => {
                        this.metrics.download_ended("complete");
                        DownloadEvent::Complete {
                            local_path: entry.path,
                        }
                    }
                    Err(message) => {
                        tracing::warn!("download of {model_ref} failed: {message}");
                        this.metrics.download_ended("error");
                        DownloadEvent::Error { message }
                    }
                };
                progress.send_replace(last);
            })
            .map(|_| ())
            .map_err(|e| ApiError::internal(format!("cannot start a download thread: {e}")))
    }

    fn fetch_and_register(
        &self,
        remote: &Remote,
        model_ref: &str,
        path: &Path,
        progress: &watch::Sender<DownloadEvent>,
    ) -> Result<ModelEntry, String> {
        let part = PathBuf::from(format!("{}.part", path.display()));
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let sha256 = self.hf.fetch(remote, &part, progress)?;
        std::fs::rename(&part, path).map_err(|e| {
            format!(
                "cannot move the download into place at {}: {e}",
                path.display()
            )
        })?;
        let info = match crate::gguf::read(path) {
            Ok(info) => info,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(format!("the downloaded file was removed: {e}"));
            }
        };
        let entry = entry_for(path, model_ref, sha256, info, true);
        self.catalog.put(&entry)?;
        tracing::info!("downloaded {model_ref} to {}", path.display());
        Ok(entry)
    }
}

fn parse(model_ref: &str) -> Result<ModelRef, ApiError> {
    crate::model_ref::check(model_ref)
}

/// Registers a GGUF file in place (no copy); the hive never deletes it.
fn register_file(
    catalog: &Catalog,
    hashing: &HashingNow,
    path: &Path,
    model_ref: &str,
) -> Result<ModelEntry, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidModel, m);
    let path = std::fs::canonicalize(path).map_err(|e| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("cannot open model file {}: {e}", path.display()),
        )
    })?;
    // Opening a FIFO or a device would block or read forever.
    let meta = std::fs::metadata(&path)
        .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(bad(format!("{} is not a regular file", path.display())));
    }
    let size = meta.len();
    if let Some(entry) = catalog.find("", Some(&path)) {
        if entry.size == size {
            return Ok(entry);
        }
    }
    let info = crate::gguf::read(&path).map_err(bad)?;
    // Hashing a large file takes minutes (50 GB): the entry is usable at
    // once, and gets its sha256 when the hash is done.
    let entry = entry_for(&path, model_ref, String::new(), info, false);
    catalog
        .put(&entry)
        .map_err(|m| ApiError::new(ErrorCode::Internal, m))?;
    tracing::info!("registered {} in place; hashing it", path.display());
    hash_later(catalog.clone(), hashing.clone(), entry.clone());
    Ok(entry)
}

/// Computes a registered file's sha256 on a thread of its own, saying how
/// far it has got in `hashing`, and records it, unless the entry has gone or
/// changed meanwhile.
fn hash_later(catalog: Catalog, hashing: HashingNow, entry: ModelEntry) {
    let (name, bytes_total) = (entry.name.clone(), entry.size);
    let progress = move |done: Option<u64>| {
        let mut now = hashing.lock().unwrap_or_else(|p| p.into_inner());
        match done {
            Some(bytes_hashed) => now.insert(
                name.clone(),
                Hashing {
                    bytes_hashed,
                    bytes_total,
                },
            ),
            None => now.remove(&name),
        };
    };
    // Said before the registration answers, so a listing right after shows it.
    progress(Some(0));
    std::thread::spawn(move || {
        let path = PathBuf::from(&entry.path);
        let mut said = 0;
        let hashed = disk::sha256_file_reporting(&path, |done| {
            // Every 64 MiB: a lock per MiB read would be noise.
            if done - said >= 64 << 20 {
                said = done;
                progress(Some(done));
            }
        });
        match hashed {
            Ok(sha256) => {
                let unchanged = catalog
                    .get(&entry.name)
                    .is_some_and(|now| now.path == entry.path && now.size == entry.size);
                if unchanged {
                    if let Err(e) = catalog.put(&ModelEntry { sha256, ..entry }) {
                        tracing::warn!("cannot record the sha256 of {}: {e}", path.display());
                    }
                }
            }
            Err(e) => tracing::warn!("cannot hash {}: {e}", path.display()),
        }
        progress(None);
    });
}

fn entry_for(
    path: &Path,
    model_ref: &str,
    sha256: String,
    info: crate::gguf::GgufInfo,
    owned: bool,
) -> ModelEntry {
    ModelEntry {
        name: crate::gguf::catalog_name(path),
        model_ref: model_ref.to_string(),
        path: path.display().to_string(),
        size: std::fs::metadata(path).map_or(0, |m| m.len()),
        sha256,
        architecture: info.architecture,
        parameters: info.parameters,
        quantization: info.quantization,
        context_length: info.context_length,
        layers: info.layers,
        owned,
        added_at: now_rfc3339(),
        hashing: None,
        settings: Default::default(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::new(
            ErrorCode::Internal,
            format!("task failed: {e}"),
        ))
    })
}
