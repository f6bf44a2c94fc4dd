//! Shared helpers for herald's integration tests: real edges (in-process on `127.0.0.1:0`, or the real binary as a
//! child process), a real WebSocket client, real HTTP backends, an HTTP client for the publish APIs, and private
//! Redis and RabbitMQ brokers ([`brokers`]).
#![allow(dead_code, missing_docs, unreachable_pub)]

pub mod brokers;
pub mod procs;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use herald_edge::config::{Config, Overrides};

/// How long any single expected event may take before a test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// An edge running inside the test process.
pub struct TestServer {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<
        tokio::task::JoinHandle<
            Result<herald_edge::DrainReport, herald_edge::auth::AuthConfigError>,
        >,
    >,
}

/// Builds a config from `key=value` overrides on top of defaults (no file, no environment).
pub fn config(overrides: &[(&str, &str)]) -> Config {
    let overrides: Overrides = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::load(None, &BTreeMap::new(), &overrides).expect("test config is valid")
}

/// The API key every test server accepts unless a test overrides `auth.api-keys`.
pub const API_KEY: &str = "test-api-key";

/// Starts an edge on ephemeral ports with `dev: true`, the API key [`API_KEY`], plus `overrides` (later entries
/// win).
pub async fn start_server(overrides: &[(&str, &str)]) -> TestServer {
    let mut all = vec![
        ("dev", "true"),
        ("log-level", "warn"),
        ("auth.api-keys", API_KEY),
    ];
    all.extend_from_slice(overrides);
    start_with_config(config(&all)).await
}

pub async fn start_with_config(config: Config) -> TestServer {
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(herald_edge::run(
        config,
        herald_edge::Listeners {
            http,
            grpc,
            admin: None,
        },
        async move {
            let _ = rx.await;
        },
    ));
    TestServer {
        http: http_addr,
        grpc: grpc_addr,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/", self.http)
    }

    /// Connects and reads the first (auth) frame, asserting it authorized the connection.
    pub async fn client(&self) -> WsClient {
        let mut client = WsClient::connect(&self.ws_url(), &[]).await;
        let first = client.recv_json().await;
        assert_eq!(first["is_authorized"], json!(true), "first frame: {first}");
        client
    }

    /// Publishes over `POST /api/v1/publish` and returns the parsed answer.
    pub async fn publish(&self, body: Value) -> Value {
        let (status, text) = http_request(
            "POST",
            &format!("http://{}/api/v1/publish", self.http),
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {API_KEY}")),
            ],
            body.to_string(),
        )
        .await;
        assert_eq!(status, 200, "publish answered {status}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Reads `/metrics` and returns the value of one series (exact name including labels).
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) =
            http_request("GET", &format!("http://{}/metrics", self.http), &[], "").await;
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }

    /// Starts the drain and waits for `run` to return.
    pub async fn stop(mut self) -> herald_edge::DrainReport {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle.take().unwrap())
            .await
            .expect("drain finished")
            .unwrap()
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real WebSocket client (tokio-tungstenite).
pub struct WsClient {
    pub ws: Ws,
}

/// What a client saw instead of the frame it waited for.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<u16>),
    Dropped,
}

impl WsClient {
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> WsClient {
        Self::try_connect(url, headers)
            .await
            .expect("websocket connect")
    }

    pub async fn try_connect(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")?;
        Ok(WsClient { ws })
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// The next data frame's text, skipping pings/pongs; panics on close or timeout.
    pub async fn recv_text(&mut self) -> String {
        match self.next_text().await {
            Ok(text) => text,
            Err(ended) => panic!("connection ended while waiting for a frame: {ended:?}"),
        }
    }

    pub async fn next_text(&mut self) -> Result<String, Ended> {
        loop {
            let message = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match message {
                Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(Ended::Closed(frame.map(|f| u16::from(f.code))))
                }
                Some(Ok(Message::Binary(b))) => panic!("unexpected binary frame {b:?}"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Ended::Dropped),
            }
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Waits for the connection to end and returns its close code.
    pub async fn expect_close(&mut self) -> Ended {
        loop {
            match self.next_text().await {
                Ok(_) => continue,
                Err(ended) => return ended,
            }
        }
    }

    /// Asserts that nothing but protocol pings and pongs arrives for `wait` (the server pings on its own, and
    /// reading on answers its pings as any client must).
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(message) => panic!("expected silence, got {message:?}"),
            }
        }
    }

    /// Subscribes and returns the reply.
    pub async fn subscribe(&mut self, request_id: Value, room: Value) -> Value {
        self.send_json(json!({"type": "subscribe", "requestId": request_id, "room": room}))
            .await;
        self.recv_json().await
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

/// WebSocket opcodes, for [`RawWs`].
pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A WebSocket client on a bare TCP socket that does nothing on its own: it reads only when asked and never
/// answers a ping, so it can play a client that stopped reading or a peer that is gone.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
}

impl RawWs {
    /// Connects to `/ws/` and completes the upgrade.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let request = format!(
            "GET /ws/ HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(STEP, stream.read(&mut chunk))
                .await
                .expect("upgrade response timed out")
                .unwrap();
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        RawWs {
            stream,
            buf: buf.split_off(end),
        }
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send(OP_TEXT, value.to_string().as_bytes()).await;
    }

    /// The next frame, `(opcode, payload)`; `None` once the server has closed the socket.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for a frame")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the server's close frame, skipping everything before it, and returns its code; `None` if the
    /// socket ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((opcode, payload)) = self.read_frame().await {
            if opcode == OP_CLOSE {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }
}

/// One unmasked server frame from the front of `buf`, and the bytes it took.
fn parse_server_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let (len, start) = match *buf.get(1)? & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?;
    Some(((buf[0] & 0x0f, payload.to_vec()), start + len))
}

/// One HTTP request with hyper's client; returns status and body text.
pub async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        STEP,
        client.request(request.body(Full::new(body.into())).unwrap()),
    )
    .await
    .expect("http request timed out")
    .expect("http request failed");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// What a [`Backend`] answers to `GET /api/bootstrap/`.
#[derive(Clone)]
pub struct BackendAnswer {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl BackendAnswer {
    pub fn ok(body: Value) -> Self {
        BackendAnswer {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
}

/// A real HTTP backend, started by the test, that answers bootstrap calls and records their headers.
pub struct Backend {
    pub addr: SocketAddr,
    pub answer: Arc<Mutex<BackendAnswer>>,
    pub requests: Arc<Mutex<Vec<(String, http::HeaderMap)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(answer: BackendAnswer) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (answer.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (a, r) = (a.clone(), r.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let (a, r) = (a.clone(), r.clone());
                            async move {
                                r.lock()
                                    .unwrap()
                                    .push((request.uri().to_string(), request.headers().clone()));
                                let answer = a.lock().unwrap().clone();
                                tokio::time::sleep(answer.delay).await;
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(answer.status)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(answer.body)))
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
        Backend {
            addr,
            answer,
            requests,
            task,
        }
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api/", self.addr)
    }

    pub fn set(&self, answer: BackendAnswer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn last_request(&self) -> (String, http::HeaderMap) {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
