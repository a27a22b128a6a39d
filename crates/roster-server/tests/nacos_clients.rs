//! Real Nacos clients in other languages against a Roster node on free
//! loopback ports, each driven by a script that exits non-zero on failure:
//! - `tests/python/nacos_clients.py`: `nacos-sdk-python==2.0.11`, which
//!   registers with its HTTP v1 client, lists and subscribes with its gRPC
//!   client, and checks pushes both ways;
//! - `tests/node/nacos_naming.js`: npm `nacos@2.6.3` (HTTP v1 and UDP push);
//! - `tests/python/nacos_cluster.py`: the Python gRPC client against a
//!   three-node cluster.
//!
//! Their environments are made under `target/` by `scripts/test.sh` (the
//! README's test command), or named by `ROSTER_NACOS_PYTHON` /
//! `ROSTER_NACOS_NODE_MODULES`. Without them a test fails, saying how to
//! get them: it never passes without running.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roster_server::{Config, RunningServer};

mod common;
use common::{cluster_configs, listed_by_the_living, start_cluster, start_with};

/// The scripts bound themselves; this bounds a hung interpreter.
const LIMIT: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$var`, else `target/<default>`, which must exist.
fn environment(var: &str, default: &str) -> PathBuf {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target").join(default));
    assert!(
        found.exists(),
        "{} is missing: `bash scripts/test.sh` installs the Nacos clients these tests drive (or set {var})",
        found.display()
    );
    found
}

async fn server() -> RunningServer {
    start_with(|_| {}).await
}

/// Runs `command` to completion (or kills it after [`LIMIT`]) and asserts
/// it succeeded and printed `ok_line`.
async fn run(mut command: Command, ok_line: &'static str) {
    let outcome = tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    assert!(
        outcome.status.success() && stdout.contains(ok_line),
        "client failed ({}):\n{stdout}\n{stderr}",
        outcome.status
    );
}

/// The lines `child` prints, as they come.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn script(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_and_grpc_clients_share_one_registry() {
    let python = environment("ROSTER_NACOS_PYTHON", "nacos-python/bin/python");
    let server = server().await;
    let work = tempfile::tempdir().unwrap();
    let mut command = Command::new(python);
    command
        .arg(script("tests/python/nacos_clients.py"))
        .arg(server.http_addr.port().to_string())
        .arg(server.grpc_addr.port().to_string())
        .arg(work.path());
    run(command, "python nacos clients: ok").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_registers_and_is_pushed_over_udp() {
    let modules = environment("ROSTER_NACOS_NODE_MODULES", "nacos-node/node_modules");
    let server = server().await;
    let mut command = Command::new("node");
    command
        .env("NODE_PATH", modules)
        .arg(script("tests/node/nacos_naming.js"))
        .arg(server.http_addr.port().to_string());
    run(command, "node nacos client: ok").await;
    server.shutdown().await;
}

/// The Python gRPC client, when its node restarts, redials its connection
/// without a stream; its health check must then fail (not answer "3xx",
/// which it takes as healthy) so that it reconnects and registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_client_registers_again_after_the_node_restarts() {
    let python = environment("ROSTER_NACOS_PYTHON", "nacos-python/bin/python");
    let first = server().await;
    let (http, grpc) = (first.http_addr, first.grpc_addr);
    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(python)
        .arg(script("tests/python/nacos_restart.py"))
        .arg(http.port().to_string())
        .arg(grpc.port().to_string())
        .arg(work.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    let line = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the client started");
    assert_eq!(line, "registered");
    let key = roster_core::ServiceKey::simple("py-restart").unwrap();
    let listed = |server: &RunningServer| {
        server
            .node
            .view(&key)
            .is_some_and(|p| p.instances.contains_key("10.9.9.9#9999#DEFAULT"))
    };
    assert!(listed(&first));
    first.shutdown().await;

    // The same ports, a new life: the client must come back by itself (it
    // redoes its registrations within about 30 s of reconnecting).
    let mut config = Config::default();
    config.server.http = http;
    config.server.grpc = grpc;
    let second = roster_server::start(config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !listed(&second) {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the Python client did not register again after the restart");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(child.stdin.take());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    second.shutdown().await;
}

/// The Python gRPC client given every node of a three-node cluster: a
/// subscriber on the other nodes is pushed its registration; when its node
/// dies it registers again on another, listed by every living node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_client_against_a_cluster_is_pushed_across_nodes_and_fails_over() {
    let python = environment("ROSTER_NACOS_PYTHON", "nacos-python/bin/python");
    let configs = cluster_configs(3);
    let mut nodes = start_cluster(&configs).await;
    let http = |i: usize| configs[i].server.http.to_string();
    let all = (0..3).map(http).collect::<Vec<_>>().join(",");
    let work = tempfile::tempdir().unwrap();
    let mut registrar = Command::new(&python)
        .arg(script("tests/python/nacos_cluster.py"))
        .args(["register", &all, "1000"])
        .arg(work.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut registrar);
    let line = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the client started");
    assert_eq!(line, "registered");
    let id = "10.7.0.1#8080#DEFAULT";
    let wait = Duration::from_secs(20);
    let on = listed_by_the_living(&nodes, "py-cluster", id, wait).await;
    let at: usize = on[1..].parse::<usize>().unwrap() - 1;

    let others: Vec<String> = (0..3).filter(|&i| i != at).map(http).collect();
    let sub_work = tempfile::tempdir().unwrap();
    let mut subscriber = Command::new(&python);
    subscriber
        .arg(script("tests/python/nacos_cluster.py"))
        .args(["subscribe", &others.join(","), "1000"])
        .arg(sub_work.path());
    run(subscriber, "pushed").await;

    // Its node dies: the client comes back on another (it redoes its
    // registrations within about 30 s of reconnecting).
    nodes[at].take().unwrap().shutdown().await;
    let now_on = listed_by_the_living(&nodes, "py-cluster", id, Duration::from_secs(90)).await;
    assert_ne!(now_on, on);
    drop(registrar.stdin.take());
    let status = tokio::task::spawn_blocking(move || registrar.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    for n in nodes.into_iter().flatten() {
        n.shutdown().await;
    }
}
