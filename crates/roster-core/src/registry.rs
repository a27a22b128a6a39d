//! The registry state of one node. Data belongs to sessions: each
//! session's data is one unit, `(origin node, session id) -> (version,
//! instances)`, whether the session is this node's own or (in a cluster) a
//! replica of another node's. Each service's view is derived from the
//! sessions held, one entry per instance id ([`crate::service::outranks`]
//! picks one when two sessions hold an id). Local calls change only their
//! own session's data; another origin's data enters whole, by version
//! ([`Registry::apply_session`], [`Registry::drop_session`],
//! [`Registry::drop_origin`]), merged by the laws in `docs/architecture.md`.
//! Liveness (stream sessions, leases, Nacos beat leases) is decided here
//! too, so a verdict and its action happen under one lock. Pure: time and
//! randomness come from the caller; nothing here blocks, sends or sleeps.

use rustc_hash::FxHashMap as HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::checksum::instance_hash;
pub use crate::held::{Held, Instances, Records, SessionData, SessionDelta, SessionState, Touched};
pub use crate::limits::{LimitHit, Limits};
use crate::model::{
    Instance, InstanceRecord, NodeName, Owner, OwnerRef, ServiceKey, SessionId, ValidationError,
    Version,
};
use crate::service::{Delta, ServiceState, ServiceView};
use crate::session::{Session, SessionKind, SessionTable, SessionTimeouts, SweepVerdict};

/// Why a registry operation was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RegistryError {
    /// The input is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The named session does not exist (never opened, closed or expired).
    #[error("session {0:?} is not open")]
    UnknownSession(String),
    /// A session with this id is already open.
    #[error("session {0:?} already exists")]
    SessionExists(String),
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
    /// The instance exists, but another session registered it: only its
    /// owner may change or remove it.
    #[error("instance {id:?} in service {service} belongs to another session")]
    NotOwner {
        /// The service.
        service: String,
        /// The instance.
        id: String,
    },
    /// The caller may not act for the session it named (not its
    /// connection, and no valid token) or with the authority it claimed.
    #[error("{0}")]
    Forbidden(String),
    /// The node is not taking this now (loading, or shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// A feature this node does not offer yet.
    #[error("{0}")]
    Unsupported(String),
    /// The write would pass one of the node's limits.
    #[error("{0}")]
    Limit(LimitHit),
}

impl From<LimitHit> for RegistryError {
    fn from(hit: LimitHit) -> Self {
        Self::Limit(hit)
    }
}

/// A service's view after a write: its revision (unchanged when the write
/// changed nothing shown, e.g. a record another session outranks).
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

/// What a beat check did.
#[derive(Debug, Default)]
pub struct BeatOutcome {
    /// Beat leases whose instance was marked unhealthy.
    pub unhealthy: Vec<SessionId>,
    /// Beat leases ended with their instance.
    pub expired: Vec<SessionId>,
    /// The changes made.
    pub changes: Vec<Change>,
}

/// Tunables of the registry state.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Deltas kept per service for catch-up.
    pub delta_window: usize,
    /// Session keep-alive and probe timeouts.
    pub timeouts: SessionTimeouts,
    /// How long a dropped session's tombstone is kept, so a late copy of
    /// its data cannot bring it back.
    pub tombstone_grace: Duration,
    /// What this node's own sessions may make it hold.
    pub limits: Limits,
    /// How long a service with no instance keeps its state (revision,
    /// deltas) before it is forgotten.
    pub empty_service_grace: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            delta_window: 128,
            timeouts: SessionTimeouts::default(),
            tombstone_grace: Duration::from_secs(60),
            limits: Limits::default(),
            empty_service_grace: Duration::from_secs(60),
        }
    }
}

/// The state of one registry node.
#[derive(Debug)]
pub struct Registry {
    /// This node: the origin of the sessions opened here.
    node: NodeName,
    /// This life of the node; versions written now carry it.
    incarnation: u64,
    /// The Lamport clock of versions: above every sequence written or applied.
    sequence: u64,
    /// Last revision handed out. Shared by all services, so a service that
    /// is removed and created again still never reuses a revision.
    revision: u64,
    config: RegistryConfig,
    services: HashMap<Arc<ServiceKey>, ServiceState>,
    /// This node's sessions and their liveness.
    sessions: SessionTable,
    /// Every session's data held here, this node's and other origins'.
    data: HashMap<OwnerRef, Held>,
    /// Services written since the last [`Self::take_unpublished`].
    unpublished: Vec<Arc<ServiceKey>>,
    instance_count: usize,
    /// Services seen empty by [`Self::forget_empty_services`]: since when,
    /// at which revision (a write since starts the wait again).
    empty_since: HashMap<Arc<ServiceKey>, (Instant, u64)>,
    /// This node's sessions written since the last [`Self::take_dirty`],
    /// with the instances written, kept only when the node replicates
    /// (see [`Self::track_replication`]).
    dirty: Option<HashMap<OwnerRef, Touched>>,
}

