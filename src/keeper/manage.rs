//! The management commands: hives, models, workers, the queen itself and the
//! config file, one function each. Lists are tables with a header (`--json`
//! for scripts); commands that only look never start a queen.

use super::args::{
    AliasCmd, Command, ConfigCmd, HiveAction, HiveAdd, JoinTokenCmd, KeysAction, KeysAdd,
    ModelsAction, ModelsDownload, QueenCmd, WorkersAction,
};
use super::config::{self, Config};
use super::queen::Queen;
use super::render::Progress;
use super::table::{bytes, lends, mb, print_json, worker_hives, Table};
use crate::http::sse::Frame;
use crate::http::{client, segment};
use crate::protocol::{
    parse_rfc3339, AddHive, DownloadEvent, DownloadRequest, DownloadStarted, HiveRemoved,
    HiveStatus, HiveWorker, MemoryPool, ModelEntry, PartialsRemoved, QueenStatus,
};
use hyper::Method;
use std::io::IsTerminal;

/// The exit code of `queen status` when no queen answers, as service managers use it.
const NOT_RUNNING: u8 = 3;

/// Runs a management command; its exit code. Only commands that ask for
/// work (adding a hive, a download, `queen start`) wake a queen.
pub async fn manage(queen: &Queen, command: Command) -> Result<u8, String> {
    let wakes = matches!(
        command,
        Command::Pull(_)
            | Command::Hive(super::args::HiveCmd {
                action: HiveAction::Add(_)
            })
            | Command::Models(super::args::ModelsCmd {
                action: ModelsAction::Download(_)
            })
    );
    match &command {
        Command::Queen(_) | Command::Config(_) => {}
        _ if wakes => {
            queen.wake().await?;
        }
        _ => queen.require().await?,
    }
    match command {
        Command::Hive(h) => match h.action {
            HiveAction::Add(a) => hive_add(queen, a).await,
            HiveAction::List(l) => hive_list(queen, l.json).await,
            HiveAction::Remove(r) => hive_remove(queen, &r.name).await,
        },
        Command::Models(m) => match m.action {
            ModelsAction::List(l) => models_list(queen, &l.node, l.json).await,
            ModelsAction::Download(d) => models_download(queen, d).await,
            ModelsAction::Remove(r) => models_remove(queen, &r.node, &r.name).await,
            ModelsAction::Clean(c) => models_clean(queen, &c.node).await,
        },
        Command::Pull(p) => {
            let d = ModelsDownload {
                model_ref: p.model_ref,
                node: p.node,
            };
            models_download(queen, d).await
        }
        Command::List(l) => list(queen, l.json).await,
        Command::Ps(p) => workers_list(queen, p.json).await,
        Command::Workers(w) => match w.action {
            WorkersAction::List(l) => workers_list(queen, l.json).await,
            WorkersAction::Stop(s) => stop(queen, &s.id).await,
        },
        Command::Stop(s) => stop(queen, &s.target).await,
        Command::Queen(q) => return queen_cmd(queen, &q).await,
        Command::Config(c) => config_cmd(&c),
        Command::Keys(k) => match k.action {
            KeysAction::Add(a) => keys_add(queen, a).await,
            KeysAction::List(l) => keys_list(queen, l.json).await,
            KeysAction::Revoke(r) => keys_revoke(queen, &r.name).await,
        },
        Command::JoinToken(j) => join_token(queen, j).await,
        Command::Alias(a) => alias(queen, a).await,
        Command::Status(s) => super::status::status(queen, s.web).await,
        Command::Infer(_) | Command::Run(_) => Err("not a management command".into()),
    }
    .map(|()| 0)
}

async fn hive_add(queen: &Queen, a: HiveAdd) -> Result<(), String> {
    let token = match &a.token_file {
        Some(path) => Some(crate::read_token_file(path)?),
        None => None,
    };
    let body = AddHive {
        name: a.name,
        url: a.url,
        token,
        fingerprint: a.fingerprint,
    };
    let h: HiveStatus = queen.call(Method::POST, "/v1/hives", Some(&body)).await?;
    println!("added hive {} at {}: {}", h.name, h.url, h.status);
    if let Some(fp) = &h.fingerprint {
        eprintln!(
            "pinned its certificate {fp} (compare with `rbee hive --show-identity` on that machine)"
        );
    }
    Ok(())
}

