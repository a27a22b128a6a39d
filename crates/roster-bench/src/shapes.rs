//! The load shapes. Each sets up what it needs (untimed), then times only
//! the operations it measures, speaking through [`Client`] and
//! [`Subscriber`] so that the protocol is a parameter. Against a cluster,
//! writers use its first node, subscribers and readers its last, and a
//! storm all of them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use roster_client::Connection;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::{Client, Endpoints, MAX_SEQ, Protocol, Pushed, Spec, Subscriber};
use super::{
    BenchArgs, Latency, Measured, Shape, Targets, histogram, progress, record, timed_progress,
};

/// Runs the shape `args` names against `targets`.
pub async fn run(targets: &Targets, a: &BenchArgs) -> Result<Measured> {
    let all: Vec<&Endpoints> = targets.nodes.iter().map(|t| &t.at).collect();
    let (first, last) = (all[0], all[all.len() - 1]);
    match a.shape {
        Shape::Register => Ok(register(&[first], a, None).await?.0),
        Shape::Storm => storm(&all, a).await,
        Shape::Query => query(first, last, a).await,
        Shape::Push => push(first, last, a).await,
        Shape::Churn => churn(first, last, a).await,
        Shape::Snapshot => snapshot(targets, a).await,
    }
}

fn service(n: u32) -> String {
    format!("bench-{n}")
}

/// Registers `instances` over `services` from `clients` concurrent
/// clients; `probe` (the storm's) is told when they are done. Returns the
/// measurement and the clients (to verify through one of them).
async fn register(
    nodes: &[&Endpoints],
    a: &BenchArgs,
    probe: Option<tokio::sync::watch::Sender<bool>>,
) -> Result<(Measured, Vec<Arc<Client>>)> {
    let (clients, instances, services) = (a.clients, a.instances, a.services);
    // Connections (and native sessions) first, untimed; the clients are
    // shared out over the nodes.
    let mut workers: Vec<Arc<Client>> = Vec::new();
    let n = nodes.len() as u32;
    for (k, at) in nodes.iter().enumerate() {
        let share = clients / n + u32::from((k as u32) < clients % n);
        let conns = a.connections.map(|c| (c / n).max(1));
        let name = format!("bench-register-n{k}");
        for c in Client::many(a.protocol, at, share, conns, &name).await? {
            workers.push(Arc::new(c));
        }
    }
    let batch = a.batch.max(1);
    let bar = progress(u64::from(instances), "register");
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (c, client) in workers.iter().enumerate() {
        let (bar, client) = (bar.clone(), client.clone());
        set.spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            // Client c registers instances c, c + clients, ..., `batch`
            // to a call; its k-th call goes to service c + k (or, with a
            // service per instance, instance n to service n). A Nacos gRPC
            // connection holds one registration (or batch) per service,
            // so a client names each service once as far as they go.
            for (s, chunk) in calls(c as u32, clients, instances, services, batch) {
                let t = Instant::now();
                let done = if batch == 1 {
                    client
                        .register(&service(s), &Spec::numbered(chunk[0]))
                        .await
                } else {
                    let specs: Vec<Spec> = chunk.iter().map(|n| Spec::numbered(*n)).collect();
                    client.register_batch(&service(s), &specs).await
                };
                match done {
                    Ok(()) => record(&mut h, t.elapsed()),
                    Err(_) => errors += chunk.len() as u64,
                }
                bar.inc(chunk.len() as u64);
            }
            (h, errors)
        });
    }
    let (latency, errors) = join_histograms(&mut set).await?;
    let registered = (u64::from(instances)).saturating_sub(errors);
    let elapsed = start.elapsed();
    if let Some(probe) = probe {
        probe.send_replace(true);
    }
    bar.finish_and_clear();
    Ok((
        Measured {
            operations: registered,
            errors,
            elapsed,
            instances_held: registered,
            latency,
            extra: BTreeMap::new(),
            hold: vec![Box::new(workers.clone())],
        },
        workers,
    ))
}

