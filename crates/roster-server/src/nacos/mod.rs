//! Nacos compatibility: unmodified Nacos clients register, discover and get
//! pushes from the same registry as native clients. This module translates
//! the Nacos wire (`docs/architecture.md`, "Nacos") to [`crate::node::Node`]
//! operations, with the semantics Java Nacos 2.x has: a gRPC connection is
//! a session holding one registration (or one batch) per service; an HTTP
//! v1 instance is a beat lease of its own, named by its address. Kept here
//! is only what exists on the Nacos side: service-level settings
//! (`protectThreshold`, selector, metadata), the texts of views as Nacos
//! shows them (each carrying its view's publication time as `lastRefTime`,
//! which so rises with the revision), and the live gRPC connections and
//! UDP subscribers.

pub mod grpc;
pub mod http;
pub mod request;
pub mod udp;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use roster_core::{Instance, RegistryError, ServiceKey, SessionId};
use serde_json::Value;

use crate::node::{Node, Published};

/// Metadata key overriding the unhealthy deadline of an HTTP instance (ms).
pub const BEAT_TIMEOUT_KEY: &str = "preserved.heart.beat.timeout";
/// Metadata key overriding the removal deadline of an HTTP instance (ms).
pub const DELETE_TIMEOUT_KEY: &str = "preserved.ip.delete.timeout";

/// Service-level settings created through the Nacos service API.
#[derive(Debug, Clone, Default)]
pub struct ServiceSettings {
    /// `protectThreshold`: when the healthy share of a service's instances
    /// is at or below it, lists show every instance (as healthy) and
    /// `reachProtectionThreshold`.
    pub protect_threshold: f64,
    /// Service metadata.
    pub metadata: BTreeMap<String, String>,
    /// The selector, as the client sent it (JSON text), empty for none.
    pub selector: String,
}

/// The Nacos texts of one published view, each made once: all clusters
/// with the name bare (`grpc`) or as `group@@service` (`http`), and the
/// filtered lists asked for.
#[derive(Debug, Default)]
pub struct ViewTexts {
    grpc: OnceLock<Arc<str>>,
    http: OnceLock<Arc<str>>,
    variants: Mutex<Vec<Variant>>,
}

/// A filtered `ServiceInfo` text of one view, made by the first reader
/// that asks (readers asking meanwhile wait for it rather than build
/// their own).
#[derive(Debug)]
struct Variant {
    clusters: String,
    healthy_only: bool,
    grouped_name: bool,
    text: Arc<OnceLock<Arc<str>>>,
}

/// Filtered texts kept per view (clients ask for one or two; more are
/// built for each request), so a view keeps at most six texts of itself.
const VARIANTS: usize = 4;

/// State shared by the Nacos listeners of one node.
pub struct Nacos {
    /// The registry.
    pub node: Arc<Node>,
    services: Mutex<BTreeMap<ServiceKey, ServiceSettings>>,
    /// UDP push to HTTP v1 subscribers.
    pub udp: udp::UdpPush,
}

/// How a request names an HTTP instance: its address in a service.
pub struct HttpInstance<'a> {
    /// The service.
    pub key: &'a ServiceKey,
    /// The instance as the request describes it (normalised).
    pub instance: &'a Instance,
}

impl HttpInstance<'_> {
    /// The beat lease of this address: one per (service, ip, port,
    /// cluster), named by a hash of them, so every request about the
    /// address finds it, and only it.
    pub fn lease(&self) -> SessionId {
        let k = self.key;
        let i = self.instance;
        let ip = i
            .addresses
            .first()
            .map(|a| a.ip.to_string())
            .unwrap_or_default();
        let identity = format!(
            "{}\u{0}{}\u{0}{}\u{0}{ip}\u{0}{}\u{0}{}",
            k.namespace, k.group, k.service, i.port, i.cluster
        );
        let hash = xxhash_rust::xxh3::xxh3_128(identity.as_bytes());
        format!("nacos-http-{hash:032x}").into()
    }
}

impl Nacos {
    /// The Nacos face of `node`; `udp` sends its UDP pushes.
    pub fn new(node: Arc<Node>, udp: Arc<tokio::net::UdpSocket>) -> Arc<Self> {
        Arc::new(Self {
            services: Mutex::new(BTreeMap::new()),
            udp: udp::UdpPush::new(udp),
            node,
        })
    }

    /// The `lastRefTime` of a list showing `published`: its publication
    /// time (every text of one revision carries the same), or now for a
    /// service nothing was ever registered in.
    fn stamp(published: Option<&Arc<Published>>) -> i64 {
        published.map_or_else(crate::node::now_ms, |p| p.stamp_ms)
    }

