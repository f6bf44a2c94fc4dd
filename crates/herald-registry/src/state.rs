//! The registry's replicated state and how each [`Request`] changes it.
//!
//! Pure and deterministic: applying the same log gives every member the same state. Every change is also
//! returned as a list of [`Change`]s tagged with its revision, which is what `Watch` streams to edges.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::types::{EdgeId, Request, Response};

/// A registered edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRecord {
    /// Where other edges reach its peer service.
    pub peer_addr: String,
    /// Its lease TTL.
    pub ttl_ms: u64,
    /// The revision at which it (last) registered.
    pub registered_at: u64,
}

/// One observable change, as streamed to watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// An edge registered.
    EdgeUp {
        /// The edge.
        edge: EdgeId,
        /// Its peer address.
        peer_addr: String,
    },
    /// An edge was removed (with all its interest; the matching `InterestRemoved` changes are implied).
    EdgeDown {
        /// The edge.
        edge: EdgeId,
    },
    /// `edge` now has local subscribers to `room`.
    InterestAdded {
        /// Canonical room JSON.
        room: String,
        /// The edge.
        edge: EdgeId,
    },
    /// `edge` no longer has local subscribers to `room`.
    InterestRemoved {
        /// Canonical room JSON.
        room: String,
        /// The edge.
        edge: EdgeId,
    },
    /// A route was added or replaced.
    RoutePut {
        /// Route name.
        name: String,
        /// Route definition (JSON text).
        route: String,
    },
    /// A route was removed.
    RouteDeleted {
        /// Route name.
        name: String,
    },
    /// A setting was set.
    SettingPut {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

/// The registry's replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    /// The revision of the last change (the raft index of the last applied entry that changed anything).
    pub revision: u64,
    /// Registered edges.
    pub edges: BTreeMap<EdgeId, EdgeRecord>,
    /// Canonical room JSON -> edges with at least one local subscriber.
    pub interest: BTreeMap<String, BTreeSet<EdgeId>>,
    /// Routes by name (JSON text).
    pub routes: BTreeMap<String, String>,
    /// Cluster settings.
    pub settings: BTreeMap<String, String>,
}

