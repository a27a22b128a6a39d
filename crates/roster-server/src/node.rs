//! A registry node's shared state and its operations, independent of the
//! listener they arrive on. Owns: the core [`Registry`] behind a mutex for
//! writes, a lock-free snapshot of published views for reads, the
//! subscriptions, and each session's outbound link. Lock order is always
//! core → subscriptions → a link's queue; readers take none of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prost::Message;
use roster_core::push::{Enqueued, Need, Outbound, OutboundQueue, Subscriptions};
use roster_core::registry::PublishedViews;
use roster_core::session::{SessionKind, SessionTimeouts};
use roster_core::{
    Change, Delta, Instance, Registry, RegistryConfig, RegistryError, ServiceKey, ServiceView,
    SessionId,
};
use roster_proto::convert::{delta_update, full_update};
use roster_proto::v1;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;

/// A message waiting in a session's queue.
#[derive(Debug, Clone)]
pub struct Frame {
    /// What to send.
    pub message: v1::ServerMessage,
    /// When the change it carries happened (for the latency histogram).
    pub changed_at: Option<Instant>,
}

/// The outbound side of one session: its bounded queue and a way to end it.
pub struct SessionLink {
    /// The session.
    pub id: SessionId,
    /// What the client called itself.
    pub client_name: String,
    queue: Mutex<OutboundQueue<Frame>>,
    ready: Notify,
    /// Cancelled when the session ends (expired, closed, node shutting down).
    pub closed: CancellationToken,
}

impl SessionLink {
    fn new(
        id: SessionId,
        client_name: String,
        capacity: usize,
        parent: &CancellationToken,
    ) -> Self {
        Self {
            id,
            client_name,
            queue: Mutex::new(OutboundQueue::new(capacity)),
            ready: Notify::new(),
            closed: parent.child_token(),
        }
    }

    fn push_control(&self, message: v1::ServerMessage) {
        self.queue.lock().push_control(Frame {
            message,
            changed_at: None,
        });
        self.ready.notify_one();
    }

    /// Waits for the next item; `None` once the session has ended.
    pub async fn next(&self) -> Option<Outbound<Frame>> {
        loop {
            let ready = self.ready.notified();
            if let Some(item) = self.queue.lock().pop() {
                return Some(item);
            }
            tokio::select! {
                _ = ready => {}
                _ = self.closed.cancelled() => return None,
            }
        }
    }

    /// The next item if one is queued now (does not wait).
    pub fn try_next(&self) -> Option<Outbound<Frame>> {
        self.queue.lock().pop()
    }

    /// Items queued now.
    pub fn queued(&self) -> usize {
        self.queue.lock().len()
    }
}

/// A drain's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The revision carrying the drain.
    pub revision: u64,
    /// Subscribers that acknowledged it ("client-name (session)").
    pub acknowledged: Vec<String>,
    /// Subscribers that did not in time.
    pub pending: Vec<String>,
}

/// Whether `since` is still current, with what to send otherwise.
pub enum PullAnswer {
    /// Nothing changed.
    NotModified {
        /// The current revision.
        revision: u64,
        /// The current checksum.
        checksum: u64,
    },
    /// The changes since, or the full view.
    Update(v1::ServiceUpdate),
}

/// One registry node.
pub struct Node {
    config: Config,
    /// This life of the node (also in the core; kept here for lock-free reads).
    incarnation: u64,
    core: Mutex<Registry>,
    views: ArcSwap<PublishedViews>,
    subs: Mutex<Subscriptions>,
    links: RwLock<HashMap<SessionId, Arc<SessionLink>>>,
    changes: mpsc::UnboundedSender<(Arc<ServiceKey>, Instant)>,
    acks: Notify,
    /// The node's metrics.
    pub metrics: Metrics,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
}

