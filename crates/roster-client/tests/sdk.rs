//! The SDK against real registry nodes on loopback: restarts, failover,
//! gaps, empty-push protection, the disk cache, selection and bad input.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use roster_client::{
    Address, Change, Client, ClientBuilder, ClientError, Connection, Instance, ServiceKey, Status,
    Subscription,
};
use roster_server::{Config, RunningServer};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(15);

async fn server_on(grpc: SocketAddr) -> RunningServer {
    let mut config = Config::default();
    config.server.http = "127.0.0.1:0".parse().unwrap();
    config.server.grpc = grpc;
    roster_server::start(config).await.unwrap()
}

async fn server() -> RunningServer {
    server_on("127.0.0.1:0".parse().unwrap()).await
}

/// A builder with fast reconnects, for tests.
fn builder(addresses: &[SocketAddr]) -> ClientBuilder {
    Client::builder()
        .addresses(addresses.iter().map(ToString::to_string))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(1))
        .seed(42)
}

fn instance(ip: &str, port: u16) -> Instance {
    Instance::new(ip.parse().unwrap(), port)
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::simple(name).unwrap()
}

/// Polls `cond` until it holds, failing after [`WAIT`].
async fn eventually<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids a raw query of `addr` lists for `service`.
async fn listed(addr: SocketAddr, service: &str) -> Vec<String> {
    let Ok(conn) = Connection::connect(&addr.to_string()).await else {
        return Vec::new();
    };
    match conn.query(&key(service), false).await {
        Ok(r) => r.instances.into_iter().map(|i| i.id).collect(),
        Err(_) => Vec::new(),
    }
}

/// Reads updates until one satisfies `wanted`.
async fn next_matching(
    sub: &mut Subscription,
    mut wanted: impl FnMut(&roster_client::Update) -> bool,
) -> roster_client::Update {
    timeout(WAIT, async {
        loop {
            let u = sub.next().await.expect("subscription open");
            if wanted(&u) {
                return u;
            }
        }
    })
    .await
    .expect("the update arrived")
}

