//! The admin API: what `herald ctl status` reads. Its own listener (loopback by default, `admin.*`), so it is
//! never exposed by the public listener's load balancer, and every request needs `admin.token` as a bearer
//! token, compared in constant time. Without a token configured it refuses everyone, except in dev mode.
//!
//! - `GET /admin/status`: role, edge id, uptime, connections, subscriptions, rooms, draining, and the bridges:
//!   each supervised task (up, restarts, last error) and which edge consumes each route's source.
//! - `GET /admin/routes`: the route table this node runs, with the source owners.
//! - `PUT /admin/routes/<name>` (`{"from": ..., "to": [...]}`), `DELETE /admin/routes/<name>`,
//!   `PUT /admin/endpoints/<name>` (an endpoint as under `endpoints:`), `DELETE /admin/endpoints/<name>`: in a
//!   cluster they go to the registry, which every edge follows; on a node without one they change its own table.
//!   Answers `{"changed": bool}`, 400 with the reason for an invalid table, 409 for an endpoint in use.

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

use crate::bridge::{TableChange, TableError};
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
    let path = request.uri().path().to_owned();
    if let Some(change) = table_request(&path) {
        return table_change(&state, request, change).await;
    }
    match (request.method(), path.as_str()) {
        (&Method::GET, "/admin/status") => reply(StatusCode::OK, status(&state)),
        (&Method::GET, "/admin/routes") => reply(StatusCode::OK, state.bridges.table_json()),
        (_, "/admin/status") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

/// The largest table-change body accepted.
const MAX_DEFINITION_BYTES: usize = 16 * 1024;

/// `(kind, name)` for `/admin/routes/<name>` and `/admin/endpoints/<name>`.
fn table_request(path: &str) -> Option<(&'static str, String)> {
    let (kind, name) = if let Some(name) = path.strip_prefix("/admin/routes/") {
        ("route", name)
    } else if let Some(name) = path.strip_prefix("/admin/endpoints/") {
        ("endpoint", name)
    } else {
        return None;
    };
    Some((kind, name.to_owned()))
}

async fn table_change(
    state: &State,
    request: hyper::Request<hyper::body::Incoming>,
    (kind, name): (&'static str, String),
) -> Response<Full<Bytes>> {
    use herald_routes::RouteError;
    use http_body_util::{BodyExt, Limited};

    let bad = |reason: String| reply(StatusCode::BAD_REQUEST, json!({"error": reason}));
    if let Err(e) = herald_routes::validate_name(kind, &name) {
        return bad(e.to_string());
    }
    let method = request.method().clone();
    let change = match method {
        Method::DELETE if kind == "route" => TableChange::DeleteRoute(name),
        Method::DELETE => TableChange::DeleteEndpoint(name),
        Method::PUT => {
            let body = match Limited::new(request.into_body(), MAX_DEFINITION_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return bad(format!(
                        "body larger than {MAX_DEFINITION_BYTES} bytes, or unreadable"
                    ))
                }
            };
            let parsed = if kind == "route" {
                serde_json::from_slice(&body)
                    .map(|route| TableChange::PutRoute(name.clone(), route))
                    .map_err(|e| RouteError::BadRoute {
                        route: name.clone(),
                        reason: e.to_string(),
                    })
            } else {
                serde_json::from_slice(&body)
                    .map(|endpoint| TableChange::PutEndpoint(name.clone(), endpoint))
                    .map_err(|e| RouteError::BadEndpoint {
                        name: name.clone(),
                        reason: e.to_string(),
                    })
            };
            match parsed {
                Ok(change) => change,
                Err(e) => return bad(e.to_string()),
            }
        }
        _ => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "use PUT or DELETE"}),
            )
        }
    };
    match state.bridges.change(change).await {
        Ok(changed) => reply(StatusCode::OK, json!({"changed": changed})),
        Err(e @ TableError::Invalid(_)) => bad(e.to_string()),
        Err(e @ TableError::InUse(_)) => {
            reply(StatusCode::CONFLICT, json!({"error": e.to_string()}))
        }
        Err(e @ TableError::Unavailable(_)) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.to_string()}),
        ),
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
