//! `rbee queen`: the orchestrator. It takes jobs, picks a machine, streams
//! results back, and keeps the registry of hives.

mod affinity;
mod aliases;
pub mod cluster;
mod front;
mod hives;
mod index;
pub mod jobs;
mod join;
pub mod keys;
pub mod local_hive;
mod ollama;
pub mod placement;
pub mod provision;
pub mod registry;
mod routes;
pub mod scheduler;
pub mod split;
mod status;
pub mod view;

use crate::clients::Events;
use crate::http::{self, sse, Auth, Body, Reply, Route};
use crate::openai;
use crate::protocol::{
    AddHive, ApiError, DownloadEvent, DownloadRequest, ErrorCode, Health, HiveRemoved, HiveWorker,
    JobCancelled, JobCreated, JobRequest,
};
use argh::FromArgs;
use cluster::Live;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use jobs::Jobs;
use registry::{HiveConn, Registry, LOCALHOST};
use routes::route;
use std::path::PathBuf;
use std::sync::Arc;
use view::{ClusterState, View};

/// Orchestrate the cluster: jobs, scheduling, the hive registry.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "queen")]
pub struct Args {
    /// address to listen on (default 127.0.0.1; others need a token)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    pub host: String,
    /// port to listen on (default 8500)
    #[argh(option, default = "8500")]
    pub port: u16,
    /// where the hive registry lives (default $RBEE_HOME, else ~/.local/share/rbee)
    #[argh(option)]
    pub data_dir: Option<PathBuf>,
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
    /// write a per-user service (systemd user unit; launchd agent on macOS)
    /// that runs this role with the other flags given, start it, and exit
    #[argh(switch)]
    pub install_service: bool,
    /// stop and remove that service, and exit
    #[argh(switch)]
    pub uninstall_service: bool,
    /// print this queen's identity (its certificate's SHA-256, made on first start), and exit
    #[argh(switch)]
    pub show_identity: bool,
    /// never start a hive on this machine (a queen that only orchestrates;
    /// also RBEE_LOCAL_HIVE=off)
    #[argh(switch)]
    pub no_local_hive: bool,
    /// also serve Ollama's API on this port of --host (e.g. 11434, for tools
    /// that assume Ollama's port)
    #[argh(option)]
    pub ollama_port: Option<u16>,
}

#[derive(Clone)]
struct Queen {
    registry: Registry,
    cluster: Live,
    jobs: Jobs,
    auth: Auth,
    shutdown: Arc<tokio::sync::Notify>,
    join_tokens: join::JoinTokens,
    /// Its certificate's fingerprint, which its join tokens carry.
    fingerprint: String,
    /// Where it listens (`--host`, the bound port): its tokens' addresses.
    listen: (String, u16),
    /// Responses kept for `previous_response_id` (OpenAI's Responses API).
    responses: crate::responses::Store,
    /// Short names for models, read before anything else at every front.
    aliases: Arc<aliases::Aliases>,
}

pub async fn run(args: Args) -> Result<(), String> {
    if args.show_identity {
        return crate::identity::show(args.data_dir.as_deref(), "queen");
    }
    let auth = Auth::load(args.token_file.as_deref())?
        .with_doors(
            &args.host,
            args.allowed_hosts.as_deref(),
            args.allowed_origins.as_deref(),
        )
        .with_sessions()
        .with_open(&["/v1/join", "/v1/hives/checkin"]);
    auth.check_bind(&args.host)?;
    let listener = crate::process::bind(&args.host, args.port).await?;
    let ollama_listener = match args.ollama_port {
        Some(port) => Some(crate::process::bind(&args.host, port).await?),
        None => None,
    };
    let data_dir = crate::data_dir(args.data_dir.as_deref());
    crate::create_data_dir(&data_dir)?;
    let port = listener.local_addr().map_or(args.port, |a| a.port());
    let (queen, _announced) = Queen::start(&args, &data_dir, auth, port).await?;
    tracing::info!(
        "queen listening on {}:{port} (http:// on this machine, https:// from others), data in {}",
        args.host,
        data_dir.display()
    );
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    crate::process::report_ready(addr);
    serve(queen, listener, ollama_listener).await;
    Ok(())
}

