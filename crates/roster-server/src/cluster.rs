//! The cluster port's transport: an outbox per peer, drained by one task
//! that delivers each message over gRPC (`roster.cluster.v1.Cluster/Deliver`)
//! to the peer's address that last worked, trying its other addresses (one
//! per network) when that fails; Nacos v1 writes forwarded to the member
//! responsible for their instance (`Forward`); and the service that hands
//! what peers send to the node. Replication rules are not here: lost
//! messages are the replicator's business.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message as _;
use roster_core::NodeName;
use roster_core::replication::{Envelope, Message};
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

/// A forwarded Nacos write waits this long for each address of the
/// responsible member before the next (then it is made locally): a client
/// is kept waiting little when that member is slow.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(300);

/// The request header carrying `cluster.secret`.
pub const SECRET_HEADER: &str = "x-roster-cluster-secret";

/// A message ready to go: its bytes, what it is, and its batch if a sync.
struct Outgoing {
    wire: Bytes,
    kind: &'static str,
    sync_batch: Option<u64>,
}

/// The queue of one peer, bounded by count and by bytes.
#[derive(Default)]
struct Queue {
    messages: VecDeque<Outgoing>,
    bytes: usize,
}

/// Which connections to a peer a call goes over: replication messages
/// (snapshot chunks among them, megabytes each) and forwarded Nacos writes
/// (a client waits on each) have a connection each, so neither waits
/// behind the other's frames or takes the other's concurrent calls.
#[derive(Clone, Copy)]
enum Lane {
    Deliver = 0,
    Forward = 1,
}

/// The messages waiting for one peer, and where it is reached.
pub struct Outbox {
    name: NodeName,
    addresses: Vec<String>,
    /// Index of the address that last worked.
    in_use: AtomicUsize,
    queue: Mutex<Queue>,
    ready: Notify,
    capacity: usize,
    capacity_bytes: usize,
    /// A channel per address (none for one that is not a valid URI),
    /// connected on first use, for each [`Lane`].
    channels: [OnceLock<Vec<Option<Channel>>>; 2],
    /// `cluster.secret` as a header value, if set.
    secret: Option<tonic::metadata::AsciiMetadataValue>,
}

impl Outbox {
    /// The outbox of peer `name` at `addresses` (in order of preference),
    /// holding at most `capacity` messages and `capacity_bytes` bytes.
    pub fn new(
        name: NodeName,
        addresses: Vec<String>,
        capacity: usize,
        capacity_bytes: usize,
        secret: &str,
    ) -> Self {
        Self {
            // Checked printable at load, so it parses.
            secret: (!secret.is_empty())
                .then(|| tonic::metadata::AsciiMetadataValue::try_from(secret).ok())
                .flatten(),
            name,
            addresses,
            in_use: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
            capacity_bytes,
            channels: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// Its channels of `lane`, one per address (made on first use, within
    /// the runtime: their connections are lazy).
    fn channels(&self, config: &crate::config::ClusterSection, lane: Lane) -> &[Option<Channel>] {
        self.channels[lane as usize].get_or_init(|| {
            self.addresses
                .iter()
                .map(|a| {
                    let endpoint = Endpoint::from_shared(format!("http://{a}")).ok()?;
                    Some(
                        endpoint
                            .connect_timeout(CONNECT_TIMEOUT)
                            .timeout(config.ack_timeout)
                            .tcp_nodelay(true)
                            .connect_lazy(),
                    )
                })
                .collect()
        })
    }

    /// Queues a message (encoded here, outside the replicator's lock);
    /// past the queue's bounds the oldest messages are dropped (the
    /// replicator sends again what still matters).
    pub fn push(&self, envelope: &Envelope, metrics: &Metrics) {
        let wire = Bytes::from(roster_proto::cluster::encode(envelope));
        let bytes = wire.len();
        let outgoing = Outgoing {
            wire,
            kind: envelope.body.kind(),
            sync_batch: match &envelope.body {
                Message::Sync { batch, .. } => Some(*batch),
                _ => None,
            },
        };
        let mut q = self.queue.lock();
        while !q.messages.is_empty()
            && (q.messages.len() >= self.capacity || q.bytes + bytes > self.capacity_bytes)
        {
            if let Some(old) = q.messages.pop_front() {
                q.bytes -= old.wire.len();
            }
            metrics.replication.dropped.inc();
        }
        q.bytes += bytes;
        q.messages.push_back(outgoing);
        drop(q);
        self.ready.notify_one();
    }

    /// Its channels in the order to try them: the address that last
    /// worked first, then the others (with each one's index).
    fn in_turn<'a>(
        &'a self,
        config: &crate::config::ClusterSection,
        lane: Lane,
    ) -> impl Iterator<Item = (usize, Channel)> + 'a {
        let channels = self.channels(config, lane);
        let first = self.in_use.load(Ordering::Relaxed);
        (0..channels.len()).filter_map(move |k| {
            let i = (first + k) % channels.len();
            Some((i, channels[i].clone()?))
        })
    }

