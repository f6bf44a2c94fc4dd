//! OpenTelemetry traces from real `herald` processes, received by a real OTLP/gRPC trace service served inside
//! this test (the `opentelemetry-proto` types on tonic, the same wire an OpenTelemetry Collector speaks).
//!
//! One publish across two edges must be one connected trace: the backend's `traceparent` is the parent of the
//! ingress `publish` span on edge A, whose children are A's local delivery (`process`) and the forward (`send`),
//! and the `process` span on edge B is the child of that `send` span, with B's subscriptions reached.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use serde_json::{json, Value};
use support::procs::{free_port, Dir, Proc};
use support::*;
use tokio::net::TcpListener;

const SECRET: &str = "tracing-test-secret-0123456789";
/// The backend's trace: what its `traceparent` header carries.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const BACKEND_SPAN: &str = "00f067aa0ba902b7";

/// One received span, flattened: which node sent it and the fields the assertions look at.
#[derive(Debug, Clone)]
struct Span {
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    kind: i32,
    attributes: HashMap<String, String>,
}

/// The OTLP trace and metrics services: keeps every span and every metric it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    /// Metric name -> the node that sent it and its last data.
    metrics: Arc<Mutex<HashMap<(String, String), metric::Data>>>,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().unwrap();
        for resource_metrics in request.into_inner().resource_metrics {
            let resource = resource_metrics
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let node = resource
                .get("service.instance.id")
                .cloned()
                .unwrap_or_default();
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    if let Some(data) = metric.data {
                        metrics.insert((node.clone(), metric.name), data);
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let node = resource
                .get("service.instance.id")
                .cloned()
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        node: node.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a loopback port; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        let metrics = MetricsServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .add_service(metrics)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn spans_of(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

struct Nodes {
    _registry: Proc,
    edges: Vec<Proc>,
    logs: Vec<std::path::PathBuf>,
    _data: Dir,
}

/// One registry member and two edges exporting spans to `endpoint`, with JSON logs at `rust_log` kept in files.
fn start_nodes(endpoint: &str, rust_log: &str) -> Nodes {
    let data = Dir::new("tracing");
    let port = free_port();
    let registry = Proc::spawn_with(
        &[
            "registry".into(),
            "--node-id".into(),
            "1".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data.0.join("r1").display().to_string(),
            "--cluster-secret".into(),
            SECRET.into(),
            "--otlp-endpoint".into(),
            endpoint.into(),
        ],
        &[
            ("RUST_LOG", "info".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
        None,
    );
    let mut edges = Vec::new();
    let mut logs = Vec::new();
    for name in ["edge-a", "edge-b"] {
        let log = data.0.join(format!("{name}.log"));
        edges.push(Proc::spawn_with(
            &[
                "dev".into(),
                "--port".into(),
                "0".into(),
                "--grpc-port".into(),
                "0".into(),
                "--set".into(),
                format!("cluster.registry=127.0.0.1:{port}"),
                "--set".into(),
                format!("cluster.secret={SECRET}"),
                "--set".into(),
                "cluster.peer-port=0".into(),
                "--set".into(),
                format!("cluster.edge-id={name}"),
                "--set".into(),
                format!("auth.api-keys={API_KEY}"),
                "--set".into(),
                format!("telemetry.otlp-endpoint={endpoint}"),
                "--set".into(),
                "log-format=json".into(),
            ],
            &[
                ("RUST_LOG", rust_log.into()),
                // Export span batches every 100 ms instead of every 5 s and metrics every 200 ms instead of
                // every 60 s, so the test does not wait.
                ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
                ("OTEL_METRIC_EXPORT_INTERVAL", "200".into()),
            ],
            Some(&log),
        ));
        logs.push(log);
    }
    Nodes {
        _registry: registry,
        edges,
        logs,
        _data: data,
    }
}

async fn client(edge: &Proc) -> WsClient {
    let mut client = WsClient::connect(&format!("ws://{}/ws/", edge.field("http")), &[]).await;
    assert_eq!(client.recv_json().await["is_authorized"], true);
    client
}

async fn publish(edge: &Proc, body: Value, traceparent: &str) -> (u16, String) {
    http_request(
        "POST",
        &format!("http://{}/api/v1/publish", edge.field("http")),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {API_KEY}")),
            ("traceparent", traceparent),
        ],
        body.to_string(),
    )
    .await
}

/// A `traceparent` for a new trace id derived from `n`, with the backend's span as parent.
fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-{BACKEND_SPAN}-01")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publish_across_two_edges_is_one_connected_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    // Logs at warn: the log filter must not turn spans off.
    let nodes = start_nodes(&endpoint, "warn");
    let (a, b) = (&nodes.edges[0], &nodes.edges[1]);
    let room = json!({"board": "board-value-7", "target": "target-value-9"});
    let mut on_a = client(a).await;
    let mut on_b = client(b).await;
    on_a.subscribe(json!("s"), room.clone()).await;
    on_b.subscribe(json!("s"), room.clone()).await;

    // Until B's interest has reached A's replica, a publish on A does not go to B: probe with traces of their
    // own until B receives one, then publish the traced message.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut probe = 0u32;
    loop {
        assert!(Instant::now() < deadline, "B's interest never reached A");
        probe += 1;
        let probe_trace = format!("{probe:032x}");
        let body = json!({"rooms": [room], "data": {"probe": probe}});
        let (status, text) = publish(a, body, &traceparent(&probe_trace)).await;
        assert_eq!(status, 200, "{text}");
        let _ = on_a.recv_json().await;
        if let Ok(message) =
            tokio::time::timeout(Duration::from_millis(300), on_b.recv_json()).await
        {
            assert_eq!(message["data"]["probe"], probe);
            break;
        }
    }

    let (status, text) = publish(
        a,
        json!({"rooms": [room], "data": "traced"}),
        &traceparent(TRACE_ID),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(on_a.recv_json().await["data"], "traced");
    assert_eq!(on_b.recv_json().await["data"], "traced");

    // publish + process + send on A, process on B.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = receiver.spans_of(TRACE_ID);
        if spans.len() >= 4 && spans.iter().any(|s| s.node == "edge-b") {
            // Let any late extra span of this trace arrive before judging.
            tokio::time::sleep(Duration::from_millis(500)).await;
            break receiver.spans_of(TRACE_ID);
        }
        assert!(
            Instant::now() < deadline,
            "spans of the trace never all arrived: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |node: &str, name: &str| -> &Span {
        let matching: Vec<&Span> = spans
            .iter()
            .filter(|s| s.node == node && s.name == name)
            .collect();
        assert_eq!(matching.len(), 1, "{node} {name}: {spans:#?}");
        matching[0]
    };
    let template = "{board,target}";
    let publish_span = find("edge-a", &format!("publish {template}"));
    let process_a = find("edge-a", &format!("process {template}"));
    let send = find("edge-a", &format!("send {template}"));
    let process_b = find("edge-b", &format!("process {template}"));
    assert_eq!(spans.len(), 4, "exactly these four spans: {spans:#?}");

    // Connected: the backend's span -> publish -> (process on A, send -> process on B).
    assert_eq!(publish_span.parent, BACKEND_SPAN);
    assert_eq!(process_a.parent, publish_span.span_id);
    assert_eq!(send.parent, publish_span.span_id);
    assert_eq!(process_b.parent, send.span_id);

    // Messaging conventions, and no room values anywhere in names or attributes.
    const PRODUCER: i32 = 4;
    const CONSUMER: i32 = 5;
    assert_eq!(publish_span.kind, PRODUCER);
    assert_eq!(send.kind, PRODUCER);
    assert_eq!(process_a.kind, CONSUMER);
    assert_eq!(process_b.kind, CONSUMER);
    for span in [publish_span, process_a, send, process_b] {
        assert_eq!(span.attributes["messaging.system"], "herald", "{span:?}");
        assert_eq!(
            span.attributes["messaging.destination.template"], template,
            "{span:?}"
        );
        assert!(
            !format!("{span:?}").contains("-value-"),
            "a room value leaked: {span:?}"
        );
    }
    assert_eq!(publish_span.attributes["messaging.operation.type"], "send");
    assert_eq!(publish_span.attributes["herald.api"], "http");
    assert_eq!(process_a.attributes["messaging.operation.type"], "process");
    assert_eq!(process_a.attributes["herald.subscriptions_reached"], "1");
    assert_eq!(process_b.attributes["herald.subscriptions_reached"], "1");
    assert_eq!(process_b.attributes["herald.origin_edge"], "edge-a");
    assert_eq!(send.attributes["herald.peers"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_inside_a_publish_carry_its_trace_id() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let nodes = start_nodes(&endpoint, "info");
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    // A refused publish logs "publish refused" inside the request's span.
    let (status, _) = publish(
        &nodes.edges[0],
        json!({"rooms": [{"r": 1}]}),
        &traceparent(trace_id),
    )
    .await;
    assert_eq!(status, 400);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = std::fs::read_to_string(&nodes.logs[0]).unwrap();
        let refused: Vec<Value> = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["fields"]["message"] == "publish refused")
            .collect();
        if let Some(line) = refused.first() {
            assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `publish refused` line in the JSON logs:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_writes_and_elections_are_spans() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let nodes = start_nodes(&endpoint, "info");
    let mut on_b = client(&nodes.edges[1]).await;
    on_b.subscribe(json!("s"), json!({"r": 1})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let on_registry: Vec<&Span> = spans.iter().filter(|s| s.node == "registry-1").collect();
        let has = |name: &str| on_registry.iter().any(|s| s.name == name);
        if has("registry.write register_edge")
            && has("registry.write interest")
            && has("raft.election")
        {
            let election = on_registry
                .iter()
                .find(|s| s.name == "raft.election")
                .unwrap();
            assert_eq!(
                election.attributes["herald.registry.outcome"], "won",
                "{election:?}"
            );
            let interest = on_registry
                .iter()
                .find(|s| {
                    s.name == "registry.write interest"
                        && s.attributes.contains_key("herald.registry.updates")
                })
                .expect("a batched interest entry names its update count");
            assert!(
                interest.attributes["herald.registry.revision"]
                    .parse::<u64>()
                    .unwrap()
                    > 0
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registry spans missing: {on_registry:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp_with_the_same_names() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let nodes = start_nodes(&endpoint, "info");
    let a = &nodes.edges[0];
    let mut on_a = client(a).await;
    on_a.subscribe(json!("s"), json!({"r": 1})).await;
    let (status, text) = publish(
        a,
        json!({"rooms": [{"r": 1}], "data": 1}),
        &traceparent(TRACE_ID),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(on_a.recv_json().await["data"], 1);

    let metric = |name: &str| {
        receiver
            .metrics
            .lock()
            .unwrap()
            .get(&("edge-a".to_string(), name.to_string()))
            .cloned()
    };
    let number =
        |point: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match point.value {
            Some(number_data_point::Value::AsDouble(v)) => v,
            other => panic!("{other:?}"),
        };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connections = metric("herald_connections");
        let published = metric("herald_messages_published_total");
        let latency = metric("herald_publish_to_delivery_seconds");
        if let (
            Some(metric::Data::Gauge(connections)),
            Some(metric::Data::Sum(published)),
            Some(metric::Data::Histogram(latency)),
        ) = (connections, published, latency)
        {
            let http = published
                .data_points
                .iter()
                .find(|p| format!("{:?}", p.attributes).contains("\"http\""))
                .map(number);
            let delivered: u64 = latency.data_points.iter().map(|p| p.count).sum();
            if number(&connections.data_points[0]) == 1.0 && http == Some(1.0) && delivered >= 1 {
                assert!(published.is_monotonic);
                let point = &latency.data_points[0];
                assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
                assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never arrived over OTLP: {:?}",
            receiver.metrics.lock().unwrap().keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
