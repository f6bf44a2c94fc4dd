//! Client RPC (Zephserver's tasks): a client's `rpc` frame becomes a POST to a real HTTP backend started by each
//! test, and the backend's answer (or its failure) comes back as one `rpc` frame.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::*;
use tokio::net::TcpListener;

/// What the backend grants every connection.
const ALLOWED: &[&str] = &["echo", "empty", "fail", "garbage", "huge", "slow", "wait"];

/// A backend with a bootstrap endpoint and one RPC method per behaviour; it counts the calls of each method.
struct RpcBackend {
    addr: SocketAddr,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RpcBackend {
    async fn start() -> RpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let counted = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let counted = counted.clone();
                            async move { Ok::<_, Infallible>(answer(request, &counted).await) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RpcBackend { addr, calls, task }
    }

    fn api_url(&self) -> String {
        format!("http://{}/api/", self.addr)
    }

    fn calls(&self, method: &str) -> usize {
        self.calls.lock().unwrap().get(method).copied().unwrap_or(0)
    }
}

impl Drop for RpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(status: u16, body: impl Into<Bytes>) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
    calls: &Mutex<HashMap<String, usize>>,
) -> hyper::Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    if path == "/api/bootstrap/" {
        return respond(
            200,
            json!({"allowed_rooms": [{"lobby": "*"}], "allowed_methods": ALLOWED, "user_id": "u-1"})
                .to_string(),
        );
    }
    let Some(method) = path.strip_prefix("/api/rpc/") else {
        return respond(404, "{}");
    };
    *calls.lock().unwrap().entry(method.to_string()).or_default() += 1;
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| Value::String(v.to_str().unwrap().to_string()))
            .unwrap_or(Value::Null)
    };
    let echoed = json!({
        "method": request.method().as_str(),
        "content_type": header("content-type"),
        "cookie": header("cookie"),
        "csrf": header("x-csrftoken"),
        "authorization": header("authorization"),
        "user": header("x-herald-user"),
        "connection": header("x-herald-connection"),
    });
    let body = request.into_body().collect().await.unwrap().to_bytes();
    match method {
        "echo" => {
            let data: Value = serde_json::from_slice(&body).unwrap();
            respond(200, json!({"got": data, "headers": echoed}).to_string())
        }
        "empty" => respond(204, ""),
        "fail" => respond(503, r#"{"error":"down for maintenance"}"#),
        "garbage" => respond(200, "this is not json"),
        "huge" => respond(200, json!({"blob": "x".repeat(4096)}).to_string()),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            respond(200, "{}")
        }
        "wait" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            respond(200, r#""waited""#)
        }
        _ => respond(404, "{}"),
    }
}

async fn server_for(backend: &RpcBackend, extra: &[(&str, &str)]) -> TestServer {
    let api_url = backend.api_url();
    let mut overrides = vec![
        ("auth.api-url", api_url.as_str()),
        ("rpc.timeout-ms", "1000"),
        ("rpc.max-response-bytes", "1024"),
    ];
    overrides.extend_from_slice(extra);
    start_server(&overrides).await
}

