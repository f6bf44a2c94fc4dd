//! Authorizing WebSocket connections: backend bootstrap (High-templar), JWT, or static rooms; and the API keys
//! the publish APIs require.
//!
//! Every method ends in the same [`Grant`]: the rooms the connection may subscribe to (as parsed rooms and as the
//! JSON echoed in the first frame) and, optionally, a user id that publishes can target.

mod bootstrap;
mod jwt;

use std::time::Duration;

use http::request::Parts;
use serde_json::Value;
use subtle::ConstantTimeEq;

use herald_protocol::Room;

use crate::config::{AuthConfig, AuthMethod};
use crate::metrics::Metrics;

pub use bootstrap::BootstrapAuth;
pub(crate) use bootstrap::{forwarded_headers, parse_header_names};
pub use jwt::JwtAuth;

/// What a connection may subscribe to.
#[derive(Debug, Clone)]
pub enum Permissions {
    /// Anything (dev mode without auth).
    All,
    /// Rooms allowed by at least one of these (High-templar's rule, see [`Room::is_allowed_by`]).
    Rooms(Vec<Room>),
}

impl Permissions {
    /// Whether `room` may be subscribed to.
    pub fn allows(&self, room: &Room) -> bool {
        match self {
            Permissions::All => true,
            Permissions::Rooms(allowed) => herald_protocol::room::is_allowed(room, allowed),
        }
    }
}

/// An authorized connection's rights.
#[derive(Debug, Clone)]
pub struct Grant {
    /// What it may subscribe to.
    pub permissions: Permissions,
    /// The allowed rooms as the backend or token listed them, echoed in the first frame.
    pub allowed_rooms: Value,
    /// The user, when the method names one.
    pub user_id: Option<String>,
    /// The RPC methods it may call.
    pub methods: Methods,
}

/// The RPC methods a connection may call.
#[derive(Debug, Clone)]
pub enum Methods {
    /// Any (dev mode without auth, or `*` listed).
    All,
    /// Only these.
    Only(std::collections::BTreeSet<String>),
}

impl Methods {
    /// Whether `method` may be called.
    pub fn allows(&self, method: &str) -> bool {
        match self {
            Methods::All => true,
            Methods::Only(methods) => methods.contains(method),
        }
    }

    /// From a list of names, where `*` allows any.
    fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Methods {
        let mut only = std::collections::BTreeSet::new();
        for name in names {
            if name == "*" {
                return Methods::All;
            }
            only.insert(name.to_string());
        }
        Methods::Only(only)
    }
}

/// Parses `allowed_methods` from a bootstrap answer or a token: absent or null allows none; otherwise a list of
/// method names (or `*`). Like `allowed_rooms`, one bad element refuses the whole grant.
pub(crate) fn parse_allowed_methods(value: Option<Value>) -> Result<Methods, Denial> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Methods::Only(Default::default())),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(Denial::new("malformed", "allowed_methods is not a list")),
    };
    let mut names = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(name) if name == "*" || herald_protocol::cmd::is_valid_method(name) => {
                names.push(name)
            }
            _ => {
                return Err(Denial::new(
                    "malformed",
                    format!("allowed_methods[{i}] is not a method name: {item}"),
                ))
            }
        }
    }
    Ok(Methods::from_names(names))
}

/// Why a connection was refused. Logged with the reason; the client only learns `{"is_authorized": false}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Denial {
    /// A short machine-readable reason (also a metric label for bootstrap).
    pub reason: &'static str,
    /// What exactly was wrong.
    pub detail: String,
}

impl Denial {
    pub(crate) fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Denial {
            reason,
            detail: detail.into(),
        }
    }
}

/// An auth setting that cannot be used; the server refuses to start with it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct AuthConfigError {
    /// The config key at fault.
    pub setting: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl AuthConfigError {
    pub(crate) fn new(setting: &'static str, reason: impl ToString) -> Self {
        AuthConfigError {
            setting,
            reason: reason.to_string(),
        }
    }
}

