//! Laws of the registry state, checked over random operation sequences.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use roster_core::checksum::view_checksum;
use roster_core::push::{Coalescer, Enqueued, Need, Outbound, OutboundQueue, Subscriptions};
use roster_core::session::SessionKind;
use roster_core::{
    Instance, Owner, Registry, RegistryConfig, RegistryError, ServiceKey, SessionData, SessionId,
    Version,
};

#[derive(Debug, Clone)]
enum Op {
    Register {
        session: usize,
        service: u8,
        host: u8,
        weight: u16,
    },
    Deregister {
        session: usize,
        service: u8,
        host: u8,
    },
    SetWeight {
        session: usize,
        service: u8,
        host: u8,
        weight: u16,
    },
    Replace {
        session: usize,
        service: u8,
        hosts: Vec<u8>,
    },
    CloseSession {
        session: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3u8, 0..12u8, 0..5u16).prop_map(|(session, service, host, weight)| Op::Register { session, service, host, weight }),
        2 => (0..3usize, 0..3u8, 0..12u8).prop_map(|(session, service, host)| Op::Deregister { session, service, host }),
        1 => (0..3usize, 0..3u8, 0..12u8, 0..5u16).prop_map(|(session, service, host, weight)| Op::SetWeight { session, service, host, weight }),
        1 => (0..3usize, 0..3u8, prop::collection::vec(0..12u8, 0..4)).prop_map(|(session, service, hosts)| Op::Replace { session, service, hosts }),
        1 => (0..3usize).prop_map(|session| Op::CloseSession { session }),
    ]
}

fn key(service: u8) -> ServiceKey {
    ServiceKey::simple(format!("svc-{service}")).unwrap()
}

fn instance(host: u8, weight: u16) -> Instance {
    let mut i = Instance::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)), 8080);
    i.weight = f64::from(weight);
    i
}

fn id(host: u8) -> String {
    format!("10.0.0.{host}#8080#DEFAULT")
}

fn registry(window: usize) -> Registry {
    Registry::new(
        "n1",
        7,
        RegistryConfig {
            delta_window: window,
            ..RegistryConfig::default()
        },
    )
}

fn open(reg: &mut Registry, name: &str, now: Instant) -> SessionId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id: SessionId = format!("{name}-{n}").into();
    reg.open_session(id.clone(), SessionKind::Stream, name, 0, now)
        .unwrap();
    id
}

/// Runs one op; returns the services whose view it changed.
fn step(reg: &mut Registry, sessions: &mut [SessionId], op: &Op, now: Instant) -> Vec<u8> {
    let revisions = |reg: &mut Registry| -> Vec<u64> {
        (0..3)
            .map(|s| reg.view(&key(s)).map_or(0, |v| v.revision))
            .collect()
    };
    let before = revisions(reg);
    match op {
        Op::Register {
            session,
            service,
            host,
            weight,
        } => {
            reg.register(
                &sessions[*session],
                &key(*service),
                instance(*host, *weight),
                now,
            )
            .unwrap();
        }
        Op::Deregister {
            session,
            service,
            host,
        } => match reg.deregister(&sessions[*session], &key(*service), &id(*host), now) {
            Ok(_)
            | Err(
                RegistryError::UnknownInstance { .. }
                | RegistryError::UnknownService(_)
                | RegistryError::NotOwner { .. },
            ) => {}
            Err(e) => panic!("{e}"),
        },
        Op::SetWeight {
            session,
            service,
            host,
            weight,
        } => {
            let _ = reg.modify(
                &sessions[*session],
                &key(*service),
                &id(*host),
                |i| i.weight = f64::from(*weight),
                now,
            );
        }
        Op::Replace {
            session,
            service,
            hosts,
        } => {
            let instances = hosts.iter().map(|h| instance(*h, 1)).collect();
            reg.set_instances(&sessions[*session], &key(*service), instances, now)
                .unwrap();
        }
        Op::CloseSession { session } => {
            reg.close_session(&sessions[*session], now);
            sessions[*session] = open(reg, "t", now);
        }
    }
    let after = revisions(reg);
    (0..3u8)
        .filter(|s| after[*s as usize] != before[*s as usize])
        .collect()
}

/// Runs `ops`, returning the registry and, per service, every view it had.
fn run(ops: &[Op], window: usize) -> (Registry, Vec<Vec<Arc<roster_core::ServiceView>>>) {
    let now = Instant::now();
    let mut reg = registry(window);
    let mut sessions: Vec<_> = (0..3).map(|_| open(&mut reg, "t", now)).collect();
    let mut history = vec![Vec::new(); 3];
    for op in ops {
        step(&mut reg, &mut sessions, op, now);
        for s in 0..3u8 {
            let Some(view) = reg.view(&key(s)) else {
                continue;
            };
            if history[s as usize]
                .last()
                .is_none_or(|v: &Arc<roster_core::ServiceView>| v.revision != view.revision)
            {
                history[s as usize].push(view);
            }
        }
    }
    (reg, history)
}

