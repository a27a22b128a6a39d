//! A Roster registry node: its listeners (gRPC and HTTP), sessions, push
//! fan-out and configuration around the pure `roster-core` state.
//! [`start`] binds, spawns every task under one tracker and returns a
//! handle; [`RunningServer::shutdown`] stops them all.
#![forbid(unsafe_code)]

pub mod admission;
pub mod calls;
pub mod cluster;
pub mod config;
pub mod grpc;
pub mod http;
pub mod incarnation;
pub mod metrics;
pub mod nacos;
pub mod node;
pub mod quickack;

use std::net::SocketAddr;
use std::sync::Arc;

use roster_core::ServiceKey;
use roster_proto::nacos::bi_request_stream_server::BiRequestStreamServer;
use roster_proto::nacos::request_server::RequestServer;
use roster_proto::v1::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use node::Node;

/// A service as listed by the APIs.
#[derive(Debug, Clone)]
pub struct ServiceSummary {
    /// Which service.
    pub key: ServiceKey,
    /// Instances registered.
    pub instances: usize,
    /// Of which healthy, enabled, with weight above 0.
    pub serving: usize,
    /// Current revision.
    pub revision: u64,
    /// Current subscribers.
    pub subscribers: usize,
}

/// Services of `namespace` (default "public"), optionally of one group,
/// sorted by group and name.
pub fn list_services(node: &Node, namespace: &str, group: &str) -> Vec<ServiceSummary> {
    let namespace = if namespace.is_empty() {
        roster_core::DEFAULT_NAMESPACE
    } else {
        namespace
    };
    let views = node.views();
    let mut out: Vec<ServiceSummary> = views
        .values()
        .filter(|p| {
            let k = &p.view.key;
            k.namespace == namespace && (group.is_empty() || k.group == group)
        })
        .map(|p| &p.view)
        .map(|v| ServiceSummary {
            key: v.key.as_ref().clone(),
            instances: v.instances.len(),
            serving: v.serving_count(),
            revision: v.revision,
            subscribers: node.subscriber_count(&v.key),
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The runtime a node runs on; the `roster` binary, the transport floor
/// and the benches all build theirs here.
pub fn runtime() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Without the LIFO slot, a task woken by another runs after the tasks
    // already queued instead of next. A change fanned out to the session
    // streams sharing a connection then reaches that connection's writer
    // once for all of them, not once per stream: `bench push --subscribers
    // 1000` made 8.5k writes instead of 41k for 50k deliveries, at 19 us of
    // server CPU per delivery instead of 27 (docs/performance.md). The
    // option needs `--cfg tokio_unstable` (.cargo/config.toml); built
    // without it, the runtime keeps tokio's defaults.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {reason}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why (said in the message, so not a source to repeat).
        reason: std::io::Error,
    },
    /// The data directory cannot be used.
    #[error(transparent)]
    Incarnation(#[from] incarnation::IncarnationError),
}

/// A started node.
pub struct RunningServer {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the cluster port listens (a node with peers).
    pub cluster_addr: Option<SocketAddr>,
    /// The node itself.
    pub node: Arc<Node>,
    tasks: TaskTracker,
}

impl RunningServer {
    /// Stops taking sessions (readiness turns to draining), then stops
    /// accepting, ends every session stream and waits for every task.
    /// Nothing is deregistered: ephemeral state simply ends with the node.
    pub async fn shutdown(self) {
        self.node.begin_drain();
        self.node.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Waits until the node stops (after [`Node::shutdown`] is cancelled).
    pub async fn wait(&self) {
        self.node.shutdown.cancelled().await;
    }
}

/// Binds `addr` and returns the listener with the address it got.
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |reason| StartError::Bind { what, addr, reason };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Binds the listeners and starts a node.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let (grpc_listener, grpc_addr) = bind("grpc", config.server.grpc).await?;
    let (http_listener, http_addr) = bind("http", config.server.http).await?;
    // A node with peers listens for them; a node alone opens no cluster port.
    let has_peers = !cluster::outboxes(&config).is_empty();
    let cluster_listener = match has_peers {
        true => Some(bind("cluster", config.cluster.listen).await?),
        false => None,
    };
    // A new life of the node: its versions win over its previous life's,
    // and clients see that it restarted.
    let incarnation = incarnation::next(&config.server.data_dir)?;
    let name = config.server.node_name.clone();
    let (node, changes) = Node::new(config, &name, incarnation);
    let tasks: TaskTracker = node.tasks.clone();

    tasks.spawn(node::fanout::run_pusher(node.clone(), changes));
    tasks.spawn(run_sweeper(node.clone()));

    // Nacos v1 UDP pushes go to whatever address clients report (often
    // not the one they reached us on), so the socket is bound to any.
    let any: std::net::IpAddr = match http_addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let udp_addr = SocketAddr::new(any, 0);
    let udp = tokio::net::UdpSocket::bind(udp_addr)
        .await
        .map_err(|reason| StartError::Bind {
            what: "nacos udp",
            addr: udp_addr,
            reason,
        })?;
    let nacos = nacos::Nacos::new(node.clone(), Arc::new(udp));
    tasks.spawn(nacos.clone().run_udp_acks());
    tasks.spawn(run_beat_checker(node.clone()));
    let nacos_grpc = nacos::grpc::NacosGrpc::new(nacos.clone());
    let limits = node.config().limits.clone();
    let admission = admission::Admission::new(
        admission::Rules {
            total: limits.connections,
            per_address: limits.connections_per_address,
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        },
        node.metrics.clone(),
    );
    let quick_ack = node.config().server.tcp_quickack;
    let incoming = futures_util::stream::unfold(
        (grpc_listener, admission.clone()),
        move |(listener, admission)| async move {
            let (conn, _) = admission.accept(&listener, "grpc").await;
            let conn = conn.map(|tcp| quickack::QuickAck::new(tcp, quick_ack));
            Some((Ok::<_, std::io::Error>(conn), (listener, admission)))
        },
    );
    let max_message = limits.grpc_message_bytes;
    let metrics = node.metrics.clone();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .max_concurrent_streams(Some(limits.streams_per_connection))
        .layer(tower::util::MapResponseLayer::new(move |response| {
            name_message_limit(response, max_message, &metrics)
        }))
        .add_service(
            RegistryServer::new(grpc::GrpcApi::new(node.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(RequestServer::new(nacos_grpc.clone()).max_decoding_message_size(max_message))
        .add_service(BiRequestStreamServer::new(nacos_grpc).max_decoding_message_size(max_message))
        .serve_with_incoming_shutdown(incoming, node.shutdown.clone().cancelled_owned());
    tasks.spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!("gRPC listener failed: {e}");
        }
    });

    let app = http::router(node.clone())
        .merge(nacos::http::router(nacos.clone()))
        .layer(axum::extract::DefaultBodyLimit::max(limits.http_body_bytes));
    tasks.spawn(serve_http(node.clone(), admission, http_listener, app));
    let cluster_addr = match cluster_listener {
        Some(listener) => Some(serve_cluster(&node, &nacos, listener)),
        // Alone: nothing to load.
        None => {
            node.set_ready();
            None
        }
    };
    tracing::info!(%grpc_addr, %http_addr, cluster = ?cluster_addr, node = %name, incarnation, "roster node started");
    Ok(RunningServer {
        http_addr,
        grpc_addr,
        cluster_addr,
        node,
        tasks,
    })
}

/// Serves the cluster port and starts replicating: the outbox of each
/// peer, and the replicator's loop. The node becomes ready when the
/// replicator says so (its snapshot is loaded).
fn serve_cluster(
    node: &Arc<Node>,
    nacos: &Arc<nacos::Nacos>,
    (listener, addr): (TcpListener, SocketAddr),
) -> SocketAddr {
    let Some(replication) = node.replication() else {
        return addr;
    };
    let tasks = &node.tasks;
    for (_, outbox) in replication.outboxes() {
        tasks.spawn(cluster::run_outbox(node.clone(), outbox.clone()));
    }
    tasks.spawn(node::replication::run(node.clone()));
    let max = node.config().cluster.message_bytes;
    // No Nagle on accepted connections (the builder's `tcp_nodelay` only
    // applies to listeners it binds itself): small answers like acks would
    // otherwise wait for the peer's delayed ACK, tens of milliseconds.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        // Peers are few; each gets a handful of concurrent calls at most.
        .concurrency_limit_per_connection(64)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            roster_proto::cluster_v1::cluster_server::ClusterServer::new(
                cluster::ClusterService::new(node.clone(), nacos.clone()),
            )
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            cluster::SecretCheck::new(&node.config().cluster),
        ))
        .serve_with_incoming_shutdown(incoming, node.shutdown.clone().cancelled_owned());
    tasks.spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("cluster listener failed: {e}");
        }
    });
    addr
}

