//! Limits and hostile input: each limit in the config has a test that shows the offender gets a clear error (an
//! error frame or a documented close code) and nobody else is harmed.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

async fn send_frame(client: &mut WsClient, opcode: OpCode, payload: Vec<u8>, fin: bool) {
    client
        .ws
        .send(Message::Frame(Frame::message(payload, opcode, fin)))
        .await
        .unwrap();
}

#[tokio::test]
async fn messages_over_the_size_limit_close_with_1009() {
    let server = start_server(&[("limits.max-message-bytes", "1024")]).await;
    let mut bystander = server.client().await;

    // Exactly at the limit is fine.
    let mut client = server.client().await;
    let prefix = r#"{"type":"status","pad":""#;
    let at_limit = format!("{prefix}{}\"}}", "x".repeat(1024 - prefix.len() - 2));
    assert_eq!(at_limit.len(), 1024);
    client.send_text(&at_limit).await;
    assert!(client.recv_json().await["open_connections"].is_u64());

    // One frame over the limit.
    client.send_text(&"y".repeat(1025)).await;
    assert_eq!(client.expect_close().await, Ended::Closed(Some(1009)));

    // A fragmented message whose fragments are small but whose total is over the limit.
    let mut fragmented = server.client().await;
    send_frame(
        &mut fragmented,
        OpCode::Data(Data::Text),
        vec![b'a'; 600],
        false,
    )
    .await;
    send_frame(
        &mut fragmented,
        OpCode::Data(Data::Continue),
        vec![b'a'; 600],
        true,
    )
    .await;
    assert_eq!(fragmented.expect_close().await, Ended::Closed(Some(1009)));

    bystander.send_text("ping").await;
    assert_eq!(bystander.recv_text().await, "pong");
    assert_eq!(
        server
            .metric("herald_client_errors_total{kind=\"too_large\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn fragmented_messages_within_the_limit_are_reassembled() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    send_frame(&mut client, OpCode::Data(Data::Text), b"pi".to_vec(), false).await;
    send_frame(
        &mut client,
        OpCode::Data(Data::Continue),
        b"ng".to_vec(),
        true,
    )
    .await;
    assert_eq!(client.recv_text().await, "pong");
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    send_frame(
        &mut client,
        OpCode::Data(Data::Text),
        vec![b'{', 0xff, 0xfe, b'}'],
        true,
    )
    .await;
    assert_eq!(client.expect_close().await, Ended::Closed(Some(1007)));

    // Split inside a multi-byte character across fragments is valid; an invalid sequence across them is not.
    let mut split = server.client().await;
    send_frame(
        &mut split,
        OpCode::Data(Data::Text),
        vec![b'"', 0xc3],
        false,
    )
    .await;
    send_frame(
        &mut split,
        OpCode::Data(Data::Continue),
        vec![0xa9, b'"'],
        true,
    )
    .await;
    assert_eq!(
        split.recv_json().await["message"],
        "message-type-not-allowed"
    );
    send_frame(
        &mut split,
        OpCode::Data(Data::Text),
        vec![b'"', 0xc3],
        false,
    )
    .await;
    send_frame(&mut split, OpCode::Data(Data::Continue), vec![b'"'], true).await;
    assert_eq!(split.expect_close().await, Ended::Closed(Some(1007)));
}

#[tokio::test]
async fn binary_frames_get_an_error_frame() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client
        .ws
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    let reply = client.recv_json().await;
    assert_eq!(reply["code"], "error");
    assert_eq!(reply["message"], "binary-not-supported");
    client.send_text("ping").await;
    assert_eq!(client.recv_text().await, "pong");
}

#[tokio::test]
async fn subscriptions_per_connection_are_capped() {
    let server = start_server(&[("limits.max-subscriptions-per-connection", "2")]).await;
    let mut client = server.client().await;
    assert_eq!(
        client.subscribe(json!(1), json!({"r": 1})).await["code"],
        "success"
    );
    assert_eq!(
        client.subscribe(json!(2), json!({"r": 2})).await["code"],
        "success"
    );
    assert_eq!(
        client.subscribe(json!(3), json!({"r": 3})).await,
        json!({"code": "error", "message": "too-many-subscriptions", "requestId": 3})
    );
    client
        .send_json(json!({"type": "unsubscribe", "requestId": 1}))
        .await;
    client.recv_json().await;
    assert_eq!(
        client.subscribe(json!(3), json!({"r": 3})).await["code"],
        "success"
    );
}

#[tokio::test]
async fn origins_outside_the_allow_list_are_refused() {
    let server = start_server(&[(
        "limits.allowed-origins",
        "https://app.example, https://*.example.org",
    )])
    .await;
    for origin in ["https://app.example", "https://eu.example.org"] {
        let mut client = WsClient::connect(&server.ws_url(), &[("origin", origin)]).await;
        assert_eq!(client.recv_json().await["is_authorized"], true, "{origin}");
    }
    for origin in [
        "https://evil.example",
        "http://app.example",
        "https://example.org.evil",
    ] {
        match WsClient::try_connect(&server.ws_url(), &[("origin", origin)]).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 403, "{origin}")
            }
            other => panic!(
                "{origin}: expected 403, got {:?}",
                other.map(|_| "a connection")
            ),
        }
    }
    // Non-browser clients send no Origin; the allow-list is a browser protection and lets them through.
    let mut client = WsClient::connect(&server.ws_url(), &[]).await;
    assert_eq!(client.recv_json().await["is_authorized"], true);
    assert_eq!(
        server
            .metric("herald_connections_refused_total{reason=\"origin\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn inbound_rate_is_limited_per_connection() {
    let server = start_server(&[
        ("limits.inbound-messages-per-second", "1"),
        ("limits.inbound-burst", "3"),
    ])
    .await;
    let mut chatty = server.client().await;
    let mut calm = server.client().await;
    for _ in 0..6 {
        chatty.send_text("ping").await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..6 {
        match chatty.recv_text().await.as_str() {
            "pong" => pongs += 1,
            text => {
                let reply: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(reply["message"], "rate-limited");
                limited += 1;
            }
        }
    }
    assert_eq!((pongs, limited), (3, 3));
    // Another connection has its own budget.
    calm.send_text("ping").await;
    assert_eq!(calm.recv_text().await, "pong");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let server = start_server(&[("limits.idle-timeout-secs", "1")]).await;
    let mut client = server.client().await;
    let started = std::time::Instant::now();
    assert_eq!(client.expect_close().await, Ended::Closed(Some(1000)));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// A subscriber that stops reading is closed with 4008 once its queue overflows, while a subscriber of the same
/// room that keeps reading gets every message and publishers keep being answered.
#[tokio::test]
async fn a_slow_consumer_is_disconnected_without_slowing_anyone() {
    let server = start_server(&[
        ("limits.outbound-queue-bytes", "1048576"),
        ("limits.outbound-queue-frames", "100000"),
        // The queue bound alone: the ping check would also close this client, once a write blocked long enough.
        ("limits.busy-ping-interval-ms", "0"),
    ])
    .await;
    let mut slow = server.client().await;
    slow.subscribe(json!("slow"), json!({"feed": "big"})).await;
    let mut fast = server.client().await;
    fast.subscribe(json!("fast"), json!({"feed": "big"})).await;

    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (received.clone(), stop.clone());
    let reader = tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) || r.load(Ordering::Relaxed) == 0 {
            match tokio::time::timeout(Duration::from_millis(500), fast.next_text()).await {
                Ok(Ok(_)) => {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(ended)) => panic!("the fast subscriber was cut off: {ended:?}"),
                Err(_) => {}
            }
        }
        fast
    });

    let payload = "x".repeat(16 * 1024);
    let mut published = 0u64;
    for _ in 0..4000 {
        server
            .publish(json!({"rooms": [{"feed": "big"}], "data": payload}))
            .await;
        published += 1;
        if published.is_multiple_of(25)
            && server
                .metric("herald_slow_consumer_disconnects_total")
                .await
                >= 1.0
        {
            break;
        }
    }
    assert_eq!(
        server
            .metric("herald_slow_consumer_disconnects_total")
            .await,
        1.0
    );
    // Let the fast reader catch up, then stop it.
    for _ in 0..200 {
        if received.load(Ordering::Relaxed) == published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _fast = reader.await.unwrap();
    assert_eq!(
        received.load(Ordering::Relaxed),
        published,
        "the fast subscriber got every message"
    );

    // The slow client, reading at last, finds the documented close code after what was already in flight.
    assert_eq!(slow.expect_close().await, Ended::Closed(Some(4008)));
    assert!(
        server
            .metric("herald_messages_dropped_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn protocol_pings_are_answered_and_count_as_activity() {
    let server = start_server(&[("limits.idle-timeout-secs", "1")]).await;
    let mut client = server.client().await;
    // Pinging every 400 ms for 2 s keeps a 1 s idle timeout away.
    for i in 0..5u8 {
        client.ws.send(Message::Ping(vec![i].into())).await.unwrap();
        let pong = tokio::time::timeout(STEP, futures_util::StreamExt::next(&mut client.ws))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(pong, Message::Pong(vec![i].into()));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Then silence closes it.
    assert_eq!(client.expect_close().await, Ended::Closed(Some(1000)));
}

#[tokio::test]
async fn grpc_messages_over_the_body_limit_are_refused() {
    use herald_proto::v1::publisher_client::PublisherClient;
    use herald_proto::v1::{target, PublishRequest, Target};
    let server = start_server(&[("limits.max-publish-body-bytes", "1024")]).await;
    let mut grpc = PublisherClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let request = |size: usize| {
        let mut request = tonic::Request::new(PublishRequest {
            targets: vec![Target {
                kind: Some(target::Kind::All(true)),
            }],
            data_json: serde_json::to_vec(&"x".repeat(size)).unwrap(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {API_KEY}").parse().unwrap(),
        );
        request
    };
    let error = grpc.publish(request(2000)).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::OutOfRange, "{error}");
    // The channel and the server are fine afterwards.
    assert!(grpc.publish(request(10)).await.is_ok());
}

/// Counts a subscriber's deliveries in the background, reading (and so answering pings) all the time.
struct Reading {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WsClient>,
}

impl Reading {
    fn start(mut client: WsClient) -> Reading {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), client.next_text()).await {
                    Ok(Ok(_)) => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(ended)) => panic!("the healthy subscriber was cut off: {ended:?}"),
                    Err(_) => {}
                }
            }
            client
        });
        Reading {
            received,
            stop,
            task,
        }
    }

    /// Waits until `count` deliveries arrived (or a few seconds passed), then stops reading.
    async fn finish(self, count: u64) -> (u64, WsClient) {
        for _ in 0..200 {
            if self.received.load(Ordering::Relaxed) >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let client = self.task.await.unwrap();
        (self.received.load(Ordering::Relaxed), client)
    }
}

