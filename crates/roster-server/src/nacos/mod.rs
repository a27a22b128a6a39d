//! Nacos compatibility: unmodified Nacos clients register, discover and get
//! pushes from the same registry as native clients. This module translates
//! the Nacos wire (`../shared/NACOS-PROTOCOL.md`) to [`crate::node::Node`]
//! operations. Instances live only in the node; kept here is what exists
//! only on the Nacos side: the per-service `lastRefTime` clock, heartbeat
//! deadlines of HTTP instances, service-level settings (`protectThreshold`,
//! selector, metadata) and the live gRPC connections and UDP subscribers.

pub mod beat;
pub mod grpc;
pub mod http;
pub mod udp;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use roster_core::{Instance, RegistryError, ServiceKey, ServiceView, SessionId};
use serde_json::Value;

use crate::node::Node;

/// Service-level settings created through the Nacos service API.
#[derive(Debug, Clone, Default)]
pub struct ServiceSettings {
    /// `protectThreshold` (stored and shown; Roster does not act on it).
    pub protect_threshold: f64,
    /// Service metadata.
    pub metadata: BTreeMap<String, String>,
    /// The selector, as the client sent it (JSON text), empty for none.
    pub selector: String,
}

/// A serialized `ServiceInfo` and the revision it shows.
type SharedInfo = (u64, Arc<str>);

/// State shared by the Nacos listeners of one node.
pub struct Nacos {
    /// The registry.
    pub node: Arc<Node>,
    /// Last `lastRefTime` given out per service: clients drop data whose
    /// `lastRefTime` is not newer than what they hold, so it must strictly
    /// increase per service.
    ref_times: Mutex<HashMap<ServiceKey, i64>>,
    /// The session owning every HTTP-registered instance; their liveness is
    /// decided by [`Self::beats`], never by the session sweep.
    http_session: SessionId,
    beats: Mutex<beat::Beats>,
    services: Mutex<BTreeMap<ServiceKey, ServiceSettings>>,
    /// UDP push to HTTP v1 subscribers.
    pub udp: udp::UdpPush,
    /// The serialized gRPC `ServiceInfo` last pushed per service and
    /// cluster list, with its revision: every subscriber of that revision
    /// gets the same text instead of a rebuild each. (For all clusters it
    /// lives on the view instead.)
    shared: Mutex<HashMap<ServiceKey, HashMap<String, SharedInfo>>>,
}

impl Nacos {
    /// The Nacos face of `node`; `udp` sends its UDP pushes.
    pub fn new(node: Arc<Node>, udp: Arc<tokio::net::UdpSocket>) -> Arc<Self> {
        let nacos_config = node.config().nacos.clone();
        Arc::new(Self {
            http_session: node.open_held("nacos-http"),
            beats: Mutex::new(beat::Beats::new(
                nacos_config.beat_timeout,
                nacos_config.delete_timeout,
            )),
            services: Mutex::new(BTreeMap::new()),
            ref_times: Mutex::new(HashMap::new()),
            udp: udp::UdpPush::new(udp),
            shared: Mutex::new(HashMap::new()),
            node,
        })
    }

    fn now() -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    /// The current view of `key` and a `lastRefTime` for it, taken together
    /// under the clock's lock, so a later emission never carries an older
    /// view.
    fn view_and_time(&self, key: &ServiceKey) -> (Option<Arc<ServiceView>>, i64) {
        let mut times = self.ref_times.lock();
        let view = self.node.view(key);
        (view, Self::next_ref_time(&mut times, key))
    }

    /// The `ServiceInfo` of `key` now, and the revision it shows.
    pub fn service_info(&self, key: &ServiceKey, req: &wire::InfoRequest<'_>) -> (u64, Value) {
        let (view, time) = self.view_and_time(key);
        let revision = view.as_ref().map_or(0, |v| v.revision);
        (
            revision,
            wire::service_info(key, view.as_deref(), time, req),
        )
    }

    /// The gRPC `ServiceInfo` (JSON text, all hosts) of `key` for
    /// `clusters`, and the revision it shows; built once per revision and
    /// shared by every push and query of it (for all clusters, on the view
    /// itself; for a cluster list, here while someone subscribes to it).
    /// Its `lastRefTime` is that of the first emission: a client that got
    /// the same revision later may drop this copy, which holds nothing new.
    pub fn shared_info(&self, key: &ServiceKey, clusters: &str) -> (u64, Arc<str>) {
        if clusters.is_empty() {
            return self.view_info(key, false);
        }
        let current = self.node.view(key).map_or(0, |v| v.revision);
        if let Some((revision, text)) = self
            .shared
            .lock()
            .get(key)
            .and_then(|by_clusters| by_clusters.get(clusters))
            && *revision == current
        {
            return (*revision, text.clone());
        }
        let request = wire::InfoRequest {
            clusters,
            healthy_only: false,
            grouped_name: false,
        };
        let (revision, info) = self.service_info(key, &request);
        let text: Arc<str> = info.to_string().into();
        self.shared
            .lock()
            .entry(key.clone())
            .or_default()
            .insert(clusters.to_owned(), (revision, text.clone()));
        (revision, text)
    }

    /// The HTTP `ServiceInfo` (JSON text, all clusters and hosts, the name
    /// as `group@@service`) of `key`, shared like [`Self::shared_info`]'s.
    pub fn shared_list(&self, key: &ServiceKey) -> (u64, Arc<str>) {
        self.view_info(key, true)
    }

