//! The load generator behind `roster bench`: load shapes against a
//! registry node or cluster (Roster, or any Nacos-compatible server),
//! bounded in count and time, with latency histograms, throughput and (for
//! a local server) the server's CPU time per operation and resident memory.
//! Without a server given it starts Roster nodes on free loopback ports
//! (`--nodes N`: a cluster). The transport floor
//! (`src/bin/transport_floor.rs`) lives here too.

mod client;
mod nacos;
mod procfs;
mod shapes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use client::{Endpoints, Protocol};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use roster_client::Connection;
use serde::Serialize;
use serde_json::{Value, json};

/// A load shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// C clients register N instances over S services: instances/s.
    Register,
    /// K concurrent readers query one service for D: queries/s.
    Query,
    /// M subscribers on one service, X changes: change-to-receipt latency.
    Push,
    /// N registrations as fast as C clients can, a probe query every 10 ms
    /// throughout, then a check that every instance is listed.
    Storm,
    /// C clients register and deregister at a steady rate for D while M
    /// subscribers follow; their views must match the server's at the end.
    Churn,
    /// N instances registered on a cluster's first node; then a new node
    /// joins, loads them as a snapshot and becomes ready: its time to
    /// ready and peak memory (needs `--nodes`, no `--server`).
    Snapshot,
}

/// `roster bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    shape: Shape,
    /// How to talk to the server; `--server` names its gRPC address for
    /// every protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Native)]
    protocol: Protocol,
    /// The server's HTTP address (nacos-http), when `--server` is given;
    /// by default the gRPC port minus 1000, the Nacos convention.
    #[arg(long)]
    http: Option<String>,
    /// Concurrent registering clients (register, storm, churn).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Instances to register (register, storm).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    instances: u32,
    /// Services the instances are spread over (register, storm).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    services: u32,
    /// Instances in the queried service (query); live instances each
    /// client keeps (churn).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    size: u32,
    /// Connections the clients or readers share (register, storm, query);
    /// by default one each. Over gRPC their calls are multiplexed.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: Option<u32>,
    /// The node to measure (its gRPC address), or the nodes of a cluster
    /// (comma-separated: writers use the first, subscribers and readers the
    /// last, storms all of them); by default nodes this binary starts for
    /// the run.
    #[arg(long)]
    pub server: Option<String>,
    /// The `roster` binary the nodes started for the run are (by default
    /// this one): one bench measuring two server builds.
    #[arg(long, value_name = "PATH")]
    pub node_binary: Option<std::path::PathBuf>,
    /// Roster nodes to start as one cluster for the run, when no
    /// `--server` is given (the snapshot shape starts one more).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    nodes: u32,
    /// Instances per registration call (register, nacos-grpc only): each
    /// client registers its instances `batch` at a time, one
    /// `BatchInstanceRequest` per service. 1: one instance per call.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// Concurrent readers (query).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    readers: u32,
    /// How long readers or churning clients run (query, churn).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Subscribers of the changed service (push, churn).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    subscribers: u32,
    /// Changes made (push); each is a new weight, so at most 9999.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=9_999))]
    changes: u32,
    /// Pause between changes (push).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Registrations and deregistrations per second, all clients
    /// together (churn).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// PID of the server when `--server` names a local one (for its CPU
    /// time and memory; of a cluster: the last node's, where subscribers
    /// and readers are).
    #[arg(long)]
    pid: Option<u32>,
    /// Give up on the whole run after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    limit: Duration,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    samples: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            samples: h.len(),
        }
    }
}

/// A histogram of microseconds from 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` in microseconds (clamped to the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// What a shape measured.
pub struct Measured {
    /// Operations done (registrations, queries, deliveries).
    pub operations: u64,
    /// Failed operations.
    pub errors: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Latency of each operation.
    pub latency: Histogram<u64>,
    /// Shape-specific figures.
    pub extra: BTreeMap<&'static str, Value>,
    /// Instances the server holds at the end (for bytes per instance).
    pub instances_held: u64,
    /// What keeps those instances registered until the report is made.
    pub hold: Vec<Box<dyn std::any::Any + Send>>,
}

