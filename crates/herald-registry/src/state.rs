//! The registry's replicated state and how each [`Request`] changes it.
//!
//! Pure and deterministic: applying the same log gives every member the same state. Every change is also
//! returned as a list of [`Change`]s tagged with its revision, which is what `Watch` streams to edges.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use herald_routes::{Endpoint, Route, RouteError, RouteTable};

use crate::types::{EdgeId, Request, Response};

/// The source endpoint named by a stored route.
fn route_source(route_json: &str) -> Option<String> {
    serde_json::from_str::<Route>(route_json)
        .ok()
        .map(|r| r.from)
}

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
    /// An endpoint was added or replaced.
    EndpointPut {
        /// Endpoint name.
        name: String,
        /// Endpoint definition (JSON text).
        endpoint: String,
    },
    /// An endpoint was removed.
    EndpointDeleted {
        /// Endpoint name.
        name: String,
    },
    /// `edge` now consumes the external source of `route`.
    SourceOwned {
        /// The route.
        route: String,
        /// The consuming edge.
        edge: EdgeId,
    },
    /// Nobody consumes the source of `route` any more (its owner left, or the route changed).
    SourceReleased {
        /// The route.
        route: String,
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
    /// Canonical room JSON -> edges with at least one local subscriber. Hashed rather than ordered: every applied
    /// change looks a room up here, and room keys share long prefixes, so ordered lookups spent most of their
    /// time comparing those prefixes (the apply is on the commit path of every member). Nothing needs rooms in
    /// order.
    pub interest: HashMap<String, BTreeSet<EdgeId>>,
    /// Routes by name (JSON text).
    pub routes: BTreeMap<String, String>,
    /// Endpoints by name (JSON text).
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// Route name -> the edge consuming its external source.
    #[serde(default)]
    pub sources: BTreeMap<String, EdgeId>,
    /// Cluster settings.
    pub settings: BTreeMap<String, String>,
}

