//! The client protocol on `/ws/`: one enum of commands, each in its own file with its parse and its replies.
//!
//! Parsing is total: every text frame becomes either a [`Command`] or a [`ProtocolError`] that the edge turns into
//! an error frame. Nothing a client sends can make parsing panic or end the connection.

mod ping;
mod rpc;
mod status;
mod subscribe;
mod unsubscribe;

pub use ping::Ping;
pub use rpc::{is_valid_method, Rpc, MAX_METHOD_LEN};
pub use status::{Status, StatusCounters};
pub use subscribe::Subscribe;
pub use unsubscribe::Unsubscribe;

use serde_json::Value;

use crate::reply::ErrorCode;
use crate::request_id::RequestId;

/// One message from a client.
#[derive(Debug)]
pub enum Command {
    /// The text `ping`.
    Ping(Ping),
    /// `{"type":"subscribe", ...}`.
    Subscribe(Subscribe),
    /// `{"type":"unsubscribe", ...}`.
    Unsubscribe(Unsubscribe),
    /// `{"type":"status"}`.
    Status(Status),
    /// `{"type":"rpc", ...}`: a task for the backend.
    Rpc(Rpc),
}

/// A message that is not a valid command, and the error frame it earns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// The error code sent back as `message`.
    pub code: ErrorCode,
    /// The request id to echo, when the message had a usable one. `None` means "use the connection id", which is
    /// what High-templar does for messages it cannot attribute.
    pub request_id: Option<RequestId>,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, request_id: Option<RequestId>) -> Self {
        ProtocolError { code, request_id }
    }
}

impl Command {
    /// Parses one text message.
    pub fn parse(text: &str) -> Result<Command, ProtocolError> {
        // Exactly `ping`: High-templar compares the raw text, so `PING` and ` ping` are not pings.
        if text == "ping" {
            return Ok(Command::Ping(Ping));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|_| ProtocolError::new(ErrorCode::NonJsonMessage, None))?;
        // High-templar 3.x kills the socket on a JSON array or string here; herald answers with an error frame.
        let Value::Object(mut object) = value else {
            return Err(ProtocolError::new(ErrorCode::MessageTypeNotAllowed, None));
        };
        let request_id = object.remove("requestId").and_then(RequestId::from_json);
        match object.get("type").and_then(Value::as_str) {
            Some("subscribe") => Subscribe::parse(&object, request_id).map(Command::Subscribe),
            Some("unsubscribe") => Unsubscribe::parse(request_id).map(Command::Unsubscribe),
            Some("status") => Ok(Command::Status(Status { request_id })),
            Some("rpc") => Rpc::parse(&mut object, request_id).map(Command::Rpc),
            _ => Err(ProtocolError::new(
                ErrorCode::MessageTypeNotAllowed,
                request_id,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ErrorCode {
        Command::parse(text).unwrap_err().code
    }

    #[test]
    fn only_exact_ping_is_a_ping() {
        assert!(matches!(Command::parse("ping"), Ok(Command::Ping(_))));
        assert_eq!(err("PING"), ErrorCode::NonJsonMessage);
        assert_eq!(err(" ping"), ErrorCode::NonJsonMessage);
    }

    #[test]
    fn bad_shapes_are_errors_not_crashes() {
        assert_eq!(err("{"), ErrorCode::NonJsonMessage);
        assert_eq!(err("[1,2]"), ErrorCode::MessageTypeNotAllowed);
        assert_eq!(err("\"subscribe\""), ErrorCode::MessageTypeNotAllowed);
        assert_eq!(err("{}"), ErrorCode::MessageTypeNotAllowed);
        assert_eq!(
            err(r#"{"type":"explode"}"#),
            ErrorCode::MessageTypeNotAllowed
        );
        assert_eq!(err(r#"{"type":7}"#), ErrorCode::MessageTypeNotAllowed);
    }

    #[test]
    fn status_keeps_its_request_id() {
        let Ok(Command::Status(status)) = Command::parse(r#"{"type":"status","requestId":"s1"}"#)
        else {
            panic!("not a status");
        };
        assert_eq!(status.request_id.unwrap().as_json(), "\"s1\"");
    }
}
