//! Subscriptions and the push fan-out. The pusher coalesces changes per
//! service and plans each push from the view it publishes at that moment:
//! one [`PushUpdate`] per distinct need (a delta from some revision, or the
//! full view), queued on each subscriber's link and recorded as sent. A
//! planned update is protocol-neutral (the published view, and the delta
//! to it); each front-end encodes it, at most once per update. Pull, the
//! safety net, answers from the same views.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use roster_core::push::{Coalescer, Enqueued, Need, Outbound};
use roster_core::{Delta, RegistryError, ServiceKey};
use roster_proto::convert::{delta_update, empty_update, full_update};
use roster_proto::v1;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Node, Published};

/// A control message on a session link, ahead of updates.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// The session is open.
    Welcome(v1::Welcome),
    /// The session looked idle: it must answer.
    Probe(u64),
}

/// An item of a session link's queue.
pub type Item = Outbound<Control, Arc<PushUpdate>>;

/// An update planned for subscribers: it brings them to `view`, by
/// `delta` when they hold its base, else as the full view.
#[derive(Debug)]
pub struct PushUpdate {
    /// The service.
    pub key: Arc<ServiceKey>,
    /// The view it brings the subscriber to (`None`: nothing registered).
    pub view: Option<Arc<Published>>,
    /// The change from the subscriber's revision to `view`, when it is
    /// sent as a delta.
    pub delta: Option<Delta>,
    /// When the change it carries happened (for the latency histogram);
    /// `None` for the view a subscription starts with.
    pub changed_at: Option<Instant>,
    /// Its native encoding, made by the first native link that sends it.
    native: OnceLock<Bytes>,
}

impl roster_core::push::Planned for PushUpdate {
    fn revision(&self) -> u64 {
        PushUpdate::revision(self)
    }
}

impl PushUpdate {
    /// The full view `view` of `key`.
    pub fn full(
        key: Arc<ServiceKey>,
        view: Option<Arc<Published>>,
        changed_at: Option<Instant>,
    ) -> Arc<Self> {
        Arc::new(Self {
            key,
            view,
            delta: None,
            changed_at,
            native: OnceLock::new(),
        })
    }

    /// The revision it brings the subscriber to.
    pub fn revision(&self) -> u64 {
        self.view.as_ref().map_or(0, |p| p.view.revision)
    }
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

impl Node {
    /// The native encoding of a planned update (made once per update; a
    /// full view's is shared by every update of that revision).
    pub fn native_update(&self, update: &PushUpdate) -> Bytes {
        match (&update.view, &update.delta) {
            (Some(p), None) => self.encoded(p),
            (Some(p), Some(d)) => update
                .native
                .get_or_init(|| {
                    let m = delta_update(&update.key, d, p.view.checksum, &self.epoch);
                    Bytes::from(m.encode_to_vec())
                })
                .clone(),
            (None, _) => update
                .native
                .get_or_init(|| Bytes::from(empty_update(&update.key, &self.epoch).encode_to_vec()))
                .clone(),
        }
    }

    /// The native message of a dequeued item, for the session on `channel`.
    pub fn native_message(&self, item: Item, channel: u32) -> v1::ServerMessage {
        use v1::server_message::Kind;
        let kind = match item {
            Outbound::Control(Control::Welcome(w)) => Kind::Welcome(w),
            Outbound::Control(Control::Probe(nonce)) => Kind::Probe(v1::Probe { nonce }),
            Outbound::Update(update) => Kind::Update(self.native_update(&update)),
        };
        v1::ServerMessage {
            channel,
            kind: Some(kind),
        }
    }

    /// Subscribes a stream session to a service: the full view now is
    /// queued on its link (deltas follow it there) and returned. Refused
    /// for a session that is not open, in the same step as a close, so no
    /// subscription outlives its session.
    pub fn subscribe(
        &self,
        session: &str,
        key: ServiceKey,
    ) -> Result<Arc<PushUpdate>, RegistryError> {
        let link = self
            .link(session)
            .ok_or_else(|| RegistryError::UnknownSession(session.to_owned()))?;
        let update = {
            let mut core = self.core.lock();
            if !core.touch(session, Self::now()) {
                return Err(RegistryError::UnknownSession(session.to_owned()));
            }
            self.publish_locked(&mut core);
            let view = self.views.load().get(&key).cloned();
            let key = view
                .as_ref()
                .map_or_else(|| Arc::new(key), |p| p.view.key.clone());
            let update = PushUpdate::full(key.clone(), view, None);
            let mut subs = self.subs.lock();
            let max = self.config.limits.subscriptions_per_session;
            if !subs.is_subscribed(&link.id, &key) && subs.of_session(&link.id) >= max {
                drop(subs);
                drop(core);
                return Err(self.refuse("subscriptions_per_session", max));
            }
            subs.subscribe(link.id.clone(), key, update.revision());
            drop(subs);
            link.push_full(update.clone());
            update
        };
        tracing::debug!(session, service = %update.key, "subscribed");
        Ok(update)
    }

