//! The rules of a Roster registry node as plain, I/O-free code: the data
//! model and its validation, data owned by sessions and merged by version,
//! per-service revisions, deltas and checksums, session liveness, and the
//! push rules. Callers pass the current
//! time in and carry out the effects; nothing here blocks, sleeps or sends.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod checksum;
pub mod held;
pub mod limits;
pub mod metadata;
pub mod model;
pub mod push;
pub mod registry;
pub mod replication;
pub mod service;
pub mod session;

pub use limits::{LimitHit, Limits};
pub use model::{
    Address, DEFAULT_CLUSTER, DEFAULT_GROUP, DEFAULT_NAMESPACE, DEFAULT_NETWORK, Instance,
    InstanceRecord, Metadata, NodeName, Owner, OwnerRef, ServiceKey, SessionId, ValidationError,
    Version,
};
pub use registry::{
    Change, Instances, Registry, RegistryConfig, RegistryError, SessionData, SessionDelta,
    SessionState,
};
pub use service::{Delta, ServiceView};
