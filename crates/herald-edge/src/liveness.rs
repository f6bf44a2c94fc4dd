//! Server-driven liveness: WebSocket pings the writer sends and the pongs the reader records.
//!
//! Two checks share one mechanism, *one ping outstanding at a time, answered within `limits.pong-timeout-ms`*:
//!
//! - **Busy** (`limits.busy-ping-interval-ms`): when the writer writes deliveries and no ping was sent for that
//!   long, it appends a ping to the same write. TCP is in order, so the pong can only come back once the client
//!   has read everything written before the ping: a late pong means the client lags more than the pong timeout
//!   behind, which is exactly a slow consumer (close 4008). This does not wait for the outbound queue to
//!   overflow, which behind megabytes of kernel socket buffers can take minutes at a modest message rate.
//! - **Idle** (`limits.ping-interval-ms`): a connection nothing was written to still gets a ping that often, so a
//!   peer that vanished without a FIN (half-open TCP) is found and closed with 4012.
//!
//! A client that stops reading is therefore closed at most `busy-ping-interval + pong-timeout` (plus one write)
//! after it stopped: the next ping goes out within one busy interval and must be answered within the timeout.
//!
//! A write that stays blocked for the pong timeout counts as a late pong too: a ping appended to it could not be
//! answered before the write completes. That keeps a client that forges pongs without reading (pongs are easy to
//! guess) from holding a connection open behind a full socket, and bounds the time a blocked write can hold a
//! slow consumer's connection to the pong timeout instead of the writer's 30 s write timeout.
//!
//! # Cost per connection
//!
//! The state lives in the connection's existing writer task (a [`Liveness`] of a few dozen bytes, borrowing its
//! settings, and one tokio `Sleep` of about a hundred bytes that it resets only when its deadline moves) and a
//! 4-byte [`PongSlot`] in the outbound queue the reader already shares: a couple of hundred bytes against the
//! 8 KiB per idle connection herald aims at. No task, channel or allocation per connection is added, and an idle
//! connection that answers wakes its writer and reader once per ping interval. An idle connection's timer sits in
//! tokio's hierarchical timer wheel and fires once per ping interval, which costs less than one node-wide sweeper
//! task that would walk every connection (taking the hub's connection-table lock) every few hundred
//! milliseconds whether or not anything is due, and would add the sweep period to every deadline. The reader's
//! `read_frame` is not cancel-safe, so the timer cannot go there; the writer, which both knows when it writes
//! and is the one that writes the ping, is the natural owner.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Limits;

/// The liveness settings of a connection, from `limits`. `None` turns a check off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessSettings {
    /// After writing deliveries, ping when no ping was sent for this long.
    pub busy_ping_interval: Option<Duration>,
    /// Ping a connection at least this often even when nothing is written.
    pub ping_interval: Option<Duration>,
    /// How long a ping may stay unanswered.
    pub pong_timeout: Duration,
}

impl LivenessSettings {
    /// No pings at all.
    pub const OFF: LivenessSettings = LivenessSettings {
        busy_ping_interval: None,
        ping_interval: None,
        pong_timeout: Duration::ZERO,
    };

    /// The settings `limits` configures (a `0` interval turns that check off).
    pub fn from_limits(limits: &Limits) -> Self {
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        LivenessSettings {
            busy_ping_interval: ms(limits.busy_ping_interval_ms),
            ping_interval: ms(limits.ping_interval_ms),
            pong_timeout: Duration::from_millis(limits.pong_timeout_ms),
        }
    }
}

/// Why a connection failed its liveness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// Deliveries were written while the ping was unanswered (or a write stayed blocked): the client does not
    /// keep up. Closed with 4008, like an outbound queue overflow.
    SlowConsumer,
    /// Nothing but the ping was waiting for the client: it is gone or stuck. Closed with 4012.
    NoPong,
}

/// What the writer has to do about liveness now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing yet.
    Nothing,
    /// Send an idle ping.
    Ping,
    /// Close the connection.
    Late(Late),
}

/// The ping the writer is waiting on.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    id: u32,
    deadline: Instant,
    /// Whether deliveries were written with it or after it: lateness is then a slow consumer.
    data: bool,
}

/// The writer's side of the liveness checks: when to ping, and whether the pong is late. Pure logic over the
/// times it is given, so it is tested without sockets.
#[derive(Debug)]
pub(crate) struct Liveness<'a> {
    /// Borrowed from the writer's context rather than copied: this lives in every connection's writer.
    settings: &'a LivenessSettings,
    last_ping: Instant,
    outstanding: Option<Outstanding>,
    next_id: u32,
}

impl<'a> Liveness<'a> {
    /// A connection that opened at `now` (the first idle ping is due one interval later).
    pub(crate) fn new(settings: &'a LivenessSettings, now: Instant) -> Self {
        Liveness {
            settings,
            last_ping: now,
            outstanding: None,
            next_id: 1,
        }
    }

    /// Forgets the outstanding ping once the reader has seen its pong.
    pub(crate) fn observe(&mut self, slot: &PongSlot) {
        if let Some(ping) = self.outstanding {
            if !slot.is_awaiting(ping.id) {
                self.outstanding = None;
            }
        }
    }

