//! Sessions as the node runs them: opening (unguessable ids and tokens,
//! refused unless the node is ready), proving a call may act for a session,
//! the outbound link each stream session is pushed through (and the waker
//! of the one task writing a stream that carries several), liveness
//! (touch, sweep, beats) and closing. Closing removes a session's records
//! and subscriptions in one step under the core lock, so nothing can
//! subscribe on a session that is going away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use roster_core::push::OutboundQueue;
use roster_core::session::SessionKind;
use roster_core::{RegistryError, SessionId};
use roster_proto::v1;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::fanout::{Control, Item, PushUpdate};

/// What wakes the one task that writes a stream carrying several sessions:
/// the channels that have something queued (each listed once until the
/// writer takes it), so a change fanned out to a stream's sessions wakes
/// one task, not one per session.
#[derive(Default)]
pub struct StreamWaker {
    notify: Notify,
    ready: Mutex<Vec<u32>>,
}

impl StreamWaker {
    fn wake(&self, channel: u32, listed: &AtomicBool) {
        if !listed.swap(true, Ordering::AcqRel) {
            self.ready.lock().push(channel);
            self.notify.notify_one();
        }
    }

    /// The channels woken since the last call; waits while there are none.
    pub async fn ready(&self) -> Vec<u32> {
        loop {
            let notified = self.notify.notified();
            let ready = std::mem::take(&mut *self.ready.lock());
            if !ready.is_empty() {
                return ready;
            }
            notified.await;
        }
    }
}

/// Where a session sits on a stream carrying several.
struct OnStream {
    waker: Arc<StreamWaker>,
    channel: u32,
    /// Listed in the waker's ready channels, not yet taken.
    listed: AtomicBool,
}

/// The outbound side of one stream session: its bounded queue of control
/// messages and planned updates, and a way to end it.
pub struct SessionLink {
    /// The session.
    pub id: SessionId,
    /// What the client called itself.
    pub client_name: String,
    /// The connection the session lives on: unary calls from there may act
    /// for it without its token.
    pub peer: Option<SocketAddr>,
    queue: Mutex<Queued>,
    ready: Notify,
    /// The stream it shares with other sessions, if it is written by a
    /// stream's writer rather than read with [`Self::next`].
    stream: Option<OnStream>,
    /// When activity was last recorded (see [`Self::active`]).
    touched: Mutex<Option<Instant>>,
    /// Cancelled when the session ends (expired, closed, node shutting down).
    pub closed: CancellationToken,
}

/// A session's queue, and since when it has waited for its writer.
struct Queued {
    items: OutboundQueue<Control, Arc<PushUpdate>>,
    /// Since when something has been queued with nothing taken (`None`
    /// while empty): a writer that takes nothing for long is stuck.
    waiting_since: Option<Instant>,
}

impl Queued {
    /// Notes that something was queued.
    fn queued(&mut self) {
        if self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
    }

    fn pop(&mut self) -> Option<Item> {
        let Some(item) = self.items.pop() else {
            self.waiting_since = None;
            return None;
        };
        self.waiting_since = if self.items.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        Some(item)
    }
}

impl SessionLink {
    fn new(
        id: SessionId,
        client_name: String,
        peer: Option<SocketAddr>,
        capacity: usize,
        parent: &CancellationToken,
        stream: Option<(Arc<StreamWaker>, u32)>,
    ) -> Self {
        Self {
            id,
            client_name,
            peer,
            queue: Mutex::new(Queued {
                items: OutboundQueue::new(capacity),
                waiting_since: None,
            }),
            ready: Notify::new(),
            stream: stream.map(|(waker, channel)| OnStream {
                waker,
                channel,
                listed: AtomicBool::new(false),
            }),
            touched: Mutex::new(None),
            closed: parent.child_token(),
        }
    }

    /// Records activity on the session (anything it sent). Recording takes
    /// the registry's lock, so a busy session records it at most every
    /// eighth of the keep-alive window: it cannot look idle meanwhile (a
    /// probe needs the whole window of silence). `always`: record it now
    /// (a probe's answer).
    pub fn active(&self, node: &Node, always: bool) {
        let every = node.config().session.keepalive / 8;
        let mut touched = self.touched.lock();
        if always || touched.is_none_or(|t| t.elapsed() >= every) {
            *touched = Some(Instant::now());
            drop(touched);
            node.touch(&self.id);
        }
    }

    /// Tells whoever writes the session that it has something to send:
    /// its stream's writer, or the reader of [`Self::next`].
    fn wake(&self) {
        match &self.stream {
            Some(s) => s.waker.wake(s.channel, &s.listed),
            None => self.ready.notify_one(),
        }
    }

    /// Ends the session's link: its writer sends what is queued, then says
    /// it ended.
    pub(crate) fn end(&self) {
        self.closed.cancel();
        self.wake();
    }

