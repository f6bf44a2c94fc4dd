//! Drivers: how the harness talks to one kind of server.
//!
//! A driver has two halves, used in different processes:
//! - [`Driver`] + [`SubscriberClient`] in the worker processes: connect from a source address, subscribe to a
//!   room (exactly or by wildcard) and wait for the acknowledgement, then yield delivered payload headers. Workers
//!   run a single-threaded runtime, so these futures need not be `Send`.
//! - [`Publisher`] in the coordinator: open-loop publishing to one node; `publish` may return before the server
//!   acknowledges (gRPC streams) or after (HTTP), either way the payload carries its intended send time.
//!
//! Rooms are numbered `0..rooms`; each driver maps a number to its own naming (herald room objects, NATS
//! subjects, Pusher channels) and maps a wildcard subscription to a pattern matching exactly that room.

pub(crate) mod herald;
pub(crate) mod peers;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use crate::payload::Header;

/// What a subscriber read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Incoming {
    /// A delivery carrying a load-test header.
    Payload(Header),
    /// The server closed the connection (with its close code when it sent one).
    Closed(Option<u16>),
    /// Anything else: pongs, acknowledgements, frames without a header.
    Other,
}

/// A connected subscriber.
pub(crate) trait SubscriberClient: Sized + 'static {
    /// Subscribes to `room` and waits until the server acknowledges it.
    fn subscribe(&mut self, room: u32, wildcard: bool) -> impl Future<Output = anyhow::Result<()>>;
    /// The next thing the server sent. Not cancel-safe: never race it in `select!`.
    fn recv(&mut self) -> impl Future<Output = anyhow::Result<Incoming>>;
}

/// Opens subscriber connections to one kind of server.
pub(crate) trait Driver: Sized + 'static {
    type Client: SubscriberClient;
    /// Connects to the node at `addr` from `source`, returning once the server has accepted the client (for
    /// herald: the `is_authorized: true` frame).
    fn connect(
        &self,
        addr: SocketAddr,
        source: IpAddr,
    ) -> impl Future<Output = anyhow::Result<Self::Client>>;
}

/// One publisher's connection to one node.
pub(crate) trait Publisher: Send + 'static {
    /// Publishes `data` (a JSON string from [`crate::payload::encode`]) to `room`.
    fn publish(
        &mut self,
        room: u32,
        data: Vec<u8>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Ends publishing; returns the count the server says it accepted, when the API says.
    fn finish(self) -> impl Future<Output = anyhow::Result<Option<u64>>> + Send;
}
