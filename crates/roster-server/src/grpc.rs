//! The native gRPC API: the `roster.v1.Registry` service over [`calls`],
//! and the session stream's two halves (inbound: activity, acks and calls;
//! outbound: pushes and replies merged). Holds no registry state.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use roster_core::ServiceKey;
use roster_proto::convert::required_key;
use roster_proto::v1::{self, registry_server};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::calls::{self, Caller, invalid, status};
use crate::node::{Node, SessionLink};
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

/// Replies a session may have waiting to be sent; the stream's calls are
/// not read further until the client takes them.
const REPLIES_IN_FLIGHT: usize = 64;

/// The outbound half of a session: the link's queue (pushes, probes) and
/// the replies to its calls, interleaved fairly.
fn outbound(
    node: Arc<Node>,
    link: Arc<SessionLink>,
    replies: mpsc::Receiver<v1::Reply>,
) -> SessionStream {
    let pushes = futures_util::stream::unfold((node, link), |(node, link)| async move {
        let item = link.next().await?;
        if let Outbound::Update(update) = &item
            && let Some(at) = update.changed_at
        {
            node.metrics.pushes_sent.inc();
            node.metrics
                .push_latency
                .observe(at.elapsed().as_secs_f64());
        }
        let message = node.native_message(item);
        Some((Ok(message), (node, link)))
    });
    let replies = ReceiverStream::new(replies).map(|reply| {
        Ok(v1::ServerMessage {
            kind: Some(v1::server_message::Kind::Reply(reply)),
        })
    });
    Box::pin(futures_util::stream::select(pushes, replies))
}

/// The inbound half: every message is activity; acks feed drain tracking;
/// calls are answered in order.
async fn inbound(
    node: Arc<Node>,
    link: Arc<SessionLink>,
    mut rx: Streaming<v1::ClientMessage>,
    replies: mpsc::Sender<v1::Reply>,
) {
    use v1::client_message::Kind;
    loop {
        let msg = tokio::select! {
            m = rx.message() => m,
            _ = link.closed.cancelled() => break,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(session = %link.id, "session stream error: {e}");
                break;
            }
        };
        // Any message is activity; a probe's answer is always recorded.
        link.active(&node, matches!(msg.kind, Some(Kind::ProbeReply(_))));
        match msg.kind {
            Some(Kind::Call(call)) => {
                let reply = calls::answer(&node, &link.id, call);
                tokio::select! {
                    sent = replies.send(reply) => if sent.is_err() { break },
                    _ = link.closed.cancelled() => break,
                }
            }
            Some(Kind::Ack(ack)) => node.ack(&link.id, acked(&ack)),
            Some(Kind::Acks(acks)) => node.ack(&link.id, acks.acks.iter().filter_map(acked)),
            _ => {}
        }
    }
    node.close_session(&link.id);
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
        let client_name = match first.and_then(|m| m.kind) {
            Some(v1::client_message::Kind::Hello(h)) => h.client_name,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a session must be hello",
                ));
            }
        };
        if !client_name.is_empty() {
            roster_core::model::validate_name("hello.client_name", &client_name)
                .map_err(invalid)?;
        }
        let link = self.node.open_stream(&client_name, peer).map_err(status)?;
        tracing::debug!(session = %link.id, client = %client_name, "session opened");
        let (replies, replies_rx) = mpsc::channel(REPLIES_IN_FLIGHT);
        self.node
            .tasks
            .spawn(inbound(self.node.clone(), link.clone(), rx, replies));
        Ok(Response::new(outbound(self.node.clone(), link, replies_rx)))
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
