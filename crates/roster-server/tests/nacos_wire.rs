//! The Nacos 2.x gRPC protocol at the wire, where the real clients cannot
//! be made to misbehave: a raw connection (one HTTP/2 connection carrying
//! unary calls and the bi-stream, as every Nacos client has) against a
//! real node on loopback. Push retries, a second stream taking the
//! connection over, the protect threshold, and pushes that show exactly the
//! view that was planned.

use std::time::Duration;

use roster_core::Instance;
use roster_proto::nacos::Payload;
use roster_proto::nacos::bi_request_stream_client::BiRequestStreamClient;
use roster_proto::nacos::request_client::RequestClient;
use roster_server::RunningServer;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tonic::transport::Channel;

mod common;
use common::{key, nacos_body, nacos_payload, start_with};

const WAIT: Duration = Duration::from_secs(10);

/// One bi-stream of a raw connection.
struct Stream {
    out: mpsc::UnboundedSender<Payload>,
    inbound: tonic::Streaming<Payload>,
}

impl Stream {
    async fn open(channel: &Channel) -> Self {
        let (out, rx) = mpsc::unbounded_channel();
        out.send(nacos_payload(
            "ConnectionSetupRequest",
            json!({"clientVersion": "raw-test", "headers": {}}),
        ))
        .unwrap();
        let inbound = BiRequestStreamClient::new(channel.clone())
            .request_bi_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { out, inbound }
    }

    /// The next request the server sends on this stream, if one comes
    /// within `within`.
    async fn next_within(&mut self, within: Duration) -> Option<(String, Value)> {
        match timeout(within, self.inbound.message()).await {
            Ok(Ok(Some(p))) => Some(nacos_body(&p)),
            _ => None,
        }
    }

    /// The next push, or a panic.
    async fn push(&mut self) -> Value {
        loop {
            let (kind, body) = self.next_within(WAIT).await.expect("a push in time");
            if kind == "NotifySubscriberRequest" {
                return body;
            }
        }
    }

    /// Reads (and drops) what comes until the server ends the stream;
    /// `Err` if it is still open after `within`.
    async fn until_closed(&mut self, within: Duration) -> Result<(), tokio::time::error::Elapsed> {
        timeout(within, async {
            while let Ok(Some(_)) = self.inbound.message().await {}
        })
        .await
    }

    fn answer(&self, request_id: &Value, result: i64) {
        self.out
            .send(nacos_payload(
                "NotifySubscriberResponse",
                json!({"requestId": request_id, "resultCode": result, "errorCode": 0, "message": ""}),
            ))
            .unwrap();
    }
}

/// A raw Nacos connection: its channel and unary client.
struct Raw {
    channel: Channel,
    unary: RequestClient<Channel>,
}

impl Raw {
    async fn connect(server: &RunningServer) -> Self {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
        Self {
            unary: RequestClient::new(channel.clone()),
            channel,
        }
    }

    async fn call(&self, kind: &str, body: Value) -> (String, Value) {
        let reply = self
            .unary
            .clone()
            .request(nacos_payload(kind, body))
            .await
            .unwrap()
            .into_inner();
        nacos_body(&reply)
    }

