//! What the HTTP and gRPC publish APIs share: turning a request's rooms into targets, and the errors a publish
//! request can earn.

use http::StatusCode;
use serde_json::Value;

use herald_protocol::Room;

use crate::hub::Target;

/// Why a publish request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No valid API key.
    #[error("missing or invalid API key")]
    Unauthenticated,
    /// The body is above `limits.max-publish-body-bytes`.
    #[error("request body too large")]
    TooLarge,
    /// No `rooms` (the `/trigger/` shape).
    #[error("rooms not specified")]
    RoomsMissing,
    /// No `data`.
    #[error("data not specified")]
    DataMissing,
    /// Nothing to publish to.
    #[error("no targets: give rooms, users, connections or all")]
    NoTargets,
    /// More targets than `limits.max-rooms-per-publish`.
    #[error("too many targets: at most {0} per publish")]
    TooManyTargets(usize),
    /// Anything else malformed.
    #[error("{0}")]
    BadRequest(String),
}

impl PublishError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            PublishError::Unauthenticated => StatusCode::UNAUTHORIZED,
            PublishError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `reason` label on `herald_publish_errors_total`.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            PublishError::Unauthenticated => "unauthenticated",
            PublishError::TooLarge => "too_large",
            PublishError::TooManyTargets(_) => "too_many_targets",
            _ => "bad_request",
        }
    }

    /// The gRPC status for this error.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            PublishError::Unauthenticated => tonic::Status::unauthenticated(self.to_string()),
            PublishError::TooLarge => tonic::Status::resource_exhausted(self.to_string()),
            _ => tonic::Status::invalid_argument(self.to_string()),
        }
    }
}

/// Parses a JSON list of rooms into targets, refusing more than `limit`.
pub fn parse_room_targets(rooms: &Value, limit: usize) -> Result<Vec<Target>, PublishError> {
    let Value::Array(items) = rooms else {
        return Err(PublishError::BadRequest(
            "rooms must be a list of room objects".into(),
        ));
    };
    if items.len() > limit {
        return Err(PublishError::TooManyTargets(limit));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            Room::from_json(item)
                .map(Target::Room)
                .map_err(|e| PublishError::BadRequest(format!("rooms[{i}]: {e}")))
        })
        .collect()
}
