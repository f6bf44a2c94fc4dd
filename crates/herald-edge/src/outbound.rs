//! Each connection's bounded outbound queue, and the writer task that drains it.
//!
//! Publishers never touch a socket: they push an encoded payload onto the subscriber's queue and move on, so a
//! subscriber that stops reading can slow nobody but itself. The queue is bounded in frames and bytes; the push
//! that would exceed either bound marks the connection a slow consumer, drops what it had queued and has it closed
//! with [`CLOSE_SLOW_CONSUMER`].
//!
//! The writer takes everything queued at once and writes it with one `write_all`: a fan-out burst to one
//! connection costs one syscall, not one per frame.
//!
//! The writer also runs the connection's liveness checks ([`crate::liveness`]): it appends WebSocket pings to
//! what it writes (and pings idle connections), and closes a connection whose pong is late, with
//! [`CLOSE_SLOW_CONSUMER`] when deliveries were waiting behind the ping and [`CLOSE_NO_PONG`] otherwise.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::liveness::{Due, Late, Liveness, LivenessSettings, PongSlot};
use crate::metrics::Metrics;

/// Close code for a slow consumer: its outbound queue overflowed, or a ping stayed unanswered past
/// `limits.pong-timeout-ms` while deliveries waited behind it (private-use range; documented in the README).
/// Centrifugo's code for the same thing is 3008.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code: an operator disconnected this connection (`herald ctl disconnect`).
pub const CLOSE_BY_OPERATOR: u16 = 4010;
/// Close code for a connection that left an idle ping unanswered past `limits.pong-timeout-ms`: a dead peer
/// (half-open TCP) or a client that does not answer pings. Centrifugo's "no pong" is 3012; herald's private codes
/// are its numbers moved into the 4000 range. Not 1011, which says the server failed.
pub const CLOSE_NO_PONG: u16 = 4012;
/// Close code for a server going away (drain).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for an idle connection (also used by High-templar's timeout).
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code for a message above `limits.max-message-bytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for text that is not UTF-8.
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Close code for a WebSocket protocol violation.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// How long a single socket write may block before the connection is given up on (with busy pings on, the pong
/// timeout bounds it sooner).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After sending a close frame, how long to wait for the client's close before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long the close frame to a client that failed its liveness check may take to write. Such a client is
/// seconds behind or gone, so the writer neither waits for its socket nor lingers for its close reply.
const LATE_CLOSE_WRITE: Duration = Duration::from_millis(250);

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The connection is closing; the frame was dropped.
    Closed,
    /// This push overflowed the queue; the connection is now closing as a slow consumer.
    SlowConsumer,
}

#[derive(Debug)]
struct Queued {
    opcode: u8,
    payload: Bytes,
    /// When the publish this frame delivers was accepted, for the publish-to-delivery histogram.
    published_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Queued>,
    bytes: usize,
    close: Option<(u16, &'static str)>,
}

/// A connection's outbound queue.
#[derive(Debug)]
pub struct Outbound {
    state: Mutex<State>,
    wake: Notify,
    max_frames: usize,
    max_bytes: usize,
    /// Cancelled when the connection is over: the writer has finished, or the drain deadline passed. Both tasks
    /// stop on it, even mid-write.
    kill: CancellationToken,
    /// The ping the writer awaits a pong for; the reader fills in the answer.
    pong: PongSlot,
}

impl Outbound {
    /// A queue holding at most `max_frames` frames and `max_bytes` payload bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbound {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            max_frames,
            max_bytes,
            kill: CancellationToken::new(),
            pong: PongSlot::default(),
        }
    }

    /// Records a pong the client sent; returns whether it answered the writer's outstanding ping (any other pong
    /// is ignored). The writer is woken to schedule its next ping rather than sleep until the pong deadline.
    pub fn record_pong(&self, payload: &[u8]) -> bool {
        let answered = self.pong.answer(payload);
        if answered {
            self.wake.notify_one();
        }
        answered
    }

    /// Queues a text frame. `published_at` is set for deliveries.
    pub fn push_text(
        &self,
        payload: Bytes,
        published_at: Option<Instant>,
    ) -> Result<(), PushError> {
        self.push(OP_TEXT, payload, published_at, true)
    }

    /// Queues a pong answering a client ping. Control replies are not counted against the bounds: the client
    /// can only cause as many as it sends, and its sending is rate limited.
    pub fn push_pong(&self, payload: Bytes) -> Result<(), PushError> {
        self.push(OP_PONG, payload, None, false)
    }

    fn push(
        &self,
        opcode: u8,
        payload: Bytes,
        published_at: Option<Instant>,
        bounded: bool,
    ) -> Result<(), PushError> {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Err(PushError::Closed);
        }
        if bounded
            && (state.frames.len() + 1 > self.max_frames
                || state.bytes + payload.len() > self.max_bytes)
        {
            state.frames.clear();
            state.bytes = 0;
            state.close = Some((CLOSE_SLOW_CONSUMER, "slow consumer"));
            drop(state);
            // The writer finishes the write it may be blocked in (bounded by WRITE_TIMEOUT), then sends the close:
            // a client that is merely slow still learns why it was dropped.
            self.wake.notify_one();
            return Err(PushError::SlowConsumer);
        }
        state.bytes += payload.len();
        state.frames.push_back(Queued {
            opcode,
            payload,
            published_at,
        });
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Asks the writer to send what is queued, then a close frame with `code`, then stop. The first close wins.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut state = self.state.lock();
        if state.close.is_none() {
            state.close = Some((code, reason));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Closes the connection for failing its liveness check: drops what is queued (the client is seconds behind
    /// or gone) and asks for a close with `code` unless one is pending. Returns how many deliveries were dropped,
    /// and whether this was the close (rather than one already pending).
    fn abandon(&self, code: u16, reason: &'static str) -> (u64, bool) {
        let mut state = self.state.lock();
        let dropped = state
            .frames
            .iter()
            .filter(|f| f.published_at.is_some())
            .count() as u64;
        state.frames.clear();
        state.bytes = 0;
        let first = state.close.is_none();
        if first {
            state.close = Some((code, reason));
        }
        (dropped, first)
    }

    /// Whether a close has been requested.
    pub fn is_closing(&self) -> bool {
        self.state.lock().close.is_some()
    }

    /// Frames currently queued.
    pub fn queued_frames(&self) -> usize {
        self.state.lock().frames.len()
    }

    /// Cancelled once the connection is being torn down without ceremony.
    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    /// Swaps the queued frames into `into` (which must be empty) and returns the pending close. Swapping keeps
    /// both deques' capacity, so a steady stream allocates no queue memory.
    fn take_into(&self, into: &mut VecDeque<Queued>) -> Option<(u16, &'static str)> {
        debug_assert!(into.is_empty());
        let mut state = self.state.lock();
        state.bytes = 0;
        std::mem::swap(&mut state.frames, into);
        state.close
    }
}

/// Appends one unmasked server frame (header and payload) to `out`.
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut BytesMut) {
    out.reserve(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

/// The largest write buffer a connection keeps between writes.
const RETAINED_WRITE_BUFFER: usize = 16 * 1024;
/// The most queued-frame slots a connection's writer keeps between writes.
const RETAINED_FRAME_SLOTS: usize = 64;

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// Why the writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterExit {
    /// It sent a close frame with this code.
    Closed(u16),
    /// The connection was killed (slow consumer) or the socket failed.
    Aborted,
    /// The client failed its liveness check while a write to it was blocked (or its close frame could not be
    /// written promptly): the socket was dropped without a close frame, since the frame in progress could not
    /// be finished.
    CutOff(Late),
}

/// What the writer needs besides the queue and the socket.
#[derive(Debug, Clone)]
pub struct WriterContext {
    /// Where writes, pings and liveness closes are counted.
    pub metrics: Arc<Metrics>,
    /// Fires when the server drains: the writer then queues a 1001 close.
    pub going_away: CancellationToken,
    /// Fires when the client's side has ended; after sending a close the writer waits for it (up to a linger)
    /// so the client sees an orderly close.
    pub reader_done: CancellationToken,
    /// When to ping the client and how long it has to answer.
    pub liveness: LivenessSettings,
    /// The connection's id, for logs (empty for a refused connection).
    pub connection: Arc<str>,
}

/// Drains `outbound` into `sink` until a close is sent or the connection is killed.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    outbound: Arc<Outbound>,
    sink: W,
    context: WriterContext,
) -> WriterExit {
    let exit = write_until_closed(&outbound, sink, &context).await;
    // Whatever ended the writer ends the connection: the reader stops waiting for a client that may never speak.
    outbound.kill.cancel();
    exit
}

/// Closes a connection that failed its liveness check: drops its queue, asks for the close and counts it (unless
/// the connection was already closing for another reason, which counted itself).
fn fail_liveness(outbound: &Outbound, context: &WriterContext, late: Late) {
    let metrics = &context.metrics;
    let timeout_ms = context.liveness.pong_timeout.as_millis() as u64;
    match late {
        Late::SlowConsumer => {
            let (dropped, first) = outbound.abandon(CLOSE_SLOW_CONSUMER, "slow consumer");
            metrics.messages_dropped.add("slow_consumer", dropped);
            if first {
                metrics.slow_consumer_disconnects.inc();
                tracing::warn!(
                    connection = %context.connection,
                    pong_timeout_ms = timeout_ms,
                    dropped,
                    "slow consumer: ping unanswered while deliveries waited, closing"
                );
            }
        }
        Late::NoPong => {
            let (dropped, first) = outbound.abandon(CLOSE_NO_PONG, "no pong");
            metrics.messages_dropped.add("closed", dropped);
            if first {
                metrics.client_errors.inc("no_pong");
                tracing::debug!(
                    connection = %context.connection,
                    pong_timeout_ms = timeout_ms,
                    "no pong: idle ping unanswered, closing"
                );
            }
        }
    }
}

async fn write_until_closed<W: AsyncWrite + Unpin>(
    outbound: &Outbound,
    mut sink: W,
    context: &WriterContext,
) -> WriterExit {
    let metrics = &*context.metrics;
    let (going_away, reader_done) = (&context.going_away, &context.reader_done);
    // Allocated on the first write and sized by what is written: most connections are idle most of the time,
    // and their memory is what limits how many one node holds.
    let mut buf = BytesMut::new();
    let mut frames = VecDeque::new();
    let mut published = Vec::new();
    let mut going_away_sent = false;
    let mut liveness = Liveness::new(&context.liveness, tokio::time::Instant::now());
    // An idle ping is due with the next write.
    let mut idle_ping_due = false;
    // Set once the connection failed its liveness check: its close goes out without waiting on the client.
    let mut late: Option<Late> = None;
    // The liveness timer. It is reset only when its deadline moves (about once per ping), not on every write, and
    // a tokio timer registers with the runtime only once polled: connections with the checks off never do.
    let timer = tokio::time::sleep_until(
        liveness
            .next_check()
            .unwrap_or_else(tokio::time::Instant::now),
    );
    tokio::pin!(timer);
    loop {
        // Checked on every turn, not only when the timer fires: a connection written to continuously may never
        // wait long enough for it.
        liveness.observe(&outbound.pong);
        if late.is_none() {
            if let Due::Late(why) = liveness.check(tokio::time::Instant::now()) {
                late = Some(why);
                fail_liveness(outbound, context, why);
            }
        }
        frames.clear();
        let close = outbound.take_into(&mut frames);
        if frames.is_empty() && close.is_none() && !idle_ping_due {
            let next = liveness.next_check();
            if let Some(at) = next {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                // Biased: a close queued just before the reader finished must still be sent.
                biased;
                _ = outbound.wake.notified() => {}
                _ = going_away.cancelled(), if !going_away_sent => {
                    going_away_sent = true;
                    outbound.close(CLOSE_GOING_AWAY, "server shutting down");
                }
                _ = outbound.kill.cancelled() => return WriterExit::Aborted,
                // The client left without a close frame (or the reader gave up on it): nothing more to say.
                _ = reader_done.cancelled() => return WriterExit::Aborted,
                // A late pong is handled at the top of the loop.
                _ = &mut timer, if next.is_some() => {
                    liveness.observe(&outbound.pong);
                    idle_ping_due = liveness.check(tokio::time::Instant::now()) == Due::Ping;
                }
            }
            continue;
        }

        buf.clear();
        published.clear();
        let frame_count = frames.len() as u64;
        let mut data = false;
        for frame in &frames {
            encode_frame(frame.opcode, &frame.payload, &mut buf);
            data |= frame.opcode == OP_TEXT;
            if let Some(at) = frame.published_at {
                published.push(at);
            }
        }
        let started = tokio::time::Instant::now();
        if close.is_none() {
            // The ping goes after the frames: its pong proves the client read them.
            if let Some(id) = liveness.before_write(started, data, idle_ping_due, &outbound.pong) {
                encode_frame(OP_PING, &PongSlot::payload(id), &mut buf);
                metrics.pings_sent.inc();
            }
        }
        idle_ping_due = false;
        if let Some((code, reason)) = close {
            encode_frame(OP_CLOSE, &close_payload(code, reason), &mut buf);
        }
        let limit = started + WRITE_TIMEOUT;
        let liveness_limit = match late {
            Some(_) => Some(started + LATE_CLOSE_WRITE),
            None => liveness.write_deadline(started),
        };
        let deadline = liveness_limit.map_or(limit, |at| at.min(limit));
        let write = async {
            sink.write_all(&buf).await?;
            sink.flush().await
        };
        tokio::select! {
            result = tokio::time::timeout_at(deadline, write) => match result {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return WriterExit::Aborted,
                Err(_) => {
                    if let Some(why) = late {
                        return WriterExit::CutOff(why);
                    }
                    if liveness_limit.is_some_and(|at| at <= limit) {
                        // Blocked for the pong timeout: a ping behind this write could not be answered in time.
                        let why = liveness.late_write(data);
                        fail_liveness(outbound, context, why);
                        return WriterExit::CutOff(why);
                    }
                    return WriterExit::Aborted;
                }
            },
            _ = outbound.kill.cancelled() => return WriterExit::Aborted,
        }
        metrics.frames_sent.add(frame_count);
        let now = Instant::now();
        for &at in &published {
            metrics.publish_to_delivery.observe(now.duration_since(at));
        }
        // A burst's buffers are not kept for the idle time that follows it.
        if buf.capacity() > RETAINED_WRITE_BUFFER {
            buf = BytesMut::new();
        }
        if frames.capacity() > RETAINED_FRAME_SLOTS {
            frames = VecDeque::new();
            published = Vec::new();
        }
        if let Some((code, _)) = close {
            // A client that failed its liveness check is seconds behind or gone: it would not read the close, let
            // alone answer it, within the linger.
            if late.is_none() {
                let _ = tokio::time::timeout(CLOSE_LINGER, reader_done.cancelled()).await;
            }
            let _ = sink.shutdown().await;
            return WriterExit::Closed(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(reader_done: CancellationToken, liveness: LivenessSettings) -> WriterContext {
        WriterContext {
            metrics: Arc::new(Metrics::default()),
            going_away: CancellationToken::new(),
            reader_done,
            liveness,
            connection: Arc::from("test"),
        }
    }

    #[test]
    fn frame_headers_use_the_shortest_length_encoding() {
        for (len, header) in [
            (5usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let mut out = BytesMut::new();
            encode_frame(OP_TEXT, &vec![b'x'; len], &mut out);
            assert_eq!(out.len(), len + header, "len {len}");
            assert_eq!(out[0], 0x81);
        }
    }

    #[test]
    fn overflow_marks_a_slow_consumer_and_drops_the_queue() {
        let q = Outbound::new(2, 1000);
        assert!(q.push_text(Bytes::from_static(b"a"), None).is_ok());
        assert!(q.push_text(Bytes::from_static(b"b"), None).is_ok());
        assert_eq!(
            q.push_text(Bytes::from_static(b"c"), None),
            Err(PushError::SlowConsumer)
        );
        assert_eq!(q.queued_frames(), 0);
        assert!(q.is_closing());
        assert_eq!(
            q.push_text(Bytes::from_static(b"d"), None),
            Err(PushError::Closed)
        );

        let q = Outbound::new(100, 10);
        assert!(q.push_text(Bytes::from(vec![0; 10]), None).is_ok());
        assert_eq!(
            q.push_text(Bytes::from_static(b"x"), None),
            Err(PushError::SlowConsumer)
        );
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_one_write_followed_by_the_close() {
        let q = Arc::new(Outbound::new(100, 10_000));
        for payload in ["one", "two", "three"] {
            q.push_text(Bytes::from(payload), None).unwrap();
        }
        q.close(CLOSE_GOING_AWAY, "bye");
        let done = CancellationToken::new();
        done.cancel();
        let mut sink = Vec::new();
        let exit = run_writer(q, &mut sink, context(done, LivenessSettings::OFF)).await;
        assert_eq!(exit, WriterExit::Closed(CLOSE_GOING_AWAY));
        let mut expected = BytesMut::new();
        for payload in ["one", "two", "three"] {
            encode_frame(OP_TEXT, payload.as_bytes(), &mut expected);
        }
        encode_frame(
            OP_CLOSE,
            &close_payload(CLOSE_GOING_AWAY, "bye"),
            &mut expected,
        );
        assert_eq!(sink, expected.to_vec());
    }

    /// Reads one unmasked server frame: (opcode, payload).
    async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 2];
        r.read_exact(&mut head).await.ok()?;
        let len = match head[1] & 0x7f {
            126 => r.read_u16().await.ok()? as usize,
            127 => r.read_u64().await.ok()? as usize,
            n => n as usize,
        };
        let mut payload = vec![0; len];
        r.read_exact(&mut payload).await.ok()?;
        Some((head[0] & 0x0f, payload))
    }

    fn busy(pong_timeout_ms: u64) -> LivenessSettings {
        LivenessSettings {
            busy_ping_interval: Some(Duration::from_millis(1000)),
            ping_interval: Some(Duration::from_millis(25_000)),
            pong_timeout: Duration::from_millis(pong_timeout_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_answering_is_closed_as_a_slow_consumer() {
        let q = Arc::new(Outbound::new(100, 1 << 20));
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let ctx = context(CancellationToken::new(), busy(3000));
        let metrics = ctx.metrics.clone();
        let started = tokio::time::Instant::now();
        let writer = tokio::spawn(run_writer(q.clone(), server, ctx));

        // Deliveries in the first second carry no ping.
        q.push_text(Bytes::from_static(b"early"), Some(Instant::now()))
            .unwrap();
        assert_eq!(
            read_frame(&mut client).await,
            Some((OP_TEXT, b"early".to_vec()))
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        q.push_text(Bytes::from_static(b"one"), Some(Instant::now()))
            .unwrap();
        assert_eq!(
            read_frame(&mut client).await,
            Some((OP_TEXT, b"one".to_vec()))
        );
        let (opcode, ping) = read_frame(&mut client).await.unwrap();
        assert_eq!(opcode, OP_PING);
        // The client reads but never answers: more deliveries go out without another ping while it is awaited.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            q.push_text(Bytes::from_static(b"more"), Some(Instant::now()))
                .unwrap();
            assert_eq!(
                read_frame(&mut client).await,
                Some((OP_TEXT, b"more".to_vec()))
            );
        }
        let (opcode, close) = read_frame(&mut client).await.unwrap();
        assert_eq!(opcode, OP_CLOSE);
        assert_eq!(close, close_payload(CLOSE_SLOW_CONSUMER, "slow consumer"));
        // Without lingering for a close reply the client will not send.
        assert_eq!(
            writer.await.unwrap(),
            WriterExit::Closed(CLOSE_SLOW_CONSUMER)
        );
        assert_eq!(started.elapsed(), Duration::from_millis(4000));
        assert_eq!(metrics.slow_consumer_disconnects.get(), 1);
        assert_eq!(metrics.pings_sent.get(), 1);
        assert_eq!(ping.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn answered_pings_keep_a_busy_connection_open() {
        let q = Arc::new(Outbound::new(100, 1 << 20));
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let ctx = context(CancellationToken::new(), busy(3000));
        let metrics = ctx.metrics.clone();
        let writer = tokio::spawn(run_writer(q.clone(), server, ctx));
        let answering = q.clone();
        let client_task = tokio::spawn(async move {
            let mut texts = 0;
            while let Some((opcode, payload)) = read_frame(&mut client).await {
                match opcode {
                    // What the reader does with the pong the client sends back.
                    OP_PING => assert!(answering.record_pong(&payload)),
                    OP_TEXT => texts += 1,
                    OP_CLOSE => return (texts, payload),
                    other => panic!("unexpected opcode {other}"),
                }
            }
            panic!("no close");
        });
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            q.push_text(Bytes::from_static(b"x"), Some(Instant::now()))
                .unwrap();
        }
        q.close(CLOSE_GOING_AWAY, "bye");
        let (texts, close) = client_task.await.unwrap();
        assert_eq!(texts, 100);
        assert_eq!(close, close_payload(CLOSE_GOING_AWAY, "bye"));
        assert_eq!(writer.await.unwrap(), WriterExit::Closed(CLOSE_GOING_AWAY));
        assert_eq!(metrics.slow_consumer_disconnects.get(), 0);
        // About one ping a second over ten seconds.
        assert!(
            (9..=10).contains(&metrics.pings_sent.get()),
            "{}",
            metrics.pings_sent.get()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answered_idle_pings_keep_their_interval_even_below_the_pong_timeout() {
        let q = Arc::new(Outbound::new(100, 1 << 20));
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let settings = LivenessSettings {
            busy_ping_interval: None,
            ping_interval: Some(Duration::from_millis(200)),
            pong_timeout: Duration::from_millis(3000),
        };
        let ctx = context(CancellationToken::new(), settings);
        let metrics = ctx.metrics.clone();
        let started = tokio::time::Instant::now();
        let writer = tokio::spawn(run_writer(q.clone(), server, ctx));
        for i in 1..=10u32 {
            let (opcode, payload) = read_frame(&mut client).await.unwrap();
            assert_eq!(opcode, OP_PING);
            assert_eq!(started.elapsed(), Duration::from_millis(200) * i);
            assert!(q.record_pong(&payload));
        }
        assert_eq!(metrics.pings_sent.get(), 10);
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_ping_left_unanswered_closes_with_no_pong() {
        let q = Arc::new(Outbound::new(100, 1 << 20));
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let ctx = context(CancellationToken::new(), busy(3000));
        let metrics = ctx.metrics.clone();
        let started = tokio::time::Instant::now();
        let writer = tokio::spawn(run_writer(q.clone(), server, ctx));
        let (opcode, _) = read_frame(&mut client).await.unwrap();
        assert_eq!(opcode, OP_PING);
        assert_eq!(started.elapsed(), Duration::from_millis(25_000));
        let (opcode, close) = read_frame(&mut client).await.unwrap();
        assert_eq!(opcode, OP_CLOSE);
        assert_eq!(close, close_payload(CLOSE_NO_PONG, "no pong"));
        assert_eq!(writer.await.unwrap(), WriterExit::Closed(CLOSE_NO_PONG));
        assert_eq!(started.elapsed(), Duration::from_millis(28_000));
        assert_eq!(metrics.client_errors.get("no_pong"), 1);
        assert_eq!(metrics.slow_consumer_disconnects.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_for_the_pong_timeout_cuts_the_connection_off() {
        let q = Arc::new(Outbound::new(100, 1 << 20));
        // The client never reads and its socket holds 64 bytes.
        let (server, _client) = tokio::io::duplex(64);
        let ctx = context(CancellationToken::new(), busy(3000));
        let metrics = ctx.metrics.clone();
        let started = tokio::time::Instant::now();
        let writer = tokio::spawn(run_writer(q.clone(), server, ctx));
        q.push_text(Bytes::from(vec![b'x'; 1000]), Some(Instant::now()))
            .unwrap();
        assert_eq!(
            writer.await.unwrap(),
            WriterExit::CutOff(Late::SlowConsumer)
        );
        assert_eq!(started.elapsed(), Duration::from_millis(3000));
        assert_eq!(metrics.slow_consumer_disconnects.get(), 1);
        assert!(q.killed().is_cancelled());
        // Later deliveries are refused rather than queued.
        assert_eq!(
            q.push_text(Bytes::from_static(b"late"), None),
            Err(PushError::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_checks_off_a_silent_client_is_never_pinged() {
        let q = Arc::new(Outbound::new(100, 1 << 20));
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(run_writer(
            q.clone(),
            server,
            context(CancellationToken::new(), LivenessSettings::OFF),
        ));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        q.push_text(Bytes::from_static(b"hi"), None).unwrap();
        q.close(CLOSE_GOING_AWAY, "bye");
        assert_eq!(
            read_frame(&mut client).await,
            Some((OP_TEXT, b"hi".to_vec()))
        );
        assert_eq!(read_frame(&mut client).await.unwrap().0, OP_CLOSE);
        writer.abort();
    }
}
