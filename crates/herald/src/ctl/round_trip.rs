//! `herald ctl round-trip`: the end-to-end check of a running deployment. It subscribes over a WebSocket,
//! publishes to the same room over HTTP (and over gRPC with `--grpc`), and succeeds only when each publish comes
//! back as a delivery on the subscription.
//!
//! It is what the Helm chart's `helm test` pod runs, with the herald image itself: that image has no shell and no
//! curl, and a check that speaks herald's own protocol needs no third-party image. Behind a Service the
//! subscription and the publish may land on different edges, so the publish is repeated (each with a new marker)
//! until one arrives: the subscriber's interest reaches the other edges a few milliseconds after the subscribe
//! succeeds, and delivery is at-most-once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use herald_proto::v1 as pb;

use super::{Failure, Output, EXIT_NOPERM, EXIT_SOFTWARE, EXIT_UNAVAILABLE};

/// The subscription's request id; deliveries carry it.
const REQUEST_ID: &str = "herald-round-trip";
/// How long one publish may stay undelivered before the next one is sent.
const REPUBLISH_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub(crate) struct RoundTripArgs {
    /// The edge (or the Service in front of the edges) to subscribe on: `host:port` of its WebSocket/HTTP port.
    #[arg(long, env = "HERALD_CTL_EDGE", value_name = "HOST:PORT")]
    edge: String,
    /// Where to publish over HTTP; `--edge` when absent. Another edge of the cluster checks edge-to-edge forwarding.
    #[arg(long, value_name = "HOST:PORT")]
    publish_edge: Option<String>,
    /// Also publish through the gRPC publish API (`herald.v1.Publisher`) at this address.
    #[arg(long, env = "HERALD_CTL_GRPC", value_name = "HOST:PORT")]
    grpc: Option<String>,
    /// The room to subscribe and publish to (JSON); the edge's auth must let the connection subscribe to it.
    #[arg(long, default_value = r#"{"herald":"round-trip"}"#)]
    room: String,
    /// A publish API key; given a comma-separated list (the form `auth.api-keys` takes), the first one.
    #[arg(long, env = "HERALD_CTL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Sent as `?token=` on the WebSocket upgrade (a JWT, or the token the bootstrap backend expects).
    #[arg(long, env = "HERALD_CTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Sign a short-lived HS256 JWT allowing `--room` with this secret (the edges' `auth.jwt.hs256-secret`) and
    /// send it as `?token=`, for edges whose auth method is `jwt`.
    #[arg(
        long,
        env = "HERALD_CTL_JWT_HS256_SECRET",
        hide_env_values = true,
        conflicts_with = "token"
    )]
    jwt_hs256_secret: Option<String>,
    /// How long the whole check may take, connecting included (an edge still starting is waited for).
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

