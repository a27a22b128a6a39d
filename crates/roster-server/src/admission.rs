//! Which TCP connections a node holds, on both ports: each accepted one is
//! admitted here (per client address and in total), watched (a first
//! request header within `limits.header_read_timeout`, then never silent
//! longer than `limits.idle_timeout`) and released when it closes. At the
//! total limit the oldest connection that has not yet sent a whole request
//! header makes way for the new one, so half-open connections cannot lock
//! real clients out. Accept errors (descriptors exhausted) back off.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// Descriptors kept free for everything but client connections (the
/// listeners, the UDP socket, files, the runtime).
const RESERVED_FDS: u64 = 64;

/// The end of an HTTP/1 request header (parsers also take a bare `\n\n`).
const HEADER_END: &[u8] = b"\r\n\r\n";
const BARE_HEADER_END: &[u8] = b"\n\n";
/// What an HTTP/2 connection starts with; its first request header is the
/// first whole HEADERS frame after it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_HEADERS: u8 = 0x1;

/// The connection limits of a node.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Connections in all.
    pub total: usize,
    /// Connections from one IP address.
    pub per_address: usize,
    /// Time to send a whole first request header.
    pub header_timeout: Duration,
    /// Longest silence of a connection.
    pub idle_timeout: Duration,
}

/// One connection's standing, shared between its stream and the admission.
#[derive(Debug, Default)]
struct Watch {
    /// It sent a whole request header.
    proven: AtomicBool,
    /// It is to be closed (it made way for another).
    evicted: AtomicBool,
    /// Its reader, woken to notice the eviction.
    reader: AtomicWaker,
}

#[derive(Default)]
struct Held {
    per_address: HashMap<IpAddr, usize>,
    total: usize,
    /// Connections not yet proven, oldest first (some may be gone or
    /// proven since; they are skipped).
    unproven: VecDeque<Weak<Watch>>,
}

/// The connections a node holds, and the rules it admits them by.
pub struct Admission {
    rules: Rules,
    held: Mutex<Held>,
    metrics: Arc<Metrics>,
    /// Open connections of the HTTP and the gRPC port.
    gauges: [Gauge; 2],
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address holds `limits.connections_per_address` already.
    PerAddress,
    /// The node holds `limits.connections` already, all of them proven.
    Total,
}