impl Registry {
    /// An empty registry for the node `node` in its life `incarnation`.
    pub fn new(node: impl Into<NodeName>, incarnation: u64, config: RegistryConfig) -> Self {
        Self {
            node: node.into(),
            incarnation,
            sequence: 0,
            revision: 0,
            config,
            services: HashMap::default(),
            sessions: SessionTable::new(config.timeouts),
            data: HashMap::default(),
            unpublished: Vec::new(),
            instance_count: 0,
            empty_since: HashMap::default(),
            dirty: None,
        }
    }

    /// From now on, remembers which of this node's sessions each write
    /// changes, for [`Self::take_dirty`] (a node with peers replicates them).
    pub fn track_replication(&mut self) {
        self.dirty.get_or_insert_with(Default::default);
    }

    /// This node's sessions changed since the last call, each once, with
    /// the instances written in each.
    pub fn take_dirty(&mut self) -> Vec<(OwnerRef, Touched)> {
        match &mut self.dirty {
            Some(d) if !d.is_empty() => d.drain().collect(),
            _ => Vec::new(),
        }
    }

    /// Notes a write of `ids` in `key` by `owner` (none: its end).
    fn mark_dirty<'a>(
        &mut self,
        owner: &OwnerRef,
        key: Option<&Arc<ServiceKey>>,
        ids: impl IntoIterator<Item = &'a Arc<str>>,
    ) {
        if let Some(d) = &mut self.dirty
            && owner.origin == self.node
        {
            let touched = d.entry(owner.clone()).or_default();
            match key {
                Some(key) => ids.into_iter().for_each(|id| touched.add(key, id)),
                None => touched.merge(Touched::whole()),
            }
        }
    }

    /// This node's name.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The node life this registry writes versions for.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn next_version(&mut self) -> Version {
        self.sequence += 1;
        Version {
            incarnation: self.incarnation,
            sequence: self.sequence,
        }
    }

    // ---- this node's sessions -------------------------------------------

    /// Opens a session with the id `id` (the caller makes it unguessable)
    /// and the secret `token`.
    pub fn open_session(
        &mut self,
        id: SessionId,
        kind: SessionKind,
        client_name: &str,
        token: u128,
        now: Instant,
    ) -> Result<OwnerRef, RegistryError> {
        if self.sessions.get(&id).is_some() {
            return Err(RegistryError::SessionExists(id.to_string()));
        }
        let max = self.config.limits.sessions;
        Limits::at_most("sessions", self.sessions.len() + 1, max)?;
        let owner = Arc::new(Owner {
            origin: self.node.clone(),
            session: id,
        });
        let version = self.next_version();
        self.data.insert(
            owner.clone(),
            Held::Live {
                version,
                records: Records::default(),
            },
        );
        self.sessions
            .insert(owner.clone(), kind, client_name.to_owned(), token, now);
        Ok(owner)
    }

    /// Records activity on a session; false if it is not open.
    pub fn touch(&mut self, session: &str, now: Instant) -> bool {
        self.sessions.touch(session, now)
    }

    /// Checks `token` against a session's secret.
    pub fn token_matches(&self, session: &str, token: u128) -> bool {
        self.sessions.get(session).is_some_and(|s| s.token == token)
    }

    /// The session table (read-only).
    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// An open session of this node.
    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// The owner of an open session, which is active now.
    fn touch_owner(&mut self, session: &str, now: Instant) -> Result<OwnerRef, RegistryError> {
        match self.sessions.get_mut(session) {
            Some(s) => {
                s.last_active = now;
                s.probe = None;
                Ok(s.owner.clone())
            }
            None => Err(RegistryError::UnknownSession(session.to_owned())),
        }
    }

    fn owner(&self, session: &str) -> Result<OwnerRef, RegistryError> {
        self.sessions
            .get(session)
            .map(|s| s.owner.clone())
            .ok_or_else(|| RegistryError::UnknownSession(session.to_owned()))
    }

    /// The session's record of `(key, id)`, if it holds one.
    fn own_record(
        &self,
        owner: &OwnerRef,
        key: &ServiceKey,
        id: &str,
    ) -> Option<&Arc<InstanceRecord>> {
        self.data.get(owner)?.records()?.get(key, id)
    }

    /// Why a session cannot act on `(key, id)`: it is someone else's, or
    /// no one's.
    fn not_held(&self, key: &ServiceKey, id: &str) -> RegistryError {
        let shown = self.services.get(key).and_then(|s| s.get(id)).is_some();
        if shown {
            RegistryError::NotOwner {
                service: key.to_string(),
                id: id.to_owned(),
            }
        } else {
            unknown_instance(key, id)
        }
    }

    /// Registers (or re-registers) an ephemeral instance in `session`'s
    /// data, returning the change and the instance's id. Re-registering an
    /// identical instance still bumps version and revision.
    pub fn register(
        &mut self,
        session: &str,
        key: &ServiceKey,
        instance: Instance,
        now: Instant,
    ) -> Result<(Change, Arc<str>), RegistryError> {
        let instance = checked(instance)?;
        self.config.limits.check_instance(&instance)?;
        let owner = self.owner(session)?;
        let added = match self.own_record(&owner, key, &instance.id) {
            Some(_) => 0,
            None => 1,
        };
        self.check_growth(&owner, key, added, [instance.id.as_str()], 0)?;
        self.touch_owner(session, now)?;
        let version = self.next_version();
        let key = self.intern(key);
        let id: Arc<str> = instance.id.as_str().into();
        let record = record(instance, &owner, version);
        let change = self.write_one(&owner, version, &key, id.clone(), Some(record));
        Ok((change, id))
    }

    /// Replaces the set of instances `session` holds in `key` with
    /// `instances` (empty: removes them all), as one write.
    pub fn set_instances(
        &mut self,
        session: &str,
        key: &ServiceKey,
        instances: Vec<Instance>,
        now: Instant,
    ) -> Result<Change, RegistryError> {
        let instances = instances
            .into_iter()
            .map(checked)
            .collect::<Result<Vec<_>, _>>()?;
        for i in &instances {
            self.config.limits.check_instance(i)?;
        }
        let owner = self.owner(session)?;
        let held_here = self
            .data
            .get(&owner)
            .and_then(Held::records)
            .map_or_else(Vec::new, |r| r.ids(key));
        let mut distinct: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let added = distinct.len() as isize - held_here.len() as isize;
        // Entries this write removes: ids only this session holds, not
        // held again.
        let state = self.services.get(key);
        let removed = held_here
            .iter()
            .filter(|id| distinct.binary_search(&&***id).is_err())
            .filter(|id| state.is_some_and(|s| !s.is_contested(id)))
            .count();
        if instances.is_empty() && state.is_none() {
            // Nothing held there, nothing to hold: no service is made.
            self.touch_owner(session, now)?;
            return Ok(Change {
                key: Arc::new(key.clone()),
                revision: 0,
            });
        }
        self.check_growth(&owner, key, added, distinct.iter().copied(), removed)?;
        self.touch_owner(session, now)?;
        let version = self.next_version();
        let key = self.intern(key);
        let mut changes: BTreeMap<Arc<str>, Option<Arc<InstanceRecord>>> = BTreeMap::new();
        if let Some(Held::Live { records, .. }) = self.data.get(&owner) {
            for id in records.ids(&key) {
                changes.insert(id, None);
            }
        }
        for instance in instances {
            let id: Arc<str> = instance.id.as_str().into();
            changes.insert(id, Some(record(instance, &owner, version)));
        }
        Ok(self.write(&owner, version, &key, changes.into_iter().collect()))
    }

    /// Removes an instance `session` holds.
    pub fn deregister(
        &mut self,
        session: &str,
        key: &ServiceKey,
        id: &str,
        now: Instant,
    ) -> Result<Change, RegistryError> {
        let owner = self.owner(session)?;
        if self.own_record(&owner, key, id).is_none() {
            return Err(self.not_held(key, id));
        }
        self.sessions.touch(session, now);
        let version = self.next_version();
        let key = self.intern(key);
        Ok(self.write_one(&owner, version, &key, Arc::from(id), None))
    }

    /// Changes an instance `session` holds with `edit`; the result is
    /// validated, and its id and addresses must stay. The version and
    /// revision move on.
    pub fn modify(
        &mut self,
        session: &str,
        key: &ServiceKey,
        id: &str,
        edit: impl FnOnce(&mut Instance),
        now: Instant,
    ) -> Result<Change, RegistryError> {
        let owner = self.owner(session)?;
        let Some(old) = self.own_record(&owner, key, id) else {
            return Err(self.not_held(key, id));
        };
        let mut instance = old.instance.clone();
        edit(&mut instance);
        let instance = instance.normalize()?;
        self.config.limits.check_instance(&instance)?;
        if instance.id != id || instance.addresses != old.instance.addresses {
            return Err(RegistryError::Invalid(ValidationError::new(
                "instance",
                "an update cannot change the id or addresses; register anew",
            )));
        }
        self.sessions.touch(session, now);
        let version = self.next_version();
        let key = self.intern(key);
        let record = record(instance, &owner, version);
        Ok(self.write_one(&owner, version, &key, Arc::from(id), Some(record)))
    }

    /// The owner of the record shown for `(key, id)`.
    pub fn owner_of(&self, key: &ServiceKey, id: &str) -> Option<OwnerRef> {
        Some(self.services.get(key)?.get(id)?.owner.clone())
    }

    /// Closes one of this node's sessions: its records go (one change per
    /// service) and a tombstone stays for the grace period.
    pub fn close_session(&mut self, session: &str, now: Instant) -> Vec<Change> {
        let Some(s) = self.sessions.remove(session) else {
            return Vec::new();
        };
        let version = self.next_version();
        self.retire(&s.owner, version, now)
    }

    /// Probes idle sessions and expires silent ones (removing their records).
    pub fn sweep(&mut self, now: Instant) -> SweepOutcome {
        let mut outcome = SweepOutcome::default();
        for verdict in self.sessions.sweep(now) {
            match verdict {
                SweepVerdict::Probe(id, nonce) => outcome.probes.push((id, nonce)),
                SweepVerdict::Expire(id) => {
                    outcome.changes.extend(self.close_session(&id, now));
                    outcome.expired.push(id);
                }
            }
        }
        self.expire_tombstones(now);
        outcome
    }

    /// Applies beat deadlines: a silent beat lease's instances turn
    /// unhealthy, then the lease ends. Decided and done in one call.
    pub fn check_beats(&mut self, now: Instant) -> BeatOutcome {
        let verdicts = self.sessions.check_beats(now);
        let mut out = BeatOutcome::default();
        for id in verdicts.unhealthy {
            // Only those that still had a healthy instance are news.
            let changes = self.set_health(&id, false);
            if !changes.is_empty() {
                out.changes.extend(changes);
                out.unhealthy.push(id);
            }
        }
        for id in verdicts.expired {
            out.changes.extend(self.close_session(&id, now));
            out.expired.push(id);
        }
        out
    }

    /// A beat on a beat lease (or any session): it is alive, and its
    /// instances are healthy (as a Nacos beat makes them, whatever made
    /// them unhealthy).
    pub fn beat(&mut self, session: &str, now: Instant) -> Result<Vec<Change>, RegistryError> {
        if !self.sessions.touch(session, now) {
            return Err(RegistryError::UnknownSession(session.to_owned()));
        }
        let beat_lease = self
            .sessions
            .get(session)
            .is_some_and(|s| matches!(s.kind, SessionKind::Beat { .. }));
        if !beat_lease {
            // Another lease only renews: its instances' health is theirs.
            return Ok(Vec::new());
        }
        Ok(self.set_health(session, true))
    }

    /// Sets `healthy` on every instance of a session that differs.
    fn set_health(&mut self, session: &str, healthy: bool) -> Vec<Change> {
        let Ok(owner) = self.owner(session) else {
            return Vec::new();
        };
        let Some(Held::Live { records, .. }) = self.data.get(&owner) else {
            return Vec::new();
        };
        let mut by_service: BTreeMap<Arc<ServiceKey>, Vec<(Instance, Version)>> = BTreeMap::new();
        for (key, _, r) in records.iter() {
            if r.instance.healthy != healthy {
                let mut i = r.instance.clone();
                i.healthy = healthy;
                by_service
                    .entry(key.clone())
                    .or_default()
                    .push((i, r.version));
            }
        }
        let mut changes = Vec::new();
        for (key, instances) in by_service {
            // The session's data moves on; each record keeps the version of
            // its registration, so liveness alone never changes which of
            // two sessions holding an id is shown.
            let version = self.next_version();
            let updates = instances
                .into_iter()
                .map(|(i, v)| (Arc::from(i.id.as_str()), Some(record(i, &owner, v))))
                .collect();
            changes.push(self.write(&owner, version, &key, updates));
        }
        changes
    }

    /// Moves a service to a new revision with the same instances (a
    /// setting shown beside them changed, so subscribers get it again).
    pub fn bump_service(&mut self, key: &ServiceKey) -> Option<Change> {
        let revision = self.revision + 1;
        let state = self.services.get_mut(key)?;
        self.revision = revision;
        state.bump(revision);
        let key = state.key().clone();
        if state.mark_unpublished() {
            self.unpublished.push(key.clone());
        }
        Some(Change { key, revision })
    }

    // ---- other origins' data --------------------------------------------

    /// Applies another node's session data, whole, if it is newer than
    /// what is held (a tombstone at or above its version wins). Data of
    /// this node's own sessions is never taken from elsewhere.
    pub fn apply_session(
        &mut self,
        owner: Owner,
        data: SessionData,
    ) -> Result<Vec<Change>, RegistryError> {
        if owner.origin == self.node {
            return Ok(Vec::new());
        }
        let (owner, held) = match self.data.get_key_value(&owner) {
            Some((o, h)) => (o.clone(), Some(h)),
            None => (Arc::new(owner), None),
        };
        if held.is_some_and(|h| !h.superseded_by(data.version, true)) {
            return Ok(Vec::new());
        }
        // Validate everything before changing anything.
        let mut valid = Vec::with_capacity(data.instances.len());
        for (key, instance, version) in data.instances.into_owned() {
            valid.push((key, checked(instance)?, version));
        }
        self.observe(data.version);
        let mut records = Records::default();
        for (key, instance, version) in valid {
            self.observe(version);
            let key = self.intern(&key);
            let id: Arc<str> = instance.id.as_str().into();
            records.insert(key, id, record(instance, &owner, version));
        }
        // Records come grouped by service: each service's ids are gathered
        // and sorted once (a snapshot applies a million of them).
        let mut groups: Vec<(Arc<ServiceKey>, Vec<Arc<str>>)> = Vec::new();
        for (key, id, _) in records.iter() {
            match groups.last_mut() {
                Some((k, ids)) if Arc::ptr_eq(k, key) => ids.push(id.clone()),
                _ => groups.push((key.clone(), vec![id.clone()])),
            }
        }
        let mut touched: BTreeMap<Arc<ServiceKey>, BTreeSet<Arc<str>>> = BTreeMap::new();
        for (key, ids) in groups {
            match touched.entry(key) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(ids.into_iter().collect());
                }
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().extend(ids),
            }
        }
        let old = self.data.insert(
            owner.clone(),
            Held::Live {
                version: data.version,
                records,
            },
        );
        if let Some(Held::Live { records: old, .. }) = old {
            for (key, id) in old.into_ids() {
                touched.entry(key).or_default().insert(id);
            }
        }
        Ok(self.reconcile_all(&owner, touched))
    }

    /// Drops another node's session at `version` (it ended there): its
    /// records go unless a newer version of it is held, and a tombstone
    /// keeps older copies from coming back.
    pub fn drop_session(&mut self, owner: Owner, version: Version, now: Instant) -> Vec<Change> {
        if owner.origin == self.node {
            return Vec::new();
        }
        let owner = match self.data.get_key_value(&owner) {
            Some((_, h)) if !h.superseded_by(version, false) => return Vec::new(),
            Some((o, _)) => o.clone(),
            None => Arc::new(owner),
        };
        self.observe(version);
        self.retire(&owner, version, now)
    }

    /// Drops every session of another origin (a node that stopped
    /// verifying): each at the version held, so only newer data of it can
    /// come back.
    pub fn drop_origin(&mut self, origin: &str, now: Instant) -> Vec<Change> {
        if *origin == *self.node {
            return Vec::new();
        }
        let live: Vec<(OwnerRef, Version)> = self
            .data
            .iter()
            .filter(|(o, h)| &*o.origin == origin && matches!(h, Held::Live { .. }))
            .map(|(o, h)| (o.clone(), h.version()))
            .collect();
        let mut changes = Vec::new();
        for (owner, version) in live {
            changes.extend(self.retire(&owner, version, now));
        }
        last_per_service(changes)
    }

    /// Forgets what is held of another origin's session, leaving no
    /// tombstone: its origin stopped vouching for it (no verify listed it
    /// for the verify timeout), not ended it, so the same version may come
    /// back from the origin later.
    pub fn forget_session(&mut self, owner: &Owner) -> Vec<Change> {
        if owner.origin == self.node {
            return Vec::new();
        }
        let Some((owner, held)) = self.data.remove_entry(owner) else {
            return Vec::new();
        };
        let mut touched: BTreeMap<Arc<ServiceKey>, BTreeSet<Arc<str>>> = BTreeMap::new();
        if let Held::Live { records, .. } = held {
            for (key, id) in records.into_ids() {
                touched.entry(key).or_default().insert(id);
            }
        }
        self.reconcile_all(&owner, touched)
    }

    /// A session's state as it is sent to another node: its data (sharing
    /// its records) or its end.
    pub fn session_state(&self, owner: &Owner) -> Option<SessionState> {
        Some(match self.data.get(owner)? {
            Held::Live { version, records } => SessionState::Live(SessionData {
                version: *version,
                instances: Instances::Shared(
                    records
                        .iter()
                        .map(|(k, _, r)| (k.clone(), r.clone()))
                        .collect(),
                ),
            }),
            Held::Gone { version, .. } => SessionState::Gone(*version),
        })
    }

    /// Applies a session's state from another node (see
    /// [`Self::apply_session`] and [`Self::drop_session`]).
    pub fn apply_state(
        &mut self,
        owner: Owner,
        state: SessionState,
        now: Instant,
    ) -> Result<Vec<Change>, RegistryError> {
        match state {
            SessionState::Live(data) => self.apply_session(owner, data),
            SessionState::Gone(version) => Ok(self.drop_session(owner, version, now)),
        }
    }

    /// What changed in one of this node's live sessions since `base`, given
    /// the instances written since (`touched`, not whole): the current form
    /// of each that is still held, the removal of each that is not. None
    /// if the session is not live here or not past `base`.
    pub fn session_delta(
        &self,
        owner: &Owner,
        base: Version,
        touched: &Touched,
    ) -> Option<SessionDelta> {
        let Held::Live { version, records } = self.data.get(owner)? else {
            return None;
        };
        if *version <= base || touched.is_whole() {
            return None;
        }
        let mut delta = SessionDelta {
            base,
            version: *version,
            upserts: Vec::new(),
            removed: Vec::new(),
        };
        for (key, id) in touched.ids() {
            match records.get(key, id) {
                Some(r) => {
                    let instance = r.instance.clone();
                    delta
                        .upserts
                        .push((ServiceKey::clone(key), instance, r.version));
                }
                None => delta.removed.push((ServiceKey::clone(key), id.to_string())),
            }
        }
        Some(delta)
    }

    /// Applies a delta of another node's session (see [`SessionDelta`]).
    /// `Ok(None)`: it cannot be applied here (the session is not held
    /// live at `base` or later): its whole state is needed. A delta at or
    /// below what is held changes nothing.
    pub fn apply_delta(
        &mut self,
        owner: &Owner,
        delta: SessionDelta,
    ) -> Result<Option<Vec<Change>>, RegistryError> {
        if owner.origin == self.node {
            return Ok(Some(Vec::new()));
        }
        let Some((owner, held)) = self.data.get_key_value(owner) else {
            return Ok(None);
        };
        if held.version() >= delta.version {
            return Ok(Some(Vec::new()));
        }
        match held {
            Held::Live { version, .. } if *version >= delta.base => {}
            _ => return Ok(None),
        }
        let owner = owner.clone();
        // Validate everything before changing anything.
        let mut upserts = Vec::with_capacity(delta.upserts.len());
        for (key, instance, version) in delta.upserts {
            upserts.push((key, checked(instance)?, version));
        }
        self.observe(delta.version);
        let mut writes = Vec::with_capacity(upserts.len() + delta.removed.len());
        for (key, instance, version) in upserts {
            self.observe(version);
            let key = self.intern(&key);
            let id: Arc<str> = instance.id.as_str().into();
            writes.push((key, id, Some(record(instance, &owner, version))));
        }
        for (key, id) in delta.removed {
            if let Some(key) = self.services.get(&key).map(|s| s.key().clone()) {
                writes.push((key, id.into(), None));
            }
        }
        let mut touched: BTreeMap<Arc<ServiceKey>, BTreeSet<Arc<str>>> = BTreeMap::new();
        let Some(Held::Live { version, records }) = self.data.get_mut(&owner) else {
            return Ok(None); // checked live above
        };
        *version = delta.version;
        for (key, id, record) in writes {
            // A set always touches the id; a removal only if it was held.
            let changed = match record {
                Some(r) => {
                    records.insert(key.clone(), id.clone(), r);
                    true
                }
                None => records.remove(&key, &id).is_some(),
            };
            if changed {
                touched.entry(key).or_default().insert(id);
            }
        }
        Ok(Some(self.reconcile_all(&owner, touched)))
    }

    /// Forgets tombstones older than the grace period.
    pub fn expire_tombstones(&mut self, now: Instant) {
        let grace = self.config.tombstone_grace;
        self.data.retain(|_, h| match h {
            Held::Gone { since, .. } => now.saturating_duration_since(*since) < grace,
            Held::Live { .. } => true,
        });
    }

    /// What is held of a session (any origin).
    pub fn held(&self, owner: &Owner) -> Option<&Held> {
        self.data.get(owner)
    }

    /// What is held of a session (any origin), with its interned owner.
    pub fn held_entry(&self, owner: &Owner) -> Option<(&OwnerRef, &Held)> {
        self.data.get_key_value(owner)
    }

    /// Every session held, with what is held of it.
    pub fn held_sessions(&self) -> impl Iterator<Item = (&OwnerRef, &Held)> {
        self.data.iter()
    }

    /// Moves the Lamport clock past `version`.
    fn observe(&mut self, version: Version) {
        self.sequence = self.sequence.max(version.sequence);
    }

    /// Replaces a session's data by a tombstone at `version` and removes
    /// what it showed.
    fn retire(&mut self, owner: &OwnerRef, version: Version, now: Instant) -> Vec<Change> {
        self.mark_dirty(owner, None, []);
        let old = self.data.insert(
            owner.clone(),
            Held::Gone {
                version,
                since: now,
            },
        );
        let mut touched: BTreeMap<Arc<ServiceKey>, BTreeSet<Arc<str>>> = BTreeMap::new();
        if let Some(Held::Live { records, .. }) = old {
            for (key, id) in records.into_ids() {
                touched.entry(key).or_default().insert(id);
            }
        }
        self.reconcile_all(owner, touched)
    }

    // ---- views ------------------------------------------------------------

    /// The views of the services written since the last call, built now:
    /// what to publish to readers.
    pub fn take_unpublished(&mut self) -> Vec<Arc<ServiceView>> {
        let mut views = Vec::with_capacity(self.unpublished.len());
        for key in std::mem::take(&mut self.unpublished) {
            if let Some(state) = self.services.get_mut(&key) {
                views.push(state.publish_view());
            }
        }
        views
    }

    /// Whether some write has not been taken by [`Self::take_unpublished`].
    pub fn has_unpublished(&self) -> bool {
        !self.unpublished.is_empty()
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

    /// Forgets the services that have shown no instance since a call at
    /// least `empty_service_grace` ago, and returns their keys. Services
    /// written but not yet taken by [`Self::take_unpublished`] are kept
    /// (publish first). A service registered again later starts afresh at
    /// a new revision, above any it had.
    pub fn forget_empty_services(&mut self, now: Instant) -> Vec<Arc<ServiceKey>> {
        let grace = self.config.empty_service_grace;
        let services = &self.services;
        // Still empty, and not written since (it may have filled and
        // emptied again in between).
        self.empty_since.retain(|k, (_, revision)| {
            services
                .get(k)
                .is_some_and(|s| s.instances().is_empty() && s.revision() == *revision)
        });
        for (key, state) in &self.services {
            if state.instances().is_empty() {
                self.empty_since
                    .entry(key.clone())
                    .or_insert((now, state.revision()));
            }
        }
        let unpublished: std::collections::HashSet<&Arc<ServiceKey>> =
            self.unpublished.iter().collect();
        let gone: Vec<Arc<ServiceKey>> = self
            .empty_since
            .iter()
            .filter(|(k, (since, _))| {
                now.saturating_duration_since(*since) >= grace && !unpublished.contains(k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &gone {
            self.empty_since.remove(key);
            self.services.remove(key);
        }
        gone
    }

    /// Whether the registry has state for `key`.
    pub fn has_service(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key)
    }

    /// Number of services (including empty ones).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of instances shown over all services.
    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    // ---- internals -------------------------------------------------------

    /// Refuses a write of `owner` that adds `added` records to its own (a
    /// negative number: it holds fewer after), holds `ids` in `key` and
    /// removes `removed` entries of its view, if this node would then hold
    /// more than its limits allow.
    fn check_growth<'a>(
        &self,
        owner: &OwnerRef,
        key: &ServiceKey,
        added: isize,
        ids: impl IntoIterator<Item = &'a str>,
        removed: usize,
    ) -> Result<(), LimitHit> {
        let limits = &self.config.limits;
        let state = self.services.get(key);
        if state.is_none() {
            Limits::at_most("services", self.services.len() + 1, limits.services)?;
        }
        if added > 0 {
            let held = self
                .data
                .get(owner)
                .and_then(Held::records)
                .map_or(0, Records::len);
            let after = held.saturating_add_signed(added);
            Limits::at_most("instances_per_session", after, limits.instances_per_session)?;
        }
        // Ids not shown yet would be new entries of the view.
        let shown = state.map_or(0, |s| s.instances().len());
        let new = ids
            .into_iter()
            .filter(|id| state.is_none_or(|s| s.get(id).is_none()))
            .count();
        if new > removed {
            let grown = new - removed;
            let max = limits.instances_per_service;
            Limits::at_most("instances_per_service", shown + grown, max)?;
            Limits::at_most("instances", self.instance_count + grown, limits.instances)?;
        }
        Ok(())
    }

    /// The service's interned key, creating its state if new.
    fn intern(&mut self, key: &ServiceKey) -> Arc<ServiceKey> {
        if let Some(state) = self.services.get(key) {
            return state.key().clone();
        }
        let key = Arc::new(key.clone());
        let state = ServiceState::new(key.clone(), self.revision, self.config.delta_window);
        self.services.insert(key.clone(), state);
        key
    }

    /// [`Self::write`] of one record: the hot path of registration.
    fn write_one(
        &mut self,
        owner: &OwnerRef,
        version: Version,
        key: &Arc<ServiceKey>,
        id: Arc<str>,
        record: Option<Arc<InstanceRecord>>,
    ) -> Change {
        self.mark_dirty(owner, Some(key), [&id]);
        let had = match self.data.get_mut(owner) {
            Some(Held::Live {
                version: v,
                records,
            }) => {
                *v = version;
                let old = match &record {
                    Some(r) => records.insert(key.clone(), id.clone(), r.clone()),
                    None => records.remove(key, &id),
                };
                old.is_some()
            }
            // Only sessions whose data is live write.
            _ => {
                debug_assert!(false, "a write for a session that is not live");
                return unchanged(key, self.services.get(key));
            }
        };
        let data = &self.data;
        let Some(state) = self.services.get_mut(key) else {
            return unchanged(key, None);
        };
        let lookup = |h: &OwnerRef| data.get(h)?.records()?.get(key, &id).cloned();
        let Some(effect) = state.hold(&id, owner, record.as_ref(), had, lookup) else {
            return unchanged(key, Some(state));
        };
        let counts = (&mut self.revision, &mut self.instance_count);
        commit(
            counts,
            &mut self.unpublished,
            state,
            key,
            |state, revision| state.apply_one(revision, id, effect),
        )
    }

    /// Sets `owner`'s records of `key` (Some: now holds it; None: drops it)
    /// at `version`, and derives the view.
    fn write(
        &mut self,
        owner: &OwnerRef,
        version: Version,
        key: &Arc<ServiceKey>,
        updates: Vec<(Arc<str>, Option<Arc<InstanceRecord>>)>,
    ) -> Change {
        self.mark_dirty(owner, Some(key), updates.iter().map(|(id, _)| id));
        let mut had = Vec::with_capacity(updates.len());
        if let Some(Held::Live {
            version: v,
            records,
        }) = self.data.get_mut(owner)
        {
            *v = version;
            for (id, record) in &updates {
                let old = match record {
                    Some(r) => records.insert(key.clone(), id.clone(), r.clone()),
                    None => records.remove(key, id),
                };
                had.push(old.is_some());
            }
        }
        had.resize(updates.len(), false);
        self.reconcile(owner, key, updates, &had)
    }

    fn reconcile_all(
        &mut self,
        owner: &OwnerRef,
        touched: BTreeMap<Arc<ServiceKey>, BTreeSet<Arc<str>>>,
    ) -> Vec<Change> {
        let mut changes = Vec::with_capacity(touched.len());
        for (key, ids) in touched {
            let before = self.services.get(&key).map(ServiceState::revision);
            let records = self.data.get(owner).and_then(Held::records);
            let holding: Vec<(Arc<str>, Option<Arc<InstanceRecord>>)> = ids
                .into_iter()
                .map(|id| {
                    let r = records.and_then(|r| r.get(&key, &id)).cloned();
                    (id, r)
                })
                .collect();
            // What it held of these ids is gone or replaced: each may have
            // been shown from another holder.
            let had = vec![false; holding.len()];
            let change = self.reconcile(owner, &key, holding, &had);
            if before != Some(change.revision) {
                changes.push(change);
            }
        }
        changes
    }

    /// Brings the view entries of the ids in `holding` (with what `owner`
    /// now holds of each) in `key` in line with every holder: one revision
    /// for all.
    fn reconcile(
        &mut self,
        owner: &OwnerRef,
        key: &Arc<ServiceKey>,
        holding: Vec<(Arc<str>, Option<Arc<InstanceRecord>>)>,
        had: &[bool],
    ) -> Change {
        let data = &self.data;
        let Some(state) = self.services.get_mut(key) else {
            return unchanged(key, None);
        };
        // Another holder's record; only asked for ids held twice.
        let held = |h: &OwnerRef, id: &Arc<str>| data.get(h)?.records()?.get(key, id).cloned();
        // (Collected in place: the two element types have one layout.)
        let effects: Vec<(Arc<str>, crate::service::Effect)> = holding
            .into_iter()
            .zip(had)
            .filter_map(|((id, mine), had)| {
                let effect = state.hold(&id, owner, mine.as_ref(), *had, |h| held(h, &id))?;
                Some((id, effect))
            })
            .collect();
        if effects.is_empty() {
            return unchanged(key, Some(state));
        }
        let counts = (&mut self.revision, &mut self.instance_count);
        commit(
            counts,
            &mut self.unpublished,
            state,
            key,
            |state, revision| state.apply(revision, effects),
        )
    }
}

/// Moves `state` to the next revision of the node with `apply` (which
/// returns how many entries it added), keeping the instance count and the
/// list of services to publish.
fn commit(
    (revision, instance_count): (&mut u64, &mut usize),
    unpublished: &mut Vec<Arc<ServiceKey>>,
    state: &mut ServiceState,
    key: &Arc<ServiceKey>,
    apply: impl FnOnce(&mut ServiceState, u64) -> isize,
) -> Change {
    *revision += 1;
    let grown = apply(state, *revision);
    *instance_count = instance_count.wrapping_add_signed(grown);
    if state.mark_unpublished() {
        unpublished.push(key.clone());
    }
    Change {
        key: key.clone(),
        revision: *revision,
    }
}

/// The change of a write that changed nothing: the service stays at its
/// revision (0 if it has no state).
fn unchanged(key: &Arc<ServiceKey>, state: Option<&ServiceState>) -> Change {
    Change {
        key: key.clone(),
        revision: state.map_or(0, ServiceState::revision),
    }
}

/// Normalises an instance and refuses what this node does not keep.
fn checked(instance: Instance) -> Result<Instance, RegistryError> {
    let instance = instance.normalize()?;
    if !instance.ephemeral {
        return Err(RegistryError::Unsupported(
            "persistent instances (ephemeral=false) are not supported yet".into(),
        ));
    }
    Ok(instance)
}

fn record(instance: Instance, owner: &OwnerRef, version: Version) -> Arc<InstanceRecord> {
    Arc::new(InstanceRecord {
        hash: instance_hash(&instance),
        instance,
        owner: owner.clone(),
        version,
    })
}

/// The last change of each service, in order.
fn last_per_service(mut changes: Vec<Change>) -> Vec<Change> {
    changes.reverse();
    let mut seen = std::collections::HashSet::new();
    changes.retain(|c| seen.insert(c.key.clone()));
    changes.reverse();
    changes
}

fn unknown_instance(key: &ServiceKey, id: &str) -> RegistryError {
    RegistryError::UnknownInstance {
        service: key.to_string(),
        id: id.to_owned(),
    }
}
