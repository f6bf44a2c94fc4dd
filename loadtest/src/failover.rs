//! Scenario 6, failover under load: the controller that kills herald's processes while the coordinator publishes
//! (and restarts them), and what its rounds and the workers' resubscribes add up to.
//!
//! - A registry leader kill: ask the registry who leads, SIGKILL that member, then write through herald's own
//!   [`RegistryClient`] (the client edges use, with its retries and leader hints) until a write commits: the
//!   figure is the time from the SIGKILL to that commit. The write is an interest change of a probe "edge" the
//!   controller registered at the start ([`PROBE_EDGE`]), which serves nothing and whose rooms nobody publishes
//!   to, so it never touches the load. Then the member is restarted from its data directory (same node id, port,
//!   peers) and the next kill waits until it has applied that write.
//! - An edge kill: SIGKILL the edge and restart it at once on the same ports (as a supervisor would). Its
//!   subscribers reconnect to another edge and subscribe again (the workers time that from the SIGKILL); its
//!   publishers' streams break and they move to another edge (the coordinator's publish loop). What the edge
//!   was holding when it died is accounted apart from loss: see [`crate::stats::Missing`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_registry::client::{InterestOutcome, RegistryClient};
use herald_registry::ClusterSecret;
use serde::Serialize;

use crate::payload::now_ns;
use crate::scenario::{FailoverSpec, KillKind};
use crate::server::{Node, Procs, SECRET};
use crate::stats::{KilledSegment, Latency, Missing, Percentiles};
use crate::wire::{EdgeKillFact, FailoverFacts, Resubscribe};

/// The registry "edge" whose interest the controller changes to time a write.
const PROBE_EDGE: &str = "loadtest-failover-probe";
/// Its peer address: never dialed, since edges dial a peer only to forward a publish to one of its rooms.
const PROBE_PEER: &str = "127.0.0.1:9";
const PROBE_TTL: Duration = Duration::from_secs(3600);
/// How long a round waits for the first write after a kill, or for a restarted process to be back.
const ROUND_LIMIT: Duration = Duration::from_secs(30);
/// A publisher stream that broke this long after its edge's restart is not that kill's doing.
const SEGMENT_SLACK_NS: u64 = 5_000_000_000;

fn secs_ns(secs: f64) -> u64 {
    (secs * 1e9) as u64
}

fn since_secs(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e9
}

/// The probe's room for round `k` (canonical JSON: keys sorted).
fn probe_room(k: usize) -> String {
    format!(r#"{{"lt":"failover-probe","shard":"{k}"}}"#)
}

/// Kills and restarts herald's processes on the scenario's schedule.
pub(crate) struct Controller {
    pub(crate) spec: FailoverSpec,
    pub(crate) procs: Procs,
    /// Registry member addresses, member `i + 1` at index `i`.
    pub(crate) registry: Vec<String>,
    pub(crate) nodes: Vec<Node>,
    /// Publishes sent per room so far (the coordinator's counters), read at each edge kill.
    pub(crate) sent: Arc<Vec<AtomicU64>>,
    pub(crate) publish_start: u64,
    pub(crate) publish_end: u64,
}

/// One registry leader kill.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LeaderRound {
    /// Seconds after publishing started.
    pub(crate) at_secs: f64,
    /// The killed leader's node id.
    pub(crate) leader: u64,
    /// From the SIGKILL until a write committed.
    pub(crate) write_after_secs: Option<f64>,
    /// What committed first: an interest update, or a registration when the probe's lease had lapsed.
    pub(crate) write: String,
    /// From the restart until the member had applied that write.
    pub(crate) rejoined_after_restart_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// One edge kill, as the controller saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct EdgeRound {
    /// Seconds after publishing started.
    pub(crate) at_secs: f64,
    pub(crate) node: usize,
    pub(crate) name: String,
    #[serde(skip)]
    pub(crate) killed_ns: u64,
    #[serde(skip)]
    pub(crate) restarted_ns: u64,
    /// From the SIGKILL until the replacement listened on the old ports.
    pub(crate) restarted_after_secs: Option<f64>,
    /// From the SIGKILL until the registry had the replacement's registration.
    pub(crate) registered_after_secs: Option<f64>,
    /// Publishes sent per room at the SIGKILL.
    #[serde(skip)]
    pub(crate) kill_seqs: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// What the controller did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) leader_rounds: Vec<LeaderRound>,
    pub(crate) edge_rounds: Vec<EdgeRound>,
    /// Kills not made because the rounds before them ran into the settling time at the end.
    pub(crate) skipped: usize,
    pub(crate) notes: Vec<String>,
}

