//! NATS server as a peer: started with its WebSocket listener on loopback, subscribed to over WebSocket, published
//! to over its plain TCP client port.
//!
//! The NATS client protocol is a byte stream of text control lines, each ended by `\r\n`: the server greets with
//! `INFO {json}`, the client answers `CONNECT {json}`; `SUB <subject> <sid>` subscribes, `PUB <subject> <#bytes>`
//! followed by the payload and `\r\n` publishes, and deliveries are `MSG <subject> <sid> [reply-to] <#bytes>`
//! followed by the payload and `\r\n`. Either side may send `PING` and must then get `PONG`; the server replies to
//! a client's commands in order, so a `PONG` for a `PING` sent after a `SUB` means the subscription is in place,
//! which is the acknowledgement [`NatsWsSubscriber::subscribe`] waits for. Over WebSocket the same stream is cut
//! into binary frames at arbitrary points (a frame may hold several `MSG`s or part of one), so the subscriber
//! reassembles it before parsing.
//!
//! Subjects are dot-separated tokens without whitespace; in a subscription `*` matches one token and `>` the rest.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{connect_tcp, payload_bytes, ws_connect, Delivery, PeerError, ServerProcess, WsConn};

/// NATS' own limit on a control line (`MAX_CONTROL_LINE_SIZE`); a longer one is a protocol error.
const MAX_CONTROL_LINE: usize = 4096;
/// Larger than any payload the server accepts (its `max_payload` is 1 MiB by default, 64 MiB at most).
const MAX_PAYLOAD: usize = 64 << 20;
/// What the client tells the server in `CONNECT`: no `+OK` per command, no headers (so no `HMSG`), no echo of a
/// connection's own publishes.
const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\"name\":\"herald-loadtest\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1,\"echo\":false,\"headers\":false,\"no_responders\":false}\r\nPING\r\n";

// === impl NatsServer ===

/// A `nats-server` started by the harness, with its client port and its WebSocket listener (no TLS) on loopback.
/// Dropping it kills the server.
#[derive(Debug)]
pub(crate) struct NatsServer {
    process: ServerProcess,
    client_addr: SocketAddr,
    ws_addr: SocketAddr,
}

impl NatsServer {
    /// Finds `nats-server` (Debian's package installs `/usr/sbin/nats-server`, which a non-root `PATH` may lack),
    /// then on `PATH`; `None`: not installed.
    pub(crate) fn binary() -> Option<PathBuf> {
        super::find_binary(
            "nats-server",
            &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")],
        )
    }

    /// Writes `nats.conf` into `dir`, starts `binary` with it and waits (up to 10 s) until both listeners accept.
    /// Both addresses must be loopback addresses with explicit ports. The server's log is `dir/nats.log`.
    pub(crate) async fn start(
        binary: &Path,
        dir: &Path,
        client_addr: SocketAddr,
        ws_addr: SocketAddr,
    ) -> Result<Self, PeerError> {
        for addr in [client_addr, ws_addr] {
            if !addr.ip().is_loopback() || addr.port() == 0 {
                return Err(PeerError::InvalidInput(format!(
                    "NATS must listen on a loopback address with a fixed port, not {addr}"
                )));
            }
        }
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("nats.conf");
        std::fs::write(&config_path, config(client_addr, ws_addr))?;
        let mut command = Command::new(binary);
        command.arg("-c").arg(&config_path).current_dir(dir);
        let mut process = ServerProcess::spawn("nats-server", command, dir.join("nats.log"))?;
        process
            .wait_accepting(&[client_addr, ws_addr], Duration::from_secs(10))
            .await?;
        Ok(Self {
            process,
            client_addr,
            ws_addr,
        })
    }

    /// The server's process id, for `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where publishers connect (the NATS client protocol over plain TCP).
    pub(crate) fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Where subscribers connect (the NATS client protocol over WebSocket, path `/`).
    pub(crate) fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// The server's log file.
    pub(crate) fn log_path(&self) -> &Path {
        self.process.log_path()
    }
}

/// The configuration file: loopback listeners and the WebSocket listener without TLS; every limit left at the
/// server's defaults (see peers.md).
fn config(client_addr: SocketAddr, ws_addr: SocketAddr) -> String {
    format!(
        "# Written by herald-loadtest (loadtest/src/peers/nats.rs); see loadtest/peers.md.\n\
         listen: \"{client_addr}\"\n\
         websocket {{\n  listen: \"{ws_addr}\"\n  no_tls: true\n  compression: false\n}}\n"
    )
}

