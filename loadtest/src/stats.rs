//! Latency histograms and the per-(room, publisher) stream accounting.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies in microseconds, 1 µs to 10 min at 3 significant digits.
#[derive(Debug, Clone)]
pub(crate) struct Latency(Histogram<u64>);

/// The highest latency recorded; anything above is clamped (and shows as max).
const MAX_US: u64 = 600_000_000;

impl Default for Latency {
    fn default() -> Self {
        // The bounds are constants known to be valid.
        Latency(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
    }
}

/// A histogram as it travels between processes: (value, count) for every non-empty bucket.
pub(crate) type WireHistogram = Vec<(u64, u64)>;

/// Latency percentiles in milliseconds, as reports show them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    pub(crate) fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    pub(crate) fn record_ns(&mut self, ns: u64) {
        self.record_us(ns / 1_000);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.0.len()
    }

    pub(crate) fn to_wire(&self) -> WireHistogram {
        self.0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub(crate) fn add_wire(&mut self, wire: &WireHistogram) {
        for &(value, count) in wire {
            // Clamped like local records, so a hostile or corrupt worker line cannot make this fail.
            let _ = self.0.record_n(value.clamp(1, MAX_US), count);
        }
    }

    pub(crate) fn add(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub(crate) fn reset(&mut self) {
        self.0.reset();
    }

    pub(crate) fn percentiles(&self) -> Percentiles {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1_000.0;
        if self.0.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.0.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.0.max() as f64 / 1_000.0,
        }
    }
}

/// What one subscriber saw of one (room, publisher) stream. Sequence numbers start at 0 and the server promises
/// per-publisher, per-room order, so anything but `next` is a gap, a duplicate or a late (reordered) arrival.
///
/// The gaps themselves are kept too (up to [`MAX_GAPS`] of them; a clean run has none), so that a failover run
/// can tell why a sequence number is missing: see [`Stream::missing`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Stream {
    /// One past the highest sequence number seen.
    next: u64,
    /// Bit k set: sequence `next - 1 - k` has arrived. Tells duplicates from late arrivals within 128 messages.
    seen: u128,
    /// Distinct sequence numbers received.
    pub(crate) distinct: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    /// Missing runs below `next`, in order and disjoint; late arrivals cut them.
    gaps: Vec<Gap>,
    /// More gaps opened than [`MAX_GAPS`]: the ones past it were not recorded (they still count as missing).
    gaps_overflowed: bool,
    /// Set by [`Stream::reconnected`]: the gap the next arrival opens (if any) is that reconnect's.
    pending_tag: u32,
}

/// The most gaps one stream records.
pub(crate) const MAX_GAPS: usize = 4096;

/// Sequence numbers `start..end` of a stream that have not arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The reconnect (1-based, per subscriber) right before the arrival that opened the gap; 0: none.
    pub(crate) tag: u32,
}

/// A publisher's stream to an edge that was killed, as one room saw it: the room's sequence numbers
/// `start..end` went to that edge, and `kill` of them had been handed to the stream when the SIGKILL came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KilledSegment {
    pub(crate) room: u32,
    pub(crate) start: u64,
    pub(crate) kill: u64,
    pub(crate) end: u64,
}

/// Why expected deliveries to one subscriber did not arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Missing {
    /// Not explained by a kill: loss.
    pub(crate) lost: u64,
    /// Published while the subscriber was away after its edge was killed: between the last delivery on the
    /// killed connection and the first on the new one.
    pub(crate) reconnect_gap: u64,
    /// Publishes through an edge that was killed which the subscriber missed after the last one it did receive
    /// through that edge (or, having received none, that were sent after the kill): the edge died holding them.
    /// `PublishStream` acknowledges nothing per message, so the publisher cannot know which of these it applied.
    pub(crate) in_flight: u64,
    /// Of `in_flight`, those handed to the stream before the SIGKILL: the edge (or the socket to it) held them
    /// when it died; the rest were sent to an edge already dead, before the publisher noticed.
    #[serde(default)]
    pub(crate) in_flight_before_kill: u64,
}

impl Missing {
    pub(crate) fn add(&mut self, other: Missing) {
        self.lost += other.lost;
        self.reconnect_gap += other.reconnect_gap;
        self.in_flight += other.in_flight;
        self.in_flight_before_kill += other.in_flight_before_kill;
    }
}

impl Stream {
    pub(crate) fn observe(&mut self, seq: u64) {
        if seq >= self.next {
            if seq > self.next {
                self.open_gap(self.next, seq);
            }
            self.pending_tag = 0;
            let shift = seq + 1 - self.next;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = seq + 1;
            self.distinct += 1;
            return;
        }
        let back = self.next - 1 - seq;
        if back >= 128 {
            // Beyond the bit window the recorded gaps tell: a sequence number in one is a late arrival.
            if self.fill(seq) || self.gaps_overflowed {
                self.reordered += 1;
                self.distinct += 1;
            } else {
                self.duplicates += 1;
            }
        } else if self.seen & (1 << back) != 0 {
            self.duplicates += 1;
        } else {
            self.seen |= 1 << back;
            self.fill(seq);
            self.reordered += 1;
            self.distinct += 1;
        }
    }

