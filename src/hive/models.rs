//! Getting models onto this machine: resolving references, registering local
//! files, and downloading from Hugging Face with resume, checksums and live
//! progress.
//!
//! A download runs on a thread of its own with the blocking `ureq` client and
//! reports on a `watch` channel, so any number of subscribers see where it
//! stands, a late one included. Two requests for the same file share one
//! download. The file is written as `<name>.part`: after a dropped connection
//! (retried here) or a restarted hive (resumed on the next request) the
//! transfer continues with a `Range` request from the bytes already on disk.

use super::catalog::Catalog;
use super::model_ref::{HfPick, ModelRef};
use crate::protocol::{
    new_id, now_rfc3339, ApiError, DownloadEvent, DownloadStarted, DownloadState, ErrorCode,
    ModelEntry,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Retries of a dropped transfer before the download is given up.
const MAX_RETRIES: u32 = 5;
/// Room left on the disk beyond the file itself.
const DISK_MARGIN: u64 = 64 << 20;

#[derive(Clone)]
pub struct Models {
    catalog: Catalog,
    /// Where downloaded models go: `<dir>/<org>/<repo>/<file>`.
    dir: PathBuf,
    hf: Arc<HfClient>,
    /// Every download since the hive started, by id; finished ones keep their last event.
    downloads: Arc<Mutex<HashMap<String, Download>>>,
}

#[derive(Clone)]
struct Download {
    local_path: PathBuf,
    progress: watch::Receiver<DownloadEvent>,
}

impl Download {
    fn finished(&self) -> bool {
        !matches!(*self.progress.borrow(), DownloadEvent::Downloading { .. })
    }
}

impl Models {
    pub fn new(catalog: Catalog, dir: PathBuf) -> Models {
        Models {
            catalog,
            dir,
            hf: Arc::new(HfClient::from_env()),
            downloads: Arc::default(),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn models_dir(&self) -> &Path {
        &self.dir
    }

    /// Makes sure the model is here: at once for catalog names and local files,
    /// else by starting (or joining) a download whose id is returned.
    pub async fn download(&self, model_ref: &str) -> Result<DownloadStarted, ApiError> {
        let parsed =
            ModelRef::parse(model_ref).map_err(|m| ApiError::new(ErrorCode::InvalidModelRef, m))?;
        let ModelRef::HuggingFace { repo, pick } = parsed else {
            let entry = self.find(model_ref).await?;
            return Ok(self.finished(entry));
        };
        if let Some(entry) = self.catalog.find(model_ref, None) {
            if Path::new(&entry.path).is_file() {
                return Ok(self.finished(entry));
            }
        }
        let hf = self.hf.clone();
        let remote = blocking(move || hf.resolve(&repo, &pick)).await?;
        let local_path = self.dir.join(&remote.repo).join(&remote.file);
        if let Some(size) = remote.size {
            let mut existing = self.dir.clone();
            while !existing.exists() && existing.pop() {}
            if let Some(free) = free_space(&existing).filter(|&free| free < size + DISK_MARGIN) {
                return Err(ApiError::new(
                    ErrorCode::DiskFull,
                    format!(
                        "not enough disk space for {}: it is {} MB and {} has {} MB free",
                        remote.file,
                        size >> 20,
                        existing.display(),
                        free >> 20
                    ),
                ));
            }
        }
        if let Some(entry) = self.catalog.find("", Some(&local_path)) {
            if local_path.is_file() {
                return Ok(self.finished(entry));
            }
        }
        let mut downloads = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, _)) = downloads
            .iter()
            .find(|(_, d)| d.local_path == local_path && !d.finished())
        {
            return Ok(DownloadStarted {
                download_id: id.clone(),
                local_path: local_path.display().to_string(),
                state: DownloadState::Downloading,
            });
        }
        let id = new_id("dl");
        let (tx, rx) = watch::channel(DownloadEvent::Downloading {
            bytes_downloaded: 0,
            bytes_total: remote.size.unwrap_or(0),
            speed_mbps: 0.0,
        });
        downloads.insert(
            id.clone(),
            Download {
                local_path: local_path.clone(),
                progress: rx,
            },
        );
        drop(downloads);
        let this = self.clone();
        let model_ref = model_ref.to_string();
        let path = local_path.clone();
        std::thread::Builder::new()
            .name("download".into())
            .spawn(move || {
                let last = match this.fetch_and_register(&remote, &model_ref, &path, &tx) {
                    Ok(entry) => DownloadEvent::Complete {
                        local_path: entry.path,
                    },
                    Err(message) => {
                        tracing::warn!("download of {model_ref} failed: {message}");
                        DownloadEvent::Error { message }
                    }
                };
                tx.send_replace(last);
            })
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot start a download thread: {e}"),
                )
            })?;
        Ok(DownloadStarted {
            download_id: id,
            local_path: local_path.display().to_string(),
            state: DownloadState::Downloading,
        })
    }

    /// The progress of a download, if there is one with that id.
    pub fn progress(&self, id: &str) -> Option<watch::Receiver<DownloadEvent>> {
        let downloads = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        downloads.get(id).map(|d| d.progress.clone())
    }

    /// The catalog entry a reference names, registering a local file if needed.
    /// A Hugging Face model must have been downloaded first.
    pub async fn find(&self, model_ref: &str) -> Result<ModelEntry, ApiError> {
        let parsed =
            ModelRef::parse(model_ref).map_err(|m| ApiError::new(ErrorCode::InvalidModelRef, m))?;
        match parsed {
            ModelRef::Name(name) => self.catalog.get(&name).ok_or_else(|| {
                ApiError::new(ErrorCode::ModelNotFound, format!("no model named {name} in this hive's catalog"),
                )
            }),
            ModelRef::File(path) => {
                let catalog = self.catalog.clone();
                let model_ref = model_ref.to_string();
                blocking(move || register_file(&catalog, &path, &model_ref)).await
            }
            ModelRef::HuggingFace { .. } => self
                .catalog
                .find(model_ref, None)
                .filter(|e| Path::new(&e.path).is_file())
                .ok_or_else(|| {
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

    fn finished(&self, entry: ModelEntry) -> DownloadStarted {
        let id = new_id("dl");
        let (_, rx) = watch::channel(DownloadEvent::Complete {
            local_path: entry.path.clone(),
        });
        let mut downloads = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        downloads.insert(
            id.clone(),
            Download {
                local_path: PathBuf::from(&entry.path),
                progress: rx,
            },
        );
        DownloadStarted {
            download_id: id,
            local_path: entry.path,
            state: DownloadState::Complete,
        }
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

/// Registers a GGUF file in place (no copy); the hive never deletes it.
fn register_file(catalog: &Catalog, path: &Path, model_ref: &str) -> Result<ModelEntry, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidModel, m);
    let path = std::fs::canonicalize(path).map_err(|e| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("cannot open model file {}: {e}", path.display()),
        )
    })?;
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    if let Some(entry) = catalog.find("", Some(&path)) {
        if entry.size == size {
            return Ok(entry);
        }
    }
    let info = crate::gguf::read(&path).map_err(bad)?;
    let sha256 = sha256_file(&path).map_err(bad)?;
    let entry = entry_for(&path, model_ref, sha256, info, false);
    catalog
        .put(&entry)
        .map_err(|m| ApiError::new(ErrorCode::Internal, m))?;
    tracing::info!("registered {} in place", path.display());
    Ok(entry)
}

fn entry_for(
    path: &Path,
    model_ref: &str,
    sha256: String,
    info: crate::gguf::GgufInfo,
    owned: bool,
) -> ModelEntry {
    ModelEntry {
        name: crate::worker::model_name(path),
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
    }
}

fn sha256_file(path: &Path) -> Result<String, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    hash_reader(&mut file, &mut hasher)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

fn hash_reader(r: &mut impl Read, hasher: &mut Sha256) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stat` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The file a reference resolved to.
#[derive(Debug, Clone)]
pub struct Remote {
    repo: String,
    file: String,
    size: Option<u64>,
    sha256: Option<String>,
}

#[derive(Deserialize)]
struct RepoInfo {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize, Clone)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize, Clone)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Hugging Face's HTTP API: `HF_ENDPOINT` (default https://huggingface.co) and `HF_TOKEN`.
struct HfClient {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl HfClient {
    fn from_env() -> HfClient {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build()
            .into();
        HfClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            agent,
        }
    }

    fn get(&self, url: &str, range_from: u64) -> Result<ureq::http::Response<ureq::Body>, String> {
        let mut req = self.agent.get(url);
        if let Some(t) = &self.token {
            req = req.header("authorization", &format!("Bearer {t}"));
        }
        if range_from > 0 {
            req = req.header("range", &format!("bytes={range_from}-"));
        }
        req.call().map_err(|e| format!("cannot reach {url}: {e}"))
    }

    /// Refusals common to the listing and the file.
    fn refusal(&self, status: u16, repo: &str) -> Option<ApiError> {
        match status {
            401 | 403 if self.token.is_none() => Some(ApiError::new(ErrorCode::HfTokenNeeded, format!(
                    "Hugging Face refused access to {repo} (HTTP {status}): it is private or gated, or does not exist; set HF_TOKEN to a token that can read it"
                ),
            )),
            401 | 403 => Some(ApiError::new(ErrorCode::HfTokenRefused, format!(
                    "Hugging Face refused HF_TOKEN for {repo} (HTTP {status}): check the token, and accept the model's license on its page if it is gated"
                ),
            )),
            404 => Some(ApiError::new(ErrorCode::RepoNotFound, format!("no such repository on Hugging Face: {repo}"),
            )),
            _ => None,
        }
    }

    fn resolve(&self, repo: &str, pick: &HfPick) -> Result<Remote, ApiError> {
        let url = format!("{}/api/models/{repo}?blobs=true", self.endpoint);
        let upstream = |m: String| ApiError::new(ErrorCode::Upstream, m);
        let resp = self.get(&url, 0).map_err(upstream)?;
        let status = resp.status().as_u16();
        if let Some(f) = self.refusal(status, repo) {
            return Err(f);
        }
        if status != 200 {
            return Err(upstream(format!("{url} answered HTTP {status}")));
        }
        let info: RepoInfo = resp
            .into_body()
            .read_json()
            .map_err(|e| upstream(format!("{url} sent an unreadable listing: {e}")))?;
        let ggufs: Vec<Sibling> = info
            .siblings
            .into_iter()
            .filter(|s| s.rfilename.to_ascii_lowercase().ends_with(".gguf"))
            .collect();
        if ggufs.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NoGguf,
                format!("{repo} has no .gguf file"),
            ));
        }
        let names: Vec<&str> = ggufs.iter().map(|s| s.rfilename.as_str()).collect();
        let chosen = choose(&names, pick)
            .map_err(|m| ApiError::new(ErrorCode::ModelNotFound, format!("{repo}: {m}")))?;
        let sibling = ggufs
            .iter()
            .find(|s| s.rfilename == chosen)
            .cloned()
            .ok_or_else(|| upstream("listing changed while reading it".into()))?;
        Ok(Remote {
            repo: repo.to_string(),
            size: sibling.lfs.as_ref().map(|l| l.size).or(sibling.size),
            sha256: sibling.lfs.map(|l| l.sha256),
            file: sibling.rfilename,
        })
    }

    /// Transfers the file into `part`, resuming from what is there; returns its sha256.
    fn fetch(
        &self,
        remote: &Remote,
        part: &Path,
        progress: &watch::Sender<DownloadEvent>,
    ) -> Result<String, String> {
        let url = format!(
            "{}/{}/resolve/main/{}",
            self.endpoint, remote.repo, remote.file
        );
        let mut hasher = Sha256::new();
        let mut have = match std::fs::File::open(part) {
            Ok(mut f) => hash_reader(&mut f, &mut hasher)
                .map_err(|e| format!("cannot read {}: {e}", part.display()))?,
            Err(_) => 0,
        };
        if have > 0 {
            tracing::info!("resuming {} at byte {have}", remote.file);
        }
        let mut failures = 0;
        let mut expected_sha = remote.sha256.clone();
        loop {
            let resp = self.get(&url, have);
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    failures += 1;
                    if failures > MAX_RETRIES {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(300 * u64::from(failures)));
                    continue;
                }
            };
            let status = resp.status().as_u16();
            if let Some(f) = self.refusal(status, &remote.repo) {
                return Err(f.message);
            }
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if expected_sha.is_none() {
                expected_sha = header("x-linked-etag")
                    .or_else(|| header("etag"))
                    .map(|e| e.trim_matches('"').to_string())
                    .filter(|e| e.len() == 64 && e.chars().all(|c| c.is_ascii_hexdigit()));
            }
            let length: Option<u64> = header("content-length").and_then(|v| v.parse().ok());
            let append = match status {
                206 => header("content-range")
                    .is_some_and(|r| r.starts_with(&format!("bytes {have}-"))),
                200 => false,
                416 if remote.size == Some(have) => break,
                416 => {
                    // What is on disk is not a prefix of this file: start over.
                    have = 0;
                    hasher = Sha256::new();
                    std::fs::remove_file(part).ok();
                    continue;
                }
                other => {
                    failures += 1;
                    if failures > MAX_RETRIES {
                        return Err(format!("{url} answered HTTP {other}"));
                    }
                    std::thread::sleep(Duration::from_millis(300 * u64::from(failures)));
                    continue;
                }
            };
            if !append {
                have = 0;
                hasher = Sha256::new();
            }
            let total = remote.size.or(length.map(|l| l + have)).unwrap_or(0);
            if let Some(free) = part.parent().and_then(free_space) {
                let need = total.saturating_sub(have);
                if free < need + DISK_MARGIN {
                    return Err(format!(
                        "not enough disk space for {}: it needs {} MB more and {} has {} MB free",
                        remote.file,
                        need >> 20,
                        part.parent()
                            .map_or(String::new(), |p| p.display().to_string()),
                        free >> 20
                    ));
                }
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(part)
                .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
            let before = have;
            let outcome = copy_with_progress(
                &mut resp.into_body().into_reader(),
                &mut file,
                &mut hasher,
                &mut have,
                total,
                progress,
            );
            file.flush().ok();
            match outcome {
                Ok(()) if total == 0 || have >= total => break,
                Ok(()) => tracing::warn!(
                    "{}: connection ended at byte {have} of {total}",
                    remote.file
                ),
                Err(Copy::Write(e)) => return Err(format!("cannot write {}: {e}", part.display())),
                Err(Copy::Read(e)) => {
                    tracing::warn!("{}: transfer broke at byte {have}: {e}", remote.file)
                }
            }
            failures = if have > before { 0 } else { failures + 1 };
            if failures > MAX_RETRIES {
                return Err(format!(
                    "download of {} keeps breaking at byte {have}",
                    remote.file
                ));
            }
            std::thread::sleep(Duration::from_millis(200 * u64::from(failures)));
        }
        if let Some(size) = remote.size.filter(|&size| size != have) {
            return Err(format!("{} is {have} bytes, expected {size}", remote.file));
        }
        let sha = hex(&hasher.finalize());
        match expected_sha {
            Some(expected) if !expected.eq_ignore_ascii_case(&sha) => {
                let _ = std::fs::remove_file(part);
                Err(format!(
                    "checksum mismatch for {}: expected sha256 {expected}, got {sha}; the file was removed",
                    remote.file
                ))
            }
            _ => Ok(sha),
        }
    }
}

enum Copy {
    Read(std::io::Error),
    Write(std::io::Error),
}

fn copy_with_progress(
    from: &mut impl Read,
    to: &mut std::fs::File,
    hasher: &mut Sha256,
    have: &mut u64,
    total: u64,
    progress: &watch::Sender<DownloadEvent>,
) -> Result<(), Copy> {
    let mut buf = vec![0u8; 256 << 10];
    let mut window = (Instant::now(), *have);
    let mut speed = 0.0;
    let mut last_report = Instant::now() - Duration::from_secs(1);
    loop {
        let n = from.read(&mut buf).map_err(Copy::Read)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n]).map_err(Copy::Write)?;
        hasher.update(&buf[..n]);
        *have += n as u64;
        let elapsed = window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            speed = (*have - window.1) as f64 * 8.0 / 1e6 / elapsed.as_secs_f64();
            window = (Instant::now(), *have);
        }
        if last_report.elapsed() >= Duration::from_millis(100) || *have == total {
            last_report = Instant::now();
            progress.send_replace(DownloadEvent::Downloading {
                bytes_downloaded: *have,
                bytes_total: total,
                speed_mbps: (speed * 10.0).round() / 10.0,
            });
        }
    }
}

/// Which of a repo's GGUF files a reference means.
fn choose(names: &[&str], pick: &HfPick) -> Result<String, String> {
    let quant_of = |name: &str| {
        let stem = &name[..name.len() - ".gguf".len()];
        stem.rsplit(['.', '-'])
            .next()
            .unwrap_or(stem)
            .to_ascii_uppercase()
    };
    let available = || {
        let mut q: Vec<String> = names.iter().map(|n| quant_of(n)).collect();
        q.sort();
        q.dedup();
        q.join(", ")
    };
    let by_quant = |quant: &str| -> Vec<&str> {
        let q = quant.to_ascii_uppercase();
        let exact: Vec<&str> = names.iter().copied().filter(|n| quant_of(n) == q).collect();
        if !exact.is_empty() {
            return exact;
        }
        names
            .iter()
            .copied()
            .filter(|n| n.to_ascii_uppercase().contains(&q))
            .collect()
    };
    match pick {
        HfPick::File(f) => names
            .iter()
            .find(|n| *n == f)
            .map(|n| n.to_string())
            .ok_or_else(|| format!("no file {f}; its GGUF files are {}", names.join(", "))),
        HfPick::Quant(q) => match by_quant(q).as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(format!(
                "no {q} file; the quantizations there are {}",
                available()
            )),
            several => Err(format!(
                "several files match {q}: {}; name one with hf:ORG/REPO/FILE.gguf",
                several.join(", ")
            )),
        },
        HfPick::Default => match (by_quant("Q4_K_M").as_slice(), names) {
            ([one], _) => Ok(one.to_string()),
            (_, [only]) => Ok(only.to_string()),
            _ => Err(format!(
                "it has several GGUF files and no Q4_K_M; pick one with :QUANT from {}",
                available()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILES: [&str; 4] = [
        "tinyllama.Q4_0.gguf",
        "tinyllama.Q4_K_M.gguf",
        "tinyllama.Q4_K_S.gguf",
        "tinyllama-q8_0.gguf",
    ];

    #[test]
    fn the_default_is_q4_k_m_else_the_only_file() {
        assert_eq!(
            choose(&FILES, &HfPick::Default).unwrap(),
            "tinyllama.Q4_K_M.gguf"
        );
        assert_eq!(
            choose(&["a.Q8_0.gguf"], &HfPick::Default).unwrap(),
            "a.Q8_0.gguf"
        );
        let err = choose(&["a.Q8_0.gguf", "a.Q2_K.gguf"], &HfPick::Default).unwrap_err();
        assert!(err.contains("Q2_K, Q8_0"), "{err}");
    }

    #[test]
    fn quantization_matches_case_insensitively_and_exactly_first() {
        let q = |s: &str| choose(&FILES, &HfPick::Quant(s.into()));
        assert_eq!(q("q4_k_m").unwrap(), "tinyllama.Q4_K_M.gguf");
        assert_eq!(q("Q8_0").unwrap(), "tinyllama-q8_0.gguf");
        assert_eq!(q("Q4_0").unwrap(), "tinyllama.Q4_0.gguf");
        assert!(q("Q4_K").unwrap_err().contains("several files match"));
        let missing = q("Q5_1").unwrap_err();
        assert!(missing.contains("Q4_0, Q4_K_M, Q4_K_S, Q8_0"), "{missing}");
    }

    #[test]
    fn a_named_file_must_exist() {
        assert_eq!(
            choose(&FILES, &HfPick::File("tinyllama-q8_0.gguf".into())).unwrap(),
            "tinyllama-q8_0.gguf"
        );
        assert!(choose(&FILES, &HfPick::File("x.gguf".into())).is_err());
    }
}
