//! Drain: set an instance's weight to 0 (or remove it) and wait until every
//! subscriber of the service at the drained revision (and any that
//! subscribed since) has applied it. The answer tells apart who
//! acknowledged, who is still pending, who left without acknowledging,
//! and which readers cannot acknowledge at all (HTTP pollers).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use roster_core::{RegistryError, ServiceKey, SessionId};
use tokio::time::Instant;

use super::Node;

/// A drain's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The revision carrying the drain.
    pub revision: u64,
    /// Subscribers that acknowledged it ("client-name (session)").
    pub acknowledged: Vec<String>,
    /// Subscribers that did not in time.
    pub pending: Vec<String>,
    /// Subscribers whose session ended (or that unsubscribed) before
    /// acknowledging.
    pub gone: Vec<String>,
    /// Recent readers that cannot acknowledge (HTTP pollers).
    pub unconfirmable: Vec<String>,
}

/// How long a poller counts as a reader of a service after its last poll.
const POLLER_WINDOW: Duration = Duration::from_secs(30);
/// Pollers remembered per service.
const POLLERS_PER_SERVICE: usize = 64;

/// Recent readers of each service that hold no session (HTTP pollers).
#[derive(Debug, Default)]
pub struct Pollers {
    by_service: HashMap<ServiceKey, VecDeque<(String, Instant)>>,
}

impl Pollers {
    /// Forgets pollers not seen within the window.
    fn prune(&mut self, now: Instant) {
        self.by_service.retain(|_, recent| {
            recent.retain(|(_, at)| now.duration_since(*at) < POLLER_WINDOW);
            !recent.is_empty()
        });
    }

    fn note(&mut self, key: &ServiceKey, who: String, now: Instant) {
        let recent = self.by_service.entry(key.clone()).or_default();
        recent.retain(|(w, at)| *w != who && now.duration_since(*at) < POLLER_WINDOW);
        if recent.len() == POLLERS_PER_SERVICE {
            recent.pop_front();
        }
        recent.push_back((who, now));
    }

    fn recent(&mut self, key: &ServiceKey, now: Instant) -> Vec<String> {
        let Some(recent) = self.by_service.get_mut(key) else {
            return Vec::new();
        };
        recent.retain(|(_, at)| now.duration_since(*at) < POLLER_WINDOW);
        let out = recent.iter().map(|(w, _)| w.clone()).collect();
        if recent.is_empty() {
            self.by_service.remove(key);
        }
        out
    }
}

impl Node {
    /// Notes that `who` read `key` without a session that could
    /// acknowledge (an HTTP poll). Only services with a view are noted, so
    /// what is kept is bounded by the services and [`POLLERS_PER_SERVICE`].
    pub fn note_poller(&self, key: &ServiceKey, who: String) {
        if self.view(key).is_some() {
            self.pollers.lock().note(key, who, Instant::now());
        }
    }

    /// Forgets pollers not seen lately (the sweep calls it).
    pub fn prune_pollers(&self) {
        self.pollers.lock().prune(Instant::now());
    }

    /// Sets an instance of `session` to weight 0 (or removes it) and waits
    /// until every subscriber of the service has acknowledged that change,
    /// has left, or `timeout` passed.
    pub async fn drain(
        &self,
        session: &str,
        key: &ServiceKey,
        id: &str,
        remove: bool,
        timeout: Duration,
    ) -> Result<DrainOutcome, RegistryError> {
        let deadline = Instant::now() + timeout;
        // The write and the list of subscribers it must reach are taken in
        // one step: nobody can subscribe between them unseen.
        let (change, present) = self.write(
            |core, now| {
                let change = if remove {
                    core.deregister(session, key, id, now)?
                } else {
                    core.modify(session, key, id, |i| i.weight = 0.0, now)?
                };
                let present: Vec<SessionId> = self
                    .subs
                    .lock()
                    .subscribers(key)
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
                Ok((change, present))
            },
            |(c, _)| vec![c.clone()],
        )?;
        let revision = change.revision;
        // Each waited session's label, taken while it is there to ask.
        let mut labels: HashMap<SessionId, String> = HashMap::new();
        let mut label = |s: &SessionId| {
            labels
                .entry(s.clone())
                .or_insert_with(|| {
                    let name = self.link(s).map(|l| l.client_name.clone());
                    format!("{} ({s})", name.unwrap_or_default())
                })
                .clone()
        };
        let mut waited: Vec<SessionId> = present;
        for s in &waited {
            label(s);
        }
        let mut seen: HashSet<SessionId> = waited.iter().cloned().collect();
        loop {
            let acked = self.acks.notified();
            let now_subscribed: HashMap<SessionId, u64> = self
                .subs
                .lock()
                .subscribers(key)
                .into_iter()
                .map(|(s, st)| (s, st.acked))
                .collect();
            // Those who subscribed since were sent a view at or after the
            // drain: they are waited for too.
            for s in now_subscribed.keys() {
                if seen.insert(s.clone()) {
                    label(s);
                    waited.push(s.clone());
                }
            }
            let (mut acknowledged, mut pending, mut gone) = (Vec::new(), Vec::new(), Vec::new());
            for s in &waited {
                match now_subscribed.get(s) {
                    Some(acked) if *acked >= revision => acknowledged.push(s.clone()),
                    Some(_) => pending.push(s.clone()),
                    None => gone.push(s.clone()),
                }
            }
            if pending.is_empty() || Instant::now() >= deadline {
                let unconfirmable = self.pollers.lock().recent(key, Instant::now());
                return Ok(DrainOutcome {
                    revision,
                    acknowledged: acknowledged.iter().map(&mut label).collect(),
                    pending: pending.iter().map(&mut label).collect(),
                    gone: gone.iter().map(&mut label).collect(),
                    unconfirmable,
                });
            }
            tokio::select! {
                _ = acked => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}
