//! Starting, watching and stopping this machine's workers.
//!
//! A worker is this same executable in the worker role, on a model from the
//! catalog, on a port the hive picks, calling the hive back when loaded. The
//! hive records it as `loading`, then `ready` (or `failed`) on that callback; a
//! process that exits on its own, or stays loading past the ready timeout, is
//! `failed` with the tail of its stderr. Workers die with their hive, even a
//! SIGKILLed one ([`crate::process::Spawner`]).

use super::state::Changes;
use crate::process::{signal, Spawner};
use crate::protocol::{
    new_id, now_rfc3339, rfc3339_at, ApiError, ErrorCode, ModelEntry, SpawnRequest, WorkerInfo,
    WorkerReadyCallback, WorkerState,
};
use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of a worker's stderr kept to explain a failure.
const STDERR_TAIL: usize = 20;
/// How long a stopping worker gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// How this hive starts workers; fixed for the life of the hive.
#[derive(Debug, Clone)]
pub struct Settings {
    pub exe: PathBuf,
    /// Where workers listen.
    pub host: String,
    /// The host in the URLs the hive gives out for its workers
    /// (`--advertise-host`); else [`advertised_host`] decides.
    pub advertise_host: Option<String>,
    pub callback_url: String,
    pub first_port: u16,
    pub ready_timeout: Duration,
    pub idle_timeout: Duration,
    pub token: Option<String>,
    /// The workers' `--flash-attn`.
    pub flash_attn: crate::protocol::FlashAttn,
    /// The hive's identity, which its workers serve TLS with, and whom they pin.
    pub tls: Option<WorkerTls>,
}

/// How the caller of a spawn reached this hive: at which of its addresses,
/// and whether over TLS (its workers are then given out over TLS too).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reached {
    pub at: Option<std::net::IpAddr>,
    pub tls: bool,
}

/// What a worker needs for TLS: where its hive's identity is, and the
/// fingerprints its hive pins (its queen's, its own), to which a split
/// worker adds its lenders'.
#[derive(Debug, Clone)]
pub struct WorkerTls {
    pub identity_dir: PathBuf,
    pub pins: crate::http::tls::Pins,
}

/// What a new worker's estimate is made of, in the hive's log (MiB).
fn log_estimate(id: &str, plan: &Plan) {
    let Some(e) = plan.parts else {
        return;
    };
    let mib = |b: u64| b.div_ceil(1 << 20);
    tracing::info!(
        "{id}: memory estimate {} MiB = weights {} + KV cache {} + compute {} \
         (llama.cpp's buffers {}) + margin {} + prompt cache {}",
        plan.memory_mb,
        mib(e.weights),
        mib(e.kv_cache),
        mib(e.compute),
        mib(e.llama_cpp()),
        mib(e.margin),
        plan.cache_ram_mb
    );
}

/// How one worker is started, and the memory that takes (MiB): decided by
/// the hive's state from the model's header ([`super::state::plan`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub slots: u32,
    pub ctx_size: u32,
    /// The KV cache's cells, K and V.
    pub cache_type: crate::protocol::CacheType,
    pub threads: u32,
    /// The worker's host-memory prompt cache (`--cache-ram`).
    pub cache_ram_mb: u64,
    pub memory_mb: u64,
    /// What `memory_mb` is made of, for a whole worker (MiB each): said in
    /// the hive's log when it starts one.
    pub parts: Option<crate::gguf::Estimate>,
    /// What each share takes if the model is split across hives.
    pub split: Option<crate::protocol::SplitCostMb>,
}

#[derive(Clone)]
pub struct Workers {
    settings: Arc<Settings>,
    records: Arc<Mutex<HashMap<String, Record>>>,
    spawner: Spawner,
    changes: Changes,
}

struct Record {
    info: WorkerInfo,
    /// What its report must carry ([`crate::protocol::new_secret`]).
    secret: String,
    /// The estimate it was started with.
    estimate_mb: u64,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// Since when the worker has had nothing to do, as last seen.
    idle_since: Option<Instant>,
    /// The hive asked it to stop: its exit is expected, and removes it.
    stopping: bool,
    /// How long it may stay idle, when a request said (Ollama's `keep_alive`):
    /// `Some(None)` is until stopped; `None`, the hive's `--idle-timeout`.
    keep_alive: Option<Option<Duration>>,
}

