//! The native gRPC API: the `roster.v1.Registry` service over [`calls`],
//! and the session stream's two halves (inbound: opening and closing the
//! sessions it carries, activity, acks and calls; outbound: one writer for
//! all its sessions' pushes and the replies). Holds no registry state.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use parking_lot::Mutex;
use roster_core::ServiceKey;
use roster_proto::convert::required_key;
use roster_proto::v1::{self, registry_server};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::calls::{self, Caller, invalid, status};
use crate::node::{Node, SessionLink, StreamWaker};
use roster_core::push::Outbound;

/// The gRPC service over a node.
pub struct GrpcApi {
    node: Arc<Node>,
}

impl GrpcApi {
    /// A service answering for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Who makes a unary call.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller<'static>, Status> {
        Caller::unary(&self.node, request.remote_addr(), request.metadata())
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

/// Messages a stream may have waiting to be sent besides its sessions'
/// queues (replies, refusals); the stream's calls are not read further
/// until the client takes them.
const REPLIES_IN_FLIGHT: usize = 64;

/// One session stream: the sessions it carries, by channel, and the waker
/// its one writer task waits on.
struct Carrier {
    node: Arc<Node>,
    peer: Option<std::net::SocketAddr>,
    links: Mutex<HashMap<u32, Arc<SessionLink>>>,
    waker: Arc<StreamWaker>,
    /// Cancelled when either side of the stream ends, or the node shuts
    /// down.
    done: CancellationToken,
}

impl Carrier {
    /// Opens a session on `channel` (its welcome is queued on its link).
    fn open(&self, channel: u32, client_name: &str) -> Result<(), Status> {
        if !client_name.is_empty() {
            roster_core::model::validate_name("hello.client_name", client_name).map_err(invalid)?;
        }
        // Held until the session is listed, so its writer finds it when
        // its welcome wakes it.
        let mut links = self.links.lock();
        if self.done.is_cancelled() {
            return Err(Status::unavailable("the stream is ending"));
        }
        if links.contains_key(&channel) {
            return Err(Status::already_exists(format!(
                "channel {channel} already carries a session on this stream"
            )));
        }
        let max = self.node.config().limits.sessions_per_stream;
        if links.len() >= max {
            return Err(status(self.node.refuse("sessions_per_stream", max)));
        }
        let link = self
            .node
            .open_stream(client_name, self.peer, Some((self.waker.clone(), channel)))
            .map_err(status)?;
        tracing::debug!(session = %link.id, client = %client_name, channel, "session opened");
        links.insert(channel, link);
        Ok(())
    }

