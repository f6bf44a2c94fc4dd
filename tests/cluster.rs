//! The cluster from the outside: real `herald registry` and `herald dev` processes on loopback, data in temp
//! dirs, real WebSocket clients. A publish on one edge reaches subscribers on every edge exactly once.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{free_port, Dir, Proc};
use support::*;

const SECRET: &str = "cluster-test-secret-0123456789";

struct Cluster {
    registries: Vec<Option<Proc>>,
    registry_args: Vec<Vec<String>>,
    registry_addrs: Vec<String>,
    edges: Vec<Proc>,
    _data: Vec<Dir>,
}

impl Cluster {
    /// SIGKILLs registry member `i` (0-based).
    fn kill_registry(&mut self, i: usize) {
        self.registries[i] = None;
    }

    /// Starts registry member `i` again from its data directory.
    fn restart_registry(&mut self, i: usize) {
        self.registries[i] = Some(Proc::spawn(&self.registry_args[i]));
    }

    fn client(&self) -> herald_registry::client::RegistryClient {
        herald_registry::client::RegistryClient::new(
            self.registry_addrs.clone(),
            herald_registry::grpc::ClusterSecret::new(SECRET).unwrap(),
        )
        .unwrap()
    }

    /// The registry's view: (leader node id, registered edge ids).
    async fn status(&self) -> Option<(u64, Vec<String>)> {
        let status = self.client().status().await.ok()?;
        Some((
            status.leader_id?,
            status.edges.into_iter().map(|e| e.edge).collect(),
        ))
    }
}

fn start_cluster(registries: usize, edges: usize) -> Cluster {
    let ports: Vec<u16> = (0..registries).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let mut data = Vec::new();
    let mut registry_procs = Vec::new();
    let mut registry_args = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let dir = Dir::new(&format!("r{}", i + 1));
        let args: Vec<String> = vec![
            "registry".into(),
            "--node-id".into(),
            (i + 1).to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--peers".into(),
            peers.join(","),
            "--data-dir".into(),
            dir.0.display().to_string(),
            "--cluster-secret".into(),
            SECRET.into(),
        ];
        registry_procs.push(Some(Proc::spawn(&args)));
        registry_args.push(args);
        data.push(dir);
    }
    let registry_addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let edge_procs = (0..edges)
        .map(|i| {
            Proc::spawn(&[
                "dev".into(),
                "--port".into(),
                "0".into(),
                "--grpc-port".into(),
                "0".into(),
                "--set".into(),
                format!("cluster.registry={}", registry_addrs.join(",")),
                "--set".into(),
                format!("cluster.secret={SECRET}"),
                "--set".into(),
                "cluster.peer-port=0".into(),
                "--set".into(),
                format!("cluster.edge-id=edge-{i}"),
                "--set".into(),
                format!("auth.api-keys={API_KEY}"),
            ])
        })
        .collect();
    Cluster {
        registries: registry_procs,
        registry_args,
        registry_addrs,
        edges: edge_procs,
        _data: data,
    }
}

async fn client(edge: &Proc) -> WsClient {
    let mut client = WsClient::connect(&format!("ws://{}/ws/", edge.field("http")), &[]).await;
    assert_eq!(client.recv_json().await["is_authorized"], true);
    client
}

