//! The Nacos HTTP Open API on the HTTP port: v1 under `/nacos/v1/ns/`
//! (plain-text errors), v2 under `/nacos/v2/ns/` (`{code, message, data}`),
//! login while auth is off, and the health URLs. Each operation is written
//! once over [`Params`] (query string and form body merged) and rendered
//! in either version's shape.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, on};
use axum::{Json, Router};
use bytes::Bytes;
use roster_core::{Instance, Metadata, RegistryError, ServiceKey, ValidationError};
use serde_json::{Map, Value, json};

use super::wire::{self, InfoRequest, flag, integer, number, text};
use super::{HttpInstance, Nacos, ServiceSettings};

/// Which Open API a route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    V1,
    V2,
}

/// An operation's result.
enum Reply {
    /// Done: v1 `ok`, v2 `data: "ok"`.
    Ok,
    /// A JSON payload (v2 wraps it in the envelope).
    Json(Value),
    /// A JSON object sent as is by both versions (the beat reply).
    Bare(Value),
    /// A JSON payload already serialized (shared per revision); v2 wraps it.
    JsonText(Arc<str>),
}

/// A failed operation: HTTP status, v2 code and message.
#[derive(Debug)]
struct Fail {
    status: StatusCode,
    code: i64,
    message: String,
}

/// v2 error codes.
mod code {
    pub const PARAMETER_MISSING: i64 = 10000;
    pub const RESOURCE_NOT_FOUND: i64 = 20004;
    pub const INSTANCE_NOT_FOUND: i64 = 21003;
    pub const SERVICE_NOT_EXIST: i64 = 21008;
    pub const SERVER_ERROR: i64 = 30000;
    pub const NO_RIGHT: i64 = 403;
    pub const OVER_THRESHOLD: i64 = 503;
}

impl Fail {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: code::PARAMETER_MISSING,
            message: message.into(),
        }
    }

    fn missing(name: &str) -> Self {
        Self::bad(format!("Parameter '{name}' is missing"))
    }

    fn no_service(key: &ServiceKey) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: code::SERVICE_NOT_EXIST,
            message: format!("service not found: {}", wire::grouped(key)),
        }
    }

    fn no_instance(key: &ServiceKey, id: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: code::INSTANCE_NOT_FOUND,
            message: format!("instance not found: {id} in {}", wire::grouped(key)),
        }
    }
}

impl From<ValidationError> for Fail {
    fn from(e: ValidationError) -> Self {
        Self::bad(e.to_string())
    }
}

impl From<RegistryError> for Fail {
    fn from(e: RegistryError) -> Self {
        let (status, code) = match &e {
            RegistryError::Invalid(v) => return v.clone().into(),
            RegistryError::UnknownInstance { .. } => {
                (StatusCode::NOT_FOUND, code::INSTANCE_NOT_FOUND)
            }
            RegistryError::UnknownService(_) => (StatusCode::NOT_FOUND, code::SERVICE_NOT_EXIST),
            RegistryError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, code::SERVER_ERROR),
            RegistryError::Limit(hit) if hit.is_size() => {
                (StatusCode::PAYLOAD_TOO_LARGE, code::OVER_THRESHOLD)
            }
            RegistryError::Limit(_) => (StatusCode::TOO_MANY_REQUESTS, code::OVER_THRESHOLD),
            RegistryError::NotOwner { .. } | RegistryError::Forbidden(_) => {
                (StatusCode::FORBIDDEN, code::NO_RIGHT)
            }
            RegistryError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, code::SERVER_ERROR),
            RegistryError::UnknownSession(_) | RegistryError::SessionExists(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, code::SERVER_ERROR)
            }
        };
        Self {
            status,
            code,
            message: e.to_string(),
        }
    }
}

/// A request's parameters: the query string, then a form body (which wins).
struct Params {
    values: Value,
    /// Who sent the request.
    peer: Option<SocketAddr>,
    api: Api,
}