impl Controller {
    /// Runs every kill of the schedule (each waits for the previous round to finish) and returns what happened.
    pub(crate) async fn run(self) -> Outcome {
        let mut out = Outcome::default();
        let client = match ClusterSecret::new(SECRET)
            .map_err(|e| e.to_string())
            .and_then(|secret| {
                RegistryClient::new(self.registry.clone(), secret).map_err(|e| e.to_string())
            }) {
            // Calls retried here until the round's limit: the commit is seen within one client round (its pauses
            // are 50-250 ms) of happening, as an edge would see it. The budget leaves each attempt its whole
            // timeout, so a slow commit is waited for rather than cut off and sent again.
            Ok(client) => client
                .with_call_timeout(Duration::from_secs(2))
                .with_retry_budget(Duration::from_secs(5)),
            Err(e) => {
                out.notes.push(format!("no registry client: {e}"));
                return out;
            }
        };
        if self.spec.leader_kills > 0 {
            let registered = tokio::time::timeout(
                ROUND_LIMIT,
                client.register(PROBE_EDGE, PROBE_PEER, PROBE_TTL, Vec::new()),
            )
            .await;
            if !matches!(registered, Ok(Ok(_))) {
                out.notes.push(format!(
                    "the write probe {PROBE_EDGE} could not register before the first kill: {registered:?}"
                ));
            }
        }
        let schedule = self.spec.schedule();
        // A kill starts no later than this (a second of grace), so the run keeps its settling time.
        let last_start = self
            .publish_end
            .saturating_sub(secs_ns(self.spec.settle_secs))
            + 1_000_000_000;
        let mut edge_turn = 0;
        for (i, (at, kind)) in schedule.iter().enumerate() {
            let due = self.publish_start + secs_ns(*at);
            let now = now_ns();
            if due > now {
                tokio::time::sleep(Duration::from_nanos(due - now)).await;
            }
            if now_ns() > last_start {
                out.skipped = schedule.len() - i;
                break;
            }
            match kind {
                KillKind::RegistryLeader => {
                    let round = self.leader_round(&client, out.leader_rounds.len()).await;
                    out.leader_rounds.push(round);
                }
                KillKind::Edge => {
                    let node = edge_turn % self.nodes.len();
                    edge_turn += 1;
                    let round = self.edge_round(&client, node).await;
                    out.edge_rounds.push(round);
                }
            }
        }
        out
    }

