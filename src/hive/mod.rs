//! `rbee hive`: one per machine. It knows which models are here (the catalog),
//! fetches the ones it lacks, and starts, watches and stops workers.

pub mod catalog;
pub mod downloads;
pub mod hf;
pub mod join;
pub mod lend;
pub mod models;
pub mod rpc_door;
pub mod state;
pub mod workers;

use crate::http::{self, Auth, Body, Reply, Route};
use crate::protocol::FlashAttn;
use crate::protocol::{
    ApiError, Capabilities, DownloadEvent, DownloadRequest, ErrorCode, Health, LeaseRequest,
    SpawnRequest, WorkerReadyCallback, WorkerState,
};
use argh::FromArgs;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use models::Models;
use state::{Changes, State};
use std::path::PathBuf;
use std::sync::Arc;

use workers::{Settings, Workers};

/// Manage this machine's models and workers.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "hive")]
pub struct Args {
    /// address to listen on (default 127.0.0.1, or 0.0.0.0 when joining or
    /// joined to a queen; beyond loopback it needs a token or a joined queen)
    #[argh(option)]
    pub host: Option<String>,
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
    /// host name or address others reach this machine's workers at (default: --host; on a wildcard --host, the address the queen reached this hive at)
    #[argh(option)]
    pub advertise_host: Option<String>,
    /// file holding the shared bearer token (else RBEE_TOKEN)
    #[argh(option)]
    pub token_file: Option<PathBuf>,
    /// host names this daemon answers to without a token, comma-separated
    /// (always: localhost, the loopback addresses, --host and this machine's name)
    #[argh(option)]
    pub allowed_hosts: Option<String>,
    /// web page origins that may call this daemon from a browser,
    /// comma-separated, or * (always: pages on this machine)
    #[argh(option)]
    pub allowed_origins: Option<String>,
    /// flash attention in the workers it starts: on, off or auto (default
    /// auto; see the worker's --flash-attn)
    #[argh(option, default = "FlashAttn::Auto", from_str_fn(FlashAttn::parse))]
    pub worker_flash_attn: FlashAttn,
    /// memory rbee may use for workers, e.g. 8GiB or 1500MB (default: what is
    /// free at start, less 10% and at least 512 MiB)
    #[argh(option)]
    pub max_memory: Option<String>,
    /// rebuild a damaged model catalog from the model files in the data dir
    /// (the old one is moved aside), then serve
    #[argh(switch)]
    pub rebuild_catalog: bool,
    /// write a per-user service (systemd user unit; launchd agent on macOS)
    /// that runs this role with the other flags given, start it, and exit
    #[argh(switch)]
    pub install_service: bool,
    /// stop and remove that service, and exit
    #[argh(switch)]
    pub uninstall_service: bool,
    /// print this hive's identity (its certificate's SHA-256, made on first start), and exit
    #[argh(switch)]
    pub show_identity: bool,
    /// join the queen this token names (`rbee keeper join-token` prints it);
    /// once joined, the hive restarts without one
    #[argh(option)]
    pub join: Option<String>,
    /// the name this hive joins under (default: this machine's name)
    #[argh(option)]
    pub name: Option<String>,
}

#[derive(Clone)]
struct Hive {
    models: Models,
    workers: Workers,
    leases: lend::Leases,
    state: State,
    auth: Auth,
    /// Fired by `POST /v1/admin/shutdown`.
    shutdown: Arc<tokio::sync::Notify>,
}

