//! The replication rules of one cluster member (Distro-style, see
//! `docs/replication.md`), sans-IO: a local write, a message from a peer, a
//! failed send or the passing of time go in with the current time; effects
//! (messages to send, view changes to publish, readiness, member states)
//! come out. It owns the bookkeeping of replication: what each peer still
//! needs, the batch in flight to each, when each replica was last vouched
//! for by its origin, the snapshot being loaded. The data is the
//! [`Registry`]'s, passed in by the caller; nothing here sends or sleeps.

pub mod members;
pub mod message;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as HashMap;

use crate::held::{Held, SessionDelta, SessionState, Touched};
use crate::model::{NodeName, Owner, OwnerRef, SessionId, Version};
use crate::registry::{Change, Registry};
pub use members::{MemberState, rendezvous};
pub use message::{Envelope, Message};

/// Tunables of replication. Every interval is configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicationConfig {
    /// How often each member sends each peer the digest of its sessions.
    pub verify_interval: Duration,
    /// A replica its origin has not listed in a digest for this many
    /// rounds is dropped (and its removal pushed).
    pub verify_rounds: u32,
    /// A batch not acknowledged this long is sent again.
    pub ack_timeout: Duration,
    /// First wait before sending again to a peer after a failure...
    pub retry_min: Duration,
    /// ... doubling up to this.
    pub retry_max: Duration,
    /// Most sessions in one sync batch or snapshot chunk.
    pub batch_sessions: usize,
    /// Most instances in one sync batch or snapshot chunk (a session larger
    /// than this still goes, alone).
    pub batch_instances: usize,
    /// Most bytes (by [`SessionState::wire_size`]) in one sync batch or
    /// snapshot chunk (a session larger than this still goes, alone).
    pub batch_bytes: usize,
    /// The largest message a peer accepts: a session larger than this
    /// (less a margin for the envelope) is not sent at all, and counted.
    pub message_bytes: usize,
    /// Most sessions listed in one verify message.
    pub verify_chunk: usize,
    /// A snapshot source silent this long is given up for another.
    pub snapshot_timeout: Duration,
    /// A starting member that could load no snapshot by then serves alone.
    pub ready_alone_after: Duration,
    /// A peer silent this long is suspect...
    pub suspect_after: Duration,
    /// ... and this long, down.
    pub down_after: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        let verify = Duration::from_secs(5);
        Self {
            verify_interval: verify,
            verify_rounds: 3,
            ack_timeout: Duration::from_secs(2),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            batch_sessions: 1024,
            batch_instances: 16_384,
            batch_bytes: 4 << 20,
            message_bytes: 64 << 20,
            verify_chunk: 8192,
            snapshot_timeout: Duration::from_secs(5),
            ready_alone_after: Duration::from_secs(15),
            suspect_after: verify + verify / 2,
            down_after: verify * 3,
        }
    }
}

/// What the caller must carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send this message to this member.
    Send(NodeName, Envelope),
    /// These services' views changed: publish them and push.
    Changed(Vec<Change>),
    /// The member has loaded its snapshot (or has nothing to load): it may
    /// serve discovery and push from now on.
    Ready,
    /// A member's state changed.
    Member(NodeName, MemberState),
    /// A peer acknowledged a sync batch: the oldest change in it took this
    /// long from the local write to being applied there (the replication
    /// lag, as seen from here; a batch sent again counts from the first
    /// try).
    Acked(NodeName, Duration),
}

/// Counters of what replication did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sync batches sent.
    pub batches_sent: u64,
    /// Session states sent in them (whole or as deltas).
    pub sessions_sent: u64,
    /// Of those, deltas.
    pub deltas_sent: u64,
    /// Deltas received that could not be applied (the session was not
    /// held at their base): asked for whole.
    pub deltas_wanted: u64,
    /// Instances sent in them.
    pub instances_sent: u64,
    /// Session states received and applied (newer than held).
    pub sessions_applied: u64,
    /// Batches given up on (failed or unacknowledged) and queued again.
    pub batches_failed: u64,
    /// Verify messages sent.
    pub verifies_sent: u64,
    /// Sessions a peer's verify listed that this member lacked or held
    /// older (each one a repair).
    pub verify_misses: u64,
    /// Replicas dropped because their origin stopped listing them.
    pub unverified_dropped: u64,
    /// Snapshots loaded from a peer.
    pub snapshot_loads: u64,
    /// Session states loaded from snapshots.
    pub snapshot_sessions: u64,
    /// Session states refused as invalid.
    pub invalid: u64,
    /// Session states not sent because they are larger than a message may
    /// be (they stay on their origin only).
    pub too_large: u64,
    /// Sync batches a peer refused (not retried until a verify asks again).
    pub refused: u64,
    /// Messages from nodes that are not members, or from a member's
    /// earlier life, ignored.
    pub ignored: u64,
}

