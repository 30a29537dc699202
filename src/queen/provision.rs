//! Provisioning a worker for a model: where it goes ([`placement::place`]),
//! room made by stopping idle workers, the model fetched where it is missing,
//! the worker spawned and its loading followed, every step narrated on the
//! job stream. The scheduler calls [`provision`] when routing finds no worker.

use super::cluster::Cluster;
use super::jobs::Job;
use super::placement::{self, Allowed, Placement, Target};
use super::registry::HiveConn;
use super::view::ClusterState;
use crate::model_ref::ModelRef;
use crate::protocol::{
    ApiError, ClusterEvent, DownloadEvent, DownloadState, ErrorCode, JobEvent, LeaseRequest,
    LoadingEvent, RemoteShare, SpawnRequest, WorkerInfo, WorkerState,
};
use std::time::Duration;

/// How long a new worker may take to open its loading-progress stream.
const LOADING_STREAM_WAIT: Duration = Duration::from_secs(30);
/// How long a stopped worker may take to leave its hive's state.
const STOP_WAIT: Duration = Duration::from_secs(20);
/// How long the view may take to show what a hive just did.
const VIEW_WAIT: Duration = Duration::from_secs(5);

/// Places a new worker (making room, fetching the model where needed),
/// starts it and waits for it to load.
pub async fn provision(
    cluster: &impl Cluster,
    hives: &Allowed,
    job: &Job,
    model: &str,
) -> Result<Target, ApiError> {
    let need = match placement::need_mb(&cluster.view().state(), model, hives) {
        Some(need) => need,
        None => {
            unknown_name(&cluster.view().state(), model, hives)?;
            fetch_somewhere(cluster, hives, job, model).await?
        }
    };
    let place = placement::place(&cluster.view().state(), model, need, hives)?;
    narrate_placement(cluster, job, model, &place);
    make_room(cluster, job, &place).await?;
    let hive = place.hive.clone();
    let name = match catalog_name(cluster, &hive, model) {
        Some(name) => name,
        None => {
            fetch(cluster, &hive, job, model).await?;
            wait_listed(cluster, &hive, model).await?
        }
    };
    let remotes = lend(cluster, job, &place, &name).await?;
    let loaded = async {
        let worker = spawn_worker(cluster, &hive, &name, place.gpu, remotes.clone(), job).await?;
        wait_loaded(cluster, &hive, &worker, job).await?;
        Ok::<_, ApiError>(worker)
    };
    let worker = match loaded.await {
        Ok(worker) => worker,
        Err(e) => {
            end_leases(cluster, &remotes).await;
            return Err(e);
        }
    };
    job.narrate(
        "worker",
        "ready",
        format!("worker {} is ready at {}", worker.worker_id, worker.url),
    );
    // Requests that waited for this provisioning route from the view: let it show the worker.
    let url = worker.url.clone();
    cluster
        .view()
        .wait_until(VIEW_WAIT, |s| {
            s.hives
                .iter()
                .filter_map(|h| h.snapshot.as_ref())
                .any(|snap| {
                    snap.workers
                        .iter()
                        .any(|w| w.url == url && w.state == WorkerState::Ready)
                })
        })
        .await;
    Ok(Target {
        hive,
        url: worker.url,
        worker_id: worker.worker_id,
    })
}

/// A catalog name no allowed hive lists cannot be fetched: the error names
/// the hives asked and the closest names their catalogs have.
fn unknown_name(state: &ClusterState, model: &str, hives: &Allowed) -> Result<(), ApiError> {
    let Ok(ModelRef::Name(name)) = ModelRef::parse(model) else {
        return Ok(());
    };
    let listed: Vec<(&str, &str)> = state
        .hives
        .iter()
        .filter_map(|h| Some((h.conn.name.as_str(), h.snapshot.as_ref()?)))
        .flat_map(|(hive, s)| s.models.iter().map(move |m| (hive, m.entry.name.as_str())))
        .collect();
    let known: Vec<&str> = listed.iter().map(|(_, m)| *m).collect();
    let asked: Vec<&str> = match hives {
        Allowed::Only(names) => names.iter().map(String::as_str).collect(),
        Allowed::Any => placement::usable(state, hives)
            .map(|(h, _)| h.conn.name.as_str())
            .collect(),
    };
    let asked = match asked.as_slice() {
        [one] => format!("hive {one} has no"),
        _ if asked.len() > 9 => {
            let more = asked.len() - 8;
            format!(
                "none of the hives ({}, and {more} more) has a",
                asked[..8].join(", ")
            )
        }
        _ => format!("none of the hives ({}) has a", asked.join(", ")),
    };
    let elsewhere = listed.iter().find(|(_, m)| *m == name).map(|(h, _)| *h);
    let hint = match crate::suggest::nearest(&name, known.iter().copied()) {
        _ if elsewhere.is_some() => format!("; hive {} has it", elsewhere.unwrap_or_default()),
        Some(near) => format!("; did you mean {near}?"),
        None if known.is_empty() => String::new(),
        None => format!("; the catalogs have {}", known.join(", ")),
    };
    Err(ApiError::new(
        ErrorCode::ModelNotFound,
        format!(
            "{asked} model named {name}{hint} (`rbee keeper list` shows them; `rbee keeper pull hf:ORG/REPO` fetches one)"
        ),
    ))
}