/// What each session holds, recomputed from scratch: the view every
/// service must show (one entry per id; the later write wins).
fn expected_views(reg: &Registry) -> Vec<Vec<(String, f64)>> {
    let mut best: std::collections::BTreeMap<(String, String), (Version, f64)> = Default::default();
    for (_, held) in reg.held_sessions() {
        if let roster_core::registry::Held::Live { records, .. } = held {
            for (k, id, r) in records.iter() {
                let slot = (k.service.clone(), id.to_string());
                let candidate = (r.version, r.instance.weight);
                let e = best.entry(slot).or_insert(candidate);
                if candidate.0.sequence > e.0.sequence {
                    *e = candidate;
                }
            }
        }
    }
    (0..3u8)
        .map(|s| {
            best.iter()
                .filter(|((svc, _), _)| *svc == key(s).service)
                .map(|((_, id), (_, w))| (id.clone(), *w))
                .collect()
        })
        .collect()
}

proptest! {
    #[test]
    fn maintained_checksum_equals_one_computed_from_scratch(ops in prop::collection::vec(op(), 0..80)) {
        let (mut reg, _) = run(&ops, 16);
        for s in 0..3 {
            if let Some(view) = reg.view(&key(s)) {
                let scratch = view_checksum(view.instances.values().map(|r| &r.instance));
                prop_assert_eq!(view.checksum, scratch);
            }
        }
    }

    #[test]
    fn views_are_derived_from_the_sessions_held(ops in prop::collection::vec(op(), 0..80)) {
        let (mut reg, _) = run(&ops, 16);
        let expected = expected_views(&reg);
        let mut count = 0;
        for s in 0..3u8 {
            let shown: Vec<(String, f64)> = reg
                .view(&key(s))
                .map(|v| v.instances.values().map(|r| (r.instance.id.clone(), r.instance.weight)).collect())
                .unwrap_or_default();
            count += shown.len();
            prop_assert_eq!(&shown, &expected[s as usize]);
        }
        prop_assert_eq!(reg.instance_count(), count);
    }

    #[test]
    fn a_view_changes_only_with_a_new_revision(ops in prop::collection::vec(op(), 1..60)) {
        let now = Instant::now();
        let mut reg = registry(16);
        let mut sessions: Vec<_> = (0..3).map(|_| open(&mut reg, "t", now)).collect();
        for op in &ops {
            let views_before: Vec<_> = (0..3).map(|s| reg.view(&key(s))).collect();
            let changed = step(&mut reg, &mut sessions, op, now);
            for s in 0..3u8 {
                let after = reg.view(&key(s));
                let before = &views_before[s as usize];
                if !changed.contains(&s) {
                    prop_assert_eq!(
                        before.as_ref().map(|v| v.instances.clone()),
                        after.as_ref().map(|v| v.instances.clone()),
                        "a view without a new revision did not change"
                    );
                }
            }
        }
    }

    #[test]
    fn deltas_from_r_applied_to_view_at_r_give_the_current_view(ops in prop::collection::vec(op(), 1..80)) {
        let (mut reg, history) = run(&ops, 1000);
        for (s, views) in history.iter().enumerate() {
            let Some(current) = reg.view(&key(s as u8)) else { continue };
            for old in views {
                let delta = reg.changes_since(&key(s as u8), old.revision).expect("in window");
                prop_assert_eq!(delta.from, old.revision);
                prop_assert_eq!(delta.to, current.revision);
                let mut map = old.instances.clone();
                delta.apply_to(&mut map);
                prop_assert_eq!(&map, &current.instances);
            }
        }
    }

    #[test]
    fn lazy_publication_shows_every_write_on_the_next_take(
        ops in prop::collection::vec((op(), any::<bool>()), 1..80)
    ) {
        let now = Instant::now();
        let mut reg = registry(128);
        let mut sessions: Vec<_> = (0..3).map(|_| open(&mut reg, "t", now)).collect();
        let mut published: std::collections::HashMap<ServiceKey, Arc<roster_core::ServiceView>> = Default::default();
        for (op, read) in &ops {
            step(&mut reg, &mut sessions, op, now);
            if *read {
                for view in reg.take_unpublished() {
                    published.insert((*view.key).clone(), view);
                }
                prop_assert!(!reg.has_unpublished());
                for s in 0..3u8 {
                    let current = reg.view(&key(s));
                    let shown = published.get(&key(s));
                    prop_assert_eq!(current.map(|v| v.revision), shown.map(|v| v.revision));
                }
            }
        }
    }

    #[test]
    fn a_small_window_answers_recent_revisions_and_refuses_old_ones(ops in prop::collection::vec(op(), 1..80)) {
        let (mut reg, history) = run(&ops, 4);
        for (s, views) in history.iter().enumerate() {
            let Some(current) = reg.view(&key(s as u8)) else { continue };
            for old in views {
                match reg.changes_since(&key(s as u8), old.revision) {
                    Some(delta) => {
                        let mut map = old.instances.clone();
                        delta.apply_to(&mut map);
                        prop_assert_eq!(&map, &current.instances);
                    }
                    None => prop_assert!(old.revision < current.revision),
                }
            }
        }
    }
}

