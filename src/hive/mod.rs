//! `rbee hive`: one per machine. It knows which models are here (the catalog),
//! fetches the ones it lacks, and starts, watches and stops workers.

pub mod catalog;
pub mod model_ref;
pub mod models;
pub mod workers;

use crate::http::{self, Auth, Body};
use crate::protocol::{
    Capabilities, DownloadEvent, DownloadRequest, Health, SpawnRequest, WorkerReadyCallback,
};
use argh::FromArgs;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use models::Models;
use std::path::PathBuf;
use std::sync::Arc;

use workers::{Settings, Workers};

/// Manage this machine's models and workers.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "hive")]
pub struct Args {
    /// address to listen on (default 127.0.0.1; others need a token)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    pub host: String,
    /// port to listen on (default 8080)
    #[argh(option, default = "8080")]
    pub port: u16,
    /// where the catalog and models live (default $RBEE_HOME, else ~/.local/share/rbee)
    #[argh(option)]
    pub data_dir: Option<PathBuf>,
    /// stop workers idle this long (default 5m; e.g. 30s, 10m)
    #[argh(option, default = "String::from(\"5m\")")]
    pub idle_timeout: String,
    /// a worker still loading after this long is failed (default 10m)
    #[argh(option, default = "String::from(\"10m\")")]
    pub ready_timeout: String,
    /// first port handed to workers (default 8081)
    #[argh(option, default = "8081")]
    pub worker_port: u16,
    /// host name or address others reach this machine's workers at (default: --host, or 127.0.0.1)
    #[argh(option)]
    pub advertise_host: Option<String>,
    /// file holding the shared bearer token (else RBEE_TOKEN)
    #[argh(option)]
    pub token_file: Option<PathBuf>,
}

#[derive(Clone)]
struct Hive {
    models: Models,
    workers: Workers,
    auth: Auth,
    /// Fired by `POST /v1/admin/shutdown`.
    shutdown: Arc<tokio::sync::Notify>,
}

pub async fn run(args: Args) -> Result<(), String> {
    let idle_timeout =
        crate::parse_duration(&args.idle_timeout).map_err(|e| format!("--idle-timeout: {e}"))?;
    let ready_timeout =
        crate::parse_duration(&args.ready_timeout).map_err(|e| format!("--ready-timeout: {e}"))?;
    let auth = Auth::load(args.token_file.as_deref())?;
    auth.check_bind(&args.host)?;
    let listener = http::bind(&args.host, args.port).await?;
    let port = listener.local_addr().map_or(args.port, |a| a.port());

    let data_dir = crate::data_dir(args.data_dir.as_deref());
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        format!(
            "cannot create the data directory {}: {e}",
            data_dir.display()
        )
    })?;
    let catalog = catalog::Catalog::open(&data_dir.join("hive-catalog"))?;
    let models = Models::new(catalog, data_dir.join("models"));

    let unspecified = args.host == "0.0.0.0" || args.host == "::";
    let local_host = if unspecified || args.host == "localhost" {
        "127.0.0.1".to_string()
    } else {
        args.host.clone()
    };
    let settings = Settings {
        exe: std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?,
        host: args.host.clone(),
        advertise_host: args
            .advertise_host
            .clone()
            .unwrap_or_else(|| local_host.clone()),
        callback_url: format!("http://{local_host}:{port}/v1/workers/ready"),
        first_port: args.worker_port,
        ready_timeout,
        idle_timeout,
        token: auth.token().map(str::to_string),
    };
    let workers =
        Workers::new(settings).map_err(|e| format!("cannot start the spawner thread: {e}"))?;
    tokio::spawn(workers.clone().reap_idle());
    let hive = Hive {
        models,
        workers: workers.clone(),
        auth,
        shutdown: Arc::new(tokio::sync::Notify::new()),
    };
    tracing::info!(
        "hive listening on http://{}:{port}, data in {}",
        args.host,
        data_dir.display()
    );
    let admin = hive.shutdown.clone();
    http::serve(listener, move |req| route(hive.clone(), req), async move {
        http::stop_signal(&admin).await;
        tracing::info!("hive shutting down: stopping its workers");
    })
    .await;
    workers.stop_all().await;
    Ok(())
}