// === impl NatsWsSubscriber ===

/// A subscriber speaking the NATS client protocol over one WebSocket connection.
///
/// Drive it by calling [`next`](Self::next) in a loop: that also answers the server's `PING`s (every 2 minutes;
/// two unanswered ones and the server drops the connection).
pub(crate) struct NatsWsSubscriber {
    ws: WsConn,
    /// The protocol stream reassembled from WebSocket frames, not yet parsed.
    buf: BytesMut,
    /// Deliveries that arrived while a subscribe was waiting for its acknowledgement.
    pending: VecDeque<Delivery>,
    subscriptions: usize,
}

impl NatsWsSubscriber {
    /// Connects to a NATS WebSocket listener, optionally from the source address `local`, and completes the
    /// `INFO` / `CONNECT` / `PING` / `PONG` exchange.
    pub(crate) async fn connect(
        ws_addr: SocketAddr,
        local: Option<IpAddr>,
    ) -> Result<Self, PeerError> {
        let ws = ws_connect(ws_addr, local, "/").await?;
        let mut subscriber = Self {
            ws,
            buf: BytesMut::new(),
            pending: VecDeque::new(),
            subscriptions: 0,
        };
        match subscriber.next_op().await? {
            Op::Info => {}
            other => {
                return Err(PeerError::Protocol(format!(
                    "expected INFO first, got {other:?}"
                )))
            }
        }
        subscriber.send(CONNECT.to_vec()).await?;
        subscriber.await_pongs(&mut [Instant::now()]).await?;
        Ok(subscriber)
    }

    /// Subscribes to one subject and waits for the server to confirm it; returns the time that took.
    pub(crate) async fn subscribe(&mut self, subject: &str) -> Result<Duration, PeerError> {
        Ok(self.subscribe_all(&[subject]).await?[0])
    }

    /// Subscribes to every subject, pipelined (all `SUB`s sent at once, each followed by a `PING`), and waits for
    /// every confirmation. Returns, per subject, the time from sending it to its confirmation. The subjects'
    /// positions count on from the previous calls' and are [`Delivery::subscription`].
    pub(crate) async fn subscribe_all<S: AsRef<str>>(
        &mut self,
        subjects: &[S],
    ) -> Result<Vec<Duration>, PeerError> {
        let mut out = Vec::with_capacity(subjects.len() * 24);
        for subject in subjects {
            let subject = subject.as_ref();
            check_subject(subject)?;
            out.extend_from_slice(b"SUB ");
            out.extend_from_slice(subject.as_bytes());
            out.push(b' ');
            out.extend_from_slice(self.subscriptions.to_string().as_bytes());
            out.extend_from_slice(b"\r\nPING\r\n");
            self.subscriptions += 1;
        }
        let sent = Instant::now();
        self.send(out).await?;
        let mut acked = vec![sent; subjects.len()];
        self.await_pongs(&mut acked).await?;
        Ok(acked
            .into_iter()
            .map(|at| at.duration_since(sent))
            .collect())
    }