    /// The `ServiceInfo` of `key` now, and the revision it shows.
    pub fn service_info(&self, key: &ServiceKey, req: &wire::InfoRequest<'_>) -> (u64, Value) {
        let view = self.node.view(key);
        let time = Self::stamp(view.as_ref());
        let revision = view.as_ref().map_or(0, |p| p.view.revision);
        let protection = self.protection(key);
        let info = wire::service_info(key, view.as_ref().map(|p| &*p.view), time, req, protection);
        (revision, info)
    }

    /// The protect threshold of `key`, if the service has settings (as in
    /// Nacos, a service made by registrations alone has no protection).
    fn protection(&self, key: &ServiceKey) -> Option<f64> {
        self.services.lock().get(key).map(|s| s.protect_threshold)
    }

    /// The `ServiceInfo` (JSON text) of `published` (the view of `key`,
    /// or none) for `request`. Each text is built at most once per
    /// revision and kept beside the view (the unfiltered ones always,
    /// filtered ones up to [`VARIANTS`] per revision), so readers of one
    /// revision share one text however many ask or however slowly they read.
    pub fn info_text(
        &self,
        key: &ServiceKey,
        published: Option<&Arc<Published>>,
        request: &wire::InfoRequest<'_>,
    ) -> Arc<str> {
        let build = || -> Arc<str> {
            let time = Self::stamp(published);
            let view = published.map(|p| &*p.view);
            wire::service_info(key, view, time, request, self.protection(key))
                .to_string()
                .into()
        };
        let Some(p) = published else {
            return build();
        };
        if request.clusters.is_empty() && !request.healthy_only {
            let slot = if request.grouped_name {
                &p.nacos.http
            } else {
                &p.nacos.grpc
            };
            return slot.get_or_init(build).clone();
        }
        let wanted = |v: &Variant| {
            v.clusters == request.clusters
                && v.healthy_only == request.healthy_only
                && v.grouped_name == request.grouped_name
        };
        let slot = {
            let mut variants = p.nacos.variants.lock();
            match variants.iter().find(|v| wanted(v)) {
                Some(v) => v.text.clone(),
                None if variants.len() < VARIANTS => {
                    let slot = Arc::new(OnceLock::new());
                    variants.push(Variant {
                        clusters: request.clusters.to_owned(),
                        healthy_only: request.healthy_only,
                        grouped_name: request.grouped_name,
                        text: slot.clone(),
                    });
                    slot
                }
                None => return build(),
            }
        };
        slot.get_or_init(build).clone()
    }

    /// The `ServiceInfo` text of `key` now for `request`, and the revision
    /// it shows.
    pub fn current_info(
        &self,
        key: &ServiceKey,
        request: &wire::InfoRequest<'_>,
    ) -> (u64, Arc<str>) {
        let view = self.node.view(key);
        let revision = view.as_ref().map_or(0, |p| p.view.revision);
        (revision, self.info_text(key, view.as_ref(), request))
    }

    // ---- HTTP (heartbeat-driven) instances -------------------------------

    /// The deadlines of an HTTP instance: the configured ones, or those its
    /// metadata asks for, kept within `limits.client_timeout_min..=max`.
    fn deadlines(&self, instance: &Instance) -> (Duration, Duration) {
        let config = &self.node.config().nacos;
        let limits = &self.node.config().limits;
        let millis = |k: &str| {
            instance
                .metadata
                .get(k)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .map(|d| d.clamp(limits.client_timeout_min, limits.client_timeout_max))
        };
        let unhealthy = millis(BEAT_TIMEOUT_KEY).unwrap_or(config.beat_timeout);
        let delete = millis(DELETE_TIMEOUT_KEY)
            .unwrap_or(config.delete_timeout)
            .max(unhealthy);
        (unhealthy, delete)
    }

    /// Registers an instance for an HTTP client in its address's beat
    /// lease (replacing what the lease held): it lives while it is beaten.
    /// Returns its id.
    pub fn register_http(
        &self,
        key: &ServiceKey,
        instance: Instance,
    ) -> Result<String, RegistryError> {
        let instance = instance.normalize()?;
        let lease = HttpInstance {
            key,
            instance: &instance,
        }
        .lease();
        let (unhealthy, delete) = self.deadlines(&instance);
        let created = self.node.open_beat_lease(&lease, unhealthy, delete)?;
        let id = instance.id.clone();
        let result = self.node.set_instances(&lease, key, vec![instance]);
        if result.is_err() && created {
            self.node.close_session(&lease);
        }
        result?;
        Ok(id)
    }

    /// Removes the HTTP instance at `at`'s address (already gone is fine:
    /// it is what was asked for). An instance another client registered
    /// there (a gRPC connection) is not the HTTP client's to remove.
    pub fn deregister_http(&self, at: HttpInstance<'_>) {
        self.node.close_session(&at.lease());
    }

