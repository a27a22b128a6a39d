//! The rules of pushing changes to subscribers, without I/O:
//! - [`Coalescer`]: when a changed service is pushed (at once after a quiet
//!   period, else merged into one push at the end of a short window);
//! - [`Subscriptions`]: who subscribes to what, what each was sent and has
//!   acknowledged, and what each needs for the next push;
//! - [`OutboundQueue`]: a session's bounded queue, whose overflow replaces a
//!   service's queued deltas with one full view.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{ServiceKey, SessionId};

/// Decides when each changed service is pushed.
#[derive(Debug)]
pub struct Coalescer {
    window: Duration,
    /// Services pushed recently: until when they cool down, and whether a
    /// change arrived meanwhile.
    cooling: HashMap<Arc<ServiceKey>, (Instant, bool)>,
    /// Cool-down ends in order; pushes happen in time order and the window
    /// is fixed, so this is sorted by construction.
    deadlines: VecDeque<(Instant, Arc<ServiceKey>)>,
}

impl Coalescer {
    /// A coalescer merging changes within `window` after a push.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            cooling: HashMap::new(),
            deadlines: VecDeque::new(),
        }
    }

    /// A service changed. True: push it now. False: it will be due later.
    pub fn on_change(&mut self, key: &Arc<ServiceKey>, now: Instant) -> bool {
        if let Some((_, pending)) = self.cooling.get_mut(key) {
            *pending = true;
            return false;
        }
        self.start_cooling(key.clone(), now);
        true
    }

    fn start_cooling(&mut self, key: Arc<ServiceKey>, now: Instant) {
        let until = now + self.window;
        self.cooling.insert(key.clone(), (until, false));
        self.deadlines.push_back((until, key));
    }

    /// When the next cooling window ends, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|(t, _)| *t)
    }

    /// Services whose window ended by `now` with changes pending: push
    /// them now (each starts a new window). Quiet ones go back to idle.
    pub fn due(&mut self, now: Instant) -> Vec<Arc<ServiceKey>> {
        let mut due = Vec::new();
        while let Some((t, _)) = self.deadlines.front() {
            if *t > now {
                break;
            }
            let Some((_, key)) = self.deadlines.pop_front() else {
                break;
            };
            if let Some((_, true)) = self.cooling.remove(&key) {
                self.start_cooling(key.clone(), now);
                due.push(key);
            }
        }
        due
    }
}

/// One subscriber's progress on one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubState {
    /// The revision of the last update queued for it.
    pub sent: u64,
    /// The highest revision it acknowledged.
    pub acked: u64,
}

/// What one subscriber needs to reach the new revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Need {
    /// A delta from this revision.
    DeltaFrom(u64),
    /// The full view.
    Full,
}

/// Subscribers per service and their progress.
#[derive(Debug, Default)]
pub struct Subscriptions {
    by_service: HashMap<Arc<ServiceKey>, HashMap<SessionId, SubState>>,
    by_session: HashMap<SessionId, HashSet<Arc<ServiceKey>>>,
}

impl Subscriptions {
    /// Subscribes `session` to `key`, as having been sent `revision`
    /// (the full view that goes out with the subscription).
    pub fn subscribe(&mut self, session: SessionId, key: Arc<ServiceKey>, revision: u64) {
        self.by_session
            .entry(session.clone())
            .or_default()
            .insert(key.clone());
        self.by_service.entry(key).or_default().insert(
            session,
            SubState {
                sent: revision,
                ..SubState::default()
            },
        );
    }

    /// Ends one subscription.
    pub fn unsubscribe(&mut self, session: &str, key: &ServiceKey) {
        if let Some(keys) = self.by_session.get_mut(session) {
            keys.remove(key);
        }
        if let Some(subs) = self.by_service.get_mut(key) {
            subs.remove(session);
            if subs.is_empty() {
                self.by_service.remove(key);
            }
        }
    }

    /// Ends every subscription of a session.
    pub fn remove_session(&mut self, session: &str) {
        for key in self.by_session.remove(session).unwrap_or_default() {
            if let Some(subs) = self.by_service.get_mut(&key) {
                subs.remove(session);
                if subs.is_empty() {
                    self.by_service.remove(&key);
                }
            }
        }
    }

    /// Plans the push of `key` at `revision`: which subscribers need what,
    /// grouped so each distinct update is built and encoded once. Marks the
    /// planned subscribers as sent `revision`. (A subscriber with a full view
    /// queued is planned too; its queue absorbs the update, and the full view
    /// built at dequeue time is at least as new.) `delta_base_ok` says whether a
    /// delta from a given revision can still be made.
    pub fn plan(
        &mut self,
        key: &ServiceKey,
        revision: u64,
        delta_base_ok: impl Fn(u64) -> bool,
    ) -> HashMap<Need, Vec<SessionId>> {
        let mut plan: HashMap<Need, Vec<SessionId>> = HashMap::new();
        let Some(subs) = self.by_service.get_mut(key) else {
            return plan;
        };
        for (session, state) in subs.iter_mut() {
            if state.sent >= revision {
                continue;
            }
            let need = if delta_base_ok(state.sent) {
                Need::DeltaFrom(state.sent)
            } else {
                Need::Full
            };
            state.sent = revision;
            plan.entry(need).or_default().push(session.clone());
        }
        plan
    }

