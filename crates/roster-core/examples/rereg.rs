//! Registration into a 10k-instance service, 50,000 times, for counting
//! instructions (repeatable, unlike timings on a shared machine):
//! `cargo build --release -p roster-core --example rereg && valgrind
//! --tool=callgrind target/release/examples/rereg [re|new]` (`re`: the same
//! instances again; `new`: new ones), then `callgrind_annotate
//! --inclusive=yes` and look for `Registry::register`.
use roster_core::session::SessionKind;
use roster_core::{Instance, Registry, RegistryConfig, ServiceKey, SessionId};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;
fn setup(now: Instant) -> (Registry, SessionId) {
    let mut reg = Registry::new("n", 1, RegistryConfig::default());
    let s: SessionId = "s".into();
    reg.open_session(s.clone(), SessionKind::Stream, "x", 0, now)
        .unwrap();
    (reg, s)
}
fn instance(n: u32) -> Instance {
    let mut i = Instance::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 8080);
    i.metadata.insert("zone", "eu-1a");
    i.metadata.insert("version", "1.4.2");
    i
}

fn main() {
    let now = Instant::now();
    let (mut reg, s) = setup(now);
    let key = ServiceKey::simple("big").unwrap();
    for i in 0..10_000 {
        reg.register(&s, &key, instance(i), now).unwrap();
    }
    let mode = std::env::args().nth(1).unwrap_or_default();
    let mut n = 0u32;
    let t = Instant::now();
    for k in 0..50_000 {
        n = (n + 7919) % 10_000;
        // `new`: each one an instance not yet in the service.
        let i = if mode == "new" {
            instance(10_000 + k)
        } else {
            instance(n)
        };
        black_box(reg.register(&s, &key, i, now).unwrap());
    }
    eprintln!("{:?}", t.elapsed() / 50_000);
}