    /// The `ServiceInfo` text of the current view of `key` for all clusters,
    /// kept on the view (so it goes with the revision).
    fn view_info(&self, key: &ServiceKey, grouped_name: bool) -> (u64, Arc<str>) {
        let slot = usize::from(grouped_name);
        // Already built: no lock, no clock.
        if let Some(view) = self.node.view(key)
            && let Some(text) = view.nacos_info[slot].get()
        {
            return (view.revision, text.clone());
        }
        let (view, time) = self.view_and_time(key);
        let request = wire::InfoRequest {
            clusters: "",
            healthy_only: false,
            grouped_name,
        };
        let build = || -> Arc<str> {
            wire::service_info(key, view.as_deref(), time, &request)
                .to_string()
                .into()
        };
        match &view {
            Some(v) => (v.revision, v.nacos_info[slot].get_or_init(build).clone()),
            None => (0, build()),
        }
    }

    /// Forgets the shared `ServiceInfo`s of a service nobody on this node
    /// subscribes to any more.
    pub fn forget_shared_info(&self, key: &ServiceKey) {
        self.shared.lock().remove(key);
    }

    /// The next `lastRefTime` of `key`: now in ms, and always above the
    /// last one given out.
    fn next_ref_time(times: &mut HashMap<ServiceKey, i64>, key: &ServiceKey) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        match times.get_mut(key) {
            Some(last) => {
                *last = now.max(*last + 1);
                *last
            }
            None => {
                times.insert(key.clone(), now);
                now
            }
        }
    }

    /// The id of the instance at the address of `probe`: its id if it has
    /// one, else the one at the same ip, port and cluster.
    pub fn find(&self, key: &ServiceKey, probe: &Instance) -> Option<String> {
        let view = self.node.view(key)?;
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
    }

    // ---- HTTP (heartbeat-driven) instances -------------------------------

    /// Registers an instance for an HTTP client: it lives while it is
    /// beaten (see [`beat::Beats`]). Returns its id.
    pub fn register_http(
        &self,
        key: ServiceKey,
        instance: Instance,
    ) -> Result<String, RegistryError> {
        let metadata = instance.metadata.clone();
        let (id, _) = self
            .node
            .register(&self.http_session, key.clone(), instance)?;
        self.beats.lock().beat(&key, &id, &metadata, Self::now());
        Ok(id)
    }

    /// Removes an instance whoever registered it (already gone is fine:
    /// it is what was asked for).
    pub fn deregister(&self, key: &ServiceKey, id: &str) {
        self.beats.lock().forget(key, id);
        let _ = self.node.deregister(key, id);
    }

    /// A heartbeat for the instance at `probe`'s address. An unknown one is
    /// registered anew from `probe` when the client sent its details
    /// (`recreate`); otherwise the answer is `false` (Nacos code 20404).
    pub fn beat(
        &self,
        key: &ServiceKey,
        probe: Instance,
        recreate: bool,
    ) -> Result<bool, RegistryError> {
        let found = self.find(key, &probe).and_then(|id| {
            let view = self.node.view(key)?;
            let record = view.instances.get(id.as_str())?.clone();
            Some((id, record))
        });
        match found {
            Some((id, record)) => {
                if record.owner == self.http_session {
                    let revive =
                        self.beats
                            .lock()
                            .beat(key, &id, &record.instance.metadata, Self::now());
                    if revive || !record.instance.healthy {
                        self.node.modify(key, &id, |i| i.healthy = true)?;
                    }
                }
                Ok(true)
            }
            None if recreate => {
                self.register_http(key.clone(), probe)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// `clientBeatInterval` sent to HTTP clients, in milliseconds: a third
    /// of the beat timeout, so two beats may be lost before an instance
    /// turns unhealthy (5 s with the default 15 s).
    pub fn beat_interval_ms(&self) -> u64 {
        (self.node.config().nacos.beat_timeout.as_millis() / 3).max(1) as u64
    }

    /// Applies heartbeat deadlines: silent HTTP instances turn unhealthy,
    /// then are removed. Instances since taken over by another session
    /// (a gRPC client registering the same address) are left alone.
    pub fn check_beats(&self) {
        let verdicts = self.beats.lock().check(Self::now());
        let owned = |key: &ServiceKey, id: &str| {
            self.node.owner_of(key, id).as_ref() == Some(&self.http_session)
        };
        for (key, id) in verdicts.unhealthy {
            if owned(&key, &id) {
                tracing::info!(service = %key, instance = %id, "no heartbeat: unhealthy");
                let _ = self.node.modify(&key, &id, |i| i.healthy = false);
            }
        }
        for (key, id) in verdicts.expired {
            if owned(&key, &id) {
                tracing::info!(service = %key, instance = %id, "no heartbeat: removed");
                let _ = self.node.deregister(&key, &id);
            }
        }
    }

    // ---- services ---------------------------------------------------------

    /// Whether a service exists: it has instances or was created.
    pub fn service_exists(&self, key: &ServiceKey) -> bool {
        self.services.lock().contains_key(key)
            || self.node.view(key).is_some_and(|v| !v.instances.is_empty())
    }

    /// The settings of a service (defaults when it was never configured).
    pub fn service_settings(&self, key: &ServiceKey) -> ServiceSettings {
        self.services.lock().get(key).cloned().unwrap_or_default()
    }

    /// Creates or replaces a service's settings.
    pub fn set_service(&self, key: ServiceKey, settings: ServiceSettings) {
        self.services.lock().insert(key, settings);
    }

    /// Forgets a service's settings; false if it had none.
    pub fn remove_service(&self, key: &ServiceKey) -> bool {
        self.services.lock().remove(key).is_some()
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