/// What this member knows of one peer.
#[derive(Debug)]
pub struct Peer {
    /// Its life, from its messages.
    pub incarnation: Option<u64>,
    /// When anything was last heard from it.
    pub last_heard: Option<Instant>,
    /// When it last sent a verify.
    pub last_verify: Option<Instant>,
    /// Its state.
    pub state: MemberState,
    /// This member's sessions whose state it still needs, with the
    /// instances written since it last got them, merged per session (only
    /// the latest state goes).
    pending: HashMap<OwnerRef, Touched>,
    /// The version of each of this member's sessions it acknowledged last
    /// (what a delta can start from). Forgotten when it restarts, refuses
    /// a batch or asks for a session whole.
    acked: HashMap<OwnerRef, Version>,
    /// The batch sent and not yet acknowledged (one at a time per peer;
    /// changes meanwhile gather in `pending`).
    in_flight: Option<InFlight>,
    /// No batch before this, after a failure.
    retry_at: Option<Instant>,
    /// A send to it failed and nothing was heard from it since.
    unreachable: bool,
    /// The current wait after failures.
    backoff: Duration,
    /// Since when the oldest change in `pending` waits.
    pending_since: Option<Instant>,
}

impl Peer {
    fn new() -> Self {
        Self {
            incarnation: None,
            last_heard: None,
            last_verify: None,
            state: MemberState::Down,
            pending: HashMap::default(),
            acked: HashMap::default(),
            in_flight: None,
            retry_at: None,
            unreachable: false,
            backoff: Duration::ZERO,
            pending_since: None,
        }
    }

    /// Sessions waiting to be sent to it (not counting a batch in flight).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Queues the sessions of a batch given up on again.
    fn requeue(&mut self, f: InFlight) {
        for (owner, touched, _) in f.owners {
            self.queue(owner, touched);
        }
        self.pending_since = Some(self.pending_since.map_or(f.since, |t| t.min(f.since)));
    }

    /// Queues what `touched` names of `owner`.
    fn queue(&mut self, owner: OwnerRef, touched: Touched) {
        match self.pending.entry(owner) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().merge(touched),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(touched);
            }
        }
    }
}

/// The order one peer's snapshot stream walks (see
/// [`Replicator::snapshot_chunk`]).
#[derive(Debug)]
struct SnapshotOrder {
    /// When a chunk of it was last asked for.
    used: Instant,
    /// The sessions held at the start, sorted.
    owners: Vec<OwnerRef>,
}

#[derive(Debug)]
struct InFlight {
    batch: u64,
    /// Each session sent, what was pending of it, and the version sent
    /// (none: its end).
    owners: Vec<(OwnerRef, Touched, Option<Version>)>,
    deadline: Instant,
    /// When the oldest change in it was made.
    since: Instant,
}

/// A snapshot being loaded at start.
#[derive(Debug)]
struct Loading {
    /// Since when no source has sent a chunk (the start, at first).
    quiet_since: Instant,
    /// The peer streaming it, and when it is given up unless it answers.
    source: Option<(NodeName, Instant)>,
    /// Where the next chunk starts.
    cursor: Option<Owner>,
    /// Peers that answered that they are loading too.
    loading_peers: BTreeSet<NodeName>,
    /// Peers that failed this round.
    failed: BTreeSet<NodeName>,
    /// No new round of asking before this.
    next_round: Instant,
    /// Whether any chunk came in.
    got_any: bool,
    /// The cursor of the last request made to the source (none: the
    /// first); chunks are asked for in cursor order.
    asked: Option<Owner>,
}

/// The replication state machine of one member.
#[derive(Debug)]
pub struct Replicator {
    me: NodeName,
    incarnation: u64,
    config: ReplicationConfig,
    peers: BTreeMap<NodeName, Peer>,
    /// When each replica (another origin's live session) was last listed
    /// by its origin's verify, or received.
    renewed: HashMap<OwnerRef, Instant>,
    /// This member's sessions found too large to send, at the version
    /// found: left out of digests (peers would ask for them each round).
    too_large: HashMap<OwnerRef, Version>,
    next_batch: u64,
    next_verify: Instant,
    loading: Option<Loading>,
    /// The sessions held when each peer loading a snapshot from this
    /// member asked for its first chunk, in owner order: later chunks
    /// continue in it instead of sorting everything held again.
    snapshot_orders: HashMap<NodeName, SnapshotOrder>,
    stats: Stats,
    effects: Vec<Effect>,
}

