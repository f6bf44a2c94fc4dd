//! The measured payload and the clock it carries.
//!
//! A publish's `data` is one JSON string, `"LT1.<node>.<publisher>.<room>.<seq>.<intended ns>.xxxx…"`, padded with
//! `x` to the scenario's payload size. A string with nothing to escape survives every server's framing verbatim
//! (herald's `data`, NATS' raw payload, Pusher's JSON-in-a-string), so subscribers find the header by scanning
//! for `LT1.` instead of parsing JSON: at 500,000 deliveries/s the harness shares two cores with the servers.
//!
//! Timestamps are CLOCK_MONOTONIC nanoseconds, which every process on one machine shares, so a worker process
//! can subtract a publisher's intended send time from its own receive time.

use memchr::memmem;

/// The marker that starts every header.
const MARK: &[u8] = b"LT1.";

/// What a delivery says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The node the publisher published through (same-edge vs cross-edge).
    pub(crate) node: u16,
    pub(crate) publisher: u32,
    pub(crate) room: u32,
    /// Per (room, publisher), from 0.
    pub(crate) seq: u64,
    /// When the open-loop schedule meant to send it (CLOCK_MONOTONIC ns), not when it was sent: latency
    /// measured from here includes any queueing the publisher suffered (coordinated omission).
    pub(crate) intended_ns: u64,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub(crate) fn now_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A tokio `Instant` for a CLOCK_MONOTONIC timestamp (tokio's clock is CLOCK_MONOTONIC too).
pub(crate) fn instant_at(ns: u64) -> tokio::time::Instant {
    let now = now_ns();
    tokio::time::Instant::now() + std::time::Duration::from_nanos(ns.saturating_sub(now))
}

/// Writes `header` as the JSON string `data`, padded so the JSON is `size` bytes (or just the header when it is
/// longer than that).
pub(crate) fn encode(header: &Header, size: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let start = out.len();
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "\"LT1.{}.{}.{}.{}.{}.",
        header.node, header.publisher, header.room, header.seq, header.intended_ns
    );
    let written = out.len() - start + 1; // + closing quote
    if size > written {
        out.resize(out.len() + (size - written), b'x');
    }
    out.push(b'"');
}

/// A reusable scanner (memmem's searcher is built once per connection, not per frame).
pub(crate) struct Scanner {
    finder: memmem::Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            finder: memmem::Finder::new(MARK),
        }
    }
}

impl Scanner {
    /// Finds and parses the header in a delivered frame; `None` for frames that carry none (acks, pongs) or a
    /// malformed one.
    pub(crate) fn scan(&self, frame: &[u8]) -> Option<Header> {
        let at = self.finder.find(frame)?;
        let mut rest = &frame[at + MARK.len()..];
        let mut field = || -> Option<u64> {
            let end = rest.iter().position(|b| *b == b'.')?;
            let digits = &rest[..end];
            if digits.is_empty() || digits.len() > 20 {
                return None;
            }
            let mut v: u64 = 0;
            for d in digits {
                if !d.is_ascii_digit() {
                    return None;
                }
                v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            }
            rest = &rest[end + 1..];
            Some(v)
        };
        Some(Header {
            node: u16::try_from(field()?).ok()?,
            publisher: u32::try_from(field()?).ok()?,
            room: u32::try_from(field()?).ok()?,
            seq: field()?,
            intended_ns: field()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            node: 2,
            publisher: 7,
            room: 89,
            seq: 123_456,
            intended_ns: 987_654_321_000,
        }
    }

    #[test]
    fn round_trips_inside_a_delivery_frame() {
        let mut data = Vec::new();
        encode(&header(), 64, &mut data);
        assert_eq!(data.len(), 64);
        assert!(serde_json::from_slice::<String>(&data).is_ok());
        let frame = format!(
            r#"{{"type":"publish","data":{},"requestId":3}}"#,
            String::from_utf8(data).unwrap()
        );
        assert_eq!(Scanner::default().scan(frame.as_bytes()), Some(header()));
    }

    #[test]
    fn short_sizes_keep_the_whole_header() {
        let mut data = Vec::new();
        encode(&header(), 8, &mut data);
        assert_eq!(Scanner::default().scan(&data), Some(header()));
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        let s = Scanner::default();
        for junk in [
            &b""[..],
            b"LT1.",
            b"LT1.1.2.3.4",
            b"LT1.a.2.3.4.5.",
            b"LT1.99999999999999999999999.1.1.1.1.",
            b"LT1.70000.1.1.1.1.",
        ] {
            assert_eq!(s.scan(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        assert!(now_ns() >= a);
    }
}
