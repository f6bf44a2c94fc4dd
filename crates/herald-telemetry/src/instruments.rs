//! Metric instruments kept as plain atomics, and their rendering in the Prometheus text format.
//!
//! Shared by the edge and the registry, so both render the same way. Names follow Prometheus conventions
//! (`herald_` prefix, base units, `_total` counters); labels take only small fixed sets of values.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, n: i64) {
        self.0.store(n, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// A counter with one label whose values are fixed up front.
#[derive(Debug)]
pub struct LabeledCounter {
    label: &'static str,
    values: &'static [&'static str],
    counts: Box<[AtomicU64]>,
}

impl LabeledCounter {
    /// A counter whose label `label` takes `values`; the last is where unknown values count (`other`).
    pub fn new(label: &'static str, values: &'static [&'static str]) -> Self {
        LabeledCounter {
            label,
            values,
            counts: values.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds one to the series with this label value. Unknown values are a programming error and count under the
    /// last value (by convention `other`), so a typo can never panic the hot path.
    pub fn inc(&self, value: &str) {
        self.add(value, 1);
    }

    /// Adds `n` to the series with this label value (unknown values count as the last, as in [`Self::inc`]).
    pub fn add(&self, value: &str, n: u64) {
        let i = self
            .values
            .iter()
            .position(|v| *v == value)
            .unwrap_or(self.values.len() - 1);
        self.counts[i].fetch_add(n, Relaxed);
    }

    /// The count for one label value.
    pub fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map_or(0, |i| self.counts[i].load(Relaxed))
    }
}

/// Upper bounds of the latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines.
pub fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes a counter family.
pub fn write_counter(out: &mut String, name: &str, help: &str, c: &Counter) {
    write_header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {}", c.get());
}

/// Writes a gauge family.
pub fn write_gauge(out: &mut String, name: &str, help: &str, g: &Gauge) {
    write_header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {}", g.get());
}

/// Writes a labeled counter family.
pub fn write_labeled(out: &mut String, name: &str, help: &str, c: &LabeledCounter) {
    write_header(out, name, help, "counter");
    for (value, count) in c.values.iter().zip(c.counts.iter()) {
        let _ = writeln!(
            out,
            "{name}{{{}=\"{value}\"}} {}",
            c.label,
            count.load(Relaxed)
        );
    }
}

/// Writes a histogram family (cumulative buckets, `+Inf`, sum, count).
pub fn write_histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    write_header(out, name, help, "histogram");
    let mut cumulative = 0;
    for (bound, bucket) in LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
        cumulative += bucket.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let count = h.count.load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", h.sum_nanos.load(Relaxed) as f64 / 1e9);
    let _ = writeln!(out, "{name}_count {count}");
}
