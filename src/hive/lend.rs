//! Lending this machine's devices to a worker on another hive (DESIGN.md §12).
//!
//! A lease is one llama.cpp RPC server, this executable in the `rpc-server`
//! role, bound to loopback on a port of its own (the server takes one client at
//! a time, so each split worker gets its own). The only way in from the
//! network is the hive's port: `GET /v1/rpc?lease=ID` with `Upgrade: ggml-rpc`
//! and the bearer token, then llama.cpp's RPC messages, read one by one on
//! their way in ([`Leases::open`], [`super::rpc_door`]).
//!
//! A lease holds to what it declared: its memory counts against the hive's
//! budget from the moment it is made, and its server's device has that
//! memory and no more (`rpc.cpp`: free memory reported from it, a buffer
//! beyond it refused; the process's address space is bounded too). Its
//! cache directory is its own, bounded by the budget and removed with it.
//! A hive holds at most [`MOST_LEASES`] leases, [`MOST_PER_BORROWER`] for one
//! borrower. A lease ends when the queen ends it, when its worker's tunnels
//! have all been closed for [`UNUSED_AFTER_USE`] (the worker is gone), or
//! when no tunnel came within [`NEVER_USED`].

use super::rpc_door::Door;
use super::state::Changes;
use crate::metrics::HiveMetrics;
use crate::process::{signal, Spawner};
use crate::protocol::{now_rfc3339, ApiError, ErrorCode, LeaseInfo, LeaseRequest};
use argh::FromArgs;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A lease whose tunnels have all closed ends after this long (llama.cpp's
/// client opens and closes a few connections while the model loads).
const UNUSED_AFTER_USE: Duration = Duration::from_secs(30);
/// A lease no tunnel ever came to ends after this long.
const NEVER_USED: Duration = Duration::from_secs(120);
/// How long a new RPC server may take to listen.
const START_WAIT: Duration = Duration::from_secs(10);
/// Leases a hive holds at once (each is a process), and for one borrower.
pub const MOST_LEASES: usize = 8;
pub const MOST_PER_BORROWER: usize = 4;
/// The RPC server's address space beyond its budget and the largest message
/// (a tensor's data, at most the budget): the executable and a graph being
/// read (MiB), and each compute thread's stack and malloc arena.
const SERVER_OVERHEAD_MB: u64 = 1024;
const THREAD_OVERHEAD_MB: u64 = 80;

/// (internal) llama.cpp's RPC server on loopback, run by a hive for a lease.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rpc-server")]
pub struct RpcArgs {
    /// loopback port to listen on
    #[argh(option)]
    pub port: u16,
    /// where received tensors are cached
    #[argh(option)]
    pub cache_dir: PathBuf,
    /// the lease's memory (MiB): the device lent has this much
    #[argh(option)]
    pub memory_mb: u64,
    /// CPU threads for the lent CPU
    #[argh(option)]
    pub threads: Option<usize>,
}

/// `rbee rpc-server`: serves until killed. Loopback only, whatever it is told.
pub fn serve(args: &RpcArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.cache_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.cache_dir.display()))?;
    let threads = args
        .threads
        .unwrap_or_else(|| crate::machine::cores() as usize);
    let most = args
        .memory_mb
        .saturating_mul(2)
        .saturating_add(SERVER_OVERHEAD_MB)
        .saturating_add(THREAD_OVERHEAD_MB.saturating_mul(threads as u64));
    crate::process::limit_address_space(most.saturating_mul(1 << 20))
        .map_err(|e| format!("cannot limit the RPC server to {most} MiB: {e}"))?;
    crate::rpc::serve(
        &format!("127.0.0.1:{}", args.port),
        &args.cache_dir,
        threads,
        args.memory_mb.saturating_mul(1 << 20),
    )
}

struct Lease {
    info: LeaseInfo,
    port: u16,
    pid: u32,
    /// Tunnels open to it now.
    tunnels: u32,
    /// When it was made, and when its last tunnel closed.
    made: Instant,
    last_closed: Option<Instant>,
    ending: bool,
    /// What its server may still cache on disk (its tunnels share it).
    cache_left: Arc<AtomicU64>,
    /// The borrowing hive's certificate, pinned while the lease lives.
    borrower_fingerprint: Option<String>,
}

