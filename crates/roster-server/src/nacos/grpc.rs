//! The Nacos 2.x gRPC protocol on the gRPC port: `Request/request` (unary)
//! and `BiRequestStream/requestBiStream`, JSON bodies dispatched on
//! `metadata.type`. A connection (keyed by the peer address, as unary calls
//! and the stream share one HTTP/2 connection) is a Roster stream session:
//! its instances live as long as it does, pushes go out as
//! `NotifySubscriberRequest`s whose acknowledgements feed drain tracking,
//! and the session probe becomes a `ClientDetectionRequest`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::Stream;
use parking_lot::{Mutex, RwLock};
use roster_core::push::Outbound;
use roster_core::{RegistryError, ServiceKey, SessionId};
use roster_proto::nacos::{
    Any, Metadata, Payload, bi_request_stream_server::BiRequestStream, request_server,
};
use roster_proto::v1;
use serde_json::{Value, json};
use tonic::{Response, Status, Streaming};

use super::Nacos;
use super::wire::{self, InfoRequest, flag, integer, text};
use crate::node::{Frame, SessionLink};

/// Nacos error codes (`NacosException`).
mod code {
    pub const UN_REGISTER: i64 = 301;
    pub const INVALID_PARAM: i64 = 400;
    pub const NOT_IMPLEMENTED: i64 = 501;
    pub const BAD_GATEWAY: i64 = 502;
}

/// One Nacos gRPC connection.
struct Conn {
    /// What `ServerCheckResponse` called it.
    id: String,
    /// Its Roster session.
    link: Arc<SessionLink>,
    /// Subscribed services and the cluster list each asked for.
    subs: Mutex<HashMap<ServiceKey, String>>,
    /// Server→client request ids, unique per connection.
    next_request: AtomicU64,
    /// Pushes sent and not yet acknowledged: request id → revision.
    pending: Mutex<HashMap<String, (ServiceKey, u64)>>,
}

impl Conn {
    fn session(&self) -> &SessionId {
        &self.link.id
    }
}

/// Both Nacos gRPC services of one node.
#[derive(Clone)]
pub struct NacosGrpc {
    nacos: Arc<Nacos>,
    conns: Arc<RwLock<HashMap<SocketAddr, Arc<Conn>>>>,
}

/// A failed request, answered as an `ErrorResponse`.
struct Failure {
    code: i64,
    message: String,
}

impl Failure {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<roster_core::ValidationError> for Failure {
    fn from(e: roster_core::ValidationError) -> Self {
        Self::new(code::INVALID_PARAM, e.to_string())
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        let code = match &e {
            RegistryError::Invalid(_) => code::INVALID_PARAM,
            RegistryError::UnknownSession(_) => code::UN_REGISTER,
            RegistryError::Unsupported(_) => code::NOT_IMPLEMENTED,
            RegistryError::UnknownService(_) | RegistryError::UnknownInstance { .. } => {
                code::INVALID_PARAM
            }
        };
        Self::new(code, e.to_string())
    }
}

/// A payload of `kind` with a JSON body.
fn payload(kind: &str, body: &Value) -> Payload {
    raw_payload(kind, serde_json::to_vec(body).unwrap_or_default())
}

/// A payload around a JSON body already serialized.
fn raw_payload(kind: &str, body: Vec<u8>) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: kind.to_owned(),
            client_ip: String::new(),
            headers: HashMap::new(),
        }),
        body: Some(Any {
            type_url: String::new(),
            value: Bytes::from(body),
        }),
    }
}

/// The JSON object `head` with a `serviceInfo` field holding `info`, a
/// shared, already serialized `ServiceInfo`.
fn with_service_info(head: Value, info: &str) -> Vec<u8> {
    let mut body = head.to_string();
    body.pop(); // the closing brace
    body.push_str(",\"serviceInfo\":");
    body.push_str(info);
    body.push('}');
    body.into_bytes()
}

/// The common fields of a successful reply.
fn reply_head(request_id: &str) -> Value {
    json!({
        "resultCode": 200,
        "errorCode": 0,
        "message": "",
        "requestId": request_id,
        "success": true,
    })
}

/// A successful reply: the common fields plus `fields`.
fn reply(kind: &str, request_id: &str, fields: Value) -> Payload {
    let mut body = reply_head(request_id);
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), fields) {
        b.extend(extra);
    }
    payload(kind, &body)
}

