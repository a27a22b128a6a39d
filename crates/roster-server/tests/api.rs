//! A real node on loopback port 0, driven over gRPC and HTTP.

use std::time::Duration;

use prost::Message;
use roster_client::cache::ServiceCache;
use roster_client::{Connection as Client, Session, proto};
use roster_core::{Instance, ServiceKey};
use roster_server::{Config, RunningServer};
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;

mod common;
use common::{key, start_with};

const WAIT: Duration = Duration::from_secs(10);

async fn start(tweak: impl FnOnce(&mut Config)) -> (RunningServer, Client) {
    let server = start_with(tweak).await;
    let client = Client::connect(&server.grpc_addr.to_string())
        .await
        .unwrap();
    (server, client)
}

fn instance(last: u8, port: u16) -> Instance {
    Instance::new(format!("10.1.0.{last}").parse().unwrap(), port)
}

fn reference(k: &ServiceKey, last: u8, port: u16) -> proto::InstanceRef {
    proto::InstanceRef {
        service: Some(k.into()),
        ip: format!("10.1.0.{last}"),
        port: u32::from(port),
        ..Default::default()
    }
}

/// Applies updates from `session` until `done(cache)` holds.
async fn watch_until(
    session: &mut Session,
    cache: &mut ServiceCache,
    done: impl Fn(&ServiceCache) -> bool,
) {
    timeout(WAIT, async {
        while !done(cache) {
            let update = session.next_update().await.expect("session open").unwrap();
            cache.apply(&update).expect("updates apply in order");
            session
                .ack(
                    &update.service.clone().unwrap().to_model().unwrap(),
                    cache.revision,
                )
                .await
                .unwrap();
        }
    })
    .await
    .expect("the expected update arrived in time");
}

#[tokio::test]
async fn watch_sees_registration_and_deregistration() {
    let (server, client) = start(|_| {}).await;
    let k = key("orders");
    let mut watcher = client.open_session("watcher").await.unwrap();
    let first = watcher.subscribe(&k).await.unwrap();
    assert_eq!(first.revision, 0);
    let mut cache = ServiceCache::default();

    let provider = client.open_session("provider").await.unwrap();
    let id = provider.register(&k, &instance(1, 80)).await.unwrap();
    assert_eq!(id, "10.1.0.1#80#DEFAULT");
    watch_until(&mut watcher, &mut cache, |c| c.get(&id).is_some()).await;

    provider.deregister(reference(&k, 1, 80)).await.unwrap();
    watch_until(&mut watcher, &mut cache, |c| c.is_empty() && c.revision > 1).await;
    let listed = client.query(&k, false).await.unwrap();
    assert_eq!(listed.revision, cache.revision);
    assert_eq!(listed.checksum, cache.checksum);
    server.shutdown().await;
}

