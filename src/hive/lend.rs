//! Lending this machine's devices to a worker on another hive (DESIGN.md §12).
//!
//! A lease is one llama.cpp RPC server, this executable in the `rpc-server`
//! role, bound to loopback on a port of its own (the server takes one client at
//! a time, so each split worker gets its own). The only way in from the
//! network is the hive's port: `GET /v1/rpc?lease=ID` with `Upgrade: ggml-rpc`
//! and the bearer token, then raw bytes both ways ([`open`] and
//! [`crate::http::tunnel`]). A lease counts its memory against the hive's
//! budget from the moment it is made; it ends when the queen ends it, when its
//! worker's tunnels have all been closed for [`UNUSED_AFTER_USE`] (the worker
//! is gone), or when no tunnel came within [`NEVER_USED`].

use super::state::Changes;
use crate::process::{signal, Spawner};
use crate::protocol::{new_id, now_rfc3339, ApiError, ErrorCode, LeaseInfo, LeaseRequest};
use argh::FromArgs;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The upgrade protocol `GET /v1/rpc` speaks.
pub const PROTOCOL: &str = "ggml-rpc";
/// A lease whose tunnels have all closed ends after this long (llama.cpp's
/// client opens and closes a few connections while the model loads).
const UNUSED_AFTER_USE: Duration = Duration::from_secs(30);
/// A lease no tunnel ever came to ends after this long.
const NEVER_USED: Duration = Duration::from_secs(120);
/// How long a new RPC server may take to listen.
const START_WAIT: Duration = Duration::from_secs(10);

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
    crate::worker::engine::rpc::serve(
        &format!("127.0.0.1:{}", args.port),
        &args.cache_dir,
        threads,
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
}

#[derive(Clone)]
pub struct Leases {
    exe: PathBuf,
    cache_dir: PathBuf,
    leases: Arc<Mutex<HashMap<String, Lease>>>,
    spawner: Spawner,
    changes: Changes,
}

impl Leases {
    pub fn new(
        exe: PathBuf,
        data_dir: &std::path::Path,
        changes: Changes,
    ) -> std::io::Result<Leases> {
        Ok(Leases {
            exe,
            cache_dir: data_dir.join("rpc-cache"),
            leases: Arc::default(),
            spawner: Spawner::new()?,
            changes,
        })
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

    /// Starts the RPC server for a lease (the budget was checked by the
    /// caller) and waits until it listens.
    pub async fn make(&self, req: &LeaseRequest) -> Result<LeaseInfo, ApiError> {
        if req.lease.is_empty()
            || req.lease.len() > 64
            || !req
                .lease
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ApiError::invalid(
                "lease",
                "a lease id is 1 to 64 letters, digits and dashes",
            ));
        }
        if self.lock().contains_key(&req.lease) {
            return Err(ApiError::invalid(
                "lease",
                format!("lease {} exists already", req.lease),
            ));
        }
        let port = free_loopback_port()?;
        let mut command = Command::new(&self.exe);
        command
            .arg("rpc-server")
            .args(["--port", &port.to_string()])
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .env_remove("RBEE_TOKEN")
            .env_remove(crate::worker::WORKER_SECRET_ENV)
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
        log_lines(child.stdout.take(), &req.lease, Some(said_tx));
        log_lines(child.stderr.take(), &req.lease, None);
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
            },
        );
        self.changes.bump();
        let this = self.clone();
        let id = req.lease.clone();
        std::thread::spawn(move || {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            tracing::info!("lease {id}: RPC server (pid {pid}) ended: {status}");
            this.lock().remove(&id);
            this.changes.bump();
        });
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

    /// A tunnel to a lease's RPC server: its loopback port, and a guard that
    /// counts the tunnel open until dropped.
    pub fn open(&self, id: &str) -> Result<(u16, TunnelGuard), ApiError> {
        let mut leases = self.lock();
        let lease = leases.get_mut(id).filter(|l| !l.ending).ok_or_else(|| {
            ApiError::new(
                ErrorCode::LeaseNotFound,
                format!("this hive has no lease {id:?}"),
            )
        })?;
        lease.tunnels += 1;
        let port = lease.port;
        drop(leases);
        self.changes.bump();
        Ok((
            port,
            TunnelGuard {
                leases: self.clone(),
                id: id.to_string(),
            },
        ))
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

/// Counts a tunnel open while it lives.
pub struct TunnelGuard {
    leases: Leases,
    id: String,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.leases.lock().get_mut(&self.id) {
            lease.tunnels = lease.tunnels.saturating_sub(1);
            lease.last_closed = Some(Instant::now());
        }
        self.leases.changes.bump();
    }
}

/// A lease id is 1 to 64 ASCII letters, digits and dashes: it goes into a URL.
pub fn check_lease_id(id: &str) -> Result<(), ApiError> {
    let fine = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if fine {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "lease",
            format!("a lease id is 1 to 64 letters, digits and dashes, not {id:?}"),
        ))
    }
}

/// A new lease's id.
pub fn new_lease_id() -> String {
    new_id("lease")
}

/// A port free on loopback now.
fn free_loopback_port() -> Result<u16, ApiError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ApiError::new(ErrorCode::NoPort, format!("no free loopback port: {e}")))
}

/// The RPC server's output into the hive's log; `started` hears when it
/// names its transport, the last thing it says before it listens.
fn log_lines(
    pipe: Option<impl std::io::Read + Send + 'static>,
    lease: &str,
    started: Option<std::sync::mpsc::Sender<()>>,
) {
    let Some(pipe) = pipe else { return };
    let lease = lease.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            tracing::info!(target: "rbee::rpc", "lease {lease}: {}", line.trim());
            if line.trim_start().starts_with("transport") {
                if let Some(tx) = &started {
                    let _ = tx.send(());
                }
            }
        }
    });
}