impl Queen {
    /// The queen's identity, its hive registry and keys, the cluster's live
    /// view; announced on the LAN (mDNS) when other machines can reach it.
    async fn start(
        args: &Args,
        data_dir: &std::path::Path,
        auth: Auth,
        port: u16,
    ) -> Result<(Queen, Option<crate::discovery::Announcement>), String> {
        let identity = crate::identity::load_or_make(data_dir, "queen")?;
        tracing::info!("queen identity {}", identity.fingerprint);
        let local_hive = !args.no_local_hive
            && !std::env::var("RBEE_LOCAL_HIVE").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
        let registry = Registry::open(
            data_dir.to_path_buf(),
            auth.token().map(str::to_string),
            local_hive,
        )?;
        crate::http::tls::install(Some(&identity), registry.pins())?;
        // Found on the LAN by joining hives, when other machines can reach it.
        let announced = match join::reachable_addresses(&args.host, port).is_empty() {
            true => None,
            false => {
                crate::discovery::announce(&crate::machine::hostname(), port, &identity.fingerprint)
                    .map_err(|e| tracing::warn!("not announced on the LAN (mDNS): {e}"))
                    .ok()
            }
        };
        let metrics = crate::metrics::QueenMetrics::default();
        let keys = keys::Keys::open(data_dir, metrics.clone())?;
        tokio::spawn(keys.clone().save_use());
        let auth = auth.with_keys(Arc::new(keys.clone()));
        let cluster = Live::start(registry.clone(), metrics, keys).await;
        if local_hive && data_dir.join(crate::HIVE_CATALOG).exists() {
            tokio::spawn(cluster.clone().bring_back_local());
        }
        let queen = Queen {
            registry,
            cluster,
            jobs: Jobs::default(),
            auth,
            shutdown: Arc::new(tokio::sync::Notify::new()),
            join_tokens: join::JoinTokens::open(data_dir)?,
            fingerprint: identity.fingerprint.clone(),
            listen: (args.host.clone(), port),
            responses: Default::default(),
            aliases: Arc::new(aliases::Aliases::open(data_dir)?),
        };
        Ok((queen, announced))
    }
}

/// Serves (and Ollama's port beside, if asked) until a shutdown; then cancels
/// the jobs and stops the local hive while still answering health, so
/// `rbee keeper queen stop` returns only once everything is gone.
async fn serve(
    queen: Queen,
    listener: tokio::net::TcpListener,
    ollama_listener: Option<tokio::net::TcpListener>,
) {
    let admin = queen.shutdown.clone();
    let jobs = queen.jobs.clone();
    let door = queen.auth.clone();
    let registry = queen.registry.clone();
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    if let Some(listener) = ollama_listener {
        tokio::spawn(serve_ollama(listener, queen.clone(), stopped));
    }
    http::serve(
        listener,
        door,
        move |req| route(queen.clone(), req),
        async move {
            http::stop_signal(&admin).await;
            let _ = stopping.send(true);
            tracing::info!("queen shutting down");
            jobs.cancel_all();
            registry.stop_local().await;
        },
    )
    .await;
}

/// `--ollama-port`: the queen's routes again where tools expect Ollama, whose
/// `GET /` says it is running (the status page stays on the queen's port).
async fn serve_ollama(
    listener: tokio::net::TcpListener,
    q: Queen,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("Ollama's API also on {addr}");
    }
    let door = q.auth.clone();
    let handler = move |req: Request<Incoming>| {
        let q = q.clone();
        async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/") => Response::new(http::full("Ollama is running")),
                _ => route(q, req).await,
            }
        }
    };
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    http::serve(listener, door, handler, stop).await;
}

/// How long the view may take to list a model a hive just downloaded.
const VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
