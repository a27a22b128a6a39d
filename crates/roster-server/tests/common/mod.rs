//! What the integration tests share: a node on free loopback ports,
//! service keys, raw Nacos gRPC payloads, and reading a Nacos UDP push.
// Each test file uses some of it.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use roster_core::ServiceKey;
use roster_proto::nacos::{Any, Metadata, Payload};
use roster_server::{Config, RunningServer};
use serde_json::Value;
use tokio::net::UdpSocket;

/// A node on free loopback ports, its config changed by `tweak` first.
pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = Config::default();
    config.server.http = "127.0.0.1:0".parse().unwrap();
    config.server.grpc = "127.0.0.1:0".parse().unwrap();
    tweak(&mut config);
    roster_server::start(config).await.unwrap()
}

/// A service in the default namespace and group.
pub fn key(name: &str) -> ServiceKey {
    ServiceKey::simple(name).unwrap()
}

/// A Nacos gRPC payload of `kind` carrying `body`.
pub fn nacos_payload(kind: &str, body: Value) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: kind.into(),
            ..Default::default()
        }),
        body: Some(Any {
            type_url: String::new(),
            value: serde_json::to_vec(&body).unwrap().into(),
        }),
    }
}

/// A Nacos gRPC payload's kind and body.
pub fn nacos_body(p: &Payload) -> (String, Value) {
    let kind = p.metadata.as_ref().unwrap().r#type.clone();
    let body = serde_json::from_slice(&p.body.as_ref().unwrap().value).unwrap();
    (kind, body)
}

/// The next Nacos UDP push datagram (within 20 s), unanswered: its packet
/// (gzip undone) and who sent it.
pub async fn udp_packet(socket: &UdpSocket) -> (Value, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = tokio::time::timeout(Duration::from_secs(20), socket.recv_from(&mut buf))
        .await
        .expect("a UDP push arrived")
        .unwrap();
    let bytes = &buf[..n];
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut s)
            .unwrap();
        s
    } else {
        String::from_utf8(bytes.to_vec()).unwrap()
    };
    (serde_json::from_str(&text).unwrap(), from)
}

/// A free loopback port `p` whose `p + offset` is free too (Nacos clients
/// given several servers find each one's gRPC port at its HTTP port plus
/// a fixed offset).
pub fn free_port_pair(offset: u16) -> (u16, u16) {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        let Some(q) = p.checked_add(offset) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", q)).is_ok() {
            return (p, q);
        }
    }
}

/// The configs of an `n`-member cluster on loopback: member i is named
/// `n{i+1}`, its gRPC port is its HTTP port + 1000 (as Nacos clients
/// expect), verify rounds last a second.
pub fn cluster_configs(n: usize) -> Vec<Config> {
    let ports: Vec<(u16, u16, u16)> = (0..n)
        .map(|_| {
            let (http, grpc) = free_port_pair(1000);
            let cluster = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            (http, grpc, cluster)
        })
        .collect();
    let members: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("n{}=127.0.0.1:{}", i + 1, p.2))
        .collect();
    ports
        .iter()
        .enumerate()
        .map(|(i, (http, grpc, cluster))| {
            let mut c = Config::default();
            c.server.node_name = format!("n{}", i + 1);
            c.server.http = SocketAddr::from(([127, 0, 0, 1], *http));
            c.server.grpc = SocketAddr::from(([127, 0, 0, 1], *grpc));
            c.cluster.listen = SocketAddr::from(([127, 0, 0, 1], *cluster));
            c.cluster.members = members.clone();
            c.cluster.verify_interval = Duration::from_secs(1);
            c.cluster.ready_alone_after = Duration::from_secs(3);
            c.cluster.snapshot_timeout = Duration::from_secs(1);
            c
        })
        .collect()
}

/// Starts every config at once and waits until each node is ready.
pub async fn start_cluster(configs: &[Config]) -> Vec<Option<RunningServer>> {
    let mut nodes = Vec::new();
    for c in configs {
        nodes.push(Some(roster_server::start(c.clone()).await.unwrap()));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while nodes
        .iter()
        .flatten()
        .any(|n| n.node.readiness() != roster_server::node::Readiness::Ready)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster never got ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes
}

/// The node whose session holds the instance `id` of `service` as `server`
/// shows it (none: not listed there).
pub fn origin_of(server: &RunningServer, service: &str, id: &str) -> Option<String> {
    let view = server.node.view(&key(service))?;
    view.instances.get(id).map(|r| r.owner.origin.to_string())
}

/// Waits (up to `within`) until every running node of `nodes` lists `id`
/// in `service` held by a session of a running node (none of a dead one's)
/// and holds nothing from the dead ones; returns the holding node.
pub async fn listed_by_the_living(
    nodes: &[Option<RunningServer>],
    service: &str,
    id: &str,
    within: Duration,
) -> String {
    let living: Vec<String> = nodes
        .iter()
        .flatten()
        .map(|n| n.node.epoch().node.clone())
        .collect();
    let deadline = std::time::Instant::now() + within;
    loop {
        let origins: Vec<Option<String>> = nodes
            .iter()
            .flatten()
            .map(|n| origin_of(n, service, id))
            .collect();
        let from_dead = nodes.iter().flatten().any(|n| {
            n.node
                .held_by_origin()
                .keys()
                .any(|origin| !living.contains(origin))
        });
        if let Some(Some(first)) = origins.first()
            && living.contains(first)
            && origins.iter().all(|o| o.as_ref() == Some(first))
            && !from_dead
        {
            return first.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} of {service} not listed by the living nodes: {origins:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
