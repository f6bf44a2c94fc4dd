//! Authorization of WebSocket connections: High-templar's backend bootstrap (against a real HTTP backend started
//! by each test), JWT (HS256, RS256, ES256) and static rooms.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

const RS256_PRIVATE: &str = include_str!("fixtures/rs256-private.pem");
const RS256_PUBLIC: &str = include_str!("fixtures/rs256-public.pem");
const ES256_PRIVATE: &str = include_str!("fixtures/es256-private.pem");
const ES256_PUBLIC: &str = include_str!("fixtures/es256-public.pem");

/// Connects and returns the first frame and the client.
async fn first_frame(url: &str, headers: &[(&str, &str)]) -> (Value, WsClient) {
    let mut client = WsClient::connect(url, headers).await;
    let first = client.recv_json().await;
    (first, client)
}

/// A refused connection sees `{"is_authorized": false}` and then a normal close.
async fn assert_refused(url: &str, headers: &[(&str, &str)]) {
    let (first, mut client) = first_frame(url, headers).await;
    assert_eq!(first, json!({"is_authorized": false}));
    assert_eq!(client.expect_close().await, Ended::Closed(Some(1000)));
}

async fn bootstrap_server(backend: &Backend, extra: &[(&str, &str)]) -> TestServer {
    let api_url = backend.api_url();
    let mut overrides = vec![("dev", "false"), ("auth.api-url", api_url.as_str())];
    overrides.extend_from_slice(extra);
    start_server(&overrides).await
}

#[tokio::test]
async fn bootstrap_forwards_high_templars_headers_and_nothing_else() {
    let backend =
        Backend::start(BackendAnswer::ok(json!({"allowed_rooms": [{"chat": "*"}]}))).await;
    let server = bootstrap_server(&backend, &[("auth.forward-headers", "x-tenant")]).await;
    let url = format!("{}?token=tok%2B1&other=x", server.ws_url());
    let (first, _client) = first_frame(
        &url,
        &[
            ("cookie", "sessionid=abc; csrftoken=csrf-value"),
            ("user-agent", "herald-test-agent"),
            ("x-real-ip", "127.0.0.9"),
            ("x-forwarded-for", "127.0.0.8"),
            ("x-tenant", "acme"),
            ("authorization", "Basic c2VjcmV0"),
        ],
    )
    .await;
    assert_eq!(
        first,
        json!({"is_authorized": true, "allowed_rooms": [{"chat": "*"}]})
    );

    let (path, headers) = backend.last_request();
    assert_eq!(path, "/api/bootstrap/", "no query string is forwarded");
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        header("cookie").as_deref(),
        Some("sessionid=abc; csrftoken=csrf-value")
    );
    assert_eq!(header("user-agent").as_deref(), Some("herald-test-agent"));
    assert_eq!(header("x-real-ip").as_deref(), Some("127.0.0.9"));
    assert_eq!(header("x-csrftoken").as_deref(), Some("csrf-value"));
    assert_eq!(header("authorization").as_deref(), Some("Token tok+1"));
    assert_eq!(
        header("x-tenant").as_deref(),
        Some("acme"),
        "configured extra header"
    );
    assert_eq!(header("x-forwarded-for"), None);
}

#[tokio::test]
async fn bootstrap_rooms_decide_subscriptions() {
    let backend = Backend::start(BackendAnswer::ok(
        json!({"allowed_rooms": [{"customer": "*", "kind": "order"}, {"user": 7}]}),
    ))
    .await;
    let server = bootstrap_server(&backend, &[]).await;
    let (_, mut client) = first_frame(&server.ws_url(), &[]).await;
    for (room, code) in [
        (json!({"customer": "3", "kind": "order"}), "success"),
        (json!({"customer": "*", "kind": "order"}), "success"),
        (json!({"user": 7}), "success"),
        (json!({"user": "7"}), "error"),
        (json!({"user": "*"}), "error"),
        (json!({"customer": "3"}), "error"),
    ] {
        let reply = client
            .subscribe(json!(room.to_string()), room.clone())
            .await;
        assert_eq!(reply["code"], code, "{room}: {reply}");
        if code == "error" {
            assert_eq!(reply["message"], "room-not-found");
        }
    }
}

