//! The bench's clients, one per protocol: Roster's native gRPC API, the
//! Nacos gRPC protocol, the Nacos HTTP v1 Open API. Shapes speak only
//! through [`Client`] and [`Subscriber`], so each runs unchanged against
//! Roster and against any Nacos-compatible server such as rnacos.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::ValueEnum;
use roster_client::cache::ServiceCache;
use roster_client::raw::Session;
use roster_client::{AckSent, Connection, proto};
use roster_core::{Instance, ServiceKey};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::nacos::NacosConn;

/// How the bench talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// Roster's own gRPC API, calls made on the session stream (as the
    /// SDK's sessions make them).
    Native,
    /// Roster's own gRPC API, each call a unary RPC (as from grpcurl or
    /// generated stubs).
    NativeUnary,
    /// The Nacos 2.x gRPC protocol (on the gRPC port).
    NacosGrpc,
    /// The Nacos 1.x HTTP Open API (on the HTTP port); registrations
    /// through it live until the server's beat timeout.
    NacosHttp,
}

/// Where the server listens.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The gRPC address (native and Nacos gRPC).
    pub grpc: String,
    /// The HTTP address (Nacos HTTP).
    pub http: String,
}

/// An instance the bench registers: a distinct IPv4 address per number,
/// port 8080, two metadata entries, and an optional change sequence number
/// by which subscribers tell changes apart. The number travels as the
/// weight (`seq + 1`), the one field every server updates on
/// re-registration (rnacos keeps the first registration's metadata).
#[derive(Debug, Clone)]
pub struct Spec {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub seq: Option<u64>,
}

/// The largest change sequence number (weights go up to 10,000).
pub const MAX_SEQ: u64 = 9_999;

impl Spec {
    /// Instance number `n`.
    pub fn numbered(n: u32) -> Self {
        Self {
            ip: Ipv4Addr::from(0x0a00_0000 + n),
            port: 8080,
            seq: None,
        }
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("zone".to_owned(), format!("z{}", u32::from(self.ip) % 4));
        m.insert("version".to_owned(), "1.0.0".to_owned());
        m
    }

    fn weight(&self) -> f64 {
        self.seq.map_or(1.0, |s| (s.min(MAX_SEQ) + 1) as f64)
    }

    fn native(&self) -> Instance {
        let mut i = Instance::new(IpAddr::V4(self.ip), self.port);
        i.weight = self.weight();
        i.metadata = self.metadata().into_iter().collect();
        i
    }

    fn nacos_json(&self) -> Value {
        json!({
            "ip": self.ip.to_string(), "port": self.port, "weight": self.weight(),
            "healthy": true, "enabled": true, "ephemeral": true,
            "clusterName": "DEFAULT", "metadata": self.metadata(),
        })
    }
}

fn native_key(service: &str) -> Result<ServiceKey> {
    Ok(ServiceKey::simple(service)?)
}

/// One client connection.
pub enum Client {
    /// A native session (which owns what it registers), making its calls
    /// on the session stream. Clients sharing a connection share its
    /// session, as an application's tasks share its SDK's session, so
    /// their calls are pipelined on one stream.
    Native(Arc<Session>),
    /// A native connection and a session, making unary calls for it.
    NativeUnary(Connection, Box<Session>),
    /// A Nacos gRPC connection, maybe shared (it owns what is registered
    /// through it).
    NacosGrpc(Arc<NacosConn>),
    /// An HTTP/1.1 keep-alive connection pool and the server's base URL.
    NacosHttp(reqwest::Client, String),
}

impl Client {
    /// Connects; `name` labels the native session.
    pub async fn connect(protocol: Protocol, at: &Endpoints, name: &str) -> Result<Self> {
        Ok(match protocol {
            Protocol::Native | Protocol::NativeUnary => {
                let conn = Connection::connect(&at.grpc).await?;
                let session = conn.open_session(name).await?;
                if protocol == Protocol::Native {
                    Self::Native(Arc::new(session))
                } else {
                    Self::NativeUnary(conn, Box::new(session))
                }
            }
            Protocol::NacosGrpc => Self::NacosGrpc(Arc::new(NacosConn::connect(&at.grpc).await?)),
            Protocol::NacosHttp => {
                let http = reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(1)
                    .build()?;
                Self::NacosHttp(http, format!("http://{}/nacos/v1/ns", at.http))
            }
        })
    }