/// A row per hive: name, status, URL, managed or registered, memory
/// used/budget, GPUs, rbee version, last seen or why it is down.
async fn hive_list(queen: &Queen, json: bool) -> Result<(), String> {
    let hives: Vec<HiveStatus> = queen.call(Method::GET, "/v1/hives", None::<&()>).await?;
    if json {
        return print_json(&hives);
    }
    let mut table = Table::new(&[
        "NAME", "STATUS", "URL", "KIND", "RAM", "GPUS", "VERSION", "SEEN", "LENDS",
    ]);
    for h in hives {
        let lent = lends(&h.leases).unwrap_or_else(|| "-".into());
        let pool = |p: &MemoryPool| format!("{}/{}", mb(p.used_mb), mb(p.budget_mb));
        let gpus = match h.gpus.is_empty() {
            true => "-".to_string(),
            false => h
                .gpus
                .iter()
                .map(|g| format!("{} {}", g.name, pool(g)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let version = match (&h.version, h.version_matches) {
            (Some(v), true) => v.clone(),
            (Some(v), false) => format!("{v} (queen: {})", env!("CARGO_PKG_VERSION")),
            (None, _) => "-".to_string(),
        };
        table.row(vec![
            h.name,
            h.status.to_string(),
            h.url,
            match h.found.as_str() {
                "" | "added" if h.managed => "managed".into(),
                "" | "added" => "added".into(),
                "token" => "joined".into(),
                "mdns" => "joined (mDNS)".into(),
                other => other.to_string(),
            },
            h.ram.as_ref().map_or("-".to_string(), pool),
            gpus,
            version,
            h.error.or(h.last_seen).unwrap_or_default(),
            lent,
        ]);
    }
    table.print("no hives (join one with `rbee keeper join-token`)")
}

async fn join_token(queen: &Queen, j: JoinTokenCmd) -> Result<(), String> {
    let expires_s = j
        .expires
        .as_deref()
        .map(|e| crate::parse_duration(e).map(|d| d.as_secs()))
        .transpose()
        .map_err(|e| format!("--expires: {e}"))?;
    let body = crate::protocol::JoinTokenRequest {
        expires_s,
        uses: j.uses,
        no_addresses: j.no_addresses,
    };
    let made: crate::protocol::JoinToken = queen
        .call(Method::POST, "/v1/join-tokens", Some(&body))
        .await?;
    eprintln!(
        "on the machine that joins, run this (good for {} hive{}, until {}):",
        made.uses,
        if made.uses == 1 { "" } else { "s" },
        made.expires_at
    );
    println!("rbee hive --join {}", made.token);
    Ok(())
}

/// `alias NAME MODEL` sets, `alias NAME --remove` removes, `alias` lists.
async fn alias(queen: &Queen, a: AliasCmd) -> Result<(), String> {
    let path = |name: &str| format!("/v1/aliases/{}", segment(name));
    let mut words = a.words.into_iter();
    match (words.next(), words.next(), words.next(), a.remove) {
        (_, _, Some(extra), _) => {
            return Err(format!("alias takes NAME MODEL, not also {extra:?}"))
        }
        (Some(name), None, None, true) => {
            let gone: crate::protocol::Alias = queen
                .call(Method::DELETE, &path(&name), None::<&()>)
                .await?;
            println!("removed alias {}", gone.name);
        }
        (Some(name), Some(model), None, false) => {
            let body = crate::protocol::SetAlias { model };
            let set: crate::protocol::Alias =
                queen.call(Method::PUT, &path(&name), Some(&body)).await?;
            println!("{} is {}", set.name, set.model);
        }
        (None, None, None, false) => {
            let all: Vec<crate::protocol::Alias> =
                queen.call(Method::GET, "/v1/aliases", None::<&()>).await?;
            if a.json {
                return print_json(&all);
            }
            let mut table = Table::new(&["ALIAS", "MODEL"]);
            for alias in all {
                table.row(vec![alias.name, alias.model]);
            }
            table.print("no aliases (rbee keeper alias NAME MODEL sets one)")?;
        }
        (Some(_), None, None, false) => {
            return Err("give the model it stands for (alias NAME MODEL), or --remove".into())
        }
        _ => {
            return Err(
                "alias NAME MODEL sets one, alias NAME --remove removes one, alias lists them"
                    .into(),
            )
        }
    }
    Ok(())
}

async fn keys_add(queen: &Queen, a: KeysAdd) -> Result<(), String> {
    let scope = match a.scope.as_str() {
        "use" => crate::protocol::KeyScope::Use,
        "admin" => crate::protocol::KeyScope::Admin,
        other => return Err(format!("--scope is use or admin, not {other:?}")),
    };
    let body = crate::protocol::KeyRequest {
        name: a.name,
        scope,
        expires: a.expires,
        rate: a.rate,
        streams: a.streams,
    };
    let added: crate::protocol::KeyAdded =
        queen.call(Method::POST, "/v1/keys", Some(&body)).await?;
    eprintln!(
        "key {} ({} scope) made; it is shown this once: keep it (Authorization: Bearer KEY, or x-api-key: KEY)",
        added.info.name, added.info.scope
    );
    println!("{}", added.key);
    Ok(())
}

async fn keys_list(queen: &Queen, json: bool) -> Result<(), String> {
    let keys: Vec<crate::protocol::KeyInfo> =
        queen.call(Method::GET, "/v1/keys", None::<&()>).await?;
    if json {
        return print_json(&keys);
    }
    let mut table = Table::new(&[
        "NAME",
        "SCOPE",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "REQUESTS",
        "TOKENS",
    ]);
    let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
    for k in keys {
        table.row(vec![
            k.name,
            k.scope.to_string(),
            k.created_at,
            or_dash(k.expires_at),
            or_dash(k.last_used),
            k.requests.to_string(),
            k.tokens_used.to_string(),
        ]);
    }
    table.print("no keys (`rbee keeper keys add NAME` makes one)")
}

async fn keys_revoke(queen: &Queen, name: &str) -> Result<(), String> {
    let path = format!("/v1/keys/{}", segment(name));
    let revoked: crate::protocol::KeyInfo = queen.call(Method::DELETE, &path, None::<&()>).await?;
    println!("revoked key {}", revoked.name);
    Ok(())
}

async fn hive_remove(queen: &Queen, name: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{}", segment(name));
    let removed: HiveRemoved = queen.call(Method::DELETE, &path, None::<&()>).await?;
    println!("removed hive {}", removed.removed);
    Ok(())
}

async fn models_list(queen: &Queen, node: &str, json: bool) -> Result<(), String> {
    let path = format!("/v1/hives/{}/models", segment(node));
    let models: Vec<ModelEntry> = queen.call(Method::GET, &path, None::<&()>).await?;
    if json {
        return print_json(&models);
    }
    let mut table = Table::new(&["NAME", "QUANT", "ARCH", "SIZE", "SOURCE"]);
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
            m.model_ref,
        ]);
    }
    table.print(&format!(
        "no models on hive {node} (`rbee keeper pull REF --node {node}` fetches one)"
    ))
}

