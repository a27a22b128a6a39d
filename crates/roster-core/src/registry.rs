//! The registry state of one node: services, sessions, and the published
//! map of immutable views. Every write is validated first, then applied
//! whole and bumps the service's revision; views are republished lazily, on
//! the next read, so a burst of writes pays for one republication. Pure: it
//! takes the current time as an argument and never blocks, sends or sleeps.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

use crate::checksum::instance_hash;
use crate::model::{Instance, InstanceRecord, ServiceKey, SessionId, ValidationError, Version};
use crate::service::{Delta, ServiceState, ServiceView};
use crate::session::{SessionKind, SessionTable, SessionTimeouts, SweepVerdict};

/// All published views by service: a persistent map, so a snapshot of it
/// is an O(1) clone that readers keep as long as they like.
pub type PublishedViews = imbl::GenericHashMap<
    Arc<ServiceKey>,
    Arc<ServiceView>,
    rustc_hash::FxBuildHasher,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// Why a registry operation was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RegistryError {
    /// The input is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The named session does not exist (never opened, closed or expired).
    #[error("session {0:?} is not open")]
    UnknownSession(String),
    /// No such service.
    #[error("service {0} not found")]
    UnknownService(String),
    /// No such instance in the service.
    #[error("instance {id:?} not found in service {service}")]
    UnknownInstance {
        /// The service searched.
        service: String,
        /// The id looked for.
        id: String,
    },
    /// A feature this node does not offer yet.
    #[error("{0}")]
    Unsupported(String),
}

/// A service changed: its new revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The service.
    pub key: Arc<ServiceKey>,
    /// Its revision after the change.
    pub revision: u64,
}

/// What a sweep found.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    /// Sessions to probe, with the nonce to send.
    pub probes: Vec<(SessionId, u64)>,
    /// Sessions expired (already removed with their records).
    pub expired: Vec<SessionId>,
    /// The changes their expiry made.
    pub changes: Vec<Change>,
}

/// Tunables of the registry state.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Deltas kept per service for catch-up.
    pub delta_window: usize,
    /// Session keep-alive and probe timeouts.
    pub timeouts: SessionTimeouts,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            delta_window: 128,
            timeouts: SessionTimeouts::default(),
        }
    }
}

/// The state of one registry node.
#[derive(Debug)]
pub struct Registry {
    /// This life of the node; versions written now carry it.
    incarnation: u64,
    /// Last record version sequence handed out.
    sequence: u64,
    /// Last revision handed out. Shared by all services, so a service that
    /// is removed and created again still never reuses a revision.
    revision: u64,
    /// Last session number handed out.
    next_session: u64,
    config: RegistryConfig,
    services: HashMap<Arc<ServiceKey>, ServiceState>,
    sessions: SessionTable,
    published: PublishedViews,
    /// Services written since `published` was last brought up to date.
    unpublished: Vec<Arc<ServiceKey>>,
    instance_count: usize,
}

impl Registry {
    /// An empty registry for the node life `incarnation`.
    pub fn new(incarnation: u64, config: RegistryConfig) -> Self {
        Self {
            incarnation,
            sequence: 0,
            revision: 0,
            next_session: 0,
            config,
            services: HashMap::default(),
            sessions: SessionTable::new(config.timeouts),
            published: PublishedViews::default(),
            unpublished: Vec::new(),
            instance_count: 0,
        }
    }

    /// The node life this registry writes versions for.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Opens a session and returns its id.
    pub fn open_session(
        &mut self,
        kind: SessionKind,
        client_name: &str,
        now: Instant,
    ) -> SessionId {
        self.next_session += 1;
        let id: SessionId = format!("{:x}-{}", self.incarnation, self.next_session).into();
        self.sessions
            .insert(id.clone(), kind, client_name.to_owned(), now);
        id
    }

    /// Records activity on a session; false if it is not open.
    pub fn touch(&mut self, session: &str, now: Instant) -> bool {
        self.sessions.touch(session, now)
    }

    /// The session table (read-only).
    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// Registers (or re-registers) an ephemeral instance owned by `session`,
    /// returning the change and the instance's id. Re-registering an
    /// identical instance still bumps version and revision.
    pub fn register(
        &mut self,
        session: &str,
        key: &ServiceKey,
        instance: Instance,
        now: Instant,
    ) -> Result<(Change, Arc<str>), RegistryError> {
        let instance = instance.normalize()?;
        if !instance.ephemeral {
            return Err(RegistryError::Unsupported(
                "persistent instances (ephemeral=false) are not supported yet".into(),
            ));
        }
        let owner = match self.sessions.get(session) {
            Some(s) => s.id.clone(),
            None => return Err(RegistryError::UnknownSession(session.to_owned())),
        };
        self.sessions.touch(session, now);
        let id: Arc<str> = instance.id.as_str().into();
        let record = Arc::new(self.record(instance, owner.clone()));
        let revision = self.next_revision();
        let window = self.config.delta_window;
        // One lookup of the service: reuse its interned key, or create it.
        let state = match self.services.get_mut(key) {
            Some(state) => state,
            None => {
                let key = Arc::new(key.clone());
                self.services
                    .entry(key.clone())
                    .or_insert_with(|| ServiceState::new(key, revision - 1, window))
            }
        };
        let key = state.key().clone();
        let old = state.upsert(id.clone(), record, revision);
        if state.mark_unpublished() {
            self.unpublished.push(key.clone());
        }
        let newly_owned = match old {
            Some(old) if old.owner != owner => {
                self.disown(&old.owner, &key, &id);
                true
            }
            // Already in the owner's set.
            Some(_) => false,
            None => {
                self.instance_count += 1;
                true
            }
        };
        if newly_owned && let Some(s) = self.sessions.get_mut(&owner) {
            s.owned.insert((key.clone(), id.clone()));
        }
        Ok((Change { key, revision }, id))
    }

