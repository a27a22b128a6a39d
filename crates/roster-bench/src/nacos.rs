//! A minimal Nacos 2.x gRPC client for the bench: one HTTP/2 connection
//! carrying unary `Request/request` calls and the `requestBiStream` on which
//! pushes arrive and are acknowledged. It speaks only what the shapes need
//! (register, deregister, query, subscribe), the same way to any server,
//! and registers as the Java and Python clients do: a connection holds one
//! registration per service, so a second instance in a service goes out as
//! a batch of all it holds there (and a deregistration as the batch left).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use roster_proto::nacos::bi_request_stream_client::BiRequestStreamClient;
use roster_proto::nacos::request_client::RequestClient;
use roster_proto::nacos::{Any, Metadata, Payload};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Namespace and group every bench service lives in.
const NAMESPACE: &str = "public";
const GROUP: &str = "DEFAULT_GROUP";

/// A `NotifySubscriberRequest`'s `serviceInfo`, when it arrived and when
/// its acknowledgement was sent.
pub struct Notified {
    pub service_info: Value,
    pub received: Instant,
    pub acked: Instant,
}

/// The instances a connection holds in one service.
type Held = Arc<tokio::sync::Mutex<Vec<Value>>>;

/// One Nacos gRPC connection.
pub struct NacosConn {
    unary: RequestClient<Channel>,
    next_id: AtomicU64,
    /// The instances this connection holds, per service (by ip:port);
    /// a service's requests are made one at a time, others' alongside.
    held: parking_lot::Mutex<HashMap<String, Held>>,
    notified: mpsc::Receiver<Notified>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for NacosConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn payload(kind: &str, body: &Value) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: kind.to_owned(),
            client_ip: "127.0.0.1".to_owned(),
            headers: Default::default(),
        }),
        body: Some(Any {
            type_url: String::new(),
            value: serde_json::to_vec(body).unwrap_or_default().into(),
        }),
    }
}

