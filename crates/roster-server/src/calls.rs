//! What each native call does, shared by the unary RPCs and the calls made
//! on a session stream: a request in, a response or a status with a reason
//! out. Owns request validation and error mapping; no transport here.

use bytes::Bytes;
use prost::Message;
use roster_core::model::InstanceRecord;
use roster_core::service::ServiceView;
use roster_core::{RegistryError, ServiceKey, ValidationError};
use roster_proto::convert::required_key;
use roster_proto::v1;
use tonic::{Code, Status};

use crate::node::{Node, PullAnswer};

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

pub(crate) fn invalid(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The session a call acts for. A unary call names it; a call on a
/// session stream acts for that stream's session, and a name given there
/// must be that one.
fn acting<'a>(given: &'a str, stream: Option<&'a str>) -> Result<&'a str, Status> {
    match stream {
        None if given.is_empty() => Err(Status::invalid_argument(
            "session_id: required (open a session first)",
        )),
        None => Ok(given),
        Some(own) if given.is_empty() || given == own => Ok(own),
        Some(_) => Err(Status::invalid_argument(
            "session_id: a call on a session stream acts for that session; leave it empty",
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
    stream: Option<&str>,
    r: &v1::RegisterRequest,
) -> Result<v1::RegisterResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let instance = required_instance(r.instance.as_ref())?;
    let session = acting(&r.session_id, stream)?;
    let (instance_id, revision) = node.register(session, key, instance).map_err(status)?;
    Ok(v1::RegisterResponse {
        instance_id,
        revision,
    })
}

pub fn deregister(
    node: &Node,
    r: &v1::DeregisterRequest,
) -> Result<v1::DeregisterResponse, Status> {
    let (key, id) = instance_ref(r.instance.as_ref())?;
    let revision = node.deregister(&key, &id).map_err(status)?;
    Ok(v1::DeregisterResponse { revision })
}

pub fn update(node: &Node, r: &v1::UpdateRequest) -> Result<v1::UpdateResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let patch = required_instance(r.instance.as_ref())?
        .normalize()
        .map_err(invalid)?;
    let revision = node.update(&key, patch).map_err(status)?;
    Ok(v1::UpdateResponse { revision })
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
    let Some(view) = node.view(&key) else {
        return Ok(Bytes::from(
            v1::ServiceUpdate {
                service: Some((&key).into()),
                kind: Some(v1::service_update::Kind::Full(v1::FullView::default())),
                ..Default::default()
            }
            .encode_to_vec(),
        ));
    };
    if !r.healthy_only && r.clusters.is_empty() {
        return Ok(crate::node::encoded_view(&view));
    }
    let update = v1::ServiceUpdate {
        service: Some((&key).into()),
        revision: view.revision,
        checksum: view.checksum,
        kind: Some(v1::service_update::Kind::Full(v1::FullView {
            instances: matching(&view, r).map(|rec| rec.as_ref().into()).collect(),
        })),
    };
    Ok(Bytes::from(update.encode_to_vec()))
}

pub fn subscribe(
    node: &Node,
    stream: Option<&str>,
    r: &v1::SubscribeRequest,
) -> Result<v1::SubscribeResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let session = acting(&r.session_id, stream)?;
    let view = node.subscribe(session, key).map_err(status)?;
    Ok(v1::SubscribeResponse { view: Some(view) })
}

pub fn unsubscribe(
    node: &Node,
    stream: Option<&str>,
    r: &v1::UnsubscribeRequest,
) -> Result<v1::UnsubscribeResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    let session = acting(&r.session_id, stream)?;
    node.unsubscribe(session, &key);
    Ok(v1::UnsubscribeResponse {})
}

pub fn pull(node: &Node, r: &v1::PullRequest) -> Result<v1::PullResponse, Status> {
    let key = required_key(r.service.as_ref()).map_err(invalid)?;
    Ok(match node.pull(&key, r.since_revision, r.since_checksum) {
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
    })
}

/// Answers a call made on `session`'s stream.
pub fn answer(node: &Node, session: &str, call: v1::Call) -> v1::Reply {
    use v1::call::Request as Q;
    use v1::reply::Result as A;
    let stream = Some(session);
    let result = match call.request {
        Some(Q::Register(r)) => register(node, stream, &r).map(A::Register),
        Some(Q::Deregister(r)) => deregister(node, &r).map(A::Deregister),
        Some(Q::Update(r)) => update(node, &r).map(A::Update),
        Some(Q::Query(r)) => query_encoded(node, &r).map(A::Query),
        Some(Q::Subscribe(r)) => subscribe(node, stream, &r).map(A::Subscribe),
        Some(Q::Unsubscribe(r)) => unsubscribe(node, stream, &r).map(A::Unsubscribe),
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
