//! Where a request goes and where a new worker goes: pure decisions over a
//! [`ClusterState`], so every rule is a unit test (DESIGN.md §10).
//!
//! Routing: a ready worker with a free slot, the one holding the request's
//! prefix first, else the least outstanding; when every slot is taken, a new
//! worker only if it would get compute of its own (another hive, or a GPU
//! with room), else the least outstanding worker's queue. Placement: hives
//! whose free budget fits the model, GPU before CPU, then the hive that has
//! the file, then the most free memory; failing that, idle workers stopped
//! least recently used first; failing that, an error naming the need.

use super::registry::HiveConn;
use super::view::{ClusterState, HiveView};
use crate::protocol::{ApiError, ErrorCode, HiveModel, HiveSnapshot, WorkerInfo, WorkerState};
use std::time::Instant;

/// A worker a request can go to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub hive: HiveConn,
    pub url: String,
    pub worker_id: String,
}

impl Target {
    fn of(hive: &HiveView, w: &WorkerInfo) -> Target {
        Target {
            hive: hive.conn.clone(),
            url: w.url.clone(),
            worker_id: w.worker_id.clone(),
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    To(Target),
    /// No worker can take it as well as a new one would.
    Provision,
}

/// Where a new worker goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub hive: HiveConn,
    /// The GPU it loads onto; `None`: the CPU.
    pub gpu: Option<u32>,
    /// Idle workers to stop first, to make room.
    pub evict: Vec<Target>,
    /// What the worker takes on its hive (its own share, when split).
    pub need_mb: u64,
    /// The other hives' shares, when no hive can hold the model alone.
    pub split: Option<super::split::Split>,
}

/// Whether a catalog entry is what a request names: its reference, its
/// catalog name, or its file.
pub fn names(entry: &HiveModel, model: &str) -> bool {
    let path = model.strip_prefix("file:").unwrap_or(model);
    // Catalog names are lower-case; compared without a lower-cased copy of
    // the request's name for every hive.
    let lower = model.chars().flat_map(char::to_lowercase);
    entry.entry.model_ref == model || lower.eq(entry.entry.name.chars()) || entry.entry.path == path
}

/// The hives a job may use: any (a job that names none), or those named.
#[derive(Debug, Clone, PartialEq)]
pub enum Allowed {
    Any,
    Only(Vec<String>),
}

impl Allowed {
    pub fn admits(&self, name: &str) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// The reachable hives among `allowed`, with their snapshots.
pub(super) fn usable<'a>(
    state: &'a ClusterState,
    allowed: &'a Allowed,
) -> impl Iterator<Item = (&'a HiveView, &'a HiveSnapshot)> {
    state.hives.iter().filter_map(move |h| {
        let snapshot = h.snapshot.as_deref().filter(|_| h.reachable)?;
        allowed.admits(&h.conn.name).then_some((&**h, snapshot))
    })
}

/// `model`'s catalog entry on this hive.
pub fn entry<'a>(snapshot: &'a HiveSnapshot, model: &str) -> Option<&'a HiveModel> {
    snapshot.models.iter().find(|m| names(m, model))
}

/// The reachable hives among `allowed` whose catalogs have `model`, with its
/// entry there (as [`entry`] finds it): from the view's index, not a walk
/// over every hive.
fn having<'a>(
    state: &'a ClusterState,
    model: &'a str,
    allowed: &'a Allowed,
) -> impl Iterator<Item = (&'a HiveView, &'a HiveSnapshot, &'a HiveModel)> {
    state
        .hives
        .with_model(model)
        .into_iter()
        .filter_map(move |(h, m)| {
            let snapshot = h.snapshot.as_deref().filter(|_| h.reachable)?;
            let entry = snapshot.models.get(m)?;
            allowed
                .admits(&h.conn.name)
                .then_some((&**h, snapshot, entry))
        })
}

/// The memory a worker of `model` takes, from any catalog that has it.
pub fn need_mb(state: &ClusterState, model: &str, allowed: &Allowed) -> Option<u64> {
    having(state, model, allowed)
        .next()
        .map(|(_, _, e)| e.memory_estimate_mb)
}