// ---- merge laws of other origins' data -------------------------------------

/// A message about another node's session, as replication delivers it.
#[derive(Debug, Clone)]
enum Msg {
    /// The session's whole data at a version (content follows the version:
    /// one origin never sends two different sets at one version).
    Apply { origin: u8, session: u8, seq: u64 },
    /// The session ended at a version.
    Drop { origin: u8, session: u8, seq: u64 },
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        3 => (0..2u8, 0..3u8, 1..8u64).prop_map(|(origin, session, seq)| Msg::Apply { origin, session, seq }),
        1 => (0..2u8, 0..3u8, 1..8u64).prop_map(|(origin, session, seq)| Msg::Drop { origin, session, seq }),
    ]
}

fn owner(origin: u8, session: u8) -> Owner {
    Owner {
        origin: format!("peer-{origin}").into(),
        session: format!("s{session}").into(),
    }
}

fn version(seq: u64) -> Version {
    Version {
        incarnation: 1,
        sequence: seq,
    }
}

/// The data a session has at `seq`: a deterministic function of it, so
/// that sessions overlap on some ids (contested) and not on others.
fn data_at(origin: u8, session: u8, seq: u64) -> SessionData {
    let hosts = [session, (session + seq as u8) % 5, 10 + origin];
    let instances = hosts
        .iter()
        .enumerate()
        .map(|(n, h)| {
            let mut i = instance(*h, (seq % 4) as u16 + 1);
            i.metadata
                .insert("from", &format!("{origin}/{session}/{seq}"));
            (key((n % 2) as u8), i, version(seq))
        })
        .collect::<Vec<_>>();
    SessionData {
        version: version(seq),
        instances: instances.into(),
    }
}

fn deliver(reg: &mut Registry, m: &Msg, now: Instant) {
    match *m {
        Msg::Apply {
            origin,
            session,
            seq,
        } => {
            reg.apply_session(owner(origin, session), data_at(origin, session, seq))
                .unwrap();
        }
        Msg::Drop {
            origin,
            session,
            seq,
        } => {
            reg.drop_session(owner(origin, session), version(seq), now);
        }
    }
}

/// Everything a reader can see: per service, each instance's id, content
/// hash and owner.
type Snapshot = Vec<Vec<(String, u64, String)>>;

