//! The load shapes over the native gRPC API. Each sets up what it needs
//! (untimed), then times only the operations it measures.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use roster_client::raw::Session;
use roster_client::{Connection, proto};
use roster_core::{Instance, ServiceKey};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{BenchArgs, Measured, Shape, histogram, progress, record};

/// Runs the shape `args` names against `addr`.
pub async fn run(addr: &str, args: &BenchArgs) -> Result<Measured> {
    match args.shape {
        Shape::Register => register(addr, args.clients, args.instances, args.services).await,
        Shape::Query => query(addr, args.readers, args.size, args.duration).await,
        Shape::Push => push(addr, args.subscribers, args.changes, args.interval).await,
    }
}

/// Instance `n`: a distinct IPv4 address, two metadata entries.
fn instance(n: u32) -> Instance {
    let mut i = Instance::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 8080);
    i.metadata.insert("zone".into(), format!("z{}", n % 4));
    i.metadata.insert("version".into(), "1.0.0".into());
    i
}

fn service(n: u32) -> ServiceKey {
    ServiceKey::simple(format!("bench-{n}")).expect("a valid service name")
}

async fn connect(addr: &str) -> Result<Connection> {
    Connection::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// Registers through `session`, returning the revision of the change.
async fn register_one(
    conn: &Connection,
    session: &Session,
    key: &ServiceKey,
    i: &Instance,
) -> Result<u64> {
    let r = conn
        .grpc()
        .register(proto::RegisterRequest {
            session_id: session.id().to_owned(),
            service: Some(key.into()),
            instance: Some(proto::Instance::from_model(i)),
        })
        .await?;
    Ok(r.into_inner().revision)
}

async fn register(addr: &str, clients: u32, instances: u32, services: u32) -> Result<Measured> {
    // Connections and sessions first, untimed.
    let mut workers = Vec::new();
    for c in 0..clients {
        let conn = connect(addr).await?;
        let session = conn.open_session(&format!("bench-register-{c}")).await?;
        workers.push((conn, session));
    }
    let bar = progress(u64::from(instances), "register");
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (c, (conn, session)) in workers.into_iter().enumerate() {
        let bar = bar.clone();
        set.spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            let mut n = c as u32;
            while n < instances {
                let i = instance(n);
                let t = Instant::now();
                match register_one(&conn, &session, &service(n % services), &i).await {
                    Ok(_) => record(&mut h, t.elapsed()),
                    Err(_) => errors += 1,
                }
                bar.inc(1);
                n += clients;
            }
            (h, errors, conn, session)
        });
    }
    let mut latency = histogram();
    let mut errors = 0;
    let mut keep = Vec::new();
    while let Some(done) = set.join_next().await {
        let (h, e, conn, session) = done?;
        latency.add(&h).ok();
        errors += e;
        keep.push((conn, session));
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    // Let the server settle before its memory is read; the sessions (and
    // so the instances) are held until the report is made.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Measured {
        operations: latency.len(),
        errors,
        elapsed,
        instances_held: latency.len(),
        latency,
        extra: BTreeMap::new(),
        hold: vec![Box::new(keep)],
    })
}

async fn query(addr: &str, readers: u32, instances: u32, duration: Duration) -> Result<Measured> {
    let key = ServiceKey::simple("bench-query")?;
    let owner_conn = connect(addr).await?;
    let owner = owner_conn.open_session("bench-query-owner").await?;
    for n in 0..instances {
        register_one(&owner_conn, &owner, &key, &instance(n)).await?;
    }
    let mut conns = Vec::new();
    for _ in 0..readers {
        conns.push(connect(addr).await?);
    }
    let bar = progress(duration.as_millis() as u64, "query (ms)");
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for conn in conns {
        let key = key.clone();
        set.spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match conn.query(&key, false).await {
                    Ok(r) if r.instances.len() == instances as usize => record(&mut h, t.elapsed()),
                    _ => errors += 1,
                }
            }
            (h, errors)
        });
    }
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                bar.set_position(start.elapsed().as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut latency = histogram();
    let mut errors = 0;
    while let Some(done) = set.join_next().await {
        let (h, e) = done?;
        latency.add(&h).ok();
        errors += e;
    }
    let elapsed = start.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    owner.close().await;
    Ok(Measured {
        operations: latency.len(),
        errors,
        elapsed,
        latency,
        extra: BTreeMap::new(),
        instances_held: 0,
        hold: Vec::new(),
    })
}