impl Workers {
    pub fn new(settings: Settings, changes: Changes) -> std::io::Result<Workers> {
        Ok(Workers {
            settings: Arc::new(settings),
            records: Arc::default(),
            spawner: Spawner::new()?,
            changes,
        })
    }

    /// The flash attention this hive's workers start with.
    pub fn flash_attn(&self) -> crate::protocol::FlashAttn {
        self.settings.flash_attn
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every worker, with what it takes in memory (measured once it is
    /// ready, never below its estimate: llama.cpp's buffers are touched
    /// lazily, so a fresh worker's resident set understates what it will
    /// take), and when it has been idle since and will be stopped.
    pub fn list(&self) -> Vec<WorkerInfo> {
        let pids: Vec<u32> = self.lock().values().map(|r| r.info.pid).collect();
        let resident = crate::machine::resident_mb(&pids);
        let now = (std::time::SystemTime::now(), Instant::now());
        let at = |i: Instant| match i.checked_duration_since(now.1) {
            Some(ahead) => rfc3339_at(now.0 + ahead),
            None => rfc3339_at(now.0 - now.1.duration_since(i)),
        };
        let mut all: Vec<WorkerInfo> = self
            .lock()
            .values()
            .map(|r| {
                let mut info = r.info.clone();
                let measured = resident
                    .get(&info.pid)
                    .filter(|_| info.state == WorkerState::Ready);
                info.memory_measured = measured.is_some();
                info.estimate_mb = r.estimate_mb;
                info.resident_mb = measured.copied().unwrap_or(0);
                info.memory_mb = match info.state {
                    WorkerState::Failed => 0,
                    _ => info.resident_mb.max(r.estimate_mb),
                };
                if info.state == WorkerState::Ready {
                    info.idle_since = r.idle_since.map(at);
                    let limit = self.idle_limit(r);
                    info.stops_at = r.idle_since.zip(limit).map(|(i, l)| at(i + l));
                }
                info
            })
            .collect();
        all.sort_by(|a, b| a.url.cmp(&b.url));
        all
    }

    /// Starts a worker for a catalog model: its backend checked, a port
    /// chosen, the process started, its stderr kept, its exit and its
    /// loading time watched.
    pub async fn spawn(
        &self,
        model: &ModelEntry,
        req: &SpawnRequest,
        plan: &Plan,
        reached: Reached,
    ) -> Result<WorkerInfo, ApiError> {
        let backend = choose_backend(req.backend.as_deref(), crate::BACKENDS)?;
        let host = advertised_host(
            self.settings.advertise_host.as_deref(),
            &self.settings.host,
            reached.at,
        );
        let id = new_id("worker");
        let port = self.free_port()?;
        let secret = crate::protocol::new_secret();
        let mut child = self
            .start_process((&id, &secret, port), model, req, backend, plan)
            .await?;
        // Reached from another machine, or by a caller that came over TLS:
        // over TLS, with the hive's identity.
        let secure = reached.tls || !is_loopback(&host);
        let scheme = match self.settings.tls.is_some() && secure {
            true => "https",
            false => "http",
        };
        let info = WorkerInfo {
            worker_id: id.clone(),
            url: format!("{scheme}://{host}:{port}"),
            model: model.name.clone(),
            model_path: model.path.clone(),
            pid: child.id(),
            state: WorkerState::Loading,
            slots: plan.slots,
            backend: backend.to_string(),
            device: req.device,
            error: None,
            started_at: now_rfc3339(),
            ctx_size: plan.ctx_size,
            threads: plan.threads,
            memory_mb: plan.memory_mb,
            memory_measured: false,
            estimate_mb: plan.memory_mb,
            resident_mb: 0,
            idle_since: None,
            stops_at: None,
            split: split_parts(req, model.layers),
            crashed: false,
        };
        let (stderr, reader) = keep_stderr(&mut child, &id);
        self.lock().insert(
            id.clone(),
            Record {
                info: info.clone(),
                secret,
                estimate_mb: plan.memory_mb,
                stderr,
                idle_since: None,
                stopping: false,
                keep_alive: None,
            },
        );
        self.changes.bump();
        tracing::info!(
            "spawned {id} (pid {}) for {} on port {port}",
            info.pid,
            model.name
        );
        log_estimate(&id, plan);
        self.watch_exit(child, id.clone(), reader);
        self.watch_loading(id);
        Ok(info)
    }

    /// This executable in the worker role, with parent-death signal set.
    async fn start_process(
        &self,
        (id, secret, port): (&str, &str, u16),
        model: &ModelEntry,
        req: &SpawnRequest,
        backend: &str,
        plan: &Plan,
    ) -> Result<std::process::Child, ApiError> {
        let s = &self.settings;
        let mut command = Command::new(&s.exe);
        command
            .arg("worker")
            .arg("--model")
            .arg(&model.path)
            .args(["--host", &s.host, "--port", &port.to_string()])
            .args(["--worker-id", id, "--callback-url", &s.callback_url])
            .args(["--device", &req.device.to_string()])
            .args(["--slots", &plan.slots.to_string()])
            .args(["--ctx-size", &plan.ctx_size.to_string()])
            .args(["--threads", &plan.threads.to_string()])
            .args(["--cache-ram", &plan.cache_ram_mb.to_string()])
            .args(["--flash-attn", s.flash_attn.as_str()])
            .args(["--cache-type-k", plan.cache_type.as_str()])
            .args(["--cache-type-v", plan.cache_type.as_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if backend == "cpu" {
            // A GPU runtime maps far more than it uses; a CPU worker maps
            // about what it uses, so a bound well above its plan catches
            // only a runaway (a grammar nobody foresaw).
            let limit = plan.memory_mb * 2 + 4096;
            command.args(["--gpu-layers", "0", "--memory-limit", &limit.to_string()]);
        }
        for r in &req.remotes {
            let url = format!("{}/v1/rpc?lease={}", r.url.trim_end_matches('/'), r.lease);
            command.args(["--remote", &format!("{}@{url}", r.layers)]);
        }
        if let Some(tls) = &s.tls {
            command.arg("--identity-dir").arg(&tls.identity_dir);
            let lenders = req.remotes.iter().filter_map(|r| r.fingerprint.clone());
            for fp in tls.pins.list().into_iter().chain(lenders) {
                command.args(["--peer", &fp]);
            }
        }
        if !req.remotes.is_empty() {
            // One line per remote, in order; an empty line: no token.
            let tokens: Vec<&str> = req
                .remotes
                .iter()
                .map(|r| r.token.as_deref().unwrap_or(""))
                .collect();
            command.env(crate::protocol::REMOTE_TOKENS_ENV, tokens.join("\n"));
        }
        // Secrets travel in the environment, not argv, where `ps` would show them.
        command.env(crate::protocol::WORKER_SECRET_ENV, secret);
        match &s.token {
            Some(t) => command.env("RBEE_TOKEN", t),
            None => command.env_remove("RBEE_TOKEN"),
        };
        self.spawner.spawn(command).await.map_err(|e| {
            ApiError::new(
                ErrorCode::SpawnFailed,
                format!("cannot start a worker: {e}"),
            )
        })
    }

    /// Waits for the process on a thread; once it has exited and its stderr
    /// is read to the end, records how it ended.
    fn watch_exit(
        &self,
        mut child: std::process::Child,
        id: String,
        reader: Option<std::thread::JoinHandle<()>>,
    ) {
        let this = self.clone();
        std::thread::spawn(move || {
            let (status, crashed) = match child.wait() {
                Ok(s) => (s.to_string(), crashed(s)),
                Err(e) => (e.to_string(), false),
            };
            if let Some(reader) = reader {
                let _ = reader.join();
            }
            this.exited(&id, status, crashed);
        });
    }

    /// Fails a worker still loading after the ready timeout.
    fn watch_loading(&self, id: String) {
        let this = self.clone();
        let timeout = self.settings.ready_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            this.loading_timed_out(&id, timeout);
        });
    }

    /// The lowest port from `first_port` that no worker of ours holds and nobody listens on.
    fn free_port(&self) -> Result<u16, ApiError> {
        let taken: Vec<String> = self.lock().values().map(|r| r.info.url.clone()).collect();
        (self.settings.first_port..=u16::MAX)
            .find(|p| {
                !taken.iter().any(|u| u.ends_with(&format!(":{p}")))
                    && std::net::TcpListener::bind((self.settings.host.as_str(), *p)).is_ok()
            })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NoPort,
                    format!("no free port from {} up", self.settings.first_port),
                )
            })
    }

    fn tail(record: &Record) -> String {
        let tail = record.stderr.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn exited(&self, id: &str, status: String, crashed: bool) {
        let _bump = Bump(&self.changes);
        let mut records = self.lock();
        let Some(record) = records.get_mut(id) else {
            return;
        };
        if record.stopping {
            records.remove(id);
            tracing::info!("{id} stopped");
            return;
        }
        if record.info.state != WorkerState::Failed {
            record.info.state = WorkerState::Failed;
            record.info.crashed = crashed;
            record.info.error = Some(format!(
                "the worker exited ({status}): {}",
                Self::tail(record)
            ));
        }
        tracing::warn!("{id} exited ({status})");
    }

    fn loading_timed_out(&self, id: &str, timeout: Duration) {
        let _bump = Bump(&self.changes);
        let mut records = self.lock();
        let Some(record) = records.get_mut(id) else {
            return;
        };
        if record.info.state == WorkerState::Loading {
            record.info.state = WorkerState::Failed;
            record.info.error = Some(format!(
                "the worker did not become ready within {}s: {}",
                timeout.as_secs(),
                Self::tail(record)
            ));
            signal(record.info.pid, libc::SIGKILL);
        }
    }

    /// The worker's own report that loading ended.
    pub fn ready(&self, report: &WorkerReadyCallback) -> Result<WorkerInfo, ApiError> {
        let _bump = Bump(&self.changes);
        let mut records = self.lock();
        let record = records.get_mut(&report.worker_id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::WorkerNotFound,
                format!("this hive did not start a worker {}", report.worker_id),
            )
        })?;
        if !crate::http::constant_time_eq(report.secret.as_bytes(), record.secret.as_bytes()) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "this report does not carry the secret worker {} was started with",
                    report.worker_id
                ),
            ));
        }
        if record.info.state == WorkerState::Loading {
            record.info.state = if report.state == WorkerState::Ready {
                WorkerState::Ready
            } else {
                WorkerState::Failed
            };
            record.info.error = report.error.clone();
            record.info.slots = report.slots;
            record.idle_since = Some(Instant::now());
            tracing::info!("{} is {}", report.worker_id, record.info.state);
        }
        Ok(record.info.clone())
    }

    /// Asks a worker to stop (SIGTERM: it ends its streams cleanly), killing it if it lingers.
    pub fn stop(&self, id: &str) -> Result<WorkerInfo, ApiError> {
        let _bump = Bump(&self.changes);
        let mut records = self.lock();
        let record = records.get_mut(id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::WorkerNotFound,
                format!("no worker {id} on this hive"),
            )
        })?;
        if record.info.state == WorkerState::Failed {
            // Already gone (or being killed): forget it.
            let info = record.info.clone();
            records.remove(id);
            return Ok(info);
        }
        record.stopping = true;
        record.info.state = WorkerState::Stopping;
        let pid = record.info.pid;
        signal(pid, libc::SIGTERM);
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(STOP_GRACE).await;
            if this.lock().contains_key(&id) {
                tracing::warn!("{id} did not stop in time; killing it");
                signal(pid, libc::SIGKILL);
            }
        });
        Ok(record.info.clone())
    }

    /// Stops every worker and waits (a bounded time) for them to be gone.
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in &ids {
            let _ = self.stop(id);
        }
        let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(1);
        while !self.lock().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How long `r` may stay idle; `None`: until it is stopped.
    fn idle_limit(&self, r: &Record) -> Option<Duration> {
        r.keep_alive.unwrap_or(Some(self.settings.idle_timeout))
    }

    /// Keeps worker `id` for `limit` once idle (`None`: until stopped),
    /// instead of the hive's idle timeout.
    pub fn keep_alive(&self, id: &str, limit: Option<Duration>) -> Result<WorkerInfo, ApiError> {
        let _bump = Bump(&self.changes);
        let mut records = self.lock();
        let record = records.get_mut(id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::WorkerNotFound,
                format!("this hive has no worker {id}"),
            )
        })?;
        record.keep_alive = Some(limit);
        Ok(record.info.clone())
    }

    /// Stops workers that have had nothing to do for the idle timeout. Runs forever.
    pub async fn reap_idle(self) {
        let tick = (self.settings.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let ready: Vec<(String, String)> = self
                .lock()
                .values()
                .filter(|r| r.info.state == WorkerState::Ready)
                .map(|r| (r.info.worker_id.clone(), r.info.url.clone()))
                .collect();
            for (id, url) in ready {
                let Some(busy) = worker_busy(&url, self.settings.token.as_deref()).await else {
                    continue;
                };
                let (idle_for, limit) = {
                    let mut records = self.lock();
                    let Some(record) = records.get_mut(&id) else {
                        continue;
                    };
                    let limit = self.idle_limit(record);
                    if busy {
                        if record.idle_since.take().is_some() {
                            self.changes.bump();
                        }
                        continue;
                    }
                    if record.idle_since.is_none() {
                        self.changes.bump();
                    }
                    let since = record.idle_since.get_or_insert_with(Instant::now);
                    (since.elapsed(), limit)
                };
                if limit.is_some_and(|limit| idle_for >= limit) {
                    tracing::info!("stopping {id}: idle for {}s", idle_for.as_secs());
                    let _ = self.stop(&id);
                }
            }
        }
    }
}

