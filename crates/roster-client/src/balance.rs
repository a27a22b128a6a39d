//! Choosing an instance and an address: weighted random over serving
//! instances, per-address failure tracking with a shield, and per-instance
//! stickiness to the address (network) that last worked. Pure: the caller
//! passes the current time and owns the random generator's seed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use roster_core::{Instance, ServiceKey};
use tokio::time::Instant;

/// When an address is shielded and for how long.
#[derive(Debug, Clone, Copy)]
pub struct ShieldPolicy {
    /// Consecutive failures that shield an address.
    pub failures: u32,
    /// How long a shielded address is skipped before it is tried once.
    pub period: Duration,
}

impl Default for ShieldPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            period: Duration::from_secs(30),
        }
    }
}

/// What the client knows of one address.
#[derive(Debug, Default, Clone)]
struct Health {
    /// Failures since the last success.
    failures: u32,
    /// Skipped until then.
    shielded_until: Option<Instant>,
    /// A single trial after the shield ended is in flight since then.
    trial_since: Option<Instant>,
}

/// Address health, stickiness and the random generator.
#[derive(Debug)]
pub struct Balancer {
    policy: ShieldPolicy,
    health: HashMap<SocketAddr, Health>,
    /// Per service, per instance id: the address index in use. Nested so
    /// that lookups borrow instead of building a key.
    sticky: HashMap<ServiceKey, HashMap<String, usize>>,
    rng: fastrand::Rng,
}

/// The socket address of an instance's `n`th address.
pub fn socket(instance: &Instance, n: usize) -> SocketAddr {
    SocketAddr::new(instance.addresses[n].ip, instance.port)
}