/// One run's report (`--json` prints it as one object).
#[derive(Debug, Serialize)]
pub struct Report {
    shape: String,
    parameters: Value,
    operations: u64,
    errors: u64,
    elapsed_s: f64,
    throughput_per_s: f64,
    latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_us_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_rss_idle_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_rss_after_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_instance: Option<f64>,
    extra: BTreeMap<&'static str, Value>,
}

/// A server under load: given, or started here.
pub struct Target {
    /// Where it answers.
    pub at: Endpoints,
    /// Its process, if local.
    pub pid: Option<u32>,
    child: Option<Child>,
    /// The data directory of a node started for the run, removed after.
    data_dir: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The limits of a node the bench starts, as `ROSTER_LIMITS_*` values.
const BENCH_LIMITS: &[(&str, &str)] = &[
    ("SESSIONS", "20000000"),
    ("SERVICES", "10000000"),
    ("INSTANCES", "20000000"),
    ("INSTANCES_PER_SERVICE", "10000000"),
    ("INSTANCES_PER_SESSION", "10000000"),
    ("CONNECTIONS", "1000000"),
    ("CONNECTIONS_PER_ADDRESS", "1000000"),
    ("SESSIONS_PER_STREAM", "1000000"),
];

/// The members of a cluster the bench starts: names and cluster ports.
pub struct ClusterPlan {
    members: Vec<(String, String)>,
}

impl ClusterPlan {
    /// `n` members `n1..` on free loopback cluster ports.
    fn new(n: u32) -> Result<Self> {
        let members = (1..=n)
            .map(|i| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                Ok((format!("n{i}"), format!("127.0.0.1:{port}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self { members })
    }
}

/// Starts `<roster> server` on free loopback ports (it prints the
/// addresses it bound) and waits until it answers; with a plan, as member
/// `member` of that cluster, and until it is ready.
async fn spawn_server(roster: &Path, cluster: Option<(&ClusterPlan, usize)>) -> Result<Target> {
    // A data directory of its own, so a run leaves nothing behind.
    let suffix = cluster.map_or(String::new(), |(_, m)| format!("-n{}", m + 1));
    let data_dir =
        std::env::temp_dir().join(format!("roster-bench-{}{suffix}", std::process::id()));
    let mut command = Command::new(roster);
    command.args(["server", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"]);
    if let Some((plan, me)) = cluster {
        command
            .args(["--node-name", &plan.members[me].0])
            .args(["--cluster", &plan.members[me].1])
            .args(
                plan.members
                    .iter()
                    .flat_map(|(n, a)| ["--member".to_owned(), format!("{n}={a}")]),
            )
            // Members started later (the snapshot shape's) do not hold up
            // the first ones for long.
            .env("ROSTER_CLUSTER_READY_ALONE_AFTER", "2s");
    }
    let mut child = command
        .arg("--data-dir")
        .arg(&data_dir)
        .env("ROSTER_LOG", "warn")
        // The bench is its own node's only client: the limits that keep one
        // client from taking a shared node over would only cut the shapes
        // short (a million instances from eight sessions, ten thousand
        // subscriber connections from one address).
        .envs(
            BENCH_LIMITS
                .iter()
                .map(|(k, v)| (format!("ROSTER_LIMITS_{k}"), *v)),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start a local server")?;
    let stdout = child.stdout.take().context("no server output")?;
    let mut target = Target {
        at: Endpoints {
            grpc: String::new(),
            http: String::new(),
        },
        pid: Some(child.id()),
        child: Some(child),
        data_dir: Some(data_dir),
    };
    let line = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        }),
    )
    .await
    .context("the local server did not start within 15 s")???;
    let bound = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
            .with_context(|| format!("unexpected server output {line:?}"))
    };
    target.at.grpc = bound("grpc=")?;
    target.at.http = bound("http=")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Connection::connect(&target.at.grpc).await.is_err() {
        if Instant::now() >= deadline {
            bail!("the local server at {} does not answer", target.at.grpc);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if cluster.is_some() {
        wait_ready(&target.at.http, Duration::from_secs(30)).await?;
    }
    Ok(target)
}

/// Waits until the node at `http` answers `/readyz` with 200.
pub async fn wait_ready(http: &str, limit: Duration) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    loop {
        let ready = client
            .get(format!("http://{http}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the node at {http} is not ready after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The nodes under load and, for the snapshot shape, how to start one
/// more member later.
pub struct Targets {
    /// The nodes, in order.
    pub nodes: Vec<Target>,
    /// The cluster and the `roster` binary, when the bench started it.
    pub started: Option<(ClusterPlan, PathBuf)>,
}

impl Targets {
    /// The node subscribers and readers use (the last): the one measured.
    fn measured(&self) -> &Target {
        self.nodes.last().expect("at least one node")
    }

    /// Starts the cluster's member `member` (one the plan holds but that
    /// was not started).
    pub async fn start_member(&self, member: usize) -> Result<Target> {
        let (plan, roster) = self
            .started
            .as_ref()
            .context("only a cluster the bench starts can take a new node")?;
        spawn_server(roster, Some((plan, member))).await
    }

    /// A counter of a Roster node's `/metrics` (0 if absent).
    pub async fn metric(at: &Endpoints, name: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("http://{}/metrics", at.http)).await else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A progress bar for `total` operations, drawn only on a terminal and
/// only once a run lasts over a second.
pub fn progress(total: u64, what: &str) -> ProgressBar {
    progress_bar(
        total,
        what,
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len}",
    )
}

/// A progress bar over a run of `length` (shapes that run for a time):
/// it shows the share of the time gone, not a count.
pub fn timed_progress(length: Duration, what: &str) -> ProgressBar {
    progress_bar(
        length.as_millis() as u64,
        what,
        "{msg} [{elapsed_precise}] {wide_bar} {percent}% of the run",
    )
}

fn progress_bar(total: u64, what: &str, template: &str) -> ProgressBar {
    // Hidden at first: short runs print nothing but their report.
    let bar = ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    let shown = bar.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !shown.is_finished() {
            // Draws only when stderr is a terminal.
            shown.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
        }
    });
    bar
}

/// Runs one shape against the node at `server` (its gRPC address), or
/// against a node started by running the `roster` binary at `roster`, and
/// prints its report.
pub async fn run(
    server: Option<&str>,
    json_output: bool,
    args: BenchArgs,
    roster: &Path,
) -> Result<()> {
    if args.batch > 1 && (args.shape != Shape::Register || args.protocol != Protocol::NacosGrpc) {
        bail!("--batch needs the register shape and --protocol nacos-grpc");
    }
    if args.shape == Shape::Snapshot && server.is_some() {
        bail!("the snapshot shape starts its own cluster: give --nodes, not --server");
    }
    let targets = match server {
        Some(list) => {
            let addrs: Vec<&str> = list.split(',').map(str::trim).collect();
            let last = addrs.len() - 1;
            let nodes = addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| {
                    Ok(Target {
                        at: Endpoints {
                            grpc: (*addr).to_owned(),
                            http: match (&args.http, args.protocol) {
                                (Some(http), _) if addrs.len() == 1 => http.clone(),
                                (_, Protocol::NacosHttp) => nacos_http_address(addr)?,
                                // The HTTP port of a Nacos-style node, for
                                // Roster's /metrics when it is one.
                                _ => nacos_http_address(addr).unwrap_or_default(),
                            },
                        },
                        pid: if i == last { args.pid } else { None },
                        child: None,
                        data_dir: None,
                    })
                })
                .collect::<Result<_>>()?;
            Targets {
                nodes,
                started: None,
            }
        }
        None if args.nodes == 1 && args.shape != Shape::Snapshot => Targets {
            nodes: vec![spawn_server(roster, None).await?],
            started: None,
        },
        None => {
            // The snapshot shape's new node is a member from the start.
            let extra = u32::from(args.shape == Shape::Snapshot);
            let plan = ClusterPlan::new(args.nodes + extra)?;
            let mut starting = Vec::new();
            for m in 0..args.nodes as usize {
                starting.push(spawn_server(roster, Some((&plan, m))));
            }
            let nodes = futures_util::future::try_join_all(starting).await?;
            Targets {
                nodes,
                started: Some((plan, roster.to_owned())),
            }
        }
    };
    let target = targets.measured();
    let pid = target.pid;
    let rss_idle = pid.and_then(procfs::resident_bytes);
    let cpu_before = pid.and_then(procfs::cpu_time);
    let shape = args.shape;
    let parameters = parameters(&args);
    let origin = (targets.nodes.len() > 1).then(|| &targets.nodes[0]);
    let origin_before = match origin {
        Some(o) => Some(Replicated::read(o).await),
        None => None,
    };
    let mut measured = tokio::time::timeout(args.limit, shapes::run(&targets, &args))
        .await
        .with_context(|| format!("the run did not finish within --limit {:?}", args.limit))??;
    let cpu_after = pid.and_then(procfs::cpu_time);
    if let (Some(o), Some(before)) = (origin, origin_before) {
        let after = Replicated::read(o).await;
        // Figures a Roster node exports; another server's are left out.
        if !after.lag.is_empty() {
            let (bytes, instances) = (
                after.bytes - before.bytes,
                after.instances - before.instances,
            );
            let extra = &mut measured.extra;
            extra.insert("origin_replication_bytes_sent", json!(bytes));
            extra.insert("origin_replication_instances_sent", json!(instances));
            if instances > 0.0 {
                extra.insert("replication_bytes_per_instance", json!(bytes / instances));
            }
            // From a write on the first node to a peer's acknowledgement of
            // having applied it, read off the node's histogram (to 25 %).
            for (key, q) in [
                ("replication_lag_p50_ms_at_most", 0.5),
                ("replication_lag_p99_ms_at_most", 0.99),
            ] {
                extra.insert(key, json!(after.lag_quantile_ms(&before, q)));
            }
            if let (Some(b), Some(a)) = (before.cpu, after.cpu) {
                let cpu = a.saturating_sub(b).as_secs_f64() * 1e6;
                extra.insert(
                    "origin_cpu_us_per_op",
                    json!(cpu / measured.operations.max(1) as f64),
                );
            }
        }
    }
    let rss_after = pid.and_then(procfs::resident_bytes);
    let ops = measured.operations.max(1);
    let report = Report {
        shape: format!("{shape:?}").to_lowercase(),
        parameters,
        operations: measured.operations,
        errors: measured.errors,
        elapsed_s: measured.elapsed.as_secs_f64(),
        throughput_per_s: measured.operations as f64 / measured.elapsed.as_secs_f64().max(1e-9),
        latency: Latency::of(&measured.latency),
        server_cpu_us_per_op: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| a.saturating_sub(b).as_secs_f64() * 1e6 / ops as f64),
        server_rss_idle_bytes: rss_idle,
        server_rss_after_bytes: rss_after,
        bytes_per_instance: rss_idle
            .zip(rss_after)
            .filter(|_| measured.instances_held > 0)
            .map(|(i, a)| a.saturating_sub(i) as f64 / measured.instances_held as f64),
        extra: measured.extra,
    };
    drop(measured.hold);
    drop(targets);
    if json_output {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if report.errors > 0 {
        bail!(
            "{} of {} operations failed",
            report.errors,
            report.operations + report.errors
        );
    }
    Ok(())
}

/// What a cluster's first node (where writes land) has replicated so far.
struct Replicated {
    bytes: f64,
    instances: f64,
    cpu: Option<Duration>,
    /// `roster_replication_lag_seconds` buckets: (upper bound, count).
    lag: Vec<(f64, f64)>,
}

impl Replicated {
    async fn read(t: &Target) -> Self {
        let text = match reqwest::get(format!("http://{}/metrics", t.at.http)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let sum = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let lag = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("roster_replication_lag_seconds_bucket{le=\"")?;
                let (le, count) = rest.split_once("\"} ")?;
                Some((le.parse().unwrap_or(f64::INFINITY), count.parse().ok()?))
            })
            .collect();
        Self {
            bytes: sum("roster_replication_bytes_total{direction=\"sent\"}"),
            instances: sum("roster_replication_instances_sent_total"),
            cpu: t.pid.and_then(procfs::cpu_time),
            lag,
        }
    }

    /// The bucket bound under which the share `q` of the batches acked
    /// between `before` and `self` fell (milliseconds), if any were.
    fn lag_quantile_ms(&self, before: &Self, q: f64) -> Option<f64> {
        let counts: Vec<(f64, f64)> = self
            .lag
            .iter()
            .map(|(le, n)| {
                let was = before
                    .lag
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |x| x.1);
                (*le, n - was)
            })
            .collect();
        let total = counts.last()?.1;
        (total > 0.0).then(|| {
            counts
                .iter()
                .find(|(_, n)| *n >= q * total)
                .map_or(f64::INFINITY, |(le, _)| le * 1e3)
        })
    }
}

/// The Nacos HTTP address for a gRPC address: its port minus 1000.
fn nacos_http_address(grpc: &str) -> Result<String> {
    let (host, port) = grpc
        .rsplit_once(':')
        .with_context(|| format!("--server {grpc:?} is not host:port"))?;
    let port: u16 =
        port.parse().ok().filter(|p| *p > 1000).with_context(|| {
            format!("--server {grpc:?}: cannot derive the HTTP port; give --http")
        })?;
    Ok(format!("{host}:{}", port - 1000))
}

fn parameters(a: &BenchArgs) -> Value {
    let mut v = match a.shape {
        Shape::Register | Shape::Storm => json!({
            "clients": a.clients, "instances": a.instances, "services": a.services,
            "connections": a.connections.unwrap_or(a.clients).min(a.clients),
            "batch": a.batch,
        }),
        Shape::Query => json!({
            "readers": a.readers, "size": a.size, "duration_s": a.duration.as_secs_f64(),
            "connections": a.connections.unwrap_or(a.readers).min(a.readers),
        }),
        Shape::Push => {
            json!({"subscribers": a.subscribers, "changes": a.changes, "interval_ms": a.interval.as_millis() as u64})
        }
        Shape::Churn => json!({
            "clients": a.clients, "subscribers": a.subscribers, "rate_per_s": a.rate,
            "live_per_client": a.size, "duration_s": a.duration.as_secs_f64(),
        }),
        Shape::Snapshot => json!({
            "clients": a.clients, "instances": a.instances, "services": a.services,
        }),
    };
    if let Some(list) = &a.server {
        v["nodes"] = json!(list.split(',').count());
    } else {
        v["nodes"] = json!(a.nodes);
    }
    v["protocol"] = json!(
        a.protocol
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
    );
    v
}

fn print_table(r: &Report) {
    let rows: Vec<(String, String)> = [
        ("shape", r.shape.clone()),
        ("parameters", plain(&r.parameters)),
        ("operations", r.operations.to_string()),
        ("errors", r.errors.to_string()),
        ("elapsed", format!("{:.3} s", r.elapsed_s)),
        ("throughput", format!("{:.0} /s", r.throughput_per_s)),
        (
            "latency p50 / p90 / p99 / max",
            format!(
                "{} / {} / {} / {} µs",
                r.latency.p50_us, r.latency.p90_us, r.latency.p99_us, r.latency.max_us
            ),
        ),
        (
            "server CPU per operation",
            r.server_cpu_us_per_op
                .map_or("n/a (not a local process)".into(), |c| format!("{c:.1} µs")),
        ),
        (
            "server resident memory idle / after",
            match (r.server_rss_idle_bytes, r.server_rss_after_bytes) {
                (Some(i), Some(a)) => format!("{:.1} / {:.1} MiB", mib(i), mib(a)),
                _ => "n/a".into(),
            },
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(
        r.bytes_per_instance
            .map(|b| ("bytes per instance".to_owned(), format!("{b:.0}"))),
    )
    .chain(r.extra.iter().map(|(k, v)| (k.replace('_', " "), plain(v))))
    .collect();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
}

/// A report value for people: latencies as `p50 / p90 / p99 / max µs`,
/// other objects as `key=value` pairs, text unquoted.
fn plain(v: &Value) -> String {
    match v {
        Value::Object(m) if m.contains_key("p99_us") => {
            let at = |k: &str| m.get(k).map_or_else(String::new, Value::to_string);
            format!(
                "{} / {} / {} / {} µs",
                at("p50_us"),
                at("p90_us"),
                at("p99_us"),
                at("max_us")
            )
        }
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}
