//! The native gRPC API: translates `roster.v1.Registry` calls into [`Node`]
//! operations and errors into statuses. Owns the session stream's two
//! halves (inbound loop, outbound queue drain); holds no registry state.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use roster_core::{RegistryError, ServiceKey, ValidationError};
use roster_proto::convert::required_key;
use roster_proto::v1::{self, registry_server};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::node::{Node, PullAnswer, SessionLink};

/// Maps a registry error to a gRPC status with a reason.
pub fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(e) => Status::invalid_argument(e.to_string()),
        e @ (RegistryError::UnknownSession(_)
        | RegistryError::UnknownService(_)
        | RegistryError::UnknownInstance { .. }) => Status::not_found(e.to_string()),
        RegistryError::Unsupported(m) => Status::unimplemented(m),
    }
}

fn invalid(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The gRPC service over a node.
pub struct GrpcApi {
    node: Arc<Node>,
}

impl GrpcApi {
    /// A service answering for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// Resolves an instance reference to (service, instance id).
fn instance_ref(r: Option<&v1::InstanceRef>) -> Result<(ServiceKey, String), Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("instance: is required"))?;
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    if !r.id.is_empty() {
        return Ok((key, r.id.clone()));
    }
    let ip = roster_core::model::parse_ip("instance.ip", &r.ip).map_err(invalid)?;
    let port = u16::try_from(r.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument("instance.port: must be 1..=65535"))?;
    let cluster = if r.cluster.is_empty() {
        roster_core::DEFAULT_CLUSTER
    } else {
        &r.cluster
    };
    Ok((key, roster_core::Instance::default_id(&ip, port, cluster)))
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

/// The outbound half of a session: drains the link's queue.
fn outbound(node: Arc<Node>, link: Arc<SessionLink>) -> SessionStream {
    Box::pin(futures_util::stream::unfold(
        (node, link),
        |(node, link)| async move {
            let item = link.next().await?;
            let frame = node.materialize(&link, item)?;
            if let Some(at) = frame.changed_at {
                node.metrics.pushes_sent.inc();
                node.metrics
                    .push_latency
                    .observe(at.elapsed().as_secs_f64());
            }
            Some((Ok(frame.message), (node, link)))
        },
    ))
}

/// The inbound half: every message is activity; acks feed drain tracking.
async fn inbound(node: Arc<Node>, link: Arc<SessionLink>, mut rx: Streaming<v1::ClientMessage>) {
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
        node.touch(&link.id);
        if let Some(Kind::Ack(ack)) = msg.kind
            && let Ok(key) = required_key(ack.service.as_ref())
        {
            node.ack(&link.id, &key, ack.revision);
        }
    }
    node.close_session(&link.id);
}

#[tonic::async_trait]
impl registry_server::Registry for GrpcApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
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
        let link = self.node.open_stream(&client_name);
        tracing::debug!(session = %link.id, client = %client_name, "session opened");
        tokio::spawn(inbound(self.node.clone(), link.clone(), rx));
        Ok(Response::new(outbound(self.node.clone(), link)))
    }

    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = request.into_inner();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        let instance = r
            .instance
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("instance: is required"))?
            .to_model()
            .map_err(invalid)?;
        if r.session_id.is_empty() {
            return Err(Status::invalid_argument(
                "session_id: required (open a session first)",
            ));
        }
        let (instance_id, revision) = self
            .node
            .register(&r.session_id, key, instance)
            .map_err(status)?;
        Ok(Response::new(v1::RegisterResponse {
            instance_id,
            revision,
        }))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let (key, id) = instance_ref(request.get_ref().instance.as_ref())?;
        let revision = self.node.deregister(&key, &id).map_err(status)?;
        Ok(Response::new(v1::DeregisterResponse { revision }))
    }

    async fn update(
        &self,
        request: Request<v1::UpdateRequest>,
    ) -> Result<Response<v1::UpdateResponse>, Status> {
        let r = request.into_inner();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        let patch = r
            .instance
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("instance: is required"))?
            .to_model()
            .map_err(invalid)?
            .normalize()
            .map_err(invalid)?;
        let revision = self.node.update(&key, patch).map_err(status)?;
        Ok(Response::new(v1::UpdateResponse { revision }))
    }

    async fn query(
        &self,
        request: Request<v1::QueryRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        let r = request.into_inner();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        let mut out = v1::QueryResponse {
            service: Some((&key).into()),
            ..Default::default()
        };
        if let Some(view) = self.node.view(&key) {
            out.revision = view.revision;
            out.checksum = view.checksum;
            out.instances = view
                .instances
                .values()
                .filter(|rec| !r.healthy_only || rec.instance.is_serving())
                .filter(|rec| r.clusters.is_empty() || r.clusters.contains(&rec.instance.cluster))
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
        let r = request.into_inner();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        let view = self.node.subscribe(&r.session_id, key).map_err(status)?;
        Ok(Response::new(v1::SubscribeResponse { view: Some(view) }))
    }

    async fn unsubscribe(
        &self,
        request: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::UnsubscribeResponse>, Status> {
        let r = request.into_inner();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        self.node.unsubscribe(&r.session_id, &key);
        Ok(Response::new(v1::UnsubscribeResponse {}))
    }

    async fn pull(
        &self,
        request: Request<v1::PullRequest>,
    ) -> Result<Response<v1::PullResponse>, Status> {
        let r = request.into_inner();
        let key = required_key(r.service.as_ref()).map_err(invalid)?;
        let out = match self.node.pull(&key, r.since_revision, r.since_checksum) {
            PullAnswer::NotModified { revision, checksum } => v1::PullResponse {
                not_modified: true,
                revision,
                checksum,
                update: None,
            },
            PullAnswer::Update(u) => v1::PullResponse {
                not_modified: false,
                revision: u.revision,
                checksum: u.checksum,
                update: Some(u),
            },
        };
        Ok(Response::new(out))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let r = request.into_inner();
        let (key, id) = instance_ref(r.instance.as_ref())?;
        let timeout = if r.timeout_ms == 0 {
            self.node.config().push.drain_timeout
        } else {
            Duration::from_millis(r.timeout_ms)
        };
        let started = Instant::now();
        let out = self
            .node
            .drain(&key, &id, r.remove, timeout)
            .await
            .map_err(status)?;
        tracing::info!(service = %key, instance = %id, took = ?started.elapsed(), pending = out.pending.len(), "drain finished");
        Ok(Response::new(v1::DrainResponse {
            revision: out.revision,
            complete: out.pending.is_empty(),
            acknowledged: out.acknowledged,
            pending: out.pending,
        }))
    }
}
