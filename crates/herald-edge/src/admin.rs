//! The admin API: what `herald ctl status` reads. Its own listener (loopback by default, `admin.*`), so it is
//! never exposed by the public listener's load balancer, and every request needs `admin.token` as a bearer
//! token, compared in constant time. Without a token configured it refuses everyone, except in dev mode.
//!
//! - `GET /admin/status`: role, edge id, uptime, connections, subscriptions, rooms, draining, and the bridges:
//!   each supervised task (up, restarts, last error) and which edge consumes each route's source.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::State;

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// Whether the request carries the admin token.
fn authorized(state: &State, request: &hyper::Request<hyper::body::Incoming>) -> bool {
    let token = &state.config.admin.token;
    if token.is_empty() {
        return state.config.dev;
    }
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

/// The node's status, as `GET /admin/status` answers it.
pub(crate) fn status(state: &State) -> Value {
    let edge_id = state.cluster.as_ref().map(|c| c.edge_id().to_string());
    json!({
        "role": if state.config.dev { "dev" } else { "edge" },
        "edge_id": edge_id,
        "online_since": state.online_since,
        "uptime_secs": state.started.elapsed().as_secs(),
        "draining": state.is_draining(),
        "connections": state.hub.connection_count(),
        "subscriptions": state.metrics.subscriptions.get(),
        "rooms": state.hub.room_count(),
        "bridges": state.bridges.status(),
    })
}

async fn route(
    state: Arc<State>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if !authorized(&state, &request) {
        tracing::warn!(path = %request.uri().path(), "admin request without a valid token refused");
        let reason = if state.config.admin.token.is_empty() {
            "no admin.token is configured on this node"
        } else {
            "missing or wrong admin token"
        };
        return reply(StatusCode::UNAUTHORIZED, json!({"error": reason}));
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/admin/status") => reply(StatusCode::OK, status(&state)),
        (_, "/admin/status") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

/// Serves the admin API on `listener` until `stop`.
pub(crate) async fn serve(state: Arc<State>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::error!(cause = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(state, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