/// Runs the check; prints one line (or a JSON document) when every publish came back.
pub(crate) async fn run(args: &RoundTripArgs, output: Output) -> Result<(), Failure> {
    let room: Value = serde_json::from_str(&args.room)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            Failure::usage(format!("--room must be a JSON object, got {:?}", args.room))
        })?;
    let api_key = args
        .api_key
        .as_deref()
        .and_then(|keys| keys.split(',').map(str::trim).find(|k| !k.is_empty()));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let started = Instant::now();

    let token = match &args.jwt_hs256_secret {
        Some(secret) => Some(sign_token(secret, &room)?),
        None => args.token.clone(),
    };
    let path = match &token {
        Some(token) => format!("/ws/?token={}", percent_encode(token)),
        None => "/ws/".to_owned(),
    };
    let mut ws = connect_until(&args.edge, &path, deadline).await?;
    let hello = next_json(&mut ws, deadline, "the authorization answer").await?;
    if hello["is_authorized"] != true {
        return Err(Failure {
            code: EXIT_NOPERM,
            message: format!(
                "{} did not authorize the WebSocket ({hello}): its auth must let this client subscribe to {room} \
                 (a static room, or pass --token)",
                args.edge
            ),
        });
    }
    let subscribe = json!({"type": "subscribe", "room": room, "requestId": REQUEST_ID});
    send_json(&mut ws, &subscribe).await?;
    loop {
        let reply = next_json(&mut ws, deadline, "the subscribe answer").await?;
        if reply["requestId"] != REQUEST_ID {
            continue;
        }
        if reply["code"] == "success" {
            break;
        }
        return Err(Failure {
            code: EXIT_NOPERM,
            message: format!("subscribing to {room} on {} failed: {reply}", args.edge),
        });
    }

    let nonce = format!("{:x}", nonce());
    let publish_edge = args.publish_edge.as_deref().unwrap_or(&args.edge);
    let mut report = vec![json!({"via": "http", "edge": publish_edge})];
    let http = Publisher::Http {
        addr: publish_edge,
        key: api_key,
    };
    let (latency, attempts) = deliver(&mut ws, &http, &room, &nonce, deadline).await?;
    report[0]["latency_ms"] = json!(latency.as_millis() as u64);
    report[0]["publishes"] = json!(attempts);
    if let Some(addr) = &args.grpc {
        let grpc = Publisher::Grpc {
            client: grpc_client(addr).await?,
            addr,
            key: api_key,
        };
        let (latency, attempts) = deliver(&mut ws, &grpc, &room, &nonce, deadline).await?;
        report.push(json!({"via": "grpc", "addr": addr, "latency_ms": latency.as_millis() as u64, "publishes": attempts}));
    }
    let _ = ws.write_frame(Frame::close(1000, b"round trip done")).await;

    match output {
        Output::Json => println!(
            "{:#}",
            json!({"ok": true, "edge": args.edge, "room": room, "deliveries": report, "total_ms": started.elapsed().as_millis() as u64})
        ),
        Output::Text => {
            let legs: Vec<String> = report
                .iter()
                .map(|leg| {
                    format!(
                        "{} publish delivered in {} ms ({} sent)",
                        leg["via"].as_str().unwrap_or("?"),
                        leg["latency_ms"],
                        leg["publishes"]
                    )
                })
                .collect();
            println!(
                "round trip ok: subscribed to {room} on {}; {}",
                args.edge,
                legs.join("; ")
            );
        }
    }
    Ok(())
}

// === impl Publisher ===

/// One way of publishing.
enum Publisher<'a> {
    Http {
        addr: &'a str,
        key: Option<&'a str>,
    },
    Grpc {
        client: pb::publisher_client::PublisherClient<tonic::transport::Channel>,
        addr: &'a str,
        key: Option<&'a str>,
    },
}

impl Publisher<'_> {
    fn name(&self) -> &'static str {
        match self {
            Publisher::Http { .. } => "HTTP",
            Publisher::Grpc { .. } => "gRPC",
        }
    }

    /// Publishes `data` to `room` once.
    async fn publish(&self, room: &Value, data: &Value) -> Result<(), Failure> {
        match self {
            Publisher::Http { addr, key } => {
                let body = json!({"rooms": [room], "data": data}).to_string();
                let (status, answer) = http_post(addr, "/api/v1/publish", *key, body).await?;
                match status {
                    200 => Ok(()),
                    401 => Err(refused_key(addr, &answer)),
                    _ => Err(Failure {
                        code: EXIT_SOFTWARE,
                        message: format!("publishing on {addr} answered {status}: {answer}"),
                    }),
                }
            }
            Publisher::Grpc { client, addr, key } => {
                let mut request = tonic::Request::new(pb::PublishRequest {
                    targets: vec![pb::Target {
                        kind: Some(pb::target::Kind::Room(grpc_room(room)?)),
                    }],
                    data_json: data.to_string().into(),
                });
                if let Some(key) = key {
                    let value = format!("Bearer {key}")
                        .parse()
                        .map_err(|_| Failure::usage("the API key is not a valid header value"))?;
                    request.metadata_mut().insert("authorization", value);
                }
                match client.clone().publish(request).await {
                    Ok(_) => Ok(()),
                    Err(status) if status.code() == tonic::Code::Unauthenticated => {
                        Err(refused_key(addr, status.message()))
                    }
                    Err(status) if status.code() == tonic::Code::Unavailable => Err(Failure {
                        code: EXIT_UNAVAILABLE,
                        message: format!(
                            "the gRPC publish API at {addr} is unreachable: {}",
                            status.message()
                        ),
                    }),
                    Err(status) => Err(Failure {
                        code: EXIT_SOFTWARE,
                        message: format!("publishing over gRPC on {addr} failed: {status}"),
                    }),
                }
            }
        }
    }
}

