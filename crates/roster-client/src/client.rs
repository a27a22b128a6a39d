//! The application-facing client: the builder, registrations,
//! subscriptions, instance selection and status. It owns the state the
//! background driver ([`crate::driver`]) keeps in step with the registry;
//! it makes no network call itself.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roster_core::{Instance, ServiceKey, ValidationError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balance::{Balancer, ShieldPolicy};
use crate::disk::DiskCache;
use crate::driver;
use crate::raw::Connection;
use crate::state::{Change, Command, Config, Registered, Shared, State, Status, Sub, Update};
use crate::{ClientError, metric_names};

/// An instance chosen by [`Client::select`] and the address to call.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    /// The instance.
    pub instance: Arc<Instance>,
    /// The address (on the network that last worked) and port.
    pub address: SocketAddr,
}

/// Something that names a service: a bare name (in the client's namespace
/// and the default group) or a full [`ServiceKey`].
pub trait ServiceName {
    /// The key, with `namespace` for bare names.
    fn service_key(&self, namespace: &str) -> Result<ServiceKey, ValidationError>;
}

impl ServiceName for &str {
    fn service_key(&self, namespace: &str) -> Result<ServiceKey, ValidationError> {
        ServiceKey::new(namespace, "", *self)
    }
}

impl ServiceName for String {
    fn service_key(&self, namespace: &str) -> Result<ServiceKey, ValidationError> {
        self.as_str().service_key(namespace)
    }
}

impl ServiceName for &String {
    fn service_key(&self, namespace: &str) -> Result<ServiceKey, ValidationError> {
        self.as_str().service_key(namespace)
    }
}

impl ServiceName for ServiceKey {
    fn service_key(&self, _: &str) -> Result<ServiceKey, ValidationError> {
        Ok(self.clone())
    }
}

impl ServiceName for &ServiceKey {
    fn service_key(&self, _: &str) -> Result<ServiceKey, ValidationError> {
        Ok((*self).clone())
    }
}

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    config: Config,
    cache_dir: Option<PathBuf>,
    shield: ShieldPolicy,
    seed: Option<u64>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            config: Config {
                addresses: Vec::new(),
                namespace: String::new(),
                client_name: "roster-client".into(),
                connect_timeout: Duration::from_secs(3),
                request_timeout: Duration::from_secs(5),
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(10),
                pull_interval: Duration::from_secs(30),
                empty_push_protection: true,
                empty_confirm_delay: Duration::from_secs(5),
                require_connection: false,
            },
            cache_dir: None,
            shield: ShieldPolicy::default(),
            seed: None,
        }
    }
}