fn snapshot(reg: &mut Registry) -> Snapshot {
    (0..2u8)
        .map(|s| {
            reg.view(&key(s))
                .map(|v| {
                    v.instances
                        .values()
                        .map(|r| (r.instance.id.clone(), r.hash, r.owner.to_string()))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

fn delivered(msgs: &[Msg]) -> (Registry, Snapshot) {
    let now = Instant::now();
    let mut reg = registry(128);
    for m in msgs {
        deliver(&mut reg, m, now);
    }
    let snap = snapshot(&mut reg);
    (reg, snap)
}

proptest! {
    #[test]
    fn merging_other_origins_data_is_commutative(
        (msgs, shuffled) in prop::collection::vec(msg(), 0..16)
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
    ) {
        let (_, a) = delivered(&msgs);
        let (_, b) = delivered(&shuffled);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn merging_is_idempotent(msgs in prop::collection::vec(msg(), 0..16)) {
        let (_, once) = delivered(&msgs);
        let twice: Vec<Msg> = msgs.iter().chain(msgs.iter()).cloned().collect();
        let (_, again) = delivered(&twice);
        prop_assert_eq!(once, again);
    }

    #[test]
    fn the_newest_version_of_a_session_wins_and_a_tombstone_beats_older_data(
        msgs in prop::collection::vec(msg(), 1..16),
    ) {
        let (reg, _) = delivered(&msgs);
        for origin in 0..2u8 {
            for session in 0..3u8 {
                let applies = msgs.iter().filter_map(|m| match *m {
                    Msg::Apply { origin: o, session: s, seq } if (o, s) == (origin, session) => Some(seq),
                    _ => None,
                }).max();
                let drops = msgs.iter().filter_map(|m| match *m {
                    Msg::Drop { origin: o, session: s, seq } if (o, s) == (origin, session) => Some(seq),
                    _ => None,
                }).max();
                let held = reg.held(&owner(origin, session));
                match (applies, drops) {
                    (None, None) => prop_assert!(held.is_none()),
                    (Some(a), d) if d.is_none_or(|d| a > d) => {
                        let live = matches!(held, Some(roster_core::registry::Held::Live { version, .. }) if version.sequence == a);
                        prop_assert!(live, "newest data at {} held", a);
                    }
                    (_, Some(d)) => {
                        let gone = matches!(held, Some(roster_core::registry::Held::Gone { version, .. }) if version.sequence == d);
                        prop_assert!(gone, "tombstone at {} beats older data", d);
                    }
                    (Some(_), None) => unreachable!(),
                }
            }
        }
    }
}

#[test]
fn data_of_this_nodes_own_sessions_is_never_taken_from_elsewhere() {
    let now = Instant::now();
    let mut reg = registry(16);
    let s = open(&mut reg, "t", now);
    reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    let mine = Owner {
        origin: "n1".into(),
        session: s.clone(),
    };
    let changes = reg
        .apply_session(
            mine.clone(),
            SessionData {
                version: version(1_000),
                instances: Vec::new().into(),
            },
        )
        .unwrap();
    assert!(changes.is_empty());
    assert!(reg.drop_session(mine, version(1_000), now).is_empty());
    assert_eq!(reg.view(&key(0)).unwrap().instances.len(), 1);
}

#[test]
fn dropping_an_origin_removes_its_sessions_and_keeps_them_from_coming_back_older() {
    let now = Instant::now();
    let mut reg = registry(16);
    reg.apply_session(owner(0, 0), data_at(0, 0, 3)).unwrap();
    reg.apply_session(owner(1, 1), data_at(1, 1, 3)).unwrap();
    let before = reg.instance_count();
    let changes = reg.drop_origin("peer-0", now);
    assert!(!changes.is_empty());
    assert!(reg.instance_count() < before);
    reg.apply_session(owner(0, 0), data_at(0, 0, 3)).unwrap();
    assert!(matches!(
        reg.held(&owner(0, 0)),
        Some(roster_core::registry::Held::Gone { .. })
    ));
    reg.apply_session(owner(0, 0), data_at(0, 0, 4)).unwrap();
    assert!(matches!(
        reg.held(&owner(0, 0)),
        Some(roster_core::registry::Held::Live { .. })
    ));
}

#[test]
fn a_tombstone_is_forgotten_after_its_grace_period() {
    let now = Instant::now();
    let mut reg = registry(16);
    reg.drop_session(owner(0, 0), version(5), now);
    reg.expire_tombstones(now + Duration::from_secs(59));
    assert!(reg.held(&owner(0, 0)).is_some());
    reg.expire_tombstones(now + Duration::from_secs(60));
    assert!(reg.held(&owner(0, 0)).is_none());
}

// ---- single-node behaviour --------------------------------------------------

#[test]
fn re_registering_an_identical_instance_bumps_version_and_revision() {
    let now = Instant::now();
    let mut reg = registry(128);
    let s = open(&mut reg, "t", now);
    let (a, _) = reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    let version_of = |reg: &mut Registry| {
        reg.view(&key(0))
            .unwrap()
            .instances
            .values()
            .next()
            .unwrap()
            .version
    };
    let v1 = version_of(&mut reg);
    let (b, id1) = reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    assert_eq!(&*id1, id(1));
    let v2 = version_of(&mut reg);
    assert!(b.revision > a.revision);
    assert!(v2 > v1);
    assert_eq!(reg.instance_count(), 1);
    let delta = reg.changes_since(&key(0), a.revision).unwrap();
    assert_eq!(delta.upserted.len(), 1, "the identical record is re-sent");
}

#[test]
fn invalid_writes_change_nothing() {
    let now = Instant::now();
    let mut reg = registry(128);
    let s = open(&mut reg, "t", now);
    let (ok, _) = reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    let mut bad = instance(2, 1);
    bad.port = 0;
    let err = reg.register(&s, &key(0), bad, now).unwrap_err();
    assert!(
        matches!(err, RegistryError::Invalid(ref e) if e.field == "instance.port"),
        "{err}"
    );
    let err = reg
        .register("nope", &key(0), instance(3, 1), now)
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownSession(_)));
    let mut persistent = instance(4, 1);
    persistent.ephemeral = false;
    assert!(matches!(
        reg.register(&s, &key(0), persistent, now),
        Err(RegistryError::Unsupported(_))
    ));
    let err = reg
        .modify(&s, &key(0), &id(1), |i| i.weight = 20_000.0, now)
        .unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(ref e) if e.field == "instance.weight"));
    let mut batch = vec![instance(5, 1), instance(6, 1)];
    batch[1].port = 0;
    assert!(reg.set_instances(&s, &key(0), batch, now).is_err());
    let view = reg.view(&key(0)).unwrap();
    assert_eq!(view.revision, ok.revision);
    assert_eq!(view.instances.len(), 1);
    assert_eq!(view.instances.values().next().unwrap().instance.weight, 1.0);
}

#[test]
fn a_session_cannot_change_or_remove_another_sessions_instance() {
    let now = Instant::now();
    let mut reg = registry(128);
    let owner = open(&mut reg, "owner", now);
    let other = open(&mut reg, "other", now);
    let (registered, _) = reg.register(&owner, &key(0), instance(1, 1), now).unwrap();
    assert!(matches!(
        reg.deregister(&other, &key(0), &id(1), now),
        Err(RegistryError::NotOwner { .. })
    ));
    assert!(matches!(
        reg.modify(&other, &key(0), &id(1), |i| i.weight = 0.0, now),
        Err(RegistryError::NotOwner { .. })
    ));
    assert!(matches!(
        reg.deregister(&other, &key(0), &id(9), now),
        Err(RegistryError::UnknownInstance { .. })
    ));
    let view = reg.view(&key(0)).unwrap();
    assert_eq!(view.revision, registered.revision);
    assert_eq!(view.instances.values().next().unwrap().owner.session, owner);
    // The owner can.
    reg.modify(&owner, &key(0), &id(1), |i| i.weight = 0.0, now)
        .unwrap();
    reg.deregister(&owner, &key(0), &id(1), now).unwrap();
    assert_eq!(reg.instance_count(), 0);
}

#[test]
fn an_id_held_by_two_sessions_shows_the_later_write_and_survives_either_leaving() {
    let now = Instant::now();
    let mut reg = registry(128);
    let a = open(&mut reg, "a", now);
    let b = open(&mut reg, "b", now);
    reg.register(&a, &key(0), instance(1, 1), now).unwrap();
    let (taken, _) = reg.register(&b, &key(0), instance(1, 2), now).unwrap();
    let shown = |reg: &mut Registry| {
        let v = reg.view(&key(0)).unwrap();
        let r = v.instances.values().next().unwrap().clone();
        (
            v.instances.len(),
            r.owner.session.clone(),
            r.instance.weight,
        )
    };
    assert_eq!(shown(&mut reg), (1, b.clone(), 2.0));
    // The earlier holder's session ends: nothing shown changes.
    assert!(reg.close_session(&a, now).is_empty());
    assert_eq!(reg.view(&key(0)).unwrap().revision, taken.revision);
    // Again, the other way round: the winner leaves, the other's record
    // comes back in its place (a change, never a removal).
    let c = open(&mut reg, "c", now);
    reg.register(&c, &key(0), instance(1, 3), now).unwrap();
    assert_eq!(shown(&mut reg), (1, c.clone(), 3.0));
    let before = reg.view(&key(0)).unwrap().revision;
    let changes = reg.close_session(&c, now);
    assert_eq!(changes.len(), 1);
    let delta = reg.changes_since(&key(0), before).unwrap();
    assert!(delta.removed.is_empty(), "no removal is pushed");
    assert_eq!(shown(&mut reg), (1, b.clone(), 2.0));
    assert_eq!(reg.close_session(&b, now).len(), 1);
    assert_eq!(reg.instance_count(), 0);
}

#[test]
fn replacing_a_sessions_set_is_one_revision() {
    let now = Instant::now();
    let mut reg = registry(128);
    let s = open(&mut reg, "s", now);
    reg.set_instances(&s, &key(0), vec![instance(1, 1), instance(2, 1)], now)
        .unwrap();
    let before = reg.view(&key(0)).unwrap().revision;
    let change = reg
        .set_instances(&s, &key(0), vec![instance(2, 3), instance(3, 1)], now)
        .unwrap();
    assert_eq!(change.revision, before + 1);
    let delta = reg.changes_since(&key(0), before).unwrap();
    assert_eq!(delta.removed.len(), 1);
    assert_eq!(delta.upserted.len(), 2);
    reg.set_instances(&s, &key(0), vec![], now).unwrap();
    assert!(reg.view(&key(0)).unwrap().instances.is_empty());
}

#[test]
fn expired_session_removes_its_instances_and_only_those_in_one_revision_per_service() {
    let t0 = Instant::now();
    let mut reg = registry(128);
    let quiet = open(&mut reg, "quiet", t0);
    let chatty = open(&mut reg, "chatty", t0);
    reg.register(&quiet, &key(0), instance(1, 1), t0).unwrap();
    reg.register(&quiet, &key(0), instance(4, 1), t0).unwrap();
    reg.register(&quiet, &key(1), instance(2, 1), t0).unwrap();
    reg.register(&chatty, &key(0), instance(3, 1), t0).unwrap();
    let before = reg.view(&key(0)).unwrap().revision;
    let probe_at = t0 + Duration::from_secs(20);
    let out = reg.sweep(probe_at);
    assert_eq!(out.probes.len(), 2);
    reg.touch(&chatty, probe_at + Duration::from_secs(1));
    let out = reg.sweep(probe_at + Duration::from_secs(3));
    assert_eq!(out.expired, vec![quiet.clone()]);
    assert_eq!(out.changes.len(), 2, "one change per touched service");
    let view = reg.view(&key(0)).unwrap();
    assert!(view.revision > before);
    let delta = reg.changes_since(&key(0), before).unwrap();
    assert_eq!(delta.to, before + 1, "both removals in one revision");
    let ids: Vec<_> = view.instances.keys().map(|k| k.to_string()).collect();
    assert_eq!(ids, vec![id(3)]);
    assert!(reg.view(&key(1)).unwrap().instances.is_empty());
    assert!(reg.sessions().get(&quiet).is_none());
}

#[test]
fn a_beat_lease_turns_its_instance_unhealthy_then_removes_it_and_a_beat_revives_it() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut reg = registry(128);
    let kind = SessionKind::Beat {
        unhealthy_after: s(15),
        delete_after: s(30),
    };
    for name in ["a", "b"] {
        reg.open_session(name.into(), kind, "http", 0, t0).unwrap();
    }
    reg.register("a", &key(0), instance(1, 1), t0).unwrap();
    reg.register("b", &key(0), instance(2, 1), t0).unwrap();
    assert!(reg.check_beats(t0 + s(14)).changes.is_empty());
    let out = reg.check_beats(t0 + s(15));
    assert_eq!(out.unhealthy.len(), 2);
    let view = reg.view(&key(0)).unwrap();
    assert!(view.instances.values().all(|r| !r.instance.healthy));
    // "b" beats again: healthy at once.
    assert_eq!(reg.beat("b", t0 + s(16)).unwrap().len(), 1);
    assert!(
        reg.beat("b", t0 + s(17)).unwrap().is_empty(),
        "already healthy"
    );
    let out = reg.check_beats(t0 + s(30));
    assert_eq!(out.expired, vec![SessionId::from("a")]);
    let view = reg.view(&key(0)).unwrap();
    let left: Vec<_> = view
        .instances
        .values()
        .map(|r| (r.instance.id.clone(), r.instance.healthy))
        .collect();
    assert_eq!(left, vec![(id(2), true)]);
    assert!(matches!(
        reg.beat("a", t0 + s(31)),
        Err(RegistryError::UnknownSession(_))
    ));
}

#[test]
fn coalescer_pushes_a_lone_change_at_once_and_widens_only_while_busy() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut c = Coalescer::new(ms(10), ms(40));
    let k = Arc::new(key(0));
    assert!(
        c.on_change(&k, t0),
        "first change after quiet goes out at once"
    );
    assert!(!c.on_change(&k, t0 + ms(1)));
    assert!(!c.on_change(&k, t0 + ms(2)));
    assert!(c.due(t0 + ms(9)).is_empty());
    assert_eq!(c.due(t0 + ms(10)), vec![k.clone()], "the burst is one push");
    // Still busy: the next window is twice as long.
    assert!(!c.on_change(&k, t0 + ms(11)));
    assert!(c.due(t0 + ms(29)).is_empty());
    assert_eq!(c.due(t0 + ms(30)), vec![k.clone()]);
    assert_eq!(
        c.next_deadline(),
        Some(t0 + ms(70)),
        "capped at the maximum"
    );
    // A window that ends quiet returns the service to idle.
    assert!(c.due(t0 + ms(70)).is_empty());
    assert!(c.next_deadline().is_none());
    assert!(c.on_change(&k, t0 + ms(80)), "quiet again: immediate");
    assert_eq!(
        c.next_deadline(),
        Some(t0 + ms(90)),
        "and the window is short again"
    );
}