/// Subscribers per gRPC connection (their streams share it).
const STREAMS_PER_CONNECTION: u32 = 50;

async fn push(addr: &str, subscribers: u32, changes: u32, interval: Duration) -> Result<Measured> {
    let key = ServiceKey::simple("bench-push")?;
    let writer_conn = connect(addr).await?;
    let writer = writer_conn.open_session("bench-push-writer").await?;
    let mut changed = instance(0);
    register_one(&writer_conn, &writer, &key, &changed).await?;

    // Subscribers: each records when it saw (and acknowledged) each revision.
    type Seen = Arc<Mutex<Vec<(u64, Instant, Instant)>>>;
    let mut seen: Vec<Seen> = Vec::new();
    let mut tasks = JoinSet::new();
    let mut conn = connect(addr).await?;
    for s in 0..subscribers {
        if s > 0 && s % STREAMS_PER_CONNECTION == 0 {
            conn = connect(addr).await?;
        }
        let mut session = conn.open_session(&format!("bench-push-{s}")).await?;
        session.subscribe(&key).await?;
        let log: Seen = Arc::default();
        seen.push(log.clone());
        tasks.spawn(async move {
            while let Some(Ok(update)) = session.next_update().await {
                let got = Instant::now();
                let _ = session.ack(&key_of(&update), update.revision).await;
                log.lock().push((update.revision, got, Instant::now()));
            }
        });
    }

    let bar = progress(u64::from(changes), "push");
    let start = Instant::now();
    let mut made: Vec<(u64, Instant)> = Vec::new();
    let mut errors = 0u64;
    for x in 1..=changes {
        changed.weight = f64::from(1 + x % 100);
        let t = Instant::now();
        match register_one(&writer_conn, &writer, &key, &changed).await {
            Ok(revision) => made.push((revision, t)),
            Err(_) => errors += 1,
        }
        bar.inc(1);
        tokio::time::sleep(interval).await;
    }
    // Wait (bounded) for every subscriber to see the last change.
    let last = made.last().map_or(0, |(r, _)| *r);
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle
        && !seen
            .iter()
            .all(|s| s.lock().iter().any(|(r, _, _)| *r >= last))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    tasks.abort_all();

    let mut receipt = histogram();
    let mut acked = histogram();
    let mut missed = 0u64;
    for log in &seen {
        let log = log.lock();
        for (revision, at) in &made {
            // The first update carrying this change (or a later one).
            match log.iter().find(|(r, _, _)| r >= revision) {
                Some((_, got, ack)) => {
                    record(&mut receipt, got.saturating_duration_since(*at));
                    record(&mut acked, ack.saturating_duration_since(*at));
                }
                None => missed += 1,
            }
        }
    }
    let ack = super::Latency::of(&acked);
    let mut extra = BTreeMap::new();
    extra.insert("missed_updates", json!(missed));
    extra.insert("ack_latency", serde_json::to_value(&ack)?);
    writer.close().await;
    Ok(Measured {
        operations: receipt.len(),
        errors,
        elapsed,
        latency: receipt,
        extra,
        instances_held: 0,
        hold: Vec::new(),
    })
}

fn key_of(update: &proto::ServiceUpdate) -> ServiceKey {
    update
        .service
        .as_ref()
        .and_then(|s| ServiceKey::new(&s.namespace, &s.group, &s.service).ok())
        .unwrap_or_else(|| ServiceKey::simple("bench-push").expect("a valid name"))
}
