//! Endpoint kinds, as written under `endpoints:` in `herald.yaml` and stored in the registry.
//!
//! Each kind checks its own fields ([`Endpoint::validate`]); whether it may be a route's source or destination,
//! and whether two endpoints reach the same place (for cycle detection), are decided here too, because both
//! depend on the kind's semantics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use herald_protocol::Room;

use crate::marshal::Marshal;
use crate::template;

/// The longest Redis channel, AMQP exchange or routing key accepted.
pub const MAX_CHANNEL_LEN: usize = 256;

/// One endpoint: where messages come from or go to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Endpoint {
    /// A herald room or room pattern: as a source, every publish to a matching room; as a destination, a publish
    /// into herald.
    Room(RoomSpec),
    /// A Redis Pub/Sub channel (`SUBSCRIBE`) or pattern (`PSUBSCRIBE`) in, `PUBLISH` out.
    Redis(RedisSpec),
    /// A RabbitMQ exchange and routing key: a queue bound to it consumed in, `basic.publish` out.
    Amqp(AmqpSpec),
    /// An HTTP POST to a backend (destination only).
    Webhook(WebhookSpec),
}

/// `kind: room`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoomSpec {
    /// The room (a JSON object of scalars). As a source it is a pattern (`"*"` matches any value); as a
    /// destination string values may hold placeholders (`"{channel}"`, `"{id}"`) filled from the message. Absent
    /// on a destination: the rooms come from the message (the `envelope` marshal, the `hightemplar` preset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<Value>,
}

/// `kind: redis`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RedisSpec {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// The channel. As a source, a glob (`*`, `?`, `[...]`) makes it a pattern subscription; as a destination,
    /// placeholders (`{id}`) are filled from the room the message was published to.
    pub channel: String,
    /// How payloads are read and written.
    #[serde(default)]
    pub marshal: Marshal,
}

/// The type of an AMQP exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExchangeKind {
    /// Routing key equality.
    Direct,
    /// Dotted routing keys with `*` (one word) and `#` (any words) in bindings.
    #[default]
    Topic,
    /// Every bound queue gets every message.
    Fanout,
}

/// Ready-made AMQP endpoint shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AmqpPreset {
    /// High-templar 3.x: a direct, non-durable exchange `hightemplar`, routing key `*`, bodies
    /// `{"rooms": [...], "data": ...}` as django-binder publishes them.
    Hightemplar,
}

/// `kind: amqp`. Unset fields take the preset's value, then the defaults documented on each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AmqpSpec {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    /// A ready-made shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<AmqpPreset>,
    /// The exchange (required without a preset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// The exchange type (default `topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_kind: Option<ExchangeKind>,
    /// Whether the exchange is declared durable and a destination publishes persistent messages (default true).
    /// A source's queue is always durable: at-least-once needs it to outlive connections and broker restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,
    /// As a source, the binding key; as a destination, the routing key, with placeholders filled from the room
    /// (default `#` for a topic source, empty otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// The queue a source consumes (default `herald.<route name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Unacknowledged deliveries in flight for a source (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u16>,
    /// How bodies are read and written (default `json`; `envelope` with the `hightemplar` preset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marshal: Option<Marshal>,
}

/// An [`AmqpSpec`] with the preset and the defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedAmqp {
    /// The broker URL.
    pub url: String,
    /// The exchange.
    pub exchange: String,
    /// Its type.
    pub exchange_kind: ExchangeKind,
    /// Whether exchange and queue are durable.
    pub durable: bool,
    /// The binding (source) or routing (destination) key.
    pub routing_key: String,
    /// The queue a source consumes, if named.
    pub queue: Option<String>,
    /// Prefetch for a source.
    pub prefetch: u16,
    /// The marshal.
    pub marshal: Marshal,
}

