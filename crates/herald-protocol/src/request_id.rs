//! Request ids: the client's handle for a subscription, echoed in every delivery for it.

use std::sync::Arc;

use serde_json::Value;

/// Longer string ids are refused as if absent: they are echoed in every delivery, so their size multiplies.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// A request id, kept as its JSON text so it can be echoed byte for byte (`"abc"` stays a string, `7` a number).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// Accepts a non-empty string of at most [`MAX_REQUEST_ID_BYTES`] or a number. Anything else (null, `""`,
    /// booleans, arrays, objects) counts as no request id, as High-templar's truthiness check did for null and
    /// `""`.
    pub fn from_json(value: Value) -> Option<RequestId> {
        match &value {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_REQUEST_ID_BYTES => {}
            Value::Number(_) => {}
            _ => return None,
        }
        Some(RequestId(Arc::from(value.to_string())))
    }

    /// A request id standing for a connection id (High-templar echoes the connection id on errors it cannot
    /// attribute to a request).
    pub fn from_connection_id(id: &str) -> RequestId {
        RequestId(Arc::from(Value::String(id.to_owned()).to_string()))
    }

    /// The id as JSON text, ready to splice into a frame.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// The id as a JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::from_str(&self.0).expect("request ids are valid JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_and_numbers_are_ids() {
        assert_eq!(RequestId::from_json(json!("a")).unwrap().as_json(), "\"a\"");
        assert_eq!(RequestId::from_json(json!(0)).unwrap().as_json(), "0");
        assert_eq!(
            RequestId::from_json(json!("a\"b")).unwrap().as_json(),
            r#""a\"b""#
        );
    }

    #[test]
    fn other_values_are_no_id() {
        for v in [
            json!(null),
            json!(""),
            json!(true),
            json!([1]),
            json!({"a": 1}),
        ] {
            assert!(RequestId::from_json(v.clone()).is_none(), "{v}");
        }
        assert!(RequestId::from_json(json!("x".repeat(MAX_REQUEST_ID_BYTES + 1))).is_none());
    }
}