fn refused_key(addr: &str, answer: &str) -> Failure {
    Failure {
        code: EXIT_NOPERM,
        message: format!(
            "{addr} refused the API key ({answer}); pass --api-key or set HERALD_CTL_API_KEY"
        ),
    }
}

/// Publishes a new marker every [`REPUBLISH_AFTER`] until one of them is delivered on `ws`: (time from the first
/// publish to the delivery, publishes sent).
async fn deliver(
    ws: &mut WsConn,
    publisher: &Publisher<'_>,
    room: &Value,
    nonce: &str,
    deadline: Instant,
) -> Result<(Duration, u32), Failure> {
    let first = Instant::now();
    let mut sent = Vec::new();
    loop {
        if Instant::now() >= deadline {
            return Err(Failure {
                code: EXIT_SOFTWARE,
                message: format!(
                    "none of {} {} publish(es) to {room} came back on the subscription",
                    sent.len(),
                    publisher.name()
                ),
            });
        }
        let marker = json!({"round-trip": format!("{nonce}-{}-{}", publisher.name(), sent.len())});
        publisher.publish(room, &marker).await?;
        sent.push(marker);
        let wait_until = (Instant::now() + REPUBLISH_AFTER).min(deadline);
        while let Some(frame) = next_json_before(ws, wait_until).await? {
            if frame["type"] == "publish"
                && frame["requestId"] == REQUEST_ID
                && sent.contains(&frame["data"])
            {
                return Ok((first.elapsed(), sent.len() as u32));
            }
        }
    }
}

// === WebSocket ===

type WsConn = FragmentCollector<TokioIo<Upgraded>>;

