//! The `roster` binary end to end: a spawned `roster server` on free
//! loopback ports, driven by the other subcommands as a user would.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_roster");
const WAIT: Duration = Duration::from_secs(15);

/// A child process killed when dropped (with the data directory it used).
struct Running(Child, Option<tempfile::TempDir>);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        // The data directory goes once the process has.
        drop(self.1.take());
    }
}

/// The admin token the test nodes are started with.
const ADMIN: &str = "test-admin-token";

fn interrupt(child: &Child) {
    // SIGINT, as Ctrl-C would send.
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
}

/// Starts `roster server` on port 0 (with the admin token [`ADMIN`] and a
/// data directory of its own) and returns it with its gRPC address.
fn server() -> (Running, String) {
    let (running, grpc, _) = server_at("127.0.0.1:0", "127.0.0.1:0", tempfile::tempdir().unwrap());
    (running, grpc)
}

/// Starts `roster server` on these addresses with this data directory;
/// returns it with its gRPC and HTTP addresses.
fn server_at(http: &str, grpc: &str, data: tempfile::TempDir) -> (Running, String, String) {
    let mut child = Command::new(BIN)
        .args(["server", "--http", http, "--grpc", grpc])
        .arg("--data-dir")
        .arg(data.path())
        .env("ROSTER_LOG", "warn")
        .env("ROSTER_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn roster server");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned()
    };
    (Running(child, Some(data)), field("grpc="), field("http="))
}

fn roster(server: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("ROSTER_ADMIN_TOKEN")
        .output()
        .expect("run roster")
}