fn ids(change: &Change) -> Vec<String> {
    match change {
        Change::Reset(all) => all.iter().map(|i| i.id.clone()).collect(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_brings_registrations_and_subscriptions_back() {
    let first = server().await;
    let addr = first.grpc_addr;
    let provider = builder(&[addr])
        .client_name("provider")
        .build()
        .await
        .unwrap();
    let watcher = builder(&[addr])
        .client_name("watcher")
        .build()
        .await
        .unwrap();
    let registration = provider
        .register("orders", instance("10.2.0.1", 80))
        .await
        .unwrap();
    let mut updates = watcher.subscribe("orders").await.unwrap();
    let reset = next_matching(&mut updates, |u| matches!(u.change, Change::Reset(_))).await;
    assert_eq!(ids(&reset.change), ["10.2.0.1#80#DEFAULT"]);

    first.shutdown().await;
    eventually("both clients to notice", || async {
        provider.status() != Status::Connected && watcher.status() != Status::Connected
    })
    .await;
    // While the registry is away the watcher keeps its last view.
    assert_eq!(watcher.instances("orders").len(), 1);
    assert_eq!(watcher.status(), Status::Degraded);

    let second = server_on(addr).await;
    eventually("the provider to register again", || async {
        listed(addr, "orders").await == ["10.2.0.1#80#DEFAULT"]
    })
    .await;
    // The watcher gets a reset from the new node, then live changes.
    next_matching(&mut updates, |u| {
        matches!(u.change, Change::Reset(_)) && ids(&u.change) == ["10.2.0.1#80#DEFAULT"]
    })
    .await;
    let other = builder(&[addr]).build().await.unwrap();
    other
        .register("orders", instance("10.2.0.2", 80))
        .await
        .unwrap();
    let added = next_matching(&mut updates, |u| matches!(u.change, Change::Added(_))).await;
    assert!(matches!(&added.change, Change::Added(i) if i.id == "10.2.0.2#80#DEFAULT"));
    assert_eq!(watcher.status(), Status::Connected);

    // The handle from before the restart still deregisters.
    registration.deregister().await.unwrap();
    let removed = next_matching(&mut updates, |u| matches!(u.change, Change::Removed(_))).await;
    assert_eq!(
        removed.change,
        Change::Removed("10.2.0.1#80#DEFAULT".into())
    );
    for c in [provider, watcher, other] {
        c.shutdown().await;
    }
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_in_use_fails_over_and_redoes_registrations() {
    let a = server().await;
    let b = server().await;
    let (a_addr, b_addr) = (a.grpc_addr, b.grpc_addr);
    let client = builder(&[a_addr, b_addr]).build().await.unwrap();
    assert_eq!(client.server(), Some(a_addr.to_string()));
    client
        .register("orders", instance("10.3.0.1", 80))
        .await
        .unwrap();
    let _sub = client.subscribe("orders").await.unwrap();
    assert_eq!(listed(a_addr, "orders").await, ["10.3.0.1#80#DEFAULT"]);
    assert!(listed(b_addr, "orders").await.is_empty());

    a.shutdown().await;
    eventually("the client to fail over", || async {
        client.server() == Some(b_addr.to_string())
    })
    .await;
    eventually("the registration on the second node", || async {
        listed(b_addr, "orders").await == ["10.3.0.1#80#DEFAULT"]
    })
    .await;
    // The subscription follows too: its view is the second node's.
    eventually("the view from the second node", || async {
        client.instances("orders").len() == 1 && client.status() == Status::Connected
    })
    .await;
    client.shutdown().await;
    eventually("shutdown to deregister", || async {
        listed(b_addr, "orders").await.is_empty()
    })
    .await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_revision_gap_reloads_the_full_view() {
    let node = server().await;
    let addr = node.grpc_addr;
    let provider = builder(&[addr]).build().await.unwrap();
    let consumer = builder(&[addr]).build().await.unwrap();
    let mut updates = consumer.subscribe("orders").await.unwrap();
    next_matching(&mut updates, |u| matches!(u.change, Change::Reset(_))).await;

    // The next push is lost on the way; the one after it does not apply
    // to the revision held, so the client reloads.
    consumer.drop_next_pushes(1);
    provider
        .register("orders", instance("10.4.0.1", 80))
        .await
        .unwrap();
    eventually("the registry to push the first change", || async {
        node.node
            .view(&key("orders"))
            .is_some_and(|v| v.instances.len() == 1)
    })
    .await;
    provider
        .register("orders", instance("10.4.0.2", 80))
        .await
        .unwrap();
    let reset = next_matching(&mut updates, |u| {
        matches!(u.change, Change::Reset(_)) && ids(&u.change).len() == 2
    })
    .await;
    let view = node.node.view(&key("orders")).unwrap();
    assert_eq!(reset.revision, view.revision);
    assert_eq!(consumer.revision("orders"), Some(view.revision));
    let mut held: Vec<String> = consumer
        .instances("orders")
        .iter()
        .map(|i| i.id.clone())
        .collect();
    held.sort();
    let mut server_ids: Vec<String> = view.instances.keys().map(|k| k.to_string()).collect();
    server_ids.sort();
    assert_eq!(held, server_ids);
    provider.shutdown().await;
    consumer.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_push_protection_keeps_the_last_view_until_a_pull_confirms() {
    let node = server().await;
    let addr = node.grpc_addr;
    let provider = builder(&[addr]).build().await.unwrap();
    // The confirming pull is left to the test (refresh) here.
    let consumer = builder(&[addr])
        .empty_confirm_delay(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let registration = provider
        .register("orders", instance("10.5.0.1", 80))
        .await
        .unwrap();
    let mut updates = consumer.subscribe("orders").await.unwrap();
    let reset = next_matching(&mut updates, |u| matches!(u.change, Change::Reset(_))).await;
    assert_eq!(ids(&reset.change).len(), 1);

    registration.deregister().await.unwrap();
    eventually("the emptying push to be held back", || async {
        consumer.held("orders")
    })
    .await;
    assert_eq!(
        consumer.instances("orders").len(),
        1,
        "the last good view stays"
    );

    consumer.refresh("orders").await.unwrap();
    assert!(!consumer.held("orders"));
    assert!(consumer.instances("orders").is_empty());
    let removed = next_matching(&mut updates, |u| matches!(u.change, Change::Removed(_))).await;
    assert_eq!(
        removed.change,
        Change::Removed("10.5.0.1#80#DEFAULT".into())
    );

    // With protection off the removal applies at once.
    let unprotected = builder(&[addr])
        .empty_push_protection(false)
        .build()
        .await
        .unwrap();
    let again = provider
        .register("orders", instance("10.5.0.1", 80))
        .await
        .unwrap();
    let mut plain = unprotected.subscribe("orders").await.unwrap();
    next_matching(&mut plain, |u| ids(&u.change).len() == 1).await;
    again.deregister().await.unwrap();
    next_matching(&mut plain, |u| matches!(u.change, Change::Removed(_))).await;
    assert!(unprotected.instances("orders").is_empty());
    for c in [provider, consumer, unprotected] {
        c.shutdown().await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_without_a_registry_serves_its_warm_disk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let node = server().await;
    let addr = node.grpc_addr;
    let provider = builder(&[addr]).build().await.unwrap();
    provider
        .register("orders", instance("10.6.0.1", 80))
        .await
        .unwrap();
    let warm = builder(&[addr])
        .cache_dir(dir.path())
        .build()
        .await
        .unwrap();
    warm.subscribe("orders").await.unwrap();
    assert_eq!(warm.instances("orders").len(), 1);
    warm.shutdown().await;
    provider.shutdown().await;
    node.shutdown().await;

    // Nothing listens there now.
    let cold = builder(&[addr])
        .cache_dir(dir.path())
        .build()
        .await
        .unwrap();
    assert_eq!(cold.status(), Status::Degraded);
    assert!(cold.last_error().is_some());
    let mut updates = cold.subscribe("orders").await.unwrap();
    let first = timeout(WAIT, updates.next()).await.unwrap().unwrap();
    assert_eq!(ids(&first.change), ["10.6.0.1#80#DEFAULT"]);
    assert_eq!(cold.instances("orders").len(), 1);
    assert!(cold.select("orders").is_some());

    // Without a cache there is nothing to serve.
    let empty = builder(&[addr]).build().await.unwrap();
    assert_eq!(empty.status(), Status::Disconnected);
    let required = builder(&[addr]).require_connection(true).build().await;
    assert!(matches!(required, Err(ClientError::Connect { .. })));
    cold.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_selection_matches_the_weights() {
    let node = server().await;
    let addr = node.grpc_addr;
    let client = builder(&[addr]).seed(7).build().await.unwrap();
    let mut weights = HashMap::new();
    for (host, weight) in [(1, 1.0), (2, 2.0), (3, 7.0)] {
        let mut i = instance(&format!("10.7.0.{host}"), 80);
        i.weight = weight;
        client.register("orders", i).await.unwrap();
        weights.insert(format!("10.7.0.{host}#80#DEFAULT"), weight / 10.0);
    }
    // Never chosen: weight 0, disabled, unhealthy.
    for (host, tweak) in [(4, 0), (5, 1), (6, 2)] {
        let mut i = instance(&format!("10.7.0.{host}"), 80);
        match tweak {
            0 => i.weight = 0.0,
            1 => i.enabled = false,
            _ => i.healthy = false,
        }
        client.register("orders", i).await.unwrap();
    }
    client.subscribe("orders").await.unwrap();
    eventually("all six instances", || async {
        client.instances("orders").len() == 6
    })
    .await;
    let draws = 100_000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..draws {
        let s = client.select("orders").unwrap();
        *counts.entry(s.instance.id.clone()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (id, expected) in &weights {
        let share = counts[id] as f64 / f64::from(draws);
        assert!(
            (share - expected).abs() < 0.02,
            "{id}: {share:.4} drawn, {expected} expected"
        );
    }
    client.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_addresses_are_shielded_and_multi_network_instances_switch() {
    let node = server().await;
    let addr = node.grpc_addr;
    let client = builder(&[addr])
        .shield(5, Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut multi = instance("10.8.0.1", 80);
    multi.addresses.push(Address {
        network: "backup".into(),
        ip: "192.168.8.1".parse::<IpAddr>().unwrap(),
    });
    client.register("multi", multi).await.unwrap();
    client.subscribe("multi").await.unwrap();
    let primary: SocketAddr = "10.8.0.1:80".parse().unwrap();
    let backup: SocketAddr = "192.168.8.1:80".parse().unwrap();
    assert_eq!(client.select("multi").unwrap().address, primary);
    client.report_failure(primary);
    assert_eq!(client.select("multi").unwrap().address, backup);
    client.report_success(backup);
    for _ in 0..20 {
        assert_eq!(
            client.select("multi").unwrap().address,
            backup,
            "stays on what works"
        );
    }

    for host in [1, 2] {
        client
            .register("pair", instance(&format!("10.9.0.{host}"), 80))
            .await
            .unwrap();
    }
    client.subscribe("pair").await.unwrap();
    eventually("both instances", || async {
        client.instances("pair").len() == 2
    })
    .await;
    let bad: SocketAddr = "10.9.0.1:80".parse().unwrap();
    for _ in 0..5 {
        client.report_failure(bad);
    }
    for _ in 0..1000 {
        assert_ne!(client.select("pair").unwrap().address, bad, "shielded");
    }
    // When the shield ends it is tried once, then not again until the
    // trial is reported.
    eventually("the shield to end", || async {
        client.select("pair").unwrap().address == bad
    })
    .await;
    for _ in 0..1000 {
        assert_ne!(
            client.select("pair").unwrap().address,
            bad,
            "one trial only"
        );
    }
    client.report_success(bad);
    assert!((0..1000).any(|_| client.select("pair").unwrap().address == bad));
    client.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_from_the_application_is_an_error_value() {
    let node = server().await;
    let client = builder(&[node.grpc_addr]).build().await.unwrap();
    let mut no_port = instance("10.10.0.1", 80);
    no_port.port = 0;
    match client.register("orders", no_port).await {
        Err(ClientError::Invalid(e)) => assert_eq!(e.field, "instance.port"),
        other => panic!("{other:?}"),
    }
    let mut heavy = instance("10.10.0.1", 80);
    heavy.weight = 20_000.0;
    assert!(matches!(
        client.register("orders", heavy).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        client.register("", instance("10.10.0.1", 80)).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        client.subscribe("bad\nname").await,
        Err(ClientError::Invalid(_))
    ));
    // Persistent instances are refused by the registry: an error, not kept.
    let mut persistent = instance("10.10.0.1", 80);
    persistent.ephemeral = false;
    assert!(matches!(
        client.register("orders", persistent).await,
        Err(ClientError::Status(_))
    ));
    assert!(listed(node.grpc_addr, "orders").await.is_empty());
    assert!(matches!(
        Client::builder().build().await,
        Err(ClientError::Address(_))
    ));
    assert!(matches!(
        Client::builder()
            .addresses(["not a uri at all"])
            .build()
            .await,
        Err(ClientError::Address(_))
    ));
    client.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_pull_catches_a_lost_push() {
    let node = server().await;
    let addr = node.grpc_addr;
    let provider = builder(&[addr]).build().await.unwrap();
    let consumer = builder(&[addr])
        .pull_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    consumer.subscribe("orders").await.unwrap();
    // The only push this change makes is lost: nothing follows to show a
    // gap, so only the pull can bring it.
    consumer.drop_next_pushes(1);
    provider
        .register("orders", instance("10.11.0.1", 80))
        .await
        .unwrap();
    eventually("the pull to bring the instance", || async {
        consumer.instances("orders").len() == 1
    })
    .await;
    assert_eq!(
        consumer.revision("orders"),
        node.node.view(&key("orders")).map(|v| v.revision)
    );
    provider.shutdown().await;
    consumer.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_completes_once_subscribed_clients_have_applied_it() {
    let node = server().await;
    let addr = node.grpc_addr;
    let provider = builder(&[addr]).build().await.unwrap();
    let registration = provider
        .register("billing", instance("10.12.0.1", 80))
        .await
        .unwrap();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let c = builder(&[addr]).build().await.unwrap();
        // Two services, so the acks a change brings can travel together.
        c.subscribe("billing").await.unwrap();
        c.subscribe("ledger").await.unwrap();
        eventually("the consumer to see the instance", || async {
            c.instances("billing").len() == 1
        })
        .await;
        consumers.push(c);
    }
    // The provider drains its own instance before it goes; it follows the
    // service itself, and is one of the subscribers that must apply it.
    provider.subscribe("billing").await.unwrap();
    let drained = registration.drain(false, WAIT).await.unwrap();
    assert!(drained.complete, "pending: {:?}", drained.pending);
    assert_eq!(drained.acknowledged.len(), 3, "{drained:?}");
    for c in &consumers {
        assert_eq!(c.instances("billing")[0].weight, 0.0);
    }
    for c in consumers {
        c.shutdown().await;
    }
    provider.shutdown().await;
    node.shutdown().await;
}

/// A TCP proxy on loopback to `upstream` that delays every byte by
/// `delay` (once it is set) in each direction, as a distant link would.
async fn slow_link(
    upstream: SocketAddr,
    delay: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> SocketAddr {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)].map(|(r, w)| {
                (
                    Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    w,
                )
            }) {
                let delay = delay.clone();
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let due = tokio::time::Instant::now()
                            + Duration::from_millis(delay.load(Ordering::Relaxed));
                        if tx.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((due, bytes)) = rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        if to.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_500_subscriptions_over_a_slow_link_keeps_its_session() {
    let mut config = Config::default();
    config.server.http = "127.0.0.1:0".parse().unwrap();
    config.server.grpc = "127.0.0.1:0".parse().unwrap();
    config.session.keepalive = Duration::from_millis(1000);
    config.session.probe_timeout = Duration::from_millis(500);
    config.session.sweep_interval = Duration::from_millis(100);
    let node = roster_server::start(config).await.unwrap();
    let delay = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let proxy = slow_link(node.grpc_addr, delay.clone()).await;
    let client = builder(&[proxy])
        .pull_interval(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let registration = client
        .register("kept", instance("10.13.0.1", 80))
        .await
        .unwrap();
    for n in 0..500 {
        client.subscribe(format!("many-{n}")).await.unwrap();
    }
    let owner = || async {
        Connection::connect(&node.grpc_addr.to_string())
            .await
            .unwrap()
            .query(&key("kept"), false)
            .await
            .unwrap()
            .instances
            .first()
            .map(|i| i.owner.clone())
    };
    let before = owner().await.expect("registered");
    // 50 ms round trips from now on: one pass of pulls makes 500 calls.
    delay.store(25, std::sync::atomic::Ordering::Relaxed);
    let pulls = node.node.metrics.pulls.get();
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        assert_eq!(client.status(), Status::Connected);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(owner().await, Some(before), "the same session throughout");
    assert!(
        node.node.metrics.pulls.get() >= pulls + 500,
        "the periodic pulls ran meanwhile"
    );
    drop(registration);
    client.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_node_restarts_a_subscriber_follows_it_and_never_polls_in_a_loop() {
    let data = tempfile::tempdir().unwrap();
    let boot = |grpc: SocketAddr| {
        let dir = data.path().to_string_lossy().into_owned();
        async move {
            let mut config = Config::default();
            config.server.http = "127.0.0.1:0".parse().unwrap();
            config.server.grpc = grpc;
            config.server.data_dir = dir;
            roster_server::start(config).await.unwrap()
        }
    };
    let first = boot("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.grpc_addr;
    let provider = builder(&[addr]).build().await.unwrap();
    provider
        .register("restarted", instance("10.14.0.1", 80))
        .await
        .unwrap();
    // The SDK's defaults, empty-push protection included.
    let watcher = builder(&[addr])
        .empty_confirm_delay(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut updates = watcher.subscribe("restarted").await.unwrap();
    next_matching(&mut updates, |_| watcher.instances("restarted").len() == 1).await;

    first.shutdown().await;
    let second = boot(addr).await;
    // Both clients come back by themselves: the registration is made
    // again, the watcher follows the new node life.
    eventually("the registration to come back", || async {
        listed(addr, "restarted").await.len() == 1
    })
    .await;
    eventually("the watcher to be connected", || async {
        watcher.status() == Status::Connected
    })
    .await;
    provider.shutdown().await;
    // The removal reaches the watcher (held back briefly by protection,
    // then confirmed by one pull)...
    eventually("the watcher to see the removal", || async {
        watcher.instances("restarted").is_empty() && !watcher.held("restarted")
    })
    .await;
    // ... and then it polls no more than its schedule says.
    let pulls = second.node.metrics.pulls.get();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let extra = second.node.metrics.pulls.get() - pulls;
    assert!(extra <= 2, "{extra} pulls in a second: polling in a loop");
    watcher.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_over_to_a_node_that_never_had_the_service_empties_the_view() {
    let (a, b) = (server().await, server().await);
    let provider = builder(&[a.grpc_addr]).build().await.unwrap();
    provider
        .register("only-on-a", instance("10.15.0.1", 80))
        .await
        .unwrap();
    let watcher = builder(&[a.grpc_addr, b.grpc_addr])
        .empty_confirm_delay(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    watcher.subscribe("only-on-a").await.unwrap();
    eventually("the watcher to see the instance", || async {
        watcher.instances("only-on-a").len() == 1
    })
    .await;
    provider.shutdown().await;
    a.shutdown().await;
    // Node b has no such service: once confirmed, the view is empty.
    eventually("the watcher to fail over", || async {
        watcher.server() == Some(b.grpc_addr.to_string())
    })
    .await;
    eventually("the view to empty", || async {
        watcher.instances("only-on-a").is_empty() && !watcher.held("only-on-a")
    })
    .await;
    watcher.shutdown().await;
    b.shutdown().await;
}
