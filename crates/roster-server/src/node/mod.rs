//! A registry node's shared state, independent of the listener calls
//! arrive on. Owns the core [`Registry`] behind one mutex (the write
//! funnel: every write runs there, then is published to readers and told
//! to the pusher), the lock-free snapshot of published views, the node's
//! identity and readiness. Concerns live in submodules: session links
//! ([`links`]), subscriptions and fan-out ([`fanout`]), drain ([`drain`]),
//! replication between cluster members ([`replication`]).
//! Lock order is always replicator → core → subscriptions → a link's
//! queue; readers take none of them.

pub mod drain;
pub mod fanout;
pub mod links;
pub mod replication;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use roster_core::push::Subscriptions;
use roster_core::session::SessionTimeouts;
use roster_core::{
    Change, Instance, Registry, RegistryConfig, RegistryError, ServiceKey, ServiceView, SessionId,
};
use roster_proto::v1;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;

pub use drain::DrainOutcome;
pub use fanout::{Control, Item, PullAnswer, PushUpdate};
pub use links::{SessionLink, StreamWaker};

/// One service's view as published to readers, with the encodings the
/// front-ends made of it (each at most once per revision).
#[derive(Debug)]
pub struct Published {
    /// The view.
    pub view: Arc<ServiceView>,
    /// When it was published, in Unix milliseconds, strictly above the
    /// service's previous publication (Nacos clients drop a list whose
    /// `lastRefTime` is not above the one they hold, so every text of this
    /// revision carries this one).
    pub stamp_ms: i64,
    /// The native full-view `ServiceUpdate`, encoded.
    native: OnceLock<Bytes>,
    /// The HTTP API's list of this view: all instances, and serving only.
    pub http_lists: [OnceLock<Bytes>; 2],
    /// The Nacos front-end's texts of this view.
    pub nacos: crate::nacos::ViewTexts,
}

/// A published view reads as the view it publishes.
impl std::ops::Deref for Published {
    type Target = ServiceView;