impl Replicator {
    /// The replicator of member `me` (in its life `incarnation`) among
    /// `members` (`me` may be listed; it is skipped). It starts loading;
    /// the first [`Self::tick`] asks a peer for its snapshot, or (with no
    /// peer) makes it ready. Tells `registry` to track local writes.
    pub fn new(
        me: NodeName,
        incarnation: u64,
        members: impl IntoIterator<Item = NodeName>,
        config: ReplicationConfig,
        registry: &mut Registry,
        now: Instant,
    ) -> Self {
        let peers: BTreeMap<NodeName, Peer> = members
            .into_iter()
            .filter(|m| *m != me)
            .map(|m| (m, Peer::new()))
            .collect();
        if !peers.is_empty() {
            registry.track_replication();
        }
        Self {
            me,
            incarnation,
            config,
            peers,
            renewed: HashMap::default(),
            too_large: HashMap::default(),
            next_batch: 0,
            // The first digest goes out at once: it tells peers this life
            // exists.
            next_verify: now,
            loading: Some(Loading {
                quiet_since: now,
                source: None,
                cursor: None,
                loading_peers: BTreeSet::new(),
                failed: BTreeSet::new(),
                next_round: now,
                got_any: false,
                asked: None,
            }),
            snapshot_orders: HashMap::default(),
            stats: Stats::default(),
            effects: Vec::new(),
        }
    }

    /// This member's name.
    pub fn me(&self) -> &NodeName {
        &self.me
    }

    /// Whether the snapshot is loaded (or there was none to load).
    pub fn is_ready(&self) -> bool {
        self.loading.is_none()
    }

