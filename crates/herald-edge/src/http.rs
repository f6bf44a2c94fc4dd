//! The main HTTP listener's routes: the demo page and browser client, `/ws/`, the publish APIs and the health and
//! metrics endpoints.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | demo page |
//! | `GET /herald.js` | browser client |
//! | `GET /ws/` | WebSocket (High-templar protocol) |
//! | `POST /trigger/` | publish, High-templar 2.x shape and answers |
//! | `POST /api/v1/publish` | publish, JSON answer with what it reached |
//! | `GET /livez`, `GET /readyz` | health; `/readyz` fails while draining |
//! | `GET /metrics` | Prometheus text |

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::auth::ApiKeys;
use crate::hub::Target;
use crate::publish::{parse_room_targets, PublishError};
use crate::server::State;
use crate::trace::PublishTrace;

type Body = Full<Bytes>;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const HERALD_JS: &str = include_str!("../assets/herald.js");

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json_response(status: StatusCode, value: Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

/// Routes one request.
pub(crate) async fn route(state: Arc<State>, request: hyper::Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/ws/" | "/ws") => crate::ws::upgrade(state, request).await,
        (&Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        (&Method::GET, "/herald.js") => {
            respond(StatusCode::OK, "text/javascript; charset=utf-8", HERALD_JS)
        }
        (&Method::POST, "/trigger/" | "/trigger") => trigger(state, request).await,
        (&Method::POST, "/api/v1/publish") => publish(state, request).await,
        (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.render_metrics(),
        ),
        (_, "/ws/" | "/ws" | "/" | "/herald.js" | "/livez" | "/readyz" | "/metrics") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        (_, "/trigger/" | "/trigger" | "/api/v1/publish") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Checks the API key and reads the body within the size limit. Errors come back as finished responses.
async fn read_publish_body(
    state: &State,
    request: hyper::Request<Incoming>,
) -> Result<Bytes, PublishError> {
    if !state.api_keys.check(ApiKeys::presented(request.headers())) {
        return Err(PublishError::Unauthenticated);
    }
    let limit = state.config.limits.max_publish_body_bytes;
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(PublishError::TooLarge);
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(PublishError::TooLarge),
        Err(e) => Err(PublishError::BadRequest(format!("reading body: {e}"))),
    }
}

/// A publish body's top-level fields, each kept as the exact JSON text the backend sent.
struct PublishFields(BTreeMap<String, Box<RawValue>>);

impl PublishFields {
    /// Checks the key, reads the body within its limit and splits the top-level object.
    async fn read(state: &State, request: hyper::Request<Incoming>) -> Result<Self, PublishError> {
        let body = read_publish_body(state, request).await?;
        serde_json::from_slice(&body)
            .map(PublishFields)
            .map_err(|e| PublishError::BadRequest(format!("body is not a JSON object: {e}")))
    }

    /// `data`, verbatim: it is delivered byte for byte.
    fn data(&self) -> Result<Bytes, PublishError> {
        let raw = self.0.get("data").ok_or(PublishError::DataMissing)?;
        Ok(Bytes::copy_from_slice(raw.get().as_bytes()))
    }

    /// A field parsed as a JSON value.
    fn value(&self, name: &str) -> Option<Value> {
        self.0
            .get(name)
            .map(|raw| serde_json::from_str(raw.get()).expect("RawValue holds valid JSON"))
    }
}

fn count_error(state: &State, error: &PublishError) {
    state.metrics.publish_errors.inc(error.metric_reason());
    tracing::info!(cause = %error, "publish refused");
}

/// `POST /trigger/`: High-templar 2.x's publish, with its plain-text answers.
async fn trigger(state: Arc<State>, request: hyper::Request<Incoming>) -> Response<Body> {
    let trace = PublishTrace::from_headers("trigger", request.headers());
    let result = async {
        let fields = PublishFields::read(&state, request).await?;
        // High-templar 2.x checks rooms before data, and so do its answers.
        let rooms = fields.value("rooms").ok_or(PublishError::RoomsMissing)?;
        let data = fields.data()?;
        let targets = parse_room_targets(&rooms, state.config.limits.max_rooms_per_publish)?;
        Ok::<_, PublishError>((targets, data))
    }
    .instrument(trace.span().clone())
    .await;
    let _entered = trace.span().enter();
    match result {
        Ok((targets, data)) => {
            state.publish_traced(&targets, data, &trace);
            state.metrics.publishes.inc("trigger");
            text(StatusCode::OK, "publish success")
        }
        Err(error) => {
            count_error(&state, &error);
            // The Display texts of RoomsMissing and DataMissing are High-templar's answers.
            respond(
                error.status(),
                "text/plain; charset=utf-8",
                error.to_string(),
            )
        }
    }
}

/// `POST /api/v1/publish`: `{"rooms":[...], "users":[...], "connections":[...], "all": bool, "data": ...}`.
async fn publish(state: Arc<State>, request: hyper::Request<Incoming>) -> Response<Body> {
    let trace = PublishTrace::from_headers("http", request.headers());
    let result = async {
        let fields = PublishFields::read(&state, request).await?;
        let data = fields.data()?;
        let field = |name: &str| fields.value(name);
        let limit = state.config.limits.max_rooms_per_publish;
        let mut targets = match field("rooms") {
            Some(rooms) => parse_room_targets(&rooms, limit)?,
            None => vec![],
        };
        for (name, make) in [
            ("users", Target::User as fn(String) -> Target),
            ("connections", Target::Connection as fn(String) -> Target),
        ] {
            match field(name) {
                None => {}
                Some(Value::Array(items)) => {
                    for item in items {
                        match item {
                            Value::String(s) => targets.push(make(s)),
                            Value::Number(n) => targets.push(make(n.to_string())),
                            other => {
                                return Err(PublishError::BadRequest(format!(
                                    "{name} must hold strings, found {other}"
                                )))
                            }
                        }
                    }
                }
                Some(_) => return Err(PublishError::BadRequest(format!("{name} must be a list"))),
            }
        }
        match field("all") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => targets.push(Target::All),
            Some(_) => return Err(PublishError::BadRequest("all must be a boolean".into())),
        }
        if targets.is_empty() {
            return Err(PublishError::NoTargets);
        }
        if targets.len() > limit {
            return Err(PublishError::TooManyTargets(limit));
        }
        Ok((targets, data))
    }
    .instrument(trace.span().clone())
    .await;
    let _entered = trace.span().enter();
    match result {
        Ok((targets, data)) => {
            let outcome = state.publish_traced(&targets, data, &trace);
            state.metrics.publishes.inc("http");
            json_response(
                StatusCode::OK,
                json!({
                    "subscriptions_reached": outcome.subscriptions_reached,
                    "connections_reached": outcome.connections_reached,
                }),
            )
        }
        Err(error) => {
            count_error(&state, &error);
            json_response(error.status(), json!({"error": error.to_string()}))
        }
    }
}
