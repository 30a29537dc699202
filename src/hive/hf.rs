//! Hugging Face's HTTP API, blocking (`ureq`): listing a repository, choosing
//! its GGUF file, and transferring that file into a `.part` file with `Range`
//! resume, retries and a sha256 check. The one place rbee talks to Hugging Face.

use crate::disk;
use crate::model_ref::HfPick;
use crate::protocol::{ApiError, DownloadEvent, ErrorCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Retries of a dropped transfer before the download is given up.
const MAX_RETRIES: u32 = 5;

/// The file a reference resolved to.
#[derive(Debug, Clone)]
pub struct Remote {
    pub repo: String,
    pub file: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
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
pub struct HfClient {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl HfClient {
    pub fn from_env() -> HfClient {
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

    pub fn resolve(&self, repo: &str, pick: &HfPick) -> Result<Remote, ApiError> {
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

    fn file_url(&self, remote: &Remote) -> String {
        format!(
            "{}/{}/resolve/main/{}",
            self.endpoint, remote.repo, remote.file
        )
    }

    /// Transfers the file into `part`, resuming from what is there; its sha256.
    ///
    /// Each round asks for the bytes after what `part` holds, then appends,
    /// starts over, or stops, as the answer says ([`answer`]); a broken
    /// transfer is retried while it makes progress.
    pub fn fetch(
        &self,
        remote: &Remote,
        part: &Path,
        progress: &watch::Sender<DownloadEvent>,
    ) -> Result<String, String> {
        let url = self.file_url(remote);
        let mut file = Part::open(part)?;
        if file.have > 0 {
            tracing::info!("resuming {} at byte {}", remote.file, file.have);
        }
        let mut expected_sha = remote.sha256.clone();
        let mut retries = Retries::default();
        loop {
            let resp = match self.get(&url, file.have) {
                Ok(resp) => resp,
                Err(e) => {
                    retries.failed(e)?;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            if let Some(refused) = self.refusal(status, &remote.repo) {
                return Err(refused.message);
            }
            expected_sha = expected_sha.or_else(|| sha_header(&resp));
            let range = header(&resp, "content-range");
            match answer(status, range.as_deref(), file.have, remote.size) {
                Answer::Done => break,
                Answer::StartOver => {
                    file.remove();
                    continue;
                }
                Answer::Retry => {
                    retries.failed(format!("{url} answered HTTP {status}"))?;
                    continue;
                }
                Answer::Restart => file.reset(),
                Answer::Append => {}
            }
            let length: Option<u64> = header(&resp, "content-length").and_then(|v| v.parse().ok());
            let total = remote.size.or(length.map(|l| l + file.have)).unwrap_or(0);
            if let Some(dir) = part.parent() {
                disk::ensure_room(dir, total.saturating_sub(file.have), &remote.file)?;
            }
            let before = file.have;
            if file.receive(resp, total, progress, &remote.file)? {
                break;
            }
            retries.after_transfer(file.have > before, &remote.file, file.have)?;
        }
        file.verify(remote, expected_sha)
    }
}

/// What to do with the answer to a request for the bytes after `have`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The rest of the file: append it.
    Append,
    /// The whole file from its start: write it over what is there.
    Restart,
    /// Nothing after `have`, and `have` is the whole file.
    Done,
    /// Nothing after `have`, which is not this file: delete it and ask again.
    StartOver,
    /// Another status: ask again, within the retry limit.
    Retry,
}

fn answer(status: u16, content_range: Option<&str>, have: u64, size: Option<u64>) -> Answer {
    match status {
        206 if content_range.is_some_and(|r| r.starts_with(&format!("bytes {have}-"))) => {
            Answer::Append
        }
        200 | 206 => Answer::Restart,
        416 if size == Some(have) => Answer::Done,
        416 => Answer::StartOver,
        _ => Answer::Retry,
    }
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The sha256 Hugging Face sends for an LFS file, as its (linked) ETag.
fn sha_header(resp: &ureq::http::Response<ureq::Body>) -> Option<String> {
    header(resp, "x-linked-etag")
        .or_else(|| header(resp, "etag"))
        .map(|e| e.trim_matches('"').to_string())
        .filter(|e| e.len() == 64 && e.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Failed attempts in a row, with a growing pause between them.
#[derive(Default)]
struct Retries {
    failures: u32,
}

impl Retries {
    /// An attempt failed with `e`: pause, or give up with `e` past the limit.
    fn failed(&mut self, e: String) -> Result<(), String> {
        self.failures += 1;
        if self.failures > MAX_RETRIES {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(300 * u64::from(self.failures)));
        Ok(())
    }

    /// A transfer ended early; one that moved forward starts the count again.
    fn after_transfer(&mut self, progressed: bool, file: &str, have: u64) -> Result<(), String> {
        self.failures = if progressed { 0 } else { self.failures + 1 };
        if self.failures > MAX_RETRIES {
            return Err(format!("download of {file} keeps breaking at byte {have}"));
        }
        std::thread::sleep(Duration::from_millis(200 * u64::from(self.failures)));
        Ok(())
    }
}

/// The `.part` file being filled, and the hash of what it holds.
struct Part<'p> {
    path: &'p Path,
    have: u64,
    hasher: Sha256,
}

impl<'p> Part<'p> {
    /// Picks up what an earlier attempt (or an earlier hive) left.
    fn open(path: &'p Path) -> Result<Part<'p>, String> {
        let mut hasher = Sha256::new();
        let have = match std::fs::File::open(path) {
            Ok(mut f) => disk::hash_reader(&mut f, &mut hasher)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            Err(_) => 0,
        };
        Ok(Part { path, have, hasher })
    }

    fn reset(&mut self) {
        self.have = 0;
        self.hasher = Sha256::new();
    }

    fn remove(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(self.path);
    }

    /// Copies an answer's body in; true when the file is whole.
    fn receive(
        &mut self,
        resp: ureq::http::Response<ureq::Body>,
        total: u64,
        progress: &watch::Sender<DownloadEvent>,
        name: &str,
    ) -> Result<bool, String> {
        let append = self.have > 0;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(self.path)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        let outcome = copy_with_progress(
            &mut resp.into_body().into_reader(),
            &mut out,
            &mut self.hasher,
            &mut self.have,
            total,
            progress,
        );
        out.flush().ok();
        let have = self.have;
        match outcome {
            Ok(()) if total == 0 || have >= total => Ok(true),
            Ok(()) => {
                tracing::warn!("{name}: connection ended at byte {have} of {total}");
                Ok(false)
            }
            Err(Copy::Write(e)) if disk::is_full(&e) => Err(format!(
                "the disk is full: {} of {} MB of {} are written to {}, {} MB more are needed. \
                 Free some space (rbee keeper models remove NAME; rbee keeper models clean drops \
                 other partial downloads) and ask again: the download resumes where it stopped",
                have >> 20,
                total >> 20,
                name,
                self.path.display(),
                total.saturating_sub(have).div_ceil(1 << 20)
            )),
            Err(Copy::Write(e)) => Err(format!("cannot write {}: {e}", self.path.display())),
            Err(Copy::Read(e)) => {
                tracing::warn!("{name}: transfer broke at byte {have}: {e}");
                Ok(false)
            }
        }
    }

    /// Checks the size and the checksum; a file that fails is removed.
    fn verify(self, remote: &Remote, expected_sha: Option<String>) -> Result<String, String> {
        if let Some(size) = remote.size.filter(|&size| size != self.have) {
            return Err(format!(
                "{} is {} bytes, expected {size}",
                remote.file, self.have
            ));
        }
        let sha = disk::hex(&self.hasher.finalize());
        match expected_sha {
            Some(expected) if !expected.eq_ignore_ascii_case(&sha) => {
                let _ = std::fs::remove_file(self.path);
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

    #[test]
    fn each_answer_to_a_ranged_request_has_one_next_step() {
        let size = Some(100);
        assert_eq!(
            answer(206, Some("bytes 40-99/100"), 40, size),
            Answer::Append
        );
        // A range the server did not honour as asked: take the file from its start.
        assert_eq!(
            answer(206, Some("bytes 0-99/100"), 40, size),
            Answer::Restart
        );
        assert_eq!(answer(200, None, 40, size), Answer::Restart);
        assert_eq!(answer(416, None, 100, size), Answer::Done);
        assert_eq!(answer(416, None, 120, size), Answer::StartOver);
        assert_eq!(answer(416, None, 40, None), Answer::StartOver);
        assert_eq!(answer(500, None, 40, size), Answer::Retry);
        assert_eq!(answer(302, None, 0, size), Answer::Retry);
    }

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