    /// What is due at `now` when the writer has nothing else to write.
    pub(crate) fn check(&self, now: Instant) -> Due {
        match self.outstanding {
            Some(ping) if now >= ping.deadline => Due::Late(if ping.data {
                Late::SlowConsumer
            } else {
                Late::NoPong
            }),
            Some(_) => Due::Nothing,
            None => match self.settings.ping_interval {
                Some(interval) if now >= self.last_ping + interval => Due::Ping,
                _ => Due::Nothing,
            },
        }
    }

    /// When [`Self::check`] will next have something to say, if ever.
    pub(crate) fn next_check(&self) -> Option<Instant> {
        match self.outstanding {
            Some(ping) => Some(ping.deadline),
            None => self
                .settings
                .ping_interval
                .map(|interval| self.last_ping + interval),
        }
    }

    /// Called for each write: `data` says whether it carries deliveries, `idle_due` whether an idle ping is due.
    /// Returns the id of the ping to append to the write, and registers it in `slot`.
    pub(crate) fn before_write(
        &mut self,
        now: Instant,
        data: bool,
        idle_due: bool,
        slot: &PongSlot,
    ) -> Option<u32> {
        if let Some(ping) = &mut self.outstanding {
            ping.data |= data;
            return None;
        }
        let busy = data
            && self
                .settings
                .busy_ping_interval
                .is_some_and(|interval| now >= self.last_ping + interval);
        if !(busy || idle_due) {
            return None;
        }
        let id = self.next_id;
        // Zero means "no ping" in the slot.
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.last_ping = now;
        self.outstanding = Some(Outstanding {
            id,
            deadline: now + self.settings.pong_timeout,
            data,
        });
        slot.expect(id);
        Some(id)
    }

    /// Why a write that stayed blocked until [`Self::write_deadline`] fails the check: a slow consumer when it, or
    /// a write since the outstanding ping, carried deliveries.
    pub(crate) fn late_write(&self, data: bool) -> Late {
        if data || self.outstanding.is_none_or(|ping| ping.data) {
            Late::SlowConsumer
        } else {
            Late::NoPong
        }
    }

    /// The latest moment a write starting at `now` may complete before the pong counts as late, if the liveness
    /// checks bound it (call after [`Self::before_write`]).
    pub(crate) fn write_deadline(&self, now: Instant) -> Option<Instant> {
        match self.outstanding {
            Some(ping) => Some(ping.deadline),
            None => self
                .settings
                .busy_ping_interval
                .map(|_| now + self.settings.pong_timeout),
        }
    }
}

/// The id of the ping awaiting its pong (0: none), shared by the writer, which sends pings, and the reader, which
/// sees pongs.
#[derive(Debug, Default)]
pub struct PongSlot(AtomicU32);

impl PongSlot {
    /// The ping payload for `id`.
    pub(crate) fn payload(id: u32) -> [u8; 4] {
        id.to_be_bytes()
    }

    fn expect(&self, id: u32) {
        self.0.store(id, Ordering::Release);
    }

    fn is_awaiting(&self, id: u32) -> bool {
        self.0.load(Ordering::Acquire) == id
    }

    /// Records a pong from the client. Returns whether it answered the outstanding ping; any other pong
    /// (unsolicited, which RFC 6455 allows as a heartbeat, or late, or malformed) is ignored.
    pub(crate) fn answer(&self, payload: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 4]>::try_from(payload) else {
            return false;
        };
        let id = u32::from_be_bytes(bytes);
        id != 0
            && self
                .0
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Duration = Duration::from_millis(1000);
    const IDLE: Duration = Duration::from_millis(25_000);
    const TIMEOUT: Duration = Duration::from_millis(3000);

    fn settings() -> LivenessSettings {
        LivenessSettings {
            busy_ping_interval: Some(BUSY),
            ping_interval: Some(IDLE),
            pong_timeout: TIMEOUT,
        }
    }

