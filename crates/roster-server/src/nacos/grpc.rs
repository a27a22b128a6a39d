//! The Nacos 2.x gRPC protocol on the gRPC port: `Request/request` (unary)
//! and `BiRequestStream/requestBiStream`, JSON bodies dispatched on
//! `metadata.type`. A connection (keyed by the peer address, as unary calls
//! and the stream share one HTTP/2 connection) is a Roster stream session
//! holding, as in Java Nacos 2.x, one registration (or one batch) per
//! service. Its instances live as long as its session; a second stream on
//! the connection takes the session over without dropping them. Pushes go
//! out as `NotifySubscriberRequest`s; one not acknowledged in time, or
//! answered with an error, is sent again a bounded number of times, and an
//! acknowledgement feeds drain tracking. The session probe becomes a
//! `ClientDetectionRequest`.

use std::collections::HashMap;
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
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status, Streaming};

use super::Nacos;
use super::request::{self, Body, Loose};
use super::wire::{self, InfoRequest};
use crate::node::{Control, Item, PushUpdate, SessionLink};

/// Nacos error codes (`NacosException`).
mod code {
    pub const UN_REGISTER: i64 = 301;
    pub const INVALID_PARAM: i64 = 400;
    pub const SERVER_ERROR: i64 = 500;
    pub const NOT_IMPLEMENTED: i64 = 501;
    pub const BAD_GATEWAY: i64 = 502;
    pub const OVER_THRESHOLD: i64 = 503;
}

/// A push sent and not yet acknowledged.
struct Unacked {
    key: ServiceKey,
    revision: u64,
    /// The request, sent again as is.
    payload: Payload,
    /// When it is due to be sent again.
    due: Instant,
    /// Times sent so far.
    sent: u32,
    /// Since when the service has had a push waiting for its ack (a newer
    /// push of it keeps the older one's time).
    waiting_since: Instant,
    /// The client answered it with an error (it is given up after the
    /// retries; one never answered waits for its ack).
    refused: bool,
}

/// One Nacos gRPC connection.
struct Conn {
    /// What `ServerCheckResponse` called it.
    id: String,
    /// Its Roster session.
    link: Arc<SessionLink>,
    /// The stream currently serving the connection (a newer one cancels
    /// it and takes its place).
    stream: Mutex<Serving>,
    /// Subscribed services and the cluster list each asked for.
    subs: Mutex<HashMap<ServiceKey, String>>,
    /// Server→client request ids, unique per connection.
    next_request: AtomicU64,
    /// Pushes not yet acknowledged, by request id: at most one per service
    /// (a newer push of a service supersedes the older), and at most
    /// `limits.pending_pushes_per_connection` (then pushes wait).
    unacked: Mutex<HashMap<String, Unacked>>,
    /// Told when an ack arrives (a writer waiting for room wakes).
    acked: tokio::sync::Notify,
    /// When the client last answered a push (any push, even one a newer
    /// push superseded): a client that answers is not stuck.
    last_answer: Mutex<Instant>,
}

/// Which stream serves a connection.
struct Serving {
    /// Counts takeovers: a stream is current while this is its number.
    number: u64,
    /// Cancels the current stream.
    token: CancellationToken,
    /// The current stream ended: the connection is going; a new stream
    /// starts a new connection instead of taking this one over.
    ended: bool,
}

impl Conn {
    fn session(&self) -> &SessionId {
        &self.link.id
    }

    fn next_id(&self) -> String {
        self.next_request
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
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
            RegistryError::Unavailable(_) | RegistryError::Limit(_) => code::OVER_THRESHOLD,
            RegistryError::UnknownService(_)
            | RegistryError::UnknownInstance { .. }
            | RegistryError::NotOwner { .. }
            | RegistryError::Forbidden(_)
            | RegistryError::SessionExists(_) => code::INVALID_PARAM,
        };
        Self::new(code, e.to_string())
    }
}

