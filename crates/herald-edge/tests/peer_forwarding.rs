//! Edge-to-edge forwarding, in process: real edges (`herald_edge::run_with_cluster` on `127.0.0.1:0`), real tonic
//! peer streams and real WebSocket clients. No registry: each edge's `ClusterView` is fed by hand with the changes
//! the registry would have sent, so these tests pin down the forwarding path alone.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;

use herald_edge::auth::AuthConfigError;
use herald_edge::cluster_view::ClusterView;
use herald_edge::config::{Config, Overrides};
use herald_edge::peer::PeerLinkConfig;
use herald_edge::{Cluster, ClusterNode, DrainReport, Listeners};
use herald_proto::v1::peer_internal_client::PeerInternalClient;
use herald_proto::v1::publisher_client::PublisherClient;
use herald_proto::v1::{
    scalar, target, ForwardBatch, ForwardedPublish, PublishRequest, Room as ProtoRoom, Scalar,
    Target as ProtoTarget,
};
use herald_protocol::Room;
use herald_registry::grpc::CLUSTER_SECRET_HEADER;
use herald_registry::Change;

const SECRET: &str = "test-cluster-secret";
const API_KEY: &str = "test-api-key";
const JWT_SECRET: &str = "test-jwt-secret";
/// How long any single expected event may take before a test fails.
const STEP: Duration = Duration::from_secs(10);

/// Registry revisions, increasing across every view, as the registry's would be.
static REVISION: AtomicU64 = AtomicU64::new(1);

struct Edge {
    id: String,
    http: SocketAddr,
    grpc: SocketAddr,
    peer: SocketAddr,
    cluster: Arc<Cluster>,
    /// Sending (or dropping) it starts the edge's drain.
    shutdown: oneshot::Sender<()>,
    running: JoinHandle<Result<DrainReport, AuthConfigError>>,
}

