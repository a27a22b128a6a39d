//! The node's side of replication: the core [`Replicator`] next to the
//! registry it replicates, run on local writes, peer messages and time,
//! and its effects carried out (messages to [`crate::cluster`]'s outboxes,
//! replicated changes published and pushed like local ones, readiness,
//! member states). Lock order: replicator → core. It does no I/O itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use roster_core::replication::{Effect, Envelope, MemberState, Message, Replicator, Stats};
use roster_core::{NodeName, Registry};
use tokio::sync::Notify;

use super::Node;
use crate::cluster::Outbox;

/// How often the replicator runs when nothing else wakes it (retries,
/// verify rounds and member states are due on time).
const TICK: Duration = Duration::from_millis(10);

/// A node's replication state.
pub struct Replication {
    replicator: Mutex<Replicator>,
    /// Woken after a local write: its change goes out at once.
    wake: Notify,
    /// Where messages to each peer are queued.
    outboxes: BTreeMap<NodeName, Arc<Outbox>>,
    /// When a refusal by each peer was last logged.
    refusal_logged: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Held while a snapshot chunk is prefetched and handed to the applier
    /// (so chunks reach it in the order they arrived). Never held across
    /// an await: a call cancelled by its sender cannot lose a chunk whose
    /// successor was already asked for.
    chunk_order: Mutex<()>,
    /// Snapshot chunks to apply, in order, off the runtime's threads (see
    /// [`apply_chunks`]).
    chunks: tokio::sync::mpsc::UnboundedSender<Envelope>,
    /// Chunks handed over and not yet applied. The next chunk is asked for
    /// ahead only while fewer than [`CHUNKS_AHEAD`] wait (otherwise once
    /// one is applied), and a source sends only what is asked: memory
    /// stays bounded by a few chunks.
    chunks_queued: std::sync::atomic::AtomicUsize,
    /// Its receiving end, until [`run`] takes it.
    chunks_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Envelope>>>,
    /// Each peer's state, as the replicator last said (read without its
    /// lock by the Nacos writes that pick a responsible member).
    states: parking_lot::RwLock<BTreeMap<NodeName, MemberState>>,
}

/// Snapshot chunks waiting to be applied past which the next is not asked
/// for ahead.
const CHUNKS_AHEAD: usize = 2;

/// Snapshot chunks waiting to be applied past which more are dropped: a
/// source sends only what was asked (at most a few ahead), so only chunks
/// nobody asked for are (a member's bug must not grow the queue without
/// bound; a dropped chunk the load needed is asked again after the
/// snapshot timeout).
const CHUNKS_QUEUED_MAX: usize = 8;

/// A peer that keeps refusing messages is logged this often at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// What is known of one member, for `roster members` and metrics.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// Its name.
    pub name: String,
    /// Its cluster addresses (empty for this node).
    pub addresses: Vec<String>,
    /// The address that last worked (or is tried first).
    pub in_use: Option<String>,
    /// `self`, `up`, `suspect` or `down`.
    pub state: &'static str,
    /// Time since its last verify (none: never, or this node).
    pub since_verify: Option<Duration>,
    /// Its life, from its messages.
    pub incarnation: Option<u64>,
    /// Live sessions held whose origin it is.
    pub sessions: usize,
    /// Instances in them.
    pub instances: usize,
    /// Sessions waiting to be sent to it.
    pub pending: usize,
}

impl Replication {
    /// The replication of a node among `outboxes`' peers.
    pub fn new(replicator: Replicator, outboxes: BTreeMap<NodeName, Arc<Outbox>>) -> Self {
        let states = outboxes
            .keys()
            .map(|n| (n.clone(), MemberState::Down))
            .collect();
        let (chunks, chunks_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            replicator: Mutex::new(replicator),
            wake: Notify::new(),
            outboxes,
            refusal_logged: Mutex::new(BTreeMap::new()),
            chunk_order: Mutex::new(()),
            chunks,
            chunks_queued: std::sync::atomic::AtomicUsize::new(0),
            chunks_rx: Mutex::new(Some(chunks_rx)),
            states: parking_lot::RwLock::new(states),
        }
    }

    /// What replication did so far.
    pub fn stats(&self) -> Stats {
        self.replicator.lock().stats()
    }

