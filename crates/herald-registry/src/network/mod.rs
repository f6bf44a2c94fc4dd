//! openraft's network over gRPC: [`GrpcNetwork`] (the factory, one per member) hands out a [`GrpcConnection`] per
//! target, which sends `herald.v1.RaftInternal` calls to the target's [`crate::grpc::RaftService`].
//!
//! # Errors, as openraft needs them
//! openraft decides what to do after a failed RPC by the [`RPCError`] variant, so the mapping matters:
//! - the target's raft answered with an error: [`RPCError::RemoteError`] (carrying that error);
//! - no answer within `RPCOption::hard_ttl()`: [`RPCError::Timeout`];
//! - the target is down, or will not talk to us (wrong secret, wrong service, incompatible version):
//!   [`RPCError::Unreachable`], so openraft backs off instead of hammering it;
//! - an append batch too large for the message cap: [`RPCError::PayloadTooLarge`], so openraft splits it;
//! - anything else (a connection dropped mid-call, ...): [`RPCError::Network`], retried on the next tick.
//!
//! [`RPCError`]: openraft::error::RPCError
//! [`RPCError::RemoteError`]: openraft::error::RPCError::RemoteError
//! [`RPCError::Timeout`]: openraft::error::RPCError::Timeout
//! [`RPCError::Unreachable`]: openraft::error::RPCError::Unreachable
//! [`RPCError::PayloadTooLarge`]: openraft::error::RPCError::PayloadTooLarge
//! [`RPCError::Network`]: openraft::error::RPCError::Network

mod connection;

use std::collections::HashMap;
use std::time::Duration;

use openraft::{AnyError, RaftNetworkFactory};
use tonic::transport::{Channel, Endpoint};

use herald_proto::v1::raft_internal_client::RaftInternalClient;

use crate::grpc::{ClusterSecret, DEFAULT_MAX_RAFT_MESSAGE_BYTES};
use crate::types::{NodeId, RegistryNode, TypeConfig};

pub use connection::GrpcConnection;

/// How long to wait for a TCP (and HTTP/2) connection to a member by default.
///
/// Short, because raft's own timeouts are short: a member that does not accept a connection in a second is as good
/// as down, and reporting it as unreachable lets openraft back off rather than stack up attempts.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// openraft's network factory for one registry member: it keeps one gRPC channel per target member.
///
/// openraft asks for a new client every time a replication stream or an election starts; reusing the channel
/// means those clients share one HTTP/2 connection per target instead of each dialing its own.
#[derive(Debug)]
pub struct GrpcNetwork {
    id: NodeId,
    secret: ClusterSecret,
    max_message_bytes: usize,
    connect_timeout: Duration,
    /// Target -> (the address its channel dials, the channel).
    channels: HashMap<NodeId, (String, Channel)>,
}

impl GrpcNetwork {
    /// The network of member `id` (reported in timeout errors), presenting `secret` on every call.
    pub fn new(id: NodeId, secret: ClusterSecret) -> GrpcNetwork {
        GrpcNetwork {
            id,
            secret,
            max_message_bytes: DEFAULT_MAX_RAFT_MESSAGE_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            channels: HashMap::new(),
        }
    }

    /// Caps one message either way (default [`DEFAULT_MAX_RAFT_MESSAGE_BYTES`]); use the same value as the members'
    /// [`crate::grpc::raft_server`]. Keep openraft's `snapshot_max_chunk_size` under a quarter of it: a chunk
    /// travels as a JSON array of numbers, and one that does not fit cannot be split.
    pub fn with_max_message_bytes(mut self, max_message_bytes: usize) -> GrpcNetwork {
        self.max_message_bytes = max_message_bytes;
        self
    }

    /// How long to wait for a connection to a member (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> GrpcNetwork {
        self.connect_timeout = connect_timeout;
        self
    }

    /// The channel to `target`, made (without connecting) the first time or when its address changed.
    fn channel(&mut self, target: NodeId, node: &RegistryNode) -> Result<Channel, AnyError> {
        if let Some((addr, channel)) = self.channels.get(&target) {
            if *addr == node.addr {
                return Ok(channel.clone());
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", node.addr))
            .map_err(|e| {
                AnyError::new(&e).add_context(|| format!("member address {:?}", node.addr))
            })?
            .connect_timeout(self.connect_timeout)
            // Raft messages are latency-bound and small between batches: never wait to coalesce them.
            .tcp_nodelay(true)
            // Pings notice a silently dead peer (a host gone, not just a process) between raft's own messages.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // Lazy: members start in any order, and a member that is down now must not fail `new_client`, which cannot
        // report errors. The channel dials on first use and redials after a failure.
        let channel = endpoint.connect_lazy();
        self.channels
            .insert(target, (node.addr.clone(), channel.clone()));
        Ok(channel)
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &RegistryNode) -> GrpcConnection {
        let client = self.channel(target, node).map(|channel| {
            RaftInternalClient::new(channel)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes)
        });
        GrpcConnection::new(self.id, target, node.clone(), client, self.secret.clone())
    }
}