/// Scenario 5 of the loadtest issue: a subscriber that stops reading is found by the ping appended to its
/// deliveries, long before its queue could overflow behind the kernel's socket buffers, and closed with 4008 within
/// busy interval + pong timeout; a healthy subscriber of the same room, which answers its pings by reading, loses
/// nothing.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_within_the_pong_timeout() {
    const BUSY_MS: u64 = 200;
    const PONG_TIMEOUT_MS: u64 = 800;
    let server = start_server(&[
        ("limits.busy-ping-interval-ms", &BUSY_MS.to_string()),
        ("limits.pong-timeout-ms", &PONG_TIMEOUT_MS.to_string()),
    ])
    .await;
    let mut healthy = server.client().await;
    healthy.subscribe(json!("h"), json!({"feed": "live"})).await;
    let healthy = Reading::start(healthy);

    // The slow subscriber reads its authorization and its subscribe answer, then never reads again.
    let mut slow = RawWs::connect(server.http).await;
    slow.send_json(json!({"type": "subscribe", "requestId": "s", "room": {"feed": "live"}}))
        .await;
    loop {
        let (opcode, payload) = slow.read_frame().await.expect("the subscribe answer");
        if opcode == OP_TEXT && String::from_utf8_lossy(&payload).contains("success") {
            break;
        }
    }
    let stopped = std::time::Instant::now();

    // A modest rate: 40 small messages a second, which the socket buffers would absorb for hours.
    let mut published = 0u64;
    let mut detected = None;
    while stopped.elapsed() < Duration::from_secs(10) {
        server
            .publish(json!({"rooms": [{"feed": "live"}], "data": {"n": published}}))
            .await;
        published += 1;
        if detected.is_none()
            && server
                .metric("herald_slow_consumer_disconnects_total")
                .await
                >= 1.0
        {
            detected = Some(stopped.elapsed());
        }
        // Keep publishing a while after the close: the healthy subscriber must not notice any of it.
        if detected.is_some_and(|at| stopped.elapsed() > at + Duration::from_millis(500)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let detected = detected.expect("the stopped reader was never disconnected");
    // Busy interval + pong timeout, plus slack for a loaded test machine.
    let bound = Duration::from_millis(BUSY_MS + PONG_TIMEOUT_MS + 1500);
    assert!(
        detected <= bound,
        "disconnected after {detected:?}, bound {bound:?}"
    );
    assert!(server.metric("herald_pings_sent_total").await >= 1.0);

    let (received, _healthy) = healthy.finish(published).await;
    assert_eq!(
        received, published,
        "the healthy subscriber got every message"
    );
    assert_eq!(server.metric("herald_connections").await, 1.0);
    // Reading at last, the slow client finds what was in flight, then the documented close code.
    assert_eq!(slow.close_code().await, Some(4008));
    assert!(slow.read_frame().await.is_none(), "the socket is closed");
}

/// Idle connections are pinged every ping interval: a peer that does not answer (gone, or not reading) is closed
/// with 4012 after ping interval + pong timeout, while a client that reads, and so answers, stays connected.
#[tokio::test]
async fn an_idle_client_that_does_not_answer_pings_is_closed() {
    const PING_MS: u64 = 300;
    const PONG_TIMEOUT_MS: u64 = 500;
    let server = start_server(&[
        ("limits.ping-interval-ms", &PING_MS.to_string()),
        ("limits.pong-timeout-ms", &PONG_TIMEOUT_MS.to_string()),
    ])
    .await;
    // Reads (and so answers every ping) all through the test, sending nothing else.
    let answering = server.client().await;
    let answering = tokio::spawn(async move {
        let mut answering = answering;
        answering.expect_silence(Duration::from_millis(2500)).await;
        answering
    });

    // After the upgrade this client never reads or writes again.
    let connected = std::time::Instant::now();
    let mut silent = RawWs::connect(server.http).await;
    let mut closed_after = None;
    while connected.elapsed() < Duration::from_secs(10) {
        if server
            .metric("herald_client_errors_total{kind=\"no_pong\"}")
            .await
            >= 1.0
        {
            closed_after = Some(connected.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed_after = closed_after.expect("the silent peer was never closed");
    let nominal = Duration::from_millis(PING_MS + PONG_TIMEOUT_MS);
    assert!(
        closed_after >= nominal - Duration::from_millis(50),
        "closed after {closed_after:?}, before ping interval + pong timeout"
    );
    assert!(
        closed_after <= nominal + Duration::from_millis(1500),
        "closed after {closed_after:?}"
    );
    assert_eq!(
        server
            .metric("herald_slow_consumer_disconnects_total")
            .await,
        0.0
    );

    // The answering client was pinged over the same time and more, and is still served.
    let mut answering = answering.await.unwrap();
    assert!(server.metric("herald_pings_sent_total").await >= 6.0);
    answering.send_text("ping").await;
    assert_eq!(answering.recv_text().await, "pong");
    assert_eq!(server.metric("herald_connections").await, 1.0);
    assert_eq!(
        server
            .metric("herald_client_errors_total{kind=\"no_pong\"}")
            .await,
        1.0
    );

    // The silent peer's socket holds its authorization, the ping it never answered, and the close.
    let (opcode, _) = silent.read_frame().await.unwrap();
    assert_eq!(opcode, OP_TEXT);
    let (opcode, ping) = silent.read_frame().await.unwrap();
    assert_eq!((opcode, ping.len()), (OP_PING, 4));
    assert_eq!(silent.close_code().await, Some(4012));
}

/// RFC 6455 allows pongs nobody asked for (a unidirectional heartbeat): they are ignored, whatever their payload,
/// and the connection keeps working.
#[tokio::test]
async fn unsolicited_pongs_are_ignored() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!(1), json!({"r": 1})).await;
    for payload in [&b""[..], b"hello", &[0, 0, 0, 1], &[0xff; 125]] {
        client
            .ws
            .send(Message::Pong(payload.to_vec().into()))
            .await
            .unwrap();
    }
    client.send_text("ping").await;
    assert_eq!(client.recv_text().await, "pong");
    server
        .publish(json!({"rooms": [{"r": 1}], "data": "still here"}))
        .await;
    assert_eq!(client.recv_json().await["data"], "still here");
    assert_eq!(server.metric("herald_connections").await, 1.0);
    assert_eq!(
        server
            .metric("herald_client_errors_total{kind=\"protocol\"}")
            .await,
        0.0
    );

    // Through a raw socket too, with no ping outstanding: answered by nothing, and nothing breaks.
    let mut raw = RawWs::connect(server.http).await;
    raw.send(OP_PONG, &[0, 0, 0, 7]).await;
    raw.send(OP_TEXT, b"ping").await;
    let mut texts = vec![];
    while texts.len() < 2 {
        let (opcode, payload) = raw.read_frame().await.expect("a frame");
        assert_ne!(opcode, OP_CLOSE, "closed: {payload:?}");
        if opcode == OP_TEXT {
            texts.push(String::from_utf8(payload).unwrap());
        }
    }
    assert_eq!(texts[1], "pong");
}

/// An unsolicited pong is the client's heartbeat and keeps the idle timeout away, like any frame it sends; a pong
/// answering the server's ping is its WebSocket stack talking, and does not.
#[tokio::test]
async fn answering_pings_is_not_activity_for_the_idle_timeout() {
    let server = start_server(&[
        ("limits.idle-timeout-secs", "1"),
        ("limits.ping-interval-ms", "200"),
    ])
    .await;
    // Reads, so answers every ping, but never sends anything itself.
    let mut reader = server.client().await;
    let started = std::time::Instant::now();
    // Bounded here: were pongs activity, the pings would keep `expect_close` reading for ever.
    let ended = tokio::time::timeout(Duration::from_secs(5), reader.expect_close())
        .await
        .expect("answering pings kept an otherwise silent client from its idle timeout");
    assert_eq!(ended, Ended::Closed(Some(1000)));
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(server.metric("herald_pings_sent_total").await >= 3.0);

    let mut heartbeat = server.client().await;
    for _ in 0..5 {
        heartbeat
            .ws
            .send(Message::Pong(b"beat".to_vec().into()))
            .await
            .unwrap();
        heartbeat.expect_silence(Duration::from_millis(400)).await;
    }
    heartbeat.send_text("ping").await;
    assert_eq!(heartbeat.recv_text().await, "pong");
}