impl RegistryState {
    /// Applies one request at `revision` (its raft log index) and returns the response and what changed.
    pub fn apply(&mut self, revision: u64, request: &Request) -> (Response, Vec<Change>) {
        let mut changes = Vec::new();
        let mut response = Response {
            revision,
            unknown_edges: vec![],
        };
        match request {
            Request::RegisterEdge {
                edge,
                peer_addr,
                ttl_ms,
            } => {
                // A rejoin means the edge restarted or lost its lease: whatever it held is stale.
                if self.edges.contains_key(edge) {
                    self.remove_edge(edge, &mut changes);
                }
                self.edges.insert(
                    edge.clone(),
                    EdgeRecord {
                        peer_addr: peer_addr.clone(),
                        ttl_ms: *ttl_ms,
                        registered_at: revision,
                    },
                );
                changes.push(Change::EdgeUp {
                    edge: edge.clone(),
                    peer_addr: peer_addr.clone(),
                });
            }
            Request::RemoveEdges { edges } => {
                for edge in edges {
                    if self.edges.contains_key(edge) {
                        self.remove_edge(edge, &mut changes);
                    }
                }
            }
            Request::Interest { changes: batch } => {
                for change in batch.iter() {
                    if !self.edges.contains_key(&change.edge) {
                        if !response.unknown_edges.contains(&change.edge) {
                            response.unknown_edges.push(change.edge.clone());
                        }
                        continue;
                    }
                    for room in &change.add {
                        // Looked up before `entry`, which would copy the room string on every call.
                        let edges = match self.interest.get_mut(room) {
                            Some(edges) => edges,
                            None => self.interest.entry(room.clone()).or_default(),
                        };
                        if edges.insert(change.edge.clone()) {
                            changes.push(Change::InterestAdded {
                                room: room.clone(),
                                edge: change.edge.clone(),
                            });
                        }
                    }
                    for room in &change.remove {
                        if let Some(edges) = self.interest.get_mut(room) {
                            if edges.remove(&change.edge) {
                                changes.push(Change::InterestRemoved {
                                    room: room.clone(),
                                    edge: change.edge.clone(),
                                });
                            }
                            if edges.is_empty() {
                                self.interest.remove(room);
                            }
                        }
                    }
                }
            }
            Request::PutRoute { name, route } => {
                let route = route.to_string();
                self.routes.insert(name.clone(), route.clone());
                changes.push(Change::RoutePut {
                    name: name.clone(),
                    route,
                });
            }
            Request::DeleteRoute { name } => {
                if self.routes.remove(name).is_some() {
                    changes.push(Change::RouteDeleted { name: name.clone() });
                }
            }
            Request::PutSetting { key, value } => {
                self.settings.insert(key.clone(), value.clone());
                changes.push(Change::SettingPut {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        if !changes.is_empty() {
            self.revision = revision;
        }
        (response, changes)
    }

    fn remove_edge(&mut self, edge: &EdgeId, changes: &mut Vec<Change>) {
        self.edges.remove(edge);
        self.interest.retain(|_, edges| {
            edges.remove(edge);
            !edges.is_empty()
        });
        changes.push(Change::EdgeDown { edge: edge.clone() });
    }

    /// The whole state as changes from empty: what a new watcher receives first.
    pub fn as_changes(&self) -> Vec<Change> {
        let mut changes = Vec::new();
        for (edge, record) in &self.edges {
            changes.push(Change::EdgeUp {
                edge: edge.clone(),
                peer_addr: record.peer_addr.clone(),
            });
        }
        for (room, edges) in &self.interest {
            for edge in edges {
                changes.push(Change::InterestAdded {
                    room: room.clone(),
                    edge: edge.clone(),
                });
            }
        }
        for (name, route) in &self.routes {
            changes.push(Change::RoutePut {
                name: name.clone(),
                route: route.clone(),
            });
        }
        for (key, value) in &self.settings {
            changes.push(Change::SettingPut {
                key: key.clone(),
                value: value.clone(),
            });
        }
        changes
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::types::InterestChange;

    /// Registers `edge` (shared with the store's tests).
    pub(crate) fn register(edge: &str) -> Request {
        Request::RegisterEdge {
            edge: edge.into(),
            peer_addr: format!("{edge}:1"),
            ttl_ms: 3000,
        }
    }

    /// One edge's interest change as a request (shared with the store's tests).
    pub(crate) fn interest(edge: &str, add: &[&str], remove: &[&str]) -> Request {
        Request::Interest {
            changes: vec![InterestChange {
                edge: edge.into(),
                add: add.iter().map(|s| s.to_string()).collect(),
                remove: remove.iter().map(|s| s.to_string()).collect(),
            }]
            .into(),
        }
    }

    #[test]
    fn interest_tracks_edges_per_room() {
        let mut s = RegistryState::default();
        s.apply(1, &register("a"));
        s.apply(2, &register("b"));
        s.apply(3, &interest("a", &["r1", "r2"], &[]));
        let (_, changes) = s.apply(4, &interest("b", &["r1"], &[]));
        assert_eq!(changes.len(), 1);
        assert_eq!(s.interest["r1"].len(), 2);
        s.apply(5, &interest("a", &[], &["r1", "r2"]));
        assert_eq!(s.interest.len(), 1, "an empty room is dropped");
        assert_eq!(s.revision, 5);
    }

    #[test]
    fn removing_an_edge_removes_its_interest() {
        let mut s = RegistryState::default();
        s.apply(1, &register("a"));
        s.apply(2, &interest("a", &["r"], &[]));
        let (_, changes) = s.apply(
            3,
            &Request::RemoveEdges {
                edges: vec!["a".into(), "ghost".into()],
            },
        );
        assert_eq!(changes, vec![Change::EdgeDown { edge: "a".into() }]);
        assert!(s.interest.is_empty() && s.edges.is_empty());
    }

    #[test]
    fn interest_from_unknown_edges_is_refused_and_named() {
        let mut s = RegistryState::default();
        let (response, changes) = s.apply(1, &interest("ghost", &["r"], &[]));
        assert_eq!(response.unknown_edges, vec!["ghost".to_string()]);
        assert!(changes.is_empty());
        assert_eq!(s.revision, 0, "nothing changed");
    }

    #[test]
    fn re_registering_clears_stale_interest() {
        let mut s = RegistryState::default();
        s.apply(1, &register("a"));
        s.apply(2, &interest("a", &["r"], &[]));
        s.apply(3, &register("a"));
        assert!(s.interest.is_empty());
        assert_eq!(s.edges["a"].registered_at, 3);
    }

    #[test]
    fn replaying_changes_rebuilds_the_state() {
        let mut s = RegistryState::default();
        s.apply(1, &register("a"));
        s.apply(2, &interest("a", &["r"], &[]));
        s.apply(
            3,
            &Request::PutRoute {
                name: "x".into(),
                route: serde_json::json!({"from": "a"}),
            },
        );
        s.apply(
            4,
            &Request::PutSetting {
                key: "k".into(),
                value: "v".into(),
            },
        );
        let changes = s.as_changes();
        assert_eq!(changes.len(), 4);
        assert!(changes.contains(&Change::InterestAdded {
            room: "r".into(),
            edge: "a".into()
        }));
    }
}