/// Tells state streams of a change when dropped: after the records' lock,
/// which is taken after it, is released.
struct Bump<'a>(&'a Changes);

impl Drop for Bump<'_> {
    fn drop(&mut self) {
        self.0.bump();
    }
}

/// Whether a worker has requests running or queued; `None` if it did not answer.
/// Whether a process ended on a signal that a fault raises (what the queen
/// takes as a request crashing its worker), not on one sent to stop it
/// (SIGKILL from a person or the OOM killer, SIGTERM) or by exiting.
#[cfg(unix)]
fn crashed(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal().is_some_and(|s| {
        [
            libc::SIGABRT,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGSYS,
            libc::SIGTRAP,
        ]
        .contains(&s)
    })
}

#[cfg(not(unix))]
fn crashed(status: std::process::ExitStatus) -> bool {
    // Windows: an unhandled exception's NTSTATUS (0xC0000005 and the like).
    status.code().is_some_and(|c| (c as u32) >= 0xC000_0000)
}

async fn worker_busy(url: &str, token: Option<&str>) -> Option<bool> {
    let url = format!("{url}/v1/ready");
    let ready = crate::http::client::get::<crate::protocol::ReadyStatus>(&url, token);
    let status = tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .ok()?
        .ok()?;
    Some(status.slots_busy > 0 || status.queue_len > 0)
}