/// The calls of client `c` of `register`: instances c, c + clients, ...,
/// `batch` to a call, each call with its service.
fn calls(
    c: u32,
    clients: u32,
    instances: u32,
    services: u32,
    batch: u32,
) -> impl Iterator<Item = (u32, Vec<u32>)> {
    let mine: Vec<u32> = (c..instances).step_by(clients.max(1) as usize).collect();
    let chunks: Vec<Vec<u32>> = mine
        .chunks(batch.max(1) as usize)
        .map(<[u32]>::to_vec)
        .collect();
    chunks.into_iter().enumerate().map(move |(k, chunk)| {
        let s = if services >= instances {
            chunk[0]
        } else {
            (c + k as u32) % services
        };
        (s, chunk)
    })
}

/// How many instances `register` puts in each service it uses.
fn per_service(a: &BenchArgs) -> Vec<u64> {
    let mut counts = vec![0u64; a.services.min(a.instances) as usize];
    for c in 0..a.clients {
        for (s, chunk) in calls(c, a.clients, a.instances, a.services, a.batch) {
            counts[s as usize] += chunk.len() as u64;
        }
    }
    counts
}

async fn join_histograms(
    set: &mut JoinSet<(Histogram<u64>, u64)>,
) -> Result<(Histogram<u64>, u64)> {
    let mut latency = histogram();
    let mut errors = 0;
    while let Some(done) = set.join_next().await {
        let (h, e) = done?;
        latency.add(&h).ok();
        errors += e;
    }
    Ok((latency, errors))
}

/// Registers as fast as the clients can (spread over every node) while a
/// probe queries one service every 10 ms; then checks every instance is
/// listed on every node, and how long after the last registration they
/// all were.
async fn storm(nodes: &[&Endpoints], a: &BenchArgs) -> Result<Measured> {
    let prober = Client::connect(a.protocol, nodes[0], "bench-storm-probe").await?;
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    done.mark_unchanged();
    let probing = tokio::spawn(async move {
        let mut h = histogram();
        let mut errors = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // At least one probe, however short the storm.
        loop {
            let t = Instant::now();
            match prober.query(&service(0)).await {
                Ok(_) => record(&mut h, t.elapsed()),
                Err(_) => errors += 1,
            }
            tokio::select! {
                _ = done.changed() => break,
                _ = tick.tick() => {}
            }
        }
        (h, errors)
    });
    let (mut m, _workers) = register(nodes, a, Some(done_tx)).await?;
    let ended = Instant::now();
    let (probe, probe_errors) = probing.await?;
    // Every registration that succeeded must be listed on every node
    // (replicated within 30 s).
    let (listed, converged) = listed_everywhere(a, nodes, m.operations, ended).await?;
    let lost = m.operations.saturating_sub(listed);
    m.errors += lost + probe_errors;
    m.extra.insert("listed", json!(listed));
    m.extra.insert("lost", json!(lost));
    if nodes.len() > 1 {
        m.extra.insert(
            "listed_everywhere_after_ms",
            json!(converged.map(|d| d.as_secs_f64() * 1e3)),
        );
    }
    m.extra
        .insert("probe_latency", serde_json::to_value(Latency::of(&probe))?);
    m.extra.insert("probe_errors", json!(probe_errors));
    Ok(m)
}

/// The fewest instances any node lists over the bench's services (waiting
/// up to 30 s for every node to list `expected`), and how long after
/// `since` every node did.
async fn listed_everywhere(
    a: &BenchArgs,
    nodes: &[&Endpoints],
    expected: u64,
    since: Instant,
) -> Result<(u64, Option<Duration>)> {
    let deadline = since + Duration::from_secs(30);
    let per = Arc::new(per_service(a));
    let mut set = JoinSet::new();
    for (k, at) in nodes.iter().enumerate() {
        let name = format!("bench-check-n{k}");
        let checker = Arc::new(Client::connect(fixture_protocol(a.protocol), at, &name).await?);
        set.spawn(node_listed(checker, per.clone(), expected, deadline));
    }
    let mut fewest = u64::MAX;
    let mut last = Some(since);
    while let Some(done) = set.join_next().await {
        let (listed, at) = done?;
        fewest = fewest.min(listed);
        last = last.zip(at).map(|(a, b)| a.max(b));
    }
    Ok((fewest.min(expected), last.map(|t| t - since)))
}

