//! One service's state: its instances, revision, checksum and a bounded
//! window of recent deltas, plus the immutable [`ServiceView`] snapshots
//! readers share. Invariants: the revision grows on every write; the
//! checksum always equals [`crate::checksum::view_checksum`] of the
//! instances; the deltas in the window chain (`to` of one is `from` of the next).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::model::{InstanceRecord, ServiceKey};

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
/// `Arc` and never wait on a writer.
#[derive(Debug)]
pub struct ServiceView {
    /// Which service.
    pub key: Arc<ServiceKey>,
    /// The revision this view is at.
    pub revision: u64,
    /// Checksum of `instances`.
    pub checksum: u64,
    /// The instances, by id.
    pub instances: InstanceMap,
    /// The transport layer's encoding of this view, made once per revision
    /// and shared by every subscriber that needs the full view.
    pub encoded: OnceLock<Bytes>,
    /// The Nacos layer's JSON `ServiceInfo` of this view (all clusters),
    /// likewise made once per revision and shared by pushes and queries:
    /// `[0]` names the service bare (gRPC), `[1]` as `group@@service`
    /// (HTTP and UDP).
    pub nacos_info: [OnceLock<std::sync::Arc<str>>; 2],
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

/// One service's mutable state, owned by the registry.
#[derive(Debug)]
pub struct ServiceState {
    key: Arc<ServiceKey>,
    revision: u64,
    checksum: u64,
    instances: InstanceMap,
    /// Recent single-write deltas, oldest first, chained.
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

    /// A record by id.
    pub fn get(&self, id: &str) -> Option<&Arc<InstanceRecord>> {
        self.instances.get(id)
    }

    /// Inserts or replaces a record under `id` (its instance's id), moving
    /// to `revision` (which must be higher than the current one). Returns
    /// the replaced record.
    pub fn upsert(
        &mut self,
        id: Arc<str>,
        record: Arc<InstanceRecord>,
        revision: u64,
    ) -> Option<Arc<InstanceRecord>> {
        debug_assert!(revision > self.revision);
        debug_assert_eq!(&*id, record.instance.id);
        self.checksum = self.checksum.wrapping_add(record.hash);
        let old = self.instances.insert(id, record.clone());
        if let Some(old) = &old {
            self.checksum = self.checksum.wrapping_sub(old.hash);
        }
        self.push_delta(revision, vec![record], Vec::new());
        old
    }

    /// Removes a record by id, moving to `revision`. Returns it, or `None`
    /// (and changes nothing) when absent.
    pub fn remove(&mut self, id: &str, revision: u64) -> Option<Arc<InstanceRecord>> {
        debug_assert!(revision > self.revision);
        let (id, old) = self.instances.remove_with_key(id)?;
        self.checksum = self.checksum.wrapping_sub(old.hash);
        self.push_delta(revision, Vec::new(), vec![id]);
        Some(old)
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
                    encoded: OnceLock::new(),
                    nacos_info: Default::default(),
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