impl AmqpSpec {
    /// The spec with its preset and defaults applied.
    pub fn resolved(&self) -> ResolvedAmqp {
        let preset = self.preset.map(|AmqpPreset::Hightemplar| {
            // High-templar declared the exchange this way; declaring it with other arguments would fail with
            // PRECONDITION_FAILED against one that already exists.
            (
                "hightemplar",
                ExchangeKind::Direct,
                false,
                "*",
                Marshal::Envelope,
            )
        });
        let exchange_kind = self
            .exchange_kind
            .or(preset.map(|p| p.1))
            .unwrap_or_default();
        let default_key = match exchange_kind {
            ExchangeKind::Topic => "#",
            _ => "",
        };
        ResolvedAmqp {
            url: self.url.clone(),
            exchange: self
                .exchange
                .clone()
                .or(preset.map(|p| p.0.to_owned()))
                .unwrap_or_default(),
            exchange_kind,
            durable: self.durable.or(preset.map(|p| p.2)).unwrap_or(true),
            routing_key: self
                .routing_key
                .clone()
                .or(preset.map(|p| p.3.to_owned()))
                .unwrap_or_else(|| default_key.to_owned()),
            queue: self.queue.clone(),
            prefetch: self.prefetch.unwrap_or(256).max(1),
            marshal: self.marshal.or(preset.map(|p| p.4)).unwrap_or_default(),
        }
    }
}

/// `kind: webhook`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WebhookSpec {
    /// `http://host:port/path`.
    pub url: String,
    /// How long one attempt may take (default 5000).
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts after the first when the backend fails (5xx, 429, timeout, refused); default 3.
    #[serde(default = "default_webhook_retries")]
    pub retries: u32,
    /// The first retry's delay, doubled for each next one (default 200).
    #[serde(default = "default_webhook_backoff_ms")]
    pub backoff_ms: u64,
    /// Extra request headers (e.g. an `Authorization` the backend checks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The request body (default `envelope`, so the backend learns the room as well as the data).
    #[serde(default = "default_webhook_marshal")]
    pub marshal: Marshal,
}

fn default_webhook_timeout_ms() -> u64 {
    5000
}
fn default_webhook_retries() -> u32 {
    3
}
fn default_webhook_backoff_ms() -> u64 {
    200
}
fn default_webhook_marshal() -> Marshal {
    Marshal::Envelope
}

/// Which end of a route an endpoint is checked as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Where a route's messages come from.
    Source,
    /// Where they go.
    Destination,
}

