//! Accepted gRPC connections that acknowledge what they read at once
//! (`TCP_QUICKACK`, re-armed after every read: Linux leaves quick-ack mode
//! by itself). Clients that keep Nagle's algorithm on (as-shipped
//! `nacos-sdk` 0.8) hold each small segment until the previous one is
//! acknowledged; a delayed ACK then costs every call about 40 ms.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP stream that re-arms quick ACKs after each read that got data.
pub struct QuickAck {
    inner: TcpStream,
    enabled: bool,
}

impl QuickAck {
    /// Wraps `inner`; with `enabled` false it is a plain stream.
    pub fn new(inner: TcpStream, enabled: bool) -> Self {
        let s = Self { inner, enabled };
        s.arm();
        s
    }

    fn arm(&self) {
        #[cfg(target_os = "linux")]
        if self.enabled {
            // Best effort: a failure only costs latency.
            let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let out = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(out, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.arm();
        }
        out
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for QuickAck {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn accepted_after_a_read(enabled: bool) -> bool {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = QuickAck::new(tcp, enabled);
        // Request/response exchanges put the kernel in delayed-ACK
        // ("ping-pong") mode unless quick ACKs are re-armed.
        let mut buf = [0u8; 4];
        for _ in 0..5 {
            client.write_all(b"ping").await.unwrap();
            conn.read_exact(&mut buf).await.unwrap();
            conn.write_all(b"pong").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
        }
        client.write_all(b"ping").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        socket2::SockRef::from(&conn.inner).tcp_quickack().unwrap()
    }

    #[tokio::test]
    async fn quick_ack_is_armed_after_reads_only_when_enabled() {
        assert!(accepted_after_a_read(true).await);
        assert!(!accepted_after_a_read(false).await);
    }
}
