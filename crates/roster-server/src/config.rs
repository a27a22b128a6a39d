//! Node configuration: defaults, a TOML file, then `ROSTER_*` environment
//! overrides (then command-line flags, applied by the caller). Every
//! interval the node uses is here, none is a constant in code.
//!
//! An environment variable is named after the key's path, upper-cased:
//! `session.keepalive` is `ROSTER_SESSION_KEEPALIVE`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why (said in the message, so not a source to repeat).
        reason: std::io::Error,
    },
    /// The file or an override is not valid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a node is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener addresses.
    pub server: ServerSection,
    /// Session keep-alive and expiry.
    pub session: SessionSection,
    /// Push coalescing and per-session queues.
    pub push: PushSection,
    /// Registry state.
    pub registry: RegistrySection,
    /// Nacos compatibility (HTTP heartbeats, UDP push).
    pub nacos: NacosSection,
    /// Operator authority.
    pub admin: AdminSection,
    /// What one node holds at most, whoever asks.
    pub limits: LimitsSection,
    /// The cluster this node is a member of (none: it runs alone).
    pub cluster: ClusterSection,
}

/// `[cluster]`: the members of the cluster and how they replicate
/// (docs/replication.md). With no member besides this node, the node runs
/// alone and opens no cluster port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Where this node listens for its peers (`0.0.0.0:9849` for every
    /// network of the host).
    #[serde(with = "listen")]
    pub listen: SocketAddr,
    /// The members, this node among them or not: `NAME=HOST:PORT`, more
    /// addresses of the same member (one per network) after commas
    /// (`n1=10.0.0.1:9849,192.168.0.1:9849`). In a `ROSTER_CLUSTER_MEMBERS`
    /// list an entry without `=` is one more address of the entry before.
    pub members: Vec<String>,
    /// Another spelling of `server.node_name` (either may be set; if both
    /// are, they must agree).
    pub node_name: String,
    /// Another spelling of `server.data_dir` (same rule).
    pub data_dir: String,
    /// How often each member sends each peer the digest of its sessions.
    #[serde(with = "duration")]
    pub verify_interval: Duration,
    /// A replica its origin has not listed for this many verify rounds is
    /// dropped and its removal pushed.
    pub verify_rounds: u32,
    /// A sync batch not acknowledged this long is sent again.
    #[serde(with = "duration")]
    pub ack_timeout: Duration,
    /// A starting node that can load no snapshot (no peer answers) serves
    /// alone after this long.
    #[serde(with = "duration")]
    pub ready_alone_after: Duration,
    /// A snapshot source silent this long is given up for another peer.
    #[serde(with = "duration")]
    pub snapshot_timeout: Duration,
    /// Most sessions in one sync batch or snapshot chunk.
    pub batch_sessions: usize,
    /// Most instances in one sync batch or snapshot chunk (a larger
    /// session still goes, alone).
    pub batch_instances: usize,
    /// Most bytes in one sync batch or snapshot chunk (a larger session
    /// still goes, alone).
    pub batch_bytes: usize,
    /// Largest cluster message, in bytes (sent or received); a session
    /// larger than this is not replicated (counted in
    /// `roster_replication_too_large_total`).
    pub message_bytes: usize,
    /// Messages queued for one peer at most; past it the oldest are
    /// dropped (replication resends what matters).
    pub queue_per_peer: usize,
    /// Bytes queued for one peer at most (same rule).
    pub queue_bytes: usize,
    /// A secret every member shares: sent with each cluster message, and
    /// messages without it are refused. Empty: the cluster port takes any
    /// message (keep it on a private network then). Set it with
    /// `ROSTER_CLUSTER_SECRET` rather than in a file others can read.
    pub secret: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        let r = roster_core::replication::ReplicationConfig::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9849)),
            members: Vec::new(),
            node_name: String::new(),
            data_dir: String::new(),
            verify_interval: r.verify_interval,
            verify_rounds: r.verify_rounds,
            ack_timeout: r.ack_timeout,
            ready_alone_after: r.ready_alone_after,
            snapshot_timeout: r.snapshot_timeout,
            batch_sessions: r.batch_sessions,
            batch_instances: r.batch_instances,
            batch_bytes: r.batch_bytes,
            message_bytes: r.message_bytes,
            queue_per_peer: 4096,
            queue_bytes: 256 << 20,
            secret: String::new(),
        }
    }
}

