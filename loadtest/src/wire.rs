//! What the coordinator and its worker processes say to each other: one JSON object per line, the coordinator
//! on the worker's stdin, the worker on its stdout (its stderr is the coordinator's, for diagnostics).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::scenario::Scenario;
use crate::stats::{KilledSegment, Missing, WireHistogram};

/// Which kind of server the subscribers speak to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TargetKind {
    /// herald's High-templar WebSocket protocol.
    Herald,
    /// NATS server over its WebSocket listener.
    Nats,
    /// Sockudo (Pusher protocol).
    Sockudo,
}

impl TargetKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TargetKind::Herald => "herald",
            TargetKind::Nats => "nats",
            TargetKind::Sockudo => "sockudo",
        }
    }
}

/// The coordinator's first line to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) scenario: Scenario,
    pub(crate) target: TargetKind,
    /// The worker's index; it holds `scenario.worker_range(worker)`.
    pub(crate) worker: usize,
    /// WebSocket address of each node, by node index.
    pub(crate) nodes: Vec<SocketAddr>,
    /// Driver-specific connection settings (e.g. an app key), opaque to the worker loop.
    #[serde(default)]
    pub(crate) driver_options: serde_json::Value,
    /// The source address this worker binds before connecting (127.0.0.2, 127.0.0.3, …) so each worker has its
    /// own ~28,000 ephemeral ports per destination.
    pub(crate) source: IpAddr,
    /// CLOCK_MONOTONIC ns at which connection 0 is due; the ramp schedule counts from here.
    pub(crate) start_ns: u64,
}

/// Coordinator to worker, after the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Command {
    /// Publishing starts at `start_ns`; record latencies from `record_from_ns` (after warm-up).
    Publishing { start_ns: u64, record_from_ns: u64 },
    /// Publishing and draining are over: report. `sent[r]` is how many publishes room `r` received from its
    /// publisher, so the worker can count loss per (room, publisher). `failover`: what the kills were, so the
    /// worker can tell their expected cost from loss.
    Stop {
        sent: Vec<u64>,
        #[serde(default)]
        failover: Option<FailoverFacts>,
    },
}

/// What a failover run's kills did, as the workers need it for their accounting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FailoverFacts {
    /// Every edge kill, in order (`Resubscribe::kill` indexes this).
    pub(crate) edge_kills: Vec<EdgeKillFact>,
    /// Publisher streams cut by an edge kill, per room.
    pub(crate) segments: Vec<KilledSegment>,
    /// CLOCK_MONOTONIC ns of the end of the publishing schedule.
    pub(crate) publish_end_ns: u64,
}

/// One edge kill.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct EdgeKillFact {
    /// The node index.
    pub(crate) node: usize,
    /// CLOCK_MONOTONIC ns of the SIGKILL.
    pub(crate) killed_ns: u64,
    /// When its replacement was up (its listening line), or when the harness gave up restarting it.
    pub(crate) restarted_ns: u64,
}

impl FailoverFacts {
    /// The edge kill that explains a connection to `node` closing at `closed_ns`: the node was dead then (from
    /// its SIGKILL until its replacement was up, plus a second for the close to be read).
    pub(crate) fn kill_for_close(&self, node: usize, closed_ns: u64) -> Option<usize> {
        self.edge_kills.iter().rposition(|k| {
            k.node == node
                && k.killed_ns <= closed_ns
                && closed_ns <= k.restarted_ns + 1_000_000_000
        })
    }
}

/// One subscriber of a killed edge, after that kill.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Resubscribe {
    /// Index into [`FailoverFacts::edge_kills`].
    pub(crate) kill: usize,
    /// From the SIGKILL to the subscribe acknowledgement on the new connection (µs); `None`: never resubscribed.
    pub(crate) acked_after_us: Option<u64>,
    /// From the SIGKILL to the first delivery on the new connection (µs).
    pub(crate) first_delivery_after_us: Option<u64>,
}

/// Worker to coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Event {
    /// Every connection of the worker has either subscribed or failed.
    Connected(ConnectReport),
    /// Once a second while publishing: deliveries and latencies in the last interval.
    Tick(Tick),
    /// The final figures, after `Stop`.
    Final(FinalReport),
    /// The worker cannot go on.
    Fatal(String),
}

/// How the connect phase went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectReport {
    pub(crate) subscribed: u64,
    pub(crate) failed: u64,
    /// First few distinct failure reasons.
    pub(crate) errors: Vec<String>,
    /// From the scheduled start to the authorized first frame (µs).
    pub(crate) connect: WireHistogram,
    /// From the scheduled start to the subscribe acknowledgement (µs).
    pub(crate) to_ack: WireHistogram,
    /// CLOCK_MONOTONIC ns of the last acknowledgement.
    pub(crate) last_ack_ns: u64,
}

/// One interval's deliveries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Tick {
    /// The second of publishing this tick closes (1 for the first), by the tick's schedule rather than when it
    /// ran, so a busy worker's late tick still counts in its own second; 0 before publishing.
    #[serde(default)]
    pub(crate) second: u64,
    pub(crate) delivered: u64,
    pub(crate) latency: WireHistogram,
}

/// Everything a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FinalReport {
    /// Deliveries to stable (non-slow) subscribers, including duplicates.
    pub(crate) delivered: u64,
    /// Deliveries to slow consumers and churn connections (not part of loss accounting).
    pub(crate) delivered_other: u64,
    /// Expected deliveries to stable subscribers that never arrived (in a failover run: not explained by a kill,
    /// see `failover_missing`).
    pub(crate) lost: u64,
    /// (room, publisher) streams of stable subscribers with at least one loss.
    pub(crate) streams_with_loss: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    /// Stable subscribers whose connection ended during the run.
    pub(crate) disconnected: u64,
    /// Close codes seen, as (code, count).
    pub(crate) close_codes: Vec<(u16, u64)>,
    /// Frames without a readable header (protocol noise or corruption).
    pub(crate) unparsed: u64,
    pub(crate) same_node: WireHistogram,
    pub(crate) cross_node: WireHistogram,
    pub(crate) churn_connected: u64,
    pub(crate) churn_failed: u64,
    pub(crate) churn_to_ack: WireHistogram,
    /// CLOCK_MONOTONIC ns of the last delivery to a stable subscriber.
    pub(crate) last_delivery_ns: u64,
    /// The worker's own CPU seconds (user + system).
    pub(crate) cpu_secs: f64,
    /// Failover: missing deliveries explained by kills (`lost` is 0 there; it stays in `lost` above).
    #[serde(default)]
    pub(crate) failover_missing: Missing,
    /// Failover: every subscriber connection an edge kill cut, and how it came back.
    #[serde(default)]
    pub(crate) resubscribes: Vec<Resubscribe>,
    /// Failover: reconnects after a close that no kill explains.
    #[serde(default)]
    pub(crate) unexplained_reconnects: u64,
}
