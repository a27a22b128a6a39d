//! Nacos v1 UDP push: an HTTP client that polls `instance/list` with a
//! `udpPort` becomes a subscriber at `clientIP:udpPort`, held as a Roster
//! stream session, so it is pushed like any other subscriber. Pushes are
//! `{"type":"dom",...}` datagrams (gzip from 1 KiB) carrying a random nonce
//! the `push-ack` must echo from the subscriber's address; an ack feeds
//! drain tracking, an unacknowledged push is sent once more unless a newer
//! one superseded it. A subscriber that stops polling is forgotten after
//! `nacos.udp_subscriber_ttl`.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use roster_core::ServiceKey;
use roster_core::push::Outbound;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::Nacos;
use super::wire::{integer, text};
use crate::node::{Control, Item, SessionLink};

/// Datagrams at least this long are gzip-compressed (clients detect gzip
/// by its magic bytes).
const GZIP_FROM: usize = 1024;

/// Cluster lists of one service pushed to one subscriber (clients poll a
/// handful; further ones are answered by polls alone).
const LISTS_PER_SERVICE: usize = 16;

/// A push waiting for its `push-ack`.
struct Pending {
    key: ServiceKey,
    clusters: String,
    revision: u64,
    packet: Vec<u8>,
    sent: Instant,
    resent: bool,
}

/// One UDP subscriber (one client socket).
struct Subscriber {
    addr: SocketAddr,
    link: Arc<SessionLink>,
    /// Subscribed services and the cluster lists polled for each (a
    /// client caches each list separately; each is pushed).
    subs: Mutex<HashMap<ServiceKey, BTreeSet<String>>>,
    last_poll: Mutex<Instant>,
    /// Pushes sent, by the nonce the ack must echo: at most one per
    /// service and cluster list (a newer push supersedes the older).
    pending: Mutex<HashMap<i64, Pending>>,
}

/// A nonce for a push: random, and exact in a JavaScript number (clients
/// echo it back through a double).
fn nonce() -> i64 {
    (crate::node::links::random_u128() as i64 & ((1 << 52) - 1)).max(1)
}

/// The UDP subscribers of a node and the socket they are pushed from.
pub struct UdpPush {
    socket: Arc<UdpSocket>,
    subscribers: Mutex<HashMap<SocketAddr, Arc<Subscriber>>>,
}

impl UdpPush {
    /// Pushes go out of `socket`; acks come back to it.
    pub fn new(socket: Arc<UdpSocket>) -> Self {
        Self {
            socket,
            subscribers: Mutex::new(HashMap::new()),
        }
    }
}

impl Nacos {
    /// Records a poll of `key` by the UDP subscriber at `addr`: it is kept
    /// alive, and subscribed to `key` (pushed the current list, then every
    /// change) if it was not already.
    pub fn udp_poll(self: &Arc<Self>, addr: SocketAddr, key: &ServiceKey, clusters: &str) {
        let (sub, new) = {
            let mut all = self.udp.subscribers.lock();
            match all.get(&addr) {
                Some(s) => (s.clone(), false),
                None => {
                    let limits = &self.node.config().limits;
                    if all.len() >= limits.udp_targets {
                        drop(all);
                        self.node.refuse("udp_targets", limits.udp_targets);
                        return;
                    }
                    let max = limits.udp_targets_per_address;
                    if all.keys().filter(|a| a.ip() == addr.ip()).count() >= max {
                        drop(all);
                        self.node.refuse("udp_targets_per_address", max);
                        return;
                    }
                    let Ok(link) = self
                        .node
                        .open_stream(&format!("nacos-udp {addr}"), None, None)
                    else {
                        return;
                    };
                    let s = Arc::new(Subscriber {
                        addr,
                        link,
                        subs: Mutex::new(HashMap::new()),
                        last_poll: Mutex::new(Instant::now()),
                        pending: Mutex::new(HashMap::new()),
                    });
                    all.insert(addr, s.clone());
                    (s, true)
                }
            }
        };
        if new {
            tracing::debug!(%addr, "nacos UDP subscriber");
            self.node
                .tasks
                .spawn(self.clone().run_subscriber(sub.clone()));
        }
        *sub.last_poll.lock() = Instant::now();
        sub.link.active(&self.node, false);
        let new_service = {
            let mut subs = sub.subs.lock();
            let lists = subs.entry(key.clone()).or_default();
            let new_service = lists.is_empty();
            if lists.len() < LISTS_PER_SERVICE {
                lists.insert(clusters.to_owned());
            }
            new_service
        };
        // Refused if the subscriber's session ended meanwhile (its task then
        // forgets it, and the next poll starts over) or it subscribes to
        // `limits.subscriptions_per_session` services already: the service
        // is not kept (polls are still answered; the next one tries again).
        if new_service && self.node.subscribe(&sub.link.id, key.clone()).is_err() {
            sub.subs.lock().remove(key);
        }
    }

