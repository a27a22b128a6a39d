//! The client's background task: the only code that talks to the registry.
//! It holds one session, redoes registrations and subscriptions on every
//! new session, applies pushes and pulls to the caches (with empty-push
//! protection and full reloads on gaps), writes the disk cache, and
//! reconnects with jittered back-off, moving to the next address on failure.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use roster_core::ServiceKey;
use roster_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::Code;

use crate::acks::HeldAcks;
use crate::cache::ServiceCache;
use crate::client::{Change, Shared, Status, Update};
use crate::raw::{Connection, OpenStream, open_stream};
use crate::{ClientError, metric_names};

/// What the application asks of the driver.
pub(crate) enum Command {
    /// Make registration `id` (already in the state) on the registry.
    Register {
        id: u64,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Remove an instance (already dropped from the state).
    Deregister {
        key: ServiceKey,
        instance_id: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Subscribe to a service (already in the state) and load its view.
    Subscribe {
        key: ServiceKey,
        reply: oneshot::Sender<()>,
    },
    /// Stop the registry pushing a service (already dropped from the state).
    Unsubscribe { key: ServiceKey },
    /// Pull a service now.
    Refresh {
        key: ServiceKey,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// The connection in use.
    Connection {
        reply: oneshot::Sender<Result<Connection, ClientError>>,
    },
    /// Deregister everything, write the disk cache and stop.
    Shutdown { reply: oneshot::Sender<()> },
}

/// Where an update came from; decides how it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Pushed on the session.
    Push,
    /// The view a (re)subscription answered: accepted at any revision.
    Reset,
    /// A full view pulled after a gap: accepted at any revision.
    Reload,
    /// A pull (periodic, confirming or asked for): it is the registry's
    /// answer, so it is applied even if it empties the service.
    Pull,
}

/// The result of applying an update to a cache.
enum Outcome {
    /// Applied (or already held); acknowledge this revision.
    Applied(u64),
    /// Held back by empty-push protection.
    Held,
    /// The service is not subscribed any more.
    Gone,
    /// It does not fit the cache: reload.
    Failed(crate::cache::CacheError),
}

/// Why a session ended.
enum Exit {
    /// The client is stopping.
    Stop,
    /// The session broke; reconnect.
    Broken(String),
}

/// The session in use.
struct Live {
    conn: Connection,
    session_id: String,
    stream: OpenStream,
    /// Acknowledgements of applied updates, sent together when due.
    acks: std::sync::Mutex<HeldAcks>,
}

impl Live {
    fn acks(&self) -> std::sync::MutexGuard<'_, HeldAcks> {
        self.acks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs until the client stops. `first` is told when the first round of
/// connection attempts is over (connected or every address failed once).
pub(crate) async fn run(
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    first: oneshot::Sender<()>,
) {
    let mut driver = Driver {
        shared,
        commands,
        first: Some(first),
        rng: fastrand::Rng::new(),
    };
    driver.run().await;
    driver.flush_disk().await;
    // Ends every subscription stream.
    driver.shared.lock().subs.clear();
    driver.shared.status.send_replace(Status::Disconnected);
}

struct Driver {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    first: Option<oneshot::Sender<()>>,
    rng: fastrand::Rng,
}

/// A call that did not get through (as opposed to one the registry
/// refused): the session must be replaced.
fn is_broken(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::Unimplemented
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::OutOfRange
    )
}

impl Driver {
    async fn run(&mut self) {
        let addresses = self.shared.config.addresses.clone();
        let mut index = 0;
        let mut attempt: u32 = 0;
        let mut failed_in_round = 0;
        let mut last_server: Option<String> = None;
        loop {
            let addr = addresses[index].clone();
            let opened = tokio::select! {
                o = self.open(&addr) => o,
                _ = self.shared.stop.cancelled() => return,
            };
            match opened {
                Ok(live) => {
                    if let Some(previous) = &last_server {
                        metrics::counter!(metric_names::RECONNECTS).increment(1);
                        if *previous != addr {
                            metrics::counter!(metric_names::FAILOVERS).increment(1);
                            tracing::info!(from = %previous, to = %addr, "failed over");
                        }
                    }
                    last_server = Some(addr.clone());
                    attempt = 0;
                    failed_in_round = 0;
                    match self.connected(live, &addr).await {
                        Exit::Stop => return,
                        Exit::Broken(reason) => {
                            tracing::warn!(server = %addr, "session lost: {reason}");
                            self.set_offline(reason);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(server = %addr, "cannot open a session: {e}");
                    self.set_offline(e.to_string());
                    attempt = attempt.saturating_add(1);
                    failed_in_round += 1;
                    if failed_in_round >= addresses.len()
                        && let Some(first) = self.first.take()
                    {
                        let _ = first.send(());
                    }
                }
            }
            index = (index + 1) % addresses.len();
            let delay = self.backoff(attempt);
            if !self.wait_offline(delay).await {
                return;
            }
        }
    }

    /// Full jitter: random in `0..min(max, base * 2^attempt)`.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let c = &self.shared.config;
        let ceiling = c
            .backoff_base
            .saturating_mul(1u32 << attempt.min(20))
            .min(c.backoff_max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX).max(1);
        Duration::from_nanos(self.rng.u64(0..nanos))
    }

    async fn open(&self, addr: &str) -> Result<Live, ClientError> {
        let c = &self.shared.config;
        let conn = Connection::connect_with(addr, c.connect_timeout, c.connect_timeout * 3).await?;
        let stream =
            tokio::time::timeout(c.connect_timeout, open_stream(conn.grpc(), &c.client_name))
                .await
                .map_err(|_| ClientError::Connect {
                    addr: addr.to_owned(),
                    reason: "no welcome from the registry".into(),
                })??;
        Ok(Live {
            conn,
            session_id: stream.session_id.clone(),
            stream,
            acks: Default::default(),
        })
    }

    fn set_offline(&self, reason: String) {
        let mut state = self.shared.lock();
        state.server = None;
        state.last_error = Some(reason);
        let status = if state.has_views() {
            Status::Degraded
        } else {
            Status::Disconnected
        };
        drop(state);
        self.shared.status.send_replace(status);
    }

    /// Waits `delay` while answering commands; false when stopping.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = self.shared.stop.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { return false };
                    if let Command::Shutdown { reply } = cmd {
                        // Written before the caller hears back.
                        self.flush_disk().await;
                        let _ = reply.send(());
                        return false;
                    }
                    self.offline_command(cmd);
                }
            }
        }
    }

    /// Answers a command with no session: it is remembered in the state
    /// and carried out on reconnect.
    fn offline_command(&mut self, cmd: Command) {
        match cmd {
            Command::Register { reply, .. } => {
                tracing::info!("no registry reachable; the registration is made on reconnect");
                let _ = reply.send(Ok(()));
            }
            Command::Deregister { reply, .. } => {
                let _ = reply.send(Ok(()));
            }
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(());
            }
            Command::Unsubscribe { .. } => {}
            Command::Refresh { reply, .. } => {
                let _ = reply.send(Err(ClientError::SessionClosed));
            }
            Command::Connection { reply } => {
                let reason = self.shared.lock().last_error.clone().unwrap_or_default();
                let _ = reply.send(Err(ClientError::Connect {
                    addr: self.shared.config.addresses.join(", "),
                    reason,
                }));
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
        }
    }

    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        match tokio::time::timeout(self.shared.config.request_timeout, fut).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "the registry did not answer in time",
            )),
        }
    }

    /// Runs one session: redo, then serve until it breaks or we stop.
    async fn connected(&mut self, mut live: Live, addr: &str) -> Exit {
        if let Err(e) = self.redo(&live).await {
            return Exit::Broken(e.message().to_owned());
        }
        {
            let mut state = self.shared.lock();
            state.server = Some(addr.to_owned());
            state.last_error = None;
        }
        self.shared.status.send_replace(Status::Connected);
        tracing::info!(server = %addr, session = %live.session_id, "session open");
        if let Some(first) = self.first.take() {
            let _ = first.send(());
        }
        let mut keepalive = tokio::time::interval(live.stream.keepalive);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let pull_every = self.shared.config.pull_interval;
        let mut pull = tokio::time::interval_at(Instant::now() + pull_every, pull_every);
        pull.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(100));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let acks_due = live.acks().due();
            let step: Result<(), tonic::Status> = tokio::select! {
                _ = self.shared.stop.cancelled() => return Exit::Stop,
                _ = tokio::time::sleep_until(acks_due.unwrap_or_else(Instant::now)), if acks_due.is_some() => {
                    let held = live.acks().take();
                    match held {
                        Some(message) => self.send_message(&live, message).await,
                        None => Ok(()),
                    }
                }
                msg = live.stream.inbound.message() => match msg {
                    Ok(Some(m)) => self.inbound(&live, m).await,
                    Ok(None) => Err(tonic::Status::unavailable("the registry closed the session")),
                    Err(s) => Err(s),
                },
                _ = keepalive.tick() => self.send(&live, v1::client_message::Kind::KeepAlive(v1::KeepAlive {})).await,
                _ = pull.tick() => self.pull_all(&live, false).await,
                _ = housekeeping.tick() => {
                    self.flush_disk().await;
                    self.pull_all(&live, true).await
                }
                cmd = self.commands.recv() => match cmd {
                    None => return Exit::Stop,
                    Some(cmd) => match self.online_command(&live, cmd).await {
                        Ok(true) => Ok(()),
                        Ok(false) => return Exit::Stop,
                        Err(s) => Err(s),
                    },
                },
            };
            if let Err(status) = step {
                return Exit::Broken(status.message().to_owned());
            }
        }
    }

    /// Makes every remembered registration and subscription on a new
    /// session. Refused registrations are logged and kept out of the way.
    async fn redo(&mut self, live: &Live) -> Result<(), tonic::Status> {
        let registrations: Vec<u64> = self.shared.lock().registrations.keys().copied().collect();
        for id in registrations {
            if let Err(s) = self.register(live, id).await {
                if is_broken(&s) {
                    return Err(s);
                }
                tracing::error!(
                    "the registry refused a registration on reconnect: {}",
                    s.message()
                );
            }
        }
        let services: Vec<ServiceKey> = self.shared.lock().subs.keys().cloned().collect();
        for key in services {
            self.subscribe(live, &key).await?;
        }
        Ok(())
    }

    async fn register(&self, live: &Live, id: u64) -> Result<(), tonic::Status> {
        let Some(r) = self.shared.lock().registrations.get(&id).cloned() else {
            return Ok(());
        };
        self.call(live.conn.grpc().register(v1::RegisterRequest {
            session_id: live.session_id.clone(),
            service: Some((&r.key).into()),
            instance: Some(v1::Instance::from_model(&r.instance)),
        }))
        .await
        .map(|_| ())
    }

    /// Subscribes on the session and applies the view it answers. Only a
    /// broken session is an error; a refusal is logged.
    async fn subscribe(&self, live: &Live, key: &ServiceKey) -> Result<(), tonic::Status> {
        let response = match self
            .call(live.conn.grpc().subscribe(v1::SubscribeRequest {
                session_id: live.session_id.clone(),
                service: Some(key.into()),
            }))
            .await
        {
            Ok(r) => r,
            Err(s) if is_broken(&s) => return Err(s),
            Err(s) => {
                tracing::error!(service = %key, "the registry refused the subscription: {}", s.message());
                return Ok(());
            }
        };
        match response.view {
            Some(view) => self.accept(live, key, view, Origin::Reset).await,
            None => Ok(()),
        }
    }

    /// Carries out a command on the session. `Ok(false)` when stopping.
    async fn online_command(&mut self, live: &Live, cmd: Command) -> Result<bool, tonic::Status> {
        match cmd {
            Command::Register { id, reply } => match self.register(live, id).await {
                Ok(()) => {
                    let _ = reply.send(Ok(()));
                }
                Err(s) if is_broken(&s) => {
                    // Kept: it is made again on the next session.
                    let _ = reply.send(Ok(()));
                    return Err(s);
                }
                Err(s) => {
                    let _ = reply.send(Err(s.into()));
                }
            },
            Command::Deregister {
                key,
                instance_id,
                reply,
            } => {
                match self.deregister(live, &key, instance_id).await {
                    Ok(_) => {
                        let _ = reply.send(Ok(()));
                    }
                    // Already gone is what was wanted.
                    Err(s) if s.code() == Code::NotFound => {
                        let _ = reply.send(Ok(()));
                    }
                    Err(s) if is_broken(&s) => {
                        // Its session is being replaced, which removes it.
                        let _ = reply.send(Ok(()));
                        return Err(s);
                    }
                    Err(s) => {
                        let _ = reply.send(Err(s.into()));
                    }
                }
            }
            Command::Subscribe { key, reply } => {
                let r = self.subscribe(live, &key).await;
                let _ = reply.send(());
                r?;
            }
            Command::Unsubscribe { key } => {
                let r = self
                    .call(live.conn.grpc().unsubscribe(v1::UnsubscribeRequest {
                        session_id: live.session_id.clone(),
                        service: Some((&key).into()),
                    }))
                    .await;
                if let Err(s) = r
                    && is_broken(&s)
                {
                    return Err(s);
                }
            }
            Command::Refresh { key, reply } => {
                let r = self.pull(live, &key).await;
                let broken = matches!(&r, Err(s) if is_broken(s));
                let _ = reply.send(r.clone().map_err(ClientError::from));
                if broken {
                    return r.map(|()| true);
                }
            }
            Command::Connection { reply } => {
                let _ = reply.send(Ok(live.conn.clone()));
            }
            Command::Shutdown { reply } => {
                self.shutdown(live).await;
                self.flush_disk().await;
                let _ = reply.send(());
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn shutdown(&mut self, live: &Live) {
        let registrations: Vec<_> = std::mem::take(&mut self.shared.lock().registrations)
            .into_values()
            .collect();
        for r in registrations {
            let _ = self.deregister(live, &r.key, r.instance.id).await;
        }
    }

    async fn deregister(
        &self,
        live: &Live,
        key: &ServiceKey,
        id: String,
    ) -> Result<v1::DeregisterResponse, tonic::Status> {
        self.call(live.conn.grpc().deregister(v1::DeregisterRequest {
            instance: Some(v1::InstanceRef {
                service: Some(key.into()),
                id,
                ..Default::default()
            }),
        }))
        .await
    }

    async fn send(&self, live: &Live, kind: v1::client_message::Kind) -> Result<(), tonic::Status> {
        self.send_message(live, v1::ClientMessage { kind: Some(kind) })
            .await
    }

    async fn send_message(
        &self,
        live: &Live,
        message: v1::ClientMessage,
    ) -> Result<(), tonic::Status> {
        live.stream
            .outgoing
            .send(message)
            .await
            .map_err(|_| tonic::Status::unavailable("the session stream is closed"))
    }

    async fn inbound(&mut self, live: &Live, msg: v1::ServerMessage) -> Result<(), tonic::Status> {
        use v1::server_message::Kind;
        match msg.kind {
            Some(Kind::Probe(p)) => {
                self.send(
                    live,
                    v1::client_message::Kind::ProbeReply(v1::ProbeReply { nonce: p.nonce }),
                )
                .await
            }
            Some(Kind::Update(bytes)) => {
                let update = match v1::ServiceUpdate::decode(bytes) {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!("undecodable push: {e}");
                        return Ok(());
                    }
                };
                let key = match roster_proto::convert::required_key(update.service.as_ref()) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!("push for a malformed service key: {e}");
                        return Ok(());
                    }
                };
                {
                    let mut state = self.shared.lock();
                    let news = state
                        .subs
                        .get(&key)
                        .is_some_and(|s| update.revision > s.cache.revision);
                    if news && state.skip_pushes > 0 {
                        state.skip_pushes -= 1;
                        return Ok(());
                    }
                }
                self.accept(live, &key, update, Origin::Push).await
            }
            // The driver makes its calls as unary RPCs, so no reply is due.
            Some(Kind::Reply(_)) | Some(Kind::Welcome(_)) | None => Ok(()),
        }
    }

    /// Applies an update; reloads the full view when it does not fit, and
    /// holds an acknowledgement of what was applied (sent when due).
    async fn accept(
        &self,
        live: &Live,
        key: &ServiceKey,
        update: v1::ServiceUpdate,
        origin: Origin,
    ) -> Result<(), tonic::Status> {
        let revision = match self.apply(key, &update, origin) {
            Outcome::Applied(r) => r,
            Outcome::Held | Outcome::Gone => return Ok(()),
            Outcome::Failed(e) => {
                tracing::warn!(service = %key, "{e}; reloading the full view");
                metrics::counter!(metric_names::FULL_RELOADS).increment(1);
                let pulled = self.pull_request(live, key, 0, 0).await?;
                let Some(full) = pulled.update else {
                    return Ok(());
                };
                match self.apply(key, &full, Origin::Reload) {
                    Outcome::Applied(r) => r,
                    Outcome::Failed(e) => {
                        tracing::error!(service = %key, "the reloaded full view does not verify: {e}");
                        return Ok(());
                    }
                    Outcome::Held | Outcome::Gone => return Ok(()),
                }
            }
        };
        live.acks().hold(key, revision);
        Ok(())
    }

    /// The cache side of [`Self::accept`]: protection, apply, events.
    fn apply(&self, key: &ServiceKey, update: &v1::ServiceUpdate, origin: Origin) -> Outcome {
        let protect = self.shared.config.empty_push_protection;
        let mut state = self.shared.lock();
        let Some(sub) = state.subs.get_mut(key) else {
            return Outcome::Gone;
        };
        if matches!(origin, Origin::Reset | Origin::Reload) {
            // A full view from a new session or a reload: diffed against
            // what is held, but accepted at any revision. Until it is
            // applied, every delta is a gap.
            sub.cache.expect_reset();
        }
        if protect && origin != Origin::Pull && sub.cache.would_empty(update) {
            if sub.held_since.is_none() {
                sub.held_since = Some(Instant::now());
                metrics::counter!(metric_names::EMPTY_PUSHES_HELD).increment(1);
                tracing::warn!(
                    service = %key,
                    instances = sub.cache.len(),
                    revision = update.revision,
                    "holding back an update that would remove every instance until a pull confirms it"
                );
            }
            return Outcome::Held;
        }
        // The cache is unchanged when this fails.
        let applied = match sub.cache.apply(update) {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(e),
        };
        if applied.is_empty() {
            // At or below the revision held: nothing to do.
            return Outcome::Applied(sub.cache.revision);
        }
        if origin == Origin::Push {
            metrics::counter!(metric_names::PUSHES_APPLIED).increment(1);
        }
        sub.held_since = None;
        sub.loaded = true;
        sub.disk_dirty = true;
        let revision = sub.cache.revision;
        let event = |change| Update {
            service: key.clone(),
            revision,
            change,
        };
        if applied.reset {
            let _ = sub.events.send(event(Change::Reset(
                sub.cache.instances().cloned().collect(),
            )));
        } else {
            for id in applied.removed {
                let _ = sub.events.send(event(Change::Removed(id)));
            }
            for i in applied.added {
                let _ = sub.events.send(event(Change::Added(i)));
            }
            for i in applied.changed {
                let _ = sub.events.send(event(Change::Changed(i)));
            }
        }
        Outcome::Applied(revision)
    }

    async fn pull_request(
        &self,
        live: &Live,
        key: &ServiceKey,
        revision: u64,
        checksum: u64,
    ) -> Result<v1::PullResponse, tonic::Status> {
        self.call(live.conn.grpc().pull(v1::PullRequest {
            service: Some(key.into()),
            since_revision: revision,
            since_checksum: checksum,
        }))
        .await
    }

    /// Pulls one service and applies the answer.
    async fn pull(&self, live: &Live, key: &ServiceKey) -> Result<(), tonic::Status> {
        let Some((revision, checksum)) = self
            .shared
            .lock()
            .subs
            .get(key)
            .map(|s| (s.cache.revision, s.cache.checksum))
        else {
            return Ok(());
        };
        let answer = self.pull_request(live, key, revision, checksum).await?;
        if answer.not_modified {
            // Same revision, or the same instances (by checksum) at another
            // one: what is held is right.
            if let Some(sub) = self.shared.lock().subs.get_mut(key)
                && sub.cache.checksum == answer.checksum
            {
                sub.held_since = None;
                sub.cache.confirm(answer.revision);
            }
            return Ok(());
        }
        match answer.update {
            Some(update) => self.accept(live, key, update, Origin::Pull).await,
            None => Ok(()),
        }
    }

    /// Pulls every subscribed service, or with `held_only` those holding
    /// back an emptying update for longer than the confirm delay.
    async fn pull_all(&self, live: &Live, held_only: bool) -> Result<(), tonic::Status> {
        let confirm = self.shared.config.empty_confirm_delay;
        let now = Instant::now();
        let keys: Vec<ServiceKey> = self
            .shared
            .lock()
            .subs
            .iter()
            .filter(|(_, s)| {
                !held_only
                    || s.held_since
                        .is_some_and(|t| now.duration_since(t) >= confirm)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.pull(live, &key).await?;
        }
        Ok(())
    }

    /// Writes changed views to the disk cache, off the async threads.
    async fn flush_disk(&self) {
        let Some(disk) = self.shared.disk.clone() else {
            return;
        };
        let dirty: Vec<(ServiceKey, ServiceCache)> = self
            .shared
            .lock()
            .subs
            .iter_mut()
            .filter(|(_, s)| s.disk_dirty)
            .map(|(k, s)| {
                s.disk_dirty = false;
                (k.clone(), s.cache.clone())
            })
            .collect();
        if dirty.is_empty() {
            return;
        }
        let written = tokio::task::spawn_blocking(move || {
            for (key, cache) in dirty {
                if let Err(e) = disk.store(&key, &cache) {
                    tracing::warn!(service = %key, "cannot write the disk cache: {e}");
                }
            }
        })
        .await;
        if let Err(e) = written {
            tracing::warn!("disk cache writer failed: {e}");
        }
    }
}