    /// Removes an instance whoever owns it.
    pub fn deregister(&mut self, key: &ServiceKey, id: &str) -> Result<Change, RegistryError> {
        let revision = self.revision + 1;
        let state = self.existing_mut(key)?;
        let Some(old) = state.remove(id, revision) else {
            return Err(unknown_instance(key, id));
        };
        let key = state.key().clone();
        self.revision = revision;
        self.instance_count -= 1;
        self.disown(&old.owner, &key, id);
        Ok(self.changed(key))
    }

    /// Changes an existing instance in place with `edit`; the result is
    /// validated and its id, addresses, port and cluster must stay. The
    /// owner stays; the version and revision move on.
    pub fn modify(
        &mut self,
        key: &ServiceKey,
        id: &str,
        edit: impl FnOnce(&mut Instance),
    ) -> Result<Change, RegistryError> {
        let state = self.existing_mut(key)?;
        let Some(old) = state.get(id) else {
            return Err(unknown_instance(key, id));
        };
        let mut instance = old.instance.clone();
        let owner = old.owner.clone();
        edit(&mut instance);
        let instance = instance.normalize()?;
        if instance.id != id || instance.addresses != old.instance.addresses {
            return Err(RegistryError::Invalid(ValidationError::new(
                "instance",
                "an update cannot change the id or addresses; register anew",
            )));
        }
        let record = self.record(instance, owner);
        let revision = self.next_revision();
        let state = self.existing_mut(key)?;
        let key = state.key().clone();
        state.upsert(Arc::from(id), Arc::new(record), revision);
        Ok(self.changed(key))
    }

    /// Closes a session and removes every record it owned.
    pub fn close_session(&mut self, session: &str) -> Vec<Change> {
        let Some(s) = self.sessions.remove(session) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        for (key, id) in s.owned {
            let revision = self.revision + 1;
            if let Some(state) = self.services.get_mut(&key)
                && state.remove(&id, revision).is_some()
            {
                self.revision = revision;
                self.instance_count -= 1;
                changes.push(self.changed(key));
            }
        }
        // One change per service is enough for consumers: keep the last.
        changes.reverse();
        let mut seen = std::collections::HashSet::new();
        changes.retain(|c| seen.insert(c.key.clone()));
        changes
    }

    /// Probes idle sessions and expires silent ones (removing their records).
    pub fn sweep(&mut self, now: Instant) -> SweepOutcome {
        let mut outcome = SweepOutcome::default();
        for verdict in self.sessions.sweep(now) {
            match verdict {
                SweepVerdict::Probe(id, nonce) => outcome.probes.push((id, nonce)),
                SweepVerdict::Expire(id) => {
                    outcome.changes.extend(self.close_session(&id));
                    outcome.expired.push(id);
                }
            }
        }
        outcome
    }

    /// Whether some write is not yet in [`Self::published`].
    pub fn has_unpublished(&self) -> bool {
        !self.unpublished.is_empty()
    }

    /// The current views of every service, first republishing those
    /// written since the last call: clone it (O(1)) to give readers a
    /// snapshot.
    pub fn published(&mut self) -> &PublishedViews {
        for key in std::mem::take(&mut self.unpublished) {
            if let Some(state) = self.services.get_mut(&key) {
                let view = state.publish_view();
                self.published.insert(key, view);
            }
        }
        &self.published
    }

    /// The current view of a service (built once per revision).
    pub fn view(&mut self, key: &ServiceKey) -> Option<Arc<ServiceView>> {
        Some(self.services.get_mut(key)?.view())
    }

    /// The merged change of a service since `since`, if still in its window.
    pub fn changes_since(&self, key: &ServiceKey, since: u64) -> Option<Delta> {
        self.services.get(key)?.changes_since(since)
    }

    /// The oldest revision of a service a delta can still be made from.
    pub fn oldest_delta_base(&self, key: &ServiceKey) -> Option<u64> {
        Some(self.services.get(key)?.oldest_delta_base())
    }

    /// Number of services (including empty ones).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of instances over all services.
    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    fn existing_mut(&mut self, key: &ServiceKey) -> Result<&mut ServiceState, RegistryError> {
        self.services
            .get_mut(key)
            .ok_or_else(|| RegistryError::UnknownService(key.to_string()))
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn record(&mut self, instance: Instance, owner: SessionId) -> InstanceRecord {
        self.sequence += 1;
        InstanceRecord {
            hash: instance_hash(&instance),
            instance,
            owner,
            version: Version {
                incarnation: self.incarnation,
                sequence: self.sequence,
            },
        }
    }

    fn disown(&mut self, owner: &str, key: &Arc<ServiceKey>, id: &str) {
        if let Some(s) = self.sessions.get_mut(owner) {
            s.owned.remove(&(key.clone(), Arc::from(id)));
        }
    }

    /// Notes a write to an existing service for the next publication.
    fn changed(&mut self, key: Arc<ServiceKey>) -> Change {
        let state = self
            .services
            .get_mut(&key)
            .expect("a change follows a write to an existing service");
        let revision = state.revision();
        if state.mark_unpublished() {
            self.unpublished.push(key.clone());
        }
        Change { key, revision }
    }
}

fn unknown_instance(key: &ServiceKey, id: &str) -> RegistryError {
    RegistryError::UnknownInstance {
        service: key.to_string(),
        id: id.to_owned(),
    }
}
