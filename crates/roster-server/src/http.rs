//! The HTTP/JSON API under `/v1/`, health (`/healthz`, `/readyz`) and
//! Prometheus `/metrics`. HTTP clients cannot hold a session stream, so each
//! registration gets a lease session renewed by `PUT /v1/instances/beat`.
//! Translates only; all rules live in [`Node`] and the core.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use roster_core::model::{Address, parse_ip};
use roster_core::{Instance, InstanceRecord, RegistryError, ServiceKey, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::node::Node;

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
            RegistryError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
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
            status: StatusCode::BAD_REQUEST,
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
    if node.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let (sessions, services, instances) = node.counts();
    node.metrics.sessions.set(sessions as i64);
    node.metrics.services.set(services as i64);
    node.metrics.instances.set(instances as i64);
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
    /// Attach to this (lease) session instead of opening a new one.
    session_id: Option<String>,
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
    revision: u64,
    /// Renew the lease (`PUT /v1/instances/beat`) more often than this.
    keepalive_ms: u64,
}

async fn register(
    State(node): State<Arc<Node>>,
    body: Result<Json<RegisterBody>, JsonRejection>,
) -> ApiResult<RegisterReply> {
    let Json(body) = body?;
    let key = body.service.key()?;
    let instance = body.instance()?;
    let session = match &body.session_id {
        Some(id) => id.clone(),
        None => node.open_lease("http").to_string(),
    };
    let result = node.register(&session, key, instance);
    if result.is_err() && body.session_id.is_none() {
        node.close_session(&session);
    }
    let (instance_id, revision) = result?;
    Ok(Json(RegisterReply {
        instance_id,
        session_id: session,
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
    params: Result<Query<InstanceParams>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    let Query(params) = params?;
    let (key, id) = params.resolve()?;
    let revision = node.deregister(&key, &id)?;
    Ok(Json(json!({ "revision": revision })))
}

async fn beat(
    State(node): State<Arc<Node>>,
    body: Result<Json<InstanceParams>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(params) = body?;
    let (key, id) = params.resolve()?;
    let owner = node
        .owner_of(&key, &id)
        .ok_or_else(|| RegistryError::UnknownInstance {
            service: key.to_string(),
            id: id.clone(),
        })?;
    if !node.touch(&owner) {
        return Err(RegistryError::UnknownSession(owner.to_string()).into());
    }
    Ok(Json(json!({ "session_id": owner.to_string() })))
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
            owner: r.owner.to_string(),
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

async fn list_instances(
    State(node): State<Arc<Node>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    let Query(params) = params?;
    let key = params.service.key()?;
    let view = node.view(&key);
    let instances: Vec<InstanceJson> = view
        .iter()
        .flat_map(|v| v.instances.values())
        .filter(|r| !params.healthy_only || r.instance.is_serving())
        .map(|r| r.as_ref().into())
        .collect();
    Ok(Json(json!({
        "namespace": key.namespace,
        "group": key.group,
        "service": key.service,
        "revision": view.as_ref().map_or(0, |v| v.revision),
        "checksum": view.as_ref().map_or(0, |v| v.checksum),
        "instances": instances,
    })))
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
