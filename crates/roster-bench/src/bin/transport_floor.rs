//! The transport floor: a server that answers Nacos calls with canned
//! replies and does nothing else, so `roster bench --pid` against it
//! measures what the HTTP/2 (or HTTP/1.1) stack and the kernel cost per
//! call on their own. docs/performance.md compares this floor with Roster
//! and rnacos. Not a registry: every query gets the same ten hosts.
//!
//!   cargo run --release -p roster-bench --bin transport_floor -- h2|tonic|http ADDR
//!
//! `h2` serves `Request/request` on the h2 crate directly, each call
//! handled inside its connection's task; `tonic` serves the same through
//! tonic and hyper, as Roster and rnacos do; `http` serves the Nacos v1
//! `instance` and `instance/list` routes through axum and hyper, as
//! Roster's HTTP port does, with `h2` on ADDR's port + 1000 (the bench
//! registers its query fixture over Nacos gRPC).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use prost::Message;
use roster_proto::nacos::{Any, Metadata, Payload};

type Canned = Arc<HashMap<&'static str, Payload>>;

fn payload(kind: &str, body: String) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: kind.into(),
            client_ip: String::new(),
            headers: HashMap::new(),
        }),
        body: Some(Any {
            type_url: String::new(),
            value: Bytes::from(body),
        }),
    }
}

/// A `ServiceInfo` of ten hosts with two metadata entries each, about the
/// size of the one `roster bench query --size 10` reads from a registry.
fn service_info() -> String {
    let hosts: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"instanceId":"10.0.0.{i}#8080#DEFAULT#DEFAULT_GROUP@@bench-0","ip":"10.0.0.{i}","port":8080,"weight":1.0,"healthy":true,"enabled":true,"ephemeral":true,"clusterName":"DEFAULT","serviceName":"DEFAULT_GROUP@@bench-0","metadata":{{"zone":"a","version":"1"}},"instanceHeartBeatInterval":5000,"instanceHeartBeatTimeOut":15000,"ipDeleteTimeout":30000}}"#
            )
        })
        .collect();
    format!(
        r#"{{"name":"DEFAULT_GROUP@@bench-0","groupName":"DEFAULT_GROUP","clusters":"","cacheMillis":10000,"hosts":[{}],"lastRefTime":1,"checksum":"","allIPs":false,"reachProtectionThreshold":false,"valid":true}}"#,
        hosts.join(",")
    )
}

