//! The real Rust Nacos client (`nacos-sdk` 0.8) against a Roster node on
//! free loopback ports, over the Nacos 2.x gRPC protocol.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingService, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use roster_client::{Change, Client};
use roster_core::Instance;
use roster_server::{Config, RunningServer};
use tokio::sync::mpsc;
use tokio::time::timeout;

mod common;
use common::{
    cluster_configs, key, listed_by_the_living, nacos_body, nacos_payload, origin_of,
    start_cluster, start_with,
};

const WAIT: Duration = Duration::from_secs(20);

async fn server_on(http: SocketAddr, grpc: SocketAddr) -> RunningServer {
    let mut config = Config::default();
    config.server.http = http;
    config.server.grpc = grpc;
    roster_server::start(config).await.unwrap()
}

async fn server() -> RunningServer {
    start_with(|_| {}).await
}

async fn nacos(server: &RunningServer, cache: &tempfile::TempDir) -> NamingService {
    let props = ClientProps::new()
        .server_addr(format!("127.0.0.1:{}", server.http_addr.port()))
        .remote_grpc_port(server.grpc_addr.port());
    nacos_with(props, cache).await
}

/// A client of several nodes (`a,b,c`: HTTP addresses, each node's gRPC
/// port its HTTP port + 1000, as the client expects).
async fn nacos_of(servers: &str, cache: &tempfile::TempDir) -> NamingService {
    nacos_with(ClientProps::new().server_addr(servers), cache).await
}

async fn nacos_with(props: ClientProps, cache: &tempfile::TempDir) -> NamingService {
    let props = props
        .namespace("public")
        .app_name("roster-test")
        .env_first(false)
        .naming_push_empty_protection(false)
        .naming_load_cache_at_start(false)
        .cache_dir(cache.path().to_string_lossy().to_string());
    NamingServiceBuilder::new(props).build().await.unwrap()
}

fn instance(ip: &str, port: i32, weight: f64) -> ServiceInstance {
    ServiceInstance {
        ip: ip.into(),
        port,
        weight,
        metadata: HashMap::from([("zone".to_owned(), "a".to_owned())]),
        ..ServiceInstance::default()
    }
}

struct Events(mpsc::UnboundedSender<Vec<ServiceInstance>>);

impl NamingEventListener for Events {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        let _ = self.0.send(event.instances.clone().unwrap_or_default());
    }
}

/// Waits for a pushed list satisfying `wanted`.
async fn pushed(
    rx: &mut mpsc::UnboundedReceiver<Vec<ServiceInstance>>,
    wanted: impl Fn(&[ServiceInstance]) -> bool,
) -> Vec<ServiceInstance> {
    timeout(WAIT, async {
        loop {
            let list = rx.recv().await.expect("listener alive");
            if wanted(&list) {
                return list;
            }
        }
    })
    .await
    .expect("the push arrived")
}