#[tokio::test]
async fn closing_a_session_removes_its_instances_and_tells_subscribers() {
    let (server, client) = start(|_| {}).await;
    let k = key("payments");
    let mut watcher = client.open_session("watcher").await.unwrap();
    watcher.subscribe(&k).await.unwrap();
    let mut cache = ServiceCache::default();
    let provider = client.open_session("provider").await.unwrap();
    for port in 1..=3 {
        provider.register(&k, &instance(2, port)).await.unwrap();
    }
    watch_until(&mut watcher, &mut cache, |c| c.len() == 3).await;
    provider.close().await;
    watch_until(&mut watcher, &mut cache, |c| c.is_empty()).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_changes_reaches_a_subscriber_as_few_pushes_with_the_final_view() {
    let (server, client) = start(|c| c.push.coalesce_window = Duration::from_millis(50)).await;
    let k = key("burst");
    let mut watcher = client.open_session("watcher").await.unwrap();
    watcher.subscribe(&k).await.unwrap();
    let mut cache = ServiceCache::default();
    let provider = client.open_session("provider").await.unwrap();
    for port in 1..=200 {
        provider.register(&k, &instance(3, port)).await.unwrap();
    }
    let mut updates = 0;
    timeout(WAIT, async {
        while cache.len() < 200 {
            let u = watcher.next_update().await.unwrap().unwrap();
            cache.apply(&u).unwrap();
            updates += 1;
        }
    })
    .await
    .unwrap();
    assert!(updates < 100, "200 changes arrived as {updates} pushes");
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_overflows_then_gets_one_full_view() {
    let (server, client) = start(|c| {
        c.push.queue_capacity = 8;
        c.push.coalesce_window = Duration::from_millis(1);
    })
    .await;
    let k = key("flood");
    // A raw session whose stream we do not read.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::ClientMessage {
        channel: 0,
        kind: Some(proto::client_message::Kind::Hello(proto::Hello {
            client_name: "stuck".into(),
        })),
    })
    .await
    .unwrap();
    let mut stuck = client
        .grpc()
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = match stuck.message().await.unwrap().unwrap().kind {
        Some(proto::server_message::Kind::Welcome(w)) => w,
        other => panic!("expected welcome, got {other:?}"),
    };
    client
        .grpc()
        .subscribe(proto::SubscribeRequest {
            session_id: welcome.session_id.clone(),
            service: Some((&k).into()),
        })
        .await
        .unwrap();
    let mut healthy = client.open_session("healthy").await.unwrap();
    healthy.subscribe(&k).await.unwrap();
    let mut cache = ServiceCache::default();

    // Enough changes, each with a large metadata value, to fill the HTTP/2
    // window of the stuck stream and then its queue.
    let provider = client.open_session("provider").await.unwrap();
    let total = 400u16;
    let mut overflowed = false;
    for port in 1..=total {
        let mut i = instance(4, port);
        i.metadata.insert("pad", &"x".repeat(10_000));
        provider.register(&k, &i).await.unwrap();
        if port % 20 == 0 {
            // The healthy subscriber keeps up, and queries stay answered.
            watch_until(&mut healthy, &mut cache, |c| c.len() == usize::from(port)).await;
            let q = client.query(&k, false).await.unwrap();
            assert_eq!(q.instances.len(), usize::from(port));
            if server
                .node
                .metrics
                .render()
                .contains("roster_push_queue_overflows_total 0\n")
            {
                continue;
            }
            overflowed = true;
        }
    }
    assert!(overflowed, "the stuck subscriber's queue overflowed");
    // Now read the stuck stream: whatever HTTP/2 had buffered, then one full
    // view that brings it to the final state.
    let mut stuck_cache = ServiceCache::default();
    let mut full_views = 0;
    timeout(WAIT, async {
        while stuck_cache.len() < usize::from(total) {
            let msg = stuck.message().await.unwrap().unwrap();
            if let Some(proto::server_message::Kind::Update(bytes)) = msg.kind {
                let u = proto::ServiceUpdate::decode(bytes).unwrap();
                if matches!(u.kind, Some(proto::service_update::Kind::Full(_))) {
                    full_views += 1;
                }
                stuck_cache.apply(&u).expect("in order");
            }
        }
    })
    .await
    .expect("the stuck subscriber catches up");
    assert!(
        full_views >= 2,
        "subscription view plus the overflow's full view"
    );
    assert_eq!(
        stuck_cache.checksum,
        client.query(&k, false).await.unwrap().checksum
    );
    server.shutdown().await;
}

