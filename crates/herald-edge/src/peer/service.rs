//! The receiving side of edge-to-edge forwarding: `herald.v1.PeerInternal`.
//!
//! Each batch's publishes are delivered to this edge's local subscribers, in order, with the same
//! [`Hub::publish`](crate::hub::Hub::publish) a local publish uses — and never forwarded again, so a publish
//! crosses the cluster in exactly one hop and cannot loop. Each batch is then acknowledged by its last sequence
//! number.
//!
//! Acks are produced by mapping the request stream, so the next batch is read only when tonic polls for the next
//! ack: a sender that stops reading acks is pushed back on through HTTP/2 flow control, with nothing buffered
//! here.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use herald_proto::v1::peer_internal_server::{PeerInternal, PeerInternalServer};
use herald_proto::v1::{ForwardAck, ForwardBatch, ForwardedPublish};
use herald_protocol::Room;
use herald_registry::grpc::{ClusterSecret, SecretCheck};

use crate::hub::Target;
use crate::metrics::Metrics;
use crate::server::State;
use crate::trace::{destination_template, forwarded_process_span};

/// The peer service as served: behind the cluster secret.
pub(crate) type PeerServer = InterceptedService<PeerInternalServer<PeerService>, SecretCheck>;

/// The peer service for `state`'s hub, refusing calls without `secret` and messages over `max_message_bytes`.
pub(crate) fn peer_server(
    state: Arc<State>,
    secret: ClusterSecret,
    max_message_bytes: usize,
) -> PeerServer {
    let server = PeerInternalServer::new(PeerService { state })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    InterceptedService::new(server, SecretCheck::new(secret))
}

/// Delivers forwarded publishes locally.
#[derive(Debug, Clone)]
pub(crate) struct PeerService {
    state: Arc<State>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ForwardAck, Status>> + Send>>;

#[tonic::async_trait]
impl PeerInternal for PeerService {
    type ForwardStream = AckStream;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let remote = request.remote_addr();
        tracing::debug!(?remote, "forward stream from a peer edge");
        let state = self.state.clone();
        let acks = request.into_inner().map(move |batch| {
            let batch = batch?;
            Ok(deliver(&state, batch))
        });
        Ok(Response::new(Box::pin(acks)))
    }
}

/// Delivers one batch in order and acknowledges it.
fn deliver(state: &State, batch: ForwardBatch) -> ForwardAck {
    let mut ack = ForwardAck::default();
    for mut publish in batch.publishes {
        let seq = publish.seq;
        let traceparent = std::mem::take(&mut publish.traceparent);
        let (targets, data) = targets(publish, &batch.origin_edge, &state.metrics);
        // This edge's delivery span, joining the publish's trace (nothing unless spans are exported).
        let span = if traceparent.is_empty() {
            tracing::Span::none()
        } else {
            forwarded_process_span(
                &traceparent,
                &destination_template(&targets),
                &batch.origin_edge,
            )
        };
        let outcome = span.in_scope(|| state.hub.publish(&targets, data));
        span.record(
            "herald.subscriptions_reached",
            outcome.subscriptions_reached,
        );
        state.metrics.peer_forwards_received.inc();
        ack.through_seq = seq;
        ack.subscriptions_reached += outcome.subscriptions_reached;
    }
    ack
}

/// A forwarded publish's targets and data. Rooms that do not parse (a bug, or a newer peer) are counted, logged
/// and skipped; the publish still reaches its other targets.
fn targets(publish: ForwardedPublish, origin: &str, metrics: &Metrics) -> (Vec<Target>, Bytes) {
    let mut targets = Vec::with_capacity(
        publish.rooms.len() + publish.users.len() + publish.connections.len() + 1,
    );
    for room in &publish.rooms {
        match parse_room(room) {
            Some(room) => targets.push(Target::Room(room)),
            None => {
                metrics.peer_malformed_rooms.inc();
                tracing::warn!(origin, room = %room, "peer forwarded a room this edge cannot parse");
            }
        }
    }
    targets.extend(publish.users.into_iter().map(Target::User));
    targets.extend(publish.connections.into_iter().map(Target::Connection));
    if publish.all {
        targets.push(Target::All);
    }
    (targets, publish.data_json)
}

fn parse_room(canonical: &str) -> Option<Room> {
    let value: serde_json::Value = serde_json::from_str(canonical).ok()?;
    Room::from_json(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_rooms_are_counted_and_skipped_not_fatal() {
        let metrics = Metrics::default();
        let publish = ForwardedPublish {
            seq: 7,
            rooms: vec![
                r#"{"a":"1"}"#.into(),
                "not json".into(),
                r#"{"nested":{"x":1}}"#.into(),
                "[]".into(),
            ],
            data_json: Bytes::from_static(b"{}"),
            users: vec!["u".into()],
            connections: vec!["c".into()],
            all: true,
            traceparent: String::new(),
        };
        let (targets, data) = targets(publish, "origin", &metrics);
        assert_eq!(metrics.peer_malformed_rooms.get(), 3);
        assert_eq!(data, Bytes::from_static(b"{}"));
        assert_eq!(targets.len(), 4);
        assert!(matches!(&targets[0], Target::Room(r) if r.canonical_json() == r#"{"a":"1"}"#));
        assert!(matches!(&targets[1], Target::User(u) if u == "u"));
        assert!(matches!(&targets[2], Target::Connection(c) if c == "c"));
        assert!(matches!(&targets[3], Target::All));
    }
}