impl Params {
    fn text(&self, name: &str) -> Option<&str> {
        text(&self.values, name).filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<&str, Fail> {
        self.text(name).ok_or_else(|| Fail::missing(name))
    }

    fn flag(&self, name: &str) -> Result<Option<bool>, Fail> {
        match self.text(name) {
            None => Ok(None),
            Some(_) => flag(&self.values, name)
                .map(Some)
                .ok_or_else(|| Fail::bad(format!("Parameter '{name}' must be true or false"))),
        }
    }

    /// An integer parameter within `range`, if given.
    fn integer(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, Fail> {
        match self.text(name) {
            None => Ok(None),
            Some(_) => integer(&self.values, name)
                .filter(|n| range.contains(n))
                .map(Some)
                .ok_or_else(|| {
                    Fail::bad(format!(
                        "Parameter '{name}' must be an integer in {}..={}",
                        range.start(),
                        range.end()
                    ))
                }),
        }
    }

    fn number(&self, name: &str) -> Result<Option<f64>, Fail> {
        match self.text(name) {
            None => Ok(None),
            Some(_) => number(&self.values, name)
                .filter(|n| n.is_finite())
                .map(Some)
                .ok_or_else(|| Fail::bad(format!("Parameter '{name}' must be a number"))),
        }
    }

    /// The service: `serviceName` (required; `group@@name` carries its
    /// group), `groupName`, `namespaceId`.
    fn key(&self) -> Result<ServiceKey, Fail> {
        let service = self.required("serviceName")?;
        Ok(wire::service_key(
            self.text("namespaceId").or_else(|| self.text("namespace")),
            self.text("groupName"),
            Some(service),
        )?)
    }

    /// The cluster: `clusterName` or `cluster`; Python v1 sends `None`.
    fn cluster(&self) -> &str {
        match self.text("clusterName").or_else(|| self.text("cluster")) {
            Some("None") | None => "",
            Some(c) => c,
        }
    }

    /// `metadata`: a JSON object, or `k=v,k2=v2`.
    fn metadata(&self) -> Result<Option<Metadata>, Fail> {
        let Some(raw) = self.text("metadata") else {
            return Ok(None);
        };
        parse_metadata(raw).map(Some)
    }

    /// The instance the parameters describe (ip and port required).
    fn instance(&self) -> Result<Instance, Fail> {
        let ip = roster_core::model::parse_ip("ip", self.required("ip")?)?;
        let port = integer(&self.values, "port")
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| match self.text("port") {
                None => Fail::missing("port"),
                Some(_) => Fail::bad("Parameter 'port' must be 1..=65535"),
            })?;
        let mut i = Instance::new(ip, port);
        i.cluster = self.cluster().to_owned();
        if let Some(w) = self.number("weight")? {
            i.weight = w;
        }
        if let Some(e) = self.flag("enabled")?.or(self.flag("enable")?) {
            i.enabled = e;
        }
        if let Some(h) = self.flag("healthy")? {
            i.healthy = h;
        }
        if let Some(e) = self.flag("ephemeral")? {
            i.ephemeral = e;
        }
        if let Some(m) = self.metadata()? {
            i.metadata = m;
        }
        Ok(i.normalize()?)
    }
}

fn parse_metadata(raw: &str) -> Result<Metadata, Fail> {
    let raw = raw.trim();
    if raw.starts_with('{') {
        return match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(m)) => Ok(wire::string_map(&m)),
            _ => Err(Fail::bad("Parameter 'metadata' is not a JSON object")),
        };
    }
    Ok(raw
        .split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => (kv.trim().to_owned(), String::new()),
        })
        .collect())
}

type Op = fn(&Arc<Nacos>, &Params) -> Result<Reply, Fail>;

/// The writes of beat-kept instances, made on the member responsible for
/// the instance (forwarded there over the cluster port when a client sent
/// them elsewhere), by the name they are forwarded under.
const FORWARDED: [(&str, Op); 5] = [
    ("register", register),
    ("deregister", deregister),
    ("beat", beat),
    ("update", update),
    ("patch", patch),
];

/// The write of [`FORWARDED`] named `name`.
fn forwarded_op(name: &str) -> Option<Op> {
    FORWARDED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, op)| *op)
}

impl Api {
    /// Its name in a forwarded write.
    fn name(self) -> &'static str {
        match self {
            Api::V1 => "v1",
            Api::V2 => "v2",
        }
    }
}