    /// Everything queued now, for a stream's writer (which is woken again
    /// by anything queued after this).
    pub fn take_queued(&self, out: &mut Vec<Item>) {
        if let Some(s) = &self.stream {
            s.listed.store(false, Ordering::Release);
        }
        let mut queue = self.queue.lock();
        while let Some(item) = queue.items.pop() {
            out.push(item);
        }
        queue.waiting_since = None;
    }

    pub(crate) fn push_control(&self, control: Control) {
        let mut queue = self.queue.lock();
        queue.items.push_control(control);
        queue.queued();
        drop(queue);
        self.wake();
    }

    /// Queues a planned update (see [`OutboundQueue::push_update`]).
    pub(crate) fn push_update(
        &self,
        update: Arc<PushUpdate>,
        full: impl FnOnce() -> Arc<PushUpdate>,
    ) -> roster_core::push::Enqueued {
        let key = update.key.clone();
        let mut queue = self.queue.lock();
        let outcome = queue.items.push_update(key, update, full);
        queue.queued();
        drop(queue);
        self.wake();
        outcome
    }

    /// Queues a full view (a new subscription).
    pub(crate) fn push_full(&self, update: Arc<PushUpdate>) {
        let mut queue = self.queue.lock();
        queue.items.push_full(update.key.clone(), update);
        queue.queued();
        drop(queue);
        self.wake();
    }

    /// Whether something has waited in the queue, with nothing taken, for
    /// `timeout` or longer: its writer (and so its client) is stuck.
    pub fn stuck(&self, timeout: std::time::Duration) -> bool {
        self.queue
            .lock()
            .waiting_since
            .is_some_and(|since| since.elapsed() >= timeout)
    }

    /// Waits for the next item; `None` once the session has ended.
    pub async fn next(&self) -> Option<Item> {
        loop {
            let ready = self.ready.notified();
            if let Some(item) = self.queue.lock().pop() {
                return Some(item);
            }
            tokio::select! {
                _ = ready => {}
                _ = self.closed.cancelled() => return None,
            }
        }
    }

    /// The next item if one is queued now (does not wait).
    pub fn try_next(&self) -> Option<Item> {
        self.queue.lock().pop()
    }

    /// Items queued now.
    pub fn queued(&self) -> usize {
        self.queue.lock().items.len()
    }
}

/// 128 bits from the operating system's random source.
pub(crate) fn random_u128() -> u128 {
    let mut bytes = [0u8; 16];
    // The OS source does not fail on a running Linux system; if it ever
    // did, nothing safe could be handed out.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    u128::from_le_bytes(bytes)
}

/// A session token as text (hex).
pub fn token_text(token: u128) -> String {
    format!("{token:032x}")
}