const PATHS: [&str; 9] = [
    "/health",
    "/v1/health",
    "/v1/capabilities",
    "/v1/models",
    "/v1/models/download",
    "/v1/models/download/progress",
    "/v1/workers/spawn",
    "/v1/workers/list",
    "/v1/workers/ready",
];

async fn route(h: Hive, req: Request<Incoming>) -> Response<Body> {
    if let Some(denied) = h.auth.reject(&req) {
        return denied;
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["health"] | ["v1", "health"]) => {
            http::json(StatusCode::OK, &Health::alive("hive"))
        }
        (&Method::GET, ["v1", "capabilities"]) => {
            http::json(StatusCode::OK, &capabilities(h.models.models_dir()))
        }
        (&Method::GET, ["v1", "models"]) => http::json(StatusCode::OK, &h.models.catalog().list()),
        (&Method::DELETE, ["v1", "models", name]) => match h.models.delete(name) {
            Ok(entry) => http::json(StatusCode::OK, &entry),
            Err(f) => f.response(),
        },
        (&Method::POST, ["v1", "models", "download"]) => {
            let body: DownloadRequest = match http::read_json(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match h.models.download(&body.model_ref).await {
                Ok(started) => http::json(StatusCode::ACCEPTED, &started),
                Err(f) => f.response(),
            }
        }
        (&Method::GET, ["v1", "models", "download", "progress"]) => {
            let id = query_param(req.uri().query(), "id").unwrap_or_default();
            match h.models.progress(&id) {
                Some(progress) => http::sse_from_watch(progress, |e| {
                    !matches!(e, DownloadEvent::Downloading { .. })
                }),
                None => http::error(
                    StatusCode::NOT_FOUND,
                    "DOWNLOAD_NOT_FOUND",
                    format!("no download with id {id:?}"),
                ),
            }
        }
        (&Method::POST, ["v1", "workers", "spawn"]) => {
            let body: SpawnRequest = match http::read_json(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let spawned = async {
                let model = h.models.find(&body.model_ref).await?;
                h.workers.spawn(&model, &body).await
            };
            match spawned.await {
                Ok(info) => http::json(StatusCode::ACCEPTED, &info),
                Err(f) => f.response(),
            }
        }
        (&Method::GET, ["v1", "workers", "list"]) => http::json(StatusCode::OK, &h.workers.list()),
        (&Method::POST, ["v1", "workers", "ready"]) => {
            let body: WorkerReadyCallback = match http::read_json(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match h.workers.ready(&body) {
                Ok(info) => http::json(StatusCode::OK, &info),
                Err(f) => f.response(),
            }
        }
        (&Method::POST, ["v1", "workers", id, "shutdown"]) => match h.workers.stop(id) {
            Ok(info) => http::json(StatusCode::ACCEPTED, &info),
            Err(f) => f.response(),
        },
        (&Method::POST, ["v1", "admin", "shutdown"]) => {
            h.shutdown.notify_one();
            http::json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"status": "shutting_down"}),
            )
        }
        (
            m,
            ["v1", "models", _] | ["v1", "workers", _, "shutdown"] | ["v1", "admin", "shutdown"],
        ) => http::method_not_allowed(m, &path),
        (m, _) if PATHS.contains(&path.as_str()) => http::method_not_allowed(m, &path),
        _ => http::not_found(&path),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn capabilities(models_dir: &std::path::Path) -> Capabilities {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_mb = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    let mut probe = models_dir.to_path_buf();
    while !probe.exists() && probe.pop() {}
    Capabilities {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        cores: crate::worker::default_threads() as u32,
        ram_total_mb: mem_mb("MemTotal:"),
        ram_available_mb: mem_mb("MemAvailable:"),
        disk_free_mb: models::free_space(&probe).map_or(0, |b| b >> 20),
        backends: crate::BACKENDS.split(',').map(str::to_string).collect(),
        gpus: crate::worker::engine::gpus(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}
