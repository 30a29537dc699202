//! Prometheus metrics (DESIGN.md §13), through the Prometheus project's own
//! client: each role's series, registered once at startup, and the text
//! exposition `GET /metrics` serves. The worker's series have llama-server's
//! names where llama-server has them (`llamacpp:…`), so dashboards made for
//! llama.cpp work unchanged; rbee's own are `rbee_…`. Counters get their
//! `_total` suffix from the library. Gauges that describe state (memory,
//! workers, hives) are set from that state when scraped, never kept apart.

use crate::http::{self, Body};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// OpenMetrics text, which Prometheus reads (and asks for first).
const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry as the body of `GET /metrics`.
fn exposition(registry: &Registry) -> Response<Body> {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!("cannot encode the metrics: {e}");
    }
    let mut resp = Response::new(http::full(text));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT));
    resp
}

/// Seconds, from 5 ms to about 20 s: times to first token and decodes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// A worker's series: llama-server's, then rbee's. Clones share them.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    prompt_tokens: Counter,
    prompt_seconds: FloatCounter,
    tokens_predicted: Counter,
    tokens_predicted_seconds: FloatCounter,
    n_decode: Counter,
    /// The running sum behind the per-decode average (not exposed).
    busy_slots: Arc<AtomicU64>,
    busy_slots_per_decode: FloatGauge,
    requests_processing: Gauge,
    requests_deferred: Gauge,
    kv_cache_usage_ratio: FloatGauge,
    kv_cache_tokens: Gauge,
    cached_tokens: Counter,
    time_to_first_token: Histogram,
    /// 1 for the attention kernel serving, by name.
    attention_kernel: Family<Vec<(String, String)>, Gauge>,
    registry: Arc<Registry>,
}

impl Default for WorkerMetrics {
    fn default() -> WorkerMetrics {
        let mut r = Registry::default();
        let m = WorkerMetrics {
            prompt_tokens: Counter::default(),
            prompt_seconds: FloatCounter::default(),
            tokens_predicted: Counter::default(),
            tokens_predicted_seconds: FloatCounter::default(),
            n_decode: Counter::default(),
            busy_slots: Arc::default(),
            busy_slots_per_decode: FloatGauge::default(),
            requests_processing: Gauge::default(),
            requests_deferred: Gauge::default(),
            kv_cache_usage_ratio: FloatGauge::default(),
            kv_cache_tokens: Gauge::default(),
            cached_tokens: Counter::default(),
            time_to_first_token: seconds_histogram(),
            attention_kernel: Family::default(),
            registry: Arc::default(),
        };
        m.register(&mut r);
        WorkerMetrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

impl WorkerMetrics {
    /// Which attention kernel serves (`RBEE_ATTN_KERNEL`, and its self-test:
    /// `passed`, `failed` or `not run`).
    pub fn attention_kernel(&self, name: &str, self_test: &str) {
        self.attention_kernel
            .get_or_create(&vec![
                ("kernel".to_string(), name.to_string()),
                ("self_test".to_string(), self_test.to_string()),
            ])
            .set(1);
    }

    /// Each series under its name (llama-server's where it has one).
    fn register(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "llamacpp:prompt_tokens",
            "Number of prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "llamacpp:prompt_seconds",
            "Prompt process time",
            m.prompt_seconds.clone(),
        );
        r.register(
            "llamacpp:tokens_predicted",
            "Number of generation tokens processed",
            m.tokens_predicted.clone(),
        );
        r.register(
            "llamacpp:tokens_predicted_seconds",
            "Predict process time",
            m.tokens_predicted_seconds.clone(),
        );
        r.register(
            "llamacpp:n_decode",
            "Total number of llama_decode() calls",
            m.n_decode.clone(),
        );
        r.register(
            "llamacpp:n_busy_slots_per_decode",
            "Average number of busy slots per llama_decode() call",
            m.busy_slots_per_decode.clone(),
        );
        r.register(
            "llamacpp:requests_processing",
            "Number of requests processing",
            m.requests_processing.clone(),
        );
        r.register(
            "llamacpp:requests_deferred",
            "Number of requests deferred",
            m.requests_deferred.clone(),
        );
        r.register(
            "llamacpp:kv_cache_usage_ratio",
            "KV-cache usage. 1 means 100 percent usage",
            m.kv_cache_usage_ratio.clone(),
        );
        r.register(
            "llamacpp:kv_cache_tokens",
            "KV-cache tokens",
            m.kv_cache_tokens.clone(),
        );
        r.register(
            "rbee_worker_cached_tokens",
            "Prompt tokens taken from the prompt cache instead of decoded",
            m.cached_tokens.clone(),
        );
        r.register(
            "rbee_worker_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "rbee_worker_attention_kernel",
            "The attention kernel serving (1): fa-small, rbee's, or upstream, llama.cpp's; and what rbee's self-test at start found",
            m.attention_kernel.clone(),
        );
    }
}

impl WorkerMetrics {
    /// One `llama_decode` with `busy` slots in it.
    pub fn decoded(&self, busy: usize) {
        let n = self.n_decode.inc() + 1;
        let sum = self
            .busy_slots
            .fetch_add(busy as u64, std::sync::atomic::Ordering::Relaxed)
            + busy as u64;
        self.busy_slots_per_decode.set(sum as f64 / n as f64);
    }

