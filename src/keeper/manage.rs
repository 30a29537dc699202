//! The management commands: hives, join tokens, aliases, keys, the queen
//! itself and the config file, one function each (models and workers are
//! `models.rs`'s). Lists are tables with a header (`--json`
//! for scripts); commands that only look never start a queen.

use super::args::{
    AliasCmd, Command, ConfigCmd, HiveAction, HiveAdd, JoinTokenCmd, KeysAction, KeysAdd,
    ModelsAction, ModelsDownload, QueenCmd, WorkersAction,
};
use super::config::{self, Config};
use super::models::{
    list, models_clean, models_download, models_list, models_remove, models_set, stop, workers_list,
};
use super::queen::Queen;
use super::table::{lends, mb, print_json, Table};
use crate::http::segment;
use crate::protocol::{AddHive, HiveRemoved, HiveStatus, MemoryPool};
use hyper::Method;

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
            ModelsAction::Set(s) => models_set(queen, s).await,
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