    fn deref(&self) -> &ServiceView {
        &self.view
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Published {
    fn new(view: Arc<ServiceView>, previous: Option<&Published>) -> Self {
        // A first publication is stamped a millisecond ahead, above any
        // answer given while the service had no view (stamped "now").
        let stamp_ms = match previous {
            Some(p) => now_ms().max(p.stamp_ms + 1),
            None => now_ms() + 1,
        };
        Self {
            view,
            stamp_ms,
            native: OnceLock::new(),
            http_lists: Default::default(),
            nacos: Default::default(),
        }
    }
}

/// Every published view by service: a persistent map, so a snapshot of it
/// is an O(1) clone that readers keep as long as they like.
pub type Views = imbl::GenericHashMap<
    Arc<ServiceKey>,
    Arc<Published>,
    rustc_hash::FxBuildHasher,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// Whether the node serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Starting: no sessions, discovery or pushes yet.
    Loading,
    /// Serving.
    Ready,
    /// Shutting down: no new sessions; existing ones end soon.
    Draining,
}

/// One registry node.
pub struct Node {
    config: Config,
    /// Which node life numbers the revisions served.
    epoch: v1::NodeEpoch,
    readiness: AtomicU8,
    core: Mutex<Registry>,
    views: ArcSwap<Views>,
    subs: Mutex<Subscriptions>,
    links: RwLock<HashMap<roster_core::SessionId, Arc<SessionLink>>>,
    changes: mpsc::UnboundedSender<(Arc<ServiceKey>, Instant)>,
    acks: Notify,
    /// Recent readers that cannot acknowledge, per service (for drain).
    pollers: Mutex<drain::Pollers>,
    /// Empty views of forgotten services, kept while subscribed.
    orphans: Mutex<Vec<Arc<ServiceKey>>>,
    /// Replication to the cluster's other members (none: a node alone).
    replication: Option<replication::Replication>,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Every task of the node; shutdown waits for them.
    pub tasks: TaskTracker,
}

impl Node {
    /// A node named `name` in its life `incarnation`, and the receiver of
    /// its change notifications (for the pusher). It starts loading.
    pub fn new(
        config: Config,
        name: &str,
        incarnation: u64,
    ) -> (
        Arc<Self>,
        mpsc::UnboundedReceiver<(Arc<ServiceKey>, Instant)>,
    ) {
        let mut registry = Registry::new(
            name,
            incarnation,
            RegistryConfig {
                delta_window: config.registry.delta_window,
                timeouts: SessionTimeouts {
                    keepalive: config.session.keepalive,
                    probe_timeout: config.session.probe_timeout,
                },
                tombstone_grace: config.registry.tombstone_grace,
                limits: config.limits.core(),
                empty_service_grace: config.registry.empty_service_grace,
            },
        );
        let outboxes = crate::cluster::outboxes(&config);
        let replication = (!outboxes.is_empty()).then(|| {
            let replicator = roster_core::replication::Replicator::new(
                name.into(),
                incarnation,
                outboxes.keys().cloned(),
                config.cluster.replication(),
                &mut registry,
                Self::now(),
            );
            replication::Replication::new(replicator, outboxes)
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let node = Arc::new(Self {
            replication,
            epoch: v1::NodeEpoch {
                node: name.to_owned(),
                incarnation,
            },
            readiness: AtomicU8::new(Readiness::Loading as u8),
            core: Mutex::new(registry),
            views: ArcSwap::from_pointee(Views::default()),
            subs: Mutex::new(Subscriptions::default()),
            links: RwLock::new(HashMap::new()),
            changes: tx,
            acks: Notify::new(),
            pollers: Mutex::new(drain::Pollers::default()),
            orphans: Mutex::new(Vec::new()),
            metrics: Arc::new(Metrics::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            config,
        });
        (node, rx)
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This node life: its name and incarnation.
    pub fn epoch(&self) -> &v1::NodeEpoch {
        &self.epoch
    }

    /// Incarnation of this node (its life; grows at every start).
    pub fn incarnation(&self) -> u64 {
        self.epoch.incarnation
    }

    /// Loading, ready or draining.
    pub fn readiness(&self) -> Readiness {
        match self.readiness.load(Ordering::Acquire) {
            0 => Readiness::Loading,
            1 => Readiness::Ready,
            _ => Readiness::Draining,
        }
    }

    /// The node serves (a single node is ready once it listens).
    pub fn set_ready(&self) {
        let _ = self.readiness.compare_exchange(
            Readiness::Loading as u8,
            Readiness::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The node is shutting down: it takes no new session from now on.
    pub fn begin_drain(&self) {
        self.readiness
            .store(Readiness::Draining as u8, Ordering::Release);
    }

    /// Refuses discovery while the node loads its snapshot (it would answer
    /// from a partial view); a draining node still answers.
    pub fn require_serving(&self) -> Result<(), RegistryError> {
        match self.readiness() {
            Readiness::Loading => Err(RegistryError::Unavailable(
                "the node is loading the cluster's data; ask another node or try again shortly"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses what a node that is not ready must not do (open sessions).
    pub fn require_ready(&self) -> Result<(), RegistryError> {
        match self.readiness() {
            Readiness::Ready => Ok(()),
            Readiness::Loading => Err(RegistryError::Unavailable(
                "the node is starting; try again shortly".into(),
            )),
            Readiness::Draining => Err(RegistryError::Unavailable(
                "the node is shutting down; use another node".into(),
            )),
        }
    }

    fn now() -> std::time::Instant {
        Instant::now().into_std()
    }

    /// The write funnel: runs `f` on the core, publishes the new views for
    /// readers and tells the pusher what changed. The write is visible to
    /// readers when this returns. Publication happens after the core lock
    /// was released once, so writers that queued meanwhile are published
    /// together.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Registry, std::time::Instant) -> Result<T, RegistryError>,
        changes: impl Fn(&T) -> Vec<Change>,
    ) -> Result<T, RegistryError> {
        let out = self.counted(f(&mut self.core.lock(), Self::now()))?;
        self.replicate_soon();
        self.announce(changes(&out));
        Ok(out)
    }

    /// Publishes `changed` services for readers and tells the pusher about
    /// those someone follows.
    fn announce(&self, changed: Vec<Change>) {
        // A loading node serves no reader: its views are built once, when
        // it is ready, not once per snapshot chunk.
        if !changed.is_empty() && self.readiness() != Readiness::Loading {
            self.publish();
        }
        // Only services someone follows need the pusher. (A subscriber
        // that arrives after this check subscribed after the write, and so
        // was given a view that holds it.)
        let now = Instant::now();
        let subs = self.subs.lock();
        let watched: Vec<Change> = changed
            .into_iter()
            .filter(|c| subs.count(&c.key) > 0)
            .collect();
        drop(subs);
        for c in watched {
            // The pusher only stops when the node does.
            let _ = self.changes.send((c.key, now));
        }
    }

    /// Counts (and logs) a refusal at a limit; passes `result` on.
    pub fn counted<T>(&self, result: Result<T, RegistryError>) -> Result<T, RegistryError> {
        if let Err(RegistryError::Limit(hit)) = &result {
            self.metrics.limit_hit(hit.key, hit);
        }
        result
    }

    /// The refusal at the limit `key` (of value `max`), counted and logged.
    pub fn refuse(&self, key: &'static str, max: usize) -> RegistryError {
        let hit = roster_core::LimitHit { key, max };
        self.metrics.limit_hit(key, &hit);
        hit.into()
    }

    /// Brings the readers' snapshot up to date with every write made so
    /// far. A no-op when another writer already did it.
    fn publish(&self) {
        let mut core = self.core.lock();
        self.publish_locked(&mut core);
    }

    /// [`Self::publish`] with the core already locked.
    fn publish_locked(&self, core: &mut Registry) {
        if !core.has_unpublished() {
            return;
        }
        let mut views = Views::clone(&self.views.load());
        for view in core.take_unpublished() {
            let previous = views.get(&view.key).cloned();
            let published = Published::new(view, previous.as_deref());
            views.insert(published.view.key.clone(), Arc::new(published));
        }
        self.views.store(Arc::new(views));
    }

    /// Forgets services empty for `registry.empty_service_grace`: their
    /// state in the core, and their view unless someone subscribes (then
    /// the empty view stays until the last subscriber leaves).
    pub fn forget_empty_services(&self) {
        let mut core = self.core.lock();
        self.publish_locked(&mut core);
        let gone = core.forget_empty_services(Self::now());
        let mut orphans = self.orphans.lock();
        if gone.is_empty() && orphans.is_empty() {
            return;
        }
        orphans.extend(gone);
        let subs = self.subs.lock();
        let (kept, dropped): (Vec<_>, Vec<_>) = orphans
            .drain(..)
            .filter(|k| !core.has_service(k))
            .partition(|k| subs.count(k) > 0);
        drop(subs);
        *orphans = kept;
        drop(orphans);
        if dropped.is_empty() {
            return;
        }
        let mut views = Views::clone(&self.views.load());
        for key in &dropped {
            views.remove(key);
        }
        self.views.store(Arc::new(views));
        tracing::debug!(services = dropped.len(), "empty services forgotten");
    }

    // ---- reads (lock-free) ----------------------------------------------

    /// The current view of a service.
    pub fn view(&self, key: &ServiceKey) -> Option<Arc<Published>> {
        self.views.load().get(key).cloned()
    }

    /// Every current view (a snapshot).
    pub fn views(&self) -> Arc<Views> {
        self.views.load_full()
    }

    /// (sessions, services, instances) now.
    pub fn counts(&self) -> (usize, usize, usize) {
        let core = self.core.lock();
        (
            core.sessions().len(),
            core.service_count(),
            core.instance_count(),
        )
    }

    /// The native full-view encoding of a published view (made once).
    pub fn encoded(&self, published: &Published) -> Bytes {
        published
            .native
            .get_or_init(|| {
                use prost::Message;
                let update = roster_proto::convert::full_update(&published.view, &self.epoch);
                Bytes::from(update.encode_to_vec())
            })
            .clone()
    }

    // ---- writes: each acts only on the named session's own data --------

    /// Registers an ephemeral instance for `session`. Returns its id and
    /// the service's revision.
    pub fn register(
        &self,
        session: &str,
        key: ServiceKey,
        instance: Instance,
    ) -> Result<(String, u64), RegistryError> {
        let (change, id) = self.write(
            |core, now| core.register(session, &key, instance, now),
            |(c, _)| vec![c.clone()],
        )?;
        Ok((id.to_string(), change.revision))
    }

    /// Replaces the instances `session` holds in `key` (Nacos: one
    /// registration, or a batch, per connection and service).
    pub fn set_instances(
        &self,
        session: &str,
        key: &ServiceKey,
        instances: Vec<Instance>,
    ) -> Result<u64, RegistryError> {
        self.write(
            |core, now| core.set_instances(session, key, instances, now),
            |c| vec![c.clone()],
        )
        .map(|c| c.revision)
    }

    /// Removes an instance `session` holds.
    pub fn deregister(
        &self,
        session: &str,
        key: &ServiceKey,
        id: &str,
    ) -> Result<u64, RegistryError> {
        self.write(
            |core, now| core.deregister(session, key, id, now),
            |c| vec![c.clone()],
        )
        .map(|c| c.revision)
    }

    /// Replaces the mutable fields of an instance `session` holds.
    pub fn update(
        &self,
        session: &str,
        key: &ServiceKey,
        patch: Instance,
    ) -> Result<u64, RegistryError> {
        let id = patch.id.clone();
        self.modify(session, key, &id, |i| {
            i.weight = patch.weight;
            i.healthy = patch.healthy;
            i.enabled = patch.enabled;
            i.metadata = patch.metadata;
            i.node_name = patch.node_name;
        })
    }

    /// Edits an instance `session` holds (version and revision move on).
    pub fn modify(
        &self,
        session: &str,
        key: &ServiceKey,
        id: &str,
        edit: impl FnOnce(&mut Instance),
    ) -> Result<u64, RegistryError> {
        self.write(
            |core, now| core.modify(session, key, id, edit, now),
            |c| vec![c.clone()],
        )
        .map(|c| c.revision)
    }

    /// Moves a service to a new revision with the same instances, so that
    /// subscribers are sent it again (a setting shown with it changed).
    pub fn bump_service(&self, key: &ServiceKey) {
        let _ = self.write(
            |core, _| Ok(core.bump_service(key)),
            |c| c.iter().cloned().collect(),
        );
    }

    /// The session of this node that owns the instance shown for
    /// `(key, id)`: the session an operator's call (with the admin token)
    /// acts for.
    pub fn owning_session(&self, key: &ServiceKey, id: &str) -> Result<SessionId, RegistryError> {
        let core = self.core.lock();
        match core.owner_of(key, id) {
            Some(owner) if owner.origin == *core.node() => Ok(owner.session.clone()),
            Some(owner) => Err(RegistryError::Forbidden(format!(
                "instance {id:?} belongs to a session of node {}; ask that node",
                owner.origin
            ))),
            None => Err(RegistryError::UnknownInstance {
                service: key.to_string(),
                id: id.to_owned(),
            }),
        }
    }
}
