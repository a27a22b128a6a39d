//! A consumer's copy of one service's view. A full view replaces it; a delta
//! is applied only to the revision it was made from; the checksum is kept
//! per change in O(size of the update) and checked after every update, so a
//! gap or a divergence is reported (the caller then reloads) rather than
//! silently kept. An update that fails leaves the cache unchanged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use roster_core::Instance;
use roster_core::checksum::instance_hash;
use roster_proto::v1;

/// What applying an update changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// The update was a full view (reset).
    pub reset: bool,
    /// Instances new to the view.
    pub added: Vec<Arc<Instance>>,
    /// Instances whose record changed.
    pub changed: Vec<Arc<Instance>>,
    /// Ids removed.
    pub removed: Vec<String>,
}

impl Applied {
    /// Whether nothing changed (an update at or below the held revision).
    pub fn is_empty(&self) -> bool {
        !self.reset && self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Why an update could not be applied; reload the service to recover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// A delta from a revision other than the one held.
    #[error("delta from revision {from} but the cache holds {held}")]
    Gap {
        /// The delta's base.
        from: u64,
        /// What the cache holds.
        held: u64,
    },
    /// After applying, the view's checksum differs from the server's.
    #[error("checksum mismatch at revision {0}")]
    Checksum(u64),
    /// An instance in the update is malformed.
    #[error("malformed instance: {0}")]
    Malformed(String),
    /// A delta numbered by another node life than the view held.
    #[error("delta from another node epoch than the view held")]
    Epoch,
}

/// One service's view as the consumer holds it.
#[derive(Debug, Clone)]
pub struct ServiceCache {
    /// The revision held.
    pub revision: u64,
    /// Nothing verified is held yet, or a reset is expected: the next full
    /// view is taken whatever its revision and no delta applies.
    awaiting_full: bool,
    /// The checksum of the instances held.
    pub checksum: u64,
    /// The node life whose revision `revision` is.
    pub epoch: Option<v1::NodeEpoch>,
    /// The instances with their hash, by id.
    entries: BTreeMap<String, (Arc<Instance>, u64)>,
}

impl Default for ServiceCache {
    fn default() -> Self {
        Self {
            revision: 0,
            awaiting_full: true,
            checksum: 0,
            epoch: None,
            entries: BTreeMap::new(),
        }
    }
}

fn convert(i: &v1::Instance) -> Result<(Arc<Instance>, u64), CacheError> {
    let model = i
        .to_model()
        .map_err(|e| CacheError::Malformed(e.to_string()))?;
    let hash = instance_hash(&model);
    Ok((Arc::new(model), hash))
}

impl ServiceCache {
    /// Number of instances held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no instance is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// An instance by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Instance>> {
        self.entries.get(id).map(|(i, _)| i)
    }

