//! A session stream and the sessions it carries, told apart by channel:
//! opening the stream with its first session, opening more sessions on it,
//! and one reader task per stream that hands each session its pushes and
//! replies directly (the rest goes to the session's own task). Sessions
//! opened on one [`crate::Connection`] share its stream, so the registry
//! writes them all from one task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use roster_proto::v1::{self, registry_client::RegistryClient};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::ClientError;

/// What the reader hands a session: a message of its channel, or the
/// stream's failure.
pub(crate) type Inbound = Result<v1::ServerMessage, tonic::Status>;

/// Messages of one channel not yet taken by its session; the stream is
/// not read further until it takes them.
const INBOUND_PER_SESSION: usize = 64;

/// How long a new session waits for the registry's welcome.
const WELCOME_WITHIN: Duration = Duration::from_secs(10);

/// Messages waiting to go out on a stream, all its sessions together.
const OUTGOING: usize = 256;

/// Pushed updates not yet read that a session buffers; a reader further
/// behind than this misses updates (and [`Session::missed_updates`] says
/// so) rather than stalling the session's replies and keep-alives.
const UPDATES_BUFFERED: usize = 4096;

/// Where a session's updates go; the receiver ends once every sender
/// has (the stream's entry for the session, and the session's task).
pub(crate) type UpdatesTx = mpsc::Sender<Result<v1::ServiceUpdate, ClientError>>;

/// What a session and its stream's reader share: the calls waiting for
/// replies, and whether updates were dropped.
pub(crate) struct Ends {
    /// Set when an update was dropped because the reader was too far behind.
    pub missed: AtomicBool,
    pub calls: Calls,
}

impl Ends {
    /// A session's ends, and the two sides of its updates' channel.
    pub fn new() -> (
        Arc<Self>,
        UpdatesTx,
        mpsc::Receiver<Result<v1::ServiceUpdate, ClientError>>,
    ) {
        let (updates, rx) = mpsc::channel(UPDATES_BUFFERED);
        let ends = Arc::new(Self {
            missed: AtomicBool::new(false),
            calls: Calls::default(),
        });
        (ends, updates, rx)
    }
}

/// A session as its stream's reader sees it.
struct Entry {
    ends: Arc<Ends>,
    updates: UpdatesTx,
    control: mpsc::Sender<Inbound>,
}

impl Entry {
    /// Hands an update over without waiting for its reader: replies and
    /// keep-alives must go on, so a reader this far behind is told it
    /// missed some instead.
    fn deliver(&self, update: Result<v1::ServiceUpdate, ClientError>) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.updates.try_send(update) {
            self.ends.missed.store(true, Ordering::Release);
        }
    }
}

type Sessions = Arc<Mutex<HashMap<u32, Arc<Entry>>>>;

fn lock(sessions: &Sessions) -> MutexGuard<'_, HashMap<u32, Arc<Entry>>> {
    sessions.lock().unwrap_or_else(|p| p.into_inner())
}

/// One session stream. It lasts while a session on it holds it (and the
/// registry keeps it open).
pub(crate) struct Carrier {
    outgoing: mpsc::Sender<v1::ClientMessage>,
    sessions: Sessions,
    next_channel: AtomicU32,
    alive: Arc<AtomicBool>,
    reader: JoinHandle<()>,
}

impl Drop for Carrier {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A session's end of a stream, once the registry welcomed it.
pub(crate) struct Opened {
    pub carrier: Arc<Carrier>,
    pub outgoing: Outgoing,
    pub inbound: mpsc::Receiver<Inbound>,
    pub welcome: v1::Welcome,
    /// How often to send keep-alives (a third of the registry's window).
    pub keepalive: Duration,
}

/// Sends a session's messages on its stream, marked with its channel.
#[derive(Clone)]
pub(crate) struct Outgoing {
    tx: mpsc::Sender<v1::ClientMessage>,
    channel: u32,
}

impl Outgoing {
    /// The session's channel.
    pub fn channel(&self) -> u32 {
        self.channel
    }

    pub async fn send(&self, mut message: v1::ClientMessage) -> Result<(), ClientError> {
        message.channel = self.channel;
        self.tx
            .send(message)
            .await
            .map_err(|_| ClientError::SessionClosed)
    }