/// The ready workers of `model` on usable hives, less the excluded ones.
fn ready_workers<'a>(
    state: &'a ClusterState,
    model: &'a str,
    allowed: &'a Allowed,
    excluded: &[String],
) -> Vec<(&'a HiveView, &'a WorkerInfo)> {
    let mut found = Vec::new();
    for (hive, snapshot, entry) in having(state, model, allowed) {
        for w in &snapshot.workers {
            if w.state == WorkerState::Ready
                && w.model == entry.entry.name
                && !excluded.contains(&w.url)
                && lenders_up(state, w)
            {
                found.push((hive, w));
            }
        }
    }
    found
}

/// Whether every hive lending a split worker its devices is reachable.
fn lenders_up(state: &ClusterState, w: &WorkerInfo) -> bool {
    w.split
        .iter()
        .filter(|p| !p.hive.is_empty())
        .all(|p| state.hives.named(&p.hive).is_some_and(|h| h.reachable))
}

/// Where a request for `model` goes. `preferred` is the worker that last
/// served its prefix.
pub fn route(
    state: &ClusterState,
    model: &str,
    allowed: &Allowed,
    preferred: Option<&str>,
    excluded: &[String],
) -> Route {
    // Each with its requests outstanding, looked up once.
    let workers: Vec<_> = ready_workers(state, model, allowed, excluded)
        .into_iter()
        .map(|(h, w)| (h, w, state.in_flight(&w.url)))
        .collect();
    let least = |candidates: &[(&HiveView, &WorkerInfo, u32)]| {
        candidates
            .iter()
            .min_by(|(_, a, m), (_, b, n)| (m, &a.url).cmp(&(n, &b.url)))
            .map(|(h, w, _)| Route::To(Target::of(h, w)))
    };
    let free: Vec<_> = workers
        .iter()
        .copied()
        .filter(|(_, w, n)| *n < w.slots)
        .collect();
    if let Some((h, w, _)) = free
        .iter()
        .find(|(_, w, _)| Some(w.url.as_str()) == preferred)
    {
        return Route::To(Target::of(h, w));
    }
    if let Some(route) = least(&free) {
        return route;
    }
    if workers.is_empty() || own_compute(state, model, allowed) {
        return Route::Provision;
    }
    least(&workers).unwrap_or(Route::Provision)
}

/// Whether a new worker of `model` would get compute of its own: a GPU with
/// room, or a hive whose CPU no worker of this model uses yet and whose
/// budget fits it. A second worker of a model on the same cores only adds
/// contention; its queue serves as well.
fn own_compute(state: &ClusterState, model: &str, allowed: &Allowed) -> bool {
    let Some(need) = need_mb(state, model, allowed) else {
        return false;
    };
    usable(state, allowed).any(|(_, s)| {
        let gpu_room = s.gpus.iter().any(|g| g.free_mb() >= need);
        let cpu_taken = entry(s, model).is_some_and(|e| {
            s.workers.iter().any(|w| {
                w.model == e.entry.name && w.backend == "cpu" && w.state != WorkerState::Failed
            })
        });
        gpu_room || (!cpu_taken && s.ram.free_mb() >= need)
    })
}

/// The hive a model that no catalog has is fetched onto: the one with the
/// most free memory (a free GPU first).
pub fn fetch_onto(state: &ClusterState, allowed: &Allowed) -> Option<HiveConn> {
    usable(state, allowed)
        .max_by_key(|(_, s)| {
            let gpu = s.gpus.iter().map(|g| g.free_mb()).max().unwrap_or(0);
            (gpu, s.ram.free_mb())
        })
        .map(|(h, _)| h.conn.clone())
}