/// A test update: its kind ('d'elta or 'f'ull) and revision.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Up(char, u64);

impl roster_core::push::Planned for Up {
    fn revision(&self) -> u64 {
        self.1
    }
}

#[test]
fn queue_overflow_replaces_a_services_updates_with_one_full_view() {
    let (a, b) = (Arc::new(key(0)), Arc::new(key(1)));
    let mut q: OutboundQueue<u32, Up> = OutboundQueue::new(3);
    let d = |r| Up('d', r);
    let f = |r| Up('f', r);
    assert_eq!(q.push_update(a.clone(), d(1), || f(1)), Enqueued::Queued);
    assert_eq!(q.push_update(b.clone(), d(2), || f(2)), Enqueued::Queued);
    assert_eq!(q.push_update(a.clone(), d(3), || f(3)), Enqueued::Queued);
    q.push_control(99);
    assert_eq!(
        q.push_update(a.clone(), d(4), || f(4)),
        Enqueued::Overflowed
    );
    assert_eq!(
        q.push_update(a.clone(), d(5), || f(5)),
        Enqueued::Absorbed,
        "the queued full view becomes the newest planned"
    );
    assert_eq!(
        q.push_update(a.clone(), d(4), || f(4)),
        Enqueued::Absorbed,
        "but never an older one"
    );
    assert_eq!(q.pop(), Some(Outbound::Control(99)));
    assert_eq!(q.pop(), Some(Outbound::Update(d(2))));
    assert_eq!(q.pop(), Some(Outbound::Update(f(5))));
    assert!(q.is_empty());
    // A subscription's full view replaces queued updates too, unless a
    // newer full view is already planned.
    q.push_update(b.clone(), d(6), || f(6));
    q.push_full(b.clone(), f(7));
    q.push_full(b.clone(), f(6));
    assert_eq!(q.pop(), Some(Outbound::Update(f(7))));
    assert!(q.pop().is_none());
}

