//! The raft type configuration and the commands the registry's log carries.

use std::io::Cursor;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A registry member's raft id.
pub type NodeId = u64;

/// An edge's id: chosen by the edge, stable across its reconnects, unique in the cluster.
pub type EdgeId = String;

/// What the raft membership records about a registry member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryNode {
    /// The member's internal gRPC address (raft and registry services), `host:port`.
    pub addr: String,
}

impl std::fmt::Display for RegistryNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// herald's raft types: [`Request`] in, [`Response`] out, members addressed by [`RegistryNode`].
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = RegistryNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// One interest change from one edge: it gained its first, or lost its last, local subscriber to `room`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestChange {
    /// The edge.
    pub edge: EdgeId,
    /// Rooms (canonical JSON, see [`crate::canonical_room`]) the edge now wants.
    pub add: Vec<String>,
    /// Rooms it no longer wants.
    pub remove: Vec<String>,
}

/// A command in the registry's raft log.
///
/// Keep-alives are deliberately absent: leases are tracked in the leader's memory (and restarted in full when a
/// new leader takes over), so a healthy cluster commits nothing per heartbeat. Only registration and expiry are
/// replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// An edge joins (or rejoins) with its peer address; a rejoin clears what it held before.
    RegisterEdge {
        /// The edge.
        edge: EdgeId,
        /// Where other edges reach its peer service.
        peer_addr: String,
        /// Its lease TTL.
        ttl_ms: u64,
    },
    /// Edges whose leases expired (or that left): they and all their interest are removed.
    RemoveEdges {
        /// The edges.
        edges: Vec<EdgeId>,
    },
    /// A batch of interest changes, from one or many edges: one raft entry for many subscription changes.
    Interest {
        /// The changes, applied in order. Shared, because the log hands out copies of an entry to each follower's
        /// replication and to the state machine, and a batch holds thousands of room strings.
        changes: Arc<[InterestChange]>,
    },
    /// Adds or replaces a route (`herald_routes::Route` as JSON). Refused (see [`Response::refused`]) when the
    /// table it makes is not valid: unknown endpoints, wrong roles, a cycle.
    PutRoute {
        /// Route name.
        name: String,
        /// Route definition.
        route: serde_json::Value,
    },
    /// Adds or replaces an endpoint (`herald_routes::Endpoint` as JSON), refused like [`Request::PutRoute`].
    PutEndpoint {
        /// Endpoint name.
        name: String,
        /// Endpoint definition.
        endpoint: serde_json::Value,
    },
    /// Removes an endpoint; refused while a route uses it.
    DeleteEndpoint {
        /// Endpoint name.
        name: String,
    },
    /// `edge` asks to consume the external source of `route` (a Redis subscription, an AMQP queue). Granted when
    /// nobody live holds it, so each source has at most one consumer in the cluster; the grant lasts until the
    /// edge's lease ends or the route changes.
    ClaimSource {
        /// The route whose source is claimed.
        route: String,
        /// The claiming edge.
        edge: EdgeId,
    },
    /// Removes a route.
    DeleteRoute {
        /// Route name.
        name: String,
    },
    /// Sets a cluster setting.
    PutSetting {
        /// Setting key.
        key: String,
        /// Setting value.
        value: String,
    },
}

impl Request {
    /// The request's kind, for span names and logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::RegisterEdge { .. } => "register_edge",
            Request::RemoveEdges { .. } => "remove_edges",
            Request::Interest { .. } => "interest",
            Request::PutRoute { .. } => "put_route",
            Request::PutEndpoint { .. } => "put_endpoint",
            Request::DeleteEndpoint { .. } => "delete_endpoint",
            Request::ClaimSource { .. } => "claim_source",
            Request::DeleteRoute { .. } => "delete_route",
            Request::PutSetting { .. } => "put_setting",
        }
    }
}

/// What applying a [`Request`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    /// The revision the change was applied at (the raft log index).
    pub revision: u64,
    /// Edges named by the request that were not registered (their interest was ignored): they must register
    /// again and resend their full interest.
    pub unknown_edges: Vec<EdgeId>,
    /// Why the request changed nothing, when it was refused (an invalid route table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Whether the request changed the state (a delete of a missing name does not).
    #[serde(default)]
    pub changed: bool,
    /// For [`Request::ClaimSource`]: who holds the source after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<EdgeId>,
}
