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
//! - `GET /admin/connections?limit=&after=&user=&room=`: this node's WebSocket connections in id order, a page
//!   at a time (`next` is the `after` of the following page), filtered by user and by a room pattern they are
//!   subscribed to (JSON, wildcards allowed).
//! - `GET /admin/rooms?limit=&after=&prefix=`: subscribed rooms (canonical JSON) with their local subscription
//!   counts, in order, paged the same way, filtered by a prefix of the canonical text.
//! - `POST /admin/disconnect` `{"connection": id}` or `{"user": id}`: closes those sockets with 4010 and a
//!   reason; answers how many, 404 when none matched.
//! - `POST /admin/drain`: the SIGTERM drain without the exit. `POST /admin/stop`: drain, then exit 0.

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
        "peers": peers(state),
        "registry": registry_view(state),
        "bridges": state.bridges.status(),
    })
}

/// The peer edges this edge knows from its replica, with the forwarding links' health.
fn peers(state: &State) -> Value {
    let Some(cluster) = &state.cluster else {
        return Value::Null;
    };
    let view = cluster.view().read();
    let mut edges: Vec<(&String, &String)> = view
        .edges()
        .iter()
        .filter(|(edge, _)| edge.as_str() != cluster.edge_id())
        .collect();
    edges.sort();
    json!({
        "edges": edges.iter().map(|(edge, addr)| json!({"edge": edge, "addr": addr})).collect::<Vec<_>>(),
        "links": state.metrics.peer_links.get(),
        "queue_depth": state.metrics.peer_queue_depth.get(),
        "forward_drops": state.metrics.peer_forward_drops.get("queue_full")
            + state.metrics.peer_forward_drops.get("stream_broken")
            + state.metrics.peer_forward_drops.get("other"),
    })
}

/// The registry as this edge sees it: where it is, and how far the local replica has got.
fn registry_view(state: &State) -> Value {
    let Some(cluster) = &state.cluster else {
        return Value::Null;
    };
    json!({
        "members": state.config.cluster.registry,
        "replica_revision": cluster.view().read().revision(),
    })
}

/// Page sizes: what a request gets without `limit`, and the most it may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// `?a=b&c=d`, percent-decoded.
fn query(request: &hyper::Request<hyper::body::Incoming>) -> Result<Vec<(String, String)>, String> {
    let Some(query) = request.uri().query() else {
        return Ok(Vec::new());
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(key)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-escape in {text:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// The paging and filter parameters of a listing; unknown parameters are refused so a typo is not silently
/// "no filter".
struct Listing {
    limit: usize,
    after: Option<String>,
    filters: std::collections::BTreeMap<String, String>,
}

impl Listing {
    fn parse(
        request: &hyper::Request<hyper::body::Incoming>,
        filters: &[&str],
    ) -> Result<Listing, String> {
        let mut listing = Listing {
            limit: DEFAULT_PAGE,
            after: None,
            filters: Default::default(),
        };
        for (key, value) in query(request)? {
            match key.as_str() {
                "limit" => {
                    let limit: usize = value
                        .parse()
                        .map_err(|_| format!("limit must be a positive integer, not {value:?}"))?;
                    if limit == 0 {
                        return Err("limit must be at least 1".into());
                    }
                    listing.limit = limit.min(MAX_PAGE);
                }
                "after" => listing.after = Some(value),
                key if filters.contains(&key) => {
                    listing.filters.insert(key.to_owned(), value);
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (expected limit, after{})",
                        filters.iter().map(|f| format!(", {f}")).collect::<String>()
                    ))
                }
            }
        }
        Ok(listing)
    }

    /// Sorted `items` after the cursor, one page of them, and the next cursor when more remain.
    fn page<T>(&self, mut items: Vec<(String, T)>) -> (Vec<(String, T)>, Option<String>) {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let start = match &self.after {
            Some(after) => items.partition_point(|(key, _)| key.as_str() <= after.as_str()),
            None => 0,
        };
        let mut page: Vec<(String, T)> = items.into_iter().skip(start).collect();
        let more = page.len() > self.limit;
        page.truncate(self.limit);
        let next = more
            .then(|| page.last().map(|(key, _)| key.clone()))
            .flatten();
        (page, next)
    }
}

/// `GET /admin/connections`.
fn connections(
    state: &State,
    request: &hyper::Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let listing = match Listing::parse(request, &["user", "room"]) {
        Ok(listing) => listing,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e})),
    };
    let room = match listing.filters.get("room") {
        None => None,
        Some(text) => match serde_json::from_str(text)
            .map_err(|e| e.to_string())
            .and_then(|v| herald_protocol::Room::from_json(&v).map_err(|e| e.to_string()))
        {
            Ok(room) => Some(room),
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("room must be a room as JSON, e.g. {{\"board\":\"*\"}}: {e}")}),
                )
            }
        },
    };
    let user = listing.filters.get("user");
    let matching: Vec<(String, Value)> = state
        .hub
        .connections()
        .into_iter()
        .filter(|conn| user.is_none_or(|u| conn.user_id.as_deref() == Some(u.as_str())))
        .filter(|conn| {
            room.as_ref()
                .is_none_or(|pattern| conn.rooms().iter().any(|r| r.matches(pattern)))
        })
        .map(|conn| {
            (
                conn.id.to_string(),
                json!({
                    "id": &*conn.id,
                    "user": conn.user_id.as_deref(),
                    "subscriptions": conn.subscription_count(),
                    "queued_frames": conn.outbound.queued_frames(),
                }),
            )
        })
        .collect();
    let total = matching.len();
    let (page, next) = listing.page(matching);
    reply(
        StatusCode::OK,
        json!({
            "connections": page.into_iter().map(|(_, c)| c).collect::<Vec<_>>(),
            "matched": total,
            "next": next,
        }),
    )
}