async fn authorized(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> WsClient {
    let mut client = WsClient::connect(&format!("{}{query}", server.ws_url()), headers).await;
    let first = client.recv_json().await;
    assert_eq!(first["is_authorized"], json!(true), "{first}");
    client
}

async fn rpc(client: &mut WsClient, method: &str, data: Value, request_id: Value) -> Value {
    client
        .send_json(json!({"type": "rpc", "method": method, "data": data, "requestId": request_id}))
        .await;
    client.recv_json().await
}

#[tokio::test]
async fn an_rpc_round_trips_with_the_connection_credentials() {
    let backend = RpcBackend::start().await;
    let server = server_for(&backend, &[]).await;
    let mut client = authorized(
        &server,
        "?token=t-123",
        &[("cookie", "sessionid=s1; csrftoken=c-9")],
    )
    .await;

    let answer = rpc(&mut client, "echo", json!({"page": 2, "q": "é"}), json!(7)).await;
    assert_eq!(answer["type"], "rpc");
    assert_eq!(answer["code"], "success", "{answer}");
    assert_eq!(answer["requestId"], 7);
    assert_eq!(answer["data"]["got"], json!({"page": 2, "q": "é"}));
    let seen = &answer["data"]["headers"];
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["content_type"], "application/json");
    assert_eq!(seen["cookie"], "sessionid=s1; csrftoken=c-9");
    assert_eq!(seen["csrf"], "c-9");
    assert_eq!(seen["authorization"], "Token t-123");
    assert_eq!(seen["user"], "u-1");
    assert!(seen["connection"].is_string(), "{seen}");

    // No data is a JSON null body; an empty answer is null data.
    client
        .send_json(json!({"type": "rpc", "method": "echo", "requestId": "r2"}))
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["data"]["got"], Value::Null, "{answer}");
    let answer = rpc(&mut client, "empty", json!({}), json!("r3")).await;
    assert_eq!(
        answer,
        json!({"type": "rpc", "code": "success", "data": null, "requestId": "r3"})
    );
    assert_eq!(
        server
            .metric("herald_rpc_requests_total{result=\"success\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn backend_failures_are_error_frames_and_the_connection_lives_on() {
    let backend = RpcBackend::start().await;
    let server = server_for(&backend, &[]).await;
    let mut client = authorized(&server, "", &[]).await;

    let failed = rpc(&mut client, "fail", json!(null), json!(1)).await;
    assert_eq!(
        failed,
        json!({"type": "rpc", "code": "error", "message": "rpc-failed", "status": 503, "requestId": 1})
    );
    for (i, method) in ["garbage", "huge"].iter().enumerate() {
        let answer = rpc(&mut client, method, json!(null), json!(i + 10)).await;
        assert_eq!(
            answer,
            json!({"type": "rpc", "code": "error", "message": "rpc-failed", "requestId": i + 10}),
            "{method}"
        );
    }
    let slow = rpc(&mut client, "slow", json!(null), json!("s")).await;
    assert_eq!(
        slow,
        json!({"type": "rpc", "code": "error", "message": "rpc-timeout", "requestId": "s"})
    );

    // The connection still works.
    let subscribed = client.subscribe(json!("sub"), json!({"lobby": "a"})).await;
    assert_eq!(subscribed["code"], "success");
    assert_eq!(
        server
            .metric("herald_rpc_requests_total{result=\"failed\"}")
            .await,
        3.0
    );
    assert_eq!(
        server
            .metric("herald_rpc_requests_total{result=\"timeout\"}")
            .await,
        1.0
    );

    // A backend that is gone is a failure too, not a hang.
    drop(backend);
    let gone = rpc(&mut client, "echo", json!(null), json!("g")).await;
    assert_eq!(gone["message"], "rpc-failed", "{gone}");
}

#[tokio::test]
async fn methods_outside_the_grant_and_bad_names_never_reach_the_backend() {
    let backend = RpcBackend::start().await;
    let server = server_for(&backend, &[]).await;
    let mut client = authorized(&server, "", &[]).await;

    let refused = rpc(
        &mut client,
        "admin.delete_everything",
        json!(null),
        json!(1),
    )
    .await;
    assert_eq!(
        refused,
        json!({"type": "rpc", "code": "error", "message": "method-not-allowed", "requestId": 1})
    );
    for bad in ["../bootstrap", "a/b", "", "x?y=1"] {
        let answer = rpc(&mut client, bad, json!(null), json!("bad")).await;
        assert_eq!(answer["message"], "invalid-method", "{bad:?}: {answer}");
        assert_eq!(answer["requestId"], "bad");
    }
    let no_id = json!({"type": "rpc", "method": "echo"});
    client.send_json(no_id).await;
    assert_eq!(client.recv_json().await["message"], "no-request-id");

    assert_eq!(backend.calls("admin.delete_everything"), 0);
    assert_eq!(backend.calls("echo"), 0);
    assert_eq!(
        server
            .metric("herald_rpc_requests_total{result=\"not_allowed\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn in_flight_calls_are_bounded_per_connection_and_per_node() {
    let backend = RpcBackend::start().await;
    let server = server_for(
        &backend,
        &[
            ("rpc.max-in-flight-per-connection", "2"),
            ("rpc.max-in-flight", "3"),
        ],
    )
    .await;
    let mut first = authorized(&server, "", &[]).await;
    let mut second = authorized(&server, "", &[]).await;

    // Per connection: the third call while two are running is refused at once.
    for id in 1..=3 {
        first
            .send_json(json!({"type": "rpc", "method": "wait", "requestId": id}))
            .await;
    }
    let busy = first.recv_json().await;
    assert_eq!(
        busy,
        json!({"type": "rpc", "code": "error", "message": "rpc-busy", "requestId": 3})
    );
    // Per node: three in flight in all, so the second connection gets one slot.
    for id in 1..=2 {
        second
            .send_json(json!({"type": "rpc", "method": "wait", "requestId": id}))
            .await;
    }
    let busy = second.recv_json().await;
    assert_eq!(busy["message"], "rpc-busy", "{busy}");
    assert_eq!(busy["requestId"], 2);

    // The calls that were admitted finish normally, and the slots come back.
    let mut done: Vec<Value> = vec![first.recv_json().await, first.recv_json().await];
    done.sort_by_key(|a| a["requestId"].as_i64());
    for (answer, id) in done.iter().zip([1, 2]) {
        assert_eq!(
            *answer,
            json!({"type": "rpc", "code": "success", "data": "waited", "requestId": id})
        );
    }
    assert_eq!(second.recv_json().await["requestId"], 1);
    let again = rpc(&mut first, "wait", json!(null), json!(4)).await;
    assert_eq!(again["code"], "success", "{again}");
    assert_eq!(backend.calls("wait"), 4);
    assert_eq!(
        server
            .metric("herald_rpc_requests_total{result=\"busy\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn without_a_backend_every_method_is_not_allowed() {
    // `herald dev` with no auth allows any method, but there is nowhere to send it.
    let server = start_server(&[]).await;
    let mut client = server.client().await;
    let answer = rpc(&mut client, "echo", json!(null), json!(1)).await;
    assert_eq!(answer["message"], "method-not-allowed", "{answer}");
}

#[tokio::test]
async fn static_auth_grants_the_configured_methods() {
    let backend = RpcBackend::start().await;
    let rpc_url = format!("{}rpc/", backend.api_url());
    let server = start_server(&[
        ("auth.static-rooms", r#"[{"lobby":"*"}]"#),
        ("auth.static-methods", r#"["echo"]"#),
        ("rpc.url", &rpc_url),
    ])
    .await;
    let mut client = server.client().await;
    let ok = rpc(&mut client, "echo", json!([1]), json!(1)).await;
    assert_eq!(ok["data"]["got"], json!([1]), "{ok}");
    let refused = rpc(&mut client, "wait", json!(null), json!(2)).await;
    assert_eq!(refused["message"], "method-not-allowed");
    assert_eq!(backend.calls("wait"), 0);
}