#[tokio::test]
async fn bootstrap_refusals_and_malformed_answers_are_not_authorized() {
    let backend = Backend::start(BackendAnswer::ok(json!({}))).await;
    let server = bootstrap_server(&backend, &[("auth.bootstrap-timeout-ms", "300")]).await;
    let answers = [
        (403, "{}".to_string()),
        (500, "oops".to_string()),
        (302, "".to_string()),
        // High-templar failed these with an HTTP 500 on the upgrade; herald refuses cleanly.
        (200, "not json".to_string()),
        (200, json!({"allowed_rooms": null}).to_string()),
        (200, json!([{"a": 1}]).to_string()),
        (
            200,
            json!({"allowed_rooms": [{"a": 1}, "nope"]}).to_string(),
        ),
        (
            200,
            json!({"allowed_rooms": [{"a": {"nested": true}}]}).to_string(),
        ),
    ];
    for (status, body) in answers {
        backend.set(BackendAnswer {
            status,
            body: body.clone(),
            delay: Duration::ZERO,
        });
        assert_refused(&server.ws_url(), &[]).await;
    }
    assert!(
        server
            .metric("herald_bootstrap_requests_total{result=\"malformed\"}")
            .await
            >= 5.0
    );
    assert!(
        server
            .metric("herald_bootstrap_requests_total{result=\"refused\"}")
            .await
            >= 3.0
    );

    // A backend slower than the timeout.
    backend.set(BackendAnswer {
        status: 200,
        body: "{}".into(),
        delay: Duration::from_secs(2),
    });
    assert_refused(&server.ws_url(), &[]).await;
    assert_eq!(
        server
            .metric("herald_bootstrap_requests_total{result=\"timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_unreachable_backend_is_not_authorized() {
    // Bind and drop a listener so the port is (almost certainly) closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api_url = format!("http://127.0.0.1:{port}/api/");
    let server = start_server(&[("dev", "false"), ("auth.api-url", &api_url)]).await;
    assert_refused(&server.ws_url(), &[]).await;
    assert_eq!(
        server
            .metric("herald_bootstrap_requests_total{result=\"unreachable\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn bootstrap_user_id_can_be_targeted() {
    let backend = Backend::start(BackendAnswer::ok(
        json!({"allowed_rooms": [], "user_id": 42}),
    ))
    .await;
    let server = bootstrap_server(&backend, &[]).await;
    let (_, mut first) = first_frame(&server.ws_url(), &[]).await;
    let (_, mut second) = first_frame(&server.ws_url(), &[]).await;
    backend.set(BackendAnswer::ok(json!({"user_id": "someone-else"})));
    let (_, mut other) = first_frame(&server.ws_url(), &[]).await;
    let answer = server
        .publish(json!({"users": ["42"], "data": "for 42"}))
        .await;
    assert_eq!(answer["connections_reached"], 2);
    assert_eq!(
        first.recv_json().await,
        json!({"type": "message", "data": "for 42"})
    );
    assert_eq!(second.recv_json().await["data"], "for 42");
    other.expect_silence(Duration::from_millis(200)).await;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(algorithm: Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(algorithm), &claims, key).unwrap()
}

async fn jwt_server() -> TestServer {
    start_server(&[
        ("dev", "false"),
        ("auth.jwt.hs256-secret", "test-secret"),
        ("auth.jwt.rs256-public-key", RS256_PUBLIC),
        ("auth.jwt.es256-public-key", ES256_PUBLIC),
    ])
    .await
}

#[tokio::test]
async fn jwt_tokens_of_each_algorithm_authorize() {
    let server = jwt_server().await;
    let claims = json!({"sub": "user-1", "exp": now() + 300, "allowed_rooms": [{"doc": "*"}]});
    let tokens = [
        token(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"test-secret"),
            claims.clone(),
        ),
        token(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RS256_PRIVATE.as_bytes()).unwrap(),
            claims.clone(),
        ),
        token(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(ES256_PRIVATE.as_bytes()).unwrap(),
            claims.clone(),
        ),
    ];
    let mut clients = vec![];
    for token in &tokens {
        let (first, mut client) =
            first_frame(&format!("{}?token={token}", server.ws_url()), &[]).await;
        assert_eq!(
            first,
            json!({"is_authorized": true, "allowed_rooms": [{"doc": "*"}]})
        );
        assert_eq!(
            client.subscribe(json!(1), json!({"doc": "9"})).await["code"],
            "success"
        );
        assert_eq!(
            client.subscribe(json!(2), json!({"sheet": "9"})).await["message"],
            "room-not-found"
        );
        clients.push(client);
    }
    // The bearer header works as well as the query parameter, and `sub` is the user id.
    let bearer = format!("Bearer {}", tokens[0]);
    let (first, mut client) =
        first_frame(&server.ws_url(), &[("authorization", bearer.as_str())]).await;
    assert_eq!(first["is_authorized"], true);
    let answer = server
        .publish(json!({"users": ["user-1"], "data": "hello user"}))
        .await;
    assert_eq!(answer["connections_reached"], 4);
    assert_eq!(client.recv_json().await["data"], "hello user");
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let server = jwt_server().await;
    let hs = EncodingKey::from_secret(b"test-secret");
    let expired = token(
        Algorithm::HS256,
        &hs,
        json!({"sub": "u", "exp": now() - 3600}),
    );
    let wrong_secret = token(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-secret"),
        json!({"sub": "u", "exp": now() + 300}),
    );
    let no_exp = token(Algorithm::HS256, &hs, json!({"sub": "u"}));
    let bad_rooms = token(
        Algorithm::HS256,
        &hs,
        json!({"exp": now() + 300, "allowed_rooms": "all"}),
    );
    // An algorithm without a configured key (HS384) is refused, never downgraded.
    let other_alg = token(
        Algorithm::HS384,
        &EncodingKey::from_secret(b"test-secret"),
        json!({"exp": now() + 300}),
    );
    // Valid signature bytes spliced onto a changed payload.
    let good = token(
        Algorithm::HS256,
        &hs,
        json!({"sub": "u", "exp": now() + 300}),
    );
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload = "eyJzdWIiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0";
    parts[1] = forged_payload;
    let forged = parts.join(".");
    for bad in [
        expired,
        wrong_secret,
        no_exp,
        bad_rooms,
        other_alg,
        forged,
        "garbage".into(),
    ] {
        assert_refused(&format!("{}?token={bad}", server.ws_url()), &[]).await;
    }
    // No token at all.
    assert_refused(&server.ws_url(), &[]).await;
}

#[tokio::test]
async fn static_rooms_authorize_everyone_outside_dev() {
    let server = start_server(&[
        ("dev", "false"),
        ("auth.static-rooms", r#"[{"news": "*"}]"#),
    ])
    .await;
    let (first, mut client) = first_frame(&server.ws_url(), &[]).await;
    assert_eq!(
        first,
        json!({"is_authorized": true, "allowed_rooms": [{"news": "*"}]})
    );
    assert_eq!(
        client.subscribe(json!(1), json!({"news": "sport"})).await["code"],
        "success"
    );
    assert_eq!(
        client.subscribe(json!(2), json!({"admin": 1})).await["message"],
        "room-not-found"
    );
}