/// `GET /admin/rooms`.
fn rooms(state: &State, request: &hyper::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let listing = match Listing::parse(request, &["prefix"]) {
        Ok(listing) => listing,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e})),
    };
    let prefix = listing.filters.get("prefix").cloned().unwrap_or_default();
    let matching: Vec<(String, usize)> = state
        .hub
        .rooms()
        .into_iter()
        .filter(|(room, _)| room.starts_with(&prefix))
        .collect();
    let total = matching.len();
    let (page, next) = listing.page(matching);
    reply(
        StatusCode::OK,
        json!({
            "rooms": page
                .into_iter()
                .map(|(room, subscriptions)| json!({
                    "room": serde_json::from_str::<Value>(&room).unwrap_or(Value::String(room)),
                    "subscriptions": subscriptions,
                }))
                .collect::<Vec<_>>(),
            "matched": total,
            "next": next,
        }),
    )
}

/// `POST /admin/disconnect`.
async fn disconnect(
    state: &State,
    request: hyper::Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    use http_body_util::{BodyExt, Limited};
    let bad = |reason: String| reply(StatusCode::BAD_REQUEST, json!({"error": reason}));
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
    let target: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return bad(format!("body must be JSON: {e}")),
    };
    let (connection, user) = (target["connection"].as_str(), target["user"].as_str());
    let closing: Vec<_> = match (connection, user) {
        (Some(id), None) => state
            .hub
            .connections()
            .into_iter()
            .filter(|c| &*c.id == id)
            .collect(),
        (None, Some(user)) => state
            .hub
            .connections()
            .into_iter()
            .filter(|c| c.user_id.as_deref() == Some(user))
            .collect(),
        _ => return bad("give exactly one of \"connection\" and \"user\", as strings".into()),
    };
    // A connection already closing (by an earlier disconnect, a drain, a slow-consumer close) is not closed again.
    let closing: Vec<_> = closing
        .into_iter()
        .filter(|c| !c.outbound.is_closing())
        .collect();
    if closing.is_empty() {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "no connection on this node matched", "closed": 0}),
        );
    }
    for conn in &closing {
        conn.outbound.close(
            crate::outbound::CLOSE_BY_OPERATOR,
            "disconnected by an operator",
        );
    }
    tracing::info!(
        closed = closing.len(),
        by_user = user.is_some(),
        "connections disconnected by an operator"
    );
    reply(StatusCode::OK, json!({"closed": closing.len()}))
}

async fn route(
    state: Arc<State>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if !authorized(&state, &request) {
        state.metrics.admin_refused.inc();
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
        (&Method::GET, "/admin/connections") => connections(&state, &request),
        (&Method::GET, "/admin/rooms") => rooms(&state, &request),
        (&Method::POST, "/admin/disconnect") => disconnect(&state, request).await,
        (&Method::POST, "/admin/drain") => {
            let started = state.drain_connections();
            reply(
                StatusCode::OK,
                json!({
                    "draining": true,
                    "already_draining": !started,
                    "connections": state.hub.connection_count(),
                    "close_after_ms": state.config.shutdown.drain_delay_ms,
                }),
            )
        }
        (&Method::POST, "/admin/stop") => {
            state.stop_requested.cancel();
            reply(
                StatusCode::OK,
                json!({"stopping": true, "connections": state.hub.connection_count()}),
            )
        }
        (
            _,
            "/admin/status" | "/admin/routes" | "/admin/connections" | "/admin/rooms"
            | "/admin/disconnect" | "/admin/drain" | "/admin/stop",
        ) => reply(
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
