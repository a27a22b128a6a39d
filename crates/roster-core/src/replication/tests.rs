//! Unit tests of the replication state machine: two or three members wired
//! by hand, each message handed over explicitly. The seeded simulation in
//! `roster-proto/tests/cluster_simulation.rs` runs the same code under
//! faults; these pin the single steps.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::registry::RegistryConfig;
use crate::session::SessionKind;
use crate::{Instance, ServiceKey};

struct Node {
    registry: Registry,
    replicator: Replicator,
}

fn names(n: &[&str]) -> Vec<NodeName> {
    n.iter().map(|s| NodeName::from(*s)).collect()
}

fn node(me: &str, incarnation: u64, members: &[&str], now: Instant) -> Node {
    let config = ReplicationConfig {
        batch_sessions: 2,
        ..ReplicationConfig::default()
    };
    node_with(me, incarnation, members, now, config)
}

fn node_with(
    me: &str,
    incarnation: u64,
    members: &[&str],
    now: Instant,
    config: ReplicationConfig,
) -> Node {
    let mut registry = Registry::new(me, incarnation, RegistryConfig::default());
    let replicator = Replicator::new(
        me.into(),
        incarnation,
        names(members),
        config,
        &mut registry,
        now,
    );
    Node {
        registry,
        replicator,
    }
}

fn key() -> ServiceKey {
    ServiceKey::simple("svc").expect("valid")
}

fn instance(last: u8) -> Instance {
    Instance::new(IpAddr::from([10, 0, 0, last]), 8080)
        .normalize()
        .expect("valid")
}

fn open(n: &mut Node, session: &str, now: Instant) {
    n.registry
        .open_session(session.into(), SessionKind::Stream, "test", 0, now)
        .expect("opens");
}

fn register(n: &mut Node, session: &str, last: u8, now: Instant) {
    n.registry
        .register(session, &key(), instance(last), now)
        .expect("registers");
}

fn listed(n: &mut Node) -> Vec<String> {
    let mut ids: Vec<String> = n
        .registry
        .view(&key())
        .map(|v| v.instances.iter().map(|(id, _)| id.to_string()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The messages among `effects`, by receiver.
fn sends(effects: &[Effect]) -> Vec<(NodeName, Envelope)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(to, env) => Some((to.clone(), env.clone())),
            _ => None,
        })
        .collect()
}

fn kinds(effects: &[Effect], to: &str) -> Vec<&'static str> {
    sends(effects)
        .into_iter()
        .filter(|(n, _)| &**n == to)
        .map(|(_, e)| e.body.kind())
        .collect()
}

/// Delivers every message in `effects` addressed to `to`, returning what
/// that produced.
fn deliver(effects: &[Effect], to: &mut Node, now: Instant) -> Vec<Effect> {
    let me = to.replicator.me().clone();
    let mut out = Vec::new();
    for (n, env) in sends(effects) {
        if n == me {
            out.extend(to.replicator.receive(&mut to.registry, env, now));
        }
    }
    out
}

/// Two ready members a and b.
fn pair(now: Instant) -> (Node, Node) {
    pair_with(now, *node("a", 1, &["a"], now).replicator.config())
}

/// Two ready members a and b with `config`.
fn pair_with(now: Instant, config: ReplicationConfig) -> (Node, Node) {
    let mut a = node_with("a", 1, &["a", "b"], now, config);
    let mut b = node_with("b", 1, &["a", "b"], now, config);
    // Both ask each other for a snapshot; both answer they are loading:
    // the cluster is starting, both are ready with nothing to load.
    let ea = a.replicator.tick(&mut a.registry, now);
    let eb = b.replicator.tick(&mut b.registry, now);
    let to_a = deliver(&eb, &mut a, now);
    let to_b = deliver(&ea, &mut b, now);
    deliver(&to_a, &mut b, now);
    deliver(&to_b, &mut a, now);
    assert!(a.replicator.is_ready() && b.replicator.is_ready());
    (a, b)
}

