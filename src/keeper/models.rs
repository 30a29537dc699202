//! What the hives hold and run, from the keeper: models (listed, fetched,
//! removed, partial downloads cleaned) and workers (listed, stopped by id or
//! by model). Lists are tables with a header (`--json` for scripts).

use super::args::{ModelsDownload, ModelsSet};
use super::queen::Queen;
use super::render::Progress;
use super::table::{bytes, mb, print_json, resident, worker_hives, Table};
use crate::http::sse::Frame;
use crate::http::{client, segment};
use crate::protocol::{
    parse_rfc3339, DownloadEvent, DownloadRequest, DownloadStarted, HiveWorker, ModelEntry,
    ModelSettings, PartialsRemoved, QueenStatus,
};
use hyper::Method;
use std::io::IsTerminal;

pub(super) async fn models_list(queen: &Queen, node: &str, json: bool) -> Result<(), String> {
    let path = format!("/v1/hives/{}/models", segment(node));
    let models: Vec<ModelEntry> = queen.call(Method::GET, &path, None::<&()>).await?;
    if json {
        return print_json(&models);
    }
    let mut table = Table::new(&["NAME", "QUANT", "ARCH", "SIZE", "SETTINGS", "SOURCE"]);
    for m in models {
        let size = match m.hashing {
            Some(h) => format!(
                "{} (hashing, {}%)",
                bytes(m.size),
                h.bytes_hashed * 100 / h.bytes_total.max(1)
            ),
            None => bytes(m.size),
        };
        table.row(vec![
            m.name,
            m.quantization,
            m.architecture,
            size,
            settings(&m.settings),
            m.model_ref,
        ]);
    }
    table.print(&format!(
        "no models on hive {node} (`rbee keeper pull REF --node {node}` fetches one)"
    ))
}

/// Every hive's models, as the queen's status has them.
pub(super) async fn list(queen: &Queen, json: bool) -> Result<(), String> {
    let status: QueenStatus = queen.call(Method::GET, "/v1/status", None::<&()>).await?;
    if json {
        return print_json(&status.models);
    }
    let mut table = Table::new(&["NAME", "HIVE", "QUANT", "SIZE", "NEEDS"]);
    for m in status.models {
        table.row(vec![
            m.name,
            m.hive,
            m.quantization,
            bytes(m.size),
            mb(m.memory_estimate_mb),
        ]);
    }
    table.print("no models (`rbee keeper pull REF` fetches one)")
}