async fn publish(edge: &Proc, body: Value) -> Value {
    let (status, text) = http_request(
        "POST",
        &format!("http://{}/api/v1/publish", edge.field("http")),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {API_KEY}")),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Publishes probes on `from` until every client has seen one, so the registry's interest has reached
/// `from`'s replica; then drains the probes.
async fn wait_for_interest(from: &Proc, room: Value, clients: &mut [&mut WsClient]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = vec![false; clients.len()];
    while seen.iter().any(|s| !s) {
        assert!(
            Instant::now() < deadline,
            "interest never propagated: {seen:?}"
        );
        publish(from, json!({"rooms": [room], "data": "probe"})).await;
        for (i, c) in clients.iter_mut().enumerate() {
            while let Ok(Some(Ok(msg))) = tokio::time::timeout(
                Duration::from_millis(100),
                futures_util::StreamExt::next(&mut c.ws),
            )
            .await
            {
                if msg.to_text().unwrap_or("").contains("probe") {
                    seen[i] = true;
                }
            }
        }
    }
    // Let in-flight probes land, then discard them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in clients.iter_mut() {
        while let Ok(Some(_)) = tokio::time::timeout(
            Duration::from_millis(50),
            futures_util::StreamExt::next(&mut c.ws),
        )
        .await
        {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_edge_reaches_every_edge_exactly_once() {
    let cluster = start_cluster(3, 3);
    let mut on_a = client(&cluster.edges[0]).await;
    let mut on_b = client(&cluster.edges[1]).await;
    let mut on_c = client(&cluster.edges[2]).await;
    on_a.subscribe(json!("a"), json!({"chat": "room-1"})).await;
    on_b.subscribe(json!("b"), json!({"chat": "room-1"})).await;
    // A wildcard subscription on C matches publishes to any chat room, across nodes.
    on_c.subscribe(json!("c"), json!({"chat": "*"})).await;

    wait_for_interest(
        &cluster.edges[0],
        json!({"chat": "room-1"}),
        &mut [&mut on_b, &mut on_c],
    )
    .await;
    // A's own subscriber saw the probes too; drain them.
    while let Ok(Some(_)) = tokio::time::timeout(
        Duration::from_millis(50),
        futures_util::StreamExt::next(&mut on_a.ws),
    )
    .await
    {}

    for i in 0..20 {
        publish(
            &cluster.edges[0],
            json!({"rooms": [{"chat": "room-1"}], "data": {"n": i}}),
        )
        .await;
    }
    for (client, rid) in [(&mut on_a, "a"), (&mut on_b, "b"), (&mut on_c, "c")] {
        for i in 0..20 {
            let frame = client.recv_json().await;
            assert_eq!(
                frame,
                json!({"type": "publish", "data": {"n": i}, "requestId": rid})
            );
        }
        client.expect_silence(Duration::from_millis(300)).await;
    }

    // A publish to another chat room on B reaches only C's wildcard subscriber.
    wait_for_interest(
        &cluster.edges[1],
        json!({"chat": "room-2"}),
        &mut [&mut on_c],
    )
    .await;
    publish(
        &cluster.edges[1],
        json!({"rooms": [{"chat": "room-2"}], "data": "only-c"}),
    )
    .await;
    assert_eq!(on_c.recv_json().await["data"], "only-c");
    on_a.expect_silence(Duration::from_millis(200)).await;
    on_b.expect_silence(Duration::from_millis(200)).await;
}

/// Publishes `0..count` to `room` on the edge at `http`, one every 5 ms, each answered 200.
fn spawn_publish_load(http: String, room: Value, count: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for seq in 0..count {
            let (status, _) = http_request(
                "POST",
                &format!("http://{http}/api/v1/publish"),
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Bearer {API_KEY}")),
                ],
                json!({"rooms": [room], "data": seq}).to_string(),
            )
            .await;
            assert_eq!(status, 200);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// A subscriber read continuously in the background while a test does something else, as a real client reads: a
/// client that leaves its socket unread for seconds while deliveries arrive does not answer the edge's pings and
/// is closed as a slow consumer (4008).
struct Collector {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(WsClient, Vec<Value>)>,
}

impl Collector {
    /// Starts reading `client`, keeping the `data` of each publish.
    fn start(mut client: WsClient) -> Collector {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                // `next` is cancel-safe: the stream keeps its state, not the future.
                let msg = tokio::select! {
                    msg = futures_util::StreamExt::next(&mut client.ws) => msg,
                    _ = &mut stopped => break,
                };
                let Some(Ok(msg)) = msg else {
                    panic!("the subscriber's connection ended: {msg:?}")
                };
                if let Ok(frame) = serde_json::from_str::<Value>(msg.to_text().unwrap_or("")) {
                    if frame["type"] == "publish" {
                        out.push(frame["data"].clone());
                    }
                }
            }
            (client, out)
        });
        Collector { stop, task }
    }

    /// Stops, drains what is still arriving within `quiet` of silence, and returns the client and every
    /// publish's `data`.
    async fn finish(self, quiet: Duration) -> (WsClient, Vec<Value>) {
        let _ = self.stop.send(());
        let (mut client, mut out) = self.task.await.unwrap();
        out.extend(drain(&mut client, quiet).await);
        (client, out)
    }
}

/// Drains everything a client has received within `quiet` of silence, returning the `data` of each publish.
async fn drain(client: &mut WsClient, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(quiet, futures_util::StreamExt::next(&mut client.ws)).await
    {
        if let Ok(frame) = serde_json::from_str::<Value>(msg.to_text().unwrap_or("")) {
            if frame["type"] == "publish" {
                out.push(frame["data"].clone());
            }
        }
    }
    out
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_registry_leader_loses_no_delivery() {
    let mut cluster = start_cluster(3, 3);
    let mut subscribers = Vec::new();
    for (i, edge) in cluster.edges.iter().enumerate() {
        let mut c = client(edge).await;
        c.subscribe(json!(i), json!({"feed": "steady"})).await;
        subscribers.push(c);
    }
    {
        let mut refs: Vec<&mut WsClient> = subscribers.iter_mut().skip(1).collect();
        wait_for_interest(&cluster.edges[0], json!({"feed": "steady"}), &mut refs).await;
    }
    drain(&mut subscribers[0], Duration::from_millis(100)).await;
    let subscribers: Vec<Collector> = subscribers.into_iter().map(Collector::start).collect();

    let leader = cluster.status().await.expect("a leader").0;
    // A steady publish load on edge A while the leader dies.
    let load = spawn_publish_load(
        cluster.edges[0].field("http"),
        json!({"feed": "steady"}),
        300,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_registry(leader as usize - 1);
    let killed_at = Instant::now();

    // A new subscription on C, made after the kill, is visible cluster-wide within 2 s.
    let mut late = client(&cluster.edges[2]).await;
    late.subscribe(json!("late"), json!({"feed": "late"})).await;
    let origin = &cluster.edges[0];
    let mut reached = false;
    while killed_at.elapsed() < Duration::from_secs(2) {
        publish(
            origin,
            json!({"rooms": [{"feed": "late"}], "data": "hello-late"}),
        )
        .await;
        if let Ok(Ok(text)) =
            tokio::time::timeout(Duration::from_millis(100), late.next_text()).await
        {
            if text.contains("hello-late") {
                reached = true;
                break;
            }
        }
    }
    assert!(
        reached,
        "a subscription made after the leader died was not visible cluster-wide within 2 s"
    );
    eprintln!(
        "new subscription visible {:?} after the leader was killed",
        killed_at.elapsed()
    );

    load.await.unwrap();
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let (_, got) = subscriber.finish(Duration::from_millis(500)).await;
        let expected: Vec<Value> = (0..300u64).map(|n| json!(n)).collect();
        assert_eq!(
            got, expected,
            "subscriber on edge {i} lost, duplicated or reordered deliveries"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_keep_working_while_the_registry_is_down_and_catch_up_after() {
    let mut cluster = start_cluster(3, 2);
    let mut on_b = client(&cluster.edges[1]).await;
    on_b.subscribe(json!("before"), json!({"news": "before"}))
        .await;
    wait_for_interest(
        &cluster.edges[0],
        json!({"news": "before"}),
        &mut [&mut on_b],
    )
    .await;

    for i in 0..3 {
        cluster.kill_registry(i);
    }
    // Publishing keeps working with the cached replica, and local subscriptions keep working.
    publish(
        &cluster.edges[0],
        json!({"rooms": [{"news": "before"}], "data": "during"}),
    )
    .await;
    assert_eq!(on_b.recv_json().await["data"], "during");
    on_b.subscribe(json!("outage"), json!({"news": "outage"}))
        .await;
    publish(
        &cluster.edges[1],
        json!({"rooms": [{"news": "outage"}], "data": "local"}),
    )
    .await;
    assert_eq!(on_b.recv_json().await["data"], "local");

    // The interest change queued during the outage reaches the registry when it returns.
    for i in 0..3 {
        cluster.restart_registry(i);
    }
    wait_for_interest(
        &cluster.edges[0],
        json!({"news": "outage"}),
        &mut [&mut on_b],
    )
    .await;
    publish(
        &cluster.edges[0],
        json!({"rooms": [{"news": "outage"}], "data": "after"}),
    )
    .await;
    assert_eq!(on_b.recv_json().await["data"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edge_disappears_within_its_lease() {
    let mut cluster = start_cluster(3, 2);
    let mut on_b = client(&cluster.edges[1]).await;
    on_b.subscribe(json!("x"), json!({"t": 1})).await;
    wait_for_interest(&cluster.edges[0], json!({"t": 1}), &mut [&mut on_b]).await;
    wait_until("both edges registered", Duration::from_secs(10), || async {
        cluster
            .status()
            .await
            .is_some_and(|(_, edges)| edges.len() == 2)
    })
    .await;

    drop(on_b);
    let victim = cluster.edges.remove(1);
    drop(victim); // SIGKILL
    let killed_at = Instant::now();
    wait_until(
        "the dead edge's removal",
        Duration::from_secs(10),
        || async {
            cluster
                .status()
                .await
                .is_some_and(|(_, edges)| edges == vec!["edge-0".to_string()])
        },
    )
    .await;
    // Default lease TTL 3 s, swept every 0.5 s; the rest is slack for a loaded machine.
    assert!(
        killed_at.elapsed() < Duration::from_secs(6),
        "took {:?}",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_publish_load_lose_nothing() {
    let mut cluster = start_cluster(3, 2);
    let mut on_b = client(&cluster.edges[1]).await;
    on_b.subscribe(json!("m"), json!({"feed": "membership"}))
        .await;
    wait_for_interest(
        &cluster.edges[0],
        json!({"feed": "membership"}),
        &mut [&mut on_b],
    )
    .await;

    // A steady publish load on edge A while the registry's membership changes.
    let collector = Collector::start(on_b);
    let load = spawn_publish_load(
        cluster.edges[0].field("http"),
        json!({"feed": "membership"}),
        400,
    );

    // Add a 4th member (it lists the running members, and its id is the largest, so it joins instead of
    // bootstrapping a group of its own), promote it, then remove member 1.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = Dir::new("r4");
    let mut peers: Vec<String> = cluster
        .registry_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    peers.push(format!("4={addr}"));
    let _fourth = Proc::spawn(&[
        "registry".into(),
        "--node-id".into(),
        "4".into(),
        "--listen".into(),
        addr.clone(),
        "--peers".into(),
        peers.join(","),
        "--data-dir".into(),
        dir.0.display().to_string(),
        "--cluster-secret".into(),
        SECRET.into(),
    ]);
    let registry = cluster.client();
    registry.add_learner(4, &addr).await.expect("add learner");
    wait_until(
        "the learner to catch up",
        Duration::from_secs(15),
        || async {
            registry.status().await.is_ok_and(|s| {
                s.members
                    .iter()
                    .any(|m| m.node_id == 4 && !m.voter && m.lag == Some(0))
            })
        },
    )
    .await;
    registry
        .change_membership([1, 2, 3, 4].into_iter().collect())
        .await
        .expect("promote");
    registry
        .change_membership([2, 3, 4].into_iter().collect())
        .await
        .expect("remove member 1");
    cluster.kill_registry(0);
    let status = registry.status().await.expect("status after the change");
    let mut voters: Vec<u64> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect();
    voters.sort();
    assert_eq!(voters, vec![2, 3, 4]);

    load.await.unwrap();
    let (mut on_b, got) = collector.finish(Duration::from_millis(500)).await;
    let expected: Vec<Value> = (0..400u64).map(|n| json!(n)).collect();
    assert_eq!(
        got, expected,
        "deliveries were lost, duplicated or reordered during the membership change"
    );

    // The registry still takes interest changes after the change: a new subscription becomes visible.
    on_b.subscribe(json!("after"), json!({"feed": "after-change"}))
        .await;
    wait_for_interest(
        &cluster.edges[0],
        json!({"feed": "after-change"}),
        &mut [&mut on_b],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_registry_restart_restores_every_committed_change() {
    let mut cluster = start_cluster(3, 1);
    let mut on_a = client(&cluster.edges[0]).await;
    for room in ["r1", "r2", "r3"] {
        on_a.subscribe(json!(room), json!({"room": room})).await;
    }
    // Wait until the registry has the edge with all three rooms.
    let rooms_of_edge = |status: herald_proto::v1::StatusReply| {
        status
            .edges
            .iter()
            .find(|e| e.edge == "edge-0")
            .map(|e| e.rooms)
    };
    wait_until(
        "the edge's interest to be committed",
        Duration::from_secs(10),
        || async {
            cluster
                .client()
                .status()
                .await
                .is_ok_and(|s| rooms_of_edge(s) == Some(3))
        },
    )
    .await;

    // Stop the edge first so it cannot re-register and mask what the registry remembers; then every member.
    drop(on_a);
    cluster.edges.clear();
    for i in 0..3 {
        cluster.kill_registry(i);
    }
    for i in 0..3 {
        cluster.restart_registry(i);
    }
    // Straight after the restart (well inside the edge's lease, which a new leader restarts in full) the
    // registered edge and its rooms are back, read from the members' data directories.
    wait_until(
        "the restarted registry to answer",
        Duration::from_secs(10),
        || async {
            cluster
                .client()
                .status()
                .await
                .is_ok_and(|s| s.leader_id.is_some() && rooms_of_edge(s) == Some(3))
        },
    )
    .await;
}
