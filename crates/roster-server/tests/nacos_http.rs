//! The Nacos HTTP Open API (v1 and v2) and the v1 UDP push, with a plain
//! HTTP client and a UDP socket against a Roster node on free loopback
//! ports. Heartbeat deadlines are configured short, so expiry is real.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use roster_client::Client;
use roster_core::ServiceKey;
use roster_server::RunningServer;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::time::{Instant, sleep, timeout};

mod common;
use common::{start_with, udp_packet};

const WAIT: Duration = Duration::from_secs(20);

/// A request to the node's Nacos API: `(status, body text)`.
async fn call(
    server: &RunningServer,
    method: Method,
    path: &str,
    query: &[(&str, &str)],
    form: &[(&str, &str)],
) -> (StatusCode, String) {
    let url = format!("http://{}/nacos{path}", server.http_addr);
    let mut req = reqwest::Client::new().request(method, url).query(query);
    if !form.is_empty() {
        req = req.form(form);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.text().await.unwrap())
}

async fn json_of(server: &RunningServer, path: &str, query: &[(&str, &str)]) -> Value {
    let (status, body) = call(server, Method::GET, path, query, &[]).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn hosts(list: &Value) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = list["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                format!("{}:{}", h["ip"].as_str().unwrap(), h["port"]),
                h["healthy"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Polls `instance/list` until `wanted` holds.
async fn listed(server: &RunningServer, service: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    timeout(WAIT, async {
        loop {
            let list = json_of(server, "/v1/ns/instance/list", &[("serviceName", service)]).await;
            if wanted(&list) {
                return list;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the list reached the wanted state")
}

fn assert_no_nulls(v: &Value) {
    match v {
        Value::Null => panic!("null in reply"),
        Value::Array(a) => a.iter().for_each(assert_no_nulls),
        Value::Object(m) => m.values().for_each(assert_no_nulls),
        _ => {}
    }
}

#[tokio::test]
async fn v1_instances_register_list_update_and_deregister() {
    let server = start_with(|_| {}).await;
    // Query-string parameters (Node, Python) and form bodies (Java).
    let (s, body) = call(
        &server,
        Method::POST,
        "/v1/ns/instance",
        &[
            ("serviceName", "orders"),
            ("ip", "10.0.0.1"),
            ("port", "8080"),
            ("metadata", r#"{"zone":"a"}"#),
        ],
        &[],
    )
    .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "ok"));
    let (s, body) = call(
        &server,
        Method::POST,
        "/v1/ns/instance",
        &[],
        &[
            ("serviceName", "DEFAULT_GROUP@@orders"),
            ("ip", "10.0.0.2"),
            ("port", "8080"),
            ("clusterName", "None"),
            ("weight", "2"),
            ("enable", "True"),
            ("metadata", "zone=b,rack=7"),
        ],
    )
    .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "ok"));

    let list = json_of(
        &server,
        "/v1/ns/instance/list",
        &[("serviceName", "orders"), ("clusters", "")],
    )
    .await;
    assert_no_nulls(&list);
    assert_eq!(list["name"], "DEFAULT_GROUP@@orders");
    assert_eq!(list["clusters"], "");
    assert_eq!(
        hosts(&list),
        vec![
            ("10.0.0.1:8080".to_owned(), true),
            ("10.0.0.2:8080".to_owned(), true)
        ]
    );
    let second = list["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["ip"] == "10.0.0.2")
        .unwrap();
    assert_eq!(second["instanceId"], "10.0.0.2#8080#DEFAULT");
    assert_eq!(second["weight"], 2.0);
    assert_eq!(second["metadata"], json!({"zone": "b", "rack": "7"}));

    // The list of another cluster is empty; an unknown service is empty too.
    let other = json_of(
        &server,
        "/v1/ns/instance/list",
        &[("serviceName", "orders"), ("clusters", "EAST")],
    )
    .await;
    assert_eq!(other["clusters"], "EAST");
    assert!(hosts(&other).is_empty());
    let unknown = json_of(&server, "/v1/ns/instance/list", &[("serviceName", "nope")]).await;
    assert!(hosts(&unknown).is_empty());

    // Update (PUT replaces the given fields), patch (merges metadata).
    let id = [
        ("serviceName", "orders"),
        ("ip", "10.0.0.1"),
        ("port", "8080"),
    ];
    let (s, _) = call(
        &server,
        Method::PUT,
        "/v1/ns/instance",
        &[id.as_slice(), &[("weight", "5"), ("enabled", "false")]].concat(),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &server,
        Method::PATCH,
        "/v1/ns/instance",
        &[id.as_slice(), &[("metadata", "extra=1")]].concat(),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let detail = json_of(&server, "/v1/ns/instance", &id).await;
    assert_no_nulls(&detail);
    assert_eq!(detail["service"], "DEFAULT_GROUP@@orders");
    assert_eq!(detail["weight"], 5.0);
    assert_eq!(detail["enabled"], false);
    assert_eq!(detail["metadata"], json!({"zone": "a", "extra": "1"}));
    assert_eq!(detail["clusterName"], "DEFAULT");

    // Services.
    let services = json_of(
        &server,
        "/v1/ns/service/list",
        &[("pageNo", "1"), ("pageSize", "10")],
    )
    .await;
    assert_eq!(services, json!({"count": 1, "doms": ["orders"]}));

    // Deregister one: gone from the list and from detail (404).
    let (s, body) = call(&server, Method::DELETE, "/v1/ns/instance", &id, &[]).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "ok"));
    let list = json_of(
        &server,
        "/v1/ns/instance/list",
        &[("serviceName", "orders")],
    )
    .await;
    assert_eq!(hosts(&list), vec![("10.0.0.2:8080".to_owned(), true)]);
    let (s, body) = call(&server, Method::GET, "/v1/ns/instance", &id, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn v1_bad_input_gets_400_with_a_message_and_keeps_what_is_stored() {
    let server = start_with(|_| {}).await;
    let ok = [("serviceName", "svc"), ("ip", "10.0.0.1"), ("port", "80")];
    assert_eq!(
        call(&server, Method::POST, "/v1/ns/instance", &ok, &[])
            .await
            .0,
        StatusCode::OK
    );
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("ip", "10.0.0.1"), ("port", "80")], "serviceName"),
        (&[("serviceName", "svc"), ("port", "80")], "ip"),
        (&[("serviceName", "svc"), ("ip", "10.0.0.1")], "port"),
        (
            &[("serviceName", "svc"), ("ip", "nope"), ("port", "80")],
            "ip",
        ),
        (
            &[
                ("serviceName", "svc"),
                ("ip", "10.0.0.1"),
                ("port", "70000"),
            ],
            "port",
        ),
        (
            &[
                ("serviceName", "svc"),
                ("ip", "10.0.0.1"),
                ("port", "80"),
                ("weight", "x"),
            ],
            "weight",
        ),
        (
            &[
                ("serviceName", "svc"),
                ("ip", "10.0.0.1"),
                ("port", "80"),
                ("metadata", "{bad"),
            ],
            "metadata",
        ),
        (
            &[("serviceName", "@@svc"), ("ip", "10.0.0.1"), ("port", "80")],
            "service",
        ),
    ];
    for (params, mentions) in cases {
        let (s, body) = call(&server, Method::POST, "/v1/ns/instance", params, &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{params:?}: {body}");
        assert!(body.contains(mentions), "{params:?}: {body}");
    }
    // Persistent instances are refused clearly.
    let (s, body) = call(
        &server,
        Method::POST,
        "/v1/ns/instance",
        &[ok.as_slice(), &[("ephemeral", "false")]].concat(),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{body}");
    assert!(body.contains("persistent"), "{body}");
    // A malformed beat, an update of an unknown instance.
    let (s, _) = call(
        &server,
        Method::PUT,
        "/v1/ns/instance/beat",
        &[ok.as_slice(), &[("beat", "not json")]].concat(),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &server,
        Method::PUT,
        "/v1/ns/instance",
        &[("serviceName", "svc"), ("ip", "10.9.9.9"), ("port", "80")],
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Nothing stored was lost.
    let list = json_of(&server, "/v1/ns/instance/list", &[("serviceName", "svc")]).await;
    assert_eq!(hosts(&list), vec![("10.0.0.1:80".to_owned(), true)]);
    server.shutdown().await;
}

#[tokio::test]
async fn v1_beats_keep_an_instance_then_it_turns_unhealthy_is_removed_and_gets_20404() {
    let server = start_with(|c| {
        c.nacos.beat_timeout = Duration::from_millis(600);
        c.nacos.delete_timeout = Duration::from_millis(1200);
        c.nacos.beat_check_interval = Duration::from_millis(50);
    })
    .await;
    let id = [
        ("serviceName", "beaten"),
        ("ip", "10.0.0.1"),
        ("port", "80"),
    ];
    assert_eq!(
        call(&server, Method::POST, "/v1/ns/instance", &id, &[])
            .await
            .0,
        StatusCode::OK
    );
    // Beaten for longer than the delete timeout, it stays healthy.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (s, body) = call(&server, Method::PUT, "/v1/ns/instance/beat", &id, &[]).await;
        assert_eq!(s, StatusCode::OK);
        let reply: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reply["code"], 10200, "{body}");
        assert_eq!(reply["clientBeatInterval"], 200);
        assert_eq!(reply["lightBeatEnabled"], true);
        sleep(Duration::from_millis(100)).await;
    }
    let list = json_of(
        &server,
        "/v1/ns/instance/list",
        &[("serviceName", "beaten")],
    )
    .await;
    assert_eq!(hosts(&list), vec![("10.0.0.1:80".to_owned(), true)]);

    // Silent: unhealthy first (still listed; hidden with healthyOnly), then gone.
    listed(&server, "beaten", |l| {
        hosts(l) == vec![("10.0.0.1:80".to_owned(), false)]
    })
    .await;
    let healthy = json_of(
        &server,
        "/v1/ns/instance/list",
        &[("serviceName", "beaten"), ("healthyOnly", "true")],
    )
    .await;
    assert!(hosts(&healthy).is_empty());
    listed(&server, "beaten", |l| hosts(l).is_empty()).await;

    // A beat without details for the removed instance: 20404, so the
    // client registers again; a beat carrying them re-creates it.
    let (_, body) = call(&server, Method::PUT, "/v1/ns/instance/beat", &id, &[]).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 20404);
    let beat = json!({
        "serviceName": "DEFAULT_GROUP@@beaten", "ip": "10.0.0.1", "port": 80,
        "cluster": "DEFAULT", "weight": 3.0, "metadata": {"v": "2"},
        "scheduled": false, "period": 5000, "stopped": false,
    })
    .to_string();
    let (_, body) = call(
        &server,
        Method::PUT,
        "/v1/ns/instance/beat",
        &[("serviceName", "DEFAULT_GROUP@@beaten")],
        &[("beat", beat.as_str())],
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 10200);
    let detail = json_of(&server, "/v1/ns/instance", &id).await;
    assert_eq!(detail["weight"], 3.0);
    assert_eq!(detail["metadata"], json!({"v": "2"}));
    server.shutdown().await;
}

#[tokio::test]
async fn v1_service_crud_metrics_login_and_health() {
    let server = start_with(|_| {}).await;
    let svc = [("serviceName", "catalog"), ("groupName", "shop")];
    let (s, body) = call(
        &server,
        Method::POST,
        "/v1/ns/service",
        &[
            svc.as_slice(),
            &[("protectThreshold", "0.5"), ("metadata", "owner=ops")],
        ]
        .concat(),
        &[],
    )
    .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "ok"));
    let (s, _) = call(&server, Method::POST, "/v1/ns/service", &svc, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "creating twice");
    let detail = json_of(&server, "/v1/ns/service", &svc).await;
    assert_no_nulls(&detail);
    assert_eq!(detail["name"], "catalog");
    assert_eq!(detail["groupName"], "shop");
    assert_eq!(detail["protectThreshold"], 0.5);
    assert_eq!(detail["metadata"], json!({"owner": "ops"}));
    assert_eq!(detail["selector"], json!({"type": "none"}));
    let (s, _) = call(
        &server,
        Method::PUT,
        "/v1/ns/service",
        &[svc.as_slice(), &[("protectThreshold", "0.8")]].concat(),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        json_of(&server, "/v1/ns/service", &svc).await["protectThreshold"],
        0.8
    );
    let list = json_of(
        &server,
        "/v1/ns/service/list",
        &[("pageNo", "1"), ("pageSize", "10"), ("groupName", "shop")],
    )
    .await;
    assert_eq!(list, json!({"count": 1, "doms": ["catalog"]}));

    // A service with instances cannot be deleted; an empty one can.
    let inst = [svc.as_slice(), &[("ip", "10.0.0.1"), ("port", "80")]].concat();
    call(&server, Method::POST, "/v1/ns/instance", &inst, &[]).await;
    let catalog = json_of(&server, "/v1/ns/catalog/instances", &svc).await;
    assert_eq!(catalog["count"], 1);
    assert_eq!(catalog["list"][0]["ip"], "10.0.0.1");
    let (s, body) = call(&server, Method::DELETE, "/v1/ns/service", &svc, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    call(&server, Method::DELETE, "/v1/ns/instance", &inst, &[]).await;
    let (s, _) = call(&server, Method::DELETE, "/v1/ns/service", &svc, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&server, Method::GET, "/v1/ns/service", &svc, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "deleted service is unknown");

    let metrics = json_of(&server, "/v1/ns/operator/metrics", &[]).await;
    assert_eq!(metrics["status"], "UP");
    for path in [
        "/v1/auth/login",
        "/v1/auth/users/login",
        "/v3/auth/user/login",
    ] {
        let (s, body) = call(
            &server,
            Method::POST,
            path,
            &[("username", "nacos"), ("password", "whatever")],
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let token: Value = serde_json::from_str(&body).unwrap();
        assert!(token["accessToken"].is_string());
        assert_eq!(token["tokenTtl"], 18000);
    }
    for path in [
        "/v1/console/health/liveness",
        "/v1/console/health/readiness",
    ] {
        assert_eq!(
            call(&server, Method::GET, path, &[], &[]).await,
            (StatusCode::OK, "OK".to_owned())
        );
    }
    assert_eq!(
        call(&server, Method::GET, "/health", &[], &[]).await,
        (StatusCode::OK, "success".to_owned())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn v2_api_wraps_replies_and_errors_in_the_envelope() {
    let server = start_with(|_| {}).await;
    let id = [("serviceName", "v2svc"), ("ip", "10.0.0.1"), ("port", "80")];
    let (s, body) = call(&server, Method::POST, "/v2/ns/instance", &[], &id).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"code": 0, "message": "success", "data": "ok"})
    );
    let list = json_of(&server, "/v2/ns/instance/list", &[("serviceName", "v2svc")]).await;
    assert_eq!(list["code"], 0);
    assert_eq!(hosts(&list["data"]), vec![("10.0.0.1:80".to_owned(), true)]);
    let detail = json_of(&server, "/v2/ns/instance", &id).await;
    assert_eq!(detail["data"]["instanceId"], "10.0.0.1#80#DEFAULT");
    let services = json_of(&server, "/v2/ns/service/list", &[]).await;
    assert_eq!(services["data"], json!({"count": 1, "services": ["v2svc"]}));
    // The beat reply is the bare v1 object.
    let (_, body) = call(&server, Method::PUT, "/v2/ns/instance/beat", &id, &[]).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 10200);

    let (s, body) = call(
        &server,
        Method::POST,
        "/v2/ns/instance",
        &[("ip", "10.0.0.1")],
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["code"], 10000);
    assert!(err["message"].as_str().unwrap().contains("serviceName"));
    let (s, body) = call(
        &server,
        Method::GET,
        "/v2/ns/instance",
        &[("serviceName", "v2svc"), ("ip", "10.0.0.9"), ("port", "80")],
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 21003);
    server.shutdown().await;
}

#[tokio::test]
async fn http_and_native_clients_share_one_registry() {
    let server = start_with(|_| {}).await;
    let native = Client::builder()
        .addresses([server.grpc_addr.to_string()])
        .require_connection(true)
        .build()
        .await
        .unwrap();
    let key = ServiceKey::new("", "", "shared").unwrap();
    let mut sub = native.subscribe(key.clone()).await.unwrap();
    call(
        &server,
        Method::POST,
        "/v1/ns/instance",
        &[
            ("serviceName", "shared"),
            ("ip", "10.0.0.1"),
            ("port", "80"),
        ],
        &[],
    )
    .await;
    timeout(WAIT, async {
        while native.instances(&key).is_empty() {
            sub.next().await;
        }
    })
    .await
    .expect("the native client saw the HTTP registration");
    let mut i = roster_core::Instance::new("10.0.0.2".parse().unwrap(), 81);
    i.metadata.insert("via", "native");
    let _reg = native.register(key.clone(), i).await.unwrap();
    listed(&server, "shared", |l| hosts(l).len() == 2).await;
    native.shutdown().await;
    server.shutdown().await;
}

/// Receives the next push datagram (gunzipped) and answers `push-ack`
/// unless `ack` is false. Returns the pushed `ServiceInfo`.
async fn udp_push(socket: &UdpSocket, ack: bool) -> Value {
    let (packet, from) = udp_packet(socket).await;
    assert_eq!(packet["type"], "dom");
    if ack {
        socket
            .send_to(&push_ack(&packet["lastRefTime"]), from)
            .await
            .unwrap();
    }
    serde_json::from_str(packet["data"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn v1_udp_subscriber_is_pushed_changes_and_its_acks_count_for_drain() {
    let server = start_with(|c| c.nacos.udp_ack_timeout = Duration::from_millis(300)).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port().to_string();
    let poll = [
        ("serviceName", "DEFAULT_GROUP@@pushed"),
        ("clusters", ""),
        ("udpPort", port.as_str()),
        ("clientIP", "127.0.0.1"),
        ("healthyOnly", "false"),
    ];
    let first = json_of(&server, "/v1/ns/instance/list", &poll).await;
    assert!(hosts(&first).is_empty());
    // The subscription's first push: the (empty) current list.
    let info = udp_push(&socket, true).await;
    assert_eq!(info["name"], "DEFAULT_GROUP@@pushed");

    // A registration is pushed.
    let a = [
        ("serviceName", "pushed"),
        ("ip", "10.0.0.1"),
        ("port", "80"),
    ];
    call(&server, Method::POST, "/v1/ns/instance", &a, &[]).await;
    let info = udp_push(&socket, true).await;
    assert_eq!(hosts(&info), vec![("10.0.0.1:80".to_owned(), true)]);
    assert!(info["lastRefTime"].as_i64().unwrap() > first["lastRefTime"].as_i64().unwrap());

    // A big list arrives gzipped and complete.
    for n in 2..40 {
        let ip = format!("10.0.1.{n}");
        call(
            &server,
            Method::POST,
            "/v1/ns/instance",
            &[
                ("serviceName", "pushed"),
                ("ip", ip.as_str()),
                ("port", "80"),
            ],
            &[],
        )
        .await;
    }
    timeout(WAIT, async {
        while hosts(&udp_push(&socket, true).await).len() != 39 {}
    })
    .await
    .expect("the full list was pushed");

    // Drain waits for the UDP subscriber's ack.
    let key = ServiceKey::new("", "", "pushed").unwrap();
    let drain = tokio::spawn({
        let node = server.node.clone();
        let key = key.clone();
        async move {
            let id = "10.0.0.1#80#DEFAULT";
            let lease = node.owning_session(&key, id).unwrap();
            node.drain(&lease, &key, id, false, WAIT).await.unwrap()
        }
    });
    timeout(WAIT, async {
        loop {
            let info = udp_push(&socket, true).await;
            if info["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["weight"] == 0.0)
            {
                break;
            }
        }
    })
    .await
    .expect("the drained weight was pushed");
    let outcome = drain.await.unwrap();
    assert!(outcome.pending.is_empty(), "{outcome:?}");
    assert!(
        outcome.acknowledged.iter().any(|s| s.contains("nacos-udp")),
        "{outcome:?}"
    );

    // An unacknowledged push is sent once more, then given up.
    call(&server, Method::DELETE, "/v1/ns/instance", &a, &[]).await;
    let first = timeout(WAIT, async {
        loop {
            let info = udp_push(&socket, false).await;
            if hosts(&info).len() == 38 {
                return info;
            }
        }
    })
    .await
    .expect("the removal was pushed");
    let again = udp_push(&socket, false).await;
    assert_eq!(first, again);
    let mut buf = [0u8; 16];
    assert!(
        timeout(Duration::from_millis(900), socket.recv_from(&mut buf))
            .await
            .is_err(),
        "sent at most twice"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn instance_list_is_served_as_json_once_per_revision_and_follows_changes() {
    let server = start_with(|_| {}).await;
    let a = [
        ("serviceName", "polled"),
        ("ip", "10.0.0.1"),
        ("port", "80"),
    ];
    call(&server, Method::POST, "/v1/ns/instance", &a, &[]).await;
    let url = format!("http://{}/nacos/v1/ns/instance/list", server.http_addr);
    let poll = || async {
        let resp = reqwest::Client::new()
            .get(&url)
            .query(&[("serviceName", "polled")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "application/json");
        resp.text().await.unwrap()
    };
    // The same revision: the very same text, `lastRefTime` included.
    let first = poll().await;
    assert_eq!(poll().await, first);
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(hosts(&first), vec![("10.0.0.1:80".to_owned(), true)]);

    // A change makes a new text, newer than the last.
    let b = [
        ("serviceName", "polled"),
        ("ip", "10.0.0.2"),
        ("port", "80"),
    ];
    call(&server, Method::POST, "/v1/ns/instance", &b, &[]).await;
    let next: Value = serde_json::from_str(&poll().await).unwrap();
    assert_eq!(hosts(&next).len(), 2);
    assert!(next["lastRefTime"].as_i64() > first["lastRefTime"].as_i64());
}

fn push_ack(stamp: &Value) -> Vec<u8> {
    json!({"type": "push-ack", "lastRefTime": stamp, "data": ""})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_ack_counts_only_from_the_subscriber_and_for_the_exact_push() {
    let server = start_with(|c| c.nacos.udp_ack_timeout = Duration::from_secs(30)).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port().to_string();
    let a = [("serviceName", "acked"), ("ip", "10.0.0.1"), ("port", "80")];
    call(&server, Method::POST, "/v1/ns/instance", &a, &[]).await;
    let poll = [
        ("serviceName", "DEFAULT_GROUP@@acked"),
        ("udpPort", port.as_str()),
        ("clientIP", "127.0.0.1"),
    ];
    json_of(&server, "/v1/ns/instance/list", &poll).await;
    let (first, node) = udp_packet(&socket).await;
    socket
        .send_to(&push_ack(&first["lastRefTime"]), node)
        .await
        .unwrap();
    let nonce = first["lastRefTime"].as_i64().unwrap();
    assert!(nonce > 0 && nonce < 1 << 53, "exact in a JavaScript number");

    let key = ServiceKey::new("", "", "acked").unwrap();
    let id = "10.0.0.1#80#DEFAULT";
    let lease = server.node.owning_session(&key, id).unwrap();
    let drain = |timeout: Duration| {
        let (node, key, lease) = (server.node.clone(), key.clone(), lease.clone());
        tokio::spawn(async move { node.drain(&lease, &key, id, false, timeout).await.unwrap() })
    };
    // The drain's push: acknowledged by someone else, and by the
    // subscriber for another push. Neither counts.
    let pending = drain(Duration::from_millis(800));
    let (pushed, node) = udp_packet(&socket).await;
    assert_ne!(
        pushed["lastRefTime"], first["lastRefTime"],
        "a nonce per push"
    );
    forger
        .send_to(&push_ack(&pushed["lastRefTime"]), node)
        .await
        .unwrap();
    socket
        .send_to(&push_ack(&first["lastRefTime"]), node)
        .await
        .unwrap();
    socket
        .send_to(&push_ack(&json!(nonce ^ 1)), node)
        .await
        .unwrap();
    let outcome = pending.await.unwrap();
    assert_eq!(outcome.pending.len(), 1, "{outcome:?}");
    assert!(outcome.pending[0].starts_with("nacos-udp"), "{outcome:?}");

    // The subscriber's own ack of that exact push does.
    let done = drain(WAIT);
    let (pushed, node) = udp_packet(&socket).await;
    socket
        .send_to(&push_ack(&pushed["lastRefTime"]), node)
        .await
        .unwrap();
    let outcome = done.await.unwrap();
    assert!(outcome.pending.is_empty(), "{outcome:?}");
    assert_eq!(outcome.acknowledged.len(), 1, "{outcome:?}");
    server.shutdown().await;
}

fn node(nodes: &[Option<RunningServer>], i: usize) -> &RunningServer {
    nodes[i].as_ref().expect("running")
}

/// Every member's count of live instances held (any origin): one copy of
/// each instance in the cluster means `instances` on each.
fn held_instances(server: &RunningServer) -> usize {
    server.node.held_by_origin().values().map(|(_, i)| i).sum()
}

#[tokio::test]
async fn v1_instances_in_a_cluster_are_held_by_one_responsible_member_whoever_receives_them() {
    let mut configs = common::cluster_configs(3);
    for c in &mut configs {
        c.nacos.beat_timeout = Duration::from_secs(3);
        c.nacos.delete_timeout = Duration::from_secs(6);
        c.nacos.beat_check_interval = Duration::from_millis(50);
    }
    let mut nodes = common::start_cluster(&configs).await;
    let ips: Vec<String> = (1..=12).map(|k| format!("10.0.1.{k}")).collect();
    let id = |ip: &str| format!("{ip}#80#DEFAULT");
    let params = |ip: &str| -> Vec<(&'static str, String)> {
        vec![
            ("serviceName", "spread".into()),
            ("ip", ip.into()),
            ("port", "80".into()),
        ]
    };
    // Every registration goes to n1.
    for ip in &ips {
        let p = params(ip);
        let q: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (s, body) = call(node(&nodes, 0), Method::POST, "/v1/ns/instance", &q, &[]).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    for i in 0..3 {
        listed(node(&nodes, i), "spread", |l| hosts(l).len() == 12).await;
    }
    // Each is held by one member, the same one on every member; between
    // them the three members hold all twelve.
    let origins: Vec<String> = ips
        .iter()
        .map(|ip| common::origin_of(node(&nodes, 0), "spread", &id(ip)).unwrap())
        .collect();
    for i in 1..3 {
        for (ip, origin) in ips.iter().zip(&origins) {
            let there = common::origin_of(node(&nodes, i), "spread", &id(ip));
            assert_eq!(there.as_ref(), Some(origin), "{ip} on n{}", i + 1);
        }
    }
    let distinct: std::collections::BTreeSet<&String> = origins.iter().collect();
    assert_eq!(distinct.len(), 3, "rendezvous spreads them: {origins:?}");
    for i in 0..3 {
        assert_eq!(
            held_instances(node(&nodes, i)),
            12,
            "one copy of each on n{}",
            i + 1
        );
    }
    // Beats through the other members reach the responsible one: no copy
    // appears anywhere, every instance stays healthy past the beat timeout.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        for (k, ip) in ips.iter().enumerate() {
            let p = params(ip);
            let q: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let via = node(&nodes, 1 + k % 2);
            let (s, body) = call(via, Method::PUT, "/v1/ns/instance/beat", &q, &[]).await;
            assert_eq!(s, StatusCode::OK, "{body}");
            let reply: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(reply["code"], 10200, "{body}");
        }
        sleep(Duration::from_millis(500)).await;
    }
    for i in 0..3 {
        let list = json_of(
            node(&nodes, i),
            "/v1/ns/instance/list",
            &[("serviceName", "spread")],
        )
        .await;
        assert!(
            hosts(&list).iter().all(|(_, healthy)| *healthy),
            "n{}: {list}",
            i + 1
        );
        assert_eq!(
            held_instances(node(&nodes, i)),
            12,
            "no copies on n{}",
            i + 1
        );
    }
    // A deregistration through n3 removes it everywhere.
    let p = params(&ips[0]);
    let q: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (s, _) = call(node(&nodes, 2), Method::DELETE, "/v1/ns/instance", &q, &[]).await;
    assert_eq!(s, StatusCode::OK);
    for i in 0..3 {
        listed(node(&nodes, i), "spread", |l| hosts(l).len() == 11).await;
    }

    // The member holding an instance dies: once the others take it for
    // down, a full beat through n1 brings the instance back on a living
    // member, listed by every living one.
    let (victim, ip) = ips[1..]
        .iter()
        .zip(&origins[1..])
        .find(|(_, o)| o.as_str() != "n1")
        .map(|(ip, o)| {
            (
                o.trim_start_matches('n').parse::<usize>().unwrap() - 1,
                ip.clone(),
            )
        })
        .unwrap();
    nodes[victim].take().unwrap().shutdown().await;
    let down_after = configs[0].cluster.verify_interval * configs[0].cluster.verify_rounds;
    sleep(down_after + Duration::from_millis(500)).await;
    let beat =
        json!({"serviceName": "spread", "ip": ip, "port": 80, "cluster": "DEFAULT"}).to_string();
    let (s, body) = call(
        node(&nodes, 0),
        Method::PUT,
        "/v1/ns/instance/beat",
        &[("serviceName", "spread"), ("beat", &beat)],
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let holder = common::listed_by_the_living(&nodes, "spread", &id(&ip), WAIT).await;
    assert_ne!(holder, format!("n{}", victim + 1));
}
