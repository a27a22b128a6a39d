//! The as-shipped Rust Nacos client (`nacos-sdk` 0.8, Nagle's algorithm on
//! its sockets) querying a Roster node back to back over the Nacos gRPC
//! protocol: one `get_all_instances(subscribe = false)` per iteration, with
//! the server's quick ACKs on (the default) and off.

use std::collections::HashMap;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use nacos_sdk::api::naming::{NamingService, NamingServiceBuilder, ServiceInstance};
use nacos_sdk::api::props::ClientProps;
use roster_server::{Config, RunningServer};

async fn setup(quick_ack: bool, cache: &tempfile::TempDir) -> (RunningServer, NamingService) {
    let mut config = Config::default();
    config.server.http = "127.0.0.1:0".parse().unwrap();
    config.server.grpc = "127.0.0.1:0".parse().unwrap();
    config.server.tcp_quickack = quick_ack;
    let server = roster_server::start(config).await.unwrap();
    let props = ClientProps::new()
        .server_addr(format!("127.0.0.1:{}", server.http_addr.port()))
        .remote_grpc_port(server.grpc_addr.port())
        .namespace("public")
        .env_first(false)
        .naming_load_cache_at_start(false)
        .cache_dir(cache.path().to_string_lossy().to_string());
    let naming = NamingServiceBuilder::new(props).build().await.unwrap();
    for n in 0..10 {
        let instance = ServiceInstance {
            ip: format!("10.0.0.{n}"),
            port: 8080,
            weight: 1.0,
            metadata: HashMap::from([("zone".to_owned(), "a".to_owned())]),
            ..ServiceInstance::default()
        };
        naming
            .register_instance("queried".into(), None, instance)
            .await
            .unwrap();
    }
    (server, naming)
}

fn query(c: &mut Criterion) {
    // The node's own runtime (the server under test runs on it).
    let rt = roster_server::runtime().build().unwrap();
    let mut group = c.benchmark_group("nacos_sdk_query");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, quick_ack) in [("quickack_on", true), ("quickack_off", false)] {
        let cache = tempfile::tempdir().unwrap();
        let (server, naming) = rt.block_on(setup(quick_ack, &cache));
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let list = naming
                        .get_all_instances("queried".into(), None, vec![], false)
                        .await
                        .unwrap();
                    assert_eq!(list.len(), 10);
                })
            })
        });
        drop(naming);
        rt.block_on(server.shutdown());
    }
    group.finish();
}

criterion_group!(benches, query);
criterion_main!(benches);
