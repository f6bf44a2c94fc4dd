//! `{"type":"rpc","method":"name","data":...,"requestId":X}`: a task the backend runs for this client, as
//! Zephserver ran named tasks on the server. The edge POSTs `data` to the backend's `rpc/<method>` and answers
//! with one `rpc` frame carrying the same request id (see [`crate::reply::rpc_success`] and
//! [`crate::reply::rpc_error`]).

use serde_json::{Map, Value};

use super::ProtocolError;
use crate::reply::ErrorCode;
use crate::request_id::RequestId;

/// The longest method name accepted.
pub const MAX_METHOD_LEN: usize = 64;

/// A parsed RPC request.
#[derive(Debug)]
pub struct Rpc {
    /// The method, safe to put in a URL path segment (see [`is_valid_method`]).
    pub method: String,
    /// The request's `data` as JSON text (`null` when absent), sent as the POST body.
    pub data: String,
    /// Echoed in the answer.
    pub request_id: RequestId,
}

impl Rpc {
    pub(super) fn parse(
        object: &mut Map<String, Value>,
        request_id: Option<RequestId>,
    ) -> Result<Rpc, ProtocolError> {
        let Some(request_id) = request_id else {
            return Err(ProtocolError::new(ErrorCode::NoRequestId, None));
        };
        let method = match object.remove("method") {
            Some(Value::String(method)) if is_valid_method(&method) => method,
            _ => {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidMethod,
                    Some(request_id),
                ))
            }
        };
        let data = object.remove("data").unwrap_or(Value::Null).to_string();
        Ok(Rpc {
            method,
            data,
            request_id,
        })
    }
}

/// ASCII letters, digits, `_`, `-` and `.`, at most [`MAX_METHOD_LEN`] bytes, not starting with `.`: the name
/// becomes a path segment of the backend URL, so nothing in it may change which URL that is (no `/`, no `..`,
/// no query or fragment, nothing to escape).
pub fn is_valid_method(method: &str) -> bool {
    !method.is_empty()
        && method.len() <= MAX_METHOD_LEN
        && !method.starts_with('.')
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use crate::cmd::Command;
    use crate::reply::ErrorCode;

    #[test]
    fn a_request_keeps_its_method_data_and_request_id() {
        let Ok(Command::Rpc(rpc)) = Command::parse(
            r#"{"type":"rpc","method":"orders.list","data":{"page":2},"requestId":7}"#,
        ) else {
            panic!("not an rpc");
        };
        assert_eq!(rpc.method, "orders.list");
        assert_eq!(rpc.data, r#"{"page":2}"#);
        assert_eq!(rpc.request_id.as_json(), "7");
        let Ok(Command::Rpc(rpc)) =
            Command::parse(r#"{"type":"rpc","method":"m","requestId":"r"}"#)
        else {
            panic!("not an rpc");
        };
        assert_eq!(rpc.data, "null");
    }

    #[test]
    fn bad_requests_are_errors_with_the_request_id() {
        for text in [
            r#"{"type":"rpc","requestId":1}"#,
            r#"{"type":"rpc","method":"","requestId":1}"#,
            r#"{"type":"rpc","method":7,"requestId":1}"#,
            r#"{"type":"rpc","method":"a/b","requestId":1}"#,
            r#"{"type":"rpc","method":"..","requestId":1}"#,
            r#"{"type":"rpc","method":".hidden","requestId":1}"#,
            r#"{"type":"rpc","method":"a?b=1","requestId":1}"#,
            r#"{"type":"rpc","method":"a%2fb","requestId":1}"#,
            r#"{"type":"rpc","method":"é","requestId":1}"#,
        ] {
            let error = Command::parse(text).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidMethod, "{text}");
            assert_eq!(error.request_id.unwrap().as_json(), "1", "{text}");
        }
        let long = format!(
            r#"{{"type":"rpc","method":"{}","requestId":1}}"#,
            "m".repeat(65)
        );
        assert_eq!(
            Command::parse(&long).unwrap_err().code,
            ErrorCode::InvalidMethod
        );
        let error = Command::parse(r#"{"type":"rpc","method":"m"}"#).unwrap_err();
        assert_eq!(error.code, ErrorCode::NoRequestId);
    }
}
