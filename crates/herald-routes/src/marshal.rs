//! Marshalling: bytes from a broker into a herald message, and a herald message into bytes for a broker.
//!
//! Inside herald a message's data is JSON text. Per endpoint:
//!
//! | marshal | in (broker -> herald) | out (herald -> broker) |
//! |---|---|---|
//! | `json` (default) | the payload must be JSON; it is the data | the data's JSON text |
//! | `text` | the payload must be UTF-8; the data is that string | a string's contents; other data as JSON text |
//! | `bytes` | any payload; the data is its base64 (standard alphabet) as a string | base64 strings decoded; other data as JSON text |
//! | `envelope` | `{"rooms": [...], "data": ..., "traceparent": "..."}`: rooms and data from the body | the same shape, with the one room |
//!
//! The envelope is High-templar's trigger body (what django-binder sends) plus an optional W3C `traceparent`, so a
//! trace can continue across a broker.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use herald_protocol::Room;

/// How an endpoint's payloads are read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Marshal {
    /// JSON in, JSON out.
    #[default]
    Json,
    /// UTF-8 text, carried as a JSON string.
    Text,
    /// Any bytes, carried as a base64 JSON string.
    Bytes,
    /// `{"rooms": [...], "data": ..., "traceparent": ...}`.
    Envelope,
}

/// Rooms one envelope may name (the publish API's `limits.max-rooms-per-publish` applies on top).
pub const MAX_ENVELOPE_ROOMS: usize = 1000;

/// A payload decoded into a herald message.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The rooms named by the payload (the envelope), if any.
    pub rooms: Option<Vec<Room>>,
    /// The data, as JSON text.
    pub data: Bytes,
    /// A W3C trace context carried by the payload.
    pub traceparent: Option<String>,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarshalError {
    /// `json` or `envelope`: not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// `text`: not UTF-8.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// `envelope`: JSON of the wrong shape.
    #[error("bad envelope: {0}")]
    BadEnvelope(String),
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    rooms: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    traceparent: Option<String>,
}

impl Marshal {
    /// Whether decoded messages name their rooms.
    pub fn carries_rooms(self) -> bool {
        self == Marshal::Envelope
    }

    /// Decodes a payload from a broker.
    pub fn decode(self, payload: &[u8]) -> Result<Decoded, MarshalError> {
        let plain = |data: Bytes| Decoded {
            rooms: None,
            data,
            traceparent: None,
        };
        match self {
            Marshal::Json => {
                serde_json::from_slice::<&RawValue>(payload)
                    .map_err(|e| MarshalError::NotJson(e.to_string()))?;
                Ok(plain(Bytes::copy_from_slice(trim(payload))))
            }
            Marshal::Text => {
                let text = std::str::from_utf8(payload).map_err(|_| MarshalError::NotUtf8)?;
                Ok(plain(json_string(text)))
            }
            Marshal::Bytes => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
                Ok(plain(json_string(&encoded)))
            }
            Marshal::Envelope => {
                let envelope: Envelope<'_> = serde_json::from_slice(payload).map_err(|e| {
                    if e.is_data() {
                        MarshalError::BadEnvelope(e.to_string())
                    } else {
                        MarshalError::NotJson(e.to_string())
                    }
                })?;
                let rooms = envelope
                    .rooms
                    .ok_or_else(|| MarshalError::BadEnvelope("rooms not specified".into()))?;
                let data = envelope
                    .data
                    .ok_or_else(|| MarshalError::BadEnvelope("data not specified".into()))?;
                let rooms: Vec<Value> = serde_json::from_str(rooms.get()).map_err(|_| {
                    MarshalError::BadEnvelope("rooms must be a list of room objects".into())
                })?;
                if rooms.len() > MAX_ENVELOPE_ROOMS {
                    return Err(MarshalError::BadEnvelope(format!(
                        "more than {MAX_ENVELOPE_ROOMS} rooms"
                    )));
                }
                let rooms = rooms
                    .iter()
                    .enumerate()
                    .map(|(i, room)| {
                        Room::from_json(room)
                            .map_err(|e| MarshalError::BadEnvelope(format!("rooms[{i}]: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Decoded {
                    rooms: Some(rooms),
                    data: Bytes::copy_from_slice(data.get().as_bytes()),
                    traceparent: envelope.traceparent,
                })
            }
        }
    }