    /// Opens a stream and waits until the node knows the connection.
    async fn stream(&self) -> Stream {
        let stream = Stream::open(&self.channel).await;
        timeout(WAIT, async {
            while self.call("HealthCheckRequest", json!({})).await.0 != "HealthCheckResponse" {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the connection was registered");
        stream
    }

    async fn register(&self, service: &str, ip: &str, port: u16) {
        let (kind, _) = self
            .call(
                "InstanceRequest",
                json!({"namespace": "public", "groupName": "DEFAULT_GROUP", "serviceName": service,
                       "type": "registerInstance",
                       "instance": {"ip": ip, "port": port, "weight": 1.0, "healthy": true,
                                    "enabled": true, "ephemeral": true, "metadata": {}}}),
            )
            .await;
        assert_eq!(kind, "InstanceResponse");
    }

    async fn subscribe(&self, service: &str) -> Value {
        let (kind, body) = self
            .call(
                "SubscribeServiceRequest",
                json!({"namespace": "public", "groupName": "DEFAULT_GROUP", "serviceName": service,
                       "subscribe": true, "clusters": ""}),
            )
            .await;
        assert_eq!(kind, "SubscribeServiceResponse");
        body["serviceInfo"].clone()
    }
}

fn ips(info: &Value) -> Vec<String> {
    let mut ips: Vec<String> = info["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{}:{}", h["ip"].as_str().unwrap(), h["port"]))
        .collect();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_not_acknowledged_or_refused_is_sent_again_a_bounded_number_of_times() {
    let server = start_with(|c| {
        c.nacos.push_ack_timeout = Duration::from_millis(200);
        c.nacos.push_retries = 2;
    })
    .await;
    let raw = Raw::connect(&server).await;
    let mut stream = raw.stream().await;
    raw.subscribe("retried").await;
    let first = stream.push().await; // the subscription's view
    stream.answer(&first["requestId"], 200);

    let writer = roster_client::Connection::connect(&server.grpc_addr.to_string())
        .await
        .unwrap()
        .open_session("writer")
        .await
        .unwrap();
    writer
        .register(
            &key("retried"),
            &Instance::new("10.30.0.1".parse().unwrap(), 80),
        )
        .await
        .unwrap();
    // Never acknowledged: sent once, then twice more, then given up.
    let push = stream.push().await;
    let rid = push["requestId"].clone();
    for _ in 0..2 {
        let again = stream.push().await;
        assert_eq!(again["requestId"], rid, "the same push again");
        assert_eq!(ips(&again["serviceInfo"]), ips(&push["serviceInfo"]));
    }
    assert!(
        stream
            .next_within(Duration::from_millis(800))
            .await
            .is_none(),
        "at most push_retries more times"
    );

    // Refused by the client: sent again soon; accepted: not again.
    writer
        .register(
            &key("retried"),
            &Instance::new("10.30.0.2".parse().unwrap(), 80),
        )
        .await
        .unwrap();
    let push = stream.push().await;
    stream.answer(&push["requestId"], 500);
    let again = stream.push().await;
    assert_eq!(again["requestId"], push["requestId"]);
    stream.answer(&again["requestId"], 200);
    assert!(
        stream
            .next_within(Duration::from_millis(800))
            .await
            .is_none()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_takes_the_connection_over_without_dropping_its_instances() {
    let server = start_with(|_| {}).await;
    let raw = Raw::connect(&server).await;
    let first = raw.stream().await;
    raw.register("taken-over", "10.31.0.1", 80).await;
    let listed = || {
        server
            .node
            .view(&key("taken-over"))
            .map_or(0, |p| p.instances.len())
    };
    assert_eq!(listed(), 1);
    let sessions = server.node.counts().0;

    let mut second = raw.stream().await;
    assert_eq!(listed(), 1, "kept while the new stream takes over");
    assert_eq!(server.node.counts().0, sessions, "the same session");
    // Pushes now go to the new stream.
    raw.subscribe("taken-over").await;
    let push = second.push().await;
    assert_eq!(ips(&push["serviceInfo"]), ["10.31.0.1:80"]);
    // The old stream ending changes nothing.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listed(), 1);
    // The current one ending ends the session.
    drop(second);
    timeout(WAIT, async {
        while listed() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection's instance went with its last stream");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protect_threshold_lists_every_instance_when_too_few_are_healthy() {
    let server = start_with(|_| {}).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/nacos/v1/ns", server.http_addr);
    let post = |path: &str, form: Vec<(&str, &str)>| {
        let r = http.post(format!("{base}{path}")).form(&form).send();
        async move { r.await.unwrap().error_for_status().unwrap() }
    };
    post(
        "/service",
        vec![("serviceName", "guarded"), ("protectThreshold", "0.6")],
    )
    .await;
    for (ip, healthy) in [
        ("10.32.0.1", "true"),
        ("10.32.0.2", "false"),
        ("10.32.0.3", "false"),
    ] {
        post(
            "/instance",
            vec![
                ("serviceName", "guarded"),
                ("ip", ip),
                ("port", "80"),
                ("healthy", healthy),
            ],
        )
        .await;
    }
    let list = |healthy_only: &'static str| {
        let r = http
            .get(format!("{base}/instance/list"))
            .query(&[("serviceName", "guarded"), ("healthyOnly", healthy_only)])
            .send();
        async move { r.await.unwrap().json::<Value>().await.unwrap() }
    };
    // 1 healthy of 3 is at or below 0.6: every instance, shown healthy.
    let protected = list("true").await;
    assert_eq!(protected["reachProtectionThreshold"], true, "{protected}");
    assert_eq!(ips(&protected).len(), 3);
    assert!(
        protected["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["healthy"] == true)
    );
    // Over gRPC too.
    let raw = Raw::connect(&server).await;
    let _stream = raw.stream().await;
    let (_, reply) = raw
        .call(
            "ServiceQueryRequest",
            json!({"namespace": "public", "groupName": "DEFAULT_GROUP", "serviceName": "guarded",
                   "cluster": "", "healthyOnly": true}),
        )
        .await;
    assert_eq!(reply["serviceInfo"]["reachProtectionThreshold"], true);
    assert_eq!(ips(&reply["serviceInfo"]).len(), 3);

    // Below the threshold's reach: only the healthy one.
    let r = http
        .put(format!("{base}/service"))
        .form(&[("serviceName", "guarded"), ("protectThreshold", "0.2")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let plain = list("true").await;
    assert_eq!(plain["reachProtectionThreshold"], false);
    assert_eq!(ips(&plain), ["10.32.0.1:80"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_each_burst_of_changes_the_last_push_shows_the_final_view() {
    let server = start_with(|c| c.nacos.push_ack_timeout = Duration::from_secs(30)).await;
    let raw = Raw::connect(&server).await;
    let mut stream = raw.stream().await;
    raw.subscribe("planned").await;
    let writer = roster_client::Connection::connect(&server.grpc_addr.to_string())
        .await
        .unwrap()
        .open_session("writer")
        .await
        .unwrap();
    let mut instance = Instance::new("10.33.0.1".parse().unwrap(), 80);
    // Bursts of changes, each followed by a quiet spell: after each, the
    // last push must show the last change, not an earlier view.
    for round in 1..=20u32 {
        for step in 1..=10u32 {
            instance.weight = f64::from(round * 100 + step);
            writer.register(&key("planned"), &instance).await.unwrap();
        }
        let wanted = f64::from(round * 100 + 10);
        let seen = timeout(WAIT, async {
            loop {
                let push = stream.push().await;
                stream.answer(&push["requestId"], 200);
                let weight = push["serviceInfo"]["hosts"][0]["weight"].as_f64();
                if weight == Some(wanted) {
                    return;
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "round {round}: the final view was pushed");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_cannot_remove_or_change_a_grpc_connections_instance() {
    let server = start_with(|_| {}).await;
    let raw = Raw::connect(&server).await;
    let stream = raw.stream().await;
    raw.register("mixed", "10.34.0.1", 80).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/nacos/v1/ns/instance", server.http_addr);
    let at = [
        ("serviceName", "mixed"),
        ("ip", "10.34.0.1"),
        ("port", "80"),
    ];
    // Deregistering its address over HTTP removes no gRPC registration.
    let r = http.delete(&base).query(&at).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let listed = || {
        server
            .node
            .view(&key("mixed"))
            .map(|p| {
                p.instances
                    .values()
                    .map(|r| r.instance.weight)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(listed(), [1.0]);
    // Nor is it the HTTP client's to change.
    let r = http
        .put(&base)
        .query(&at)
        .query(&[("weight", "0")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(listed(), [1.0]);
    // An HTTP registration of the same address is a second holder: when
    // the gRPC connection goes, the address stays listed (its HTTP lease).
    let r = http
        .post(&base)
        .query(&at)
        .query(&[("weight", "3")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(listed(), [3.0], "the later registration is shown");
    let sessions = server.node.counts().0;
    drop(stream);
    drop(raw);
    timeout(WAIT, async {
        while server.node.counts().0 >= sessions {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the gRPC connection's session ended");
    assert_eq!(listed(), [3.0]);
    server.shutdown().await;
}

/// A UDP subscriber following the same cluster list of a service as a gRPC
/// connection is pushed the service named `group@@service` (the HTTP
/// name), never the gRPC text naming it bare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_push_names_the_service_grouped_beside_a_grpc_subscriber_of_its_clusters() {
    let server = start_with(|_| {}).await;
    let raw = Raw::connect(&server).await;
    let _stream = raw.stream().await;
    raw.register("named", "10.35.0.1", 80).await;
    let (kind, body) = raw
        .call(
            "SubscribeServiceRequest",
            json!({"namespace": "public", "groupName": "DEFAULT_GROUP", "serviceName": "named",
                   "subscribe": true, "clusters": "DEFAULT"}),
        )
        .await;
    assert_eq!(kind, "SubscribeServiceResponse");
    assert_eq!(body["serviceInfo"]["name"], "named", "gRPC names it bare");

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port().to_string();
    let r = reqwest::Client::new()
        .get(format!(
            "http://{}/nacos/v1/ns/instance/list",
            server.http_addr
        ))
        .query(&[
            ("serviceName", "named"),
            ("clusters", "DEFAULT"),
            ("udpPort", port.as_str()),
            ("clientIP", "127.0.0.1"),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["name"], "DEFAULT_GROUP@@named");
    let (packet, _) = common::udp_packet(&socket).await;
    let pushed: Value = serde_json::from_str(packet["data"].as_str().unwrap()).unwrap();
    assert_eq!(pushed["name"], "DEFAULT_GROUP@@named");
    assert_eq!(ips(&pushed), ["10.35.0.1:80"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_acknowledges_is_bounded_then_closed_and_may_come_back() {
    let server = start_with(|c| {
        c.nacos.push_ack_timeout = Duration::from_millis(200);
        c.nacos.push_retries = 1;
        c.limits.pending_pushes_per_connection = 2;
        c.limits.stuck_timeout = Duration::from_secs(2);
    })
    .await;
    let raw = Raw::connect(&server).await;
    let mut stream = raw.stream().await;
    for service in ["deaf-1", "deaf-2", "deaf-3"] {
        raw.subscribe(service).await;
    }
    // Two pushes in flight at most: the third waits for an ack (what
    // arrives meanwhile are the two sent again).
    let mut pushed = std::collections::BTreeMap::new();
    while let Some((kind, body)) = stream.next_within(Duration::from_millis(700)).await {
        assert_eq!(kind, "NotifySubscriberRequest");
        pushed.insert(
            body["serviceName"].as_str().unwrap().to_owned(),
            body["requestId"].clone(),
        );
    }
    assert_eq!(pushed.len(), 2, "pushes in flight: {pushed:?}");
    let first = pushed.values().next().unwrap().clone();
    stream.answer(&first, 200);
    let third = stream.push().await;
    assert!(!pushed.contains_key(third["serviceName"].as_str().unwrap()));

    // Nothing more is acknowledged: the connection is closed as stuck.
    let closed = stream.until_closed(Duration::from_secs(10)).await;
    assert!(closed.is_ok(), "the stuck subscriber's stream ended");
    assert_eq!(server.node.metrics.stuck_ejections.get(), 1);

    // The client comes back on a new stream and is served afresh.
    let mut again = raw.stream().await;
    raw.subscribe("deaf-1").await;
    let push = again.push().await;
    assert_eq!(push["serviceName"], "deaf-1");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_register_more_than_its_session_may() {
    let server = start_with(|c| c.limits.instances_per_session = 20).await;
    let raw = Raw::connect(&server).await;
    let _stream = raw.stream().await;
    let batch = |service: &str, count: u16| {
        let instances: Vec<Value> = (0..count)
            .map(|i| {
                json!({"ip": format!("10.40.0.{}", i + 1), "port": 80, "weight": 1.0,
                            "healthy": true, "enabled": true, "ephemeral": true, "metadata": {}})
            })
            .collect();
        json!({"namespace": "public", "groupName": "DEFAULT_GROUP", "serviceName": service,
               "type": "batchRegisterInstance", "instances": instances})
    };
    let (kind, _) = raw.call("BatchInstanceRequest", batch("crowd-1", 15)).await;
    assert_eq!(kind, "BatchInstanceResponse");
    // Ten more in another service would make 25: refused whole.
    let (kind, body) = raw.call("BatchInstanceRequest", batch("crowd-2", 10)).await;
    assert_eq!(kind, "ErrorResponse", "{body}");
    assert_eq!(body["errorCode"], 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("limits.instances_per_session is 20"),
        "{message}"
    );
    assert!(
        server
            .node
            .view(&key("crowd-2"))
            .is_none_or(|p| p.view.instances.is_empty())
    );
    assert_eq!(
        server
            .node
            .view(&key("crowd-1"))
            .unwrap()
            .view
            .instances
            .len(),
        15
    );
    // Replacing the first batch by a smaller one is within the limit.
    let (kind, _) = raw.call("BatchInstanceRequest", batch("crowd-1", 5)).await;
    assert_eq!(kind, "BatchInstanceResponse");
    let (kind, _) = raw.call("BatchInstanceRequest", batch("crowd-2", 10)).await;
    assert_eq!(kind, "BatchInstanceResponse");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_answers_late_is_not_taken_for_stuck() {
    let server = start_with(|c| {
        c.limits.stuck_timeout = Duration::from_secs(1);
        c.push.coalesce_window = Duration::from_millis(1);
    })
    .await;
    let raw = Raw::connect(&server).await;
    let mut stream = raw.stream().await;
    raw.subscribe("busy").await;
    let first = stream.push().await;
    let writer = roster_client::Connection::connect(&server.grpc_addr.to_string())
        .await
        .unwrap()
        .open_session("writer")
        .await
        .unwrap();
    let mut instance = Instance::new("10.50.0.1".parse().unwrap(), 80);
    writer.register(&key("busy"), &instance).await.unwrap();
    // Each push is answered only once the next has gone out, so every
    // answer names a push already superseded: the client is slow, but it
    // answers, and stays.
    let mut previous = first["requestId"].clone();
    let started = std::time::Instant::now();
    let mut weight = 1.0;
    while started.elapsed() < Duration::from_secs(3) {
        weight += 1.0;
        instance.weight = weight;
        writer.update(&key("busy"), &instance).await.unwrap();
        let push = stream.push().await;
        stream.answer(&previous, 200);
        previous = push["requestId"].clone();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(server.node.metrics.stuck_ejections.get(), 0);
    assert_eq!(
        raw.call("HealthCheckRequest", json!({})).await.0,
        "HealthCheckResponse"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused_naming_it() {
    let server = start_with(|c| c.limits.grpc_message_bytes = 2048).await;
    let raw = Raw::connect(&server).await;
    let _stream = raw.stream().await;
    let body = json!({"namespace": "public", "groupName": "DEFAULT_GROUP", "serviceName": "big",
                      "type": "registerInstance",
                      "instance": {"ip": "10.60.0.1", "port": 80, "metadata": {"pad": "x".repeat(4096)}}});
    let status = raw
        .unary
        .clone()
        .request(nacos_payload("InstanceRequest", body))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("limits.grpc_message_bytes is 2048"),
        "{status:?}"
    );
    // The connection still serves what fits.
    assert_eq!(
        raw.call("HealthCheckRequest", json!({})).await.0,
        "HealthCheckResponse"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_reads_but_never_acknowledges_is_closed() {
    let server = start_with(|c| {
        c.nacos.push_ack_timeout = Duration::from_millis(200);
        c.nacos.push_retries = 1;
        c.limits.stuck_timeout = Duration::from_secs(2);
    })
    .await;
    let raw = Raw::connect(&server).await;
    let mut stream = raw.stream().await;
    for service in ["mute-1", "mute-2"] {
        raw.subscribe(service).await;
    }
    // It reads every push (so nothing stays queued) and answers none.
    let ended = stream.until_closed(Duration::from_secs(10)).await;
    assert!(ended.is_ok(), "the connection was closed as stuck");
    assert_eq!(server.node.metrics.stuck_ejections.get(), 1);
    server.shutdown().await;
}
