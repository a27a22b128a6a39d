//! The liveness of this node's own sessions: who is connected, when each
//! was last heard from, and the deadlines that follow. It decides from the
//! time it is given which sessions to probe, expire, or (for beat leases)
//! mark unhealthy; it holds no records and changes none (the registry acts
//! on its verdicts under the same lock).

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::time::{Duration, Instant};

use crate::model::{OwnerRef, SessionId};

/// How a session proves it is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A bidirectional stream: idle ones are probed, and expired if silent.
    Stream,
    /// A lease renewed by heartbeats (native HTTP clients): it cannot be
    /// probed, so an idle one is expired once the probe timeout has also
    /// passed.
    Lease,
    /// A Nacos v1 heartbeat lease of one instance: silent past
    /// `unhealthy_after` its instance turns unhealthy, past `delete_after`
    /// the lease ends (and its instance with it).
    Beat {
        /// Silence after which the instance is marked unhealthy.
        unhealthy_after: Duration,
        /// Silence after which the lease ends.
        delete_after: Duration,
    },
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

/// One session of this node.
#[derive(Debug)]
pub struct Session {
    /// Who owns its data (this node and the session id).
    pub owner: OwnerRef,
    /// Stream, lease or beat lease.
    pub kind: SessionKind,
    /// What the client called itself, shown to operators.
    pub client_name: String,
    /// A secret the client proves it holds the session with, when it calls
    /// from elsewhere than the session's own connection.
    pub token: u128,
    /// Last time anything was heard from it.
    pub last_active: Instant,
    /// An outstanding probe: its nonce and when it expires unanswered.
    pub probe: Option<(u64, Instant)>,
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.owner.session
    }
}

/// What the sweep decided about one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepVerdict {
    /// Send a probe with this nonce; expire unless answered in time.
    Probe(SessionId, u64),
    /// Silent past its deadline: remove it and its records.
    Expire(SessionId),
}

/// What a beat check decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BeatVerdicts {
    /// Beat leases silent past their unhealthy deadline (not yet past the
    /// delete deadline).
    pub unhealthy: Vec<SessionId>,
    /// Beat leases silent past their delete deadline.
    pub expired: Vec<SessionId>,
}

/// All sessions of this node.
#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<SessionId, Session>,
    /// The beat leases among them, so the beat check scans only those.
    beats: HashSet<SessionId>,
    timeouts: SessionTimeouts,
    next_nonce: u64,
}

impl SessionTable {
    /// An empty table with these timeouts.
    pub fn new(timeouts: SessionTimeouts) -> Self {
        Self {
            timeouts,
            ..Self::default()
        }
    }

    /// The sweep's timeouts.
    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts
    }

    /// Adds a session.
    pub fn insert(
        &mut self,
        owner: OwnerRef,
        kind: SessionKind,
        client_name: String,
        token: u128,
        now: Instant,
    ) {
        let id = owner.session.clone();
        if matches!(kind, SessionKind::Beat { .. }) {
            self.beats.insert(id.clone());
        }
        self.sessions.insert(
            id,
            Session {
                owner,
                kind,
                client_name,
                token,
                last_active: now,
                probe: None,
            },
        );
    }

    /// Removes a session, returning it.
    pub fn remove(&mut self, id: &str) -> Option<Session> {
        self.beats.remove(id);
        self.sessions.remove(id)
    }

    /// A session by id.
    pub fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// A session by id, to change its state.
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

    /// Records activity: the session is alive, any probe is answered, and
    /// a beat lease's deadlines count from now.
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

    /// Decides which stream and lease sessions to probe and which to
    /// expire at `now`. Probing is recorded here; expiring is left to the
    /// caller, which removes the session and its records.
    pub fn sweep(&mut self, now: Instant) -> Vec<SweepVerdict> {
        let mut verdicts = Vec::new();
        for s in self.sessions.values_mut() {
            if matches!(s.kind, SessionKind::Beat { .. }) {
                continue;
            }
            match s.probe {
                Some((_, deadline)) if now >= deadline => {
                    verdicts.push(SweepVerdict::Expire(s.id().clone()));
                }
                Some(_) => {}
                None if now.saturating_duration_since(s.last_active) >= self.timeouts.keepalive => {
                    self.next_nonce += 1;
                    let nonce = self.next_nonce;
                    s.probe = Some((nonce, now + self.timeouts.probe_timeout));
                    if s.kind == SessionKind::Stream {
                        verdicts.push(SweepVerdict::Probe(s.id().clone(), nonce));
                    }
                }
                None => {}
            }
        }
        verdicts
    }

    /// Decides which beat leases are silent past their unhealthy deadline
    /// and which past their delete deadline at `now`. (Marking an instance
    /// unhealthy is the registry's, and does nothing to one that already
    /// is, so a lease may be listed at every check while it stays silent.)
    pub fn check_beats(&self, now: Instant) -> BeatVerdicts {
        let mut out = BeatVerdicts::default();
        for id in &self.beats {
            let Some(s) = self.sessions.get(id) else {
                continue;
            };
            let SessionKind::Beat {
                unhealthy_after,
                delete_after,
            } = s.kind
            else {
                continue;
            };
            let silent = now.saturating_duration_since(s.last_active);
            if silent >= delete_after {
                out.expired.push(id.clone());
            } else if silent >= unhealthy_after {
                out.unhealthy.push(id.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Owner;
    use std::sync::Arc;

    fn add(table: &mut SessionTable, id: &str, kind: SessionKind, now: Instant) {
        let owner = Arc::new(Owner {
            origin: "n".into(),
            session: id.into(),
        });
        table.insert(owner, kind, String::new(), 0, now);
    }

    #[test]
    fn idle_stream_session_is_probed_then_expired_unless_it_answers() {
        let t0 = Instant::now();
        let mut table = SessionTable::new(SessionTimeouts::default());
        add(&mut table, "a", SessionKind::Stream, t0);
        add(&mut table, "b", SessionKind::Stream, t0);
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
        add(&mut table, "l", SessionKind::Lease, t0);
        assert!(table.sweep(t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(
            table.sweep(t0 + Duration::from_secs(23)),
            vec![SweepVerdict::Expire("l".into())]
        );
    }

    #[test]
    fn a_silent_beat_lease_is_unhealthy_then_ends_and_the_sweep_leaves_it_alone() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut table = SessionTable::new(SessionTimeouts::default());
        let kind = SessionKind::Beat {
            unhealthy_after: s(15),
            delete_after: s(30),
        };
        add(&mut table, "a", kind, t0);
        add(&mut table, "b", kind, t0);
        assert_eq!(table.check_beats(t0 + s(14)), BeatVerdicts::default());
        table.touch("b", t0 + s(14));
        let v = table.check_beats(t0 + s(15));
        assert_eq!(v.unhealthy, vec![SessionId::from("a")]);
        assert_eq!(
            table.check_beats(t0 + s(30)).expired,
            vec![SessionId::from("a")]
        );
        table.touch("b", t0 + s(31));
        assert!(table.check_beats(t0 + s(32)).unhealthy.is_empty(), "beaten");
        assert!(table.sweep(t0 + s(3600)).is_empty(), "never probed");
    }
}