impl Node {
    /// A node and the receiver of its change notifications (for the pusher).
    pub fn new(
        config: Config,
        incarnation: u64,
    ) -> (
        Arc<Self>,
        mpsc::UnboundedReceiver<(Arc<ServiceKey>, Instant)>,
    ) {
        let registry = Registry::new(
            incarnation,
            RegistryConfig {
                delta_window: config.registry.delta_window,
                timeouts: SessionTimeouts {
                    keepalive: config.session.keepalive,
                    probe_timeout: config.session.probe_timeout,
                },
            },
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let node = Arc::new(Self {
            config,
            incarnation,
            core: Mutex::new(registry),
            views: ArcSwap::from_pointee(PublishedViews::default()),
            subs: Mutex::new(Subscriptions::default()),
            links: RwLock::new(HashMap::new()),
            changes: tx,
            acks: Notify::new(),
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
        });
        (node, rx)
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn now() -> std::time::Instant {
        Instant::now().into_std()
    }

    /// Runs a write on the core, publishes the new views for readers and
    /// tells the pusher what changed. The write is visible to readers when
    /// this returns. Publication happens after the core lock was released
    /// once, so writers that queued meanwhile are published together.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, RegistryError>,
        changes: impl Fn(&T) -> Vec<Change>,
    ) -> Result<T, RegistryError> {
        let out = f(&mut self.core.lock())?;
        let changed = changes(&out);
        if !changed.is_empty() {
            self.publish();
        }
        let now = Instant::now();
        for c in changed {
            // The pusher only stops when the node does.
            let _ = self.changes.send((c.key, now));
        }
        Ok(out)
    }

    /// Brings the readers' snapshot up to date with every write made so
    /// far. A no-op when another writer already did it.
    fn publish(&self) {
        let mut core = self.core.lock();
        if core.has_unpublished() {
            self.views.store(Arc::new(core.published().clone()));
        }
    }

    // ---- sessions -------------------------------------------------------

    /// Opens a stream session and its outbound link, queueing the welcome.
    pub fn open_stream(&self, client_name: &str) -> Arc<SessionLink> {
        let id = self
            .core
            .lock()
            .open_session(SessionKind::Stream, client_name, Self::now());
        let link = Arc::new(SessionLink::new(
            id.clone(),
            client_name.to_owned(),
            self.config.push.queue_capacity,
            &self.shutdown,
        ));
        link.push_control(v1::ServerMessage {
            kind: Some(v1::server_message::Kind::Welcome(v1::Welcome {
                session_id: id.to_string(),
                keepalive_ms: self.config.session.keepalive.as_millis() as u64,
            })),
        });
        self.links.write().insert(id, link.clone());
        link
    }

    /// Opens a lease session (renewed by heartbeats, for HTTP clients).
    pub fn open_lease(&self, client_name: &str) -> SessionId {
        self.core
            .lock()
            .open_session(SessionKind::Lease, client_name, Self::now())
    }

    /// Opens a session that only [`Self::close_session`] ends: its opener
    /// decides the liveness of each of its records.
    pub fn open_held(&self, client_name: &str) -> SessionId {
        self.core
            .lock()
            .open_session(SessionKind::Held, client_name, Self::now())
    }

    /// Records activity on a session; false if it is not open.
    pub fn touch(&self, session: &str) -> bool {
        self.core.lock().touch(session, Self::now())
    }

    /// Ends a session: its records are removed and pushed, its
    /// subscriptions dropped and its stream closed.
    pub fn close_session(&self, session: &str) {
        let _ = self.write(|core| Ok(core.close_session(session)), Clone::clone);
        self.forget_link(session);
    }

    fn forget_link(&self, session: &str) {
        self.subs.lock().remove_session(session);
        if let Some(link) = self.links.write().remove(session) {
            link.closed.cancel();
        }
        self.acks.notify_waiters();
    }

    /// Probes idle sessions and expires silent ones. Returns how many expired.
    pub fn sweep(&self) -> usize {
        let out = self
            .write(|core| Ok(core.sweep(Self::now())), |o| o.changes.clone())
            .unwrap_or_default();
        for (id, nonce) in &out.probes {
            if let Some(link) = self.links.read().get(id) {
                link.push_control(v1::ServerMessage {
                    kind: Some(v1::server_message::Kind::Probe(v1::Probe { nonce: *nonce })),
                });
            }
        }
        for id in &out.expired {
            tracing::info!(session = %id, "session expired");
            self.forget_link(id);
        }
        out.expired.len()
    }

    /// The owner session of an instance, if it exists.
    pub fn owner_of(&self, key: &ServiceKey, id: &str) -> Option<SessionId> {
        let views = self.views.load();
        Some(views.get(key)?.instances.get(id)?.owner.clone())
    }

    // ---- writes ---------------------------------------------------------

    /// Registers an ephemeral instance for `session`.
    pub fn register(
        &self,
        session: &str,
        key: ServiceKey,
        instance: Instance,
    ) -> Result<(String, u64), RegistryError> {
        let (change, id) = self.write(
            |core| core.register(session, &key, instance, Self::now()),
            |(c, _)| vec![c.clone()],
        )?;
        Ok((id.to_string(), change.revision))
    }

    /// Removes an instance.
    pub fn deregister(&self, key: &ServiceKey, id: &str) -> Result<u64, RegistryError> {
        self.write(|core| core.deregister(key, id), |c| vec![c.clone()])
            .map(|c| c.revision)
    }

    /// Replaces the mutable fields of an instance.
    pub fn update(&self, key: &ServiceKey, patch: Instance) -> Result<u64, RegistryError> {
        let id = patch.id.clone();
        self.modify(key, &id, |i| {
            i.weight = patch.weight;
            i.healthy = patch.healthy;
            i.enabled = patch.enabled;
            i.metadata = patch.metadata;
            i.node_name = patch.node_name;
        })
    }

    /// Edits an existing instance in place (owner kept, version bumped).
    pub fn modify(
        &self,
        key: &ServiceKey,
        id: &str,
        edit: impl FnOnce(&mut Instance),
    ) -> Result<u64, RegistryError> {
        self.write(|core| core.modify(key, id, edit), |c| vec![c.clone()])
            .map(|c| c.revision)
    }

    // ---- reads (lock-free) ----------------------------------------------

    /// The current view of a service.
    pub fn view(&self, key: &ServiceKey) -> Option<Arc<ServiceView>> {
        self.views.load().get(key).cloned()
    }

    /// Every current view (a snapshot).
    pub fn views(&self) -> Arc<PublishedViews> {
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

    /// Number of (session, service) subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subs.lock().total()
    }

    /// Number of subscribers of a service.
    pub fn subscriber_count(&self, key: &ServiceKey) -> usize {
        self.subs.lock().count(key)
    }

    /// "Changed since `since` (or `checksum`)?"
    pub fn pull(&self, key: &ServiceKey, since: u64, checksum: u64) -> PullAnswer {
        let (view, delta) = {
            let mut core = self.core.lock();
            let Some(view) = core.view(key) else {
                return PullAnswer::NotModified {
                    revision: 0,
                    checksum: 0,
                };
            };
            if since == view.revision || (checksum != 0 && checksum == view.checksum) {
                return PullAnswer::NotModified {
                    revision: view.revision,
                    checksum: view.checksum,
                };
            }
            let delta = core.changes_since(key, since).filter(|_| since != 0);
            (view, delta)
        };
        // The message is built outside the lock.
        match delta {
            Some(delta) => PullAnswer::Update(delta_update(key, &delta, view.checksum)),
            None => PullAnswer::Update(full_update(&view)),
        }
    }

    // ---- subscriptions and push ------------------------------------------

    /// Subscribes a stream session to a service. Returns the full view now;
    /// the same view is queued on the session, and deltas follow it there.
    pub fn subscribe(
        &self,
        session: &str,
        key: ServiceKey,
    ) -> Result<v1::ServiceUpdate, RegistryError> {
        let link = self
            .links
            .read()
            .get(session)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownSession(session.to_owned()))?;
        self.touch(session);
        let (key, view) = {
            let mut core = self.core.lock();
            let view = core.view(&key);
            let key = view
                .as_ref()
                .map_or_else(|| Arc::new(key), |v| v.key.clone());
            let revision = view.as_ref().map_or(0, |v| v.revision);
            self.subs
                .lock()
                .subscribe(link.id.clone(), key.clone(), revision);
            link.queue.lock().push_full(key.clone());
            (key, view)
        };
        link.ready.notify_one();
        // The (O(n)) message is built outside the locks.
        let update = match &view {
            Some(v) => full_update(v),
            None => v1::ServiceUpdate {
                service: Some(key.as_ref().into()),
                kind: Some(v1::service_update::Kind::Full(v1::FullView::default())),
                ..Default::default()
            },
        };
        tracing::debug!(session, service = %key, "subscribed");
        Ok(update)
    }