impl ClientBuilder {
    /// Registry addresses ("host:port"), tried in order and in turn on
    /// failure. At least one is required.
    pub fn addresses<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.addresses = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// The namespace bare service names belong to (default `public`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = namespace.into();
        self
    }

    /// How the registry names this client in its session list.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.config.client_name = name.into();
        self
    }

    /// Timeout to connect and open a session (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Timeout of each call to the registry (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Reconnect back-off: the first wait is random in `0..base`, doubling
    /// up to `max` (default 100 ms and 10 s). Random "full jitter" spreads
    /// thousands of clients losing the same node.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base.max(Duration::from_millis(1));
        self.config.backoff_max = max.max(self.config.backoff_base);
        self
    }

    /// How often every subscribed service is pulled, catching anything a
    /// push missed (default 30 s).
    pub fn pull_interval(mut self, interval: Duration) -> Self {
        self.config.pull_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Hold back an update that would empty a service that had instances
    /// until a pull confirms it (default on).
    pub fn empty_push_protection(mut self, on: bool) -> Self {
        self.config.empty_push_protection = on;
        self
    }

    /// How long after holding back an emptying update the confirming pull
    /// is made (default 5 s; the periodic pull also confirms).
    pub fn empty_confirm_delay(mut self, delay: Duration) -> Self {
        self.config.empty_confirm_delay = delay;
        self
    }

    /// Keep last good views in `dir` and serve them when no registry is
    /// reachable at start.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Failures in a row that shield an address, and for how long
    /// (default 5 and 30 s).
    pub fn shield(mut self, failures: u32, period: Duration) -> Self {
        self.shield = ShieldPolicy {
            failures: failures.max(1),
            period,
        };
        self
    }

    /// Seed of the random choices in [`Client::select`] (default random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Fail [`ClientBuilder::build`] when no registry answers its first
    /// round of attempts (default: start anyway, degraded or
    /// disconnected, and keep trying).
    pub fn require_connection(mut self, required: bool) -> Self {
        self.config.require_connection = required;
        self
    }

    /// Starts the client: loads the disk cache, tries each address once
    /// and returns, connected or not (unless a connection is required).
    pub async fn build(self) -> Result<Client, ClientError> {
        let mut config = self.config;
        if config.addresses.is_empty() {
            return Err(ClientError::Address("no registry address was given".into()));
        }
        for a in &config.addresses {
            let uri = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            if tonic::transport::Endpoint::from_shared(uri).is_err() {
                return Err(ClientError::Address(a.clone()));
            }
        }
        // Validates the namespace (and fills the default).
        config.namespace = ServiceKey::new(&config.namespace, "", "x")?.namespace;
        let disk = match self.cache_dir {
            Some(dir) => {
                let shown = dir.display().to_string();
                let failed = |reason: String| ClientError::Cache {
                    dir: shown.clone(),
                    reason,
                };
                let disk = tokio::task::spawn_blocking(move || DiskCache::open(dir))
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .map_err(|e| failed(e.to_string()))?;
                Some(disk)
            }
            None => None,
        };
        let from_disk = match &disk {
            Some(d) => {
                let d = d.clone();
                tokio::task::spawn_blocking(move || d.load())
                    .await
                    .unwrap_or_default()
            }
            None => HashMap::new(),
        };
        let (commands, receiver) = mpsc::unbounded_channel();
        let (status, _) = watch::channel(Status::Disconnected);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                registrations: BTreeMap::new(),
                next_registration: 0,
                subs: HashMap::new(),
                from_disk,
                balancer: Balancer::new(
                    self.shield,
                    self.seed.unwrap_or_else(|| fastrand::u64(..)),
                ),
                server: None,
                last_error: None,
                skip_pushes: 0,
            }),
            config,
            status,
            commands,
            stop: CancellationToken::new(),
            disk,
        });
        let (first_tx, first_rx) = oneshot::channel();
        tokio::spawn(driver::run(shared.clone(), receiver, first_tx));
        let _ = first_rx.await;
        let client = Client {
            handle: Arc::new(Handle { shared }),
        };
        if client.shared().config.require_connection && client.status() != Status::Connected {
            let state = client.shared().lock();
            let err = ClientError::Connect {
                addr: client.shared().config.addresses.join(", "),
                reason: state.last_error.clone().unwrap_or_default(),
            };
            drop(state);
            client.shared().stop.cancel();
            return Err(err);
        }
        Ok(client)
    }
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// A registry client. Cheap to clone; the session ends when the last clone
/// is dropped or [`Client::shutdown`] is called.
#[derive(Debug, Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl Client {
    /// A builder with the defaults.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    fn key(&self, service: impl ServiceName) -> Result<ServiceKey, ClientError> {
        Ok(service.service_key(&self.shared().config.namespace)?)
    }

    /// Registers an ephemeral instance and keeps it registered, across
    /// reconnects and failovers, until [`Registration::deregister`] or
    /// [`Client::shutdown`]. An invalid instance, or one the registry
    /// refuses, is an error and is not kept. While no registry is
    /// reachable the registration is kept and made on reconnect.
    pub async fn register(
        &self,
        service: impl ServiceName,
        instance: Instance,
    ) -> Result<Registration, ClientError> {
        let key = self.key(service)?;
        let instance = instance.normalize()?;
        let instance_id = instance.id.clone();
        let id = {
            let mut state = self.shared().lock();
            state.next_registration += 1;
            let id = state.next_registration;
            state.registrations.insert(
                id,
                Registered {
                    key: key.clone(),
                    instance,
                },
            );
            id
        };
        let outcome = self
            .shared()
            .ask(|reply| Command::Register { id, reply })
            .await
            .and_then(|r| r);
        if let Err(e) = outcome {
            self.shared().lock().registrations.remove(&id);
            return Err(e);
        }
        Ok(Registration {
            shared: self.shared().clone(),
            id,
            key,
            instance_id,
        })
    }

    /// Subscribes to a service (a no-op if already subscribed) and returns
    /// its stream of updates, starting with the current view when there is
    /// one. Once connected, this waits for the registry's view.
    pub async fn subscribe(&self, service: impl ServiceName) -> Result<Subscription, ClientError> {
        let key = self.key(service)?;
        let created = {
            let mut state = self.shared().lock();
            if state.subs.contains_key(&key) {
                false
            } else {
                let cache = state.from_disk.remove(&key);
                let (events, _) = broadcast::channel(4096);
                state.subs.insert(
                    key.clone(),
                    Sub {
                        loaded: cache.is_some(),
                        cache: cache.unwrap_or_default(),
                        events,
                        held_since: None,
                        disk_dirty: false,
                    },
                );
                true
            }
        };
        if created {
            self.shared()
                .ask(|reply| Command::Subscribe {
                    key: key.clone(),
                    reply,
                })
                .await?;
        }
        let state = self.shared().lock();
        let sub = state.subs.get(&key).ok_or(ClientError::SessionClosed)?;
        let first = sub.loaded.then(|| Update {
            service: key.clone(),
            revision: sub.cache.revision,
            change: Change::Reset(sub.cache.instances().cloned().collect()),
        });
        Ok(Subscription {
            shared: self.shared().clone(),
            key: key.clone(),
            first,
            events: sub.events.subscribe(),
        })
    }

    /// Stops following a service and forgets its cached view.
    pub async fn unsubscribe(&self, service: impl ServiceName) -> Result<(), ClientError> {
        let key = self.key(service)?;
        if self.shared().lock().subs.remove(&key).is_some() {
            let _ = self.shared().commands.send(Command::Unsubscribe { key });
        }
        Ok(())
    }

    /// The instances of a subscribed service, from memory (empty when not
    /// subscribed).
    pub fn instances(&self, service: impl ServiceName) -> Vec<Arc<Instance>> {
        let Ok(key) = self.key(service) else {
            return Vec::new();
        };
        self.shared()
            .lock()
            .subs
            .get(&key)
            .map(|s| s.cache.instances().cloned().collect())
            .unwrap_or_default()
    }

    /// The revision of the view held for a subscribed service.
    pub fn revision(&self, service: impl ServiceName) -> Option<u64> {
        let key = self.key(service).ok()?;
        Some(self.shared().lock().subs.get(&key)?.cache.revision)
    }

    /// Whether an update that would empty a subscribed service is being
    /// held back (empty-push protection) until a pull confirms it.
    pub fn held(&self, service: impl ServiceName) -> bool {
        let Ok(key) = self.key(service) else {
            return false;
        };
        self.shared()
            .lock()
            .subs
            .get(&key)
            .is_some_and(|s| s.held_since.is_some())
    }

    /// Picks a healthy, enabled instance of a subscribed service with
    /// weight above 0, at random by weight, skipping shielded addresses.
    pub fn select(&self, service: impl ServiceName) -> Option<Selected> {
        let key = self.key(service).ok()?;
        let mut guard = self.shared().lock();
        let state = &mut *guard;
        let cache = &state.subs.get(&key)?.cache;
        let (instance, address) = state
            .balancer
            .select(&key, cache.instances(), Instant::now())?;
        Some(Selected { instance, address })
    }

    /// A call to `address` failed: after enough failures in a row it is
    /// shielded for a while; a multi-network instance moves to its next
    /// address.
    pub fn report_failure(&self, address: SocketAddr) {
        let now = Instant::now();
        let mut state = self.shared().lock();
        if state.balancer.report_failure(address, now) {
            tracing::warn!(%address, "address shielded after repeated failures");
        }
        let shielded = state.balancer.shielded(now);
        metrics::gauge!(metric_names::SHIELDED_ADDRESSES).set(shielded as f64);
    }

    /// A call to `address` worked: its failures are forgotten.
    pub fn report_success(&self, address: SocketAddr) {
        let mut state = self.shared().lock();
        state.balancer.report_success(address);
        let shielded = state.balancer.shielded(Instant::now());
        metrics::gauge!(metric_names::SHIELDED_ADDRESSES).set(shielded as f64);
    }

    /// Connected, degraded (serving cached views) or disconnected.
    pub fn status(&self) -> Status {
        *self.shared().status.borrow()
    }

    /// Waits until the status is `wanted` (for tools and tests).
    pub async fn wait_for_status(&self, wanted: Status) {
        let mut rx = self.shared().status.subscribe();
        let _ = rx.wait_for(|s| *s == wanted).await;
    }

    /// The registry address in use, when connected.
    pub fn server(&self) -> Option<String> {
        self.shared().lock().server.clone()
    }

    /// Why the last connection attempt failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.shared().lock().last_error.clone()
    }

    /// Pulls a subscribed service now instead of waiting for the periodic
    /// pull (this also confirms an update held back by protection).
    pub async fn refresh(&self, service: impl ServiceName) -> Result<(), ClientError> {
        let key = self.key(service)?;
        self.shared()
            .ask(|reply| Command::Refresh { key, reply })
            .await?
    }

    /// A raw connection to the registry in use, for one-shot operator
    /// calls (query, list services, drain) the SDK does not wrap.
    pub async fn connection(&self) -> Result<Connection, ClientError> {
        self.shared()
            .ask(|reply| Command::Connection { reply })
            .await?
    }

    /// Test seam: drops the next `n` pushes that carry a revision newer
    /// than the one held, as if lost on the way, so the
    /// recovery path (gap, full reload) can be exercised against a real
    /// registry.
    #[doc(hidden)]
    pub fn drop_next_pushes(&self, n: u32) {
        self.shared().lock().skip_pushes = n;
    }

    /// Deregisters everything this client registered, writes the disk
    /// cache and ends the session.
    pub async fn shutdown(self) {
        let _ = self.shared().ask(|reply| Command::Shutdown { reply }).await;
        self.shared().stop.cancel();
    }
}

