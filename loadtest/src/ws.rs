//! A lean WebSocket client: bind a source address, connect, do the HTTP/1.1 upgrade by hand, then hand the raw
//! `TcpStream` to fastwebsockets.
//!
//! The upgrade is done by hand rather than through hyper so each connection reads frames straight from its
//! `TcpStream` (hyper's `Upgraded` adds a boxed, dynamically dispatched layer on every read), which matters at
//! hundreds of thousands of frames per second on a machine shared with the servers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use fastwebsockets::{Role, WebSocket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// A client WebSocket over a plain TCP stream.
pub(crate) type Ws = WebSocket<Prefixed>;

/// Why a connection attempt failed, worded for the report.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Io(&'static str, io::Error),
    Refused(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(step, e) => write!(f, "{step}: {e}"),
            ConnectError::Refused(why) => write!(f, "upgrade refused: {why}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Opens a TCP connection from `source` (port chosen by the kernel) to `addr`.
pub(crate) async fn tcp(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnectError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| ConnectError::Io("socket", e))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| ConnectError::Io("bind source address", e))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| ConnectError::Io("connect", e))?;
    // Subscribe requests are tiny and latency-measured: never let Nagle hold them back.
    stream
        .set_nodelay(true)
        .map_err(|e| ConnectError::Io("set TCP_NODELAY", e))?;
    Ok(stream)
}

/// Connects and upgrades `ws://{addr}{path_and_query}`.
pub(crate) async fn connect(
    addr: SocketAddr,
    path_and_query: &str,
    source: Option<IpAddr>,
) -> Result<Ws, ConnectError> {
    let mut stream = tcp(addr, source).await?;
    // A fixed key is fine for a load client: the accept value only proves the server speaks WebSocket, and the
    // 101 status below proves the same.
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ConnectError::Io("send upgrade", e))?;
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if buf.len() > 16 * 1024 {
            return Err(ConnectError::Refused(
                "response headers above 16 KiB".into(),
            ));
        }
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| ConnectError::Io("read upgrade response", e))?;
        if n == 0 {
            return Err(ConnectError::Refused(
                "connection closed before the upgrade response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
    };
    let status_line = buf
        .split(|b| *b == b'\r')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    if !status_line.starts_with("HTTP/1.1 101") {
        return Err(ConnectError::Refused(status_line));
    }
    // The server may send its first frame in the same segment as the 101; keep those bytes.
    let leftover = buf.split_off(end);
    let mut ws = WebSocket::after_handshake(
        Prefixed {
            prefix: leftover,
            pos: 0,
            inner: stream,
        },
        Role::Client,
    );
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    Ok(ws)
}

/// A `TcpStream` that first yields bytes already read past the HTTP response.
pub(crate) struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
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
