//! Core hot paths: registration into a large service, delta computation.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use roster_core::session::SessionKind;
use roster_core::{Instance, Registry, RegistryConfig, ServiceKey, SessionId};

fn instance(n: u32) -> Instance {
    let mut i = Instance::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 8080);
    i.metadata.insert("zone", "eu-1a");
    i.metadata.insert("version", "1.4.2");
    i
}

fn registry_with(n: u32) -> (Registry, SessionId, ServiceKey) {
    let now = Instant::now();
    let mut reg = Registry::new("bench", 1, RegistryConfig::default());
    let s: SessionId = "bench-session".into();
    reg.open_session(s.clone(), SessionKind::Stream, "bench", 0, now)
        .unwrap();
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
    c.bench_function("register/re-register and publish at once (no burst)", |b| {
        // What a write costs when no other write shares its publication:
        // the view's path copy.
        b.iter(|| {
            n = (n + 7919) % 10_000;
            black_box(reg.register(&s, &key, instance(n), now).unwrap());
            black_box(reg.take_unpublished().len());
        })
    });
    c.bench_function("register/new instance into 10k-instance service", |b| {
        // Each batch registers new instances and is then removed (untimed),
        // so the service stays near 10k instead of growing without bound.
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let batch = (iters - done).min(1_000) as u32;
                let instances: Vec<Instance> = (0..batch).map(|i| instance(10_000 + i)).collect();
                let mut ids = Vec::with_capacity(batch as usize);
                let start = Instant::now();
                for i in instances {
                    ids.push(black_box(reg.register(&s, &key, i, now).unwrap()).1);
                }
                spent += start.elapsed();
                for id in ids {
                    reg.deregister(&s, &key, &id, now).unwrap();
                }
                done += u64::from(batch);
            }
            spent
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
