//! herald's registry: a raft group (openraft 0.9) that replicates which edges exist (with leases), which rooms
//! each edge has local subscribers for, routes and cluster settings.
//!
//! The registry never sees individual connections or messages: edges report only the first subscriber to a room
//! arriving and the last one leaving, in batches, and publishes travel edge to edge without touching raft.
//!
//! # Layout
//! - [`types`]: the raft `TypeConfig` and the log's [`Request`] / [`Response`].
//! - [`state`]: the replicated state and how each request changes it (pure, deterministic).
//! - [`store`]: durable raft storage: the log and vote in segment files, the state machine with snapshots.
//! - [`network`]: openraft's network over gRPC: how a member sends raft RPCs to the others.
//! - [`grpc`]: the internal gRPC services (raft between members; the registry service for edges and
//!   `herald ctl`), behind the cluster secret.
//! - [`leases`]: edge leases, in the leader's memory only.
//! - [`batcher`]: group commit of many edges' interest updates into one raft entry.
//! - [`node`]: a running member: store, raft, both services on one listener, bootstrap, leader duties.
//! - [`client`]: [`RegistryClient`], what edges and `herald ctl` call the registry with.
//! - [`canonical_room`]: the one room spelling interest is keyed by.

pub mod batcher;
pub mod client;
pub mod grpc;
mod http;
pub mod leases;
pub mod metrics;
pub mod network;
pub mod node;
pub mod state;
pub mod store;
pub mod types;

pub use client::{
    ClientError, InterestOutcome, InterestUpdates, KeepAliveOutcome, RegistryClient, WatchStream,
    WatchUpdate,
};
pub use grpc::ClusterSecret;
pub use node::{run, start, RegistryConfig, RegistryError, RegistryHandle};
pub use state::{Change, RegistryState};
pub use types::{EdgeId, InterestChange, NodeId, RegistryNode, Request, Response, TypeConfig};

/// The canonical JSON text of a room (keys sorted, values as parsed), so every edge spells a room the same way.
pub fn canonical_room(room: &herald_protocol::Room) -> String {
    room.canonical_json()
}
