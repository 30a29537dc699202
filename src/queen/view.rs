//! The queen's live view of the cluster (DESIGN.md §10): one subscription per
//! hive to its state stream, the requests the queen itself has in flight on
//! each worker (it is the router), and which worker last served each
//! conversation prefix. Jobs are placed and routed from this view alone: no
//! hive is asked anything per job.

use super::affinity::Affinity;
use super::index::Hives;
use super::registry::HiveConn;
use crate::http::client::Silent;
use crate::protocol::{now_rfc3339, HiveSnapshot, WorkerState};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A hive silent this long (no snapshot, no keep-alive) is unreachable.
pub const SILENCE: Duration = Duration::from_secs(6);
/// Reconnection waits: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));
/// One hive as the queen last heard it.
#[derive(Debug, Clone, PartialEq)]
pub struct HiveView {
    pub conn: HiveConn,
    /// Its last snapshot; `None` before the first. Shared: a hive's view is
    /// replaced whole on every change, never copied with its snapshot.
    pub snapshot: Option<Arc<HiveSnapshot>>,
    pub reachable: bool,
    /// Why it is unreachable.
    pub error: Option<String>,
    /// When it was last heard from (RFC 3339).
    pub last_seen: LastSeen,
}

/// When a hive was last heard from: set in place by every snapshot, so that
/// one saying nothing new replaces no view (and rebuilds no index).
#[derive(Debug, Clone, Default)]
pub struct LastSeen(Arc<Mutex<Option<String>>>);

impl LastSeen {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn now(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(now_rfc3339());
    }
}

impl PartialEq for LastSeen {
    fn eq(&self, other: &LastSeen) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.get() == other.get()
    }
}

/// The cluster at one moment: what every placement and routing decision is
/// made from.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// Shared with the view: taking the cluster's state copies no hive.
    pub hives: Arc<Hives>,
    /// Requests the queen has in flight, per worker URL (shared with the
    /// view until it next changes).
    pub in_flight: Arc<HashMap<String, u32>>,
    /// When the queen last sent a request to each worker (URL) or finished one.
    pub last_used: Arc<HashMap<String, Instant>>,
}

impl ClusterState {
    pub fn of(hives: Vec<Arc<HiveView>>) -> ClusterState {
        ClusterState {
            hives: Arc::new(Hives::new(hives)),
            ..ClusterState::default()
        }
    }

    pub fn in_flight(&self, url: &str) -> u32 {
        self.in_flight.get(url).copied().unwrap_or(0)
    }
}

/// The live view; clones share it.
#[derive(Clone)]
pub struct View {
    inner: Arc<Mutex<Inner>>,
    /// Bumped on every change, for those waiting for one.
    changed: Arc<watch::Sender<u64>>,
}

#[derive(Default)]
struct Inner {
    hives: BTreeMap<String, Arc<HiveView>>,
    /// `hives` indexed, built at the first look after a change.
    indexed: Option<Arc<Hives>>,
    /// The subscription task of each tracked hive, with the address it follows.
    tasks: HashMap<String, (HiveConn, tokio::task::JoinHandle<()>)>,
    in_flight: Arc<HashMap<String, u32>>,
    last_used: Arc<HashMap<String, Instant>>,
    /// A channel per tracked hive, bumped when that hive's view changes: a
    /// relay waits on its worker's hive alone, not on every hive's news.
    hive_changed: HashMap<String, watch::Sender<u64>>,
    affinity: Affinity,
    /// The decode speed of each worker's last answer (URL → tokens/s).
    rates: HashMap<String, f64>,
    /// One provisioning per model at a time.
    provisioning: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// The number of the last request sent to each worker (URL), from `dispatches`.
    last_dispatch: HashMap<String, u64>,
    dispatches: u64,
    /// Requests (by content hash) that crashed a worker, and when.
    poisoned: HashMap<u64, Instant>,
}

/// How long a request that crashed a worker is refused.
pub const POISON_WINDOW: Duration = Duration::from_secs(600);
/// How long a relay that lost its worker waits for the hive to say how it ended.
const CRASH_REPORT_WAIT: Duration = Duration::from_secs(3);

