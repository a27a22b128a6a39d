//! Data belongs to the session that wrote it: a real node on loopback,
//! driven over gRPC and HTTP by sessions on separate connections, as
//! clients and attackers would. Also: sessions are unguessable and bound
//! to their connection, drain tells who it reached, subscriptions never
//! outlive their session, and readiness is real.

use std::time::Duration;

use roster_client::{Connection, Session, proto};
use roster_core::{Instance, ServiceKey};
use roster_server::RunningServer;
use tokio::time::timeout;

mod common;
use common::{key, start_with};

const WAIT: Duration = Duration::from_secs(10);

/// A new connection (its own TCP connection) to the node.
async fn connect(server: &RunningServer) -> Connection {
    Connection::connect(&server.grpc_addr.to_string())
        .await
        .unwrap()
}

fn instance(last: u8, port: u16) -> Instance {
    Instance::new(format!("10.7.0.{last}").parse().unwrap(), port)
}

fn reference(k: &ServiceKey, last: u8, port: u16) -> proto::InstanceRef {
    proto::InstanceRef {
        service: Some(k.into()),
        ip: format!("10.7.0.{last}"),
        port: u32::from(port),
        ..Default::default()
    }
}

/// (id, owner session, weight) of every instance listed.
async fn listed(conn: &Connection, k: &ServiceKey) -> Vec<(String, String, f64)> {
    let q = conn.query(k, false).await.unwrap();
    q.instances
        .into_iter()
        .map(|i| (i.id, i.owner, i.weight.unwrap_or_default()))
        .collect()
}

/// Reads updates of `session` until `done` holds for the cache, returning
/// every update seen.
async fn follow(
    session: &mut Session,
    cache: &mut roster_client::cache::ServiceCache,
    done: impl Fn(&roster_client::cache::ServiceCache) -> bool,
) -> Vec<proto::ServiceUpdate> {
    let mut seen = Vec::new();
    timeout(WAIT, async {
        while !done(cache) {
            let update = session.next_update().await.expect("open").unwrap();
            cache.apply(&update).expect("applies");
            let k = update.service.clone().unwrap().to_model().unwrap();
            drop(session.ack(&k, cache.revision));
            seen.push(update);
        }
    })
    .await
    .expect("the update arrived");
    seen
}