    /// The next delivery, in the order the server sent them. `Err(PeerError::Closed(code))` when the server closed the
    /// connection; `Err(PeerError::Rejected)` for a `-ERR` (e.g. `'Slow Consumer'`), after which the server
    /// usually closes the connection. Not cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Delivery, PeerError> {
        if let Some(delivery) = self.pending.pop_front() {
            return Ok(delivery);
        }
        loop {
            match self.next_op().await? {
                Op::Msg(delivery) => return Ok(delivery),
                Op::Err(message) => return Err(PeerError::Rejected(message)),
                Op::Pong => return Err(PeerError::Protocol("PONG without a PING".into())),
                Op::Info | Op::Ok => {}
            }
        }
    }

    /// Reads until one `PONG` per entry of `acked` has arrived, stamping each entry with its arrival time and
    /// queueing the deliveries that come in meanwhile.
    async fn await_pongs(&mut self, acked: &mut [Instant]) -> Result<(), PeerError> {
        let mut received = 0;
        while received < acked.len() {
            match self.next_op().await? {
                Op::Pong => {
                    acked[received] = Instant::now();
                    received += 1;
                }
                Op::Msg(delivery) => self.pending.push_back(delivery),
                Op::Err(message) => return Err(PeerError::Rejected(message)),
                Op::Info | Op::Ok => {}
            }
        }
        Ok(())
    }

    /// The next protocol operation other than `PING` (answered here).
    async fn next_op(&mut self) -> Result<Op, PeerError> {
        loop {
            match parse_op(&mut self.buf)? {
                Some(Op2::Ping) => self.send(b"PONG\r\n".to_vec()).await?,
                Some(Op2::Op(op)) => return Ok(op),
                None => self.fill().await?,
            }
        }
    }

    /// Appends the next WebSocket message to the protocol stream.
    async fn fill(&mut self) -> Result<(), PeerError> {
        loop {
            let frame = self.ws.read_frame().await?;
            match frame.opcode {
                OpCode::Binary | OpCode::Text => {
                    if self.buf.is_empty() {
                        self.buf = payload_bytes(frame.payload);
                    } else {
                        self.buf.extend_from_slice(&frame.payload);
                    }
                    return Ok(());
                }
                OpCode::Close => return Err(super::closed(&frame.payload)),
                // Pings are answered by fastwebsockets; fragments are collected before they get here.
                OpCode::Ping | OpCode::Pong | OpCode::Continuation => {}
            }
        }
    }

    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), PeerError> {
        self.ws
            .write_frame(Frame::binary(Payload::Owned(bytes)))
            .await?;
        Ok(())
    }
}

fn check_subject(subject: &str) -> Result<(), PeerError> {
    if subject.is_empty() || subject.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(PeerError::InvalidInput(format!(
            "NATS subject {subject:?} is empty or contains whitespace"
        )));
    }
    Ok(())
}

// === parsing the server's protocol stream ===

/// A server operation the client acts on.
#[derive(Debug)]
enum Op {
    Msg(Delivery),
    Pong,
    Info,
    Ok,
    Err(String),
}

/// [`Op`] or a `PING`, which the reader answers itself.
#[derive(Debug)]
enum Op2 {
    Op(Op),
    Ping,
}

/// Takes one complete operation off the front of `buf`; `None` when `buf` does not hold a whole one yet.
fn parse_op(buf: &mut BytesMut) -> Result<Option<Op2>, PeerError> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(PeerError::Protocol(format!(
                "control line longer than {MAX_CONTROL_LINE} bytes"
            )));
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let name_end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let simple = |buf: &mut BytesMut, op: Op2| {
        let _ = buf.split_to(eol + 2);
        Ok(Some(op))
    };
    if name.eq_ignore_ascii_case(b"MSG") {
        parse_msg(buf, eol, name_end)
    } else if name.eq_ignore_ascii_case(b"PING") {
        simple(buf, Op2::Ping)
    } else if name.eq_ignore_ascii_case(b"PONG") {
        simple(buf, Op2::Op(Op::Pong))
    } else if name.eq_ignore_ascii_case(b"+OK") {
        simple(buf, Op2::Op(Op::Ok))
    } else if name.eq_ignore_ascii_case(b"INFO") {
        simple(buf, Op2::Op(Op::Info))
    } else if name.eq_ignore_ascii_case(b"-ERR") {
        let message = String::from_utf8_lossy(&line[name_end..])
            .trim()
            .trim_matches('\'')
            .to_owned();
        simple(buf, Op2::Op(Op::Err(message)))
    } else {
        Err(PeerError::Protocol(format!(
            "unknown operation {:?}",
            String::from_utf8_lossy(&line[..line.len().min(64)])
        )))
    }
}