/// A member of the cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name (its identity).
    pub name: String,
    /// Where its cluster port is reached, one per network, in order of
    /// preference (`host:port`; a host name is resolved at each connect).
    pub addresses: Vec<String>,
}

/// Parses `NAME=ADDR[,ADDR...]` entries (see [`ClusterSection::members`]).
pub fn parse_members(entries: &[String]) -> Result<Vec<Member>, String> {
    let mut members: Vec<Member> = Vec::new();
    // Each comma-separated piece is `NAME=ADDR` (a new member) or `ADDR`
    // (one more address of the member before).
    let pieces = entries
        .iter()
        .flat_map(|e| e.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    for piece in pieces {
        let (name, address) = match piece.split_once('=') {
            Some((name, address)) => (Some(name.trim()), address.trim()),
            None => (None, piece),
        };
        if !address.is_empty()
            && (address
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                || address.parse::<axum::http::uri::Authority>().is_err())
        {
            return Err(format!(
                "member address {address:?} is not host:port (an IPv6 host in brackets: [::1]:9849)"
            ));
        }
        match name {
            Some(name) => {
                roster_core::model::validate_name("member name", name)
                    .map_err(|e| e.to_string())?;
                if members.iter().any(|m| m.name == name) {
                    return Err(format!("member {name:?} is listed twice"));
                }
                if address.is_empty() {
                    return Err(format!("member {name:?} has no address (NAME=HOST:PORT)"));
                }
                members.push(Member {
                    name: name.to_owned(),
                    addresses: vec![address.to_owned()],
                });
            }
            None => match members.last_mut() {
                Some(m) => m.addresses.push(address.to_owned()),
                None => {
                    return Err(format!(
                        "member {piece:?} has no name (NAME=HOST:PORT[,HOST:PORT...])"
                    ));
                }
            },
        }
    }
    Ok(members)
}

impl ClusterSection {
    /// The members, parsed.
    pub fn members(&self) -> Result<Vec<Member>, String> {
        parse_members(&self.members)
    }

    /// The replication settings.
    pub fn replication(&self) -> roster_core::replication::ReplicationConfig {
        let verify = self.verify_interval;
        roster_core::replication::ReplicationConfig {
            verify_interval: verify,
            verify_rounds: self.verify_rounds,
            ack_timeout: self.ack_timeout,
            ready_alone_after: self.ready_alone_after,
            snapshot_timeout: self.snapshot_timeout,
            batch_sessions: self.batch_sessions,
            batch_instances: self.batch_instances,
            batch_bytes: self.batch_bytes,
            message_bytes: self.message_bytes,
            suspect_after: verify + verify / 2,
            down_after: verify * self.verify_rounds.max(1),
            ..Default::default()
        }
    }
}

/// `[limits]`: what clients can make one node hold. A request that would
/// pass one is refused with an error naming it (HTTP 413 for sizes, 429
/// for counts; gRPC `RESOURCE_EXHAUSTED`), counted in
/// `roster_limit_hits_total` and logged the first time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Sessions open (streams, HTTP leases, Nacos connections and HTTP
    /// instances' beat leases).
    pub sessions: usize,
    /// Services with instances or state.
    pub services: usize,
    /// Instances over all services.
    pub instances: usize,
    /// Instances in one service.
    pub instances_per_service: usize,
    /// Instances one session (connection) holds.
    pub instances_per_session: usize,
    /// Addresses (networks) of one instance.
    pub addresses_per_instance: usize,
    /// Metadata of one instance, keys plus values, in bytes (at most 65536).
    pub metadata_bytes: usize,
    /// Services one session subscribes to.
    pub subscriptions_per_session: usize,
    /// Sessions carried by one native session stream.
    pub sessions_per_stream: usize,
    /// Concurrent gRPC calls (HTTP/2 streams) on one connection.
    pub streams_per_connection: u32,
    /// Nacos UDP push targets (`ip:udpPort`) per client IP address.
    pub udp_targets_per_address: usize,
    /// Nacos UDP push targets in all.
    pub udp_targets: usize,
    /// Nacos gRPC pushes one connection leaves unacknowledged; past it the
    /// connection is taken as stuck and closed.
    pub pending_pushes_per_connection: usize,
    /// Open connections over both ports.
    pub connections: usize,
    /// Open connections from one client IP address, over both ports.
    pub connections_per_address: usize,
    /// A connection must send a whole request header within this.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection that sends nothing for this long is closed (live gRPC
    /// connections answer the node's pings every 30 s, so stay).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Largest HTTP request body, in bytes.
    pub http_body_bytes: usize,
    /// Largest gRPC message, in bytes.
    pub grpc_message_bytes: usize,
    /// Shortest beat or delete timeout a client may ask for (Nacos
    /// instance metadata); shorter ones are raised to it.
    #[serde(with = "duration")]
    pub client_timeout_min: Duration,
    /// Longest beat or delete timeout a client may ask for; longer ones
    /// are lowered to it.
    #[serde(with = "duration")]
    pub client_timeout_max: Duration,
    /// A subscriber whose pushes stay queued, or unacknowledged, this long
    /// is closed (its client reconnects and gets a full view).
    #[serde(with = "duration")]
    pub stuck_timeout: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let core = roster_core::Limits::default();
        Self {
            sessions: core.sessions,
            services: core.services,
            instances: core.instances,
            instances_per_service: core.instances_per_service,
            instances_per_session: core.instances_per_session,
            addresses_per_instance: core.addresses_per_instance,
            metadata_bytes: core.metadata_bytes,
            subscriptions_per_session: 10_000,
            sessions_per_stream: 1_024,
            streams_per_connection: 1_024,
            udp_targets_per_address: 64,
            udp_targets: 10_000,
            pending_pushes_per_connection: 1_024,
            connections: 10_000,
            connections_per_address: 1_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            http_body_bytes: 1024 * 1024,
            grpc_message_bytes: 16 * 1024 * 1024,
            client_timeout_min: Duration::from_secs(1),
            client_timeout_max: Duration::from_secs(600),
            stuck_timeout: Duration::from_secs(60),
        }
    }
}

