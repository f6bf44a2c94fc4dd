//! `{"type":"status"}`: this node's counters, as High-templar's status command reported its process's.

use serde::Serialize;

use crate::request_id::RequestId;

/// A status request.
#[derive(Debug)]
pub struct Status {
    /// Echoed in the reply when present (an extension; High-templar sent none).
    pub request_id: Option<RequestId>,
}

/// The counters a status reply carries.
#[derive(Debug, Clone, Serialize)]
pub struct StatusCounters {
    /// Open WebSocket connections on this node.
    pub open_connections: u64,
    /// Distinct rooms with at least one subscription on this node.
    pub num_rooms: u64,
    /// When this node started, RFC 3339 UTC.
    pub online_since: String,
    /// Client messages received.
    pub messages_in: u64,
    /// Frames sent to clients.
    pub messages_out: u64,
    /// Deliveries dropped (slow consumers, closed connections).
    pub messages_dropped: u64,
}

impl Status {
    /// Encodes the reply.
    pub fn reply(&self, counters: &StatusCounters) -> String {
        let mut value = serde_json::to_value(counters).expect("counters serialize");
        if let (Some(id), Some(map)) = (&self.request_id, value.as_object_mut()) {
            map.insert("requestId".into(), id.to_json());
        }
        value.to_string()
    }
}
