//! The session table: who is connected, when each session was last heard
//! from, and which records each owns. The sweep decides, from the time it is
//! given, which idle sessions to probe and which to expire; it sends nothing
//! and removes no records itself (the registry does, from its verdicts).

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{ServiceKey, SessionId};

/// How a session proves it is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A bidirectional stream: idle ones are probed, and expired if silent.
    Stream,
    /// A lease renewed by heartbeats (HTTP clients): it cannot be probed, so
    /// an idle one is expired once the probe timeout has also passed.
    Lease,
    /// Held open by the module that opened it, which decides the liveness
    /// of each of its records itself (Nacos HTTP heartbeats): the sweep
    /// never probes or expires it.
    Held,
}

/// Intervals of the session sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// A session silent this long is probed.
    pub keepalive: Duration,
    /// A probed session silent this much longer is expired.
    pub probe_timeout: Duration,
}

impl Default for SessionTimeouts {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(20),
            probe_timeout: Duration::from_secs(3),
        }
    }
}

/// One session.
#[derive(Debug)]
pub struct Session {
    /// Its id, given out by the registry.
    pub id: SessionId,
    /// Stream or lease.
    pub kind: SessionKind,
    /// What the client called itself, shown to operators.
    pub client_name: String,
    /// Last time anything was heard from it.
    pub last_active: Instant,
    /// An outstanding probe: its nonce and when it expires unanswered.
    pub probe: Option<(u64, Instant)>,
    /// The records it owns (service, instance id).
    pub owned: HashSet<(Arc<ServiceKey>, Arc<str>)>,
}

/// What the sweep decided about one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepVerdict {
    /// Send a probe with this nonce; expire unless answered in time.
    Probe(SessionId, u64),
    /// Silent past its deadline: remove it and its records.
    Expire(SessionId),
}

/// All sessions of this node.
#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<SessionId, Session>,
    timeouts: SessionTimeouts,
    next_nonce: u64,
}

impl SessionTable {
    /// An empty table with these timeouts.
    pub fn new(timeouts: SessionTimeouts) -> Self {
        Self {
            sessions: HashMap::default(),
            timeouts,
            next_nonce: 0,
        }
    }

    /// The sweep's timeouts.
    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts
    }

    /// Adds a session.
    pub fn insert(&mut self, id: SessionId, kind: SessionKind, client_name: String, now: Instant) {
        self.sessions.insert(
            id.clone(),
            Session {
                id,
                kind,
                client_name,
                last_active: now,
                probe: None,
                owned: HashSet::default(),
            },
        );
    }

    /// Removes a session, returning it (with the records it owned).
    pub fn remove(&mut self, id: &str) -> Option<Session> {
        self.sessions.remove(id)
    }

    /// A session by id.
    pub fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// A session by id, for changing what it owns.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Session> {
        self.sessions.get_mut(id)
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Records activity: the session is alive and any probe is answered.
    /// Returns false for an unknown session.
    pub fn touch(&mut self, id: &str, now: Instant) -> bool {
        match self.sessions.get_mut(id) {
            Some(s) => {
                s.last_active = now;
                s.probe = None;
                true
            }
            None => false,
        }
    }

    /// Decides which sessions to probe and which to expire at `now`.
    /// Probing is recorded here; expiring is left to the caller, which
    /// removes the session and its records.
    pub fn sweep(&mut self, now: Instant) -> Vec<SweepVerdict> {
        let mut verdicts = Vec::new();
        for s in self.sessions.values_mut() {
            if s.kind == SessionKind::Held {
                continue;
            }
            match s.probe {
                Some((_, deadline)) if now >= deadline => {
                    verdicts.push(SweepVerdict::Expire(s.id.clone()));
                }
                Some(_) => {}
                None if now.saturating_duration_since(s.last_active) >= self.timeouts.keepalive => {
                    self.next_nonce += 1;
                    let nonce = self.next_nonce;
                    s.probe = Some((nonce, now + self.timeouts.probe_timeout));
                    if s.kind == SessionKind::Stream {
                        verdicts.push(SweepVerdict::Probe(s.id.clone(), nonce));
                    }
                }
                None => {}
            }
        }
        verdicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_stream_session_is_probed_then_expired_unless_it_answers() {
        let t0 = Instant::now();
        let mut table = SessionTable::new(SessionTimeouts::default());
        table.insert("a".into(), SessionKind::Stream, String::new(), t0);
        table.insert("b".into(), SessionKind::Stream, String::new(), t0);
        assert!(table.sweep(t0 + Duration::from_secs(19)).is_empty());
        let v = table.sweep(t0 + Duration::from_secs(20));
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|v| matches!(v, SweepVerdict::Probe(..))));
        // "a" answers, "b" stays silent.
        table.touch("a", t0 + Duration::from_secs(21));
        assert!(table.sweep(t0 + Duration::from_secs(22)).is_empty());
        let v = table.sweep(t0 + Duration::from_secs(23));
        assert_eq!(v, vec![SweepVerdict::Expire("b".into())]);
    }

    #[test]
    fn lease_session_expires_without_a_probe_message() {
        let t0 = Instant::now();
        let mut table = SessionTable::new(SessionTimeouts::default());
        table.insert("l".into(), SessionKind::Lease, String::new(), t0);
        assert!(table.sweep(t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(
            table.sweep(t0 + Duration::from_secs(23)),
            vec![SweepVerdict::Expire("l".into())]
        );
    }

    #[test]
    fn held_session_is_never_probed_or_expired() {
        let t0 = Instant::now();
        let mut table = SessionTable::new(SessionTimeouts::default());
        table.insert("h".into(), SessionKind::Held, String::new(), t0);
        assert!(table.sweep(t0 + Duration::from_secs(3600)).is_empty());
        assert!(table.get("h").unwrap().probe.is_none());
    }
}
