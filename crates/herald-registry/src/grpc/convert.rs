//! Conversions between the registry's [`Change`]s and the `herald.v1` protobuf messages that carry them in
//! `Watch`.
//!
//! Both directions live here, so the server ([`crate::grpc::registry_service`]) and the client
//! ([`crate::client`]) cannot drift apart.

use herald_proto::v1 as pb;
use herald_proto::v1::change::Kind;

use crate::state::Change;
use crate::store::WatchEvent;

/// A `Change` message without a kind: sent by a peer on a newer protocol, or corrupted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a watch change has no kind (a newer registry, or a corrupt message)")]
pub struct EmptyChange;

/// A registry change as its protobuf message.
pub fn change_to_proto(change: &Change) -> pb::Change {
    let kind = match change {
        Change::EdgeUp { edge, peer_addr } => Kind::EdgeUp(pb::EdgeUp {
            edge: edge.clone(),
            peer_addr: peer_addr.clone(),
        }),
        Change::EdgeDown { edge } => Kind::EdgeDown(edge.clone()),
        Change::InterestAdded { room, edge } => Kind::InterestAdded(pb::RoomEdge {
            room: room.clone(),
            edge: edge.clone(),
        }),
        Change::InterestRemoved { room, edge } => Kind::InterestRemoved(pb::RoomEdge {
            room: room.clone(),
            edge: edge.clone(),
        }),
        Change::RoutePut { name, route } => Kind::RoutePut(pb::Route {
            name: name.clone(),
            route_json: route.clone(),
        }),
        Change::RouteDeleted { name } => Kind::RouteDeleted(name.clone()),
        Change::EndpointPut { name, endpoint } => Kind::EndpointPut(pb::NamedEndpoint {
            name: name.clone(),
            endpoint_json: endpoint.clone(),
        }),
        Change::EndpointDeleted { name } => Kind::EndpointDeleted(name.clone()),
        Change::SourceOwned { route, edge } => Kind::SourceOwned(pb::SourceOwner {
            route: route.clone(),
            edge: edge.clone(),
        }),
        Change::SourceReleased { route } => Kind::SourceReleased(route.clone()),
        Change::SettingPut { key, value } => Kind::SettingPut(pb::Setting {
            key: key.clone(),
            value: value.clone(),
        }),
    };
    pb::Change { kind: Some(kind) }
}

/// A protobuf change as the registry's [`Change`].
pub fn change_from_proto(change: pb::Change) -> Result<Change, EmptyChange> {
    Ok(match change.kind.ok_or(EmptyChange)? {
        Kind::EdgeUp(up) => Change::EdgeUp {
            edge: up.edge,
            peer_addr: up.peer_addr,
        },
        Kind::EdgeDown(edge) => Change::EdgeDown { edge },
        Kind::InterestAdded(re) => Change::InterestAdded {
            room: re.room,
            edge: re.edge,
        },
        Kind::InterestRemoved(re) => Change::InterestRemoved {
            room: re.room,
            edge: re.edge,
        },
        Kind::RoutePut(route) => Change::RoutePut {
            name: route.name,
            route: route.route_json,
        },
        Kind::RouteDeleted(name) => Change::RouteDeleted { name },
        Kind::EndpointPut(endpoint) => Change::EndpointPut {
            name: endpoint.name,
            endpoint: endpoint.endpoint_json,
        },
        Kind::EndpointDeleted(name) => Change::EndpointDeleted { name },
        Kind::SourceOwned(owner) => Change::SourceOwned {
            route: owner.route,
            edge: owner.edge,
        },
        Kind::SourceReleased(route) => Change::SourceReleased { route },
        Kind::SettingPut(setting) => Change::SettingPut {
            key: setting.key,
            value: setting.value,
        },
    })
}

/// A delta event (`snapshot: false`) as sent to watchers.
pub fn event_to_proto(event: &WatchEvent) -> pb::WatchEvent {
    pb::WatchEvent {
        revision: event.revision,
        snapshot: false,
        changes: event.changes.iter().map(change_to_proto).collect(),
    }
}

/// A whole state at `revision` (see [`crate::RegistryState::as_changes`]) as a snapshot event.
pub fn snapshot_to_proto(revision: u64, changes: &[Change]) -> pb::WatchEvent {
    pb::WatchEvent {
        revision,
        snapshot: true,
        changes: changes.iter().map(change_to_proto).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_round_trips() {
        let changes = vec![
            Change::EdgeUp {
                edge: "e".into(),
                peer_addr: "h:1".into(),
            },
            Change::EdgeDown { edge: "e".into() },
            Change::InterestAdded {
                room: "{\"a\":1}".into(),
                edge: "e".into(),
            },
            Change::InterestRemoved {
                room: "{\"a\":1}".into(),
                edge: "e".into(),
            },
            Change::RoutePut {
                name: "r".into(),
                route: "{}".into(),
            },
            Change::RouteDeleted { name: "r".into() },
            Change::EndpointPut {
                name: "e".into(),
                endpoint: "{}".into(),
            },
            Change::EndpointDeleted { name: "e".into() },
            Change::SourceOwned {
                route: "r".into(),
                edge: "a".into(),
            },
            Change::SourceReleased { route: "r".into() },
            Change::SettingPut {
                key: "k".into(),
                value: "v".into(),
            },
        ];
        for change in changes {
            assert_eq!(change_from_proto(change_to_proto(&change)), Ok(change));
        }
        assert_eq!(
            change_from_proto(pb::Change { kind: None }),
            Err(EmptyChange)
        );
    }
}
