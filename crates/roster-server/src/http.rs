//! The HTTP/JSON API under `/v1/`, health (`/healthz`, `/readyz`) and
//! Prometheus `/metrics`. HTTP clients cannot hold a session stream, so a
//! registration gets a lease session (its id and token in the reply),
//! renewed by `PUT /v1/instances/beat`; later calls for it prove the token
//! (`x-roster-session-token` header, or `session_token` in a JSON body).
//! Translates only; all rules live in [`Node`] and the core.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use roster_core::model::{Address, parse_ip};
use roster_core::{Instance, InstanceRecord, RegistryError, ServiceKey, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::calls::{ADMIN_TOKEN_HEADER, SESSION_TOKEN_HEADER, admin_token_matches};
use crate::node::Node;
use crate::node::links::{parse_token, token_text};

/// An HTTP error: a status and a JSON body `{ "error": ..., "field": ... }`.
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = f.into();
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::Invalid(v) => return v.clone().into(),
            RegistryError::UnknownSession(_)
            | RegistryError::UnknownService(_)
            | RegistryError::UnknownInstance { .. } => StatusCode::NOT_FOUND,
            RegistryError::NotOwner { .. } | RegistryError::Forbidden(_) => StatusCode::FORBIDDEN,
            RegistryError::SessionExists(_) => StatusCode::CONFLICT,
            RegistryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            RegistryError::Limit(hit) if hit.is_size() => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        Self {
            status,
            message: e.to_string(),
            field: None,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self {
            // 413 for a body over `limits.http_body_bytes`, else 400.
            status: match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            },
            message: format!("invalid JSON body: {}", e.body_text()),
            field: None,
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("invalid query: {}", e.body_text()),
            field: None,
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The router for a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(
            "/v1/instances",
            get(list_instances).post(register).delete(deregister),
        )
        .route("/v1/instances/beat", put(beat))
        .route("/v1/services", get(list_services))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(node)
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    use crate::node::Readiness;
    match node.readiness() {
        Readiness::Ready if !node.shutdown.is_cancelled() => "ready\n".into_response(),
        Readiness::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    if let Some(r) = node.replication() {
        node.metrics
            .replication
            .observe(&r.stats(), &node.members());
    }
    let (sessions, services, instances) = node.counts();
    node.metrics.sessions.set(sessions as i64);
    node.metrics.services.set(services as i64);
    node.metrics.instances.set(instances as i64);
    if let Some(open) = crate::admission::open_descriptors() {
        node.metrics.open_fds.set(open as i64);
    }
    if let Some(max) = crate::admission::max_descriptors() {
        node.metrics
            .max_fds
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
        .into_response()
}

/// Names a service in a query string or body.
#[derive(Debug, Default, Deserialize)]
struct ServiceParams {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    service: String,
}

impl ServiceParams {
    fn key(&self) -> Result<ServiceKey, ValidationError> {
        ServiceKey::new(&self.namespace, &self.group, &self.service)
    }
}

/// An address in JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddressJson {
    /// Network name.
    #[serde(default)]
    pub network: String,
    /// IP literal.
    pub ip: String,
}

/// `POST /v1/instances`
#[derive(Debug, Deserialize)]
struct RegisterBody {
    #[serde(flatten)]
    service: ServiceParams,
    #[serde(default)]
    id: String,
    /// Shorthand for one address on the default network.
    ip: Option<String>,
    #[serde(default)]
    addresses: Vec<AddressJson>,
    port: u32,
    weight: Option<f64>,
    healthy: Option<bool>,
    enabled: Option<bool>,
    ephemeral: Option<bool>,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    node_name: String,
    /// Attach to this (lease) session instead of opening a new one; its
    /// token must be given too.
    session_id: Option<String>,
    session_token: Option<String>,
}

impl RegisterBody {
    fn instance(&self) -> Result<Instance, ValidationError> {
        let mut addresses = Vec::new();
        if let Some(ip) = &self.ip {
            addresses.push(Address::new(parse_ip("ip", ip)?));
        }
        for (i, a) in self.addresses.iter().enumerate() {
            addresses.push(Address {
                network: a.network.clone(),
                ip: parse_ip(&format!("addresses[{i}].ip"), &a.ip)?,
            });
        }
        if addresses.is_empty() {
            return Err(ValidationError::new("ip", "ip or addresses is required"));
        }
        let port = u16::try_from(self.port)
            .map_err(|_| ValidationError::new("port", "must be 1..=65535"))?;
        Ok(Instance {
            id: self.id.clone(),
            addresses,
            port,
            weight: self.weight.unwrap_or(1.0),
            healthy: self.healthy.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            ephemeral: self.ephemeral.unwrap_or(true),
            cluster: self.cluster.clone(),
            metadata: self.metadata.iter().collect(),
            node_name: self.node_name.clone(),
        })
    }
}

#[derive(Debug, Serialize)]
struct RegisterReply {
    instance_id: String,
    session_id: String,
    /// Proves the lease in later calls; keep it private. Only given when
    /// the lease is opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    session_token: Option<String>,
    revision: u64,
    /// Renew the lease (`PUT /v1/instances/beat`) more often than this.
    keepalive_ms: u64,
}

/// A session token given in the `x-roster-session-token` header or the
/// body; malformed is an error.
fn token_of(headers: &HeaderMap, body: Option<&str>) -> Result<Option<u128>, ApiError> {
    let given = headers
        .get(SESSION_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .or(body);
    match given {
        None => Ok(None),
        Some(text) => parse_token(text).map(Some).ok_or_else(|| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "session_token: not a session token".into(),
            field: Some("session_token".into()),
        }),
    }
}

/// Whether the admin token was given (and is this node's); a wrong one
/// is refused.
fn admin_of(node: &Node, headers: &HeaderMap) -> Result<bool, ApiError> {
    match headers
        .get(ADMIN_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        None => Ok(false),
        Some(given) if admin_token_matches(node, given) => Ok(true),
        Some(_) => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!("{ADMIN_TOKEN_HEADER}: not this node's admin token"),
            field: None,
        }),
    }
}

