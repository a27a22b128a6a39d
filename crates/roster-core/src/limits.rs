//! How much one node's registry state may hold, and the refusal that names
//! the limit a write would pass. Owns only the numbers and the checks of
//! one instance; the registry counts what it holds and asks here.

use std::fmt;

use crate::model::Instance;

/// What the registry of one node holds at most. A write that would pass
/// one is refused whole; nothing held is changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions open on this node (streams, leases and Nacos beat leases).
    pub sessions: usize,
    /// Services with state on this node.
    pub services: usize,
    /// Instances shown over all services.
    pub instances: usize,
    /// Instances shown in one service.
    pub instances_per_service: usize,
    /// Instances one session holds.
    pub instances_per_session: usize,
    /// Addresses (networks) of one instance.
    pub addresses_per_instance: usize,
    /// Metadata of one instance, keys plus values, in bytes (at most
    /// [`crate::model::MAX_METADATA_BYTES`], which the model itself keeps).
    pub metadata_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            sessions: 1_000_000,
            services: 100_000,
            instances: 2_000_000,
            instances_per_service: 100_000,
            instances_per_session: 10_000,
            addresses_per_instance: 16,
            metadata_bytes: crate::model::MAX_METADATA_BYTES,
        }
    }
}

/// A limit a request would pass: which one (its configuration key under
/// `[limits]`) and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHit {
    /// The key under `[limits]`, e.g. `instances_per_session`.
    pub key: &'static str,
    /// The configured maximum.
    pub max: usize,
}

impl LimitHit {
    /// Whether the limit is on the size of one thing (an instance's
    /// addresses or metadata, a request) rather than on how many things
    /// are held.
    pub fn is_size(&self) -> bool {
        matches!(
            self.key,
            "addresses_per_instance" | "metadata_bytes" | "http_body_bytes" | "grpc_message_bytes"
        )
    }
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "limit reached: limits.{} is {} on this node",
            self.key, self.max
        )
    }
}

impl Limits {
    /// Checks the parts of one instance the limits bound.
    pub fn check_instance(&self, instance: &Instance) -> Result<(), LimitHit> {
        if instance.addresses.len() > self.addresses_per_instance {
            return Err(LimitHit {
                key: "addresses_per_instance",
                max: self.addresses_per_instance,
            });
        }
        if self.metadata_bytes < crate::model::MAX_METADATA_BYTES {
            let bytes: usize = instance
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum();
            if bytes > self.metadata_bytes {
                return Err(LimitHit {
                    key: "metadata_bytes",
                    max: self.metadata_bytes,
                });
            }
        }
        Ok(())
    }

    /// `Err` naming `key` when `count` is above `max`.
    pub fn at_most(key: &'static str, count: usize, max: usize) -> Result<(), LimitHit> {
        if count > max {
            Err(LimitHit { key, max })
        } else {
            Ok(())
        }
    }
}
