//! The segment file format: naming, record framing and the replay scan.
//!
//! A record is `len: u32 LE | crc32(payload): u32 LE | payload (len bytes)`. Nothing else is in a segment file,
//! so a segment is valid up to the first record that is short, fails its checksum or claims an impossible length.

/// Bytes before each record's payload: its length and its checksum.
pub(crate) const RECORD_HEADER: usize = 8;

/// The largest payload a record may carry. A length above this is read as garbage (a torn or zero-filled tail),
/// not as an instruction to allocate gigabytes.
pub(crate) const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

const PREFIX: &str = "log-";
const SUFFIX: &str = ".seg";

/// The file name of segment `seq`: zero padded so that names sort like numbers.
pub(crate) fn segment_name(seq: u64) -> String {
    format!("{PREFIX}{seq:020}{SUFFIX}")
}

/// The sequence number of a segment file name, or None for any other file.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends one record to `buf`, its payload written in place by `write` (so entries are not serialized into a
/// temporary buffer first). Returns the record's total length.
pub(crate) fn encode_record<E>(
    buf: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<usize, EncodeError<E>> {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEADER]);
    if let Err(e) = write(buf) {
        buf.truncate(start);
        return Err(EncodeError::Payload(e));
    }
    let payload_len = buf.len() - start - RECORD_HEADER;
    if payload_len == 0 || payload_len > MAX_PAYLOAD {
        buf.truncate(start);
        return Err(EncodeError::Size(payload_len));
    }
    let crc = crc32fast::hash(&buf[start + RECORD_HEADER..]);
    // payload_len <= MAX_PAYLOAD, which fits a u32.
    buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    buf[start + 4..start + RECORD_HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(buf.len() - start)
}

/// Why a record could not be encoded.
#[derive(Debug)]
pub(crate) enum EncodeError<E> {
    /// The payload writer failed.
    Payload(E),
    /// The payload was empty or larger than [`MAX_PAYLOAD`].
    Size(usize),
}

/// One record found by [`scan`].
pub(crate) struct Record<'a> {
    /// Where the record (its header) starts in the file.
    pub(crate) offset: u64,
    /// The payload, checksum verified.
    pub(crate) payload: &'a [u8],
}

/// What [`scan`] found in a segment's bytes.
pub(crate) struct Scan<'a> {
    /// The valid records, in file order.
    pub(crate) records: Vec<Record<'a>>,
    /// The length of the valid prefix: the end of the last valid record.
    pub(crate) valid_len: u64,
    /// Why the bytes after `valid_len` are not a record, if there are any.
    pub(crate) bad_tail: Option<&'static str>,
}

/// Splits a segment's bytes into records, stopping at the first one that is incomplete or corrupt.
pub(crate) fn scan(bytes: &[u8]) -> Scan<'_> {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let bad_tail = loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < RECORD_HEADER {
            break Some("incomplete record header");
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        // Zero length is never written; it is what a zero-filled tail (left by some filesystems after a crash)
        // looks like, and crc32 of nothing is 0, so it must be rejected before the checksum is trusted.
        if len == 0 || len > MAX_PAYLOAD {
            break Some("impossible record length");
        }
        if rest.len() - RECORD_HEADER < len {
            break Some("incomplete record payload");
        }
        let payload = &rest[RECORD_HEADER..RECORD_HEADER + len];
        if crc32fast::hash(payload) != crc {
            break Some("record checksum mismatch");
        }
        records.push(Record {
            offset: pos as u64,
            payload,
        });
        pos += RECORD_HEADER + len;
    };
    Scan {
        records,
        valid_len: pos as u64,
        bad_tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_record(&mut buf, |b| {
            b.extend_from_slice(payload);
            Ok::<_, ()>(())
        })
        .map_err(|_| ())
        .expect("encodes");
        buf
    }

    #[test]
    fn names_round_trip_and_sort() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert!(segment_name(9) < segment_name(10));
        assert_eq!(parse_segment_name("log-1.seg"), None);
        assert_eq!(parse_segment_name("vote.json"), None);
    }

    #[test]
    fn scan_stops_at_the_first_bad_record() {
        let mut bytes = record(b"one");
        bytes.extend(record(b"two"));
        let good = bytes.len() as u64;
        bytes.extend(record(b"three"));

        let all = scan(&bytes);
        assert_eq!(all.records.len(), 3);
        assert!(all.bad_tail.is_none());

        let torn = scan(&bytes[..bytes.len() - 2]);
        assert_eq!(torn.records.len(), 2);
        assert_eq!(torn.valid_len, good);
        assert!(torn.bad_tail.is_some());

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(scan(&flipped).records.len(), 2);

        let mut zeros = bytes[..good as usize].to_vec();
        zeros.extend([0u8; 64]);
        let z = scan(&zeros);
        assert_eq!((z.records.len(), z.valid_len), (2, good));
    }
}