fn error_reply(request_id: &str, failure: &Failure) -> Payload {
    payload(
        "ErrorResponse",
        &json!({
            "resultCode": 500,
            "errorCode": failure.code,
            "message": failure.message,
            "requestId": request_id,
            "success": false,
        }),
    )
}

/// The JSON body of a payload.
fn body_of(p: &Payload) -> Result<Value, Failure> {
    let bytes = p.body.as_ref().map(|b| &b.value[..]).unwrap_or(b"{}");
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Failure::new(code::BAD_GATEWAY, format!("unparseable body: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(Failure::new(
            code::BAD_GATEWAY,
            "the body is not a JSON object",
        ))
    }
}

fn kind_of(p: &Payload) -> &str {
    p.metadata.as_ref().map_or("", |m| m.r#type.as_str())
}

fn key_of(body: &Value) -> Result<ServiceKey, Failure> {
    Ok(wire::service_key(
        text(body, "namespace"),
        text(body, "groupName"),
        text(body, "serviceName"),
    )?)
}

impl NacosGrpc {
    /// The services for `nacos`.
    pub fn new(nacos: Arc<Nacos>) -> Self {
        Self {
            nacos,
            conns: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    fn connection_id(&self, peer: SocketAddr) -> String {
        format!(
            "{:x}_{}_{}",
            self.nacos.node.incarnation(),
            peer.ip(),
            peer.port()
        )
    }

    fn handle(&self, peer: Option<SocketAddr>, kind: &str, body: &Value, rid: &str) -> Payload {
        if kind == "ServerCheckRequest" {
            let id = peer.map(|p| self.connection_id(p)).unwrap_or_default();
            return reply(
                "ServerCheckResponse",
                rid,
                json!({"connectionId": id, "supportAbilityNegotiation": false}),
            );
        }
        let conn = peer.and_then(|p| self.conns.read().get(&p).cloned());
        let Some(conn) = conn else {
            return error_reply(
                rid,
                &Failure::new(code::UN_REGISTER, "Connection is unregistered."),
            );
        };
        self.nacos.node.touch(conn.session());
        let outcome = match kind {
            "HealthCheckRequest" => Ok(reply("HealthCheckResponse", rid, json!({}))),
            "InstanceRequest" => self.instance(&conn, body, rid),
            "BatchInstanceRequest" => self.batch(&conn, body, rid),
            "PersistentInstanceRequest" => Err(Failure::new(
                code::NOT_IMPLEMENTED,
                "persistent instances (ephemeral=false) are not supported by Roster yet; \
                 register ephemeral instances",
            )),
            "SubscribeServiceRequest" => self.subscribe(&conn, body, rid),
            "ServiceQueryRequest" => self.query(body, rid),
            "ServiceListRequest" => self.list(body, rid),
            other => Err(Failure::new(
                code::INVALID_PARAM,
                format!("Unsupported request type {other:?}"),
            )),
        };
        outcome.unwrap_or_else(|f| error_reply(rid, &f))
    }

    fn instance(&self, conn: &Conn, body: &Value, rid: &str) -> Result<Payload, Failure> {
        let key = key_of(body)?;
        let action = text(body, "type").unwrap_or_default();
        let raw = body.get("instance").unwrap_or(&Value::Null);
        match action {
            "registerInstance" => {
                let mut instance = wire::instance(raw)?;
                instance.ephemeral = true;
                self.nacos.node.register(conn.session(), key, instance)?;
            }
            "deregisterInstance" => {
                let instance = wire::instance(raw)?.normalize()?;
                if let Some(id) = self.nacos.find(&key, &instance) {
                    self.nacos.deregister(&key, &id);
                }
            }
            other => {
                return Err(Failure::new(
                    code::INVALID_PARAM,
                    format!("unknown InstanceRequest type {other:?}"),
                ));
            }
        }
        Ok(reply("InstanceResponse", rid, json!({ "type": action })))
    }

    /// Replaces the set of instances this connection publishes for the
    /// service with the batch (an empty batch removes them all).
    fn batch(&self, conn: &Conn, body: &Value, rid: &str) -> Result<Payload, Failure> {
        let key = key_of(body)?;
        let empty = Vec::new();
        let raw = body
            .get("instances")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        // Validate the whole batch first: nothing is applied if one is bad.
        let mut instances = Vec::with_capacity(raw.len());
        for (n, r) in raw.iter().enumerate() {
            let mut i = wire::instance(r)
                .map_err(|e| Failure::new(code::INVALID_PARAM, format!("instances[{n}]: {e}")))?;
            i.ephemeral = true;
            instances.push(i.normalize()?);
        }
        let mut kept = HashSet::new();
        for i in instances {
            let (id, _) = self.nacos.node.register(conn.session(), key.clone(), i)?;
            kept.insert(id);
        }
        if let Some(view) = self.nacos.node.view(&key) {
            for r in view.instances.values() {
                if r.owner == *conn.session() && !kept.contains(&r.instance.id) {
                    let _ = self.nacos.node.deregister(&key, &r.instance.id);
                }
            }
        }
        let action = text(body, "type").unwrap_or("batchRegisterInstance");
        Ok(reply(
            "BatchInstanceResponse",
            rid,
            json!({ "type": action }),
        ))
    }

    fn subscribe(&self, conn: &Conn, body: &Value, rid: &str) -> Result<Payload, Failure> {
        let key = key_of(body)?;
        let clusters = text(body, "clusters").unwrap_or_default().to_owned();
        if flag(body, "subscribe").unwrap_or(true) {
            conn.subs.lock().insert(key.clone(), clusters.clone());
            self.nacos.node.subscribe(conn.session(), key.clone())?;
        } else {
            conn.subs.lock().remove(&key);
            self.nacos.node.unsubscribe(conn.session(), &key);
            self.forget_unwatched([&key]);
        }
        let (_, info) = self.nacos.service_info(
            &key,
            &InfoRequest {
                clusters: &clusters,
                healthy_only: false,
                grouped_name: false,
            },
        );
        Ok(reply(
            "SubscribeServiceResponse",
            rid,
            json!({ "serviceInfo": info }),
        ))
    }

    fn query(&self, body: &Value, rid: &str) -> Result<Payload, Failure> {
        let key = key_of(body)?;
        let clusters = text(body, "cluster")
            .or_else(|| text(body, "clusters"))
            .unwrap_or_default();
        let healthy_only = flag(body, "healthyOnly")
            .or_else(|| flag(body, "healthOnly"))
            .unwrap_or(false);
        // The common query shares the text pushes use; a filtered one
        // is built for the asker alone.
        if !healthy_only && clusters.is_empty() {
            let (_, info) = self.nacos.shared_info(&key, clusters);
            return Ok(raw_payload(
                "QueryServiceResponse",
                with_service_info(reply_head(rid), &info),
            ));
        }
        let (_, info) = self.nacos.service_info(
            &key,
            &InfoRequest {
                clusters,
                healthy_only,
                grouped_name: false,
            },
        );
        Ok(reply(
            "QueryServiceResponse",
            rid,
            json!({ "serviceInfo": info }),
        ))
    }

    fn list(&self, body: &Value, rid: &str) -> Result<Payload, Failure> {
        let namespace =
            roster_core::ServiceKey::new(text(body, "namespace").unwrap_or_default(), "", "x")?
                .namespace;
        let group = wire::group_or_default(text(body, "groupName"));
        let page_no = integer(body, "pageNo").unwrap_or(1).max(1);
        let page_size = integer(body, "pageSize").unwrap_or(10).max(0);
        let (count, names) = self
            .nacos
            .page_of_services(&namespace, group, page_no, page_size);
        Ok(reply(
            "ServiceListResponse",
            rid,
            json!({ "count": count, "serviceNames": names }),
        ))
    }

    /// A message the client sent on the stream.
    fn stream_message(&self, conn: &Conn, p: &Payload) {
        self.nacos.node.touch(conn.session());
        let Ok(body) = body_of(p) else {
            tracing::debug!(connection = %conn.id, "unparseable stream message");
            return;
        };
        match kind_of(p) {
            "NotifySubscriberResponse" => {
                let rid = text(&body, "requestId").unwrap_or_default();
                let acked = conn.pending.lock().remove(rid);
                if let Some((key, revision)) = acked
                    && integer(&body, "resultCode").unwrap_or(200) == 200
                {
                    self.nacos.node.ack(conn.session(), [(key, revision)]);
                }
            }
            "ConnectionSetupRequest" => {
                tracing::debug!(
                    connection = %conn.id,
                    client = text(&body, "clientVersion").unwrap_or_default(),
                    "nacos connection set up"
                );
            }
            // Probe answers and anything else: activity, already noted.
            _ => {}
        }
    }

    /// Drops the shared push text of those services nobody subscribes to
    /// any more.
    fn forget_unwatched<'a>(&self, keys: impl IntoIterator<Item = &'a ServiceKey>) {
        for key in keys {
            if self.nacos.node.subscriber_count(key) == 0 {
                self.nacos.forget_shared_info(key);
            }
        }
    }

    /// The payload for a dequeued outbound item, if any.
    fn outbound(&self, conn: &Conn, item: Outbound<Frame>) -> Option<Payload> {
        let key = match item {
            Outbound::Control(frame) => {
                return match frame.message.kind {
                    Some(v1::server_message::Kind::Probe(_)) => {
                        let rid = conn
                            .next_request
                            .fetch_add(1, Ordering::Relaxed)
                            .to_string();
                        Some(payload(
                            "ClientDetectionRequest",
                            &json!({"headers": {}, "requestId": rid, "module": "internal"}),
                        ))
                    }
                    _ => None,
                };
            }
            Outbound::Update { key, .. } | Outbound::FullView(key) => key,
        };
        let clusters = conn.subs.lock().get(&*key).cloned()?;
        // Nacos pushes the whole list: the current view covers every
        // update queued before it.
        let (revision, info) = self.nacos.shared_info(&key, &clusters);
        self.nacos.node.full_sent(conn.session(), &key, revision);
        let rid = conn
            .next_request
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        conn.pending
            .lock()
            .insert(rid.clone(), ((*key).clone(), revision));
        self.nacos.node.metrics.pushes_sent.inc();
        let head = json!({
            "headers": {},
            "requestId": rid,
            "module": "naming",
            "namespace": key.namespace,
            "serviceName": key.service,
            "groupName": key.group,
        });
        Some(raw_payload(
            "NotifySubscriberRequest",
            with_service_info(head, &info),
        ))
    }
}

#[tonic::async_trait]
impl request_server::Request for NacosGrpc {
    async fn request(&self, request: tonic::Request<Payload>) -> Result<Response<Payload>, Status> {
        let peer = request.remote_addr();
        let p = request.into_inner();
        let body = match body_of(&p) {
            Ok(b) => b,
            Err(f) => return Ok(Response::new(error_reply("", &f))),
        };
        let rid = text(&body, "requestId").unwrap_or_default().to_owned();
        Ok(Response::new(self.handle(peer, kind_of(&p), &body, &rid)))
    }
}

type PayloadStream = Pin<Box<dyn Stream<Item = Result<Payload, Status>> + Send>>;

#[tonic::async_trait]
impl BiRequestStream for NacosGrpc {
    type requestBiStreamStream = PayloadStream;

    async fn request_bi_stream(
        &self,
        request: tonic::Request<Streaming<Payload>>,
    ) -> Result<Response<PayloadStream>, Status> {
        let peer = request
            .remote_addr()
            .ok_or_else(|| Status::failed_precondition("the peer address is unknown"))?;
        let mut inbound = request.into_inner();
        let link = self.nacos.node.open_stream(&format!("nacos {peer}"));
        let conn = Arc::new(Conn {
            id: self.connection_id(peer),
            link: link.clone(),
            subs: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        });
        // A second stream on the same connection replaces the first.
        if let Some(old) = self.conns.write().insert(peer, conn.clone()) {
            self.nacos.node.close_session(old.session());
        }
        tracing::debug!(connection = %conn.id, session = %link.id, "nacos connection registered");

        let this = self.clone();
        let reader = conn.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = reader.link.closed.cancelled() => break,
                };
                match msg {
                    Ok(Some(p)) => this.stream_message(&reader, &p),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(connection = %reader.id, "nacos stream error: {e}");
                        break;
                    }
                }
            }
            let mut conns = this.conns.write();
            if conns.get(&peer).is_some_and(|c| Arc::ptr_eq(c, &reader)) {
                conns.remove(&peer);
            }
            drop(conns);
            this.nacos.node.close_session(reader.session());
            let subs = std::mem::take(&mut *reader.subs.lock());
            this.forget_unwatched(subs.keys());
            tracing::debug!(connection = %reader.id, "nacos connection closed");
        });

        let this = self.clone();
        let stream = futures_util::stream::unfold((this, conn), |(this, conn)| async move {
            loop {
                let item = conn.link.next().await?;
                if let Some(p) = this.outbound(&conn, item) {
                    return Some((Ok(p), (this, conn)));
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