/// Where a new worker of `model`, taking `need` MiB, goes.
pub fn place(
    state: &ClusterState,
    model: &str,
    need: u64,
    allowed: &Allowed,
) -> Result<Placement, ApiError> {
    // (GPU, has the file, free memory) ranks the hives that fit as they are.
    let mut fits = Vec::new();
    for (hive, s) in usable(state, allowed) {
        let has_file = entry(s, model).is_some();
        for (i, g) in s.gpus.iter().enumerate() {
            if g.free_mb() >= need {
                fits.push(((true, has_file, g.free_mb()), hive, Some(i as u32)));
            }
        }
        if s.ram.free_mb() >= need {
            fits.push(((false, has_file, s.ram.free_mb()), hive, None));
        }
    }
    if let Some((_, hive, gpu)) = fits.into_iter().max_by_key(|(rank, ..)| *rank) {
        return Ok(Placement {
            hive: hive.conn.clone(),
            gpu,
            evict: Vec::new(),
            need_mb: need,
            split: None,
        });
    }
    // Then (has the file, fewest stopped, free memory after) among those that
    // fit once idle workers are stopped, least recently used first.
    let mut after_eviction = Vec::new();
    let mut most = None::<(u64, &str)>;
    for (hive, s) in usable(state, allowed) {
        let (evict, free) = make_room(state, hive, s, need);
        if most.is_none_or(|(m, _)| free > m) {
            most = Some((free, hive.conn.name.as_str()));
        }
        if free >= need {
            let has_file = entry(s, model).is_some();
            let rank = (has_file, usize::MAX - evict.len(), free);
            after_eviction.push((rank, hive, evict));
        }
    }
    if let Some((_, hive, evict)) = after_eviction.into_iter().max_by_key(|(rank, ..)| *rank) {
        return Ok(Placement {
            hive: hive.conn.clone(),
            gpu: None,
            evict,
            need_mb: need,
            split: None,
        });
    }
    if let Some(placement) = super::split::plan(state, model, allowed) {
        return Ok(placement);
    }
    let most = match most {
        Some((free, name)) => format!("the most any hive can free is hive {name} with {free} MB"),
        None => "no hive is reachable".to_string(),
    };
    Err(ApiError::new(
        ErrorCode::InsufficientMemory,
        format!("{model} needs {need} MB; {most}"),
    ))
}

/// The idle CPU workers of a hive to stop, least recently used first, until
/// `need` fits (or all of them, if it never does); and the memory free after.
fn make_room(
    state: &ClusterState,
    hive: &HiveView,
    s: &HiveSnapshot,
    need: u64,
) -> (Vec<Target>, u64) {
    let mut idle: Vec<&WorkerInfo> = s
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready && w.backend == "cpu")
        .filter(|w| state.in_flight(&w.url) == 0)
        .collect();
    // Never used through this queen counts as least recent; then by the hive's idle clock.
    let used = |w: &WorkerInfo| state.last_used.get(&w.url).copied();
    idle.sort_by(|a, b| {
        let order = |w: &WorkerInfo| {
            (
                used(w).is_some(),
                used(w).unwrap_or_else(Instant::now),
                w.idle_since.clone(),
            )
        };
        order(a).cmp(&order(b))
    });
    let mut freed = 0;
    let mut evict = Vec::new();
    let free_with = |freed: u64| {
        (s.ram
            .budget_mb
            .saturating_sub(s.ram.used_mb.saturating_sub(freed)))
        .min(s.ram.available_mb + freed)
    };
    for w in idle {
        if free_with(freed) >= need {
            break;
        }
        freed += w.memory_mb;
        evict.push(Target::of(hive, w));
    }
    (evict, free_with(freed))
}

/// Cluster states to decide over, for this module's tests and the scheduler's.
#[cfg(test)]
pub mod fixtures {
    use super::*;
    use crate::protocol::{MemoryPool, ModelEntry, SplitCostMb};

    /// A hive of this name; on this machine, as its address says.
    pub fn conn(name: &str) -> HiveConn {
        HiveConn {
            name: name.into(),
            url: format!("http://127.0.0.1:8080/{name}"),
            token: None,
            fingerprint: None,
            found: "added".into(),
        }
    }

    pub fn model(name: &str, estimate_mb: u64) -> HiveModel {
        HiveModel {
            entry: ModelEntry {
                name: name.into(),
                model_ref: format!("hf:org/{name}"),
                path: format!("/models/{name}.gguf"),
                size: 1,
                sha256: String::new(),
                architecture: "llama".into(),
                parameters: 1,
                quantization: "Q4_1".into(),
                context_length: 2048,
                layers: 30,
                owned: true,
                added_at: String::new(),
                hashing: None,
                settings: Default::default(),
            },
            memory_estimate_mb: estimate_mb,
            split: None,
        }
    }