/// A registration kept alive by the client.
#[derive(Debug)]
pub struct Registration {
    shared: Arc<Shared>,
    id: u64,
    key: ServiceKey,
    instance_id: String,
}

impl Registration {
    /// The service registered in.
    pub fn service(&self) -> &ServiceKey {
        &self.key
    }

    /// The instance's id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Drains the instance without a fixed sleep: sets its weight to 0 (or,
    /// with `remove`, removes it and stops keeping it alive) and waits
    /// until every subscriber of the service has applied that, or
    /// `timeout` passed. The answer names who acknowledged, who did not,
    /// who left meanwhile, and readers that cannot acknowledge.
    pub async fn drain(
        &self,
        remove: bool,
        timeout: Duration,
    ) -> Result<roster_proto::v1::DrainResponse, ClientError> {
        {
            let mut state = self.shared.lock();
            if remove {
                state.registrations.remove(&self.id);
            } else if let Some(r) = state.registrations.get_mut(&self.id) {
                // Registered again at weight 0 on a new session, too.
                r.instance.weight = 0.0;
            }
        }
        self.shared
            .ask(|reply| Command::Drain {
                key: self.key.clone(),
                instance_id: self.instance_id.clone(),
                remove,
                timeout,
                reply,
            })
            .await?
    }