/// Reads the parameters, runs `op` (named `forward` if it is one of
/// [`FORWARDED`]) and renders the result for `api`.
async fn serve(
    nacos: Arc<Nacos>,
    op: Op,
    forward: Option<&'static str>,
    api: Api,
    request: Request,
) -> Response {
    if let Err(e) = nacos.node.require_serving() {
        return render(api, Err(e.into()));
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let query = request.uri().query().unwrap_or_default().to_owned();
    let json_body = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let max = nacos.node.config().limits.http_body_bytes;
    let body = match axum::body::to_bytes(request.into_body(), max).await {
        Ok(b) => b,
        Err(e)
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) =>
        {
            let hit = roster_core::LimitHit {
                key: "http_body_bytes",
                max,
            };
            nacos.node.metrics.limit_hit(hit.key, &hit);
            return render(api, Err(RegistryError::Limit(hit).into()));
        }
        Err(_) => return render(api, Err(Fail::bad("cannot read the request body"))),
    };
    let mut values = Map::new();
    if let Err(fail) = form(query.as_bytes(), &mut values) {
        return render(api, Err(fail));
    }
    if json_body {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => {
                for (k, v) in m {
                    let v = match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    values.insert(k, Value::String(v));
                }
            }
            _ => return render(api, Err(Fail::bad("the JSON body is not an object"))),
        }
    } else if let Err(fail) = form(&body, &mut values) {
        return render(api, Err(fail));
    }
    let params = Params {
        values: Value::Object(values),
        peer,
        api,
    };
    if let Some(name) = forward
        && let Some(answer) = forward_to_responsible(&nacos, name, &params).await
    {
        return answer;
    }
    render(api, op(&nacos, &params))
}

/// Which beat-kept instance the parameters of write `name` name, as the
/// key its responsible member is picked by (none if they name none: the
/// write fails where it is).
fn identity(name: &str, p: &Params) -> Option<String> {
    let merged;
    let p = if name == "beat" {
        merged = beat_params(p).ok()?.0;
        &merged
    } else {
        p
    };
    if matches!(p.flag("ephemeral"), Ok(Some(false))) {
        return None;
    }
    let key = p.key().ok()?;
    let instance = p.instance().ok()?.normalize().ok()?;
    Some(format!(
        "{}\n{}\n{}\n{}",
        key.namespace, key.group, key.service, instance.id
    ))
}

/// Makes write `name` on the member responsible for its instance, if that
/// is another member and it answers: its answer. None: make it here (this
/// member is responsible, or the responsible one cannot be reached: the
/// registry keeps answering).
async fn forward_to_responsible(nacos: &Arc<Nacos>, name: &str, p: &Params) -> Option<Response> {
    let node = &nacos.node;
    // Alone (the usual single node): nothing to work out.
    node.replication()?;
    let peer = node.responsible_peer(&identity(name, p)?)?;
    let params = p
        .values
        .as_object()?
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
            )
        })
        .collect();
    let answer = crate::cluster::forward(node, &peer, name, params, p.api.name()).await?;
    if name == "deregister" {
        // A copy made here while the responsible member was out of reach
        // (or before responsibility moved) goes too.
        let _ = deregister(nacos, p);
    }
    let status = StatusCode::from_u16(answer.status as u16).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, answer.body).into_response();
    if let Ok(ct) = axum::http::HeaderValue::from_str(&answer.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Some(response)
}

/// Makes write `name`, forwarded by another member, here: (status,
/// content type, body) of the answer.
pub async fn answer_forwarded(
    nacos: &Arc<Nacos>,
    name: &str,
    params: std::collections::HashMap<String, String>,
    api: &str,
) -> Result<(u16, String, Bytes), String> {
    let op =
        forwarded_op(name).ok_or_else(|| format!("{name:?} is not a write that is forwarded"))?;
    let api = [Api::V1, Api::V2]
        .into_iter()
        .find(|a| a.name() == api)
        .ok_or_else(|| format!("unknown API {api:?}"))?;
    let values = params
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let p = Params {
        values: Value::Object(values),
        peer: None,
        api,
    };
    let response = render(api, op(nacos, &p));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, content_type, body))
}