    /// The outboxes, by peer.
    pub fn outboxes(&self) -> impl Iterator<Item = (&NodeName, &Arc<Outbox>)> {
        self.outboxes.iter()
    }

    /// The outbox of `peer`.
    pub fn outbox(&self, peer: &str) -> Option<&Arc<Outbox>> {
        self.outboxes.get(peer)
    }
}

fn state_name(state: MemberState) -> &'static str {
    match state {
        MemberState::Up => "up",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

impl Node {
    /// The node's replication, if it has peers.
    pub fn replication(&self) -> Option<&Replication> {
        self.replication.as_ref()
    }

    /// A local write happened: replicate it soon.
    pub(super) fn replicate_soon(&self) {
        if let Some(r) = &self.replication {
            r.wake.notify_one();
        }
    }

    /// Runs `f` on the replicator and the registry, then carries out its
    /// effects.
    fn replicate(&self, f: impl FnOnce(&mut Replicator, &mut Registry) -> Vec<Effect>) {
        let Some(r) = &self.replication else {
            return;
        };
        let effects = {
            let mut replicator = r.replicator.lock();
            let mut core = self.core.lock();
            f(&mut replicator, &mut core)
        };
        self.carry_out(r, effects);
    }

    /// A message from a peer. A snapshot chunk asks for the next one
    /// before it is applied (the source prepares it meanwhile) and is
    /// handed to the chunk applier, so that the call returns and the next
    /// chunk is sent and decoded while this one is applied; chunks are
    /// applied one at a time, in the order they arrived.
    pub async fn cluster_receive(&self, envelope: Envelope) {
        let Some(r) = &self.replication else {
            return;
        };
        if matches!(envelope.body, Message::SnapshotChunk { .. }) {
            let _in_order = r.chunk_order.lock();
            let queued = &r.chunks_queued;
            let waiting = queued.load(std::sync::atomic::Ordering::Acquire);
            if waiting >= CHUNKS_QUEUED_MAX {
                tracing::debug!(peer = %envelope.from, "snapshot chunk dropped: {waiting} wait already");
                return;
            }
            if waiting < CHUNKS_AHEAD {
                self.replicate(|rep, _| rep.prefetch(&envelope));
            }
            queued.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            // Fails only when the node stops (the applier is gone).
            let _ = r.chunks.send(envelope);
        } else {
            self.replicate(|rep, core| rep.receive(core, envelope, Self::now()));
        }
    }

    /// A message to `peer` could not be delivered on any of its addresses.
    pub fn cluster_send_failed(&self, peer: &str) {
        self.replicate(|rep, _| rep.send_failed(peer, Self::now()));
    }

    /// `peer` refused sync batch `batch`.
    pub fn cluster_send_refused(&self, peer: &str, batch: u64) {
        self.replicate(|rep, _| rep.send_refused(peer, batch));
    }

    /// The peer responsible for data without a session keyed `key` (a
    /// beat-kept Nacos instance): rendezvous hashing over the members not
    /// down, this node included. None: this node is, or the one picked is
    /// suspect (the write is made here rather than wait on it), or the
    /// node has no peers.
    pub fn responsible_peer(&self, key: &str) -> Option<NodeName> {
        let r = self.replication.as_ref()?;
        let me = self.epoch.node.as_str();
        let states = r.states.read();
        let live = states
            .iter()
            .filter(|(_, s)| **s != MemberState::Down)
            .map(|(n, _)| &**n);
        let pick = roster_core::replication::rendezvous(key, std::iter::once(me).chain(live))?;
        let up = states.get(pick) == Some(&MemberState::Up);
        (pick != me && up).then(|| NodeName::from(pick))
    }

    /// Whether `name` is one of this node's peers.
    pub fn is_member(&self, name: &str) -> bool {
        self.replication
            .as_ref()
            .is_some_and(|r| r.outboxes.contains_key(name))
    }

    /// Logs that `peer` refused a message: at most once a minute per peer
    /// (a misconfigured secret or member list refuses every message).
    pub fn warn_refused(&self, peer: &str, kind: &str, status: &tonic::Status) {
        let Some(r) = &self.replication else {
            return;
        };
        let now = Self::now();
        let mut last = r.refusal_logged.lock();
        let due = last
            .get(peer)
            .is_none_or(|t| now.saturating_duration_since(*t) >= REFUSAL_LOG_EVERY);
        if due {
            last.insert(peer.to_owned(), now);
            tracing::warn!(peer, kind, code = ?status.code(), "peer refused a cluster message: {}", status.message());
        }
    }

    fn carry_out(&self, r: &Replication, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(to, envelope) => {
                    if let Some(outbox) = r.outboxes.get(&to) {
                        outbox.push(&envelope, &self.metrics);
                    }
                }
                Effect::Changed(changes) => self.announce(changes),
                Effect::Ready => {
                    tracing::info!("replication: snapshot loaded, serving");
                    // The views of what was loaded, before the first
                    // reader; ready under the same lock, so a change
                    // applied meanwhile either is in them or sees the node
                    // ready and publishes itself.
                    let mut core = self.core.lock();
                    self.publish_locked(&mut core);
                    self.set_ready();
                }
                Effect::Member(name, state) => {
                    tracing::info!(member = %name, state = state_name(state), "member state");
                    r.states.write().insert(name, state);
                }
                Effect::Acked(_, lag) => self.metrics.replication.lag.observe(lag.as_secs_f64()),
            }
        }
    }

    /// Each member as known here: this node first, then its peers (with
    /// what is held from each: one pass over the sessions held).
    pub fn members(&self) -> Vec<MemberInfo> {
        let me = self.epoch.node.clone();
        let replicator = self.replication.as_ref().map(|r| r.replicator.lock());
        let held = self.held_by_origin();
        let count = |name: &str| held.get(name).copied().unwrap_or_default();
        let (sessions, instances) = count(&me);
        let mut out = vec![MemberInfo {
            name: me,
            addresses: Vec::new(),
            in_use: None,
            state: "self",
            since_verify: None,
            incarnation: Some(self.incarnation()),
            sessions,
            instances,
            pending: 0,
        }];
        let (Some(r), Some(replicator)) = (&self.replication, replicator) else {
            return out;
        };
        let now = Self::now();
        for (name, peer) in replicator.peers() {
            let outbox = r.outboxes.get(name);
            let (sessions, instances) = count(name);
            out.push(MemberInfo {
                name: name.to_string(),
                addresses: outbox.map(|o| o.addresses().to_vec()).unwrap_or_default(),
                in_use: outbox.map(|o| o.in_use()),
                state: state_name(peer.state),
                since_verify: peer.last_verify.map(|t| now.saturating_duration_since(t)),
                incarnation: peer.incarnation,
                sessions,
                instances,
                pending: peer.pending(),
            });
        }
        out
    }

    /// (sessions, instances) held, by origin (live sessions only).
    pub fn held_by_origin(&self) -> BTreeMap<String, (usize, usize)> {
        let core = self.core.lock();
        let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (owner, held) in core.held_sessions() {
            if let Some(records) = held.records() {
                let e = out.entry(owner.origin.to_string()).or_default();
                e.0 += 1;
                e.1 += records.len();
            }
        }
        out
    }
}