    /// A request to this peer carrying the cluster's secret (if set).
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(secret) = &self.secret {
            request.metadata_mut().insert(SECRET_HEADER, secret.clone());
        }
        request
    }

    fn pop(&self) -> Option<Outgoing> {
        let mut q = self.queue.lock();
        let m = q.messages.pop_front()?;
        q.bytes -= m.wire.len();
        Some(m)
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
            let c = &config.cluster;
            let (count, bytes) = (c.queue_per_peer, c.queue_bytes);
            let outbox = Outbox::new(name.clone(), m.addresses, count, bytes, &c.secret);
            (name, Arc::new(outbox))
        })
        .collect()
}

/// Whether a failed call says the peer refused the message (it cannot
/// read it, it is too large, or the sender is not let in), so that sending
/// it again, on any address, is pointless. Anything else (unreachable,
/// timed out, a transport or HTTP/2 error) may pass on a retry or on
/// another address.
fn refused(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange
            | Code::ResourceExhausted
    )
}

/// Makes Nacos write `op` (with `params`, answered in `api`'s format) on
/// member `peer`, the one responsible for its instance, over the address
/// that last worked or the others: its answer, or none if no address took
/// it (the caller makes the write itself) or the peer refused it.
pub async fn forward(
    node: &Node,
    peer: &NodeName,
    op: &str,
    params: HashMap<String, String>,
    api: &str,
) -> Option<pb::ForwardAnswer> {
    let outbox = node.replication()?.outbox(peer)?;
    let message = pb::Forwarded {
        from: node.config().server.node_name.clone(),
        op: op.to_owned(),
        params,
        api: api.to_owned(),
    };
    let max = node.config().cluster.message_bytes;
    for (i, channel) in outbox.in_turn(&node.config().cluster, Lane::Forward) {
        let mut client = ClusterClient::new(channel)
            .max_encoding_message_size(max)
            .max_decoding_message_size(max);
        let mut call = outbox.request(message.clone());
        call.set_timeout(FORWARD_TIMEOUT);
        match client.forward(call).await {
            Ok(answer) => {
                outbox.in_use.store(i, Ordering::Relaxed);
                node.metrics.replication.message("forward", "sent");
                return Some(answer.into_inner());
            }
            Err(status) if !refused(&status) => {}
            Err(status) => {
                node.metrics.replication.refused.inc();
                node.warn_refused(peer, "forward", &status);
                return None;
            }
        }
    }
    node.metrics.replication.send_failures.inc();
    None
}

/// Delivers `outbox`'s messages until the node stops.
pub async fn run_outbox(node: Arc<Node>, outbox: Arc<Outbox>) {
    let config = &node.config().cluster;
    let sent = node.metrics.replication.bytes("sent");
    loop {
        let Some(Outgoing {
            wire,
            kind,
            sync_batch,
        }) = outbox.pop()
        else {
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = outbox.ready.notified() => continue,
            }
        };
        let first = outbox.in_use.load(Ordering::Relaxed);
        let mut delivered = false;
        let bytes = wire.len();
        for (i, channel) in outbox.in_turn(config, Lane::Deliver) {
            let call = tokio::select! {
                _ = node.shutdown.cancelled() => return,
                r = deliver(channel, outbox.request(wire.clone()), config.message_bytes) => r,
            };
            match call {
                Ok(_) => {
                    if i != first {
                        tracing::info!(peer = %outbox.name, address = %outbox.addresses[i], "peer reached on another address");
                    }
                    outbox.in_use.store(i, Ordering::Relaxed);
                    sent.inc_by(bytes as u64);
                    node.metrics.replication.message(kind, "sent");
                    delivered = true;
                    break;
                }
                Err(status) if !refused(&status) => {
                    tracing::debug!(peer = %outbox.name, address = %outbox.addresses[i], "cannot deliver: {}", status.message());
                }
                Err(status) => {
                    // Refused by the peer: another address would say the
                    // same, and so would a retry.
                    node.metrics.replication.refused.inc();
                    node.warn_refused(&outbox.name, kind, &status);
                    if let Some(batch) = sync_batch {
                        node.cluster_send_refused(&outbox.name, batch);
                    }
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

/// `Cluster/Deliver` of a message already encoded (see [`Encoded`]).
async fn deliver(
    channel: Channel,
    request: Request<Bytes>,
    max: usize,
) -> Result<Response<pb::Delivered>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("cluster connection not ready: {e}")))?;
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/roster.cluster.v1.Cluster/Deliver");
    let mut request = request;
    // As the generated client marks its calls (for interceptors, tracing).
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        "roster.cluster.v1.Cluster",
        "Deliver",
    ));
    grpc.unary(request, path, Encoded).await
}