impl LimitsSection {
    /// The limits the core registry enforces.
    pub fn core(&self) -> roster_core::Limits {
        roster_core::Limits {
            sessions: self.sessions,
            services: self.services,
            instances: self.instances,
            instances_per_service: self.instances_per_service,
            instances_per_session: self.instances_per_session,
            addresses_per_instance: self.addresses_per_instance,
            metadata_bytes: self.metadata_bytes,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// A secret that lets an operator change or remove any instance of
    /// this node (`x-roster-admin-token`); empty: nobody may.
    pub token: String,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// This node's name: its identity in a cluster and in the node epoch
    /// clients see.
    pub node_name: String,
    /// Where the node keeps what must survive a restart (its incarnation
    /// counter). Empty: nothing is kept, and each start takes the clock
    /// (in microseconds) as its incarnation instead of the next number.
    pub data_dir: String,
    /// HTTP/JSON listener (API, health, metrics); `host:port`, a host
    /// name resolved once at start.
    #[serde(with = "listen")]
    pub http: SocketAddr,
    /// gRPC listener (sessions and the native API).
    #[serde(with = "listen")]
    pub grpc: SocketAddr,
    /// Acknowledge gRPC reads at once (`TCP_QUICKACK`, Linux): clients that
    /// keep Nagle's algorithm on otherwise wait ~40 ms per call.
    pub tcp_quickack: bool,
}

/// `[session]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSection {
    /// A session silent this long is probed.
    #[serde(with = "duration")]
    pub keepalive: Duration,
    /// A probed session silent this much longer is expired.
    #[serde(with = "duration")]
    pub probe_timeout: Duration,
    /// How often idle sessions are looked for.
    #[serde(with = "duration")]
    pub sweep_interval: Duration,
}

/// `[push]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSection {
    /// Changes within this window after a push are merged into the next.
    #[serde(with = "duration")]
    pub coalesce_window: Duration,
    /// While a service stays busy its windows double, up to this.
    #[serde(with = "duration")]
    pub coalesce_max_window: Duration,
    /// Updates a session may have queued before its deltas are collapsed.
    pub queue_capacity: usize,
    /// How long `drain` waits for acknowledgements unless told otherwise.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

/// `[registry]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// Recent deltas kept per service, for catch-up without a full view.
    pub delta_window: usize,
    /// How long an ended session's tombstone is kept (so a late copy of
    /// its data cannot bring it back).
    #[serde(with = "duration")]
    pub tombstone_grace: Duration,
    /// A service with no instances (and no subscriber) is forgotten after
    /// this long.
    #[serde(with = "duration")]
    pub empty_service_grace: Duration,
}

