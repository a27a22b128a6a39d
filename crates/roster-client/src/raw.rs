//! The raw protocol client: one-shot calls ([`Connection`]) and a bare
//! session ([`Session`]) that keeps itself alive, makes calls on its stream
//! and hands over pushes as they arrive (sessions opened on one connection
//! share one stream, see [`crate::stream`]). No retries, no caching: the
//! [`crate::Client`] builds those on top. Tests and operator tools use it to
//! speak the protocol directly.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prost::Message;
use roster_core::{Instance, ServiceKey};
use roster_proto::v1::{self, registry_client::RegistryClient};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::acks::{AckQueue, AckSent};
use crate::stream::{Carrier, Ends, Inbound, Opened, Outgoing, UpdatesTx};
use crate::{ClientError, MAX_MESSAGE_BYTES};

pub use roster_proto::{ADMIN_TOKEN_HEADER, SESSION_TOKEN_HEADER};

/// A connection to one registry node, for one-shot calls.
#[derive(Clone)]
pub struct Connection {
    grpc: RegistryClient<Channel>,
    /// The node's admin token, sent with operator calls that change an
    /// instance some other session owns.
    admin: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// The stream the connection's sessions share, while one holds it.
    carrier: Arc<tokio::sync::Mutex<Weak<Carrier>>>,
}

