//! Nacos v1 heartbeat deadlines of HTTP-registered instances: when each was
//! last beaten, and which are due to turn unhealthy or to be removed. It
//! decides from the time it is given and changes no registry state itself.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use roster_core::ServiceKey;

/// Metadata key overriding the unhealthy deadline (milliseconds).
pub const BEAT_TIMEOUT_KEY: &str = "preserved.heart.beat.timeout";
/// Metadata key overriding the removal deadline (milliseconds).
pub const DELETE_TIMEOUT_KEY: &str = "preserved.ip.delete.timeout";

/// One instance's heartbeat state.
#[derive(Debug, Clone, Copy)]
struct Beat {
    last: Instant,
    unhealthy_after: Duration,
    delete_after: Duration,
    unhealthy: bool,
}

/// What a check decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// Silent past the beat timeout: mark unhealthy.
    pub unhealthy: Vec<(ServiceKey, String)>,
    /// Silent past the delete timeout: remove.
    pub expired: Vec<(ServiceKey, String)>,
}

/// Deadlines of every heartbeat-driven instance.
#[derive(Debug)]
pub struct Beats {
    beats: HashMap<(ServiceKey, String), Beat>,
    beat_timeout: Duration,
    delete_timeout: Duration,
}

impl Beats {
    /// An empty table with these default deadlines.
    pub fn new(beat_timeout: Duration, delete_timeout: Duration) -> Self {
        Self {
            beats: HashMap::new(),
            beat_timeout,
            delete_timeout,
        }
    }

    /// Records a beat (or a registration) at `now`, with the deadlines the
    /// instance's metadata asks for. Returns true if the instance had been
    /// marked unhealthy and should be healthy again.
    pub fn beat(
        &mut self,
        key: &ServiceKey,
        id: &str,
        metadata: &roster_core::Metadata,
        now: Instant,
    ) -> bool {
        let millis = |k: &str| {
            metadata
                .get(k)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
        };
        let unhealthy_after = millis(BEAT_TIMEOUT_KEY).unwrap_or(self.beat_timeout);
        let delete_after = millis(DELETE_TIMEOUT_KEY)
            .unwrap_or(self.delete_timeout)
            .max(unhealthy_after);
        let entry = Beat {
            last: now,
            unhealthy_after,
            delete_after,
            unhealthy: false,
        };
        match self.beats.insert((key.clone(), id.to_owned()), entry) {
            Some(old) => old.unhealthy,
            None => false,
        }
    }

    /// Stops tracking an instance (deregistered).
    pub fn forget(&mut self, key: &ServiceKey, id: &str) {
        self.beats.remove(&(key.clone(), id.to_owned()));
    }

    /// Whether an instance is tracked.
    pub fn contains(&self, key: &ServiceKey, id: &str) -> bool {
        self.beats.contains_key(&(key.clone(), id.to_owned()))
    }

    /// Which instances turn unhealthy and which are removed at `now`. A
    /// removed instance is no longer tracked; an unhealthy one is reported
    /// once.
    pub fn check(&mut self, now: Instant) -> Verdicts {
        let mut out = Verdicts::default();
        self.beats.retain(|(key, id), b| {
            let silent = now.saturating_duration_since(b.last);
            if silent >= b.delete_after {
                out.expired.push((key.clone(), id.clone()));
                return false;
            }
            if silent >= b.unhealthy_after && !b.unhealthy {
                b.unhealthy = true;
                out.unhealthy.push((key.clone(), id.clone()));
            }
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use roster_core::Metadata;

    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::new("", "", "svc").unwrap()
    }

    #[test]
    fn silent_instance_turns_unhealthy_once_then_is_removed() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut beats = Beats::new(s(15), s(30));
        beats.beat(&key(), "a", &Metadata::new(), t0);
        beats.beat(&key(), "b", &Metadata::new(), t0);
        assert_eq!(beats.check(t0 + s(14)), Verdicts::default());
        // "b" keeps beating.
        beats.beat(&key(), "b", &Metadata::new(), t0 + s(14));
        let v = beats.check(t0 + s(15));
        assert_eq!(v.unhealthy, vec![(key(), "a".to_owned())]);
        assert!(
            beats.check(t0 + s(16)).unhealthy.is_empty(),
            "reported once"
        );
        let v = beats.check(t0 + s(30));
        assert_eq!(v.expired, vec![(key(), "a".to_owned())]);
        assert!(!beats.contains(&key(), "a"));
        assert!(beats.contains(&key(), "b"));
    }

    #[test]
    fn a_beat_after_unhealthy_asks_to_be_healthy_again() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut beats = Beats::new(s(15), s(30));
        assert!(!beats.beat(&key(), "a", &Metadata::new(), t0));
        beats.check(t0 + s(20));
        assert!(beats.beat(&key(), "a", &Metadata::new(), t0 + s(21)));
        assert!(!beats.beat(&key(), "a", &Metadata::new(), t0 + s(22)));
    }

    #[test]
    fn metadata_overrides_the_deadlines() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut beats = Beats::new(ms(15_000), ms(30_000));
        let meta: Metadata = [
            (BEAT_TIMEOUT_KEY.to_owned(), "100".to_owned()),
            (DELETE_TIMEOUT_KEY.to_owned(), "200".to_owned()),
        ]
        .into_iter()
        .collect();
        beats.beat(&key(), "a", &meta, t0);
        assert_eq!(beats.check(t0 + ms(100)).unhealthy.len(), 1);
        assert_eq!(beats.check(t0 + ms(200)).expired.len(), 1);
    }
}