    /// A model of 30 layers of 20 MB each that can be split: 150 MB stay
    /// with the worker, 30 MB per lender, 40 more for the output layer.
    pub fn splittable(name: &str) -> HiveModel {
        let cost = SplitCostMb {
            layers: 30,
            layer_mb: 20.0,
            host_mb: 150,
            output_mb: 40,
            device_mb: 30,
        };
        HiveModel {
            split: Some(cost),
            ..model(name, cost.host_need(30) + cost.output_mb)
        }
    }

    pub fn worker(id: &str, model: &str, memory_mb: u64) -> WorkerInfo {
        WorkerInfo::ready(id, model, memory_mb)
    }

    pub fn pool(name: &str, budget_mb: u64, used_mb: u64) -> MemoryPool {
        MemoryPool {
            name: name.into(),
            total_mb: 64_000,
            available_mb: 64_000,
            budget_mb,
            used_mb,
        }
    }

    /// A reachable hive with `budget_mb` of RAM for workers, these catalog
    /// models and workers (their memory counted as used).
    pub fn hive(
        name: &str,
        budget_mb: u64,
        models: Vec<HiveModel>,
        workers: Vec<WorkerInfo>,
    ) -> HiveView {
        let used = workers.iter().map(|w| w.memory_mb).sum();
        HiveView {
            conn: conn(name),
            snapshot: Some(std::sync::Arc::new(HiveSnapshot {
                version: env!("CARGO_PKG_VERSION").into(),
                backends: vec!["cpu".into(), "rpc".into()],
                hostname: crate::machine::hostname(),
                cores: 2,
                ram: pool("ram", budget_mb, used),
                gpus: vec![],
                models,
                workers,
                leases: vec![],
            })),
            reachable: true,
            error: None,
            last_seen: Default::default(),
        }
    }

    /// The model the placement tests place.
    pub const M: &str = "smollm";

    pub fn state(hives: Vec<HiveView>) -> ClusterState {
        ClusterState::of(hives.into_iter().map(std::sync::Arc::new).collect())
    }

    /// Where a new worker of [`M`] taking `need` MiB goes, any hive allowed.
    pub fn placed(state: &ClusterState, need: u64) -> Result<Placement, ApiError> {
        place(state, M, need, &Allowed::Any)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn a_model_goes_to_a_hive_whose_budget_fits_it() {
        let s = state(vec![
            hive("small", 300, vec![], vec![]),
            hive("big", 2000, vec![], vec![]),
        ]);
        let p = placed(&s, 800).unwrap();
        assert_eq!(p.hive.name, "big");
        assert!(p.evict.is_empty());
    }

    #[test]
    fn a_gpu_with_room_comes_before_any_cpu() {
        let mut gpu = hive("gpu", 1000, vec![], vec![]);
        std::sync::Arc::make_mut(gpu.snapshot.as_mut().unwrap()).gpus = vec![pool("RTX", 4000, 0)];
        let s = state(vec![
            hive("roomy", 60_000, vec![model(M, 800)], vec![]),
            gpu,
        ]);
        let p = placed(&s, 800).unwrap();
        assert_eq!((p.hive.name.as_str(), p.gpu), ("gpu", Some(0)));
    }

    #[test]
    fn among_those_that_fit_the_hive_with_the_file_wins_then_the_most_free() {
        let s = state(vec![
            hive("roomy", 9000, vec![], vec![]),
            hive("has-it", 2000, vec![model(M, 800)], vec![]),
            hive("tight", 900, vec![model(M, 800)], vec![]),
        ]);
        assert_eq!(placed(&s, 800).unwrap().hive.name, "has-it");
        let s = state(vec![
            hive("a", 2000, vec![], vec![]),
            hive("b", 3000, vec![], vec![]),
        ]);
        assert_eq!(placed(&s, 800).unwrap().hive.name, "b");
    }

    #[test]
    fn idle_workers_are_stopped_least_recently_used_first_to_make_room() {
        let mut s = state(vec![hive(
            "a",
            1500,
            vec![model(M, 800)],
            vec![
                worker("old", "m1", 500),
                worker("new", "m2", 500),
                worker("busy", "m3", 500),
            ],
        )]);
        let now = Instant::now();
        std::sync::Arc::make_mut(&mut s.last_used).insert(
            "http://old".into(),
            now - std::time::Duration::from_secs(60),
        );
        std::sync::Arc::make_mut(&mut s.last_used).insert("http://new".into(), now);
        std::sync::Arc::make_mut(&mut s.in_flight).insert("http://busy".into(), 1);
        let p = placed(&s, 800).unwrap();
        let stopped: Vec<&str> = p.evict.iter().map(|t| t.worker_id.as_str()).collect();
        // 0 MB free; the oldest idle one frees 500, not enough; the next makes 1000.
        assert_eq!(stopped, ["old", "new"]);
        assert_eq!(placed(&s, 400).unwrap().evict.len(), 1);
    }

    #[test]
    fn a_hive_that_fits_as_it_is_beats_one_that_must_stop_workers() {
        let s = state(vec![
            hive(
                "full",
                1000,
                vec![model(M, 800)],
                vec![worker("w", "m1", 1000)],
            ),
            hive("free", 900, vec![], vec![]),
        ]);
        let p = placed(&s, 800).unwrap();
        assert_eq!(p.hive.name, "free");
        assert!(p.evict.is_empty());
    }

    #[test]
    fn when_nothing_fits_the_error_names_the_need_and_the_largest_free_budget() {
        let mut s = state(vec![
            hive("a", 1000, vec![], vec![worker("w1", "m1", 400)]),
            hive("mac", 3200, vec![], vec![]),
        ]);
        std::sync::Arc::make_mut(&mut s.in_flight).insert("http://w1".into(), 1);
        let e = placed(&s, 5120).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientMemory);
        assert_eq!(
            e.message,
            "smollm needs 5120 MB; the most any hive can free is hive mac with 3200 MB"
        );
    }