/// `MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n`, whose control line ends at `eol`.
fn parse_msg(buf: &mut BytesMut, eol: usize, args_start: usize) -> Result<Option<Op2>, PeerError> {
    let bad = |what: &str| {
        PeerError::Protocol(format!(
            "bad MSG line ({what}): {:?}",
            String::from_utf8_lossy(&buf[..eol.min(128)])
        ))
    };
    // Up to four arguments, as ranges into the line.
    let mut args = [(0, 0); 4];
    let mut count = 0;
    let mut i = args_start;
    while i < eol {
        if buf[i] == b' ' || buf[i] == b'\t' {
            i += 1;
            continue;
        }
        let start = i;
        while i < eol && buf[i] != b' ' && buf[i] != b'\t' {
            i += 1;
        }
        if count == args.len() {
            return Err(bad("too many arguments"));
        }
        args[count] = (start, i);
        count += 1;
    }
    if count != 3 && count != 4 {
        return Err(bad("wrong number of arguments"));
    }
    let number = |(start, end): (usize, usize)| -> Option<usize> {
        std::str::from_utf8(&buf[start..end]).ok()?.parse().ok()
    };
    let sid = number(args[1]).ok_or_else(|| bad("sid"))?;
    let size = number(args[count - 1]).ok_or_else(|| bad("size"))?;
    if size > MAX_PAYLOAD {
        return Err(bad("payload too large"));
    }
    let total = eol + 2 + size + 2;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if &buf[total - 2..total] != b"\r\n" {
        return Err(bad("payload not followed by CRLF"));
    }
    let message = buf.split_to(total).freeze();
    let (subject_start, subject_end) = args[0];
    Ok(Some(Op2::Op(Op::Msg(Delivery {
        subscription: sid,
        topic: message.slice(subject_start..subject_end),
        payload: message.slice(eol + 2..eol + 2 + size),
    }))))
}

// === impl NatsPublisher ===

/// A publisher on the NATS client port (plain TCP, as NATS backends publish).
///
/// [`publish`](Self::publish) only appends to a buffer; [`flush`](Self::flush) writes it out, so a caller can
/// send one message per write or batch several. A background task answers the server's `PING`s and records a
/// `-ERR`, which the next call returns.
pub(crate) struct NatsPublisher {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    shared: Arc<PublisherShared>,
    buf: Vec<u8>,
    pings_sent: u64,
    reader: JoinHandle<()>,
}

#[derive(Default)]
struct PublisherShared {
    pongs: AtomicU64,
    pong_arrived: Notify,
    /// The first `-ERR`, or why the connection ended.
    error: Mutex<Option<String>>,
}

impl PublisherShared {
    fn fail(&self, why: String) {
        let mut error = self
            .error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        error.get_or_insert(why);
        drop(error);
        self.pong_arrived.notify_waiters();
    }

    fn check(&self) -> Result<(), PeerError> {
        let error = self
            .error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*error {
            Some(why) => Err(PeerError::Rejected(why.clone())),
            None => Ok(()),
        }
    }
}

impl NatsPublisher {
    /// Connects to the NATS client port, optionally from the source address `local`, and completes the
    /// `INFO` / `CONNECT` / `PING` / `PONG` exchange.
    pub(crate) async fn connect(
        client_addr: SocketAddr,
        local: Option<IpAddr>,
    ) -> Result<Self, PeerError> {
        let stream = connect_tcp(client_addr, local).await?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        read_line(&mut read, &mut line).await?;
        if !line.starts_with(b"INFO") {
            return Err(PeerError::Protocol(format!(
                "expected INFO first, got {:?}",
                String::from_utf8_lossy(&line[..line.len().min(64)])
            )));
        }
        write.write_all(CONNECT).await?;
        loop {
            read_line(&mut read, &mut line).await?;
            if line.starts_with(b"PONG") {
                break;
            } else if line.starts_with(b"-ERR") {
                return Err(PeerError::Rejected(
                    String::from_utf8_lossy(&line).trim().to_owned(),
                ));
            }
        }
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let shared = Arc::new(PublisherShared::default());
        let reader = tokio::spawn(publisher_reader(read, writer.clone(), shared.clone()));
        Ok(Self {
            writer,
            shared,
            buf: Vec::with_capacity(64 << 10),
            pings_sent: 0,
            reader,
        })
    }

