//! Session keep-alive and expiry under paused (virtual) time.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use roster_core::push::Outbound;
use roster_core::{Instance, ServiceKey};
use roster_proto::v1::{self, server_message::Kind};
use roster_server::Config;
use roster_server::node::fanout::run_pusher;
use roster_server::node::{Control, Node, SessionLink};

fn config() -> Config {
    let mut c = Config::default();
    c.session.keepalive = Duration::from_secs(20);
    c.session.probe_timeout = Duration::from_secs(3);
    c
}

/// A ready node and its pusher.
fn started() -> Arc<Node> {
    let (node, changes) = Node::new(config(), "test", 1);
    node.set_ready();
    tokio::spawn(run_pusher(node.clone(), changes));
    node
}

/// The next message queued for `link`, decoded.
async fn next(node: &Node, link: &SessionLink) -> Kind {
    let item = tokio::time::timeout(Duration::from_secs(1), link.next())
        .await
        .expect("a message is queued")
        .expect("session open");
    node.native_message(item, 0)
        .kind
        .expect("message has a kind")
}

fn update(kind: Kind) -> v1::ServiceUpdate {
    match kind {
        Kind::Update(bytes) => v1::ServiceUpdate::decode(bytes).unwrap(),
        other => panic!("expected an update, got {other:?}"),
    }
}

fn assert_nothing_queued(link: &SessionLink) {
    assert_eq!(link.queued(), 0, "nothing more queued");
}

#[tokio::test(start_paused = true)]
async fn idle_session_is_probed_then_expired_and_subscribers_are_told() {
    let node = started();
    let key = ServiceKey::simple("orders").unwrap();

    let provider = node.open_stream("provider", None, None).unwrap();
    let watcher = node.open_stream("watcher", None, None).unwrap();
    assert!(matches!(next(&node, &provider).await, Kind::Welcome(_)));
    assert!(matches!(next(&node, &watcher).await, Kind::Welcome(_)));
    node.register(
        &provider.id,
        key.clone(),
        Instance::new("10.0.0.1".parse().unwrap(), 80),
    )
    .unwrap();
    node.subscribe(&watcher.id, key.clone()).unwrap();
    let full = update(next(&node, &watcher).await);
    assert_eq!(
        full.kind
            .map(|k| matches!(k, v1::service_update::Kind::Full(f) if f.instances.len() == 1)),
        Some(true)
    );

    tokio::time::advance(Duration::from_secs(19)).await;
    assert_eq!(node.sweep(), 0);
    assert_nothing_queued(&provider);
    node.touch(&watcher.id); // the watcher keeps talking

    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(node.sweep(), 0);
    assert!(
        matches!(next(&node, &provider).await, Kind::Probe(_)),
        "idle provider is probed"
    );
    assert_nothing_queued(&watcher);

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(node.sweep(), 0, "still within the probe timeout");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(node.sweep(), 1, "silent past the probe timeout: expired");
    assert!(provider.closed.is_cancelled(), "its stream is closed");

    let removal = update(next(&node, &watcher).await);
    match removal.kind {
        Some(v1::service_update::Kind::Delta(d)) => {
            assert_eq!(d.removed, vec!["10.0.0.1#80#DEFAULT".to_owned()]);
            assert_eq!(d.from_revision, full.revision);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    assert!(node.view(&key).unwrap().instances.is_empty());
    assert_eq!(node.counts().0, 1, "only the watcher's session is left");
}

#[tokio::test(start_paused = true)]
async fn a_probed_session_that_answers_is_kept() {
    let node = started();
    let key = ServiceKey::simple("kept").unwrap();
    let provider: Arc<SessionLink> = node.open_stream("provider", None, None).unwrap();
    node.register(
        &provider.id,
        key.clone(),
        Instance::new("10.0.0.2".parse().unwrap(), 80),
    )
    .unwrap();
    tokio::time::advance(Duration::from_secs(20)).await;
    node.sweep();
    let mut probed = false;
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_millis(10), provider.next()).await
    {
        probed |= matches!(item, Outbound::Control(Control::Probe(_)));
    }
    assert!(probed);
    tokio::time::advance(Duration::from_secs(1)).await;
    node.touch(&provider.id); // the probe reply
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(node.sweep(), 0);
    assert_eq!(node.view(&key).unwrap().instances.len(), 1);
}

#[tokio::test]
async fn a_session_whose_queue_is_never_taken_is_closed_as_stuck() {
    let mut c = config();
    c.limits.stuck_timeout = Duration::from_millis(200);
    let (node, changes) = Node::new(c, "test", 1);
    node.set_ready();
    tokio::spawn(run_pusher(node.clone(), changes));
    let reader = node.open_stream("reader", None, None).unwrap();
    let deaf = node.open_stream("deaf", None, None).unwrap();
    assert!(matches!(next(&node, &reader).await, Kind::Welcome(_)));
    let key = ServiceKey::simple("orders").unwrap();
    node.subscribe(&reader.id, key.clone()).unwrap();
    node.subscribe(&deaf.id, key.clone()).unwrap();
    // The reader takes what it is sent; the deaf session's queue only grows.
    let _ = next(&node, &reader).await;
    node.sweep();
    assert!(!deaf.closed.is_cancelled(), "not stuck yet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = reader.try_next();
    node.sweep();
    assert!(deaf.closed.is_cancelled(), "closed as stuck");
    assert!(!reader.closed.is_cancelled());
    assert_eq!(node.metrics.stuck_ejections.get(), 1);
    assert_eq!(node.counts().0, 1, "only the reader's session is left");
}
