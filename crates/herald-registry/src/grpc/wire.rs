//! Conversions between openraft's messages and the `herald.v1.RaftInternal` protobuf envelopes.
//!
//! openraft 0.9's requests, responses and errors are all serde, so the envelopes carry them as serde_json
//! instead of a protobuf mirror of every nested type: the wire format follows the openraft version by
//! construction. Both ends of the transport (the [`crate::network`] client and the [`crate::grpc`] server) go
//! through this one file so they cannot drift apart.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::Status;

use herald_proto::v1::{RaftReply, RaftRequest};

/// Wraps an openraft request.
pub(crate) fn encode_request<T: Serialize>(rpc: &T) -> Result<RaftRequest, serde_json::Error> {
    Ok(RaftRequest {
        data: serde_json::to_vec(rpc)?,
    })
}

/// Unwraps an openraft request. A request that does not decode (a peer on an incompatible version, or not a
/// peer at all) is the caller's fault: `INVALID_ARGUMENT`.
pub(crate) fn decode_request<T: DeserializeOwned>(
    request: &RaftRequest,
    rpc: &str,
) -> Result<T, Status> {
    serde_json::from_slice(&request.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable {rpc} request: {e}")))
}

/// Wraps what raft answered: the response in `data`, or the raft error in `error`.
pub(crate) fn encode_reply<T: Serialize, E: Serialize>(
    result: &Result<T, E>,
) -> Result<RaftReply, Status> {
    // Failing to serialize openraft's own types would be a bug here, not the caller's fault.
    let internal =
        |e: serde_json::Error| Status::internal(format!("cannot encode raft reply: {e}"));
    Ok(match result {
        Ok(response) => RaftReply {
            data: serde_json::to_vec(response).map_err(internal)?,
            error: String::new(),
        },
        Err(error) => RaftReply {
            data: Vec::new(),
            error: serde_json::to_string(error).map_err(internal)?,
        },
    })
}

/// Unwraps a reply into what the remote raft answered. The outer error means the reply itself is undecodable.
pub(crate) fn decode_reply<T: DeserializeOwned, E: DeserializeOwned>(
    reply: &RaftReply,
) -> Result<Result<T, E>, serde_json::Error> {
    // The server fills `error` only for an error, and an error always serializes to non-empty JSON, so its
    // presence alone tells the two sides apart.
    if reply.error.is_empty() {
        serde_json::from_slice(&reply.data).map(Ok)
    } else {
        serde_json::from_str(&reply.error).map(Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use openraft::error::{Fatal, RaftError};
    use openraft::raft::{VoteRequest, VoteResponse};
    use openraft::{LogId, Vote};

    use crate::types::NodeId;

    #[test]
    fn requests_and_both_reply_sides_round_trip() {
        let vote =
            VoteRequest::<NodeId>::new(Vote::new(3, 1), Some(LogId::new(Default::default(), 7)));
        let request = encode_request(&vote).unwrap();
        let back: VoteRequest<NodeId> = decode_request(&request, "Vote").unwrap();
        assert_eq!(back, vote);

        let ok: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            Ok(VoteResponse::new(Vote::new(3, 1), None, true));
        let reply = encode_reply(&ok).unwrap();
        assert!(reply.error.is_empty());
        let back: Result<VoteResponse<NodeId>, RaftError<NodeId>> = decode_reply(&reply).unwrap();
        assert_eq!(back, ok);

        let err: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
            Err(RaftError::Fatal(Fatal::Stopped));
        let reply = encode_reply(&err).unwrap();
        assert!(reply.data.is_empty() && !reply.error.is_empty());
        let back: Result<VoteResponse<NodeId>, RaftError<NodeId>> = decode_reply(&reply).unwrap();
        assert_eq!(back, err);
    }

    #[test]
    fn garbage_requests_are_invalid_arguments() {
        let request = RaftRequest {
            data: b"{nope".to_vec(),
        };
        let status = decode_request::<VoteRequest<NodeId>>(&request, "Vote").unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
