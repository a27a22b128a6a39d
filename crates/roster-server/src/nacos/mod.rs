//! Nacos compatibility: unmodified Nacos clients register, discover and get
//! pushes from the same registry as native clients. This module translates
//! the Nacos wire (`../shared/NACOS-PROTOCOL.md`) to [`crate::node::Node`]
//! operations; it keeps no registry state of its own beyond the per-service
//! `lastRefTime` clock and the live gRPC connections.

pub mod grpc;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use roster_core::{ServiceKey, ServiceView};

use crate::node::Node;

/// State shared by the Nacos listeners of one node.
pub struct Nacos {
    /// The registry.
    pub node: Arc<Node>,
    /// Last `lastRefTime` given out per service: clients drop data whose
    /// `lastRefTime` is not newer than what they hold, so it must strictly
    /// increase per service.
    ref_times: Mutex<HashMap<ServiceKey, i64>>,
}

impl Nacos {
    /// The Nacos face of `node`.
    pub fn new(node: Arc<Node>) -> Arc<Self> {
        Arc::new(Self {
            node,
            ref_times: Mutex::new(HashMap::new()),
        })
    }

    /// The current view of `key` and a `lastRefTime` for it, taken
    /// together so that a later emission never carries an older view.
    pub fn snapshot(&self, key: &ServiceKey) -> (Option<Arc<ServiceView>>, i64) {
        let mut times = self.ref_times.lock();
        let view = self.node.view(key);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let last = times.entry(key.clone()).or_insert(0);
        *last = now.max(*last + 1);
        (view, *last)
    }
}