/// Reads `application/x-www-form-urlencoded` pairs into `values` (later
/// ones win). Text that is not UTF-8 once decoded is refused, never stored
/// with replacement characters.
fn form(raw: &[u8], values: &mut Map<String, Value>) -> Result<(), Fail> {
    let decode = |part: &[u8]| -> Option<String> {
        let spaced;
        let part = if part.contains(&b'+') {
            spaced = part
                .iter()
                .map(|b| if *b == b'+' { b' ' } else { *b })
                .collect::<Vec<u8>>();
            &spaced[..]
        } else {
            part
        };
        // Borrowed when nothing is escaped: one copy, into the String.
        percent_encoding::percent_decode(part)
            .decode_utf8()
            .ok()
            .map(std::borrow::Cow::into_owned)
    };
    for pair in raw.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let Some(k) = decode(k) else {
            return Err(Fail::bad("a parameter name is not valid UTF-8"));
        };
        let Some(v) = decode(v) else {
            return Err(Fail::bad(format!("Parameter '{k}' is not valid UTF-8")));
        };
        values.insert(k, Value::String(v));
    }
    Ok(())
}

fn render(api: Api, result: Result<Reply, Fail>) -> Response {
    match (api, result) {
        (_, Ok(Reply::Bare(v))) => Json(v).into_response(),
        (Api::V1, Ok(Reply::Ok)) => "ok".into_response(),
        (Api::V1, Ok(Reply::Json(v))) => Json(v).into_response(),
        (Api::V1, Err(f)) => (f.status, f.message).into_response(),
        (Api::V2, Ok(Reply::Ok)) => envelope("ok".into()),
        (Api::V2, Ok(Reply::Json(v))) => envelope(v),
        // The shared text itself is the body: no copy per request.
        (Api::V1, Ok(Reply::JsonText(text))) => json_text(Bytes::from_owner(SharedText(text))),
        // The envelope around the shared text, sent in three pieces: no
        // copy of the text per request either.
        (Api::V2, Ok(Reply::JsonText(text))) => {
            let pieces = [
                Bytes::from_static(br#"{"code":0,"message":"success","data":"#),
                Bytes::from_owner(SharedText(text)),
                Bytes::from_static(b"}"),
            ];
            let stream = futures_util::stream::iter(pieces.map(Ok::<_, std::convert::Infallible>));
            (
                [(header::CONTENT_TYPE, "application/json")],
                axum::body::Body::from_stream(stream),
            )
                .into_response()
        }
        (Api::V2, Err(f)) => (
            f.status,
            Json(json!({ "code": f.code, "message": f.message, "data": f.message })),
        )
            .into_response(),
    }
}

/// A shared JSON text as a response body's bytes.
struct SharedText(Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn json_text(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn envelope(data: Value) -> Response {
    Json(json!({ "code": 0, "message": "success", "data": data })).into_response()
}

/// A route running `op` for every method in `methods`.
fn op(
    methods: &[axum::http::Method],
    op: Op,
    api: Api,
    router: MethodRouter<Arc<Nacos>>,
) -> MethodRouter<Arc<Nacos>> {
    route(methods, op, None, api, router)
}

/// A route running the write of [`FORWARDED`] named `name`.
fn forwarded(
    methods: &[axum::http::Method],
    name: &'static str,
    api: Api,
    router: MethodRouter<Arc<Nacos>>,
) -> MethodRouter<Arc<Nacos>> {
    let op = forwarded_op(name).expect("a forwarded write");
    route(methods, op, Some(name), api, router)
}

fn route(
    methods: &[axum::http::Method],
    op: Op,
    forward: Option<&'static str>,
    api: Api,
    router: MethodRouter<Arc<Nacos>>,
) -> MethodRouter<Arc<Nacos>> {
    methods.iter().fold(router, |r, m| {
        let filter = axum::routing::MethodFilter::try_from(m.clone())
            .unwrap_or(axum::routing::MethodFilter::GET);
        r.on(filter, move |State(n): State<Arc<Nacos>>, req: Request| {
            serve(n, op, forward, api, req)
        })
    })
}

/// The Nacos HTTP routes.
pub fn router(nacos: Arc<Nacos>) -> Router {
    use axum::http::Method as M;
    let mut r = Router::new();
    for (prefix, api) in [("/nacos/v1/ns", Api::V1), ("/nacos/v2/ns", Api::V2)] {
        let instance = MethodRouter::new();
        let instance = forwarded(&[M::POST], "register", api, instance);
        let instance = forwarded(&[M::DELETE], "deregister", api, instance);
        let instance = op(&[M::PUT], update, api, instance);
        let instance = op(&[M::PATCH], patch, api, instance);
        let instance = op(&[M::GET], detail, api, instance);
        let service = MethodRouter::new();
        let service = op(&[M::POST], create_service, api, service);
        let service = op(&[M::DELETE], delete_service, api, service);
        let service = op(&[M::PUT], update_service, api, service);
        let service = op(&[M::GET], service_detail, api, service);
        r = r
            .route(&format!("{prefix}/instance"), instance)
            .route(
                &format!("{prefix}/instance/list"),
                op(&[M::GET, M::POST], list, api, MethodRouter::new()),
            )
            .route(
                &format!("{prefix}/instance/beat"),
                forwarded(&[M::PUT, M::POST], "beat", api, MethodRouter::new()),
            )
            .route(&format!("{prefix}/service"), service)
            .route(
                &format!("{prefix}/service/list"),
                op(&[M::GET], service_list, api, MethodRouter::new()),
            )
            .route(
                &format!("{prefix}/operator/metrics"),
                op(&[M::GET], metrics, api, MethodRouter::new()),
            )
            .route(
                &format!("{prefix}/catalog/instances"),
                op(&[M::GET], catalog_instances, api, MethodRouter::new()),
            );
    }
    for path in [
        "/nacos/v1/auth/login",
        "/nacos/v1/auth/users/login",
        "/nacos/v3/auth/user/login",
    ] {
        r = r.route(
            path,
            op(&[M::GET, M::POST], login, Api::V1, MethodRouter::new()),
        );
    }
    r.route("/nacos/v1/console/health/liveness", get(|| async { "OK" }))
        .route("/nacos/v1/console/health/readiness", get(readiness))
        .route(
            "/nacos/health",
            on(axum::routing::MethodFilter::GET, || async { "success" }),
        )
        .with_state(nacos)
}

async fn readiness(State(n): State<Arc<Nacos>>) -> Response {
    use crate::node::Readiness;
    match n.node.readiness() {
        Readiness::Ready if !n.node.shutdown.is_cancelled() => "OK".into_response(),
        Readiness::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response(),
    }
}

// ---- instances ------------------------------------------------------------

fn register(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    let instance = p.instance()?;
    n.register_http(&key, instance)?;
    Ok(Reply::Ok)
}

/// Removes the HTTP instance at the address given (an instance a gRPC
/// client registered there is not the HTTP client's: it stays).
fn deregister(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    let probe = p.instance()?;
    n.deregister_http(HttpInstance {
        key: &key,
        instance: &probe,
    });
    Ok(Reply::Ok)
}

/// The id of the instance shown at the parameters' address: its own id, or
/// the one at the same ip, port and cluster.
fn existing(n: &Nacos, p: &Params) -> Result<(ServiceKey, String), Fail> {
    let key = p.key()?;
    let probe = p.instance()?;
    let found = n.node.view(&key).and_then(|published| {
        let view = &published.view;
        if view.instances.contains_key(probe.id.as_str()) {
            return Some(probe.id.clone());
        }
        let ip = probe.addresses.first()?.ip;
        view.instances
            .values()
            .find(|r| {
                let i = &r.instance;
                i.port == probe.port
                    && i.cluster == probe.cluster
                    && i.addresses.iter().any(|a| a.ip == ip)
            })
            .map(|r| r.instance.id.clone())
    });
    match found {
        Some(id) => Ok((key, id)),
        None => Err(Fail::no_instance(&key, &probe.id)),
    }
}

/// `PUT`: weight, enabled and metadata as given (absent ones keep).
fn update(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    edit(n, p, false)
}

/// `PATCH`: like `PUT`, but metadata is merged into the existing entries
/// and `healthy` may be set too.
fn patch(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    edit(n, p, true)
}

/// Edits the HTTP instance at the address given; one a gRPC client
/// registered there is not the HTTP client's to change (403).
fn edit(n: &Nacos, p: &Params, partial: bool) -> Result<Reply, Fail> {
    let key = p.key()?;
    let probe = p.instance()?;
    let weight = p.number("weight")?;
    let enabled = p.flag("enabled")?.or(p.flag("enable")?);
    let healthy = if partial { p.flag("healthy")? } else { None };
    let metadata = p.metadata()?;
    let at = HttpInstance {
        key: &key,
        instance: &probe,
    };
    n.edit_http(at, |i| {
        if let Some(w) = weight {
            i.weight = w;
        }
        if let Some(e) = enabled {
            i.enabled = e;
        }
        if let Some(h) = healthy {
            i.healthy = h;
        }
        match metadata {
            Some(m) if partial => i.metadata.extend(m),
            Some(m) => i.metadata = m,
            None => {}
        }
    })?;
    Ok(Reply::Ok)
}

fn detail(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let (key, id) = existing(n, p)?;
    let published = n.node.view(&key).ok_or_else(|| Fail::no_service(&key))?;
    let record = published
        .view
        .instances
        .get(id.as_str())
        .ok_or_else(|| Fail::no_instance(&key, &id))?;
    let host = wire::hosts(&key, &record.instance)
        .into_iter()
        .next()
        .unwrap_or_default();
    let i = &record.instance;
    Ok(Reply::Json(json!({
        "service": wire::grouped(&key),
        "serviceName": wire::grouped(&key),
        "groupName": key.group,
        "ip": host["ip"],
        "port": i.port,
        "clusterName": i.cluster,
        "weight": i.weight,
        "healthy": i.healthy,
        "enabled": i.enabled,
        "ephemeral": i.ephemeral,
        "instanceId": i.id,
        "metadata": host["metadata"],
    })))
}

fn list(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    let clusters = p.text("clusters").unwrap_or_default();
    let healthy_only = p.flag("healthyOnly")?.unwrap_or(false);
    let udp_port = p.integer("udpPort", 0..=65_535)?.unwrap_or(0);
    if let Ok(port) = u16::try_from(udp_port)
        && port != 0
    {
        let peer = p
            .peer
            .map(|a| a.ip())
            .ok_or_else(|| Fail::missing("clientIP"))?;
        // Pushes go to the address the request came from: only a trusted
        // proxy may name another (else anyone could aim them anywhere).
        let trusted = &n.node.config().nacos.trusted_proxies;
        let ip = match p.text("clientIP") {
            Some(ip) if trusted.contains(&peer) => ip.parse::<IpAddr>().map_err(|_| {
                Fail::bad(format!("Parameter 'clientIP' is not an IP address: {ip:?}"))
            })?,
            _ => peer,
        };
        n.udp_poll(SocketAddr::new(ip, port), &key, clusters);
    } else if let Some(peer) = p.peer {
        // A poller without a push channel: drain reports it cannot confirm.
        n.node
            .note_poller(&key, format!("nacos-http {}", peer.ip()));
    }
    // The text of the revision, shared by every reader that asks for the
    // same list: slow readers hold references, not copies.
    let request = InfoRequest {
        clusters,
        healthy_only,
        grouped_name: true,
    };
    Ok(Reply::JsonText(n.current_info(&key, &request).1))
}

/// `beat`: the JSON `beat` parameter (when sent) overrides the others and
/// lets an unknown instance be registered again.
fn beat(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let (merged, full) = beat_params(p)?;
    let key = merged.key()?;
    let instance = merged.instance()?;
    let known = n.beat(&key, instance, full)?;
    Ok(Reply::Bare(json!({
        "clientBeatInterval": n.beat_interval_ms(),
        "code": if known { 10200 } else { 20404 },
        "lightBeatEnabled": true,
    })))
}

/// A beat's parameters with its JSON `beat` (if sent) merged over them,
/// and whether it was sent (a full beat can bring its instance back).
fn beat_params(p: &Params) -> Result<(Params, bool), Fail> {
    let beat = match p.text("beat") {
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(v @ Value::Object(_)) => Some(v),
            _ => return Err(Fail::bad("Parameter 'beat' is not a JSON object")),
        },
        None => None,
    };
    let mut values = p.values.as_object().cloned().unwrap_or_default();
    if let Some(b) = &beat {
        for (from, to) in [
            ("serviceName", "serviceName"),
            ("ip", "ip"),
            ("port", "port"),
            ("cluster", "clusterName"),
            ("weight", "weight"),
            ("ephemeral", "ephemeral"),
        ] {
            match b.get(from) {
                Some(Value::String(s)) if !s.is_empty() => {
                    values.insert(to.into(), Value::String(s.clone()));
                }
                Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                    values.insert(to.into(), Value::String(v.to_string()));
                }
                _ => {}
            }
        }
        if let Some(Value::Object(m)) = b.get("metadata") {
            values.insert(
                "metadata".into(),
                Value::String(Value::Object(m.clone()).to_string()),
            );
        }
    }
    let merged = Params {
        values: Value::Object(values),
        peer: p.peer,
        api: p.api,
    };
    Ok((merged, beat.is_some()))
}

fn catalog_instances(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    let (_, info) = n.service_info(
        &key,
        &InfoRequest {
            clusters: p.text("clusterName").unwrap_or_default(),
            healthy_only: false,
            grouped_name: true,
        },
    );
    let list = info["hosts"].clone();
    let count = list.as_array().map_or(0, Vec::len);
    Ok(Reply::Json(json!({ "list": list, "count": count })))
}

// ---- services -------------------------------------------------------------

fn settings(p: &Params, base: ServiceSettings) -> Result<ServiceSettings, Fail> {
    Ok(ServiceSettings {
        protect_threshold: p
            .number("protectThreshold")?
            .unwrap_or(base.protect_threshold),
        metadata: p
            .metadata()?
            .map_or(base.metadata, |m| m.into_iter().collect()),
        selector: match p.text("selector") {
            None => base.selector,
            Some(text) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(_)) => text.to_owned(),
                _ => return Err(Fail::bad("Parameter 'selector' is not a JSON object")),
            },
        },
    })
}

