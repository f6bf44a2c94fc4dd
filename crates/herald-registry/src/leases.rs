//! Edge leases, kept in the leader's memory only.
//!
//! Replicating every keep-alive would cost a raft commit per edge per heartbeat for nothing: the only
//! replicated facts are "edge registered" and "edge removed". The leader holds the deadlines; a new leader
//! starts every known edge with a full TTL (an edge is never expired because leadership moved), then expires
//! the ones that stay silent by proposing `RemoveEdges`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::types::EdgeId;

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    last_heard: Instant,
}

/// The leader's lease table.
#[derive(Debug, Default)]
pub struct Leases {
    leases: HashMap<EdgeId, Lease>,
}

impl Leases {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or restarts) a lease, e.g. after a registration committed.
    pub fn grant(&mut self, edge: EdgeId, ttl: Duration, now: Instant) {
        self.leases.insert(
            edge,
            Lease {
                ttl,
                last_heard: now,
            },
        );
    }

    /// Renews a lease; `false` when the edge holds none (it must register again).
    pub fn keep_alive(&mut self, edge: &str, now: Instant) -> bool {
        match self.leases.get_mut(edge) {
            Some(lease) => {
                lease.last_heard = now;
                true
            }
            None => false,
        }
    }

    /// Replaces the table with a full TTL for each of `edges` (on becoming leader).
    pub fn restart(&mut self, edges: impl IntoIterator<Item = (EdgeId, Duration)>, now: Instant) {
        self.leases = edges
            .into_iter()
            .map(|(edge, ttl)| {
                (
                    edge,
                    Lease {
                        ttl,
                        last_heard: now,
                    },
                )
            })
            .collect();
    }

    /// Edges whose TTL passed without a keep-alive. They stay in the table until [`Self::forget`], so a
    /// failed removal proposal is retried on the next sweep.
    pub fn expired(&self, now: Instant) -> Vec<EdgeId> {
        let mut expired: Vec<EdgeId> = self
            .leases
            .iter()
            .filter(|(_, lease)| now.saturating_duration_since(lease.last_heard) > lease.ttl)
            .map(|(edge, _)| edge.clone())
            .collect();
        expired.sort();
        expired
    }

    /// Drops leases (after their removal committed).
    pub fn forget(&mut self, edges: &[EdgeId]) {
        for edge in edges {
            self.leases.remove(edge);
        }
    }

    /// How long since the leader heard from `edge`.
    pub fn age(&self, edge: &str, now: Instant) -> Option<Duration> {
        self.leases
            .get(edge)
            .map(|lease| now.saturating_duration_since(lease.last_heard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_edges_expire_and_live_ones_do_not() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut leases = Leases::new();
        leases.grant("a".into(), ttl, t0);
        leases.grant("b".into(), ttl, t0);
        assert!(leases.keep_alive("a", t0 + Duration::from_secs(2)));
        assert_eq!(
            leases.expired(t0 + Duration::from_secs(4)),
            vec!["b".to_string()]
        );
        leases.forget(&["b".into()]);
        assert!(
            !leases.keep_alive("b", t0 + Duration::from_secs(4)),
            "must re-register"
        );
        assert!(leases.expired(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(
            leases.age("a", t0 + Duration::from_secs(5)),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn a_new_leader_restarts_every_lease_in_full() {
        let t0 = Instant::now();
        let mut leases = Leases::new();
        leases.grant("old".into(), Duration::from_secs(1), t0);
        let later = t0 + Duration::from_secs(60);
        leases.restart([("a".to_string(), Duration::from_secs(3))], later);
        assert!(leases.expired(later + Duration::from_secs(2)).is_empty());
        assert!(!leases.keep_alive("old", later));
    }
}