/// Fetches a model no catalog has onto the hive with the most room; what a
/// worker of it needs, as that hive estimates it.
async fn fetch_somewhere(
    cluster: &impl Cluster,
    hives: &Allowed,
    job: &Job,
    model: &str,
) -> Result<u64, ApiError> {
    let hive = placement::fetch_onto(&cluster.view().state(), hives)
        .ok_or_else(|| ApiError::new(ErrorCode::HiveUnreachable, "no hive is reachable"))?;
    fetch(cluster, &hive, job, model).await?;
    wait_listed(cluster, &hive, model).await?;
    let need = placement::need_mb(
        &cluster.view().state(),
        model,
        &Allowed::Only(vec![hive.name.clone()]),
    );
    need.ok_or_else(|| {
        ApiError::internal(format!("hive {} lost {model} as it fetched it", hive.name))
    })
}

/// The catalog name of `model` on `hive`, if it has it.
fn catalog_name(cluster: &impl Cluster, hive: &HiveConn, model: &str) -> Option<String> {
    let state = cluster.view().state();
    let h = state.hives.named(&hive.name)?;
    placement::entry(h.snapshot.as_ref()?, model).map(|e| e.entry.name.clone())
}

/// Waits for a fetched model to show in the hive's catalog; its catalog name.
async fn wait_listed(
    cluster: &impl Cluster,
    hive: &HiveConn,
    model: &str,
) -> Result<String, ApiError> {
    cluster
        .view()
        .wait_until(VIEW_WAIT, |_| catalog_name(cluster, hive, model).is_some())
        .await;
    catalog_name(cluster, hive, model).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("hive {} does not list {model} after fetching it", hive.name),
        )
    })
}

fn narrate_placement(cluster: &impl Cluster, job: &Job, model: &str, place: &Placement) {
    let device = match place.gpu {
        Some(i) => format!("GPU {i}"),
        None => "CPU".to_string(),
    };
    match &place.split {
        None => job.narrate(
            "queen",
            "place",
            format!(
                "placing {model} ({} MB) on hive {} ({device})",
                place.need_mb, place.hive.name
            ),
        ),
        Some(split) => {
            let lent: Vec<String> = split
                .lenders
                .iter()
                .map(|s| format!("{} on hive {} ({} MB)", s.layers, s.hive.name, s.memory_mb))
                .collect();
            job.narrate(
                "queen",
                "split",
                format!(
                    "no hive can hold {model} alone; splitting it: {} layers on hive {} ({device}, {} MB), {}",
                    split.own_layers,
                    place.hive.name,
                    place.need_mb,
                    lent.join(", ")
                ),
            );
        }
    }
    let version = cluster
        .view()
        .hive(&place.hive.name)
        .and_then(|h| h.snapshot.clone())
        .map(|s| s.version.clone());
    if let Some(v) = version.filter(|v| v != env!("CARGO_PKG_VERSION")) {
        job.narrate(
            "queen",
            "version_mismatch",
            format!(
                "hive {} runs rbee {v}, this queen {}: update it to the same build",
                place.hive.name,
                env!("CARGO_PKG_VERSION")
            ),
        );
    }
}

