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
