//! Which hives a job may use: the one its `node` names (starting the local
//! hive for `localhost`), or every hive with this machine's among them; of
//! those, the ones reachable now, waiting a moment for any not heard from
//! yet. What is skipped is narrated; when none is left the error names each.

use super::cluster::Cluster;
use super::jobs::Job;
use super::registry::LOCALHOST;
use super::view::{ClusterState, SILENCE};
use crate::protocol::{ApiError, ErrorCode};

/// The names of the hives this job may use, at least one of them reachable.
pub async fn candidates(
    cluster: &impl Cluster,
    job: &Job,
    node: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let names = named_hives(cluster, job, node).await?;
    reachable(cluster, job, names).await
}

/// The hive `node` names, or every hive with this machine's among them;
/// `localhost`, or no hive on this machine, starts the local one (again, if
/// it has gone).
async fn named_hives(
    cluster: &impl Cluster,
    job: &Job,
    node: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let view = cluster.view();
    let state = view.state();
    let known: Vec<String> = state.hives.iter().map(|h| h.conn.name.clone()).collect();
    let up = |name: &str| {
        state
            .hives
            .iter()
            .any(|h| h.conn.name == name && h.reachable)
    };
    match node {
        Some(LOCALHOST) if !up(LOCALHOST) => Ok(vec![cluster.local_hive(job).await?.name]),
        Some(name) if known.iter().any(|k| k == name) => Ok(vec![name.to_string()]),
        Some(name) => Err(unknown_node(name, &known)),
        None => {
            // Until every hive has answered or failed, this machine's may be among them.
            view.wait_until(SILENCE, |s| {
                s.hives
                    .iter()
                    .all(|h| h.snapshot.is_some() || h.error.is_some())
            })
            .await;
            let mut names = known;
            if cluster.local_hive_allowed() && local_hive_wanted(&view.state()) {
                let local = cluster.local_hive(job).await?.name;
                if !names.contains(&local) {
                    names.push(local);
                }
            }
            Ok(names)
        }
    }
}

/// Whether this machine's hive should run (and be started if it does not):
/// it is registered as `localhost` and not up, or no registered hive runs
/// on this machine.
pub fn local_hive_wanted(state: &ClusterState) -> bool {
    let local = state.hives.iter().find(|h| h.conn.name == LOCALHOST);
    match local {
        Some(h) => !h.reachable,
        None => !state.hives.iter().any(|h| {
            let hostname = h.snapshot.as_ref().map(|s| s.hostname.as_str());
            on_this_machine(&h.conn.url, hostname)
        }),
    }
}

/// Whether the hive at `url` runs on the queen's own machine: its address is
/// one of this machine's (a socket can be bound to it), or its URL names
/// this machine and the hive says it runs on a machine of that name. A host
/// name alone proves nothing: machines cloned from one image, or network
/// namespaces, share one.
pub fn on_this_machine(url: &str, hostname: Option<&str>) -> bool {
    // Asked for every hive on every job: an address's answer is kept a
    // minute (a bind per hive per job would be a thousand system calls).
    type Memo = std::collections::HashMap<(String, Option<String>), (bool, std::time::Instant)>;
    static MEMO: std::sync::Mutex<Option<Memo>> = std::sync::Mutex::new(None);
    let key = (url.to_string(), hostname.map(str::to_string));
    let mut memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    let memo = memo.get_or_insert_with(Memo::new);
    if let Some((here, at)) = memo.get(&key) {
        if at.elapsed() < std::time::Duration::from_secs(60) {
            return *here;
        }
    }
    if memo.len() > 10_000 {
        memo.clear();
    }
    let here = looks_local(url, hostname);
    memo.insert(key, (here, std::time::Instant::now()));
    here
}

fn looks_local(url: &str, hostname: Option<&str>) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok();
    }
    let here = crate::machine::hostname();
    let first = |name: &str| {
        name.split('.')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    !here.is_empty() && first(host) == first(&here) && hostname == Some(here.as_str())
}

fn unknown_node(name: &str, known: &[String]) -> ApiError {
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    ApiError::new(
        ErrorCode::UnknownNode,
        format!("no hive named {name}; registered: {known} (add one with `rbee keeper hive add`)"),
    )
}

/// The hives that are reachable (waiting a moment for ones not heard from
/// yet); the others are narrated as skipped, or, when none is, named in the
/// `HIVE_UNREACHABLE` error with why.
async fn reachable(
    cluster: &impl Cluster,
    job: &Job,
    names: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    let view = cluster.view();
    // A set: a job may name every one of a thousand hives.
    let named: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let wanted = |s: &ClusterState| {
        s.hives
            .iter()
            .any(|h| h.reachable && named.contains(h.conn.name.as_str()))
    };
    view.wait_until(SILENCE, wanted).await;
    let state = view.state();
    let mut alive = Vec::new();
    let mut down = Vec::new();
    for hive in state
        .hives
        .iter()
        .filter(|h| named.contains(h.conn.name.as_str()))
    {
        if hive.reachable {
            alive.push(hive.conn.name.clone());
        } else {
            let why = hive.error.as_deref().unwrap_or("not heard from yet");
            down.push(format!(
                "hive {} at {} is not answering ({why})",
                hive.conn.name, hive.conn.url
            ));
        }
    }
    if alive.is_empty() {
        return Err(ApiError::new(ErrorCode::HiveUnreachable, down.join("; ")));
    }
    for d in down {
        job.narrate("queen", "skip_hive", d);
    }
    Ok(alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hive_is_on_this_machine_by_its_address_not_its_host_name() {
        for here in [
            "http://127.0.0.1:8080",
            "http://localhost:9",
            "http://[::1]:8080",
        ] {
            assert!(on_this_machine(here, None), "{here}");
        }
        // An address no interface here has: another machine, whatever it is called.
        let name = crate::machine::hostname();
        assert!(!on_this_machine("http://203.0.113.9:8080", Some(&name)));
        assert!(!on_this_machine("not a url", None));
        if !name.is_empty() {
            let url = format!("http://{name}:8080");
            assert!(on_this_machine(&url, Some(&name)));
            assert!(!on_this_machine(&url, Some("elsewhere")));
            assert!(!on_this_machine(&url, None));
        }
    }
}
