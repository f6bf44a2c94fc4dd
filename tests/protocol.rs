//! The client protocol on `/ws/`: High-templar 3.x's rules, its bugs fixed, and herald's extensions, each driven
//! through a real WebSocket client against a real edge.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

#[tokio::test]
async fn first_frame_says_authorized_and_lists_allowed_rooms() {
    let server = start_server(&[("auth.static-rooms", r#"[{"customer": "*"}]"#)]).await;
    let mut client = WsClient::connect(&server.ws_url(), &[]).await;
    assert_eq!(
        client.recv_json().await,
        json!({"is_authorized": true, "allowed_rooms": [{"customer": "*"}]})
    );
}

#[tokio::test]
async fn exactly_ping_is_answered_with_pong() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.send_text("ping").await;
    assert_eq!(client.recv_text().await, "pong");
    for not_ping in ["PING", " ping", "ping "] {
        client.send_text(not_ping).await;
        let reply = client.recv_json().await;
        assert_eq!(reply["message"], "non-json-message", "{not_ping:?}");
    }
}

#[tokio::test]
async fn malformed_messages_get_error_frames_with_the_connection_id() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;

    client.send_text("this is not json").await;
    let reply = client.recv_json().await;
    assert_eq!(reply["code"], "error");
    assert_eq!(reply["message"], "non-json-message");
    let connection_id = reply["requestId"]
        .as_str()
        .expect("connection id")
        .to_owned();
    assert!(!connection_id.is_empty());

    // High-templar killed the socket on JSON that is not an object; herald answers and keeps going.
    for text in [
        r#"{"no":"type"}"#,
        r#"{"type":"nope"}"#,
        "[1,2,3]",
        r#""subscribe""#,
        "17",
    ] {
        client.send_text(text).await;
        let reply = client.recv_json().await;
        assert_eq!(
            reply,
            json!({"code": "error", "message": "message-type-not-allowed", "requestId": connection_id}),
            "{text}"
        );
    }
    // An unknown type with a request id echoes that id.
    client
        .send_json(json!({"type": "nope", "requestId": "r9"}))
        .await;
    assert_eq!(client.recv_json().await["requestId"], "r9");

    // The connection is still healthy.
    client.send_text("ping").await;
    assert_eq!(client.recv_text().await, "pong");
}

#[tokio::test]
async fn subscribe_and_unsubscribe_replies() {
    let server = start_server(&[(
        "auth.static-rooms",
        r#"[{"customer": "*", "kind": "order"}]"#,
    )])
    .await;
    let mut client = server.client().await;

    let ok = client
        .subscribe(json!("r1"), json!({"customer": "7", "kind": "order"}))
        .await;
    assert_eq!(ok, json!({"code": "success", "requestId": "r1"}));

    let denied = client
        .subscribe(json!("r2"), json!({"customer": "7", "kind": "invoice"}))
        .await;
    assert_eq!(
        denied,
        json!({"code": "error", "message": "room-not-found", "requestId": "r2"})
    );

    client
        .send_json(json!({"type": "subscribe", "room": {"customer": "7", "kind": "order"}}))
        .await;
    assert_eq!(client.recv_json().await["message"], "no-request-id");

    // Unsubscribe names the subscription by request id alone; a room field is ignored.
    client
        .send_json(json!({"type": "unsubscribe", "requestId": "r1", "room": {"x": 1}}))
        .await;
    assert_eq!(
        client.recv_json().await,
        json!({"code": "success", "requestId": "r1"})
    );
    client
        .send_json(json!({"type": "unsubscribe", "requestId": "r1"}))
        .await;
    assert_eq!(
        client.recv_json().await,
        json!({"code": "error", "message": "not-subscribed", "requestId": "r1"})
    );
    client.send_json(json!({"type": "unsubscribe"})).await;
    assert_eq!(client.recv_json().await["message"], "no-request-id");
}

#[tokio::test]
async fn bad_rooms_are_invalid_room_and_the_socket_survives() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    for (i, room) in [
        None,
        Some(json!("room")),
        Some(json!([1])),
        Some(json!({"a": {"nested": 1}})),
        Some(json!({"a": [1]})),
    ]
    .into_iter()
    .enumerate()
    {
        let mut message = json!({"type": "subscribe", "requestId": i});
        if let Some(room) = room {
            message["room"] = room;
        }
        client.send_json(message.clone()).await;
        assert_eq!(
            client.recv_json().await,
            json!({"code": "error", "message": "invalid-room", "requestId": i}),
            "{message}"
        );
    }
    client.send_text("ping").await;
    assert_eq!(client.recv_text().await, "pong");
}