fn create_service(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    if n.service_exists(&key) {
        return Err(Fail::bad(format!(
            "specified service already exists: {}",
            wire::grouped(&key)
        )));
    }
    n.set_service(key, settings(p, ServiceSettings::default())?)?;
    Ok(Reply::Ok)
}

fn delete_service(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    if !n.service_exists(&key) {
        return Err(Fail::no_service(&key));
    }
    if n.node
        .view(&key)
        .is_some_and(|p| !p.view.instances.is_empty())
    {
        return Err(Fail::bad(format!(
            "service {} still has instances; deregister them first",
            wire::grouped(&key)
        )));
    }
    n.remove_service(&key);
    Ok(Reply::Ok)
}

fn update_service(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    if !n.service_exists(&key) {
        return Err(Fail::no_service(&key));
    }
    let updated = settings(p, n.service_settings(&key))?;
    n.set_service(key, updated)?;
    Ok(Reply::Ok)
}

fn service_detail(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let key = p.key()?;
    if !n.service_exists(&key) {
        return Err(Fail {
            status: StatusCode::BAD_REQUEST,
            code: code::RESOURCE_NOT_FOUND,
            ..Fail::no_service(&key)
        });
    }
    let s = n.service_settings(&key);
    let clusters: std::collections::BTreeSet<String> = n
        .node
        .view(&key)
        .map(|v| {
            v.view
                .instances
                .values()
                .map(|r| r.instance.cluster.clone())
                .collect()
        })
        .unwrap_or_default();
    let selector = serde_json::from_str::<Value>(&s.selector)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({ "type": "none" }));
    Ok(Reply::Json(json!({
        "namespaceId": key.namespace,
        "namespace": key.namespace,
        "groupName": key.group,
        "name": key.service,
        "serviceName": key.service,
        "protectThreshold": s.protect_threshold,
        "metadata": s.metadata,
        "selector": selector,
        "ephemeral": true,
        "clusters": clusters.iter().map(|c| json!({
            "name": c,
            "healthChecker": { "type": "TCP" },
            "metadata": {},
        })).collect::<Vec<_>>(),
    })))
}

