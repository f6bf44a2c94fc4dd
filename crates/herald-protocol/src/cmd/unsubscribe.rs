//! `{"type":"unsubscribe","requestId":X}`. A `room` field is ignored, as High-templar ignores it: the request id
//! alone names the subscription.

use super::ProtocolError;
use crate::reply::ErrorCode;
use crate::request_id::RequestId;

/// A parsed unsubscribe request.
#[derive(Debug)]
pub struct Unsubscribe {
    /// The subscription to end.
    pub request_id: RequestId,
}

impl Unsubscribe {
    pub(super) fn parse(request_id: Option<RequestId>) -> Result<Unsubscribe, ProtocolError> {
        match request_id {
            Some(request_id) => Ok(Unsubscribe { request_id }),
            None => Err(ProtocolError::new(ErrorCode::NoRequestId, None)),
        }
    }
}