#[test]
fn a_local_write_reaches_the_peer_and_its_ack_clears_the_batch() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    let effects = a.replicator.tick(&mut a.registry, t);
    assert_eq!(kinds(&effects, "b"), ["sync"]);
    let answer = deliver(&effects, &mut b, t);
    assert_eq!(kinds(&answer, "a"), ["sync_ack"]);
    assert!(answer.iter().any(|e| matches!(e, Effect::Changed(_))));
    assert_eq!(listed(&mut b), ["10.0.0.1#8080#DEFAULT"]);
    deliver(&answer, &mut a, t);
    let (_, peer) = a.replicator.peers().next().expect("b");
    assert!(peer.in_flight.is_none() && peer.pending() == 0);
}

#[test]
fn changes_while_a_batch_is_in_flight_are_merged_per_session() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    let first = a.replicator.tick(&mut a.registry, t);
    // Three more writes to the same session while the first is unacked.
    for last in 2..5 {
        register(&mut a, "s1", last, t);
        assert!(kinds(&a.replicator.tick(&mut a.registry, t), "b").is_empty());
    }
    let (_, peer) = a.replicator.peers().next().expect("b");
    assert_eq!(peer.pending(), 1);
    let ack = deliver(&first, &mut b, t);
    let second = deliver(&ack, &mut a, t);
    let sent = sends(&second);
    assert_eq!(sent.len(), 1);
    let Message::Sync {
        sessions, deltas, ..
    } = &sent[0].1.body
    else {
        panic!("a sync, got {:?}", sent[0].1.body);
    };
    // b acknowledged the session: what follows is only what changed since.
    assert!(sessions.is_empty());
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].1.upserts.len(), 3);
    deliver(&second, &mut b, t);
    assert_eq!(listed(&mut b).len(), 4);
}

/// The whole sessions and the deltas of a sync.
type Synced = (Vec<(Owner, SessionState)>, Vec<(Owner, SessionDelta)>);

/// The last sync `effects` send to `to`.
fn sync_to(effects: &[Effect], to: &str) -> Synced {
    sends(effects)
        .into_iter()
        .filter(|(n, _)| &**n == to)
        .find_map(|(_, e)| match e.body {
            Message::Sync {
                sessions, deltas, ..
            } => Some((sessions, deltas)),
            _ => None,
        })
        .expect("a sync")
}

/// a sends what it has to b until b has it.
fn sync_all(a: &mut Node, b: &mut Node, now: Instant) {
    let out = a.replicator.tick(&mut a.registry, now);
    settle(a, b, out, now);
}

#[test]
fn a_peer_that_acknowledged_a_session_gets_only_what_changed_removals_too() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    for last in 1..=10 {
        register(&mut a, "s1", last, t);
    }
    sync_all(&mut a, &mut b, t);
    assert_eq!(listed(&mut b).len(), 10);
    // One changed, one removed.
    let mut changed = instance(3);
    changed.metadata.insert("zone", "b");
    a.registry
        .register("s1", &key(), changed, t)
        .expect("registers");
    let gone = instance(7).id;
    a.registry
        .deregister("s1", &key(), &gone, t)
        .expect("deregisters");
    let out = a.replicator.tick(&mut a.registry, t);
    let (sessions, deltas) = sync_to(&out, "b");
    assert!(sessions.is_empty());
    let delta = &deltas[0].1;
    assert_eq!((delta.upserts.len(), delta.removed.len()), (1, 1));
    assert_eq!(delta.removed[0].1, gone);
    let ack = deliver(&out, &mut b, t);
    deliver(&ack, &mut a, t);
    assert_eq!(listed(&mut b).len(), 9);
    assert!(!listed(&mut b).contains(&gone));
    let view = b.registry.view(&key()).expect("listed");
    let zone = view
        .instances
        .iter()
        .find(|(id, _)| &***id == instance(3).id.as_str())
        .and_then(|(_, i)| i.instance.metadata.get("zone").map(str::to_owned));
    assert_eq!(zone.as_deref(), Some("b"));
    // Same view, same version on both.
    let owner = Owner {
        origin: "a".into(),
        session: "s1".into(),
    };
    let held = |n: &Node| n.registry.held(&owner).map(Held::version);
    assert_eq!(held(&a), held(&b));
}

