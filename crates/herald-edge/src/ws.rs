//! `GET /ws/`: the upgrade checks, authorization, and each connection's reader.
//!
//! A connection is two tasks: this reader, which parses client messages and answers them by pushing onto the
//! connection's outbound queue, and the writer in [`crate::outbound`]. fastwebsockets' `read_frame` is not
//! cancel-safe, so the reader never races it against other work in a `select!` it means to continue from: the
//! only branches that interrupt a read (kill, idle timeout) end the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use herald_protocol::cmd::{Rpc, StatusCounters};
use herald_protocol::{reply, Command, ErrorCode, ProtocolError, RequestId};

use crate::auth::{Grant, Methods};
use crate::hub::{Conn, SubscribeError};
use crate::liveness::LivenessSettings;
use crate::outbound::{self, Outbound};
use crate::rpc::{RpcClient, RpcOutcome};
use crate::server::State;

/// How long a refused connection keeps its socket after `{"is_authorized": false}` before the close, as
/// High-templar did, so clients reliably read the frame before the close.
const REFUSED_CLOSE_DELAY: Duration = Duration::from_millis(100);

type Body = Full<Bytes>;

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("valid response")
}

/// Handles an upgrade request on `/ws/`.
pub(crate) async fn upgrade(
    state: Arc<State>,
    mut request: hyper::Request<Incoming>,
) -> Response<Body> {
    let metrics = &state.metrics;
    if state.is_draining() {
        metrics.connections_refused.inc("draining");
        return plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&request) {
        metrics.connections_refused.inc("bad_upgrade");
        return plain(StatusCode::UPGRADE_REQUIRED, "websocket upgrade required\n");
    }
    if let Some(origin) = request.headers().get(http::header::ORIGIN) {
        if !origin_allowed(&state.config.limits.allowed_origins, origin.as_bytes()) {
            metrics.connections_refused.inc("origin");
            tracing::warn!(origin = ?origin, "websocket origin not allowed");
            return plain(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
    }

    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(pair) => pair,
        Err(e) => {
            metrics.connections_refused.inc("bad_upgrade");
            tracing::debug!(cause = %e, "bad websocket upgrade");
            return plain(StatusCode::BAD_REQUEST, "bad websocket upgrade\n");
        }
    };
    let (parts, _body) = request.into_parts();
    let task_state = state.clone();
    state.ws_tasks.spawn(async move {
        let grant = task_state
            .authorizer
            .authorize(&parts, &task_state.metrics)
            .await;
        match upgrade.await {
            Ok(ws) => run_connection(task_state, ws, grant, parts).await,
            Err(e) => tracing::debug!(cause = %e, "websocket upgrade did not complete"),
        }
    });
    response.map(|_| Full::new(Bytes::new()))
}

/// `https://*.example.com` allows `https://a.example.com`; other entries must match exactly.
fn origin_allowed(allowed: &[String], origin: &[u8]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    allowed.iter().any(|pattern| {
        if pattern == origin || pattern == "*" {
            return true;
        }
        match pattern.split_once("://*.") {
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
                .is_some_and(|host| host.ends_with(&format!(".{domain}"))),
            None => false,
        }
    })
}

async fn run_connection(
    state: Arc<State>,
    ws: fastwebsockets::WebSocket<TokioIo<Upgraded>>,
    grant: Result<Grant, crate::auth::Denial>,
    parts: Parts,
) {
    let limits = &state.config.limits;
    // herald writes its own frames (see `outbound`), so it keeps the raw write half and gives fastwebsockets only
    // the read half; the write half fastwebsockets wants is a sink that is never used.
    let (read, write) = tokio::io::split(ws.into_inner());
    let (mut read, _) = fastwebsockets::after_handshake_split(
        read,
        tokio::io::sink(),
        fastwebsockets::Role::Server,
    );
    // fastwebsockets refuses frames of `>= max` bytes; herald's limit is inclusive.
    read.set_max_message_size(limits.max_message_bytes + 1);
    read.set_auto_close(true);
    // Pings are answered below rather than inside fastwebsockets, so that they count as activity for the idle
    // timeout (read_frame would otherwise swallow them without returning).
    read.set_auto_pong(false);

    let outbound = Arc::new(Outbound::new(
        limits.outbound_queue_frames,
        limits.outbound_queue_bytes,
    ));
    let reader_done = CancellationToken::new();

    // What a connection needs for its RPCs: the credentials bootstrap forwarded, taken from the upgrade request
    // now (the request is gone afterwards), the methods it may call, and its share of in-flight calls.
    let rpc = match (&grant, &state.rpc) {
        (Ok(grant), Some(client)) => Some(ConnectionRpc {
            client: client.clone(),
            credentials: Arc::new(crate::auth::forwarded_headers(
                &parts,
                client.extra_headers(),
            )),
            methods: grant.methods.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(client.per_connection())),
        }),
        _ => None,
    };
    let conn = match grant {
        Ok(grant) => {
            let conn =
                state
                    .hub
                    .connect(grant.user_id.clone(), grant.permissions, outbound.clone());
            state.metrics.connections_accepted.inc();
            tracing::debug!(connection = %conn.id, user = ?grant.user_id, "connection authorized");
            let _ = outbound.push_text(Bytes::from(reply::authorized(&grant.allowed_rooms)), None);
            Some(conn)
        }
        Err(denial) => {
            state.metrics.connections_refused.inc("unauthorized");
            tracing::info!(reason = denial.reason, detail = %denial.detail, path = %parts.uri.path(), "connection not authorized");
            let _ =
                outbound.push_text(Bytes::from_static(reply::not_authorized().as_bytes()), None);
            let closer = outbound.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REFUSED_CLOSE_DELAY).await;
                closer.close(outbound::CLOSE_NORMAL, "not authorized");
            });
            None
        }
    };

    // Spawned once the connection has its id (for the writer's logs); what was queued meanwhile waits for it.
    let writer = tokio::spawn(outbound::run_writer(
        outbound.clone(),
        write,
        outbound::WriterContext {
            metrics: state.metrics.clone(),
            going_away: state.going_away.clone(),
            reader_done: reader_done.clone(),
            liveness: LivenessSettings::from_limits(limits),
            connection: conn
                .as_ref()
                .map_or_else(|| Arc::from(""), |c| c.id.clone()),
        },
    ));

    let mut reader = Reader {
        state: &state,
        conn: conn.as_ref(),
        outbound: &outbound,
        bucket: TokenBucket::new(limits.inbound_messages_per_second, limits.inbound_burst),
        rpc,
        ended: reader_done.clone(),
    };
    reader.run(&mut read).await;
    reader_done.cancel();
    if let Some(conn) = &conn {
        state.hub.disconnect(conn);
        tracing::debug!(connection = %conn.id, "connection closed");
    }
    let _ = writer.await;
}

