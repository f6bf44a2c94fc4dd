//! The peer drivers against the real servers: start each one, subscribe over WebSocket from a second loopback
//! address, publish 100 messages and receive every one, exactly and in order. A peer that is not installed
//! (`scripts/install-bench-deps.sh` installs both) is skipped with a message saying so.

#[allow(dead_code, unreachable_pub)]
#[path = "../src/peers/mod.rs"]
mod peers;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use peers::nats::{NatsPublisher, NatsServer, NatsWsSubscriber};
use peers::sockudo::{PusherApp, PusherPublisher, PusherSubscriber, SockudoServer};
use peers::{Delivery, PeerError};

const MESSAGES: usize = 100;
/// Subscribers connect from here, as the harness's do, to check binding a source address.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A loopback port nothing listens on right now (the servers need fixed ports in their config files).
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// A fresh directory for one server's config and log, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-peers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_running(pid: u32) {
    assert!(
        Path::new(&format!("/proc/{pid}/status")).exists(),
        "no process {pid}"
    );
}

async fn receive(
    count: usize,
    mut next: impl AsyncFnMut() -> Result<Delivery, PeerError>,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match tokio::time::timeout_at(deadline, next()).await {
            Ok(delivery) => got.push(delivery.expect("receive")),
            Err(_) => panic!("received {} of {count} deliveries in 20 s", got.len()),
        }
    }
    got
}

#[tokio::test]
async fn nats_over_websocket_delivers_every_message_in_order() {
    let Some(binary) = NatsServer::binary() else {
        eprintln!("skipping: nats-server is not installed (run scripts/install-bench-deps.sh)");
        return;
    };
    let dir = TempDir::new("nats");
    let server = NatsServer::start(&binary, &dir.0, free_addr(), free_addr())
        .await
        .expect("start nats-server");
    assert_running(server.pid());

    let mut subscriber = NatsWsSubscriber::connect(server.ws_addr(), Some(CLIENT_IP))
        .await
        .expect("connect subscriber");
    let acks = subscriber
        .subscribe_all(&["room.1", "room.*"])
        .await
        .expect("subscribe");
    eprintln!("nats: subscribe acks {acks:?}");
    assert!(subscriber.subscribe("bad subject").await.is_err());

    let mut publisher = NatsPublisher::connect(server.client_addr(), None)
        .await
        .expect("connect publisher");
    let payloads: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|i| {
            format!("{i:04} \"quoted\" \\ \r\n binary:")
                .into_bytes()
                .into_iter()
                .chain([0, 0xff, i as u8])
                .collect()
        })
        .collect();
    for payload in &payloads {
        publisher.publish("room.1", payload).expect("publish");
        publisher.flush().await.expect("flush");
    }
    publisher
        .publish("room.2", b"wildcard only")
        .expect("publish");
    publisher.sync().await.expect("sync");

    // Every message twice (once per matching subscription), each subscription's in publish order.
    let got = receive(2 * MESSAGES + 1, async || subscriber.next().await).await;
    for sid in 0..2 {
        let stream: Vec<&Delivery> = got.iter().filter(|d| d.subscription == sid).collect();
        let expected = if sid == 0 { MESSAGES } else { MESSAGES + 1 };
        assert_eq!(stream.len(), expected, "subscription {sid}");
        for (i, payload) in payloads.iter().enumerate() {
            assert_eq!(&stream[i].topic[..], b"room.1");
            assert_eq!(
                &stream[i].payload[..],
                &payload[..],
                "subscription {sid} message {i}"
            );
        }
    }
    let last = got
        .iter()
        .find(|d| &d.topic[..] == b"room.2")
        .expect("wildcard delivery");
    assert_eq!(
        (last.subscription, &last.payload[..]),
        (1, &b"wildcard only"[..])
    );
    eprintln!(
        "nats: {} deliveries checked, server pid {}",
        got.len(),
        server.pid()
    );
}

#[tokio::test]
async fn sockudo_delivers_every_message_in_order() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Some(binary) = SockudoServer::binary(&repo) else {
        eprintln!("skipping: sockudo is not installed (run scripts/install-bench-deps.sh)");
        return;
    };
    let dir = TempDir::new("sockudo");
    let app = PusherApp::default();
    let server = SockudoServer::start(&binary, &dir.0, free_addr(), free_addr(), app.clone())
        .await
        .expect("start sockudo");
    assert_running(server.pid());

    let mut subscriber = PusherSubscriber::connect(server.addr(), &app.key, Some(CLIENT_IP))
        .await
        .expect("connect subscriber");
    let acks = subscriber
        .subscribe_all(&["room-1", "room-2"])
        .await
        .expect("subscribe");
    eprintln!(
        "sockudo: socket {} subscribe acks {acks:?}",
        subscriber.socket_id()
    );
    assert!(
        PusherSubscriber::connect(server.addr(), "no-such-key", None)
            .await
            .is_err()
    );

    let mut publisher = PusherPublisher::connect(server.addr(), app.clone(), None)
        .await
        .expect("connect publisher");
    let payloads: Vec<String> = (0..MESSAGES)
        .map(|i| format!("{i:04} \"quoted\" \\ back\\slash \n ünïcødé {{\"json\":true}}"))
        .collect();
    for payload in &payloads[..MESSAGES / 2] {
        publisher
            .publish(&["room-1"], payload.as_bytes())
            .await
            .expect("publish");
    }
    let batch: Vec<(&str, &str)> = payloads[MESSAGES / 2..]
        .iter()
        .map(|p| ("room-1", p.as_str()))
        .collect();
    publisher
        .publish_batch(&batch)
        .await
        .expect("publish batch");
    publisher
        .publish(&["room-1", "room-2"], b"two channels")
        .await
        .expect("publish");
    assert!(
        publisher.publish(&["room-1"], &[0xff]).await.is_err(),
        "non-UTF-8 payload refused"
    );

    let got = receive(MESSAGES + 2, async || subscriber.next().await).await;
    for (i, payload) in payloads.iter().enumerate() {
        assert_eq!(
            (got[i].subscription, &got[i].topic[..]),
            (0, &b"room-1"[..])
        );
        assert_eq!(&got[i].payload[..], payload.as_bytes(), "message {i}");
    }
    let mut tail: Vec<(usize, &[u8])> = got[MESSAGES..]
        .iter()
        .map(|d| (d.subscription, &d.payload[..]))
        .collect();
    tail.sort();
    assert_eq!(
        tail,
        vec![(0, &b"two channels"[..]), (1, &b"two channels"[..])]
    );

    // A bad signature is refused.
    let mut wrong = PusherPublisher::connect(
        server.addr(),
        PusherApp {
            secret: "wrong".into(),
            ..app
        },
        None,
    )
    .await
    .expect("connect publisher");
    let refused = wrong.publish(&["room-1"], b"x").await;
    assert!(
        matches!(refused, Err(PeerError::Rejected(_))),
        "{refused:?}"
    );
    eprintln!(
        "sockudo: {} deliveries checked, server pid {}, the publisher opened {} connections for 52 requests",
        got.len(),
        server.pid(),
        publisher.connections_opened()
    );
}
