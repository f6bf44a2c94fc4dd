//! High-templar's bootstrap: `GET {api-url}bootstrap/` with the client's credentials forwarded, and a JSON answer
//! listing the rooms the connection may use.
//!
//! Forwarded, exactly as High-templar does: `Cookie`, `User-Agent`, `X-Real-IP`, `X-CSRFToken` (the value of the
//! `csrftoken` cookie) and `Authorization: Token <t>` when the URL has `?token=<t>`; plus the headers named in
//! `auth.forward-headers`. The client's own `Authorization` header, `X-Forwarded-For` and query string are not
//! forwarded.
//!
//! Only `200` with a JSON object whose `allowed_rooms` is absent or a list of valid rooms authorizes. Everything
//! else (another status, a body that is not JSON, `allowed_rooms: null`, a JSON array, a timeout, an unreachable
//! backend) refuses the connection with `{"is_authorized": false}`. High-templar answered some of these with an
//! HTTP 500 on the upgrade instead.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{
    parse_allowed_methods, parse_allowed_rooms, query_param, AuthConfigError, Denial, Grant,
    Permissions,
};
use crate::metrics::Metrics;

/// A bootstrap answer larger than this is refused (it is a list of rooms, not a payload).
const MAX_BOOTSTRAP_BODY: usize = 1024 * 1024;

/// Calls the backend's bootstrap endpoint.
#[derive(Debug)]
pub struct BootstrapAuth {
    url: http::Uri,
    timeout: Duration,
    extra_headers: Vec<HeaderName>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl BootstrapAuth {
    /// `api_url` is the backend's API root; the call goes to `{api_url}bootstrap/`.
    pub fn new(
        api_url: String,
        timeout: Duration,
        extra_headers: Vec<String>,
    ) -> Result<Self, AuthConfigError> {
        let url = format!("{api_url}bootstrap/")
            .parse()
            .map_err(|e| AuthConfigError::new("auth.api-url", e))?;
        let extra_headers = parse_header_names(&extra_headers)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(BootstrapAuth {
            url,
            timeout,
            extra_headers,
            client,
        })
    }

    fn build_request(&self, ws: &Parts) -> Request<Empty<Bytes>> {
        let mut request = Request::get(self.url.clone());
        *request.headers_mut().expect("a fresh builder has headers") =
            forwarded_headers(ws, &self.extra_headers);
        request.body(Empty::new()).expect("valid request")
    }

    /// Asks the backend about one connection.
    pub async fn authorize(&self, ws: &Parts, metrics: &Metrics) -> Result<Grant, Denial> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.call(ws)).await;
        metrics.bootstrap_duration.observe(started.elapsed());
        let result = result.unwrap_or_else(|_| {
            Err(Denial::new(
                "timeout",
                format!("no answer within {:?}", self.timeout),
            ))
        });
        metrics.bootstrap_calls.inc(match &result {
            Ok(_) => "authorized",
            Err(denial) => denial.reason,
        });
        result
    }

    async fn call(&self, ws: &Parts) -> Result<Grant, Denial> {
        let response = self
            .client
            .request(self.build_request(ws))
            .await
            .map_err(|e| Denial::new("unreachable", format!("{}: {e}", self.url)))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(Denial::new("refused", format!("backend answered {status}")));
        }
        let body = Limited::new(response.into_body(), MAX_BOOTSTRAP_BODY)
            .collect()
            .await
            .map_err(|e| Denial::new("malformed", format!("reading the answer: {e}")))?
            .to_bytes();
        parse_answer(&body)
    }
}