    /// The subscriber reconnected (reconnect number `tag`, from 1): whatever the next arrival skips is that
    /// reconnect's gap.
    pub(crate) fn reconnected(&mut self, tag: u32) {
        self.pending_tag = tag;
    }

    fn open_gap(&mut self, start: u64, end: u64) {
        if self.gaps.len() >= MAX_GAPS {
            self.gaps_overflowed = true;
            return;
        }
        self.gaps.push(Gap {
            start,
            end,
            tag: self.pending_tag,
        });
    }

    /// Removes `seq` from the gap holding it; false when no recorded gap does.
    fn fill(&mut self, seq: u64) -> bool {
        let i = self.gaps.partition_point(|g| g.end <= seq);
        let Some(gap) = self.gaps.get_mut(i) else {
            return false;
        };
        if seq < gap.start {
            return false;
        }
        match (seq == gap.start, seq + 1 == gap.end) {
            (true, true) => {
                self.gaps.remove(i);
            }
            (true, false) => gap.start += 1,
            (false, true) => gap.end -= 1,
            (false, false) => {
                let tail = Gap {
                    start: seq + 1,
                    ..*gap
                };
                gap.end = seq;
                self.gaps.insert(i + 1, tail);
            }
        }
        true
    }

    /// The highest sequence number received in `lo..hi`.
    fn max_received_in(&self, lo: u64, hi: u64) -> Option<u64> {
        let mut candidate = hi.min(self.next).checked_sub(1)?;
        for gap in self.gaps.iter().rev() {
            if gap.start > candidate {
                continue;
            }
            if candidate < gap.end {
                candidate = gap.start.checked_sub(1)?;
            } else {
                break;
            }
        }
        (candidate >= lo).then_some(candidate)
    }

