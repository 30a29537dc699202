//! The management commands: hives, models, workers and the queen itself, one
//! function each. Results go to stdout as tab-separated lines, for `cut` and `awk`.

use super::args::{
    Command, HiveAction, HiveAdd, ModelsAction, ModelsDownload, QueenCmd, WorkersAction,
};
use super::queen::Queen;
use super::render::Progress;
use crate::http::client;
use crate::http::sse::Frame;
use crate::protocol::{
    parse_rfc3339, AddHive, DownloadEvent, DownloadRequest, DownloadStarted, HiveRemoved,
    HiveStatus, HiveWorker, MemoryPool, ModelEntry, PartialsRemoved,
};
use hyper::Method;
use std::io::IsTerminal;

/// Runs a management command, waking the queen first unless the command is
/// about the queen itself, or only looks (`status`).
pub async fn manage(queen: &Queen, command: Command) -> Result<(), String> {
    if !matches!(command, Command::Queen(_) | Command::Status(_)) {
        queen.wake().await?;
    }
    match command {
        Command::Hive(h) => match h.action {
            HiveAction::Add(a) => hive_add(queen, a).await,
            HiveAction::List(_) => hive_list(queen).await,
            HiveAction::Remove(r) => hive_remove(queen, &r.name).await,
        },
        Command::Models(m) => match m.action {
            ModelsAction::List(l) => models_list(queen, &l.node).await,
            ModelsAction::Download(d) => models_download(queen, d).await,
            ModelsAction::Remove(r) => models_remove(queen, &r.node, &r.name).await,
            ModelsAction::Clean(c) => models_clean(queen, &c.node).await,
        },
        Command::Workers(w) => match w.action {
            WorkersAction::List(_) => workers_list(queen).await,
            WorkersAction::Stop(s) => workers_stop(queen, &s.id).await,
        },
        Command::Queen(q) => queen_cmd(queen, &q).await,
        Command::Status(s) => super::status::status(queen, s.web).await,
        Command::Infer(_) => Err("infer is not a management command".into()),
    }
}

async fn hive_add(queen: &Queen, a: HiveAdd) -> Result<(), String> {
    let token = match &a.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let body = AddHive {
        name: a.name,
        url: a.url,
        token,
    };
    let h: HiveStatus = queen.call(Method::POST, "/v1/hives", Some(&body)).await?;
    println!("{}\t{}\t{}", h.name, h.status, h.url);
    Ok(())
}

/// One line per hive: name, status, URL, managed or registered, memory
/// used/budget, GPUs, rbee version, last seen.
async fn hive_list(queen: &Queen) -> Result<(), String> {
    let hives: Vec<HiveStatus> = queen.call(Method::GET, "/v1/hives", None::<&()>).await?;
    for h in hives {
        let managed = if h.managed { "managed" } else { "registered" };
        let pool = |p: &MemoryPool| format!("{} {}/{} MB", p.name, p.used_mb, p.budget_mb);
        let memory = h.ram.as_ref().map_or("-".to_string(), pool);
        let gpus = match h.gpus.is_empty() {
            true => "no GPU".to_string(),
            false => h.gpus.iter().map(pool).collect::<Vec<_>>().join(", "),
        };
        let version = match (&h.version, h.version_matches) {
            (Some(v), true) => format!("rbee {v}"),
            (Some(v), false) => format!(
                "rbee {v} (differs from the queen's {})",
                env!("CARGO_PKG_VERSION")
            ),
            (None, _) => "-".to_string(),
        };
        println!(
            "{}\t{}\t{}\t{managed}\t{memory}\t{gpus}\t{version}\t{}",
            h.name,
            h.status,
            h.url,
            h.last_seen.or(h.error).unwrap_or_default()
        );
    }
    Ok(())
}

async fn hive_remove(queen: &Queen, name: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{name}");
    let removed: HiveRemoved = queen.call(Method::DELETE, &path, None::<&()>).await?;
    println!("removed {}", removed.removed);
    Ok(())
}

async fn models_list(queen: &Queen, node: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{node}/models");
    let models: Vec<ModelEntry> = queen.call(Method::GET, &path, None::<&()>).await?;
    for m in models {
        println!(
            "{}\t{}\t{}\t{} MB\t{}\t{}",
            m.name,
            m.quantization,
            m.architecture,
            m.size >> 20,
            m.model_ref,
            m.path
        );
    }
    Ok(())
}

