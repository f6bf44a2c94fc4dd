//! The registry's internal gRPC services: the receiving side of raft ([`RaftService`]) and what edges and
//! `herald ctl` ask of the registry ([`RegistryService`]), both behind the cluster secret ([`secret`]).
//!
//! These services are for registry members only. Serve them on the internal listener, never next to the public
//! API, and always through [`raft_server`] (or another [`SecretCheck`]-wrapped service), which also caps message
//! sizes below the public API's.

pub mod convert;
pub mod raft_service;
pub mod registry_service;
pub mod secret;
pub(crate) mod wire;

use openraft::Raft;
use tonic::service::interceptor::InterceptedService;

use herald_proto::v1::raft_internal_server::RaftInternalServer;

pub use raft_service::RaftService;
pub(crate) use registry_service::{registry_server, validate_host_port};
pub use registry_service::{RegistryServer, RegistryService, LEADER_HEADER};
pub use secret::{ClusterSecret, InvalidSecret, SecretCheck, CLUSTER_SECRET_HEADER};

use crate::types::TypeConfig;

/// The default cap on one raft message, either way.
///
/// Raft messages are batches of log entries (openraft caps a batch at `max_payload_entries`) and snapshot chunks
/// (`snapshot_max_chunk_size`, 3 MiB by default, which serde_json's byte arrays inflate up to 4x), so 16 MiB
/// leaves room for both while bounding what any one call can make a member buffer. (Calls without the secret
/// are refused on their headers, before any body is read.)
pub const DEFAULT_MAX_RAFT_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The raft service as served: [`RaftService`] behind [`SecretCheck`].
pub type RaftServer = InterceptedService<RaftInternalServer<RaftService>, SecretCheck>;

/// The raft service for `raft`, refusing calls without `secret` and messages over `max_message_bytes` (see
/// [`DEFAULT_MAX_RAFT_MESSAGE_BYTES`]). Add it to a `tonic::transport::Server` on the internal listener.
///
/// The size cap applies both ways; the sending side ([`crate::network::GrpcNetwork`]) should use the same value,
/// so an oversized batch is caught before it is sent and split by openraft.
pub fn raft_server(
    raft: Raft<TypeConfig>,
    secret: ClusterSecret,
    max_message_bytes: usize,
) -> RaftServer {
    let server = RaftInternalServer::new(RaftService::new(raft))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    InterceptedService::new(server, SecretCheck::new(secret))
}