impl Connection {
    /// Connects to `addr` ("host:port" or "http://host:port").
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, Duration::from_secs(3), Duration::from_secs(20)).await
    }

    /// Connects with a connect timeout; HTTP/2 pings every `ping` detect
    /// a dead peer even when no call is under way.
    pub async fn connect_with(
        addr: &str,
        connect_timeout: Duration,
        ping: Duration,
    ) -> Result<Self, ClientError> {
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|_| ClientError::Address(addr.to_owned()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(ping)
            .keep_alive_timeout(connect_timeout)
            .keep_alive_while_idle(true);
        let connecting = endpoint.connect();
        let channel = match tokio::time::timeout(connect_timeout, connecting).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(ClientError::Connect {
                    addr: addr.to_owned(),
                    reason: root_cause(&e),
                });
            }
            Err(_) => {
                return Err(ClientError::Connect {
                    addr: addr.to_owned(),
                    reason: "timed out".into(),
                });
            }
        };
        Ok(Self {
            grpc: RegistryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            admin: None,
            carrier: Arc::default(),
        })
    }

    /// Sends the node's admin token with the calls that change an
    /// instance ([`Self::deregister`], [`Self::drain`]), so an operator may
    /// act on instances other sessions own.
    pub fn with_admin_token(mut self, token: &str) -> Result<Self, ClientError> {
        let value = token
            .trim()
            .parse()
            .map_err(|_| ClientError::Address("the admin token is not printable ASCII".into()))?;
        self.admin = Some(value);
        Ok(self)
    }

    /// A request carrying the admin token, if one was given.
    fn operator<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.admin {
            request
                .metadata_mut()
                .insert(ADMIN_TOKEN_HEADER, token.clone());
        }
        request
    }

    /// The generated gRPC client, for calls this type does not wrap.
    pub fn grpc(&self) -> RegistryClient<Channel> {
        self.grpc.clone()
    }

    /// Opens a session named `client_name`, on the stream the
    /// connection's sessions share (opened with the first of them).
    pub async fn open_session(&self, client_name: &str) -> Result<Session, ClientError> {
        let (ends, tx, updates) = Ends::new();
        // Twice at most: a stream that ends while a session is opened on
        // it is replaced by a new one.
        for _ in 0..2 {
            let current = self.carrier.lock().await.upgrade().filter(|c| c.alive());
            if let Some(carrier) = current {
                match carrier
                    .open_more(client_name, ends.clone(), tx.clone())
                    .await
                {
                    Err(ClientError::SessionClosed) if !carrier.alive() => continue,
                    opened => {
                        let opened = opened?;
                        return Ok(Session::start(self.grpc.clone(), opened, ends, tx, updates));
                    }
                }
            }
            // Held while the stream opens, so one stream serves them all.
            let mut shared = self.carrier.lock().await;
            if shared.upgrade().is_some_and(|c| c.alive()) {
                continue;
            }
            let opened =
                Carrier::open(self.grpc.clone(), client_name, ends.clone(), tx.clone()).await?;
            *shared = Arc::downgrade(&opened.carrier);
            return Ok(Session::start(self.grpc.clone(), opened, ends, tx, updates));
        }
        Err(ClientError::SessionClosed)
    }

    /// The instances of a service.
    pub async fn query(
        &self,
        key: &ServiceKey,
        healthy_only: bool,
    ) -> Result<v1::QueryResponse, ClientError> {
        let r = self
            .grpc
            .clone()
            .query(v1::QueryRequest {
                service: Some(key.into()),
                healthy_only,
                clusters: Vec::new(),
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Services of a namespace (and optionally one group).
    pub async fn list_services(
        &self,
        namespace: &str,
        group: &str,
    ) -> Result<Vec<v1::ServiceSummary>, ClientError> {
        let r = self
            .grpc
            .clone()
            .list_services(v1::ListServicesRequest {
                namespace: namespace.to_owned(),
                group: group.to_owned(),
            })
            .await?;
        Ok(r.into_inner().services)
    }

    /// The cluster's members as the node knows them (itself first).
    pub async fn members(&self) -> Result<Vec<v1::Member>, ClientError> {
        let r = self.grpc.clone().members(v1::MembersRequest {}).await?;
        Ok(r.into_inner().members)
    }

    /// Removes an instance: as an operator (see [`Self::with_admin_token`]);
    /// a session removes its own with [`Session::deregister`].
    pub async fn deregister(&self, instance: v1::InstanceRef) -> Result<u64, ClientError> {
        let r = self
            .grpc
            .clone()
            .deregister(self.operator(v1::DeregisterRequest {
                instance: Some(instance),
                session_id: String::new(),
            }))
            .await?;
        Ok(r.into_inner().revision)
    }

    /// Drains an instance (weight 0, or removal) and waits for subscribers'
    /// acknowledgements up to `timeout`: as an operator (see
    /// [`Self::with_admin_token`]); a session drains its own with
    /// [`Session::drain`].
    pub async fn drain(
        &self,
        instance: v1::InstanceRef,
        remove: bool,
        timeout: Duration,
    ) -> Result<v1::DrainResponse, ClientError> {
        let r = self
            .grpc
            .clone()
            .drain(self.operator(v1::DrainRequest {
                instance: Some(instance),
                remove,
                timeout_ms: timeout.as_millis().max(1) as u64,
                session_id: String::new(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// "Changed since `revision` / `checksum`?"
    pub async fn pull(
        &self,
        key: &ServiceKey,
        revision: u64,
        checksum: u64,
    ) -> Result<v1::PullResponse, ClientError> {
        let r = self
            .grpc
            .clone()
            .pull(v1::PullRequest {
                service: Some(key.into()),
                since_revision: revision,
                since_checksum: checksum,
            })
            .await?;
        Ok(r.into_inner())
    }
}

pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The answer of a reply that should be `$kind`, or a protocol error.
macro_rules! expect_reply {
    ($result:expr, $kind:ident) => {
        match $result {
            v1::reply::Result::$kind(r) => Ok(r),
            other => Err(ClientError::Protocol(format!(
                "expected a {} reply, got {:?}",
                stringify!($kind),
                other
            ))),
        }
    };
}

/// A live session: keeps itself alive in the background (keep-alives and
/// probe answers go out whatever its user is doing), owns the instances
/// it registers (removed when it closes) and receives updates of the
/// services it subscribes to. Its calls travel on the session stream.
pub struct Session {
    grpc: RegistryClient<Channel>,
    welcome: v1::Welcome,
    outgoing: Outgoing,
    /// The stream it is on (held, so the stream lasts as long as it).
    carrier: Arc<Carrier>,
    updates: mpsc::Receiver<Result<v1::ServiceUpdate, ClientError>>,
    /// What it shares with its stream's reader: calls awaiting replies,
    /// and whether updates were dropped.
    ends: Arc<Ends>,
    acks: Arc<AckQueue>,
    /// Keeps the session alive; aborted (ending the session) when the
    /// session is closed or dropped.
    task: Option<JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.ends.calls.close();
        // The session ends; the stream goes on for the others on it.
        self.outgoing.close();
        self.carrier.forget(self.outgoing.channel());
    }
}

impl Session {
    /// Opens a session on a stream of its own.
    pub(crate) async fn open(
        grpc: RegistryClient<Channel>,
        client_name: &str,
    ) -> Result<Self, ClientError> {
        let (ends, tx, updates) = Ends::new();
        let opened = Carrier::open(grpc.clone(), client_name, ends.clone(), tx.clone()).await?;
        Ok(Self::start(grpc, opened, ends, tx, updates))
    }

    /// Starts serving a session the registry welcomed.
    fn start(
        grpc: RegistryClient<Channel>,
        stream: Opened,
        ends: Arc<Ends>,
        tx: UpdatesTx,
        updates: mpsc::Receiver<Result<v1::ServiceUpdate, ClientError>>,
    ) -> Self {
        let acks = AckQueue::new();
        let task = tokio::spawn(run_session(
            Stream {
                inbound: stream.inbound,
                outgoing: stream.outgoing.clone(),
                updates: tx,
                ends: ends.clone(),
                acks: acks.clone(),
            },
            stream.keepalive,
        ));
        Self {
            grpc,
            welcome: stream.welcome,
            outgoing: stream.outgoing,
            carrier: stream.carrier,
            updates,
            ends,
            acks,
            task: Some(task),
        }
    }

    /// The session id the registry gave.
    pub fn id(&self) -> &str {
        &self.welcome.session_id
    }

    /// The session's secret: it lets a unary call from another connection
    /// act for this session (`x-roster-session-token`).
    pub fn token(&self) -> &str {
        &self.welcome.session_token
    }

    /// The node life the session lives on.
    pub fn epoch(&self) -> Option<&v1::NodeEpoch> {
        self.welcome.epoch.as_ref()
    }

    pub(crate) async fn call(
        &self,
        request: v1::call::Request,
    ) -> Result<v1::reply::Result, ClientError> {
        self.ends.calls.call(&self.outgoing, request).await
    }

    /// Registers an instance owned by this session. Returns its id.
    pub async fn register(
        &self,
        key: &ServiceKey,
        instance: &Instance,
    ) -> Result<String, ClientError> {
        let r = self
            .call(v1::call::Request::Register(v1::RegisterRequest {
                session_id: String::new(),
                service: Some(key.into()),
                instance: Some(v1::Instance::from_model(instance)),
            }))
            .await?;
        Ok(expect_reply!(r, Register)?.instance_id)
    }

    /// Removes an instance this session registered. Returns the new
    /// revision.
    pub async fn deregister(&self, instance: v1::InstanceRef) -> Result<u64, ClientError> {
        let r = self
            .call(v1::call::Request::Deregister(v1::DeregisterRequest {
                instance: Some(instance),
                session_id: String::new(),
            }))
            .await?;
        Ok(expect_reply!(r, Deregister)?.revision)
    }

    /// Replaces the mutable fields of an instance this session registered.
    pub async fn update(&self, key: &ServiceKey, instance: &Instance) -> Result<u64, ClientError> {
        let r = self
            .call(v1::call::Request::Update(v1::UpdateRequest {
                service: Some(key.into()),
                instance: Some(v1::Instance::from_model(instance)),
                session_id: String::new(),
            }))
            .await?;
        Ok(expect_reply!(r, Update)?.revision)
    }

    /// The instances of a service, as a full-view update (revision 0 and
    /// no instances when the service is unknown).
    pub async fn query(
        &self,
        key: &ServiceKey,
        healthy_only: bool,
    ) -> Result<v1::ServiceUpdate, ClientError> {
        let r = self
            .call(v1::call::Request::Query(v1::QueryRequest {
                service: Some(key.into()),
                healthy_only,
                clusters: Vec::new(),
            }))
            .await?;
        let bytes = expect_reply!(r, Query)?;
        v1::ServiceUpdate::decode(bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Subscribes to a service: returns its full view now; the same view
    /// and then its changes arrive through [`Session::next_update`].
    pub async fn subscribe(&self, key: &ServiceKey) -> Result<v1::ServiceUpdate, ClientError> {
        let r = self
            .call(v1::call::Request::Subscribe(v1::SubscribeRequest {
                session_id: String::new(),
                service: Some(key.into()),
            }))
            .await?;
        expect_reply!(r, Subscribe)?
            .view
            .ok_or_else(|| ClientError::Protocol("subscribe answered no view".into()))
    }

    /// Stops the registry pushing a service to this session.
    pub async fn unsubscribe(&self, key: &ServiceKey) -> Result<(), ClientError> {
        let r = self
            .call(v1::call::Request::Unsubscribe(v1::UnsubscribeRequest {
                session_id: String::new(),
                service: Some(key.into()),
            }))
            .await?;
        expect_reply!(r, Unsubscribe).map(|_| ())
    }

    /// "Changed since `revision` / `checksum`?"
    pub async fn pull(
        &self,
        key: &ServiceKey,
        revision: u64,
        checksum: u64,
    ) -> Result<v1::PullResponse, ClientError> {
        let r = self
            .call(v1::call::Request::Pull(v1::PullRequest {
                service: Some(key.into()),
                since_revision: revision,
                since_checksum: checksum,
            }))
            .await?;
        expect_reply!(r, Pull)
    }

    /// Drains an instance this session registered: sets its weight to 0
    /// (or removes it) and waits until every subscriber of the service has
    /// applied that, or `timeout` passed. (A unary call, made on the
    /// session's connection with its token.)
    pub async fn drain(
        &self,
        instance: v1::InstanceRef,
        remove: bool,
        timeout: Duration,
    ) -> Result<v1::DrainResponse, ClientError> {
        self.drain_call(instance, remove, timeout).await
    }

    /// The drain call, independent of the session's lifetime (so its
    /// owner can wait for it elsewhere while it keeps serving).
    pub(crate) fn drain_call(
        &self,
        instance: v1::InstanceRef,
        remove: bool,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<v1::DrainResponse, ClientError>> + Send + 'static
    {
        let mut request = tonic::Request::new(v1::DrainRequest {
            instance: Some(instance),
            remove,
            timeout_ms: timeout.as_millis().max(1) as u64,
            session_id: self.id().to_owned(),
        });
        if let Ok(token) = self.token().parse() {
            request.metadata_mut().insert(SESSION_TOKEN_HEADER, token);
        }
        let mut grpc = self.grpc.clone();
        async move { Ok(grpc.drain(request).await?.into_inner()) }
    }

    /// The next pushed update (in order per service); `None` once the
    /// session has ended.
    pub async fn next_update(&mut self) -> Option<Result<v1::ServiceUpdate, ClientError>> {
        self.updates.recv().await
    }

    /// Takes the stream of pushed updates out of the session, for an owner
    /// that reads them beside its calls ([`Session::next_update`] then
    /// ends at once).
    pub(crate) fn detach_updates(
        &mut self,
    ) -> mpsc::Receiver<Result<v1::ServiceUpdate, ClientError>> {
        let (_, closed) = mpsc::channel(1);
        std::mem::replace(&mut self.updates, closed)
    }

    /// Whether updates were dropped since the last call because they were
    /// not read in time (more than 4096 behind): pull what matters.
    pub fn missed_updates(&self) -> bool {
        self.ends.missed.swap(false, Ordering::AcqRel)
    }

    /// Tells the registry this session applied `revision` of `key`. The
    /// acknowledgement is held back up to [`crate::ACK_DELAY`] and sent with
    /// the others held meanwhile; await the result to know it went out.
    pub fn ack(&self, key: &ServiceKey, revision: u64) -> AckSent {
        self.acks.hold(key, revision)
    }

    /// Ends the session; the registry removes what it registered. (So
    /// does dropping it.)
    pub async fn close(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.ends.calls.close();
    }
}

/// What a raw session's task works with.
struct Stream {
    inbound: mpsc::Receiver<Inbound>,
    outgoing: Outgoing,
    /// For the stream's failure (pushes come through the stream's reader).
    updates: UpdatesTx,
    ends: Arc<Ends>,
    acks: Arc<AckQueue>,
}

async fn run_session(mut stream: Stream, keepalive: Duration) {
    serve_session(&mut stream, keepalive).await;
    stream.ends.calls.close();
    stream.acks.end();
}

async fn serve_session(s: &mut Stream, keepalive: Duration) {
    use v1::server_message::Kind;
    let (outgoing, updates, acks) = (&s.outgoing, &s.updates, &s.acks);
    let mut tick = tokio::time::interval(keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acks_due = None;
    loop {
        let msg = tokio::select! {
            m = s.inbound.recv() => m,
            _ = tick.tick() => {
                let ka = v1::ClientMessage { channel: 0, kind: Some(v1::client_message::Kind::KeepAlive(v1::KeepAlive {})) };
                if outgoing.send(ka).await.is_err() { return; }
                continue;
            }
            _ = acks.first_held.notified(), if acks_due.is_none() => {
                acks_due = acks.due();
                continue;
            }
            _ = tokio::time::sleep_until(acks_due.unwrap_or_else(tokio::time::Instant::now)), if acks_due.is_some() => {
                acks_due = None;
                if let Some((message, number)) = acks.take() {
                    if outgoing.send(message).await.is_err() { return; }
                    acks.sent(number);
                }
                continue;
            }
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            None => return,
            Some(Err(status)) => {
                let _ = updates.try_send(Err(status.into()));
                return;
            }
        };
        match msg.kind {
            Some(Kind::Probe(p)) => {
                let reply = v1::ClientMessage {
                    channel: 0,
                    kind: Some(v1::client_message::Kind::ProbeReply(v1::ProbeReply {
                        nonce: p.nonce,
                    })),
                };
                if outgoing.send(reply).await.is_err() {
                    return;
                }
            }
            // The registry ended the session.
            Some(Kind::Closed(_)) => return,
            // Pushes and replies go straight to their ends (see
            // `stream`); a welcome only opens a session.
            Some(Kind::Update(_) | Kind::Reply(_) | Kind::Welcome(_)) | None => {}
        }
    }
}