    async fn leader_round(&self, client: &RegistryClient, k: usize) -> LeaderRound {
        let mut r = LeaderRound::default();
        // Who leads now: the previous round's election and rejoin are over, but ask until someone answers.
        let asked = now_ns();
        let leader = loop {
            if let Ok(status) = client.status().await {
                if let Some(id) = status.leader_id {
                    break id;
                }
            }
            if now_ns() > asked + ROUND_LIMIT.as_nanos() as u64 {
                r.at_secs = since_secs(self.publish_start, now_ns());
                r.error = Some("no registry member knew a leader".into());
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        r.leader = leader;
        let Some(addr) = (leader as usize)
            .checked_sub(1)
            .and_then(|i| self.registry.get(i))
            .cloned()
        else {
            r.error = Some(format!(
                "the leader's id {leader} is not a member the harness started"
            ));
            return r;
        };
        let name = format!("registry-{leader}");

        let killed = now_ns();
        r.at_secs = since_secs(self.publish_start, killed);
        if let Err(e) = self.procs.kill(&name) {
            r.error = Some(format!("{e:#}"));
            return r;
        }

        // The first write after the kill.
        let room = probe_room(k);
        let previous: Vec<String> = k.checked_sub(1).map(probe_room).into_iter().collect();
        let mut revision = None;
        let mut last_error = String::new();
        while now_ns() < killed + ROUND_LIMIT.as_nanos() as u64 {
            match client
                .update_interest(PROBE_EDGE, vec![room.clone()], previous.clone())
                .await
            {
                Ok(InterestOutcome::Committed(rev)) => {
                    r.write_after_secs = Some(since_secs(killed, now_ns()));
                    r.write = "interest update".into();
                    revision = Some(rev);
                    break;
                }
                // The probe's lease lapsed (or it never registered): registering is a committed write too.
                Ok(InterestOutcome::UnknownEdge) => match client
                    .register(PROBE_EDGE, PROBE_PEER, PROBE_TTL, vec![room.clone()])
                    .await
                {
                    Ok(rev) => {
                        r.write_after_secs = Some(since_secs(killed, now_ns()));
                        r.write = "registration".into();
                        revision = Some(rev);
                        break;
                    }
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.to_string(),
            }
        }
        if revision.is_none() {
            r.error = Some(format!(
                "no registry write committed within {} s of the kill (last: {last_error})",
                ROUND_LIMIT.as_secs()
            ));
        }

        // Back from its data directory, and caught up before the next round.
        let procs = self.procs.clone();
        let restart_name = name.clone();
        let restarted = tokio::task::spawn_blocking(move || procs.restart(&restart_name)).await;
        match restarted {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                r.error = Some(format!("{name} did not restart: {e:#}"));
                return r;
            }
            Err(e) => {
                r.error = Some(format!("restarting {name}: {e}"));
                return r;
            }
        }
        let restarted_at = now_ns();
        let mut last_seen;
        loop {
            match client.member_status(&addr).await {
                Ok(status) => {
                    // The write's revision is its log index; a retried write that changed nothing leaves the
                    // state's revision below it, so compare with what the member applied.
                    let applied = status.last_applied.unwrap_or(0);
                    if status.leader_id.is_some() && revision.is_none_or(|rev| applied >= rev) {
                        r.rejoined_after_restart_secs = Some(since_secs(restarted_at, now_ns()));
                        break;
                    }
                    last_seen = format!(
                        "it knew leader {:?} and had applied log index {applied}",
                        status.leader_id
                    );
                }
                Err(e) => last_seen = e.to_string(),
            }
            if now_ns() > restarted_at + ROUND_LIMIT.as_nanos() as u64 {
                let e = format!(
                    "{name} had not caught up {} s after its restart (the write committed at log index {}; last: \
                     {last_seen})",
                    ROUND_LIMIT.as_secs(),
                    revision.map_or_else(|| "?".to_owned(), |r| r.to_string())
                );
                r.error = Some(r.error.map_or(e.clone(), |prev| format!("{prev}; {e}")));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }

    async fn edge_round(&self, client: &RegistryClient, node: usize) -> EdgeRound {
        let name = self.nodes[node].name.clone();
        let mut r = EdgeRound {
            node,
            name: name.clone(),
            ..EdgeRound::default()
        };
        r.kill_seqs = self
            .sent
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let killed = now_ns();
        r.killed_ns = killed;
        r.restarted_ns = killed;
        r.at_secs = since_secs(self.publish_start, killed);
        if let Err(e) = self.procs.kill(&name) {
            r.error = Some(format!("{e:#}"));
            return r;
        }
        let procs = self.procs.clone();
        let restart_name = name.clone();
        let restarted = tokio::task::spawn_blocking(move || procs.restart(&restart_name)).await;
        r.restarted_ns = now_ns();
        let line = match restarted {
            Ok(Ok((_, line))) => line,
            Ok(Err(e)) => {
                r.error = Some(format!("{name} did not restart: {e:#}"));
                return r;
            }
            Err(e) => {
                r.error = Some(format!("restarting {name}: {e}"));
                return r;
            }
        };
        r.restarted_after_secs = Some(since_secs(killed, r.restarted_ns));
        // Registered again once the registry lists the edge at its new peer address.
        let peer = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peer="))
            .unwrap_or_default()
            .to_owned();
        loop {
            if let Ok(status) = client.status().await {
                if status
                    .edges
                    .iter()
                    .any(|e| e.edge == name && e.peer_addr == peer)
                {
                    r.registered_after_secs = Some(since_secs(killed, now_ns()));
                    break;
                }
            }
            if now_ns() > r.restarted_ns + ROUND_LIMIT.as_nanos() as u64 {
                r.error = Some(format!(
                    "the registry did not list {name} at {peer} within {} s of its restart",
                    ROUND_LIMIT.as_secs()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }
}

/// A publisher's stream to one edge that broke, as the publish loop recorded it.
#[derive(Debug, Clone)]
pub(crate) struct PublisherSegment {
    pub(crate) publisher: u32,
    pub(crate) node: usize,
    pub(crate) ended_ns: u64,
    pub(crate) error: String,
    /// (room, first sequence number sent on the stream, one past the last).
    pub(crate) rooms: Vec<(u32, u64, u64)>,
}

/// Which broken publisher streams an edge kill explains (the stream was to the killed edge and broke between
/// the SIGKILL and a few seconds after the restart), as per-room [`KilledSegment`]s with the room's count at the
/// SIGKILL; the number of streams each kill broke; and a description of every stream that broke unexplained.
pub(crate) fn killed_segments(
    segments: &[PublisherSegment],
    rounds: &[EdgeRound],
) -> (Vec<KilledSegment>, Vec<usize>, Vec<String>) {
    let mut killed = Vec::new();
    let mut switched = vec![0; rounds.len()];
    let mut unexplained = Vec::new();
    for seg in segments {
        let round = rounds.iter().rposition(|r| {
            r.node == seg.node
                && r.killed_ns <= seg.ended_ns
                && seg.ended_ns <= r.restarted_ns + SEGMENT_SLACK_NS
        });
        let Some(k) = round else {
            unexplained.push(format!(
                "publisher {}'s stream to node {} broke with no kill to explain it: {}",
                seg.publisher, seg.node, seg.error
            ));
            continue;
        };
        switched[k] += 1;
        for &(room, start, end) in &seg.rooms {
            let at_kill = rounds[k]
                .kill_seqs
                .get(room as usize)
                .copied()
                .unwrap_or(start);
            killed.push(KilledSegment {
                room,
                start,
                kill: at_kill.clamp(start, end),
                end,
            });
        }
    }
    (killed, switched, unexplained)
}

/// What the workers need to know about the kills.
pub(crate) fn facts(
    outcome: &Outcome,
    segments: Vec<KilledSegment>,
    publish_end_ns: u64,
) -> FailoverFacts {
    FailoverFacts {
        edge_kills: outcome
            .edge_rounds
            .iter()
            .map(|r| EdgeKillFact {
                node: r.node,
                killed_ns: r.killed_ns,
                restarted_ns: r.restarted_ns,
            })
            .collect(),
        segments,
        publish_end_ns,
    }
}

/// One edge kill in the report.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct EdgeKillFigures {
    #[serde(flatten)]
    pub(crate) round: EdgeRound,
    /// Subscriber connections the kill cut.
    pub(crate) clients: u64,
    /// Of those, how many subscribed again (on any edge) before the run ended.
    pub(crate) resubscribed: u64,
    /// From the SIGKILL to the resubscribe acknowledgement (ms).
    pub(crate) resubscribe: Percentiles,
    /// From the SIGKILL to the first delivery on the new connection (ms).
    pub(crate) first_delivery: Percentiles,
    /// Publisher streams to the edge that broke and moved to another edge.
    pub(crate) publishers_switched: usize,
}

/// The failover part of a report.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FailoverFigures {
    pub(crate) leader_kills_planned: usize,
    pub(crate) edge_kills_planned: usize,
    /// Kills not made: earlier rounds ran into the settling time at the end of the run.
    pub(crate) skipped_kills: usize,
    pub(crate) leader_rounds: Vec<LeaderRound>,
    /// Over the leader rounds that committed a write, from the SIGKILL.
    pub(crate) write_after_kill_p50_secs: Option<f64>,
    pub(crate) write_after_kill_max_secs: Option<f64>,
    /// Leader rounds in which no write committed within 30 s (or that could not kill).
    pub(crate) rounds_without_write: usize,
    pub(crate) edge_kills: Vec<EdgeKillFigures>,
    /// Over every subscriber every edge kill cut.
    pub(crate) clients_cut: u64,
    pub(crate) clients_resubscribed: u64,
    /// Clients that resubscribed within `targets.max_edge_kill_resubscribe_secs` of the SIGKILL (when set).
    pub(crate) clients_within_target: Option<u64>,
    pub(crate) resubscribe: Percentiles,
    pub(crate) first_delivery_after_kill: Percentiles,
    /// Missing deliveries, by cause: loss on live edges (the same as `delivery.lost`), the killed edges'
    /// clients' reconnect gaps, and publishes the killed edges died holding.
    pub(crate) lost_on_live_edges: u64,
    pub(crate) reconnect_gap: u64,
    pub(crate) in_flight_at_kill: u64,
    /// Of those, publishes handed to the stream before the SIGKILL (the edge or its socket held them).
    pub(crate) in_flight_before_kill: u64,
    /// Subscriber connections that closed with no kill to explain it (they reconnected; their gaps are loss).
    pub(crate) unexplained_reconnects: u64,
    pub(crate) publisher_switches: usize,
    pub(crate) notes: Vec<String>,
}

/// Everything else the figures are made from.
pub(crate) struct Inputs<'a> {
    pub(crate) spec: &'a FailoverSpec,
    pub(crate) resubscribes: &'a [Resubscribe],
    pub(crate) switched: &'a [usize],
    pub(crate) missing: Missing,
    pub(crate) lost: u64,
    pub(crate) unexplained_reconnects: u64,
    pub(crate) resubscribe_target_secs: Option<f64>,
}

/// Puts the controller's rounds and the workers' resubscribes together.
pub(crate) fn figures(outcome: Outcome, inputs: Inputs<'_>) -> FailoverFigures {
    let mut writes: Vec<f64> = outcome
        .leader_rounds
        .iter()
        .filter_map(|r| r.write_after_secs)
        .collect();
    writes.sort_by(f64::total_cmp);
    let per_kill = |kill: Option<usize>| {
        let mut ack = Latency::default();
        let mut first = Latency::default();
        let (mut clients, mut resubscribed, mut within) = (0, 0, 0);
        for r in inputs
            .resubscribes
            .iter()
            .filter(|r| kill.is_none_or(|k| r.kill == k))
        {
            clients += 1;
            if let Some(us) = r.acked_after_us {
                resubscribed += 1;
                ack.record_us(us);
                if inputs
                    .resubscribe_target_secs
                    .is_some_and(|limit| us as f64 / 1e6 <= limit)
                {
                    within += 1;
                }
            }
            if let Some(us) = r.first_delivery_after_us {
                first.record_us(us);
            }
        }
        (
            clients,
            resubscribed,
            within,
            ack.percentiles(),
            first.percentiles(),
        )
    };
    let edge_kills = outcome
        .edge_rounds
        .iter()
        .enumerate()
        .map(|(k, round)| {
            let (clients, resubscribed, _, resubscribe, first_delivery) = per_kill(Some(k));
            EdgeKillFigures {
                round: round.clone(),
                clients,
                resubscribed,
                resubscribe,
                first_delivery,
                publishers_switched: inputs.switched.get(k).copied().unwrap_or(0),
            }
        })
        .collect();
    let (clients_cut, clients_resubscribed, within, resubscribe, first_delivery_after_kill) =
        per_kill(None);
    let mut notes = outcome.notes;
    for r in &outcome.leader_rounds {
        if let Some(e) = &r.error {
            notes.push(format!(
                "leader kill at {:.1} s (node {}): {e}",
                r.at_secs, r.leader
            ));
        }
    }
    for r in &outcome.edge_rounds {
        if let Some(e) = &r.error {
            notes.push(format!("edge kill at {:.1} s ({}): {e}", r.at_secs, r.name));
        }
    }
    FailoverFigures {
        leader_kills_planned: inputs.spec.leader_kills,
        edge_kills_planned: inputs.spec.edge_kills,
        skipped_kills: outcome.skipped,
        write_after_kill_p50_secs: writes.get(writes.len().saturating_sub(1) / 2).copied(),
        write_after_kill_max_secs: writes.last().copied(),
        rounds_without_write: outcome.leader_rounds.len() - writes.len(),
        leader_rounds: outcome.leader_rounds,
        edge_kills,
        clients_cut,
        clients_resubscribed,
        clients_within_target: inputs.resubscribe_target_secs.map(|_| within),
        resubscribe,
        first_delivery_after_kill,
        lost_on_live_edges: inputs.lost,
        reconnect_gap: inputs.missing.reconnect_gap,
        in_flight_at_kill: inputs.missing.in_flight,
        in_flight_before_kill: inputs.missing.in_flight_before_kill,
        unexplained_reconnects: inputs.unexplained_reconnects,
        publisher_switches: inputs.switched.iter().sum(),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge_round(node: usize, killed_s: u64, restarted_s: u64, kill_seqs: Vec<u64>) -> EdgeRound {
        EdgeRound {
            node,
            name: format!("edge-{node}"),
            killed_ns: killed_s * 1_000_000_000,
            restarted_ns: restarted_s * 1_000_000_000,
            kill_seqs,
            ..EdgeRound::default()
        }
    }

    #[test]
    fn broken_publisher_streams_are_matched_to_the_kill_of_their_edge() {
        let rounds = vec![
            edge_round(0, 10, 11, vec![50, 70, 90]),
            edge_round(1, 20, 21, vec![100, 140, 180]),
        ];
        let seg = |publisher, node, ended_s: u64, rooms| PublisherSegment {
            publisher,
            node,
            ended_ns: ended_s * 1_000_000_000,
            error: "the PublishStream call ended early".into(),
            rooms,
        };
        let (killed, switched, unexplained) = killed_segments(
            &[
                // Publisher 0 (rooms 0 and 2) was on edge 0 when it was killed.
                seg(0, 0, 10, vec![(0, 0, 52), (2, 0, 91)]),
                // Publisher 1 (room 1) moved to edge 1, which was killed later; its stream there began at 75.
                seg(1, 1, 20, vec![(1, 75, 141)]),
                // A stream that broke on edge 1 long before anyone killed it.
                seg(1, 1, 5, vec![(1, 0, 30)]),
            ],
            &rounds,
        );
        assert_eq!(
            killed,
            vec![
                KilledSegment {
                    room: 0,
                    start: 0,
                    kill: 50,
                    end: 52
                },
                KilledSegment {
                    room: 2,
                    start: 0,
                    kill: 90,
                    end: 91
                },
                KilledSegment {
                    room: 1,
                    start: 75,
                    kill: 140,
                    end: 141
                },
            ]
        );
        assert_eq!(switched, vec![1, 1]);
        assert_eq!(unexplained.len(), 1);
        assert!(unexplained[0].contains("publisher 1"), "{unexplained:?}");
    }

    #[test]
    fn figures_per_kill_and_overall() {
        let outcome = Outcome {
            leader_rounds: vec![
                LeaderRound {
                    write_after_secs: Some(0.9),
                    ..LeaderRound::default()
                },
                LeaderRound {
                    write_after_secs: Some(2.5),
                    ..LeaderRound::default()
                },
                LeaderRound {
                    write_after_secs: None,
                    error: Some("no registry write committed within 30 s".into()),
                    ..LeaderRound::default()
                },
            ],
            edge_rounds: vec![edge_round(0, 10, 11, vec![]), edge_round(1, 20, 21, vec![])],
            skipped: 0,
            notes: Vec::new(),
        };
        let r = |kill, acked_ms: Option<u64>| Resubscribe {
            kill,
            acked_after_us: acked_ms.map(|ms| ms * 1000),
            first_delivery_after_us: acked_ms.map(|ms| ms * 1000 + 5_000),
        };
        let resubscribes = [
            r(0, Some(200)),
            r(0, Some(400)),
            r(1, Some(3_500)),
            r(1, None),
        ];
        let spec = FailoverSpec {
            leader_kills: 3,
            edge_kills: 2,
            ..FailoverSpec::default()
        };
        let f = figures(
            outcome,
            Inputs {
                spec: &spec,
                resubscribes: &resubscribes,
                switched: &[2, 0],
                missing: Missing {
                    lost: 0,
                    reconnect_gap: 40,
                    in_flight: 3,
                    in_flight_before_kill: 1,
                },
                lost: 0,
                unexplained_reconnects: 0,
                resubscribe_target_secs: Some(3.0),
            },
        );
        assert_eq!(f.write_after_kill_p50_secs, Some(0.9));
        assert_eq!(f.write_after_kill_max_secs, Some(2.5));
        assert_eq!(f.rounds_without_write, 1);
        assert_eq!(f.notes.len(), 1);
        assert_eq!((f.clients_cut, f.clients_resubscribed), (4, 3));
        assert_eq!(f.clients_within_target, Some(2));
        assert_eq!(f.edge_kills[0].clients, 2);
        assert_eq!(f.edge_kills[0].publishers_switched, 2);
        assert_eq!(f.edge_kills[1].resubscribed, 1);
        assert!((f.edge_kills[1].resubscribe.max_ms - 3_500.0).abs() < 5.0);
        assert_eq!(f.publisher_switches, 2);
        assert_eq!((f.reconnect_gap, f.in_flight_at_kill), (40, 3));
    }
}
