//! Webhook destinations: each message is one HTTP POST to the backend.
//!
//! An attempt that fails in a way worth repeating (no connection, a timeout, 429 or 5xx) is retried after a delay
//! that doubles each time, up to `retries` more attempts; any other 4xx means the backend refuses this message
//! and retrying would not help. A message that exhausts its attempts is a dead letter: counted and logged, and
//! the messages behind it go on.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use herald_routes::{Marshal, WebhookSpec};

/// How a delivery ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WebhookOutcome {
    /// A 2xx answer, after this many retries.
    Delivered {
        /// Attempts beyond the first.
        retries: u32,
    },
    /// Every attempt failed, or the backend refused the message: the reason of the last one.
    DeadLetter(String),
}

/// POSTs to one backend URL.
#[derive(Debug)]
pub(crate) struct WebhookSink {
    spec: WebhookSpec,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl WebhookSink {
    /// A sink for `spec` (already validated).
    pub(crate) fn new(spec: &WebhookSpec) -> Result<WebhookSink, String> {
        let timeout = Duration::from_millis(spec.timeout_ms);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let headers = spec
            .headers
            .iter()
            .map(|(name, value)| {
                Ok((
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| format!("header {name}: {e}"))?,
                    HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(WebhookSink {
            spec: spec.clone(),
            headers,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Delivers one body, retrying as the module docs say.
    pub(crate) async fn deliver(&self, body: Bytes) -> WebhookOutcome {
        let mut delay = Duration::from_millis(self.spec.backoff_ms);
        let mut attempt = 0;
        loop {
            let reason = match self.attempt(body.clone()).await {
                Ok(()) => return WebhookOutcome::Delivered { retries: attempt },
                Err((reason, retryable)) => {
                    if !retryable {
                        return WebhookOutcome::DeadLetter(reason);
                    }
                    reason
                }
            };
            if attempt >= self.spec.retries {
                return WebhookOutcome::DeadLetter(reason);
            }
            tracing::debug!(url = %self.spec.url, cause = %reason, attempt, "webhook failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }

    /// One POST: `Err((reason, retryable))` unless the backend answered 2xx.
    async fn attempt(&self, body: Bytes) -> Result<(), (String, bool)> {
        let content_type = match self.spec.marshal {
            Marshal::Json | Marshal::Envelope => "application/json",
            Marshal::Text => "text/plain; charset=utf-8",
            Marshal::Bytes => "application/octet-stream",
        };
        let mut request = Request::post(self.spec.url.as_str())
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .map_err(|e| (format!("bad request: {e}"), false))?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let timeout = Duration::from_millis(self.spec.timeout_ms);
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err((format!("no answer within {timeout:?}"), true)),
            Ok(Err(e)) => Err((format!("request failed: {e}"), true)),
            Ok(Ok(response)) => {
                let status = response.status();
                if status.is_success() {
                    Ok(())
                } else {
                    let retryable = status.is_server_error() || status.as_u16() == 429;
                    Err((format!("status {}", status.as_u16()), retryable))
                }
            }
        }
    }
}
