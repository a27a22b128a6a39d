//! The rules of pushing changes to subscribers, without I/O:
//! - [`Coalescer`]: when a changed service is pushed (at once after a quiet
//!   period, else merged into one push at the end of a short window);
//! - [`Subscriptions`]: who subscribes to what, what each was sent and has
//!   acknowledged, and what each needs for the next push;
//! - [`OutboundQueue`]: a session's bounded queue of planned updates, whose
//!   overflow replaces a service's queued deltas with one full view.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{ServiceKey, SessionId};

/// Decides when each changed service is pushed. A change to a quiet
/// service is pushed at once and opens a window; changes within the window
/// are merged into one push at its end. A window that ends with changes
/// pending opens the next one twice as long (up to the maximum), so a
/// service that stays busy is pushed less often; one that ends quiet
/// returns the service to idle.
#[derive(Debug)]
pub struct Coalescer {
    min: Duration,
    max: Duration,
    /// Services in a window: its end, its length, and whether a change
    /// arrived meanwhile.
    cooling: HashMap<Arc<ServiceKey>, Cooling>,
    /// Window ends, earliest first.
    deadlines: BinaryHeap<Reverse<(Instant, Arc<ServiceKey>)>>,
}

#[derive(Debug, Clone, Copy)]
struct Cooling {
    until: Instant,
    window: Duration,
    pending: bool,
}

impl Coalescer {
    /// A coalescer whose windows start at `min` and widen up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            cooling: HashMap::new(),
            deadlines: BinaryHeap::new(),
        }
    }

    /// A service changed. True: push it now. False: it will be due later.
    pub fn on_change(&mut self, key: &Arc<ServiceKey>, now: Instant) -> bool {
        if let Some(c) = self.cooling.get_mut(key) {
            c.pending = true;
            return false;
        }
        self.start_cooling(key.clone(), now, self.min);
        true
    }

    fn start_cooling(&mut self, key: Arc<ServiceKey>, now: Instant, window: Duration) {
        let until = now + window;
        self.cooling.insert(
            key.clone(),
            Cooling {
                until,
                window,
                pending: false,
            },
        );
        self.deadlines.push(Reverse((until, key)));
    }

    /// When the next window ends, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Services whose window ended by `now` with changes pending: push
    /// them now (each opens a wider window). Quiet ones go back to idle.
    pub fn due(&mut self, now: Instant) -> Vec<Arc<ServiceKey>> {
        let mut due = Vec::new();
        while let Some(Reverse((t, _))) = self.deadlines.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((t, key))) = self.deadlines.pop() else {
                break;
            };
            let Some(c) = self.cooling.get(&key).copied() else {
                continue;
            };
            if c.until != t {
                continue;
            }
            self.cooling.remove(&key);
            if c.pending {
                let wider = (c.window * 2).min(self.max);
                self.start_cooling(key.clone(), now, wider);
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

    /// Services one session subscribes to.
    pub fn of_session(&self, session: &str) -> usize {
        self.by_session.get(session).map_or(0, HashSet::len)
    }

    /// Whether `session` subscribes to `key`.
    pub fn is_subscribed(&self, session: &str, key: &ServiceKey) -> bool {
        self.by_session
            .get(session)
            .is_some_and(|keys| keys.contains(key))
    }

    /// Subscribers of one service.
    pub fn count(&self, key: &ServiceKey) -> usize {
        self.by_service.get(key).map_or(0, HashMap::len)
    }

    fn state_mut(&mut self, session: &str, key: &ServiceKey) -> Option<&mut SubState> {
        self.by_service.get_mut(key)?.get_mut(session)
    }
}

/// A planned update knows the revision it brings its subscriber to, so a
/// queue never replaces a newer plan by an older one.
pub trait Planned {
    /// The revision the update brings the subscriber to.
    fn revision(&self) -> u64;
}

impl<T: Planned> Planned for Arc<T> {
    fn revision(&self) -> u64 {
        T::revision(self)
    }
}

/// An item of a session's outbound queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound<C, U> {
    /// A control message (welcome, probe), sent ahead of updates.
    Control(C),
    /// An update of a service, as planned (a delta or a full view).
    Update(U),
}

/// A queued update, or the place of a service's full view kept aside.
#[derive(Debug)]
enum Slot<U> {
    Update(Arc<ServiceKey>, U),
    Full(Arc<ServiceKey>),
}