/// The codec of `Deliver` calls on the sending side: the request is an
/// `Envelope` already encoded by [`roster_proto::cluster::encode`] (once,
/// whatever the addresses tried), the answer a `Delivered` (read as every
/// generated client reads).
#[derive(Clone, Copy, Default)]
struct Encoded;

impl tonic::codec::Codec for Encoded {
    type Encode = Bytes;
    type Decode = pb::Delivered;
    type Encoder = Encoded;
    type Decoder = roster_proto::codec::Contiguous<pb::Delivered>;

    fn encoder(&mut self) -> Self::Encoder {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

impl tonic::codec::Encoder for Encoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

/// The `Cluster` gRPC service: what peers send, handed to the node (and
/// forwarded Nacos writes, to its Nacos layer).
pub struct ClusterService {
    node: Arc<Node>,
    nacos: Arc<crate::nacos::Nacos>,
}

impl ClusterService {
    /// The service of `node` and its Nacos layer.
    pub fn new(node: Arc<Node>, nacos: Arc<crate::nacos::Nacos>) -> Self {
        Self { node, nacos }
    }

    /// Refuses a message from a node that is not a member.
    fn check_member(&self, from: &str) -> Result<(), Status> {
        if self.node.is_member(from) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{from:?} is not a member of {:?}'s cluster (add it to cluster.members there)",
            self.node.config().server.node_name
        )))
    }
}

/// Refuses a cluster call without the cluster's secret, before its body
/// is read (an interceptor: a stranger cannot make the node decode a large
/// message).
#[derive(Clone)]
pub struct SecretCheck {
    /// `cluster.secret`, if set.
    secret: Option<Arc<[u8]>>,
}

impl SecretCheck {
    /// The check of `config`'s secret (none set: every call passes).
    pub fn new(config: &crate::config::ClusterSection) -> Self {
        let s = &config.secret;
        Self {
            secret: (!s.is_empty()).then(|| Arc::from(s.as_bytes())),
        }
    }
}

impl tonic::service::Interceptor for SecretCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(secret) = &self.secret else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get(SECRET_HEADER)
            .map_or(&[][..], |v| v.as_bytes());
        if constant_time_eq(given, secret) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(format!(
                "{SECRET_HEADER} missing or wrong (cluster.secret must be the same on every member)"
            )))
        }
    }
}

/// Compares without leaking, through timing, how much of `a` matches `b`.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn deliver(
        &self,
        request: Request<pb::Envelope>,
    ) -> Result<Response<pb::Delivered>, Status> {
        let wire = request.into_inner();
        let bytes = wire.encoded_len() as u64;
        let (envelope, skipped) = roster_proto::cluster::from_wire(wire)
            .map_err(|e| Status::invalid_argument(format!("invalid cluster message: {e}")))?;
        self.check_member(&envelope.from)?;
        let metrics = &self.node.metrics;
        if let Some(first) = skipped.first() {
            metrics.replication.invalid.inc_by(skipped.len() as u64);
            tracing::warn!(peer = %envelope.from, skipped = skipped.len(), "sessions left out of a cluster message: {first}");
        }
        metrics.replication.bytes("received").inc_by(bytes);
        metrics
            .replication
            .message(envelope.body.kind(), "received");
        self.node.cluster_receive(envelope).await;
        Ok(Response::new(pb::Delivered {}))
    }

    async fn forward(
        &self,
        request: Request<pb::Forwarded>,
    ) -> Result<Response<pb::ForwardAnswer>, Status> {
        let m = request.into_inner();
        self.check_member(&m.from)?;
        // Loading: the forwarding member makes the write itself.
        self.node
            .require_serving()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.node.metrics.replication.message("forward", "received");
        let (status, content_type, body) =
            crate::nacos::http::answer_forwarded(&self.nacos, &m.op, m.params, &m.api)
                .await
                .map_err(Status::invalid_argument)?;
        Ok(Response::new(pb::ForwardAnswer {
            status: status.into(),
            content_type,
            body,
        }))
    }
}