#[test]
fn a_delta_the_peer_cannot_apply_brings_the_session_whole() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    register(&mut a, "s1", 2, t);
    sync_all(&mut a, &mut b, t);
    // b loses the session (say its origin's digests were lost for long).
    let owner = Owner {
        origin: "a".into(),
        session: "s1".into(),
    };
    b.registry.forget_session(&owner);
    assert!(listed(&mut b).is_empty());
    register(&mut a, "s1", 3, t);
    let out = a.replicator.tick(&mut a.registry, t);
    assert_eq!(sync_to(&out, "b").1.len(), 1);
    let ack = deliver(&out, &mut b, t);
    let Some(Message::SyncAck { wanted, .. }) = sends(&ack).first().map(|(_, e)| e.body.clone())
    else {
        panic!("an ack, got {ack:?}");
    };
    assert_eq!(wanted, [SessionId::from("s1")]);
    assert_eq!(b.replicator.stats().deltas_wanted, 1);
    // The whole session follows at once.
    let whole = deliver(&ack, &mut a, t);
    let (sessions, deltas) = sync_to(&whole, "b");
    assert!(deltas.is_empty());
    assert_eq!(sessions[0].1.len(), 3);
    let ack = deliver(&whole, &mut b, t);
    deliver(&ack, &mut a, t);
    assert_eq!(listed(&mut b).len(), 3);
}

#[test]
fn after_a_refused_batch_or_a_restart_the_peer_gets_sessions_whole() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    sync_all(&mut a, &mut b, t);
    // Refused: what b holds is not known any more.
    register(&mut a, "s1", 2, t);
    let out = a.replicator.tick(&mut a.registry, t);
    let Message::Sync { batch, .. } = sends(&out)[0].1.body else {
        panic!("a sync")
    };
    a.replicator.send_refused("b", batch);
    register(&mut a, "s1", 3, t);
    let out = a.replicator.tick(&mut a.registry, t);
    let (sessions, deltas) = sync_to(&out, "b");
    assert!(deltas.is_empty());
    assert_eq!(sessions[0].1.len(), 3);
    let ack = deliver(&out, &mut b, t);
    deliver(&ack, &mut a, t);
    assert_eq!(listed(&mut b).len(), 3);
    // b restarts: its next life gets whole sessions.
    let mut b2 = node("b", 2, &["a", "b"], t);
    let hello = b2.replicator.tick(&mut b2.registry, t);
    deliver(&hello, &mut a, t);
    register(&mut a, "s1", 4, t);
    let out = a.replicator.tick(&mut a.registry, t);
    let (sessions, deltas) = sync_to(&out, "b");
    assert!(deltas.is_empty());
    assert_eq!(sessions[0].1.len(), 4);
}

#[test]
fn many_writes_between_two_sends_go_whole() {
    let mut touched = Touched::default();
    let k = Arc::new(key());
    for n in 0..=Touched::MAX_IDS {
        touched.add(&k, &Arc::from(n.to_string()));
    }
    assert!(touched.is_whole());
    assert_eq!(touched.ids().count(), 0);
    let mut other = Touched::default();
    other.add(&k, &Arc::from("x"));
    other.merge(touched);
    assert!(other.is_whole());
}