/// A call refused by tonic for a message over `limits.grpc_message_bytes`
/// (`OUT_OF_RANGE`, "message length too large") is answered as every
/// limit is, `RESOURCE_EXHAUSTED` naming the limit, and counted. (Calls
/// whose status comes in trailers, a stream's later message, keep tonic's.)
fn name_message_limit(
    mut response: tonic::codegen::http::Response<tonic::body::Body>,
    max: usize,
    metrics: &metrics::Metrics,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    use tonic::codegen::http::HeaderValue;
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if too_large {
        let hit = roster_core::LimitHit {
            key: "grpc_message_bytes",
            max,
        };
        metrics.limit_hit(hit.key, &hit);
        let status = tonic::Status::resource_exhausted(hit.to_string());
        headers.insert("grpc-status", HeaderValue::from(i32::from(status.code())));
        // Printable ASCII: a grpc-message as it is.
        if let Ok(message) = HeaderValue::from_str(&hit.to_string()) {
            headers.insert("grpc-message", message);
        }
    }
    response
}

/// Serves HTTP on `listener` until the node stops: each admitted
/// connection in a task of the node, ended gracefully at shutdown.
async fn serve_http(
    node: Arc<Node>,
    admission: Arc<admission::Admission>,
    listener: TcpListener,
    app: axum::Router,
) {
    // The first header's deadline and the idle timeout are the
    // admission's (hyper's own header timer would also run between the
    // requests of a kept-alive connection, and cost a timer per request).
    let streams = node.config().limits.streams_per_connection;
    loop {
        let (conn, peer) = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            accepted = admission.accept(&listener, "http") => accepted,
        };
        let app = app.clone();
        let stop = node.shutdown.clone();
        node.tasks.spawn(async move {
            let service = hyper::service::service_fn(move |mut request| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), request)
            });
            // HTTP/1, and HTTP/2 for clients that speak it (a gRPC client
            // pointed at this port is answered, and told so).
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1().header_read_timeout(None);
            builder.http2().max_concurrent_streams(streams);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            tokio::pin!(conn);
            let done = tokio::select! {
                done = conn.as_mut() => done,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = done {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
        });
    }
}

/// Every `nacos.beat_check_interval`: HTTP-registered Nacos instances
/// without heartbeats turn unhealthy, then are removed.
async fn run_beat_checker(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config().nacos.beat_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {
                let out = node.check_beats();
                for id in &out.unhealthy {
                    tracing::info!(lease = %id, "no heartbeat: unhealthy");
                }
                for id in &out.expired {
                    tracing::info!(lease = %id, "no heartbeat: removed");
                }
            }
        }
    }
}

/// Every `session.sweep_interval`: probe idle sessions, expire silent ones.
async fn run_sweeper(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config().session.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => { node.sweep(); }
        }
    }
}