/// The reply to each Nacos gRPC request type the bench sends.
fn canned() -> Canned {
    let head = r#""resultCode":200,"errorCode":0,"message":"","requestId":"1","success":true"#;
    let info = service_info();
    let replies = [
        (
            "ServerCheckRequest",
            "ServerCheckResponse",
            format!(r#"{{{head},"connectionId":"floor","supportAbilityNegotiation":false}}"#),
        ),
        (
            "HealthCheckRequest",
            "HealthCheckResponse",
            format!("{{{head}}}"),
        ),
        (
            "InstanceRequest",
            "InstanceResponse",
            format!(r#"{{{head},"type":"registerInstance"}}"#),
        ),
        (
            "BatchInstanceRequest",
            "BatchInstanceResponse",
            format!(r#"{{{head},"type":"batchRegisterInstance"}}"#),
        ),
        (
            "ServiceQueryRequest",
            "QueryServiceResponse",
            format!(r#"{{{head},"serviceInfo":{info}}}"#),
        ),
    ];
    Arc::new(
        replies
            .into_iter()
            .map(|(asked, kind, body)| (asked, payload(kind, body)))
            .collect(),
    )
}

fn answer(canned: &Canned, p: &Payload) -> Payload {
    let kind = p.metadata.as_ref().map_or("", |m| m.r#type.as_str());
    canned
        .get(kind)
        .cloned()
        .unwrap_or_else(|| payload("ErrorResponse", "{}".into()))
}

fn grpc_headers() -> axum::http::Response<()> {
    let mut r = axum::http::Response::new(());
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/grpc"),
    );
    r
}

/// One unary call: the whole request body, then headers, the reply and
/// `grpc-status: 0` trailers.
async fn unary(
    canned: Canned,
    mut body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let mut buf = BytesMut::new();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        buf.extend_from_slice(&data);
    }
    let Some(Ok(request)) = buf.get(5..).map(Payload::decode) else {
        return;
    };
    let reply = answer(&canned, &request);
    let mut frame = BytesMut::with_capacity(5 + reply.encoded_len());
    frame.put_u8(0);
    frame.put_u32(reply.encoded_len() as u32);
    reply
        .encode(&mut frame)
        .expect("the buffer is large enough");
    let Ok(mut send) = respond.send_response(grpc_headers(), false) else {
        return;
    };
    let _ = send.send_data(frame.freeze(), false);
    let mut trailers = axum::http::HeaderMap::new();
    trailers.insert("grpc-status", axum::http::HeaderValue::from_static("0"));
    let _ = send.send_trailers(trailers);
}

/// One connection on raw h2: unary calls run inside this task; the
/// bi-stream is held open and drained.
async fn h2_connection(tcp: tokio::net::TcpStream, canned: Canned) {
    let Ok(mut conn) = h2::server::handshake(tcp).await else {
        return;
    };
    let mut calls = FuturesUnordered::<Pin<Box<dyn Future<Output = ()> + Send>>>::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => {
                let Some(Ok((request, mut respond))) = accepted else { return };
                let (parts, mut body) = request.into_parts();
                if parts.uri.path() == "/Request/request" {
                    calls.push(Box::pin(unary(canned.clone(), body, respond)));
                } else {
                    let held = respond.send_response(grpc_headers(), false);
                    tokio::spawn(async move {
                        let _held = held;
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                    });
                }
            }
            Some(()) = calls.next(), if !calls.is_empty() => {}
        }
    }
}

#[derive(Clone)]
struct Tonic(Canned);

#[tonic::async_trait]
impl roster_proto::nacos::request_server::Request for Tonic {
    async fn request(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, tonic::Status> {
        Ok(tonic::Response::new(answer(&self.0, request.get_ref())))
    }
}

type Replies = Pin<Box<dyn futures_util::Stream<Item = Result<Payload, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl roster_proto::nacos::bi_request_stream_server::BiRequestStream for Tonic {
    type requestBiStreamStream = Replies;

    async fn request_bi_stream(
        &self,
        request: tonic::Request<tonic::Streaming<Payload>>,
    ) -> Result<tonic::Response<Replies>, tonic::Status> {
        let mut inbound = request.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        Ok(tonic::Response::new(Box::pin(
            futures_util::stream::pending(),
        )))
    }
}

fn http_router() -> axum::Router {
    let list: &'static str = service_info().leak();
    axum::Router::new()
        .route(
            "/nacos/v1/ns/instance",
            axum::routing::post(|| async { "ok" }),
        )
        .route(
            "/nacos/v1/ns/instance/list",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    list,
                )
            }),
        )
}

/// Serves `h2` mode on `listener` until accepting fails.
async fn serve_h2(listener: tokio::net::TcpListener, canned: Canned) -> std::io::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        tokio::spawn(h2_connection(tcp, canned.clone()));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(addr)) = (args.next(), args.next()) else {
        return Err("usage: transport_floor h2|tonic|http ADDR".into());
    };
    let addr: std::net::SocketAddr = addr.parse()?;
    // The runtime `roster server` runs on.
    let runtime = roster_server::runtime().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let canned = canned();
        match mode.as_str() {
            "h2" => Ok(serve_h2(listener, canned).await?),
            "tonic" => {
                use roster_proto::nacos::bi_request_stream_server::BiRequestStreamServer;
                use roster_proto::nacos::request_server::RequestServer;
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tonic::transport::Server::builder()
                    .add_service(RequestServer::new(Tonic(canned.clone())))
                    .add_service(BiRequestStreamServer::new(Tonic(canned)))
                    .serve_with_incoming(incoming)
                    .await?;
                Ok(())
            }
            "http" => {
                let grpc = std::net::SocketAddr::new(addr.ip(), addr.port() + 1000);
                tokio::spawn(serve_h2(tokio::net::TcpListener::bind(grpc).await?, canned));
                Ok(axum::serve(listener, http_router()).await?)
            }
            other => Err(format!("unknown mode {other:?}: h2, tonic or http").into()),
        }
    })
}