#[tokio::test]
async fn drain_returns_once_every_subscriber_acknowledged() {
    let (server, client) = start(|_| {}).await;
    let k = key("drained");
    let provider = client.open_session("provider").await.unwrap();
    provider.register(&k, &instance(5, 80)).await.unwrap();
    let mut watchers = Vec::new();
    for n in 0..3 {
        let s = client.open_session(&format!("watcher-{n}")).await.unwrap();
        s.subscribe(&k).await.unwrap();
        watchers.push(s);
    }
    // Watchers apply and acknowledge everything they receive.
    let tasks: Vec<_> = watchers
        .into_iter()
        .map(|mut s| {
            let k = k.clone();
            tokio::spawn(async move {
                while let Some(Ok(u)) = s.next_update().await {
                    s.ack(&k, u.revision).await.unwrap();
                }
            })
        })
        .collect();
    let r = provider
        .drain(reference(&k, 5, 80), false, WAIT)
        .await
        .unwrap();
    assert!(r.complete, "pending: {:?}", r.pending);
    assert_eq!(r.acknowledged.len(), 3);
    let q = client.query(&k, false).await.unwrap();
    assert_eq!(q.instances[0].weight, Some(0.0));

    // A subscriber that never acknowledges is named after the timeout.
    let silent = client.open_session("silent").await.unwrap();
    silent.subscribe(&k).await.unwrap();
    let r = provider
        .drain(reference(&k, 5, 80), true, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(!r.complete);
    assert_eq!(r.pending.len(), 1);
    assert!(r.pending[0].starts_with("silent"), "{:?}", r.pending);
    assert!(client.query(&k, false).await.unwrap().instances.is_empty());
    for t in tasks {
        t.abort();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn pull_answers_not_modified_a_delta_or_the_full_view() {
    let (server, client) = start(|c| c.registry.delta_window = 4).await;
    let k = key("pulled");
    let s = client.open_session("p").await.unwrap();
    s.register(&k, &instance(6, 1)).await.unwrap();
    let r1 = client.query(&k, false).await.unwrap();
    let same = client.pull(&k, r1.revision, 0).await.unwrap();
    assert!(same.not_modified);
    let by_checksum = client.pull(&k, 999_999, r1.checksum).await.unwrap();
    assert!(
        by_checksum.not_modified,
        "the checksum matches across revisions"
    );
    s.register(&k, &instance(6, 2)).await.unwrap();
    let delta = client.pull(&k, r1.revision, 0).await.unwrap();
    let update = delta.update.unwrap();
    assert!(matches!(
        update.kind,
        Some(proto::service_update::Kind::Delta(_))
    ));
    let mut cache = ServiceCache::default();
    cache
        .apply(&proto::ServiceUpdate {
            service: Some((&k).into()),
            revision: r1.revision,
            checksum: r1.checksum,
            kind: Some(proto::service_update::Kind::Full(proto::FullView {
                instances: r1.instances,
            })),
            epoch: update.epoch.clone(),
        })
        .unwrap();
    cache.apply(&update).unwrap();
    assert_eq!(cache.len(), 2);
    for port in 3..10 {
        s.register(&k, &instance(6, port)).await.unwrap();
    }
    let old = client.pull(&k, r1.revision, 0).await.unwrap();
    assert!(matches!(
        old.update.unwrap().kind,
        Some(proto::service_update::Kind::Full(_))
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_grpc_requests_get_invalid_argument_and_change_nothing() {
    let (server, client) = start(|_| {}).await;
    let k = key("guarded");
    let s = client.open_session("p").await.unwrap();
    s.register(&k, &instance(7, 80)).await.unwrap();
    let before = client.query(&k, false).await.unwrap();
    let mut grpc = client.grpc();
    let bad = |f: &dyn Fn(&mut proto::Instance)| {
        let mut i = proto::Instance::from_model(&instance(7, 80));
        f(&mut i);
        proto::RegisterRequest {
            session_id: s.id().to_owned(),
            service: Some((&k).into()),
            instance: Some(i),
        }
    };
    let cases: Vec<(proto::RegisterRequest, &str)> = vec![
        (bad(&|i| i.port = 0), "instance.port"),
        (bad(&|i| i.port = 70_000), "instance.port"),
        (bad(&|i| i.weight = Some(-1.0)), "instance.weight"),
        (
            bad(&|i| i.addresses[0].ip = "nope".into()),
            "instance.addresses[0].ip",
        ),
        (bad(&|i| i.addresses.clear()), "instance.addresses"),
        (bad(&|i| i.cluster = "x".repeat(600)), "instance.cluster"),
        (
            bad(&|i| {
                i.metadata.insert("big".into(), "v".repeat(70_000));
            }),
            "instance.metadata",
        ),
        (
            proto::RegisterRequest {
                service: Some(proto::ServiceKey {
                    service: "a\u{1}".into(),
                    ..Default::default()
                }),
                ..bad(&|_| {})
            },
            "service",
        ),
        (
            proto::RegisterRequest {
                service: None,
                ..bad(&|_| {})
            },
            "service",
        ),
        (
            proto::RegisterRequest {
                session_id: String::new(),
                ..bad(&|_| {})
            },
            "session_id",
        ),
    ];
    for (request, field) in cases {
        let err = grpc.register(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = grpc
        .register(proto::RegisterRequest {
            session_id: "gone".into(),
            ..bad(&|_| {})
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = s.deregister(reference(&k, 9, 80)).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    let after = client.query(&k, false).await.unwrap();
    assert_eq!(after, before, "nothing stored changed");
    server.shutdown().await;
}

/// The instances of a full-view update.
fn full_instances(update: &proto::ServiceUpdate) -> &[proto::Instance] {
    match &update.kind {
        Some(proto::service_update::Kind::Full(f)) => &f.instances,
        other => panic!("expected a full view, got {other:?}"),
    }
}

#[tokio::test]
async fn calls_on_the_session_stream_do_what_unary_calls_do() {
    let (server, client) = start(|_| {}).await;
    let k = key("streamed");
    let s = client.open_session("caller").await.unwrap();
    let empty = s.query(&k, false).await.unwrap();
    assert_eq!((empty.revision, full_instances(&empty).len()), (0, 0));

    let id = s.register(&k, &instance(1, 80)).await.unwrap();
    let mut sick = instance(2, 80);
    sick.healthy = false;
    s.register(&k, &sick).await.unwrap();
    let all = s.query(&k, false).await.unwrap();
    let unary = client.query(&k, false).await.unwrap();
    assert_eq!(
        (all.revision, all.checksum),
        (unary.revision, unary.checksum)
    );
    assert_eq!(full_instances(&all), unary.instances.as_slice());
    assert_eq!(full_instances(&all).len(), 2);
    let healthy = s.query(&k, true).await.unwrap();
    assert_eq!(full_instances(&healthy).len(), 1);
    assert_eq!(full_instances(&healthy)[0].id, id);
    assert_eq!(
        full_instances(&all)[0].owner,
        s.id(),
        "the stream's session owns what it registers"
    );

    // Refusals come back as replies with the unary call's status; the
    // stream stays usable and nothing stored changes.
    let mut bad = instance(3, 80);
    bad.weight = -1.0;
    let err = s.register(&k, &bad).await.unwrap_err();
    assert!(err.to_string().starts_with("instance.weight"), "{err}");
    let err = s.deregister(reference(&k, 9, 80)).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(s.query(&k, false).await.unwrap(), all);

    // A call may not act for another session, and must name a request.
    let other = client.open_session("other").await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let send = |kind| proto::ClientMessage {
        channel: 0,
        kind: Some(kind),
    };
    tx.send(send(proto::client_message::Kind::Hello(proto::Hello {
        client_name: "raw".into(),
    })))
    .await
    .unwrap();
    let mut inbound = client
        .grpc()
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let call = |id, request| {
        send(proto::client_message::Kind::Call(proto::Call {
            id,
            request,
        }))
    };
    tx.send(call(
        7,
        Some(proto::call::Request::Register(proto::RegisterRequest {
            session_id: other.id().to_owned(),
            service: Some((&k).into()),
            instance: Some(proto::Instance::from_model(&instance(4, 80))),
        })),
    ))
    .await
    .unwrap();
    tx.send(call(8, None)).await.unwrap();
    let mut errors = Vec::new();
    while errors.len() < 2 {
        let msg = timeout(WAIT, inbound.message())
            .await
            .unwrap()
            .unwrap()
            .expect("stream open");
        if let Some(proto::server_message::Kind::Reply(r)) = msg.kind {
            match r.result {
                Some(proto::reply::Result::Error(e)) => errors.push((r.id, e.code, e.message)),
                other => panic!("expected an error, got {other:?}"),
            }
        }
    }
    assert_eq!(
        (errors[0].0, errors[0].1),
        (7, tonic::Code::InvalidArgument as i32)
    );
    assert!(errors[0].2.starts_with("session_id"), "{}", errors[0].2);
    assert_eq!(
        (errors[1].0, errors[1].1),
        (8, tonic::Code::InvalidArgument as i32)
    );
    assert!(errors[1].2.starts_with("call.request"), "{}", errors[1].2);
    assert_eq!(s.query(&k, false).await.unwrap(), all);

    // Its instances go with the session.
    let revision = s.deregister(reference(&k, 2, 80)).await.unwrap();
    assert!(revision > all.revision);
    let gone = client.open_session("observer").await.unwrap();
    s.close().await;
    let after = timeout(WAIT, async {
        loop {
            let v = gone.query(&k, false).await.unwrap();
            if full_instances(&v).is_empty() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert!(after.revision > revision);
    server.shutdown().await;
}

async fn get_json(http: &reqwest::Client, url: String) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn http_api_registers_lists_beats_and_rejects_bad_input() {
    let (server, client) = start(|_| {}).await;
    let base = format!("http://{}", server.http_addr);
    let http = reqwest::Client::new();
    // A node nobody has opened a session on holds none.
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("\nroster_sessions 0\n"), "{metrics}");
    let reply: serde_json::Value = http
        .post(format!("{base}/v1/instances"))
        .json(&serde_json::json!({
            "service": "web", "ip": "10.2.0.1", "port": 8080,
            "metadata": {"zone": "a"}, "weight": 2.5
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["instance_id"], "10.2.0.1#8080#DEFAULT");
    let lease = reply["session_id"].as_str().unwrap().to_owned();
    let token = reply["session_token"].as_str().unwrap().to_owned();
    assert_eq!(lease.len(), 32, "128 random bits: {lease}");

    let list: serde_json::Value = get_json(&http, format!("{base}/v1/instances?service=web")).await;
    assert_eq!(list["instances"][0]["metadata"]["zone"], "a");
    assert_eq!(list["instances"][0]["weight"], 2.5);
    let grpc_view = client.query(&key("web"), false).await.unwrap();
    assert_eq!(
        list["revision"], grpc_view.revision,
        "one registry behind both APIs"
    );

    let beat = http
        .put(format!("{base}/v1/instances/beat"))
        .json(&serde_json::json!({"session_id": lease, "session_token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(beat.status(), 200);
    // A beat, or a registration, naming the lease without its token is
    // refused: nobody but its holder acts for it.
    let stolen = http
        .put(format!("{base}/v1/instances/beat"))
        .json(&serde_json::json!({"session_id": lease}))
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), 403);
    let attached = http
        .post(format!("{base}/v1/instances"))
        .json(&serde_json::json!({
            "service": "web", "ip": "10.2.0.7", "port": 8080, "session_id": lease,
            "session_token": "00000000000000000000000000000001"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(attached.status(), 403);
    let unknown = http
        .put(format!("{base}/v1/instances/beat"))
        .json(&serde_json::json!({"session_id": "nope", "session_token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let bad_bodies = [
        (
            serde_json::json!({"service": "web", "ip": "10.2.0.300", "port": 1}),
            "ip",
        ),
        (
            serde_json::json!({"service": "web", "ip": "10.2.0.2", "port": 0}),
            "instance.port",
        ),
        (
            serde_json::json!({"service": "web", "ip": "10.2.0.2", "port": 99999}),
            "port",
        ),
        (
            serde_json::json!({"service": "", "ip": "10.2.0.2", "port": 1}),
            "service",
        ),
        (serde_json::json!({"service": "web", "port": 1}), "ip"),
        (
            serde_json::json!({"service": "web", "ip": "10.2.0.2", "port": 1, "weight": 10001}),
            "instance.weight",
        ),
    ];
    for (body, field) in bad_bodies {
        let r = http
            .post(format!("{base}/v1/instances"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    let r = http
        .post(format!("{base}/v1/instances"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid JSON"));
    let r = http
        .delete(format!(
            "{base}/v1/instances?service=web&ip=10.2.0.1&port=notaport"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let after: serde_json::Value =
        get_json(&http, format!("{base}/v1/instances?service=web")).await;
    assert_eq!(after, list, "rejected requests changed nothing");

    // Only the lease's holder removes its instance.
    let url = format!("{base}/v1/instances?service=web&ip=10.2.0.1&port=8080&session_id={lease}");
    let r = http.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .delete(format!(
            "{base}/v1/instances?service=web&ip=10.2.0.1&port=8080"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a session is required");
    let r = http
        .delete(&url)
        .header("x-roster-session-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let services: serde_json::Value = get_json(&http, format!("{base}/v1/services")).await;
    assert_eq!(services["services"][0]["service"], "web");
    assert_eq!(services["services"][0]["instances"], 0);
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http.get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "roster_sessions",
        "roster_services 1",
        "roster_instances 0",
        "roster_pushes_sent_total",
        "roster_push_queue_overflows_total",
        "roster_push_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn http_lease_expires_without_beats() {
    let (server, _client) = start(|c| {
        c.session.keepalive = Duration::from_millis(200);
        c.session.probe_timeout = Duration::from_millis(100);
        c.session.sweep_interval = Duration::from_millis(50);
    })
    .await;
    let base = format!("http://{}", server.http_addr);
    let http = reqwest::Client::new();
    http.post(format!("{base}/v1/instances"))
        .json(&serde_json::json!({"service": "lease", "ip": "10.3.0.1", "port": 1}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    timeout(WAIT, async {
        loop {
            let list: serde_json::Value =
                get_json(&http, format!("{base}/v1/instances?service=lease")).await;
            if list["instances"].as_array().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the lease expired and its instance was removed");
    server.shutdown().await;
}

/// The value of the metric `name` at the node's `/metrics`.
async fn metric(server: &RunningServer, name: &str) -> Option<i64> {
    let text = reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (bounded) until the metric reads `wanted`.
async fn metric_becomes(server: &RunningServer, name: &str, wanted: i64) {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let now = metric(server, name).await;
        if now == Some(wanted) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{name} stayed {now:?}, not {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Applies `session`'s pushes to `cache` until it shows exactly `ips`.
async fn follow_until(session: &mut Session, cache: &mut ServiceCache, ips: &[&str]) {
    loop {
        let u = timeout(WAIT, session.next_update())
            .await
            .expect("a push within the wait")
            .expect("the session is open")
            .unwrap();
        cache.apply(&u).unwrap();
        let mut seen: Vec<String> = cache
            .instances()
            .map(|i| i.addresses[0].ip.to_string())
            .collect();
        seen.sort();
        if seen == ips {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_opened_on_one_connection_share_one_stream_and_own_their_data() {
    let (server, client) = start(|_| {}).await;
    let k = key("shared");
    let a = client.open_session("a").await.unwrap();
    let mut b = client.open_session("b").await.unwrap();
    let c = client.open_session("c").await.unwrap();
    assert!(a.id() != b.id() && b.id() != c.id() && a.id() != c.id());
    metric_becomes(&server, "roster_session_streams", 1).await;
    metric_becomes(&server, "roster_sessions", 3).await;

    // Each session's calls, pushes and data are its own.
    b.subscribe(&k).await.unwrap();
    let mut cache = ServiceCache::default();
    follow_until(&mut b, &mut cache, &[]).await;
    a.register(&k, &instance(1, 80)).await.unwrap();
    c.register(&k, &instance(2, 80)).await.unwrap();
    follow_until(&mut b, &mut cache, &["10.1.0.1", "10.1.0.2"]).await;
    // Dropping one session ends it alone: its instance goes, pushed to
    // the session beside it on the same stream; the stream stays.
    drop(a);
    follow_until(&mut b, &mut cache, &["10.1.0.2"]).await;
    metric_becomes(&server, "roster_sessions", 2).await;
    assert_eq!(metric(&server, "roster_session_streams").await, Some(1));
    let view = c.query(&k, false).await.unwrap();
    assert_eq!(full_instances(&view).len(), 1);
    // A session opened later joins the same stream.
    let d = client.open_session("d").await.unwrap();
    assert_eq!(metric(&server, "roster_session_streams").await, Some(1));
    metric_becomes(&server, "roster_sessions", 3).await;
    // The stream goes with its last session.
    drop((b, c, d));
    metric_becomes(&server, "roster_session_streams", 0).await;
    metric_becomes(&server, "roster_sessions", 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opens_and_closes_sessions_by_channel() {
    use proto::client_message::Kind as C;
    use proto::server_message::Kind as S;
    let (server, client) = start(|_| {}).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let on = |channel, kind| proto::ClientMessage {
        channel,
        kind: Some(kind),
    };
    let hello = |name: &str| {
        C::Hello(proto::Hello {
            client_name: name.into(),
        })
    };
    tx.send(on(5, hello("first"))).await.unwrap();
    let mut inbound = client
        .grpc()
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        timeout(WAIT, inbound.message())
            .await
            .unwrap()
            .unwrap()
            .expect("stream open")
    };
    let m = next().await;
    assert!(matches!((m.channel, m.kind), (5, Some(S::Welcome(_)))));
    tx.send(on(9, hello("second"))).await.unwrap();
    let m = next().await;
    assert!(matches!((m.channel, m.kind), (9, Some(S::Welcome(_)))));
    // A channel in use is refused, saying why; the session on it stays.
    tx.send(on(9, hello("again"))).await.unwrap();
    let m = next().await;
    match (m.channel, m.kind) {
        (9, Some(S::Closed(c))) => assert!(c.reason.contains("already"), "{}", c.reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
    metric_becomes(&server, "roster_sessions", 2).await;
    // Closing one session leaves the other answering on the same stream.
    tx.send(on(5, C::Close(proto::Close {}))).await.unwrap();
    metric_becomes(&server, "roster_sessions", 1).await;
    let query = C::Call(proto::Call {
        id: 1,
        request: Some(proto::call::Request::Query(proto::QueryRequest {
            service: Some((&key("x")).into()),
            healthy_only: false,
            clusters: Vec::new(),
        })),
    });
    tx.send(on(9, query)).await.unwrap();
    let m = next().await;
    assert!(matches!((m.channel, m.kind), (9, Some(S::Reply(r))) if r.id == 1));
    // The stream's end ends its sessions.
    drop(tx);
    metric_becomes(&server, "roster_sessions", 0).await;
    metric_becomes(&server, "roster_session_streams", 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_node_ends_ends_alone_on_a_shared_stream() {
    let (server, client) = start(|_| {}).await;
    let k = key("ended");
    let mut a = client.open_session("a").await.unwrap();
    let mut b = client.open_session("b").await.unwrap();
    a.subscribe(&k).await.unwrap();
    b.subscribe(&k).await.unwrap();
    // The node ends a (as expiry would): its updates end, b's go on.
    server.node.close_session(a.id());
    let ended = timeout(WAIT, async {
        while let Some(u) = a.next_update().await {
            u.unwrap();
        }
    })
    .await;
    assert!(ended.is_ok(), "a's updates ended with its session");
    let mut cache = ServiceCache::default();
    follow_until(&mut b, &mut cache, &[]).await;
    b.register(&k, &instance(3, 80)).await.unwrap();
    follow_until(&mut b, &mut cache, &["10.1.0.3"]).await;
    assert_eq!(metric(&server, "roster_session_streams").await, Some(1));
    // A session opened now joins the same stream.
    let _c = client.open_session("c").await.unwrap();
    assert_eq!(metric(&server, "roster_session_streams").await, Some(1));
    server.shutdown().await;
}
