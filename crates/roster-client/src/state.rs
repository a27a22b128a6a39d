//! The state the application-facing client and the background driver
//! share: settings, registrations, subscribed views, status, and the
//! commands the client sends the driver. Types only; no behaviour beyond
//! locking and asking.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use roster_core::{Instance, ServiceKey};
use roster_proto::v1;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ClientError;
use crate::balance::Balancer;
use crate::cache::ServiceCache;
use crate::disk::DiskCache;
use crate::raw::Connection;

/// How the client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A session with a registry is open; views are live.
    Connected,
    /// No registry reachable; views are served from memory or the disk
    /// cache and may be stale.
    Degraded,
    /// No registry reachable and nothing cached to serve.
    Disconnected,
}

/// One change to a subscribed service, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The service.
    pub service: ServiceKey,
    /// The service's revision after the change.
    pub revision: u64,
    /// What changed.
    pub change: Change,
}

/// What changed in a service's view.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The whole view (first view, reconnect, reload).
    Reset(Vec<Arc<Instance>>),
    /// A new instance.
    Added(Arc<Instance>),
    /// An instance whose fields changed.
    Changed(Arc<Instance>),
    /// An instance removed, by id.
    Removed(String),
}

/// The client's settings (see [`ClientBuilder`] for each one's meaning).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub addresses: Vec<String>,
    pub namespace: String,
    pub client_name: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub pull_interval: Duration,
    pub empty_push_protection: bool,
    pub empty_confirm_delay: Duration,
    pub require_connection: bool,
}

/// One registration the client keeps alive.
#[derive(Debug, Clone)]
pub(crate) struct Registered {
    pub key: ServiceKey,
    pub instance: Instance,
}

/// The client's state of one subscribed service.
#[derive(Debug)]
pub(crate) struct Sub {
    pub cache: ServiceCache,
    pub events: broadcast::Sender<Update>,
    /// Since when an emptying update is held back (protection).
    pub held_since: Option<Instant>,
    /// The view changed since it was last written to disk.
    pub disk_dirty: bool,
    /// A view was received (or loaded from disk): there is something to
    /// start a subscription stream with, even if it is empty.
    pub loaded: bool,
}

/// What the application and the driver share.
#[derive(Debug)]
pub(crate) struct State {
    pub registrations: BTreeMap<u64, Registered>,
    pub next_registration: u64,
    pub subs: HashMap<ServiceKey, Sub>,
    /// Views loaded from the disk cache, not yet subscribed to.
    pub from_disk: HashMap<ServiceKey, ServiceCache>,
    pub balancer: Balancer,
    /// The registry in use, when connected.
    pub server: Option<String>,
    /// Why the last connection attempt or session failed.
    pub last_error: Option<String>,
    /// Test seam: pushes to drop as if lost on the way.
    pub skip_pushes: u32,
}

impl State {
    /// Whether there is anything to serve while disconnected.
    pub fn has_views(&self) -> bool {
        !self.from_disk.is_empty() || self.subs.values().any(|s| s.loaded)
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub state: Mutex<State>,
    pub status: watch::Sender<Status>,
    pub commands: mpsc::UnboundedSender<Command>,
    /// Cancelled when the last [`Client`] handle goes or on shutdown.
    pub stop: CancellationToken,
    pub disk: Option<DiskCache>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent
        // enough to serve (every update is applied whole).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .map_err(|_| ClientError::SessionClosed)?;
        rx.await.map_err(|_| ClientError::SessionClosed)
    }
}

/// What the application asks of the driver.
pub(crate) enum Command {
    /// Make registration `id` (already in the state) on the registry.
    Register {
        id: u64,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Remove an instance (already dropped from the state).
    Deregister {
        key: ServiceKey,
        instance_id: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Drain a registered instance and wait for its subscribers.
    Drain {
        key: ServiceKey,
        instance_id: String,
        remove: bool,
        timeout: Duration,
        reply: oneshot::Sender<Result<v1::DrainResponse, ClientError>>,
    },
    /// Subscribe to a service (already in the state) and load its view.
    Subscribe {
        key: ServiceKey,
        reply: oneshot::Sender<()>,
    },
    /// Stop the registry pushing a service (already dropped from the state).
    Unsubscribe { key: ServiceKey },
    /// Pull a service now.
    Refresh {
        key: ServiceKey,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// The connection in use.
    Connection {
        reply: oneshot::Sender<Result<Connection, ClientError>>,
    },
    /// Deregister everything, write the disk cache and stop.
    Shutdown { reply: oneshot::Sender<()> },
}