impl Admission {
    /// Admits by `rules`, counting in `metrics`. The total is lowered to
    /// what the process' descriptor limit allows (raised to its hard limit
    /// first, where the soft one is lower).
    pub fn new(mut rules: Rules, metrics: Arc<Metrics>) -> Arc<Self> {
        if let Some(fds) = descriptor_limit() {
            let room = usize::try_from(fds.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            if room < rules.total {
                tracing::warn!(
                    configured = rules.total,
                    allowed = room,
                    descriptors = fds,
                    "limits.connections lowered to what the descriptor limit leaves"
                );
                rules.total = room.max(1);
            }
        }
        Self::with(rules, metrics)
    }

    /// Admits by exactly `rules`.
    fn with(rules: Rules, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            rules,
            held: Mutex::new(Held::default()),
            gauges: [
                metrics.connections_on("http"),
                metrics.connections_on("grpc"),
            ],
            metrics,
        })
    }

    /// The rules in force (the total possibly lowered, see [`Self::new`]).
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// Admits a connection from `peer` on `port`, or says why not.
    fn admit(self: &Arc<Self>, peer: IpAddr, port: &'static str) -> Result<Ticket, Refusal> {
        let watch = Arc::new(Watch::default());
        let mut held = self.held.lock();
        let from_peer = held.per_address.get(&peer).copied().unwrap_or(0);
        if from_peer >= self.rules.per_address {
            return Err(Refusal::PerAddress);
        }
        let at_total = held.total >= self.rules.total;
        if at_total && !Self::evict_one(&mut held) {
            return Err(Refusal::Total);
        }
        *held.per_address.entry(peer).or_default() += 1;
        held.total += 1;
        held.unproven.push_back(Arc::downgrade(&watch));
        // Proven or closed entries are dropped as they reach the front; a
        // long run of proven ones behind an old unproven one is bounded by
        // the total.
        while held
            .unproven
            .front()
            .is_some_and(|w| w.upgrade().is_none_or(|w| w.proven.load(Ordering::Relaxed)))
        {
            held.unproven.pop_front();
        }
        drop(held);
        if at_total {
            let detail =
                "the oldest connection without a whole request header was closed to make room";
            self.metrics.limit_hit("connections", &detail);
        }
        let gauge = self.gauges[usize::from(port == "grpc")].clone();
        gauge.inc();
        Ok(Ticket {
            admission: self.clone(),
            peer,
            watch,
            gauge,
        })
    }

    /// Marks the oldest unproven connection for closing; false if none.
    /// Its slot is freed when it closes; until then the node holds one
    /// connection more than its total, for a moment.
    fn evict_one(held: &mut Held) -> bool {
        while let Some(weak) = held.unproven.pop_front() {
            let Some(watch) = weak.upgrade() else {
                continue;
            };
            if watch.proven.load(Ordering::Relaxed) || watch.evicted.load(Ordering::Relaxed) {
                continue;
            }
            watch.evicted.store(true, Ordering::Relaxed);
            watch.reader.wake();
            return true;
        }
        false
    }

    fn release(&self, peer: IpAddr) {
        let mut held = self.held.lock();
        held.total -= 1;
        if let Some(n) = held.per_address.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                held.per_address.remove(&peer);
            }
        }
    }

    /// Accepts the next admitted connection on `listener` (`port` names it
    /// in metrics and logs). Connections over a limit are closed at once
    /// and counted; accept errors (descriptors exhausted, a connection
    /// reset before it was taken) are waited out with a growing pause.
    pub async fn accept(
        self: &Arc<Self>,
        listener: &TcpListener,
        port: &'static str,
    ) -> (Admitted<TcpStream>, SocketAddr) {
        let mut pause = Duration::from_millis(5);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    if pause >= Duration::from_millis(500) {
                        self.metrics.limit_hit(
                            "connections",
                            &format!("accept on the {port} port failed: {e}"),
                        );
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            pause = Duration::from_millis(5);
            match self.admit(peer.ip(), port) {
                Ok(ticket) => {
                    let _ = tcp.set_nodelay(true);
                    return (Admitted::new(tcp, ticket, self.rules), peer);
                }
                Err(refusal) => {
                    let (limit, detail) = match refusal {
                        Refusal::PerAddress => (
                            "connections_per_address",
                            format!("a connection from {} on the {port} port closed", peer.ip()),
                        ),
                        Refusal::Total => (
                            "connections",
                            format!("a connection from {peer} on the {port} port closed"),
                        ),
                    };
                    self.metrics.limit_hit(limit, &detail);
                    drop(tcp);
                }
            }
        }
    }
}

/// A connection's place in the admission; freed when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    peer: IpAddr,
    watch: Arc<Watch>,
    gauge: Gauge,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gauge.dec();
        self.admission.release(self.peer);
    }
}

/// An admitted connection: reads fail (closing it) once it is evicted, or
/// has not sent a whole request header in time, or stays silent too long.
pub struct Admitted<IO> {
    io: IO,
    ticket: Ticket,
    /// The first header's deadline, then the idle deadline.
    deadline: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// When data last came in (the idle deadline is moved on lazily).
    last_read: Instant,
    /// How far the first request header has come.
    proof: Proof,
}

