//! Push hot paths: encoding a view once for many subscribers, and the
//! node's whole cost of pushing one change to 1,000 subscribers (plan,
//! delta, encode once, enqueue, dequeue and copy into each message).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use roster_core::{Instance, ServiceKey};
use roster_proto::convert::full_update;
use roster_server::{Config, Node};

fn instance(n: u32, weight: f64) -> Instance {
    let mut i = Instance::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 8080);
    i.weight = weight;
    i.metadata.insert("zone", "eu-1a");
    i.metadata.insert("version", "1.4.2");
    i
}

fn setup(
    instances: u32,
    subscribers: usize,
) -> (
    std::sync::Arc<Node>,
    Vec<std::sync::Arc<roster_server::node::SessionLink>>,
    ServiceKey,
    roster_core::SessionId,
) {
    let (node, _changes) = Node::new(Config::default(), "bench", 1);
    node.set_ready();
    let key = ServiceKey::simple("hot").unwrap();
    let provider = node.open_stream("provider", None, None).unwrap();
    for n in 0..instances {
        node.register(&provider.id, key.clone(), instance(n, 1.0))
            .unwrap();
    }
    let links: Vec<_> = (0..subscribers)
        .map(|i| {
            let l = node.open_stream(&format!("s{i}"), None, None).unwrap();
            node.subscribe(&l.id, key.clone()).unwrap();
            l
        })
        .collect();
    for l in links.iter().chain([&provider]) {
        while let Some(item) = l.try_next() {
            node.native_message(item, 0);
        }
    }
    (node, links, key, provider.id.clone())
}

fn encode(c: &mut Criterion) {
    let (node, _links, key, _) = setup(1_000, 0);
    let view = node.view(&key).unwrap();
    let epoch = node.epoch().clone();
    c.bench_function("encode/full view of 1,000 instances", |b| {
        b.iter(|| black_box(full_update(&view, &epoch).encode_to_vec()))
    });
    let encoded = bytes::Bytes::from(full_update(&view, &epoch).encode_to_vec());
    c.bench_function(
        "encode/share encoded 1,000-instance view with 1,000 subscribers",
        |b| {
            b.iter(|| {
                for _ in 0..1_000 {
                    let msg = roster_proto::v1::ServerMessage {
                        channel: 0,
                        kind: Some(roster_proto::v1::server_message::Kind::Update(
                            encoded.clone(),
                        )),
                    };
                    black_box(msg.encode_to_vec());
                }
            })
        },
    );
}

fn push(c: &mut Criterion) {
    let (node, links, key, provider) = setup(1_000, 1_000);
    let mut n = 0u32;
    c.bench_function("push/one change to 1,000 subscribers", |b| {
        b.iter(|| {
            n = (n + 1) % 1_000;
            node.register(&provider, key.clone(), instance(n, f64::from(n % 7 + 1)))
                .unwrap();
            node.push(
                &std::sync::Arc::new(key.clone()),
                tokio::time::Instant::now(),
            );
            for l in &links {
                while let Some(item) = l.try_next() {
                    black_box(node.native_message(item, 0).encode_to_vec());
                }
            }
        })
    });
}

criterion_group!(benches, encode, push);
criterion_main!(benches);
