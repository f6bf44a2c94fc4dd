//! A registry member's Prometheus metrics: raft's view (term, leader, log, commit and apply positions), the
//! replicated state's size, lease expiries and commit latency.
//!
//! Rendered on the member's own `/metrics` (`herald registry --metrics-addr`) and, in `herald dev`, appended to
//! the edge's. Every series is per member: a dashboard compares them across members (the leader's commit index
//! against each follower's applied index is replication lag).

use herald_telemetry::instruments::{
    write_counter, write_gauge, write_header, write_histogram, Counter, Gauge, Histogram,
};
use openraft::ServerState;

use crate::node::Core;

/// What the member counts itself (the rest is read from raft and the state at render time).
#[derive(Debug, Default)]
pub struct RegistryMetrics {
    /// Edges the leader removed because their lease expired.
    pub lease_expiries: Counter,
    /// From proposing a write on the leader to its response (committed and applied).
    pub commit_duration: Histogram,
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    let g = Gauge::default();
    g.set(value);
    write_gauge(out, name, help, &g);
}

/// Renders `core`'s metrics.
pub(crate) fn render(core: &Core) -> String {
    let mut out = String::with_capacity(4 * 1024);
    let raft = core.metrics();
    let last_log = raft.last_log_index.unwrap_or(0);
    let applied = raft.last_applied.map_or(0, |id| id.index);
    let committed = core.log.committed_index().unwrap_or(0);
    gauge(
        &mut out,
        "herald_registry_term",
        "The raft term this member is in.",
        raft.current_term as i64,
    );
    gauge(
        &mut out,
        "herald_registry_is_leader",
        "1 if this member is the raft leader, else 0.",
        i64::from(raft.state == ServerState::Leader),
    );
    gauge(
        &mut out,
        "herald_registry_leader_id",
        "The node id of the leader this member knows, -1 when it knows none (0 is a valid id).",
        raft.current_leader.map_or(-1, |id| id as i64),
    );
    write_header(
        &mut out,
        "herald_registry_state",
        "1 for the raft role this member is in.",
        "gauge",
    );
    for (role, state) in [
        ("leader", ServerState::Leader),
        ("follower", ServerState::Follower),
        ("candidate", ServerState::Candidate),
        ("learner", ServerState::Learner),
    ] {
        out.push_str(&format!(
            "herald_registry_state{{role=\"{role}\"}} {}\n",
            u8::from(raft.state == state)
        ));
    }
    gauge(
        &mut out,
        "herald_registry_last_log_index",
        "Index of the last entry in this member's log.",
        last_log as i64,
    );
    gauge(
        &mut out,
        "herald_registry_commit_index",
        "Index of the last entry this member knows committed.",
        committed as i64,
    );
    gauge(
        &mut out,
        "herald_registry_last_applied_index",
        "Index of the last entry applied to this member's state.",
        applied as i64,
    );
    gauge(
        &mut out,
        "herald_registry_apply_lag",
        "Entries committed but not yet applied on this member.",
        committed.saturating_sub(applied) as i64,
    );
    let (edges, rooms, interest, routes) = core.state.read_state(|s| {
        (
            s.edges.len(),
            s.interest.len(),
            s.interest.values().map(|edges| edges.len()).sum::<usize>(),
            s.routes.len(),
        )
    });
    gauge(
        &mut out,
        "herald_registry_edges",
        "Edges registered in the replicated state.",
        edges as i64,
    );
    gauge(
        &mut out,
        "herald_registry_interest_rooms",
        "Room patterns at least one edge is interested in.",
        rooms as i64,
    );
    gauge(
        &mut out,
        "herald_registry_interest_entries",
        "(room pattern, edge) interest pairs in the replicated state.",
        interest as i64,
    );
    gauge(
        &mut out,
        "herald_registry_routes",
        "Routes in the replicated route table.",
        routes as i64,
    );
    write_counter(
        &mut out,
        "herald_registry_lease_expiries_total",
        "Edges removed by this member, as leader, because their lease expired.",
        &core.metrics.lease_expiries,
    );
    write_histogram(
        &mut out,
        "herald_registry_commit_duration_seconds",
        "Writes proposed on this member as leader, from proposal to committed and applied.",
        &core.metrics.commit_duration,
    );
    out
}
