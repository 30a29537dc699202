//! The hive's state as the queen places and routes by it (DESIGN.md §10): its
//! memory and rbee's budget of it, its catalog with each model's memory
//! estimate, its workers with what they take. One snapshot type
//! ([`HiveSnapshot`]), streamed whole on `GET /v1/state/stream` at the start
//! and after every change (coalesced), with a keep-alive every 2 s.

use super::lend::Leases;
use super::models::Models;
use super::workers::{Plan, Workers};
use crate::gguf::{self, GgufInfo};
use crate::http::{self, sse};
use crate::protocol::{
    ApiError, CacheType, ErrorCode, HiveModel, HiveSnapshot, LeaseInfo, LeaseRequest, MemoryPool,
    ModelEntry, ModelSettings, SpawnRequest, SplitCostMb, WorkerInfo, WorkerState,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often an unchanged state stream says it is alive.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(2);
/// Changes this close together go out as one snapshot.
const COALESCE: Duration = Duration::from_millis(50);
/// Memory figures that move less than this make no new snapshot on their own.
const JITTER_MB: u64 = 64;
/// What the default budget leaves the rest of the machine: this share of the
/// memory free at start, and at least [`MARGIN_MIN_MB`].
const MARGIN_SHARE: u64 = 10;
const MARGIN_MIN_MB: u64 = 512;
/// Slots a worker gets unless the spawn says otherwise, and the most context
/// per slot it gets by default.
pub const DEFAULT_SLOTS: u32 = 4;
pub const MAX_DEFAULT_CTX: u32 = 4096;

/// Tells state streams that something changed. Cheap to clone.
#[derive(Clone)]
pub struct Changes(Arc<watch::Sender<u64>>);

impl Changes {
    pub fn new() -> Changes {
        Changes(Arc::new(watch::channel(0).0))
    }

    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

impl Default for Changes {
    fn default() -> Changes {
        Changes::new()
    }
}

/// The default RAM budget: what is free at start, less a margin for the rest
/// of the machine.
pub fn default_budget_mb(available_mb: u64) -> u64 {
    let margin = (available_mb / MARGIN_SHARE).max(MARGIN_MIN_MB);
    available_mb.saturating_sub(margin)
}

/// The context per slot a spawn gets: what it asks for, else the model's, at
/// most [`MAX_DEFAULT_CTX`].
pub fn ctx_per_slot(asked: Option<u32>, model_ctx: u64) -> u32 {
    asked.unwrap_or_else(|| {
        let model = u32::try_from(model_ctx).unwrap_or(u32::MAX);
        if model == 0 {
            MAX_DEFAULT_CTX
        } else {
            model.min(MAX_DEFAULT_CTX)
        }
    })
}

/// How a worker of `info` would be started with `slots` × `ctx` tokens, and
/// the memory it would take: llama.cpp's share (weights, KV cache, compute)
/// plus a host-memory prompt cache as large as its KV cache.
pub fn plan(
    info: &GgufInfo,
    file_size: u64,
    (slots, ctx): (u32, u32),
    cache_type: CacheType,
    threads: u32,
) -> Plan {
    let kv = (cache_type, cache_type);
    let est = gguf::estimate(info, file_size, u64::from(slots), u64::from(ctx), kv);
    let cache_ram_mb = est.kv_cache.div_ceil(1 << 20);
    Plan {
        slots,
        ctx_size: ctx,
        cache_type,
        threads,
        cache_ram_mb,
        memory_mb: est.total().div_ceil(1 << 20) + cache_ram_mb,
        parts: Some(est),
        split: None,
    }
}

/// The hive's view of itself, shared by its handlers.
#[derive(Clone)]
pub struct State {
    pub models: Models,
    pub workers: Workers,
    pub leases: Leases,
    pub changes: Changes,
    budget_mb: u64,
    /// Headers read once per model file (path, size).
    headers: Arc<Mutex<HashMap<(String, u64), GgufInfo>>>,
    /// Held from a spawn's memory check until its worker is recorded.
    spawning: Arc<tokio::sync::Mutex<()>>,
    /// Set when the hive stops: its state streams end then, so that no
    /// follower holds the hive's exit for the drain's whole time.
    stopping: Arc<watch::Sender<bool>>,
    /// The snapshot the state streams last built, shared by them all.
    latest: Arc<Latest<HiveSnapshot>>,
}

/// A value built once per change and shared until the next, or until it is
/// [`Latest::FRESH`] old (its memory figures move without a change): every
/// subscriber of the state stream wakes on the same change and every 2 s,
/// and the first to look builds the snapshot for all.
pub struct Latest<T>(Mutex<Option<(u64, Instant, Arc<T>)>>);

impl<T> Default for Latest<T> {
    fn default() -> Latest<T> {
        Latest(Mutex::new(None))
    }
}

impl<T> Latest<T> {
    const FRESH: Duration = Duration::from_secs(1);

    /// The value as of change `change`: the one built for it within
    /// [`Self::FRESH`], else `build`'s.
    pub fn get(&self, change: u64, build: impl FnOnce() -> T) -> Arc<T> {
        let mut latest = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*latest {
            Some((c, at, v)) if *c == change && at.elapsed() < Self::FRESH => v.clone(),
            _ => {
                let v = Arc::new(build());
                *latest = Some((change, Instant::now(), v.clone()));
                v
            }
        }
    }
}

impl State {
    pub fn new(
        models: Models,
        workers: Workers,
        leases: Leases,
        changes: Changes,
        budget_mb: u64,
    ) -> State {
        State {
            models,
            workers,
            leases,
            changes,
            budget_mb,
            headers: Arc::default(),
            spawning: Arc::default(),
            stopping: Arc::new(watch::channel(false).0),
            latest: Arc::default(),
        }
    }

    /// Ends every state stream, now and to come: the hive is stopping.
    pub fn end_streams(&self) {
        self.stopping.send_replace(true);
    }

    fn header(&self, entry: &ModelEntry) -> Result<GgufInfo, String> {
        let key = (entry.path.clone(), entry.size);
        let mut headers = self.headers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(info) = headers.get(&key) {
            return Ok(info.clone());
        }
        let info = gguf::read(std::path::Path::new(&entry.path))?;
        headers.insert(key, info.clone());
        Ok(info)
    }

    /// How a worker of `entry` would run with these settings (each unset: the
    /// model's own setting, else the hive's default), and what it takes.
    pub fn plan_for(
        &self,
        entry: &ModelEntry,
        slots: Option<u32>,
        ctx: Option<u32>,
        cache_type: Option<CacheType>,
    ) -> Plan {
        let info = self.header(entry).unwrap_or_else(|e| {
            tracing::warn!("cannot read {}'s header for its estimate: {e}", entry.name);
            GgufInfo {
                architecture: entry.architecture.clone(),
                parameters: entry.parameters,
                quantization: entry.quantization.clone(),
                context_length: entry.context_length,
                layers: entry.layers,
                ..GgufInfo::default()
            }
        });
        let set = entry.settings;
        let slots = slots.or(set.slots).unwrap_or(DEFAULT_SLOTS);
        let ctx = ctx_per_slot(ctx.or(set.ctx_size), info.context_length);
        let cache_type = cache_type.or(set.cache_type).unwrap_or_default();
        let mut plan = plan(
            &info,
            entry.size,
            (slots, ctx),
            cache_type,
            crate::machine::cores(),
        );
        let kv = (cache_type, cache_type);
        plan.split = gguf::split_cost(&info, entry.size, slots.into(), ctx.into(), kv)
            .map(|cost| SplitCostMb::of(&cost, plan.cache_ram_mb));
        plan
    }

    /// `PUT /v1/models/{name}/settings`: a model's worker settings, checked as a
    /// spawn would check them (slots and context against the model's and
    /// llama.cpp's limits; a quantized cache needs this hive's workers to
    /// have flash attention); the entry as it now is.
    pub fn set_settings(
        &self,
        name: &str,
        settings: ModelSettings,
    ) -> Result<ModelEntry, ApiError> {
        let entry = self.models.catalog().get(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("no model named {name} in this hive's catalog"),
            )
        })?;
        let with = ModelEntry {
            settings,
            ..entry.clone()
        };
        let plan = self.plan_for(&with, None, None, None);
        crate::protocol::check_slots(plan.slots, plan.ctx_size, entry.context_length)
            .map_err(|(field, message)| ApiError::invalid(field, format!("{name}: {message}")))?;
        plan.cache_type
            .check_v(self.workers.flash_attn())
            .map_err(|e| ApiError::invalid("cache_type", format!("{name}: {e}")))?;
        self.models.set_settings(name, settings)
    }

    /// Starts a worker if the budget has room for it; else `INSUFFICIENT_MEMORY`
    /// naming the need and what is free.
    /// Starts a worker for `req`; `reached` is how the caller reached this
    /// hive (where, and whether over TLS, the worker is reached too, unless told).
    pub async fn spawn(
        &self,
        req: &SpawnRequest,
        reached: super::workers::Reached,
    ) -> Result<WorkerInfo, ApiError> {
        let entry = self.models.find(&req.model_ref).await?;
        let plan = self.plan_for(&entry, req.slots, req.ctx_size, req.cache_type);
        crate::protocol::check_slots(plan.slots, plan.ctx_size, entry.context_length).map_err(
            |(field, message)| ApiError::invalid(field, format!("{}: {message}", entry.name)),
        )?;
        plan.cache_type
            .check_v(self.workers.flash_attn())
            .map_err(|e| ApiError::invalid("cache_type", format!("{}: {e}", entry.name)))?;
        let mut plan = plan;
        if !req.remotes.is_empty() {
            for r in &req.remotes {
                crate::protocol::check_lease_id(&r.lease)?;
                let web = r.url.starts_with("http://") || r.url.starts_with("https://");
                if r.layers == 0 || !web {
                    return Err(ApiError::invalid(
                        "remotes",
                        format!(
                            "a remote takes at least one layer at an https:// URL, not {} at {:?}",
                            r.layers, r.url
                        ),
                    ));
                }
            }
            let lent = req.remotes.iter().map(|r| u64::from(r.layers)).sum::<u64>();
            let lent = u32::try_from(lent).unwrap_or(u32::MAX);
            let cost = plan.split.filter(|c| lent <= c.layers).ok_or_else(|| {
                ApiError::invalid(
                    "remotes",
                    format!(
                        "{} cannot be split into those shares ({lent} layers lent)",
                        entry.name
                    ),
                )
            })?;
            plan.memory_mb = cost.host_need(cost.layers - lent);
            plan.parts = None;
        }
        let _one_at_a_time = self.spawning.lock().await;
        let free = self.snapshot().ram.free_mb();
        let on_gpu = req.backend.as_deref().is_some_and(|b| b != "cpu");
        if !on_gpu && plan.memory_mb > free {
            return Err(ApiError::new(
                ErrorCode::InsufficientMemory,
                format!(
                    "{} needs {} MB with {} slots of {} tokens; this hive has {free} MB of its budget free",
                    entry.name, plan.memory_mb, plan.slots, plan.ctx_size
                ),
            ));
        }
        self.workers.spawn(&entry, req, &plan, reached).await
    }

    /// Lends this hive's devices for a share of a split worker, if the budget
    /// has room for it.
    pub async fn lend(&self, req: &LeaseRequest) -> Result<LeaseInfo, ApiError> {
        let _one_at_a_time = self.spawning.lock().await;
        let free = self.snapshot().ram.free_mb();
        if req.memory_mb > free {
            return Err(ApiError::new(
                ErrorCode::InsufficientMemory,
                format!(
                    "{} layers of {} need {} MB; this hive has {free} MB of its budget free",
                    req.layers, req.model, req.memory_mb
                ),
            ));
        }
        self.leases.make(req).await
    }

    /// The hive as it is now.
    pub fn snapshot(&self) -> HiveSnapshot {
        let workers = self.workers.list();
        let leases = self.leases.list();
        let live = |w: &&WorkerInfo| w.state != WorkerState::Failed;
        let used_on = |backend_cpu: bool, device: u32| -> u64 {
            workers
                .iter()
                .filter(live)
                .filter(|w| {
                    (w.backend == "cpu") == backend_cpu && (backend_cpu || w.device == device)
                })
                .map(|w| w.memory_mb)
                .sum()
        };
        let ram = crate::machine::ram();
        let gpus = crate::machine::gpus()
            .into_iter()
            .map(|g| MemoryPool {
                name: g.name,
                total_mb: g.memory_total_mb,
                available_mb: g.memory_free_mb,
                budget_mb: g.memory_total_mb,
                used_mb: used_on(false, g.index),
            })
            .collect();
        let models = self
            .models
            .catalog()
            .list()
            .into_iter()
            .map(|entry| {
                let plan = self.plan_for(&entry, None, None, None);
                HiveModel {
                    memory_estimate_mb: plan.memory_mb,
                    split: plan.split,
                    entry,
                }
            })
            .collect();
        HiveSnapshot {
            version: env!("CARGO_PKG_VERSION").into(),
            backends: crate::BACKENDS.split(',').map(str::to_string).collect(),
            hostname: crate::machine::hostname(),
            cores: crate::machine::cores(),
            ram: MemoryPool {
                name: "ram".into(),
                total_mb: ram.total_mb,
                available_mb: ram.available_mb,
                budget_mb: self.budget_mb,
                used_mb: used_on(true, 0) + leases.iter().map(|l| l.memory_mb).sum::<u64>(),
            },
            gpus,
            models,
            workers,
            leases,
        }
    }

    /// `GET /v1/state/stream`: a snapshot now, then one after each change.
    pub fn stream(&self) -> http::Reply {
        let (tx, resp) = http::sse_response_every(KEEPALIVE_EVERY);
        let state = self.clone();
        tokio::spawn(async move {
            let mut changes = state.changes.subscribe();
            let mut stopping = state.stopping.subscribe();
            let mut sent: Option<Arc<HiveSnapshot>> = None;
            loop {
                if *stopping.borrow_and_update() {
                    return;
                }
                // The change is read before the snapshot is built: one that
                // comes during the build makes the next look build again.
                let change = *changes.borrow_and_update();
                let now = state.latest.get(change, || state.snapshot());
                if sent.as_ref().is_none_or(|old| notable(old, &now)) {
                    if tx.send(sse::event(&*now)).await.is_err() {
                        return;
                    }
                    sent = Some(now);
                }
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        tokio::time::sleep(COALESCE).await;
                    }
                    () = tokio::time::sleep(KEEPALIVE_EVERY) => {}
                    _ = stopping.changed() => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(resp)
    }
}

/// Whether `new` says something `old` did not: anything but memory figures
/// that moved less than [`JITTER_MB`].
fn notable(old: &HiveSnapshot, new: &HiveSnapshot) -> bool {
    let moved = |a: u64, b: u64| a.abs_diff(b) >= JITTER_MB;
    let pools_moved = |a: &MemoryPool, b: &MemoryPool| {
        moved(a.available_mb, b.available_mb) || moved(a.used_mb, b.used_mb)
    };
    let mut steady = new.clone();
    steady.ram.available_mb = old.ram.available_mb;
    steady.ram.used_mb = old.ram.used_mb;
    for (g, o) in steady.gpus.iter_mut().zip(&old.gpus) {
        g.available_mb = o.available_mb;
        g.used_mb = o.used_mb;
    }
    for (w, o) in steady.workers.iter_mut().zip(&old.workers) {
        if w.worker_id == o.worker_id && !moved(w.memory_mb, o.memory_mb) {
            w.memory_mb = o.memory_mb;
        }
        if w.worker_id == o.worker_id && !moved(w.resident_mb, o.resident_mb) {
            w.resident_mb = o.resident_mb;
        }
    }
    for (l, o) in steady.leases.iter_mut().zip(&old.leases) {
        if l.lease == o.lease && !moved(l.memory_mb, o.memory_mb) {
            l.memory_mb = o.memory_mb;
        }
    }
    steady != *old
        || pools_moved(&old.ram, &new.ram)
        || old
            .gpus
            .iter()
            .zip(&new.gpus)
            .any(|(a, b)| pools_moved(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_shares_the_snapshot_built_for_a_change() {
        let latest = Latest::default();
        let builds = std::cell::Cell::new(0);
        let build = |n: u32| {
            builds.set(builds.get() + 1);
            n
        };
        let first = latest.get(1, || build(10));
        let again = latest.get(1, || build(11));
        assert!(Arc::ptr_eq(&first, &again) && builds.get() == 1);
        assert_eq!(*latest.get(2, || build(12)), 12, "a change builds anew");
        assert_eq!(builds.get(), 2);
    }

    #[test]
    fn the_default_budget_leaves_a_margin() {
        assert_eq!(default_budget_mb(20_000), 18_000);
        assert_eq!(default_budget_mb(2_000), 1_488);
        assert_eq!(default_budget_mb(300), 0);
    }

    #[test]
    fn context_per_slot_is_the_models_up_to_a_cap_unless_asked() {
        assert_eq!(ctx_per_slot(None, 8192), 4096);
        assert_eq!(ctx_per_slot(None, 2048), 2048);
        assert_eq!(ctx_per_slot(None, 0), 4096);
        assert_eq!(ctx_per_slot(Some(512), 8192), 512);
    }

    #[test]
    fn free_memory_is_the_budget_left_but_never_more_than_the_os_has() {
        let pool = |available_mb, budget_mb, used_mb| MemoryPool {
            name: "ram".into(),
            total_mb: 16_000,
            available_mb,
            budget_mb,
            used_mb,
        };
        assert_eq!(pool(10_000, 4_000, 1_000).free_mb(), 3_000);
        assert_eq!(pool(500, 4_000, 1_000).free_mb(), 500);
        assert_eq!(pool(10_000, 1_000, 4_000).free_mb(), 0);
    }

    fn snapshot() -> HiveSnapshot {
        HiveSnapshot {
            version: "0.1.0".into(),
            backends: vec!["cpu".into()],
            hostname: "h".into(),
            cores: 2,
            ram: MemoryPool {
                name: "ram".into(),
                total_mb: 16_000,
                available_mb: 10_000,
                budget_mb: 8_000,
                used_mb: 1_000,
            },
            gpus: vec![],
            models: vec![],
            workers: vec![],
            leases: vec![],
        }
    }

    #[test]
    fn memory_jitter_makes_no_new_snapshot_but_real_changes_do() {
        let old = snapshot();
        let mut new = old.clone();
        new.ram.available_mb += JITTER_MB - 1;
        assert!(!notable(&old, &new));
        new.ram.available_mb += 1;
        assert!(notable(&old, &new));
        let mut new = old.clone();
        new.cores = 4;
        assert!(notable(&old, &new));
    }
}