/// Parses a list of allowed rooms. Every element must be a valid room, or the whole grant is refused (as
/// High-templar refuses a list with a non-object in it).
pub(crate) fn parse_allowed_rooms(value: &Value) -> Result<Vec<Room>, Denial> {
    let Value::Array(items) = value else {
        return Err(Denial::new("malformed", "allowed_rooms is not a list"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            Room::from_json(item)
                .map_err(|e| Denial::new("malformed", format!("allowed_rooms[{i}]: {e}")))
        })
        .collect()
}

/// The configured connection authorizer.
#[derive(Debug)]
pub enum Authorizer {
    /// Dev mode with nothing configured: everything is allowed.
    AllowAll,
    /// Ask the backend.
    Bootstrap(Box<BootstrapAuth>),
    /// Verify a token.
    Jwt(JwtAuth),
    /// The same rooms for everyone.
    Static {
        /// Parsed.
        rooms: Vec<Room>,
        /// As configured, for the first frame.
        json: Value,
        /// The RPC methods everyone may call.
        methods: Methods,
    },
}

impl Authorizer {
    /// Builds the authorizer the config asks for.
    pub fn from_config(config: &AuthConfig, dev: bool) -> Result<Authorizer, AuthConfigError> {
        Ok(match config.effective_method() {
            None if dev => Authorizer::AllowAll,
            None => {
                return Err(AuthConfigError::new(
                    "auth.method",
                    "no auth method configured",
                ))
            }
            Some(AuthMethod::Bootstrap) => Authorizer::Bootstrap(Box::new(BootstrapAuth::new(
                config.api_url.clone(),
                Duration::from_millis(config.bootstrap_timeout_ms),
                config.forward_headers.clone(),
            )?)),
            Some(AuthMethod::Jwt) => Authorizer::Jwt(JwtAuth::new(&config.jwt)?),
            Some(AuthMethod::Static) => {
                let json = Value::Array(config.static_rooms.clone());
                let rooms = parse_allowed_rooms(&json)
                    .map_err(|d| AuthConfigError::new("auth.static-rooms", d.detail))?;
                let methods = Methods::from_names(config.static_methods.iter().map(String::as_str));
                Authorizer::Static {
                    rooms,
                    json,
                    methods,
                }
            }
        })
    }

    /// Decides on one WebSocket upgrade request.
    pub async fn authorize(&self, request: &Parts, metrics: &Metrics) -> Result<Grant, Denial> {
        match self {
            Authorizer::AllowAll => Ok(Grant {
                permissions: Permissions::All,
                allowed_rooms: Value::Array(vec![]),
                user_id: None,
                methods: Methods::All,
            }),
            Authorizer::Bootstrap(bootstrap) => bootstrap.authorize(request, metrics).await,
            Authorizer::Jwt(jwt) => jwt.authorize(request),
            Authorizer::Static {
                rooms,
                json,
                methods,
            } => Ok(Grant {
                permissions: Permissions::Rooms(rooms.clone()),
                allowed_rooms: json.clone(),
                user_id: None,
                methods: methods.clone(),
            }),
        }
    }
}

/// The keys backends present to the publish APIs.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
    open: bool,
}

impl ApiKeys {
    /// `open` (dev mode with no keys) lets every request through.
    pub fn new(keys: &[String], dev: bool) -> Self {
        ApiKeys {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            open: dev && keys.is_empty(),
        }
    }

    /// Whether the APIs are open to anyone.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Checks a presented key in constant time against every configured key.
    pub fn check(&self, presented: Option<&[u8]>) -> bool {
        if self.open {
            return true;
        }
        let Some(presented) = presented else {
            return false;
        };
        // Compare against every key without short-circuiting, so timing says nothing about which key matched.
        self.keys.iter().fold(0u8, |found, key| {
            found | key.as_slice().ct_eq(presented).unwrap_u8()
        }) == 1
    }

    /// Extracts the key from `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    pub fn presented(headers: &http::HeaderMap) -> Option<&[u8]> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let bytes = value.as_bytes();
            if bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
                return Some(&bytes[7..]);
            }
        }
        headers.get("x-api-key").map(|v| v.as_bytes())
    }
}

/// Reads one query parameter, percent-decoded.
pub(crate) fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_compare_every_key() {
        let keys = ApiKeys::new(&["alpha".into(), "beta".into()], false);
        assert!(keys.check(Some(b"beta")));
        assert!(!keys.check(Some(b"bet")));
        assert!(!keys.check(Some(b"")));
        assert!(!keys.check(None));
        assert!(
            ApiKeys::new(&[], true).check(None),
            "dev without keys is open"
        );
        assert!(
            !ApiKeys::new(&[], false).check(Some(b"")),
            "no keys outside dev: closed"
        );
        assert!(
            !ApiKeys::new(&["k".into()], true).check(None),
            "dev with keys still checks"
        );
    }

    #[test]
    fn query_params_are_decoded() {
        let uri: http::Uri = "/ws/?a=1&token=ab%2Bc%3D&x".parse().unwrap();
        assert_eq!(query_param(&uri, "token").as_deref(), Some("ab+c="));
        assert_eq!(query_param(&uri, "x").as_deref(), Some(""));
        assert_eq!(query_param(&uri, "nope"), None);
        let uri: http::Uri = "/ws/?token=%4".parse().unwrap();
        assert_eq!(query_param(&uri, "token").as_deref(), Some("%4"));
    }
}
