//! `{"type":"subscribe","room":{...},"requestId":X}`.
//!
//! Checks run in High-templar's order: a request id first (`no-request-id`), then the room. Where High-templar
//! dropped the socket (a missing room, a room that is not an object) herald answers `invalid-room`; nested values
//! and rooms with too many keys are `invalid-room` too. Permission (`room-not-found`) is the edge's call, since it
//! knows the connection's allowed rooms.

use serde_json::{Map, Value};

use super::ProtocolError;
use crate::reply::ErrorCode;
use crate::request_id::RequestId;
use crate::room::{Room, RoomError};

/// A parsed subscribe request.
#[derive(Debug)]
pub struct Subscribe {
    /// The room asked for, canonical.
    pub room: Room,
    /// The client's handle for this subscription; deliveries carry it.
    pub request_id: RequestId,
}

impl Subscribe {
    pub(super) fn parse(
        object: &Map<String, Value>,
        request_id: Option<RequestId>,
    ) -> Result<Subscribe, ProtocolError> {
        let Some(request_id) = request_id else {
            return Err(ProtocolError::new(ErrorCode::NoRequestId, None));
        };
        let room = match object.get("room") {
            None => Err(RoomError::Missing),
            Some(value) => Room::from_json(value),
        }
        .map_err(|_| ProtocolError::new(ErrorCode::InvalidRoom, Some(request_id.clone())))?;
        Ok(Subscribe { room, request_id })
    }
}

#[cfg(test)]
mod tests {
    use crate::cmd::Command;
    use crate::reply::ErrorCode;

    fn code(text: &str) -> ErrorCode {
        Command::parse(text).unwrap_err().code
    }

    #[test]
    fn request_id_is_checked_first() {
        assert_eq!(
            code(r#"{"type":"subscribe","room":{"a":1}}"#),
            ErrorCode::NoRequestId
        );
        assert_eq!(code(r#"{"type":"subscribe"}"#), ErrorCode::NoRequestId);
        assert_eq!(
            code(r#"{"type":"subscribe","room":{"a":1},"requestId":null}"#),
            ErrorCode::NoRequestId
        );
    }

    #[test]
    fn bad_rooms_are_invalid_room() {
        for text in [
            r#"{"type":"subscribe","requestId":1}"#,
            r#"{"type":"subscribe","requestId":1,"room":"r"}"#,
            r#"{"type":"subscribe","requestId":1,"room":[1]}"#,
            r#"{"type":"subscribe","requestId":1,"room":{"a":{"b":1}}}"#,
        ] {
            assert_eq!(code(text), ErrorCode::InvalidRoom, "{text}");
        }
    }

    #[test]
    fn a_good_subscribe_parses() {
        let Ok(Command::Subscribe(s)) =
            Command::parse(r#"{"type":"subscribe","requestId":"r1","room":{"b":2,"a":"x"}}"#)
        else {
            panic!("not a subscribe");
        };
        assert_eq!(s.request_id.as_json(), "\"r1\"");
        assert_eq!(s.room.keys().len(), 2);
    }
}