#[test]
fn an_unacknowledged_batch_is_sent_again_after_the_ack_timeout() {
    let t = Instant::now();
    let (mut a, _b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    assert_eq!(kinds(&a.replicator.tick(&mut a.registry, t), "b"), ["sync"]);
    let timeout = a.replicator.config().ack_timeout;
    // Timed out: given up, then sent again after the back-off.
    let later = t + timeout;
    assert!(kinds(&a.replicator.tick(&mut a.registry, later), "b").is_empty());
    let retry = later + a.replicator.config().retry_min;
    assert_eq!(
        kinds(&a.replicator.tick(&mut a.registry, retry), "b"),
        ["sync"]
    );
    assert_eq!(a.replicator.stats().batches_failed, 1);
}

#[test]
fn a_verify_listing_a_missing_session_makes_its_origin_resend_it() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    // The sync is lost.
    a.replicator.tick(&mut a.registry, t);
    let verify_at = t + a.replicator.config().verify_interval;
    let verify = a.replicator.tick(&mut a.registry, verify_at);
    assert!(kinds(&verify, "b").contains(&"verify"));
    let answer = deliver(&verify, &mut b, verify_at);
    assert_eq!(kinds(&answer, "a"), ["verify_answer"]);
    let resend = deliver(&answer, &mut a, verify_at);
    // The lost batch is still in flight until its ack times out; after it
    // the session goes again.
    let mut later = verify_at;
    let mut synced = !kinds(&resend, "b").is_empty();
    let mut effects = resend;
    while !synced && later < verify_at + Duration::from_secs(5) {
        later += Duration::from_millis(10);
        effects = a.replicator.tick(&mut a.registry, later);
        synced = kinds(&effects, "b").contains(&"sync");
    }
    assert!(synced, "the session is sent again");
    deliver(&effects, &mut b, later);
    assert_eq!(listed(&mut b), ["10.0.0.1#8080#DEFAULT"]);
}

#[test]
fn a_replica_its_origin_stops_listing_is_dropped_after_the_verify_rounds() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    let sync = a.replicator.tick(&mut a.registry, t);
    deliver(&sync, &mut b, t);
    assert_eq!(listed(&mut b).len(), 1);
    // a falls silent: b ticks alone through the rounds.
    let cfg = *b.replicator.config();
    let end = t + cfg.verify_interval * (cfg.verify_rounds + 1);
    let mut now = t;
    let mut dropped = false;
    while now <= end {
        now += Duration::from_millis(100);
        let effects = b.replicator.tick(&mut b.registry, now);
        dropped |= effects.iter().any(|e| matches!(e, Effect::Changed(_)));
    }
    assert!(dropped, "the removal is published");
    assert!(listed(&mut b).is_empty());
    assert_eq!(b.replicator.stats().unverified_dropped, 1);
}

#[test]
fn messages_from_an_earlier_life_are_ignored() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    let old_life = a.replicator.tick(&mut a.registry, t);
    // a restarts (incarnation 2) and b hears from the new life first.
    let mut a2 = node("a", 2, &["a", "b"], t);
    let hello = a2.replicator.tick(&mut a2.registry, t);
    deliver(&hello, &mut b, t);
    let before = b.replicator.stats().ignored;
    let answer = deliver(&old_life, &mut b, t);
    assert!(answer.is_empty());
    assert_eq!(b.replicator.stats().ignored, before + 1);
    assert!(listed(&mut b).is_empty());
}

#[test]
fn a_starting_member_loads_a_snapshot_in_chunks_then_is_ready() {
    let t = Instant::now();
    let (mut a, _b) = pair(t);
    for s in 0..5u8 {
        let session = format!("s{s}");
        open(&mut a, &session, t);
        register(&mut a, &session, s + 1, t);
    }
    let mut c = node("c", 1, &["a", "c"], t);
    let mut a_view = node("a", 1, &["a", "b", "c"], t);
    // a's replicator must know c: rebuild it over the same registry.
    std::mem::swap(&mut a.replicator, &mut a_view.replicator);
    a.replicator.loading = None;
    let mut effects = c.replicator.tick(&mut c.registry, t);
    let mut chunks = 0;
    while !c.replicator.is_ready() {
        let answer = deliver(&effects, &mut a, t);
        chunks += kinds(&answer, "c")
            .iter()
            .filter(|k| **k == "snapshot_chunk")
            .count();
        effects = deliver(&answer, &mut c, t);
        assert!(chunks < 10, "the load ends");
    }
    // 5 sessions at 2 a chunk.
    assert_eq!(chunks, 3);
    assert_eq!(listed(&mut c).len(), 5);
    assert_eq!(c.replicator.stats().snapshot_loads, 1);
}