/// Stops the idle workers a placement needs gone, and waits until their
/// hive no longer counts them.
async fn make_room(cluster: &impl Cluster, job: &Job, place: &Placement) -> Result<(), ApiError> {
    for t in &place.evict {
        job.narrate(
            "queen",
            "evict",
            format!(
                "stopping idle worker {} on hive {} to make room ({} MB needed)",
                t.worker_id, t.hive.name, place.need_mb
            ),
        );
        cluster.stop_worker(&t.hive, &t.worker_id).await?;
        cluster.metrics().evicted();
    }
    let urls: Vec<String> = place.evict.iter().map(|t| t.url.clone()).collect();
    let gone = cluster
        .view()
        .wait_until(STOP_WAIT, |s| {
            !s.hives
                .iter()
                .filter_map(|h| h.snapshot.as_ref())
                .any(|snap| snap.workers.iter().any(|w| urls.contains(&w.url)))
        })
        .await;
    if !gone {
        return Err(ApiError::new(
            ErrorCode::InsufficientMemory,
            format!(
                "the workers stopped on hive {} did not go in time",
                place.hive.name
            ),
        ));
    }
    Ok(())
}

/// A split's lenders each make a lease for their share; what the worker is
/// told to use. A lease that fails ends those already made.
async fn lend(
    cluster: &impl Cluster,
    job: &Job,
    place: &Placement,
    model: &str,
) -> Result<Vec<RemoteShare>, ApiError> {
    let Some(split) = &place.split else {
        return Ok(Vec::new());
    };
    let mut remotes = Vec::new();
    for share in &split.lenders {
        let req = LeaseRequest {
            lease: crate::protocol::new_lease_id(),
            model: model.to_string(),
            borrower: place.hive.name.clone(),
            layers: share.layers,
            memory_mb: share.memory_mb,
            borrower_fingerprint: place.hive.fingerprint.clone(),
        };
        job.narrate(
            "hive",
            "lend",
            format!(
                "hive {} lends its devices for {} layers ({} MB)",
                share.hive.name, share.layers, share.memory_mb
            ),
        );
        if let Err(e) = cluster.lend(&share.hive, &req).await {
            end_leases(cluster, &remotes).await;
            return Err(ApiError::new(
                e.code,
                format!("hive {} cannot lend its devices: {e}", share.hive.name),
            ));
        }
        remotes.push(RemoteShare {
            hive: share.hive.name.clone(),
            url: share.hive.url.clone(),
            lease: req.lease,
            layers: share.layers,
            token: share.hive.token.clone(),
            fingerprint: share.hive.fingerprint.clone(),
        });
    }
    Ok(remotes)
}

/// Ends the leases of a split worker that did not start.
async fn end_leases(cluster: &impl Cluster, remotes: &[RemoteShare]) {
    let state = cluster.view().state();
    for r in remotes {
        let Some(hive) = state.hives.named(&r.hive) else {
            continue;
        };
        if let Err(e) = cluster.end_lease(&hive.conn, &r.lease).await {
            tracing::warn!("hive {} did not end lease {}: {e}", r.hive, r.lease);
        }
    }
}

async fn spawn_worker(
    cluster: &impl Cluster,
    hive: &HiveConn,
    name: &str,
    gpu: Option<u32>,
    remotes: Vec<RemoteShare>,
    job: &Job,
) -> Result<WorkerInfo, ApiError> {
    job.narrate(
        "hive",
        "spawn",
        format!("starting a worker for {name} on hive {}", hive.name),
    );
    let spawn = SpawnRequest {
        model_ref: name.to_string(),
        backend: if gpu.is_some() {
            None
        } else {
            Some("cpu".into())
        },
        device: gpu.unwrap_or(0),
        slots: None,
        ctx_size: None,
        cache_type: None,
        remotes,
    };
    cluster.spawn(hive, &spawn).await.map_err(|e| {
        let code = match e.code {
            ErrorCode::InsufficientMemory => e.code,
            _ => ErrorCode::SpawnFailed,
        };
        ApiError::new(
            code,
            format!("hive {} could not start a worker: {e}", hive.name),
        )
    })
}