    /// Sorts the sequence numbers in `0..expected` that never arrived into [`Missing`]'s three kinds.
    ///
    /// `excused(tag, tail)` says whether a gap opened after reconnect `tag` is the expected cost of an edge kill
    /// (`tail`: the gap runs to the end of the stream, nothing arrived after the reconnect). `segments` are this
    /// stream's room's killed publisher segments. Everything else missing is lost, including anything past
    /// [`MAX_GAPS`].
    pub(crate) fn missing(
        &self,
        expected: u64,
        segments: &[KilledSegment],
        excused: impl Fn(u32, bool) -> bool,
    ) -> Missing {
        let mut out = Missing::default();
        let tail = Gap {
            start: self.next,
            end: expected.max(self.next),
            tag: self.pending_tag,
        };
        let mut recorded = 0u64;
        for (gap, is_tail) in self
            .gaps
            .iter()
            .map(|g| (g, false))
            .chain(std::iter::once((&tail, true)))
        {
            let len = gap.end.saturating_sub(gap.start);
            if len == 0 {
                continue;
            }
            recorded += len;
            if gap.tag != 0 && excused(gap.tag, is_tail) {
                out.reconnect_gap += len;
                continue;
            }
            let mut in_flight = 0;
            for seg in segments {
                let threshold = self
                    .max_received_in(seg.start, seg.end)
                    .map_or(seg.kill, |m| m + 1);
                let lo = gap.start.max(seg.start).max(threshold);
                let hi = gap.end.min(seg.end);
                in_flight += hi.saturating_sub(lo);
                out.in_flight_before_kill += hi.min(seg.kill).saturating_sub(lo);
            }
            let in_flight = in_flight.min(len);
            out.in_flight += in_flight;
            out.lost += len - in_flight;
        }
        // Gaps past MAX_GAPS were not recorded: whatever they held is loss.
        out.lost += expected
            .saturating_sub(self.distinct)
            .saturating_sub(recorded);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_counts_clean() {
        let mut s = Stream::default();
        for seq in 0..1000 {
            s.observe(seq);
        }
        assert_eq!((s.distinct, s.duplicates, s.reordered), (1000, 0, 0));
    }

    #[test]
    fn gaps_duplicates_and_late_arrivals() {
        let mut s = Stream::default();
        for seq in [0, 1, 3, 3, 2, 2, 500, 4] {
            s.observe(seq);
        }
        // distinct: 0 1 3 2 500 4; duplicates: the second 3 and the second 2; late: 2 and 4.
        assert_eq!((s.distinct, s.duplicates, s.reordered), (6, 2, 2));
    }

    #[test]
    fn late_arrivals_far_back_are_told_from_duplicates_by_the_gaps() {
        let mut s = Stream::default();
        s.observe(0);
        s.observe(300);
        s.observe(5); // in the gap 1..300, 295 back: late
        s.observe(300 - 200); // late too
        s.observe(5); // now a duplicate, though beyond the bit window
        assert_eq!((s.distinct, s.duplicates, s.reordered), (4, 1, 2));
        assert_eq!(
            s.gaps,
            vec![
                Gap {
                    start: 1,
                    end: 5,
                    tag: 0
                },
                Gap {
                    start: 6,
                    end: 100,
                    tag: 0
                },
                Gap {
                    start: 101,
                    end: 300,
                    tag: 0
                },
            ]
        );
        assert_eq!(s.max_received_in(0, 100), Some(5));
        assert_eq!(s.max_received_in(6, 100), None);
        assert_eq!(s.max_received_in(0, 1_000), Some(300));
    }

    fn in_order(s: &mut Stream, seqs: std::ops::Range<u64>) {
        for seq in seqs {
            s.observe(seq);
        }
    }

    #[test]
    fn a_clean_stream_misses_only_its_tail() {
        let mut s = Stream::default();
        in_order(&mut s, 0..100);
        assert_eq!(s.missing(100, &[], |_, _| true), Missing::default());
        // Nothing excuses an untagged tail: the last 5 never came.
        assert_eq!(s.missing(105, &[], |_, _| true).lost, 5);
    }

    #[test]
    fn a_killed_edge_clients_gap_is_separate_from_loss() {
        let mut s = Stream::default();
        in_order(&mut s, 0..50);
        // Its edge was killed; it resubscribed elsewhere (reconnect 1) and the next delivery is 60.
        s.reconnected(1);
        in_order(&mut s, 60..80);
        s.observe(90); // a later gap, after the reconnect: loss
        in_order(&mut s, 91..100);
        let m = s.missing(100, &[], |tag, _| tag == 1);
        assert_eq!(
            m,
            Missing {
                lost: 10,
                reconnect_gap: 10,
                ..Missing::default()
            }
        );
        // A reconnect that was not caused by a kill excuses nothing.
        assert_eq!(s.missing(100, &[], |_, _| false).lost, 20);
    }

    #[test]
    fn a_tail_after_a_reconnect_is_excused_only_when_the_caller_says_so() {
        let mut s = Stream::default();
        in_order(&mut s, 0..50);
        s.reconnected(2);
        // Nothing arrived after the reconnect: the tail 50..70 carries its tag.
        assert_eq!(
            s.missing(70, &[], |tag, tail| tag == 2 && tail)
                .reconnect_gap,
            20
        );
        assert_eq!(s.missing(70, &[], |tag, tail| tag == 2 && !tail).lost, 20);
    }

    #[test]
    fn publishes_in_flight_through_a_killed_edge_are_separate_from_loss() {
        // The room's publisher sent 40..70 through an edge that was killed when 60 had been handed over; this
        // subscriber (on a live edge) got up to 55 of them, then the publisher's new stream from 70 on.
        let seg = KilledSegment {
            room: 0,
            start: 40,
            kill: 60,
            end: 70,
        };
        let mut s = Stream::default();
        in_order(&mut s, 0..30);
        in_order(&mut s, 31..56); // 30 lost long before the kill
        in_order(&mut s, 70..100);
        let m = s.missing(100, &[seg], |_, _| false);
        assert_eq!(
            m,
            Missing {
                lost: 1,
                reconnect_gap: 0,
                in_flight: 14,
                in_flight_before_kill: 4,
            }
        );
        // A hole inside the killed segment, before the last delivery the subscriber got through it, is loss.
        let mut s = Stream::default();
        in_order(&mut s, 0..45);
        in_order(&mut s, 47..56);
        in_order(&mut s, 70..100);
        assert_eq!(
            s.missing(100, &[seg], |_, _| false),
            Missing {
                lost: 2,
                reconnect_gap: 0,
                in_flight: 14,
                in_flight_before_kill: 4,
            }
        );
        // Nothing received through the killed edge at all: only what was sent after the kill is in flight.
        let mut s = Stream::default();
        in_order(&mut s, 0..40);
        in_order(&mut s, 70..100);
        assert_eq!(
            s.missing(100, &[seg], |_, _| false),
            Missing {
                lost: 20,
                reconnect_gap: 0,
                in_flight: 10,
                in_flight_before_kill: 0,
            }
        );
    }

    #[test]
    fn gaps_past_the_cap_still_count_as_loss() {
        let mut s = Stream::default();
        for k in 0..(MAX_GAPS as u64 + 10) {
            s.observe(2 * k + 1); // every even number missing
        }
        assert!(s.gaps_overflowed);
        let expected = 2 * (MAX_GAPS as u64 + 10);
        assert_eq!(
            s.missing(expected, &[], |_, _| true).lost,
            MAX_GAPS as u64 + 10
        );
    }

    #[test]
    fn histogram_survives_the_wire() {
        let mut a = Latency::default();
        for us in [1, 10, 100, 1_000, 10_000, 0, u64::MAX] {
            a.record_us(us);
        }
        let mut b = Latency::default();
        b.add_wire(&a.to_wire());
        assert_eq!(b.len(), 7);
        assert_eq!(b.percentiles().p50_ms, a.percentiles().p50_ms);
    }
}