#[derive(Clone)]
pub struct Leases {
    exe: PathBuf,
    cache_dir: PathBuf,
    leases: Arc<Mutex<HashMap<String, Lease>>>,
    spawner: Spawner,
    changes: Changes,
    metrics: HiveMetrics,
    /// The borrowers let in at `/v1/rpc` while a lease of theirs lives
    /// (its worker's tunnels show the borrowing hive's certificate).
    borrowers: crate::http::tls::Pins,
}

impl Leases {
    /// The hive's leases, none yet; what earlier leases cached is removed
    /// (a cache lives as long as its lease).
    pub fn new(
        exe: PathBuf,
        data_dir: &std::path::Path,
        changes: Changes,
        metrics: HiveMetrics,
        borrowers: crate::http::tls::Pins,
    ) -> std::io::Result<Leases> {
        let cache_dir = data_dir.join("rpc-cache");
        match std::fs::remove_dir_all(&cache_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                "cannot remove {} (what earlier leases cached): {e}",
                cache_dir.display()
            ),
            _ => {}
        }
        Ok(Leases {
            exe,
            cache_dir,
            leases: Arc::default(),
            spawner: Spawner::new()?,
            changes,
            metrics,
            borrowers,
        })
    }

    /// Pins a lease's borrower while it lives.
    fn pin(&self, borrower: Option<&str>) {
        if let Some(fp) = borrower {
            self.borrowers.add(fp);
        }
    }

    /// Unpins a borrower that holds no other lease here.
    fn unpin(&self, borrower: Option<&str>) {
        let Some(fp) = borrower else { return };
        let held = self
            .lock()
            .values()
            .any(|l| l.borrower_fingerprint.as_deref() == Some(fp));
        if !held {
            self.borrowers.remove(fp);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every lease, with what its RPC server takes (measured, never less than
    /// the share's estimate: it grows as the worker sends its layers).
    pub fn list(&self) -> Vec<LeaseInfo> {
        let pids: Vec<u32> = self.lock().values().map(|l| l.pid).collect();
        let resident = crate::machine::resident_mb(&pids);
        let mut all: Vec<LeaseInfo> = self
            .lock()
            .values()
            .map(|l| {
                let mut info = l.info.clone();
                info.memory_mb = resident
                    .get(&l.pid)
                    .copied()
                    .unwrap_or(0)
                    .max(info.memory_mb);
                info.connected = l.tunnels > 0;
                info
            })
            .collect();
        all.sort_by(|a, b| a.lease.cmp(&b.lease));
        all
    }

    /// A new lease's id is not taken, and the leases (all of them, and the
    /// borrower's) are not at their most.
    fn check_room(&self, req: &LeaseRequest) -> Result<(), ApiError> {
        let leases = self.lock();
        if leases.contains_key(&req.lease) {
            return Err(ApiError::invalid(
                "lease",
                format!("lease {} exists already", req.lease),
            ));
        }
        check_count(
            leases.len(),
            leases
                .values()
                .filter(|l| l.info.borrower == req.borrower)
                .count(),
            &req.borrower,
        )
    }

    /// Waits on a lease's RPC server (on a thread of its own): when it exits
    /// the lease is over, its borrower unpinned and its cache removed.
    fn watch(&self, mut child: std::process::Child, id: String, cache_dir: PathBuf) {
        let this = self.clone();
        let pid = child.id();
        std::thread::spawn(move || {
            let status = child.wait();
            let removed = this.lock().remove(&id);
            let ending = removed.as_ref().is_some_and(|l| l.ending);
            this.unpin(removed.and_then(|l| l.borrower_fingerprint).as_deref());
            let _ = std::fs::remove_dir_all(&cache_dir);
            match status {
                Ok(s) if ending || s.success() => {
                    tracing::info!("lease {id}: RPC server (pid {pid}) ended: {s}");
                }
                Ok(s) => {
                    tracing::warn!(
                        "lease {id}: its RPC server (pid {pid}) crashed ({s}); the lease is over, its borrower's worker loses these layers"
                    );
                    this.metrics.lease_fault("rpc_server_crashed");
                }
                Err(e) => tracing::warn!("lease {id}: cannot wait for its RPC server: {e}"),
            }
            this.changes.bump();
        });
    }

    /// Starts the RPC server for a lease (the budget was checked by the
    /// caller) and waits until it listens.
    pub async fn make(&self, req: &LeaseRequest) -> Result<LeaseInfo, ApiError> {
        crate::protocol::check_lease_id(&req.lease)?;
        self.check_room(req)?;
        let port = free_loopback_port()?;
        let cache_dir = self.cache_dir.join(&req.lease);
        let mut command = Command::new(&self.exe);
        command
            .arg("rpc-server")
            .args(["--port", &port.to_string()])
            .args(["--memory-mb", &req.memory_mb.to_string()])
            .arg("--cache-dir")
            .arg(&cache_dir)
            .env_remove("RBEE_TOKEN")
            .env_remove(crate::protocol::WORKER_SECRET_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawner.spawn(command).await.map_err(|e| {
            ApiError::new(
                ErrorCode::SpawnFailed,
                format!("cannot start llama.cpp's RPC server: {e}"),
            )
        })?;
        let pid = child.id();
        let (said_tx, said) = std::sync::mpsc::channel();
        self.log_lines(child.stdout.take(), &req.lease, Some(said_tx));
        self.log_lines(child.stderr.take(), &req.lease, None);
        let info = LeaseInfo {
            lease: req.lease.clone(),
            model: req.model.clone(),
            borrower: req.borrower.clone(),
            layers: req.layers,
            memory_mb: req.memory_mb,
            connected: false,
            since: now_rfc3339(),
        };
        self.lock().insert(
            req.lease.clone(),
            Lease {
                info: info.clone(),
                port,
                pid,
                tunnels: 0,
                made: Instant::now(),
                last_closed: None,
                ending: false,
                cache_left: Arc::new(AtomicU64::new(req.memory_mb << 20)),
                borrower_fingerprint: req.borrower_fingerprint.clone(),
            },
        );
        self.pin(req.borrower_fingerprint.as_deref());
        self.changes.bump();
        self.watch(child, req.lease.clone(), cache_dir);
        // llama.cpp names its transport just before it binds; a tunnel
        // that comes in that moment early retries ([`crate::http::tunnel::connect_local`]).
        let started = tokio::task::spawn_blocking(move || said.recv_timeout(START_WAIT)).await;
        if !matches!(started, Ok(Ok(()))) {
            self.end(&req.lease);
            return Err(ApiError::new(
                ErrorCode::SpawnFailed,
                "llama.cpp's RPC server did not start (the hive's log says why)",
            ));
        }
        tracing::info!(
            "lease {}: lending {} layers of {} to hive {} ({} MB) through RPC server pid {pid} on 127.0.0.1:{port}",
            req.lease, req.layers, req.model, req.borrower, req.memory_mb
        );
        Ok(info)
    }

    /// Ends a lease: its RPC server is stopped (and its memory freed with it).
    pub fn end(&self, id: &str) -> Option<LeaseInfo> {
        let mut leases = self.lock();
        let lease = leases.get_mut(id)?;
        lease.ending = true;
        signal(lease.pid, libc::SIGTERM);
        Some(lease.info.clone())
    }

    /// A tunnel to a lease's RPC server, counted open until it ends.
    pub fn open(&self, id: &str) -> Result<Tunnel, ApiError> {
        let mut leases = self.lock();
        let lease = leases.get_mut(id).filter(|l| !l.ending).ok_or_else(|| {
            ApiError::new(
                ErrorCode::LeaseNotFound,
                format!("this hive has no lease {id:?}"),
            )
        })?;
        lease.tunnels += 1;
        let tunnel = Tunnel {
            leases: self.clone(),
            id: id.to_string(),
            port: lease.port,
            door: Some(Door::new(
                lease.info.memory_mb << 20,
                lease.cache_left.clone(),
            )),
        };
        drop(leases);
        self.changes.bump();
        Ok(tunnel)
    }

    /// Whether more than one tunnel to the lease is open: one waits.
    fn contested(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|l| l.tunnels > 1)
    }

    /// Ends leases whose worker is gone: runs for the life of the hive.
    pub async fn reap(self) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let unused: Vec<String> = self
                .lock()
                .iter()
                .filter(|(_, l)| !l.ending && l.tunnels == 0)
                .filter(|(_, l)| match l.last_closed {
                    Some(closed) => closed.elapsed() >= UNUSED_AFTER_USE,
                    None => l.made.elapsed() >= NEVER_USED,
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in unused {
                tracing::info!("lease {id}: its worker is gone; ending it");
                self.end(&id);
            }
        }
    }

    pub fn end_all(&self) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.end(&id);
        }
    }
}