/// Has the hive download (or register) the model, relaying progress.
async fn fetch(
    cluster: &impl Cluster,
    hive: &HiveConn,
    job: &Job,
    model: &str,
) -> Result<(), ApiError> {
    let doing = match ModelRef::parse(model) {
        Ok(ModelRef::File(path)) => format!("registering {}", path.display()),
        _ => format!("fetching {model}"),
    };
    job.narrate("hive", "download", format!("hive {} is {doing}", hive.name));
    let started = cluster.download(hive, model).await.map_err(|e| {
        // However the hive failed to find it, for the user the model is not
        // there; a reference or file the hive refused is the caller's mistake.
        let code = match e.code {
            ErrorCode::ModelNotFound | ErrorCode::RepoNotFound | ErrorCode::NoGguf => {
                ErrorCode::ModelNotFound
            }
            code if code.status() < 500 => code,
            _ => ErrorCode::DownloadFailed,
        };
        ApiError::new(code, format!("hive {}: {e}", hive.name))
    })?;
    if started.state == DownloadState::Complete {
        return Ok(());
    }
    follow_download(cluster, hive, job, model, &started.download_id).await
}

/// Relays a download's progress until it completes or fails.
async fn follow_download(
    cluster: &impl Cluster,
    hive: &HiveConn,
    job: &Job,
    model: &str,
    id: &str,
) -> Result<(), ApiError> {
    let mut events = cluster
        .download_progress(hive, id)
        .await
        .map_err(|e| ApiError::new(ErrorCode::DownloadFailed, e.message))?;
    while let Some(event) = events.next().await {
        job.push(&JobEvent::Cluster(ClusterEvent::Download(event.clone())));
        match event {
            DownloadEvent::Complete { local_path } => {
                job.narrate(
                    "hive",
                    "downloaded",
                    format!("{model} is at {local_path} on hive {}", hive.name),
                );
                return Ok(());
            }
            DownloadEvent::Error { message } => {
                return Err(ApiError::new(ErrorCode::DownloadFailed, message))
            }
            DownloadEvent::Downloading { .. } => {}
        }
    }
    Err(ApiError::new(
        ErrorCode::DownloadFailed,
        format!("hive {} stopped reporting the download", hive.name),
    ))
}

/// Relays a new worker's loading progress until it is ready.
async fn wait_loaded(
    cluster: &impl Cluster,
    hive: &HiveConn,
    worker: &WorkerInfo,
    job: &Job,
) -> Result<(), ApiError> {
    if let Some(mut events) = open_loading(cluster, hive, worker).await {
        while let Some(event) = events.next().await {
            job.push(&JobEvent::Cluster(ClusterEvent::Loading(event.clone())));
            match event {
                LoadingEvent::Ready => return Ok(()),
                LoadingEvent::Failed { message } => {
                    return Err(ApiError::new(ErrorCode::WorkerFailed, message))
                }
                LoadingEvent::LoadingToVram { .. } | LoadingEvent::LoadingToRam { .. } => {}
            }
        }
    }
    // The hive's account of why comes with its next snapshot.
    let id = &worker.worker_id;
    let view = cluster.view();
    view.wait_until(Duration::from_secs(2), |s| failed_in(s, hive, id).is_some())
        .await;
    let why = failed_in(&view.state(), hive, id)
        .unwrap_or_else(|| "it stopped answering while loading".into());
    Err(ApiError::new(
        ErrorCode::WorkerFailed,
        format!("worker {} failed to load: {why}", worker.worker_id),
    ))
}

/// The worker's loading progress, once its server is up; `None` if it failed
/// first or did not come up within [`LOADING_STREAM_WAIT`].
async fn open_loading(
    cluster: &impl Cluster,
    hive: &HiveConn,
    worker: &WorkerInfo,
) -> Option<crate::clients::Events<LoadingEvent>> {
    let deadline = tokio::time::Instant::now() + LOADING_STREAM_WAIT;
    loop {
        match cluster.loading_progress(hive, &worker.url).await {
            Ok(events) => return Some(events),
            Err(_) if tokio::time::Instant::now() < deadline => {
                // A freshly spawned worker binds its port a moment after the spawn answer.
                if failed_in(&cluster.view().state(), hive, &worker.worker_id).is_some() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => return None,
        }
    }
}

/// The hive's account of why a worker failed, if it has failed.
fn failed_in(state: &ClusterState, hive: &HiveConn, id: &str) -> Option<String> {
    let snapshot = state.hives.named(&hive.name)?.snapshot.as_ref()?;
    let w = snapshot.workers.iter().find(|w| w.worker_id == id)?;
    (w.state == WorkerState::Failed).then(|| w.error.clone().unwrap_or_else(|| "failed".into()))
}
