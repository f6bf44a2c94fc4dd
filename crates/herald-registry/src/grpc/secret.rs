//! The cluster secret registry members present to each other on every internal RPC, and the interceptor that
//! refuses calls without it.
//!
//! The internal services move raft state: a caller that can reach them can vote, overwrite logs or install a
//! snapshot. Network isolation is the first line of defence; the shared secret is the second, so a member
//! misconfigured into the wrong cluster, or anything else that finds the port, is refused before raft sees it.

use std::fmt;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key the secret travels in.
pub const CLUSTER_SECRET_HEADER: &str = "x-herald-cluster-secret";

/// The secret shared by every member of one registry cluster.
///
/// Its `Debug` output is redacted so it can sit in configs and structs that get logged.
#[derive(Clone)]
pub struct ClusterSecret {
    value: MetadataValue<Ascii>,
}

/// Why a string cannot be a cluster secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSecret {
    /// The secret is empty, which would let every caller in.
    #[error("the cluster secret is empty")]
    Empty,
    /// The secret has a character gRPC metadata cannot carry verbatim.
    #[error("the cluster secret must be printable ASCII without spaces")]
    NotPrintableAscii,
}

impl ClusterSecret {
    /// Checks and wraps a secret. It must be printable ASCII without spaces, so it travels as metadata exactly as
    /// configured (HTTP/2 intermediaries may trim or refuse anything else).
    pub fn new(secret: &str) -> Result<ClusterSecret, InvalidSecret> {
        if secret.is_empty() {
            return Err(InvalidSecret::Empty);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidSecret::NotPrintableAscii);
        }
        let mut value =
            MetadataValue::try_from(secret).map_err(|_| InvalidSecret::NotPrintableAscii)?;
        // Never-indexed in HPACK, so the secret does not linger in the peer's header compression table.
        value.set_sensitive(true);
        Ok(ClusterSecret { value })
    }

    /// The value to send in [`CLUSTER_SECRET_HEADER`].
    pub(crate) fn metadata_value(&self) -> MetadataValue<Ascii> {
        self.value.clone()
    }

    /// Whether `presented` is this secret, compared in constant time so response timing reveals nothing about
    /// how much of a guess was right. (Only the length can leak, as with the edge's API keys.)
    pub fn matches(&self, presented: Option<&[u8]>) -> bool {
        presented.is_some_and(|presented| bool::from(self.value.as_bytes().ct_eq(presented)))
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// A tonic interceptor that refuses every call without the right cluster secret with `UNAUTHENTICATED`.
///
/// Wrap every internal service with it (see [`crate::grpc::raft_server`]).
#[derive(Debug, Clone)]
pub struct SecretCheck {
    secret: ClusterSecret,
}

impl SecretCheck {
    /// An interceptor accepting only `secret`.
    pub fn new(secret: ClusterSecret) -> SecretCheck {
        SecretCheck { secret }
    }
}

impl Interceptor for SecretCheck {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(CLUSTER_SECRET_HEADER)
            .map(|v| v.as_bytes());
        if !self.secret.matches(presented) {
            // A refused member is a misconfiguration worth seeing, not a routine event.
            tracing::warn!(
                peer = ?request.remote_addr(),
                "internal RPC refused: missing or wrong cluster secret"
            );
            return Err(Status::unauthenticated("missing or wrong cluster secret"));
        }
        // The services behind never need the secret; dropping it keeps it out of anything that logs requests.
        request.metadata_mut().remove(CLUSTER_SECRET_HEADER);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_printable_ascii() {
        assert_eq!(ClusterSecret::new("").unwrap_err(), InvalidSecret::Empty);
        assert_eq!(
            ClusterSecret::new("has space").unwrap_err(),
            InvalidSecret::NotPrintableAscii
        );
        assert_eq!(
            ClusterSecret::new("naïve").unwrap_err(),
            InvalidSecret::NotPrintableAscii
        );
        assert!(ClusterSecret::new("s3cr3t-!~").is_ok());
    }

    #[test]
    fn only_the_exact_secret_matches() {
        let secret = ClusterSecret::new("correct-horse").unwrap();
        assert!(secret.matches(Some(b"correct-horse")));
        assert!(!secret.matches(Some(b"correct-hors")));
        assert!(!secret.matches(Some(b"correct-horse2")));
        assert!(!secret.matches(Some(b"")));
        assert!(!secret.matches(None));
        assert_eq!(format!("{secret:?}"), "ClusterSecret(<redacted>)");
    }

    #[test]
    fn the_interceptor_refuses_and_strips() {
        let mut check = SecretCheck::new(ClusterSecret::new("abc").unwrap());
        let status = check.call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, MetadataValue::from_static("abd"));
        assert_eq!(
            check.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );

        let mut right = Request::new(());
        right
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, MetadataValue::from_static("abc"));
        let passed = check.call(right).unwrap();
        assert!(passed.metadata().get(CLUSTER_SECRET_HEADER).is_none());
    }
}