/// A tunnel to a lease's RPC server: the borrower's messages pass its door
/// on their way in, the server's answers come back as they are. Counted
/// open while it lives.
pub struct Tunnel {
    leases: Leases,
    id: String,
    port: u16,
    door: Option<Door>,
}

impl Tunnel {
    /// Carries the upgraded connection to the lease's server until either
    /// side closes or the door closes it (said in the log, and counted).
    pub async fn carry(mut self, upgrade: hyper::upgrade::OnUpgrade) {
        let id = self.id.clone();
        let client = match upgrade.await {
            Ok(upgraded) => hyper_util::rt::TokioIo::new(upgraded),
            Err(e) => return tracing::warn!("lease {id}: the upgrade failed: {e}"),
        };
        let Some(door) = self.door.take() else { return };
        let (leases, port) = (self.leases.clone(), self.port);
        let connect = || {
            let id = id.clone();
            async move {
                crate::http::tunnel::connect_local(port, Duration::from_secs(5))
                    .await
                    .inspect_err(|e| {
                        tracing::warn!("lease {id}: its RPC server does not answer: {e}")
                    })
            }
        };
        match super::rpc_door::carry(client, connect, door, || leases.contested(&id)).await {
            Ok(()) => tracing::debug!("lease {id}: a tunnel closed"),
            Err(fault) => {
                tracing::warn!("lease {id}: a tunnel was closed: {fault}");
                self.leases.metrics.lease_fault(fault.label());
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(lease) = self.leases.lock().get_mut(&self.id) {
            lease.tunnels = lease.tunnels.saturating_sub(1);
            lease.last_closed = Some(Instant::now());
        }
        self.leases.changes.bump();
    }
}

/// A port free on loopback now.
fn free_loopback_port() -> Result<u16, ApiError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ApiError::new(ErrorCode::NoPort, format!("no free loopback port: {e}")))
}