#[test]
fn a_snapshot_stream_keeps_its_order_while_sessions_start_and_end() {
    let t = Instant::now();
    let (mut a, _b) = pair(t);
    for s in 1..=6u8 {
        let session = format!("s{s}");
        open(&mut a, &session, t);
        register(&mut a, &session, s, t);
    }
    let mut c = node("c", 1, &["a", "c"], t);
    let mut a_view = node("a", 1, &["a", "b", "c"], t);
    std::mem::swap(&mut a.replicator, &mut a_view.replicator);
    a.replicator.loading = None;
    let request = c.replicator.tick(&mut c.registry, t);
    let first = deliver(&request, &mut a, t);
    let Some(Message::SnapshotChunk { sessions, next, .. }) =
        sends(&first).first().map(|(_, e)| e.body.clone())
    else {
        panic!("a chunk, got {first:?}");
    };
    let ids = |s: &[(Owner, SessionState, Duration)]| -> Vec<String> {
        s.iter().map(|(o, ..)| o.session.to_string()).collect()
    };
    assert_eq!(ids(&sessions), ["s1", "s2"]);
    assert_eq!(next.map(|o| o.session.to_string()).as_deref(), Some("s2"));
    // Meanwhile: s2 (the cursor) ends and is forgotten, s4 ends, s0 starts.
    a.registry.close_session("s4", t);
    a.registry.close_session("s2", t);
    a.registry.forget_session(&Owner {
        origin: "a".into(),
        session: "s2".into(),
    });
    open(&mut a, "s0", t);
    register(&mut a, "s0", 9, t);
    let mut effects = deliver(&first, &mut c, t);
    let mut rest = Vec::new();
    while !c.replicator.is_ready() {
        let answer = deliver(&effects, &mut a, t);
        for (_, e) in sends(&answer) {
            if let Message::SnapshotChunk { sessions, .. } = &e.body {
                rest.extend(ids(sessions));
            }
        }
        effects = deliver(&answer, &mut c, t);
        assert!(rest.len() < 20, "the load ends");
    }
    // The stream goes on after the cursor, in the order it started with:
    // s4 as its tombstone, s0 not at all (it comes by sync).
    // (s2's end, like s0's start, reaches c by sync.)
    assert_eq!(rest, ["s3", "s4", "s5", "s6"]);
    assert_eq!(listed(&mut c).len(), 5);
}

#[test]
fn a_member_without_peers_is_ready_at_once() {
    let t = Instant::now();
    let mut a = node("a", 1, &["a"], t);
    let effects = a.replicator.tick(&mut a.registry, t);
    assert!(effects.contains(&Effect::Ready));
    assert!(a.replicator.is_ready());
}

/// Registers on `n`, in a session of its own, an instance carrying `bytes`
/// bytes of metadata.
fn register_big(n: &mut Node, session: &str, last: u8, bytes: usize, now: Instant) {
    open(n, session, now);
    let mut i = instance(last);
    i.metadata.insert("blob", &"x".repeat(bytes));
    n.registry
        .register(session, &key(), i, now)
        .expect("registers");
}

/// Hands every message between `a` and `b` over until none is left.
fn settle(a: &mut Node, b: &mut Node, first: Vec<Effect>, now: Instant) -> Vec<Effect> {
    let mut seen = Vec::new();
    let mut to_b = first;
    for _ in 0..100 {
        let to_a = deliver(&to_b, b, now);
        to_b = deliver(&to_a, a, now);
        seen.extend(to_a.iter().cloned());
        seen.extend(to_b.iter().cloned());
        if to_b.is_empty() {
            return seen;
        }
    }
    panic!("the exchange does not end");
}

