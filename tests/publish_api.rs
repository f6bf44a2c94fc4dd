//! The publish APIs: High-templar 2.x's `POST /trigger/`, `POST /api/v1/publish`, and gRPC `herald.v1.Publisher`
//! (`Publish` and `PublishStream`), with their API keys and limits.

mod support;

use std::time::Duration;

use herald_proto::v1::publisher_client::PublisherClient;
use herald_proto::v1::{scalar, target, PublishRequest, Room, Scalar, Target};
use serde_json::{json, Value};
use support::*;
use tonic::Code;

fn bearer() -> String {
    format!("Bearer {API_KEY}")
}

async fn post(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> (u16, String) {
    http_request(
        "POST",
        &format!("http://{}{path}", server.http),
        headers,
        body,
    )
    .await
}

#[tokio::test]
async fn trigger_speaks_high_templar_2() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("r"), json!({"board": 5})).await;
    let auth = bearer();
    let headers = [("authorization", auth.as_str())];

    let (status, body) = post(
        &server,
        "/trigger/",
        &headers,
        json!({"data": 1}).to_string(),
    )
    .await;
    assert_eq!((status, body.as_str()), (400, "rooms not specified"));
    let (status, body) = post(
        &server,
        "/trigger/",
        &headers,
        json!({"rooms": [{"board": 5}]}).to_string(),
    )
    .await;
    assert_eq!((status, body.as_str()), (400, "data not specified"));
    let (status, body) = post(
        &server,
        "/trigger/",
        &headers,
        json!({"rooms": [{"board": 5}], "data": {"moved": "card"}}).to_string(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "publish success"));
    assert_eq!(
        client.recv_json().await,
        json!({"type": "publish", "data": {"moved": "card"}, "requestId": "r"})
    );
    // `data: null` is present, so it is published.
    let (status, _) = post(
        &server,
        "/trigger/",
        &headers,
        json!({"rooms": [{"board": 5}], "data": null}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(client.recv_json().await["data"], Value::Null);

    let (status, _) = post(&server, "/trigger/", &headers, "{not json").await;
    assert_eq!(status, 400);
    let (status, _) = post(
        &server,
        "/trigger/",
        &headers,
        json!({"rooms": [{"a": [1]}], "data": 1}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn publish_api_answers_what_it_reached() {
    let server = start_server(&[]).await;
    let mut a = server.client().await;
    a.subscribe(json!(1), json!({"t": "x"})).await;
    let answer = server
        .publish(json!({"rooms": [{"t": "x"}, {"t": "y"}], "data": [1, 2, 3]}))
        .await;
    assert_eq!(
        answer,
        json!({"subscriptions_reached": 1, "connections_reached": 0})
    );
    assert_eq!(a.recv_json().await["data"], json!([1, 2, 3]));

    // Data passes through byte for byte, key order and number formatting included.
    let raw = r#"{"rooms":[{"t":"x"}],"data":{"z":1,"a":1.50}}"#;
    let auth = bearer();
    let (status, _) = post(
        &server,
        "/api/v1/publish",
        &[("authorization", auth.as_str())],
        raw,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        a.recv_text().await,
        r#"{"type":"publish","data":{"z":1,"a":1.50},"requestId":1}"#
    );
}

#[tokio::test]
async fn publish_api_refuses_bad_requests_with_reasons() {
    let server = start_server(&[("limits.max-rooms-per-publish", "2")]).await;
    let auth = bearer();
    let headers = [("authorization", auth.as_str())];
    for (body, status, needle) in [
        (json!({"rooms": [{"a": 1}]}), 400, "data not specified"),
        (json!({"data": 1}), 400, "no targets"),
        (
            json!({"rooms": [{"a": 1}, {"a": 2}, {"a": 3}], "data": 1}),
            400,
            "too many targets",
        ),
        (
            json!({"rooms": [{"a": 1}], "users": ["u1", "u2"], "data": 1}),
            400,
            "too many targets",
        ),
        (
            json!({"rooms": {"a": 1}, "data": 1}),
            400,
            "rooms must be a list",
        ),
        (
            json!({"rooms": [{"a": {"b": 1}}], "data": 1}),
            400,
            "rooms[0]",
        ),
        (
            json!({"users": [{"id": 1}], "data": 1}),
            400,
            "users must hold strings",
        ),
        (
            json!({"all": "yes", "data": 1}),
            400,
            "all must be a boolean",
        ),
        (json!([1, 2]), 400, "not a JSON object"),
    ] {
        let (got, text) = post(&server, "/api/v1/publish", &headers, body.to_string()).await;
        assert_eq!(got, status, "{body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(needle),
            "{body}: {text}"
        );
    }
    assert!(
        server
            .metric("herald_publish_errors_total{reason=\"too_many_targets\"}")
            .await
            >= 2.0
    );
    let (status, _) = http_request(
        "GET",
        &format!("http://{}/api/v1/publish", server.http),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn publish_bodies_over_the_limit_are_413() {
    let server = start_server(&[("limits.max-publish-body-bytes", "1024")]).await;
    let auth = bearer();
    let headers = [("authorization", auth.as_str())];
    let big = json!({"rooms": [{"a": 1}], "data": "x".repeat(2000)}).to_string();
    let (status, _) = post(&server, "/api/v1/publish", &headers, big.clone()).await;
    assert_eq!(status, 413);
    let (status, _) = post(&server, "/trigger/", &headers, big).await;
    assert_eq!(status, 413);
    let (status, _) = post(
        &server,
        "/api/v1/publish",
        &headers,
        json!({"rooms": [{"a": 1}], "data": "small"}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        server
            .metric("herald_publish_errors_total{reason=\"too_large\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn publish_apis_require_an_api_key() {
    let server = start_server(&[]).await;
    let body = json!({"rooms": [{"a": 1}], "data": 1}).to_string();
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-key")],
        vec![("authorization", "Bearer ")],
        vec![("x-api-key", "wrong-key")],
    ] {
        for path in ["/api/v1/publish", "/trigger/"] {
            let (status, _) = post(&server, path, &headers, body.clone()).await;
            assert_eq!(status, 401, "{path} {headers:?}");
        }
    }
    let (status, _) = post(
        &server,
        "/api/v1/publish",
        &[("x-api-key", API_KEY)],
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "X-API-Key works too");

    let mut grpc = PublisherClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let error = grpc.publish(publish_request(json!(1))).await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(publish_request(json!(1)));
    request
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        grpc.publish(request).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn dev_mode_without_keys_is_open_and_edge_mode_without_keys_is_closed() {
    let open = start_server(&[("auth.api-keys", "[]")]).await;
    let body = json!({"rooms": [{"a": 1}], "data": 1}).to_string();
    let (status, _) = post(&open, "/api/v1/publish", &[], body.clone()).await;
    assert_eq!(status, 200);

    let closed = start_server(&[
        ("dev", "false"),
        ("auth.api-keys", "[]"),
        ("auth.static-rooms", r#"[{"a": 1}]"#),
    ])
    .await;
    let (status, _) = post(&closed, "/api/v1/publish", &[], body).await;
    assert_eq!(status, 401);
}

fn room(fields: &[(&str, scalar::Kind)]) -> Target {
    Target {
        kind: Some(target::Kind::Room(Room {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Scalar {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
        })),
    }
}

fn publish_request(data: Value) -> PublishRequest {
    PublishRequest {
        targets: vec![room(&[("chat", scalar::Kind::StringValue("grpc".into()))])],
        data_json: data.to_string().into_bytes(),
    }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer().parse().unwrap());
    request
}

#[tokio::test]
async fn grpc_publish_reaches_subscribers() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("g"), json!({"chat": "grpc"})).await;
    let mut typed = server.client().await;
    typed.subscribe(json!("n"), json!({"n": 1})).await;

    let mut grpc = PublisherClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let reply = grpc
        .publish(authorized(publish_request(json!({"via": "grpc"}))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.subscriptions_reached, 1);
    assert_eq!(
        client.recv_json().await,
        json!({"type": "publish", "data": {"via": "grpc"}, "requestId": "g"})
    );

    // Typed values: an int 1 reaches {"n": 1}; a string "1" does not.
    let int_room = PublishRequest {
        targets: vec![room(&[("n", scalar::Kind::IntValue(1))])],
        data_json: b"\"int\"".to_vec(),
    };
    assert_eq!(
        grpc.publish(authorized(int_room))
            .await
            .unwrap()
            .into_inner()
            .subscriptions_reached,
        1
    );
    assert_eq!(typed.recv_json().await["data"], "int");
    let string_room = PublishRequest {
        targets: vec![room(&[("n", scalar::Kind::StringValue("1".into()))])],
        data_json: b"\"string\"".to_vec(),
    };
    assert_eq!(
        grpc.publish(authorized(string_room))
            .await
            .unwrap()
            .into_inner()
            .subscriptions_reached,
        0
    );

    // Direct targets.
    let all = PublishRequest {
        targets: vec![Target {
            kind: Some(target::Kind::All(true)),
        }],
        data_json: b"\"everyone\"".to_vec(),
    };
    assert_eq!(
        grpc.publish(authorized(all))
            .await
            .unwrap()
            .into_inner()
            .connections_reached,
        2
    );

    let bad = PublishRequest {
        targets: vec![],
        data_json: b"1".to_vec(),
    };
    assert_eq!(
        grpc.publish(authorized(bad)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let bad_json = PublishRequest {
        data_json: b"{oops".to_vec(),
        ..publish_request(json!(1))
    };
    assert_eq!(
        grpc.publish(authorized(bad_json)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn grpc_publish_stream_keeps_order() {
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    client.subscribe(json!("s"), json!({"chat": "grpc"})).await;
    let mut grpc = PublisherClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let messages: Vec<PublishRequest> = (0..500)
        .map(|i| publish_request(json!({"seq": i})))
        .collect();
    let reply = grpc
        .publish_stream(authorized(futures_util::stream::iter(messages)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.published, 500);
    assert_eq!(reply.subscriptions_reached, 500);
    for i in 0..500 {
        assert_eq!(client.recv_json().await["data"]["seq"], i);
    }
    client.expect_silence(Duration::from_millis(100)).await;
}