/// `[nacos]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NacosSection {
    /// An HTTP-registered instance without a beat this long turns
    /// unhealthy (metadata `preserved.heart.beat.timeout` overrides it).
    #[serde(with = "duration")]
    pub beat_timeout: Duration,
    /// ... and is removed after this long (`preserved.ip.delete.timeout`).
    #[serde(with = "duration")]
    pub delete_timeout: Duration,
    /// How often heartbeat deadlines are checked.
    #[serde(with = "duration")]
    pub beat_check_interval: Duration,
    /// How long a UDP push waits for its `push-ack` before it is sent once more.
    #[serde(with = "duration")]
    pub udp_ack_timeout: Duration,
    /// A UDP subscriber that stopped polling is forgotten after this long.
    #[serde(with = "duration")]
    pub udp_subscriber_ttl: Duration,
    /// A gRPC push (`NotifySubscriberRequest`) not acknowledged this long,
    /// or answered with an error, is sent again...
    #[serde(with = "duration")]
    pub push_ack_timeout: Duration,
    /// ... at most this many times.
    pub push_retries: u32,
    /// Addresses of proxies trusted to name the client they forward for
    /// (`clientIP` of a UDP subscription); anyone else's UDP pushes go to
    /// the address the request came from.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for NacosSection {
    fn default() -> Self {
        Self {
            beat_timeout: Duration::from_secs(15),
            delete_timeout: Duration::from_secs(30),
            beat_check_interval: Duration::from_secs(1),
            udp_ack_timeout: Duration::from_secs(10),
            udp_subscriber_ttl: Duration::from_secs(180),
            push_ack_timeout: Duration::from_secs(5),
            push_retries: 3,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            node_name: "roster".into(),
            data_dir: String::new(),
            http: SocketAddr::from(([127, 0, 0, 1], 8848)),
            grpc: SocketAddr::from(([127, 0, 0, 1], 9848)),
            tcp_quickack: true,
        }
    }
}

impl Default for SessionSection {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(20),
            probe_timeout: Duration::from_secs(3),
            sweep_interval: Duration::from_secs(3),
        }
    }
}

impl Default for PushSection {
    fn default() -> Self {
        Self {
            coalesce_window: Duration::from_millis(5),
            coalesce_max_window: Duration::from_millis(50),
            queue_capacity: 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            delta_window: 128,
            tombstone_grace: Duration::from_secs(60),
            empty_service_grace: Duration::from_secs(60),
        }
    }
}

