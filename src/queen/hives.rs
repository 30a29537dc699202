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
            let state = view.state();
            let mut names = known;
            let local_known = names.iter().any(|n| n == LOCALHOST);
            let local_up = state
                .hives
                .iter()
                .any(|h| h.conn.name == LOCALHOST && h.reachable);
            if (local_known && !local_up) || (!local_known && !another_hive_here(&state)) {
                let local = cluster.local_hive(job).await?.name;
                if !names.contains(&local) {
                    names.push(local);
                }
            }
            Ok(names)
        }
    }
}

/// Whether a registered hive runs on the queen's own machine (by host name).
fn another_hive_here(state: &ClusterState) -> bool {
    let here = crate::machine::hostname();
    state.hives.iter().any(|h| {
        h.snapshot
            .as_ref()
            .is_some_and(|s| !here.is_empty() && s.hostname == here)
    })
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
    let wanted = |s: &ClusterState| {
        s.hives
            .iter()
            .any(|h| names.contains(&h.conn.name) && h.reachable)
    };
    view.wait_until(SILENCE, wanted).await;
    let state = view.state();
    let mut alive = Vec::new();
    let mut down = Vec::new();
    for hive in state.hives.iter().filter(|h| names.contains(&h.conn.name)) {
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
