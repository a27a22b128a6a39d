//! `roster`: the one binary. `roster server` runs a registry node; the other
//! subcommands are operator and scripting commands against a running node
//! (tables for people, `--json` for scripts). Errors are one line on stderr
//! and a non-zero exit.

mod output;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use roster_client::{Change, Client, Connection, proto};
use roster_core::model::{Address, parse_ip};
use roster_core::{Instance, ServiceKey};

#[derive(Parser)]
#[command(
    name = "roster",
    version,
    about = "Roster: a service registry for very large fleets"
)]
struct Cli {
    /// The registry's gRPC address, for the commands other than `server`
    /// [default: 127.0.0.1:9848; `bench` starts its own node when none is
    /// given]. `register`, `list` and `watch` take several nodes of a
    /// cluster, comma-separated, and fail over between them.
    #[arg(long, env = "ROSTER_SERVER")]
    server: Option<String>,
    /// Machine-readable output (JSON; JSON lines for `watch`), for the
    /// commands other than `server`.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a registry node (single node on loopback by default).
    Server {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: ServerFlags,
    },
    /// The cluster's members as the node knows them: addresses (and which
    /// is in use), state, time since the last verify, sessions and
    /// instances held from each.
    Members,
    /// Run N registry nodes on loopback as one cluster, for trying it on
    /// one machine: each a `roster server` process; their addresses are
    /// printed. Ctrl-C stops them all.
    DevCluster {
        /// How many nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
        nodes: u16,
        /// Node i (from 0) listens on HTTP BASE+10i, gRPC BASE+10i+1 and
        /// cluster BASE+10i+2.
        #[arg(long, default_value_t = 18800)]
        base_port: u16,
        /// Where the nodes keep their data (one directory each).
        #[arg(long, default_value = "roster-dev-cluster")]
        data_dir: PathBuf,
    },
    /// Register an ephemeral instance and keep it alive until interrupted.
    Register {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        at: InstanceArgs,
        /// Weight, 0..=10000.
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        /// Metadata entry (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
        /// The host the instance runs on.
        #[arg(long, default_value = "")]
        node_name: String,
    },
    /// Remove an instance another process registered (an operator's
    /// call: it needs the node's admin token).
    Deregister {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        at: InstanceArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a service's instances.
    List {
        #[command(flatten)]
        service: ServiceArgs,
        /// Only healthy, enabled instances with weight above 0.
        #[arg(long)]
        healthy_only: bool,
    },
    /// List services.
    Services {
        /// Namespace.
        #[arg(long, default_value = "")]
        namespace: String,
        /// Only this group.
        #[arg(long, default_value = "")]
        group: String,
    },
    /// Print one line per pushed change of a service, with its revision.
    Watch {
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Measure a load shape against a node (its own local node unless
    /// `--server` is given): throughput, latency, server CPU and memory.
    Bench(roster_bench::BenchArgs),
    /// Drain an instance (weight 0, or remove) and wait for every subscriber.
    Drain {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        at: InstanceArgs,
        /// Remove the instance instead of setting its weight to 0.
        #[arg(long)]
        remove: bool,
        /// Give up waiting for acknowledgements after this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// The node's admin token (its `admin.token`): an operator may change
    /// instances that other sessions own.
    #[arg(long, env = "ROSTER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

impl AdminArgs {
    /// A connection to `addr` that acts with the admin token.
    async fn connect(&self, addr: &str, what: &str) -> Result<Connection> {
        let Some(token) = self.admin_token.as_deref().filter(|t| !t.is_empty()) else {
            bail!(
                "{what} changes an instance another process registered, which needs the \
                 node's admin token: pass --admin-token or set ROSTER_ADMIN_TOKEN (the node's \
                 admin.token)"
            );
        };
        Ok(Connection::connect(addr).await?.with_admin_token(token)?)
    }
}

#[derive(Args)]
struct ServiceArgs {
    /// Service name.
    service: String,
    /// Namespace (default "public").
    #[arg(long, default_value = "")]
    namespace: String,
    /// Group (default "DEFAULT_GROUP").
    #[arg(long, default_value = "")]
    group: String,
}

impl ServiceArgs {
    fn key(&self) -> Result<ServiceKey> {
        Ok(ServiceKey::new(
            &self.namespace,
            &self.group,
            &self.service,
        )?)
    }
}

#[derive(Args)]
struct InstanceArgs {
    /// The instance's IP (repeat as NETWORK=IP for several networks).
    #[arg(long, required = true)]
    ip: Vec<String>,
    /// The instance's port, 1..=65535.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Cluster (default "DEFAULT").
    #[arg(long, default_value = "")]
    cluster: String,
}

impl InstanceArgs {
    fn addresses(&self) -> Result<Vec<Address>> {
        self.ip
            .iter()
            .map(|text| {
                let (network, ip) = text.split_once('=').unwrap_or(("", text));
                Ok(Address {
                    network: network.to_owned(),
                    ip: parse_ip("--ip", ip)?,
                })
            })
            .collect()
    }

    fn reference(&self, key: &ServiceKey) -> Result<proto::InstanceRef> {
        let first = self.addresses()?.remove(0);
        Ok(proto::InstanceRef {
            service: Some(key.into()),
            id: String::new(),
            ip: first.ip.to_string(),
            port: u32::from(self.port),
            cluster: self.cluster.clone(),
        })
    }
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// mimalloc rather than the system allocator: a registry is millions of
/// small, long-lived allocations, which it packs without per-block headers
/// (measured with `roster bench register` at 1M instances).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let filter = match std::env::var("ROSTER_LOG") {
        Ok(text) => match tracing_subscriber::EnvFilter::try_new(&text) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: ROSTER_LOG={text:?} is not a log filter (e.g. info, debug): {e}");
                std::process::exit(2);
            }
        },
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("error: ROSTER_LOG is not valid Unicode");
            std::process::exit(2);
        }
        Err(std::env::VarError::NotPresent) => {
            tracing_subscriber::EnvFilter::new(if matches!(cli.command, Command::Server { .. }) {
                "info"
            } else {
                "warn"
            })
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Everything runs on the node's runtime, the server included.
    let runtime = match roster_server::runtime().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each said once: a cause whose
/// text the message already holds is left out.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The node commands talk to when `--server` is not given.
const DEFAULT_SERVER: &str = "127.0.0.1:9848";

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let given = cli.server.clone();
    let addr = given.clone().unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    match cli.command {
        Command::Server { config, flags } => server(config, flags).await,
        Command::Members => {
            let client = Connection::connect(&addr).await?;
            let members = client.members().await?;
            output::members(json, &members);
            Ok(())
        }
        Command::DevCluster {
            nodes,
            base_port,
            data_dir,
        } => dev_cluster(nodes, base_port, &data_dir).await,
        Command::Register {
            service,
            at,
            weight,
            meta,
            node_name,
        } => {
            let key = service.key()?;
            let instance = Instance {
                id: String::new(),
                addresses: at.addresses()?,
                port: at.port,
                weight,
                healthy: true,
                enabled: true,
                ephemeral: true,
                cluster: at.cluster.clone(),
                metadata: meta.into_iter().collect(),
                node_name,
            }
            .normalize()?;
            let stop = shutdown_signal();
            let client = sdk(&addr, &format!("roster-cli register {}", key.service)).await?;
            let registration = client.register(&key, instance).await?;
            output::registered(
                json,
                &key,
                registration.instance_id(),
                client.server().as_deref().unwrap_or_default(),
            );
            let id = registration.instance_id().to_owned();
            stop.await;
            let removed = registration.deregister().await;
            client.shutdown().await;
            match removed {
                Ok(()) => {
                    output::deregistered(json, &id);
                    Ok(())
                }
                Err(e) => bail!(
                    "{id} was not deregistered ({e}); the registry removes it when this \
                     client's session expires"
                ),
            }
        }
        Command::Deregister { service, at, admin } => {
            let key = service.key()?;
            let client = admin.connect(&addr, "deregister").await?;
            let revision = client.deregister(at.reference(&key)?).await?;
            output::revision(json, "deregistered", revision);
            Ok(())
        }
        Command::List {
            service,
            healthy_only,
        } => {
            let key = service.key()?;
            let client = sdk(&addr, "roster-cli list").await?;
            let r = client.connection().await?.query(&key, healthy_only).await?;
            client.shutdown().await;
            output::instances(json, &key, r.revision, &r.instances);
            Ok(())
        }
        Command::Services { namespace, group } => {
            let client = Connection::connect(&addr).await?;
            let services = client.list_services(&namespace, &group).await?;
            output::services(json, &services);
            Ok(())
        }
        Command::Watch { service } => watch(&addr, json, service.key()?).await,
        Command::Bench(args) => {
            let server = args.server.clone().or(given);
            let node = match &args.node_binary {
                Some(path) => path.clone(),
                None => {
                    std::env::current_exe().context("cannot find this binary to start a node")?
                }
            };
            roster_bench::run(server.as_deref(), json, args, &node).await
        }
        Command::Drain {
            service,
            at,
            remove,
            timeout,
            admin,
        } => {
            let key = service.key()?;
            let client = admin.connect(&addr, "drain").await?;
            let r = client.drain(at.reference(&key)?, remove, timeout).await?;
            output::drained(json, &r);
            if !r.complete {
                bail!(
                    "{} subscriber(s) did not acknowledge within {}",
                    r.pending.len(),
                    humantime::format_duration(timeout)
                );
            }
            Ok(())
        }
    }
}

/// Where `roster server` keeps its data unless told otherwise.
const DEFAULT_DATA_DIR: &str = "roster-data";

/// The flags of `roster server`, over the configuration.
#[derive(Args)]
struct ServerFlags {
    /// HTTP listen address, host:port (overrides config and
    /// ROSTER_SERVER_HTTP).
    #[arg(long, value_parser = roster_server::config::listen_address)]
    http: Option<SocketAddr>,
    /// gRPC listen address, host:port (overrides config and
    /// ROSTER_SERVER_GRPC).
    #[arg(long, value_parser = roster_server::config::listen_address)]
    grpc: Option<SocketAddr>,
    /// This node's name (overrides config and ROSTER_SERVER_NODE_NAME).
    #[arg(long)]
    node_name: Option<String>,
    /// Where the node keeps its incarnation counter [default:
    /// ./roster-data, unless the config or ROSTER_SERVER_DATA_DIR names one].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where this node listens for its cluster peers, host:port
    /// (overrides config and ROSTER_CLUSTER_LISTEN) [default:
    /// 127.0.0.1:9849; opened only when the node has peers].
    #[arg(long, value_parser = roster_server::config::listen_address)]
    cluster: Option<SocketAddr>,
    /// A cluster member, NAME=HOST:PORT[,HOST:PORT...] (one address per
    /// network), repeatable; this node may be listed too. Replaces the
    /// members of the config and ROSTER_CLUSTER_MEMBERS.
    #[arg(long = "member", value_name = "NAME=ADDR[,ADDR...]")]
    members: Vec<String>,
}

async fn server(config: Option<PathBuf>, flags: ServerFlags) -> Result<()> {
    let ServerFlags {
        http,
        grpc,
        node_name,
        data_dir,
        cluster,
        members,
    } = flags;
    // Variables that are not Unicode are skipped (reading them all as
    // Unicode would panic).
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let mut config = roster_server::Config::load(config.as_deref(), env)?;
    if let Some(a) = http {
        config.server.http = a;
    }
    if let Some(a) = grpc {
        config.server.grpc = a;
    }
    if let Some(name) = node_name {
        roster_core::model::validate_name("--node-name", &name)?;
        config.server.node_name = name;
    }
    match data_dir {
        Some(dir) => config.server.data_dir = dir.to_string_lossy().into_owned(),
        None if config.server.data_dir.is_empty() => {
            config.server.data_dir = DEFAULT_DATA_DIR.into();
        }
        None => {}
    }
    if let Some(a) = cluster {
        config.cluster.listen = a;
    }
    if !members.is_empty() {
        config.cluster.members = members;
        config.check_cluster()?;
    }
    let stop = shutdown_signal();
    let server = roster_server::start(config).await?;
    // Scripts and tests read the bound addresses from this line.
    match server.cluster_addr {
        Some(c) => println!(
            "roster listening: grpc={} http={} cluster={c}",
            server.grpc_addr, server.http_addr
        ),
        None => println!(
            "roster listening: grpc={} http={}",
            server.grpc_addr, server.http_addr
        ),
    }
    tokio::select! {
        _ = stop => tracing::info!("shutting down"),
        _ = server.wait() => {}
    }
    server.shutdown().await;
    Ok(())
}

/// `roster dev-cluster`: N `roster server` processes on loopback, members
/// of one cluster, until Ctrl-C (or until one of them exits).
async fn dev_cluster(nodes: u16, base: u16, data_dir: &std::path::Path) -> Result<()> {
    let me = std::env::current_exe().context("cannot find this binary to start the nodes")?;
    let port = |i: u16, k: u16| -> Result<u16> {
        base.checked_add(i * 10 + k)
            .context("--base-port is too high for that many nodes")
    };
    let mut members = Vec::new();
    for i in 0..nodes {
        members.push(format!("n{}=127.0.0.1:{}", i + 1, port(i, 2)?));
    }
    let stop = shutdown_signal();
    let mut children = Vec::new();
    for i in 0..nodes {
        let name = format!("n{}", i + 1);
        let mut cmd = std::process::Command::new(&me);
        cmd.arg("server")
            .args(["--node-name", &name])
            .args(["--http", &format!("127.0.0.1:{}", port(i, 0)?)])
            .args(["--grpc", &format!("127.0.0.1:{}", port(i, 1)?)])
            .args(["--cluster", &format!("127.0.0.1:{}", port(i, 2)?)])
            .arg("--data-dir")
            .arg(data_dir.join(&name))
            .stdout(std::process::Stdio::null());
        for m in &members {
            cmd.args(["--member", m]);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {name}"))?;
        children.push((name, child));
    }
    println!("roster dev cluster of {nodes} node(s) on loopback (Ctrl-C stops it):");
    for i in 0..nodes {
        println!(
            "  n{}: grpc=127.0.0.1:{} http=127.0.0.1:{} cluster=127.0.0.1:{}",
            i + 1,
            port(i, 1)?,
            port(i, 0)?,
            port(i, 2)?
        );
    }
    let grpc: Vec<String> = (0..nodes)
        .map(|i| port(i, 1).map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    println!(
        "  clients: give them every gRPC address: {}",
        grpc.join(",")
    );
    // Wait for Ctrl-C, or for a node to exit (its error is on stderr).
    tokio::pin!(stop);
    let failed = loop {
        tokio::select! {
            _ = &mut stop => break None,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if let Some((name, status)) = children
            .iter_mut()
            .find_map(|(n, c)| c.try_wait().ok().flatten().map(|s| (n.clone(), s)))
        {
            break Some((name, status));
        }
    };
    for (_, child) in &mut children {
        // SIGTERM: each node shuts down cleanly.
        #[cfg(unix)]
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        #[cfg(not(unix))]
        let _ = child.kill();
    }
    for (_, child) in &mut children {
        let _ = child.wait();
    }
    match failed {
        Some((name, status)) => bail!("node {name} exited ({status}); the cluster was stopped"),
        None => Ok(()),
    }
}

/// Ctrl-C or SIGTERM: listened for from the call on (not from the first
/// poll), so a signal that comes right after a command said it is ready is
/// not lost to the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut i), Ok(mut t)) => {
                    tokio::select! {
                        _ = i.recv() => {}
                        _ = t.recv() => {}
                    }
                }
                (Ok(mut i), Err(_)) => {
                    i.recv().await;
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A client of the SDK for one command: it must reach the registry.
async fn sdk(server: &str, name: &str) -> Result<Client> {
    Ok(sdk_builder(server, name).build().await?)
}

fn sdk_builder(server: &str, name: &str) -> roster_client::ClientBuilder {
    // Several nodes of a cluster, comma-separated: tried in order, and in
    // turn when one fails.
    let addresses = server.split(',').map(str::trim).filter(|a| !a.is_empty());
    Client::builder()
        .addresses(addresses)
        .client_name(name)
        .require_connection(true)
}

async fn watch(server: &str, json: bool, key: ServiceKey) -> Result<()> {
    // A watcher shows every change as it happens, the last instance going
    // away included: empty-push protection is for choosing instances.
    let client = sdk_builder(server, &format!("roster-cli watch {}", key.service))
        .empty_push_protection(false)
        .build()
        .await?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut updates = client.subscribe(&key).await?;
    // The view, kept from the changes, to show what a removal removed.
    let mut view: HashMap<String, Arc<Instance>> = HashMap::new();
    loop {
        let update = tokio::select! {
            u = updates.next() => u,
            _ = &mut stop => break,
        };
        let Some(update) = update else {
            bail!("the client stopped");
        };
        let removed = match &update.change {
            Change::Reset(all) => {
                view = all.iter().map(|i| (i.id.clone(), i.clone())).collect();
                None
            }
            Change::Added(i) | Change::Changed(i) => {
                view.insert(i.id.clone(), i.clone());
                None
            }
            Change::Removed(id) => view.remove(id),
        };
        output::watched(json, &update, view.len(), removed.as_deref());
    }
    client.shutdown().await;
    Ok(())
}
