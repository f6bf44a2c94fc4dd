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
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stream {
    /// One past the highest sequence number seen.
    next: u64,
    /// Bit k set: sequence `next - 1 - k` has arrived. Tells duplicates from late arrivals within 128 messages.
    seen: u128,
    /// Distinct sequence numbers received.
    pub(crate) distinct: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
}

impl Stream {
    pub(crate) fn observe(&mut self, seq: u64) {
        if seq >= self.next {
            let shift = seq + 1 - self.next;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = seq + 1;
            self.distinct += 1;
            return;
        }
        let back = self.next - 1 - seq;
        if back >= 128 {
            // Too old to tell; a late arrival is far likelier than a duplicate this far back.
            self.reordered += 1;
            self.distinct += 1;
        } else if self.seen & (1 << back) != 0 {
            self.duplicates += 1;
        } else {
            self.seen |= 1 << back;
            self.reordered += 1;
            self.distinct += 1;
        }
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