    /// A full view of `key` at `revision` went out (a queued full view is
    /// built when dequeued, so it may be newer than anything planned).
    pub fn full_sent(&mut self, session: &str, key: &ServiceKey, revision: u64) {
        if let Some(s) = self.state_mut(session, key) {
            s.sent = s.sent.max(revision);
        }
    }

    /// Records an acknowledgement. False if there is no such subscription.
    pub fn ack(&mut self, session: &str, key: &ServiceKey, revision: u64) -> bool {
        match self.state_mut(session, key) {
            Some(s) => {
                s.acked = s.acked.max(revision);
                true
            }
            None => false,
        }
    }

    /// Current subscribers of a service with their progress.
    pub fn subscribers(&self, key: &ServiceKey) -> Vec<(SessionId, SubState)> {
        self.by_service
            .get(key)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// Number of (session, service) subscriptions.
    pub fn total(&self) -> usize {
        self.by_session.values().map(HashSet::len).sum()
    }

    /// Subscribers of one service.
    pub fn count(&self, key: &ServiceKey) -> usize {
        self.by_service.get(key).map_or(0, HashMap::len)
    }

    /// Of `sessions`, those still subscribed to `key` that have not
    /// acknowledged `revision` (sessions gone since are not waited for).
    pub fn unacked(
        &self,
        key: &ServiceKey,
        revision: u64,
        sessions: &[SessionId],
    ) -> Vec<SessionId> {
        let Some(subs) = self.by_service.get(key) else {
            return Vec::new();
        };
        sessions
            .iter()
            .filter(|s| subs.get(*s).is_some_and(|st| st.acked < revision))
            .cloned()
            .collect()
    }

    fn state_mut(&mut self, session: &str, key: &ServiceKey) -> Option<&mut SubState> {
        self.by_service.get_mut(key)?.get_mut(session)
    }
}

/// An item of a session's outbound queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound<P> {
    /// A control message (welcome, probe), sent ahead of updates.
    Control(P),
    /// An update of a service; `payload` is ready to send.
    Update {
        /// The service.
        key: Arc<ServiceKey>,
        /// What to send.
        payload: P,
    },
    /// Send the service's full view as it is when this is dequeued.
    FullView(Arc<ServiceKey>),
}

/// A session's bounded outbound queue.
///
/// Control messages (welcome, probes) go ahead of updates and are never
/// dropped. When updates reach `capacity`, an update for service S drops
/// every update of S still queued and queues one [`Outbound::FullView`] of
/// S instead, so memory stays bounded by `capacity` plus one marker per
/// subscribed service, however slow the consumer.
#[derive(Debug)]
pub struct OutboundQueue<P> {
    control: VecDeque<P>,
    updates: VecDeque<Outbound<P>>,
    capacity: usize,
}

/// What [`OutboundQueue::push_update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The update was queued.
    Queued,
    /// The queue was full: the service's updates became one full view.
    Overflowed,
    /// A full view of the service was already queued; dropped.
    Absorbed,
}

impl<P> OutboundQueue<P> {
    /// An empty queue holding at most `capacity` updates.
    pub fn new(capacity: usize) -> Self {
        Self {
            control: VecDeque::new(),
            updates: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues a control message ahead of all updates.
    pub fn push_control(&mut self, payload: P) {
        self.control.push_back(payload);
    }

    /// Queues an update, collapsing on overflow (see the type's doc).
    pub fn push_update(&mut self, key: Arc<ServiceKey>, payload: P) -> Enqueued {
        let has_full = |u: &Outbound<P>| matches!(u, Outbound::FullView(k) if *k == key);
        if self.updates.iter().any(has_full) {
            return Enqueued::Absorbed;
        }
        if self.updates.len() < self.capacity {
            self.updates.push_back(Outbound::Update { key, payload });
            return Enqueued::Queued;
        }
        self.updates
            .retain(|u| !matches!(u, Outbound::Update { key: k, .. } if *k == key));
        self.updates.push_back(Outbound::FullView(key));
        Enqueued::Overflowed
    }

    /// Queues a full view of `key` (when a subscriber needs one), unless one
    /// is already queued; replaces the service's queued updates.
    pub fn push_full(&mut self, key: Arc<ServiceKey>) {
        let queued = self
            .updates
            .iter()
            .any(|u| matches!(u, Outbound::FullView(k) if *k == key));
        if !queued {
            self.updates
                .retain(|u| !matches!(u, Outbound::Update { key: k, .. } if *k == key));
            self.updates.push_back(Outbound::FullView(key));
        }
    }

    /// The next item to send: control first.
    pub fn pop(&mut self) -> Option<Outbound<P>> {
        match self.control.pop_front() {
            Some(p) => Some(Outbound::Control(p)),
            None => self.updates.pop_front(),
        }
    }

    /// Items queued (control and updates).
    pub fn len(&self) -> usize {
        self.control.len() + self.updates.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