#[test]
fn a_session_grown_too_large_is_not_followed_by_a_delta_that_skips_its_growth() {
    let t = Instant::now();
    let config = ReplicationConfig {
        message_bytes: ENVELOPE_MARGIN + 2500,
        ..ReplicationConfig::default()
    };
    let (mut a, mut b) = pair_with(t, config);
    register_big(&mut a, "s1", 1, 100, t);
    sync_all(&mut a, &mut b, t);
    let owner = Owner {
        origin: "a".into(),
        session: "s1".into(),
    };
    let acked = b.registry.held(&owner).map(Held::version);
    // It grows past what a message may carry: neither it nor a delta of
    // it goes.
    let mut big = instance(2);
    big.metadata.insert("blob", &"x".repeat(3000));
    a.registry
        .register("s1", &key(), big, t)
        .expect("registers");
    let out = a.replicator.tick(&mut a.registry, t);
    assert!(kinds(&out, "b").is_empty(), "{out:?}");
    // A small write later must not go as a delta from the version b
    // holds: b would hold its version without the large instance.
    register(&mut a, "s1", 3, t);
    let out = a.replicator.tick(&mut a.registry, t);
    let synced = sends(&out)
        .iter()
        .any(|(_, e)| matches!(&e.body, Message::Sync { deltas, .. } if !deltas.is_empty()));
    assert!(!synced, "{out:?}");
    settle(&mut a, &mut b, out, t);
    assert_eq!(b.registry.held(&owner).map(Held::version), acked);
    assert_eq!(a.replicator.stats().too_large, 2);
}

#[test]
fn batches_are_bounded_by_bytes_and_a_session_larger_than_a_message_is_not_sent() {
    let t = Instant::now();
    let config = ReplicationConfig {
        batch_bytes: 1500,
        message_bytes: ENVELOPE_MARGIN + 2500,
        ..ReplicationConfig::default()
    };
    let (mut a, mut b) = pair_with(t, config);
    for s in 0..3u8 {
        register_big(&mut a, &format!("s{s}"), s + 1, 1000, t);
    }
    register_big(&mut a, "huge", 9, 3000, t);
    let first = a.replicator.tick(&mut a.registry, t);
    let mut all = first.clone();
    all.extend(settle(&mut a, &mut b, first, t));
    let batches: Vec<usize> = sends(&all)
        .iter()
        .filter_map(|(to, e)| match &e.body {
            Message::Sync { sessions, .. } if &**to == "b" => Some(sessions.len()),
            _ => None,
        })
        .collect();
    // About 1.1 KB each: one session per 1.5 KB batch.
    assert_eq!(batches, [1, 1, 1]);
    assert_eq!(listed(&mut b).len(), 3, "all but the huge one");
    assert_eq!(a.replicator.stats().too_large, 1);
}

#[test]
fn a_streaming_snapshot_is_not_cut_short_by_ready_alone_after() {
    let t = Instant::now();
    let config = ReplicationConfig {
        batch_sessions: 2,
        ready_alone_after: Duration::from_secs(4),
        snapshot_timeout: Duration::from_secs(5),
        ..ReplicationConfig::default()
    };
    let mut a = node_with("a", 1, &["a", "c"], t, config);
    a.replicator.loading = None;
    for s in 0..5u8 {
        let session = format!("s{s}");
        open(&mut a, &session, t);
        register(&mut a, &session, s + 1, t);
    }
    let mut c = node_with("c", 1, &["a", "c"], t, config);
    let mut now = t;
    let mut effects = c.replicator.tick(&mut c.registry, now);
    // Each chunk comes 3 s after the one before: 9 s in all, longer than
    // ready_alone_after, but never 4 s without one.
    while !c.replicator.is_ready() {
        let answer = deliver(&effects, &mut a, now);
        assert!(!answer.is_empty(), "a answers");
        now += Duration::from_secs(3);
        assert!(
            !c.replicator
                .tick(&mut c.registry, now)
                .contains(&Effect::Ready)
        );
        effects = deliver(&answer, &mut c, now);
        assert!(now < t + Duration::from_secs(30), "the load ends");
    }
    assert_eq!(listed(&mut c).len(), 5, "the whole snapshot");
    assert_eq!(c.replicator.stats().snapshot_loads, 1);
}

