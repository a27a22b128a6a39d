//! A cluster of real `roster server` processes on loopback, driven by the
//! `roster` commands as a user would: replication, a node killed with
//! SIGKILL while its client fails over, its restart loading a snapshot, the
//! whole cluster restarting at once, a partition healing, one of two
//! networks failing, and a member with the wrong secret refused. Networks
//! and partitions are TCP proxies between the members that can be cut.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_roster");
const WAIT: Duration = Duration::from_secs(20);

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound and released: the node binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP proxy on loopback standing for one network path between two
/// members: cut, it resets the connections through it and refuses new
/// ones (until healed).
struct Proxy {
    address: String,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn to(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (target, c, o) = (target.to_owned(), cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // Under the lock `cut` takes: a connection is either cut
                // with the others or refused.
                let mut open = o.lock().unwrap();
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                open.retain(|s| s.peer_addr().is_ok());
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                drop(open);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { address, cut, open }
    }

    fn cut(&self) {
        let mut open = self.open.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for s in open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// One member: its addresses and data directory, and its process while
/// it runs.
struct Member {
    name: String,
    http: String,
    grpc: String,
    cluster: String,
    data: PathBuf,
    process: Option<Running>,
}

struct Cluster {
    members: Vec<Member>,
    /// `paths[i][j]`: the proxies member i reaches member j through (one
    /// per network); empty: i reaches j directly.
    paths: Vec<Vec<Vec<Proxy>>>,
    /// Environment every member starts with.
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members = (1..=n)
            .map(|i| Member {
                name: format!("n{i}"),
                http: format!("127.0.0.1:{}", free_port()),
                grpc: format!("127.0.0.1:{}", free_port()),
                cluster: format!("127.0.0.1:{}", free_port()),
                data: dir.path().join(format!("n{i}")),
                process: None,
            })
            .collect();
        let env = vec![("ROSTER_CLUSTER_SECRET".into(), "s3cret".into())];
        let paths = (0..n)
            .map(|_| (0..n).map(|_| Vec::new()).collect())
            .collect();
        Self {
            members,
            paths,
            env,
            _dir: dir,
        }
    }

    /// Puts `networks` proxies on every path between two members.
    fn with_networks(mut self, networks: usize) -> Self {
        let n = self.members.len();
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                self.paths[i][j] = (0..networks)
                    .map(|_| Proxy::to(&self.members[j].cluster))
                    .collect();
            }
        }
        self
    }

    fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Cuts (or heals) network `net` on every path to and from member `i`.
    fn isolate(&self, i: usize, net: usize, cut: bool) {
        for (a, b) in (0..self.members.len())
            .filter(|&j| j != i)
            .flat_map(|j| [(i, j), (j, i)])
        {
            let p = &self.paths[a][b][net];
            if cut { p.cut() } else { p.heal() }
        }
    }

