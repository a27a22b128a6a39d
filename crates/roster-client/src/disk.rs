//! The disk failover cache: one file per service holding its last good
//! view, written atomically (a temporary file renamed over the old one), so
//! a client that starts while no registry is reachable can still serve.
//! Blocking file I/O: call it from a blocking thread.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use roster_core::ServiceKey;
use roster_proto::v1;

use crate::cache::ServiceCache;

const SUFFIX: &str = "view";

/// A directory of cached service views.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Uses `dir`, creating it if needed.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Where the views are kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &ServiceKey) -> PathBuf {
        // Names may hold characters a file name cannot ('/', for one): the
        // file is named by a stable hash of the key, which it also stores.
        let hash = xxhash_rust::xxh3::xxh3_64(key.to_string().as_bytes());
        self.dir.join(format!("{hash:016x}.{SUFFIX}"))
    }

    /// Writes `cache` as the last good view of `key`, atomically.
    pub fn store(&self, key: &ServiceKey, cache: &ServiceCache) -> std::io::Result<()> {
        let bytes = cache.to_update(key).encode_to_vec();
        let path = self.path(key);
        let tmp = path.with_extension(format!("{SUFFIX}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)
    }

    /// Every readable view in the directory. Unreadable or corrupt files
    /// are skipped with a warning: a cache never stops a client starting.
    pub fn load(&self) -> HashMap<ServiceKey, ServiceCache> {
        let mut out = HashMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
                continue;
            }
            match Self::read(&path) {
                Ok((key, cache)) => {
                    out.insert(key, cache);
                }
                Err(e) => tracing::warn!(path = %path.display(), "skipping cached view: {e}"),
            }
        }
        out
    }

    fn read(path: &Path) -> Result<(ServiceKey, ServiceCache), String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let update = v1::ServiceUpdate::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
        let key = roster_proto::convert::required_key(update.service.as_ref())
            .map_err(|e| e.to_string())?;
        let mut cache = ServiceCache::default();
        cache.apply(&update).map_err(|e| e.to_string())?;
        Ok((key, cache))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn stored_views_load_back_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path()).unwrap();
        let key = ServiceKey::simple("orders").unwrap();
        let i = roster_core::Instance::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 80)
            .normalize()
            .unwrap();
        let wire = v1::Instance::from_model(&i);
        let mut cache = ServiceCache::default();
        cache
            .apply(&v1::ServiceUpdate {
                service: None,
                revision: 4,
                checksum: roster_core::checksum::instance_hash(&i),
                kind: Some(v1::service_update::Kind::Full(v1::FullView {
                    instances: vec![wire],
                })),
                epoch: None,
            })
            .unwrap();
        disk.store(&key, &cache).unwrap();
        std::fs::write(dir.path().join("junk.view"), b"not a view").unwrap();
        let loaded = disk.load();
        assert_eq!(loaded.len(), 1);
        let back = &loaded[&key];
        assert_eq!(
            (back.revision, back.checksum, back.len()),
            (4, cache.checksum, 1)
        );
    }
}