impl Endpoint {
    /// The kind as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Room(_) => "room",
            Endpoint::Redis(_) => "redis",
            Endpoint::Amqp(_) => "amqp",
            Endpoint::Webhook(_) => "webhook",
        }
    }

    /// Whether this source is consumed from outside herald (and so needs exactly one consumer in the cluster).
    pub fn is_external_source(&self) -> bool {
        matches!(self, Endpoint::Redis(_) | Endpoint::Amqp(_))
    }

    /// The marshal messages are read and written with.
    pub fn marshal(&self) -> Marshal {
        match self {
            Endpoint::Room(_) => Marshal::Json,
            Endpoint::Redis(r) => r.marshal,
            Endpoint::Amqp(a) => a.resolved().marshal,
            Endpoint::Webhook(w) => w.marshal,
        }
    }

    /// Checks the endpoint's own fields (the parts that do not depend on the routes using it).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Endpoint::Room(spec) => {
                if let Some(room) = &spec.room {
                    Room::from_json(room).map_err(|e| format!("room: {e}"))?;
                }
                Ok(())
            }
            Endpoint::Redis(spec) => {
                check_url(&spec.url, &["redis://"])?;
                check_channel("channel", &spec.channel)
            }
            Endpoint::Amqp(spec) => {
                check_url(&spec.url, &["amqp://"])?;
                let r = spec.resolved();
                if r.exchange.is_empty() {
                    return Err("exchange is required (or a preset)".into());
                }
                check_channel("exchange", &r.exchange)?;
                if r.routing_key.len() > MAX_CHANNEL_LEN {
                    return Err(format!(
                        "routing-key is longer than {MAX_CHANNEL_LEN} bytes"
                    ));
                }
                if let Some(queue) = &r.queue {
                    check_channel("queue", queue)?;
                }
                Ok(())
            }
            Endpoint::Webhook(spec) => {
                check_url(&spec.url, &["http://"])?;
                if spec.timeout_ms == 0 {
                    return Err("timeout-ms must be above 0".into());
                }
                for (name, value) in &spec.headers {
                    let valid_name = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                    if !valid_name || value.bytes().any(|b| b < 0x20 && b != b'\t') {
                        return Err(format!("header {name:?} is not a valid HTTP header"));
                    }
                }
                Ok(())
            }
        }
    }

    /// Checks that the endpoint can play `role` in a route. `source_carries_rooms` says whether the route's
    /// source marshal carries rooms (needed by a room destination without a room of its own).
    pub fn validate_role(&self, role: Role, source_carries_rooms: bool) -> Result<(), String> {
        match (self, role) {
            (Endpoint::Webhook(_), Role::Source) => {
                Err("a webhook can only be a destination".into())
            }
            (Endpoint::Room(spec), Role::Source) => match &spec.room {
                None => Err("a room source needs a room (pattern)".into()),
                Some(room) if template::has_placeholders(room) => {
                    Err("placeholders are for destinations; a source room is a pattern".into())
                }
                Some(_) => Ok(()),
            },
            (Endpoint::Room(spec), Role::Destination) => {
                if spec.room.is_none() && !source_carries_rooms {
                    Err("this room destination has no room, and the source's marshal does not carry rooms (use `envelope`)".into())
                } else {
                    Ok(())
                }
            }
            (Endpoint::Redis(spec), Role::Source) => {
                if template::has_channel_placeholders(&spec.channel) {
                    Err("placeholders are for destinations; a source channel is a channel or a glob".into())
                } else {
                    Ok(())
                }
            }
            (Endpoint::Redis(spec), Role::Destination) => {
                if template::is_glob(&spec.channel) {
                    Err("a destination channel cannot be a pattern".into())
                } else {
                    Ok(())
                }
            }
            (Endpoint::Amqp(spec), Role::Source) => {
                if template::has_channel_placeholders(&spec.resolved().routing_key) {
                    Err("placeholders are for destinations".into())
                } else {
                    Ok(())
                }
            }
            (Endpoint::Amqp(_), Role::Destination) | (Endpoint::Webhook(_), Role::Destination) => {
                Ok(())
            }
        }
    }

    /// Whether a message written to `self` (as a destination) may be read back by `source`: the edge of a
    /// possible cycle through a broker or through herald. Conservative: when unsure, it says yes.
    pub fn feeds(&self, source: &Endpoint) -> bool {
        match (self, source) {
            (Endpoint::Room(dest), Endpoint::Room(src)) => {
                let (Some(dest_room), Some(src_room)) = (&dest.room, &src.room) else {
                    // Rooms taken from the message could be any room.
                    return true;
                };
                let dest_pattern = template::placeholders_as_wildcards(dest_room);
                match (Room::from_json(&dest_pattern), Room::from_json(src_room)) {
                    (Ok(d), Ok(s)) => d.matches(&s),
                    _ => true,
                }
            }
            (Endpoint::Redis(dest), Endpoint::Redis(src)) => {
                same_server(&dest.url, &src.url)
                    && template::prefixes_overlap(&dest.channel, &src.channel, b"*?[{")
            }
            (Endpoint::Amqp(dest), Endpoint::Amqp(src)) => {
                let (d, s) = (dest.resolved(), src.resolved());
                same_server(&d.url, &s.url)
                    && d.exchange == s.exchange
                    && (s.exchange_kind == ExchangeKind::Fanout
                        || template::prefixes_overlap(&d.routing_key, &s.routing_key, b"*#{"))
            }
            _ => false,
        }
    }
}

fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let Some(scheme) = schemes.iter().find(|s| url.starts_with(**s)) else {
        return Err(format!("url must start with {}", schemes.join(" or ")));
    };
    let rest = &url[scheme.len()..];
    if rest.is_empty() || url.len() > 2048 || url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("url has no host, or has spaces or control characters".into());
    }
    Ok(())
}

