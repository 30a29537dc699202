//! `rbee worker`: one loaded model, served over HTTP.
//!
//! The HTTP server comes up first, so `/v1/ready` and the loading-progress
//! stream answer while the engine thread loads the model. Once loading ends,
//! either way, the worker reports to `--callback-url` (its hive). Requests go
//! to the engine ([`engine`]) and come back as SSE.

pub mod cache;
pub mod engine;
mod fronts;
pub mod remote;
mod routes;
pub mod slots;
pub mod template;
pub mod text;

use crate::http::{self, Auth};
use crate::protocol::{new_id, ApiError, LoadingEvent, WorkerReadyCallback, WorkerState};
pub use crate::protocol::{CacheType, FlashAttn};
use crate::responses;
use argh::FromArgs;
use engine::{Config, Engine};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// Serve one GGUF model: load it with llama.cpp and stream completions over HTTP.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "worker")]
pub struct Args {
    /// the GGUF model file to load
    #[argh(option)]
    pub model: PathBuf,
    /// address to listen on (default 127.0.0.1; others need a token)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    pub host: String,
    /// port to listen on (default 8081)
    #[argh(option, default = "8081")]
    pub port: u16,
    /// this worker's id, as its hive knows it (default: made up)
    #[argh(option)]
    pub worker_id: Option<String>,
    /// URL to POST to once the model is loaded, or has failed to load
    #[argh(option)]
    pub callback_url: Option<String>,
    /// requests decoded together (default 4)
    #[argh(option, default = "4")]
    pub slots: u32,
    /// context of each slot, in tokens (default: the model's, at most 4096)
    #[argh(option)]
    pub ctx_size: Option<u32>,
    /// CPU threads for llama.cpp (default: this machine's cores)
    #[argh(option)]
    pub threads: Option<i32>,
    /// layers to offload to the GPU (default: all when built with a GPU backend, else 0)
    #[argh(option)]
    pub gpu_layers: Option<u32>,
    /// flash attention: on, off or auto, llama.cpp's choice (default auto,
    /// which turns it on; on a CPU the faster setting at every depth measured)
    #[argh(option, default = "FlashAttn::Auto", from_str_fn(FlashAttn::parse))]
    pub flash_attn: FlashAttn,
    /// the KV cache's K cells: f16, q8_0 or q4_0 (default f16; q8_0 about
    /// halves the cache's memory)
    #[argh(option, default = "CacheType::F16", from_str_fn(CacheType::parse))]
    pub cache_type_k: CacheType,
    /// the KV cache's V cells: f16, q8_0 or q4_0 (default f16; quantized
    /// needs flash attention)
    #[argh(option, default = "CacheType::F16", from_str_fn(CacheType::parse))]
    pub cache_type_v: CacheType,
    /// which GPU to use (default 0)
    #[argh(option, default = "0")]
    pub device: i32,
    /// requests that may wait for a slot before new ones get 503 (default 64)
    #[argh(option, default = "64")]
    pub queue_size: u32,
    /// host memory, in MiB, for conversations kept beyond the slots (default 2048; 0: none)
    #[argh(option, default = "2048")]
    pub cache_ram: u64,
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
    /// layers on another hive's devices, as LAYERS@URL of its `/v1/rpc`
    /// (with `?lease=ID`); repeatable, in order; the rest stay here
    #[argh(option)]
    pub remote: Vec<String>,
    /// the most memory this process may map, in MiB (its address space,
    /// RLIMIT_AS): a request that would take more fails, not the machine; the
    /// hive sets it for CPU workers (default: no limit)
    #[argh(option)]
    pub memory_limit: Option<u64>,
    /// the data dir of the hive whose identity this worker serves TLS with
    /// (from other machines it is reached over TLS)
    #[argh(option)]
    pub identity_dir: Option<PathBuf>,
    /// a certificate fingerprint let in as the token is, and accepted from
    /// the servers it calls (its queen, its lenders); repeatable
    #[argh(option)]
    pub peer: Vec<String>,
}