fn service_list(n: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    let namespace = ServiceKey::new(
        p.text("namespaceId")
            .or_else(|| p.text("namespace"))
            .unwrap_or_default(),
        "",
        "x",
    )?
    .namespace;
    let group = wire::group_or_default(p.text("groupName"));
    let page_no = p.integer("pageNo", 1..=i64::from(i32::MAX))?.unwrap_or(1);
    let page_size = p.integer("pageSize", 0..=10_000)?.unwrap_or(10);
    let (count, names) = n.page_of_services(&namespace, group, page_no, page_size);
    Ok(Reply::Json(match p.api {
        Api::V1 => json!({ "count": count, "doms": names }),
        Api::V2 => json!({ "count": count, "services": names }),
    }))
}

// ---- operator, auth ---------------------------------------------------------

/// Clients read only `status`: `UP` while the node serves (Node's client
/// takes anything else as down and tries another server).
fn metrics(n: &Arc<Nacos>, _: &Params) -> Result<Reply, Fail> {
    let (sessions, services, instances) = n.node.counts();
    let status = match n.node.readiness() {
        crate::node::Readiness::Ready => "UP",
        _ => "DOWN",
    };
    Ok(Reply::Json(json!({
        "status": status,
        "serviceCount": services,
        "instanceCount": instances,
        "subscribeCount": n.node.subscription_count(),
        "clientCount": sessions,
        "connectionBasedClientCount": sessions,
        "ephemeralIpPortClientCount": 0,
        "persistentIpPortClientCount": 0,
        "responsibleClientCount": sessions,
        "cpu": 0.0,
        "load": 0.0,
        "mem": 0.0,
    })))
}