#[tokio::test]
async fn a_session_cannot_remove_or_change_another_sessions_instance() {
    let server = start_with(|_| {}).await;
    let k = key("owned");
    let (a, b) = (connect(&server).await, connect(&server).await);
    let owner = a.open_session("owner").await.unwrap();
    let other = b.open_session("other").await.unwrap();
    owner.register(&k, &instance(1, 80)).await.unwrap();
    let before = a.query(&k, false).await.unwrap();

    let err = other.deregister(reference(&k, 1, 80)).await.unwrap_err();
    assert!(
        err.to_string().contains("belongs to another session"),
        "{err}"
    );
    let mut changed = instance(1, 80).normalize().unwrap();
    changed.weight = 0.0;
    let err = other.update(&k, &changed).await.unwrap_err();
    assert!(
        err.to_string().contains("belongs to another session"),
        "{err}"
    );
    // Unary calls naming the owner's session from another connection.
    let err = b
        .grpc()
        .deregister(proto::DeregisterRequest {
            instance: Some(reference(&k, 1, 80)),
            session_id: owner.id().to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(a.query(&k, false).await.unwrap(), before, "nothing changed");

    // The owner can.
    owner.update(&k, &changed).await.unwrap();
    owner.deregister(reference(&k, 1, 80)).await.unwrap();
    assert!(listed(&a, &k).await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn re_registering_someone_elses_address_and_leaving_removes_nothing() {
    let server = start_with(|_| {}).await;
    let k = key("squatted");
    let conn = connect(&server).await;
    let mut watcher = conn.open_session("watcher").await.unwrap();
    watcher.subscribe(&k).await.unwrap();
    let mut cache = roster_client::cache::ServiceCache::default();
    let owner = connect(&server).await.open_session("owner").await.unwrap();
    owner.register(&k, &instance(2, 80)).await.unwrap();
    follow(&mut watcher, &mut cache, |c| c.len() == 1).await;

    let squatter = connect(&server)
        .await
        .open_session("squatter")
        .await
        .unwrap();
    let mut theirs = instance(2, 80);
    theirs.weight = 9.0;
    squatter.register(&k, &theirs).await.unwrap();
    let shown = listed(&conn, &k).await;
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].1, squatter.id(), "the later registration is shown");
    let revision = conn.query(&k, false).await.unwrap().revision;
    follow(&mut watcher, &mut cache, |c| c.revision >= revision).await;

    // The squatter leaves: the owner's instance is shown again, and the
    // watcher never sees it removed.
    squatter.close().await;
    let seen = follow(&mut watcher, &mut cache, |c| {
        c.get("10.7.0.2#80#DEFAULT")
            .is_some_and(|i| i.weight == 1.0)
    })
    .await;
    for update in &seen {
        if let Some(proto::service_update::Kind::Delta(d)) = &update.kind {
            assert!(d.removed.is_empty(), "no removal was pushed: {d:?}");
        }
    }
    let shown = listed(&conn, &k).await;
    assert_eq!(shown[0].1, owner.id());
    server.shutdown().await;
}

#[tokio::test]
async fn sessions_are_unguessable_and_a_unary_call_needs_their_connection_or_token() {
    let server = start_with(|_| {}).await;
    let k = key("bound");
    let (a, b) = (connect(&server).await, connect(&server).await);
    let s = a.open_session("s").await.unwrap();
    let t = a.open_session("t").await.unwrap();
    for id in [s.id(), t.id()] {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(s.id(), t.id());
    assert_eq!(s.token().len(), 32);
    let register = |last| proto::RegisterRequest {
        session_id: s.id().to_owned(),
        service: Some((&k).into()),
        instance: Some(proto::Instance::from_model(&instance(last, 80))),
    };
    // From the session's own connection: accepted.
    a.grpc().register(register(3)).await.unwrap();
    // From another connection: only with the session's token.
    let err = b.grpc().register(register(4)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let with = |token: &str| {
        let mut r = tonic::Request::new(register(4));
        r.metadata_mut()
            .insert("x-roster-session-token", token.parse().unwrap());
        r
    };
    let err = b.grpc().register(with(t.token())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "another's token");
    b.grpc().register(with(s.token())).await.unwrap();
    let owners: Vec<_> = listed(&a, &k).await.into_iter().map(|l| l.1).collect();
    assert_eq!(owners, [s.id(), s.id()]);
    server.shutdown().await;
}

#[tokio::test]
async fn an_operator_with_the_admin_token_may_remove_any_instance_and_nobody_else() {
    let server = start_with(|c| c.admin.token = "s3cret".into()).await;
    let k = key("operated");
    let owner = connect(&server).await.open_session("owner").await.unwrap();
    owner.register(&k, &instance(5, 80)).await.unwrap();
    let plain = connect(&server).await;
    let err = plain.deregister(reference(&k, 5, 80)).await.unwrap_err();
    assert!(err.to_string().contains("session_id"), "{err}");
    let wrong = connect(&server).await.with_admin_token("guess").unwrap();
    let err = wrong.deregister(reference(&k, 5, 80)).await.unwrap_err();
    assert!(err.to_string().contains("admin token"), "{err}");
    assert_eq!(listed(&plain, &k).await.len(), 1);
    let operator = connect(&server).await.with_admin_token("s3cret").unwrap();
    operator.deregister(reference(&k, 5, 80)).await.unwrap();
    assert!(listed(&plain, &k).await.is_empty());
    server.shutdown().await;

    // A node without an admin token has no operator.
    let server = start_with(|_| {}).await;
    let owner = connect(&server).await.open_session("owner").await.unwrap();
    owner.register(&k, &instance(5, 80)).await.unwrap();
    let anyone = connect(&server).await.with_admin_token("").unwrap();
    assert!(anyone.deregister(reference(&k, 5, 80)).await.is_err());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_reports_who_acknowledged_who_left_and_who_cannot_acknowledge() {
    let server = start_with(|_| {}).await;
    let k = key("drained");
    let provider = connect(&server)
        .await
        .open_session("provider")
        .await
        .unwrap();
    provider.register(&k, &instance(6, 80)).await.unwrap();
    // A subscriber that applies and acknowledges everything.
    let spawn_acker = |mut s: Session| {
        let k = k.clone();
        tokio::spawn(async move {
            while let Some(Ok(u)) = s.next_update().await {
                let _ = s.ack(&k, u.revision).await;
            }
        })
    };
    let acker = connect(&server).await.open_session("acker").await.unwrap();
    acker.subscribe(&k).await.unwrap();
    let acker = spawn_acker(acker);
    // One that never acknowledges, and leaves during the drain.
    let leaver = connect(&server).await.open_session("leaver").await.unwrap();
    leaver.subscribe(&k).await.unwrap();
    // An HTTP poller, which has no way to acknowledge.
    let http = reqwest::Client::new();
    http.get(format!(
        "http://{}/nacos/v1/ns/instance/list?serviceName=drained",
        server.http_addr
    ))
    .send()
    .await
    .unwrap()
    .error_for_status()
    .unwrap();

    let drained = k.clone();
    let drain = tokio::spawn(async move {
        let r = provider
            .drain(reference(&drained, 6, 80), false, Duration::from_secs(5))
            .await;
        (r, provider)
    });
    // The drain has begun once the weight is 0.
    let watcher = connect(&server).await;
    timeout(WAIT, async {
        while listed(&watcher, &k).await.first().map(|i| i.2) != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the drain set the weight to 0");
    // A subscriber arriving while the drain waits is waited for too.
    let late = connect(&server).await.open_session("late").await.unwrap();
    late.subscribe(&key("drained")).await.unwrap();
    let late = spawn_acker(late);
    tokio::time::sleep(Duration::from_millis(100)).await;
    leaver.close().await;

    let (r, _provider) = timeout(WAIT, drain).await.unwrap().unwrap();
    let r = r.unwrap();
    assert!(r.complete, "{r:?}");
    let names = |v: &[String]| {
        v.iter()
            .map(|s| s.split(' ').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut acknowledged = names(&r.acknowledged);
    acknowledged.sort();
    assert_eq!(acknowledged, ["acker", "late"], "{r:?}");
    assert_eq!(names(&r.gone), ["leaver"], "gone, not acknowledged: {r:?}");
    assert!(r.pending.is_empty(), "{r:?}");
    assert_eq!(r.unconfirmable.len(), 1, "{r:?}");
    assert!(r.unconfirmable[0].starts_with("nacos-http"), "{r:?}");
    acker.abort();
    late.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_never_outlives_its_session() {
    let server = start_with(|_| {}).await;
    let k = key("orphans");
    let conn = connect(&server).await;
    for _ in 0..200 {
        let s = conn.open_session("racer").await.unwrap();
        let mut grpc = conn.grpc();
        let subscribe = grpc.subscribe(proto::SubscribeRequest {
            session_id: s.id().to_owned(),
            service: Some((&k).into()),
        });
        // The subscription and the end of the session race.
        let (_, _) = tokio::join!(subscribe, s.close());
    }
    timeout(WAIT, async {
        while server.node.counts().0 > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every session ended");
    assert_eq!(
        server.node.subscription_count(),
        0,
        "no orphan subscription"
    );
    assert_eq!(server.node.subscriber_count(&k), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_node_shutting_down_takes_no_new_session_and_is_not_ready() {
    let server = start_with(|_| {}).await;
    let base = format!("http://{}", server.http_addr);
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status("/readyz").await, 200);
    assert_eq!(status("/nacos/v1/console/health/readiness").await, 200);
    let conn = connect(&server).await;
    let held = conn.open_session("held").await.unwrap();

    server.node.begin_drain();
    assert_eq!(status("/readyz").await, 503);
    assert_eq!(status("/nacos/v1/console/health/readiness").await, 503);
    assert_eq!(status("/healthz").await, 200, "alive, though not ready");
    let metrics: serde_json::Value = http
        .get(format!("{base}/nacos/v1/ns/operator/metrics"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        metrics["status"], "DOWN",
        "Nacos clients move to another server"
    );
    let err = conn.open_session("late").await.err().expect("refused");
    assert!(err.to_string().contains("shutting down"), "{err}");
    let r = http
        .post(format!("{base}/v1/instances"))
        .json(&serde_json::json!({"service": "s", "ip": "10.7.0.9", "port": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // Sessions already open still work until the node stops.
    held.register(&key("s"), &instance(9, 1)).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn welcomes_full_views_and_pulls_carry_the_node_epoch_which_a_restart_raises() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_string_lossy().into_owned();
    let boot = |dir: String| {
        start_with(move |c| {
            c.server.node_name = "node-a".into();
            c.server.data_dir = dir;
        })
    };
    let server = boot(dir.clone()).await;
    let conn = connect(&server).await;
    let s = conn.open_session("s").await.unwrap();
    let epoch = s.epoch().unwrap().clone();
    assert_eq!(epoch.node.as_str(), "node-a");
    let k = key("epoch");
    s.register(&k, &instance(1, 1)).await.unwrap();
    let full = s.subscribe(&k).await.unwrap();
    assert_eq!(full.epoch.as_ref(), Some(&epoch));
    let pull = conn.pull(&k, 0, 0).await.unwrap();
    assert_eq!(pull.epoch.as_ref(), Some(&epoch));
    assert_eq!(pull.update.unwrap().epoch.as_ref(), Some(&epoch));
    let same = conn.pull(&k, full.revision, 0).await.unwrap();
    assert!(same.not_modified);
    assert_eq!(same.epoch.as_ref(), Some(&epoch));
    server.shutdown().await;

    let server = boot(dir).await;
    let s = connect(&server).await.open_session("s").await.unwrap();
    let next = s.epoch().unwrap().incarnation;
    assert!(
        next > epoch.incarnation,
        "the next life: {next} after {}",
        epoch.incarnation
    );
    server.shutdown().await;
}

#[tokio::test]
async fn dropping_a_session_without_closing_it_ends_it() {
    let server = start_with(|_| {}).await;
    let k = key("dropped");
    let conn = connect(&server).await;
    let s = conn.open_session("dropped").await.unwrap();
    s.register(&k, &instance(8, 80)).await.unwrap();
    drop(s);
    timeout(WAIT, async {
        while !listed(&conn, &k).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("its instance went with it");
    server.shutdown().await;
}
