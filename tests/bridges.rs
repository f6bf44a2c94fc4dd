//! Routes and bridges against real brokers: a real `redis-server` (started by the test on a free loopback port,
//! stopped by its PID), a real HTTP backend for webhooks, real herald edges in-process and, for the cluster
//! cases, real `herald registry` and `herald dev` processes.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use herald_routes::{Endpoint, Route};
use support::brokers::{RabbitServer, RedisServer};
use support::procs::{free_port, Dir, Proc, HERALD};
use support::*;

fn endpoint(value: Value) -> Endpoint {
    serde_json::from_value(value).expect("endpoint")
}

fn route(from: &str, to: &[&str]) -> Route {
    Route {
        from: from.into(),
        to: to.iter().map(|s| s.to_string()).collect(),
    }
}

/// A dev edge (no registry: it runs its configured table and owns every source) with `endpoints` and `routes`.
async fn edge_with_routes(endpoints: Vec<(&str, Value)>, routes: Vec<(&str, Route)>) -> TestServer {
    let mut config = config(&[
        ("dev", "true"),
        ("log-level", "warn"),
        ("auth.api-keys", API_KEY),
    ]);
    config.endpoints = endpoints
        .into_iter()
        .map(|(n, e)| (n.to_owned(), endpoint(e)))
        .collect();
    config.routes = routes.into_iter().map(|(n, r)| (n.to_owned(), r)).collect();
    config
        .route_table()
        .validate()
        .expect("test routes are valid");
    start_with_config(config).await
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn redis_publish(conn: &mut redis::aio::MultiplexedConnection, channel: &str, payload: &str) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap();
}

/// Waits until Redis has `patterns` pattern subscriptions (PUBSUB NUMPAT): a bridge source is listening.
async fn wait_for_patterns(conn: &mut redis::aio::MultiplexedConnection, patterns: i64) {
    let deadline = Instant::now() + STEP;
    loop {
        let n: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async(conn)
            .await
            .unwrap();
        if n == patterns {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis has {n} pattern subscriptions, want {patterns}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis subscriber collecting (channel, payload) from a pattern.
async fn redis_listener(
    url: &str,
    pattern: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    let mut pubsub = redis::Client::open(url)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.psubscribe(pattern).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(m) = messages.next().await {
            let payload: String = m.get_payload().unwrap();
            if tx.send((m.get_channel_name().to_owned(), payload)).is_err() {
                return;
            }
        }
    });
    rx
}

async fn recv<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(STEP, rx.recv())
        .await
        .expect("in time")
        .expect("open")
}