/// The request for a gRPC `ServiceInfo` (the service named bare).
fn bare(clusters: &str, healthy_only: bool) -> InfoRequest<'_> {
    InfoRequest {
        clusters,
        healthy_only,
        grouped_name: false,
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

/// A successful reply's common fields, as an unclosed JSON object.
fn reply_head(request_id: &str) -> String {
    let mut body = String::with_capacity(128);
    body.push_str(r#"{"resultCode":200,"errorCode":0,"message":"","success":true,"requestId":"#);
    body.push_str(&Value::from(request_id).to_string());
    body
}

/// The unclosed JSON object `head` closed with a `serviceInfo` field
/// holding `info`, a shared, already serialized `ServiceInfo`.
fn with_service_info(mut head: String, info: &str) -> Vec<u8> {
    head.push_str(",\"serviceInfo\":");
    head.push_str(info);
    head.push('}');
    head.into_bytes()
}

/// A successful reply holding the serialized `ServiceInfo` `info`.
fn info_reply(kind: &str, request_id: &str, info: &str) -> Payload {
    raw_payload(kind, with_service_info(reply_head(request_id), info))
}

/// A successful reply: the common fields plus `fields` (an object).
fn reply(kind: &str, request_id: &str, fields: Value) -> Payload {
    let mut body = reply_head(request_id);
    if let Value::Object(extra) = fields {
        for (k, v) in extra {
            body.push(',');
            body.push_str(&Value::from(k).to_string());
            body.push(':');
            body.push_str(&v.to_string());
        }
    }
    body.push('}');
    raw_payload(kind, body.into_bytes())
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
fn body_of(p: &Payload) -> Result<Body<'_>, Failure> {
    let bytes = p.body.as_ref().map_or(&b""[..], |b| &b.value[..]);
    Body::parse(bytes).map_err(|m| Failure::new(code::BAD_GATEWAY, m))
}

fn kind_of(p: &Payload) -> &str {
    p.metadata.as_ref().map_or("", |m| m.r#type.as_str())
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

    fn handle(&self, peer: Option<SocketAddr>, kind: &str, body: Body<'_>, rid: &str) -> Payload {
        if kind == "ServerCheckRequest" {
            if let Err(e) = self.nacos.node.require_ready() {
                // 3xx: "retry later" to every client's server check.
                return error_reply(rid, &Failure::new(300, e.to_string()));
            }
            let id = peer.map(|p| self.connection_id(p)).unwrap_or_default();
            return reply(
                "ServerCheckResponse",
                rid,
                json!({"connectionId": id, "supportAbilityNegotiation": false}),
            );
        }
        let conn = peer.and_then(|p| self.conns.read().get(&p).cloned());
        let Some(conn) = conn else {
            // A connection without a stream, such as one a client redialed
            // after the node restarted. A health check must fail outright
            // (not with a 3xx, which the Python client takes as healthy),
            // so the client reconnects, opens a stream and registers again.
            let failure = if kind == "HealthCheckRequest" {
                Failure::new(
                    code::SERVER_ERROR,
                    "this connection has no stream (the node may have restarted); reconnect",
                )
            } else {
                Failure::new(code::UN_REGISTER, "Connection is unregistered.")
            };
            return error_reply(rid, &failure);
        };
        conn.link.active(&self.nacos.node, false);
        let outcome = match kind {
            "HealthCheckRequest" => Ok(reply("HealthCheckResponse", rid, json!({}))),
            "InstanceRequest" => self.instance(&conn, body, rid),
            "BatchInstanceRequest" => self.batch(&conn, body, rid),
            "PersistentInstanceRequest" => Err(Failure::new(
                code::NOT_IMPLEMENTED,
                "persistent instances (ephemeral=false) are not supported by Roster yet; \
                 register ephemeral instances",
            )),
            "SubscribeServiceRequest" => self.subscribe(&conn, &body, rid),
            "ServiceQueryRequest" => self.query(&body, rid),
            "ServiceListRequest" => self.list(&body, rid),
            other => Err(Failure::new(
                code::INVALID_PARAM,
                format!("Unsupported request type {other:?}"),
            )),
        };
        outcome.unwrap_or_else(|f| error_reply(rid, &f))
    }

    /// `registerInstance` replaces what the connection holds in the
    /// service with the one instance; `deregisterInstance` removes what it
    /// holds there (as Java Nacos 2.x: one registration per connection and
    /// service). Nothing another connection registered is touched.
    fn instance(&self, conn: &Conn, body: Body<'_>, rid: &str) -> Result<Payload, Failure> {
        let key = body.key()?;
        let action = body.action.text().unwrap_or_default();
        let raw = &body.instance;
        match action {
            "registerInstance" => {
                let mut instance = request::instance(raw)?;
                instance.ephemeral = true;
                self.nacos
                    .node
                    .set_instances(conn.session(), &key, vec![instance])?;
            }
            "deregisterInstance" => {
                // Validated like a registration, though only the service
                // decides what is removed.
                request::instance(raw)?.normalize()?;
                self.nacos
                    .node
                    .set_instances(conn.session(), &key, Vec::new())?;
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
    /// service with the batch (an empty batch removes them all), as one
    /// change.
    fn batch(&self, conn: &Conn, body: Body<'_>, rid: &str) -> Result<Payload, Failure> {
        let key = body.key()?;
        let raw = match &body.instances {
            Loose::Is(list) => &list[..],
            Loose::Absent => &[],
            Loose::Not => {
                return Err(Failure::new(
                    code::INVALID_PARAM,
                    "instances must be a list of instances",
                ));
            }
        };
        let mut instances = Vec::with_capacity(raw.len());
        for (n, r) in raw.iter().enumerate() {
            let mut i = request::instance(r)
                .map_err(|e| Failure::new(code::INVALID_PARAM, format!("instances[{n}]: {e}")))?;
            i.ephemeral = true;
            instances.push(i);
        }
        self.nacos
            .node
            .set_instances(conn.session(), &key, instances)?;
        let action = body.action.text().unwrap_or("batchRegisterInstance");
        Ok(reply(
            "BatchInstanceResponse",
            rid,
            json!({ "type": action }),
        ))
    }

    fn subscribe(&self, conn: &Conn, body: &Body<'_>, rid: &str) -> Result<Payload, Failure> {
        let key = body.key()?;
        let clusters = body.clusters.text().unwrap_or_default().to_owned();
        let info = if body.subscribe.flag().unwrap_or(true) {
            // Known before the first push can be dequeued, so none is
            // dropped as unwatched; forgotten again if refused.
            conn.subs.lock().insert(key.clone(), clusters.clone());
            let update = match self.nacos.node.subscribe(conn.session(), key.clone()) {
                Ok(u) => u,
                Err(e) => {
                    conn.subs.lock().remove(&key);
                    return Err(e.into());
                }
            };
            // The reply shows the very view the subscription starts from.
            self.nacos
                .info_text(&key, update.view.as_ref(), &bare(&clusters, false))
        } else {
            conn.subs.lock().remove(&key);
            self.nacos.node.unsubscribe(conn.session(), &key);
            let view = self.nacos.node.view(&key);
            self.nacos
                .info_text(&key, view.as_ref(), &bare(&clusters, false))
        };
        Ok(info_reply("SubscribeServiceResponse", rid, &info))
    }

    fn query(&self, body: &Body<'_>, rid: &str) -> Result<Payload, Failure> {
        let key = body.key()?;
        let clusters = body
            .cluster
            .text()
            .or_else(|| body.clusters.text())
            .unwrap_or_default();
        let healthy_only = body
            .healthy_only
            .flag()
            .or_else(|| body.health_only.flag())
            .unwrap_or(false);
        // Every query shares the text of its revision (pushes use the
        // unfiltered one).
        let (_, info) = self.nacos.current_info(&key, &bare(clusters, healthy_only));
        Ok(info_reply("QueryServiceResponse", rid, &info))
    }

    fn list(&self, body: &Body<'_>, rid: &str) -> Result<Payload, Failure> {
        let namespace =
            roster_core::ServiceKey::new(body.namespace.text().unwrap_or_default(), "", "x")?
                .namespace;
        let group = wire::group_or_default(body.group_name.text());
        let page_no = body.page_no.integer().unwrap_or(1).max(1);
        let page_size = body.page_size.integer().unwrap_or(10).max(0);
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
        // A probe's answer is always recorded.
        let answer = kind_of(p) == "ClientDetectionResponse";
        conn.link.active(&self.nacos.node, answer);
        let Ok(body) = body_of(p) else {
            tracing::debug!(connection = %conn.id, "unparseable stream message");
            return;
        };
        match kind_of(p) {
            "NotifySubscriberResponse" => {
                let rid = body.request_id.text().unwrap_or_default();
                let ok = body.result_code.integer().unwrap_or(200) == 200;
                *conn.last_answer.lock() = Instant::now();
                let mut unacked = conn.unacked.lock();
                if ok {
                    if let Some(done) = unacked.remove(rid) {
                        drop(unacked);
                        conn.acked.notify_one();
                        self.nacos
                            .node
                            .ack(conn.session(), [(done.key, done.revision)]);
                    }
                } else if let Some(failed) = unacked.get_mut(rid) {
                    // The client could not take it: send it again soon.
                    failed.due = Instant::now() + retry_delay(&self.nacos);
                    failed.refused = true;
                }
            }
            "ConnectionSetupRequest" => {
                tracing::debug!(
                    connection = %conn.id,
                    client = body.client_version.text().unwrap_or_default(),
                    "nacos connection set up"
                );
            }
            // Probe answers and anything else: activity, already noted.
            _ => {}
        }
    }

    /// The payload for a dequeued item, if any.
    fn outbound(&self, conn: &Conn, item: Item) -> Option<Payload> {
        let update: Arc<PushUpdate> = match item {
            Outbound::Control(Control::Probe(_)) => {
                return Some(payload(
                    "ClientDetectionRequest",
                    &json!({"headers": {}, "requestId": conn.next_id(), "module": "internal"}),
                ));
            }
            Outbound::Control(Control::Welcome(_)) => return None,
            Outbound::Update(update) => update,
        };
        let key = &update.key;
        let clusters = conn.subs.lock().get(&**key).cloned()?;
        // Nacos pushes the whole list: the planned view, as this
        // subscriber's clusters show it.
        let info = self
            .nacos
            .info_text(key, update.view.as_ref(), &bare(&clusters, false));
        let rid = conn.next_id();
        let mut head = json!({
            "headers": {},
            "requestId": rid,
            "module": "naming",
            "namespace": key.namespace,
            "serviceName": key.service,
            "groupName": key.group,
        })
        .to_string();
        head.pop(); // the closing brace
        let p = raw_payload("NotifySubscriberRequest", with_service_info(head, &info));
        let now = Instant::now();
        let mut unacked = conn.unacked.lock();
        let mut waiting_since = now;
        unacked.retain(|_, u| {
            if u.key == **key {
                waiting_since = u.waiting_since;
            }
            u.key != **key
        });
        unacked.insert(
            rid,
            Unacked {
                key: (**key).clone(),
                revision: update.revision(),
                payload: p.clone(),
                due: now + self.nacos.node.config().nacos.push_ack_timeout,
                sent: 1,
                waiting_since,
                refused: false,
            },
        );
        drop(unacked);
        self.nacos.node.metrics.pushes_sent.inc();
        if let Some(at) = update.changed_at {
            self.nacos
                .node
                .metrics
                .push_latency
                .observe(at.elapsed().as_secs_f64());
        }
        Some(p)
    }

    /// Pushes due to be sent again (not acknowledged in time, or refused).
    /// Those sent as often as allowed are not sent again: refused ones are
    /// given up, unanswered ones wait for their ack. A connection that has
    /// had a push waiting `limits.stuck_timeout` and answered no push for
    /// as long is closed as stuck.
    fn due_again(&self, conn: &Conn) -> Vec<Payload> {
        let config = &self.nacos.node.config().nacos;
        let stuck_timeout = self.nacos.node.config().limits.stuck_timeout;
        let now = Instant::now();
        let mut again = Vec::new();
        let mut waited = false;
        conn.unacked.lock().retain(|_, u| {
            waited |= now.duration_since(u.waiting_since) >= stuck_timeout;
            if u.due > now {
                return true;
            }
            if u.sent > config.push_retries {
                return !u.refused;
            }
            u.sent += 1;
            u.due = now + config.push_ack_timeout;
            again.push(u.payload.clone());
            true
        });
        let silent = now.duration_since(*conn.last_answer.lock()) >= stuck_timeout;
        if waited && silent {
            self.nacos
                .node
                .eject(conn.session(), "a push went unacknowledged");
            return Vec::new();
        }
        again
    }

    /// Ends a connection whose last stream ended: its session goes.
    fn forget(&self, peer: SocketAddr, conn: &Arc<Conn>) {
        let mut conns = self.conns.write();
        if conns.get(&peer).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&peer);
        }
        drop(conns);
        self.nacos.node.close_session(conn.session());
        conn.subs.lock().clear();
        tracing::debug!(connection = %conn.id, "nacos connection closed");
    }
}

/// How soon a push the client refused is sent again.
fn retry_delay(nacos: &Nacos) -> std::time::Duration {
    (nacos.node.config().nacos.push_ack_timeout / 5).max(std::time::Duration::from_millis(10))
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
        let rid = body.request_id.text().unwrap_or_default().to_owned();
        Ok(Response::new(self.handle(peer, kind_of(&p), body, &rid)))
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
        let stream = CancellationToken::new();
        // A second stream on a connection takes its session over: the
        // first stream stops, the instances stay.
        let existing = self.conns.read().get(&peer).cloned();
        let taken = existing.and_then(|conn| {
            let mut serving = conn.stream.lock();
            if serving.ended || conn.link.closed.is_cancelled() {
                return None;
            }
            serving.number += 1;
            let old = std::mem::replace(&mut serving.token, stream.clone());
            old.cancel();
            let number = serving.number;
            drop(serving);
            Some((conn, number))
        });
        let (conn, number) = match taken {
            Some((conn, number)) => {
                tracing::debug!(connection = %conn.id, "a new stream took the nacos connection over");
                (conn, number)
            }
            None => {
                let link = self
                    .nacos
                    .node
                    .open_stream(&format!("nacos {peer}"), Some(peer), None)
                    .map_err(crate::calls::status)?;
                let conn = Arc::new(Conn {
                    id: self.connection_id(peer),
                    link,
                    stream: Mutex::new(Serving {
                        number: 0,
                        token: stream.clone(),
                        ended: false,
                    }),
                    subs: Mutex::new(HashMap::new()),
                    next_request: AtomicU64::new(1),
                    unacked: Mutex::new(HashMap::new()),
                    acked: tokio::sync::Notify::new(),
                    last_answer: Mutex::new(Instant::now()),
                });
                self.conns.write().insert(peer, conn.clone());
                tracing::debug!(connection = %conn.id, session = %conn.link.id, "nacos connection registered");
                (conn, 0)
            }
        };

        let this = self.clone();
        let reader = conn.clone();
        let reading = stream.clone();
        self.nacos.node.tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = reader.link.closed.cancelled() => break,
                    // Taken over by a newer stream: the session lives on.
                    _ = reading.cancelled() => return,
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
            // Only the current stream's end ends the connection (checked
            // and marked under the lock a takeover takes).
            {
                let mut serving = reader.stream.lock();
                if serving.number != number {
                    return;
                }
                serving.ended = true;
            }
            reading.cancel();
            this.forget(peer, &reader);
        });

        let this = self.clone();
        let tick = tokio::time::interval(retry_delay(&self.nacos));
        let max_pending = self
            .nacos
            .node
            .config()
            .limits
            .pending_pushes_per_connection;
        let state = (this, conn, stream, Vec::<Payload>::new(), tick, false);
        let out = futures_util::stream::unfold(
            state,
            move |(this, conn, stream, mut again, mut tick, mut was_full)| async move {
                loop {
                    if let Some(p) = again.pop() {
                        return Some((Ok(p), (this, conn, stream, again, tick, was_full)));
                    }
                    // With as many pushes in flight as allowed, the next
                    // waits (in the queue, merged with later ones) for an
                    // ack; a client that never acks is stuck and closed.
                    let full = conn.unacked.lock().len() >= max_pending;
                    if full && !was_full {
                        this.nacos
                            .node
                            .refuse("pending_pushes_per_connection", max_pending);
                    }
                    was_full = full;
                    tokio::select! {
                        // A stream taken over stops before it takes
                        // anything more off the connection's queue.
                        biased;
                        _ = stream.cancelled() => return None,
                        _ = conn.acked.notified(), if full => {}
                        item = conn.link.next(), if !full => {
                            let item = item?;
                            if let Some(p) = this.outbound(&conn, item) {
                                return Some((Ok(p), (this, conn, stream, again, tick, was_full)));
                            }
                        }
                        _ = tick.tick() => again = this.due_again(&conn),
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(out)))
    }
}
