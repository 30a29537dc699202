//! `rbee keeper status`: the picture the queen's status page draws, in the
//! terminal — hives with their memory, workers, models, running and recent
//! jobs — and, with `--web`, a link that opens the page logged in.

use super::queen::Queen;
use super::table::{bytes, mb};
use crate::protocol::{HiveState, JobState, QueenStatus, SessionLink};
use hyper::Method;
use std::io::Write;

pub async fn status(queen: &Queen, web: bool) -> Result<(), String> {
    if web {
        let link: SessionLink = queen
            .call(Method::POST, "/v1/session/link", None::<&()>)
            .await?;
        println!("{}", queen.url(&link.path));
        eprintln!("(the link logs a browser in once, within 5 minutes)");
        return Ok(());
    }
    let s: QueenStatus = queen.call(Method::GET, "/v1/status", None::<&()>).await?;
    let mut out = std::io::stdout().lock();
    render(&s, &mut out).map_err(|e| format!("cannot write: {e}"))
}

/// The picture, in sections; each hive with its memory and models.
fn render(s: &QueenStatus, out: &mut impl Write) -> std::io::Result<()> {
    let up = s
        .hives
        .iter()
        .filter(|h| h.status == HiveState::Reachable)
        .count();
    let running = s
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Running)
        .count();
    writeln!(
        out,
        "queen {}: {up}/{} hives up, {} workers, {running} jobs running",
        s.version,
        s.hives.len(),
        s.workers.len()
    )?;
    hives(s, out)?;
    workers(s, out)?;
    jobs(s, out)
}

/// Each hive with its memory, what it lends and its models.
fn hives(s: &QueenStatus, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nHIVES")?;
    if s.hives.is_empty() {
        writeln!(
            out,
            "  none (add one with `rbee keeper hive add NAME --url URL`)"
        )?;
    }
    for h in &s.hives {
        let memory = h.ram.as_ref().map_or("-".to_string(), |r| {
            format!("ram {}/{}", mb(r.used_mb), mb(r.budget_mb))
        });
        let gpus: Vec<String> = h
            .gpus
            .iter()
            .map(|g| format!("{} {}/{}", g.name, mb(g.used_mb), mb(g.budget_mb)))
            .collect();
        writeln!(
            out,
            "  {:<12} {:<11} {:<28} {memory}{}",
            h.name,
            h.status.to_string(),
            h.url,
            if gpus.is_empty() {
                String::new()
            } else {
                format!(", {}", gpus.join(", "))
            }
        )?;
        if let Some(e) = &h.error {
            writeln!(out, "  {:<12} {e}", "")?;
        }
        if let Some(lent) = super::table::lends(&h.leases) {
            writeln!(out, "  {:<12} lends {lent}", "")?;
        }
        for m in s.models.iter().filter(|m| m.hive == h.name) {
            writeln!(
                out,
                "  {:<12} model {} ({}, {}, needs {})",
                "",
                m.name,
                m.quantization,
                bytes(m.size),
                mb(m.memory_estimate_mb)
            )?;
        }
    }
    Ok(())
}

fn workers(s: &QueenStatus, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nWORKERS")?;
    if s.workers.is_empty() {
        writeln!(
            out,
            "  none (a worker starts with the first job for its model)"
        )?;
    }
    for w in &s.workers {
        let rate = w
            .tokens_per_second
            .map_or("-".to_string(), |r| format!("{r:.1} tok/s"));
        writeln!(
            out,
            "  {:<24} {:<10} {:<28} {:<8} {}/{} busy  {:>12}  est {} · rss {}",
            w.worker.worker_id,
            super::table::worker_hives(&w.hive, &w.worker),
            w.worker.model,
            w.worker.state.to_string(),
            w.in_flight,
            w.worker.slots,
            rate,
            mb(w.worker.estimate_mb),
            super::table::resident(&w.worker)
        )?;
    }
    Ok(())
}

fn jobs(s: &QueenStatus, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nJOBS")?;
    if s.jobs.is_empty() {
        writeln!(out, "  none yet")?;
    }
    for j in &s.jobs {
        let place = match (&j.hive, &j.worker) {
            (Some(h), Some(w)) => format!("{h}/{w}"),
            _ => "-".to_string(),
        };
        let state = serde_json::to_value(j.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        writeln!(
            out,
            "  {:<24} {:<10} {:>5} tokens {:>7.1}s  {place}  {}",
            j.job_id,
            state,
            j.tokens,
            j.seconds,
            j.model.rsplit('/').next().unwrap_or(&j.model)
        )?;
        if let Some(e) = &j.error {
            writeln!(out, "  {:<24} {e}", "")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CatalogModel, HiveStatus, JobSummary, MemoryPool};

    #[test]
    fn the_picture_names_every_hive_model_worker_and_job() {
        let s = QueenStatus {
            version: "0.1.0".into(),
            hives: vec![HiveStatus {
                name: "mac".into(),
                url: "https://mac:8080".into(),
                found: "token".into(),
                fingerprint: None,
                status: HiveState::Reachable,
                last_seen: None,
                managed: false,
                error: None,
                version: Some("0.1.0".into()),
                version_matches: true,
                leases: vec![],
                ram: Some(MemoryPool {
                    name: "ram".into(),
                    total_mb: 16384,
                    available_mb: 8000,
                    budget_mb: 8192,
                    used_mb: 967,
                }),
                gpus: vec![],
                workers: 0,
            }],
            workers: vec![],
            models: vec![CatalogModel {
                hive: "mac".into(),
                name: "smollm2".into(),
                quantization: "Q4_1".into(),
                size: 98 << 20,
                memory_estimate_mb: 967,
            }],
            jobs: vec![JobSummary {
                job_id: "job-1".into(),
                model: "file:/models/smollm2.gguf".into(),
                state: JobState::Failed,
                hive: Some("mac".into()),
                worker: Some("worker-1".into()),
                tokens: 12,
                started_at: String::new(),
                seconds: 1.5,
                error: Some("WORKER_LOST".into()),
            }],
        };
        let mut out = Vec::new();
        render(&s, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for want in [
            "1/1 hives up",
            "mac",
            "ram 967 MB/8.0 GB",
            "model smollm2 (Q4_1, 98 MB, needs 967 MB)",
            "WORKERS\n  none",
            "job-1",
            "failed",
            "mac/worker-1",
            "smollm2.gguf",
            "WORKER_LOST",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
    }
}