    /// Removes the instance from the registry and stops keeping it alive.
    /// An error says the registry could not be told (unreachable, or the
    /// session was being replaced): the client forgets the registration
    /// all the same, and the registry removes it when the session it
    /// belongs to expires.
    pub async fn deregister(self) -> Result<(), ClientError> {
        if self.shared.lock().registrations.remove(&self.id).is_none() {
            return Ok(());
        }
        self.shared
            .ask(|reply| Command::Deregister {
                key: self.key.clone(),
                instance_id: self.instance_id.clone(),
                reply,
            })
            .await?
    }
}

/// The updates of one subscribed service, in order.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    key: ServiceKey,
    first: Option<Update>,
    events: broadcast::Receiver<Update>,
}

impl Subscription {
    /// The service.
    pub fn service(&self) -> &ServiceKey {
        &self.key
    }

    /// The next update; `None` once the client has stopped or the service
    /// was unsubscribed. A reader that fell far behind gets one
    /// [`Change::Reset`] with the current view instead of what it missed.
    pub async fn next(&mut self) -> Option<Update> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        match self.events.recv().await {
            Ok(update) => Some(update),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let state = self.shared.lock();
                let sub = state.subs.get(&self.key)?;
                self.events = sub.events.subscribe();
                Some(Update {
                    service: self.key.clone(),
                    revision: sub.cache.revision,
                    change: Change::Reset(sub.cache.instances().cloned().collect()),
                })
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
