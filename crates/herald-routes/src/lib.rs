//! Routes and endpoints: araldo's relay model inside herald.
//!
//! A *route* carries every message from one source *endpoint* to one or more destination endpoints. Endpoints are
//! herald rooms, Redis Pub/Sub channels, RabbitMQ exchanges and backend webhooks. This crate is pure (no I/O), so
//! the registry can validate a route table inside its deterministic apply, the edges can run it, and
//! `herald ctl` can check a change before sending it.
//!
//! # Layout
//! - [`endpoint`]: the endpoint kinds as written under `endpoints:` in `herald.yaml`.
//! - [`route`]: routes, the [`RouteTable`] and its validation (unknown names, wrong directions, cycles).
//! - [`marshal`]: turning bytes from a broker into herald messages and back.
//! - [`template`]: rooms and channel names filled in from the message (`{channel}`, `{key}`).

pub mod endpoint;
pub mod marshal;
pub mod route;
pub mod template;

pub use endpoint::{AmqpSpec, Endpoint, ExchangeKind, RedisSpec, RoomSpec, WebhookSpec};
pub use marshal::{Decoded, Marshal, MarshalError};
pub use route::{Route, RouteError, RouteTable};

/// The longest endpoint or route name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Checks an endpoint or route name: 1 to [`MAX_NAME_LEN`] characters from `[A-Za-z0-9_.-]`, so it can appear in
/// URLs (`/admin/routes/<name>`), queue names and metric labels without escaping.
pub fn validate_name(what: &str, name: &str) -> Result<(), RouteError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RouteError::BadName {
            what: what.to_owned(),
            name: name.chars().take(80).collect(),
        })
    }
}
