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
use roster_core::ServiceKey;
use serde_json::Value;

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

    /// The `ServiceInfo` of `key` now, and the revision it shows. The
    /// view and its `lastRefTime` are taken together, so a later emission
    /// never carries an older view.
    pub fn service_info(&self, key: &ServiceKey, req: &wire::InfoRequest<'_>) -> (u64, Value) {
        let (view, time) = {
            let mut times = self.ref_times.lock();
            let view = self.node.view(key);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let time = match times.get_mut(key) {
                Some(last) => {
                    *last = now.max(*last + 1);
                    *last
                }
                None => {
                    times.insert(key.clone(), now);
                    now
                }
            };
            (view, time)
        };
        let revision = view.as_ref().map_or(0, |v| v.revision);
        (
            revision,
            wire::service_info(key, view.as_deref(), time, req),
        )
    }
}
