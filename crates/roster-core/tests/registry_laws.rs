//! Laws of the registry state, checked over random operation sequences.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use roster_core::checksum::view_checksum;
use roster_core::push::{Coalescer, Enqueued, Need, Outbound, OutboundQueue, Subscriptions};
use roster_core::session::SessionKind;
use roster_core::{Instance, Registry, RegistryConfig, RegistryError, ServiceKey};

#[derive(Debug, Clone)]
enum Op {
    Register {
        session: usize,
        service: u8,
        host: u8,
        weight: u16,
    },
    Deregister {
        service: u8,
        host: u8,
    },
    SetWeight {
        service: u8,
        host: u8,
        weight: u16,
    },
    CloseSession {
        session: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3u8, 0..12u8, 0..5u16).prop_map(|(session, service, host, weight)| Op::Register { session, service, host, weight }),
        2 => (0..3u8, 0..12u8).prop_map(|(service, host)| Op::Deregister { service, host }),
        1 => (0..3u8, 0..12u8, 0..5u16).prop_map(|(service, host, weight)| Op::SetWeight { service, host, weight }),
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

/// Runs `ops`, returning the registry and, per service, every view it had.
fn run(ops: &[Op], window: usize) -> (Registry, Vec<Vec<Arc<roster_core::ServiceView>>>) {
    let now = Instant::now();
    let mut reg = Registry::new(
        7,
        RegistryConfig {
            delta_window: window,
            ..RegistryConfig::default()
        },
    );
    let mut sessions: Vec<_> = (0..3)
        .map(|_| reg.open_session(SessionKind::Stream, "t", now))
        .collect();
    let mut history = vec![Vec::new(); 3];
    for op in ops {
        let before: Vec<u64> = (0..3)
            .map(|s| reg.view(&key(s)).map_or(0, |v| v.revision))
            .collect();
        let touched: Vec<u8> = match op {
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
                vec![*service]
            }
            Op::Deregister { service, host } => match reg.deregister(&key(*service), &id(*host)) {
                Ok(_) => vec![*service],
                Err(RegistryError::UnknownInstance { .. } | RegistryError::UnknownService(_)) => {
                    vec![]
                }
                Err(e) => panic!("{e}"),
            },
            Op::SetWeight {
                service,
                host,
                weight,
            } => {
                match reg.modify(&key(*service), &id(*host), |i| {
                    i.weight = f64::from(*weight)
                }) {
                    Ok(_) => vec![*service],
                    Err(_) => vec![],
                }
            }
            Op::CloseSession { session } => {
                let changes = reg.close_session(&sessions[*session]);
                sessions[*session] = reg.open_session(SessionKind::Stream, "t", now);
                changes
                    .iter()
                    .map(|c| c.key.service[4..].parse().unwrap())
                    .collect()
            }
        };
        for s in 0..3u8 {
            let Some(view) = reg.view(&key(s)) else {
                continue;
            };
            if touched.contains(&s) {
                assert!(
                    view.revision > before[s as usize],
                    "a write must bump the revision"
                );
            } else {
                assert_eq!(
                    view.revision, before[s as usize],
                    "untouched services keep their revision"
                );
            }
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
    fn lazy_publication_shows_every_write_on_the_next_read(
        ops in prop::collection::vec((op(), any::<bool>()), 1..80)
    ) {
        let now = Instant::now();
        let mut reg = Registry::new(7, RegistryConfig::default());
        let mut eager = Registry::new(7, RegistryConfig::default());
        let sessions: Vec<_> = (0..3)
            .map(|_| {
                eager.open_session(SessionKind::Stream, "t", now);
                reg.open_session(SessionKind::Stream, "t", now)
            })
            .collect();
        for (op, read) in &ops {
            for r in [&mut reg, &mut eager] {
                match op {
                    Op::Register { session, service, host, weight } => {
                        r.register(&sessions[*session], &key(*service), instance(*host, *weight), now).unwrap();
                    }
                    Op::Deregister { service, host } => { let _ = r.deregister(&key(*service), &id(*host)); }
                    Op::SetWeight { service, host, weight } => {
                        let _ = r.modify(&key(*service), &id(*host), |i| i.weight = f64::from(*weight));
                    }
                    Op::CloseSession { .. } => {}
                }
            }
            // The eager registry publishes after every write; the lazy one
            // only sometimes. Whenever it does, it equals the eager one.
            let expected = eager.published().clone();
            if *read {
                let got = reg.published().clone();
                prop_assert!(!reg.has_unpublished());
                prop_assert_eq!(got.len(), expected.len());
                for (k, v) in &expected {
                    let g = &got[k];
                    prop_assert_eq!(g.revision, v.revision);
                    prop_assert_eq!(g.checksum, v.checksum);
                    prop_assert_eq!(&g.instances, &v.instances);
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

#[test]
fn re_registering_an_identical_instance_bumps_version_and_revision() {
    let now = Instant::now();
    let mut reg = Registry::new(1, RegistryConfig::default());
    let s = reg.open_session(SessionKind::Stream, "t", now);
    let (a, _) = reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    let v1 = reg
        .view(&key(0))
        .unwrap()
        .instances
        .values()
        .next()
        .unwrap()
        .version;
    let (b, id1) = reg.register(&s, &key(0), instance(1, 1), now).unwrap();
    assert_eq!(&*id1, id(1));
    let v2 = reg
        .view(&key(0))
        .unwrap()
        .instances
        .values()
        .next()
        .unwrap()
        .version;
    assert!(b.revision > a.revision);
    assert!(v2 > v1);
    assert_eq!(reg.instance_count(), 1);
    let delta = reg.changes_since(&key(0), a.revision).unwrap();
    assert_eq!(delta.upserted.len(), 1, "the identical record is re-sent");
}

#[test]
fn invalid_writes_change_nothing() {
    let now = Instant::now();
    let mut reg = Registry::new(1, RegistryConfig::default());
    let s = reg.open_session(SessionKind::Stream, "t", now);
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
        .modify(&key(0), &id(1), |i| i.weight = 20_000.0)
        .unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(ref e) if e.field == "instance.weight"));
    let view = reg.view(&key(0)).unwrap();
    assert_eq!(view.revision, ok.revision);
    assert_eq!(view.instances.len(), 1);
    assert_eq!(view.instances.values().next().unwrap().instance.weight, 1.0);
}

#[test]
fn expired_session_removes_its_instances_and_only_those() {
    let t0 = Instant::now();
    let mut reg = Registry::new(1, RegistryConfig::default());
    let quiet = reg.open_session(SessionKind::Stream, "quiet", t0);
    let chatty = reg.open_session(SessionKind::Stream, "chatty", t0);
    reg.register(&quiet, &key(0), instance(1, 1), t0).unwrap();
    reg.register(&quiet, &key(1), instance(2, 1), t0).unwrap();
    reg.register(&chatty, &key(0), instance(3, 1), t0).unwrap();
    let probe_at = t0 + Duration::from_secs(20);
    let out = reg.sweep(probe_at);
    assert_eq!(out.probes.len(), 2);
    reg.touch(&chatty, probe_at + Duration::from_secs(1));
    let out = reg.sweep(probe_at + Duration::from_secs(3));
    assert_eq!(out.expired, vec![quiet.clone()]);
    assert_eq!(out.changes.len(), 2, "one change per touched service");
    let ids: Vec<_> = reg
        .view(&key(0))
        .unwrap()
        .instances
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(ids, vec![id(3)]);
    assert!(reg.view(&key(1)).unwrap().instances.is_empty());
    assert!(reg.sessions().get(&quiet).is_none());
}

#[test]
fn registering_an_instance_owned_by_another_session_moves_ownership() {
    let now = Instant::now();
    let mut reg = Registry::new(1, RegistryConfig::default());
    let a = reg.open_session(SessionKind::Stream, "a", now);
    let b = reg.open_session(SessionKind::Stream, "b", now);
    reg.register(&a, &key(0), instance(1, 1), now).unwrap();
    reg.register(&b, &key(0), instance(1, 1), now).unwrap();
    assert!(reg.close_session(&a).is_empty(), "a no longer owns it");
    assert_eq!(reg.view(&key(0)).unwrap().instances.len(), 1);
    assert_eq!(reg.close_session(&b).len(), 1);
    assert_eq!(reg.instance_count(), 0);
}

#[test]
fn coalescer_pushes_a_lone_change_at_once_and_merges_a_burst() {
    let t0 = Instant::now();
    let w = Duration::from_millis(10);
    let mut c = Coalescer::new(w);
    let k = Arc::new(key(0));
    assert!(
        c.on_change(&k, t0),
        "first change after quiet goes out at once"
    );
    assert!(!c.on_change(&k, t0 + Duration::from_millis(1)));
    assert!(!c.on_change(&k, t0 + Duration::from_millis(2)));
    assert!(c.due(t0 + Duration::from_millis(9)).is_empty());
    assert_eq!(c.due(t0 + w), vec![k.clone()], "the burst is one push");
    assert_eq!(
        c.due(t0 + 2 * w),
        Vec::<Arc<ServiceKey>>::new(),
        "quiet window ends idle"
    );
    assert!(c.next_deadline().is_none());
    assert!(c.on_change(&k, t0 + 3 * w), "quiet again: immediate");
}

#[test]
fn queue_overflow_replaces_a_services_updates_with_one_full_view() {
    let (a, b) = (Arc::new(key(0)), Arc::new(key(1)));
    let mut q = OutboundQueue::new(3);
    assert_eq!(q.push_update(a.clone(), 1), Enqueued::Queued);
    assert_eq!(q.push_update(b.clone(), 2), Enqueued::Queued);
    assert_eq!(q.push_update(a.clone(), 3), Enqueued::Queued);
    q.push_control(99);
    assert_eq!(q.push_update(a.clone(), 4), Enqueued::Overflowed);
    assert_eq!(q.push_update(a.clone(), 5), Enqueued::Absorbed);
    assert_eq!(q.pop(), Some(Outbound::Control(99)));
    assert_eq!(q.pop(), Some(Outbound::Update { key: b, payload: 2 }));
    assert_eq!(q.pop(), Some(Outbound::FullView(a)));
    assert!(q.is_empty());
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
    assert_eq!(subs.unacked(&k, 12, &all).len(), 2);
    subs.remove_session("s2");
    assert_eq!(subs.unacked(&k, 12, &all), vec![Arc::<str>::from("s3")]);
}
