//! Each connection's bounded outbound queue, and the writer task that drains it.
//!
//! Publishers never touch a socket: they push an encoded payload onto the subscriber's queue and move on, so a
//! subscriber that stops reading can slow nobody but itself. The queue is bounded in frames and bytes; the push
//! that would exceed either bound marks the connection a slow consumer, drops what it had queued and has it closed
//! with [`CLOSE_SLOW_CONSUMER`].
//!
//! The writer takes everything queued at once and writes it with one `write_all`: a fan-out burst to one
//! connection costs one syscall, not one per frame.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Close code for a connection whose outbound queue overflowed (private-use range; documented in the README).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
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
const OP_PONG: u8 = 0xA;

/// How long a single socket write may block before the connection is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After sending a close frame, how long to wait for the client's close before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

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
        }
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
}

/// Drains `outbound` into `sink` until a close is sent or the connection is killed. `going_away` fires when the
/// server drains: the writer then queues a 1001 close. `reader_done` fires when the client's side has ended;
/// after sending a close the writer waits for it (up to a linger) so the client sees an orderly close.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    outbound: Arc<Outbound>,
    sink: W,
    metrics: Arc<Metrics>,
    going_away: CancellationToken,
    reader_done: CancellationToken,
) -> WriterExit {
    let exit = write_until_closed(&outbound, sink, &metrics, &going_away, &reader_done).await;
    // Whatever ended the writer ends the connection: the reader stops waiting for a client that may never speak.
    outbound.kill.cancel();
    exit
}

async fn write_until_closed<W: AsyncWrite + Unpin>(
    outbound: &Outbound,
    mut sink: W,
    metrics: &Metrics,
    going_away: &CancellationToken,
    reader_done: &CancellationToken,
) -> WriterExit {
    // Allocated on the first write and sized by what is written: most connections are idle most of the time,
    // and their memory is what limits how many one node holds.
    let mut buf = BytesMut::new();
    let mut frames = VecDeque::new();
    let mut published = Vec::new();
    let mut going_away_sent = false;
    loop {
        frames.clear();
        let close = outbound.take_into(&mut frames);
        if frames.is_empty() && close.is_none() {
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
            }
            continue;
        }

        buf.clear();
        published.clear();
        let frame_count = frames.len() as u64;
        for frame in &frames {
            encode_frame(frame.opcode, &frame.payload, &mut buf);
            if let Some(at) = frame.published_at {
                published.push(at);
            }
        }
        if let Some((code, reason)) = close {
            encode_frame(OP_CLOSE, &close_payload(code, reason), &mut buf);
        }
        let write = async {
            sink.write_all(&buf).await?;
            sink.flush().await
        };
        tokio::select! {
            result = tokio::time::timeout(WRITE_TIMEOUT, write) => {
                if !matches!(result, Ok(Ok(()))) {
                    return WriterExit::Aborted;
                }
            }
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
            let _ = tokio::time::timeout(CLOSE_LINGER, reader_done.cancelled()).await;
            let _ = sink.shutdown().await;
            return WriterExit::Closed(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let exit = run_writer(
            q,
            &mut sink,
            Arc::new(Metrics::default()),
            CancellationToken::new(),
            done,
        )
        .await;
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
}