    /// The instances, in id order.
    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.entries.values().map(|(i, _)| i)
    }

    /// Accepts the next full view whatever its revision (after a reconnect
    /// the server's revisions may start lower). The instances stay until it
    /// arrives, so the reset reports what really changed.
    pub fn expect_reset(&mut self) {
        self.awaiting_full = true;
    }

    /// The registry (of `epoch`) says the instances held are its view at
    /// `revision` (a pull answered not-modified by checksum).
    pub fn confirm(&mut self, revision: u64, epoch: Option<&v1::NodeEpoch>) {
        self.revision = revision;
        if let Some(e) = epoch {
            self.epoch = Some(e.clone());
        }
        self.awaiting_full = false;
    }

    /// Whether `epoch` is the one the cache's revision belongs to.
    pub fn same_epoch(&self, epoch: Option<&v1::NodeEpoch>) -> bool {
        match (epoch, &self.epoch) {
            (Some(given), Some(held)) => given == held,
            // Either side unknown: revisions are taken as they are, and the
            // checksum, checked after every update, catches a mismatch.
            _ => true,
        }
    }

    /// Whether applying `update` would leave no instance while some are
    /// held now (what empty-push protection holds back).
    pub fn would_empty(&self, update: &v1::ServiceUpdate) -> bool {
        use v1::service_update::Kind;
        if self.entries.is_empty() || self.is_stale(update) {
            return false;
        }
        match &update.kind {
            Some(Kind::Full(full)) => full.instances.is_empty(),
            Some(Kind::Delta(d)) => {
                d.upserted.is_empty()
                    && self
                        .entries
                        .keys()
                        .all(|id| d.removed.iter().any(|r| r == id))
            }
            None => false,
        }
    }

    fn is_stale(&self, update: &v1::ServiceUpdate) -> bool {
        !self.awaiting_full
            && self.same_epoch(update.epoch.as_ref())
            && update.revision <= self.revision
    }

    /// Applies an update. Updates at or below the held revision are ignored
    /// (an empty [`Applied`]). On error the cache is unchanged.
    pub fn apply(&mut self, update: &v1::ServiceUpdate) -> Result<Applied, CacheError> {
        use v1::service_update::Kind;
        if self.is_stale(update) {
            return Ok(Applied::default());
        }
        match &update.kind {
            Some(Kind::Full(full)) => self.apply_full(update, full),
            Some(Kind::Delta(delta)) => self.apply_delta(update, delta),
            None => Err(CacheError::Malformed(
                "update without a view or delta".into(),
            )),
        }
    }

    fn apply_full(
        &mut self,
        update: &v1::ServiceUpdate,
        full: &v1::FullView,
    ) -> Result<Applied, CacheError> {
        let mut fresh = BTreeMap::new();
        let mut sum = 0u64;
        for i in &full.instances {
            let (instance, hash) = convert(i)?;
            if let Some((_, old)) = fresh.insert(i.id.clone(), (instance, hash)) {
                sum = sum.wrapping_sub(old);
            }
            sum = sum.wrapping_add(hash);
        }
        if sum != update.checksum {
            return Err(CacheError::Checksum(update.revision));
        }
        let mut applied = Applied {
            reset: true,
            ..Applied::default()
        };
        for (id, (instance, hash)) in &fresh {
            match self.entries.get(id) {
                None => applied.added.push(instance.clone()),
                Some((_, old)) if old != hash => applied.changed.push(instance.clone()),
                Some(_) => {}
            }
        }
        applied.removed = self
            .entries
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        self.entries = fresh;
        self.revision = update.revision;
        self.checksum = sum;
        if update.epoch.is_some() {
            self.epoch = update.epoch.clone();
        }
        self.awaiting_full = false;
        Ok(applied)
    }

    fn apply_delta(
        &mut self,
        update: &v1::ServiceUpdate,
        delta: &v1::Delta,
    ) -> Result<Applied, CacheError> {
        if !self.same_epoch(update.epoch.as_ref()) {
            return Err(CacheError::Epoch);
        }
        if self.awaiting_full || delta.from_revision != self.revision {
            return Err(CacheError::Gap {
                from: delta.from_revision,
                held: self.revision,
            });
        }
        // Work out the new checksum on an overlay first, so a failure
        // leaves the cache as it was.
        let mut overlay: HashMap<&str, Option<u64>> = HashMap::new();
        let mut sum = self.checksum;
        let current = |overlay: &HashMap<&str, Option<u64>>, id: &str| match overlay.get(id) {
            Some(h) => *h,
            None => self.entries.get(id).map(|(_, h)| *h),
        };
        for id in &delta.removed {
            if let Some(old) = current(&overlay, id) {
                sum = sum.wrapping_sub(old);
            }
            overlay.insert(id, None);
        }
        let mut upserts = Vec::with_capacity(delta.upserted.len());
        for i in &delta.upserted {
            let (instance, hash) = convert(i)?;
            if let Some(old) = current(&overlay, &i.id) {
                sum = sum.wrapping_sub(old);
            }
            sum = sum.wrapping_add(hash);
            overlay.insert(&i.id, Some(hash));
            upserts.push((i.id.clone(), instance, hash));
        }
        if sum != update.checksum {
            return Err(CacheError::Checksum(update.revision));
        }
        let mut applied = Applied::default();
        for id in &delta.removed {
            if self.entries.remove(id).is_some() {
                applied.removed.push(id.clone());
            }
        }
        for (id, instance, hash) in upserts {
            match self.entries.insert(id, (instance.clone(), hash)) {
                None => applied.added.push(instance),
                Some(_) => applied.changed.push(instance),
            }
        }
        self.revision = update.revision;
        self.checksum = sum;
        Ok(applied)
    }

    /// The held view as a full update (for the disk cache).
    pub fn to_update(&self, key: &roster_core::ServiceKey) -> v1::ServiceUpdate {
        v1::ServiceUpdate {
            service: Some(key.into()),
            revision: self.revision,
            checksum: self.checksum,
            kind: Some(v1::service_update::Kind::Full(v1::FullView {
                instances: self
                    .instances()
                    .map(|i| v1::Instance::from_model(i))
                    .collect(),
            })),
            epoch: self.epoch.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn wire(host: u8, weight: f64) -> v1::Instance {
        let mut i = Instance::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)), 80);
        i.weight = weight;
        v1::Instance::from_model(&i.normalize().unwrap())
    }

    fn sum(instances: &[v1::Instance]) -> u64 {
        instances.iter().fold(0u64, |s, i| {
            s.wrapping_add(instance_hash(&i.to_model().unwrap()))
        })
    }

    fn full(revision: u64, instances: Vec<v1::Instance>) -> v1::ServiceUpdate {
        v1::ServiceUpdate {
            service: None,
            revision,
            checksum: sum(&instances),
            kind: Some(v1::service_update::Kind::Full(v1::FullView { instances })),
            epoch: None,
        }
    }

    fn delta(
        from: u64,
        to: u64,
        upserted: Vec<v1::Instance>,
        removed: Vec<String>,
        after: &[v1::Instance],
    ) -> v1::ServiceUpdate {
        v1::ServiceUpdate {
            service: None,
            revision: to,
            checksum: sum(after),
            kind: Some(v1::service_update::Kind::Delta(v1::Delta {
                from_revision: from,
                upserted,
                removed,
            })),
            epoch: None,
        }
    }

    #[test]
    fn deltas_apply_in_order_and_gaps_and_bad_checksums_change_nothing() {
        let mut cache = ServiceCache::default();
        let (a, b) = (wire(1, 1.0), wire(2, 1.0));
        let r = cache.apply(&full(3, vec![a.clone()])).unwrap();
        assert!(r.reset && r.added.len() == 1);
        let r = cache
            .apply(&delta(
                3,
                4,
                vec![b.clone()],
                vec![],
                &[a.clone(), b.clone()],
            ))
            .unwrap();
        assert_eq!(r.added.len(), 1);
        assert_eq!(cache.len(), 2);

        let gap = delta(9, 10, vec![], vec![a.id.clone()], std::slice::from_ref(&b));
        assert_eq!(cache.apply(&gap), Err(CacheError::Gap { from: 9, held: 4 }));
        let mut wrong = delta(4, 5, vec![], vec![a.id.clone()], std::slice::from_ref(&b));
        wrong.checksum ^= 1;
        assert_eq!(cache.apply(&wrong), Err(CacheError::Checksum(5)));
        assert_eq!((cache.revision, cache.len()), (4, 2));

        let r = cache
            .apply(&delta(
                4,
                5,
                vec![wire(2, 3.0)],
                vec![a.id.clone()],
                &[wire(2, 3.0)],
            ))
            .unwrap();
        assert_eq!((r.removed.len(), r.changed.len()), (1, 1));
        assert_eq!(cache.get(&b.id).unwrap().weight, 3.0);
    }

    #[test]
    fn would_empty_spots_updates_that_remove_everything() {
        let mut cache = ServiceCache::default();
        let a = wire(1, 1.0);
        assert!(!cache.would_empty(&full(1, vec![])), "nothing to lose yet");
        cache.apply(&full(1, vec![a.clone()])).unwrap();
        assert!(cache.would_empty(&full(2, vec![])));
        assert!(cache.would_empty(&delta(1, 2, vec![], vec![a.id.clone()], &[])));
        assert!(!cache.would_empty(&delta(1, 2, vec![wire(2, 1.0)], vec![a.id.clone()], &[])));
    }

    #[test]
    fn a_reset_after_reconnect_is_accepted_at_a_lower_revision() {
        let mut cache = ServiceCache::default();
        cache.apply(&full(50, vec![wire(1, 1.0)])).unwrap();
        assert!(
            cache
                .apply(&full(2, vec![wire(2, 1.0)]))
                .unwrap()
                .is_empty()
        );
        cache.expect_reset();
        let r = cache.apply(&full(2, vec![wire(2, 1.0)])).unwrap();
        assert_eq!((r.added.len(), r.removed.len(), cache.revision), (1, 1, 2));
    }
}
