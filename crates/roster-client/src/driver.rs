//! The client's background task: the only code that talks to the registry.
//! It holds one session (a raw [`Session`], whose own task sends keep-alives
//! and answers probes whatever the driver is doing), makes every call on the
//! session stream, redoes registrations and subscriptions on every new
//! session, applies pushes and pulls to the caches (with empty-push
//! protection, full reloads on gaps, and reloads by checksum when the node
//! epoch changed), writes the disk cache, and reconnects with jittered
//! back-off, moving to the next address on failure.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use roster_core::ServiceKey;
use roster_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::Code;

use crate::cache::ServiceCache;
use crate::raw::{Connection, Session};
use crate::state::{Change, Command, Shared, Status, Update};
use crate::{ClientError, metric_names};

/// Pulls in flight at once when every subscribed service is pulled.
const PULLS_IN_FLIGHT: usize = 32;

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
    session: Session,
}

impl Live {
    fn epoch(&self) -> Option<&v1::NodeEpoch> {
        self.session.epoch()
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
            | Code::NotFound
    )
}

/// A session call's error as a status (a closed session is unavailable).
fn as_status(e: ClientError) -> tonic::Status {
    match e {
        ClientError::Status(s) => s,
        ClientError::SessionClosed => tonic::Status::unavailable("the session has ended"),
        other => tonic::Status::unavailable(other.to_string()),
    }
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
                    // A `Connect` error names the address; the reason is
                    // what is kept (it is shown with the addresses).
                    self.set_offline(match e {
                        ClientError::Connect { reason, .. } => reason,
                        other => other.to_string(),
                    });
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
        let session = tokio::time::timeout(
            c.connect_timeout,
            Session::open(conn.grpc(), &c.client_name),
        )
        .await
        .map_err(|_| ClientError::Connect {
            addr: addr.to_owned(),
            reason: "no welcome from the registry".into(),
        })??;
        Ok(Live { conn, session })
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
                // Not made again on reconnect; the registry removes it when
                // the session it belongs to expires.
                let reason = self.shared.lock().last_error.clone().unwrap_or_default();
                let _ = reply.send(Err(ClientError::Connect {
                    addr: self.shared.config.addresses.join(", "),
                    reason,
                }));
            }
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(());
            }
            Command::Drain { reply, .. } => {
                let _ = reply.send(Err(ClientError::SessionClosed));
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

    /// A session call, bounded by the request timeout.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, tonic::Status> {
        match tokio::time::timeout(self.shared.config.request_timeout, fut).await {
            Ok(r) => r.map_err(as_status),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "the registry did not answer in time",
            )),
        }
    }

    /// Runs one session: redo, then serve until it breaks or we stop.
    async fn connected(&mut self, mut live: Live, addr: &str) -> Exit {
        // The session's pushed updates, read beside its calls.
        let mut updates = live.session.detach_updates();
        if let Err(e) = self.redo(&live).await {
            return Exit::Broken(e.message().to_owned());
        }
        {
            let mut state = self.shared.lock();
            state.server = Some(addr.to_owned());
            state.last_error = None;
        }
        self.shared.status.send_replace(Status::Connected);
        tracing::info!(server = %addr, session = %live.session.id(), "session open");
        if let Some(first) = self.first.take() {
            let _ = first.send(());
        }
        let pull_every = self.shared.config.pull_interval;
        let mut pull = tokio::time::interval_at(Instant::now() + pull_every, pull_every);
        pull.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(100));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // When pushes were dropped for falling behind, everything is pulled,
        // at most this often (pulling also takes time from reading).
        let catch_up_every = Duration::from_secs(1);
        let mut caught_up = Instant::now() - catch_up_every;
        loop {
            let step: Result<(), tonic::Status> = tokio::select! {
                _ = self.shared.stop.cancelled() => return Exit::Stop,
                msg = updates.recv() => match msg {
                    Some(Ok(update)) => self.pushed(&live, update).await,
                    Some(Err(e)) => Err(as_status(e)),
                    None => Err(tonic::Status::unavailable("the registry closed the session")),
                },
                _ = pull.tick() => self.pull_all(&live, false).await,
                _ = housekeeping.tick() => {
                    self.flush_disk().await;
                    if caught_up.elapsed() >= catch_up_every && live.session.missed_updates() {
                        // Pushes were dropped while we were busy: pull.
                        caught_up = Instant::now();
                        self.pull_all(&live, false).await
                    } else {
                        self.pull_all(&live, true).await
                    }
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
        self.call(live.session.register(&r.key, &r.instance))
            .await
            .map(|_| ())
    }

    /// Subscribes on the session and applies the view it answers. Only a
    /// broken session is an error; a refusal is logged.
    async fn subscribe(&self, live: &Live, key: &ServiceKey) -> Result<(), tonic::Status> {
        let view = match self.call(live.session.subscribe(key)).await {
            Ok(r) => r,
            Err(s) if is_broken(&s) => return Err(s),
            Err(s) => {
                tracing::error!(service = %key, "the registry refused the subscription: {}", s.message());
                return Ok(());
            }
        };
        self.accept(live, key, view, Origin::Reset).await
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
                        // Its session is being replaced: the registry
                        // removes it when that session expires.
                        let _ = reply.send(Err(ClientError::SessionClosed));
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
            Command::Drain {
                key,
                instance_id,
                remove,
                timeout,
                reply,
            } => {
                let instance = v1::InstanceRef {
                    service: Some((&key).into()),
                    id: instance_id,
                    ..Default::default()
                };
                // Waited for in a task of its own: the driver goes on
                // applying (and acknowledging) pushes meanwhile, its own
                // subscription to the drained service included. Bounded by
                // the drain's timeout, not the request's.
                let call = live.session.drain_call(instance, remove, timeout);
                let limit = timeout + self.shared.config.request_timeout;
                tokio::spawn(async move {
                    let r = tokio::time::timeout(limit, call).await.unwrap_or(Err(
                        ClientError::Status(tonic::Status::deadline_exceeded(
                            "the registry did not answer the drain in time",
                        )),
                    ));
                    let _ = reply.send(r);
                });
            }
            Command::Unsubscribe { key } => {
                let r = self.call(live.session.unsubscribe(&key)).await;
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
    ) -> Result<u64, tonic::Status> {
        self.call(live.session.deregister(v1::InstanceRef {
            service: Some(key.into()),
            id,
            ..Default::default()
        }))
        .await
    }

    /// A pushed update: applied to its cache (a test may drop it first).
    async fn pushed(&self, live: &Live, update: v1::ServiceUpdate) -> Result<(), tonic::Status> {
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
                match self.reload(live, key).await? {
                    Outcome::Applied(r) => r,
                    Outcome::Failed(_) | Outcome::Held | Outcome::Gone => return Ok(()),
                }
            }
        };
        // Resolves when sent; the session's task sends it in due time.
        drop(live.session.ack(key, revision));
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
        // A pull or a reload is the registry's answer to a question: it is
        // what the registry holds, so it is applied even if it empties the
        // service. Only pushes and resets wait for such a confirmation.
        let confirmed = matches!(origin, Origin::Pull | Origin::Reload);
        if protect && !confirmed && sub.cache.would_empty(update) {
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
        self.call(live.session.pull(key, revision, checksum)).await
    }

    /// What to ask when pulling `key`: the revision held (when it is of
    /// this session's node epoch; revisions of another epoch mean nothing
    /// here) and the checksum held.
    fn pull_base(&self, live: &Live, key: &ServiceKey) -> Option<(u64, u64)> {
        let state = self.shared.lock();
        let cache = &state.subs.get(key)?.cache;
        let revision = if cache.same_epoch(live.epoch()) {
            cache.revision
        } else {
            0
        };
        Some((revision, cache.checksum))
    }

    /// Applies a pull's answer for `key`.
    async fn pulled(
        &self,
        live: &Live,
        key: &ServiceKey,
        answer: v1::PullResponse,
    ) -> Result<(), tonic::Status> {
        if answer.not_modified {
            let confirmed = match self.shared.lock().subs.get_mut(key) {
                // The same instances (by checksum) at the registry's
                // revision: what is held is right, and now of its epoch.
                Some(sub) if sub.cache.checksum == answer.checksum => {
                    sub.held_since = None;
                    sub.cache.confirm(answer.revision, answer.epoch.as_ref());
                    true
                }
                Some(_) => false,
                None => true,
            };
            if confirmed {
                return Ok(());
            }
            // Not modified by revision, yet the checksums differ: the
            // revision held is another node life's. Reload.
            metrics::counter!(metric_names::FULL_RELOADS).increment(1);
            return self.reload(live, key).await.map(drop);
        }
        match answer.update {
            Some(update) => self.accept(live, key, update, Origin::Pull).await,
            None => Ok(()),
        }
    }

    /// Replaces a service's cache by the registry's full view.
    async fn reload(&self, live: &Live, key: &ServiceKey) -> Result<Outcome, tonic::Status> {
        let pulled = self.pull_request(live, key, 0, 0).await?;
        // No update: nothing was ever registered there on this node, so
        // the view is empty.
        let full = pulled.update.unwrap_or_else(|| v1::ServiceUpdate {
            service: Some(key.into()),
            revision: pulled.revision,
            checksum: 0,
            kind: Some(v1::service_update::Kind::Full(v1::FullView::default())),
            epoch: pulled.epoch.clone(),
        });
        let outcome = self.apply(key, &full, Origin::Reload);
        if let Outcome::Failed(e) = &outcome {
            tracing::error!(service = %key, "the reloaded full view does not verify: {e}");
        }
        Ok(outcome)
    }

    /// Pulls one service and applies the answer.
    async fn pull(&self, live: &Live, key: &ServiceKey) -> Result<(), tonic::Status> {
        let Some((revision, checksum)) = self.pull_base(live, key) else {
            return Ok(());
        };
        let answer = self.pull_request(live, key, revision, checksum).await?;
        self.pulled(live, key, answer).await
    }

    /// Pulls every subscribed service, or with `held_only` those holding
    /// back an emptying update for longer than the confirm delay. The pulls
    /// are pipelined on the session; the session's own task keeps it alive
    /// meanwhile.
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
        if keys.is_empty() {
            return Ok(());
        }
        let answers: Vec<(ServiceKey, Result<v1::PullResponse, tonic::Status>)> =
            futures_util::stream::iter(keys)
                .map(|key| async move {
                    let (revision, checksum) = self.pull_base(live, &key)?;
                    let answer = self.pull_request(live, &key, revision, checksum).await;
                    Some((key, answer))
                })
                .buffer_unordered(PULLS_IN_FLIGHT)
                .filter_map(|answer| async move { answer })
                .collect()
                .await;
        for (key, answer) in answers {
            match answer {
                Ok(answer) => self.pulled(live, &key, answer).await?,
                Err(s) if is_broken(&s) => return Err(s),
                Err(s) => tracing::warn!(service = %key, "pull refused: {}", s.message()),
            }
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