/// The ips the node holds for `service`.
fn held(server: &RunningServer, service: &str) -> Vec<String> {
    let mut ips: Vec<String> = server
        .node
        .view(&key(service))
        .map(|v| {
            v.instances
                .values()
                .map(|r| r.instance.addresses[0].ip.to_string())
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacos_sdk_registers_discovers_and_gets_pushes() {
    let node = server().await;
    let cache = tempfile::tempdir().unwrap();
    let naming = nacos(&node, &cache).await;

    naming
        .register_instance("orders".into(), None, instance("10.20.0.1", 8080, 1.0))
        .await
        .unwrap();
    assert_eq!(held(&node, "orders"), ["10.20.0.1"]);

    let all = naming
        .get_all_instances("orders".into(), None, vec![], false)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].port, 8080);
    assert_eq!(all[0].metadata["zone"], "a");

    let (tx, mut rx) = mpsc::unbounded_channel();
    naming
        .subscribe("orders".into(), None, vec![], Arc::new(Events(tx)))
        .await
        .unwrap();

    // Add, from a second client (connection).
    let cache2 = tempfile::tempdir().unwrap();
    let other = nacos(&node, &cache2).await;
    other
        .register_instance("orders".into(), None, instance("10.20.0.2", 8080, 2.0))
        .await
        .unwrap();
    pushed(&mut rx, |l| l.len() == 2).await;
    // Change (re-register with another weight).
    other
        .register_instance("orders".into(), None, instance("10.20.0.2", 8080, 5.0))
        .await
        .unwrap();
    pushed(&mut rx, |l| {
        l.iter().any(|i| i.ip == "10.20.0.2" && i.weight == 5.0)
    })
    .await;
    // As in Nacos 2.x, a connection holds one instance per service: a
    // second registration on it replaces its first, in one push.
    naming
        .register_instance("orders".into(), None, instance("10.20.0.3", 8080, 1.0))
        .await
        .unwrap();
    let replaced = pushed(&mut rx, |l| l.iter().any(|i| i.ip == "10.20.0.3")).await;
    let mut ips: Vec<_> = replaced.iter().map(|i| i.ip.as_str()).collect();
    ips.sort();
    assert_eq!(ips, ["10.20.0.2", "10.20.0.3"]);
    // Remove: the connection's instance goes, the other client's stays.
    naming
        .deregister_instance("orders".into(), None, instance("10.20.0.3", 8080, 1.0))
        .await
        .unwrap();
    let after = pushed(&mut rx, |l| l.len() == 1).await;
    assert_eq!(after[0].ip, "10.20.0.2");

    let one = naming
        .select_one_healthy_instance("orders".into(), None, vec![], false)
        .await
        .unwrap();
    assert_eq!(one.ip, "10.20.0.2");

    // Batch: replaces what this connection publishes in the service.
    naming
        .batch_register_instance(
            "payments".into(),
            None,
            vec![
                instance("10.21.0.1", 80, 1.0),
                instance("10.21.0.2", 80, 1.0),
            ],
        )
        .await
        .unwrap();
    assert_eq!(held(&node, "payments"), ["10.21.0.1", "10.21.0.2"]);

    let (names, count) = naming.get_service_list(1, 10, None).await.unwrap();
    assert_eq!(count, 2);
    assert_eq!(names, ["orders", "payments"]);

    // A client cannot remove another's instance: deregistering the other
    // client's address removes nothing (this connection holds nothing there).
    naming
        .deregister_instance("orders".into(), None, instance("10.20.0.2", 8080, 5.0))
        .await
        .unwrap();
    assert_eq!(held(&node, "orders"), ["10.20.0.2"]);
    // The last instance going is pushed too (an empty list).
    other
        .deregister_instance("orders".into(), None, instance("10.20.0.2", 8080, 5.0))
        .await
        .unwrap();
    pushed(&mut rx, <[ServiceInstance]>::is_empty).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacos_sdk_registers_and_subscribes_again_after_a_restart() {
    let first = server().await;
    let (http, grpc) = (first.http_addr, first.grpc_addr);
    let cache = tempfile::tempdir().unwrap();
    let naming = nacos(&first, &cache).await;
    naming
        .register_instance("orders".into(), None, instance("10.22.0.1", 8080, 1.0))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    naming
        .subscribe("orders".into(), None, vec![], Arc::new(Events(tx)))
        .await
        .unwrap();
    pushed(&mut rx, |l| l.len() == 1).await;

    first.shutdown().await;
    let second = server_on(http, grpc).await;
    eventually("the Nacos client to register again", || {
        held(&second, "orders") == ["10.22.0.1"]
    })
    .await;
    eventually("the Nacos client to subscribe again", || {
        second.node.subscriber_count(&key("orders")) == 1
    })
    .await;
    // A change on the new node reaches the client's listener.
    let native = Client::builder()
        .addresses([grpc.to_string()])
        .build()
        .await
        .unwrap();
    native
        .register("orders", Instance::new("10.22.0.2".parse().unwrap(), 8080))
        .await
        .unwrap();
    pushed(&mut rx, |l| l.len() == 2).await;
    native.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacos_and_native_clients_see_each_others_changes() {
    let node = server().await;
    let cache = tempfile::tempdir().unwrap();
    let naming = nacos(&node, &cache).await;
    let native = Client::builder()
        .addresses([node.grpc_addr.to_string()])
        .empty_push_protection(false)
        .build()
        .await
        .unwrap();

    // Nacos registers; the native client sees it pushed.
    let mut updates = native.subscribe("orders").await.unwrap();
    naming
        .register_instance("orders".into(), None, instance("10.23.0.1", 8080, 1.0))
        .await
        .unwrap();
    timeout(WAIT, async {
        loop {
            let u = updates.next().await.unwrap();
            // The first change of a service new to the registry comes as
            // a full view (a reset), later ones as deltas.
            let seen = match &u.change {
                Change::Added(i) => i.port == 8080,
                Change::Reset(all) => all.iter().any(|i| i.port == 8080),
                _ => false,
            };
            if seen {
                return;
            }
        }
    })
    .await
    .expect("the native client saw the Nacos registration");
    let seen = native.instances("orders");
    assert_eq!(seen[0].metadata.get("zone"), Some("a"));

    // Native registers; the Nacos subscriber gets it pushed.
    let (tx, mut rx) = mpsc::unbounded_channel();
    naming
        .subscribe("orders".into(), None, vec![], Arc::new(Events(tx)))
        .await
        .unwrap();
    native
        .register("orders", Instance::new("10.23.0.2".parse().unwrap(), 9090))
        .await
        .unwrap();
    let list = pushed(&mut rx, |l| l.len() == 2).await;
    assert!(list.iter().any(|i| i.ip == "10.23.0.2" && i.port == 9090));

    // And drain waits for the Nacos subscriber's acknowledgement too.
    let id = "10.23.0.2#9090#DEFAULT";
    let owner = node.node.owning_session(&key("orders"), id).unwrap();
    let outcome = node
        .node
        .drain(&owner, &key("orders"), id, false, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(outcome.pending.is_empty(), "{outcome:?}");
    assert_eq!(outcome.acknowledged.len(), 2, "{outcome:?}");
    native.shutdown().await;
    node.shutdown().await;
}

/// One raw unary call on the Nacos envelope: (reply type, reply body).
async fn raw_call(grpc: SocketAddr, kind: &str, body: &[u8]) -> (String, serde_json::Value) {
    use roster_proto::nacos::{Any, Metadata, Payload, request_client::RequestClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RequestClient::new(channel);
    let reply = client
        .request(Payload {
            metadata: Some(Metadata {
                r#type: kind.into(),
                ..Default::default()
            }),
            body: Some(Any {
                type_url: String::new(),
                value: body.to_vec().into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let kind = reply.metadata.unwrap().r#type;
    let body = serde_json::from_slice(&reply.body.unwrap().value).unwrap();
    (kind, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_nacos_requests_get_error_responses_and_disturb_nothing() {
    let node = server().await;
    let cache = tempfile::tempdir().unwrap();
    let naming = nacos(&node, &cache).await;
    naming
        .register_instance("orders".into(), None, instance("10.24.0.1", 8080, 1.0))
        .await
        .unwrap();

    // A connection without a stream may only check the server.
    let (kind, body) = raw_call(node.grpc_addr, "ServerCheckRequest", b"{}").await;
    assert_eq!(kind, "ServerCheckResponse");
    assert!(body["connectionId"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(body["supportAbilityNegotiation"], false);
    let (kind, body) = raw_call(node.grpc_addr, "InstanceRequest", b"{}").await;
    assert_eq!(
        (kind.as_str(), body["errorCode"].as_i64()),
        ("ErrorResponse", Some(301))
    );
    // Unparseable bodies and unknown types are refused with a code.
    let (kind, body) = raw_call(node.grpc_addr, "ServiceQueryRequest", b"{not json").await;
    assert_eq!(
        (kind.as_str(), body["errorCode"].as_i64()),
        ("ErrorResponse", Some(502))
    );
    assert!(!body["message"].as_str().unwrap().is_empty());
    assert!(!body.to_string().contains("null"), "never null: {body}");

    // The real client's connection and data are untouched.
    let all = naming
        .get_all_instances("orders".into(), None, vec![], false)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(held(&node, "orders"), ["10.24.0.1"]);
    // Invalid instances through the real client are refused, nothing stored.
    let bad = naming
        .register_instance("orders".into(), None, instance("10.24.0.300", 8080, 1.0))
        .await;
    assert!(bad.is_err());
    let heavy = naming
        .register_instance("orders".into(), None, instance("10.24.0.2", 8080, 20_000.0))
        .await;
    assert!(heavy.is_err());
    let persistent = naming
        .register_instance(
            "orders".into(),
            None,
            ServiceInstance {
                ephemeral: false,
                ..instance("10.24.0.3", 8080, 1.0)
            },
        )
        .await;
    assert!(persistent.is_err());
    assert_eq!(held(&node, "orders"), ["10.24.0.1"]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nacos_connection_is_probed_then_dropped() {
    use roster_proto::nacos::bi_request_stream_client::BiRequestStreamClient;
    use roster_proto::nacos::request_client::RequestClient;
    let any = "127.0.0.1:0".parse().unwrap();
    let mut config = Config::default();
    config.server.http = any;
    config.server.grpc = any;
    config.session.keepalive = Duration::from_millis(300);
    config.session.probe_timeout = Duration::from_millis(300);
    config.session.sweep_interval = Duration::from_millis(100);
    let node = roster_server::start(config).await.unwrap();
    // Sessions before the connection (the one holding HTTP instances).
    let base = node.node.counts().0;

    // One HTTP/2 connection for the stream and the unary calls, as the
    // Nacos clients do.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(nacos_payload(
        "ConnectionSetupRequest",
        serde_json::json!({"clientVersion": "raw-test", "headers": {}}),
    ))
    .unwrap();
    let mut inbound = BiRequestStreamClient::new(channel.clone())
        .request_bi_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let unary = RequestClient::new(channel);
    let call = |kind: &'static str| {
        let mut unary = unary.clone();
        async move {
            nacos_body(
                &unary
                    .request(nacos_payload(kind, serde_json::json!({"requestId": "1"})))
                    .await
                    .unwrap()
                    .into_inner(),
            )
        }
    };
    let (kind, _) = call("HealthCheckRequest").await;
    assert_eq!(kind, "HealthCheckResponse");
    let (kind, body) = call("NoSuchRequest").await;
    assert_eq!(
        (kind.as_str(), body["errorCode"].as_i64()),
        ("ErrorResponse", Some(400))
    );
    assert_eq!(
        node.node.counts().0,
        base + 1,
        "the connection is a session"
    );

    // Idle past the keep-alive window: a detection request arrives; the
    // answer keeps the connection.
    let probe = timeout(WAIT, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (kind, body) = nacos_body(&probe);
    assert_eq!(kind, "ClientDetectionRequest");
    assert_eq!(body["headers"], serde_json::json!({}));
    tx.send(nacos_payload(
        "ClientDetectionResponse",
        serde_json::json!({"requestId": body["requestId"], "resultCode": 200}),
    ))
    .unwrap();
    let (kind, _) = call("HealthCheckRequest").await;
    assert_eq!(
        kind, "HealthCheckResponse",
        "still registered after answering"
    );

    // Silent from now on: probed again, then dropped and unregistered.
    timeout(WAIT, async {
        while let Ok(Some(p)) = inbound.message().await {
            assert_eq!(nacos_body(&p).0, "ClientDetectionRequest");
        }
    })
    .await
    .expect("the silent connection was dropped");
    eventually("the session to go", || node.node.counts().0 == base).await;
    // A request on the connection now says it is unregistered (301, which
    // clients take as "reconnect")...
    let (kind, body) = call("ServiceQueryRequest").await;
    assert_eq!(
        (kind.as_str(), body["errorCode"].as_i64()),
        ("ErrorResponse", Some(301))
    );
    // ... and a health check fails outright: a 3xx would read as healthy
    // to the Python client, which would then never reconnect.
    let (kind, body) = call("HealthCheckRequest").await;
    assert_eq!(
        (kind.as_str(), body["errorCode"].as_i64()),
        ("ErrorResponse", Some(500))
    );
    node.shutdown().await;
}

/// The client given every node of a three-node cluster: a subscriber on
/// another node is pushed its registration, and when its node dies it
/// fails over and its instance is listed by every living node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacos_sdk_against_a_cluster_is_pushed_across_nodes_and_fails_over() {
    let configs = cluster_configs(3);
    let mut nodes = start_cluster(&configs).await;
    let http = |i: usize| configs[i].server.http.to_string();
    let (cache_a, cache_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let all = (0..3).map(http).collect::<Vec<_>>().join(",");
    let registrar = nacos_of(&all, &cache_a).await;
    registrar
        .register_instance("rs-cluster".into(), None, instance("10.8.0.1", 8080, 1.0))
        .await
        .unwrap();
    let id = "10.8.0.1#8080#DEFAULT";
    let on = listed_by_the_living(&nodes, "rs-cluster", id, WAIT).await;
    let at: usize = on[1..].parse::<usize>().unwrap() - 1;

    // A subscriber on the other nodes is pushed it.
    let others: Vec<String> = (0..3).filter(|&i| i != at).map(http).collect();
    let subscriber = nacos_of(&others.join(","), &cache_b).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    subscriber
        .subscribe("rs-cluster".into(), None, vec![], Arc::new(Events(tx)))
        .await
        .unwrap();
    pushed(&mut rx, |l| l.iter().any(|i| i.ip == "10.8.0.1")).await;
    // A change on the registrar's node is pushed there too.
    registrar
        .register_instance("rs-cluster".into(), None, instance("10.8.0.1", 8080, 3.0))
        .await
        .unwrap();
    pushed(&mut rx, |l| {
        l.iter().any(|i| i.ip == "10.8.0.1" && i.weight == 3.0)
    })
    .await;
    // The change went to the peers as a delta of the session they had
    // acknowledged, not as the whole session.
    let origin = nodes[at].as_ref().unwrap();
    let stats = origin.node.replication().expect("a cluster").stats();
    assert!(stats.deltas_sent > 0, "{stats:?}");

    // Its node dies: the client registers again on another node, and
    // every living node lists the instance from there.
    nodes[at].take().unwrap().shutdown().await;
    let now_on = listed_by_the_living(&nodes, "rs-cluster", id, Duration::from_secs(60)).await;
    assert_ne!(now_on, on);
    for n in nodes.iter().flatten() {
        assert_eq!(
            origin_of(n, "rs-cluster", id).as_deref(),
            Some(now_on.as_str())
        );
    }
    for n in nodes.into_iter().flatten() {
        n.shutdown().await;
    }
}