    /// Every peer and what is known of it.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeName, &Peer)> {
        self.peers.iter()
    }

    /// What replication did so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The config.
    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    /// Time passes (call it after local writes, and at least every few
    /// tens of milliseconds): local changes go out, failed batches are
    /// retried, the verify round runs when due, replicas nobody vouches for
    /// are dropped, the snapshot load moves on, member states follow.
    pub fn tick(&mut self, registry: &mut Registry, now: Instant) -> Vec<Effect> {
        let names: Vec<NodeName> = self.peers.keys().cloned().collect();
        for name in &names {
            self.update_state(name, now);
            let timed_out = self.peers[name]
                .in_flight
                .as_ref()
                .is_some_and(|f| now >= f.deadline);
            if timed_out {
                self.fail(name, now);
            }
            self.try_send(registry, name, now);
        }
        if now >= self.next_verify {
            self.next_verify = now + self.config.verify_interval;
            // Snapshot streams their loader gave up (found another
            // source, or died).
            let idle = self.config.snapshot_timeout * 2;
            self.snapshot_orders
                .retain(|_, o| now.saturating_duration_since(o.used) < idle);
            self.send_verify(registry);
            self.drop_unverified(registry, now);
        }
        self.step_loading(now);
        std::mem::take(&mut self.effects)
    }

    /// A message from a peer.
    pub fn receive(
        &mut self,
        registry: &mut Registry,
        envelope: Envelope,
        now: Instant,
    ) -> Vec<Effect> {
        let Envelope {
            from,
            incarnation,
            body,
        } = envelope;
        let Some(peer) = self.peers.get_mut(&from) else {
            self.stats.ignored += 1;
            return Vec::new();
        };
        match peer.incarnation {
            // A lower life from a member silent for `down_after`: it lost
            // its count (a wiped data directory), and is taken as its new
            // life. Otherwise it is from a life that is over: what it asks
            // or acknowledges is not this life's business.
            Some(known) if incarnation < known && peer.state != MemberState::Down => {
                self.stats.ignored += 1;
                return Vec::new();
            }
            Some(known) if incarnation != known => {
                // It restarted: a batch in flight went to the old life,
                // and what it held is gone.
                peer.incarnation = Some(incarnation);
                peer.acked.clear();
                if let Some(f) = peer.in_flight.take() {
                    peer.requeue(f);
                }
                peer.retry_at = None;
                peer.backoff = Duration::ZERO;
                if incarnation < known {
                    // What its lost lives wrote outranks anything this
                    // life writes: forget it (live or ended), or its new
                    // sessions would be refused or hidden by it.
                    self.forget_lives_above(registry, &from, incarnation);
                }
            }
            Some(_) => {}
            None => peer.incarnation = Some(incarnation),
        }
        let peer = self.peers.get_mut(&from).expect("checked above");
        // Heard again after a failure or a silence (a healed partition):
        // what waits for it goes at once, not after the back-off, and a
        // batch in flight (whose ack the partition may have lost) goes
        // again with it, unless this is that ack.
        if peer.unreachable || peer.state != MemberState::Up {
            peer.retry_at = None;
            peer.backoff = Duration::ZERO;
            let acked = matches!(&body, Message::SyncAck { batch, .. }
                if peer.in_flight.as_ref().is_some_and(|f| f.batch == *batch));
            if !acked && let Some(f) = peer.in_flight.take() {
                peer.requeue(f);
            }
        }
        peer.last_heard = Some(now);
        peer.unreachable = false;
        self.update_state(&from, now);
        match body {
            Message::Sync {
                batch,
                sessions,
                deltas,
            } => {
                let sessions = sessions.into_iter().map(|(o, s)| (o, s, now)).collect();
                self.apply(registry, sessions, false);
                let wanted = self.apply_deltas(registry, &from, deltas, now);
                self.send(&from, Message::SyncAck { batch, wanted });
            }
            Message::SyncAck { batch, wanted } => {
                let peer = self.peer(&from);
                if let Some(f) = peer.in_flight.take_if(|f| f.batch == batch) {
                    for (owner, _, version) in f.owners {
                        match version {
                            Some(v) => peer.acked.insert(owner, v),
                            None => peer.acked.remove(&owner),
                        };
                    }
                    self.want_whole(registry, &from, wanted, now);
                    let peer = self.peer(&from);
                    peer.backoff = Duration::ZERO;
                    peer.retry_at = None;
                    let lag = now.saturating_duration_since(f.since);
                    self.effects.push(Effect::Acked(from.clone(), lag));
                }
                self.try_send(registry, &from, now);
            }
            Message::Verify { sessions } => {
                self.peer(&from).last_verify = Some(now);
                let wanted = self.check_digest(registry, &from, sessions, now);
                if !wanted.is_empty() {
                    self.stats.verify_misses += wanted.len() as u64;
                    self.send(&from, Message::VerifyAnswer { wanted });
                }
            }
            Message::VerifyAnswer { wanted } => {
                self.want_whole(registry, &from, wanted, now);
                self.try_send(registry, &from, now);
            }
            Message::SnapshotRequest { after } => {
                let answer = if self.loading.is_some() {
                    Message::Loading
                } else {
                    self.snapshot_chunk(registry, &from, after.as_ref(), now)
                };
                self.send(&from, answer);
            }
            Message::SnapshotChunk {
                sessions,
                next,
                after,
            } => {
                if self.chunk_expected(&from, after.as_ref()) {
                    self.stats.snapshot_sessions += sessions.len() as u64;
                    self.load(registry, sessions, now);
                    let timeout = self.config.snapshot_timeout;
                    let loading = self.loading.as_mut().expect("loading");
                    loading.got_any = true;
                    loading.quiet_since = now;
                    match next {
                        None => {
                            self.stats.snapshot_loads += 1;
                            self.finish_loading();
                        }
                        Some(cursor) => {
                            loading.cursor = Some(cursor.clone());
                            loading.source = Some((from.clone(), now + timeout));
                            // Not asked for yet (requests go in cursor
                            // order: one at or past it was made).
                            let asked = loading.asked.as_ref().is_some_and(|a| *a >= cursor);
                            if !asked {
                                loading.asked = Some(cursor.clone());
                                self.send(
                                    &from,
                                    Message::SnapshotRequest {
                                        after: Some(cursor),
                                    },
                                );
                            }
                        }
                    }
                }
            }
            Message::Loading => {
                if let Some(l) = &mut self.loading {
                    l.loading_peers.insert(from.clone());
                    if l.source.as_ref().is_some_and(|(s, _)| *s == from) {
                        l.source = None;
                    }
                }
                self.step_loading(now);
            }
        }
        std::mem::take(&mut self.effects)
    }

    /// `to` refused sync batch `batch` (it cannot decode it, or it is too
    /// large, or it does not take this member's messages): the batch is not
    /// sent again; its sessions go again only when a verify of `to` asks
    /// for them, so a message that cannot pass is not resent in a loop.
    pub fn send_refused(&mut self, to: &str, batch: u64) -> Vec<Effect> {
        let Some(peer) = self.peers.get_mut(to) else {
            return Vec::new();
        };
        if let Some(f) = peer.in_flight.take_if(|f| f.batch == batch) {
            // What it holds of them is not known: they go whole next.
            for (owner, ..) in f.owners {
                peer.acked.remove(&owner);
            }
            self.stats.refused += 1;
        }
        std::mem::take(&mut self.effects)
    }

    /// A snapshot chunk arrived and will be handed to [`Self::receive`]
    /// (perhaps after earlier ones still being applied): if it answers the
    /// last request made to its source and more follow, the next one is
    /// asked for now, so that the source prepares it while chunks are
    /// applied. (Optional: without it, the next chunk is asked for once
    /// this one is applied. The caller must hand chunks to `receive` in
    /// the order they arrived.)
    pub fn prefetch(&mut self, envelope: &Envelope) -> Vec<Effect> {
        if let Message::SnapshotChunk {
            next: Some(next),
            after,
            ..
        } = &envelope.body
            && let Some(l) = &mut self.loading
            && l.source.as_ref().is_some_and(|(s, _)| *s == envelope.from)
            && l.asked.as_ref() == after.as_ref()
        {
            l.asked = Some(next.clone());
            let after = Some(next.clone());
            self.send(&envelope.from, Message::SnapshotRequest { after });
        }
        std::mem::take(&mut self.effects)
    }

    /// A send to `to` failed (the peer is unreachable on every address):
    /// its batch in flight is queued again and sending waits; a snapshot
    /// it was streaming is asked of another.
    pub fn send_failed(&mut self, to: &str, now: Instant) -> Vec<Effect> {
        let Some(name) = self.peers.get_key_value(to).map(|(n, _)| n.clone()) else {
            return Vec::new();
        };
        self.peer(&name).unreachable = true;
        self.update_state(&name, now);
        if self.peers[&name].in_flight.is_some() {
            self.fail(&name, now);
        }
        if let Some(l) = &mut self.loading
            && l.source.as_ref().is_some_and(|(s, _)| *s == name)
        {
            l.source = None;
            l.failed.insert(name);
            self.step_loading(now);
        }
        std::mem::take(&mut self.effects)
    }

    // ---- internals -------------------------------------------------------

    /// Forgets every session state held of `origin` written in a life above
    /// `incarnation` (the member came back with a lower one).
    fn forget_lives_above(&mut self, registry: &mut Registry, origin: &NodeName, incarnation: u64) {
        let stale: Vec<OwnerRef> = registry
            .held_sessions()
            .filter(|(o, h)| o.origin == *origin && h.version().incarnation > incarnation)
            .map(|(o, _)| o.clone())
            .collect();
        let mut changes = Vec::new();
        for owner in stale {
            self.renewed.remove(&owner);
            changes.extend(registry.forget_session(&owner));
        }
        if !changes.is_empty() {
            self.effects.push(Effect::Changed(changes));
        }
    }

    /// Whether a chunk from `from` answering the request made with
    /// `after` is the one to load next: from the source being streamed,
    /// and the answer to the request that follows what is loaded (a late
    /// answer to an earlier request, or one to a source given up and
    /// asked again from the start, is not).
    fn chunk_expected(&self, from: &NodeName, after: Option<&Owner>) -> bool {
        self.loading.as_ref().is_some_and(|l| {
            l.source.as_ref().is_some_and(|(s, _)| s == from) && l.cursor.as_ref() == after
        })
    }

    fn peer(&mut self, name: &str) -> &mut Peer {
        self.peers.get_mut(name).expect("a configured peer")
    }

    fn send(&mut self, to: &NodeName, body: Message) {
        self.effects.push(Effect::Send(
            to.clone(),
            Envelope {
                from: self.me.clone(),
                incarnation: self.incarnation,
                body,
            },
        ));
    }

    fn update_state(&mut self, name: &NodeName, now: Instant) {
        let (suspect, down) = (self.config.suspect_after, self.config.down_after);
        let peer = self.peer(name);
        let state = match MemberState::from_silence(peer.last_heard, now, suspect, down) {
            // A failed send makes it suspect; only traffic makes it up again.
            MemberState::Up if peer.unreachable => MemberState::Suspect,
            s => s,
        };
        if peer.state != state {
            peer.state = state;
            self.effects.push(Effect::Member(name.clone(), state));
        }
    }

    /// Gives up the batch in flight to `name`: its sessions are queued
    /// again, and sending waits a back-off.
    fn fail(&mut self, name: &NodeName, now: Instant) {
        let (min, max) = (self.config.retry_min, self.config.retry_max);
        let peer = self.peer(name);
        if let Some(f) = peer.in_flight.take() {
            peer.requeue(f);
        }
        peer.backoff = (peer.backoff * 2).clamp(min, max);
        peer.retry_at = Some(now + peer.backoff);
        self.stats.batches_failed += 1;
    }

    /// Takes the sessions written since the last call into what every
    /// peer needs.
    fn gather(&mut self, registry: &mut Registry, now: Instant) {
        let dirty = registry.take_dirty();
        if dirty.is_empty() {
            return;
        }
        let mut peers = self.peers.values_mut().peekable();
        while let Some(peer) = peers.next() {
            peer.pending_since.get_or_insert(now);
            if peers.peek().is_none() {
                // The last peer takes the originals.
                for (owner, touched) in dirty {
                    peer.queue(owner, touched);
                }
                break;
            }
            for (owner, touched) in &dirty {
                peer.queue(owner.clone(), touched.clone());
            }
        }
    }

    /// `name` needs these sessions of this member whole (it lacks them or
    /// could not apply a delta of them).
    fn want_whole(
        &mut self,
        registry: &Registry,
        name: &NodeName,
        wanted: Vec<SessionId>,
        now: Instant,
    ) {
        let me = self.me.clone();
        let peer = self.peer(name);
        for session in wanted {
            let owner = Owner {
                origin: me.clone(),
                session,
            };
            peer.acked.remove(&owner);
            if let Some((owner, _)) = registry.held_entry(&owner) {
                peer.queue(owner.clone(), Touched::whole());
                peer.pending_since.get_or_insert(now);
            }
        }
    }

    /// Sends `name` the next batch of what it needs, unless one is in
    /// flight or a back-off runs: each session as a delta from the version
    /// `name` acknowledged last, or whole when that is not known.
    fn try_send(&mut self, registry: &mut Registry, name: &NodeName, now: Instant) {
        self.gather(registry, now);
        let ack_timeout = self.config.ack_timeout;
        let mut budget = Budget::new(&self.config);
        let peer = self.peers.get_mut(name).expect("a configured peer");
        if peer.in_flight.is_some()
            || peer.pending.is_empty()
            || peer.retry_at.is_some_and(|t| now < t)
        {
            return;
        }
        let mut taken = Vec::new();
        let mut sessions = Vec::new();
        let mut deltas = Vec::new();
        for (owner, touched) in peer.pending.iter() {
            let base = peer.acked.get(owner).copied();
            let delta = base.and_then(|b| registry.session_delta(owner, b, touched));
            if let Some(delta) = delta {
                match budget.admit(delta.wire_size(), delta.len()) {
                    Admit::Full => break,
                    Admit::Yes => {
                        taken.push((owner.clone(), Some(delta.version)));
                        deltas.push((Owner::clone(owner), delta));
                        continue;
                    }
                    // Its whole state may still fit below.
                    Admit::TooLarge => {}
                }
            }
            // A tombstone forgotten since: nothing to say (the peer drops
            // the session when no digest lists it).
            let Some(state) = registry.session_state(owner) else {
                taken.push((owner.clone(), None));
                continue;
            };
            if base.is_some_and(|b| b >= state.version()) {
                // It has this already.
                taken.push((owner.clone(), base));
                continue;
            }
            match budget.admit(state.wire_size(), state.len()) {
                Admit::Full => break,
                Admit::Yes => {
                    let version = matches!(state, SessionState::Live(_)).then(|| state.version());
                    taken.push((owner.clone(), version));
                    sessions.push((Owner::clone(owner), state));
                }
                Admit::TooLarge => {
                    let v = state.version();
                    if self.too_large.insert(owner.clone(), v) != Some(v) {
                        self.stats.too_large += 1;
                    }
                    // What changed since the peer's version is dropped
                    // with it: a later delta from that version would
                    // miss it, so the next send is whole.
                    peer.acked.remove(owner);
                    taken.push((owner.clone(), None));
                }
            }
        }
        let mut owners = Vec::with_capacity(taken.len());
        for (owner, version) in taken {
            let touched = peer.pending.remove(&owner).unwrap_or_default();
            owners.push((owner, touched, version));
        }
        let instances = budget.instances;
        let since = if peer.pending.is_empty() {
            peer.pending_since.take()
        } else {
            peer.pending_since
        }
        .unwrap_or(now);
        if sessions.is_empty() && deltas.is_empty() {
            // Nothing went; what was taken needs nothing more.
            for (owner, _, version) in owners {
                if version.is_none() {
                    peer.acked.remove(&owner);
                }
            }
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        peer.in_flight = Some(InFlight {
            batch,
            owners,
            deadline: now + ack_timeout,
            since,
        });
        self.stats.batches_sent += 1;
        self.stats.sessions_sent += (sessions.len() + deltas.len()) as u64;
        self.stats.deltas_sent += deltas.len() as u64;
        self.stats.instances_sent += instances as u64;
        let body = Message::Sync {
            batch,
            sessions,
            deltas,
        };
        self.send(name, body);
    }

    /// Applies deltas of `from`'s sessions and returns those that could
    /// not be applied here (to ask for whole).
    fn apply_deltas(
        &mut self,
        registry: &mut Registry,
        from: &NodeName,
        deltas: Vec<(Owner, SessionDelta)>,
        now: Instant,
    ) -> Vec<SessionId> {
        let mut changes = Vec::new();
        let mut wanted = Vec::new();
        for (owner, delta) in deltas {
            // Only a session's origin sends its deltas.
            if owner.origin != *from {
                self.stats.invalid += 1;
                continue;
            }
            match registry.apply_delta(&owner, delta) {
                Ok(Some(c)) => {
                    changes.extend(c);
                    self.stats.sessions_applied += 1;
                    let t = self.renewed.entry(Arc::new(owner)).or_insert(now);
                    *t = (*t).max(now);
                }
                Ok(None) => {
                    self.stats.deltas_wanted += 1;
                    wanted.push(owner.session);
                }
                Err(_) => self.stats.invalid += 1,
            }
        }
        if !changes.is_empty() {
            self.effects.push(Effect::Changed(changes));
        }
        wanted
    }

    /// Loads a snapshot chunk: each replica keeps the age it had at the
    /// source. One its origin has not vouched for in `verify_rounds`
    /// rounds (or whose age this clock cannot go back to) is left out: it
    /// would be dropped at once, and if its origin lives, its next digest
    /// asks for it.
    fn load(
        &mut self,
        registry: &mut Registry,
        sessions: Vec<(Owner, SessionState, Duration)>,
        now: Instant,
    ) {
        let timeout = self.config.verify_interval * self.config.verify_rounds;
        let sessions = sessions
            .into_iter()
            .filter_map(|(o, s, age)| match s {
                SessionState::Gone(_) => Some((o, s, now)),
                SessionState::Live(_) if age >= timeout => None,
                SessionState::Live(_) => Some((o, s, now.checked_sub(age)?)),
            })
            .collect();
        self.apply(registry, sessions, true);
    }

    /// Applies session states from a peer (a sync or a snapshot chunk),
    /// each vouched for by its origin at the time given.
    fn apply(
        &mut self,
        registry: &mut Registry,
        sessions: Vec<(Owner, SessionState, Instant)>,
        snapshot: bool,
    ) {
        let mut changes = Vec::new();
        for (owner, state, now) in sessions {
            if owner.origin == self.me {
                continue;
            }
            let live = matches!(state, SessionState::Live(_));
            let before = registry.held(&owner).map(Held::version);
            match registry.apply_state(owner.clone(), state, now) {
                Ok(c) => changes.extend(c),
                Err(_) => {
                    self.stats.invalid += 1;
                    continue;
                }
            }
            let after = registry.held(&owner).map(Held::version);
            if after != before && !snapshot {
                self.stats.sessions_applied += 1;
            }
            let owner = Arc::new(owner);
            if live {
                // Never older than what is known already.
                let t = self.renewed.entry(owner).or_insert(now);
                *t = (*t).max(now);
            } else {
                self.renewed.remove(&owner);
            }
        }
        if !changes.is_empty() {
            self.effects.push(Effect::Changed(changes));
        }
    }

    /// Renews the replicas a peer's digest lists and returns those this
    /// member lacks or holds older.
    fn check_digest(
        &mut self,
        registry: &Registry,
        from: &NodeName,
        sessions: Vec<(SessionId, Version)>,
        now: Instant,
    ) -> Vec<SessionId> {
        let mut wanted = Vec::new();
        for (session, version) in sessions {
            let owner = Owner {
                origin: from.clone(),
                session,
            };
            match registry.held(&owner) {
                Some(Held::Live { version: v, .. }) if *v >= version => {
                    self.renewed.insert(Arc::new(owner), now);
                }
                // Ended here at or after that version: the end is on its
                // way to the origin's digest too.
                Some(Held::Gone { version: v, .. }) if *v >= version => {}
                _ => wanted.push(owner.session),
            }
        }
        wanted
    }

    /// Sends every peer the digest of this member's live sessions.
    fn send_verify(&mut self, registry: &Registry) {
        let too_large = &mut self.too_large;
        too_large.retain(|o, v| registry.held(o).is_some_and(|h| h.version() == *v));
        let mut digest: Vec<(SessionId, Version)> = registry
            .held_sessions()
            .filter(|(o, h)| o.origin == self.me && matches!(h, Held::Live { .. }))
            .filter(|(o, h)| too_large.get(*o) != Some(&h.version()))
            .map(|(o, h)| (o.session.clone(), h.version()))
            .collect();
        digest.sort_unstable();
        let chunk = self.config.verify_chunk.max(1);
        let names: Vec<NodeName> = self.peers.keys().cloned().collect();
        for name in names {
            if digest.is_empty() {
                // Still sent: it tells the peer this member is alive.
                self.send(&name, Message::Verify { sessions: vec![] });
                self.stats.verifies_sent += 1;
            }
            for part in digest.chunks(chunk) {
                let sessions = part.to_vec();
                self.send(&name, Message::Verify { sessions });
                self.stats.verifies_sent += 1;
            }
        }
    }

    /// Drops the replicas their origin has not vouched for in
    /// `verify_rounds` rounds.
    fn drop_unverified(&mut self, registry: &mut Registry, now: Instant) {
        let timeout = self.config.verify_interval * self.config.verify_rounds;
        // Replicas that came in some other way start their clock now.
        for (owner, held) in registry.held_sessions() {
            if owner.origin != self.me && matches!(held, Held::Live { .. }) {
                self.renewed.entry(owner.clone()).or_insert(now);
            }
        }
        let stale: Vec<OwnerRef> = self
            .renewed
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= timeout)
            .map(|(o, _)| o.clone())
            .collect();
        let mut changes = Vec::new();
        for owner in stale {
            self.renewed.remove(&owner);
            if matches!(registry.held(&owner), Some(Held::Live { .. })) {
                self.stats.unverified_dropped += 1;
                changes.extend(registry.forget_session(&owner));
            }
        }
        if !changes.is_empty() {
            self.effects.push(Effect::Changed(changes));
        }
    }

    /// The chunk of this member's snapshot for `to` after `after`: the
    /// sessions held, in owner order. The order is taken when `to` asks
    /// for the first chunk and kept for the rest of its stream: sessions
    /// that start meanwhile reach `to` by sync from their origin, and
    /// those that end meanwhile are skipped.
    fn snapshot_chunk(
        &mut self,
        registry: &Registry,
        to: &NodeName,
        after: Option<&Owner>,
        now: Instant,
    ) -> Message {
        let fresh = after.is_none() || !self.snapshot_orders.contains_key(to);
        if fresh {
            let mut owners: Vec<OwnerRef> =
                registry.held_sessions().map(|(o, _)| o.clone()).collect();
            owners.sort_unstable();
            let order = SnapshotOrder { used: now, owners };
            self.snapshot_orders.insert(to.clone(), order);
        }
        let order = self.snapshot_orders.get_mut(to).expect("inserted above");
        order.used = now;
        let start = after.map_or(0, |a| order.owners.partition_point(|o| **o <= *a));
        let max = self.config.batch_sessions.max(1);
        let mut budget = Budget::new(&self.config);
        let mut sessions = Vec::new();
        let mut last = None;
        for owner in order.owners[start..].iter().take(max) {
            if let Some(state) = registry.session_state(owner) {
                match budget.admit(state.wire_size(), state.len()) {
                    Admit::Full => break,
                    // Too large for any message: left out of the snapshot too.
                    Admit::TooLarge => {}
                    Admit::Yes => {
                        let age = self
                            .renewed
                            .get(owner)
                            .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t));
                        sessions.push((Owner::clone(owner), state, age));
                    }
                }
            }
            last = Some(owner);
        }
        let more = last.is_some_and(|l| order.owners.last() != Some(l));
        let next = if more {
            last.map(|o| Owner::clone(o))
        } else {
            self.snapshot_orders.remove(to);
            None
        };
        Message::SnapshotChunk {
            sessions,
            next,
            after: after.cloned(),
        }
    }

    fn finish_loading(&mut self) {
        if self.loading.take().is_some() {
            self.effects.push(Effect::Ready);
        }
    }

    /// Moves the snapshot load on: asks a source, gives up a silent one,
    /// or ends the load (no peer, every peer loading too, or waited long
    /// enough alone).
    fn step_loading(&mut self, now: Instant) {
        let Some(l) = &mut self.loading else {
            return;
        };
        // Alone: no peer, or none sent a chunk for that long (a source
        // that streams keeps the load going however long it takes).
        if self.peers.is_empty()
            || now.saturating_duration_since(l.quiet_since) >= self.config.ready_alone_after
        {
            self.finish_loading();
            return;
        }
        if let Some((source, deadline)) = &l.source {
            if now < *deadline {
                return;
            }
            l.failed.insert(source.clone());
            l.source = None;
        }
        // Every peer is starting too (the whole cluster restarts): nobody
        // has anything to load.
        if !l.got_any && l.loading_peers.len() == self.peers.len() {
            self.finish_loading();
            return;
        }
        let untried = |n: &&NodeName| !l.loading_peers.contains(*n) && !l.failed.contains(*n);
        let pick = self
            .peers
            .iter()
            .filter(|(n, _)| untried(n))
            .min_by_key(|(_, p)| p.state)
            .map(|(n, _)| n.clone());
        let pick = match pick {
            Some(p) => p,
            None if now >= l.next_round => {
                // Everyone was tried: start another round after a wait.
                l.failed.clear();
                l.loading_peers.clear();
                l.next_round = now + self.config.snapshot_timeout;
                return;
            }
            None => return,
        };
        l.source = Some((pick.clone(), now + self.config.snapshot_timeout));
        // A new source starts from the beginning: its data is not the
        // last one's.
        l.cursor = None;
        l.asked = None;
        self.send(&pick, Message::SnapshotRequest { after: None });
    }
}