/// Asks one node for the bench's services until it lists `expected`
/// instances in all or `deadline` passes: how many it listed, and when it
/// listed them all. A service is asked again only while short of what
/// `register` put in it (`per`), and a few at a time: a full pass over
/// 100 services of 1,000 instances in Nacos JSON is megabytes, and a
/// checker that slow would measure itself rather than the nodes. (So a
/// service counts as listed from the first time it was full: nothing in
/// these shapes removes instances.)
async fn node_listed(
    checker: Arc<Client>,
    per: Arc<Vec<u64>>,
    expected: u64,
    deadline: Instant,
) -> (u64, Option<Instant>) {
    use futures_util::StreamExt as _;
    const IN_FLIGHT: usize = 8;
    let mut counts = vec![0u64; per.len()];
    let listed = loop {
        let short: Vec<usize> = (0..per.len()).filter(|s| counts[*s] < per[*s]).collect();
        let answers: Vec<(usize, u64)> = futures_util::stream::iter(short)
            .map(|s| {
                let checker = checker.clone();
                async move {
                    let name = service(s as u32);
                    let asked = checker.query(&name);
                    let got = tokio::time::timeout_at(deadline, asked).await;
                    (s, got.ok().and_then(Result::ok).unwrap_or(0) as u64)
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for (s, got) in answers {
            counts[s] = got;
        }
        let listed: u64 = counts.iter().sum();
        // Every service full; with failed registrations (whose services
        // are unknown), as many in all as succeeded.
        let full = if per.iter().sum::<u64>() == expected {
            counts.iter().zip(per.iter()).all(|(c, p)| c >= p)
        } else {
            listed >= expected
        };
        if full {
            break (listed, Some(Instant::now()));
        }
        if Instant::now() >= deadline {
            break (listed, None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Ok(c) = Arc::try_unwrap(checker) {
        c.close().await;
    }
    listed
}

/// Registers `--instances` on a cluster's first node, waits until every
/// running node lists them, then starts the cluster's last member, which
/// loads them as a snapshot: its time from start to ready, and its peak
/// resident memory.
async fn snapshot(targets: &Targets, a: &BenchArgs) -> Result<Measured> {
    let nodes: Vec<&Endpoints> = targets.nodes.iter().map(|t| &t.at).collect();
    let (loaded, workers) = register(&nodes[..1], a, None).await?;
    listed_everywhere(a, &nodes, loaded.operations, Instant::now()).await?;
    let sources: Vec<u32> = targets.nodes.iter().filter_map(|t| t.pid).collect();
    let cpu = |pids: &[u32]| -> Option<f64> {
        if pids.is_empty() {
            return None;
        }
        pids.iter()
            .map(|p| super::procfs::cpu_time(*p).map(|d| d.as_secs_f64()))
            .sum()
    };
    let sources_before = cpu(&sources);
    let start = Instant::now();
    let joiner = targets.start_member(nodes.len()).await?;
    let took = start.elapsed();
    // CPU seconds tell the cost apart from a busy machine's waits.
    let joiner_cpu = joiner.pid.and_then(|p| cpu(&[p]));
    let sources_cpu = cpu(&sources).zip(sources_before).map(|(a, b)| a - b);
    let (listed, _) =
        listed_everywhere(a, &[&joiner.at], loaded.operations, Instant::now()).await?;
    let lost = loaded.operations.saturating_sub(listed);
    let mut latency = histogram();
    record(&mut latency, took);
    let mut extra = BTreeMap::new();
    extra.insert("ready_after_ms", json!(took.as_secs_f64() * 1e3));
    extra.insert("listed_on_new_node", json!(listed));
    extra.insert("lost", json!(lost));
    extra.insert("new_node_cpu_seconds", json!(joiner_cpu));
    extra.insert("sources_cpu_seconds", json!(sources_cpu));
    let peak = joiner.pid.and_then(super::procfs::peak_resident_bytes);
    extra.insert("new_node_peak_rss_bytes", json!(peak));
    extra.insert(
        "new_node_rss_bytes",
        json!(joiner.pid.and_then(super::procfs::resident_bytes)),
    );
    let chunks = Targets::metric(
        &joiner.at,
        "roster_replication_messages_total{kind=\"snapshot_chunk\",direction=\"received\"}",
    )
    .await;
    extra.insert("snapshot_chunks", json!(chunks));
    Ok(Measured {
        operations: listed,
        errors: lost,
        elapsed: took,
        latency,
        extra,
        instances_held: 0,
        hold: vec![Box::new(workers), Box::new(joiner)],
    })
}

/// For Nacos HTTP, whose registrations expire without beats, fixtures are
/// registered over Nacos gRPC (their connection keeps them).
fn fixture_protocol(p: Protocol) -> Protocol {
    match p {
        Protocol::NacosHttp => Protocol::NacosGrpc,
        other => other,
    }
}

async fn query(owner_at: &Endpoints, at: &Endpoints, a: &BenchArgs) -> Result<Measured> {
    let (instances, duration) = (a.size, a.duration);
    let name = "bench-query";
    let protocol = fixture_protocol(a.protocol);
    let owner = Client::connect(protocol, owner_at, "bench-query-owner").await?;
    for n in 0..instances {
        owner.register(name, &Spec::numbered(n)).await?;
    }
    let conns = Client::many(a.protocol, at, a.readers, a.connections, "bench-reader").await?;
    // On a cluster, the readers' node has them all first.
    let until = Instant::now() + Duration::from_secs(30);
    while conns[0].query(name).await.unwrap_or(0) < instances as usize {
        if Instant::now() >= until {
            bail!("the readers' node does not list the {instances} instances");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bar = timed_progress(duration, "query");
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for conn in conns {
        set.spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match conn.query(name).await {
                    Ok(n) if n == instances as usize => record(&mut h, t.elapsed()),
                    _ => errors += 1,
                }
            }
            conn.close().await;
            (h, errors)
        });
    }
    let ticker = tick_progress(&bar, start, deadline);
    let (latency, errors) = join_histograms(&mut set).await?;
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

/// Moves a time-based progress bar until `deadline`.
fn tick_progress(
    bar: &indicatif::ProgressBar,
    start: Instant,
    deadline: Instant,
) -> tokio::task::JoinHandle<()> {
    let bar = bar.clone();
    tokio::spawn(async move {
        while Instant::now() < deadline {
            bar.set_position(start.elapsed().as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Native subscribers per gRPC connection (their streams share it); each
/// Nacos subscriber is a connection of its own, as in Nacos clients.
const STREAMS_PER_CONNECTION: u32 = 50;

/// What each subscriber saw: every push, in order.
type Seen = Arc<Mutex<Vec<Pushed>>>;

/// Subscribes `count` subscribers to `name`; each records what it sees.
async fn subscribers(
    p: Protocol,
    at: &Endpoints,
    name: &str,
    count: u32,
    tasks: &mut JoinSet<()>,
) -> Result<Vec<Seen>> {
    let mut seen = Vec::new();
    let mut conn = None;
    for s in 0..count {
        let mut sub = match p {
            Protocol::Native | Protocol::NativeUnary => {
                if s.is_multiple_of(STREAMS_PER_CONNECTION) {
                    conn = Some(Connection::connect(&at.grpc).await?);
                }
                let conn = conn.as_ref().expect("connected above");
                Subscriber::native(conn, name).await?
            }
            Protocol::NacosGrpc => Subscriber::nacos(at, name).await?,
            Protocol::NacosHttp => {
                bail!("subscribers need a streaming protocol: native or nacos-grpc")
            }
        };
        let log: Seen = Arc::default();
        seen.push(log.clone());
        tasks.spawn(async move {
            // Acks held back, by the push they acknowledge; waited for
            // here rather than in a task each, to keep the client light.
            let mut acks = FuturesUnordered::new();
            loop {
                tokio::select! {
                    next = sub.next() => {
                        let Some((pushed, sent)) = next else { break };
                        let at = {
                            let mut log = log.lock();
                            log.push(pushed);
                            log.len() - 1
                        };
                        if let Some(sent) = sent {
                            acks.push(async move { (at, sent.await.is_ok()) });
                        }
                    }
                    Some((at, sent)) = acks.next(), if !acks.is_empty() => {
                        if sent {
                            log.lock()[at].acked = Some(Instant::now());
                        }
                    }
                }
            }
        });
    }
    Ok(seen)
}

/// Waits (at most `limit`) until `done` holds for every subscriber.
async fn settle(seen: &[Seen], limit: Duration, done: impl Fn(&[Pushed]) -> bool) {
    let until = Instant::now() + limit;
    while Instant::now() < until && !seen.iter().all(|s| done(&s.lock())) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn push(writer_at: &Endpoints, at: &Endpoints, a: &BenchArgs) -> Result<Measured> {
    let (changes, interval) = (a.changes, a.interval);
    let name = "bench-push";
    let protocol = fixture_protocol(a.protocol);
    let writer = Client::connect(protocol, writer_at, "bench-push-writer").await?;
    let mut changed = Spec::numbered(0);
    changed.seq = Some(0);
    writer.register(name, &changed).await?;
    let mut tasks = JoinSet::new();
    let seen = subscribers(a.protocol, at, name, a.subscribers, &mut tasks).await?;

    let bar = progress(u64::from(changes), "push");
    let start = Instant::now();
    let mut made: Vec<(u64, Instant)> = Vec::new();
    let mut errors = 0u64;
    for x in 1..=u64::from(changes) {
        changed.seq = Some(x);
        let t = Instant::now();
        match writer.register(name, &changed).await {
            Ok(()) => made.push((x, t)),
            Err(_) => errors += 1,
        }
        bar.inc(1);
        tokio::time::sleep(interval).await;
    }
    let last = made.last().map_or(0, |(x, _)| *x);
    settle(&seen, Duration::from_secs(10), |log| {
        log.iter().any(|s| s.seq >= Some(last))
    })
    .await;
    let elapsed = start.elapsed();
    // Acknowledgements held back go out shortly after.
    settle(&seen, Duration::from_secs(2), |log| {
        log.iter().all(|s| s.acked.is_some())
    })
    .await;
    bar.finish_and_clear();
    tasks.abort_all();

    let mut receipt = histogram();
    let mut acked = histogram();
    let (mut missed, mut unacked) = (0u64, 0u64);
    for log in &seen {
        let log = log.lock();
        for (x, at) in &made {
            // The first push carrying this change (or a later one).
            match log.iter().find(|s| s.seq >= Some(*x)) {
                Some(s) => {
                    record(&mut receipt, s.received.saturating_duration_since(*at));
                    match s.acked {
                        Some(t) => record(&mut acked, t.saturating_duration_since(*at)),
                        None => unacked += 1,
                    }
                }
                None => missed += 1,
            }
        }
    }
    let mut extra = BTreeMap::new();
    extra.insert("missed_updates", json!(missed));
    extra.insert("unacknowledged", json!(unacked));
    extra.insert("ack_latency", serde_json::to_value(Latency::of(&acked))?);
    writer.close().await;
    Ok(Measured {
        operations: receipt.len(),
        errors: errors + missed,
        elapsed,
        latency: receipt,
        extra,
        instances_held: 0,
        hold: Vec::new(),
    })
}

/// Clients register and deregister at a steady total `--rate`, each
/// keeping about `--size` instances live, while subscribers follow the
/// service; at the end every subscriber's view must match the server's.
/// Besides the calls' latency, the time from each registration to the
/// first push that carries it is measured (`push_latency`): each of the
/// first 9,999 registrations carries its number in its weight.
async fn churn(writer_at: &Endpoints, at: &Endpoints, a: &BenchArgs) -> Result<Measured> {
    let (name, duration) = ("bench-churn", a.duration);
    let workers = Client::many(a.protocol, writer_at, a.clients, None, "bench-churn").await?;
    let mut tasks = JoinSet::new();
    let seen = subscribers(a.protocol, at, name, a.subscribers, &mut tasks).await?;
    let per_client = Duration::from_secs_f64(f64::from(a.clients) / a.rate.max(1) as f64);
    let keep = a.size as usize;
    // Registrations numbered 1.., with when each was made.
    let numbered = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let made: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let bar = timed_progress(duration, "churn");
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (c, client) in workers.into_iter().enumerate() {
        let (numbered, made) = (numbered.clone(), made.clone());
        set.spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            let mut live = VecDeque::new();
            // Each client numbers its instances apart from the others'.
            let mut next = (c as u32) << 20;
            let mut tick = tokio::time::interval(per_client);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < deadline {
                tick.tick().await;
                let t = Instant::now();
                // Up to one above `keep`, then alternately down and up.
                let outcome = if live.len() > keep {
                    let gone: Spec = live.pop_front().expect("more than `keep` live");
                    client.deregister(name, &gone).await
                } else {
                    let mut born = Spec::numbered(next);
                    next += 1;
                    let x = numbered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    born.seq = (x <= MAX_SEQ).then_some(x);
                    let r = client.register(name, &born).await;
                    if r.is_ok() && born.seq.is_some() {
                        made.lock().push((x, t));
                    }
                    live.push_back(born);
                    r
                };
                match outcome {
                    Ok(()) => record(&mut h, t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (h, errors, client)
        });
    }
    let ticker = tick_progress(&bar, start, deadline);
    let mut latency = histogram();
    let mut errors = 0;
    let mut clients = Vec::new();
    while let Some(done) = set.join_next().await {
        let (h, e, client) = done?;
        latency.add(&h).ok();
        errors += e;
        clients.push(client);
    }
    let elapsed = start.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    let Some(checker) = clients.first() else {
        bail!("no clients");
    };
    let listed = checker.query(name).await?;
    settle(&seen, Duration::from_secs(10), |log| {
        log.last().is_some_and(|s| s.instances == listed)
    })
    .await;
    tasks.abort_all();
    let diverged = seen
        .iter()
        .filter(|s| s.lock().last().is_none_or(|s| s.instances != listed))
        .count() as u64;
    let pushes: usize = seen.iter().map(|s| s.lock().len()).sum();
    // Registration to the first push that carries it.
    let mut pushed = histogram();
    let made = std::mem::take(&mut *made.lock());
    for log in &seen {
        let mut first: std::collections::HashMap<u64, Instant> = Default::default();
        for p in log.lock().iter() {
            for x in &p.seqs {
                first.entry(*x).or_insert(p.received);
            }
        }
        for (x, at) in made.iter() {
            if let Some(received) = first.get(x) {
                record(&mut pushed, received.saturating_duration_since(*at));
            }
        }
    }
    let mut extra = BTreeMap::new();
    extra.insert("push_latency", serde_json::to_value(Latency::of(&pushed))?);
    extra.insert("listed_at_end", json!(listed));
    extra.insert("pushes_received", json!(pushes));
    extra.insert("subscribers_diverged", json!(diverged));
    for c in clients {
        c.close().await;
    }
    Ok(Measured {
        operations: latency.len(),
        errors: errors + diverged,
        elapsed,
        latency,
        extra,
        instances_held: 0,
        hold: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `register`'s calls put every instance in exactly one call, in a
    /// service it uses: what the listing check counts on.
    #[test]
    fn the_calls_cover_every_instance_once_in_a_used_service() {
        for (instances, clients, services, batch) in [
            (600, 6, 7, 1),
            (10, 3, 100, 1),
            (1000, 24, 100, 5),
            (7, 8, 3, 2),
            (0, 2, 2, 1),
        ] {
            let mut seen = vec![0u32; instances as usize];
            for c in 0..clients {
                for (s, chunk) in calls(c, clients, instances, services, batch) {
                    assert!(s < services.min(instances), "service {s} out of range");
                    assert!(chunk.len() <= batch as usize);
                    for n in chunk {
                        seen[n as usize] += 1;
                    }
                }
            }
            assert!(
                seen.iter().all(|n| *n == 1),
                "{instances}/{clients}/{services}/{batch}"
            );
        }
    }
}