/// Starts a download on the hive and follows its progress to the end.
async fn models_download(queen: &Queen, d: ModelsDownload) -> Result<(), String> {
    let body = DownloadRequest {
        model_ref: d.model_ref.clone(),
    };
    let path = format!("/v1/hives/{}/models/download", d.node);
    let started: DownloadStarted = queen.call(Method::POST, &path, Some(&body)).await?;
    let url = queen.url(&format!(
        "/v1/hives/{}/models/download/progress?id={}",
        d.node, started.download_id
    ));
    let mut stream = client::stream(&url, queen.token.as_deref(), None::<&()>)
        .await
        .map_err(|e| e.to_string())?;
    let mut stderr = std::io::stderr();
    let mut progress = Progress::new(false, stderr.is_terminal());
    while let Some(Frame::Data(data)) = stream.next().await {
        match serde_json::from_str::<DownloadEvent>(&data) {
            Ok(DownloadEvent::Complete { local_path }) => {
                progress.clear(&mut stderr);
                println!("{}\t{local_path}", d.model_ref);
                return Ok(());
            }
            Ok(DownloadEvent::Error { message }) => return Err(message),
            Ok(e) => progress.download(&mut stderr, &e),
            // An event from a newer hive: nothing to show.
            Err(_) => {}
        }
    }
    Err("the download stream ended early".into())
}

async fn models_remove(queen: &Queen, node: &str, name: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{node}/models/{name}");
    let _: ModelEntry = queen.call(Method::DELETE, &path, None::<&()>).await?;
    println!("removed {name}");
    Ok(())
}

async fn models_clean(queen: &Queen, node: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{node}/models/download/partial");
    let cleaned: PartialsRemoved = queen.call(Method::DELETE, &path, None::<&()>).await?;
    for file in &cleaned.removed {
        println!("removed {file}");
    }
    println!(
        "{} partial downloads removed, {} MB freed",
        cleaned.removed.len(),
        cleaned.freed_mb
    );
    Ok(())
}

/// One line per worker: id, hive, model, state, URL, memory, busy slots,
/// idle time and when the hive stops it if it stays idle.
async fn workers_list(queen: &Queen) -> Result<(), String> {
    let workers: Vec<HiveWorker> = queen.call(Method::GET, "/v1/workers", None::<&()>).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for HiveWorker {
        hive,
        worker: w,
        in_flight,
        ..
    } in workers
    {
        let measured = if w.memory_measured { "" } else { " (estimate)" };
        let since = |t: &Option<String>| t.as_deref().and_then(parse_rfc3339);
        let idle = match since(&w.idle_since) {
            Some(t) if in_flight == 0 => format!("idle {}", duration(now.saturating_sub(t))),
            _ => "busy".to_string(),
        };
        let stops = match since(&w.stops_at) {
            Some(t) if in_flight == 0 => format!("stops in {}", duration(t.saturating_sub(now))),
            _ => "-".to_string(),
        };
        println!(
            "{}\t{hive}\t{}\t{}\t{}\t{} MB{measured}\t{in_flight}/{} busy\t{idle}\t{stops}",
            w.worker_id, w.model, w.state, w.url, w.memory_mb, w.slots
        );
    }
    Ok(())
}

/// `42s`, `3m`, `2h`.
fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

async fn workers_stop(queen: &Queen, id: &str) -> Result<(), String> {
    let path = format!("/v1/workers/{id}/shutdown");
    let _: HiveWorker = queen.call(Method::POST, &path, None::<&()>).await?;
    println!("stopping {id}");
    Ok(())
}

/// `rbee keeper queen start|stop|status`.
async fn queen_cmd(queen: &Queen, q: &QueenCmd) -> Result<(), String> {
    match q.action.as_str() {
        "start" => queen_start(queen).await,
        "stop" => queen_stop(queen).await,
        "status" => queen_status(queen).await,
        other => Err(format!(
            "unknown queen action {other:?}: use start, stop or status"
        )),
    }
}

async fn queen_start(queen: &Queen) -> Result<(), String> {
    if !queen.wake().await? {
        println!("queen already running at {}", queen.url);
    }
    Ok(())
}

async fn queen_stop(queen: &Queen) -> Result<(), String> {
    let was = queen.alive().await;
    queen.stop().await?;
    if was {
        println!("queen stopped");
    } else {
        println!("no queen was running");
    }
    Ok(())
}

async fn queen_status(queen: &Queen) -> Result<(), String> {
    if !queen.alive().await {
        println!("queen\tasleep\t{}", queen.url);
        return Ok(());
    }
    println!("queen\talive\t{}", queen.url);
    let hives: Vec<HiveStatus> = queen.call(Method::GET, "/v1/hives", None::<&()>).await?;
    for h in hives {
        println!("hive\t{}\t{}\t{}", h.name, h.status, h.url);
    }
    Ok(())
}