/// What every request handler shares. Cheap to clone.
#[derive(Clone)]
struct Worker {
    engine: Engine,
    /// The catalog name of the model: its file stem, lower-case.
    model: Arc<str>,
    /// Its file, as `--model` gave it.
    model_path: Arc<str>,
    /// Responses kept for `previous_response_id`.
    responses: responses::Store,
    slots: u32,
    /// The engine's loading state; its last value is `Ready` or `Failed` once loading ends.
    loading: watch::Receiver<LoadingEvent>,
    auth: Auth,
    /// Fired by `POST /v1/admin/shutdown`.
    shutdown: Arc<tokio::sync::Notify>,
    /// What `GET /metrics` shows; the engine counts into it.
    metrics: crate::metrics::WorkerMetrics,
    /// The attention kernel serving and what its self-test found (`/props`).
    kernel: &'static str,
    self_test: Arc<str>,
    /// The KV cache's K and V cell types (`/props`).
    cache_types: (CacheType, CacheType),
}

/// Runs the worker until it is told to stop; `Err` is the one-line reason it failed.
///
/// Its life is three steps: bind and start loading; wait for loading to end
/// and report that to the hive; serve until told to stop or until the engine
/// fails. A stop signal during loading skips straight to the shutdown.
pub async fn run(args: Args) -> Result<(), String> {
    check_flags(&args)?;
    if let Some(mb) = args.memory_limit {
        crate::process::limit_address_space(mb << 20)
            .map_err(|e| format!("cannot limit this worker's memory to {mb} MiB: {e}"))?;
    }
    let mut auth = Auth::load(args.token_file.as_deref())?.with_doors(
        &args.host,
        args.allowed_hosts.as_deref(),
        args.allowed_origins.as_deref(),
    );
    if let Some(dir) = &args.identity_dir {
        let identity = crate::identity::load_or_make(dir, "hive")?;
        let pins = http::tls::Pins::new(args.peer.iter().cloned());
        http::tls::install(Some(&identity), pins.clone())?;
        auth = auth.with_peers(pins);
    }
    auth.check_bind(&args.host)?;
    let listener = http::bind(&args.host, args.port).await?;
    let url = format!(
        "http://{}:{}",
        args.host,
        listener.local_addr().map_or(args.port, |a| a.port())
    );
    let metrics = crate::metrics::WorkerMetrics::default();
    let mut config = engine_config(&args, &metrics);
    let asked = engine::kernel::Kernel::from_env()?;
    config.remotes = remote::open_tunnels(&args.remote, auth.token()).await?;
    let (engine, loading, thread, (kernel, self_test)) =
        start_engine(config, asked, &args.model, &metrics).await?;
    let worker = Worker {
        engine: engine.clone(),
        model: crate::gguf::catalog_name(&args.model).into(),
        model_path: args.model.display().to_string().into(),
        responses: Default::default(),
        slots: args.slots,
        loading,
        auth,
        shutdown: Arc::new(tokio::sync::Notify::new()),
        metrics,
        kernel,
        self_test: self_test.into(),
        cache_types: (args.cache_type_k, args.cache_type_v),
    };
    tracing::info!(
        "worker listening on {url}, loading {}",
        args.model.display()
    );
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = {
        let worker = worker.clone();
        tokio::spawn(http::serve(
            listener,
            worker.auth.clone(),
            move |req| routes::route(worker.clone(), req),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ))
    };

    let outcome = live(&worker, &args, &url).await;

    tracing::info!("worker shutting down");
    engine.shutdown();
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    outcome
}