/// `roster` as an operator holding the node's admin token.
fn operator(server: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--server")
        .arg(server)
        .args(args)
        .env("ROSTER_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("run roster")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Spawns a long-running subcommand; its stdout lines arrive on the channel.
fn spawn(server: &str, args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("--server")
        .arg(server)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_remove("ROSTER_ADMIN_TOKEN")
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
    (Running(child, None), rx)
}

fn next_json(rx: &mpsc::Receiver<String>) -> serde_json::Value {
    let line = rx.recv_timeout(WAIT).expect("a line in time");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cli_tour_register_list_watch_drain_deregister() {
    let (_server, addr) = server();

    let (_watch, lines) = spawn(&addr, &["--json", "watch", "orders"]);
    let first = next_json(&lines);
    assert_eq!(first["kind"], "reset");
    assert_eq!(first["instances"], 0);

    let (register, reg_lines) = spawn(
        &addr,
        &[
            "--json", "register", "orders", "--ip", "10.9.0.1", "--port", "8080", "--meta",
            "zone=a",
        ],
    );
    let reg = next_json(&reg_lines);
    assert_eq!(reg["instance_id"], "10.9.0.1#8080#DEFAULT");

    let added = next_json(&lines);
    assert_eq!(added["added"][0]["addresses"][0]["ip"], "10.9.0.1");
    let rev_added = added["revision"].as_u64().unwrap();
    assert!(rev_added > 0);

    let list = json(&roster(&addr, &["--json", "list", "orders"]));
    assert_eq!(list["instances"][0]["port"], 8080);
    assert_eq!(list["instances"][0]["metadata"]["zone"], "a");
    let table = stdout(&roster(&addr, &["list", "orders"]));
    assert!(table.starts_with("ADDRESS"), "{table}");
    assert!(
        table.contains("10.9.0.1") && table.contains("zone=a"),
        "{table}"
    );

    let services = json(&roster(&addr, &["--json", "services"]));
    assert_eq!(services["services"][0]["service"], "orders");
    assert_eq!(services["services"][0]["subscribers"], 1);

    // Drain waits for the watcher's acknowledgement. It acts on an
    // instance another process registered: an operator's call.
    let drained = json(&operator(
        &addr,
        &[
            "--json",
            "drain",
            "orders",
            "--ip",
            "10.9.0.1",
            "--port",
            "8080",
            "--timeout",
            "10s",
        ],
    ));
    assert_eq!(drained["complete"], true);
    assert_eq!(drained["acknowledged"].as_array().unwrap().len(), 1);
    let changed = next_json(&lines);
    assert_eq!(changed["changed"][0]["weight"], 0.0);
    assert!(changed["revision"].as_u64().unwrap() > rev_added);

    // Ctrl-C on `register` deregisters.
    interrupt(&register.0);
    let removed = next_json(&lines);
    assert_eq!(removed["removed"][0], "10.9.0.1#8080#DEFAULT");
    assert_eq!(removed["instances"], 0);

    // `deregister` removes an instance whose registrant is still running:
    // only with the node's admin token, for the instance is not its own.
    let (_second, second_lines) = spawn(
        &addr,
        &[
            "--json", "register", "orders", "--ip", "10.9.0.2", "--port", "81",
        ],
    );
    next_json(&second_lines);
    let added = next_json(&lines);
    assert_eq!(added["added"][0]["port"], 81);
    let args = ["deregister", "orders", "--ip", "10.9.0.2", "--port", "81"];
    let out = roster(&addr, &args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("admin token"), "{err}");
    let mut wrong = args.to_vec();
    wrong.extend(["--admin-token", "guess"]);
    let out = roster(&addr, &wrong);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not this node's admin token"),
        "{out:?}"
    );
    let list = json(&roster(&addr, &["--json", "list", "orders"]));
    assert_eq!(
        list["instances"].as_array().unwrap().len(),
        1,
        "still there"
    );
    let out = operator(&addr, &args);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("deregistered"));
    let removed = next_json(&lines);
    assert_eq!(removed["removed"][0], "10.9.0.2#81#DEFAULT");
}

#[test]
fn cli_errors_are_one_clear_line_and_a_non_zero_exit() {
    let (_server, addr) = server();
    // Unreachable server.
    let out = roster("127.0.0.1:1", &["list", "orders"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot reach the registry at 127.0.0.1:1"),
        "{err}"
    );
    // Bad arguments.
    let out = roster(
        &addr,
        &["register", "orders", "--ip", "10.0.0.300", "--port", "80"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ip") && err.contains("not an IP address"),
        "{err}"
    );
    let out = roster(
        &addr,
        &["register", "orders", "--ip", "10.0.0.1", "--port", "0"],
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1..=65535"));
    let out = roster(
        &addr,
        &[
            "register", "orders", "--ip", "10.0.0.1", "--port", "80", "--weight", "20000",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("instance.weight"));
    let out = roster(&addr, &["list"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let out = operator(
        &addr,
        &["deregister", "orders", "--ip", "10.0.0.1", "--port", "80"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = roster(
        &addr,
        &[
            "drain",
            "orders",
            "--ip",
            "10.0.0.1",
            "--port",
            "80",
            "--timeout",
            "soon",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    // Nothing above registered anything.
    let list = json(&roster(&addr, &["--json", "services"]));
    assert_eq!(list["services"].as_array().unwrap().len(), 0);
}

#[test]
fn server_shuts_down_cleanly_on_interrupt_and_rejects_bad_config() {
    let (server, addr) = server();
    let out = roster(&addr, &["services"]);
    assert!(out.status.success());
    interrupt(&server.0);
    let mut server = server;
    wait_for("the server to exit", || {
        matches!(server.0.try_wait(), Ok(Some(_)))
    });
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let out = Command::new(BIN)
        .args(["server", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .env("ROSTER_SESSION_KEEPALIVE", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));
    let out = Command::new(BIN)
        .args(["server", "--config", "/nonexistent/roster.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

fn bench_json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn bench_measures_a_given_server_including_its_cpu_and_memory() {
    let (node, grpc) = server();
    let pid = node.0.id().to_string();
    let out = roster(
        &grpc,
        &[
            "--json",
            "bench",
            "register",
            "--instances",
            "300",
            "--clients",
            "3",
            "--services",
            "4",
            "--pid",
            &pid,
        ],
    );
    let r = bench_json(&out);
    assert_eq!(r["shape"], "register");
    assert_eq!(r["operations"], 300);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["parameters"]["clients"], 3);
    assert_eq!(r["latency"]["samples"], 300);
    assert!(r["latency"]["p99_us"].as_u64().unwrap() >= r["latency"]["p50_us"].as_u64().unwrap());
    assert!(r["server_cpu_us_per_op"].is_number(), "{r}");
    assert!(r["server_rss_after_bytes"].as_u64().unwrap() > 0);
    assert!(r["bytes_per_instance"].is_number());

    let out = roster(
        &grpc,
        &[
            "--json",
            "bench",
            "query",
            "--readers",
            "2",
            "--size",
            "5",
            "--duration",
            "300ms",
        ],
    );
    let r = bench_json(&out);
    assert!(r["operations"].as_u64().unwrap() > 0);
    assert!(r["throughput_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        r.get("server_cpu_us_per_op").is_none(),
        "no --pid, no CPU figure"
    );
}

#[test]
fn bench_starts_its_own_server_and_counts_every_push() {
    let out = Command::new(BIN)
        .args([
            "--json",
            "bench",
            "push",
            "--subscribers",
            "6",
            "--changes",
            "4",
            "--interval",
            "5ms",
        ])
        .env_remove("ROSTER_SERVER")
        .output()
        .unwrap();
    let r = bench_json(&out);
    assert_eq!(r["shape"], "push");
    assert_eq!(r["operations"], 24, "every change reached every subscriber");
    assert_eq!(r["extra"]["missed_updates"], 0);
    assert_eq!(r["extra"]["ack_latency"]["samples"], 24);
    assert!(r["server_rss_idle_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn bench_rejects_bad_parameters() {
    let out = Command::new(BIN)
        .args(["bench", "register", "--clients", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--clients"));
    let out = Command::new(BIN)
        .args(["bench", "storm-of-the-century"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Runs `roster --json bench ARGS` against a server it starts itself.
fn bench_own(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--json", "bench"])
        .args(args)
        .env_remove("ROSTER_SERVER")
        .output()
        .unwrap()
}

#[test]
fn bench_storm_lists_every_instance_and_probes_throughout() {
    let r = bench_json(&bench_own(&[
        "storm",
        "--instances",
        "600",
        "--clients",
        "6",
        "--services",
        "7",
    ]));
    assert_eq!(r["shape"], "storm");
    assert_eq!(r["operations"], 600);
    assert_eq!(r["extra"]["listed"], 600, "{r}");
    assert_eq!(r["extra"]["lost"], 0);
    assert!(r["extra"]["probe_latency"]["samples"].as_u64().unwrap() >= 1);
}

#[test]
fn bench_storm_over_a_cluster_lists_every_instance_on_every_node() {
    let r = bench_json(&bench_own(&[
        "--nodes",
        "3",
        "storm",
        "--instances",
        "600",
        "--clients",
        "6",
        "--services",
        "7",
        "--protocol",
        "nacos-grpc",
    ]));
    assert_eq!(r["extra"]["listed"], 600, "{r}");
    assert_eq!(r["extra"]["lost"], 0, "{r}");
    assert!(
        r["extra"]["listed_everywhere_after_ms"].as_f64().is_some(),
        "{r}"
    );
}

#[test]
fn bench_snapshot_loads_every_instance_on_the_new_node() {
    let r = bench_json(&bench_own(&[
        "--nodes",
        "1",
        "snapshot",
        "--instances",
        "2000",
        "--clients",
        "4",
        "--services",
        "9",
    ]));
    assert_eq!(r["extra"]["listed_on_new_node"], 2000, "{r}");
    assert_eq!(r["extra"]["lost"], 0, "{r}");
    assert!(r["extra"]["new_node_cpu_seconds"].as_f64().is_some(), "{r}");
    assert!(r["extra"]["sources_cpu_seconds"].as_f64().is_some(), "{r}");
}

#[test]
fn bench_speaks_every_protocol_to_the_same_shapes() {
    for protocol in ["native-unary", "nacos-grpc", "nacos-http"] {
        let r = bench_json(&bench_own(&[
            "register",
            "--protocol",
            protocol,
            "--instances",
            "200",
            "--clients",
            "2",
            "--services",
            "3",
        ]));
        assert_eq!(r["parameters"]["protocol"], protocol);
        assert_eq!(r["operations"], 200, "{protocol}: {r}");
        let r = bench_json(&bench_own(&[
            "query",
            "--protocol",
            protocol,
            "--readers",
            "2",
            "--size",
            "4",
            "--duration",
            "200ms",
        ]));
        // A query that lists other than the 4 instances counts as an error.
        assert!(r["operations"].as_u64().unwrap() > 0, "{protocol}: {r}");
    }
    let r = bench_json(&bench_own(&[
        "push",
        "--protocol",
        "nacos-grpc",
        "--subscribers",
        "3",
        "--changes",
        "4",
        "--interval",
        "5ms",
    ]));
    assert_eq!(r["operations"], 12, "every change reached every subscriber");
    assert_eq!(r["extra"]["missed_updates"], 0);
}

#[test]
fn bench_churn_leaves_every_subscriber_with_the_servers_view() {
    for protocol in ["native", "nacos-grpc"] {
        let r = bench_json(&bench_own(&[
            "churn",
            "--protocol",
            protocol,
            "--clients",
            "3",
            "--subscribers",
            "4",
            "--size",
            "3",
            "--rate",
            "300",
            "--duration",
            "400ms",
        ]));
        assert!(r["operations"].as_u64().unwrap() > 10, "{protocol}: {r}");
        assert_eq!(r["extra"]["subscribers_diverged"], 0, "{protocol}: {r}");
        assert!(r["extra"]["pushes_received"].as_u64().unwrap() > 4);
    }
}

#[test]
fn bench_push_over_http_is_refused_with_a_reason() {
    let out = bench_own(&["push", "--protocol", "nacos-http", "--subscribers", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("streaming protocol"));
}

#[test]
fn a_watcher_follows_a_node_killed_and_restarted_and_shows_the_removal_at_once() {
    let (mut node, addr, http) =
        server_at("127.0.0.1:0", "127.0.0.1:0", tempfile::tempdir().unwrap());
    let (_watch, lines) = spawn(&addr, &["--json", "watch", "orders"]);
    assert_eq!(next_json(&lines)["kind"], "reset");
    let (register, reg_lines) = spawn(
        &addr,
        &[
            "--json", "register", "orders", "--ip", "10.9.3.1", "--port", "80",
        ],
    );
    next_json(&reg_lines);
    assert_eq!(next_json(&lines)["instances"], 1);

    // kill -9, then a new life of the node on the same ports and data.
    let data = node.1.take();
    let _ = node.0.kill();
    let _ = node.0.wait();
    let (_node, _, _) = server_at(&http, &addr, data.unwrap());
    // The registration comes back by itself.
    wait_for("the registration to come back", || {
        let out = roster(&addr, &["--json", "list", "orders"]);
        out.status.success()
            && json(&out)["instances"]
                .as_array()
                .is_some_and(|a| a.len() == 1)
    });
    // Ctrl-C on `register`: the watcher shows the removal within a second
    // or so, and settles on an empty service.
    while lines.try_recv().is_ok() {}
    interrupt(&register.0);
    let shown = Instant::now();
    while next_json(&lines)["instances"] != 0 {
        assert!(
            shown.elapsed() < WAIT,
            "the watcher never showed the service empty"
        );
    }
    assert!(
        shown.elapsed() < Duration::from_secs(3),
        "the removal took {:?}",
        shown.elapsed()
    );
    // No more lines: the watcher is not reloading in a loop.
    assert!(lines.recv_timeout(Duration::from_secs(1)).is_err());
}

/// Stderr of a failed run: one line, starting with `error: `.
fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn said_once(err: &str, part: &str) {
    assert_eq!(err.matches(part).count(), 1, "{part:?} in {err}");
}

#[test]
fn each_error_is_said_once_on_one_line() {
    let (_server, addr, http) =
        server_at("127.0.0.1:0", "127.0.0.1:0", tempfile::tempdir().unwrap());
    // A port in use.
    let out = Command::new(BIN)
        .args(["server", "--http", "127.0.0.1:0", "--grpc", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out);
    said_once(&err, "cannot listen on");
    said_once(&err, "Address already in use");
    // A config file that is not there.
    let out = Command::new(BIN)
        .args(["server", "--config", "/nonexistent/roster.toml"])
        .output()
        .unwrap();
    let err = one_error_line(&out);
    said_once(&err, "No such file or directory");
    // A variable with a bad value is named.
    let out = Command::new(BIN)
        .args(["server", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .env("ROSTER_SESSION_PROBE_TIMEOUT", "later")
        .output()
        .unwrap();
    let err = one_error_line(&out);
    assert!(err.contains("ROSTER_SESSION_PROBE_TIMEOUT"), "{err}");
    let out = Command::new(BIN)
        .args(["--server", &addr, "services"])
        .env("ROSTER_LOG", "roster=loudest")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = one_error_line(&out);
    assert!(err.contains("ROSTER_LOG"), "{err}");
    // An unreachable registry.
    let out = roster("127.0.0.1:1", &["list", "orders"]);
    let err = one_error_line(&out);
    said_once(&err, "cannot reach the registry");
    said_once(&err, "refused");
    // Not found: the registry's message, without the status' debug text.
    let out = operator(
        &addr,
        &["deregister", "orders", "--ip", "10.0.0.1", "--port", "80"],
    );
    let err = one_error_line(&out);
    assert!(err.contains("not found") && !err.contains("code:"), "{err}");
    // The HTTP port given as the registry.
    let out = roster(&http, &["list", "orders"]);
    let err = one_error_line(&out);
    assert!(err.contains("looks like the HTTP port"), "{err}");
    // The operator commands' options are not offered to `server`.
    let out = Command::new(BIN)
        .args(["server", "--help"])
        .output()
        .unwrap();
    let help = stdout(&out);
    assert!(
        !help.contains("--json") && !help.contains("--server"),
        "{help}"
    );
}

#[test]
fn register_says_on_interrupt_whether_it_deregistered() {
    let (node, addr) = server();
    let (register, lines) = spawn(
        &addr,
        &["register", "orders", "--ip", "10.9.4.1", "--port", "80"],
    );
    assert!(lines.recv_timeout(WAIT).unwrap().starts_with("registered"));
    interrupt(&register.0);
    assert!(
        lines
            .recv_timeout(WAIT)
            .unwrap()
            .starts_with("deregistered 10.9.4.1#80#DEFAULT")
    );
    let mut register = register;
    assert!(register.0.wait().unwrap().success());

    // With the registry gone, it says it could not and exits 1.
    let mut register = Command::new(BIN)
        .args([
            "--server", &addr, "register", "orders", "--ip", "10.9.4.2", "--port", "80",
        ])
        // Only the error, not the warning that the session was lost.
        .env("ROSTER_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(register.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("registered"), "{line}");
    drop(node);
    interrupt(&register);
    let done = register.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(1));
    let err = one_error_line(&done);
    assert!(err.contains("was not deregistered"), "{err}");
}

#[test]
fn the_sample_config_starts_a_node() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/roster.toml");
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "server",
            "--config",
            sample,
            "--http",
            "localhost:0",
            "--grpc",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let running = Running(child, Some(data));
    assert!(
        line.starts_with("roster listening: grpc=127.0.0.1:"),
        "{line}"
    );
    drop(running);
}
