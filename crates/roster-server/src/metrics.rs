//! Prometheus metrics of a node. Counters and the latency histogram are
//! updated where things happen; gauges of sizes are read at scrape time.
//! A limit hit is also logged: the first time, then at most once a minute
//! per limit, with how many were refused meanwhile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::family::Family;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    /// Open sessions (stream and lease).
    pub sessions: Gauge,
    /// Native session streams open (each carries one or more sessions and
    /// is written by one task).
    pub session_streams: Gauge,
    /// Services known (including empty ones).
    pub services: Gauge,
    /// Instances over all services.
    pub instances: Gauge,
    /// Updates handed to subscribers' transports.
    pub pushes_sent: Counter,
    /// Times a session queue overflowed and collapsed into a full view.
    pub push_queue_overflows: Counter,
    /// Pull requests answered (the consumers' safety net; a steady climb
    /// with no changes means a client polls in a loop).
    pub pulls: Counter,
    /// Seconds from a change to its update leaving for a subscriber.
    pub push_latency: Histogram,
    /// Requests refused (or connections closed) at a limit, by limit.
    limit_hits: Family<Vec<(String, String)>, Counter>,
    /// When each limit was last logged, and the hits since.
    limit_log: Mutex<HashMap<&'static str, (Instant, u64)>>,
    /// Open connections, by port (`http`, `grpc`).
    pub connections: Family<Vec<(String, String)>, Gauge>,
    /// File descriptors the process has open (read at scrape time).
    pub open_fds: Gauge,
    /// The process' descriptor limit (read at scrape time).
    pub max_fds: Gauge,
    /// Subscribers closed because their pushes stayed queued or
    /// unacknowledged.
    pub stuck_ejections: Counter,
}

/// How often one limit is logged at most.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(60);

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("roster");
        let sessions = Gauge::default();
        let session_streams = Gauge::default();
        let services = Gauge::default();
        let instances = Gauge::default();
        let pushes_sent = Counter::default();
        let push_queue_overflows = Counter::default();
        let pulls = Counter::default();
        // 50 us .. ~26 s
        let push_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        registry.register("sessions", "Open sessions", sessions.clone());
        registry.register(
            "session_streams",
            "Native session streams open (one writer each, however many sessions they carry)",
            session_streams.clone(),
        );
        registry.register("services", "Services known", services.clone());
        registry.register("instances", "Instances registered", instances.clone());
        registry.register(
            "pushes_sent",
            "Updates handed to subscribers",
            pushes_sent.clone(),
        );
        registry.register(
            "push_queue_overflows",
            "Session queue overflows (deltas collapsed into a full view)",
            push_queue_overflows.clone(),
        );
        registry.register("pulls", "Pull requests answered", pulls.clone());
        registry.register(
            "push_latency_seconds",
            "Time from a change to its update leaving for a subscriber",
            push_latency.clone(),
        );
        let limit_hits = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "limit_hits",
            "Requests refused or connections closed at a configured limit, by limit",
            limit_hits.clone(),
        );
        let connections = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "connections",
            "Open connections, by port",
            connections.clone(),
        );
        let open_fds = Gauge::default();
        registry.register(
            "open_fds",
            "File descriptors open in the process",
            open_fds.clone(),
        );
        let max_fds = Gauge::default();
        registry.register(
            "max_fds",
            "The process' file descriptor limit",
            max_fds.clone(),
        );
        let stuck_ejections = Counter::default();
        registry.register(
            "stuck_ejections",
            "Subscribers closed because their pushes stayed queued or unacknowledged",
            stuck_ejections.clone(),
        );
        Self {
            limit_hits,
            limit_log: Mutex::new(HashMap::new()),
            connections,
            open_fds,
            max_fds,
            stuck_ejections,
            registry,
            sessions,
            session_streams,
            services,
            instances,
            pushes_sent,
            push_queue_overflows,
            pulls,
            push_latency,
        }
    }

    /// Counts a hit of `limit` (its key under `[limits]`) and logs it if
    /// it was not logged within the last minute; `detail` says who or what.
    pub fn limit_hit(&self, limit: &'static str, detail: &dyn std::fmt::Display) {
        self.limit_hits
            .get_or_create(&vec![("limit".to_owned(), limit.to_owned())])
            .inc();
        let now = Instant::now();
        let mut log = self.limit_log.lock();
        match log.get_mut(limit) {
            Some((at, since)) if now.duration_since(*at) < LIMIT_LOG_EVERY => *since += 1,
            Some((at, since)) => {
                let more = std::mem::take(since);
                *at = now;
                drop(log);
                tracing::warn!(limit = %format!("limits.{limit}"), refused_since_last_log = more, "limit reached: {detail}");
            }
            None => {
                log.insert(limit, (now, 0));
                drop(log);
                tracing::warn!(limit = %format!("limits.{limit}"), "limit reached (first time): {detail}");
            }
        }
    }

    /// The open connections gauge of `port` (`http` or `grpc`).
    pub fn connections_on(&self, port: &str) -> Gauge {
        self.connections
            .get_or_create(&vec![("port".to_owned(), port.to_owned())])
            .clone()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