/// A session token from text; `None` when malformed.
pub fn parse_token(text: &str) -> Option<u128> {
    let text = text.trim();
    if text.len() != 32 {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

impl Node {
    fn new_session(
        &self,
        kind: SessionKind,
        client_name: &str,
    ) -> Result<(SessionId, u128), RegistryError> {
        self.require_ready()?;
        let id: SessionId = token_text(random_u128()).into();
        let token = random_u128();
        let opened =
            self.core
                .lock()
                .open_session(id.clone(), kind, client_name, token, Self::now());
        self.counted(opened)?;
        Ok((id, token))
    }

    /// Opens a stream session on the connection `peer` and its outbound
    /// link, queueing the welcome. Refused unless the node is ready.
    /// `stream`: the waker of the stream the session shares, and its
    /// channel there (else its link is read with [`SessionLink::next`]).
    pub fn open_stream(
        &self,
        client_name: &str,
        peer: Option<SocketAddr>,
        stream: Option<(Arc<StreamWaker>, u32)>,
    ) -> Result<Arc<SessionLink>, RegistryError> {
        let (id, token) = self.new_session(SessionKind::Stream, client_name)?;
        let link = Arc::new(SessionLink::new(
            id.clone(),
            client_name.to_owned(),
            peer,
            self.config.push.queue_capacity,
            &self.shutdown,
            stream,
        ));
        link.push_control(Control::Welcome(v1::Welcome {
            session_id: id.to_string(),
            keepalive_ms: self.config.session.keepalive.as_millis() as u64,
            session_token: token_text(token),
            epoch: Some(self.epoch.clone()),
        }));
        self.links.write().insert(id, link.clone());
        Ok(link)
    }

    /// Opens a lease session (HTTP clients), renewed by beats. Returns its
    /// id and token.
    pub fn open_lease(&self, client_name: &str) -> Result<(SessionId, u128), RegistryError> {
        self.new_session(SessionKind::Lease, client_name)
    }

    /// Opens the beat lease `id` of one Nacos v1 HTTP instance, unless it
    /// is open already (then: false).
    pub fn open_beat_lease(
        &self,
        id: &SessionId,
        unhealthy_after: std::time::Duration,
        delete_after: std::time::Duration,
    ) -> Result<bool, RegistryError> {
        self.require_ready()?;
        let mut core = self.core.lock();
        if core.session(id).is_some() {
            return Ok(false);
        }
        let kind = SessionKind::Beat {
            unhealthy_after,
            delete_after,
        };
        // Its token is never handed out: only the Nacos HTTP API, by the
        // instance's address, acts for a beat lease.
        let opened = core.open_session(id.clone(), kind, "nacos-http", random_u128(), Self::now());
        drop(core);
        self.counted(opened)?;
        Ok(true)
    }

    /// Whether a call from `peer` (with `token`, if given) may act for
    /// `session`: it comes from the session's own connection, or proves
    /// the session's token.
    pub fn authorize(
        &self,
        session: &str,
        peer: Option<SocketAddr>,
        token: Option<u128>,
    ) -> Result<(), RegistryError> {
        if let Some(link) = self.links.read().get(session)
            && link.peer.is_some()
            && link.peer == peer
        {
            return Ok(());
        }
        let core = self.core.lock();
        if core.session(session).is_none() {
            return Err(RegistryError::UnknownSession(session.to_owned()));
        }
        match token {
            Some(t) if core.token_matches(session, t) => Ok(()),
            Some(_) => Err(RegistryError::Forbidden(format!(
                "the token given is not session {session:?}'s"
            ))),
            None => Err(RegistryError::Forbidden(format!(
                "session {session:?} belongs to another connection: call on its stream, \
                 or give its token (x-roster-session-token)"
            ))),
        }
    }

    /// The link of a stream session.
    pub fn link(&self, session: &str) -> Option<Arc<SessionLink>> {
        self.links.read().get(session).cloned()
    }

    /// Records activity on a session; false if it is not open.
    pub fn touch(&self, session: &str) -> bool {
        self.core.lock().touch(session, Self::now())
    }

    /// A beat on a lease: alive, and healthy again if silence had made its
    /// instances unhealthy.
    pub fn beat(&self, session: &str) -> Result<(), RegistryError> {
        self.write(|core, now| core.beat(session, now), Clone::clone)
            .map(|_| ())
    }

    /// Ends a session: its records and subscriptions go in one step (so
    /// nothing subscribes on it meanwhile), then its stream closes.
    pub fn close_session(&self, session: &str) {
        let _ = self.write(
            |core, now| {
                let changes = core.close_session(session, now);
                self.subs.lock().remove_session(session);
                Ok(changes)
            },
            Clone::clone,
        );
        if let Some(link) = self.links.write().remove(session) {
            link.end();
        }
        self.acks.notify_waiters();
    }

    /// Probes idle sessions and expires silent ones. Returns how many expired.
    pub fn sweep(&self) -> usize {
        let out = self
            .write(
                |core, now| {
                    let out = core.sweep(now);
                    let mut subs = self.subs.lock();
                    for id in &out.expired {
                        subs.remove_session(id);
                    }
                    Ok(out)
                },
                |o| o.changes.clone(),
            )
            .unwrap_or_default();
        for (id, nonce) in &out.probes {
            if let Some(link) = self.links.read().get(id) {
                link.push_control(Control::Probe(*nonce));
            }
        }
        for id in &out.expired {
            tracing::info!(session = %id, "session expired");
            if let Some(link) = self.links.write().remove(id) {
                link.end();
            }
        }
        if !out.expired.is_empty() {
            self.acks.notify_waiters();
        }
        self.prune_pollers();
        self.forget_empty_services();
        self.eject_stuck();
        out.expired.len()
    }

    /// Closes the sessions whose queue has waited `limits.stuck_timeout`
    /// with nothing taken (their client does not read): what they hold
    /// goes, as at expiry, and their client reconnects afresh.
    fn eject_stuck(&self) {
        let timeout = self.config.limits.stuck_timeout;
        let stuck: Vec<SessionId> = self
            .links
            .read()
            .values()
            .filter(|l| l.stuck(timeout))
            .map(|l| l.id.clone())
            .collect();
        for id in stuck {
            self.eject(&id, "its pushes stayed queued");
        }
    }

    /// Closes a session whose client is stuck, counted and logged.
    pub fn eject(&self, id: &SessionId, why: &str) {
        self.metrics.stuck_ejections.inc();
        tracing::warn!(session = %id, "closing a stuck subscriber: {why} for limits.stuck_timeout");
        self.close_session(id);
    }

    /// Applies beat deadlines (Nacos v1 HTTP instances): decided and done
    /// under one lock, so a beat answered "alive" is never followed by the
    /// removal it beat.
    pub fn check_beats(&self) -> roster_core::registry::BeatOutcome {
        self.write(|core, now| Ok(core.check_beats(now)), |o| o.changes.clone())
            .unwrap_or_default()
    }
}