    /// The native message of a subscription's first view.
    pub fn full_message(&self, update: &PushUpdate) -> v1::ServiceUpdate {
        match &update.view {
            Some(p) => full_update(&p.view, &self.epoch),
            None => empty_update(&update.key, &self.epoch),
        }
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

    /// Number of (session, service) subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subs.lock().total()
    }

    /// Number of subscribers of a service.
    pub fn subscriber_count(&self, key: &ServiceKey) -> usize {
        self.subs.lock().count(key)
    }

    /// Pushes the current view of `key` to every subscriber that is behind.
    /// The view is published first, so what is planned, recorded as sent
    /// and queued is exactly that view (or the delta to it).
    pub fn push(&self, key: &Arc<ServiceKey>, changed_at: Instant) {
        let mut core = self.core.lock();
        self.publish_locked(&mut core);
        let Some(view) = self.views.load().get(key).cloned() else {
            return;
        };
        let revision = view.view.revision;
        let mut subs = self.subs.lock();
        let base = core.oldest_delta_base(key).unwrap_or(revision);
        let plan = subs.plan(key, revision, |from| from >= base && from != 0);
        if plan.is_empty() {
            return;
        }
        let mut deltas: HashMap<u64, Delta> = plan
            .keys()
            .filter_map(|n| match n {
                Need::DeltaFrom(f) => core.changes_since(key, *f).map(|d| (*f, d)),
                Need::Full => None,
            })
            .collect();
        // Queueing needs neither lock: what each subscriber gets was fixed
        // above, and a queued full view only ever becomes a newer plan.
        drop(subs);
        drop(core);
        let full = PushUpdate::full(key.clone(), Some(view.clone()), Some(changed_at));
        let links = self.links.read();
        for (need, sessions) in plan {
            let update = match need {
                Need::DeltaFrom(f) => match deltas.remove(&f) {
                    Some(delta) => Arc::new(PushUpdate {
                        key: key.clone(),
                        view: Some(view.clone()),
                        delta: Some(delta),
                        changed_at: Some(changed_at),
                        native: OnceLock::new(),
                    }),
                    None => full.clone(),
                },
                Need::Full => full.clone(),
            };
            for session in sessions {
                let Some(link) = links.get(&session) else {
                    continue;
                };
                if link.push_update(update.clone(), || full.clone()) == Enqueued::Overflowed {
                    self.metrics.push_queue_overflows.inc();
                    tracing::debug!(session = %session, service = %key, "push queue overflowed");
                }
            }
        }
    }

    /// "Changed since `since` (or `checksum`)?"
    pub fn pull(&self, key: &ServiceKey, since: u64, checksum: u64) -> PullAnswer {
        self.metrics.pulls.inc();
        let (view, delta) = {
            let mut core = self.core.lock();
            self.publish_locked(&mut core);
            let Some(view) = self.views.load().get(key).cloned() else {
                if since == 0 && checksum == 0 {
                    return PullAnswer::NotModified {
                        revision: 0,
                        checksum: 0,
                    };
                }
                // The caller holds instances this node never had (it
                // followed another node, or an earlier life of this one):
                // the answer is the empty view.
                return PullAnswer::Update(empty_update(key, &self.epoch));
            };
            let v = &view.view;
            if since == v.revision || (checksum != 0 && checksum == v.checksum) {
                return PullAnswer::NotModified {
                    revision: v.revision,
                    checksum: v.checksum,
                };
            }
            let delta = core.changes_since(key, since).filter(|_| since != 0);
            (view, delta)
        };
        // The message is built outside the lock.
        match delta {
            Some(delta) => {
                PullAnswer::Update(delta_update(key, &delta, view.view.checksum, &self.epoch))
            }
            None => PullAnswer::Update(full_update(&view.view, &self.epoch)),
        }
    }
}

/// The push task: receives change notifications, coalesces them per
/// service (a lone change at once; a busy service in widening windows),
/// and pushes. Ends when the node shuts down.
pub async fn run_pusher(
    node: Arc<Node>,
    mut changes: mpsc::UnboundedReceiver<(Arc<ServiceKey>, Instant)>,
) {
    let push = &node.config.push;
    let mut coalescer = Coalescer::new(push.coalesce_window, push.coalesce_max_window);
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
