//! A three-node cluster of real `roster server` processes on loopback,
//! driven by the `roster` commands as a user would: replication, a node
//! killed with SIGKILL while its client fails over, its restart loading a
//! snapshot, and the whole cluster restarting at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
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
        Self { members, _dir: dir }
    }

    /// Starts member `i` (a new life if it ran before).
    fn start(&mut self, i: usize) {
        let list: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.cluster))
            .collect();
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
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for entry in &list {
            cmd.args(["--member", entry]);
        }
        let mut child = cmd.spawn().expect("spawn roster server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("cluster="), "{line:?}");
        m.process = Some(Running(child));
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
    for i in 0..3 {
        c.start(i);
    }
    for i in 0..3 {
        c.wait_ready(i);
    }
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
    for i in 0..3 {
        c.start(i);
    }
    for i in 0..3 {
        c.wait_ready(i);
    }
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
    for i in 0..3 {
        wait_for("every instance everywhere", || {
            c.listed(i, "payments") == all
        });
    }
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start(i);
    }
    for i in 0..3 {
        c.wait_ready(i);
    }
    for i in 0..3 {
        wait_for("every client registered again, everywhere", || {
            c.listed(i, "payments") == all
        });
    }
}
