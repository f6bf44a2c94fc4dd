//! Rooms: JSON objects of scalar values, in a canonical form that can be hashed, compared and matched.
//!
//! Two rules live here, and they are deliberately different:
//! - **Permission** ([`Room::is_allowed_by`]): High-templar's rule. A requested room is allowed when an allowed room
//!   has the same keys and every key is equal or `"*"` on the *allowed* side. An allowed specific value never
//!   grants a requested `"*"`.
//! - **Delivery** ([`Room::matches`]): what High-templar documented but never shipped. `"*"` on *either* side
//!   matches any value, so a subscriber to `{"customer":"*"}` receives a publish to `{"customer":"1"}` and a publish
//!   to `{"customer":"*"}` reaches every customer's subscribers.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The wildcard value. Only the JSON *string* `"*"` is a wildcard.
pub const WILDCARD: &str = "*";

/// Rooms with more keys than this are refused; the matching index keeps one bit per key.
pub const MAX_ROOM_KEYS: usize = 32;

/// One value of a room. Values keep their JSON type: `"1"` and `1` are different rooms.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scalar {
    /// JSON `null`.
    Null,
    /// JSON `true` / `false`.
    Bool(bool),
    /// A JSON number that is an integer (including floats with no fractional part, so `1` and `1.0` agree,
    /// as they did in High-templar's Python).
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// Any other number, by its bit pattern (JSON has no NaN).
    Float(u64),
    /// A JSON string; `"*"` is the wildcard.
    Str(Arc<str>),
}

impl Scalar {
    /// Whether this value is the wildcard `"*"`.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, Scalar::Str(s) if &**s == WILDCARD)
    }

    fn from_json(value: &Value) -> Option<Scalar> {
        Some(match value {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::String(s) => Scalar::Str(Arc::from(s.as_str())),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Scalar::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Scalar::UInt(u)
                } else {
                    let f = n.as_f64()?;
                    if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 {
                        Scalar::Int(f as i64)
                    } else {
                        Scalar::Float(f.to_bits())
                    }
                }
            }
            Value::Array(_) | Value::Object(_) => return None,
        })
    }

    fn to_json(&self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Int(i) => Value::from(*i),
            Scalar::UInt(u) => Value::from(*u),
            Scalar::Float(bits) => Value::from(f64::from_bits(*bits)),
            Scalar::Str(s) => Value::String(s.to_string()),
        }
    }
}

/// Why a JSON value is not a room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// The room is absent.
    #[error("room is missing")]
    Missing,
    /// The room is not a JSON object.
    #[error("room is not a JSON object")]
    NotAnObject,
    /// A value is an array or object.
    #[error("room key {0:?} has a nested value; room values are scalars")]
    NestedValue(String),
    /// More keys than [`MAX_ROOM_KEYS`].
    #[error("room has more than {MAX_ROOM_KEYS} keys")]
    TooManyKeys,
}

/// A room in canonical form: its keys sorted, each with a scalar value.
///
/// Cheap to clone (one `Arc`), hashable, and independent of the key order the client sent.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room {
    keys: Arc<[Arc<str>]>,
    values: Arc<[Scalar]>,
}

impl Room {
    /// Parses a room from JSON: an object whose values are all scalars.
    pub fn from_json(value: &Value) -> Result<Room, RoomError> {
        match value {
            Value::Object(map) => Room::from_map(map),
            _ => Err(RoomError::NotAnObject),
        }
    }

    /// Parses a room from a JSON object.
    pub fn from_map(map: &Map<String, Value>) -> Result<Room, RoomError> {
        if map.len() > MAX_ROOM_KEYS {
            return Err(RoomError::TooManyKeys);
        }
        let mut pairs = Vec::with_capacity(map.len());
        for (key, value) in map {
            let scalar =
                Scalar::from_json(value).ok_or_else(|| RoomError::NestedValue(key.clone()))?;
            pairs.push((key.as_str(), scalar));
        }
        // serde_json's Map is a BTreeMap unless `preserve_order` is on; sort anyway so the canonical form never
        // depends on a feature flag somewhere else in the dependency graph.
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        let keys = pairs.iter().map(|(k, _)| Arc::from(*k)).collect();
        let values = pairs.into_iter().map(|(_, v)| v).collect();
        Ok(Room { keys, values })
    }

    /// The room's keys, sorted.
    pub fn keys(&self) -> &[Arc<str>] {
        &self.keys
    }

    /// The room's values, in key order.
    pub fn values(&self) -> &[Scalar] {
        &self.values
    }

    /// Bit `i` is set when value `i` is the wildcard.
    pub fn wildcard_mask(&self) -> u64 {
        self.values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_wildcard())
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    /// High-templar's permission rule: `self` (requested) is allowed by `allowed` when both have the same keys
    /// and every value is equal or `"*"` on the allowed side.
    pub fn is_allowed_by(&self, allowed: &Room) -> bool {
        self.keys == allowed.keys
            && self
                .values
                .iter()
                .zip(allowed.values.iter())
                .all(|(requested, allowed)| allowed.is_wildcard() || requested == allowed)
    }