/// Every hive's models, as the queen's status has them.
async fn list(queen: &Queen, json: bool) -> Result<(), String> {
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
async fn models_download(queen: &Queen, d: ModelsDownload) -> Result<(), String> {
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

async fn models_remove(queen: &Queen, node: &str, name: &str) -> Result<(), String> {
    let path = format!("/v1/hives/{}/models/{}", segment(node), segment(name));
    let _: ModelEntry = queen.call(Method::DELETE, &path, None::<&()>).await?;
    println!("removed {name}");
    Ok(())
}

async fn models_clean(queen: &Queen, node: &str) -> Result<(), String> {
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

/// A row per worker: id, hive, model, state, URL, memory, busy slots, idle
/// time and when the hive stops it if it stays idle.
async fn workers_list(queen: &Queen, json: bool) -> Result<(), String> {
    let workers: Vec<HiveWorker> = queen.call(Method::GET, "/v1/workers", None::<&()>).await?;
    if json {
        return print_json(&workers);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut table = Table::new(&[
        "ID", "HIVE", "MODEL", "STATE", "URL", "MEMORY", "BUSY", "IDLE", "STOPS IN",
    ]);
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
            Some(t) if in_flight == 0 => duration(now.saturating_sub(t)),
            _ => "busy".to_string(),
        };
        let stops = match since(&w.stops_at) {
            Some(t) if in_flight == 0 => duration(t.saturating_sub(now)),
            _ => "-".to_string(),
        };
        let hive = worker_hives(&hive, &w);
        table.row(vec![
            w.worker_id,
            hive,
            w.model,
            w.state.to_string(),
            w.url,
            format!("{}{measured}", mb(w.memory_mb)),
            format!("{in_flight}/{}", w.slots),
            idle,
            stops,
        ]);
    }
    table.print("no workers (one starts with the first job for its model)")
}

/// `42s`, `3m`, `2h`.
fn duration(secs: u64) -> String {
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
async fn stop(queen: &Queen, target: &str) -> Result<(), String> {
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
fn stop_targets(workers: &[HiveWorker], target: &str) -> Result<Vec<String>, String> {
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

/// `rbee keeper queen start|stop|status`.
async fn queen_cmd(queen: &Queen, q: &QueenCmd) -> Result<u8, String> {
    match q.action.as_str() {
        "start" => {
            if !queen.wake().await? {
                println!("queen already running at {}", queen.url);
            }
            Ok(0)
        }
        "stop" => {
            let was = queen.alive().await;
            queen.stop().await?;
            println!(
                "{}",
                if was {
                    "queen stopped"
                } else {
                    "no queen was running"
                }
            );
            Ok(0)
        }
        "status" => queen_status(queen).await,
        other => Err(format!(
            "unknown queen action {other:?}: use start, stop or status"
        )),
    }
}

/// The queen and its hives; exit 3 when no queen answers.
async fn queen_status(queen: &Queen) -> Result<u8, String> {
    if !queen.alive().await {
        println!("queen at {}: not running", queen.url);
        return Ok(NOT_RUNNING);
    }
    let hives: Vec<HiveStatus> = queen.call(Method::GET, "/v1/hives", None::<&()>).await?;
    println!("queen at {}: running, {} hives", queen.url, hives.len());
    for h in hives {
        println!("  hive {} at {}: {}", h.name, h.url, h.status);
    }
    Ok(0)
}

/// `config set KEY VALUE`, `config get [KEY]`, `config unset KEY`.
fn config_cmd(c: &ConfigCmd) -> Result<(), String> {
    let path = config::path();
    let mut config = Config::load(&path)?;
    let word = |n: usize| c.words.get(n).map(String::as_str);
    if c.words.len() > 2 {
        return Err(format!("too many words for config: {}", c.words.join(" ")));
    }
    match (c.action.as_str(), word(0), word(1)) {
        ("get", None, None) => {
            println!("# {}", path.display());
            for key in config::KEYS {
                if let Some(v) = config.get(key)? {
                    println!("{key} = {v}");
                }
            }
            Ok(())
        }
        ("get", Some(key), None) => match config.get(key)? {
            Some(v) => {
                println!("{v}");
                Ok(())
            }
            None => Err(format!("{key} is not set in {}", path.display())),
        },
        ("set", Some(key), Some(value)) => {
            config.set(key, Some(value))?;
            config.save(&path)?;
            println!("{key} = {}", config.get(key)?.unwrap_or_default());
            Ok(())
        }
        ("unset", Some(key), None) => {
            config.set(key, None)?;
            config.save(&path)
        }
        ("set" | "get" | "unset", _, _) => {
            Err("use `config set KEY VALUE`, `config get [KEY]` or `config unset KEY`".into())
        }
        (other, _, _) => Err(format!(
            "unknown config action {other:?}: use set, get or unset"
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