    /// Edits the HTTP instance at `at`'s address.
    pub fn edit_http(
        &self,
        at: HttpInstance<'_>,
        edit: impl FnOnce(&mut Instance),
    ) -> Result<(), RegistryError> {
        let id = &at.instance.id;
        match self.node.modify(&at.lease(), at.key, id, edit) {
            Ok(_) => Ok(()),
            // No lease there: the address is someone else's, or no one's.
            Err(RegistryError::UnknownSession(_)) => Err(match self.node.view(at.key) {
                Some(p) if p.view.instances.contains_key(id.as_str()) => RegistryError::NotOwner {
                    service: at.key.to_string(),
                    id: id.clone(),
                },
                _ => RegistryError::UnknownInstance {
                    service: at.key.to_string(),
                    id: id.clone(),
                },
            }),
            Err(e) => Err(e),
        }
    }

    /// A heartbeat for the HTTP instance at `probe`'s address. An unknown
    /// one is registered anew from `probe` when the client sent its
    /// details (`recreate`); otherwise the answer is `false` (Nacos code
    /// 20404). The beat and the deadline check share one lock, so a beat
    /// answered as known is never followed by the removal it beat.
    pub fn beat(
        &self,
        key: &ServiceKey,
        probe: Instance,
        recreate: bool,
    ) -> Result<bool, RegistryError> {
        let probe = probe.normalize()?;
        let lease = HttpInstance {
            key,
            instance: &probe,
        }
        .lease();
        match self.node.beat(&lease) {
            Ok(()) => Ok(true),
            Err(RegistryError::UnknownSession(_)) if recreate => {
                self.register_http(key, probe)?;
                Ok(true)
            }
            Err(RegistryError::UnknownSession(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `clientBeatInterval` sent to HTTP clients, in milliseconds: a third
    /// of the beat timeout, so two beats may be lost before an instance
    /// turns unhealthy (5 s with the default 15 s).
    pub fn beat_interval_ms(&self) -> u64 {
        (self.node.config().nacos.beat_timeout.as_millis() / 3).max(1) as u64
    }

    // ---- services ---------------------------------------------------------

    /// Whether a service exists: it has instances or was created.
    pub fn service_exists(&self, key: &ServiceKey) -> bool {
        self.services.lock().contains_key(key)
            || self
                .node
                .view(key)
                .is_some_and(|p| !p.view.instances.is_empty())
    }

    /// The settings of a service (defaults when it was never configured).
    pub fn service_settings(&self, key: &ServiceKey) -> ServiceSettings {
        self.services.lock().get(key).cloned().unwrap_or_default()
    }

    /// Creates or replaces a service's settings; subscribers are sent its
    /// list again (the protect threshold may change what it shows).
    /// Refused when `limits.services` services have settings already.
    pub fn set_service(
        &self,
        key: ServiceKey,
        settings: ServiceSettings,
    ) -> Result<(), RegistryError> {
        let mut services = self.services.lock();
        let max = self.node.config().limits.services;
        if !services.contains_key(&key) && services.len() >= max {
            drop(services);
            return Err(self.node.refuse("services", max));
        }
        services.insert(key.clone(), settings);
        drop(services);
        self.node.bump_service(&key);
        Ok(())
    }

    /// Forgets a service's settings; false if it had none.
    pub fn remove_service(&self, key: &ServiceKey) -> bool {
        let removed = self.services.lock().remove(key).is_some();
        if removed {
            self.node.bump_service(key);
        }
        removed
    }

    /// One page of a namespace's services in `group`, by name: the total and
    /// the bare names. A service is listed while it has instances or was
    /// created through the service API.
    pub fn page_of_services(
        &self,
        namespace: &str,
        group: &str,
        page_no: i64,
        page_size: i64,
    ) -> (usize, Vec<String>) {
        let wanted = |k: &ServiceKey| k.namespace == namespace && k.group == group;
        let mut names: std::collections::BTreeSet<String> = self
            .node
            .views()
            .values()
            .map(|p| &p.view)
            .filter(|v| wanted(&v.key) && !v.instances.is_empty())
            .map(|v| v.key.service.clone())
            .collect();
        names.extend(
            self.services
                .lock()
                .keys()
                .filter(|k| wanted(k))
                .map(|k| k.service.clone()),
        );
        let count = names.len();
        let start = usize::try_from((page_no - 1).saturating_mul(page_size)).unwrap_or(usize::MAX);
        let page = names
            .into_iter()
            .skip(start)
            .take(usize::try_from(page_size).unwrap_or(0))
            .collect();
        (count, page)
    }
}