    #[test]
    fn settings_from_limits_turn_zero_into_off() {
        let mut limits = Limits {
            busy_ping_interval_ms: 0,
            ..Limits::default()
        };
        let s = LivenessSettings::from_limits(&limits);
        assert_eq!(s.busy_ping_interval, None);
        assert_eq!(s.ping_interval, Some(Duration::from_secs(25)));
        limits.ping_interval_ms = 0;
        assert_eq!(LivenessSettings::from_limits(&limits).ping_interval, None);
        let defaults = LivenessSettings::from_limits(&Limits::default());
        // The default detection bound for a client that stops reading fits the 5 s target with a second to spare.
        assert!(
            defaults.busy_ping_interval.unwrap() + defaults.pong_timeout <= Duration::from_secs(4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_write_carries_a_ping_once_per_interval_and_the_pong_clears_it() {
        let slot = PongSlot::default();
        let s = settings();
        let mut l = Liveness::new(&s, Instant::now());
        // Too soon after the connection opened.
        assert_eq!(l.before_write(Instant::now(), true, false, &slot), None);
        tokio::time::advance(BUSY).await;
        // Only writes with deliveries ping (pong replies to the client's pings do not).
        assert_eq!(l.before_write(Instant::now(), false, false, &slot), None);
        let id = l
            .before_write(Instant::now(), true, false, &slot)
            .expect("a ping");
        // One outstanding at a time.
        tokio::time::advance(BUSY * 2).await;
        assert_eq!(l.before_write(Instant::now(), true, false, &slot), None);
        assert_eq!(l.check(Instant::now()), Due::Nothing);
        assert!(slot.answer(&PongSlot::payload(id)));
        l.observe(&slot);
        assert_eq!(l.next_check(), Some(Instant::now() - BUSY * 2 + IDLE));
        // The interval counts from the last ping, which was 2 s ago.
        let next = l
            .before_write(Instant::now(), true, false, &slot)
            .expect("a ping");
        assert_ne!(next, id);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_is_late_after_the_timeout() {
        let slot = PongSlot::default();
        let start = Instant::now();
        let s = settings();
        let mut l = Liveness::new(&s, start);
        tokio::time::advance(BUSY).await;
        let sent = Instant::now();
        l.before_write(sent, true, false, &slot).expect("a ping");
        assert_eq!(l.next_check(), Some(sent + TIMEOUT));
        assert_eq!(l.write_deadline(sent), Some(sent + TIMEOUT));
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        l.observe(&slot);
        assert_eq!(l.check(Instant::now()), Due::Nothing);
        tokio::time::advance(Duration::from_millis(1)).await;
        l.observe(&slot);
        assert_eq!(l.check(Instant::now()), Due::Late(Late::SlowConsumer));
        // A stopped reader is found within one busy interval plus the timeout of when it stopped reading.
        assert!(Instant::now() - start <= BUSY + TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_pinged_and_silence_is_no_pong() {
        let slot = PongSlot::default();
        let start = Instant::now();
        let s = settings();
        let mut l = Liveness::new(&s, start);
        assert_eq!(l.next_check(), Some(start + IDLE));
        tokio::time::advance(IDLE - Duration::from_millis(1)).await;
        assert_eq!(l.check(Instant::now()), Due::Nothing);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(l.check(Instant::now()), Due::Ping);
        let id = l
            .before_write(Instant::now(), false, true, &slot)
            .expect("the idle ping");
        // Answered: the next one is an interval later.
        assert!(slot.answer(&PongSlot::payload(id)));
        l.observe(&slot);
        assert_eq!(l.check(Instant::now()), Due::Nothing);
        assert_eq!(l.next_check(), Some(Instant::now() + IDLE));
        // Unanswered: NoPong, since no deliveries were waiting behind it.
        tokio::time::advance(IDLE).await;
        assert_eq!(l.check(Instant::now()), Due::Ping);
        l.before_write(Instant::now(), false, true, &slot).unwrap();
        tokio::time::advance(TIMEOUT).await;
        l.observe(&slot);
        assert_eq!(l.check(Instant::now()), Due::Late(Late::NoPong));
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_written_behind_an_idle_ping_make_lateness_a_slow_consumer() {
        let slot = PongSlot::default();
        let s = settings();
        let mut l = Liveness::new(&s, Instant::now());
        tokio::time::advance(IDLE).await;
        l.before_write(Instant::now(), false, true, &slot).unwrap();
        assert_eq!(l.before_write(Instant::now(), true, false, &slot), None);
        tokio::time::advance(TIMEOUT).await;
        l.observe(&slot);
        assert_eq!(l.check(Instant::now()), Due::Late(Late::SlowConsumer));
    }

    #[tokio::test(start_paused = true)]
    async fn turned_off_checks_never_ping_or_bound_writes() {
        let slot = PongSlot::default();
        let mut l = Liveness::new(&LivenessSettings::OFF, Instant::now());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(l.next_check(), None);
        assert_eq!(l.check(Instant::now()), Due::Nothing);
        assert_eq!(l.before_write(Instant::now(), true, false, &slot), None);
        assert_eq!(l.write_deadline(Instant::now()), None);
        // Busy checks alone bound every write by the pong timeout, ping or not.
        let busy_only = LivenessSettings {
            ping_interval: None,
            ..settings()
        };
        let l = Liveness::new(&busy_only, Instant::now());
        assert_eq!(l.next_check(), None);
        assert_eq!(
            l.write_deadline(Instant::now()),
            Some(Instant::now() + TIMEOUT)
        );
    }

    #[test]
    fn only_the_outstanding_pings_pong_counts() {
        let slot = PongSlot::default();
        // Unsolicited pongs (nothing outstanding, any payload) are ignored.
        assert!(!slot.answer(b""));
        assert!(!slot.answer(&PongSlot::payload(0)));
        assert!(!slot.answer(&PongSlot::payload(7)));
        slot.expect(7);
        assert!(!slot.answer(&PongSlot::payload(6)));
        assert!(!slot.answer(b"hello"));
        assert!(slot.is_awaiting(7));
        assert!(slot.answer(&PongSlot::payload(7)));
        assert!(!slot.is_awaiting(7));
        // A duplicate is unsolicited.
        assert!(!slot.answer(&PongSlot::payload(7)));
    }
}