    /// A request's first token: `decoded` prompt tokens read in `reading`,
    /// `cached` ones taken from the cache, `waited` since it arrived.
    pub fn first_token(&self, decoded: u64, cached: u64, reading: Duration, waited: Duration) {
        self.prompt_tokens.inc_by(decoded);
        self.prompt_seconds.inc_by(reading.as_secs_f64());
        self.cached_tokens.inc_by(cached);
        self.time_to_first_token.observe(waited.as_secs_f64());
    }

    /// A generated token.
    pub fn predicted(&self) {
        self.tokens_predicted.inc();
    }

    /// A request done generating, after `decoding` from its first token.
    pub fn generated(&self, decoding: Duration) {
        self.tokens_predicted_seconds.inc_by(decoding.as_secs_f64());
    }

    /// The engine's load now: requests in slots and waiting, KV cells held.
    pub fn load(&self, processing: usize, deferred: usize, kv_tokens: u64, kv_cells: u64) {
        self.requests_processing.set(processing as i64);
        self.requests_deferred.set(deferred as i64);
        self.kv_cache_tokens.set(kv_tokens as i64);
        self.kv_cache_usage_ratio
            .set(kv_tokens as f64 / kv_cells.max(1) as f64);
    }

    pub fn respond(&self) -> Response<Body> {
        exposition(&self.registry)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabel {
    fault: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

fn state(s: &str) -> StateLabel {
    StateLabel { state: s.into() }
}

/// A hive's series: its memory and workers (set when scraped) and its downloads.
#[derive(Clone, Debug)]
pub struct HiveMetrics {
    memory_budget: Gauge,
    memory_used: Gauge,
    workers: Family<StateLabel, Gauge>,
    downloads: Family<OutcomeLabel, Counter>,
    download_bytes: Counter,
    lease_faults: Family<FaultLabel, Counter>,
    registry: Arc<Registry>,
}

impl Default for HiveMetrics {
    fn default() -> HiveMetrics {
        let mut r = Registry::default();
        let m = HiveMetrics {
            memory_budget: Gauge::default(),
            memory_used: Gauge::default(),
            workers: Family::default(),
            downloads: Family::default(),
            download_bytes: Counter::default(),
            lease_faults: Family::default(),
            registry: Arc::default(),
        };
        r.register(
            "rbee_hive_memory_budget_bytes",
            "Memory rbee's workers may take on this hive (--max-memory)",
            m.memory_budget.clone(),
        );
        r.register(
            "rbee_hive_memory_used_bytes",
            "Memory this hive's workers take (measured, at least their estimate)",
            m.memory_used.clone(),
        );
        r.register("rbee_hive_workers", "Workers by state", m.workers.clone());
        r.register(
            "rbee_hive_downloads",
            "Model downloads by outcome",
            m.downloads.clone(),
        );
        r.register(
            "rbee_hive_download_bytes",
            "Bytes downloaded from Hugging Face",
            m.download_bytes.clone(),
        );
        r.register(
            "rbee_hive_lease_faults",
            "What a lease's tunnels or RPC server were stopped for: a tunnel closed by its door, a message the server refused, a crash",
            m.lease_faults.clone(),
        );
        HiveMetrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

impl HiveMetrics {
    /// A download ended: `complete` or `error`.
    pub fn download_ended(&self, outcome: &str) {
        self.downloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A lease's tunnel or server was stopped for `fault`.
    pub fn lease_fault(&self, fault: &str) {
        self.lease_faults
            .get_or_create(&FaultLabel {
                fault: fault.into(),
            })
            .inc();
    }

    pub fn downloaded(&self, bytes: u64) {
        self.download_bytes.inc_by(bytes);
    }

    /// The exposition, with the state gauges set from the hive's state now:
    /// its budget and use in MiB, and how many workers are in each state.
    pub fn respond(
        &self,
        budget_mb: u64,
        used_mb: u64,
        workers: &[(String, usize)],
    ) -> Response<Body> {
        self.memory_budget.set((budget_mb << 20) as i64);
        self.memory_used.set((used_mb << 20) as i64);
        for (s, n) in workers {
            self.workers.get_or_create(&state(s)).set(*n as i64);
        }
        exposition(&self.registry)
    }
}

/// The queen's series: hives (set when scraped), jobs, times to first token
/// and decode speeds per model, failovers and evictions.
#[derive(Clone, Debug)]
pub struct QueenMetrics {
    hives: Family<StateLabel, Gauge>,
    jobs: Family<OutcomeLabel, Counter>,
    jobs_running: Gauge,
    time_to_first_token: Family<ModelLabel, Histogram, fn() -> Histogram>,
    tokens_per_second: Family<ModelLabel, Histogram, fn() -> Histogram>,
    failovers: Counter,
    poison_requests: Counter,
    evictions: Counter,
    key_requests: Family<KeyOutcomeLabel, Counter>,
    key_tokens: Family<KeyLabel, Counter>,
    registry: Arc<Registry>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyOutcomeLabel {
    key: String,
    outcome: String,
}

/// Tokens per second, from 1 to about 4,000.
fn rate_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

impl Default for QueenMetrics {
    fn default() -> QueenMetrics {
        let mut r = Registry::default();
        let m = QueenMetrics {
            hives: Family::default(),
            jobs: Family::default(),
            jobs_running: Gauge::default(),
            time_to_first_token: Family::new_with_constructor(seconds_histogram),
            tokens_per_second: Family::new_with_constructor(rate_histogram),
            failovers: Counter::default(),
            poison_requests: Counter::default(),
            evictions: Counter::default(),
            key_requests: Family::default(),
            key_tokens: Family::default(),
            registry: Arc::default(),
        };
        r.register(
            "rbee_queen_key_requests",
            "Requests made with each client key, by outcome (ok, limited, refused, error)",
            m.key_requests.clone(),
        );
        r.register(
            "rbee_queen_tokens",
            "Tokens generated for each client key's jobs",
            m.key_tokens.clone(),
        );
        r.register(
            "rbee_queen_hives",
            "Registered hives, up (reachable) or down",
            m.hives.clone(),
        );
        r.register(
            "rbee_queen_jobs",
            "Finished jobs (job API and OpenAI requests) by outcome",
            m.jobs.clone(),
        );
        r.register(
            "rbee_queen_jobs_running",
            "Jobs running now",
            m.jobs_running.clone(),
        );
        r.register(
            "rbee_queen_time_to_first_token_seconds",
            "From a job's arrival to its first token, per model",
            m.time_to_first_token.clone(),
        );
        r.register(
            "rbee_queen_tokens_per_second",
            "A job's decode speed, per model",
            m.tokens_per_second.clone(),
        );
        r.register(
            "rbee_queen_failovers",
            "Answers continued on another worker after theirs was lost",
            m.failovers.clone(),
        );
        r.register(
            "rbee_queen_poison_requests",
            "Requests whose worker crashed before their first token, not sent to another",
            m.poison_requests.clone(),
        );
        r.register(
            "rbee_queen_evictions",
            "Idle workers stopped to make room for another model",
            m.evictions.clone(),
        );
        QueenMetrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

impl QueenMetrics {
    pub fn job_started(&self) {
        self.jobs_running.inc();
    }

    /// A request made with client key `key` ended this way.
    pub fn key_request(&self, key: &str, outcome: &str) {
        self.key_requests
            .get_or_create(&KeyOutcomeLabel {
                key: key.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// `tokens` generated for client key `key`.
    pub fn key_tokens(&self, key: &str, tokens: u64) {
        self.key_tokens
            .get_or_create(&KeyLabel { key: key.into() })
            .inc_by(tokens);
    }

    /// A job ended: `ok`, `error` or `cancelled`.
    pub fn job_ended(&self, outcome: &str) {
        self.jobs_running.dec();
        self.jobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn first_token(&self, model: &str, waited: Duration) {
        self.time_to_first_token
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .observe(waited.as_secs_f64());
    }

    pub fn decoded(&self, model: &str, tokens: u32, decode_ms: u64) {
        if tokens > 0 && decode_ms > 0 {
            self.tokens_per_second
                .get_or_create(&ModelLabel {
                    model: model.into(),
                })
                .observe(f64::from(tokens) * 1000.0 / decode_ms as f64);
        }
    }

    pub fn failover(&self) {
        self.failovers.inc();
    }

    pub fn poison_request(&self) {
        self.poison_requests.inc();
    }

    pub fn evicted(&self) {
        self.evictions.inc();
    }

    /// The exposition, with the hive gauges set from the view now.
    pub fn respond(&self, up: usize, down: usize) -> Response<Body> {
        self.hives.get_or_create(&state("up")).set(up as i64);
        self.hives.get_or_create(&state("down")).set(down as i64);
        exposition(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn text(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_worker_speaks_llama_servers_names() {
        let m = WorkerMetrics::default();
        m.decoded(2);
        m.decoded(4);
        m.first_token(10, 5, Duration::from_millis(20), Duration::from_millis(30));
        m.predicted();
        m.predicted();
        m.load(1, 3, 512, 2048);
        let t = text(m.respond()).await;
        for line in [
            "llamacpp:prompt_tokens_total 10\n",
            "llamacpp:tokens_predicted_total 2\n",
            "llamacpp:n_decode_total 2\n",
            "llamacpp:n_busy_slots_per_decode 3.0\n",
            "llamacpp:requests_processing 1\n",
            "llamacpp:requests_deferred 3\n",
            "llamacpp:kv_cache_usage_ratio 0.25\n",
            "rbee_worker_cached_tokens_total 5\n",
            "rbee_worker_time_to_first_token_seconds_count 1\n",
        ] {
            assert!(t.contains(line), "{line:?} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"), "{t}");
    }

    #[tokio::test]
    async fn state_gauges_are_what_the_scrape_was_given() {
        let m = HiveMetrics::default();
        m.downloaded(1000);
        m.download_ended("complete");
        let workers = [("ready".to_string(), 2), ("loading".to_string(), 0)];
        let t = text(m.respond(2048, 512, &workers)).await;
        assert!(
            t.contains("rbee_hive_memory_budget_bytes 2147483648\n"),
            "{t}"
        );
        assert!(t.contains("rbee_hive_workers{state=\"ready\"} 2\n"), "{t}");
        assert!(
            t.contains("rbee_hive_workers{state=\"loading\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("rbee_hive_downloads_total{outcome=\"complete\"} 1\n"),
            "{t}"
        );
        let q = QueenMetrics::default();
        q.job_started();
        q.job_ended("ok");
        q.decoded("smollm", 100, 500);
        let t = text(q.respond(2, 1)).await;
        assert!(t.contains("rbee_queen_hives{state=\"down\"} 1\n"), "{t}");
        assert!(
            t.contains("rbee_queen_jobs_total{outcome=\"ok\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("rbee_queen_jobs_running 0\n"), "{t}");
        assert!(
            t.contains("rbee_queen_tokens_per_second_sum{model=\"smollm\"} 200.0\n"),
            "{t}"
        );
    }
}