pub async fn run(args: Args) -> Result<(), String> {
    if args.show_identity {
        return crate::identity::show(args.data_dir.as_deref(), "hive");
    }
    let limits = Limits::of(&args)?;
    let data_dir = crate::data_dir(args.data_dir.as_deref());
    crate::create_data_dir(&data_dir)?;
    let identity = crate::identity::load_or_make(&data_dir, "hive")?;
    tracing::info!("hive identity {}", identity.fingerprint);
    let token = args
        .join
        .as_deref()
        .map(crate::join_token::JoinToken::decode)
        .transpose()?;
    let joined = join::joined(&data_dir)?;
    // Its queen's certificate is let in as the token is; its own, for the
    // workers it reaches over TLS.
    let queen_pin = token
        .as_ref()
        .map(|t| t.fingerprint.clone())
        .or(joined.as_ref().map(|j| j.fingerprint.clone()));
    let door = Door::open(&args, &identity, queen_pin)?;
    let listener = crate::process::bind(&door.host, args.port).await?;
    let port = listener.local_addr().map_or(args.port, |a| a.port());
    let hive = Hive::start(&args, &data_dir, &door, port, &limits)?;
    tracing::info!(
        "hive listening on {}:{port}, data in {}, {} MiB of memory for workers",
        door.host,
        data_dir.display(),
        limits.budget_mb
    );
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    crate::process::report_ready(addr);
    let admin = hive.shutdown.clone();
    // Joining (or checking in) needs this hive answering: the queen checks
    // that it reaches it. A refusal stops the hive with the queen's reason.
    let refusal = Arc::new(std::sync::Mutex::new(None::<String>));
    if token.is_some() || joined.is_some() {
        let here = join::Here {
            port,
            addresses: args
                .advertise_host
                .iter()
                .cloned()
                .chain(crate::machine::addresses().iter().map(|ip| ip.to_string()))
                .collect(),
        };
        let (data_dir, refusal, admin) = (data_dir.clone(), refusal.clone(), admin.clone());
        let name = args.name.clone();
        tokio::spawn(async move {
            if let Err(e) = join::take_part(&data_dir, token, joined, name, &here).await {
                tracing::error!("{e}");
                *refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                admin.notify_one();
            }
        });
    }
    serve(hive, listener).await;
    let refused = refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
    match refused {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The hive's time limits and memory budget, from its flags.
struct Limits {
    idle_timeout: std::time::Duration,
    ready_timeout: std::time::Duration,
    budget_mb: u64,
}

impl Limits {
    fn of(args: &Args) -> Result<Limits, String> {
        let idle_timeout = crate::parse_duration(&args.idle_timeout)
            .map_err(|e| format!("--idle-timeout: {e}"))?;
        let ready_timeout = crate::parse_duration(&args.ready_timeout)
            .map_err(|e| format!("--ready-timeout: {e}"))?;
        let budget_mb = match &args.max_memory {
            Some(size) => crate::parse_size_mb(size).map_err(|e| format!("--max-memory: {e}"))?,
            None => state::default_budget_mb(crate::machine::ram().available_mb),
        };
        Ok(Limits {
            idle_timeout,
            ready_timeout,
            budget_mb,
        })
    }
}

/// Who the hive answers: where it listens, its TLS pins (its own certificate,
/// its queen's) and its door (token, peers, a lease's borrowers at `/v1/rpc`).
struct Door {
    host: String,
    auth: Auth,
    pins: crate::http::tls::Pins,
    borrowers: crate::http::tls::Pins,
}

impl Door {
    fn open(
        args: &Args,
        identity: &crate::identity::Identity,
        queen_pin: Option<String>,
    ) -> Result<Door, String> {
        let pins = crate::http::tls::Pins::new([identity.fingerprint.clone()]);
        if let Some(fp) = &queen_pin {
            pins.add(fp);
        }
        crate::http::tls::install(Some(identity), pins.clone())?;
        let host = args.host.clone().unwrap_or_else(|| {
            match queen_pin {
                Some(_) => "0.0.0.0",
                None => "127.0.0.1",
            }
            .to_string()
        });
        let mut auth = Auth::load(args.token_file.as_deref())?.with_doors(
            &host,
            args.allowed_hosts.as_deref(),
            args.allowed_origins.as_deref(),
        );
        // A lease's borrower reaches this hive's tunnels, and nothing else.
        let borrowers = crate::http::tls::Pins::default();
        if queen_pin.is_some() {
            auth = auth
                .with_peers(pins.clone())
                .with_tunnel_peers(borrowers.clone(), "/v1/rpc");
        }
        auth.check_bind(&host)?;
        Ok(Door {
            host,
            auth,
            pins,
            borrowers,
        })
    }
}

impl Hive {
    /// The catalog opened, and the spawners of leases and workers started.
    fn start(
        args: &Args,
        data_dir: &std::path::Path,
        door: &Door,
        port: u16,
        limits: &Limits,
    ) -> Result<Hive, String> {
        let changes = Changes::new();
        let catalog_path = data_dir.join(crate::HIVE_CATALOG);
        let models = if args.rebuild_catalog {
            rebuild_catalog(&catalog_path, data_dir, changes.clone())?
        } else {
            let catalog = catalog::Catalog::open(&catalog_path, data_dir, changes.clone())?;
            Models::new(catalog, data_dir.join("models"))
        };
        let host = &door.host;
        let unspecified = host == "0.0.0.0" || host == "::";
        let local_host = if unspecified || host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let leases = lend::Leases::new(
            exe.clone(),
            data_dir,
            changes.clone(),
            models.metrics().clone(),
            door.borrowers.clone(),
        )
        .map_err(|e| format!("cannot start the spawner thread: {e}"))?;
        tokio::spawn(leases.clone().reap());
        let settings = Settings {
            exe,
            host: host.clone(),
            advertise_host: args.advertise_host.clone(),
            tls: Some(workers::WorkerTls {
                identity_dir: data_dir.to_path_buf(),
                pins: door.pins.clone(),
            }),
            callback_url: format!("http://{local_host}:{port}/v1/workers/ready"),
            first_port: args.worker_port,
            ready_timeout: limits.ready_timeout,
            idle_timeout: limits.idle_timeout,
            token: door.auth.token().map(str::to_string),
            flash_attn: args.worker_flash_attn,
        };
        let workers = Workers::new(settings, changes.clone())
            .map_err(|e| format!("cannot start the spawner thread: {e}"))?;
        tokio::spawn(workers.clone().reap_idle());
        Ok(Hive {
            state: State::new(
                models.clone(),
                workers.clone(),
                leases.clone(),
                changes,
                limits.budget_mb,
            ),
            models,
            workers,
            leases,
            auth: door.auth.clone(),
            shutdown: Arc::new(tokio::sync::Notify::new()),
        })
    }
}

/// Serves until a shutdown (a signal, or `POST /v1/admin/shutdown`), then
/// ends the leases and stops the workers.
async fn serve(hive: Hive, listener: tokio::net::TcpListener) {
    let (admin, door, state) = (hive.shutdown.clone(), hive.auth.clone(), hive.state.clone());
    let (leases, workers) = (hive.leases.clone(), hive.workers.clone());
    http::serve(
        listener,
        door,
        move |req| route(hive.clone(), req),
        async move {
            http::stop_signal(&admin).await;
            tracing::info!("hive shutting down: stopping its workers");
            state.end_streams();
        },
    )
    .await;
    leases.end_all();
    workers.stop_all().await;
}

/// `GET /metrics`: downloads as counted, memory and workers as the snapshot has them.
fn metrics(h: &Hive) -> Response<Body> {
    let snapshot = h.state.snapshot();
    let states = [
        WorkerState::Loading,
        WorkerState::Ready,
        WorkerState::Stopping,
        WorkerState::Failed,
    ];
    let workers: Vec<(String, usize)> = states
        .iter()
        .map(|s| {
            let n = snapshot.workers.iter().filter(|w| w.state == *s).count();
            (s.to_string(), n)
        })
        .collect();
    h.models
        .metrics()
        .respond(snapshot.ram.budget_mb, snapshot.ram.used_mb, &workers)
}

/// A fresh catalog in place of the one at `path` (moved aside), holding every
/// model file in the data dir's models directory.
fn rebuild_catalog(
    path: &std::path::Path,
    data_dir: &std::path::Path,
    changes: Changes,
) -> Result<Models, String> {
    let (catalog, aside) = catalog::Catalog::replace(path, changes)?;
    let models = Models::new(catalog, data_dir.join("models"));
    let found = models.rebuild()?;
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    tracing::warn!(
        "rebuilt the model catalog from {}: {} models ({}); the old catalog is at {}",
        models.models_dir().display(),
        found.len(),
        names.join(", "),
        aside.display()
    );
    Ok(models)
}

/// The hive's endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Endpoint {
    Health,
    Capabilities,
    State,
    Models,
    DeleteModel,
    ModelSettings,
    Download,
    DownloadProgress,
    RemovePartials,
    Spawn,
    Workers,
    WorkerReady,
    StopWorker,
    KeepAlive,
    Lend,
    EndLease,
    Rpc,
    Shutdown,
    Metrics,
}

const ROUTES: &[Route<Endpoint>] = &[
    (Method::GET, "/health", Endpoint::Health),
    (Method::GET, "/v1/health", Endpoint::Health),
    (Method::GET, "/v1/capabilities", Endpoint::Capabilities),
    (Method::GET, "/v1/state/stream", Endpoint::State),
    (Method::GET, "/v1/models", Endpoint::Models),
    (Method::DELETE, "/v1/models/{}", Endpoint::DeleteModel),
    (
        Method::PUT,
        "/v1/models/{}/settings",
        Endpoint::ModelSettings,
    ),
    (Method::POST, "/v1/models/download", Endpoint::Download),
    (
        Method::DELETE,
        "/v1/models/download/partial",
        Endpoint::RemovePartials,
    ),
    (
        Method::GET,
        "/v1/models/download/progress",
        Endpoint::DownloadProgress,
    ),
    (Method::POST, "/v1/workers/spawn", Endpoint::Spawn),
    (Method::GET, "/v1/workers/list", Endpoint::Workers),
    (Method::POST, "/v1/workers/ready", Endpoint::WorkerReady),
    (
        Method::POST,
        "/v1/workers/{}/shutdown",
        Endpoint::StopWorker,
    ),
    (
        Method::POST,
        "/v1/workers/{}/keep-alive",
        Endpoint::KeepAlive,
    ),
    (Method::POST, "/v1/leases", Endpoint::Lend),
    (Method::DELETE, "/v1/leases/{}", Endpoint::EndLease),
    (Method::GET, "/v1/rpc", Endpoint::Rpc),
    (Method::POST, "/v1/admin/shutdown", Endpoint::Shutdown),
    (Method::GET, "/metrics", Endpoint::Metrics),
];

async fn route(h: Hive, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let found = http::find(ROUTES, req.method(), &path);
    let (endpoint, params) = match found {
        Ok(found) => found,
        Err(e) => return http::error(e),
    };
    let param = params.first().map(String::as_str).unwrap_or_default();
    http::reply(match endpoint {
        Endpoint::Health => Ok(http::json(StatusCode::OK, &Health::alive("hive"))),
        Endpoint::Capabilities => Ok(http::json(
            StatusCode::OK,
            &capabilities(h.models.models_dir()),
        )),
        Endpoint::State => h.state.stream(),
        Endpoint::Metrics => Ok(metrics(&h)),
        Endpoint::Models => Ok(http::json(StatusCode::OK, &h.models.list())),
        Endpoint::DeleteModel => h
            .models
            .delete(param)
            .map(|entry| http::json(StatusCode::OK, &entry)),
        Endpoint::ModelSettings => model_settings(&h, param, req).await,
        Endpoint::Download => download(&h, req).await,
        Endpoint::DownloadProgress => download_progress(&h, &req),
        Endpoint::RemovePartials => Ok(http::json(StatusCode::OK, &h.models.remove_partials())),
        Endpoint::Spawn => spawn(&h, req).await,
        Endpoint::Workers => Ok(http::json(StatusCode::OK, &h.workers.list())),
        Endpoint::WorkerReady => worker_ready(&h, req).await,
        Endpoint::StopWorker => h
            .workers
            .stop(param)
            .map(|info| http::json(StatusCode::ACCEPTED, &info)),
        Endpoint::KeepAlive => keep_alive(&h, param, req).await,
        Endpoint::Lend => lend(&h, req).await,
        Endpoint::EndLease => h
            .leases
            .end(param)
            .map(|info| http::json(StatusCode::OK, &info))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::LeaseNotFound,
                    format!("this hive has no lease {param:?}"),
                )
            }),
        Endpoint::Rpc => rpc(&h, &mut req),
        Endpoint::Shutdown => {
            h.shutdown.notify_one();
            Ok(http::json(StatusCode::ACCEPTED, &Health::stopping("hive")))
        }
    })
}