/// Auth is off: any credentials get a token (clients configured with a
/// username keep working).
fn login(_: &Arc<Nacos>, p: &Params) -> Result<Reply, Fail> {
    Ok(Reply::Bare(json!({
        "accessToken": "roster-auth-disabled",
        "tokenTtl": 18000,
        "globalAdmin": true,
        "username": p.text("username").unwrap_or("nacos"),
    })))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any bytes as a form body: parameters or a 400, never a panic,
        /// and never text with replacement characters stored.
        #[test]
        fn any_form_body_is_read_or_refused(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut values = Map::new();
            if form(&raw, &mut values).is_ok() {
                let replaced = !raw.windows(3).any(|w| w == [0xEF, 0xBF, 0xBD])
                    && !String::from_utf8_lossy(&raw).contains("%EF%BF%BD");
                for (k, v) in &values {
                    if replaced {
                        prop_assert!(!k.contains(char::REPLACEMENT_CHARACTER));
                        prop_assert!(!v.as_str().unwrap().contains(char::REPLACEMENT_CHARACTER));
                    }
                }
            }
        }

        /// Encoded text comes back as it was.
        #[test]
        fn encoded_parameters_come_back_as_they_were(k in "[a-zA-Z]{1,8}", v in "\\PC{0,16}") {
            let raw: String = form_encode(&k, &v);
            let mut values = Map::new();
            form(raw.as_bytes(), &mut values).unwrap();
            prop_assert_eq!(values.get(&k).and_then(Value::as_str), Some(v.as_str()));
        }
    }

    fn form_encode(k: &str, v: &str) -> String {
        let enc = |s: &str| -> String {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        format!("{}={}", enc(k), enc(v))
    }

    #[test]
    fn a_form_with_invalid_utf8_is_refused_naming_the_parameter() {
        let mut values = Map::new();
        let Err(fail) = form(b"serviceName=a%FFb&ip=1", &mut values) else {
            panic!("accepted");
        };
        assert_eq!(fail.status, StatusCode::BAD_REQUEST);
        assert!(fail.message.contains("serviceName"), "{}", fail.message);
        form(b"a=x+y&b=%41%42&c&=d", &mut values).unwrap();
        assert_eq!(values["a"], "x y");
        assert_eq!(values["b"], "AB");
        assert_eq!(values["c"], "");
    }
}