    /// Ends a subscription.
    pub fn unsubscribe(&self, session: &str, key: &ServiceKey) {
        self.subs.lock().unsubscribe(session, key);
    }

    /// Records a subscriber's acknowledgements (service, revision).
    pub fn ack(&self, session: &str, acks: impl IntoIterator<Item = (ServiceKey, u64)>) {
        let mut subs = self.subs.lock();
        let mut any = false;
        for (key, revision) in acks {
            any |= subs.ack(session, &key, revision);
        }
        drop(subs);
        if any {
            self.acks.notify_waiters();
        }
    }

    /// Records that `session` was sent the full view of `key` at
    /// `revision` (for transports that build their own messages).
    pub fn full_sent(&self, session: &str, key: &ServiceKey, revision: u64) {
        self.subs.lock().full_sent(session, key, revision);
    }

    /// Incarnation of this node (distinguishes its lives in ids).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Builds the message for a dequeued item of `link`; a full view is
    /// taken from the current snapshot (encoded once per revision).
    pub fn materialize(&self, link: &SessionLink, item: Outbound<Frame>) -> Option<Frame> {
        match item {
            Outbound::Control(frame) | Outbound::Update { payload: frame, .. } => Some(frame),
            Outbound::FullView(key) => {
                let view = self.view(&key);
                let (revision, bytes) = match &view {
                    Some(v) => (v.revision, encoded_view(v)),
                    None => {
                        let empty = v1::ServiceUpdate {
                            service: Some(key.as_ref().into()),
                            kind: Some(v1::service_update::Kind::Full(v1::FullView::default())),
                            ..Default::default()
                        };
                        (0, Bytes::from(empty.encode_to_vec()))
                    }
                };
                self.subs.lock().full_sent(&link.id, &key, revision);
                Some(update_frame(bytes, None))
            }
        }
    }

