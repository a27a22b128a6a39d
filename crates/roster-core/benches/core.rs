//! Core hot paths: registration into a large service, delta computation.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use roster_core::session::SessionKind;
use roster_core::{Instance, Registry, RegistryConfig, ServiceKey};

fn instance(n: u32) -> Instance {
    let mut i = Instance::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 8080);
    i.metadata.insert("zone".into(), "eu-1a".into());
    i.metadata.insert("version".into(), "1.4.2".into());
    i
}

fn registry_with(n: u32) -> (Registry, roster_core::SessionId, ServiceKey) {
    let now = Instant::now();
    let mut reg = Registry::new(1, RegistryConfig::default());
    let s = reg.open_session(SessionKind::Stream, "bench", now);
    let key = ServiceKey::simple("big").unwrap();
    for i in 0..n {
        reg.register(&s, &key, instance(i), now).unwrap();
    }
    (reg, s, key)
}

fn register(c: &mut Criterion) {
    let now = Instant::now();
    let (mut reg, s, key) = registry_with(10_000);
    let mut n = 0u32;
    c.bench_function("register/re-register into 10k-instance service", |b| {
        // Timed with building the input instance (seven allocations), so
        // the figure errs high.
        b.iter(|| {
            n = (n + 7919) % 10_000;
            black_box(reg.register(&s, &key, instance(n), now).unwrap());
        })
    });
    let mut next = 10_000u32;
    c.bench_function("register/new instance into 10k+ service", |b| {
        b.iter(|| {
            next += 1;
            black_box(reg.register(&s, &key, instance(next), now).unwrap());
        })
    });
}

fn delta(c: &mut Criterion) {
    let now = Instant::now();
    let (mut reg, s, key) = registry_with(10_000);
    let base = reg.view(&key).unwrap().revision;
    for i in 0..100 {
        reg.register(&s, &key, instance(i * 13), now).unwrap();
    }
    c.bench_function("delta/1 change in 10k-instance service", |b| {
        let last = reg.view(&key).unwrap().revision;
        b.iter(|| black_box(reg.changes_since(&key, last - 1).unwrap()))
    });
    c.bench_function("delta/100 changes merged in 10k-instance service", |b| {
        b.iter(|| black_box(reg.changes_since(&key, base).unwrap()))
    });
}

criterion_group!(benches, register, delta);
criterion_main!(benches);
