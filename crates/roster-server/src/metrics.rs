//! Prometheus metrics of a node. Counters and the latency histogram are
//! updated where things happen; gauges of sizes are read at scrape time.

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
}

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
        Self {
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