    /// Starts member `i` (a new life if it ran before).
    fn start(&mut self, i: usize) {
        let list: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .map(|(j, m)| {
                let via = &self.paths[i][j];
                let addresses = if via.is_empty() {
                    m.cluster.clone()
                } else {
                    let a: Vec<&str> = via.iter().map(|p| p.address.as_str()).collect();
                    a.join(",")
                };
                format!("{}={addresses}", m.name)
            })
            .collect();
        let log = self._dir.path().join(format!("n{}.stderr", i + 1));
        // A port picked free may be taken meanwhile by another process's
        // connection (ephemeral ports): the client ports are picked again
        // and the start retried; the cluster port is the members' to know.
        for attempt in 1..=3 {
            let m = &mut self.members[i];
            let mut cmd = Command::new(BIN);
            cmd.arg("server")
                .args(["--node-name", &m.name])
                .args([
                    "--http",
                    &m.http,
                    "--grpc",
                    &m.grpc,
                    "--cluster",
                    &m.cluster,
                ])
                .arg("--data-dir")
                .arg(&m.data)
                // Rounds of a second: a dead member's data goes within 3 s.
                .env("ROSTER_CLUSTER_VERIFY_INTERVAL", "1s")
                .env("ROSTER_CLUSTER_READY_ALONE_AFTER", "3s")
                .env("ROSTER_CLUSTER_SNAPSHOT_TIMEOUT", "1s")
                .env("ROSTER_LOG", "warn")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap());
            for entry in &list {
                cmd.args(["--member", entry]);
            }
            let mut child = cmd.spawn().expect("spawn roster server");
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            if line.contains("cluster=") {
                m.process = Some(Running(child));
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(attempt < 3, "n{} did not start: {line:?} {said}", i + 1);
            eprintln!("n{} did not start (attempt {attempt}): {said}", i + 1);
            m.http = format!("127.0.0.1:{}", free_port());
            m.grpc = format!("127.0.0.1:{}", free_port());
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Starts every member at once, then waits until each is ready.
    fn start_all(&mut self) {
        let n = self.members.len();
        for i in 0..n {
            self.start(i);
        }
        for i in 0..n {
            self.wait_ready(i);
        }
    }

    /// Waits until every member lists exactly `ids` in `service`.
    fn wait_listed_everywhere(&self, what: &str, service: &str, ids: &[String]) {
        for i in 0..self.members.len() {
            wait_for(what, || self.listed(i, service) == ids);
        }
    }

    /// SIGKILL: no goodbye to anyone.
    fn kill(&mut self, i: usize) {
        let mut p = self.members[i].process.take().expect("running");
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }

    /// Every gRPC address, member `first` first.
    fn grpc_all(&self, first: usize) -> String {
        let mut all = vec![self.members[first].grpc.clone()];
        all.extend(
            (0..self.members.len())
                .filter(|&j| j != first)
                .map(|j| self.members[j].grpc.clone()),
        );
        all.join(",")
    }

    fn wait_ready(&self, i: usize) {
        let http = &self.members[i].http;
        wait_for(&format!("{} ready", self.members[i].name), || {
            get(http, "/readyz").is_some_and(|(status, _)| status == 200)
        });
    }

    /// The instance ids `roster list` shows on member `i`.
    fn listed(&self, i: usize, service: &str) -> Vec<String> {
        let o = roster(&self.members[i].grpc, &["--json", "list", service]);
        if !o.status.success() {
            return vec!["<error>".into()];
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut ids: Vec<String> = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }

    /// The value of the first metric line of member `i` starting with
    /// `prefix` (0 if none).
    fn metric(&self, i: usize, prefix: &str) -> f64 {
        let text = get(&self.members[i].http, "/metrics").expect("metrics").1;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    fn members_json(&self, i: usize) -> serde_json::Value {
        let o = roster(&self.members[i].grpc, &["--json", "members"]);
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// What member `i` holds from `origin`: (sessions, instances).
    fn held_from(&self, i: usize, origin: &str) -> (u64, u64) {
        let v = self.members_json(i);
        let m = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == origin)
            .unwrap_or_else(|| panic!("{origin} in {v}"))
            .clone();
        (
            m["sessions"].as_u64().unwrap(),
            m["instances"].as_u64().unwrap(),
        )
    }
}

/// A plain HTTP/1.0 GET: (status, body), or none if nothing answers.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn roster(server: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--server")
        .arg(server)
        .args(args)
        .output()
        .expect("run roster")
}

/// Spawns a long-running subcommand; its stdout lines arrive on the channel.
fn spawn(server: &str, args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("--server")
        .arg(server)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Running(child), rx)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ID: &str = "10.9.0.1#8080#DEFAULT";

#[test]
fn replicates_survives_a_killed_node_and_reloads_it_from_a_snapshot() {
    let mut c = Cluster::new(3);
    c.start_all();
    // A watcher on n3, a registering client on n1 (given every node).
    let (_watch, lines) = spawn(&c.members[2].grpc, &["--json", "watch", "orders"]);
    let (_register, registered) = spawn(
        &c.grpc_all(0),
        &["register", "orders", "--ip", "10.9.0.1", "--port", "8080"],
    );
    let first = registered.recv_timeout(WAIT).expect("registered");
    assert!(first.contains(&c.members[0].grpc), "{first}");
    for i in 1..3 {
        wait_for("the instance on every node", || {
            c.listed(i, "orders") == [ID]
        });
    }
    wait_for("the push on n3", || {
        lines
            .try_iter()
            .any(|l| l.contains("\"added\"") && l.contains("10.9.0.1"))
    });
    assert_eq!(c.held_from(1, "n1"), (1, 1));

    // n1 dies: the client fails over and registers again elsewhere.
    c.kill(0);
    wait_for("n1's replicas dropped on n2 and n3", || {
        (1..3).all(|i| c.held_from(i, "n1") == (0, 0))
    });
    for i in 1..3 {
        assert_eq!(c.listed(i, "orders"), [ID], "nothing alive is lost");
    }
    // The watcher never saw the instance go (its lines of the moment the
    // replicas went are given a second to arrive).
    std::thread::sleep(Duration::from_secs(1));
    let seen: Vec<String> = lines.try_iter().collect();
    assert!(
        seen.iter().all(|l| !l.contains("\"removed\":[\"10.9.0.1")),
        "a removal flapped: {seen:?}"
    );

    // n1 comes back: not ready until it loaded a snapshot, then it lists
    // the instance it never saw registered.
    c.start(0);
    c.wait_ready(0);
    assert_eq!(c.listed(0, "orders"), [ID]);
    let metrics = get(&c.members[0].http, "/metrics").unwrap().1;
    let loads = metrics
        .lines()
        .find(|l| l.starts_with("roster_replication_snapshot_loads_total"))
        .unwrap_or_default();
    assert!(loads.ends_with(" 1"), "{loads:?}");
}

#[test]
fn the_whole_cluster_restarting_at_once_loses_nothing_its_clients_hold() {
    let mut c = Cluster::new(3);
    c.start_all();
    let mut clients = Vec::new();
    for (k, first) in [0, 1, 2, 0].into_iter().enumerate() {
        let ip = format!("10.9.1.{}", k + 1);
        let (p, rx) = spawn(
            &c.grpc_all(first),
            &["register", "payments", "--ip", &ip, "--port", "8080"],
        );
        rx.recv_timeout(WAIT).expect("registered");
        clients.push((p, rx));
    }
    let all: Vec<String> = (1..=4)
        .map(|k| format!("10.9.1.{k}#8080#DEFAULT"))
        .collect();
    c.wait_listed_everywhere("every instance everywhere", "payments", &all);
    for i in 0..3 {
        c.kill(i);
    }
    c.start_all();
    c.wait_listed_everywhere(
        "every client registered again, everywhere",
        "payments",
        &all,
    );
}

/// Registers `ip` in `service` through the nodes `servers` (a comma list),
/// returning the client once it is registered.
fn register(servers: &str, service: &str, ip: &str) -> (Running, mpsc::Receiver<String>) {
    let (p, rx) = spawn(
        servers,
        &["register", service, "--ip", ip, "--port", "8080"],
    );
    rx.recv_timeout(WAIT).expect("registered");
    (p, rx)
}

fn ids(ips: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}#8080#DEFAULT")).collect();
    v.sort();
    v
}

#[test]
fn a_partition_heals_into_one_view_and_a_restart_loads_a_snapshot_of_many_messages() {
    // Two sessions per snapshot chunk: five sessions take three messages.
    let mut c = Cluster::new(3)
        .with_networks(1)
        .with_env("ROSTER_CLUSTER_BATCH_SESSIONS", "2");
    c.start_all();
    let g = |i: usize| c.members[i].grpc.clone();
    let _a = register(&g(0), "inventory", "10.9.2.1");
    let _b = register(&g(2), "inventory", "10.9.2.2");
    let d = register(&g(0), "inventory", "10.9.2.4");
    let before = ids(&["10.9.2.1", "10.9.2.2", "10.9.2.4"]);
    c.wait_listed_everywhere("every instance everywhere", "inventory", &before);

    // n3 is cut off for longer than the verify timeout (3 rounds of 1 s):
    // each side drops the other's replicas. Meanwhile one client joins on
    // n1 and one leaves it.
    c.isolate(2, 0, true);
    let _c = register(&g(0), "inventory", "10.9.2.3");
    drop(d);
    wait_for("n3's replicas dropped on n1", || {
        c.listed(0, "inventory") == ids(&["10.9.2.1", "10.9.2.3"])
    });
    wait_for("n1's replicas dropped on n3", || {
        c.listed(2, "inventory") == ids(&["10.9.2.2"])
    });

    // Healed: one view everywhere, without the instance that left.
    c.isolate(2, 0, false);
    let healed = Instant::now();
    let after = ids(&["10.9.2.1", "10.9.2.2", "10.9.2.3"]);
    for i in 0..3 {
        wait_for("one view after the heal", || {
            c.listed(i, "inventory") == after
        });
        eprintln!("n{} converged {:?} after the heal", i + 1, healed.elapsed());
    }
    let _e = register(&g(1), "inventory", "10.9.2.5");
    let all = ids(&["10.9.2.1", "10.9.2.2", "10.9.2.3", "10.9.2.5"]);
    c.wait_listed_everywhere("the newest everywhere", "inventory", &all);

    // n2 restarts and loads the four sessions held elsewhere (its own
    // client's session is gone with it and comes back by its client) in
    // chunks of two.
    c.kill(1);
    c.start(1);
    c.wait_ready(1);
    wait_for("n2 converged", || c.listed(1, "inventory") == all);
    let chunks = c.metric(
        1,
        "roster_replication_messages_total{kind=\"snapshot_chunk\",direction=\"received\"}",
    );
    assert!(chunks >= 2.0, "the snapshot came in {chunks} messages");
    assert_eq!(c.metric(1, "roster_replication_snapshot_loads_total"), 1.0);
}

#[test]
fn replication_goes_on_over_the_second_network_when_the_first_fails() {
    let mut c = Cluster::new(2).with_networks(2);
    c.start_all();
    let g = |i: usize| c.members[i].grpc.clone();
    let _a = register(&g(0), "billing", "10.9.3.1");
    wait_for("replicated", || {
        c.listed(1, "billing") == ids(&["10.9.3.1"])
    });
    let in_use = |c: &Cluster| {
        let v = c.members_json(0);
        v["members"][1]["in_use"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Whichever network carries n1's messages now (the first, unless n2
    // was not up yet when n1 first tried it) fails on both sides; the
    // other carries on.
    let path = &c.paths[0][1];
    let net = path
        .iter()
        .position(|p| p.address == in_use(&c))
        .expect("an address of n2 in use");
    let other = path[1 - net].address.clone();
    c.isolate(0, net, true);
    let _b = register(&g(0), "billing", "10.9.3.2");
    let _c = register(&g(1), "billing", "10.9.3.3");
    let all = ids(&["10.9.3.1", "10.9.3.2", "10.9.3.3"]);
    c.wait_listed_everywhere("replicated over the other network", "billing", &all);
    assert_eq!(in_use(&c), other);
    // Nothing was dropped on the way: n1's sessions stayed on n2 through
    // verify rounds (1 s each) carried by the second network.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.held_from(1, "n1"), (2, 2));
    assert_eq!(
        c.metric(1, "roster_replication_unverified_dropped_total"),
        0.0
    );
    assert_eq!(c.listed(1, "billing"), all);
}

#[test]
fn a_member_with_another_secret_is_refused() {
    let mut c = Cluster::new(2);
    c.start(0);
    c.env = vec![("ROSTER_CLUSTER_SECRET".into(), "other".into())];
    c.start(1);
    for i in 0..2 {
        c.wait_ready(i);
    }
    let _a = register(&c.members[0].grpc, "ledger", "10.9.4.1");
    wait_for("refusals counted on n1", || {
        c.metric(0, "roster_replication_refused_total") > 0.0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(c.listed(1, "ledger").is_empty(), "nothing crossed");
    assert_eq!(c.held_from(1, "n1"), (0, 0));
}