    /// Pushes the current state of `key` to every subscriber that is behind.
    /// Each distinct update is encoded once and shared.
    pub fn push(&self, key: &Arc<ServiceKey>, changed_at: Instant) {
        let mut core = self.core.lock();
        let Some(view) = core.view(key) else { return };
        let mut subs = self.subs.lock();
        let base = core.oldest_delta_base(key).unwrap_or(view.revision);
        let plan = subs.plan(key, view.revision, |from| from >= base && from != 0);
        if plan.is_empty() {
            return;
        }
        let deltas: HashMap<u64, Delta> = plan
            .keys()
            .filter_map(|n| match n {
                Need::DeltaFrom(f) => core.changes_since(key, *f).map(|d| (*f, d)),
                Need::Full => None,
            })
            .collect();
        // Encoding and enqueueing need neither lock: a full view queued for
        // a subscriber absorbs later updates and is built when dequeued, so
        // it is never older than what was planned here.
        drop(subs);
        drop(core);
        let links = self.links.read();
        for (need, sessions) in plan {
            let bytes = match need {
                Need::DeltaFrom(f) => match deltas.get(&f) {
                    Some(d) => Bytes::from(delta_update(key, d, view.checksum).encode_to_vec()),
                    None => encoded_view(&view),
                },
                Need::Full => encoded_view(&view),
            };
            let frame = update_frame(bytes, Some(changed_at));
            for session in sessions {
                let Some(link) = links.get(&session) else {
                    continue;
                };
                let outcome = link.queue.lock().push_update(key.clone(), frame.clone());
                if outcome == Enqueued::Overflowed {
                    self.metrics.push_queue_overflows.inc();
                    tracing::debug!(session = %session, service = %key, "push queue overflowed");
                }
                link.ready.notify_one();
            }
        }
    }