/// The type and JSON body of a payload.
fn open(p: &Payload) -> Result<(&str, Value)> {
    let kind = p.metadata.as_ref().map_or("", |m| m.r#type.as_str());
    let body = p.body.as_ref().map_or(&[][..], |b| &b.value[..]);
    let value = serde_json::from_slice(body)
        .with_context(|| format!("{kind} has a body that is not JSON"))?;
    Ok((kind, value))
}

impl NacosConn {
    /// Connects the way the Java and Python clients do: server check, then
    /// the bi-stream with a `ConnectionSetupRequest`, then health checks
    /// until the server knows the connection.
    pub async fn connect(addr: &str) -> Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("bad address {addr:?}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let mut unary = RequestClient::new(channel.clone());
        let check = unary
            .request(payload("ServerCheckRequest", &json!({"headers": {}})))
            .await?
            .into_inner();
        let (kind, _) = open(&check)?;
        if kind != "ServerCheckResponse" {
            bail!("the server answered a server check with {kind}");
        }
        let (out_tx, out_rx) = mpsc::channel::<Payload>(1024);
        let setup = json!({
            "clientVersion": "roster-bench",
            "tenant": "",
            "labels": {"source": "sdk", "module": "naming"},
            "abilities": {},
            "headers": {},
        });
        out_tx
            .send(payload("ConnectionSetupRequest", &setup))
            .await
            .ok();
        let inbound = BiRequestStreamClient::new(channel)
            .request_bi_stream(ReceiverStream::new(out_rx))
            .await?
            .into_inner();
        let (note_tx, note_rx) = mpsc::channel(4096);
        let reader = tokio::spawn(read_stream(inbound, out_tx, note_tx));
        let conn = Self {
            unary,
            next_id: AtomicU64::new(1),
            held: Default::default(),
            notified: note_rx,
            reader,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match conn
                .call("HealthCheckRequest", json!({}), "HealthCheckResponse")
                .await
            {
                Ok(_) => return Ok(conn),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context("the server did not accept the connection"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// One unary request; fails unless the reply has the `expect`ed type
    /// and `resultCode` 200.
    async fn call(&self, kind: &str, mut body: Value, expect: &str) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        body["headers"] = json!({});
        body["requestId"] = json!(id.to_string());
        let reply = self
            .unary
            .clone()
            .request(payload(kind, &body))
            .await?
            .into_inner();
        let (got, value) = open(&reply)?;
        let code = value.get("resultCode").and_then(Value::as_i64);
        if got != expect || code != Some(200) {
            bail!(
                "{kind} failed: {got} {}",
                value.get("message").and_then(Value::as_str).unwrap_or("")
            );
        }
        Ok(value)
    }

    fn naming(service: &str) -> Value {
        json!({"namespace": NAMESPACE, "groupName": GROUP, "serviceName": service})
    }

    /// What the connection holds in `service`, locked by each request that
    /// changes it.
    fn slot(&self, service: &str) -> Held {
        self.held
            .lock()
            .entry(service.to_owned())
            .or_default()
            .clone()
    }

    /// Registers (`deregister` false) or deregisters an instance: one
    /// `InstanceRequest` while the connection holds at most one instance in
    /// the service, else a `BatchInstanceRequest` of all it holds there.
    /// (Requests of one service are made one at a time.)
    pub async fn instance(&self, service: &str, instance: Value, deregister: bool) -> Result<()> {
        let same = |a: &Value| a["ip"] == instance["ip"] && a["port"] == instance["port"];
        let slot = self.slot(service);
        let mut held = slot.lock().await;
        let before = held.len();
        let mut set = held.clone();
        set.retain(|i| !same(i));
        if !deregister {
            set.push(instance.clone());
        }
        let mut body = Self::naming(service);
        let (kind, reply) = if set.len() <= 1 && before <= 1 {
            let one = set.first().cloned().unwrap_or(instance);
            body["type"] = json!(if set.is_empty() {
                "deregisterInstance"
            } else {
                "registerInstance"
            });
            body["instance"] = one;
            ("InstanceRequest", "InstanceResponse")
        } else {
            body["type"] = json!("batchRegisterInstance");
            body["instances"] = json!(set);
            ("BatchInstanceRequest", "BatchInstanceResponse")
        };
        self.call(kind, body, reply).await?;
        // What the server holds now (a failed call changed nothing).
        *held = set;
        Ok(())
    }

    /// Replaces what the connection holds in the service with `instances`
    /// (one `BatchInstanceRequest`).
    pub async fn batch(&self, service: &str, instances: Vec<Value>) -> Result<()> {
        let slot = self.slot(service);
        let mut held = slot.lock().await;
        let mut body = Self::naming(service);
        body["type"] = json!("batchRegisterInstance");
        body["instances"] = json!(instances);
        self.call("BatchInstanceRequest", body, "BatchInstanceResponse")
            .await?;
        *held = instances;
        Ok(())
    }

    /// The service's `serviceInfo`, all hosts.
    pub async fn query(&self, service: &str) -> Result<Value> {
        let mut body = Self::naming(service);
        body["cluster"] = json!("");
        body["healthyOnly"] = json!(false);
        body["udpPort"] = json!(0);
        let mut r = self
            .call("ServiceQueryRequest", body, "QueryServiceResponse")
            .await?;
        Ok(r["serviceInfo"].take())
    }

    /// Subscribes; returns the current `serviceInfo`. Pushes arrive through
    /// [`NacosConn::next_notified`].
    pub async fn subscribe(&self, service: &str) -> Result<Value> {
        let mut body = Self::naming(service);
        body["subscribe"] = json!(true);
        body["clusters"] = json!("");
        let mut r = self
            .call("SubscribeServiceRequest", body, "SubscribeServiceResponse")
            .await?;
        Ok(r["serviceInfo"].take())
    }

    /// The next push, acknowledged; `None` once the stream has ended.
    pub async fn next_notified(&mut self) -> Option<Notified> {
        self.notified.recv().await
    }
}

/// Reads server requests off the bi-stream: acknowledges pushes (and hands
/// them over) and answers liveness probes.
async fn read_stream(
    mut inbound: tonic::Streaming<Payload>,
    out: mpsc::Sender<Payload>,
    notified: mpsc::Sender<Notified>,
) {
    while let Ok(Some(p)) = inbound.message().await {
        let received = Instant::now();
        let Ok((kind, mut body)) = open(&p) else {
            continue;
        };
        let rid = body.get("requestId").cloned().unwrap_or(json!(""));
        let answer = match kind {
            "NotifySubscriberRequest" => "NotifySubscriberResponse",
            "ClientDetectionRequest" => "ClientDetectionResponse",
            _ => continue,
        };
        let ack = json!({"resultCode": 200, "errorCode": 0, "message": "", "requestId": rid});
        if out.send(payload(answer, &ack)).await.is_err() {
            return;
        }
        if kind == "NotifySubscriberRequest" {
            let service_info = body["serviceInfo"].take();
            let n = Notified {
                service_info,
                received,
                acked: Instant::now(),
            };
            if notified.send(n).await.is_err() {
                return;
            }
        }
    }
}
