//! One service's state: its instances, revision, checksum and a bounded
//! window of recent deltas, plus the immutable [`ServiceView`] snapshots
//! readers share. Invariants: the revision grows on every write; the
//! checksum always equals [`crate::checksum::view_checksum`] of the
//! instances; the deltas in the window chain (`to` of one is `from` of the next).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::model::{InstanceRecord, OwnerRef, ServiceKey};

/// Instances of a service by id. A persistent B-tree: cloning it for a view
/// is O(1) and a write copies only the path it touches. (Measured faster
/// than imbl's hash trie for this workload.)
pub type InstanceMap = imbl::OrdMap<Arc<str>, Arc<InstanceRecord>>;

/// The change from one revision of a service's view to a later one.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The revision this delta applies to.
    pub from: u64,
    /// The revision the view has after applying it.
    pub to: u64,
    /// Records added or changed (whole records), in id order.
    pub upserted: Vec<Arc<InstanceRecord>>,
    /// Ids removed, in id order.
    pub removed: Vec<Arc<str>>,
}

impl Delta {
    /// Applies the delta to an instance map (the caller checks `from`).
    pub fn apply_to(&self, map: &mut InstanceMap) {
        for id in &self.removed {
            map.remove(id);
        }
        for record in &self.upserted {
            map.insert(record.instance.id.as_str().into(), record.clone());
        }
    }
}

/// An immutable snapshot of a service at one revision. Readers clone the
/// `Arc` and never wait on a writer. Front-ends keep their encodings of it
/// beside it (the core knows no wire format).
#[derive(Debug)]
pub struct ServiceView {
    /// Which service.
    pub key: Arc<ServiceKey>,
    /// The revision this view is at.
    pub revision: u64,
    /// Checksum of `instances`.
    pub checksum: u64,
    /// The instances, by id: for an id held by several sessions, the one
    /// [`outranks`] picks.
    pub instances: InstanceMap,
}

impl ServiceView {
    /// Number of healthy, enabled instances with weight above 0.
    pub fn serving_count(&self) -> usize {
        self.instances
            .values()
            .filter(|r| r.instance.is_serving())
            .count()
    }
}

/// The rule for an instance id held by two sessions (a client's old session
/// on a dead node and its new one after failover, or an HTTP lease and a
/// stream registering one address): the record written last wins, by the
/// Lamport sequence of its version, then by incarnation, origin and session,
/// so every node holding the same sessions shows the same entry. The loser
/// is kept and comes back if the winner's session drops the id, so a
/// failover never shows a removal.
pub fn outranks(a: &InstanceRecord, b: &InstanceRecord) -> bool {
    fn rank(r: &InstanceRecord) -> (u64, u64, &str, &str) {
        (
            r.version.sequence,
            r.version.incarnation,
            &r.owner.origin,
            &r.owner.session,
        )
    }
    rank(a) > rank(b)
}

/// What a change of one session's holding does to a service's view entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The entry becomes (or is rewritten as) this record.
    Upsert(Arc<InstanceRecord>),
    /// The entry goes: no session holds the id any more.
    Remove,
}

/// What [`ServiceState::enter`] did to an entry.
enum Entered {
    /// It holds this record now; true if the id was new.
    Upserted(Arc<InstanceRecord>, bool),
    /// It is gone (its id as it was held).
    Removed(Arc<str>),
    /// The id was not there to remove.
    Nothing,
}

/// One service's mutable state, owned by the registry.
#[derive(Debug)]
pub struct ServiceState {
    key: Arc<ServiceKey>,
    revision: u64,
    checksum: u64,
    instances: InstanceMap,
    /// Ids held by more than one session, with every holder. Usually empty.
    contested: FxHashMap<Arc<str>, Vec<OwnerRef>>,
    /// Recent deltas, oldest first, chained.
    deltas: VecDeque<Arc<Delta>>,
    /// At most this many deltas are kept.
    window: usize,
    /// The view at `revision`, built on first demand after a write.
    view: Option<Arc<ServiceView>>,
    /// Written since the registry last published this service's view.
    unpublished: bool,
}