/// Connects and upgrades, retrying every second until `deadline` while the edge refuses or is not there yet.
async fn connect_until(addr: &str, path: &str, deadline: Instant) -> Result<WsConn, Failure> {
    loop {
        let attempt = tokio::time::timeout_at(deadline.into(), ws_connect(addr, path)).await;
        let error = match attempt {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => e,
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() + Duration::from_secs(1) >= deadline {
            return Err(Failure {
                code: EXIT_UNAVAILABLE,
                message: format!("no WebSocket to {addr}{path}: {error}"),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn ws_connect(addr: &str, path: &str) -> Result<WsConn, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(FragmentCollector::new(ws))
}

async fn send_json(ws: &mut WsConn, value: &Value) -> Result<(), Failure> {
    let text = value.to_string().into_bytes();
    ws.write_frame(Frame::text(Payload::Owned(text)))
        .await
        .map_err(|e| Failure {
            code: EXIT_UNAVAILABLE,
            message: format!("the WebSocket failed: {e}"),
        })
}

/// The next JSON text frame, or a failure naming what was awaited.
async fn next_json(ws: &mut WsConn, deadline: Instant, what: &str) -> Result<Value, Failure> {
    next_json_before(ws, deadline)
        .await?
        .ok_or_else(|| Failure {
            code: EXIT_UNAVAILABLE,
            message: format!("no {what} before the deadline"),
        })
}

/// The next JSON text frame, `None` when `until` passes first. Pings are answered by fastwebsockets; a close or
/// a broken connection is a failure.
async fn next_json_before(ws: &mut WsConn, until: Instant) -> Result<Option<Value>, Failure> {
    loop {
        let frame = match tokio::time::timeout_at(until.into(), ws.read_frame()).await {
            Err(_) => return Ok(None),
            Ok(Err(e)) => {
                return Err(Failure {
                    code: EXIT_UNAVAILABLE,
                    message: format!("the WebSocket failed: {e}"),
                })
            }
            Ok(Ok(frame)) => frame,
        };
        match frame.opcode {
            OpCode::Text => {
                // `ping` is answered `pong` as text; everything else herald sends is JSON.
                if let Ok(value) = serde_json::from_slice::<Value>(&frame.payload) {
                    return Ok(Some(value));
                }
            }
            OpCode::Close => {
                let code = match &frame.payload[..] {
                    [high, low, ..] => u16::from_be_bytes([*high, *low]).to_string(),
                    _ => "no code".to_owned(),
                };
                return Err(Failure {
                    code: EXIT_UNAVAILABLE,
                    message: format!("the edge closed the WebSocket ({code})"),
                });
            }
            _ => {}
        }
    }
}

/// Runs hyper's connection task (which ends once the connection is upgraded) on the current runtime.
struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future);
    }
}

// === HTTP and gRPC ===

/// One `POST` with a JSON body: (status, body).
async fn http_post(
    addr: &str,
    path: &str,
    key: Option<&str>,
    body: String,
) -> Result<(u16, String), Failure> {
    let unreachable = |e: String| Failure {
        code: EXIT_UNAVAILABLE,
        message: format!("the publish API at {addr} is unreachable: {e}"),
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| Failure::usage("the API key is not a valid header value"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
}

async fn grpc_client(
    addr: &str,
) -> Result<pb::publisher_client::PublisherClient<tonic::transport::Channel>, Failure> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Failure::usage(format!("--grpc {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    // Lazy: an unreachable address shows as UNAVAILABLE on the first publish.
    Ok(pb::publisher_client::PublisherClient::new(
        endpoint.connect_lazy(),
    ))
}

/// A JSON room as the gRPC API's `Room`.
fn grpc_room(room: &Value) -> Result<pb::Room, Failure> {
    use pb::scalar::Kind;
    let mut fields = std::collections::HashMap::new();
    for (key, value) in room.as_object().into_iter().flatten() {
        let kind = match value {
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Null => Kind::NullValue(true),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Kind::IntValue(i),
                None => Kind::DoubleValue(n.as_f64().unwrap_or_default()),
            },
            Value::Array(_) | Value::Object(_) => {
                return Err(Failure::usage(format!(
                    "--room values must be scalars, {key:?} is not"
                )))
            }
        };
        fields.insert(key.clone(), pb::Scalar { kind: Some(kind) });
    }
    Ok(pb::Room { fields })
}

/// A JWT allowing `room` for five minutes, signed with the edges' HS256 secret.
fn sign_token(secret: &str, room: &Value) -> Result<String, Failure> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = json!({"sub": "herald-round-trip", "exp": now + 300, "allowed_rooms": [room]});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| Failure::usage(format!("cannot sign a token: {e}")))
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A value unlikely to repeat across runs, so a delivery left over from another run is never taken for ours.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_keep_their_value_types_over_grpc() {
        let room = grpc_room(&json!({"s": "1", "i": 1, "f": 1.5, "b": true, "n": null}))
            .ok()
            .expect("scalar values");
        let kind = |k: &str| room.fields[k].kind.clone().unwrap();
        use pb::scalar::Kind;
        assert_eq!(kind("s"), Kind::StringValue("1".into()));
        assert_eq!(kind("i"), Kind::IntValue(1));
        assert_eq!(kind("f"), Kind::DoubleValue(1.5));
        assert_eq!(kind("b"), Kind::BoolValue(true));
        assert_eq!(kind("n"), Kind::NullValue(true));
        assert!(grpc_room(&json!({"nested": {"a": 1}})).is_err());
    }

    #[test]
    fn tokens_are_percent_encoded_in_the_query() {
        assert_eq!(percent_encode("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(percent_encode("a+b/c=&"), "a%2Bb%2Fc%3D%26");
    }
}