impl Balancer {
    /// A balancer with `policy`, seeded for reproducible choices.
    pub fn new(policy: ShieldPolicy, seed: u64) -> Self {
        Self {
            policy,
            health: HashMap::new(),
            sticky: HashMap::new(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn usable(&self, addr: &SocketAddr, now: Instant) -> bool {
        let Some(h) = self.health.get(addr) else {
            return true;
        };
        match h.shielded_until {
            Some(until) if until > now => false,
            // Shield over: one trial at a time (a lost report frees it
            // after another period).
            Some(_) => h
                .trial_since
                .is_none_or(|t| now.duration_since(t) >= self.policy.period),
            None => true,
        }
    }

    /// The address index `instance` should be called on now: the one in
    /// use unless it failed since, else the next usable one in order.
    fn address_for(
        &self,
        service: &ServiceKey,
        instance: &Instance,
        now: Instant,
    ) -> Option<usize> {
        let n = instance.addresses.len();
        let current = self
            .sticky
            .get(service)
            .and_then(|ids| ids.get(&instance.id))
            .copied()
            .unwrap_or(0)
            % n.max(1);
        let healthy_now = |i: usize| {
            let addr = socket(instance, i);
            self.usable(&addr, now) && self.health.get(&addr).is_none_or(|h| h.failures == 0)
        };
        if healthy_now(current) {
            return Some(current);
        }
        // The current one failed: the next without failures, else the next
        // usable (a failing but not yet shielded address beats none).
        (1..=n)
            .map(|k| (current + k) % n)
            .find(|&i| healthy_now(i))
            .or_else(|| {
                (0..n)
                    .map(|k| (current + k) % n)
                    .find(|&i| self.usable(&socket(instance, i), now))
            })
    }

    /// Picks a serving instance of `service` at random by weight, and the
    /// address to call it on. `None` when none is serving and usable.
    pub fn select<'a>(
        &mut self,
        service: &ServiceKey,
        instances: impl IntoIterator<Item = &'a Arc<Instance>>,
        now: Instant,
    ) -> Option<(Arc<Instance>, SocketAddr)> {
        let candidates: Vec<(&Arc<Instance>, usize)> = instances
            .into_iter()
            .filter(|i| i.is_serving() && !i.addresses.is_empty())
            .filter_map(|i| Some((i, self.address_for(service, i, now)?)))
            .collect();
        let total: f64 = candidates.iter().map(|(i, _)| i.weight).sum();
        if candidates.is_empty() || total <= 0.0 {
            return None;
        }
        let mut point = self.rng.f64() * total;
        let mut chosen = candidates[candidates.len() - 1];
        for c in &candidates {
            if point < c.0.weight {
                chosen = *c;
                break;
            }
            point -= c.0.weight;
        }
        let (instance, index) = chosen;
        let ids = match self.sticky.get_mut(service) {
            Some(ids) => ids,
            None => self.sticky.entry(service.clone()).or_default(),
        };
        match ids.get_mut(&instance.id) {
            Some(current) => *current = index,
            None => {
                ids.insert(instance.id.clone(), index);
            }
        }
        let addr = socket(instance, index);
        if let Some(h) = self.health.get_mut(&addr)
            && h.shielded_until.is_some_and(|u| u <= now)
        {
            h.trial_since = Some(now);
        }
        Some((instance.clone(), addr))
    }

    /// A call to `addr` failed. Returns true if that shielded it.
    pub fn report_failure(&mut self, addr: SocketAddr, now: Instant) -> bool {
        let h = self.health.entry(addr).or_default();
        h.failures = h.failures.saturating_add(1);
        h.trial_since = None;
        let shield = h.failures >= self.policy.failures;
        if shield {
            h.shielded_until = Some(now + self.policy.period);
        }
        shield
    }

    /// A call to `addr` worked: its failures are forgotten.
    pub fn report_success(&mut self, addr: SocketAddr) {
        self.health.remove(&addr);
    }

    /// Addresses shielded now.
    pub fn shielded(&self, now: Instant) -> usize {
        self.health
            .values()
            .filter(|h| h.shielded_until.is_some_and(|u| u > now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roster_core::Address;
    use std::net::{IpAddr, Ipv4Addr};

    fn key() -> ServiceKey {
        ServiceKey::simple("s").unwrap()
    }

    fn instance(host: u8, weight: f64) -> Arc<Instance> {
        let mut i = Instance::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)), 80);
        i.weight = weight;
        Arc::new(i.normalize().unwrap())
    }

    #[test]
    fn an_address_failing_five_times_is_shielded_then_tried_once() {
        let now = Instant::now();
        let mut b = Balancer::new(ShieldPolicy::default(), 7);
        let all = [instance(1, 1.0), instance(2, 1.0)];
        let bad = socket(&all[0], 0);
        for n in 1..=5 {
            assert_eq!(b.report_failure(bad, now), n == 5);
        }
        assert_eq!(b.shielded(now), 1);
        let during = now + Duration::from_secs(29);
        for _ in 0..1000 {
            assert_ne!(b.select(&key(), &all, during).unwrap().1, bad);
        }
        // After the period: picked once (the trial), then skipped until
        // the trial is reported.
        let after = now + Duration::from_secs(31);
        let picks: Vec<_> = (0..1000)
            .map(|_| b.select(&key(), &all, after).unwrap().1)
            .filter(|a| *a == bad)
            .collect();
        assert_eq!(picks.len(), 1);
        // A failed trial shields it again; a successful one restores it.
        assert!(b.report_failure(bad, after));
        assert_eq!(b.shielded(after), 1);
        b.report_success(bad);
        assert_eq!(b.shielded(after), 0);
        assert!((0..1000).any(|_| b.select(&key(), &all, after).unwrap().1 == bad));
    }

    #[test]
    fn a_multi_network_instance_moves_on_failure_and_stays_on_what_works() {
        let now = Instant::now();
        let mut b = Balancer::new(ShieldPolicy::default(), 1);
        let mut i = Instance::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80);
        i.addresses.push(Address {
            network: "backup".into(),
            ip: IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
        });
        let all = [Arc::new(i.normalize().unwrap())];
        let (first, second) = (socket(&all[0], 0), socket(&all[0], 1));
        assert_eq!(b.select(&key(), &all, now).unwrap().1, first);
        b.report_failure(first, now);
        assert_eq!(b.select(&key(), &all, now).unwrap().1, second);
        b.report_success(second);
        for _ in 0..10 {
            assert_eq!(b.select(&key(), &all, now).unwrap().1, second);
        }
    }

    #[test]
    fn nothing_serving_selects_nothing() {
        let now = Instant::now();
        let mut b = Balancer::new(ShieldPolicy::default(), 1);
        assert!(b.select(&key(), &[instance(1, 0.0)], now).is_none());
        assert!(b.select(&key(), &[], now).is_none());
    }
}
