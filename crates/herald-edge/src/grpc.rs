//! `herald.v1.Publisher` over gRPC: `Publish` and the client-streaming `PublishStream`.
//!
//! Requests carry the API key in `authorization: Bearer <key>` or `x-api-key` metadata. Errors map to gRPC codes
//! explicitly: a bad key is `UNAUTHENTICATED`, a malformed request `INVALID_ARGUMENT`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use herald_proto::v1::publisher_server::Publisher;
use herald_proto::v1::{scalar, target, PublishReply, PublishRequest, PublishStreamReply};
use herald_protocol::Room;
use herald_telemetry::Parent;

use crate::hub::{PublishOutcome, Target};
use crate::publish::PublishError;
use crate::server::State;
use crate::trace::PublishTrace;

/// The gRPC publish service.
#[derive(Debug, Clone)]
pub struct PublisherService {
    state: Arc<State>,
}

impl PublisherService {
    pub(crate) fn new(state: Arc<State>) -> Self {
        PublisherService { state }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let metadata = request.metadata();
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::as_bytes)
            .or_else(|| metadata.get("x-api-key").map(|v| v.as_bytes()));
        if self.state.api_keys.check(presented) {
            Ok(())
        } else {
            Err(self.refuse(PublishError::Unauthenticated))
        }
    }

    fn refuse(&self, error: PublishError) -> Status {
        self.state.metrics.publish_errors.inc(error.metric_reason());
        tracing::info!(cause = %error, api = "grpc", "publish refused");
        error.to_status()
    }

    /// Publishes one request, in a span continuing `parent` (the call's `traceparent` metadata).
    fn apply(
        &self,
        request: PublishRequest,
        parent: Option<Parent>,
    ) -> Result<PublishOutcome, Status> {
        let trace = PublishTrace::start("grpc", parent);
        let _entered = trace.span().enter();
        let (targets, data) = convert(request, self.state.config.limits.max_rooms_per_publish)
            .map_err(|e| self.refuse(e))?;
        let outcome = self.state.publish_traced(&targets, data, &trace);
        self.state.metrics.publishes.inc("grpc");
        Ok(outcome)
    }
}

/// Checks a request and turns it into hub targets and JSON data.
fn convert(request: PublishRequest, limit: usize) -> Result<(Vec<Target>, Bytes), PublishError> {
    if request.targets.is_empty() {
        return Err(PublishError::NoTargets);
    }
    if request.targets.len() > limit {
        return Err(PublishError::TooManyTargets(limit));
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&request.data_json).is_err() {
        return Err(PublishError::BadRequest(
            "data_json is not valid JSON".into(),
        ));
    }
    let targets = request
        .targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t.kind {
            Some(target::Kind::Room(room)) => room_from_proto(room.fields)
                .map(Target::Room)
                .map_err(|e| PublishError::BadRequest(format!("targets[{i}]: {e}"))),
            Some(target::Kind::UserId(user)) => Ok(Target::User(user)),
            Some(target::Kind::ConnectionId(id)) => Ok(Target::Connection(id)),
            Some(target::Kind::All(true)) => Ok(Target::All),
            Some(target::Kind::All(false)) | None => {
                Err(PublishError::BadRequest(format!("targets[{i}] is empty")))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok((targets, Bytes::from(request.data_json)))
}

fn room_from_proto(
    fields: impl IntoIterator<Item = (String, herald_proto::v1::Scalar)>,
) -> Result<Room, String> {
    let mut map = Map::new();
    for (key, value) in fields.into_iter().collect::<BTreeMap<_, _>>() {
        let json = match value.kind {
            Some(scalar::Kind::StringValue(s)) => Value::String(s),
            Some(scalar::Kind::IntValue(i)) => Value::from(i),
            Some(scalar::Kind::DoubleValue(f)) => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("room key {key:?} is not a finite number"))?,
            Some(scalar::Kind::BoolValue(b)) => Value::Bool(b),
            Some(scalar::Kind::NullValue(_)) => Value::Null,
            None => return Err(format!("room key {key:?} has no value")),
        };
        map.insert(key, json);
    }
    Room::from_map(&map).map_err(|e| e.to_string())
}

#[tonic::async_trait]
impl Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishReply>, Status> {
        self.authenticate(&request)?;
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let outcome = self.apply(request.into_inner(), parent)?;
        Ok(Response::new(PublishReply {
            subscriptions_reached: outcome.subscriptions_reached,
            connections_reached: outcome.connections_reached,
        }))
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishStreamReply>, Status> {
        self.authenticate(&request)?;
        // The stream's context is the parent of each publish on it: one trace per publish.
        let parent = herald_telemetry::extract_headers(request.metadata().as_ref());
        let mut stream = request.into_inner();
        let mut reply = PublishStreamReply::default();
        while let Some(message) = stream.next().await {
            let outcome = self.apply(message?, parent.clone())?;
            reply.published += 1;
            reply.subscriptions_reached += outcome.subscriptions_reached;
            reply.connections_reached += outcome.connections_reached;
        }
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::v1::{Room as ProtoRoom, Scalar, Target as ProtoTarget};

    fn room_target(fields: &[(&str, scalar::Kind)]) -> ProtoTarget {
        ProtoTarget {
            kind: Some(target::Kind::Room(ProtoRoom {
                fields: fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Scalar {
                                kind: Some(v.clone()),
                            },
                        )
                    })
                    .collect(),
            })),
        }
    }

    #[test]
    fn proto_rooms_keep_their_types() {
        let request = PublishRequest {
            targets: vec![room_target(&[
                ("a", scalar::Kind::StringValue("1".into())),
                ("b", scalar::Kind::IntValue(1)),
            ])],
            data_json: b"{}".to_vec(),
        };
        let (targets, _) = convert(request, 10).unwrap();
        let Target::Room(room) = &targets[0] else {
            panic!()
        };
        assert_eq!(room.to_json(), serde_json::json!({"a": "1", "b": 1}));
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        let bad_json = PublishRequest {
            targets: vec![ProtoTarget {
                kind: Some(target::Kind::All(true)),
            }],
            data_json: b"{nope".to_vec(),
        };
        assert!(matches!(
            convert(bad_json, 10),
            Err(PublishError::BadRequest(_))
        ));
        let empty = PublishRequest {
            targets: vec![],
            data_json: b"1".to_vec(),
        };
        assert_eq!(convert(empty, 10).unwrap_err(), PublishError::NoTargets);
        let many = PublishRequest {
            targets: vec![
                ProtoTarget {
                    kind: Some(target::Kind::All(true))
                };
                3
            ],
            data_json: b"1".to_vec(),
        };
        assert_eq!(
            convert(many, 2).unwrap_err(),
            PublishError::TooManyTargets(2)
        );
        let hollow = PublishRequest {
            targets: vec![room_target(&[])],
            data_json: b"1".to_vec(),
        };
        assert!(convert(hollow, 2).is_ok(), "the empty room {{}} is a room");
        let no_kind = PublishRequest {
            targets: vec![ProtoTarget { kind: None }],
            data_json: b"1".to_vec(),
        };
        assert!(matches!(
            convert(no_kind, 2),
            Err(PublishError::BadRequest(_))
        ));
    }
}