impl ServiceState {
    /// An empty service at `revision`, keeping `window` deltas.
    pub fn new(key: Arc<ServiceKey>, revision: u64, window: usize) -> Self {
        Self {
            key,
            revision,
            checksum: 0,
            instances: InstanceMap::new(),
            contested: FxHashMap::default(),
            deltas: VecDeque::new(),
            window: window.max(1),
            view: None,
            unpublished: false,
        }
    }

    /// The service's key.
    pub fn key(&self) -> &Arc<ServiceKey> {
        &self.key
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The current checksum.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// The current instances.
    pub fn instances(&self) -> &InstanceMap {
        &self.instances
    }

    /// The record shown for `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<InstanceRecord>> {
        self.instances.get(id)
    }

    /// Whether more than one session holds `id`.
    pub fn is_contested(&self, id: &str) -> bool {
        self.contested.contains_key(id)
    }

    /// Works out what `owner`'s holding of `id` (its record now, or none;
    /// `had`: whether it held the id before) does to the view entry.
    /// `lookup` gives another holder's record. Keeps the list of contested
    /// ids; changes no entry (see [`Self::apply`]).
    pub fn hold(
        &mut self,
        id: &Arc<str>,
        owner: &OwnerRef,
        held: Option<&Arc<InstanceRecord>>,
        had: bool,
        lookup: impl Fn(&OwnerRef) -> Option<Arc<InstanceRecord>>,
    ) -> Option<Effect> {
        if had && !self.contested.contains_key(id) {
            // The id's only holder: its entry is this owner's.
            return Some(match held {
                Some(new) => Effect::Upsert(new.clone()),
                None => Effect::Remove,
            });
        }
        let current = self.instances.get(id);
        let Some(holders) = self.contested.get_mut(id) else {
            return match (current, held) {
                (None, None) => None,
                (None, Some(new)) => Some(Effect::Upsert(new.clone())),
                (Some(c), new) if c.owner == *owner => match new {
                    Some(new) => Some(Effect::Upsert(new.clone())),
                    None => Some(Effect::Remove),
                },
                (Some(_), None) => None,
                (Some(c), Some(new)) => {
                    let both = vec![c.owner.clone(), owner.clone()];
                    let wins = outranks(new, c);
                    self.contested.insert(id.clone(), both);
                    wins.then(|| Effect::Upsert(new.clone()))
                }
            };
        };
        match (held.is_some(), holders.iter().position(|h| h == owner)) {
            (true, None) => holders.push(owner.clone()),
            (false, Some(at)) => {
                holders.swap_remove(at);
            }
            _ => {}
        }
        let mut best: Option<Arc<InstanceRecord>> = None;
        for h in holders.iter() {
            let record = if h == owner { held.cloned() } else { lookup(h) };
            if let Some(r) = record
                && best.as_ref().is_none_or(|b| outranks(&r, b))
            {
                best = Some(r);
            }
        }
        if holders.len() <= 1 {
            self.contested.remove(id);
        }
        match (best, current) {
            (None, None) => None,
            (None, Some(_)) => Some(Effect::Remove),
            (Some(b), Some(c)) if Arc::ptr_eq(&b, c) => None,
            (Some(b), _) => Some(Effect::Upsert(b)),
        }
    }

    /// Applies view changes as one write at `revision` (higher than the
    /// current one): one delta, one revision. Returns the change in the
    /// number of entries.
    pub fn apply(&mut self, revision: u64, effects: Vec<(Arc<str>, Effect)>) -> isize {
        debug_assert!(revision > self.revision);
        // Sized exactly: the delta is kept for the whole window.
        let upserts = effects
            .iter()
            .filter(|(_, e)| matches!(e, Effect::Upsert(_)))
            .count();
        let mut upserted = Vec::with_capacity(upserts);
        let mut removed = Vec::with_capacity(effects.len() - upserts);
        let mut grown = 0isize;
        for (id, effect) in effects {
            match self.enter(id, effect) {
                Entered::Upserted(record, added) => {
                    grown += isize::from(added);
                    upserted.push(record);
                }
                Entered::Removed(id) => {
                    grown -= 1;
                    removed.push(id);
                }
                Entered::Nothing => {}
            }
        }
        upserted.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        removed.sort();
        self.push_delta(revision, upserted, removed);
        grown
    }

