//! herald's protobuf messages and gRPC services, generated at build time from `proto/herald/v1/`.
//!
//! # Layout
//! - [`v1`]: the public API, `herald.v1.Publisher` (`Publish`, `PublishStream`); and the internal services,
//!   never exposed to clients and guarded by the cluster secret: `RaftInternal` (raft RPCs between registry
//!   members), `RegistryInternal` (what edges and `herald ctl` ask of the registry) and `PeerInternal`
//!   (edge-to-edge forwarding of publishes).

/// `herald.v1`: the public publish API and the internal cluster services.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("herald.v1");
}
