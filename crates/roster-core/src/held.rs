//! What a node holds of one session: its records, grouped by service, and
//! the version they are at, or a tombstone. Owns the merge order of a
//! session's states (the greater version wins; at equal versions a
//! tombstone wins); knows nothing of views, liveness or other sessions.

use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use crate::model::{Instance, InstanceRecord, ServiceKey, Version};

/// One service's records of a session: most sessions hold one instance
/// per service (a Nacos connection always does), kept without a map.
#[derive(Debug)]
enum Ids {
    One(Arc<str>, Arc<InstanceRecord>),
    Many(HashMap<Arc<str>, Arc<InstanceRecord>>),
}

/// A session's records, by service and instance id.
#[derive(Debug, Default)]
pub struct Records {
    by_service: HashMap<Arc<ServiceKey>, Ids>,
    len: usize,
}

impl Records {
    /// The record of `id` in `key`.
    pub fn get(&self, key: &ServiceKey, id: &str) -> Option<&Arc<InstanceRecord>> {
        match self.by_service.get(key)? {
            Ids::One(held, r) => (**held == *id).then_some(r),
            Ids::Many(m) => m.get(id),
        }
    }

    /// Sets the record of `id` in `key`, returning the one it replaces.
    pub fn insert(
        &mut self,
        key: Arc<ServiceKey>,
        id: Arc<str>,
        record: Arc<InstanceRecord>,
    ) -> Option<Arc<InstanceRecord>> {
        let old = match self.by_service.get_mut(&key) {
            None => {
                self.by_service.insert(key, Ids::One(id, record));
                None
            }
            Some(Ids::One(held, r)) if *held == id => Some(std::mem::replace(r, record)),
            Some(ids @ Ids::One(..)) => {
                let Ids::One(held, r) = std::mem::replace(ids, Ids::Many(HashMap::default()))
                else {
                    unreachable!("matched One above")
                };
                if let Ids::Many(m) = ids {
                    m.insert(held, r);
                    m.insert(id, record);
                }
                None
            }
            Some(Ids::Many(m)) => m.insert(id, record),
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes the record of `id` in `key`.
    pub fn remove(&mut self, key: &ServiceKey, id: &str) -> Option<Arc<InstanceRecord>> {
        let ids = self.by_service.get_mut(key)?;
        let removed = match ids {
            Ids::One(held, _) if **held == *id => match self.by_service.remove(key) {
                Some(Ids::One(_, r)) => Some(r),
                _ => None,
            },
            Ids::One(..) => None,
            Ids::Many(m) => {
                let r = m.remove(id);
                if m.is_empty() {
                    self.by_service.remove(key);
                }
                r
            }
        };
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// The ids held in `key`.
    pub fn ids(&self, key: &ServiceKey) -> Vec<Arc<str>> {
        match self.by_service.get(key) {
            None => Vec::new(),
            Some(Ids::One(id, _)) => vec![id.clone()],
            Some(Ids::Many(m)) => m.keys().cloned().collect(),
        }
    }

    /// Every record, with its service and id.
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = (&Arc<ServiceKey>, &Arc<str>, &Arc<InstanceRecord>)> {
        self.by_service.iter().flat_map(|(key, ids)| {
            let each: Box<dyn Iterator<Item = (&Arc<str>, &Arc<InstanceRecord>)>> = match ids {
                Ids::One(id, r) => Box::new(std::iter::once((id, r))),
                Ids::Many(m) => Box::new(m.iter()),
            };
            each.map(move |(id, r)| (key, id, r))
        })
    }

    /// Every (service, id) held, consuming the records.
    pub fn into_ids(self) -> Vec<(Arc<ServiceKey>, Arc<str>)> {
        let mut out = Vec::with_capacity(self.len);
        for (key, ids) in self.by_service {
            match ids {
                Ids::One(id, _) => out.push((key, id)),
                Ids::Many(m) => out.extend(m.into_keys().map(|id| (key.clone(), id))),
            }
        }
        out
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A session's data as this node holds it: the latest version it knows,
/// with the records, or a tombstone. Versions order the states of one
/// session; at equal versions a tombstone wins. Merging keeps the greater,
/// so it is commutative, associative and idempotent.
#[derive(Debug)]
pub enum Held {
    /// The session's data at `version`.
    Live {
        /// The version of the session's last write.
        version: Version,
        /// Its records.
        records: Records,
    },
    /// The session ended at `version`.
    Gone {
        /// The version of its end.
        version: Version,
        /// When this node learned of it (the tombstone's grace runs from here).
        since: std::time::Instant,
    },
}

impl Held {
    /// The version this state is at.
    pub fn version(&self) -> Version {
        match self {
            Held::Live { version, .. } | Held::Gone { version, .. } => *version,
        }
    }

    /// The records, if live.
    pub fn records(&self) -> Option<&Records> {
        match self {
            Held::Live { records, .. } => Some(records),
            Held::Gone { .. } => None,
        }
    }

    /// Whether an incoming state (live at `version` if `live`, else a
    /// tombstone) supersedes this one.
    pub fn superseded_by(&self, version: Version, live: bool) -> bool {
        match self {
            Held::Live { version: v, .. } => version > *v || (version == *v && !live),
            Held::Gone { version: v, .. } => version > *v,
        }
    }
}

/// A session's whole data as another node sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionData {
    /// The version of the session's last write.
    pub version: Version,
    /// Every instance it holds, with its service and the version that set it.
    pub instances: Instances,
}

/// The instances of a session's data, each with its service and the
/// version that set it: as read from a peer (owned), or as this node holds
/// them (shared with its records, so a snapshot of a million instances is
/// sent without copying one).
#[derive(Debug, Clone)]
pub enum Instances {
    /// Read from a peer, or made up by a test.
    Owned(Vec<(ServiceKey, Instance, Version)>),
    /// This node's records, grouped by service.
    Shared(Vec<(Arc<ServiceKey>, Arc<InstanceRecord>)>),
}

impl Instances {
    /// How many.
    pub fn len(&self) -> usize {
        match self {
            Instances::Owned(v) => v.len(),
            Instances::Shared(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each instance with its service and version.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&ServiceKey, &Instance, Version)> + '_> {
        match self {
            Instances::Owned(v) => Box::new(v.iter().map(|(k, i, v)| (k, i, *v))),
            Instances::Shared(v) => Box::new(v.iter().map(|(k, r)| (&**k, &r.instance, r.version))),
        }
    }

    /// Owned instances (shared ones are copied).
    pub fn into_owned(self) -> Vec<(ServiceKey, Instance, Version)> {
        match self {
            Instances::Owned(v) => v,
            Instances::Shared(v) => v
                .into_iter()
                .map(|(k, r)| (ServiceKey::clone(&k), r.instance.clone(), r.version))
                .collect(),
        }
    }
}

impl From<Vec<(ServiceKey, Instance, Version)>> for Instances {
    fn from(v: Vec<(ServiceKey, Instance, Version)>) -> Self {
        Instances::Owned(v)
    }
}

/// Equal when they hold the same instances in the same order, however held.
impl PartialEq for Instances {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

/// A session's state as another node sends it: its data, or its end.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionState {
    /// The session's data.
    Live(SessionData),
    /// The session ended at this version.
    Gone(Version),
}

impl SessionState {
    /// The version this state is at.
    pub fn version(&self) -> Version {
        match self {
            SessionState::Live(d) => d.version,
            SessionState::Gone(v) => *v,
        }
    }

    /// Instances it carries.
    pub fn len(&self) -> usize {
        match self {
            SessionState::Live(d) => d.instances.len(),
            SessionState::Gone(_) => 0,
        }
    }

    /// Whether it carries no instance.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About how many bytes it takes on the wire (see
    /// [`crate::model::Instance::wire_size`]).
    pub fn wire_size(&self) -> usize {
        match self {
            SessionState::Live(d) => d
                .instances
                .iter()
                .map(|(k, i, _)| instance_wire_size(k, i))
                .sum::<usize>()
                .saturating_add(64),
            SessionState::Gone(_) => 64,
        }
    }
}

/// About how many bytes a service key takes on the wire.
fn key_wire_size(k: &ServiceKey) -> usize {
    k.namespace.len() + k.group.len() + k.service.len()
}

/// About how many bytes an instance with its service and version takes on
/// the wire.
fn instance_wire_size(k: &ServiceKey, i: &Instance) -> usize {
    key_wire_size(k) + i.wire_size() + 24
}

/// What changed in a session between two versions, as its origin sends
/// it to a peer that holds the earlier one: the current form of each
/// instance written since, and the ids removed since. Applied to the
/// session's state at any version from `base` on, it gives the state at
/// `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionDelta {
    /// The receiver must hold the session at this version or later.
    pub base: Version,
    /// The version the session is at after it.
    pub version: Version,
    /// Instances set since `base`, with their services and the versions
    /// that set them.
    pub upserts: Vec<(ServiceKey, Instance, Version)>,
    /// Instances removed since `base`, by service and id.
    pub removed: Vec<(ServiceKey, String)>,
}

impl SessionDelta {
    /// Instances it names (set or removed).
    pub fn len(&self) -> usize {
        self.upserts.len() + self.removed.len()
    }

    /// Whether it names no instance.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About how many bytes it takes on the wire (see
    /// [`SessionState::wire_size`]).
    pub fn wire_size(&self) -> usize {
        let upserts: usize = self
            .upserts
            .iter()
            .map(|(k, i, _)| instance_wire_size(k, i))
            .sum();
        let removed: usize = self
            .removed
            .iter()
            .map(|(k, id)| key_wire_size(k) + id.len() + 16)
            .sum();
        upserts.saturating_add(removed).saturating_add(96)
    }
}

/// Which instances of one of this node's sessions were written since they
/// were last taken for replication: a set of (service, id), or, past
/// [`Touched::MAX_IDS`] of them, the whole session. Merging is a union.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Touched {
    ids: rustc_hash::FxHashSet<(Arc<ServiceKey>, Arc<str>)>,
    whole: bool,
}

impl Touched {
    /// Past this many ids, the whole session is sent instead (the set of
    /// a peer that is away a long time stays bounded).
    pub const MAX_IDS: usize = 4096;

    /// The whole session.
    pub fn whole() -> Self {
        Self {
            ids: Default::default(),
            whole: true,
        }
    }

    /// Whether the whole session is to be sent.
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    /// The (service, id) pairs written (empty when whole).
    pub fn ids(&self) -> impl Iterator<Item = &(Arc<ServiceKey>, Arc<str>)> {
        self.ids.iter()
    }

    /// Notes that `id` of `key` was written.
    pub fn add(&mut self, key: &Arc<ServiceKey>, id: &Arc<str>) {
        if self.whole {
            return;
        }
        self.ids.insert((key.clone(), id.clone()));
        if self.ids.len() > Self::MAX_IDS {
            *self = Self::whole();
        }
    }

    /// Adds what `other` names.
    pub fn merge(&mut self, other: Touched) {
        if self.whole {
            return;
        }
        if other.whole {
            *self = Self::whole();
            return;
        }
        for (key, id) in other.ids {
            self.add(&key, &id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Owner;

    fn record(ip: u8) -> (Arc<str>, Arc<InstanceRecord>) {
        let instance = Instance::new(std::net::IpAddr::from([10, 0, 0, ip]), 80)
            .normalize()
            .unwrap();
        let id: Arc<str> = instance.id.as_str().into();
        let r = Arc::new(InstanceRecord {
            hash: crate::checksum::instance_hash(&instance),
            instance,
            owner: Arc::new(Owner {
                origin: "n".into(),
                session: "s".into(),
            }),
            version: Version::default(),
        });
        (id, r)
    }

    #[test]
    fn records_go_from_one_to_many_and_back_per_service() {
        let k = Arc::new(ServiceKey::simple("a").unwrap());
        let other = Arc::new(ServiceKey::simple("b").unwrap());
        let mut records = Records::default();
        let (id1, r1) = record(1);
        let (id2, r2) = record(2);
        assert!(records.insert(k.clone(), id1.clone(), r1.clone()).is_none());
        assert!(records.get(&other, &id1).is_none());
        assert!(records.insert(k.clone(), id1.clone(), r1.clone()).is_some());
        assert!(records.insert(k.clone(), id2.clone(), r2).is_none());
        assert!(records.insert(other.clone(), id1.clone(), r1).is_none());
        assert_eq!(records.len(), 3);
        let mut ids = records.ids(&k);
        ids.sort();
        assert_eq!(ids, [id1.clone(), id2.clone()]);
        assert_eq!(records.iter().count(), 3);
        assert!(records.remove(&k, &id1).is_some());
        assert!(records.remove(&k, &id1).is_none());
        assert!(records.get(&k, &id2).is_some());
        assert!(records.remove(&k, &id2).is_some());
        assert!(records.ids(&k).is_empty());
        assert_eq!(records.into_ids(), [(other, id1)]);
    }
}
