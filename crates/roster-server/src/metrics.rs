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
    /// Replication (a node with peers): see [`Replication`].
    pub replication: Replication,
}

/// Replication metrics. Counters of the replicator's own are brought up to
/// date at scrape time ([`Replication::observe`]).
pub struct Replication {
    /// Seconds from a local change to a peer acknowledging it.
    pub lag: Histogram,
    /// Cluster messages, by kind and direction.
    messages: Family<Vec<(String, String)>, Counter>,
    /// Cluster message bytes (protobuf), by direction.
    bytes: Family<Vec<(String, String)>, Counter>,
    /// Messages dropped because a peer's outbox was full.
    pub dropped: Counter,
    /// Messages no address of their peer took.
    pub send_failures: Counter,
    /// Messages a peer refused (unreadable, too large, wrong secret, not a
    /// member there).
    pub refused: Counter,
    /// Session states received that could not be read (left out of their
    /// message; the rest of it was applied).
    pub invalid: Counter,
    rejected: Counter,
    too_large: Counter,
    batches: Counter,
    sessions_sent: Counter,
    deltas_sent: Counter,
    deltas_wanted: Counter,
    instances_sent: Counter,
    sessions_applied: Counter,
    batches_failed: Counter,
    verify_misses: Counter,
    unverified_dropped: Counter,
    snapshot_loads: Counter,
    snapshot_sessions: Counter,
    /// Live sessions held, by origin node.
    sessions_by_origin: Family<Vec<(String, String)>, Gauge>,
    /// Instances held, by origin node.
    instances_by_origin: Family<Vec<(String, String)>, Gauge>,
    /// Members, by state (`up`, `suspect`, `down`).
    members: Family<Vec<(String, String)>, Gauge>,
}

fn label(k: &str, v: &str) -> Vec<(String, String)> {
    vec![(k.to_owned(), v.to_owned())]
}

impl Replication {
    fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("replication");
        // 100 us .. ~4 s in steps of 25 % (a p99 read off the buckets is
        // within a quarter of the truth).
        let lag = Histogram::new(exponential_buckets(0.000_1, 1.25, 48));
        r.register(
            "lag_seconds",
            "Time from a local change to a peer acknowledging it",
            lag.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let dropped = counter(
            "dropped",
            "Messages dropped because a peer's outbox was full",
        );
        let send_failures = counter("send_failures", "Messages no address of their peer took");
        let refused = counter(
            "refused",
            "Messages a peer refused (unreadable, too large, wrong secret, not a member)",
        );
        let invalid = counter(
            "invalid",
            "Session states received that could not be read (the rest of their message applied)",
        );
        let rejected = counter(
            "rejected",
            "Session states received that the registry refused (invalid instances)",
        );
        let too_large = counter(
            "too_large",
            "Session states not replicated because they are larger than cluster.message_bytes",
        );
        let batches = counter("batches", "Sync batches sent");
        let sessions_sent = counter("sessions_sent", "Session states sent in sync batches");
        let deltas_sent = counter(
            "deltas_sent",
            "Session states sent as deltas from the version the peer acknowledged",
        );
        let deltas_wanted = counter(
            "deltas_wanted",
            "Deltas received that could not be applied (asked for the session whole)",
        );
        let instances_sent = counter("instances_sent", "Instances sent in sync batches");
        let sessions_applied = counter("sessions_applied", "Session states received and applied");
        let batches_failed = counter(
            "batches_failed",
            "Sync batches failed or unacknowledged, queued again",
        );
        let verify_misses = counter(
            "verify_failures",
            "Sessions a peer's verify listed that this node lacked or held older (repairs)",
        );
        let unverified_dropped = counter(
            "unverified_dropped",
            "Replicas dropped because their origin stopped listing them",
        );
        let snapshot_loads = counter("snapshot_loads", "Snapshots loaded from a peer");
        let snapshot_sessions =
            counter("snapshot_sessions", "Session states loaded from snapshots");
        let messages = Family::<Vec<(String, String)>, Counter>::default();
        r.register(
            "messages",
            "Cluster messages, by kind and direction",
            messages.clone(),
        );
        let bytes = Family::<Vec<(String, String)>, Counter>::default();
        r.register(
            "bytes",
            "Cluster message bytes, by direction",
            bytes.clone(),
        );
        let sessions_by_origin = Family::<Vec<(String, String)>, Gauge>::default();
        r.register(
            "sessions_by_origin",
            "Live sessions held, by origin node",
            sessions_by_origin.clone(),
        );
        let instances_by_origin = Family::<Vec<(String, String)>, Gauge>::default();
        r.register(
            "instances_by_origin",
            "Instances held, by origin node",
            instances_by_origin.clone(),
        );
        let members = Family::<Vec<(String, String)>, Gauge>::default();
        r.register("members", "Cluster members, by state", members.clone());
        Self {
            lag,
            messages,
            bytes,
            dropped,
            send_failures,
            refused,
            invalid,
            rejected,
            too_large,
            batches,
            sessions_sent,
            deltas_sent,
            deltas_wanted,
            instances_sent,
            sessions_applied,
            batches_failed,
            verify_misses,
            unverified_dropped,
            snapshot_loads,
            snapshot_sessions,
            sessions_by_origin,
            instances_by_origin,
            members,
        }
    }

    /// Counts a cluster message of `kind` (`sent` or `received`).
    pub fn message(&self, kind: &str, direction: &str) {
        self.messages
            .get_or_create(&vec![
                ("kind".to_owned(), kind.to_owned()),
                ("direction".to_owned(), direction.to_owned()),
            ])
            .inc();
    }

    /// The byte counter of `direction`.
    pub fn bytes(&self, direction: &str) -> Counter {
        self.bytes
            .get_or_create(&label("direction", direction))
            .clone()
    }

    /// Brings the replicator's counters, what is held from each member and
    /// the members' states up to date (at scrape time, from
    /// [`crate::node::Node::members`]).
    pub fn observe(
        &self,
        stats: &roster_core::replication::Stats,
        members: &[crate::node::replication::MemberInfo],
    ) {
        for (c, v) in [
            (&self.batches, stats.batches_sent),
            (&self.sessions_sent, stats.sessions_sent),
            (&self.deltas_sent, stats.deltas_sent),
            (&self.deltas_wanted, stats.deltas_wanted),
            (&self.instances_sent, stats.instances_sent),
            (&self.sessions_applied, stats.sessions_applied),
            (&self.batches_failed, stats.batches_failed),
            (&self.verify_misses, stats.verify_misses),
            (&self.unverified_dropped, stats.unverified_dropped),
            (&self.snapshot_loads, stats.snapshot_loads),
            (&self.snapshot_sessions, stats.snapshot_sessions),
            (&self.rejected, stats.invalid),
            (&self.too_large, stats.too_large),
        ] {
            c.inc_by(v.saturating_sub(c.get()));
        }
        self.sessions_by_origin.clear();
        self.instances_by_origin.clear();
        for m in members {
            let l = label("origin", &m.name);
            self.sessions_by_origin
                .get_or_create(&l)
                .set(m.sessions as i64);
            self.instances_by_origin
                .get_or_create(&l)
                .set(m.instances as i64);
        }
        for state in ["up", "suspect", "down"] {
            let n = members.iter().filter(|m| m.state == state).count();
            self.members
                .get_or_create(&label("state", state))
                .set(n as i64);
        }
    }
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
        let replication = Replication::new(&mut registry);
        Self {
            replication,
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