    fn link(&self, channel: u32) -> Option<Arc<SessionLink>> {
        self.links.lock().get(&channel).cloned()
    }
}

/// A message saying the session on `channel` has ended.
fn closed(channel: u32, reason: impl Into<String>) -> v1::ServerMessage {
    v1::ServerMessage {
        channel,
        kind: Some(v1::server_message::Kind::Closed(v1::Closed {
            reason: reason.into(),
        })),
    }
}

/// The writer of a stream: every session's queued items, taken when its
/// channel is woken, and the replies, interleaved. A session the node
/// ended is said to be closed after what it had queued; the stream ends
/// when the client's side does, or when the node has ended every session
/// it carried.
fn outbound(carrier: Arc<Carrier>, replies: mpsc::Receiver<v1::ServerMessage>) -> SessionStream {
    // Waited for across every message (not made anew for each).
    let stop = Box::pin(carrier.done.clone().cancelled_owned());
    // Dropped with the stream (however hyper ends it): the reader stops.
    let guard = carrier.done.clone().drop_guard();
    let state = (carrier, replies, VecDeque::new(), false, (stop, guard));
    Box::pin(futures_util::stream::unfold(
        state,
        |(carrier, mut replies, mut out, mut finished, (mut stop, guard))| async move {
            loop {
                if let Some(m) = out.pop_front() {
                    return Some((Ok(m), (carrier, replies, out, finished, (stop, guard))));
                }
                if finished {
                    // `write` ended the stream (the reader stops too).
                    return None;
                }
                tokio::select! {
                    r = replies.recv() => {
                        let m = r?;
                        return Some((Ok(m), (carrier, replies, out, finished, (stop, guard))));
                    }
                    channels = carrier.waker.ready() => {
                        finished = carrier.write(channels, &mut out);
                    }
                    _ = &mut stop => return None,
                }
            }
        },
    ))
}

impl Carrier {
    /// What the sessions on `channels` have queued, as messages into
    /// `out`. Returns whether the node has now ended every session the
    /// stream carried.
    fn write(&self, channels: Vec<u32>, out: &mut VecDeque<v1::ServerMessage>) -> bool {
        let mut items = Vec::new();
        let mut ended = false;
        for channel in channels {
            let Some(link) = self.link(channel) else {
                continue;
            };
            // Seen before taking the queue: what was queued before the
            // end goes out first, and an end after this wakes the writer
            // again.
            let ended_now = link.closed.is_cancelled();
            link.take_queued(&mut items);
            for item in items.drain(..) {
                if let Outbound::Update(update) = &item
                    && let Some(at) = update.changed_at
                {
                    self.node.metrics.pushes_sent.inc();
                    self.node
                        .metrics
                        .push_latency
                        .observe(at.elapsed().as_secs_f64());
                }
                out.push_back(self.node.native_message(item, channel));
            }
            if ended_now {
                let mut links = self.links.lock();
                links.remove(&channel);
                out.push_back(closed(channel, "the session has ended"));
                if links.is_empty() {
                    // No session opens on the stream from now on.
                    self.done.cancel();
                    ended = true;
                }
            }
        }
        ended
    }
}

/// The reading side of a stream: every message is activity for its
/// session; a hello opens a session, a close ends one; acks feed drain
/// tracking; calls are answered in order. When it ends, every session the
/// stream carried ends.
async fn inbound(
    carrier: Arc<Carrier>,
    mut rx: Streaming<v1::ClientMessage>,
    replies: mpsc::Sender<v1::ServerMessage>,
) {
    use v1::client_message::Kind;
    let node = carrier.node.clone();
    // Waited for across every message (not made anew for each).
    let stop = carrier.done.clone().cancelled_owned();
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            m = rx.message() => m,
            _ = &mut stop => break,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("session stream error: {e}");
                break;
            }
        };
        let channel = msg.channel;
        if let Some(Kind::Hello(hello)) = &msg.kind {
            if let Err(e) = carrier.open(channel, &hello.client_name) {
                tokio::select! {
                    sent = replies.send(closed(channel, e.message())) => if sent.is_err() { break },
                    _ = &mut stop => break,
                }
            }
            continue;
        }
        let Some(link) = carrier.link(channel) else {
            // A session that ended meanwhile (its close is on its way).
            continue;
        };
        // Any message is activity; a probe's answer is always recorded.
        link.active(&node, matches!(msg.kind, Some(Kind::ProbeReply(_))));
        match msg.kind {
            Some(Kind::Call(call)) => {
                let reply = v1::ServerMessage {
                    channel,
                    kind: Some(v1::server_message::Kind::Reply(calls::answer(
                        &node, &link.id, call,
                    ))),
                };
                tokio::select! {
                    sent = replies.send(reply) => if sent.is_err() { break },
                    _ = &mut stop => break,
                }
            }
            Some(Kind::Ack(ack)) => node.ack(&link.id, acked(&ack)),
            Some(Kind::Acks(acks)) => node.ack(&link.id, acks.acks.iter().filter_map(acked)),
            Some(Kind::Close(_)) => {
                // The client asked: no need to tell it.
                carrier.links.lock().remove(&channel);
                node.close_session(&link.id);
            }
            _ => {}
        }
    }
    carrier.done.cancel();
    node.metrics.session_streams.dec();
    let links: Vec<Arc<SessionLink>> = carrier.links.lock().drain().map(|(_, l)| l).collect();
    for link in links {
        node.close_session(&link.id);
    }
}

/// What an `Ack` acknowledges; one naming no valid service is ignored.
fn acked(ack: &v1::Ack) -> Option<(ServiceKey, u64)> {
    let key = required_key(ack.service.as_ref()).ok()?;
    Some((key, ack.revision))
}