#[allow(clippy::derivable_impls)]
impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerSection::default(),
            session: SessionSection::default(),
            push: PushSection::default(),
            registry: RegistrySection::default(),
            nacos: NacosSection::default(),
            admin: AdminSection::default(),
            limits: LimitsSection::default(),
            cluster: ClusterSection::default(),
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then `ROSTER_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
                path: path.display().to_string(),
                reason,
            })?;
            let from_file: toml::Value = toml::from_str(&text).map_err(|e| {
                let line = e
                    .span()
                    .map(|s| text[..s.start].matches('\n').count() + 1)
                    .unwrap_or(1);
                ConfigError::Invalid(format!(
                    "{} line {line}: {}",
                    path.display(),
                    one_line(e.message())
                ))
            })?;
            merge(&mut value, from_file);
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ROSTER_"))
            .collect();
        let mut with_env = value.clone();
        let applied = apply_env(&mut with_env, "ROSTER", "", &env);
        let mut config: Config = match with_env.try_into() {
            Ok(c) => c,
            Err(e) => return Err(Self::blame(value, &applied, &env, &e)),
        };
        config.unify()?;
        config.check()?;
        Ok(config)
    }

    /// The error for a configuration that does not read: the variable
    /// that breaks it, if one does, else the key the error names.
    fn blame(
        base: toml::Value,
        applied: &[(String, String)],
        env: &[(String, String)],
        e: &toml::de::Error,
    ) -> ConfigError {
        for (var, key) in applied {
            let mut one = base.clone();
            let alone: Vec<(String, String)> =
                env.iter().filter(|(k, _)| k == var).cloned().collect();
            apply_env(&mut one, "ROSTER", "", &alone);
            if let Err(e) = one.try_into::<Config>() {
                let value = alone.first().map_or("", |(_, v)| v.as_str());
                return ConfigError::Invalid(format!(
                    "{var}={value:?} ({key}): {}",
                    one_line(e.message())
                ));
            }
        }
        ConfigError::Invalid(one_line(&e.to_string()))
    }

    /// Takes `cluster.node_name` and `cluster.data_dir` into `[server]`.
    fn unify(&mut self) -> Result<(), ConfigError> {
        let defaults = ServerSection::default();
        for (alias, key, value, default) in [
            (
                &self.cluster.node_name,
                "node_name",
                &mut self.server.node_name,
                defaults.node_name,
            ),
            (
                &self.cluster.data_dir,
                "data_dir",
                &mut self.server.data_dir,
                defaults.data_dir,
            ),
        ] {
            if alias.is_empty() || alias == value {
                continue;
            }
            if *value != default {
                return Err(ConfigError::Invalid(format!(
                    "server.{key} ({value:?}) and cluster.{key} ({alias:?}) differ; set one"
                )));
            }
            value.clone_from(alias);
        }
        Ok(())
    }

    /// Checks the `[cluster]` section (called by [`Self::load`]; the
    /// command line calls it again after its flags).
    pub fn check_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        c.members()
            .map_err(|e| ConfigError::Invalid(format!("cluster.members: {e}")))?;
        if c.verify_interval.is_zero() || c.ack_timeout.is_zero() || c.snapshot_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "cluster.verify_interval, ack_timeout and snapshot_timeout must be above 0".into(),
            ));
        }
        for (name, v) in [
            ("verify_rounds", c.verify_rounds as usize),
            ("batch_sessions", c.batch_sessions),
            ("batch_instances", c.batch_instances),
            ("batch_bytes", c.batch_bytes),
            ("message_bytes", c.message_bytes),
            ("queue_per_peer", c.queue_per_peer),
            ("queue_bytes", c.queue_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "cluster.{name} must be above 0"
                )));
            }
        }
        if !c.secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::Invalid(
                "cluster.secret must be printable ASCII without spaces (it travels in a header)"
                    .into(),
            ));
        }
        // A batch must fit in a message, and a message in the queue (what
        // a node alone never sends need not).
        if !c.members.is_empty()
            && (c.batch_bytes.saturating_mul(2) > c.message_bytes
                || c.message_bytes > c.queue_bytes)
        {
            return Err(ConfigError::Invalid(
                "cluster.batch_bytes must be at most half of cluster.message_bytes, \
                 which must be at most cluster.queue_bytes"
                    .into(),
            ));
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.check_cluster()?;
        let zero = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::Invalid(format!("{name} must be above 0")))
            } else {
                Ok(())
            }
        };
        zero("session.keepalive", self.session.keepalive)?;
        zero("session.probe_timeout", self.session.probe_timeout)?;
        zero("session.sweep_interval", self.session.sweep_interval)?;
        zero("nacos.beat_timeout", self.nacos.beat_timeout)?;
        zero("nacos.beat_check_interval", self.nacos.beat_check_interval)?;
        zero("nacos.udp_ack_timeout", self.nacos.udp_ack_timeout)?;
        zero("nacos.udp_subscriber_ttl", self.nacos.udp_subscriber_ttl)?;
        zero("nacos.push_ack_timeout", self.nacos.push_ack_timeout)?;
        zero("push.coalesce_max_window", self.push.coalesce_max_window)?;
        if self.push.coalesce_max_window < self.push.coalesce_window {
            return Err(ConfigError::Invalid(
                "push.coalesce_max_window must be at least push.coalesce_window".into(),
            ));
        }
        roster_core::model::validate_name("server.node_name", &self.server.node_name)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.nacos.delete_timeout < self.nacos.beat_timeout {
            return Err(ConfigError::Invalid(
                "nacos.delete_timeout must be at least nacos.beat_timeout".into(),
            ));
        }
        self.check_limits()?;
        if self.push.queue_capacity == 0 || self.registry.delta_window == 0 {
            return Err(ConfigError::Invalid(
                "push.queue_capacity and registry.delta_window must be above 0".into(),
            ));
        }
        Ok(())
    }
}

impl Config {
    fn check_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (name, value) in [
            ("sessions", l.sessions),
            ("services", l.services),
            ("instances", l.instances),
            ("instances_per_service", l.instances_per_service),
            ("instances_per_session", l.instances_per_session),
            ("addresses_per_instance", l.addresses_per_instance),
            ("subscriptions_per_session", l.subscriptions_per_session),
            ("sessions_per_stream", l.sessions_per_stream),
            ("streams_per_connection", l.streams_per_connection as usize),
            ("udp_targets_per_address", l.udp_targets_per_address),
            ("udp_targets", l.udp_targets),
            (
                "pending_pushes_per_connection",
                l.pending_pushes_per_connection,
            ),
            ("connections", l.connections),
            ("connections_per_address", l.connections_per_address),
            ("http_body_bytes", l.http_body_bytes),
            ("grpc_message_bytes", l.grpc_message_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be above 0"
                )));
            }
        }
        let max_metadata = roster_core::model::MAX_METADATA_BYTES;
        if l.metadata_bytes > max_metadata {
            return Err(ConfigError::Invalid(format!(
                "limits.metadata_bytes must be at most {max_metadata}"
            )));
        }
        for (name, d) in [
            ("header_read_timeout", l.header_read_timeout),
            ("client_timeout_min", l.client_timeout_min),
            ("stuck_timeout", l.stuck_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be above 0"
                )));
            }
        }
        if l.client_timeout_max < l.client_timeout_min {
            return Err(ConfigError::Invalid(
                "limits.client_timeout_max must be at least limits.client_timeout_min".into(),
            ));
        }
        // The node pings gRPC connections every 30 s; an idle timeout
        // below that would close live ones.
        if l.idle_timeout < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "limits.idle_timeout must be at least 60s (gRPC connections are pinged every 30s)"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// An error message on one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Overrides every leaf whose derived variable name is set. The value is
/// read as the leaf's type (a number for numbers, else a string). Returns
/// the variables applied, each with its key (`section.key`).
fn apply_env(
    value: &mut toml::Value,
    prefix: &str,
    key: &str,
    env: &[(String, String)],
) -> Vec<(String, String)> {
    match value {
        toml::Value::Table(t) => {
            let mut applied = Vec::new();
            for (k, v) in t.iter_mut() {
                let key = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                applied.extend(apply_env(
                    v,
                    &format!("{prefix}_{}", k.to_uppercase()),
                    &key,
                    env,
                ));
            }
            applied
        }
        leaf => {
            let Some((_, text)) = env.iter().find(|(k, _)| k == prefix) else {
                return Vec::new();
            };
            *leaf = match leaf {
                toml::Value::Integer(_) => text
                    .parse()
                    .map(toml::Value::Integer)
                    .unwrap_or_else(|_| toml::Value::String(text.clone())),
                toml::Value::Boolean(_) => text
                    .parse()
                    .map(toml::Value::Boolean)
                    .unwrap_or_else(|_| toml::Value::String(text.clone())),
                // A list: comma-separated.
                toml::Value::Array(_) => toml::Value::Array(
                    text.split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(|t| toml::Value::String(t.to_owned()))
                        .collect(),
                ),
                _ => toml::Value::String(text.clone()),
            };
            vec![(prefix.to_owned(), key.to_owned())]
        }
    }
}

/// A listen address from `ip:port` or `host:port` (the host resolved now;
/// its first address is used).
pub fn listen_address(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    if text
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(format!("{text:?} is not host:port (e.g. 127.0.0.1:8848)"));
    }
    match text.to_socket_addrs() {
        Ok(mut found) => found
            .next()
            .ok_or_else(|| format!("{text:?} resolves to no address")),
        Err(e) => Err(format!("cannot resolve {text:?}: {e}")),
    }
}

/// Listen addresses as text (see [`listen_address`]).
mod listen {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        super::listen_address(&text).map_err(serde::de::Error::custom)
    }
}

/// Durations as human text: "20s", "500ms", "1m 30s".
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"3s\": {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = std::env::temp_dir().join(format!("roster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roster.toml");
        std::fs::write(
            &file,
            "[session]\nkeepalive = \"7s\"\n[push]\nqueue_capacity = 9\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("ROSTER_PUSH_QUEUE_CAPACITY", "11"),
                ("ROSTER_SERVER_HTTP", "127.0.0.1:1"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.session.keepalive, Duration::from_secs(7));
        assert_eq!(c.session.probe_timeout, Duration::from_secs(3));
        assert_eq!(c.push.queue_capacity, 11);
        assert_eq!(c.server.http, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn cluster_members_come_from_the_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("roster.toml");
        std::fs::write(
            &file,
            "[cluster]\nnode_name = \"n1\"\nlisten = \"127.0.0.1:19849\"\n\
             members = [\"n1=127.0.0.1:19849\", \"n2=127.0.0.2:9849,127.0.0.3:9849\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[])).unwrap();
        assert_eq!(c.server.node_name, "n1");
        let members = c.cluster.members().unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[1].addresses, ["127.0.0.2:9849", "127.0.0.3:9849"]);
        // In the environment a comma also separates a member's addresses.
        let c = Config::load(
            None,
            env(&[(
                "ROSTER_CLUSTER_MEMBERS",
                "a=127.0.0.1:1,127.0.0.2:1,b=127.0.0.1:2",
            )]),
        )
        .unwrap();
        let members = c.cluster.members().unwrap();
        assert_eq!(members[0].name, "a");
        assert_eq!(members[0].addresses, ["127.0.0.1:1", "127.0.0.2:1"]);
        assert_eq!(members[1].addresses, ["127.0.0.1:2"]);
        for (bad, says) in [
            ("127.0.0.1:1", "no name"),
            ("a=", "no address"),
            ("a=localhost", "not host:port"),
            ("a=h:1,a=h:2", "twice"),
            ("a=::1:9849", "in brackets"),
        ] {
            let e = Config::load(None, env(&[("ROSTER_CLUSTER_MEMBERS", bad)])).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        let e = Config::load(
            None,
            env(&[
                ("ROSTER_SERVER_NODE_NAME", "x"),
                ("ROSTER_CLUSTER_NODE_NAME", "y"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("differ"), "{e}");
        let c = Config::load(None, env(&[("ROSTER_CLUSTER_MEMBERS", "a=[::1]:9849")])).unwrap();
        assert_eq!(c.cluster.members().unwrap()[0].addresses, ["[::1]:9849"]);
        let e = Config::load(None, env(&[("ROSTER_CLUSTER_SECRET", "two words")])).unwrap_err();
        assert!(e.to_string().contains("cluster.secret"), "{e}");
        // A node alone never sends a batch: no check.
        Config::load(None, env(&[("ROSTER_CLUSTER_BATCH_BYTES", "40000000")])).unwrap();
        let e = Config::load(
            None,
            env(&[
                ("ROSTER_CLUSTER_BATCH_BYTES", "40000000"),
                ("ROSTER_CLUSTER_MEMBERS", "a=127.0.0.1:1"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("batch_bytes"), "{e}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = Config::load(None, env(&[("ROSTER_SESSION_KEEPALIVE", "soon")])).unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
        let e = Config::load(None, env(&[("ROSTER_PUSH_QUEUE_CAPACITY", "0")])).unwrap_err();
        assert!(e.to_string().contains("queue_capacity"), "{e}");
        let e = Config::load(Some(Path::new("/nonexistent/roster.toml")), env(&[])).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        // Said once: the cause is in the message, not repeated as a source.
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn limits_and_lists_are_set_from_the_environment() {
        let c = Config::load(
            None,
            env(&[
                ("ROSTER_NACOS_TRUSTED_PROXIES", "10.0.0.5, 10.0.0.6"),
                ("ROSTER_LIMITS_INSTANCES_PER_SESSION", "7"),
                ("ROSTER_LIMITS_STUCK_TIMEOUT", "5s"),
            ]),
        )
        .unwrap();
        let proxies: Vec<std::net::IpAddr> =
            vec!["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap()];
        assert_eq!(c.nacos.trusted_proxies, proxies);
        assert_eq!(c.limits.instances_per_session, 7);
        assert_eq!(c.limits.core().instances_per_session, 7);
        assert_eq!(c.limits.stuck_timeout, Duration::from_secs(5));
        let e = Config::load(
            None,
            env(&[("ROSTER_NACOS_TRUSTED_PROXIES", "proxy.local")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ROSTER_NACOS_TRUSTED_PROXIES"), "{e}");
        for (var, value) in [
            ("ROSTER_LIMITS_CONNECTIONS", "0"),
            ("ROSTER_LIMITS_METADATA_BYTES", "70000"),
            ("ROSTER_LIMITS_IDLE_TIMEOUT", "10s"),
        ] {
            let e = Config::load(None, env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("limits."), "{var}: {e}");
        }
    }

    #[test]
    fn a_bad_variable_is_named_with_its_key() {
        let e = Config::load(
            None,
            env(&[
                ("ROSTER_PUSH_QUEUE_CAPACITY", "12"),
                ("ROSTER_SESSION_KEEPALIVE", "soon"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ROSTER_SESSION_KEEPALIVE=\"soon\" (session.keepalive)"),
            "{e}"
        );
        let e = Config::load(None, env(&[("ROSTER_SERVER_HTTP", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ROSTER_SERVER_HTTP") && e.contains("host:port"),
            "{e}"
        );
    }

    #[test]
    fn a_file_error_names_its_line_on_one_line() {
        let dir = std::env::temp_dir().join(format!("roster-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roster.toml");
        std::fs::write(
            &file,
            "[session]\nkeepalive = \"7s\"\nprobe_timeout = = 3\n",
        )
        .unwrap();
        let e = Config::load(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(e.contains("line 3") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn listen_addresses_may_name_a_host() {
        let a = listen_address("localhost:8848").unwrap();
        assert_eq!(a.port(), 8848);
        assert!(a.ip().is_loopback());
        assert!(listen_address("localhost").is_err());
        assert!(listen_address("127.0.0.1:99999").is_err());
    }

    /// The README shows the sample configuration as it is.
    #[test]
    fn the_readme_shows_the_sample_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let sample = std::fs::read_to_string(root.join("examples/roster.toml")).unwrap();
        let block = readme
            .split("```toml\n")
            .find(|b| b.starts_with("[server]"))
            .and_then(|b| b.split("```").next())
            .expect("a toml block starting with [server] in README.md");
        assert!(
            sample.ends_with(block),
            "README.md and examples/roster.toml differ"
        );
    }

    /// The sample configuration in `examples/` loads, and holds exactly
    /// the defaults (so it documents them truthfully).
    #[test]
    fn the_sample_config_loads_and_holds_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/roster.toml");
        let c = Config::load(Some(&file), env(&[])).unwrap();
        assert_eq!(c, Config::default());
    }
}