    /// [`Self::apply`] of one effect (the registration hot path).
    pub fn apply_one(&mut self, revision: u64, id: Arc<str>, effect: Effect) -> isize {
        debug_assert!(revision > self.revision);
        match self.enter(id, effect) {
            Entered::Upserted(record, added) => {
                self.push_delta(revision, vec![record], Vec::new());
                isize::from(added)
            }
            Entered::Removed(id) => {
                self.push_delta(revision, Vec::new(), vec![id]);
                -1
            }
            Entered::Nothing => {
                self.push_delta(revision, Vec::new(), Vec::new());
                0
            }
        }
    }

    /// Changes one entry and the checksum with it (no revision, no delta).
    #[inline]
    fn enter(&mut self, id: Arc<str>, effect: Effect) -> Entered {
        match effect {
            Effect::Upsert(record) => {
                debug_assert_eq!(&*id, record.instance.id);
                self.checksum = self.checksum.wrapping_add(record.hash);
                let old = self.instances.insert(id, record.clone());
                if let Some(old) = &old {
                    self.checksum = self.checksum.wrapping_sub(old.hash);
                }
                Entered::Upserted(record, old.is_none())
            }
            Effect::Remove => match self.instances.remove_with_key(&id) {
                Some((id, old)) => {
                    self.checksum = self.checksum.wrapping_sub(old.hash);
                    Entered::Removed(id)
                }
                None => Entered::Nothing,
            },
        }
    }

    /// Moves to `revision` with no change to the instances (something
    /// shown beside them changed; subscribers are sent the view again).
    pub fn bump(&mut self, revision: u64) {
        self.push_delta(revision, Vec::new(), Vec::new());
    }

    fn push_delta(
        &mut self,
        revision: u64,
        upserted: Vec<Arc<InstanceRecord>>,
        removed: Vec<Arc<str>>,
    ) {
        if self.deltas.len() == self.window {
            self.deltas.pop_front();
        }
        self.deltas.push_back(Arc::new(Delta {
            from: self.revision,
            to: revision,
            upserted,
            removed,
        }));
        self.revision = revision;
        self.view = None;
    }

    /// Flags the service as written since its last publication; true if
    /// it was not flagged already.
    pub fn mark_unpublished(&mut self) -> bool {
        !std::mem::replace(&mut self.unpublished, true)
    }

    /// The view to publish now; clears the unpublished flag.
    pub fn publish_view(&mut self) -> Arc<ServiceView> {
        self.unpublished = false;
        self.view()
    }

    /// The view at the current revision (built once per revision).
    pub fn view(&mut self) -> Arc<ServiceView> {
        self.view
            .get_or_insert_with(|| {
                Arc::new(ServiceView {
                    key: self.key.clone(),
                    revision: self.revision,
                    checksum: self.checksum,
                    instances: self.instances.clone(),
                })
            })
            .clone()
    }

    /// The lowest revision a delta can still be computed from.
    pub fn oldest_delta_base(&self) -> u64 {
        self.deltas.front().map_or(self.revision, |d| d.from)
    }

    /// The merged change from `since` to the current revision, if the
    /// window still covers `since` (an empty delta when `since` is current).
    pub fn changes_since(&self, since: u64) -> Option<Delta> {
        if since == self.revision {
            return Some(Delta {
                from: since,
                to: since,
                upserted: Vec::new(),
                removed: Vec::new(),
            });
        }
        let start = self.deltas.iter().position(|d| d.from == since)?;
        let mut merged: BTreeMap<Arc<str>, Option<Arc<InstanceRecord>>> = BTreeMap::new();
        for delta in self.deltas.iter().skip(start) {
            for id in &delta.removed {
                merged.insert(id.clone(), None);
            }
            for record in &delta.upserted {
                merged.insert(record.instance.id.as_str().into(), Some(record.clone()));
            }
        }
        let mut upserted = Vec::new();
        let mut removed = Vec::new();
        for (id, change) in merged {
            match change {
                Some(record) => upserted.push(record),
                None => removed.push(id),
            }
        }
        Some(Delta {
            from: since,
            to: self.revision,
            upserted,
            removed,
        })
    }
}