fn check_channel(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_CHANNEL_LEN {
        return Err(format!("{what} must be 1 to {MAX_CHANNEL_LEN} bytes"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what} has spaces or control characters"));
    }
    Ok(())
}

/// Whether two broker URLs name the same server (credentials and a trailing slash aside).
fn same_server(a: &str, b: &str) -> bool {
    fn host(url: &str) -> &str {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.trim_end_matches('/')
    }
    host(a) == host(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint(value: Value) -> Endpoint {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn kinds_parse_with_defaults() {
        let redis =
            endpoint(json!({"kind": "redis", "url": "redis://127.0.0.1:6379/", "channel": "a.*"}));
        assert_eq!(redis.marshal(), Marshal::Json);
        assert!(redis.validate().is_ok());
        let hook = endpoint(json!({"kind": "webhook", "url": "http://127.0.0.1:9/h"}));
        let Endpoint::Webhook(spec) = &hook else {
            panic!()
        };
        assert_eq!(
            (spec.timeout_ms, spec.retries, spec.marshal),
            (5000, 3, Marshal::Envelope)
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let typo = json!({"kind": "redis", "url": "redis://h/", "chanel": "a"});
        assert!(serde_json::from_value::<Endpoint>(typo).is_err());
        let kind = json!({"kind": "kafka", "url": "x"});
        assert!(serde_json::from_value::<Endpoint>(kind).is_err());
    }

    #[test]
    fn hightemplar_preset_matches_high_templar() {
        let ep = endpoint(
            json!({"kind": "amqp", "url": "amqp://guest:guest@127.0.0.1:5672/%2f", "preset": "hightemplar"}),
        );
        let Endpoint::Amqp(spec) = &ep else { panic!() };
        let r = spec.resolved();
        assert_eq!(r.exchange, "hightemplar");
        assert_eq!(r.exchange_kind, ExchangeKind::Direct);
        assert!(!r.durable);
        assert_eq!(r.routing_key, "*");
        assert_eq!(r.marshal, Marshal::Envelope);
        assert!(ep.validate().is_ok());
    }

    #[test]
    fn field_checks() {
        let bad = [
            json!({"kind": "redis", "url": "http://h/", "channel": "a"}),
            json!({"kind": "redis", "url": "redis://h/", "channel": ""}),
            json!({"kind": "redis", "url": "redis://h/", "channel": "a b"}),
            json!({"kind": "amqp", "url": "amqp://h/"}),
            json!({"kind": "webhook", "url": "https://h/"}),
            json!({"kind": "webhook", "url": "http://h/", "timeout-ms": 0}),
            json!({"kind": "webhook", "url": "http://h/", "headers": {"a b": "x"}}),
            json!({"kind": "room", "room": {"a": [1]}}),
            json!({"kind": "room", "room": "a"}),
        ];
        for value in bad {
            assert!(endpoint(value.clone()).validate().is_err(), "{value}");
        }
    }

    #[test]
    fn roles() {
        let hook = endpoint(json!({"kind": "webhook", "url": "http://h/"}));
        assert!(hook.validate_role(Role::Source, false).is_err());
        let glob = endpoint(json!({"kind": "redis", "url": "redis://h/", "channel": "a.*"}));
        assert!(glob.validate_role(Role::Source, false).is_ok());
        assert!(glob.validate_role(Role::Destination, false).is_err());
        let templated =
            endpoint(json!({"kind": "redis", "url": "redis://h/", "channel": "a.{id}"}));
        assert!(templated.validate_role(Role::Source, false).is_err());
        assert!(templated.validate_role(Role::Destination, false).is_ok());
        let no_room = endpoint(json!({"kind": "room"}));
        assert!(no_room.validate_role(Role::Source, false).is_err());
        assert!(no_room.validate_role(Role::Destination, false).is_err());
        assert!(no_room.validate_role(Role::Destination, true).is_ok());
    }

    #[test]
    fn feeds_follows_servers_channels_and_rooms() {
        let out =
            endpoint(json!({"kind": "redis", "url": "redis://:pw@h:1/", "channel": "out.{id}"}));
        let in_other = endpoint(json!({"kind": "redis", "url": "redis://h:1", "channel": "in.*"}));
        let in_same = endpoint(json!({"kind": "redis", "url": "redis://h:1", "channel": "out.*"}));
        let elsewhere =
            endpoint(json!({"kind": "redis", "url": "redis://h:2", "channel": "out.*"}));
        assert!(!out.feeds(&in_other));
        assert!(out.feeds(&in_same));
        assert!(!out.feeds(&elsewhere));
        let room_dest = endpoint(json!({"kind": "room", "room": {"c": "{channel}"}}));
        let room_src = endpoint(json!({"kind": "room", "room": {"c": "x"}}));
        let other_keys = endpoint(json!({"kind": "room", "room": {"d": "*"}}));
        assert!(room_dest.feeds(&room_src));
        assert!(!room_dest.feeds(&other_keys));
        let hook = endpoint(json!({"kind": "webhook", "url": "http://h/"}));
        assert!(!hook.feeds(&room_src));
    }
}