/// How long a worker stays once idle, as a request asked (Ollama's `keep_alive`).
async fn keep_alive(h: &Hive, id: &str, req: Request<Incoming>) -> Reply {
    let body: crate::protocol::KeepAliveRequest = http::read_json(req).await?;
    let limit = body.seconds.map(std::time::Duration::from_secs);
    let info = h.workers.keep_alive(id, limit)?;
    Ok(http::json(StatusCode::OK, &info))
}

async fn download(h: &Hive, req: Request<Incoming>) -> Reply {
    let body: DownloadRequest = http::read_json(req).await?;
    let model_ref = crate::model_ref::canonical(&body.model_ref)?;
    let started = h.models.download(&model_ref).await?;
    Ok(http::json(StatusCode::ACCEPTED, &started))
}

fn download_progress(h: &Hive, req: &Request<Incoming>) -> Reply {
    let id = http::query_param(req.uri().query(), "id").unwrap_or_default();
    let progress = h.models.progress(&id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::DownloadNotFound,
            format!("no download with id {id:?}"),
        )
    })?;
    Ok(http::sse_from_watch(progress, |e| {
        !matches!(e, DownloadEvent::Downloading { .. })
    }))
}

async fn spawn(h: &Hive, req: Request<Incoming>) -> Reply {
    // Its workers are reached at the address the caller reached the hive at.
    let reached = workers::Reached {
        at: req.extensions().get::<http::Local>().map(|l| l.0.ip()),
        tls: req.extensions().get::<http::tls::Secure>().is_some(),
    };
    let body: SpawnRequest = http::read_json(req).await?;
    let info = h.state.spawn(&body, reached).await?;
    Ok(http::json(StatusCode::ACCEPTED, &info))
}