/// Starts a download on the hive and follows its progress to the end.
pub(super) async fn models_download(queen: &Queen, d: ModelsDownload) -> Result<(), String> {
    let body = DownloadRequest {
        model_ref: super::infer::model_ref(&d.model_ref),
    };
    let path = format!("/v1/hives/{}/models/download", segment(&d.node));
    let started: DownloadStarted = queen.call(Method::POST, &path, Some(&body)).await?;
    let url = queen.url(&format!(
        "/v1/hives/{}/models/download/progress?id={}",
        segment(&d.node),
        segment(&started.download_id)
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
                println!("{} is at {local_path} on hive {}", d.model_ref, d.node);
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

/// A model's settings in a few words (`-`: the hive's defaults).
fn settings(s: &ModelSettings) -> String {
    let mut words = Vec::new();
    if let Some(ctx) = s.ctx_size {
        words.push(format!("ctx {ctx}"));
    }
    if let Some(slots) = s.slots {
        words.push(format!("{slots} slots"));
    }
    if let Some(t) = s.cache_type {
        words.push(format!("cache {t}"));
    }
    match words.is_empty() {
        true => "-".into(),
        false => words.join(", "),
    }
}

/// `models set`: the model's settings as they were, with the options given.
pub(super) async fn models_set(queen: &Queen, s: ModelsSet) -> Result<(), String> {
    let path = format!("/v1/hives/{}/models", segment(&s.node));
    let models: Vec<ModelEntry> = queen.call(Method::GET, &path, None::<&()>).await?;
    let entry = models
        .into_iter()
        .find(|m| m.name == s.name)
        .ok_or_else(|| {
            format!(
                "no model named {} on hive {} (`rbee keeper models list --node {}` lists them)",
                s.name, s.node, s.node
            )
        })?;
    let mut new = if s.reset {
        ModelSettings::default()
    } else {
        entry.settings
    };
    new.ctx_size = s.ctx.or(new.ctx_size);
    new.slots = s.slots.or(new.slots);
    new.cache_type = s.cache_type.or(new.cache_type);
    let path = format!(
        "/v1/hives/{}/models/{}/settings",
        segment(&s.node),
        segment(&s.name)
    );
    let set: ModelEntry = queen.call(Method::PUT, &path, Some(&new)).await?;
    println!(
        "{} on hive {}: {} (new workers of it start so)",
        set.name,
        s.node,
        settings(&set.settings)
    );
    Ok(())
}

pub(super) async fn models_remove(queen: &Queen, node: &str, name: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{}/models/{}", segment(node), segment(name));
    let _: ModelEntry = queen.call(Method::DELETE, &path, None::<&()>).await?;
    println!("removed {name}");
    Ok(())
}

pub(super) async fn models_clean(queen: &Queen, node: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{}/models/download/partial", segment(node));
    let cleaned: PartialsRemoved = queen.call(Method::DELETE, &path, None::<&()>).await?;
    for file in &cleaned.removed {
        println!("removed {file}");
    }
    println!(
        "{} partial downloads removed, {} freed",
        cleaned.removed.len(),
        mb(cleaned.freed_mb)
    );
    Ok(())
}

/// A row per worker: id, hive, model, state, URL, the memory estimated and
/// resident, busy slots, idle time and when the hive stops it if it stays idle.
pub(super) async fn workers_list(queen: &Queen, json: bool) -> Result<(), String> {
    let workers: Vec<HiveWorker> = queen.call(Method::GET, "/v1/workers", None::<&()>).await?;
    if json {
        return print_json(&workers);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut table = Table::new(&[
        "ID", "HIVE", "MODEL", "STATE", "URL", "ESTIMATE", "RSS", "BUSY", "IDLE", "STOPS IN",
    ]);
    for HiveWorker {
        hive,
        worker: w,
        in_flight,
        ..
    } in workers
    {
        let since = |t: &Option<String>| t.as_deref().and_then(parse_rfc3339);
        let idle = match since(&w.idle_since) {
            Some(t) if in_flight == 0 => duration(now.saturating_sub(t)),
            _ => "busy".to_string(),
        };
        let stops = match since(&w.stops_at) {
            Some(t) if in_flight == 0 => duration(t.saturating_sub(now)),
            _ => "-".to_string(),
        };
        let hive = worker_hives(&hive, &w);
        let rss = resident(&w);
        table.row(vec![
            w.worker_id,
            hive,
            w.model,
            w.state.to_string(),
            w.url,
            mb(w.estimate_mb),
            rss,
            format!("{in_flight}/{}", w.slots),
            idle,
            stops,
        ]);
    }
    table.print("no workers (one starts with the first job for its model)")
}

/// `42s`, `3m`, `2h`.
pub(super) fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

/// How long `stop` waits for the workers it stopped to be gone.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops the workers of the model `target` names, or the one worker whose
/// id starts with it, and returns when they are gone (so the next job never
/// lands on one that is stopping).
pub(super) async fn stop(queen: &Queen, target: &str) -> Result<(), String> {
    let workers: Vec<HiveWorker> = queen.call(Method::GET, "/v1/workers", None::<&()>).await?;
    let ids = stop_targets(&workers, target)?;
    for id in &ids {
        let path = format!("/v1/workers/{}/shutdown", segment(id));
        let _: HiveWorker = queen.call(Method::POST, &path, None::<&()>).await?;
        eprintln!("stopping {id}");
    }
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    let mut left = ids;
    while !left.is_empty() {
        let workers: Vec<HiveWorker> = queen.call(Method::GET, "/v1/workers", None::<&()>).await?;
        left.retain(|id| {
            let here = workers.iter().any(|w| &w.worker.worker_id == id);
            if !here {
                println!("stopped {id}");
            }
            here
        });
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{} still stopping after {} s (`rbee keeper ps` shows them)",
                left.join(", "),
                STOP_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Which workers `stop TARGET` means: every worker of a model of that name,
/// else the one whose id starts with it; none or several is an error naming them.
pub(super) fn stop_targets(workers: &[HiveWorker], target: &str) -> Result<Vec<String>, String> {
    // One already told to stop is not running any more.
    let workers: Vec<&HiveWorker> = workers
        .iter()
        .filter(|w| w.worker.state != crate::protocol::WorkerState::Stopping)
        .collect();
    let of_model: Vec<String> = workers
        .iter()
        .filter(|w| w.worker.model == target)
        .map(|w| w.worker.worker_id.clone())
        .collect();
    if !of_model.is_empty() {
        return Ok(of_model);
    }
    let by_id: Vec<&str> = workers
        .iter()
        .map(|w| w.worker.worker_id.as_str())
        .filter(|id| id.starts_with(target) || id.trim_start_matches("worker-").starts_with(target))
        .collect();
    match by_id.as_slice() {
        [one] => Ok(vec![one.to_string()]),
        [] if workers.is_empty() => Err(format!(
            "no worker matches {target}: no workers are running"
        )),
        [] => {
            let running: Vec<String> = workers
                .iter()
                .map(|w| format!("{} ({})", w.worker.worker_id, w.worker.model))
                .collect();
            Err(format!(
                "no worker or model matches {target}; running: {}",
                running.join(", ")
            ))
        }
        many => Err(format!(
            "{target} matches {} workers: {}; give more of the id",
            many.len(),
            many.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, model: &str) -> HiveWorker {
        HiveWorker {
            hive: "localhost".into(),
            worker: crate::protocol::WorkerInfo::ready(id, model, 0),
            in_flight: 0,
            tokens_per_second: None,
        }
    }

    #[test]
    fn stop_means_a_models_workers_or_one_worker_by_the_start_of_its_id() {
        let ws = [
            worker("worker-4f29c1", "smollm"),
            worker("worker-4f88aa", "smollm"),
            worker("worker-b1", "llama"),
        ];
        assert_eq!(
            stop_targets(&ws, "smollm").unwrap(),
            ["worker-4f29c1", "worker-4f88aa"]
        );
        assert_eq!(stop_targets(&ws, "b1").unwrap(), ["worker-b1"]);
        assert_eq!(stop_targets(&ws, "worker-4f2").unwrap(), ["worker-4f29c1"]);
        let many = stop_targets(&ws, "4f").unwrap_err();
        assert!(
            many.contains("matches 2 workers") && many.contains("give more"),
            "{many}"
        );
        let none = stop_targets(&ws, "mistral").unwrap_err();
        assert!(none.contains("worker-b1 (llama)"), "{none}");
        assert!(stop_targets(&[], "x")
            .unwrap_err()
            .contains("no workers are running"));
    }
}