#[tonic::async_trait]
impl registry_server::Registry for GrpcApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let mut rx = request.into_inner();
        // The first message names the client; it must come within the
        // keep-alive window like any other sign of life.
        let window = self.node.config().session.keepalive;
        let first = tokio::time::timeout(window, rx.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within the keep-alive window"))??;
        let (channel, client_name) = match first {
            Some(v1::ClientMessage {
                channel,
                kind: Some(v1::client_message::Kind::Hello(h)),
            }) => (channel, h.client_name),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a session stream must be hello",
                ));
            }
        };
        let carrier = Arc::new(Carrier {
            node: self.node.clone(),
            peer,
            links: Mutex::new(HashMap::new()),
            waker: Arc::new(StreamWaker::default()),
            done: self.node.shutdown.child_token(),
        });
        carrier.open(channel, &client_name)?;
        self.node.metrics.session_streams.inc();
        let (replies, replies_rx) = mpsc::channel(REPLIES_IN_FLIGHT);
        self.node.tasks.spawn(inbound(carrier.clone(), rx, replies));
        Ok(Response::new(outbound(carrier, replies_rx)))
    }

    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let caller = self.caller(&request)?;
        calls::register(&self.node, caller, request.get_ref()).map(Response::new)
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let caller = self.caller(&request)?;
        calls::deregister(&self.node, caller, request.get_ref()).map(Response::new)
    }

    async fn update(
        &self,
        request: Request<v1::UpdateRequest>,
    ) -> Result<Response<v1::UpdateResponse>, Status> {
        let caller = self.caller(&request)?;
        calls::update(&self.node, caller, request.get_ref()).map(Response::new)
    }

    async fn query(
        &self,
        request: Request<v1::QueryRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        self.node.require_serving().map_err(calls::status)?;
        let r = request.get_ref();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        let mut out = v1::QueryResponse {
            service: Some((&key).into()),
            ..Default::default()
        };
        if let Some(published) = self.node.view(&key) {
            let view = &published.view;
            out.revision = view.revision;
            out.checksum = view.checksum;
            out.instances = calls::matching(view, r)
                .map(|rec| rec.as_ref().into())
                .collect();
        }
        Ok(Response::new(out))
    }

    async fn list_services(
        &self,
        request: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        self.node.require_serving().map_err(calls::status)?;
        let r = request.into_inner();
        let services = crate::list_services(&self.node, &r.namespace, &r.group)
            .into_iter()
            .map(|s| v1::ServiceSummary {
                service: Some((&s.key).into()),
                instance_count: s.instances as u32,
                healthy_count: s.serving as u32,
                revision: s.revision,
                subscriber_count: s.subscribers as u32,
            })
            .collect();
        Ok(Response::new(v1::ListServicesResponse { services }))
    }

    async fn members(
        &self,
        _request: Request<v1::MembersRequest>,
    ) -> Result<Response<v1::MembersResponse>, Status> {
        let members = self
            .node
            .members()
            .into_iter()
            .map(|m| v1::Member {
                name: m.name,
                addresses: m.addresses,
                in_use: m.in_use.unwrap_or_default(),
                state: m.state.to_owned(),
                since_verify_ms: m.since_verify.map(|d| d.as_millis() as u64),
                incarnation: m.incarnation.unwrap_or_default(),
                sessions: m.sessions as u64,
                instances: m.instances as u64,
                pending: m.pending as u64,
            })
            .collect();
        Ok(Response::new(v1::MembersResponse { members }))
    }

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<v1::SubscribeResponse>, Status> {
        let caller = self.caller(&request)?;
        calls::subscribe(&self.node, caller, request.get_ref()).map(Response::new)
    }

    async fn unsubscribe(
        &self,
        request: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::UnsubscribeResponse>, Status> {
        let caller = self.caller(&request)?;
        calls::unsubscribe(&self.node, caller, request.get_ref()).map(Response::new)
    }

    async fn pull(
        &self,
        request: Request<v1::PullRequest>,
    ) -> Result<Response<v1::PullResponse>, Status> {
        calls::pull(&self.node, request.get_ref()).map(Response::new)
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let caller = self.caller(&request)?;
        let started = Instant::now();
        let r = request.get_ref();
        let out = calls::drain(&self.node, caller, r).await?;
        tracing::info!(took = ?started.elapsed(), pending = out.pending.len(), "drain finished");
        Ok(Response::new(out))
    }
}
