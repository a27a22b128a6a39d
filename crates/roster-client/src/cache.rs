//! A consumer's copy of one service's view. Full views replace it; a delta
//! is applied only to the revision it was made from, and the checksum is
//! verified after every change, so a gap or a divergence is detected (the
//! caller then pulls) rather than silently kept.

use std::collections::BTreeMap;

use roster_core::checksum::instance_hash;
use roster_proto::v1;

/// What applying an update changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// The update was a full view (reset).
    pub reset: bool,
    /// Instances new to the view.
    pub added: Vec<v1::Instance>,
    /// Instances whose record changed.
    pub changed: Vec<v1::Instance>,
    /// Ids removed.
    pub removed: Vec<String>,
}

/// Why an update could not be applied; pull the service to recover.
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
}

/// One service's view as the consumer holds it.
#[derive(Debug, Default, Clone)]
pub struct ServiceCache {
    /// The revision held (0: nothing yet).
    pub revision: u64,
    /// The checksum of `instances`.
    pub checksum: u64,
    /// The instances, by id.
    pub instances: BTreeMap<String, v1::Instance>,
}

fn hash(i: &v1::Instance) -> Result<u64, CacheError> {
    let model = i
        .to_model()
        .map_err(|e| CacheError::Malformed(e.to_string()))?;
    Ok(instance_hash(&model))
}

impl ServiceCache {
    /// Applies an update. Updates at or below the held revision are ignored
    /// (an empty [`Applied`]). On error the cache is unchanged.
    pub fn apply(&mut self, update: &v1::ServiceUpdate) -> Result<Applied, CacheError> {
        use v1::service_update::Kind;
        if update.revision <= self.revision && self.revision != 0 {
            return Ok(Applied::default());
        }
        let mut next = self.instances.clone();
        let mut applied = Applied::default();
        match &update.kind {
            Some(Kind::Full(full)) => {
                applied.reset = true;
                let mut fresh = BTreeMap::new();
                for i in &full.instances {
                    fresh.insert(i.id.clone(), i.clone());
                }
                for (id, i) in &fresh {
                    match next.get(id) {
                        None => applied.added.push(i.clone()),
                        Some(old) if old != i => applied.changed.push(i.clone()),
                        Some(_) => {}
                    }
                }
                applied.removed = next
                    .keys()
                    .filter(|k| !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                next = fresh;
            }
            Some(Kind::Delta(delta)) => {
                if delta.from_revision != self.revision {
                    return Err(CacheError::Gap {
                        from: delta.from_revision,
                        held: self.revision,
                    });
                }
                for id in &delta.removed {
                    if next.remove(id).is_some() {
                        applied.removed.push(id.clone());
                    }
                }
                for i in &delta.upserted {
                    match next.insert(i.id.clone(), i.clone()) {
                        None => applied.added.push(i.clone()),
                        Some(_) => applied.changed.push(i.clone()),
                    }
                }
            }
            None => {
                return Err(CacheError::Malformed(
                    "update without a view or delta".into(),
                ));
            }
        }
        let mut sum = 0u64;
        for i in next.values() {
            sum = sum.wrapping_add(hash(i)?);
        }
        if sum != update.checksum {
            return Err(CacheError::Checksum(update.revision));
        }
        self.instances = next;
        self.revision = update.revision;
        self.checksum = sum;
        Ok(applied)
    }
}