/// The host in a new worker's URL: `--advertise-host` when given; else the
/// address the hive listens on (`localhost` is loopback); on a wildcard, the
/// address the caller reached the hive at, so a queen on another machine
/// gets an address it can reach, never loopback (`127.0.0.1` only when
/// nothing better is known).
pub fn advertised_host(
    explicit: Option<&str>,
    listen: &str,
    reached_at: Option<std::net::IpAddr>,
) -> String {
    if let Some(host) = explicit {
        return host.to_string();
    }
    let wildcard = match listen.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_unspecified(),
        Err(_) => false,
    };
    if !wildcard {
        return match listen {
            "localhost" => "127.0.0.1".to_string(),
            host if host.contains(':') => format!("[{host}]"),
            host => host.to_string(),
        };
    }
    match reached_at.map(|ip| ip.to_canonical()) {
        Some(std::net::IpAddr::V4(ip)) if !ip.is_unspecified() => ip.to_string(),
        Some(std::net::IpAddr::V6(ip)) if !ip.is_unspecified() => format!("[{ip}]"),
        _ => "127.0.0.1".to_string(),
    }
}

/// Whether `host` (a name or an address, IPv6 in brackets) is this machine's loopback.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The backend a spawn asks for (absent: the best this build has), if this build has it.
fn choose_backend<'a>(asked: Option<&'a str>, compiled: &'a str) -> Result<&'a str, ApiError> {
    // `rpc` is how devices are lent and borrowed, not what a worker runs on.
    let compiled_list: Vec<&str> = compiled.split(',').filter(|b| *b != "rpc").collect();
    let backend = asked.unwrap_or_else(|| compiled_list.last().copied().unwrap_or("cpu"));
    if !["cpu", "cuda", "metal"].contains(&backend) {
        return Err(ApiError::invalid(
            "backend",
            format!("backend must be cpu, cuda or metal, not {backend:?}"),
        ));
    }
    if !compiled_list.contains(&backend) {
        return Err(ApiError::new(
            ErrorCode::BackendUnavailable,
            format!(
                "this hive's rbee was built without {backend} (it has {compiled}); rebuild with --features {backend}"
            ),
        ));
    }
    Ok(backend)
}

