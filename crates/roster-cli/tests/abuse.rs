//! One client against a shared node, as an attacker would try it: each
//! test starts a real `roster server` process on loopback, attacks it with
//! plain HTTP, TCP or UDP, and checks both the bound (a refusal naming the
//! limit, the node's own memory, connections closed) and that a legitimate
//! client is served meanwhile (a registration, a list and a UDP push). Every
//! loop is bounded in count and time; memory is read from the node's RSS with
//! generous margins, never timed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_roster");

/// A node process, killed when dropped.
struct Node {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    _data: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// A node on free loopback ports with `ROSTER_*` settings `env`.
    fn start(env: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .args(["server", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.path())
            .env("ROSTER_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (format!("ROSTER_{k}"), *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn roster server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .parse()
                .unwrap()
        };
        Self {
            child,
            http: field("http="),
            grpc: field("grpc="),
            _data: data,
        }
    }

    /// The node's resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    /// One request on a new connection: (status, body).
    fn call(&self, method: &str, path: &str, form: &str) -> (u16, String) {
        let mut tcp = TcpStream::connect(self.http).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        send(&mut tcp, method, path, form, true);
        read_reply(&mut BufReader::new(tcp))
    }

    /// The value of one sample of `/metrics` (0 when absent).
    fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.call("GET", "/metrics", "");
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// A legitimate client's round trip: it subscribes to a fresh service
    /// over UDP, registers an instance there, lists it, and is pushed it.
    fn round_trip(&self, n: u32) {
        let service = format!("legit-{n}");
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let port = udp.local_addr().unwrap().port();
        let poll = format!("/nacos/v1/ns/instance/list?serviceName={service}&udpPort={port}");
        assert_eq!(self.call("GET", &poll, "").0, 200);
        let ip = format!("10.200.{}.{}", n / 250, n % 250 + 1);
        let form = format!("serviceName={service}&ip={ip}&port=8080");
        let (status, body) = self.call("POST", "/nacos/v1/ns/instance", &form);
        assert_eq!(status, 200, "{body}");
        let (_, list) = self.call("GET", &poll, "");
        assert!(list.contains(&ip), "listed: {list}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 65536];
        loop {
            assert!(Instant::now() < deadline, "no UDP push of {ip}");
            let n = udp.recv(&mut buf).expect("a UDP push");
            if String::from_utf8_lossy(&buf[..n]).contains(&ip) {
                return;
            }
        }
    }
}

fn send(tcp: &mut TcpStream, method: &str, path: &str, form: &str, close: bool) {
    let connection = if close { "close" } else { "keep-alive" };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
}

/// Reads one HTTP/1.1 reply (Content-Length or chunked).
fn read_reply(r: &mut impl BufRead) -> (u16, String) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {line:?}"));
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        chunked |= header == "transfer-encoding: chunked";
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body).unwrap();
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&from.into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// Registers `count` instances of `service` over Nacos HTTP, each with
/// `metadata_bytes` of metadata, on a few keep-alive connections.
fn register_many(node: &Node, service: &str, count: u32, metadata_bytes: usize) {
    let filler = "m".repeat(metadata_bytes);
    std::thread::scope(|s| {
        for t in 0..4 {
            let filler = &filler;
            s.spawn(move || {
                let tcp = TcpStream::connect(node.http).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut w = tcp.try_clone().unwrap();
                let mut r = BufReader::new(tcp);
                for i in (t..count).step_by(4) {
                    let form = format!(
                        "serviceName={service}&ip=10.{}.{}.{}&port=80&metadata=%7B%22pad%22%3A%22{filler}%22%7D",
                        i >> 16,
                        (i >> 8) & 255,
                        i & 255
                    );
                    send(&mut w, "POST", "/nacos/v1/ns/instance", &form, false);
                    let (status, body) = read_reply(&mut r);
                    assert_eq!(status, 200, "{body}");
                }
            });
        }
    });
}

#[test]
fn an_instance_over_its_size_limits_is_refused_naming_the_limit() {
    let node = Node::start(&[]);
    // 10,000 addresses for one instance (a 300 KB request).
    let addresses: Vec<String> = (0..10_000)
        .map(|i| {
            format!(
                r#"{{"network":"n{i}","ip":"10.0.{}.{}"}}"#,
                i / 250,
                i % 250
            )
        })
        .collect();
    let body = format!(
        r#"{{"service":"wide","port":80,"addresses":[{}]}}"#,
        addresses.join(",")
    );
    let mut tcp = TcpStream::connect(node.http).unwrap();
    let request = format!(
        "POST /v1/instances HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
    let (status, reply) = read_reply(&mut BufReader::new(tcp));
    assert_eq!(status, 413, "{reply}");
    assert!(reply.contains("limits.addresses_per_instance"), "{reply}");
    // Metadata over 64 KiB, over Nacos HTTP.
    let form = format!(
        "serviceName=heavy&ip=10.0.0.1&port=80&metadata=%7B%22k%22%3A%22{}%22%7D",
        "v".repeat(70 * 1024)
    );
    let (status, reply) = node.call("POST", "/nacos/v1/ns/instance", &form);
    assert_eq!(status, 400, "{reply}");
    // A body over limits.http_body_bytes is 413, not 400.
    let form = format!(
        "serviceName=big&ip=10.0.0.1&port=80&x={}",
        "y".repeat(2 << 20)
    );
    let (status, reply) = node.call("POST", "/nacos/v1/ns/instance", &form);
    assert_eq!(status, 413, "{reply}");
    assert!(reply.contains("limits.http_body_bytes"), "{reply}");
    let (_, list) = node.call("GET", "/nacos/v1/ns/instance/list?serviceName=wide", "");
    assert!(list.contains(r#""hosts":[]"#), "{list}");
    assert!(node.metric("roster_limit_hits_total{limit=\"addresses_per_instance\"}") >= 1.0);
    node.round_trip(1);
}

#[test]
fn slow_readers_of_filtered_lists_share_one_answer() {
    let node = Node::start(&[]);
    // 4,000 instances with 2 KB of metadata each: every list is ~9 MB.
    register_many(&node, "big", 4_000, 2_000);
    let (_, list) = node.call(
        "GET",
        "/nacos/v1/ns/instance/list?serviceName=big&healthyOnly=true",
        "",
    );
    let answer = list.len() as u64;
    assert!(answer > 8_000_000, "the answer is {answer} bytes");
    let before = node.rss();
    // 24 connections ask for filtered lists (healthy only, a cluster, the
    // v2 API) and never read the answer.
    let paths = [
        "/nacos/v1/ns/instance/list?serviceName=big&healthyOnly=true",
        "/nacos/v1/ns/instance/list?serviceName=big&clusters=DEFAULT",
        "/nacos/v2/ns/instance/list?serviceName=big&healthyOnly=true",
    ];
    let mut readers = Vec::new();
    for i in 0..24 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&node.http.into()).unwrap();
        let mut tcp: TcpStream = socket.into();
        send(&mut tcp, "GET", paths[i % paths.len()], "", false);
        readers.push(tcp);
    }
    // Give the node time to build and start writing every answer.
    std::thread::sleep(Duration::from_secs(3));
    let grown = node.rss().saturating_sub(before);
    eprintln!("24 slow readers of a {answer}-byte list: the node grew {grown} bytes");
    node.round_trip(2);
    // A copy per reader is 24 x 9 MB and more (the build of each, 317 MB
    // measured before answers were shared); shared, the two texts (v1 and
    // v2 of one list are one text), what building them left to the
    // allocator, and the connections' buffers.
    assert!(
        grown < 12 * answer,
        "the node grew {grown} bytes for 24 readers of a {answer}-byte answer"
    );
    drop(readers);
}

#[test]
fn lookups_of_unknown_names_and_emptied_services_leave_nothing_behind() {
    let node = Node::start(&[
        ("REGISTRY_EMPTY_SERVICE_GRACE", "1s"),
        ("SESSION_SWEEP_INTERVAL", "500ms"),
    ]);
    let tcp = TcpStream::connect(node.http).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    for i in 0..3_000 {
        send(
            &mut w,
            "GET",
            &format!("/nacos/v1/ns/instance/list?serviceName=nobody-{i}"),
            "",
            false,
        );
        assert_eq!(read_reply(&mut r).0, 200);
    }
    // Services made and emptied again: forgotten after the grace period.
    for i in 0..50 {
        let form = format!("serviceName=brief-{i}&ip=10.1.0.{}&port=80", i + 1);
        assert_eq!(node.call("POST", "/nacos/v1/ns/instance", &form).0, 200);
        assert_eq!(node.call("DELETE", "/nacos/v1/ns/instance", &form).0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while node.metric("roster_services") > 0.0 {
        assert!(Instant::now() < deadline, "empty services were kept");
        std::thread::sleep(Duration::from_millis(200));
    }
    node.round_trip(3);
}

#[test]
fn half_open_connections_are_closed_and_do_not_lock_clients_out() {
    let node = Node::start(&[
        ("LIMITS_CONNECTIONS", "120"),
        ("LIMITS_CONNECTIONS_PER_ADDRESS", "50"),
        ("LIMITS_HEADER_READ_TIMEOUT", "2s"),
    ]);
    // Three addresses each open 60 connections sending half a header: 50
    // of each are admitted (then the node is at its total and makes room
    // by closing the oldest half-open ones), the rest closed at once.
    let mut attackers = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..60 {
            if let Ok(mut tcp) = connect_from(from, node.http) {
                let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: ");
                attackers.push(tcp);
            }
        }
    }
    // On the gRPC port: the HTTP/2 preface and a SETTINGS frame, but no
    // request (HEADERS) ever.
    for _ in 0..20 {
        if let Ok(mut tcp) = connect_from("127.0.0.5", node.grpc) {
            let _ = tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            let _ = tcp.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
            attackers.push(tcp);
        }
    }
    // A client is served meanwhile.
    let started = Instant::now();
    let (status, _) = node.call("GET", "/healthz", "");
    assert_eq!(status, 200);
    node.round_trip(4);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(node.metric("roster_limit_hits_total{limit=\"connections_per_address\"}") >= 30.0);
    // Every half-open connection is closed by the header timeout.
    std::thread::sleep(Duration::from_secs(3));
    let mut open = 0;
    for tcp in &mut attackers {
        tcp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // Whatever the node wrote (its HTTP/2 SETTINGS), then the end.
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Ok(_) => continue,
                Err(_) => {
                    open += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(open, 0, "half-open connections left open");
    assert!(node.metric("roster_limit_hits_total{limit=\"header_read_timeout\"}") >= 1.0);
    assert!(node.metric("roster_connections{port=\"http\"}") <= 1.0);
    assert_eq!(node.metric("roster_connections{port=\"grpc\"}"), 0.0);
}

#[test]
fn udp_pushes_go_only_to_the_address_that_asked() {
    let node = Node::start(&[("LIMITS_UDP_TARGETS_PER_ADDRESS", "2")]);
    let victim = UdpSocket::bind("127.0.0.2:0").unwrap();
    victim
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let port = victim.local_addr().unwrap().port();
    // The asker names another address: the push goes to the asker.
    let asker = UdpSocket::bind(format!("127.0.0.1:{port}")).unwrap();
    asker
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let poll =
        format!("/nacos/v1/ns/instance/list?serviceName=aimed&udpPort={port}&clientIP=127.0.0.2");
    assert_eq!(node.call("GET", &poll, "").0, 200);
    let form = "serviceName=aimed&ip=10.9.0.1&port=80";
    assert_eq!(node.call("POST", "/nacos/v1/ns/instance", form).0, 200);
    let mut buf = vec![0u8; 65536];
    let n = asker.recv(&mut buf).expect("the asker is pushed");
    assert!(n > 0);
    assert!(
        victim.recv(&mut buf).is_err(),
        "the named address got a push"
    );
    // More push targets from one address than allowed: the extra ones get
    // no pushes (their polls are still answered).
    let extra: Vec<UdpSocket> = (0..3)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for s in &extra {
        let port = s.local_addr().unwrap().port();
        let poll = format!("/nacos/v1/ns/instance/list?serviceName=aimed&udpPort={port}");
        assert_eq!(node.call("GET", &poll, "").0, 200);
    }
    assert!(node.metric("roster_limit_hits_total{limit=\"udp_targets_per_address\"}") >= 2.0);
}

#[test]
fn a_service_cannot_grow_past_its_limit() {
    let node = Node::start(&[("LIMITS_INSTANCES_PER_SERVICE", "300")]);
    register_many(&node, "crowded", 300, 0);
    let form = "serviceName=crowded&ip=10.99.0.1&port=80";
    let (status, reply) = node.call("POST", "/nacos/v1/ns/instance", form);
    assert_eq!(status, 429, "{reply}");
    assert!(reply.contains("limits.instances_per_service"), "{reply}");
    node.round_trip(5);
}

#[test]
fn client_timeouts_are_kept_within_the_configured_bounds() {
    let node = Node::start(&[
        ("LIMITS_CLIENT_TIMEOUT_MAX", "2s"),
        ("NACOS_BEAT_CHECK_INTERVAL", "200ms"),
    ]);
    // An hour without beats, the client asks: the node allows two seconds.
    let form = "serviceName=forever&ip=10.8.0.1&port=80&metadata=%7B%22preserved.heart.beat.timeout%22%3A%223600000%22%2C%22preserved.ip.delete.timeout%22%3A%223600000%22%7D";
    assert_eq!(node.call("POST", "/nacos/v1/ns/instance", form).0, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, list) = node.call("GET", "/nacos/v1/ns/instance/list?serviceName=forever", "");
        if !list.contains("10.8.0.1") {
            break;
        }
        assert!(Instant::now() < deadline, "the instance outlived the bound");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn malformed_parameters_are_refused_not_ignored() {
    let node = Node::start(&[]);
    for (path, form) in [
        ("/nacos/v1/ns/instance/list?serviceName=x&udpPort=99999", ""),
        ("/nacos/v1/ns/service/list?pageNo=abc", ""),
        (
            "/nacos/v1/ns/instance",
            "serviceName=bad%FFname&ip=10.0.0.1&port=80",
        ),
        (
            "/nacos/v1/ns/service",
            "serviceName=sel&selector=%7Bnot-json",
        ),
    ] {
        let method = if form.is_empty() { "GET" } else { "POST" };
        let (status, reply) = node.call(method, path, form);
        assert_eq!(status, 400, "{path} {form}: {reply}");
    }
    let (_, services) = node.call("GET", "/nacos/v1/ns/service/list", "");
    assert!(!services.contains('\u{FFFD}'), "{services}");
}

#[test]
fn a_kept_alive_connection_may_pause_between_requests_longer_than_the_header_timeout() {
    let node = Node::start(&[("LIMITS_HEADER_READ_TIMEOUT", "1s")]);
    let tcp = TcpStream::connect(node.http).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    for _ in 0..2 {
        send(&mut w, "GET", "/healthz", "", false);
        assert_eq!(read_reply(&mut r).0, 200);
        // Idle, but not past limits.idle_timeout.
        std::thread::sleep(Duration::from_millis(2500));
    }
    send(&mut w, "GET", "/healthz", "", false);
    assert_eq!(read_reply(&mut r).0, 200);
}