async fn start_edge(id: &str, overrides: &[(&str, &str)], links: PeerLinkConfig) -> Edge {
    let mut all: Overrides = [
        ("dev", "true"),
        ("log-level", "warn"),
        ("auth.api-keys", API_KEY),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    all.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let config = Config::load(None, &BTreeMap::new(), &all).expect("test config is valid");

    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, grpc_addr, peer_addr) = (
        http.local_addr().unwrap(),
        grpc.local_addr().unwrap(),
        peer.local_addr().unwrap(),
    );
    let view = Arc::new(RwLock::new(ClusterView::new()));
    let metrics = Arc::new(herald_edge::metrics::Metrics::default());
    let cluster = Arc::new(Cluster::new(id, SECRET, view, links, metrics).unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let running = tokio::spawn(herald_edge::run_with_cluster(
        config,
        Listeners {
            http,
            grpc,
            admin: None,
        },
        Some(ClusterNode {
            cluster: cluster.clone(),
            peer,
            // The views are fed by hand here; no registry.
            registry: None,
        }),
        async move {
            let _ = rx.await;
        },
    ));
    Edge {
        id: id.to_string(),
        http: http_addr,
        grpc: grpc_addr,
        peer: peer_addr,
        cluster,
        shutdown: tx,
        running,
    }
}

/// Applies `changes` to every edge's view, as the registry's watch would.
fn apply(edges: &[&Edge], changes: &[Change]) {
    let revision = REVISION.fetch_add(1, Ordering::Relaxed);
    for edge in edges {
        edge.cluster.apply(revision, changes);
    }
}

/// Every edge learns every edge's peer address.
fn introduce(edges: &[&Edge]) {
    let ups: Vec<Change> = edges
        .iter()
        .map(|e| Change::EdgeUp {
            edge: e.id.clone(),
            peer_addr: e.peer.to_string(),
        })
        .collect();
    apply(edges, &ups);
}

fn interest(room: Value, edge: &str) -> Change {
    Change::InterestAdded {
        room: Room::from_json(&room).unwrap().canonical_json(),
        edge: edge.to_string(),
    }
}

// ---- WebSocket clients ----

struct Ws(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Ws {
    async fn connect(edge: &Edge, query: &str) -> Ws {
        let url = format!("ws://{}/ws/{query}", edge.http);
        let (stream, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut ws = Ws(stream);
        let first = ws.recv().await;
        assert_eq!(first["is_authorized"], json!(true), "first frame: {first}");
        ws
    }

    async fn send_text(&mut self, text: String) {
        self.0.send(Message::Text(text.into())).await.unwrap();
    }

    async fn subscribe(&mut self, room: Value, request_id: &str) {
        self.send_text(
            json!({"type": "subscribe", "room": room, "requestId": request_id}).to_string(),
        )
        .await;
        let reply = self.recv().await;
        assert_eq!(
            reply,
            json!({"code": "success", "requestId": request_id}),
            "subscribe reply"
        );
    }

    /// The next text frame, as JSON.
    async fn recv(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(STEP, self.0.next())
                .await
                .expect("a frame in time")
                .expect("the socket is open")
                .expect("a frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next delivery's `data`, checking it came for `request_id`.
    async fn delivery(&mut self, request_id: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], json!("publish"), "frame: {frame}");
        assert_eq!(frame["requestId"], json!(request_id), "frame: {frame}");
        frame["data"].clone()
    }

    /// The next delivery's `data` if one arrives within `wait`.
    async fn delivery_within(&mut self, wait: Duration, request_id: &str) -> Option<Value> {
        let frame = tokio::time::timeout(wait, self.0.next()).await.ok()?;
        let Message::Text(text) = frame.expect("the socket is open").expect("a frame") else {
            panic!("unexpected frame");
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(frame["requestId"], json!(request_id), "frame: {frame}");
        Some(frame["data"].clone())
    }

    /// Asserts nothing arrives for `quiet`.
    async fn silent_for(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, self.0.next()).await {
            panic!("expected silence, got {message:?}");
        }
    }
}

// ---- publishers ----

/// One keep-alive HTTP/1.1 connection: requests on it are handled one after another, in order.
struct Http {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
}

impl Http {
    async fn connect(edge: &Edge) -> Http {
        let stream = TcpStream::connect(edge.http).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Http {
            addr: edge.http,
            sender,
        }
    }

    async fn post(&mut self, path: &str, body: Value) -> (u16, String) {
        let request = http::Request::post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {API_KEY}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        self.send(request).await
    }

    async fn send(&mut self, request: http::Request<Full<Bytes>>) -> (u16, String) {
        let exchange = async {
            // The connection is ready again only once hyper has seen the previous response end.
            self.sender.ready().await.unwrap();
            let response = self.sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        tokio::time::timeout(STEP, exchange)
            .await
            .expect("answer in time")
    }

    async fn publish(&mut self, body: Value) {
        let (status, text) = self.post("/api/v1/publish", body).await;
        assert_eq!(status, 200, "publish answered {status}: {text}");
    }
}

fn proto_room(room: &[(&str, &str)]) -> ProtoTarget {
    ProtoTarget {
        kind: Some(target::Kind::Room(ProtoRoom {
            fields: room
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Scalar {
                            kind: Some(scalar::Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        })),
    }
}

async fn grpc_client(edge: &Edge) -> PublisherClient<tonic::transport::Channel> {
    PublisherClient::connect(format!("http://{}", edge.grpc))
        .await
        .unwrap()
}

fn with_key<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {API_KEY}")).unwrap(),
    );
    request
}

/// Polls `condition` until it holds, failing after [`STEP`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_subscribers_on_every_edge_exactly_once() {
    let (a, b, c) = tokio::join!(
        start_edge("a", &[], PeerLinkConfig::default()),
        start_edge("b", &[], PeerLinkConfig::default()),
        start_edge("c", &[], PeerLinkConfig::default()),
    );
    let edges = [&a, &b, &c];
    introduce(&edges);

    let lobby = json!({"chat": "lobby"});
    let mut on_a = Ws::connect(&a, "").await;
    on_a.subscribe(lobby.clone(), "1").await;
    // B subscribes with a wildcard: it wants every chat room, published on any edge.
    let mut on_b = Ws::connect(&b, "").await;
    on_b.subscribe(json!({"chat": "*"}), "w").await;
    let mut on_c = Ws::connect(&c, "").await;
    on_c.subscribe(lobby.clone(), "1").await;
    // What each edge's registry client would have reported for these subscriptions.
    apply(
        &edges,
        &[
            interest(lobby.clone(), "a"),
            interest(json!({"chat": "*"}), "b"),
            interest(lobby.clone(), "c"),
        ],
    );

    // 1. HTTP /api/v1/publish on A to an exact room: local, wildcard-on-B and exact-on-C subscribers.
    let mut http_a = Http::connect(&a).await;
    http_a
        .publish(json!({"rooms": [lobby], "data": {"n": 1}}))
        .await;
    assert_eq!(on_a.delivery("1").await, json!({"n": 1}));
    assert_eq!(on_b.delivery("w").await, json!({"n": 1}));
    assert_eq!(on_c.delivery("1").await, json!({"n": 1}));

    // 2. /trigger/ on B to a wildcard room: it matches the exact interest of A and C across nodes.
    let mut http_b = Http::connect(&b).await;
    let (status, text) = http_b
        .post(
            "/trigger/",
            json!({"rooms": [{"chat": "*"}], "data": {"n": 2}}),
        )
        .await;
    assert_eq!((status, text.as_str()), (200, "publish success"));
    assert_eq!(on_a.delivery("1").await, json!({"n": 2}));
    assert_eq!(on_b.delivery("w").await, json!({"n": 2}));
    assert_eq!(on_c.delivery("1").await, json!({"n": 2}));

    // 3. gRPC Publish on C to two rooms that both match B's wildcard: B still gets it once (one forward per peer,
    //    deduplicated again by B's hub), and a room nobody wants adds nothing.
    let mut grpc_c = grpc_client(&c).await;
    grpc_c
        .publish(with_key(PublishRequest {
            targets: vec![
                proto_room(&[("chat", "lobby")]),
                proto_room(&[("chat", "other")]),
            ],
            data_json: br#"{"n":3}"#.to_vec(),
        }))
        .await
        .unwrap();
    assert_eq!(on_a.delivery("1").await, json!({"n": 3}));
    assert_eq!(on_b.delivery("w").await, json!({"n": 3}));
    assert_eq!(on_c.delivery("1").await, json!({"n": 3}));

    // 4. Nobody on another edge wants {"news": ...}: nothing is forwarded for it (checked by the counts below).
    http_a
        .publish(json!({"rooms": [{"news": "x"}], "data": {"n": 4}}))
        .await;

    // No duplicate of anything arrives later.
    let quiet = Duration::from_millis(300);
    tokio::join!(
        on_a.silent_for(quiet),
        on_b.silent_for(quiet),
        on_c.silent_for(quiet)
    );
    // Each edge forwarded each of its publishes once per interested peer, and every forward was acknowledged.
    eventually("acks", || {
        a.cluster.metrics().peer_forwards.get() == 2
            && b.cluster.metrics().peer_forwards.get() == 2
            && c.cluster.metrics().peer_forwards.get() == 2
    })
    .await;
    for edge in edges {
        let metrics = edge.cluster.metrics();
        assert_eq!(metrics.peer_forward_drops.get("queue_full"), 0);
        assert_eq!(metrics.peer_forward_drops.get("stream_broken"), 0);
        assert_eq!(metrics.peer_forwards_received.get(), 2, "edge {}", edge.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_publishes_from_one_publisher_arrive_in_order() {
    let (a, b) = tokio::join!(
        start_edge("a", &[], PeerLinkConfig::default()),
        start_edge("b", &[], PeerLinkConfig::default()),
    );
    introduce(&[&a, &b]);
    let room = json!({"seq": "x"});
    let mut on_b = Ws::connect(&b, "").await;
    on_b.subscribe(room.clone(), "s").await;
    apply(&[&a, &b], &[interest(room, "b")]);

    // One PublishStream is one publisher: its messages are applied, and forwarded, in stream order.
    let mut grpc_a = grpc_client(&a).await;
    let requests: Vec<PublishRequest> = (0..1000)
        .map(|i| PublishRequest {
            targets: vec![proto_room(&[("seq", "x")])],
            data_json: json!({"i": i}).to_string().into_bytes(),
        })
        .collect();
    let reply = grpc_a
        .publish_stream(with_key(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.published, 1000);

    for i in 0..1000 {
        assert_eq!(on_b.delivery("s").await, json!({"i": i}), "message {i}");
    }
    on_b.silent_for(Duration::from_millis(200)).await;
    assert_eq!(a.cluster.metrics().peer_forward_drops.get("queue_full"), 0);
}

fn token(user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": user, "exp": exp, "allowed_rooms": []}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_connection_and_all_targets_reach_connections_on_other_edges() {
    let jwt = [("auth.jwt.hs256-secret", JWT_SECRET)];
    let (a, b) = tokio::join!(
        start_edge("a", &jwt, PeerLinkConfig::default()),
        start_edge("b", &jwt, PeerLinkConfig::default()),
    );
    // No room interest at all: user, connection and `all` targets go to every known peer regardless.
    introduce(&[&a, &b]);
    let mut alice_on_b = Ws::connect(&b, &format!("?token={}", token("alice"))).await;
    let mut bob_on_b = Ws::connect(&b, &format!("?token={}", token("bob"))).await;
    // A non-JSON message earns an error frame whose requestId is the connection's id.
    bob_on_b.send_text("hello?".into()).await;
    let bob_id = bob_on_b.recv().await["requestId"].clone();
    assert!(bob_id.is_string(), "connection id: {bob_id}");

    let mut http_a = Http::connect(&a).await;
    http_a
        .publish(json!({"users": ["alice"], "data": {"to": "alice"}}))
        .await;
    assert_eq!(
        alice_on_b.recv().await,
        json!({"type": "message", "data": {"to": "alice"}})
    );

    http_a
        .publish(json!({"connections": [bob_id], "data": {"to": "bob"}}))
        .await;
    assert_eq!(
        bob_on_b.recv().await,
        json!({"type": "message", "data": {"to": "bob"}})
    );

    http_a
        .publish(json!({"all": true, "data": {"to": "everyone"}}))
        .await;
    for ws in [&mut alice_on_b, &mut bob_on_b] {
        assert_eq!(
            ws.recv().await,
            json!({"type": "message", "data": {"to": "everyone"}})
        );
    }
    alice_on_b.silent_for(Duration::from_millis(200)).await;
    bob_on_b.silent_for(Duration::from_millis(100)).await;
}

/// A listener that accepts TCP connections and then never says a word: a peer partitioned after its kernel
/// accepted (the worst case for a sender, which sees a "connected" socket).
async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_peer_never_slows_publishing_to_the_others() {
    // The queue bound applies to every peer of A, B included: it must hold whatever backlog B's link can build
    // up while a loaded machine (CI runs other test binaries alongside) deschedules it, or B would rightly
    // drop messages too. The partitioned peer still overflows it by PUBLISHES + 1 - CAPACITY.
    const CAPACITY: usize = 400;
    const PUBLISHES: usize = 900;
    let links = PeerLinkConfig {
        queue_capacity: CAPACITY,
        connect_timeout: Duration::from_secs(1),
        ..PeerLinkConfig::default()
    };
    // B's subscriber reads only after every publish (to check the order), which on a loaded machine can take
    // longer than the pong deadline: with busy pings on, B would rightly close it as a slow consumer. This test
    // is about A's peer queues, so B does not ping.
    let (a, b) = tokio::join!(
        start_edge("a", &[], links),
        start_edge(
            "b",
            &[("limits.busy-ping-interval-ms", "0")],
            PeerLinkConfig::default()
        ),
    );
    let hole = black_hole().await;
    introduce(&[&a, &b]);
    let room = json!({"load": "1"});
    apply(
        &[&a, &b],
        &[
            Change::EdgeUp {
                edge: "partitioned".into(),
                peer_addr: hole.to_string(),
            },
            interest(room.clone(), "b"),
            interest(room.clone(), "partitioned"),
        ],
    );
    let mut on_b = Ws::connect(&b, "").await;
    on_b.subscribe(room.clone(), "l").await;

    let mut http_a = Http::connect(&a).await;
    // Warm up: with a queue this small, a burst while the link to B is still dialing would overflow B's queue
    // too. (The partitioned peer gets this one queued as well.)
    http_a
        .publish(json!({"rooms": [room], "data": "warm-up"}))
        .await;
    assert_eq!(on_b.delivery("l").await, json!("warm-up"));

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..PUBLISHES {
        let one = Instant::now();
        http_a
            .publish(json!({"rooms": [room], "data": {"i": i}}))
            .await;
        slowest = slowest.max(one.elapsed());
    }
    let total = started.elapsed();
    // Generous bounds for a loaded debug build; a publisher blocked by the partitioned peer would sit out the 1 s
    // connect timeout (and then the backoff) over and over, and one waiting for it would never finish.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest publish {slowest:?}"
    );
    assert!(
        total < Duration::from_secs(10),
        "{PUBLISHES} publishes took {total:?}"
    );

    // B, a healthy peer, gets every message, in order, while the partitioned peer's queue is full.
    for i in 0..PUBLISHES {
        assert_eq!(on_b.delivery("l").await, json!({"i": i}), "message {i}");
    }

    // Nothing was ever taken off the partitioned peer's queue (no stream ever opened), so exactly the overflow
    // was dropped, and the queue holds the rest.
    let metrics = a.cluster.metrics();
    assert_eq!(
        metrics.peer_forward_drops.get("queue_full"),
        (PUBLISHES + 1 - CAPACITY) as u64
    );
    assert_eq!(a.cluster.links().queue_len("partitioned"), Some(CAPACITY));
    eventually("B's queue drained and acked", || {
        metrics.peer_forwards.get() == PUBLISHES as u64 + 1
    })
    .await;
    assert_eq!(metrics.peer_queue_depth.get(), CAPACITY as i64);
    assert_eq!(metrics.peer_links.get(), 2);
    let metrics_request = http::Request::get(format!("http://{}/metrics", a.http))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, text) = http_a.send(metrics_request).await;
    let dropped = format!(
        "herald_peer_forward_drops_total{{reason=\"queue_full\"}} {}",
        PUBLISHES + 1 - CAPACITY
    );
    assert!(text.contains(&dropped), "{text}");
    assert!(text.contains("herald_peer_links 2"), "{text}");

    // The partitioned peer leaving the cluster drops its link and what was queued for it.
    a.cluster.apply(
        REVISION.fetch_add(1, Ordering::Relaxed),
        &[Change::EdgeDown {
            edge: "partitioned".into(),
        }],
    );
    assert_eq!(metrics.peer_links.get(), 1);
    assert_eq!(metrics.peer_queue_depth.get(), 0);
    assert_eq!(metrics.peer_forward_drops.get("other"), CAPACITY as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_service_requires_the_cluster_secret() {
    let a = start_edge("a", &[], PeerLinkConfig::default()).await;
    let mut on_a = Ws::connect(&a, "").await;
    on_a.subscribe(json!({"r": 1}), "r").await;
    let mut client = PeerInternalClient::connect(format!("http://{}", a.peer))
        .await
        .unwrap();
    let batch = || ForwardBatch {
        origin_edge: "intruder".into(),
        publishes: vec![ForwardedPublish {
            seq: 1,
            rooms: vec![r#"{"r":1}"#.into()],
            data_json: b"\"hi\"".to_vec().into(),
            ..ForwardedPublish::default()
        }],
    };

    let refused = client
        .forward(tokio_stream::iter(vec![batch()]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let mut wrong = tonic::Request::new(tokio_stream::iter(vec![batch()]));
    wrong.metadata_mut().insert(
        CLUSTER_SECRET_HEADER,
        MetadataValue::from_static("not-the-secret"),
    );
    let refused = client.forward(wrong).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    on_a.silent_for(Duration::from_millis(200)).await;

    // With the secret, the same batch is delivered and acknowledged.
    let mut right = tonic::Request::new(tokio_stream::iter(vec![batch()]));
    right
        .metadata_mut()
        .insert(CLUSTER_SECRET_HEADER, MetadataValue::from_static(SECRET));
    let mut acks = client.forward(right).await.unwrap().into_inner();
    let ack = tokio::time::timeout(STEP, acks.message())
        .await
        .unwrap()
        .unwrap()
        .expect("an ack");
    assert_eq!((ack.through_seq, ack.subscriptions_reached), (1, 1));
    assert_eq!(on_a.delivery("r").await, json!("hi"));
}

/// A TCP relay to `target` whose connections can all be cut at once: a network blip between two edges.
struct Relay {
    addr: SocketAddr,
    cut: Arc<parking_lot::Mutex<CancellationToken>>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(parking_lot::Mutex::new(CancellationToken::new()));
        let current = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let token = current.lock().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Relay { addr, cut }
    }

    /// Closes every relayed connection; new ones are relayed again.
    fn cut(&self) {
        let old = std::mem::take(&mut *self.cut.lock());
        old.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_peer_stream_is_redialed_and_losses_are_counted_never_duplicated() {
    let links = PeerLinkConfig {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..PeerLinkConfig::default()
    };
    let (a, b) = tokio::join!(
        start_edge("a", &[], links),
        start_edge("b", &[], PeerLinkConfig::default()),
    );
    let relay = Relay::start(b.peer).await;
    let room = json!({"blip": 1});
    // A reaches B only through the relay.
    apply(
        &[&a],
        &[
            Change::EdgeUp {
                edge: "b".into(),
                peer_addr: relay.addr.to_string(),
            },
            interest(room.clone(), "b"),
        ],
    );
    let mut on_b = Ws::connect(&b, "").await;
    on_b.subscribe(room.clone(), "b").await;
    let mut http_a = Http::connect(&a).await;
    http_a.publish(json!({"rooms": [room], "data": 0})).await;
    assert_eq!(on_b.delivery("b").await, json!(0));

    relay.cut();
    // Keep publishing until B hears from A again: whatever went out on the dead stream is lost (and counted),
    // then the link redials and what was queued meanwhile flows.
    let mut received = vec![0];
    let mut published = 1;
    let deadline = Instant::now() + STEP;
    while received.len() == 1 {
        assert!(Instant::now() < deadline, "the link never came back");
        http_a
            .publish(json!({"rooms": [room], "data": published}))
            .await;
        published += 1;
        while let Some(data) = on_b.delivery_within(Duration::from_millis(20), "b").await {
            received.push(data.as_i64().unwrap());
        }
    }
    http_a.publish(json!({"rooms": [room], "data": -1})).await;
    loop {
        let data = on_b.delivery("b").await.as_i64().unwrap();
        if data == -1 {
            break;
        }
        received.push(data);
    }

    // At most once, in order: strictly increasing, so nothing was duplicated or reordered.
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "received {received:?}"
    );
    // Every forward that did not arrive was counted as dropped. (A forward B delivered but whose ack the cut
    // swallowed is counted too: the sender cannot tell, so the count is an upper bound.)
    let metrics = a.cluster.metrics();
    let dropped = metrics.peer_forward_drops.get("stream_broken")
        + metrics.peer_forward_drops.get("queue_full")
        + metrics.peer_forward_drops.get("other");
    let missing = published as u64 - (received.len() as u64);
    assert!(dropped >= missing, "{missing} missing, {dropped} counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_edge_drains_promptly_while_a_peer_holds_its_stream_open() {
    let fast_drain = [("shutdown.drain-delay-ms", "0")];
    let (a, b) = tokio::join!(
        start_edge("a", &fast_drain, PeerLinkConfig::default()),
        start_edge("b", &fast_drain, PeerLinkConfig::default()),
    );
    introduce(&[&a, &b]);
    let room = json!({"d": 1});
    apply(&[&a, &b], &[interest(room.clone(), "b")]);
    let mut on_b = Ws::connect(&b, "").await;
    on_b.subscribe(room.clone(), "d").await;
    let mut http_a = Http::connect(&a).await;
    http_a.publish(json!({"rooms": [room], "data": 1})).await;
    assert_eq!(on_b.delivery("d").await, json!(1));

    // A's forward stream into B is open and never ends on its own; B's drain must not wait for it.
    let started = Instant::now();
    let _ = b.shutdown.send(());
    let report = tokio::time::timeout(STEP, b.running)
        .await
        .expect("B drained in time")
        .unwrap()
        .unwrap();
    assert_eq!(report.connections_at_start, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drain took {:?}",
        started.elapsed()
    );
    // A stays up and keeps publishing (locally) without waiting for the departed peer.
    http_a.publish(json!({"rooms": [room], "data": 2})).await;
    drop(a.shutdown);
}