    #[test]
    fn unreachable_hives_take_nothing() {
        let mut down = hive("down", 9000, vec![], vec![]);
        down.reachable = false;
        let s = state(vec![down, hive("up", 1000, vec![], vec![])]);
        assert_eq!(placed(&s, 800).unwrap().hive.name, "up");
    }

    fn two_workers(busy: (u32, u32)) -> ClusterState {
        let mut s = state(vec![hive(
            "a",
            9000,
            vec![model(M, 800)],
            vec![worker("w1", M, 800), worker("w2", M, 800)],
        )]);
        std::sync::Arc::make_mut(&mut s.in_flight).insert("http://w1".into(), busy.0);
        std::sync::Arc::make_mut(&mut s.in_flight).insert("http://w2".into(), busy.1);
        s
    }

    fn routed(s: &ClusterState, preferred: Option<&str>) -> Route {
        route(s, M, &Allowed::Any, preferred, &[])
    }

    fn to(id: &str) -> Route {
        Route::To(Target {
            hive: conn("a"),
            url: format!("http://{id}"),
            worker_id: id.into(),
        })
    }

    #[test]
    fn a_conversation_goes_back_to_the_worker_holding_its_prefix() {
        let s = two_workers((0, 2));
        assert_eq!(routed(&s, Some("http://w2")), to("w2"));
        assert_eq!(routed(&s, None), to("w1"));
    }

    #[test]
    fn a_saturated_prefix_holder_loses_to_the_least_outstanding() {
        let s = two_workers((1, 4));
        assert_eq!(routed(&s, Some("http://w2")), to("w1"));
    }

    #[test]
    fn with_every_slot_busy_a_new_worker_only_if_it_gets_its_own_compute() {
        // One hive, its CPU already used by this model: queue on the least outstanding.
        let s = two_workers((5, 4));
        assert_eq!(routed(&s, None), to("w2"));
        // Another hive with room and no worker of this model: a new worker there.
        let s = two_workers((5, 4));
        let b = hive("b", 9000, vec![model(M, 800)], vec![]);
        let hives = s.hives.iter().cloned().chain([std::sync::Arc::new(b)]);
        let s = ClusterState {
            hives: std::sync::Arc::new(super::super::index::Hives::new(hives.collect())),
            ..s
        };
        assert_eq!(routed(&s, None), Route::Provision);
    }

    #[test]
    fn no_ready_worker_means_provisioning() {
        let s = state(vec![hive("a", 9000, vec![model(M, 800)], vec![])]);
        assert_eq!(routed(&s, None), Route::Provision);
    }
}