/// Where a split worker's layers are, its own hive's share first (named
/// `""`: the queen knows this hive by its registered name).
fn split_parts(req: &SpawnRequest, layers: u64) -> Vec<crate::protocol::SplitPart> {
    if req.remotes.is_empty() {
        return Vec::new();
    }
    let lent = req
        .remotes
        .iter()
        .fold(0u32, |n, r| n.saturating_add(r.layers));
    let own = u32::try_from(layers)
        .unwrap_or(u32::MAX)
        .saturating_sub(lent);
    std::iter::once(crate::protocol::SplitPart {
        hive: String::new(),
        layers: own,
    })
    .chain(req.remotes.iter().map(|r| crate::protocol::SplitPart {
        hive: r.hive.clone(),
        layers: r.layers,
    }))
    .collect()
}

/// Keeps the last lines of a worker's stderr, to explain a failure; the
/// reader thread ends when the process closes its stderr.
fn keep_stderr(
    child: &mut std::process::Child,
    id: &str,
) -> (
    Arc<Mutex<VecDeque<String>>>,
    Option<std::thread::JoinHandle<()>>,
) {
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let reader = child.stderr.take().map(|pipe| {
        let tail = tail.clone();
        let id = id.to_string();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                tracing::debug!(target: "rbee::worker_log", "{id}: {line}");
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        })
    });
    (tail, reader)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_advertised_where_its_caller_reached_the_hive() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
        // The queen on another machine reached a hive listening everywhere.
        assert_eq!(
            advertised_host(None, "0.0.0.0", ip("10.77.3.2")),
            "10.77.3.2"
        );
        assert_eq!(advertised_host(None, "::", ip("fd00::2")), "[fd00::2]");
        assert_eq!(
            advertised_host(None, "::", ip("::ffff:10.0.0.5")),
            "10.0.0.5",
            "an IPv4 caller on a dual-stack socket"
        );
        // A queen on this machine reached it on loopback: loopback is right.
        assert_eq!(
            advertised_host(None, "0.0.0.0", ip("127.0.0.1")),
            "127.0.0.1"
        );
        assert_eq!(advertised_host(None, "0.0.0.0", None), "127.0.0.1");
        // A hive on one address, or told where it is reached, says so.
        assert_eq!(
            advertised_host(None, "10.1.1.1", ip("127.0.0.1")),
            "10.1.1.1"
        );
        assert_eq!(advertised_host(None, "localhost", None), "127.0.0.1");
        assert_eq!(advertised_host(None, "fd00::9", None), "[fd00::9]");
        assert_eq!(
            advertised_host(Some("mac.lan"), "0.0.0.0", ip("10.77.3.2")),
            "mac.lan"
        );
    }

    #[test]
    fn a_spawn_gets_a_backend_this_build_has() {
        assert_eq!(choose_backend(None, "cpu").unwrap(), "cpu");
        assert_eq!(choose_backend(None, "cpu,cuda").unwrap(), "cuda");
        assert_eq!(choose_backend(None, "cpu,cuda,rpc").unwrap(), "cuda");
        assert_eq!(choose_backend(None, "cpu,rpc").unwrap(), "cpu");
        assert_eq!(choose_backend(Some("cpu"), "cpu,cuda").unwrap(), "cpu");
        let e = choose_backend(Some("cuda"), "cpu").unwrap_err();
        assert_eq!(e.code, ErrorCode::BackendUnavailable);
        assert!(e.message.contains("--features cuda"), "{e}");
        let e = choose_backend(Some("vulkan"), "cpu").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }
}