    /// Encodes a message for `rooms` with `data` (JSON text) for a broker or a webhook.
    pub fn encode(self, rooms: &[Value], data: &[u8], traceparent: Option<&str>) -> Vec<u8> {
        match self {
            Marshal::Json => data.to_vec(),
            Marshal::Text => match serde_json::from_slice::<String>(data) {
                Ok(text) => text.into_bytes(),
                Err(_) => data.to_vec(),
            },
            Marshal::Bytes => serde_json::from_slice::<String>(data)
                .ok()
                .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
                .unwrap_or_else(|| data.to_vec()),
            Marshal::Envelope => {
                let mut out = Vec::with_capacity(data.len() + 64);
                out.extend_from_slice(b"{\"rooms\":");
                out.extend_from_slice(Value::from(rooms.to_vec()).to_string().as_bytes());
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(data);
                if let Some(trace) = traceparent {
                    out.extend_from_slice(b",\"traceparent\":");
                    out.extend_from_slice(&json_string(trace));
                }
                out.push(b'}');
                out
            }
        }
    }
}

fn json_string(text: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(text).expect("a string serializes"))
}

fn trim(payload: &[u8]) -> &[u8] {
    let start = payload
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(payload.len());
    let end = payload
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &payload[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip_and_refusal() {
        let decoded = Marshal::Json.decode(b" {\"a\":1} \n").unwrap();
        assert_eq!(&decoded.data[..], b"{\"a\":1}");
        assert!(matches!(
            Marshal::Json.decode(b"{nope"),
            Err(MarshalError::NotJson(_))
        ));
        assert_eq!(Marshal::Json.encode(&[], b"[1]", None), b"[1]");
    }

    #[test]
    fn text_and_bytes_pass_through() {
        let text = Marshal::Text.decode("héllo \"x\"".as_bytes()).unwrap();
        assert_eq!(&text.data[..], r#""héllo \"x\"""#.as_bytes());
        assert_eq!(
            Marshal::Text.encode(&[], &text.data, None),
            "héllo \"x\"".as_bytes()
        );
        assert_eq!(
            Marshal::Text.decode(&[0xff, 0xfe]),
            Err(MarshalError::NotUtf8)
        );

        let raw = [0u8, 255, 10, 13];
        let bytes = Marshal::Bytes.decode(&raw).unwrap();
        assert_eq!(&bytes.data[..], b"\"AP8KDQ==\"");
        assert_eq!(Marshal::Bytes.encode(&[], &bytes.data, None), raw);
    }

    #[test]
    fn envelope_is_high_templars_trigger_body() {
        let body = br#"{"rooms": [{"target": "x", "id": 1}], "data": {"k": [1, 2]}, "traceparent": "00-ab-cd-01"}"#;
        let decoded = Marshal::Envelope.decode(body).unwrap();
        let rooms = decoded.rooms.unwrap();
        assert_eq!(rooms[0].to_json(), json!({"target": "x", "id": 1}));
        assert_eq!(&decoded.data[..], br#"{"k": [1, 2]}"#);
        assert_eq!(decoded.traceparent.as_deref(), Some("00-ab-cd-01"));

        let out = Marshal::Envelope.encode(&[json!({"a": "b"})], b"{\"k\":1}", Some("00-x"));
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            parsed,
            json!({"rooms": [{"a": "b"}], "data": {"k": 1}, "traceparent": "00-x"})
        );
    }

    #[test]
    fn bad_envelopes_say_why() {
        let cases: [(&[u8], &str); 5] = [
            (b"{\"data\": 1}", "rooms not specified"),
            (b"{\"rooms\": []}", "data not specified"),
            (b"{\"rooms\": {}, \"data\": 1}", "list of room objects"),
            (b"{\"rooms\": [[1]], \"data\": 1}", "rooms[0]"),
            (b"[1, 2]", "bad envelope"),
        ];
        for (body, expected) in cases {
            let err = Marshal::Envelope.decode(body).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
        assert!(matches!(
            Marshal::Envelope.decode(b"\xff"),
            Err(MarshalError::NotJson(_))
        ));
    }
}
