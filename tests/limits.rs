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
