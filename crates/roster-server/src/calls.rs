//! What each native call does, shared by the unary RPCs and the calls made
//! on a session stream: a request in, a response or a status with a reason
//! out. Owns request validation, deciding which session a call acts for
//! (its stream's; one it proves it holds; or, with the admin token, the
//! owner of the instance it names) and error mapping. No transport here.

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::Bytes;
use prost::Message;
use roster_core::model::InstanceRecord;
use roster_core::service::ServiceView;
use roster_core::{RegistryError, ServiceKey, ValidationError};
use roster_proto::convert::{empty_update, required_key};
use roster_proto::v1;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::node::{Node, PullAnswer};

pub use roster_proto::{ADMIN_TOKEN_HEADER, SESSION_TOKEN_HEADER};

/// Maps a registry error to a gRPC status with a reason.
pub fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(e) => Status::invalid_argument(e.to_string()),
        e @ (RegistryError::UnknownSession(_)
        | RegistryError::UnknownService(_)
        | RegistryError::UnknownInstance { .. }) => Status::not_found(e.to_string()),
        e @ (RegistryError::NotOwner { .. } | RegistryError::Forbidden(_)) => {
            Status::permission_denied(e.to_string())
        }
        e @ RegistryError::SessionExists(_) => Status::already_exists(e.to_string()),
        RegistryError::Unavailable(m) => Status::unavailable(m),
        RegistryError::Unsupported(m) => Status::unimplemented(m),
        RegistryError::Limit(hit) => Status::resource_exhausted(hit.to_string()),
    }
}

pub(crate) fn invalid(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Who makes a call.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A call on this session's stream: it acts for that session.
    Stream(&'a str),
    /// A unary call: from this connection, with these credentials.
    Unary {
        /// The connection it came on.
        peer: Option<SocketAddr>,
        /// A session token it gave.
        token: Option<u128>,
        /// Whether it gave the node's admin token.
        admin: bool,
    },
}

impl<'a> Caller<'a> {
    /// The caller of a unary RPC, from its connection and metadata.
    pub fn unary(
        node: &Node,
        peer: Option<SocketAddr>,
        metadata: &MetadataMap,
    ) -> Result<Self, Status> {
        let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
        let token = match header(SESSION_TOKEN_HEADER) {
            None => None,
            Some(text) => Some(crate::node::links::parse_token(text).ok_or_else(|| {
                Status::invalid_argument(format!("{SESSION_TOKEN_HEADER}: not a session token"))
            })?),
        };
        let admin = match header(ADMIN_TOKEN_HEADER) {
            None => false,
            Some(given) => {
                if !admin_token_matches(node, given) {
                    return Err(Status::permission_denied(format!(
                        "{ADMIN_TOKEN_HEADER}: not this node's admin token"
                    )));
                }
                true
            }
        };
        Ok(Caller::Unary { peer, token, admin })
    }
}

/// Whether `given` is the node's admin token (never when none is set).
pub fn admin_token_matches(node: &Node, given: &str) -> bool {
    let expected = node.config().admin.token.as_bytes();
    let given = given.trim().as_bytes();
    // Compared in full whatever the first difference.
    !expected.is_empty()
        && expected.len() == given.len()
        && expected
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The session a call acts for. `given` is the request's `session_id`;
/// `target` the instance a change names (an operator's call acts for its
/// owner).
fn acting<'a>(
    node: &Node,
    caller: Caller<'a>,
    given: &'a str,
    target: Option<(&ServiceKey, &str)>,
) -> Result<Cow<'a, str>, Status> {
    match caller {
        Caller::Stream(own) if given.is_empty() || given == own => Ok(Cow::Borrowed(own)),
        Caller::Stream(_) => Err(Status::invalid_argument(
            "session_id: a call on a session stream acts for that session; leave it empty",
        )),
        Caller::Unary { peer, token, .. } if !given.is_empty() => {
            node.authorize(given, peer, token).map_err(status)?;
            Ok(Cow::Borrowed(given))
        }
        Caller::Unary { admin: true, .. } => match target {
            Some((key, id)) => node
                .owning_session(key, id)
                .map(|s| Cow::Owned(s.to_string()))
                .map_err(status),
            None => Err(Status::invalid_argument("session_id: required")),
        },
        Caller::Unary { .. } => Err(Status::invalid_argument(
            "session_id: required (the session that owns the instance; open a session first)",
        )),
    }
}

/// Resolves an instance reference to (service, instance id).
pub(crate) fn instance_ref(r: Option<&v1::InstanceRef>) -> Result<(ServiceKey, String), Status> {
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

/// The model of a request's `instance`, which must be there.
fn required_instance(i: Option<&v1::Instance>) -> Result<roster_core::Instance, Status> {
    i.ok_or_else(|| Status::invalid_argument("instance: is required"))?
        .to_model()
        .map_err(invalid)
}

pub fn register(
    node: &Node,
    caller: Caller<'_>,
    r: &v1::RegisterRequest,
) -> Result<v1::RegisterResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let instance = required_instance(r.instance.as_ref())?;
    let session = acting(node, caller, &r.session_id, None)?;
    let (instance_id, revision) = node.register(&session, key, instance).map_err(status)?;
    Ok(v1::RegisterResponse {
        instance_id,
        revision,
    })
}

pub fn deregister(
    node: &Node,
    caller: Caller<'_>,
    r: &v1::DeregisterRequest,
) -> Result<v1::DeregisterResponse, Status> {
    let (key, id) = instance_ref(r.instance.as_ref())?;
    let session = acting(node, caller, &r.session_id, Some((&key, &id)))?;
    let revision = node.deregister(&session, &key, &id).map_err(status)?;
    Ok(v1::DeregisterResponse { revision })
}

