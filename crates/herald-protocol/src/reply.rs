//! Frames the server sends: replies, errors, the auth frame and deliveries.
//!
//! Deliveries are the hot path: one publish becomes one frame per matching subscription, each differing only in
//! its `requestId`. [`DeliveryTemplate`] serializes the data once and splices each request id in with a single
//! allocation per frame.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use crate::request_id::RequestId;

/// Every error code herald sends in `{"code":"error","message":...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The text was not JSON.
    NonJsonMessage,
    /// The JSON had no known `type`.
    MessageTypeNotAllowed,
    /// A subscribe or unsubscribe without a usable `requestId`.
    NoRequestId,
    /// The room is not in the connection's allowed rooms.
    RoomNotFound,
    /// An unsubscribe for a request id with no subscription.
    NotSubscribed,
    /// The room is missing, not an object, has nested values or too many keys (herald; High-templar crashed).
    InvalidRoom,
    /// The connection holds its maximum number of subscriptions.
    TooManySubscriptions,
    /// The connection sent faster than its inbound rate limit; the message was dropped.
    RateLimited,
    /// A binary frame: the protocol is JSON text.
    BinaryNotSupported,
    /// An RPC whose `method` is missing or not a valid name.
    InvalidMethod,
    /// An RPC method the connection may not call (or no RPC backend is configured).
    MethodNotAllowed,
    /// The backend did not answer an RPC in time.
    RpcTimeout,
    /// The backend answered an RPC with an error status, an unreadable body, or could not be reached.
    RpcFailed,
    /// The connection (or the node) already has its maximum of RPCs in flight.
    RpcBusy,
}

impl ErrorCode {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NonJsonMessage => "non-json-message",
            ErrorCode::MessageTypeNotAllowed => "message-type-not-allowed",
            ErrorCode::NoRequestId => "no-request-id",
            ErrorCode::RoomNotFound => "room-not-found",
            ErrorCode::NotSubscribed => "not-subscribed",
            ErrorCode::InvalidRoom => "invalid-room",
            ErrorCode::TooManySubscriptions => "too-many-subscriptions",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::BinaryNotSupported => "binary-not-supported",
            ErrorCode::InvalidMethod => "invalid-method",
            ErrorCode::MethodNotAllowed => "method-not-allowed",
            ErrorCode::RpcTimeout => "rpc-timeout",
            ErrorCode::RpcFailed => "rpc-failed",
            ErrorCode::RpcBusy => "rpc-busy",
        }
    }
}

/// `{"code":"success","requestId":X}`. High-templar 3.x sent no request id here (2.x did); herald sends it so a
/// client can tell which request succeeded, and clients that ignore it are unaffected.
pub fn success(request_id: &RequestId) -> String {
    format!(
        r#"{{"code":"success","requestId":{}}}"#,
        request_id.as_json()
    )
}

/// `{"code":"error","message":M,"requestId":X}`.
pub fn error(code: ErrorCode, request_id: &RequestId) -> String {
    format!(
        r#"{{"code":"error","message":"{}","requestId":{}}}"#,
        code.as_str(),
        request_id.as_json()
    )
}

/// `{"type":"rpc","code":"success","data":D,"requestId":X}`: the backend's answer to an RPC. `data_json` must be
/// valid JSON text (the edge checks the backend's body before it gets here).
pub fn rpc_success(request_id: &RequestId, data_json: &str) -> String {
    format!(
        r#"{{"type":"rpc","code":"success","data":{data_json},"requestId":{}}}"#,
        request_id.as_json()
    )
}