/// What fits in one sync batch or snapshot chunk.
struct Budget {
    sessions: usize,
    instances: usize,
    bytes: usize,
    max_sessions: usize,
    max_instances: usize,
    max_bytes: usize,
    /// No session larger than this is sent at all.
    largest: usize,
}

enum Admit {
    /// Taken.
    Yes,
    /// The batch is full: it goes without this one.
    Full,
    /// Larger than any message may be: never sent.
    TooLarge,
}

/// Room left in a message for the envelope and the batch's own fields.
const ENVELOPE_MARGIN: usize = 4096;

impl Budget {
    fn new(config: &ReplicationConfig) -> Self {
        Self {
            sessions: 0,
            instances: 0,
            bytes: 0,
            max_sessions: config.batch_sessions.max(1),
            max_instances: config.batch_instances,
            max_bytes: config.batch_bytes,
            largest: config.message_bytes.saturating_sub(ENVELOPE_MARGIN),
        }
    }

    /// Takes a state or delta of `size` bytes and `len` instances if it
    /// fits; the first session of a batch always fits
    /// unless it is larger than a message may be.
    fn admit(&mut self, size: usize, len: usize) -> Admit {
        if size > self.largest {
            return Admit::TooLarge;
        }
        if self.sessions > 0
            && (self.sessions >= self.max_sessions
                || self.instances + len > self.max_instances
                || self.bytes + size > self.max_bytes)
        {
            return Admit::Full;
        }
        self.sessions += 1;
        self.instances += len;
        self.bytes += size;
        Admit::Yes
    }
}

#[cfg(test)]
mod tests;