#[test]
fn plan_groups_subscribers_by_what_they_need() {
    let k = Arc::new(key(0));
    let mut subs = Subscriptions::default();
    subs.subscribe("s1".into(), k.clone(), 10);
    subs.subscribe("s2".into(), k.clone(), 10);
    subs.subscribe("s3".into(), k.clone(), 4);
    subs.subscribe("s4".into(), k.clone(), 12);
    let plan = subs.plan(&k, 12, |r| r >= 8);
    assert_eq!(plan[&Need::DeltaFrom(10)].len(), 2);
    assert_eq!(plan[&Need::Full], vec![Arc::<str>::from("s3")]);
    assert_eq!(plan.len(), 2);
    assert!(subs.plan(&k, 12, |_| true).is_empty(), "already sent");
    subs.ack("s1", &k, 12);
    let all: Vec<_> = ["s1", "s2", "s3"]
        .into_iter()
        .map(Arc::<str>::from)
        .collect();
    // Of `all`, those still subscribed that have not acknowledged 12.
    let unacked = |subs: &Subscriptions| {
        let mut v: Vec<_> = subs
            .subscribers(&k)
            .into_iter()
            .filter(|(s, st)| all.contains(s) && st.acked < 12)
            .map(|(s, _)| s)
            .collect();
        v.sort();
        v
    };
    assert_eq!(unacked(&subs).len(), 2);
    subs.remove_session("s2");
    assert_eq!(unacked(&subs), vec![Arc::<str>::from("s3")]);
}