impl Default for View {
    fn default() -> View {
        View {
            inner: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl View {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The cluster now.
    pub fn state(&self) -> ClusterState {
        let mut inner = self.lock();
        let hives = match &inner.indexed {
            Some(hives) => hives.clone(),
            None => {
                let hives = Arc::new(Hives::new(inner.hives.values().cloned().collect()));
                inner.indexed = Some(hives.clone());
                hives
            }
        };
        ClusterState {
            hives,
            in_flight: inner.in_flight.clone(),
            last_used: inner.last_used.clone(),
        }
    }

    pub fn hive(&self, name: &str) -> Option<Arc<HiveView>> {
        self.lock().hives.get(name).cloned()
    }

    /// Follows exactly these hives: new ones are subscribed to, gone ones
    /// (or ones whose address or token changed) are dropped.
    pub fn track(&self, hives: &[HiveConn]) {
        let mut inner = self.lock();
        let wanted: HashMap<&str, &HiveConn> = hives.iter().map(|h| (h.name.as_str(), h)).collect();
        let stale: Vec<String> = inner
            .tasks
            .iter()
            .filter(|(name, (conn, _))| wanted.get(name.as_str()) != Some(&conn))
            .map(|(name, _)| name.clone())
            .collect();
        let new = hives.iter().any(|h| !inner.tasks.contains_key(&h.name));
        if stale.is_empty() && !new {
            // Called every second and on every hive list: the same hives change nothing.
            return;
        }
        inner.indexed = None;
        for name in stale {
            if let Some((_, task)) = inner.tasks.remove(&name) {
                task.abort();
            }
            inner.hives.remove(&name);
            if let Some(changed) = inner.hive_changed.remove(&name) {
                changed.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        for conn in hives {
            if inner.tasks.contains_key(&conn.name) {
                continue;
            }
            inner.hives.insert(
                conn.name.clone(),
                Arc::new(HiveView {
                    conn: conn.clone(),
                    snapshot: None,
                    reachable: false,
                    error: None,
                    last_seen: LastSeen::default(),
                }),
            );
            inner
                .hive_changed
                .insert(conn.name.clone(), watch::channel(0).0);
            let task = tokio::spawn(self.clone().follow(conn.clone()));
            inner.tasks.insert(conn.name.clone(), (conn.clone(), task));
        }
        drop(inner);
        self.bump();
    }

    /// Keeps one subscription to a hive's state stream, reconnecting with
    /// backoff; the hive is unreachable between a break and the next snapshot.
    async fn follow(self, conn: HiveConn) {
        let mut wait = BACKOFF.0;
        loop {
            let opened = tokio::time::timeout(SILENCE, conn.client().state()).await;
            let why = match opened {
                Ok(Ok(mut events)) => loop {
                    match events.next_within(SILENCE).await {
                        Ok(Some(snapshot)) => {
                            wait = BACKOFF.0;
                            self.heard(&conn.name, snapshot);
                        }
                        Ok(None) => break "it closed its state stream".to_string(),
                        Err(Silent) => break format!("nothing heard for {}s", SILENCE.as_secs()),
                    }
                },
                Ok(Err(e)) => e.message,
                Err(_) => format!("no answer within {}s", SILENCE.as_secs()),
            };
            self.lost(&conn.name, why);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(BACKOFF.1);
        }
    }

    /// A snapshot came from hive `name`. One that says what the last one said
    /// (a hive re-sends it now and then) only marks the hive as heard: no
    /// waiter wakes for it.
    fn heard(&self, name: &str, snapshot: HiveSnapshot) {
        let mut inner = self.lock();
        let Some(hive) = inner.hives.get_mut(name) else {
            return;
        };
        hive.last_seen.now();
        if hive.reachable && hive.snapshot.as_deref() == Some(&snapshot) {
            return;
        }
        if !hive.reachable {
            tracing::info!("hive {name} is reachable");
        }
        *hive = Arc::new(HiveView {
            conn: hive.conn.clone(),
            snapshot: Some(Arc::new(snapshot)),
            reachable: true,
            error: None,
            last_seen: hive.last_seen.clone(),
        });
        Self::changed(&mut inner, name);
        drop(inner);
        self.bump();
    }

    fn lost(&self, name: &str, why: String) {
        let mut inner = self.lock();
        let Some(hive) = inner.hives.get_mut(name) else {
            return;
        };
        if !hive.reachable && hive.error.as_deref() == Some(why.as_str()) {
            // A reconnection failed as the last did: nothing to tell anyone.
            return;
        }
        if hive.reachable {
            tracing::warn!("hive {name} is unreachable: {why}");
            hive.last_seen.now();
        }
        *hive = Arc::new(HiveView {
            conn: hive.conn.clone(),
            snapshot: hive.snapshot.clone(),
            reachable: false,
            error: Some(why),
            last_seen: hive.last_seen.clone(),
        });
        Self::changed(&mut inner, name);
        drop(inner);
        self.bump();
    }

    /// Wakes those waiting on hive `name` alone; the index is built anew
    /// at the next look.
    fn changed(inner: &mut Inner, name: &str) {
        inner.indexed = None;
        if let Some(changed) = inner.hive_changed.get(name) {
            changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Waits (at most `limit`) until `ok` holds of the cluster; whether it did.
    pub async fn wait_until(&self, limit: Duration, ok: impl Fn(&ClusterState) -> bool) -> bool {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if ok(&self.state()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return ok(&self.state()),
            }
        }
    }

    /// Resolves once the worker at `url` on hive `hive` cannot answer any
    /// more: its hive is unreachable (silent for [`SILENCE`]), or its
    /// snapshot no longer lists the worker as alive. A relay on a connection
    /// that went quiet (a cut network sends no reset) learns it from this.
    /// Every relay waits on it, so it looks at that one hive, cloning nothing.
    pub async fn worker_lost(&self, hive: &str, url: &str) {
        // Its hive's own news; a split worker's lenders are any hive's.
        let split = self
            .hive(hive)
            .is_some_and(|h| !lenders(&h, url).is_empty());
        let mut changed = match self.lock().hive_changed.get(hive) {
            Some(own) if !split => own.subscribe(),
            _ => self.changed.subscribe(),
        };
        loop {
            let lost = {
                let inner = self.lock();
                match inner.hives.get(hive) {
                    None => true,
                    Some(h) if !h.reachable || !lists_alive(h, url) => true,
                    // A split worker is lost with any hive that holds its layers.
                    Some(h) => lenders(h, url)
                        .iter()
                        .any(|name| inner.hives.get(name).is_none_or(|l| !l.reachable)),
                }
            };
            if lost {
                return;
            }
            // The sender lives in `self`: this fails only if the view is gone.
            if changed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Held while a worker of `model` is provisioned: later requests for it
    /// wait, then use that worker's slots and queue.
    pub async fn provisioning(&self, model: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .lock()
            .provisioning
            .entry(model.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Sets a hive's view directly, without a subscription (fake clusters in tests).
    #[cfg(test)]
    pub fn put(&self, hive: HiveView) {
        let mut inner = self.lock();
        let name = hive.conn.name.clone();
        inner.hives.insert(name.clone(), Arc::new(hive));
        inner
            .hive_changed
            .entry(name.clone())
            .or_insert_with(|| watch::channel(0).0);
        Self::changed(&mut inner, &name);
        drop(inner);
        self.bump();
    }

    /// Changes a hive's snapshot in place (fake clusters in tests).
    #[cfg(test)]
    pub fn edit(&self, name: &str, f: impl FnOnce(&mut HiveSnapshot)) {
        let mut inner = self.lock();
        if let Some(s) = inner
            .hives
            .get_mut(name)
            .and_then(|h| Arc::make_mut(h).snapshot.as_mut())
        {
            f(Arc::make_mut(s));
        }
        Self::changed(&mut inner, name);
        drop(inner);
        self.bump();
    }

    /// Counts a request in flight on the worker at `url` until the guard drops.
    pub fn begin(&self, url: &str) -> InFlight {
        let mut inner = self.lock();
        *Arc::make_mut(&mut inner.in_flight)
            .entry(url.to_string())
            .or_default() += 1;
        Arc::make_mut(&mut inner.last_used).insert(url.to_string(), Instant::now());
        inner.dispatches += 1;
        let number = inner.dispatches;
        inner.last_dispatch.insert(url.to_string(), number);
        InFlight {
            view: self.clone(),
            url: url.to_string(),
            number,
        }
    }

    /// Whether the worker at `url` ended on a fault (its hive's snapshot
    /// lists it failed with `crashed`): waits a moment for the hive to say,
    /// and takes silence, an unreachable hive or a plain exit as no.
    pub async fn crashed(&self, hive: &str, url: &str) -> bool {
        // Some(crashed) once the hive has said how the worker ended, or cannot.
        let said = |s: &ClusterState| {
            let Some(h) = s.hives.named(hive).filter(|h| h.reachable) else {
                return Some(false);
            };
            let listed = h
                .snapshot
                .as_ref()
                .and_then(|s| s.workers.iter().find(|w| w.url == url));
            match listed {
                None => Some(false),
                Some(w) if w.state == WorkerState::Failed => Some(w.crashed),
                Some(_) => None,
            }
        };
        self.wait_until(CRASH_REPORT_WAIT, |s| said(s).is_some())
            .await;
        said(&self.state()).unwrap_or(false)
    }

    /// Remembers that the request with this content hash crashed a worker.
    pub fn poison(&self, request: u64) {
        let mut inner = self.lock();
        inner.poisoned.retain(|_, at| at.elapsed() < POISON_WINDOW);
        inner.poisoned.insert(request, Instant::now());
    }

    /// How long ago the request with this hash crashed a worker, within the window.
    pub fn poisoned(&self, request: u64) -> Option<Duration> {
        let inner = self.lock();
        let at = inner.poisoned.get(&request)?;
        Some(at.elapsed()).filter(|&ago| ago < POISON_WINDOW)
    }

    /// Remembers how fast the worker at `url` decoded its last answer.
    pub fn record_rate(&self, url: &str, tokens_per_second: f64) {
        self.lock().rates.insert(url.to_string(), tokens_per_second);
    }

    pub fn rate(&self, url: &str) -> Option<f64> {
        self.lock().rates.get(url).copied()
    }

    /// The worker that last served the longest of these prefixes (from [`super::affinity::prefix_hashes`]).
    pub fn affinity(&self, prefix: &[u64]) -> Option<String> {
        self.lock().affinity.lookup(prefix)
    }

    /// Remembers that the worker at `url` now holds these prefixes.
    pub fn remember(&self, prefix: &[u64], url: &str) {
        self.lock().affinity.insert(prefix, url);
    }
}

/// The hives lending devices to the worker at `url`, when it is split.
fn lenders(hive: &HiveView, url: &str) -> Vec<String> {
    let Some(s) = &hive.snapshot else {
        return Vec::new();
    };
    s.workers
        .iter()
        .filter(|w| w.url == url)
        .flat_map(|w| w.split.iter().filter(|p| !p.hive.is_empty()))
        .map(|p| p.hive.clone())
        .collect()
}

/// Whether a hive's last snapshot lists the worker at `url` as not failed.
fn lists_alive(hive: &HiveView, url: &str) -> bool {
    hive.snapshot.as_ref().is_some_and(|s| {
        s.workers
            .iter()
            .any(|w| w.url == url && w.state != WorkerState::Failed)
    })
}

/// A request in flight, counted until dropped.
pub struct InFlight {
    view: View,
    url: String,
    /// Its place in the order requests were sent to workers.
    number: u64,
}

impl InFlight {
    /// Whether no request has been sent to its worker since this one.
    pub fn newest(&self) -> bool {
        self.view.lock().last_dispatch.get(&self.url) == Some(&self.number)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.view.lock();
        if let Some(n) = Arc::make_mut(&mut inner.in_flight).get_mut(&self.url) {
            *n = n.saturating_sub(1);
        }
        Arc::make_mut(&mut inner.last_used).insert(self.url.clone(), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_that_says_nothing_new_wakes_nobody_and_news_wakes_only_its_hives_waiters() {
        use crate::queen::placement::fixtures::{hive, model};
        let view = View::default();
        let (a, b) = (
            hive("a", 4000, vec![model("m", 500)], vec![]),
            hive("b", 4000, vec![], vec![]),
        );
        let (snapshot, conn_a) = ((*a.snapshot.clone().unwrap()).clone(), a.conn.clone());
        view.put(a);
        view.put(b);
        let mut any = view.changed.subscribe();
        let of_b = view.lock().hive_changed["b"].subscribe();
        let of_a = view.lock().hive_changed["a"].subscribe();
        any.mark_unchanged();
        let before = view.state();
        view.heard("a", snapshot.clone());
        assert!(
            !any.has_changed().unwrap(),
            "the same snapshot again is no news"
        );
        let state = view.state();
        assert!(
            Arc::ptr_eq(&before.hives, &state.hives),
            "nor does it rebuild the index"
        );
        assert!(state.hives.named("a").unwrap().last_seen.get().is_some());
        let mut moved = snapshot;
        moved.ram.available_mb -= 1000;
        view.heard("a", moved);
        assert!(any.has_changed().unwrap() && of_a.has_changed().unwrap());
        assert!(
            !of_b.has_changed().unwrap(),
            "b's waiters sleep on a's news"
        );
        // A state taken before keeps what it saw; the view has the news.
        assert_eq!(
            state.hives[0].snapshot.as_ref().unwrap().ram.available_mb,
            64_000
        );
        assert_eq!(
            view.hive("a")
                .unwrap()
                .snapshot
                .as_ref()
                .unwrap()
                .ram
                .available_mb,
            63_000
        );
        assert_eq!(view.hive("a").unwrap().conn, conn_a);
    }

    #[test]
    fn a_hive_that_fails_again_as_it_did_changes_nothing() {
        use crate::queen::placement::fixtures::hive;
        let view = View::default();
        view.put(hive("a", 4000, vec![], vec![]));
        view.lost("a", "refused".into());
        let before = view.state();
        let mut any = view.changed.subscribe();
        any.mark_unchanged();
        view.lost("a", "refused".into());
        assert!(!any.has_changed().unwrap(), "the same failure is no news");
        assert!(Arc::ptr_eq(&before.hives, &view.state().hives));
        view.lost("a", "timed out".into());
        assert!(any.has_changed().unwrap());
        let error = view.hive("a").and_then(|h| h.error.clone());
        assert_eq!(error.as_deref(), Some("timed out"));
    }

    #[tokio::test]
    async fn a_worker_is_lost_when_its_hive_goes_silent_or_stops_listing_it() {
        use crate::queen::placement::fixtures::{hive, model, worker};
        let view = View::default();
        let w1 = worker("w1", "m", 100);
        let w2 = worker("w2", "m", 100);
        view.put(hive(
            "a",
            4000,
            vec![model("m", 100)],
            vec![w1.clone(), w2.clone()],
        ));
        let quiet = tokio::time::timeout(Duration::from_millis(20), view.worker_lost("a", &w1.url));
        assert!(
            quiet.await.is_err(),
            "a listed worker on a reachable hive is not lost"
        );
        let lost = tokio::spawn({
            let view = view.clone();
            let url = w1.url.clone();
            async move { view.worker_lost("a", &url).await }
        });
        view.edit("a", |s| s.workers.retain(|w| w.worker_id != "w1"));
        lost.await
            .expect("w1 is lost once its hive no longer lists it");
        let lost = tokio::spawn({
            let view = view.clone();
            let url = w2.url.clone();
            async move { view.worker_lost("a", &url).await }
        });
        view.lost("a", "nothing heard for 6s".into());
        lost.await.expect("w2 is lost with its hive");
    }

    #[tokio::test]
    async fn a_split_worker_is_lost_with_a_hive_lending_it_devices() {
        use crate::protocol::SplitPart;
        use crate::queen::placement::fixtures::{hive, model, worker};
        let view = View::default();
        let mut w = worker("w", "m", 100);
        w.split = vec![
            SplitPart {
                hive: String::new(),
                layers: 16,
            },
            SplitPart {
                hive: "mac".into(),
                layers: 14,
            },
        ];
        view.put(hive("desk", 4000, vec![model("m", 100)], vec![w.clone()]));
        view.put(hive("mac", 4000, vec![], vec![]));
        let lost = tokio::spawn({
            let view = view.clone();
            let url = w.url.clone();
            async move { view.worker_lost("desk", &url).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!lost.is_finished(), "both hives answer: not lost");
        view.lost("mac", "nothing heard for 6s".into());
        lost.await.expect("lost with its lender");
    }

    #[tokio::test]
    async fn requests_in_flight_are_counted_until_they_end() {
        let view = View::default();
        let a = view.begin("http://w1");
        let b = view.begin("http://w1");
        assert_eq!(view.state().in_flight("http://w1"), 2);
        drop(a);
        drop(b);
        let state = view.state();
        assert_eq!(state.in_flight("http://w1"), 0);
        assert!(state.last_used.contains_key("http://w1"));
    }
}