impl<IO> Admitted<IO> {
    fn new(io: IO, ticket: Ticket, rules: Rules) -> Self {
        let now = Instant::now();
        Self {
            io,
            ticket,
            deadline: Box::pin(tokio::time::sleep_until(now + rules.header_timeout)),
            idle_timeout: rules.idle_timeout,
            last_read: now,
            proof: Proof::default(),
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The same connection with its stream wrapped by `wrap`.
    pub fn map<T>(self, wrap: impl FnOnce(IO) -> T) -> Admitted<T> {
        Admitted {
            io: wrap(self.io),
            ticket: self.ticket,
            deadline: self.deadline,
            idle_timeout: self.idle_timeout,
            last_read: self.last_read,
            proof: self.proof,
        }
    }

    /// Fails the read if the connection is to be closed now.
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        let watch = &self.ticket.watch;
        // Only a connection not yet proven can be evicted (and it is
        // proven for good), so only such a reader waits to be told.
        let proven = watch.proven.load(Ordering::Relaxed);
        if !proven {
            watch.reader.register(cx.waker());
        }
        if !proven && watch.evicted.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for another connection",
            ));
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            if !watch.proven.load(Ordering::Relaxed) {
                let metrics = &self.ticket.admission.metrics;
                let peer = self.ticket.peer;
                let detail =
                    format!("a connection from {peer} sent no whole request header in time");
                metrics.limit_hit("header_read_timeout", &detail);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no whole request header in time",
                ));
            }
            let idle_until = self.last_read + self.idle_timeout;
            if idle_until <= Instant::now() {
                let metrics = &self.ticket.admission.metrics;
                let peer = self.ticket.peer;
                let detail = format!("a connection from {peer} was silent too long");
                metrics.limit_hit("idle_timeout", &detail);
                return Err(io::Error::new(io::ErrorKind::TimedOut, "idle too long"));
            }
            self.deadline.as_mut().reset(idle_until);
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Admitted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if got > 0 {
                    this.last_read = Instant::now();
                    if !this.ticket.watch.proven.load(Ordering::Relaxed) {
                        let data = &buf.filled()[before..];
                        if this.proof.saw(data) {
                            this.ticket.watch.proven.store(true, Ordering::Relaxed);
                            // From now on the deadline is the idle one.
                            let idle_until = this.last_read + this.idle_timeout;
                            this.deadline.as_mut().reset(idle_until);
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Admitted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// How far a connection's first request header has come: an HTTP/1
/// header up to its blank line, or the HTTP/2 preface and then frames up
/// to the end of the first HEADERS frame (settings, pings and window
/// updates alone prove nothing).
#[derive(Debug, Clone, Copy)]
enum Proof {
    /// Not yet known which: the bytes so far match the HTTP/2 preface.
    Start { matched: usize },
    /// HTTP/1: the last bytes read (a header end may span reads).
    Http1 { tail: [u8; 3] },
    /// HTTP/2, past the preface: `header` holds `got` bytes of a frame
    /// header, or a frame's payload has `left` bytes to come.
    Http2 {
        header: [u8; 9],
        got: usize,
        left: usize,
        headers: bool,
    },
}

impl Default for Proof {
    fn default() -> Self {
        Proof::Start { matched: 0 }
    }
}

impl Proof {
    /// Takes `data`; true once it completes the first request header.
    fn saw(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            match self {
                Proof::Start { matched } => {
                    let n = (H2_PREFACE.len() - *matched).min(data.len());
                    if data[..n] != H2_PREFACE[*matched..*matched + n] {
                        // Not HTTP/2: scan as HTTP/1 from the start.
                        let seen = &H2_PREFACE[..*matched];
                        *self = Proof::Http1 { tail: [0; 3] };
                        return self.saw_http1(seen) || self.saw_http1(data);
                    }
                    *matched += n;
                    data = &data[n..];
                    if *matched == H2_PREFACE.len() {
                        *self = Proof::Http2 {
                            header: [0; 9],
                            got: 0,
                            left: 0,
                            headers: false,
                        };
                    }
                }
                Proof::Http1 { .. } => return self.saw_http1(data),
                Proof::Http2 {
                    header,
                    got,
                    left,
                    headers,
                } => {
                    if *left > 0 {
                        let n = (*left).min(data.len());
                        *left -= n;
                        data = &data[n..];
                        if *left == 0 && *headers {
                            return true;
                        }
                        continue;
                    }
                    let n = (9 - *got).min(data.len());
                    header[*got..*got + n].copy_from_slice(&data[..n]);
                    *got += n;
                    data = &data[n..];
                    if *got == 9 {
                        *got = 0;
                        *left = usize::from(header[0]) << 16
                            | usize::from(header[1]) << 8
                            | usize::from(header[2]);
                        *headers = header[3] == H2_HEADERS;
                        if *left == 0 && *headers {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }

    fn saw_http1(&mut self, data: &[u8]) -> bool {
        let Proof::Http1 { tail } = self else {
            return false;
        };
        let mut window = Vec::with_capacity(tail.len() + data.len());
        window.extend_from_slice(tail);
        window.extend_from_slice(data);
        let keep = window.len() - tail.len();
        tail.copy_from_slice(&window[keep..]);
        window.windows(HEADER_END.len()).any(|w| w == HEADER_END)
            || window
                .windows(BARE_HEADER_END.len())
                .any(|w| w == BARE_HEADER_END)
    }
}

/// The process' descriptor limit, after raising the soft limit to the hard
/// one; `None` where it cannot be read.
fn descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => Some(n),
            Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft),
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Descriptors the process has open, where the system tells (Linux).
pub fn open_descriptors() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// The process' descriptor limit now (soft), where the system tells.
pub fn max_descriptors() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(total: usize, per_address: usize) -> Arc<Admission> {
        let rules = Rules {
            total,
            per_address,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        };
        Admission::with(rules, Arc::new(Metrics::new()))
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back_on_close() {
        let a = admission(10, 2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let one = a.admit(ip, "http").unwrap();
        let _two = a.admit(ip, "grpc").unwrap();
        assert_eq!(a.admit(ip, "http").err(), Some(Refusal::PerAddress));
        assert!(a.admit("127.0.0.3".parse().unwrap(), "http").is_ok());
        drop(one);
        assert!(a.admit(ip, "http").is_ok());
    }

    #[test]
    fn at_the_total_the_oldest_unproven_connection_makes_way() {
        let a = admission(3, 10);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let first = a.admit(ip, "http").unwrap();
        let second = a.admit(ip, "http").unwrap();
        let third = a.admit(ip, "http").unwrap();
        first.watch.proven.store(true, Ordering::Relaxed);
        let fourth = a.admit(ip, "http").unwrap();
        assert!(!first.watch.evicted.load(Ordering::Relaxed));
        assert!(second.watch.evicted.load(Ordering::Relaxed));
        second.watch.proven.store(true, Ordering::Relaxed);
        third.watch.proven.store(true, Ordering::Relaxed);
        fourth.watch.proven.store(true, Ordering::Relaxed);
        // Everyone proven (the evicted one not yet closed): refused.
        assert_eq!(a.admit(ip, "http").err(), Some(Refusal::Total));
    }

    #[test]
    fn a_header_end_is_seen_across_reads() {
        let mut p = Proof::default();
        assert!(!p.saw(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(p.saw(b"\n\r\n"));
        let mut p = Proof::default();
        for b in b"GET / HTTP/1.1\r\n\r" {
            assert!(!p.saw(&[*b]));
        }
        assert!(p.saw(b"\n"));
        let mut p = Proof::default();
        assert!(!p.saw(b"GET / HTTP/1.0\n"));
        assert!(p.saw(b"\n"));
        // Bytes that start like the preface, then turn out HTTP/1.
        let mut p = Proof::default();
        assert!(!p.saw(b"P"));
        assert!(p.saw(b"OST / HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn an_http2_connection_is_proven_by_its_first_headers_frame_only() {
        let settings = [0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        let window_update = [0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        let headers = [0, 0, 3, 0x1, 0x4, 0, 0, 0, 1, 0x82, 0x86, 0x84];
        let mut p = Proof::default();
        // The preface alone, even with its first blank line, proves nothing.
        assert!(!p.saw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n"));
        assert!(!p.saw(b"\r\n"));
        assert!(!p.saw(&settings));
        assert!(!p.saw(&window_update));
        assert!(!p.saw(&headers[..10]));
        assert!(p.saw(&headers[10..]));
        // The same, a byte at a time.
        let mut all = H2_PREFACE.to_vec();
        all.extend_from_slice(&settings);
        all.extend_from_slice(&headers);
        let mut p = Proof::default();
        let proven: Vec<bool> = all.iter().map(|b| p.saw(&[*b])).collect();
        assert_eq!(proven.iter().filter(|x| **x).count(), 1);
        assert!(proven[proven.len() - 1]);
    }
}