#[tokio::test]
async fn deliveries_carry_the_subscriptions_request_id() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("a"), json!({"chat": "lobby"})).await;
    client.subscribe(json!(2), json!({"chat": "lobby"})).await;

    let answer = server
        .publish(json!({"rooms": [{"chat": "lobby"}], "data": {"text": "hi", "n": [1, 2]}}))
        .await;
    assert_eq!(answer["subscriptions_reached"], 2);
    let mut frames = vec![client.recv_json().await, client.recv_json().await];
    frames.sort_by_key(|f| f["requestId"].to_string());
    assert_eq!(
        frames,
        vec![
            json!({"type": "publish", "data": {"text": "hi", "n": [1, 2]}, "requestId": "a"}),
            json!({"type": "publish", "data": {"text": "hi", "n": [1, 2]}, "requestId": 2}),
        ]
    );
}

#[tokio::test]
async fn wildcards_match_on_either_side_and_types_are_strict() {
    let server = start_server(&[]).await;
    let mut all_customers = server.client().await;
    all_customers
        .subscribe(json!("all"), json!({"customer": "*"}))
        .await;
    let mut customer_one = server.client().await;
    customer_one
        .subscribe(json!("one"), json!({"customer": "1"}))
        .await;
    let mut customer_two = server.client().await;
    customer_two
        .subscribe(json!("two"), json!({"customer": "2"}))
        .await;
    let mut number_one = server.client().await;
    number_one
        .subscribe(json!("num"), json!({"customer": 1}))
        .await;

    // A subscriber to {"customer":"*"} receives a publish to {"customer":"1"}.
    let answer = server
        .publish(json!({"rooms": [{"customer": "1"}], "data": "to-one"}))
        .await;
    assert_eq!(answer["subscriptions_reached"], 2);
    assert_eq!(all_customers.recv_json().await["data"], "to-one");
    assert_eq!(customer_one.recv_json().await["data"], "to-one");

    // A publish to {"customer":"*"} reaches every customer, whatever the value's type.
    let answer = server
        .publish(json!({"rooms": [{"customer": "*"}], "data": "to-all"}))
        .await;
    assert_eq!(answer["subscriptions_reached"], 4);
    for client in [
        &mut all_customers,
        &mut customer_one,
        &mut customer_two,
        &mut number_one,
    ] {
        assert_eq!(client.recv_json().await["data"], "to-all");
    }

    // "1" is not 1, and a different key set never matches.
    let answer = server
        .publish(json!({"rooms": [{"customer": 1}], "data": "typed"}))
        .await;
    assert_eq!(
        answer["subscriptions_reached"], 2,
        "number 1 reaches num and *"
    );
    assert_eq!(number_one.recv_json().await["data"], "typed");
    assert_eq!(all_customers.recv_json().await["data"], "typed");
    customer_one
        .expect_silence(Duration::from_millis(200))
        .await;
    let answer = server
        .publish(json!({"rooms": [{"customer": "1", "x": 1}], "data": "other"}))
        .await;
    assert_eq!(answer["subscriptions_reached"], 0);
}