#[test]
fn a_member_back_with_a_lower_life_after_being_down_is_heard() {
    let t = Instant::now();
    // Down after 2 s, while replicas live 10 rounds unverified: the old
    // life's replica is still held when the new life is heard.
    let config = ReplicationConfig {
        suspect_after: Duration::from_secs(1),
        down_after: Duration::from_secs(2),
        verify_rounds: 10,
        ..ReplicationConfig::default()
    };
    let mut a = node_with("a", 5, &["a", "b"], t, config);
    let mut b = node_with("b", 1, &["a", "b"], t, config);
    a.replicator.loading = None;
    b.replicator.loading = None;
    // The old life (5) had a session, replicated to b.
    open(&mut a, "old", t);
    register(&mut a, "old", 7, t);
    deliver(&a.replicator.tick(&mut a.registry, t), &mut b, t);
    assert_eq!(listed(&mut b), ["10.0.0.7#8080#DEFAULT"]);
    // a loses its data directory and comes back as life 2 at once: still
    // the old life's member to b, so ignored.
    let mut a2 = node_with("a", 2, &["a", "b"], t, config);
    a2.replicator.loading = None;
    open(&mut a2, "s1", t);
    register(&mut a2, "s1", 1, t);
    let early = a2.replicator.tick(&mut a2.registry, t);
    deliver(&early, &mut b, t);
    assert_eq!(listed(&mut b), ["10.0.0.7#8080#DEFAULT"]);
    // Once b has taken a for down, the lower life is a new one.
    let later = t + b.replicator.config().down_after;
    b.replicator.tick(&mut b.registry, later);
    let (_, peer) = b.replicator.peers().next().expect("a");
    assert_eq!(peer.state, MemberState::Down);
    let retry = later + a2.replicator.config().ack_timeout;
    a2.replicator.tick(&mut a2.registry, retry);
    let resend = a2
        .replicator
        .tick(&mut a2.registry, retry + a2.replicator.config().retry_min);
    assert_eq!(kinds(&resend, "b"), ["sync"]);
    deliver(&resend, &mut b, retry);
    // The new life's session is in; the lost life's is forgotten.
    assert_eq!(listed(&mut b), ["10.0.0.1#8080#DEFAULT"]);
}

#[test]
fn a_refused_batch_is_not_sent_again_until_a_verify_asks_for_it() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    open(&mut a, "s1", t);
    register(&mut a, "s1", 1, t);
    let sent = sends(&a.replicator.tick(&mut a.registry, t));
    let Message::Sync { batch, .. } = sent[0].1.body else {
        panic!("a sync")
    };
    a.replicator.send_refused("b", batch);
    let cfg = *a.replicator.config();
    let mut now = t;
    let verify_at = t + cfg.verify_interval;
    while now + Duration::from_millis(100) < verify_at {
        now += Duration::from_millis(100);
        let effects = a.replicator.tick(&mut a.registry, now);
        assert!(
            !kinds(&effects, "b").contains(&"sync"),
            "not resent on its own"
        );
    }
    let verify = a.replicator.tick(&mut a.registry, verify_at);
    let answer = deliver(&verify, &mut b, verify_at);
    assert_eq!(kinds(&answer, "a"), ["verify_answer"]);
    let resend = deliver(&answer, &mut a, verify_at);
    assert_eq!(kinds(&resend, "b"), ["sync"]);
    deliver(&resend, &mut b, verify_at);
    assert_eq!(listed(&mut b), ["10.0.0.1#8080#DEFAULT"]);
}