    /// Another client on the same connection (HTTP/2 multiplexes them; a
    /// native one shares the session too, a native-unary one gets a
    /// session of its own). Nacos HTTP clients share a pool, which opens a
    /// connection per request in flight.
    pub async fn share(&self, name: &str) -> Result<Self> {
        Ok(match self {
            Self::Native(session) => Self::Native(session.clone()),
            Self::NativeUnary(conn, _) => {
                Self::NativeUnary(conn.clone(), Box::new(conn.open_session(name).await?))
            }
            Self::NacosGrpc(c) => Self::NacosGrpc(c.clone()),
            Self::NacosHttp(http, base) => Self::NacosHttp(http.clone(), base.clone()),
        })
    }

    /// `count` clients over `connections` connections, round robin.
    pub async fn many(
        protocol: Protocol,
        at: &Endpoints,
        count: u32,
        connections: Option<u32>,
        name: &str,
    ) -> Result<Vec<Self>> {
        let connections = connections.unwrap_or(count).clamp(1, count.max(1));
        let mut out: Vec<Self> = Vec::new();
        for c in 0..count {
            let label = format!("{name}-{c}");
            let client = if c < connections {
                Self::connect(protocol, at, &label).await?
            } else {
                out[(c % connections) as usize].share(&label).await?
            };
            out.push(client);
        }
        Ok(out)
    }

    /// Registers (or re-registers, changed) an instance.
    pub async fn register(&self, service: &str, i: &Spec) -> Result<()> {
        match self {
            Self::Native(session) => {
                session.register(&native_key(service)?, &i.native()).await?;
                Ok(())
            }
            Self::NativeUnary(conn, session) => {
                conn.grpc()
                    .register(proto::RegisterRequest {
                        session_id: session.id().to_owned(),
                        service: Some((&native_key(service)?).into()),
                        instance: Some(proto::Instance::from_model(&i.native())),
                    })
                    .await?;
                Ok(())
            }
            Self::NacosGrpc(c) => c.instance(service, i.nacos_json(), false).await,
            Self::NacosHttp(http, base) => {
                let form = [
                    ("serviceName", service.to_owned()),
                    ("ip", i.ip.to_string()),
                    ("port", i.port.to_string()),
                    ("weight", i.weight().to_string()),
                    ("ephemeral", "true".to_owned()),
                    ("metadata", serde_json::to_string(&i.metadata())?),
                ];
                let r = http
                    .post(format!("{base}/instance"))
                    .form(&form)
                    .send()
                    .await?;
                ok(r).await.map(drop)
            }
        }
    }

    /// Registers `instances` in one call (Nacos gRPC: a
    /// `BatchInstanceRequest`, replacing what the connection holds in the
    /// service).
    pub async fn register_batch(&self, service: &str, instances: &[Spec]) -> Result<()> {
        match self {
            Self::NacosGrpc(c) => {
                c.batch(service, instances.iter().map(Spec::nacos_json).collect())
                    .await
            }
            _ => bail!("batch registration is a Nacos gRPC request"),
        }
    }

    /// Removes an instance.
    pub async fn deregister(&self, service: &str, i: &Spec) -> Result<()> {
        let native_ref = || -> Result<proto::InstanceRef> {
            Ok(proto::InstanceRef {
                service: Some((&native_key(service)?).into()),
                id: String::new(),
                ip: i.ip.to_string(),
                port: u32::from(i.port),
                cluster: String::new(),
            })
        };
        match self {
            Self::Native(session) => {
                session.deregister(native_ref()?).await?;
                Ok(())
            }
            Self::NativeUnary(conn, _) => {
                conn.deregister(native_ref()?).await?;
                Ok(())
            }
            Self::NacosGrpc(c) => c.instance(service, i.nacos_json(), true).await,
            Self::NacosHttp(http, base) => {
                let query = [
                    ("serviceName", service.to_owned()),
                    ("ip", i.ip.to_string()),
                    ("port", i.port.to_string()),
                    ("ephemeral", "true".to_owned()),
                ];
                let r = http
                    .delete(format!("{base}/instance"))
                    .query(&query)
                    .send()
                    .await?;
                ok(r).await.map(drop)
            }
        }
    }

    /// How many instances the service has (all, healthy or not).
    pub async fn query(&self, service: &str) -> Result<usize> {
        match self {
            Self::Native(session) => {
                let view = session.query(&native_key(service)?, false).await?;
                Ok(match view.kind {
                    Some(proto::service_update::Kind::Full(f)) => f.instances.len(),
                    _ => 0,
                })
            }
            Self::NativeUnary(conn, _) => Ok(conn
                .query(&native_key(service)?, false)
                .await?
                .instances
                .len()),
            Self::NacosGrpc(c) => Ok(hosts(&c.query(service).await?).len()),
            Self::NacosHttp(http, base) => {
                let query = [("serviceName", service), ("healthyOnly", "false")];
                let r = http
                    .get(format!("{base}/instance/list"))
                    .query(&query)
                    .send()
                    .await?;
                let body: Value = serde_json::from_slice(&ok(r).await?)?;
                Ok(hosts(&body).len())
            }
        }
    }

