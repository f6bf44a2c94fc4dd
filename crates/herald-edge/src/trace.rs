//! The spans of a publish, following OpenTelemetry's messaging conventions.
//!
//! One publish is one trace:
//!
//! ```text
//! publish {room keys}        producer  the ingress edge (HTTP, gRPC or a bridge source); continues the
//! │                                    caller's `traceparent`
//! ├─ process {room keys}     consumer  delivery to this edge's local subscribers (one span per edge, with
//! │                                    `herald.subscriptions_reached`, never one per socket)
//! └─ send {room keys}        producer  the forward to the peer edges that want it; its context travels in each
//!    │                                 `ForwardedPublish.traceparent` (and a bridge envelope's `traceparent`)
//!    └─ process {room keys}  consumer  on every peer edge, with that edge's subscriptions reached
//! ```
//!
//! Span names carry a *template* of the destination, never the room itself: a room's keys
//! (`{board,target}`), or `user`, `connection`, `all` for direct targets, so names stay low-cardinality.
//!
//! When spans are not exported ([`herald_telemetry::enabled`] is false) nothing here allocates unless the
//! caller sent a `traceparent`: then the ingress span exists only to put the caller's trace id on log lines,
//! and the same `traceparent` is passed on to peers and bridges unchanged.

use std::collections::BTreeSet;

use herald_telemetry::Parent;
use tracing::field::Empty;
use tracing::Span;

use crate::hub::Target;

/// The destination template of a publish's targets: each distinct room key set as `{k1,k2}`, then `user`,
/// `connection` and `all` for direct targets, space-separated.
pub(crate) fn destination_template(targets: &[Target]) -> String {
    let mut parts: BTreeSet<String> = BTreeSet::new();
    for target in targets {
        let part = match target {
            Target::Room(room) => {
                let keys: Vec<&str> = room.keys().iter().map(|k| &**k).collect();
                format!("{{{}}}", keys.join(","))
            }
            Target::User(_) => "user".into(),
            Target::Connection(_) => "connection".into(),
            Target::All => "all".into(),
        };
        parts.insert(part);
    }
    parts.into_iter().collect::<Vec<_>>().join(" ")
}

/// The ingress span of one publish and the context it continues.
#[derive(Debug)]
pub(crate) struct PublishTrace {
    span: Span,
    parent: Option<Parent>,
}

impl PublishTrace {
    /// No trace: spans are off and the caller sent no context.
    pub(crate) fn none() -> PublishTrace {
        PublishTrace {
            span: Span::none(),
            parent: None,
        }
    }

    /// Starts the ingress span for a publish that arrived through `api` (`http`, `trigger`, `grpc`, `bridge`),
    /// continuing `parent` when there is one.
    pub(crate) fn start(api: &'static str, parent: Option<Parent>) -> PublishTrace {
        if !herald_telemetry::enabled() && parent.is_none() {
            return PublishTrace::none();
        }
        let span = tracing::info_span!(
            target: "herald::publish",
            "publish",
            otel.kind = "producer",
            messaging.system = "herald",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.template = Empty,
            herald.api = api,
            trace_id = Empty,
        );
        herald_telemetry::continue_trace(&span, parent.as_ref());
        PublishTrace { span, parent }
    }

    /// Starts the ingress span from a request's headers (HTTP headers or gRPC metadata).
    pub(crate) fn from_headers(api: &'static str, headers: &http::HeaderMap) -> PublishTrace {
        PublishTrace::start(api, herald_telemetry::extract_headers(headers))
    }

    /// Names the span after its destination, once the targets are known.
    pub(crate) fn destination(&self, template: &str) {
        if self.span.is_none() {
            return;
        }
        self.span.record("messaging.destination.template", template);
        herald_telemetry::rename(&self.span, format!("publish {template}"));
    }

    /// The ingress span (entered around the work it covers).
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// The `traceparent` to pass on from `span` (a child of the ingress span): its own context when spans are
    /// exported, else the caller's unchanged.
    pub(crate) fn traceparent_from(&self, span: &Span) -> Option<String> {
        herald_telemetry::traceparent_of(span)
            .or_else(|| self.parent.as_ref().map(Parent::traceparent))
    }

    /// A child span of the ingress span, when spans are exported.
    pub(crate) fn child(&self, operation: Operation, template: &str) -> Span {
        if !herald_telemetry::enabled() || self.span.is_none() {
            return Span::none();
        }
        self.span.in_scope(|| operation.span(template))
    }
}

/// The two kinds of child span a publish has.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation {
    /// Delivery to an edge's local subscribers.
    Process,
    /// The forward to peer edges.
    Send,
}

impl Operation {
    fn span(self, template: &str) -> Span {
        match self {
            Operation::Process => tracing::info_span!(
                target: "herald::publish",
                "process",
                otel.name = format!("process {template}"),
                otel.kind = "consumer",
                messaging.system = "herald",
                messaging.operation.type = "process",
                messaging.operation.name = "deliver",
                messaging.destination.template = template,
                herald.subscriptions_reached = Empty,
                herald.origin_edge = Empty,
            ),
            Operation::Send => tracing::info_span!(
                target: "herald::publish",
                "send",
                otel.name = format!("send {template}"),
                otel.kind = "producer",
                messaging.system = "herald",
                messaging.operation.type = "send",
                messaging.operation.name = "forward",
                messaging.destination.template = template,
                herald.peers = Empty,
            ),
        }
    }
}

/// The delivery span on a peer edge for a forwarded publish carrying `traceparent`, when spans are exported.
pub(crate) fn forwarded_process_span(traceparent: &str, template: &str, origin: &str) -> Span {
    if !herald_telemetry::enabled() {
        return Span::none();
    }
    let Some(parent) = herald_telemetry::parse_traceparent(traceparent) else {
        return Span::none();
    };
    let span = Operation::Process.span(template);
    span.record("herald.origin_edge", origin);
    herald_telemetry::continue_trace(&span, Some(&parent));
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::Room;

    fn room(json: &str) -> Target {
        Target::Room(Room::from_json(&serde_json::from_str(json).unwrap()).unwrap())
    }

    #[test]
    fn templates_name_room_keys_not_values() {
        let targets = [
            room(r#"{"target":"user","user":"42"}"#),
            room(r#"{"user":"7","target":"user"}"#),
            room(r#"{"board":"b1"}"#),
            Target::User("alice".into()),
            Target::All,
        ];
        assert_eq!(
            destination_template(&targets),
            "all user {board} {target,user}"
        );
    }

    #[test]
    fn no_span_without_export_or_caller_context() {
        let trace = PublishTrace::start("http", None);
        assert!(trace.span().is_none());
        assert_eq!(trace.traceparent_from(trace.span()), None);
    }

    #[test]
    fn a_callers_context_is_passed_on_unchanged_when_not_exporting() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = PublishTrace::start("http", herald_telemetry::parse_traceparent(tp));
        let send = trace.child(Operation::Send, "{a}");
        assert!(send.is_none(), "no child spans when not exporting");
        assert_eq!(trace.traceparent_from(&send).as_deref(), Some(tp));
    }
}