#[tokio::test]
async fn redis_to_room_to_redis_with_placeholders() {
    let broker = RedisServer::start();
    let url = broker.url();
    let edge = edge_with_routes(
        vec![
            (
                "orders-in",
                json!({"kind": "redis", "url": url, "channel": "orders.*"}),
            ),
            (
                "order-room",
                json!({"kind": "room", "room": {"order": "{channel}"}}),
            ),
            ("any-order", json!({"kind": "room", "room": {"order": "*"}})),
            (
                "orders-out",
                json!({"kind": "redis", "url": url, "channel": "out.{order}"}),
            ),
        ],
        vec![
            ("in", route("orders-in", &["order-room"])),
            ("out", route("any-order", &["orders-out"])),
        ],
    )
    .await;
    let mut conn = redis(&url).await;
    let mut out = redis_listener(&url, "out.*").await;
    // Our own listener's pattern, plus the bridge's.
    wait_for_patterns(&mut conn, 2).await;

    let mut client = edge.client().await;
    assert_eq!(
        client
            .subscribe(json!(1), json!({"order": "orders.eu"}))
            .await["code"],
        "success"
    );
    redis_publish(&mut conn, "orders.eu", r#"{"n": 1}"#).await;
    let delivery = client.recv_json().await;
    assert_eq!(
        delivery,
        json!({"type": "publish", "data": {"n": 1}, "requestId": 1})
    );
    // The bridged-in publish entered herald, so the room -> Redis route carried it out again.
    assert_eq!(
        recv(&mut out).await,
        ("out.orders.eu".to_owned(), r#"{"n": 1}"#.to_owned())
    );

    // A publish through the API leaves through the same route.
    edge.publish(json!({"rooms": [{"order": "x"}], "data": [1, 2]}))
        .await;
    assert_eq!(
        recv(&mut out).await,
        ("out.x".to_owned(), "[1,2]".to_owned())
    );
    assert_eq!(
        edge.metric("herald_bridge_messages_in_total{route=\"in\"}")
            .await,
        1.0
    );
    assert_eq!(
        edge.metric("herald_bridge_messages_out_total{route=\"out\",destination=\"orders-out\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn undecodable_messages_are_counted_and_do_not_stop_the_ones_behind() {
    let broker = RedisServer::start();
    let url = broker.url();
    let edge = edge_with_routes(
        vec![
            (
                "in",
                json!({"kind": "redis", "url": url, "channel": "feed.*", "marshal": "envelope"}),
            ),
            ("rooms", json!({"kind": "room"})),
        ],
        vec![("feed", route("in", &["rooms"]))],
    )
    .await;
    let mut conn = redis(&url).await;
    wait_for_patterns(&mut conn, 1).await;
    let mut client = edge.client().await;
    client.subscribe(json!("a"), json!({"c": 1})).await;

    for bad in [
        "not json at all",
        r#"{"data": 1}"#,
        r#"{"rooms": [[1]], "data": 1}"#,
    ] {
        redis_publish(&mut conn, "feed.x", bad).await;
    }
    redis_publish(
        &mut conn,
        "feed.x",
        r#"{"rooms": [{"c": 1}, {"c": 2}], "data": "ok"}"#,
    )
    .await;
    assert_eq!(client.recv_json().await["data"], "ok");
    client.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        edge.metric("herald_bridge_messages_failed_total{route=\"feed\",reason=\"decode\"}")
            .await,
        3.0
    );
    assert_eq!(
        edge.metric("herald_bridge_messages_in_total{route=\"feed\"}")
            .await,
        1.0
    );
}

/// A webhook backend that fails the first `failures` requests with 503, then answers 200, recording bodies.
struct Hook {
    url: String,
    bodies: Arc<Mutex<Vec<(String, Value)>>>,
}

async fn hook(failures: usize) -> Hook {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/orders", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(0usize));
    let (b, s) = (bodies.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (b, s) = (b.clone(), s.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (b, s) = (b.clone(), s.clone());
                    async move {
                        let content_type = request.headers()["content-type"]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let n = {
                            let mut seen = s.lock().unwrap();
                            *seen += 1;
                            *seen
                        };
                        let status = if n <= failures { 503 } else { 200 };
                        if status == 200 {
                            b.lock()
                                .unwrap()
                                .push((content_type, serde_json::from_slice(&body).unwrap()));
                        }
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Hook { url, bodies }
}

#[tokio::test]
async fn room_to_webhook_retries_then_delivers_in_order() {
    let backend = hook(2).await;
    let edge = edge_with_routes(
        vec![
            ("orders", json!({"kind": "room", "room": {"order": "*"}})),
            (
                "backend",
                json!({"kind": "webhook", "url": backend.url, "backoff-ms": 20}),
            ),
        ],
        vec![("notify", route("orders", &["backend"]))],
    )
    .await;
    for n in 0..3 {
        edge.publish(json!({"rooms": [{"order": n}], "data": {"n": n}}))
            .await;
    }
    let deadline = Instant::now() + STEP;
    while backend.bodies.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "webhook deliveries: {:?}",
            backend.bodies.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bodies = backend.bodies.lock().unwrap().clone();
    // The default webhook marshal is the envelope, so the backend learns the room; two 503s were retried.
    let expected: Vec<(String, Value)> = (0..3)
        .map(|n| {
            (
                "application/json".to_owned(),
                json!({"rooms": [{"order": n}], "data": {"n": n}}),
            )
        })
        .collect();
    assert_eq!(bodies, expected);
    assert_eq!(
        edge.metric("herald_bridge_messages_out_total{route=\"notify\",destination=\"backend\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn a_publishs_trace_context_rides_in_the_bridge_envelope() {
    let backend = hook(0).await;
    let edge = edge_with_routes(
        vec![
            ("orders", json!({"kind": "room", "room": {"order": "*"}})),
            ("backend", json!({"kind": "webhook", "url": backend.url})),
        ],
        vec![("notify", route("orders", &["backend"]))],
    )
    .await;
    // Spans are not exported here, so the backend's context is passed on unchanged; a malformed one is not.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (n, header) in [(0, traceparent), (1, "00-not-a-trace-01")] {
        let (status, text) = http_request(
            "POST",
            &format!("http://{}/api/v1/publish", edge.http),
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {API_KEY}")),
                ("traceparent", header),
            ],
            json!({"rooms": [{"order": n}], "data": n}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }
    let deadline = Instant::now() + STEP;
    while backend.bodies.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "webhook deliveries missing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bodies = backend.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies[0].1,
        json!({"rooms": [{"order": 0}], "data": 0, "traceparent": traceparent})
    );
    assert_eq!(bodies[1].1, json!({"rooms": [{"order": 1}], "data": 1}));
}

#[tokio::test]
async fn a_webhook_that_keeps_failing_is_a_dead_letter_and_the_next_message_goes_on() {
    let backend = hook(2).await;
    let edge = edge_with_routes(
        vec![
            ("orders", json!({"kind": "room", "room": {"order": "*"}})),
            (
                "backend",
                json!({"kind": "webhook", "url": backend.url, "retries": 1, "backoff-ms": 10}),
            ),
        ],
        vec![("notify", route("orders", &["backend"]))],
    )
    .await;
    edge.publish(json!({"rooms": [{"order": 1}], "data": "lost"}))
        .await;
    edge.publish(json!({"rooms": [{"order": 2}], "data": "kept"}))
        .await;
    let deadline = Instant::now() + STEP;
    while backend.bodies.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.bodies.lock().unwrap()[0].1["data"], "kept");
    assert_eq!(
        edge.metric("herald_bridge_messages_failed_total{route=\"notify\",reason=\"dead_letter\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_django_app_publishing_to_high_templars_exchange_reaches_herald_subscribers() {
    use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

    let rabbit = RabbitServer::shared();
    let webhook = hook(0).await;
    let edge = edge_with_routes(
        vec![
            (
                "django",
                json!({"kind": "amqp", "url": rabbit.amqp_url(), "preset": "hightemplar"}),
            ),
            ("named-rooms", json!({"kind": "room"})),
            (
                "messages",
                json!({"kind": "room", "room": {"target": "message", "id": "*"}}),
            ),
            ("backend", json!({"kind": "webhook", "url": webhook.url})),
        ],
        vec![
            ("django", route("django", &["named-rooms"])),
            ("audit", route("messages", &["backend"])),
        ],
    )
    .await;
    let mut client = edge.client().await;
    client
        .subscribe(json!(9), json!({"target": "message", "id": 7}))
        .await;

    // django-binder's side, unchanged: the exchange as High-templar declared it, routing key `*`, body
    // {"rooms": [...], "data": ...}, no properties.
    let connection = Connection::connect(&rabbit.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            "hightemplar".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publish = |n: u64, body: String| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    "hightemplar".into(),
                    "*".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap();
            n
        }
    };
    let body =
        |n: u64| json!({"rooms": [{"target": "message", "id": 7}], "data": {"n": n}}).to_string();
    // Messages published before herald's queue is bound go nowhere: publish until the first arrives.
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        publish(n, body(n)).await;
        n += 1;
        if let Ok(Ok(text)) =
            tokio::time::timeout(Duration::from_millis(200), client.next_text()).await
        {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
        assert!(Instant::now() < deadline, "nothing arrived from RabbitMQ");
    };
    assert_eq!(first["requestId"], 9);
    let start = first["data"]["n"].as_u64().unwrap();
    // An undecodable body is rejected (not requeued forever) and the ones behind it still arrive.
    publish(0, "{not json".into()).await;
    for i in n..n + 20 {
        publish(i, body(i)).await;
    }
    let mut seen = vec![start];
    seen.extend(
        drain(&mut client, Duration::from_millis(500))
            .await
            .iter()
            .map(|d| d["n"].as_u64().unwrap()),
    );
    let expected: Vec<u64> = (start..n + 20).collect();
    assert_eq!(seen, expected, "every message once, in order");
    assert_eq!(
        edge.metric("herald_bridge_messages_failed_total{route=\"django\",reason=\"decode\"}")
            .await,
        1.0
    );
    // What came in from RabbitMQ is an ordinary publish: the room -> webhook route saw it too.
    let deadline = Instant::now() + STEP;
    while webhook.bodies.lock().unwrap().len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "webhook saw {}",
            webhook.bodies.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn bad_route_tables_are_refused_at_load_with_the_reason() {
    let dir = Dir::new("bridges-config");
    let cases = [
        ("routes:\n  r:\n    from: nowhere\n    to: [x]\n", "unknown endpoint \"nowhere\""),
        (
            "endpoints:\n  a:\n    kind: room\n    room: {c: \"*\"}\n  b:\n    kind: room\n    room: {c: \"{c}\"}\nroutes:\n  r:\n    from: a\n    to: [b]\n",
            "routes form a cycle",
        ),
        (
            "endpoints:\n  a:\n    kind: redis\n    url: redis://127.0.0.1:1/\n    chanel: x\n",
            "unknown field `chanel`",
        ),
        (
            "endpoints:\n  h:\n    kind: webhook\n    url: http://127.0.0.1:1/\n  r:\n    kind: room\n    room: {a: 1}\nroutes:\n  x:\n    from: h\n    to: [r]\n",
            "a webhook can only be a destination",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("herald-{i}.yaml"));
        std::fs::write(&path, format!("dev: true\n{yaml}")).unwrap();
        let output = std::process::Command::new(HERALD)
            .args(["dev", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "case {i}: {stderr}");
        assert!(
            stderr.contains(expected),
            "case {i}: {stderr:?} lacks {expected:?}"
        );
    }
}

// === the cluster: one consumer per source, handover, routes changed at run time ===

const SECRET: &str = "bridges-test-secret-0123456789";
const ADMIN_TOKEN: &str = "bridges-admin-token";

struct BridgeCluster {
    _registry: Proc,
    registry: String,
    edges: BTreeMap<String, Proc>,
    _dirs: Vec<Dir>,
}

/// One registry member and `edges` dev edges with a short lease, each configured with `yaml` (endpoints and
/// routes).
fn start_cluster(edges: usize, yaml: &str) -> BridgeCluster {
    let port = free_port();
    let registry = format!("127.0.0.1:{port}");
    let data = Dir::new("bridges-r1");
    let registry_proc = Proc::spawn(&[
        "registry".into(),
        "--node-id".into(),
        "1".into(),
        "--listen".into(),
        registry.clone(),
        "--peers".into(),
        format!("1={registry}"),
        "--data-dir".into(),
        data.0.display().to_string(),
        "--cluster-secret".into(),
        SECRET.into(),
    ]);
    let config_dir = Dir::new("bridges-edges");
    let config = config_dir.0.join("herald.yaml");
    std::fs::write(&config, yaml).unwrap();
    let edges = (0..edges)
        .map(|i| {
            let id = format!("edge-{i}");
            let proc = Proc::spawn(&[
                "dev".into(),
                "--config".into(),
                config.display().to_string(),
                "--port".into(),
                "0".into(),
                "--grpc-port".into(),
                "0".into(),
                "--set".into(),
                format!("cluster.registry={registry}"),
                "--set".into(),
                format!("cluster.secret={SECRET}"),
                "--set".into(),
                "cluster.peer-port=0".into(),
                "--set".into(),
                format!("cluster.edge-id={id}"),
                "--set".into(),
                "cluster.lease-ttl-ms=1500".into(),
                "--set".into(),
                format!("admin.token={ADMIN_TOKEN}"),
                "--set".into(),
                format!("auth.api-keys={API_KEY}"),
            ]);
            (id, proc)
        })
        .collect();
    BridgeCluster {
        _registry: registry_proc,
        registry,
        edges,
        _dirs: vec![data, config_dir],
    }
}

impl BridgeCluster {
    fn client(&self) -> herald_registry::client::RegistryClient {
        herald_registry::client::RegistryClient::new(
            vec![self.registry.clone()],
            herald_registry::grpc::ClusterSecret::new(SECRET).unwrap(),
        )
        .unwrap()
    }

    /// Waits until route `route`'s source is owned by an edge other than `not`, and returns it.
    async fn owner(&self, route: &str, not: Option<&str>) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(reply) = self.client().list_routes().await {
                if let Some(owner) = reply.sources.iter().find(|s| s.route == route) {
                    if Some(owner.edge.as_str()) != not {
                        return owner.edge.clone();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no owner for {route}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(HERALD)
            .args([
                "ctl",
                "--registry",
                &self.registry,
                "--cluster-secret",
                SECRET,
            ])
            .args(args)
            .output()
            .unwrap()
    }
}

async fn client_of(edge: &Proc) -> WsClient {
    let mut client = WsClient::connect(&format!("ws://{}/ws/", edge.field("http")), &[]).await;
    assert_eq!(client.recv_json().await["is_authorized"], true);
    client
}

/// Reads publishes until `quiet` passes without one; returns their data.
async fn drain(client: &mut WsClient, quiet: Duration) -> Vec<Value> {
    let mut seen = Vec::new();
    while let Ok(Ok(text)) = tokio::time::timeout(quiet, client.next_text()).await {
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "publish" {
            seen.push(frame["data"].clone());
        }
    }
    seen
}

#[tokio::test]
async fn one_edge_consumes_a_source_and_another_takes_it_over_when_it_dies() {
    let broker = RedisServer::start();
    let yaml = format!(
        "endpoints:\n  ticks:\n    kind: redis\n    url: {}\n    channel: ticks\n  tick-room:\n    kind: room\n    room: {{feed: ticks}}\nroutes:\n  ticks:\n    from: ticks\n    to: [tick-room]\n",
        broker.url()
    );
    let mut cluster = start_cluster(2, &yaml);
    let first = cluster.owner("ticks", None).await;
    let survivor_id = cluster
        .edges
        .keys()
        .find(|id| **id != first)
        .unwrap()
        .clone();
    let mut client = client_of(&cluster.edges[&survivor_id]).await;
    client.subscribe(json!(1), json!({"feed": "ticks"})).await;

    // Publish numbered ticks into Redis throughout: before, during and after the owner's death.
    let mut conn = redis(&broker.url()).await;
    let numsub = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg("ticks");
        let conn = conn.clone();
        async move {
            let mut conn = conn;
            let reply: (String, i64) = cmd.query_async(&mut conn).await.unwrap();
            reply.1
        }
    };
    let deadline = Instant::now() + STEP;
    while numsub(&mut conn).await != 1 {
        assert!(Instant::now() < deadline, "the owner never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Interest of the survivor's client must reach the owner before the first tick counts.
    let mut n = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        redis_publish(&mut conn, "ticks", &n.to_string()).await;
        n += 1;
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(100), client.next_text()).await
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ticks never reached the other edge"
        );
    }
    drain(&mut client, Duration::from_millis(300)).await;

    let before_kill = n;
    cluster.edges.remove(&first); // SIGKILL, by PID
    let second = cluster.owner("ticks", Some(&first)).await;
    assert_eq!(second, survivor_id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while numsub(&mut conn).await != 1 {
        assert!(Instant::now() < deadline, "the new owner never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_takeover = n + 1000;
    for i in after_takeover..after_takeover + 50 {
        redis_publish(&mut conn, "ticks", &i.to_string()).await;
    }
    let seen = drain(&mut client, Duration::from_millis(500)).await;
    let numbers: Vec<u64> = seen.iter().filter_map(Value::as_u64).collect();
    let expected: Vec<u64> = (after_takeover..after_takeover + 50).collect();
    // Redis Pub/Sub is at-most-once: ticks published with no owner are gone. Everything published after the
    // takeover arrives exactly once, in order: one consumer, no duplicates.
    assert_eq!(
        numbers, expected,
        "published before the kill: {before_kill}"
    );
}

#[tokio::test]
async fn routes_changed_at_run_time_with_ctl_reach_every_edge() {
    let broker = RedisServer::start();
    let cluster = start_cluster(2, "");
    let mut out = redis_listener(&broker.url(), "alerts.*").await;

    let definition =
        json!({"kind": "redis", "url": broker.url(), "channel": "alerts.{level}"}).to_string();
    let put = cluster.ctl(&["routes", "put-endpoint", "alerts-out", &definition]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let room = json!({"kind": "room", "room": {"level": "*"}}).to_string();
    assert!(cluster
        .ctl(&["routes", "put-endpoint", "alerts", &room])
        .status
        .success());
    // Refused with the reason: an unknown endpoint, and a cycle.
    let unknown = cluster.ctl(&[
        "routes", "add", "bad", "--from", "alerts", "--to", "nowhere",
    ]);
    assert_eq!(unknown.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown endpoint \"nowhere\""));
    let add = cluster.ctl(&[
        "routes",
        "add",
        "alerts",
        "--from",
        "alerts",
        "--to",
        "alerts-out",
    ]);
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );

    // Every edge follows the table: a publish on either one leaves through the route, once.
    let edges: Vec<&Proc> = cluster.edges.values().collect();
    let publish_on = |edge: &Proc, level: &str| {
        let url = format!("http://{}/api/v1/publish", edge.field("http"));
        let body = json!({"rooms": [{"level": level}], "data": level}).to_string();
        async move {
            http_request(
                "POST",
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Bearer {API_KEY}")),
                ],
                body,
            )
            .await
        }
    };
    for (i, edge) in edges.iter().enumerate() {
        let level = format!("l{i}");
        let deadline = Instant::now() + STEP;
        loop {
            publish_on(edge, &level).await;
            let mut arrived = false;
            while let Ok(Some(got)) =
                tokio::time::timeout(Duration::from_millis(200), out.recv()).await
            {
                // Earlier attempts may arrive late; only this edge's level counts here.
                if got.0 == format!("alerts.{level}") {
                    assert_eq!(got.1, format!("\"{level}\""));
                    arrived = true;
                }
            }
            if arrived {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "edge {i} never applied the route"
            );
        }
    }
    let list = cluster.ctl(&["--output", "json", "routes", "list"]);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        listed["routes"]["alerts"],
        json!({"from": "alerts", "to": ["alerts-out"]})
    );

    // Removed at run time: nothing more leaves.
    let in_use = cluster.ctl(&["routes", "delete-endpoint", "alerts-out"]);
    assert_eq!(
        in_use.status.code(),
        Some(64),
        "an endpoint in use is refused"
    );
    assert!(cluster
        .ctl(&["routes", "remove", "alerts"])
        .status
        .success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    while out.try_recv().is_ok() {}
    for edge in &edges {
        publish_on(edge, "late").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        out.try_recv().is_err(),
        "a removed route still carried messages"
    );
}

#[tokio::test]
async fn ctl_status_shows_each_bridge_task_and_who_consumes_each_source() {
    let broker = RedisServer::start();
    let yaml = format!(
        "endpoints:\n  ticks:\n    kind: redis\n    url: {}\n    channel: ticks\n  tick-room:\n    kind: room\n    room: {{feed: ticks}}\n  down:\n    kind: redis\n    url: redis://127.0.0.1:1/\n    channel: out\n  any-feed:\n    kind: room\n    room: {{feed: \"*\"}}\nroutes:\n  ticks:\n    from: ticks\n    to: [tick-room]\n  broken:\n    from: any-feed\n    to: [down]\n",
        broker.url()
    );
    let cluster = start_cluster(1, &yaml);
    cluster.owner("ticks", None).await;
    let admin = cluster.edges["edge-0"].field("admin");
    let status = |token: Option<&str>, addr: &str| {
        let mut command = std::process::Command::new(HERALD);
        command
            .env_remove("HERALD_ADMIN_TOKEN")
            .args(["ctl", "--admin", addr, "--output", "json", "status"]);
        if let Some(token) = token {
            command.args(["--admin-token", token]);
        }
        command.output().unwrap()
    };
    // The broken destination (nothing listens on port 1) keeps failing and being restarted, without harm.
    let deadline = Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let out = status(Some(ADMIN_TOKEN), &admin);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let tasks = doc["bridges"]["tasks"].as_array().unwrap().clone();
        let broken = tasks.iter().find(|t| t["task"] == "broken->down").cloned();
        let source = tasks.iter().find(|t| t["task"] == "ticks<-source").cloned();
        if let (Some(broken), Some(source)) = (broken, source) {
            if broken["restarts"].as_u64().unwrap() >= 1 && source["up"] == true {
                assert!(
                    broken["last_error"]
                        .as_str()
                        .unwrap()
                        .contains("redis connect"),
                    "{broken}"
                );
                break doc;
            }
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the tasks: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(doc["edge_id"], "edge-0");
    assert_eq!(doc["bridges"]["source_owners"], json!({"ticks": "edge-0"}));
    let text = std::process::Command::new(HERALD)
        .args([
            "ctl",
            "--admin",
            &admin,
            "--admin-token",
            ADMIN_TOKEN,
            "status",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ticks<-source\tyes\t0\t-"), "{text}");

    // Refusals: no token, a wrong one, and nobody listening.
    assert_eq!(status(None, &admin).status.code(), Some(77));
    let wrong = status(Some("nope"), &admin);
    assert_eq!(wrong.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("admin token"));
    let closed = format!("127.0.0.1:{}", free_port());
    assert_eq!(status(Some(ADMIN_TOKEN), &closed).status.code(), Some(69));
}

#[tokio::test]
async fn a_node_without_a_registry_changes_its_own_routes_through_its_admin_api() {
    let backend = hook(0).await;
    let node = Proc::spawn(&[
        "dev".into(),
        "--port".into(),
        "0".into(),
        "--grpc-port".into(),
        "0".into(),
        "--set".into(),
        format!("admin.token={ADMIN_TOKEN}"),
        "--set".into(),
        format!("auth.api-keys={API_KEY}"),
    ]);
    let admin = node.field("admin");
    let ctl = |args: &[&str]| {
        std::process::Command::new(HERALD)
            .env_remove("HERALD_CTL_REGISTRY")
            .args(["ctl", "--admin", &admin, "--admin-token", ADMIN_TOKEN])
            .args(args)
            .output()
            .unwrap()
    };
    let hook_endpoint = json!({"kind": "webhook", "url": backend.url}).to_string();
    let room_endpoint = json!({"kind": "room", "room": {"audit": "*"}}).to_string();
    assert!(ctl(&["routes", "put-endpoint", "backend", &hook_endpoint])
        .status
        .success());
    assert!(ctl(&["routes", "put-endpoint", "audited", &room_endpoint])
        .status
        .success());
    // Refused with the reason, before anything changes.
    let bad = ctl(&["routes", "add", "r", "--from", "backend", "--to", "audited"]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("webhook can only be a destination"));
    let add = ctl(&[
        "routes", "add", "audit", "--from", "audited", "--to", "backend",
    ]);
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let list: Value = serde_json::from_slice(&ctl(&["routes", "list"]).stdout).unwrap();
    assert_eq!(
        list["routes"]["audit"],
        json!({"from": "audited", "to": ["backend"]})
    );
    // A route back into the rooms it reads from would loop every message: refused with the path.
    let echo = json!({"kind": "room", "room": {"audit": "{audit}"}}).to_string();
    assert!(ctl(&["routes", "put-endpoint", "echo", &echo])
        .status
        .success());
    let cycle = ctl(&["routes", "add", "loop", "--from", "audited", "--to", "echo"]);
    assert_eq!(cycle.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&cycle.stderr).contains("routes form a cycle: loop -> loop"),
        "{}",
        String::from_utf8_lossy(&cycle.stderr)
    );

    let publish = |data: &str| {
        let url = format!("http://{}/api/v1/publish", node.field("http"));
        let body = json!({"rooms": [{"audit": 1}], "data": data}).to_string();
        async move {
            http_request(
                "POST",
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Bearer {API_KEY}")),
                ],
                body,
            )
            .await
        }
    };
    publish("first").await;
    let deadline = Instant::now() + STEP;
    while backend.bodies.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the route added at run time never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.bodies.lock().unwrap()[0].1["data"], "first");

    assert_eq!(
        ctl(&["routes", "delete-endpoint", "backend"]).status.code(),
        Some(64),
        "in use"
    );
    assert!(ctl(&["routes", "remove", "audit"]).status.success());
    publish("after removal").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        backend.bodies.lock().unwrap().len(),
        1,
        "a removed route still ran"
    );
}
