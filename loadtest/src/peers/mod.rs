//! Drivers for the servers herald is measured against, run on the same machine in the same run.
//!
//! # Layout
//!
//! - [`nats`]: NATS server with its WebSocket listener ([`nats::NatsServer`]), a subscriber speaking the NATS
//!   client protocol over WebSocket ([`nats::NatsWsSubscriber`]) and a publisher over plain TCP
//!   ([`nats::NatsPublisher`]).
//! - [`sockudo`]: Sockudo, a Pusher-protocol server ([`sockudo::SockudoServer`]), a Pusher WebSocket subscriber
//!   ([`sockudo::PusherSubscriber`]) and a publisher over Pusher's signed HTTP API ([`sockudo::PusherPublisher`]).
//! - here, what both share: [`Delivery`], [`PeerError`], [`ServerProcess`] (a server child process that is killed
//!   when dropped) and [`find_binary`].
//!
//! Every client can bind a chosen loopback source address before connecting (the harness spreads clients over
//! 127.0.0.2, 127.0.0.3, ... to get past one address pair's ephemeral ports). Clients are single-task: a
//! subscriber is driven by calling its `next()` in a loop, which also answers the server's keep-alive pings, so a
//! subscriber nobody polls is eventually dropped by its server (after about 2 minutes for NATS, about
//! `activity_timeout` + 30 s for Sockudo). `next()` is not cancel-safe (fastwebsockets' `read_frame` is not):
//! poll it in its own task and end the task rather than racing it in `select!`.
//!
//! How each peer is installed and configured, and every setting changed from its defaults, is in
//! `loadtest/peers.md`.

pub(crate) mod nats;
pub(crate) mod sockudo;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::FragmentCollector;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// One message received by a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// Which of this connection's subscriptions it came through: the position (from 0) of the subject or
    /// channel in the order this connection subscribed to them.
    pub(crate) subscription: usize,
    /// The subject (NATS: the subject it was published to, which differs from the subscribed one for wildcard
    /// subscriptions) or channel (Sockudo) it was published to.
    pub(crate) topic: Bytes,
    /// Exactly the bytes the publisher passed in.
    pub(crate) payload: Bytes,
}

/// Why a peer's server or client failed. Nothing a server sends makes a client panic: bad frames end up here.
#[derive(Debug)]
pub(crate) enum PeerError {
    /// A socket or process operation failed.
    Io(io::Error),
    /// The WebSocket layer failed (handshake refused, bad frame, ...).
    WebSocket(fastwebsockets::WebSocketError),
    /// The HTTP client failed.
    Http(hyper::Error),
    /// The server sent something that does not follow its protocol.
    Protocol(String),
    /// The server answered with an error (NATS `-ERR`, Pusher `pusher:error`, an HTTP error status).
    Rejected(String),
    /// The server closed the connection, with the WebSocket close code when it sent a close frame with one.
    Closed(Option<u16>),
    /// A server process did not start, or did not accept connections in time; the message ends with the tail
    /// of its log.
    Start(String),
    /// The publisher was given something its protocol cannot carry (e.g. a non-UTF-8 payload for Pusher).
    InvalidInput(String),
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(err) => write!(f, "i/o error: {err}"),
            Self::WebSocket(err) => write!(f, "websocket error: {err}"),
            Self::Http(err) => write!(f, "http error: {err}"),
            Self::Protocol(msg) => write!(f, "protocol error: {msg}"),
            Self::Rejected(msg) => write!(f, "server rejected the request: {msg}"),
            Self::Closed(Some(code)) => write!(f, "the server closed the connection (code {code})"),
            Self::Closed(None) => f.write_str("the server closed the connection"),
            Self::Start(msg) => write!(f, "server did not start: {msg}"),
            Self::InvalidInput(msg) => write!(f, "invalid input: {msg}"),
        }
    }
}

