//! The queen's hives: the registered ones (in sled, surviving restarts), their
//! health, and the local hive the queen may start itself.
//!
//! Only this module and the hive's catalog touch sled.

use crate::process::{signal, Spawner};
use crate::protocol::{now_rfc3339, AddHive, ApiError, HiveState, HiveStatus};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The name of the hive on the queen's own machine.
pub const LOCALHOST: &str = "localhost";
/// Where a local hive goes when the port is free (DESIGN.md §1).
const LOCAL_HIVE_PORT: u16 = 8080;
/// How often every hive is asked whether it is alive.
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// What the queen needs to talk to a hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveConn {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
}

/// Whether a hive answered its last health check, and when it last did.
type Seen = (bool, Option<String>);

/// A hive this queen started and owns.
struct LocalHive {
    conn: HiveConn,
    pid: u32,
}

#[derive(Clone)]
pub struct Registry {
    db: sled::Db,
    /// Last health check per hive name: reachable or not, and when last seen.
    health: Arc<Mutex<HashMap<String, Seen>>>,
    local: Arc<tokio::sync::Mutex<Option<LocalHive>>>,
    spawner: Spawner,
    data_dir: PathBuf,
    /// Passed on to a local hive, so the cluster shares one token.
    token: Option<String>,
}

impl Registry {
    pub fn open(data_dir: PathBuf, token: Option<String>) -> Result<Registry, String> {
        let path = data_dir.join("queen-hives");
        let db = sled::open(&path).map_err(|e| {
            format!(
                "cannot open the hive registry at {} (is another queen using this --data-dir?): {e}",
                path.display()
            )
        })?;
        Ok(Registry {
            db,
            health: Arc::default(),
            local: Arc::default(),
            spawner: Spawner::new().map_err(|e| format!("cannot start the spawner thread: {e}"))?,
            data_dir,
            token,
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
        let bytes = serde_json::to_vec(&conn).map_err(|e| ApiError::internal(e.to_string()))?;
        self.db
            .insert(conn.name.as_bytes(), bytes)
            .and_then(|_| self.db.flush())
            .map_err(|e| ApiError::internal(format!("cannot write the hive registry: {e}")))?;
        Ok(conn)
    }

    /// Forgets a registered hive; false if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, ApiError> {
        let old = self
            .db
            .remove(name)
            .and_then(|old| self.db.flush().map(|_| old))
            .map_err(|e| ApiError::internal(format!("cannot write the hive registry: {e}")))?;
        Ok(old.is_some())
    }

    fn registered(&self) -> Vec<HiveConn> {
        self.db
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Every hive this queen can use: the registered ones, then its local hive if running.
    pub async fn all(&self) -> Vec<HiveConn> {
        let mut all = self.registered();
        if let Some(local) = self.local.lock().await.as_ref() {
            if !all.iter().any(|h| h.name == local.conn.name) {
                all.push(local.conn.clone());
            }
        }
        all
    }

    pub async fn get(&self, name: &str) -> Option<HiveConn> {
        self.all().await.into_iter().find(|h| h.name == name)
    }

    pub async fn list(&self) -> Vec<HiveStatus> {
        let local_name = self
            .local
            .lock()
            .await
            .as_ref()
            .map(|l| l.conn.name.clone());
        let health = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.all()
            .await
            .into_iter()
            .map(|h| {
                let (status, last_seen) = match health.get(&h.name) {
                    Some((true, seen)) => (HiveState::Reachable, seen.clone()),
                    Some((false, seen)) => (HiveState::Unreachable, seen.clone()),
                    None => (HiveState::Unknown, None),
                };
                HiveStatus {
                    managed: local_name.as_deref() == Some(h.name.as_str()),
                    name: h.name,
                    url: h.url,
                    status,
                    last_seen,
                }
            })
            .collect()
    }

    /// Asks a hive whether it is alive, and remembers the answer.
    pub async fn check(&self, hive: &HiveConn) -> Result<(), String> {
        let client = hive.client();
        let answer = client.health();
        let result = match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(h)) if h.role == "hive" => Ok(()),
            Ok(Ok(h)) => Err(format!("{} answers as a {}, not a hive", hive.url, h.role)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{} did not answer within 5s", hive.url)),
        };
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let seen = health.get(&hive.name).and_then(|(_, s)| s.clone());
        let now = result.is_ok().then(now_rfc3339);
        health.insert(hive.name.clone(), (result.is_ok(), now.or(seen)));
        result
    }

    /// Checks every hive now and then, forever.
    pub async fn watch_health(self) {
        loop {
            for hive in self.all().await {
                if let Err(e) = self.check(&hive).await {
                    tracing::debug!("hive {} is unreachable: {e}", hive.name);
                }
            }
            tokio::time::sleep(HEALTH_EVERY).await;
        }
    }

    /// The local hive, started now if it is not running. `narrate` hears what happens.
    pub async fn ensure_local(&self, narrate: impl Fn(&str, String)) -> Result<HiveConn, String> {
        let mut local = self.local.lock().await;
        if let Some(l) = local.as_ref() {
            if self.check(&l.conn).await.is_ok() {
                return Ok(l.conn.clone());
            }
            narrate(
                "restart",
                format!(
                    "the local hive (pid {}) stopped answering; starting a new one",
                    l.pid
                ),
            );
            signal(l.pid, libc::SIGKILL);
            *local = None;
        }
        let port = if std::net::TcpListener::bind(("127.0.0.1", LOCAL_HIVE_PORT)).is_ok() {
            LOCAL_HIVE_PORT
        } else {
            std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("no free port for a local hive: {e}"))?
        };
        narrate(
            "start_hive",
            format!("no hive on localhost yet: starting one on port {port}"),
        );
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let log_path = self.data_dir.join("hive.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("hive")
            .args(["--port", &port.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        match &self.token {
            Some(t) => command.env("RBEE_TOKEN", t),
            None => command.env_remove("RBEE_TOKEN"),
        };
        let mut child = self
            .spawner
            .spawn(command)
            .await
            .map_err(|e| format!("cannot start a local hive: {e}"))?;
        let conn = HiveConn {
            name: LOCALHOST.into(),
            url: format!("http://127.0.0.1:{port}"),
            token: self.token.clone(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.check(&conn).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the local hive exited ({status}) while starting; see {}",
                    log_path.display()
                ));
            }
            if tokio::time::Instant::now() > deadline {
                signal(child.id(), libc::SIGKILL);
                return Err(format!(
                    "the local hive did not answer within 30s; see {}",
                    log_path.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = child.id();
        // Reap it when it exits, so it leaves no zombie behind.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        narrate(
            "hive_up",
            format!("local hive is up at {} (pid {pid})", conn.url),
        );
        *local = Some(LocalHive {
            conn: conn.clone(),
            pid,
        });
        Ok(conn)
    }

    /// Stops the local hive, which stops its workers first; waits a bounded time.
    pub async fn stop_local(&self) {
        let Some(local) = self.local.lock().await.take() else {
            return;
        };
        signal(local.pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while crate::process::alive(local.pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if crate::process::alive(local.pid) {
            signal(local.pid, libc::SIGKILL);
        }
    }
}