struct Reader<'a> {
    state: &'a Arc<State>,
    conn: Option<&'a Arc<Conn>>,
    outbound: &'a Arc<Outbound>,
    bucket: TokenBucket,
    /// `None` when RPC is not configured on this node.
    rpc: Option<ConnectionRpc>,
    /// Cancelled when the connection's reader stops: its RPCs in flight are abandoned.
    ended: CancellationToken,
}

/// One connection's RPC rights and budget.
struct ConnectionRpc {
    client: Arc<RpcClient>,
    credentials: Arc<http::HeaderMap>,
    methods: Methods,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Reader<'_> {
    async fn run(
        &mut self,
        read: &mut fastwebsockets::WebSocketRead<tokio::io::ReadHalf<TokioIo<Upgraded>>>,
    ) {
        let limits = &self.state.config.limits;
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let max = limits.max_message_bytes;
        let obligated = self.outbound.clone();
        // Pongs and close replies that fastwebsockets owes the client go through the same queue as everything
        // else, so they are ordered with, and coalesced into, the other frames.
        let mut send_fn = move |frame: Frame<'_>| {
            match frame.opcode {
                OpCode::Pong => {
                    let _ = obligated.push_pong(Bytes::copy_from_slice(&frame.payload));
                }
                OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map_or(outbound::CLOSE_NORMAL, |b| u16::from_be_bytes([b[0], b[1]]));
                    obligated.close(code, "");
                }
                _ => {}
            }
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        };

        let mut message: Option<(OpCode, Vec<u8>)> = None;
        // The idle timeout counts from the client's last frame other than a pong answering the server's ping:
        // those come from the client's WebSocket stack, not from the client, and would keep every live connection
        // from ever being idle.
        let mut idle_deadline = tokio::time::Instant::now() + idle;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout_at(idle_deadline, read.read_frame(&mut send_fn)) => next,
                _ = self.outbound.killed().cancelled() => return,
            };
            let frame = match next {
                Err(_) => {
                    self.state.metrics.client_errors.inc("idle_timeout");
                    tracing::debug!("idle timeout");
                    self.outbound.close(outbound::CLOSE_NORMAL, "idle timeout");
                    return;
                }
                Ok(Err(e)) => {
                    self.fail(e);
                    return;
                }
                Ok(Ok(frame)) => frame,
            };
            // The writer's liveness check waits for this pong; any other (RFC 6455 allows unsolicited pongs as a
            // heartbeat) is ignored, and counts as the client's activity like any other frame.
            let answered =
                frame.opcode == OpCode::Pong && self.outbound.record_pong(&frame.payload);
            if !answered {
                idle_deadline = tokio::time::Instant::now() + idle;
            }
            let (opcode, payload) = match frame.opcode {
                OpCode::Close => return,
                OpCode::Ping => {
                    let _ = self
                        .outbound
                        .push_pong(Bytes::copy_from_slice(&frame.payload));
                    continue;
                }
                OpCode::Pong => continue,
                OpCode::Text | OpCode::Binary if frame.fin => {
                    (frame.opcode, frame.payload.to_vec())
                }
                OpCode::Text | OpCode::Binary => {
                    message = Some((frame.opcode, frame.payload.to_vec()));
                    continue;
                }
                OpCode::Continuation => {
                    let Some((_, buffer)) = message.as_mut() else {
                        self.close(
                            outbound::CLOSE_PROTOCOL_ERROR,
                            "protocol",
                            "unexpected continuation",
                        );
                        return;
                    };
                    if buffer.len() + frame.payload.len() > max {
                        self.close(outbound::CLOSE_TOO_BIG, "too_large", "message too big");
                        return;
                    }
                    buffer.extend_from_slice(&frame.payload);
                    if !frame.fin {
                        continue;
                    }
                    message.take().expect("checked above")
                }
            };
            if opcode == OpCode::Binary {
                self.state.metrics.client_errors.inc("binary");
                self.error(ProtocolError {
                    code: ErrorCode::BinaryNotSupported,
                    request_id: None,
                });
                continue;
            }
            let Ok(text) = std::str::from_utf8(&payload) else {
                self.close(
                    outbound::CLOSE_INVALID_PAYLOAD,
                    "invalid_utf8",
                    "invalid utf-8",
                );
                return;
            };
            self.handle_text(text);
        }
    }

    fn fail(&self, error: WebSocketError) {
        match error {
            WebSocketError::FrameTooLarge => {
                self.close(outbound::CLOSE_TOO_BIG, "too_large", "message too big")
            }
            WebSocketError::InvalidUTF8 => self.close(
                outbound::CLOSE_INVALID_PAYLOAD,
                "invalid_utf8",
                "invalid utf-8",
            ),
            WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) => {}
            other => {
                tracing::debug!(cause = %other, "websocket protocol error");
                self.close(outbound::CLOSE_PROTOCOL_ERROR, "protocol", "protocol error");
            }
        }
    }

    fn close(&self, code: u16, kind: &'static str, reason: &'static str) {
        self.state.metrics.client_errors.inc(kind);
        tracing::debug!(code, reason, "closing connection");
        self.outbound.close(code, reason);
    }

    fn send(&self, text: String) {
        let _ = self.outbound.push_text(Bytes::from(text), None);
    }

    fn error(&self, error: ProtocolError) {
        tracing::debug!(
            connection = self.conn.map_or("", |c| &c.id),
            code = error.code.as_str(),
            "client error"
        );
        let request_id = error
            .request_id
            .unwrap_or_else(|| RequestId::from_connection_id(self.conn.map_or("", |c| &c.id)));
        self.send(reply::error(error.code, &request_id));
    }

    fn handle_text(&mut self, text: &str) {
        // A refused connection gets nothing but its close.
        let Some(conn) = self.conn else { return };
        let metrics = &self.state.metrics;
        metrics.messages_received.inc();
        if !self.bucket.take() {
            metrics.client_errors.inc("rate_limited");
            self.error(ProtocolError {
                code: ErrorCode::RateLimited,
                request_id: None,
            });
            return;
        }
        let command = match Command::parse(text) {
            Ok(command) => command,
            Err(error) => {
                metrics.client_errors.inc(match error.code {
                    ErrorCode::NonJsonMessage => "non_json",
                    ErrorCode::NoRequestId => "no_request_id",
                    ErrorCode::InvalidRoom => "invalid_room",
                    ErrorCode::InvalidMethod => "invalid_method",
                    _ => "bad_type",
                });
                self.error(error);
                return;
            }
        };
        match command {
            Command::Ping(_) => self.send(herald_protocol::cmd::Ping::REPLY.to_owned()),
            Command::Subscribe(sub) => {
                match self
                    .state
                    .hub
                    .subscribe(conn, sub.request_id.clone(), sub.room)
                {
                    Ok(()) => self.send(reply::success(&sub.request_id)),
                    Err(SubscribeError::NotAllowed) => {
                        metrics.client_errors.inc("room_not_found");
                        self.send(reply::error(ErrorCode::RoomNotFound, &sub.request_id));
                    }
                    Err(SubscribeError::TooMany) => {
                        metrics.client_errors.inc("too_many_subscriptions");
                        self.send(reply::error(
                            ErrorCode::TooManySubscriptions,
                            &sub.request_id,
                        ));
                    }
                }
            }
            Command::Unsubscribe(unsub) => {
                if self.state.hub.unsubscribe(conn, &unsub.request_id) {
                    self.send(reply::success(&unsub.request_id));
                } else {
                    metrics.client_errors.inc("not_subscribed");
                    self.send(reply::error(ErrorCode::NotSubscribed, &unsub.request_id));
                }
            }
            Command::Rpc(rpc) => self.start_rpc(conn, rpc),
            Command::Status(status) => {
                let counters = StatusCounters {
                    open_connections: self.state.hub.connection_count() as u64,
                    num_rooms: self.state.hub.room_count() as u64,
                    online_since: self.state.online_since.clone(),
                    messages_in: metrics.messages_received.get(),
                    messages_out: metrics.frames_sent.get(),
                    messages_dropped: metrics.messages_dropped.get("slow_consumer")
                        + metrics.messages_dropped.get("closed"),
                };
                self.send(status.reply(&counters));
            }
        }
    }
}