impl std::error::Error for PeerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(err) => Some(err),
            Self::WebSocket(err) => Some(err),
            Self::Http(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for PeerError {
    fn from(err: io::Error) -> Self {
        Self::Io(err)
    }
}

impl From<fastwebsockets::WebSocketError> for PeerError {
    fn from(err: fastwebsockets::WebSocketError) -> Self {
        match err {
            fastwebsockets::WebSocketError::ConnectionClosed
            | fastwebsockets::WebSocketError::UnexpectedEOF => Self::Closed(None),
            err => Self::WebSocket(err),
        }
    }
}

impl From<hyper::Error> for PeerError {
    fn from(err: hyper::Error) -> Self {
        Self::Http(err)
    }
}

// === impl ServerProcess ===

/// A server started by this process. Dropping it kills that child (SIGKILL, by its own PID, never by name) and
/// reaps it.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `command` with stdout and stderr appended to `log`, stdin closed.
    pub(crate) fn spawn(
        name: &'static str,
        mut command: Command,
        log: PathBuf,
    ) -> Result<Self, PeerError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command
            .spawn()
            .map_err(|err| PeerError::Start(format!("{name}: cannot run {command:?}: {err}")))?;
        Ok(Self { child, name, log })
    }

    /// The server's process id, for reading its RSS and CPU time from `/proc/<pid>/`.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the server's stdout and stderr go.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until every address accepts a TCP connection, failing early if the server exits.
    pub(crate) async fn wait_accepting(
        &mut self,
        addrs: &[SocketAddr],
        timeout: Duration,
    ) -> Result<(), PeerError> {
        let deadline = Instant::now() + timeout;
        for addr in addrs {
            loop {
                if let Some(status) = self.child.try_wait()? {
                    return Err(PeerError::Start(format!(
                        "{} exited ({status}) before accepting on {addr}; log {}:\n{}",
                        self.name,
                        self.log.display(),
                        log_tail(&self.log)
                    )));
                }
                if TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(PeerError::Start(format!(
                        "{} did not accept on {addr} within {timeout:?}; log {}:\n{}",
                        self.name,
                        self.log.display(),
                        log_tail(&self.log)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // kill() is a no-op error when the child has already exited; wait() reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a server's log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Finds an executable: first in `preferred` (e.g. `target/bench-tools/bin`, where
/// `scripts/install-bench-deps.sh` puts Sockudo), then on `PATH`. `None` means the peer is not installed and
/// should be skipped.
pub(crate) fn find_binary(name: &str, preferred: &[PathBuf]) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    preferred
        .iter()
        .chain(path_dirs.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

// === connecting ===

/// Connects to `remote` from `local` (port chosen by the kernel) when given, with Nagle off: every client here
/// writes whole protocol messages and wants them on the wire at once.
pub(crate) async fn connect_tcp(
    remote: SocketAddr,
    local: Option<IpAddr>,
) -> Result<TcpStream, PeerError> {
    let socket = if remote.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(remote).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The WebSocket type every subscriber here reads: whole messages (fragments collected), pings answered.
pub(crate) type WsConn = FragmentCollector<TokioIo<Upgraded>>;

/// Opens a WebSocket to `http://<remote><path_and_query>` with fastwebsockets' hyper-based client handshake.
pub(crate) async fn ws_connect(
    remote: SocketAddr,
    local: Option<IpAddr>,
    path_and_query: &str,
) -> Result<WsConn, PeerError> {
    let stream = connect_tcp(remote, local).await?;
    let request = hyper::Request::builder()
        .method("GET")
        .uri(path_and_query)
        .header(hyper::header::HOST, remote.to_string())
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|err| {
            PeerError::InvalidInput(format!("bad WebSocket request {path_and_query:?}: {err}"))
        })?;
    let (ws, _response) =
        fastwebsockets::handshake::client(&SpawnExecutor, request, stream).await?;
    Ok(FragmentCollector::new(ws))
}

/// Runs hyper's connection task (which ends once the connection is upgraded) on the current tokio runtime.
struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future);
    }
}

/// The error for a received close frame: its status code, when it has one.
pub(crate) fn closed(payload: &[u8]) -> PeerError {
    PeerError::Closed(match payload {
        [high, low, ..] => Some(u16::from_be_bytes([*high, *low])),
        _ => None,
    })
}

/// Takes a frame's payload as owned bytes without copying when fastwebsockets already owns it.
pub(crate) fn payload_bytes(payload: fastwebsockets::Payload<'_>) -> bytes::BytesMut {
    match payload {
        fastwebsockets::Payload::Bytes(bytes) => bytes,
        other => bytes::BytesMut::from(&other[..]),
    }
}