impl RegistryState {
    /// Applies one request at `revision` (its raft log index) and returns the response and what changed.
    pub fn apply(&mut self, revision: u64, request: &Request) -> (Response, Vec<Change>) {
        let mut changes = Vec::new();
        let mut response = Response {
            revision,
            ..Response::default()
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
                let checked = serde_json::from_value::<Route>(route.clone())
                    .map_err(|e| RouteError::BadRoute {
                        route: name.clone(),
                        reason: e.to_string(),
                    })
                    .and_then(|parsed| self.route_table().with_route(name, parsed));
                match checked {
                    Err(e) => response.refused = Some(e.to_string()),
                    Ok(_) => {
                        let route = route.to_string();
                        let old = self.routes.insert(name.clone(), route.clone());
                        // A consumer of the old source must not keep consuming a source the route no longer has.
                        if old.as_deref() != Some(route.as_str()) {
                            self.release_source(name, &mut changes);
                        }
                        changes.push(Change::RoutePut {
                            name: name.clone(),
                            route,
                        });
                    }
                }
            }
            Request::DeleteRoute { name } => {
                if self.routes.remove(name).is_some() {
                    self.release_source(name, &mut changes);
                    changes.push(Change::RouteDeleted { name: name.clone() });
                }
            }
            Request::PutEndpoint { name, endpoint } => {
                let checked = serde_json::from_value::<Endpoint>(endpoint.clone())
                    .map_err(|e| RouteError::BadEndpoint {
                        name: name.clone(),
                        reason: e.to_string(),
                    })
                    .and_then(|parsed| self.route_table().with_endpoint(name, parsed));
                match checked {
                    Err(e) => response.refused = Some(e.to_string()),
                    Ok(_) => {
                        let endpoint = endpoint.to_string();
                        let old = self.endpoints.insert(name.clone(), endpoint.clone());
                        if old.as_deref() != Some(endpoint.as_str()) {
                            // Consumers of routes reading from this endpoint restart with its new definition.
                            let users: Vec<String> = self
                                .routes
                                .iter()
                                .filter(|(_, r)| route_source(r).as_deref() == Some(name.as_str()))
                                .map(|(n, _)| n.clone())
                                .collect();
                            for route in users {
                                self.release_source(&route, &mut changes);
                            }
                        }
                        changes.push(Change::EndpointPut {
                            name: name.clone(),
                            endpoint,
                        });
                    }
                }
            }
            Request::DeleteEndpoint { name } => {
                if self.endpoints.contains_key(name) {
                    match self.route_table().without_endpoint(name) {
                        Err(e) => response.refused = Some(e.to_string()),
                        Ok(_) => {
                            self.endpoints.remove(name);
                            changes.push(Change::EndpointDeleted { name: name.clone() });
                        }
                    }
                }
            }
            Request::ClaimSource { route, edge } => {
                let holder = self
                    .sources
                    .get(route)
                    .filter(|e| self.edges.contains_key(*e));
                if let Some(holder) = holder {
                    response.owner = Some(holder.clone());
                } else if !self.edges.contains_key(edge) {
                    response.unknown_edges.push(edge.clone());
                } else if !self
                    .route_table()
                    .external_sources()
                    .any(|(n, _, _)| n == route)
                {
                    response.refused = Some(format!("route {route:?} has no external source"));
                } else {
                    self.sources.insert(route.clone(), edge.clone());
                    response.owner = Some(edge.clone());
                    changes.push(Change::SourceOwned {
                        route: route.clone(),
                        edge: edge.clone(),
                    });
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
            response.changed = true;
        }
        (response, changes)
    }

    /// The routes and endpoints as a [`RouteTable`]. Entries that no longer parse (written by an older version)
    /// are left out rather than failing every later change.
    pub fn route_table(&self) -> RouteTable {
        RouteTable {
            endpoints: self
                .endpoints
                .iter()
                .filter_map(|(n, e)| Some((n.clone(), serde_json::from_str(e).ok()?)))
                .collect(),
            routes: self
                .routes
                .iter()
                .filter_map(|(n, r)| Some((n.clone(), serde_json::from_str(r).ok()?)))
                .collect(),
        }
    }

    fn release_source(&mut self, route: &str, changes: &mut Vec<Change>) {
        if self.sources.remove(route).is_some() {
            changes.push(Change::SourceReleased {
                route: route.to_owned(),
            });
        }
    }

    fn remove_edge(&mut self, edge: &EdgeId, changes: &mut Vec<Change>) {
        let held: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, owner)| *owner == edge)
            .map(|(route, _)| route.clone())
            .collect();
        for route in held {
            self.release_source(&route, changes);
        }
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
        for (name, endpoint) in &self.endpoints {
            changes.push(Change::EndpointPut {
                name: name.clone(),
                endpoint: endpoint.clone(),
            });
        }
        for (name, route) in &self.routes {
            changes.push(Change::RoutePut {
                name: name.clone(),
                route: route.clone(),
            });
        }
        for (route, edge) in &self.sources {
            changes.push(Change::SourceOwned {
                route: route.clone(),
                edge: edge.clone(),
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

    fn put_endpoint(
        s: &mut RegistryState,
        rev: u64,
        name: &str,
        def: serde_json::Value,
    ) -> Response {
        s.apply(
            rev,
            &Request::PutEndpoint {
                name: name.into(),
                endpoint: def,
            },
        )
        .0
    }

    fn put_route(s: &mut RegistryState, rev: u64, name: &str, from: &str, to: &str) -> Response {
        s.apply(
            rev,
            &Request::PutRoute {
                name: name.into(),
                route: serde_json::json!({"from": from, "to": [to]}),
            },
        )
        .0
    }

    fn claim(s: &mut RegistryState, rev: u64, route: &str, edge: &str) -> Response {
        s.apply(
            rev,
            &Request::ClaimSource {
                route: route.into(),
                edge: edge.into(),
            },
        )
        .0
    }

    /// Endpoints `in` (redis) and `out` (a room), and route `x` from one to the other, at revisions 1-3.
    fn with_route() -> RegistryState {
        let mut s = RegistryState::default();
        let redis = serde_json::json!({"kind": "redis", "url": "redis://h:1/", "channel": "c"});
        assert_eq!(put_endpoint(&mut s, 1, "in", redis).refused, None);
        let room = serde_json::json!({"kind": "room", "room": {"c": "{channel}"}});
        assert_eq!(put_endpoint(&mut s, 2, "out", room).refused, None);
        assert_eq!(put_route(&mut s, 3, "x", "in", "out").refused, None);
        s
    }

    #[test]
    fn replaying_changes_rebuilds_the_state() {
        let mut s = with_route();
        s.apply(4, &register("a"));
        s.apply(5, &interest("a", &["r"], &[]));
        claim(&mut s, 6, "x", "a");
        s.apply(
            7,
            &Request::PutSetting {
                key: "k".into(),
                value: "v".into(),
            },
        );
        let changes = s.as_changes();
        // edge, interest, 2 endpoints, route, source owner, setting.
        assert_eq!(changes.len(), 7);
        assert!(changes.contains(&Change::InterestAdded {
            room: "r".into(),
            edge: "a".into()
        }));
        assert!(changes.contains(&Change::SourceOwned {
            route: "x".into(),
            edge: "a".into()
        }));
    }

    #[test]
    fn invalid_route_tables_are_refused_inside_the_apply() {
        let mut s = with_route();
        let before = s.clone();
        let unknown = put_route(&mut s, 4, "y", "in", "nowhere");
        assert_eq!(
            unknown.refused.as_deref(),
            Some("route \"y\": unknown endpoint \"nowhere\"")
        );
        let malformed = s
            .apply(
                5,
                &Request::PutRoute {
                    name: "z".into(),
                    route: serde_json::json!({"to": "a"}),
                },
            )
            .0;
        assert!(malformed
            .refused
            .unwrap()
            .starts_with("route \"z\": invalid type"));
        let in_use = s.apply(6, &Request::DeleteEndpoint { name: "in".into() }).0;
        assert!(in_use.refused.unwrap().contains("used by route"));
        // room {c: *} -> back into the same room pattern: a cycle.
        let pattern = serde_json::json!({"kind": "room", "room": {"c": "*"}});
        assert_eq!(put_endpoint(&mut s, 7, "all-c", pattern).refused, None);
        let cycle = put_route(&mut s, 8, "loop", "all-c", "out");
        assert!(cycle.refused.unwrap().starts_with("routes form a cycle"));
        s.endpoints.remove("all-c");
        s.revision = before.revision;
        assert_eq!(s, before, "refused changes change nothing");
    }

    #[test]
    fn a_source_has_one_owner_until_its_lease_or_route_ends() {
        let mut s = with_route();
        s.apply(4, &register("a"));
        s.apply(5, &register("b"));
        assert_eq!(claim(&mut s, 6, "x", "a").owner.as_deref(), Some("a"));
        let lost = claim(&mut s, 7, "x", "b");
        assert_eq!((lost.owner.as_deref(), lost.changed), (Some("a"), false));
        // The owner's lease ends: the source is free, and the next claim wins it.
        let (_, changes) = s.apply(
            8,
            &Request::RemoveEdges {
                edges: vec!["a".into()],
            },
        );
        assert!(changes.contains(&Change::SourceReleased { route: "x".into() }));
        assert_eq!(claim(&mut s, 9, "x", "b").owner.as_deref(), Some("b"));
        // Re-pointing the route at another source releases it too.
        let other = serde_json::json!({"kind": "redis", "url": "redis://h:1/", "channel": "d"});
        put_endpoint(&mut s, 10, "in2", other);
        put_route(&mut s, 11, "x", "in2", "out");
        assert!(!s.sources.contains_key("x"));
        // Unregistered edges and routes without an external source get no grant.
        assert_eq!(claim(&mut s, 12, "x", "ghost").unknown_edges, ["ghost"]);
        assert!(claim(&mut s, 13, "nope", "b").refused.is_some());
        // Deleting the route releases its source.
        claim(&mut s, 14, "x", "b");
        let (_, changes) = s.apply(15, &Request::DeleteRoute { name: "x".into() });
        assert!(changes.contains(&Change::SourceReleased { route: "x".into() }));
    }
}
