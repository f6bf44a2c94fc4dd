//! The edge's local read replica of the registry: which edges exist and which rooms each has subscribers for.
//!
//! It is fed by the registry's `Watch` stream (a snapshot, then deltas, each with a revision) and answers the
//! publish path's one question — *which other edges want this room?* — with the same wildcard rule as local
//! delivery, through the same [`RoomIndex`]. Publishing reads only this replica, never the registry, so it keeps
//! working while the registry elects a leader or is down.

use std::collections::{BTreeSet, HashMap, HashSet};

use herald_protocol::{Room, RoomIndex};
use herald_registry::{Change, EdgeId};

/// A replica of the registry's edges and interest.
#[derive(Debug, Default)]
pub struct ClusterView {
    revision: u64,
    edges: HashMap<EdgeId, String>,
    interest: RoomIndex<BTreeSet<EdgeId>>,
    /// edge -> its rooms (canonical), so an edge going down removes its interest without a scan.
    rooms_of: HashMap<EdgeId, HashSet<String>>,
    /// Changes that named a room this replica could not parse (a registry bug or a newer version).
    pub malformed: u64,
}

impl ClusterView {
    /// An empty replica at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The revision of the last applied change: a reconnecting watcher resumes after it.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Registered edges and their peer addresses.
    pub fn edges(&self) -> &HashMap<EdgeId, String> {
        &self.edges
    }

    /// Replaces everything with a snapshot taken at `revision`.
    pub fn reset(&mut self, revision: u64, snapshot: &[Change]) {
        *self = ClusterView {
            malformed: self.malformed,
            ..ClusterView::default()
        };
        self.apply(revision, snapshot);
    }

    /// Applies the changes made at `revision`. Revisions at or below the current one were already applied (a
    /// resumed watch may repeat the last event) and are ignored.
    pub fn apply(&mut self, revision: u64, changes: &[Change]) {
        if revision <= self.revision && revision != 0 {
            return;
        }
        for change in changes {
            match change {
                Change::EdgeUp { edge, peer_addr } => {
                    self.edges.insert(edge.clone(), peer_addr.clone());
                }
                Change::EdgeDown { edge } => {
                    self.edges.remove(edge);
                    for room in self.rooms_of.remove(edge).unwrap_or_default() {
                        self.unlink(&room, edge);
                    }
                }
                Change::InterestAdded { room, edge } => match parse(room) {
                    Some(parsed) => {
                        self.interest
                            .get_or_insert_with(&parsed, BTreeSet::new)
                            .insert(edge.clone());
                        self.rooms_of
                            .entry(edge.clone())
                            .or_default()
                            .insert(room.clone());
                    }
                    None => {
                        self.malformed += 1;
                        tracing::warn!(room = %room, "registry sent a room this edge cannot parse");
                    }
                },
                Change::InterestRemoved { room, edge } => {
                    if let Some(rooms) = self.rooms_of.get_mut(edge) {
                        rooms.remove(room);
                    }
                    self.unlink(room, edge);
                }
                // Routes and settings are the bridges' and operators' business; the publish path ignores them.
                Change::RoutePut { .. }
                | Change::RouteDeleted { .. }
                | Change::EndpointPut { .. }
                | Change::EndpointDeleted { .. }
                | Change::SourceOwned { .. }
                | Change::SourceReleased { .. }
                | Change::SettingPut { .. } => {}
            }
        }
        self.revision = self.revision.max(revision);
    }

    fn unlink(&mut self, room: &str, edge: &EdgeId) {
        let Some(parsed) = parse(room) else { return };
        if let Some(edges) = self.interest.get_mut(&parsed) {
            edges.remove(edge);
            if edges.is_empty() {
                self.interest.remove(&parsed);
            }
        }
    }

    /// The other edges (and their peer addresses) with subscribers matching any of `rooms`, each once.
    pub fn peers_for<'a>(
        &self,
        rooms: impl IntoIterator<Item = &'a Room>,
        this_edge: &str,
    ) -> Vec<(EdgeId, String)> {
        let mut wanted: BTreeSet<EdgeId> = BTreeSet::new();
        for room in rooms {
            self.interest.for_each_match(room, |_, edges| {
                wanted.extend(edges.iter().filter(|e| e.as_str() != this_edge).cloned())
            });
        }
        wanted
            .into_iter()
            .filter_map(|edge| {
                let addr = self.edges.get(&edge)?.clone();
                Some((edge, addr))
            })
            .collect()
    }
}

fn parse(room: &str) -> Option<Room> {
    let value: serde_json::Value = serde_json::from_str(room).ok()?;
    Room::from_json(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn up(edge: &str) -> Change {
        Change::EdgeUp {
            edge: edge.into(),
            peer_addr: format!("127.0.0.1:{}", edge.len()),
        }
    }

    fn added(room: serde_json::Value, edge: &str) -> Change {
        Change::InterestAdded {
            room: room.to_string(),
            edge: edge.into(),
        }
    }

    fn room(v: serde_json::Value) -> Room {
        Room::from_json(&v).unwrap()
    }

    fn peers(view: &ClusterView, r: serde_json::Value) -> Vec<String> {
        view.peers_for([&room(r)], "self")
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    #[test]
    fn wildcards_match_across_edges_like_locally() {
        let mut view = ClusterView::new();
        view.apply(
            1,
            &[
                up("a"),
                up("b"),
                up("self"),
                added(json!({"c": "*"}), "a"),
                added(json!({"c": "1"}), "b"),
                added(json!({"c": "1"}), "self"),
            ],
        );
        assert_eq!(peers(&view, json!({"c": "1"})), vec!["a", "b"]);
        assert_eq!(peers(&view, json!({"c": "2"})), vec!["a"]);
        assert_eq!(peers(&view, json!({"c": "*"})), vec!["a", "b"]);
        assert!(peers(&view, json!({"d": "1"})).is_empty());
    }

    #[test]
    fn an_edge_going_down_takes_its_interest_along() {
        let mut view = ClusterView::new();
        view.apply(1, &[up("a"), added(json!({"r": 1}), "a")]);
        view.apply(2, &[Change::EdgeDown { edge: "a".into() }]);
        assert!(peers(&view, json!({"r": 1})).is_empty());
        assert!(view.edges().is_empty());
        assert_eq!(view.revision(), 2);
    }

    #[test]
    fn repeated_revisions_are_ignored_and_reset_replaces_everything() {
        let mut view = ClusterView::new();
        view.apply(5, &[up("a"), added(json!({"r": 1}), "a")]);
        view.apply(5, &[Change::EdgeDown { edge: "a".into() }]);
        assert_eq!(
            peers(&view, json!({"r": 1})),
            vec!["a"],
            "revision 5 was already applied"
        );
        view.reset(9, &[up("b"), added(json!({"r": 2}), "b")]);
        assert!(peers(&view, json!({"r": 1})).is_empty());
        assert_eq!(peers(&view, json!({"r": 2})), vec!["b"]);
        assert_eq!(view.revision(), 9);
    }

    #[test]
    fn unparseable_rooms_are_counted_not_fatal() {
        let mut view = ClusterView::new();
        view.apply(
            1,
            &[
                up("a"),
                Change::InterestAdded {
                    room: "not json".into(),
                    edge: "a".into(),
                },
            ],
        );
        assert_eq!(view.malformed, 1);
    }
}