/// The session a call on `(key, id)` acts for: the one named (proved by
/// its token), or with the admin token the instance's owner.
fn acting_for(
    node: &Node,
    headers: &HeaderMap,
    session: Option<&str>,
    token: Option<&str>,
    target: Option<(&ServiceKey, &str)>,
) -> Result<String, ApiError> {
    if let Some(session) = session.filter(|s| !s.is_empty()) {
        node.authorize(session, None, token_of(headers, token)?)?;
        return Ok(session.to_owned());
    }
    match target {
        Some((key, id)) if admin_of(node, headers)? => {
            Ok(node.owning_session(key, id)?.to_string())
        }
        _ => Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "session_id: required (the lease that registered the instance), with its \
                      session_token"
                .into(),
            field: Some("session_id".into()),
        }),
    }
}

async fn register(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Json<RegisterBody>, JsonRejection>,
) -> ApiResult<RegisterReply> {
    let Json(body) = body?;
    let key = body.service.key()?;
    let instance = body.instance()?;
    let (session, token) = match &body.session_id {
        Some(id) => {
            let id = acting_for(
                &node,
                &headers,
                Some(id),
                body.session_token.as_deref(),
                None,
            )?;
            (id, None)
        }
        None => {
            let (id, token) = node.open_lease("http")?;
            (id.to_string(), Some(token))
        }
    };
    let result = node.register(&session, key, instance);
    if result.is_err() && token.is_some() {
        node.close_session(&session);
    }
    let (instance_id, revision) = result?;
    Ok(Json(RegisterReply {
        instance_id,
        session_id: session,
        session_token: token.map(token_text),
        revision,
        keepalive_ms: node.config().session.keepalive.as_millis() as u64,
    }))
}

/// Names one instance: by id, or by ip + port (+ cluster).
#[derive(Debug, Deserialize)]
struct InstanceParams {
    #[serde(flatten)]
    service: ServiceParams,
    #[serde(default)]
    id: String,
    ip: Option<String>,
    port: Option<u32>,
    #[serde(default)]
    cluster: String,
    /// The lease acting (with its token).
    session_id: Option<String>,
    session_token: Option<String>,
}

impl InstanceParams {
    fn resolve(&self) -> Result<(ServiceKey, String), ValidationError> {
        let key = self.service.key()?;
        if !self.id.is_empty() {
            return Ok((key, self.id.clone()));
        }
        let ip = parse_ip("ip", self.ip.as_deref().unwrap_or_default())?;
        let port = self
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| ValidationError::new("port", "must be 1..=65535"))?;
        let cluster = if self.cluster.is_empty() {
            roster_core::DEFAULT_CLUSTER
        } else {
            &self.cluster
        };
        Ok((key, Instance::default_id(&ip, port, cluster)))
    }
}