/// Starts the engine thread, which tests the attention kernel `asked` for
/// before it loads the model: the engine, its loading state, its thread, and
/// the kernel serving with what its self-test found.
///
/// The test runs there because llama.cpp's OpenMP threads belong to the
/// thread that first computes a graph: a second team (the test's, on the
/// worker's main thread) left idle beside the engine's halved its decoding speed.
async fn start_engine(
    config: Config,
    asked: engine::kernel::Kernel,
    model: &Path,
    metrics: &crate::metrics::WorkerMetrics,
) -> Result<
    (
        Engine,
        watch::Receiver<LoadingEvent>,
        std::thread::JoinHandle<()>,
        (&'static str, String),
    ),
    String,
> {
    let (chosen_tx, chosen) = tokio::sync::oneshot::channel();
    let first = {
        let (model, threads, metrics) = (model.to_path_buf(), config.threads, metrics.clone());
        move || {
            let _ = chosen_tx.send(attention_kernel(asked, &model, threads, &metrics));
        }
    };
    let (engine, loading, thread) =
        Engine::start(config, first).map_err(|e| format!("cannot start the engine thread: {e}"))?;
    let chosen = chosen
        .await
        .map_err(|_| "the engine thread ended before testing the attention kernel".to_string())?;
    Ok((engine, loading, thread, chosen))
}

/// The attention kernel `RBEE_ATTN_KERNEL` picks, serving from now on once
/// rbee's has passed its self-test on the model's attention shape (else
/// llama.cpp's serves), said in the log and the metrics: its name, and what
/// the self-test found.
fn attention_kernel(
    asked: engine::kernel::Kernel,
    model: &Path,
    threads: i32,
    metrics: &crate::metrics::WorkerMetrics,
) -> (&'static str, String) {
    use engine::kernel::{self, Kernel, Shape, ENV, NAME};
    // A file whose metadata cannot be read fails to load a moment later, saying why.
    let shape = crate::gguf::read(model)
        .ok()
        .and_then(|info| Shape::of(&info))
        .unwrap_or(Shape::SMOLLM2);
    let kernel::Chosen {
        kernel,
        verdict,
        said,
    } = kernel::choose(asked, || {
        let started = std::time::Instant::now();
        let verdict = kernel::self_test(shape, threads);
        tracing::debug!(
            "attention kernel self-test: {} ms",
            started.elapsed().as_millis()
        );
        verdict
    });
    kernel.serve();
    metrics.attention_kernel(kernel.as_str(), verdict);
    let which = match kernel {
        Kernel::Rbee => "rbee's for chat turns over a long cache, llama.cpp's for other shapes",
        Kernel::Upstream => "llama.cpp's for every shape",
    };
    let line = format!(
        "attention kernel: {} ({which}; {ENV}=upstream|{NAME} picks); self-test on {shape} \
         at {threads} threads: {said}",
        kernel.as_str()
    );
    match asked != kernel {
        true => tracing::warn!("{line}"),
        false => tracing::info!("{line}"),
    }
    (kernel.as_str(), said)
}

/// Refuses flags that cannot work, naming the limit. The context against the
/// model's own limit is checked once the model is open (`engine.rs`).
fn check_flags(args: &Args) -> Result<(), String> {
    let ctx = args.ctx_size.unwrap_or(crate::protocol::MIN_CTX_SIZE);
    crate::protocol::check_slots(args.slots, ctx, 0)
        .map_err(|(flag, message)| format!("--{}: {message}", flag.replace('_', "-")))?;
    if args.threads.is_some_and(|t| t < 1) {
        return Err("--threads must be at least 1".into());
    }
    args.cache_type_v
        .check_v(args.flash_attn)
        .map_err(|e| format!("--cache-type-v: {e}"))?;
    for r in &args.remote {
        remote::parse(r)?;
    }
    if args.queue_size > MAX_QUEUE {
        return Err(format!("--queue-size must be at most {MAX_QUEUE}"));
    }
    if args.cache_ram > MAX_CACHE_RAM_MB {
        return Err(format!(
            "--cache-ram must be at most {MAX_CACHE_RAM_MB} MiB"
        ));
    }
    Ok(())
}

/// 1 TiB: more host memory than any machine rbee runs on.
const MAX_CACHE_RAM_MB: u64 = 1 << 20;
/// Waiting requests beyond this are a client stampede, not a queue.
const MAX_QUEUE: u32 = 100_000;

fn engine_config(args: &Args, metrics: &crate::metrics::WorkerMetrics) -> Config {
    Config {
        model_path: args.model.clone(),
        slots: args.slots,
        ctx_size: args.ctx_size,
        threads: args
            .threads
            .unwrap_or_else(|| crate::machine::cores() as i32),
        gpu_layers: args
            .gpu_layers
            .unwrap_or(if crate::GPU_BACKEND { 999 } else { 0 }),
        main_gpu: args.device,
        flash_attn: args.flash_attn,
        cache_types: (args.cache_type_k, args.cache_type_v),
        queue_size: args.queue_size,
        cache_ram: usize::try_from(args.cache_ram << 20).unwrap_or(usize::MAX),
        metrics: metrics.clone(),
        remotes: Vec::new(),
    }
}

/// The worker's life once it listens: loading, reported to the hive, then
/// serving. `Err` when loading fails or the engine fails while serving.
async fn live(w: &Worker, args: &Args, url: &str) -> Result<(), String> {
    let loaded = tokio::select! {
        loaded = loading_outcome(w.loading.clone()) => loaded,
        () = http::stop_signal(&w.shutdown) => return Ok(()),
    };
    if let Some(callback) = &args.callback_url {
        let report = WorkerReadyCallback {
            worker_id: args.worker_id.clone().unwrap_or_else(|| new_id("worker")),
            secret: std::env::var(crate::protocol::WORKER_SECRET_ENV).unwrap_or_default(),
            url: url.to_string(),
            model: w.model.to_string(),
            slots: args.slots,
            state: if loaded.is_ok() {
                WorkerState::Ready
            } else {
                WorkerState::Failed
            },
            error: loaded.as_ref().err().cloned(),
        };
        if let Err(e) = post_callback(callback, &report, &w.auth).await {
            tracing::warn!("could not report to {callback}: {e}");
        }
    }
    loaded?;
    let mut loading = w.loading.clone();
    tokio::select! {
        () = http::stop_signal(&w.shutdown) => Ok(()),
        Ok(state) = loading.wait_for(|e| matches!(e, LoadingEvent::Failed { .. })) => {
            match &*state {
                LoadingEvent::Failed { message } => Err(message.clone()),
                _ => Ok(()),
            }
        }
    }
}

/// Waits until loading has ended, either way.
async fn loading_outcome(mut loading: watch::Receiver<LoadingEvent>) -> Result<(), String> {
    let _ = loading
        .wait_for(|e| matches!(e, LoadingEvent::Ready | LoadingEvent::Failed { .. }))
        .await;
    let state = loading.borrow();
    match &*state {
        LoadingEvent::Failed { message } => Err(message.clone()),
        _ => Ok(()),
    }
}

async fn post_callback(
    url: &str,
    report: &WorkerReadyCallback,
    auth: &Auth,
) -> Result<(), ApiError> {
    crate::clients::report_ready(url, auth.token(), report)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_attention_is_on_off_or_auto() {
        let parse = |flags: &[&str]| {
            let mut argv = vec!["--model", "m.gguf"];
            argv.extend(flags);
            Args::from_args(&["worker"], &argv).map(|a| a.flash_attn)
        };
        assert_eq!(parse(&[]), Ok(FlashAttn::Auto));
        assert_eq!(parse(&["--flash-attn", "off"]), Ok(FlashAttn::Off));
        assert_eq!(parse(&["--flash-attn", "on"]), Ok(FlashAttn::On));
        let refused = parse(&["--flash-attn", "yes"]).unwrap_err().output;
        assert!(refused.contains("on, off or auto"), "{refused}");
    }
}