#[test]
fn liveness_alone_never_changes_which_of_two_holders_of_an_id_is_shown() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut reg = registry(128);
    let kind = SessionKind::Beat {
        unhealthy_after: s(15),
        delete_after: s(30),
    };
    reg.open_session("lease".into(), kind, "http", 0, t0)
        .unwrap();
    let stream = open(&mut reg, "stream", t0);
    reg.register("lease", &key(0), instance(1, 1), t0).unwrap();
    reg.register(&stream, &key(0), instance(1, 2), t0).unwrap();
    let shown = |reg: &mut Registry| {
        let v = reg.view(&key(0)).unwrap();
        let r = v.instances.values().next().unwrap().clone();
        (r.owner.session.to_string(), r.instance.healthy)
    };
    assert_eq!(shown(&mut reg), (stream.to_string(), true));
    // The lease falls silent: its copy turns unhealthy, still behind.
    reg.check_beats(t0 + s(15));
    assert_eq!(shown(&mut reg), (stream.to_string(), true));
    // And a beat brings it back healthy, still behind.
    reg.beat("lease", t0 + s(16)).unwrap();
    assert_eq!(shown(&mut reg), (stream.to_string(), true));
}

#[test]
fn a_beat_makes_a_silenced_instance_healthy_even_after_an_update() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut reg = registry(128);
    let kind = SessionKind::Beat {
        unhealthy_after: s(15),
        delete_after: s(30),
    };
    reg.open_session("lease".into(), kind, "http", 0, t0)
        .unwrap();
    reg.register("lease", &key(0), instance(1, 1), t0).unwrap();
    assert_eq!(reg.check_beats(t0 + s(15)).unhealthy.len(), 1);
    assert!(
        reg.check_beats(t0 + s(16)).unhealthy.is_empty(),
        "an instance already unhealthy is not news"
    );
    // An update (no health in it) while silent, then a beat.
    reg.modify("lease", &key(0), &id(1), |i| i.weight = 3.0, t0 + s(17))
        .unwrap();
    assert_eq!(reg.beat("lease", t0 + s(18)).unwrap().len(), 1);
    let view = reg.view(&key(0)).unwrap();
    let r = view.instances.values().next().unwrap();
    assert!(r.instance.healthy);
    assert_eq!(r.instance.weight, 3.0);
    // A stream session's beat renews it and nothing else.
    let stream = open(&mut reg, "stream", t0);
    let mut sick = instance(2, 1);
    sick.healthy = false;
    reg.register(&stream, &key(0), sick, t0).unwrap();
    assert!(reg.beat(&stream, t0 + s(1)).unwrap().is_empty());
}

/// What a refused write must leave as it was: each service's revision
/// and view, and the counts.
fn state(reg: &mut Registry) -> (Vec<(u64, usize)>, usize, usize) {
    let views = (0..3u8)
        .map(|s| {
            reg.view(&key(s))
                .map_or((0, 0), |v| (v.revision, v.instances.len()))
        })
        .collect();
    (views, reg.instance_count(), reg.service_count())
}

/// Small limits, so random operations reach each of them.
fn limited() -> Registry {
    Registry::new(
        "n1",
        7,
        RegistryConfig {
            limits: roster_core::Limits {
                sessions: 4,
                services: 2,
                instances: 7,
                instances_per_service: 5,
                instances_per_session: 4,
                addresses_per_instance: 2,
                metadata_bytes: 64,
            },
            ..RegistryConfig::default()
        },
    )
}