    /// Sets an instance's weight to 0 (or removes it) and waits until every
    /// current subscriber of the service acknowledged that change, or
    /// `timeout` passed.
    pub async fn drain(
        &self,
        key: &ServiceKey,
        id: &str,
        remove: bool,
        timeout: Duration,
    ) -> Result<DrainOutcome, RegistryError> {
        let deadline = Instant::now() + timeout;
        let subscribers: Vec<SessionId> = self
            .subs
            .lock()
            .subscribers(key)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let revision = if remove {
            self.deregister(key, id)?
        } else {
            self.modify(key, id, |i| i.weight = 0.0)?
        };
        loop {
            let acked = self.acks.notified();
            let pending = self.subs.lock().unacked(key, revision, &subscribers);
            if pending.is_empty() || Instant::now() >= deadline {
                let label = |s: &SessionId| {
                    let name = self
                        .links
                        .read()
                        .get(s)
                        .map(|l| l.client_name.clone())
                        .unwrap_or_default();
                    format!("{name} ({s})")
                };
                let acknowledged = subscribers
                    .iter()
                    .filter(|s| !pending.contains(s))
                    .map(label)
                    .collect();
                return Ok(DrainOutcome {
                    revision,
                    acknowledged,
                    pending: pending.iter().map(label).collect(),
                });
            }
            tokio::select! {
                _ = acked => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// The full-view update of `view`, encoded once per revision and shared.
pub(crate) fn encoded_view(view: &ServiceView) -> Bytes {
    view.encoded
        .get_or_init(|| Bytes::from(full_update(view).encode_to_vec()))
        .clone()
}

fn update_frame(bytes: Bytes, changed_at: Option<Instant>) -> Frame {
    Frame {
        message: v1::ServerMessage {
            kind: Some(v1::server_message::Kind::Update(bytes)),
        },
        changed_at,
    }
}

/// The push task: receives change notifications, coalesces them per
/// service, and pushes. Ends when the node shuts down.
pub async fn run_pusher(
    node: Arc<Node>,
    mut changes: mpsc::UnboundedReceiver<(Arc<ServiceKey>, Instant)>,
) {
    let window = node.config.push.coalesce_window;
    let mut coalescer = roster_core::push::Coalescer::new(window);
    // Earliest unpushed change per service, for the latency histogram.
    let mut first_change: HashMap<Arc<ServiceKey>, Instant> = HashMap::new();
    let far = Duration::from_secs(3600);
    loop {
        let next = coalescer
            .next_deadline()
            .map_or_else(|| Instant::now() + far, Instant::from_std);
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            got = changes.recv() => {
                let Some((key, at)) = got else { return };
                let mut batch = vec![(key, at)];
                while let Ok(more) = changes.try_recv() {
                    batch.push(more);
                }
                let now = Instant::now().into_std();
                for (key, at) in batch {
                    first_change.entry(key.clone()).or_insert(at);
                    if coalescer.on_change(&key, now) {
                        let at = first_change.remove(&key).unwrap_or(at);
                        node.push(&key, at);
                    }
                }
            }
            _ = tokio::time::sleep_until(next) => {
                for key in coalescer.due(Instant::now().into_std()) {
                    let at = first_change.remove(&key).unwrap_or_else(Instant::now);
                    node.push(&key, at);
                }
            }
        }
    }
}
