//! Placeholders: a destination's room or channel filled in from the message.
//!
//! A placeholder is `{name}` inside a string. `{channel}` is the source's channel or routing key; any other name
//! is a key of the room the message was published to. A placeholder with nothing to fill it leaves the message
//! undeliverable to that destination (counted by the bridge), rather than sending it somewhere unintended.

use std::collections::BTreeMap;

use serde_json::Value;

/// What placeholders are filled from: the source channel and the fields of the source room.
#[derive(Debug, Default, Clone)]
pub struct Vars<'a> {
    /// The Redis channel or AMQP routing key the message arrived on.
    pub channel: Option<&'a str>,
    /// The fields of the room the message was published to.
    pub room: BTreeMap<String, String>,
}

impl<'a> Vars<'a> {
    /// Variables for a message that arrived on `channel`.
    pub fn channel(channel: &'a str) -> Vars<'a> {
        Vars {
            channel: Some(channel),
            room: BTreeMap::new(),
        }
    }

    /// Variables for a message published to `room` (a JSON object); string values as they are, other scalars as
    /// their JSON text.
    pub fn room(room: &Value) -> Vars<'a> {
        let room = room
            .as_object()
            .map(|map| {
                map.iter()
                    .map(|(k, v)| {
                        let text = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), text)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Vars {
            channel: None,
            room,
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        if name == "channel" {
            if let Some(channel) = self.channel {
                return Some(channel);
            }
        }
        self.room.get(name).map(String::as_str)
    }
}

/// Whether `text` holds a `{name}` placeholder.
pub fn has_channel_placeholders(text: &str) -> bool {
    placeholders(text).next().is_some()
}

/// Whether any string value of a room holds a placeholder.
pub fn has_placeholders(room: &Value) -> bool {
    room.as_object().is_some_and(|map| {
        map.values()
            .any(|v| v.as_str().is_some_and(has_channel_placeholders))
    })
}

/// Whether a Redis channel is a glob pattern.
pub fn is_glob(channel: &str) -> bool {
    channel.bytes().any(|b| matches!(b, b'*' | b'?' | b'['))
}

fn placeholders(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let bytes = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < bytes.len() {
            let open = at + bytes[at..].iter().position(|&b| b == b'{')?;
            let close = open + bytes[open..].iter().position(|&b| b == b'}')?;
            at = close + 1;
            let name = &text[open + 1..close];
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Some((open, close));
            }
        }
        None
    })
}

/// Fills the placeholders of `text`; `None` when one has no value.
pub fn fill(text: &str, vars: &Vars<'_>) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (open, close) in placeholders(text) {
        out.push_str(&text[last..open]);
        out.push_str(vars.get(&text[open + 1..close])?);
        last = close + 1;
    }
    out.push_str(&text[last..]);
    Some(out)
}

/// Fills the placeholders of a room's string values. A value that is exactly one placeholder whose variable
/// came from a non-string room value keeps that JSON type (`{"id": "{id}"}` with `id: 7` gives `7`, not `"7"`).
pub fn fill_room(room: &Value, vars: &Vars<'_>, typed: &Value) -> Option<Value> {
    let Value::Object(map) = room else {
        return Some(room.clone());
    };
    let mut out = serde_json::Map::with_capacity(map.len());
    for (key, value) in map {
        let filled = match value.as_str() {
            Some(text) if has_channel_placeholders(text) => {
                let whole = text.strip_prefix('{').and_then(|t| t.strip_suffix('}'));
                match whole.and_then(|name| typed.get(name)) {
                    Some(original) if !original.is_string() && vars.channel.is_none() => {
                        original.clone()
                    }
                    _ => Value::String(fill(text, vars)?),
                }
            }
            _ => value.clone(),
        };
        out.insert(key.clone(), filled);
    }
    Some(Value::Object(out))
}

/// The room with each placeholder value replaced by the wildcard: everything the destination could publish to.
pub fn placeholders_as_wildcards(room: &Value) -> Value {
    let Value::Object(map) = room else {
        return room.clone();
    };
    Value::Object(
        map.iter()
            .map(|(k, v)| {
                let v = match v.as_str() {
                    Some(text) if has_channel_placeholders(text) => Value::String("*".into()),
                    _ => v.clone(),
                };
                (k.clone(), v)
            })
            .collect(),
    )
}

/// Whether two channel specs could name a common channel, judged by their literal prefixes (up to the first byte
/// in `wild`): `out.{id}` and `in.*` cannot, `out.{id}` and `out.*` may. Literal channels must be equal.
pub fn prefixes_overlap(a: &str, b: &str, wild: &[u8]) -> bool {
    let cut = |s: &str| s.bytes().position(|c| wild.contains(&c));
    match (cut(a), cut(b)) {
        (None, None) => a == b,
        (ca, cb) => {
            let pa = &a[..ca.unwrap_or(a.len())];
            let pb = &b[..cb.unwrap_or(b.len())];
            let shorter = pa.len().min(pb.len());
            pa[..shorter] == pb[..shorter]
                && (ca.is_some() || pa.len() >= pb.len())
                && (cb.is_some() || pb.len() >= pa.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_channel_and_room_fields() {
        assert_eq!(
            fill("a.{channel}", &Vars::channel("x")).as_deref(),
            Some("a.x")
        );
        let room = json!({"target": "orders", "id": 7});
        let vars = Vars::room(&room);
        assert_eq!(
            fill("o.{target}.{id}", &vars).as_deref(),
            Some("o.orders.7")
        );
        assert_eq!(fill("o.{missing}", &vars), None);
        assert_eq!(
            fill("no {} {a b} braces", &vars).as_deref(),
            Some("no {} {a b} braces")
        );
    }

    #[test]
    fn fill_room_keeps_types_of_whole_placeholders() {
        let src = json!({"id": 7, "t": "x"});
        let dest = json!({"id": "{id}", "label": "t-{t}", "fixed": true});
        let filled = fill_room(&dest, &Vars::room(&src), &src).unwrap();
        assert_eq!(filled, json!({"id": 7, "label": "t-x", "fixed": true}));
        let from_channel = fill_room(
            &json!({"c": "{channel}"}),
            &Vars::channel("ch"),
            &Value::Null,
        );
        assert_eq!(from_channel.unwrap(), json!({"c": "ch"}));
    }

    #[test]
    fn prefix_overlap() {
        assert!(!prefixes_overlap("out.{id}", "in.*", b"*?[{"));
        assert!(prefixes_overlap("out.{id}", "out.*", b"*?[{"));
        assert!(prefixes_overlap("out.{id}", "o*", b"*?[{"));
        assert!(prefixes_overlap("a", "a", b"*"));
        assert!(!prefixes_overlap("a", "b", b"*"));
        assert!(!prefixes_overlap("ab", "a", b"*"));
        assert!(prefixes_overlap("ab", "a*", b"*"));
        assert!(!prefixes_overlap("a", "ab*", b"*"));
    }
}