/// `{"type":"rpc","code":"error","message":M,"requestId":X}`, with `"status":N` when the backend answered with
/// an HTTP error status.
pub fn rpc_error(code: ErrorCode, request_id: &RequestId, status: Option<u16>) -> String {
    let status = status.map_or(String::new(), |s| format!(r#","status":{s}"#));
    format!(
        r#"{{"type":"rpc","code":"error","message":"{}"{status},"requestId":{}}}"#,
        code.as_str(),
        request_id.as_json()
    )
}

/// The first frame of an authorized connection. `allowed_rooms` is echoed as the backend (or token) listed it.
pub fn authorized(allowed_rooms: &Value) -> String {
    serde_json::json!({"is_authorized": true, "allowed_rooms": allowed_rooms}).to_string()
}

/// The first (and last) frame of a refused connection.
pub fn not_authorized() -> &'static str {
    r#"{"is_authorized":false}"#
}

/// One publish's data, serialized once, ready to become a frame per subscription.
#[derive(Debug, Clone)]
pub struct DeliveryTemplate {
    data: Bytes,
}

const PUBLISH_PREFIX: &[u8] = br#"{"type":"publish","data":"#;
const PUBLISH_REQUEST_ID: &[u8] = br#","requestId":"#;
const MESSAGE_PREFIX: &[u8] = br#"{"type":"message","data":"#;

impl DeliveryTemplate {
    /// `data` must be valid JSON text (the publish APIs validate it before it gets here).
    pub fn new(data: Bytes) -> Self {
        DeliveryTemplate { data }
    }

    /// The published data as JSON text.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Length of the delivery payload for a request id of `request_id_len` bytes.
    pub fn publish_len(&self, request_id_len: usize) -> usize {
        PUBLISH_PREFIX.len() + self.data.len() + PUBLISH_REQUEST_ID.len() + request_id_len + 1
    }

    /// Writes `{"type":"publish","data":D,"requestId":X}` into `out`.
    pub fn write_publish(&self, request_id: &RequestId, out: &mut BytesMut) {
        out.reserve(self.publish_len(request_id.as_json().len()));
        out.put_slice(PUBLISH_PREFIX);
        out.put_slice(&self.data);
        out.put_slice(PUBLISH_REQUEST_ID);
        out.put_slice(request_id.as_json().as_bytes());
        out.put_u8(b'}');
    }

    /// `{"type":"message","data":D}`: what a user, connection or broadcast target receives. These have no
    /// subscription and so no request id; the distinct type keeps High-templar clients, which match `publish`
    /// frames by request id, from mistaking them for room deliveries.
    pub fn message(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(MESSAGE_PREFIX.len() + self.data.len() + 1);
        out.put_slice(MESSAGE_PREFIX);
        out.put_slice(&self.data);
        out.put_u8(b'}');
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rpc_answers_are_json_with_the_request_id() {
        let rid = RequestId::from_json(json!("r-1")).unwrap();
        let ok: Value = serde_json::from_str(&rpc_success(&rid, r#"{"x":[1]}"#)).unwrap();
        assert_eq!(
            ok,
            json!({"type":"rpc","code":"success","data":{"x":[1]},"requestId":"r-1"})
        );
        let failed: Value =
            serde_json::from_str(&rpc_error(ErrorCode::RpcFailed, &rid, Some(503))).unwrap();
        assert_eq!(
            failed,
            json!({"type":"rpc","code":"error","message":"rpc-failed","status":503,"requestId":"r-1"})
        );
        let timeout: Value =
            serde_json::from_str(&rpc_error(ErrorCode::RpcTimeout, &rid, None)).unwrap();
        assert_eq!(
            timeout,
            json!({"type":"rpc","code":"error","message":"rpc-timeout","requestId":"r-1"})
        );
    }

    #[test]
    fn delivery_frames_are_valid_json_with_the_request_id() {
        let template = DeliveryTemplate::new(Bytes::from_static(br#"{"n":[1,2]}"#));
        let rid = RequestId::from_json(json!("sub-1")).unwrap();
        let mut out = BytesMut::new();
        template.write_publish(&rid, &mut out);
        assert_eq!(out.len(), template.publish_len(rid.as_json().len()));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"type": "publish", "data": {"n": [1, 2]}, "requestId": "sub-1"})
        );
        let v: Value = serde_json::from_slice(&template.message()).unwrap();
        assert_eq!(v, json!({"type": "message", "data": {"n": [1, 2]}}));
    }

    #[test]
    fn replies_are_valid_json() {
        let rid = RequestId::from_json(json!(5)).unwrap();
        let v: Value = serde_json::from_str(&success(&rid)).unwrap();
        assert_eq!(v, json!({"code": "success", "requestId": 5}));
        let v: Value = serde_json::from_str(&error(ErrorCode::RoomNotFound, &rid)).unwrap();
        assert_eq!(
            v,
            json!({"code": "error", "message": "room-not-found", "requestId": 5})
        );
    }
}
