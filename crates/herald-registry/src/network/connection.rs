//! One member's raft client to one target member.

use std::error::Error;
use std::future::Future;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RPCTypes, RaftNetwork};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};

use herald_proto::v1::raft_internal_client::RaftInternalClient;
use herald_proto::v1::{RaftReply, RaftRequest};

use crate::grpc::{wire, ClusterSecret, CLUSTER_SECRET_HEADER};
use crate::types::{NodeId, RegistryNode, TypeConfig};

/// What openraft gets back from one RPC whose remote errors are `E`.
type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, RegistryNode, RaftError<NodeId, E>>>;

/// A raft client to one target member, made by [`crate::network::GrpcNetwork`].
#[derive(Debug)]
pub struct GrpcConnection {
    /// This member, for timeout errors.
    id: NodeId,
    target: NodeId,
    node: RegistryNode,
    /// The client, or why the target's address cannot be dialed at all.
    client: Result<RaftInternalClient<Channel>, AnyError>,
    secret: ClusterSecret,
}

impl GrpcConnection {
    pub(crate) fn new(
        id: NodeId,
        target: NodeId,
        node: RegistryNode,
        client: Result<RaftInternalClient<Channel>, AnyError>,
        secret: ClusterSecret,
    ) -> GrpcConnection {
        GrpcConnection {
            id,
            target,
            node,
            client,
            secret,
        }
    }

    /// Sends one request with `send` (the generated client method) and turns every way it can end into what
    /// openraft expects. `entries` is the append batch's length, to size a split when the batch is too large.
    async fn call<Req, Resp, E, F, Fut>(
        &self,
        action: RPCTypes,
        rpc: &Req,
        entries: usize,
        option: &RPCOption,
        send: F,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
        F: FnOnce(RaftInternalClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftReply>, Status>>,
    {
        let client = match &self.client {
            Ok(client) => client.clone(),
            // A malformed address will not fix itself: back off until the membership changes.
            Err(e) => return Err(Unreachable::from(e.clone()).into()),
        };
        let message = wire::encode_request(rpc).map_err(|e| Unreachable::new(&e))?;
        let ttl = option.hard_ttl();
        let mut request = tonic::Request::new(message);
        // Sent as `grpc-timeout`, so the target also stops working on a call its sender gave up on.
        request.set_timeout(ttl);
        request
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, self.secret.metadata_value());

        // tonic only sends the timeout; the client side must enforce it itself (a dial to a black-holed address
        // would otherwise wait for the connect timeout).
        let reply = match tokio::time::timeout(ttl, send(client, request)).await {
            Err(_elapsed) => return Err(self.timeout(action, ttl)),
            Ok(Err(status)) => return Err(self.status_error(action, status, entries, ttl)),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        match wire::decode_reply::<Resp, RaftError<NodeId, E>>(&reply) {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(raft_error)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                raft_error,
            ))),
            // An answer we cannot read means an incompatible peer; retrying at once would fail the same way.
            Err(e) => Err(Unreachable::new(&e).into()),
        }
    }

    fn timeout<E: Error>(
        &self,
        action: RPCTypes,
        ttl: Duration,
    ) -> RPCError<NodeId, RegistryNode, RaftError<NodeId, E>> {
        RPCError::Timeout(Timeout {
            action,
            id: self.id,
            target: self.target,
            timeout: ttl,
        })
    }

    /// Maps a failed call to the [`RPCError`] variant that makes openraft do the right thing next.
    fn status_error<E: Error>(
        &self,
        action: RPCTypes,
        status: Status,
        entries: usize,
        ttl: Duration,
    ) -> RPCError<NodeId, RegistryNode, RaftError<NodeId, E>> {
        let error = || {
            AnyError::new(&status)
                .add_context(|| format!("{action} to {} at {}", self.target, self.node))
        };
        match status.code() {
            // The target's own deadline (our `grpc-timeout`) ran out first.
            Code::DeadlineExceeded => self.timeout(action, ttl),
            // tonic's codec refuses a message over the cap with OUT_OF_RANGE (either side) or RESOURCE_EXHAUSTED
            // (decompressed). An append batch can be split, so ask openraft for half; a single entry or a snapshot
            // chunk cannot, so those fall through to unreachable below.
            Code::OutOfRange | Code::ResourceExhausted
                if action == RPCTypes::AppendEntries && entries > 1 =>
            {
                PayloadTooLarge::new_entries_hint((entries / 2) as u64)
                    .with_source_error(&error())
                    .into()
            }
            // Down or refusing connections (UNAVAILABLE); or up but not willing or able to talk to us: the wrong
            // cluster secret, not a raft service, a peer on an incompatible version, a message that will never
            // fit. None of these clears by retrying at once, so back off.
            Code::Unavailable
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted => Unreachable::new(&error()).into(),
            // A call cut short (connection reset mid-call, the target shutting down a stream, ...): transient.
            _ => NetworkError::new(&error()).into(),
        }
    }
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len();
        self.call(
            RPCTypes::AppendEntries,
            &rpc,
            entries,
            &option,
            |mut client, request| async move { client.append_entries(request).await },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(
            RPCTypes::InstallSnapshot,
            &rpc,
            0,
            &option,
            |mut client, request| async move { client.install_snapshot(request).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call(
            RPCTypes::Vote,
            &rpc,
            0,
            &option,
            |mut client, request| async move { client.vote(request).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_calls_map_to_what_openraft_needs() {
        let connection = GrpcConnection::new(
            1,
            2,
            RegistryNode {
                addr: "127.0.0.1:1".into(),
            },
            Err(AnyError::error("never dialed")),
            ClusterSecret::new("secret").unwrap(),
        );
        let ttl = Duration::from_millis(50);
        let map = |code: Code, action: RPCTypes, entries: usize| {
            connection.status_error::<openraft::error::Infallible>(
                action,
                Status::new(code, "test"),
                entries,
                ttl,
            )
        };
        use RPCTypes::{AppendEntries, InstallSnapshot, Vote};

        // Too large: a batch is halved, a single entry or a snapshot chunk cannot be.
        match map(Code::OutOfRange, AppendEntries, 10) {
            RPCError::PayloadTooLarge(too_large) => assert_eq!(too_large.entries_hint(), 5),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map(Code::OutOfRange, AppendEntries, 1),
            RPCError::Unreachable(_)
        ));
        assert!(matches!(
            map(Code::ResourceExhausted, InstallSnapshot, 0),
            RPCError::Unreachable(_)
        ));

        for code in [
            Code::Unavailable,
            Code::Unauthenticated,
            Code::Unimplemented,
            Code::InvalidArgument,
        ] {
            assert!(
                matches!(map(code, Vote, 0), RPCError::Unreachable(_)),
                "{code:?}"
            );
        }
        match map(Code::DeadlineExceeded, Vote, 0) {
            RPCError::Timeout(timeout) => {
                assert_eq!((timeout.id, timeout.target, timeout.timeout), (1, 2, ttl))
            }
            other => panic!("{other:?}"),
        }
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::Aborted,
        ] {
            assert!(
                matches!(map(code, AppendEntries, 3), RPCError::Network(_)),
                "{code:?}"
            );
        }
    }
}