proptest! {
    /// Whatever the sessions write, the registry never holds more than its
    /// limits, and a write refused for a limit changes nothing.
    #[test]
    fn limits_are_never_passed_and_a_refused_write_changes_nothing(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        let now = Instant::now();
        let mut reg = limited();
        let mut sessions: Vec<SessionId> = (0..3).map(|_| open(&mut reg, "t", now)).collect();
        for op in &ops {
            let before = state(&mut reg);
            let result = match op {
                Op::Register { session, service, host, weight } => reg
                    .register(&sessions[*session], &key(*service), instance(*host, *weight), now)
                    .map(|_| ()),
                Op::Replace { session, service, hosts } => {
                    let instances = hosts.iter().map(|h| instance(*h, 1)).collect();
                    reg.set_instances(&sessions[*session], &key(*service), instances, now)
                        .map(|_| ())
                }
                Op::CloseSession { session } => {
                    reg.close_session(&sessions[*session], now);
                    sessions[*session] = open(&mut reg, "t", now);
                    Ok(())
                }
                // Removals and edits never grow what is held.
                _ => Ok(()),
            };
            match result {
                Ok(()) => {}
                Err(RegistryError::Limit(_)) => prop_assert_eq!(&state(&mut reg), &before),
                Err(e) => panic!("{e}"),
            }
            prop_assert!(reg.instance_count() <= 7);
            prop_assert!(reg.service_count() <= 2);
            prop_assert!(reg.sessions().len() <= 4);
            for s in 0..3u8 {
                prop_assert!(reg.view(&key(s)).map_or(0, |v| v.instances.len()) <= 5);
            }
            for (_, held) in reg.held_sessions() {
                prop_assert!(held.records().map_or(0, |r| r.len()) <= 4);
            }
        }
    }
}

#[test]
fn an_instance_over_its_size_limits_is_refused_naming_the_limit() {
    let now = Instant::now();
    let mut reg = limited();
    let s = open(&mut reg, "t", now);
    let mut wide = instance(1, 1);
    for n in 0..3 {
        wide.addresses.push(roster_core::Address {
            network: format!("net{n}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, n)),
        });
    }
    let err = reg.register(&s, &key(0), wide, now).unwrap_err();
    assert!(
        err.to_string()
            .contains("limits.addresses_per_instance is 2"),
        "{err}"
    );
    let mut heavy = instance(1, 1);
    heavy.metadata.insert("k", &"v".repeat(100));
    let err = reg.register(&s, &key(0), heavy, now).unwrap_err();
    assert!(matches!(err, RegistryError::Limit(h) if h.key == "metadata_bytes" && h.is_size()));
    assert_eq!(reg.instance_count(), 0);
    assert_eq!(reg.service_count(), 0);
}

#[test]
fn after_one_service_overflows_the_others_still_queue_deltas() {
    let (a, b) = (Arc::new(key(0)), Arc::new(key(1)));
    let mut q: OutboundQueue<u32, Up> = OutboundQueue::new(3);
    let d = |r| Up('d', r);
    let f = |r| Up('f', r);
    for r in 1..=3 {
        assert_eq!(q.push_update(a.clone(), d(r), || f(r)), Enqueued::Queued);
    }
    assert_eq!(
        q.push_update(a.clone(), d(4), || f(4)),
        Enqueued::Overflowed
    );
    assert_eq!(
        q.len(),
        1,
        "a's three deltas are superseded by its full view"
    );
    // Room for b's deltas again: the superseded slots do not count.
    assert_eq!(q.push_update(b.clone(), d(5), || f(5)), Enqueued::Queued);
    assert_eq!(q.push_update(b.clone(), d(6), || f(6)), Enqueued::Queued);
    assert_eq!(q.pop(), Some(Outbound::Update(f(4))));
    assert_eq!(q.pop(), Some(Outbound::Update(d(5))));
    assert_eq!(q.pop(), Some(Outbound::Update(d(6))));
    assert!(q.pop().is_none());
    assert!(q.is_empty());
    // And a's updates after its full view was sent are deltas again.
    assert_eq!(q.push_update(a.clone(), d(7), || f(7)), Enqueued::Queued);
    assert_eq!(q.pop(), Some(Outbound::Update(d(7))));
}

#[test]
fn an_emptied_service_is_forgotten_after_its_grace_and_comes_back_at_a_higher_revision() {
    let now = Instant::now();
    let grace = RegistryConfig::default().empty_service_grace;
    let mut reg = registry(8);
    let s = open(&mut reg, "t", now);
    reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    reg.take_unpublished();
    assert!(reg.forget_empty_services(now).is_empty(), "not empty");
    reg.deregister(&s, &key(0), &id(1), now).unwrap();
    let emptied_at = reg.view(&key(0)).unwrap().revision;
    reg.take_unpublished();
    assert!(reg.forget_empty_services(now).is_empty(), "seen empty now");
    // Filled and emptied again meanwhile: the wait starts over.
    reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    reg.deregister(&s, &key(0), &id(1), now).unwrap();
    reg.take_unpublished();
    assert!(reg.forget_empty_services(now + grace).is_empty());
    assert_eq!(reg.forget_empty_services(now + grace * 2).len(), 1);
    assert!(!reg.has_service(&key(0)));
    assert_eq!(reg.service_count(), 0);
    reg.register(&s, &key(0), instance(2, 1), now).unwrap();
    assert!(reg.view(&key(0)).unwrap().revision > emptied_at + 2);
}