#[tokio::test]
async fn a_publish_to_many_rooms_reaches_each_subscription_once() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("s"), json!({"customer": "*"})).await;
    let answer = server
        .publish(
            json!({"rooms": [{"customer": "1"}, {"customer": "2"}, {"customer": "*"}], "data": 1}),
        )
        .await;
    assert_eq!(answer["subscriptions_reached"], 1);
    assert_eq!(client.recv_json().await["data"], 1);
    client.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn reusing_a_request_id_moves_the_subscription_to_the_new_room() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("r"), json!({"room": "a"})).await;
    let moved = client.subscribe(json!("r"), json!({"room": "b"})).await;
    assert_eq!(moved["code"], "success");
    assert_eq!(
        server
            .publish(json!({"rooms": [{"room": "a"}], "data": 1}))
            .await["subscriptions_reached"],
        0
    );
    assert_eq!(
        server
            .publish(json!({"rooms": [{"room": "b"}], "data": 2}))
            .await["subscriptions_reached"],
        1
    );
    assert_eq!(
        client.recv_json().await,
        json!({"type": "publish", "data": 2, "requestId": "r"})
    );
    // Subscribing the same id to the same room again is a no-op success, not a second subscription.
    client.subscribe(json!("r"), json!({"room": "b"})).await;
    assert_eq!(
        server
            .publish(json!({"rooms": [{"room": "b"}], "data": 3}))
            .await["subscriptions_reached"],
        1
    );
}

#[tokio::test]
async fn status_reports_this_nodes_counters() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    let _other = server.client().await;
    client.subscribe(json!("a"), json!({"r": 1})).await;
    client.subscribe(json!("b"), json!({"r": 2})).await;
    client.send_json(json!({"type": "status"})).await;
    let status = client.recv_json().await;
    assert_eq!(status["open_connections"], 2, "{status}");
    assert_eq!(status["num_rooms"], 2, "{status}");
    assert!(
        status["online_since"].as_str().unwrap().ends_with('Z'),
        "{status}"
    );
    assert!(status["messages_in"].as_u64().unwrap() >= 3, "{status}");
    for key in ["messages_out", "messages_dropped"] {
        assert!(status[key].is_u64(), "{key} in {status}");
    }
}

#[tokio::test]
async fn direct_targets_get_message_frames() {
    let server = start_server(&[]).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.send_text("not json").await;
    let a_id: Value = a.recv_json().await["requestId"].clone();
    let answer = server
        .publish(json!({"connections": [a_id], "data": {"for": "a"}}))
        .await;
    assert_eq!(answer["connections_reached"], 1);
    assert_eq!(
        a.recv_json().await,
        json!({"type": "message", "data": {"for": "a"}})
    );
    b.expect_silence(Duration::from_millis(200)).await;
    let answer = server
        .publish(json!({"all": true, "data": "everyone"}))
        .await;
    assert_eq!(answer["connections_reached"], 2);
    assert_eq!(a.recv_json().await["data"], "everyone");
    assert_eq!(b.recv_json().await["data"], "everyone");
}

#[tokio::test]
async fn unsubscribed_and_disconnected_clients_get_nothing() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("r"), json!({"t": 1})).await;
    client
        .send_json(json!({"type": "unsubscribe", "requestId": "r"}))
        .await;
    client.recv_json().await;
    assert_eq!(
        server
            .publish(json!({"rooms": [{"t": 1}], "data": 0}))
            .await["subscriptions_reached"],
        0
    );

    let mut leaving = server.client().await;
    leaving.subscribe(json!("r"), json!({"t": 2})).await;
    leaving.close().await;
    // The edge notices the close and drops the subscription.
    for _ in 0..50 {
        if server.metric("herald_subscriptions").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.metric("herald_subscriptions").await, 0.0);
    assert_eq!(
        server
            .publish(json!({"rooms": [{"t": 2}], "data": 0}))
            .await["subscriptions_reached"],
        0
    );
}
