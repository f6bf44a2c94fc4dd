//! `herald.v1.RaftInternal` over a local [`Raft`] handle: the receiving side of [`crate::network`].
//!
//! Each call decodes the openraft request, hands it to raft and returns raft's answer, success or
//! [`openraft::error::RaftError`], inside the reply, so the sender can tell "the peer's raft said no" (a
//! `RemoteError` to openraft) from "the call failed" (a gRPC status). Authentication happens before this, in
//! [`crate::grpc::secret::SecretCheck`].

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::Raft;
use tonic::{Request, Response, Status};

use herald_proto::v1::raft_internal_server::RaftInternal;
use herald_proto::v1::{RaftReply, RaftRequest};

use crate::grpc::wire;
use crate::types::{NodeId, TypeConfig};

/// The raft RPC service of one registry member.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
}

impl RaftService {
    /// Serves `raft`'s RPCs.
    pub fn new(raft: Raft<TypeConfig>) -> RaftService {
        RaftService { raft }
    }
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Raft` has no `Debug`; the service has nothing else worth printing.
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl RaftInternal for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> =
            wire::decode_request(request.get_ref(), "AppendEntries")?;
        let result = self.raft.append_entries(rpc).await;
        Ok(Response::new(wire::encode_reply(&result)?))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<NodeId> = wire::decode_request(request.get_ref(), "Vote")?;
        let result = self.raft.vote(rpc).await;
        Ok(Response::new(wire::encode_reply(&result)?))
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> =
            wire::decode_request(request.get_ref(), "InstallSnapshot")?;
        let result = self.raft.install_snapshot(rpc).await;
        Ok(Response::new(wire::encode_reply(&result)?))
    }
}