pub fn update(
    node: &Node,
    caller: Caller<'_>,
    r: &v1::UpdateRequest,
) -> Result<v1::UpdateResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let patch = required_instance(r.instance.as_ref())?
        .normalize()
        .map_err(invalid)?;
    let session = acting(node, caller, &r.session_id, Some((&key, &patch.id)))?;
    let revision = node.update(&session, &key, patch).map_err(status)?;
    Ok(v1::UpdateResponse { revision })
}

/// Drains an instance for the session that owns it (see [`Node::drain`]).
pub async fn drain(
    node: &Node,
    caller: Caller<'_>,
    r: &v1::DrainRequest,
) -> Result<v1::DrainResponse, Status> {
    let (key, id) = instance_ref(r.instance.as_ref())?;
    let session = acting(node, caller, &r.session_id, Some((&key, &id)))?;
    let timeout = if r.timeout_ms == 0 {
        node.config().push.drain_timeout
    } else {
        std::time::Duration::from_millis(r.timeout_ms)
    };
    let out = node
        .drain(&session, &key, &id, r.remove, timeout)
        .await
        .map_err(status)?;
    Ok(v1::DrainResponse {
        revision: out.revision,
        complete: out.pending.is_empty(),
        acknowledged: out.acknowledged,
        pending: out.pending,
        gone: out.gone,
        unconfirmable: out.unconfirmable,
    })
}

/// The records of `view` a query asks for.
pub fn matching<'a>(
    view: &'a ServiceView,
    r: &'a v1::QueryRequest,
) -> impl Iterator<Item = &'a std::sync::Arc<InstanceRecord>> + 'a {
    view.instances
        .values()
        .filter(|rec| !r.healthy_only || rec.instance.is_serving())
        .filter(|rec| r.clusters.is_empty() || r.clusters.contains(&rec.instance.cluster))
}

/// A query's answer as an encoded `ServiceUpdate` with the full view: an
/// unfiltered one is the view's shared encoding (made once per revision),
/// so answering it encodes nothing.
pub fn query_encoded(node: &Node, r: &v1::QueryRequest) -> Result<Bytes, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let Some(published) = node.view(&key) else {
        return Ok(Bytes::from(
            empty_update(&key, node.epoch()).encode_to_vec(),
        ));
    };
    if !r.healthy_only && r.clusters.is_empty() {
        return Ok(node.encoded(&published));
    }
    let view = &published.view;
    let update = v1::ServiceUpdate {
        service: Some((&key).into()),
        revision: view.revision,
        checksum: view.checksum,
        kind: Some(v1::service_update::Kind::Full(v1::FullView {
            instances: matching(view, r).map(|rec| rec.as_ref().into()).collect(),
        })),
        epoch: Some(node.epoch().clone()),
    };
    Ok(Bytes::from(update.encode_to_vec()))
}

pub fn subscribe(
    node: &Node,
    caller: Caller<'_>,
    r: &v1::SubscribeRequest,
) -> Result<v1::SubscribeResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let session = acting(node, caller, &r.session_id, None)?;
    let update = node.subscribe(&session, key).map_err(status)?;
    Ok(v1::SubscribeResponse {
        view: Some(node.full_message(&update)),
    })
}

pub fn unsubscribe(
    node: &Node,
    caller: Caller<'_>,
    r: &v1::UnsubscribeRequest,
) -> Result<v1::UnsubscribeResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let session = acting(node, caller, &r.session_id, None)?;
    node.unsubscribe(&session, &key);
    Ok(v1::UnsubscribeResponse {})
}

pub fn pull(node: &Node, r: &v1::PullRequest) -> Result<v1::PullResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let epoch = Some(node.epoch().clone());
    Ok(match node.pull(&key, r.since_revision, r.since_checksum) {
        PullAnswer::NotModified { revision, checksum } => v1::PullResponse {
            not_modified: true,
            revision,
            checksum,
            update: None,
            epoch,
        },
        PullAnswer::Update(u) => v1::PullResponse {
            not_modified: false,
            revision: u.revision,
            checksum: u.checksum,
            update: Some(u),
            epoch,
        },
    })
}

/// Answers a call made on `session`'s stream.
pub fn answer(node: &Node, session: &str, call: v1::Call) -> v1::Reply {
    use v1::call::Request as Q;
    use v1::reply::Result as A;
    let caller = Caller::Stream(session);
    let result = match call.request {
        Some(Q::Register(r)) => register(node, caller, &r).map(A::Register),
        Some(Q::Deregister(r)) => deregister(node, caller, &r).map(A::Deregister),
        Some(Q::Update(r)) => update(node, caller, &r).map(A::Update),
        Some(Q::Query(r)) => query_encoded(node, &r).map(A::Query),
        Some(Q::Subscribe(r)) => subscribe(node, caller, &r).map(A::Subscribe),
        Some(Q::Unsubscribe(r)) => unsubscribe(node, caller, &r).map(A::Unsubscribe),
        Some(Q::Pull(r)) => pull(node, &r).map(A::Pull),
        None => Err(Status::new(
            Code::InvalidArgument,
            "call.request: is required (or names a call this server does not know)",
        )),
    };
    v1::Reply {
        id: call.id,
        result: Some(result.unwrap_or_else(|s| {
            A::Error(v1::CallError {
                code: s.code() as i32,
                message: s.message().to_owned(),
            })
        })),
    }
}
