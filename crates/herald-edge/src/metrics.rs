//! Prometheus metrics, kept as plain atomics and rendered as text on `/metrics`.
//!
//! Names follow Prometheus conventions (`herald_` prefix, base units, `_total` counters). Labels take only small
//! fixed sets of values (a reason, an API); rooms, users and connection ids never become labels.

use std::fmt::Write;

use herald_telemetry::instruments::{
    write_counter as counter, write_gauge as gauge, write_histogram as histogram,
    write_labeled as labeled,
};
pub use herald_telemetry::instruments::{Counter, Gauge, Histogram, LabeledCounter};

/// Every metric an edge keeps.
#[derive(Debug)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// WebSocket connections accepted (authorized) since start.
    pub connections_accepted: Counter,
    /// Upgrades refused, by reason.
    pub connections_refused: LabeledCounter,
    /// Active subscriptions.
    pub subscriptions: Gauge,
    /// Distinct subscribed rooms.
    pub rooms: Gauge,
    /// Client messages received.
    pub messages_received: Counter,
    /// Publishes accepted by the publish APIs, by API.
    pub publishes: LabeledCounter,
    /// Frames queued to clients for deliveries.
    pub messages_delivered: Counter,
    /// Frames written to clients (all kinds).
    pub frames_sent: Counter,
    /// Deliveries dropped, by reason.
    pub messages_dropped: LabeledCounter,
    /// Connections closed for not reading fast enough.
    pub slow_consumer_disconnects: Counter,
    /// WebSocket pings sent to clients (liveness checks).
    pub pings_sent: Counter,
    /// Protocol errors answered with an error frame or a close, by kind.
    pub client_errors: LabeledCounter,
    /// Publish API requests refused, by reason.
    pub publish_errors: LabeledCounter,
    /// Bootstrap calls to the backend, by result.
    pub bootstrap_calls: LabeledCounter,
    /// Time from a publish being accepted to its frame being written to a subscriber's socket.
    pub publish_to_delivery: Histogram,
    /// Time a bootstrap call took.
    pub bootstrap_duration: Histogram,
    /// Client RPCs, by result: answered by the backend (`success`, `failed`, `timeout`) or refused by the edge
    /// (`not_allowed`, `busy`, `invalid`).
    pub rpc_calls: LabeledCounter,
    /// Time an RPC call to the backend took.
    pub rpc_duration: Histogram,
    /// Publishes forwarded to peer edges and acknowledged by them (one per peer).
    pub peer_forwards: Counter,
    /// Forwards to peer edges that were lost, by reason: the peer's queue was full, the stream broke with them
    /// sent but unacknowledged, or anything else (too large to send, the peer left the cluster).
    pub peer_forward_drops: LabeledCounter,
    /// Peer edges this edge holds a forwarding link to.
    pub peer_links: Gauge,
    /// Forwards waiting in all peer queues together.
    pub peer_queue_depth: Gauge,
    /// Publishes received from peer edges and delivered locally.
    pub peer_forwards_received: Counter,
    /// Publishes received from peer edges with a room this edge cannot parse (delivered to their other targets).
    pub peer_malformed_rooms: Counter,
    /// Admin API requests refused for a missing or wrong token.
    pub admin_refused: Counter,
    /// Series other parts of the process add (the embedded registry of `herald dev`), rendered after these.
    pub sources: ExtraSources,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: LabeledCounter::new(
                "reason",
                &["unauthorized", "origin", "bad_upgrade", "draining", "other"],
            ),
            subscriptions: Gauge::default(),
            rooms: Gauge::default(),
            messages_received: Counter::default(),
            publishes: LabeledCounter::new("api", &["http", "trigger", "grpc", "other"]),
            messages_delivered: Counter::default(),
            frames_sent: Counter::default(),
            messages_dropped: LabeledCounter::new("reason", &["slow_consumer", "closed", "other"]),
            slow_consumer_disconnects: Counter::default(),
            pings_sent: Counter::default(),
            client_errors: LabeledCounter::new(
                "kind",
                &[
                    "non_json",
                    "bad_type",
                    "no_request_id",
                    "invalid_room",
                    "room_not_found",
                    "not_subscribed",
                    "too_many_subscriptions",
                    "rate_limited",
                    "binary",
                    "too_large",
                    "invalid_utf8",
                    "protocol",
                    "idle_timeout",
                    "no_pong",
                    "other",
                ],
            ),
            publish_errors: LabeledCounter::new(
                "reason",
                &[
                    "unauthenticated",
                    "bad_request",
                    "too_large",
                    "too_many_targets",
                    "other",
                ],
            ),
            bootstrap_calls: LabeledCounter::new(
                "result",
                &[
                    "authorized",
                    "refused",
                    "malformed",
                    "timeout",
                    "unreachable",
                    "other",
                ],
            ),
            publish_to_delivery: Histogram::default(),
            bootstrap_duration: Histogram::default(),
            rpc_calls: LabeledCounter::new(
                "result",
                &[
                    "success",
                    "failed",
                    "timeout",
                    "not_allowed",
                    "busy",
                    "invalid",
                    "other",
                ],
            ),
            rpc_duration: Histogram::default(),
            peer_forwards: Counter::default(),
            peer_forward_drops: LabeledCounter::new(
                "reason",
                &["queue_full", "stream_broken", "other"],
            ),
            peer_links: Gauge::default(),
            peer_queue_depth: Gauge::default(),
            peer_forwards_received: Counter::default(),
            peer_malformed_rooms: Counter::default(),
            admin_refused: Counter::default(),
            sources: ExtraSources::default(),
        }
    }
}