    /// Sends a subscriber its pushes until it is forgotten or the node stops.
    async fn run_subscriber(self: Arc<Self>, sub: Arc<Subscriber>) {
        let config = self.node.config().nacos.clone();
        let period = (config.udp_ack_timeout / 2).max(Duration::from_millis(1));
        let mut resend = tokio::time::interval(period);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = sub.link.next() => {
                    let Some(item) = item else { break };
                    if !self.udp_outbound(&sub, item, config.udp_subscriber_ttl).await {
                        break;
                    }
                }
                _ = resend.tick() => self.udp_resend(&sub, config.udp_ack_timeout).await,
            }
        }
        let mut all = self.udp.subscribers.lock();
        if all.get(&sub.addr).is_some_and(|s| Arc::ptr_eq(s, &sub)) {
            all.remove(&sub.addr);
        }
        drop(all);
        self.node.close_session(&sub.link.id);
        tracing::debug!(addr = %sub.addr, "nacos UDP subscriber forgotten");
    }

    /// Handles one dequeued item; false when the subscriber is to go.
    async fn udp_outbound(&self, sub: &Subscriber, item: Item, ttl: Duration) -> bool {
        let update = match item {
            Outbound::Control(Control::Probe(_)) => {
                // The session sweep probes idle sessions; a UDP subscriber
                // answers by having polled recently.
                if sub.last_poll.lock().elapsed() >= ttl {
                    return false;
                }
                self.node.touch(&sub.link.id);
                return true;
            }
            Outbound::Control(Control::Welcome(_)) => return true,
            Outbound::Update(update) => update,
        };
        let key = &update.key;
        let Some(lists) = sub.subs.lock().get(&**key).cloned() else {
            return true;
        };
        for clusters in lists {
            let request = super::wire::InfoRequest {
                clusters: &clusters,
                healthy_only: false,
                grouped_name: true,
            };
            let info = self.info_text(key, update.view.as_ref(), &request);
            let stamp = nonce();
            let packet = encode_packet(&info, stamp);
            self.send(sub.addr, &packet).await;
            let mut pending = sub.pending.lock();
            pending.retain(|_, p| !(p.key == **key && p.clusters == clusters));
            pending.insert(
                stamp,
                Pending {
                    key: (**key).clone(),
                    clusters,
                    revision: update.revision(),
                    packet,
                    sent: Instant::now(),
                    resent: false,
                },
            );
        }
        true
    }

    /// Sends unacknowledged pushes once more, and gives up on those already
    /// sent twice. A push a newer one superseded is never sent again.
    async fn udp_resend(&self, sub: &Subscriber, timeout: Duration) {
        let mut again = Vec::new();
        sub.pending.lock().retain(|_, p| {
            if p.sent.elapsed() < timeout {
                return true;
            }
            if p.resent {
                return false;
            }
            p.resent = true;
            p.sent = Instant::now();
            again.push(p.packet.clone());
            true
        });
        for packet in again {
            self.send(sub.addr, &packet).await;
        }
    }

    async fn send(&self, addr: SocketAddr, packet: &[u8]) {
        match self.udp.socket.send_to(packet, addr).await {
            Ok(_) => {
                self.node.metrics.pushes_sent.inc();
            }
            Err(e) => tracing::debug!(%addr, "UDP push failed: {e}"),
        }
    }

    /// Reads client replies (`push-ack`) until the node stops. An ack
    /// counts only from the subscriber's own address, for the exact push
    /// it names.
    pub async fn run_udp_acks(self: Arc<Self>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let got = tokio::select! {
                _ = self.node.shutdown.cancelled() => return,
                got = self.udp.socket.recv_from(&mut buf) => got,
            };
            let (n, from) = match got {
                Ok(x) => x,
                // Errors such as ICMP port unreachable from a gone client.
                Err(e) => {
                    tracing::debug!("UDP receive: {e}");
                    continue;
                }
            };
            let Some(stamp) = ack_of(&buf[..n]) else {
                tracing::debug!(%from, "a UDP datagram that is not a push-ack");
                continue;
            };
            let sub = self.udp.subscribers.lock().get(&from).cloned();
            let Some(sub) = sub else { continue };
            let acked = sub.pending.lock().remove(&stamp);
            if let Some(p) = acked {
                *sub.last_poll.lock() = Instant::now();
                self.node.touch(&sub.link.id);
                self.node.ack(&sub.link.id, [(p.key, p.revision)]);
            }
        }
    }
}