async fn deregister(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    params: Result<Query<InstanceParams>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    let Query(params) = params?;
    let (key, id) = params.resolve()?;
    let session = acting_for(
        &node,
        &headers,
        params.session_id.as_deref(),
        params.session_token.as_deref(),
        Some((&key, &id)),
    )?;
    let revision = node.deregister(&session, &key, &id)?;
    Ok(Json(json!({ "revision": revision })))
}

/// `PUT /v1/instances/beat`: renews a lease, named by `session_id` with its
/// token.
#[derive(Debug, Deserialize)]
struct BeatBody {
    session_id: String,
    session_token: Option<String>,
}

async fn beat(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Json<BeatBody>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(body) = body?;
    let session = acting_for(
        &node,
        &headers,
        Some(&body.session_id),
        body.session_token.as_deref(),
        None,
    )?;
    node.beat(&session)?;
    Ok(Json(json!({ "session_id": session })))
}

/// An instance as JSON.
#[derive(Debug, Serialize)]
pub struct InstanceJson {
    id: String,
    /// The first address, for clients that use one.
    ip: String,
    addresses: Vec<AddressJson>,
    port: u16,
    weight: f64,
    healthy: bool,
    enabled: bool,
    ephemeral: bool,
    cluster: String,
    metadata: BTreeMap<String, String>,
    node_name: String,
    owner: String,
    version: [u64; 2],
}

impl From<&InstanceRecord> for InstanceJson {
    fn from(r: &InstanceRecord) -> Self {
        let i = &r.instance;
        Self {
            id: i.id.clone(),
            ip: i
                .addresses
                .first()
                .map(|a| a.ip.to_string())
                .unwrap_or_default(),
            addresses: i
                .addresses
                .iter()
                .map(|a| AddressJson {
                    network: a.network.clone(),
                    ip: a.ip.to_string(),
                })
                .collect(),
            port: i.port,
            weight: i.weight,
            healthy: i.healthy,
            enabled: i.enabled,
            ephemeral: i.ephemeral,
            cluster: i.cluster.clone(),
            metadata: i
                .metadata
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            node_name: i.node_name.clone(),
            owner: r.owner.session.to_string(),
            version: [r.version.incarnation, r.version.sequence],
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(flatten)]
    service: ServiceParams,
    #[serde(default)]
    healthy_only: bool,
}

/// The list of a service: built once per revision (and filter) and
/// shared by every reader of it, so slow readers hold references.
async fn list_instances(
    State(node): State<Arc<Node>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    node.require_serving()?;
    let Query(params) = params?;
    let key = params.service.key()?;
    let published = node.view(&key);
    let build = || -> bytes::Bytes {
        let view = published.as_ref().map(|p| &p.view);
        let instances: Vec<InstanceJson> = view
            .iter()
            .flat_map(|v| v.instances.values())
            .filter(|r| !params.healthy_only || r.instance.is_serving())
            .map(|r| r.as_ref().into())
            .collect();
        let list = json!({
            "namespace": key.namespace,
            "group": key.group,
            "service": key.service,
            "revision": view.map_or(0, |v| v.revision),
            "checksum": view.map_or(0, |v| v.checksum),
            "instances": instances,
        });
        serde_json::to_vec(&list).unwrap_or_default().into()
    };
    let body = match &published {
        Some(p) => p.http_lists[usize::from(params.healthy_only)]
            .get_or_init(build)
            .clone(),
        None => build(),
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Debug, Deserialize)]
struct ServicesParams {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
}

async fn list_services(
    State(node): State<Arc<Node>>,
    params: Result<Query<ServicesParams>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    node.require_serving()?;
    let Query(params) = params?;
    let services: Vec<_> = crate::list_services(&node, &params.namespace, &params.group)
        .into_iter()
        .map(|s| {
            json!({
                "namespace": s.key.namespace,
                "group": s.key.group,
                "service": s.key.service,
                "instances": s.instances,
                "healthy": s.serving,
                "revision": s.revision,
                "subscribers": s.subscribers,
            })
        })
        .collect();
    Ok(Json(json!({ "services": services })))
}