/// The client's credentials as High-templar forwards them to its backend: `Cookie`, `User-Agent`, `X-Real-IP`,
/// `X-CSRFToken` from the `csrftoken` cookie, `Authorization: Token <t>` from `?token=<t>`, plus the `extra`
/// headers (`auth.forward-headers`). Bootstrap calls and client RPCs carry the same set.
pub(crate) fn forwarded_headers(ws: &Parts, extra: &[HeaderName]) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for name in [
        http::header::COOKIE,
        http::header::USER_AGENT,
        HeaderName::from_static("x-real-ip"),
    ]
    .iter()
    .chain(extra)
    {
        for value in ws.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(csrf) = cookie(&ws.headers, "csrftoken") {
        if let Ok(value) = HeaderValue::from_str(&csrf) {
            headers.insert("x-csrftoken", value);
        }
    }
    if let Some(token) = query_param(&ws.uri, "token") {
        if let Ok(value) = HeaderValue::from_str(&format!("Token {token}")) {
            headers.insert(http::header::AUTHORIZATION, value);
        }
    }
    headers
}

/// `auth.forward-headers` as header names.
pub(crate) fn parse_header_names(names: &[String]) -> Result<Vec<HeaderName>, AuthConfigError> {
    names
        .iter()
        .map(|h| HeaderName::try_from(h.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| AuthConfigError::new("auth.forward-headers", e))
}

/// Turns a 200 body into a grant.
pub(crate) fn parse_answer(body: &[u8]) -> Result<Grant, Denial> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Denial::new("malformed", format!("answer is not JSON: {e}")))?;
    let Value::Object(mut answer) = value else {
        return Err(Denial::new("malformed", "answer is not a JSON object"));
    };
    let allowed_rooms = answer
        .remove("allowed_rooms")
        .unwrap_or(Value::Array(vec![]));
    let rooms = parse_allowed_rooms(&allowed_rooms)?;
    let methods = parse_allowed_methods(answer.remove("allowed_methods"))?;
    let user_id = match answer.remove("user_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(Denial::new(
                "malformed",
                format!("user_id must be a string or number, not {other}"),
            ))
        }
    };
    Ok(Grant {
        permissions: Permissions::Rooms(rooms),
        allowed_rooms,
        user_id,
        methods,
    })
}

/// The value of one cookie from the `Cookie` headers.
fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_authorize() {
        let grant = parse_answer(br#"{"allowed_rooms":[{"a":"*"}],"user_id":42}"#).unwrap();
        assert_eq!(grant.user_id.as_deref(), Some("42"));
        assert!(matches!(grant.permissions, Permissions::Rooms(ref r) if r.len() == 1));
        assert!(
            !grant.methods.allows("anything"),
            "no allowed_methods, no RPC"
        );
        let grant = parse_answer(br#"{}"#).unwrap();
        assert_eq!(grant.allowed_rooms, serde_json::json!([]));
        let grant = parse_answer(br#"{"allowed_methods":["orders.list","ping"]}"#).unwrap();
        assert!(grant.methods.allows("ping") && !grant.methods.allows("orders"));
        let grant = parse_answer(br#"{"allowed_methods":["*"]}"#).unwrap();
        assert!(grant.methods.allows("orders"));
    }

    #[test]
    fn malformed_answers_refuse() {
        for body in [
            &b"not json"[..],
            br#"{"allowed_rooms":null}"#,
            br#"[{"a":1}]"#,
            br#"{"allowed_rooms":[{"a":1}, 5]}"#,
            br#"{"allowed_rooms":[{"a":[1]}]}"#,
            br#"{"allowed_rooms":{"a":1}}"#,
            br#"{"allowed_rooms":[],"user_id":{"x":1}}"#,
            br#"{"allowed_methods":"orders"}"#,
            br#"{"allowed_methods":["a/b"]}"#,
            br#"{"allowed_methods":[1]}"#,
        ] {
            let denial = parse_answer(body).unwrap_err();
            assert_eq!(
                denial.reason,
                "malformed",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn csrf_token_comes_from_the_cookie() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("sessionid=abc; csrftoken=xyz"),
        );
        assert_eq!(cookie(&headers, "csrftoken").as_deref(), Some("xyz"));
        assert_eq!(cookie(&headers, "nope"), None);
    }
}