    /// The delivery rule: same keys, and every value equal or `"*"` on either side.
    pub fn matches(&self, other: &Room) -> bool {
        self.keys == other.keys
            && self
                .values
                .iter()
                .zip(other.values.iter())
                .all(|(a, b)| a == b || a.is_wildcard() || b.is_wildcard())
    }

    /// The room's canonical JSON text: keys sorted, values as parsed. Every node spells a room this way, so it can
    /// key replicated state.
    pub fn canonical_json(&self) -> String {
        self.to_json().to_string()
    }

    /// The room as a JSON object.
    pub fn to_json(&self) -> Value {
        let map: Map<String, Value> = self
            .keys
            .iter()
            .zip(self.values.iter())
            .map(|(k, v)| (k.to_string(), v.to_json()))
            .collect();
        Value::Object(map)
    }

    pub(crate) fn keys_arc(&self) -> &Arc<[Arc<str>]> {
        &self.keys
    }

    pub(crate) fn with_values(&self, values: Arc<[Scalar]>) -> Room {
        Room {
            keys: self.keys.clone(),
            values,
        }
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Room({})", self.to_json())
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

/// Whether `requested` is allowed by any of `allowed`.
pub fn is_allowed(requested: &Room, allowed: &[Room]) -> bool {
    allowed.iter().any(|a| requested.is_allowed_by(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(v: Value) -> Room {
        Room::from_json(&v).unwrap()
    }

    #[test]
    fn key_order_does_not_matter() {
        assert_eq!(
            room(json!({"a": 1, "b": "x"})),
            room(json!({"b": "x", "a": 1}))
        );
    }

    #[test]
    fn values_keep_their_json_type() {
        assert_ne!(room(json!({"a": 1})), room(json!({"a": "1"})));
        assert!(!room(json!({"a": 1})).is_allowed_by(&room(json!({"a": "1"}))));
        assert!(!room(json!({"a": true})).matches(&room(json!({"a": "true"}))));
        // Python's 1 == 1.0 held in High-templar; it holds here too.
        assert_eq!(room(json!({"a": 1})), room(json!({"a": 1.0})));
    }

    #[test]
    fn nested_values_and_non_objects_are_refused() {
        assert_eq!(
            Room::from_json(&json!({"a": [1]})),
            Err(RoomError::NestedValue("a".into()))
        );
        assert_eq!(
            Room::from_json(&json!({"a": {"b": 1}})),
            Err(RoomError::NestedValue("a".into()))
        );
        assert_eq!(Room::from_json(&json!([1])), Err(RoomError::NotAnObject));
        assert_eq!(Room::from_json(&json!("r")), Err(RoomError::NotAnObject));
        let many: Map<String, Value> = (0..=MAX_ROOM_KEYS)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        assert_eq!(Room::from_map(&many), Err(RoomError::TooManyKeys));
    }

    #[test]
    fn permission_follows_high_templar() {
        let allowed = room(json!({"customer": "*", "type": "order"}));
        assert!(room(json!({"customer": "3", "type": "order"})).is_allowed_by(&allowed));
        assert!(room(json!({"customer": "*", "type": "order"})).is_allowed_by(&allowed));
        assert!(!room(json!({"customer": "3", "type": "invoice"})).is_allowed_by(&allowed));
        // Different key sets never match, in either direction.
        assert!(!room(json!({"customer": "3"})).is_allowed_by(&allowed));
        assert!(!room(json!({"customer": "3", "type": "order", "x": 1})).is_allowed_by(&allowed));
        // An allowed specific value does not grant a requested wildcard.
        assert!(!room(json!({"customer": "*"})).is_allowed_by(&room(json!({"customer": "3"}))));
        // {} allows only {}.
        assert!(room(json!({})).is_allowed_by(&room(json!({}))));
        assert!(!room(json!({"a": 1})).is_allowed_by(&room(json!({}))));
    }

    #[test]
    fn delivery_wildcard_matches_either_side() {
        let sub = room(json!({"customer": "*"}));
        assert!(room(json!({"customer": "1"})).matches(&sub));
        assert!(sub.matches(&room(json!({"customer": "1"}))));
        assert!(room(json!({"customer": 7})).matches(&sub));
        assert!(!room(json!({"customer": "1"})).matches(&room(json!({"customer": "2"}))));
        assert!(!room(json!({"customer": "1", "x": 1})).matches(&sub));
    }

    #[test]
    fn canonical_json_sorts_keys() {
        assert_eq!(
            room(json!({"b": 1, "a": "x"})).canonical_json(),
            r#"{"a":"x","b":1}"#
        );
        let back = Room::from_json(
            &serde_json::from_str(&room(json!({"z": 1.5})).canonical_json()).unwrap(),
        );
        assert_eq!(back.unwrap(), room(json!({"z": 1.5})));
    }

    #[test]
    fn wildcard_mask_marks_star_positions() {
        let r = room(json!({"a": "*", "b": 1, "c": "*"}));
        assert_eq!(r.wildcard_mask(), 0b101);
        assert_eq!(r.to_json(), json!({"a": "*", "b": 1, "c": "*"}));
    }
}