    /// Ends the session, without waiting (for `Drop`): when the stream's
    /// queue is full, a task sends the close as soon as there is room.
    pub fn close(&self) {
        close_channel(&self.tx, self.channel);
    }
}

/// Tells the registry the session on `channel` ended (see
/// [`Outgoing::close`]).
fn close_channel(tx: &mpsc::Sender<v1::ClientMessage>, channel: u32) {
    let close = v1::ClientMessage {
        channel,
        kind: Some(v1::client_message::Kind::Close(v1::Close {})),
    };
    if let Err(mpsc::error::TrySendError::Full(close)) = tx.try_send(close)
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let tx = tx.clone();
        runtime.spawn(async move {
            let _ = tx.send(close).await;
        });
    }
}

fn hello(channel: u32, client_name: &str) -> v1::ClientMessage {
    v1::ClientMessage {
        channel,
        kind: Some(v1::client_message::Kind::Hello(v1::Hello {
            client_name: client_name.to_owned(),
        })),
    }
}

impl Carrier {
    /// Opens a stream with its first session.
    pub async fn open(
        mut grpc: RegistryClient<Channel>,
        client_name: &str,
        ends: Arc<Ends>,
        updates: UpdatesTx,
    ) -> Result<Opened, ClientError> {
        let (outgoing, rx) = mpsc::channel(OUTGOING);
        let sessions: Sessions = Arc::default();
        let (control, first_rx) = mpsc::channel(INBOUND_PER_SESSION);
        let entry = Entry {
            ends,
            updates,
            control,
        };
        lock(&sessions).insert(0, Arc::new(entry));
        // The registry answers the stream once it has read a hello.
        outgoing
            .send(hello(0, client_name))
            .await
            .map_err(|_| ClientError::SessionClosed)?;
        let inbound = grpc.session(ReceiverStream::new(rx)).await?.into_inner();
        let alive = Arc::new(AtomicBool::new(true));
        let reader = tokio::spawn(read(inbound, sessions.clone(), alive.clone()));
        let carrier = Arc::new(Carrier {
            outgoing,
            sessions,
            next_channel: AtomicU32::new(1),
            alive,
            reader,
        });
        carrier.welcomed(0, first_rx).await
    }

    /// Opens another session on the stream.
    pub async fn open_more(
        self: &Arc<Self>,
        client_name: &str,
        ends: Arc<Ends>,
        updates: UpdatesTx,
    ) -> Result<Opened, ClientError> {
        let channel = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let (control, rx) = mpsc::channel(INBOUND_PER_SESSION);
        {
            // Checked under the lock the reader clears the sessions
            // with when the stream ends.
            let mut sessions = lock(&self.sessions);
            if !self.alive() {
                return Err(ClientError::SessionClosed);
            }
            let entry = Entry {
                ends,
                updates,
                control,
            };
            sessions.insert(channel, Arc::new(entry));
        }
        if self
            .outgoing
            .send(hello(channel, client_name))
            .await
            .is_err()
        {
            self.forget(channel);
            return Err(ClientError::SessionClosed);
        }
        self.welcomed(channel, rx).await
    }

    /// Whether the stream is still up.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Stops handing the session on `channel` its messages.
    pub fn forget(&self, channel: u32) {
        lock(&self.sessions).remove(&channel);
    }

