//! Order-independent checksums of service views.
//!
//! A view's checksum is the wrapping sum of [`instance_hash`] over its
//! instances, so a write updates it in O(1) and two nodes (or a node and a
//! client) can compare views whose revision numbers differ. The hash covers
//! what consumers see (not owner or version) and is stable across processes
//! and releases: changing it is a protocol change.

use xxhash_rust::xxh3::Xxh3;

use crate::model::Instance;

/// A stable 64-bit hash of an instance's visible content.
pub fn instance_hash(instance: &Instance) -> u64 {
    fn text(h: &mut Xxh3, s: &str) {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Xxh3::new();
    text(&mut h, &instance.id);
    text(&mut h, &instance.cluster);
    text(&mut h, &instance.node_name);
    for (k, v) in &instance.metadata {
        text(&mut h, k);
        text(&mut h, v);
    }
    for address in &instance.addresses {
        text(&mut h, &address.network);
        match address.ip {
            std::net::IpAddr::V4(ip) => h.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => h.update(&ip.octets()),
        }
    }
    h.update(&(instance.metadata.len() as u64).to_le_bytes());
    h.update(&(instance.addresses.len() as u64).to_le_bytes());
    h.update(&instance.port.to_le_bytes());
    h.update(&instance.weight.to_bits().to_le_bytes());
    h.update(&[
        instance.healthy as u8,
        instance.enabled as u8,
        instance.ephemeral as u8,
    ]);
    h.digest()
}

/// The checksum of a whole view, computed from scratch.
pub fn view_checksum<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> u64 {
    instances
        .into_iter()
        .fold(0u64, |sum, i| sum.wrapping_add(instance_hash(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_order_and_sees_every_field() {
        let a = Instance::new("10.0.0.1".parse().unwrap(), 1)
            .normalize()
            .unwrap();
        let b = Instance::new("10.0.0.2".parse().unwrap(), 1)
            .normalize()
            .unwrap();
        assert_eq!(view_checksum([&a, &b]), view_checksum([&b, &a]));
        let mut c = a.clone();
        c.weight = 2.0;
        assert_ne!(instance_hash(&a), instance_hash(&c));
        let mut d = a.clone();
        d.metadata.insert("k", "v");
        assert_ne!(instance_hash(&a), instance_hash(&d));
        let mut e = a.clone();
        e.healthy = false;
        assert_ne!(instance_hash(&a), instance_hash(&e));
    }
}
