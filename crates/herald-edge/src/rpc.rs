//! Client RPC, Zephserver's tasks grown up: a client sends `{"type":"rpc","method":M,"data":D,"requestId":X}`,
//! the edge POSTs `D` to `{rpc.url}M` with the same credentials bootstrap forwards, and relays the answer as one
//! `rpc` frame.
//!
//! The backend is an outside input like any other: an answer that is late (`rpc.timeout-ms`), too large
//! (`rpc.max-response-bytes`), not JSON, or an HTTP error is an error frame for that one call, counted by result.
//! Calls in flight are bounded per connection and per node; beyond either bound a call is answered `rpc-busy` at
//! once rather than queued, so a slow backend cannot make a connection's memory or the node's sockets grow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{parse_header_names, AuthConfigError};
use crate::config::Config;
use crate::metrics::Metrics;

/// Tells the backend which connection a call comes from.
const CONNECTION_HEADER: &str = "x-herald-connection";
/// Tells the backend which user a call comes from, when the connection has one.
const USER_HEADER: &str = "x-herald-user";

/// How one call ended, as the client will be told.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RpcOutcome {
    /// A 2xx answer with a JSON body (`null` for an empty one): the JSON text.
    Success(String),
    /// The backend did not answer within the timeout.
    Timeout,
    /// An error status (`status` set), or no usable answer at all (`status` unset: unreachable, too large, not
    /// JSON). `reason` is for the log only.
    Failed { status: Option<u16>, reason: String },
}

/// Calls the backend's RPC endpoint; shared by all connections of a node.
#[derive(Debug)]
pub(crate) struct RpcClient {
    /// Ends in `/`; the method is appended.
    base: String,
    timeout: Duration,
    max_response_bytes: usize,
    per_connection: usize,
    node_permits: Arc<Semaphore>,
    extra_headers: Vec<HeaderName>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl RpcClient {
    /// The node's client, or `None` when RPC is off (no `rpc.url` and no `auth.api-url`).
    pub(crate) fn from_config(config: &Config) -> Result<Option<RpcClient>, AuthConfigError> {
        let Some(base) = config.rpc_url() else {
            return Ok(None);
        };
        let rpc = &config.rpc;
        let timeout = Duration::from_millis(rpc.timeout_ms);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Ok(Some(RpcClient {
            base,
            timeout,
            max_response_bytes: rpc.max_response_bytes,
            per_connection: rpc.max_in_flight_per_connection,
            node_permits: Arc::new(Semaphore::new(rpc.max_in_flight)),
            extra_headers: parse_header_names(&config.auth.forward_headers)?,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }))
    }

    /// Calls one connection may have in flight.
    pub(crate) fn per_connection(&self) -> usize {
        self.per_connection
    }

    /// The header names forwarded besides High-templar's fixed set.
    pub(crate) fn extra_headers(&self) -> &[HeaderName] {
        &self.extra_headers
    }

    /// One of the node's in-flight slots, if any is free.
    pub(crate) fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.node_permits.clone().try_acquire_owned().ok()
    }

    /// POSTs `body` (JSON text) to `{base}{method}` with the connection's forwarded `credentials`. `method` must
    /// have passed [`herald_protocol::cmd::is_valid_method`], so it cannot change which URL is called.
    pub(crate) async fn call(
        &self,
        method: &str,
        body: String,
        credentials: &HeaderMap,
        connection: &str,
        user: Option<&str>,
        metrics: &Metrics,
    ) -> RpcOutcome {
        let started = Instant::now();
        let outcome = match tokio::time::timeout(
            self.timeout,
            self.exchange(method, body, credentials, connection, user),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => RpcOutcome::Timeout,
        };
        metrics.rpc_duration.observe(started.elapsed());
        metrics.rpc_calls.inc(match &outcome {
            RpcOutcome::Success(_) => "success",
            RpcOutcome::Timeout => "timeout",
            RpcOutcome::Failed { .. } => "failed",
        });
        outcome
    }

    async fn exchange(
        &self,
        method: &str,
        body: String,
        credentials: &HeaderMap,
        connection: &str,
        user: Option<&str>,
    ) -> RpcOutcome {
        let failed = |status: Option<u16>, reason: String| RpcOutcome::Failed { status, reason };
        let url = format!("{}{method}", self.base);
        let mut request = match Request::post(url.as_str()).body(Full::new(Bytes::from(body))) {
            Ok(request) => request,
            Err(e) => return failed(None, format!("{url}: {e}")),
        };
        let headers = request.headers_mut();
        headers.extend(credentials.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(value) = HeaderValue::from_str(connection) {
            headers.insert(CONNECTION_HEADER, value);
        }
        if let Some(value) = user.and_then(|u| HeaderValue::from_str(u).ok()) {
            headers.insert(USER_HEADER, value);
        }
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(e) => return failed(None, format!("{url}: {e}")),
        };
        let status = response.status();
        if !status.is_success() {
            return failed(Some(status.as_u16()), format!("{url} answered {status}"));
        }
        let body = match Limited::new(response.into_body(), self.max_response_bytes)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => return failed(None, format!("{url}: reading the answer: {e}")),
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            return RpcOutcome::Success("null".into());
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return failed(None, format!("{url}: the answer is not JSON"));
        }
        match String::from_utf8(body.to_vec()) {
            Ok(text) => RpcOutcome::Success(text),
            // Valid JSON is UTF-8; kept for totality.
            Err(_) => failed(None, format!("{url}: the answer is not UTF-8")),
        }
    }
}
