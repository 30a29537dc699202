//! The hive the queen starts itself on its own machine (node `localhost`),
//! when none is registered under that name: started on demand, restarted when
//! it stops answering, stopped with the queen.
//!
//! It is started through [`process::start_daemon`]: the hive binds its port
//! itself and reports where it listens. Port 8080 (DESIGN.md §1) when free,
//! else any port the kernel gives; nothing is probed beforehand, so nothing
//! can take the port between a probe and the bind.

use super::registry::{HiveConn, LOCALHOST};
use crate::process::{self, signal, Lifetime, Spawner, StartError};
use crate::protocol::StartFailure;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where a local hive goes when the port is free (DESIGN.md §1).
const LOCAL_HIVE_PORT: u16 = 8080;
/// How long a local hive may take to report ready: it only binds and opens its catalog.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping hive may take to stop its workers before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The local hive's supervisor; clones share the one hive.
#[derive(Clone)]
pub struct LocalHive {
    /// The running hive, if any; held across a start so two jobs start one hive.
    running: Arc<tokio::sync::Mutex<Option<Running>>>,
    /// Starts the hive so that it dies with the queen.
    spawner: Spawner,
    /// The queen's data directory, shared with the hive (its catalog, models, log).
    data_dir: PathBuf,
    /// Passed on to the hive, so the cluster shares one token.
    token: Option<String>,
}

/// A hive this queen started and owns.
struct Running {
    conn: HiveConn,
    pid: u32,
}

impl LocalHive {
    pub fn new(data_dir: PathBuf, token: Option<String>) -> Result<LocalHive, String> {
        Ok(LocalHive {
            running: Arc::default(),
            spawner: Spawner::new().map_err(|e| format!("cannot start the spawner thread: {e}"))?,
            data_dir,
            token,
        })
    }

    /// The running local hive, if there is one.
    pub async fn conn(&self) -> Option<HiveConn> {
        self.running.lock().await.as_ref().map(|r| r.conn.clone())
    }

    /// The local hive, started now if it is not running or its process has
    /// gone. `narrate` hears what happens.
    pub async fn ensure(&self, narrate: impl Fn(&str, String)) -> Result<HiveConn, String> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.as_ref() {
            if process::alive(r.pid) {
                return Ok(r.conn.clone());
            }
            narrate(
                "restart",
                format!(
                    "the local hive (pid {}) has gone; starting a new one",
                    r.pid
                ),
            );
            signal(r.pid, libc::SIGKILL);
            *running = None;
        }
        narrate(
            "start_hive",
            format!("no hive on localhost yet: starting one on port {LOCAL_HIVE_PORT}"),
        );
        let started = match self.start(LOCAL_HIVE_PORT).await {
            Err(e) if e.reason == StartFailure::PortTaken => {
                narrate(
                    "start_hive",
                    format!("port {LOCAL_HIVE_PORT} is taken: starting the hive on any free port"),
                );
                self.start(0).await
            }
            other => other,
        }
        .map_err(|e| e.message)?;
        let pid = started.child.id();
        process::reap(started.child);
        let conn = HiveConn {
            name: LOCALHOST.into(),
            url: format!("http://{}", started.addr),
            token: self.token.clone(),
            fingerprint: None,
            found: "local".into(),
        };
        narrate(
            "hive_up",
            format!("local hive is up at {} (pid {pid})", conn.url),
        );
        *running = Some(Running {
            conn: conn.clone(),
            pid,
        });
        Ok(conn)
    }

    /// `rbee hive` on `port` (0: any), sharing the queen's data dir and token.
    async fn start(&self, port: u16) -> Result<process::Started, StartError> {
        let mut command = process::own_command("hive")?;
        command
            .args(["--port", &port.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir);
        match &self.token {
            Some(t) => command.env("RBEE_TOKEN", t),
            None => command.env_remove("RBEE_TOKEN"),
        };
        let log = self.data_dir.join("hive.log");
        let spawner = Lifetime::DiesWith(&self.spawner);
        process::start_daemon(command, "the local hive", &log, spawner, START_TIMEOUT).await
    }

    /// Stops the local hive, which stops its workers first; waits a bounded time.
    pub async fn stop(&self) {
        let Some(running) = self.running.lock().await.take() else {
            return;
        };
        signal(running.pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while process::alive(running.pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if process::alive(running.pid) {
            signal(running.pid, libc::SIGKILL);
        }
    }
}
