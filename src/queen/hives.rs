//! Which hives a job may use: the one its `node` names (starting the local
//! hive for `localhost`), or every hive with this machine's among them; of
//! those, the ones reachable now, waiting a moment for any not heard from
//! yet. What is skipped is narrated; when none is left the error names each.

use super::cluster::Cluster;
use super::jobs::Job;
use super::placement::Allowed;
use super::registry::LOCALHOST;
use super::view::{ClusterState, HiveView, SILENCE};
use crate::protocol::{ApiError, ErrorCode};
use std::sync::Arc;

/// The hives this job may use, at least one of them reachable.
pub async fn candidates(
    cluster: &impl Cluster,
    job: &Job,
    node: Option<&str>,
) -> Result<Allowed, ApiError> {
    let allowed = named_hives(cluster, job, node).await?;
    reachable(cluster, job, allowed).await
}

/// The hive `node` names, or any hive with this machine's among them;
/// `localhost`, or no hive on this machine, starts the local one (again, if
/// it has gone).
async fn named_hives(
    cluster: &impl Cluster,
    job: &Job,
    node: Option<&str>,
) -> Result<Allowed, ApiError> {
    let view = cluster.view();
    let state = view.state();
    let up = |name: &str| state.hives.named(name).is_some_and(|h| h.reachable);
    match node {
        Some(LOCALHOST) if !up(LOCALHOST) => {
            Ok(Allowed::Only(vec![cluster.local_hive(job).await?.name]))
        }
        Some(name) if state.hives.named(name).is_some() => {
            Ok(Allowed::Only(vec![name.to_string()]))
        }
        Some(name) => Err(unknown_node(name, &state)),
        None => {
            // Until every hive has answered or failed, this machine's may be among them.
            view.wait_until(SILENCE, |s| s.hives.all_heard()).await;
            if cluster.local_hive_allowed() && local_hive_wanted(&view.state()) {
                cluster.local_hive(job).await?;
            }
            Ok(Allowed::Any)
        }
    }
}

/// Whether this machine's hive should run (and be started if it does not):
/// it is registered as `localhost` and not up, or no registered hive runs
/// on this machine.
/// Worked out once per change of the view, not per job.
pub fn local_hive_wanted(state: &ClusterState) -> bool {
    let local = state.hives.named(LOCALHOST);
    match local {
        Some(h) => !h.reachable,
        None => state.hives.local_wanted(|hives| {
            !hives.iter().any(|h| {
                let hostname = h.snapshot.as_ref().map(|s| s.hostname.as_str());
                on_this_machine(&h.conn.url, hostname)
            })
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

fn unknown_node(name: &str, state: &ClusterState) -> ApiError {
    let known: Vec<&str> = state.hives.iter().map(|h| h.conn.name.as_str()).collect();
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

/// The allowed hives, once one is reachable (waiting a moment for ones not
/// heard from yet); the others are narrated as skipped, or, when none is
/// reachable, named in the `HIVE_UNREACHABLE` error with why.
async fn reachable(
    cluster: &impl Cluster,
    job: &Job,
    allowed: Allowed,
) -> Result<Allowed, ApiError> {
    let view = cluster.view();
    // The allowed hives, and those of them down: from the view's index, not
    // a walk over every hive (a job that names none may use a thousand).
    let split = |s: &ClusterState| -> (usize, Vec<Arc<HiveView>>) {
        match &allowed {
            Allowed::Any => (s.hives.len(), s.hives.down().cloned().collect()),
            Allowed::Only(names) => {
                let named: Vec<_> = names.iter().filter_map(|n| s.hives.named(n)).collect();
                let down = named.iter().filter(|h| !h.reachable).map(|&h| h.clone());
                (named.len(), down.collect())
            }
        }
    };
    let any_up = |s: &ClusterState| {
        let (all, down) = split(s);
        all > down.len()
    };
    view.wait_until(SILENCE, any_up).await;
    let (all, down) = split(&view.state());
    let down = down.iter().map(|hive| {
        let why = hive.error.as_deref().unwrap_or("not heard from yet");
        format!(
            "hive {} at {} is not answering ({why})",
            hive.conn.name, hive.conn.url
        )
    });
    if all == 0 {
        let which = match &allowed {
            Allowed::Any => "no hive is registered".to_string(),
            Allowed::Only(names) => format!("hive {} is no longer registered", names.join(", ")),
        };
        return Err(ApiError::new(
            ErrorCode::HiveUnreachable,
            format!("{which} (add one with `rbee keeper hive add`)"),
        ));
    }
    if all == down.len() {
        return Err(ApiError::new(
            ErrorCode::HiveUnreachable,
            down.collect::<Vec<_>>().join("; "),
        ));
    }
    for d in down {
        job.narrate("queen", "skip_hive", d);
    }
    Ok(allowed)
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