async fn model_settings(h: &Hive, name: &str, req: Request<Incoming>) -> Reply {
    let settings: crate::protocol::ModelSettings = http::read_json(req).await?;
    let entry = h.state.set_settings(name, settings)?;
    Ok(http::json(StatusCode::OK, &entry))
}

async fn lend(h: &Hive, req: Request<Incoming>) -> Reply {
    let body: LeaseRequest = http::read_json(req).await?;
    let info = h.state.lend(&body).await?;
    Ok(http::json(StatusCode::CREATED, &info))
}

/// `GET /v1/rpc?lease=ID`: the tunnel to a lease's RPC server. The door has
/// checked the token before this runs, so a refused caller's bytes never
/// reach llama.cpp.
fn rpc(h: &Hive, req: &mut Request<Incoming>) -> Reply {
    let id = http::query_param(req.uri().query(), "lease").unwrap_or_default();
    let upgrade = http::tunnel::accept(req, crate::protocol::RPC_PROTOCOL)?;
    let tunnel = h.leases.open(&id)?;
    tokio::spawn(tunnel.carry(upgrade));
    Ok(http::tunnel::switching(crate::protocol::RPC_PROTOCOL))
}

async fn worker_ready(h: &Hive, req: Request<Incoming>) -> Reply {
    let body: WorkerReadyCallback = http::read_json(req).await?;
    let info = h.workers.ready(&body)?;
    Ok(http::json(StatusCode::OK, &info))
}

fn capabilities(models_dir: &std::path::Path) -> Capabilities {
    let ram = crate::machine::ram();
    let mut probe = models_dir.to_path_buf();
    while !probe.exists() && probe.pop() {}
    Capabilities {
        hostname: crate::machine::hostname(),
        cores: crate::machine::cores(),
        ram_total_mb: ram.total_mb,
        ram_available_mb: ram.available_mb,
        disk_free_mb: crate::disk::free_space(&probe).map_or(0, |b| b >> 20),
        partial_downloads_mb: crate::disk::partial_files(models_dir)
            .iter()
            .map(|(_, size)| size)
            .sum::<u64>()
            .div_ceil(1 << 20),
        backends: crate::BACKENDS.split(',').map(str::to_string).collect(),
        gpus: crate::machine::gpus(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn every_route_answers_a_wrong_method_with_405() {
        http::assert_routes_are_consistent(ROUTES);
    }
}
