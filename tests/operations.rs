//! What operators touch: health endpoints, the Prometheus metrics the README documents, and HTTP routing errors.

mod support;

use serde_json::json;
use support::*;

/// Every series the README's "Operating herald" section names.
const DOCUMENTED_SERIES: &[&str] = &[
    "herald_build_info",
    "herald_connections",
    "herald_connections_accepted_total",
    "herald_connections_refused_total",
    "herald_subscriptions",
    "herald_rooms",
    "herald_messages_received_total",
    "herald_messages_published_total",
    "herald_messages_delivered_total",
    "herald_frames_sent_total",
    "herald_messages_dropped_total",
    "herald_slow_consumer_disconnects_total",
    "herald_pings_sent_total",
    "herald_client_errors_total",
    "herald_publish_errors_total",
    "herald_bootstrap_requests_total",
    "herald_publish_to_delivery_seconds",
    "herald_bootstrap_duration_seconds",
    "herald_rpc_requests_total",
    "herald_rpc_duration_seconds",
];

#[tokio::test]
async fn metrics_expose_every_documented_series_and_count_traffic() {
    let server = start_server(&[]).await;
    // The metric reference (checked in full, both ways, against real processes by tests/metrics.rs).
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.md"
    ))
    .unwrap();
    let (status, text) =
        http_request("GET", &format!("http://{}/metrics", server.http), &[], "").await;
    assert_eq!(status, 200);
    for series in DOCUMENTED_SERIES {
        assert!(
            text.contains(&format!("# TYPE {series} ")),
            "{series} missing from /metrics"
        );
        assert!(
            readme.contains(&format!("`{series}")),
            "{series} missing from docs/metrics.md"
        );
    }
    // No room names or connection ids as labels: every label value comes from a fixed set.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("chat"), "a room leaked into a label: {line}");
    }

    let mut client = server.client().await;
    client.subscribe(json!("r"), json!({"chat": "ops"})).await;
    server
        .publish(json!({"rooms": [{"chat": "ops"}], "data": 1}))
        .await;
    client.recv_json().await;
    assert_eq!(server.metric("herald_connections").await, 1.0);
    assert_eq!(server.metric("herald_subscriptions").await, 1.0);
    assert_eq!(server.metric("herald_rooms").await, 1.0);
    assert_eq!(
        server
            .metric("herald_messages_published_total{api=\"http\"}")
            .await,
        1.0
    );
    assert_eq!(server.metric("herald_messages_delivered_total").await, 1.0);
    // The writer observed the delivery's latency once it was written.
    assert!(
        server
            .metric("herald_publish_to_delivery_seconds_count")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn health_endpoints_and_routing_errors() {
    let server = start_server(&[]).await;
    let base = format!("http://{}", server.http);
    assert_eq!(
        http_request("GET", &format!("{base}/livez"), &[], "").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http_request("GET", &format!("{base}/readyz"), &[], "").await,
        (200, "ready\n".into())
    );
    assert_eq!(
        http_request("GET", &format!("{base}/nope"), &[], "")
            .await
            .0,
        404
    );
    assert_eq!(
        http_request("POST", &format!("{base}/metrics"), &[], "")
            .await
            .0,
        405
    );
    // A plain GET on /ws/ is not an upgrade.
    assert_eq!(
        http_request("GET", &format!("{base}/ws/"), &[], "").await.0,
        426
    );
    // The edge drains cleanly with nobody connected.
    let report = server.stop().await;
    assert_eq!(report.connections_at_start, 0);
    assert_eq!(report.cut_by_deadline, 0);
}