    async fn welcomed(
        self: &Arc<Self>,
        channel: u32,
        mut inbound: mpsc::Receiver<Inbound>,
    ) -> Result<Opened, ClientError> {
        use v1::server_message::Kind;
        let refused = |e: ClientError| {
            self.forget(channel);
            e
        };
        let first = match tokio::time::timeout(WELCOME_WITHIN, inbound.recv()).await {
            Ok(first) => first,
            Err(_) => {
                // Should the welcome come after all, the session ends.
                close_channel(&self.outgoing, channel);
                return Err(refused(ClientError::Protocol(format!(
                    "no welcome for a session on channel {channel} within {WELCOME_WITHIN:?} \
                     (a registry that carries one session per stream?)"
                ))));
            }
        };
        match first {
            Some(Ok(v1::ServerMessage {
                kind: Some(Kind::Welcome(welcome)),
                ..
            })) => Ok(Opened {
                carrier: self.clone(),
                outgoing: Outgoing {
                    tx: self.outgoing.clone(),
                    channel,
                },
                inbound,
                keepalive: Duration::from_millis(welcome.keepalive_ms.max(300) / 3),
                welcome,
            }),
            Some(Ok(v1::ServerMessage {
                kind: Some(Kind::Closed(c)),
                ..
            })) => Err(refused(ClientError::Status(tonic::Status::unavailable(
                c.reason,
            )))),
            Some(Err(status)) => Err(refused(status.into())),
            _ => Err(refused(ClientError::Protocol("expected welcome".into()))),
        }
    }
}

/// Reads the stream, handing each message to its channel's session; when
/// the stream ends, every session's inbound ends (after the failure, if
/// it failed).
async fn read(
    mut inbound: tonic::Streaming<v1::ServerMessage>,
    sessions: Sessions,
    alive: Arc<AtomicBool>,
) {
    use v1::server_message::Kind;
    loop {
        match inbound.message().await {
            Ok(Some(m)) => {
                let channel = m.channel;
                // A session that went meanwhile: what was on its way is
                // dropped.
                let Some(session) = lock(&sessions).get(&channel).cloned() else {
                    continue;
                };
                match m.kind {
                    Some(Kind::Update(bytes)) => session.deliver(
                        v1::ServiceUpdate::decode(bytes)
                            .map_err(|e| ClientError::Protocol(e.to_string())),
                    ),
                    Some(Kind::Reply(reply)) => session.ends.calls.settle(reply),
                    kind => {
                        // Nothing more comes on a channel the registry
                        // closed: its session's ends go once it is told.
                        let ended = matches!(kind, Some(Kind::Closed(_)));
                        let m = v1::ServerMessage { channel, kind };
                        if session.control.send(Ok(m)).await.is_err() || ended {
                            lock(&sessions).remove(&channel);
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(status) => {
                for session in lock(&sessions).values() {
                    let _ = session.control.try_send(Err(status.clone()));
                }
                break;
            }
        }
    }
    let mut sessions = lock(&sessions);
    alive.store(false, Ordering::Release);
    sessions.clear();
}

/// Calls in flight on a session stream, by id; `None` once the stream
/// has ended (a call then fails at once instead of waiting for ever).
pub(crate) struct Calls {
    next_id: AtomicU64,
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<v1::reply::Result>>>>,
}

impl Default for Calls {
    fn default() -> Self {
        Self {
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Some(HashMap::new())),
        }
    }
}

impl Calls {
    /// Makes `request` on the session `outgoing` sends for; waits for its
    /// reply.
    pub(crate) async fn call(
        &self,
        outgoing: &Outgoing,
        request: v1::call::Request,
    ) -> Result<v1::reply::Result, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.lock().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(ClientError::SessionClosed),
        };
        let message = v1::ClientMessage {
            channel: 0,
            kind: Some(v1::client_message::Kind::Call(v1::Call {
                id,
                request: Some(request),
            })),
        };
        if outgoing.send(message).await.is_err() {
            self.lock().as_mut().map(|p| p.remove(&id));
            return Err(ClientError::SessionClosed);
        }
        match rx.await {
            Ok(v1::reply::Result::Error(e)) => Err(ClientError::Status(tonic::Status::new(
                tonic::Code::from_i32(e.code),
                e.message,
            ))),
            Ok(result) => Ok(result),
            Err(_) => Err(ClientError::SessionClosed),
        }
    }

    /// Hands a reply to the call waiting for it.
    pub(crate) fn settle(&self, reply: v1::Reply) {
        let waiting = self.lock().as_mut().and_then(|p| p.remove(&reply.id));
        if let (Some(tx), Some(result)) = (waiting, reply.result) {
            let _ = tx.send(result);
        }
    }

    /// The stream ended: every call in flight fails, and so will new ones.
    pub(crate) fn close(&self) {
        self.lock().take();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<v1::reply::Result>>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}