/// The nonce a `push-ack` datagram echoes; `None` for anything else.
fn ack_of(datagram: &[u8]) -> Option<i64> {
    let reply = serde_json::from_slice::<Value>(datagram).ok()?;
    if text(&reply, "type") != Some("push-ack") {
        return None;
    }
    integer(&reply, "lastRefTime")
}

/// The datagram of a push: the `ServiceInfo` text under `data`, the nonce
/// as `lastRefTime` (the ack echoes it).
fn encode_packet(info: &str, stamp: i64) -> Vec<u8> {
    encode(&json!({
        "type": "dom",
        "data": info,
        "lastRefTime": stamp,
    }))
}

/// A push datagram: JSON, gzip-compressed when long.
fn encode(packet: &Value) -> Vec<u8> {
    let json = packet.to_string().into_bytes();
    if json.len() < GZIP_FROM {
        return json;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    match gz.write_all(&json).and_then(|()| gz.finish()) {
        Ok(compressed) => compressed,
        Err(_) => json,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    proptest::proptest! {
        /// Whatever arrives on the UDP socket, the ack reader finds a nonce
        /// or nothing, and never panics.
        #[test]
        fn any_datagram_is_an_ack_or_nothing(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = ack_of(&bytes);
        }

        #[test]
        fn an_ack_gives_back_the_nonce_it_echoes(stamp in 1i64..(1 << 52), extra in "[a-z]{0,8}") {
            let ack = json!({"type": "push-ack", "lastRefTime": stamp, "data": extra});
            proptest::prop_assert_eq!(ack_of(ack.to_string().as_bytes()), Some(stamp));
            let other = json!({"type": extra, "lastRefTime": stamp});
            proptest::prop_assert_eq!(ack_of(other.to_string().as_bytes()), None);
        }
    }

    #[test]
    fn long_packets_are_gzipped_short_ones_are_not() {
        let short = encode(&json!({"type": "dom", "data": "x"}));
        assert_eq!(short[0], b'{');
        let long = encode(&json!({"type": "dom", "data": "x".repeat(2000)}));
        assert_eq!(&long[..2], &[0x1f, 0x8b]);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&long[..])
            .read_to_string(&mut text)
            .unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["data"].as_str().unwrap().len(), 2000);
    }
}