/// Applies snapshot chunks in the order they arrived, each on a blocking
/// thread (a chunk of megabytes holds the registry for tens of
/// milliseconds; the runtime's threads go on serving meanwhile).
async fn apply_chunks(node: Arc<Node>, mut chunks: tokio::sync::mpsc::UnboundedReceiver<Envelope>) {
    loop {
        let envelope = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            e = chunks.recv() => match e {
                Some(e) => e,
                None => return,
            },
        };
        let n = node.clone();
        let apply = move || n.replicate(|rep, core| rep.receive(core, envelope, Node::now()));
        if let Err(e) = tokio::task::spawn_blocking(apply).await {
            tracing::error!("applying a snapshot chunk failed: {e}");
        }
        if let Some(r) = node.replication() {
            r.chunks_queued
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Runs the replicator until the node stops: at once after local writes,
/// and every few milliseconds for what is due on time.
pub async fn run(node: Arc<Node>) {
    let Some(r) = node.replication() else {
        return;
    };
    if let Some(chunks) = r.chunks_rx.lock().take() {
        tokio::spawn(apply_chunks(node.clone(), chunks));
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = r.wake.notified() => {}
            _ = tick.tick() => {}
        }
        node.replicate(|rep, core| rep.tick(core, Node::now()));
    }
}