/// A renderer of more series for the same `/metrics`.
type Source = Box<dyn Fn() -> String + Send + Sync>;

/// Renderers of series kept elsewhere in the process, appended to an edge's metrics.
#[derive(Default)]
pub struct ExtraSources(parking_lot::RwLock<Vec<Source>>);

impl ExtraSources {
    /// Adds a renderer (Prometheus text) whose series `/metrics` serves too.
    pub fn add(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        self.0.write().push(Box::new(render));
    }
}

impl std::fmt::Debug for ExtraSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraSources({})", self.0.read().len())
    }
}

impl Metrics {
    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let _ = writeln!(out, "# HELP herald_build_info Build information.");
        let _ = writeln!(out, "# TYPE herald_build_info gauge");
        let _ = writeln!(
            out,
            "herald_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        gauge(
            &mut out,
            "herald_connections",
            "Open WebSocket connections.",
            &self.connections,
        );
        counter(
            &mut out,
            "herald_connections_accepted_total",
            "WebSocket connections authorized since start.",
            &self.connections_accepted,
        );
        labeled(
            &mut out,
            "herald_connections_refused_total",
            "WebSocket upgrades refused, by reason.",
            &self.connections_refused,
        );
        gauge(
            &mut out,
            "herald_subscriptions",
            "Active subscriptions.",
            &self.subscriptions,
        );
        gauge(
            &mut out,
            "herald_rooms",
            "Distinct rooms with a subscription.",
            &self.rooms,
        );
        counter(
            &mut out,
            "herald_messages_received_total",
            "Messages received from WebSocket clients.",
            &self.messages_received,
        );
        labeled(
            &mut out,
            "herald_messages_published_total",
            "Publishes accepted, by API.",
            &self.publishes,
        );
        counter(
            &mut out,
            "herald_messages_delivered_total",
            "Deliveries queued to WebSocket clients.",
            &self.messages_delivered,
        );
        counter(
            &mut out,
            "herald_frames_sent_total",
            "Frames written to WebSocket clients.",
            &self.frames_sent,
        );
        labeled(
            &mut out,
            "herald_messages_dropped_total",
            "Deliveries dropped, by reason.",
            &self.messages_dropped,
        );
        counter(
            &mut out,
            "herald_slow_consumer_disconnects_total",
            "Connections closed as slow consumers: outbound queue overflow, or a ping unanswered while deliveries waited.",
            &self.slow_consumer_disconnects,
        );
        counter(
            &mut out,
            "herald_pings_sent_total",
            "WebSocket pings sent to clients by the liveness checks.",
            &self.pings_sent,
        );
        labeled(
            &mut out,
            "herald_client_errors_total",
            "Client protocol errors, by kind.",
            &self.client_errors,
        );
        labeled(
            &mut out,
            "herald_publish_errors_total",
            "Publish requests refused, by reason.",
            &self.publish_errors,
        );
        labeled(
            &mut out,
            "herald_bootstrap_requests_total",
            "Bootstrap calls to the backend, by result.",
            &self.bootstrap_calls,
        );
        histogram(
            &mut out,
            "herald_publish_to_delivery_seconds",
            "Time from accepting a publish to writing its frame to a subscriber.",
            &self.publish_to_delivery,
        );
        histogram(
            &mut out,
            "herald_bootstrap_duration_seconds",
            "Time a bootstrap call to the backend took.",
            &self.bootstrap_duration,
        );
        labeled(
            &mut out,
            "herald_rpc_requests_total",
            "Client RPCs, by result.",
            &self.rpc_calls,
        );
        histogram(
            &mut out,
            "herald_rpc_duration_seconds",
            "Time an RPC call to the backend took.",
            &self.rpc_duration,
        );
        counter(
            &mut out,
            "herald_peer_forwards_total",
            "Publishes forwarded to peer edges and acknowledged by them.",
            &self.peer_forwards,
        );
        labeled(
            &mut out,
            "herald_peer_forward_drops_total",
            "Forwards to peer edges lost, by reason.",
            &self.peer_forward_drops,
        );
        gauge(
            &mut out,
            "herald_peer_links",
            "Peer edges with a forwarding link.",
            &self.peer_links,
        );
        gauge(
            &mut out,
            "herald_peer_queue_depth",
            "Forwards waiting in the peer queues, all peers together.",
            &self.peer_queue_depth,
        );
        counter(
            &mut out,
            "herald_peer_forwards_received_total",
            "Publishes received from peer edges.",
            &self.peer_forwards_received,
        );
        counter(
            &mut out,
            "herald_peer_malformed_rooms_total",
            "Rooms in publishes from peer edges that this edge could not parse.",
            &self.peer_malformed_rooms,
        );
        counter(
            &mut out,
            "herald_admin_refused_total",
            "Admin API requests refused for a missing or wrong token.",
            &self.admin_refused,
        );
        for source in self.sources.0.read().iter() {
            out.push_str(&source());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.publish_to_delivery.observe(Duration::from_micros(50));
        m.publish_to_delivery.observe(Duration::from_millis(3));
        m.publish_to_delivery.observe(Duration::from_secs(10));
        let text = m.render();
        assert!(text.contains("herald_publish_to_delivery_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("herald_publish_to_delivery_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("herald_publish_to_delivery_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("herald_publish_to_delivery_seconds_count 3"));
    }

    #[test]
    fn unknown_label_values_count_as_other() {
        let m = Metrics::default();
        m.messages_dropped.inc("no-such-reason");
        assert_eq!(m.messages_dropped.get("other"), 1);
    }
}
