//! herald's protobuf messages and gRPC services, generated at build time from `proto/herald/v1/`.
//!
//! # Layout
//! - [`v1`]: the public API: `herald.v1.Publisher` (`Publish`, `PublishStream`).

/// `herald.v1`: the public publish API.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("herald.v1");
}