/// A session's bounded outbound queue.
///
/// Control messages (welcome, probes) go ahead of updates and are never
/// dropped. When updates reach `capacity`, an update for service S drops
/// every update of S still queued and queues one full view of S instead;
/// a queued full view absorbs later updates of S by becoming the newest
/// full view planned (never an older one: plans made concurrently may
/// arrive out of order). Memory stays bounded by `capacity` plus one full
/// view per subscribed service, however slow the consumer, and what is
/// sent is always exactly what was planned.
#[derive(Debug)]
pub struct OutboundQueue<C, U> {
    control: VecDeque<C>,
    updates: VecDeque<Slot<U>>,
    /// The full view queued per service (its place is a `Slot::Full`).
    fulls: rustc_hash::FxHashMap<Arc<ServiceKey>, U>,
    /// Update slots queued per service (superseded ones included).
    slots: rustc_hash::FxHashMap<Arc<ServiceKey>, usize>,
    /// Update slots superseded by a full view queued behind them (skipped
    /// when they come up; not counted against the capacity).
    superseded: usize,
    capacity: usize,
}

/// What [`OutboundQueue::push_update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The update was queued.
    Queued,
    /// The queue was full: the service's updates became one full view.
    Overflowed,
    /// A full view of the service was queued: it became this one.
    Absorbed,
}

impl<C, U: Planned> OutboundQueue<C, U> {
    /// An empty queue holding at most `capacity` updates.
    pub fn new(capacity: usize) -> Self {
        Self {
            control: VecDeque::new(),
            updates: VecDeque::new(),
            fulls: Default::default(),
            slots: Default::default(),
            superseded: 0,
            capacity: capacity.max(1),
        }
    }

    /// Queues a control message ahead of all updates.
    pub fn push_control(&mut self, message: C) {
        self.control.push_back(message);
    }

    /// Queues `update` of `key`; `full` makes the full view at the same
    /// revision, used if a full view is queued or the queue overflows.
    pub fn push_update(
        &mut self,
        key: Arc<ServiceKey>,
        update: U,
        full: impl FnOnce() -> U,
    ) -> Enqueued {
        if let Some(queued) = self.fulls.get_mut(&key) {
            let full = full();
            if full.revision() >= queued.revision() {
                *queued = full;
            }
            return Enqueued::Absorbed;
        }
        if self.updates.len() - self.superseded < self.capacity {
            *self.slots.entry(key.clone()).or_default() += 1;
            self.updates.push_back(Slot::Update(key, update));
            return Enqueued::Queued;
        }
        self.queue_full(key, full());
        Enqueued::Overflowed
    }

    /// Queues a full view of `key` (a new subscription), replacing its
    /// queued updates or full view.
    pub fn push_full(&mut self, key: Arc<ServiceKey>, full: U) {
        match self.fulls.get_mut(&key) {
            Some(queued) if full.revision() >= queued.revision() => *queued = full,
            Some(_) => {}
            None => self.queue_full(key, full),
        }
    }

    /// Queues `key`'s full view behind everything. Its updates still
    /// queued stay where they are, but are passed over when they come up
    /// (they all come before it), so this costs O(1) however long the
    /// queue.
    fn queue_full(&mut self, key: Arc<ServiceKey>, full: U) {
        self.superseded += self.slots.get(&key).copied().unwrap_or(0);
        self.updates.push_back(Slot::Full(key.clone()));
        self.fulls.insert(key, full);
    }

    /// The next item to send: control first.
    pub fn pop(&mut self) -> Option<Outbound<C, U>> {
        if let Some(c) = self.control.pop_front() {
            return Some(Outbound::Control(c));
        }
        loop {
            match self.updates.pop_front()? {
                Slot::Update(key, u) => {
                    if let Some(n) = self.slots.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            self.slots.remove(&key);
                        }
                    }
                    // Superseded by the full view queued behind it.
                    if self.fulls.contains_key(&key) {
                        self.superseded -= 1;
                        continue;
                    }
                    return Some(Outbound::Update(u));
                }
                Slot::Full(key) => {
                    if let Some(u) = self.fulls.remove(&key) {
                        return Some(Outbound::Update(u));
                    }
                }
            }
        }
    }

    /// Items queued (control and updates).
    pub fn len(&self) -> usize {
        self.control.len() + self.updates.len() - self.superseded
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