    /// Appends `PUB <subject> <len>\r\n<payload>\r\n` to the output buffer. Any bytes are fine as payload.
    pub(crate) fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), PeerError> {
        check_subject(subject)?;
        self.buf.extend_from_slice(b"PUB ");
        self.buf.extend_from_slice(subject.as_bytes());
        self.buf.push(b' ');
        self.buf
            .extend_from_slice(payload.len().to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        self.buf.extend_from_slice(payload);
        self.buf.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// Writes out everything published since the last flush (one write).
    pub(crate) async fn flush(&mut self) -> Result<(), PeerError> {
        self.shared.check()?;
        if self.buf.is_empty() {
            return Ok(());
        }
        self.writer.lock().await.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    /// Flushes, then waits until the server has processed everything sent so far (a `PING` round trip): after
    /// this every earlier publish has been handed to the server's subscribers' outbound buffers.
    pub(crate) async fn sync(&mut self) -> Result<(), PeerError> {
        self.buf.extend_from_slice(b"PING\r\n");
        self.flush().await?;
        self.pings_sent += 1;
        loop {
            let arrived = self.shared.pong_arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            self.shared.check()?;
            if self.shared.pongs.load(Ordering::Acquire) >= self.pings_sent {
                return Ok(());
            }
            arrived.await;
        }
    }
}

impl Drop for NatsPublisher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads what the server sends a publisher: answers `PING`, counts `PONG`s, records `-ERR` and the end.
async fn publisher_reader(
    mut read: BufReader<OwnedReadHalf>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    shared: Arc<PublisherShared>,
) {
    let mut line = Vec::new();
    loop {
        if let Err(err) = read_line(&mut read, &mut line).await {
            shared.fail(err.to_string());
            return;
        }
        if line.starts_with(b"PING") {
            if let Err(err) = writer.lock().await.write_all(b"PONG\r\n").await {
                shared.fail(err.to_string());
                return;
            }
        } else if line.starts_with(b"PONG") {
            shared.pongs.fetch_add(1, Ordering::AcqRel);
            shared.pong_arrived.notify_waiters();
        } else if line.starts_with(b"-ERR") {
            shared.fail(String::from_utf8_lossy(&line).trim().to_owned());
        }
        // INFO (cluster updates) and +OK need nothing.
    }
}

/// Reads one `\n`-terminated line (at most [`MAX_CONTROL_LINE`] bytes) into `line`.
async fn read_line(
    read: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Result<(), PeerError> {
    line.clear();
    let n = read.read_until(b'\n', line).await?;
    if n == 0 {
        return Err(PeerError::Closed(None));
    }
    if line.len() > MAX_CONTROL_LINE + 2 {
        return Err(PeerError::Protocol("control line too long".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(op: Option<Op2>) -> Delivery {
        match op {
            Some(Op2::Op(Op::Msg(delivery))) => delivery,
            other => panic!("expected a MSG, got {other:?}"),
        }
    }

    #[test]
    fn parses_msgs_split_anywhere() {
        let stream = b"INFO {\"x\":1}\r\nMSG room.1 3 5\r\nhello\r\nPING\r\nMSG a.b 0 reply.to 2\r\n\r\n\r\n";
        for cut in 0..stream.len() {
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut ops = Vec::new();
            while let Some(op) = parse_op(&mut buf).unwrap() {
                ops.push(op);
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(op) = parse_op(&mut buf).unwrap() {
                ops.push(op);
            }
            assert!(buf.is_empty(), "cut {cut}");
            assert_eq!(ops.len(), 4, "cut {cut}");
            let mut ops = ops.into_iter();
            assert!(matches!(ops.next(), Some(Op2::Op(Op::Info))));
            let first = delivery(ops.next());
            assert_eq!(
                (first.subscription, &first.topic[..], &first.payload[..]),
                (3, &b"room.1"[..], &b"hello"[..])
            );
            assert!(matches!(ops.next(), Some(Op2::Ping)));
            let second = delivery(ops.next());
            assert_eq!(
                (second.subscription, &second.topic[..], &second.payload[..]),
                (0, &b"a.b"[..], &b"\r\n"[..])
            );
        }
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        for bad in [
            &b"MSG a\r\n"[..],
            b"MSG a x 1\r\nz\r\n",
            b"MSG a 1 2\r\nxyz\r\n",
            b"MSG a 1 99999999999999999999\r\n",
            b"BOGUS\r\n",
        ] {
            assert!(parse_op(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_op(&mut BytesMut::from(&[b'x'; MAX_CONTROL_LINE + 1][..])).is_err());
        let mut err = BytesMut::from(&b"-ERR 'Slow Consumer'\r\n"[..]);
        assert!(
            matches!(parse_op(&mut err), Ok(Some(Op2::Op(Op::Err(m)))) if m == "Slow Consumer")
        );
    }
}
