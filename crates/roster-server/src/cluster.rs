//! The cluster port's transport: an outbox per peer, drained by one task
//! that delivers each message over gRPC (`roster.cluster.v1.Cluster/Deliver`)
//! to the peer's address that last worked, trying its other addresses (one
//! per network) when that fails; and the `Deliver` service that hands what
//! peers send to the node. Replication rules are not here: lost messages
//! are the replicator's business.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message as _;
use roster_core::NodeName;
use roster_core::replication::Envelope;
use roster_proto::cluster_v1 as pb;
use roster_proto::cluster_v1::cluster_client::ClusterClient;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;

/// A connection attempt to a peer address gives up after this long (an
/// address on a network that is down fails over quickly).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The messages waiting for one peer, and where it is reached.
pub struct Outbox {
    name: NodeName,
    addresses: Vec<String>,
    /// Index of the address that last worked.
    in_use: AtomicUsize,
    queue: Mutex<VecDeque<Envelope>>,
    ready: Notify,
    capacity: usize,
}

impl Outbox {
    /// The outbox of peer `name` at `addresses` (in order of preference).
    pub fn new(name: NodeName, addresses: Vec<String>, capacity: usize) -> Self {
        Self {
            name,
            addresses,
            in_use: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues a message; when the queue is full the oldest message is
    /// dropped (the replicator sends again what still matters).
    pub fn push(&self, envelope: Envelope, metrics: &Metrics) {
        let mut q = self.queue.lock();
        if q.len() >= self.capacity {
            q.pop_front();
            metrics.replication.dropped.inc();
        }
        q.push_back(envelope);
        drop(q);
        self.ready.notify_one();
    }

    /// Its addresses.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The address that last worked (or is tried first).
    pub fn in_use(&self) -> String {
        self.addresses[self.in_use.load(Ordering::Relaxed) % self.addresses.len()].clone()
    }
}

/// The outboxes of the peers `config` lists (every member but this node),
/// or none if it lists no peer.
pub fn outboxes(config: &Config) -> BTreeMap<NodeName, Arc<Outbox>> {
    let me = &config.server.node_name;
    // Checked when the configuration was loaded.
    let members = config.cluster.members().unwrap_or_default();
    members
        .into_iter()
        .filter(|m| m.name != *me)
        .map(|m| {
            let name = NodeName::from(m.name.as_str());
            let outbox = Outbox::new(name.clone(), m.addresses, config.cluster.queue_per_peer);
            (name, Arc::new(outbox))
        })
        .collect()
}

/// Whether a failed call says the address is unreachable (so another may
/// do), rather than that the peer refused the message.
fn unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// Delivers `outbox`'s messages until the node stops.
pub async fn run_outbox(node: Arc<Node>, outbox: Arc<Outbox>) {
    let config = &node.config().cluster;
    let max = config.message_bytes;
    let clients: Vec<Option<ClusterClient<Channel>>> = outbox
        .addresses
        .iter()
        .map(|a| {
            let endpoint = Endpoint::from_shared(format!("http://{a}")).ok()?;
            let channel = endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(config.ack_timeout)
                .tcp_nodelay(true)
                .connect_lazy();
            Some(
                ClusterClient::new(channel)
                    .max_encoding_message_size(max)
                    .max_decoding_message_size(max),
            )
        })
        .collect();
    let n = clients.len();
    let sent = node.metrics.replication.bytes("sent");
    loop {
        let next = outbox.queue.lock().pop_front();
        let Some(envelope) = next else {
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = outbox.ready.notified() => continue,
            }
        };
        let wire = roster_proto::cluster::to_wire(&envelope);
        let bytes = wire.encoded_len() as u64;
        let first = outbox.in_use.load(Ordering::Relaxed);
        let mut delivered = false;
        for k in 0..n {
            let i = (first + k) % n;
            let Some(mut client) = clients[i].clone() else {
                continue;
            };
            let call = tokio::select! {
                _ = node.shutdown.cancelled() => return,
                r = client.deliver(wire.clone()) => r,
            };
            match call {
                Ok(_) => {
                    if i != first {
                        tracing::info!(peer = %outbox.name, address = %outbox.addresses[i], "peer reached on another address");
                    }
                    outbox.in_use.store(i, Ordering::Relaxed);
                    sent.inc_by(bytes);
                    node.metrics
                        .replication
                        .message(envelope.body.kind(), "sent");
                    delivered = true;
                    break;
                }
                Err(status) if unreachable(&status) => {
                    tracing::debug!(peer = %outbox.name, address = %outbox.addresses[i], "cannot deliver: {}", status.message());
                }
                Err(status) => {
                    // Refused by the peer: another address would say the same.
                    tracing::warn!(peer = %outbox.name, kind = envelope.body.kind(), "peer refused a message: {}", status.message());
                    delivered = true;
                    break;
                }
            }
        }
        if !delivered {
            node.metrics.replication.send_failures.inc();
            node.cluster_send_failed(&outbox.name);
        }
    }
}

/// The `Cluster` gRPC service: what peers send, handed to the node.
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    /// The service of `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn deliver(
        &self,
        request: Request<pb::Envelope>,
    ) -> Result<Response<pb::Delivered>, Status> {
        let wire = request.into_inner();
        let bytes = wire.encoded_len() as u64;
        let envelope = roster_proto::cluster::from_wire(wire)
            .map_err(|e| Status::invalid_argument(format!("invalid cluster message: {e}")))?;
        let metrics = &self.node.metrics;
        metrics.replication.bytes("received").inc_by(bytes);
        metrics
            .replication
            .message(envelope.body.kind(), "received");
        self.node.cluster_receive(envelope);
        Ok(Response::new(pb::Delivered {}))
    }
}
