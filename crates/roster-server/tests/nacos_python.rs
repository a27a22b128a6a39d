//! The real Python Nacos clients (`nacos-sdk-python==2.0.11`: the HTTP v1
//! `nacos.NacosClient` and the gRPC `v2.nacos` client) against a Roster node:
//! `tests/python/nacos_clients.py` registers over HTTP, lists and subscribes
//! over gRPC, and checks pushes both ways.
//!
//! The interpreter is `$ROSTER_NACOS_PYTHON`, else `target/nacos-python`
//! (which `.ci/run` creates). Without one the test says so and passes,
//! unless `ROSTER_REQUIRE_PYTHON` is set (as `.ci/run` does).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roster_server::Config;

/// The script's own limit is 120 s; this bounds a hung interpreter.
const LIMIT: Duration = Duration::from_secs(180);

fn interpreter() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROSTER_NACOS_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let local = root.join("target/nacos-python/bin/python");
    local.exists().then_some(local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_and_grpc_clients_share_one_registry() {
    let Some(python) = interpreter() else {
        assert!(
            std::env::var_os("ROSTER_REQUIRE_PYTHON").is_none(),
            "ROSTER_REQUIRE_PYTHON is set but no interpreter: set ROSTER_NACOS_PYTHON"
        );
        eprintln!("SKIPPED: no nacos-sdk-python environment; `bash .ci/run` creates one");
        return;
    };
    let mut config = Config::default();
    config.server.http = "127.0.0.1:0".parse().unwrap();
    config.server.grpc = "127.0.0.1:0".parse().unwrap();
    let server = roster_server::start(config).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/nacos_clients.py");
    let (http, grpc) = (server.http_addr.port(), server.grpc_addr.port());
    let dir = work.path().to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&python)
            .arg(&script)
            .args([http.to_string(), grpc.to_string()])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
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
        outcome.status.success() && stdout.contains("python nacos clients: ok"),
        "python clients failed ({}):\n{stdout}\n{stderr}",
        outcome.status
    );
    server.shutdown().await;
}