    /// Ends the client; the server drops what its session registered.
    pub async fn close(self) {
        match self {
            // The last client sharing the session closes it (exactly one
            // `into_inner` gets it, even when they close at once).
            Self::Native(session) => {
                if let Some(session) = Arc::into_inner(session) {
                    session.close().await;
                }
            }
            Self::NativeUnary(_, session) => session.close().await,
            _ => {}
        }
    }
}

/// The body of a 2xx reply, or an error with the status and message.
async fn ok(r: reqwest::Response) -> Result<bytes::Bytes> {
    let status = r.status();
    let body = r.bytes().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}

fn hosts(service_info: &Value) -> &[Value] {
    service_info
        .get("hosts")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The change sequence number a weight carries.
fn seq_of_weight(weight: f64) -> u64 {
    (weight.max(1.0) - 1.0) as u64
}

/// The largest change sequence number among these hosts.
fn seq_of_hosts(hosts: &[Value]) -> Option<u64> {
    hosts
        .iter()
        .filter_map(|h| Some(seq_of_weight(h["weight"].as_f64()?)))
        .max()
}

/// A push as a subscriber saw it.
pub struct Pushed {
    /// The newest change it carries (see [`Spec::seq`]).
    pub seq: Option<u64>,
    /// Every change it carries (the numbers of the instances it shows or
    /// changes).
    pub seqs: Vec<u64>,
    /// Instances in the subscriber's view after applying it.
    pub instances: usize,
    pub received: Instant,
    /// When its acknowledgement went out (native sessions hold acks back
    /// briefly and fill this in once they are sent).
    pub acked: Option<Instant>,
}

/// A subscriber of one service: a connection of its own over a streaming
/// protocol, acknowledging every push it receives.
pub enum Subscriber {
    Native {
        session: Box<Session>,
        key: ServiceKey,
        cache: ServiceCache,
    },
    Nacos(NacosConn),
}

impl Subscriber {
    /// Subscribes natively, through a new session on `conn`.
    pub async fn native(conn: &Connection, service: &str) -> Result<Self> {
        let key = native_key(service)?;
        let session = conn.open_session("bench-subscriber").await?;
        session.subscribe(&key).await?;
        Ok(Self::Native {
            session: Box::new(session),
            key,
            cache: ServiceCache::default(),
        })
    }

    /// Subscribes over a Nacos gRPC connection of its own.
    pub async fn nacos(at: &Endpoints, service: &str) -> Result<Self> {
        let c = NacosConn::connect(&at.grpc).await?;
        c.subscribe(service).await?;
        Ok(Self::Nacos(c))
    }

    /// The next push, and the acknowledgement still to be sent if it is
    /// held back; `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<(Pushed, Option<AckSent>)> {
        match self {
            Self::Native {
                session,
                key,
                cache,
            } => {
                let update = session.next_update().await?.ok()?;
                let received = Instant::now();
                let sent = session.ack(key, update.revision);
                let changed = match &update.kind {
                    Some(proto::service_update::Kind::Full(f)) => &f.instances[..],
                    Some(proto::service_update::Kind::Delta(d)) => &d.upserted[..],
                    None => &[],
                };
                let seqs: Vec<u64> = changed
                    .iter()
                    .map(|i| seq_of_weight(i.weight.unwrap_or(1.0)))
                    .collect();
                let seq = seqs.iter().copied().max();
                if cache.apply(&update).is_err() {
                    cache.expect_reset();
                }
                let pushed = Pushed {
                    seq,
                    seqs,
                    instances: cache.len(),
                    received,
                    acked: None,
                };
                Some((pushed, Some(sent)))
            }
            Self::Nacos(c) => {
                let n = c.next_notified().await?;
                let hosts = hosts(&n.service_info);
                let pushed = Pushed {
                    seq: seq_of_hosts(hosts),
                    seqs: hosts
                        .iter()
                        .filter_map(|h| Some(seq_of_weight(h["weight"].as_f64()?)))
                        .collect(),
                    instances: hosts.len(),
                    received: n.received,
                    acked: Some(n.acked),
                };
                Some((pushed, None))
            }
        }
    }
}