impl Reader<'_> {
    /// Checks an RPC against the connection's rights and budgets, then runs it in its own task: the reader goes
    /// on reading while the backend works, and the answer is queued like any other frame.
    fn start_rpc(&self, conn: &Arc<Conn>, rpc: Rpc) {
        let metrics = &self.state.metrics;
        let refuse = |code: ErrorCode, result: &str| {
            metrics.rpc_calls.inc(result);
            tracing::debug!(connection = %conn.id, method = %rpc.method, code = code.as_str(), "rpc refused");
            self.send(reply::rpc_error(code, &rpc.request_id, None));
        };
        let Some(rights) = &self.rpc else {
            return refuse(ErrorCode::MethodNotAllowed, "not_allowed");
        };
        if !rights.methods.allows(&rpc.method) {
            return refuse(ErrorCode::MethodNotAllowed, "not_allowed");
        }
        let Ok(connection_slot) = rights.in_flight.clone().try_acquire_owned() else {
            return refuse(ErrorCode::RpcBusy, "busy");
        };
        let Some(node_slot) = rights.client.try_reserve() else {
            return refuse(ErrorCode::RpcBusy, "busy");
        };
        let client = rights.client.clone();
        let credentials = rights.credentials.clone();
        let outbound = self.outbound.clone();
        let metrics = metrics.clone();
        let ended = self.ended.clone();
        let connection = conn.id.clone();
        let user = conn.user_id.clone();
        tokio::spawn(async move {
            let _slots = (connection_slot, node_slot);
            let call = client.call(
                &rpc.method,
                rpc.data,
                &credentials,
                &connection,
                user.as_deref(),
                &metrics,
            );
            let outcome = tokio::select! {
                outcome = call => outcome,
                // Nobody is left to answer: drop the call (and its connection to the backend).
                _ = ended.cancelled() => return,
            };
            let frame = match outcome {
                RpcOutcome::Success(data) => reply::rpc_success(&rpc.request_id, &data),
                RpcOutcome::Timeout => {
                    tracing::info!(connection = %connection, method = %rpc.method, "rpc timed out");
                    reply::rpc_error(ErrorCode::RpcTimeout, &rpc.request_id, None)
                }
                RpcOutcome::Failed { status, reason } => {
                    tracing::info!(connection = %connection, method = %rpc.method, reason = %reason, "rpc failed");
                    reply::rpc_error(ErrorCode::RpcFailed, &rpc.request_id, status)
                }
            };
            let _ = outbound.push_text(Bytes::from(frame), None);
        });
    }
}

/// Per-connection inbound rate limit: `rate` messages per second sustained, bursts of `burst`.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            tokens: burst as f64,
            rate: rate as f64,
            burst: burst as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example".to_string(),
            "https://*.example.org".to_string(),
        ];
        assert!(origin_allowed(&allowed, b"https://app.example"));
        assert!(origin_allowed(&allowed, b"https://a.b.example.org"));
        assert!(!origin_allowed(&allowed, b"https://example.org"));
        assert!(!origin_allowed(&allowed, b"http://a.example.org"));
        assert!(!origin_allowed(&allowed, b"https://evil.example"));
        assert!(!origin_allowed(&allowed, b"https://app.example.evil"));
        assert!(origin_allowed(&[], b"https://anything"));
    }

    #[test]
    fn token_bucket_allows_the_burst_then_refuses() {
        let mut bucket = TokenBucket::new(1, 3);
        assert!((0..3).all(|_| bucket.take()));
        assert!(!bucket.take());
    }
}