impl Leases {
    /// The RPC server's output into the hive's log; `started` hears when it
    /// names its transport, the last thing it says before it listens. What
    /// `rpc.cpp` says of a tunnel it ended or a buffer it refused is a
    /// warning, and counted.
    fn log_lines(
        &self,
        pipe: Option<impl std::io::Read + Send + 'static>,
        lease: &str,
        started: Option<std::sync::mpsc::Sender<()>>,
    ) {
        let Some(pipe) = pipe else { return };
        let lease = lease.to_string();
        let metrics = self.metrics.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let fault = if line.starts_with("tunnel ended by a malformed") {
                    Some("malformed_message")
                } else if line.starts_with("tunnel ended by") {
                    Some("failed_message")
                } else if line.starts_with("lease budget: refused") {
                    Some("over_budget")
                } else {
                    None
                };
                match fault {
                    Some(fault) => {
                        tracing::warn!(target: "rbee::rpc", "lease {lease}: {line}");
                        metrics.lease_fault(fault);
                    }
                    None => tracing::info!(target: "rbee::rpc", "lease {lease}: {line}"),
                }
                if line.starts_with("transport") {
                    if let Some(tx) = &started {
                        let _ = tx.send(());
                    }
                }
            }
        });
    }
}

/// Whether one more lease may be made beside `held` (of which `borrowers`
/// are `borrower`'s).
fn check_count(held: usize, borrowers: usize, borrower: &str) -> Result<(), ApiError> {
    if held >= MOST_LEASES {
        return Err(ApiError::new(
            ErrorCode::TooManyRequests,
            format!("this hive lends to {held} leases already, the most it holds at once"),
        ));
    }
    if borrowers >= MOST_PER_BORROWER {
        return Err(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "hive {borrower} holds {borrowers} leases here already, the most one borrower may"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_limited_per_hive_and_per_borrower() {
        assert!(check_count(0, 0, "desk").is_ok());
        assert!(check_count(MOST_LEASES - 1, MOST_PER_BORROWER - 1, "desk").is_ok());
        let e = check_count(MOST_LEASES, 0, "desk").unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        let e = check_count(1, MOST_PER_BORROWER, "desk").unwrap_err();
        assert!(
            e.message.contains("hive desk holds 4 leases"),
            "{}",
            e.message
        );
    }
}
