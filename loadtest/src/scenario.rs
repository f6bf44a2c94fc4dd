//! Scenario files: what a run does, in TOML, and the deterministic plan every process derives from it.
//!
//! The coordinator and every worker parse the same scenario and compute the same assignment (which node, room,
//! wildcard and slow flag each connection has; which rooms each publisher owns) from the connection index alone,
//! so the coordinator never ships per-connection lists to workers and the loss arithmetic at the end agrees with
//! what the workers did.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A whole scenario file. Unknown keys anywhere are errors, so a typo never silently runs the default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    /// Short name, used in result paths and report titles.
    pub(crate) name: String,
    /// What the scenario measures, printed in the report.
    #[serde(default)]
    pub(crate) description: String,
    /// Seconds of publishing (or of holding idle connections when nothing publishes).
    pub(crate) duration_secs: f64,
    /// Seconds at the start of publishing whose latencies are not recorded (loss still counts).
    #[serde(default)]
    pub(crate) warmup_secs: f64,
    /// The longest wait for in-flight deliveries after the last publish.
    #[serde(default = "default_drain")]
    pub(crate) drain_secs: f64,
    /// The server side: how many edge nodes the harness starts, or expects when attaching.
    #[serde(default)]
    pub(crate) cluster: ClusterSpec,
    pub(crate) clients: ClientSpec,
    #[serde(default)]
    pub(crate) publish: PublishSpec,
    #[serde(default)]
    pub(crate) churn: ChurnSpec,
    #[serde(default)]
    pub(crate) slow_consumers: SlowSpec,
    /// Scenario 6: registry leader and edge kills while publishing (herald only; see [`FailoverSpec`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) failover: Option<FailoverSpec>,
    #[serde(default)]
    pub(crate) pass: PassSpec,
    /// Performance targets. Missing one does not fail the run (correctness does, see [`PassSpec`]); the report
    /// lists each target as met, MISSED or not measured.
    #[serde(default)]
    pub(crate) targets: TargetSpec,
}

fn default_drain() -> f64 {
    5.0
}

/// The cluster a self-started run uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterSpec {
    /// Edge nodes. One node runs `herald dev`; more run `registries` registry members and `nodes` edges.
    pub(crate) nodes: usize,
    /// Registry members when `nodes` > 1.
    #[serde(default = "default_registries")]
    pub(crate) registries: usize,
}

fn default_registries() -> usize {
    3
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 1,
            registries: default_registries(),
        }
    }
}

/// The stable subscribers: each connection subscribes to one room and stays for the whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientSpec {
    /// Subscriber connections. Must be a multiple of `rooms`: `connections / rooms` members per room.
    pub(crate) connections: usize,
    /// Rooms; connection `i` subscribes to room `i % rooms`.
    pub(crate) rooms: usize,
    /// Share (0..=1) of connections that subscribe with a wildcard pattern matching exactly their room
    /// (`{"lt":"7","shard":"*"}` where publishes go to `{"lt":"7","shard":"0"}`), so wildcards exercise the
    /// server's wildcard matching without changing how many deliveries a publish makes.
    #[serde(default)]
    pub(crate) wildcard_share: f64,
    /// Seconds over which connections are opened at a steady rate (0: all at once).
    #[serde(default)]
    pub(crate) ramp_up_secs: f64,
    /// Node indexes subscribers connect to, round-robin over each room's members. Empty: every node.
    #[serde(default)]
    pub(crate) nodes: Vec<usize>,
    /// Worker processes holding the connections (default: enough for 10,000 connections each, at least 2 when
    /// there are 2,000 or more, so the delivery parsing uses both cores).
    #[serde(default)]
    pub(crate) workers: Option<usize>,
}

/// The publishers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishSpec {
    /// Publisher connections (gRPC streams or HTTP connections); publisher `p` owns rooms `r % publishers == p`.
    #[serde(default = "one")]
    pub(crate) publishers: usize,
    /// Publishes per second over all publishers (0: no publishing, e.g. idle memory).
    #[serde(default)]
    pub(crate) rate: f64,
    /// Bytes of each publish's `data` JSON (a string carrying the header, padded).
    #[serde(default = "default_payload")]
    pub(crate) payload_bytes: usize,
    /// How publishes reach the server.
    #[serde(default)]
    pub(crate) api: PublishApi,
    /// Node indexes publishers use, round-robin. Empty: every node.
    #[serde(default)]
    pub(crate) nodes: Vec<usize>,
}

fn one() -> usize {
    1
}

fn default_payload() -> usize {
    64
}

impl Default for PublishSpec {
    fn default() -> Self {
        PublishSpec {
            publishers: 1,
            rate: 0.0,
            payload_bytes: default_payload(),
            api: PublishApi::default(),
            nodes: Vec::new(),
        }
    }
}

/// The publish API (herald: gRPC `PublishStream`, HTTP `POST /api/v1/publish`, or Redis through its bridge;
/// peers use their own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PublishApi {
    /// One client-streaming `PublishStream` per publisher: truly open loop.
    #[default]
    Grpc,
    /// One HTTP/1.1 connection per publisher awaiting each answer (the order guarantee needs that).
    Http,
    /// `PUBLISH` to a private redis-server that herald's Redis bridge carries into the rooms (herald only; the
    /// harness starts both: see bridge.rs).
    Redis,
}

/// Connection churn while publishing: short-lived clients that connect, subscribe, stay and leave.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChurnSpec {
    /// New churn connections per second (0: none).
    #[serde(default)]
    pub(crate) per_second: f64,
    /// How long each churn connection stays subscribed.
    #[serde(default)]
    pub(crate) hold_ms: u64,
}

/// Slow consumers: subscribers that stop reading their socket while publishing goes on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SlowSpec {
    /// Share (0..=1) of subscriber connections that stop reading.
    #[serde(default)]
    pub(crate) share: f64,
    /// Seconds after publishing starts at which they stop.
    #[serde(default)]
    pub(crate) stop_after_secs: f64,
}

/// Failover under load (issue 4's scenario 6): while publishing goes on, the coordinator SIGKILLs the registry's
/// leader `leader_kills` times (restarting it from its data directory, same node id and port, and waiting for it
/// to rejoin before the next kill) and an edge `edge_kills` times (round-robin over the edges; it is restarted on
/// its ports at once, while its subscribers and publishers move to another edge).
///
/// Kills are `kill_interval_secs` apart from `first_kill_after_secs` into publishing (a kill waits for the
/// previous one's round to finish), edge kills spread evenly among the leader kills, and publishing goes on for
/// at least `settle_secs` after the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailoverSpec {
    /// Registry leader kills.
    #[serde(default)]
    pub(crate) leader_kills: usize,
    /// Edge kills.
    #[serde(default)]
    pub(crate) edge_kills: usize,
    /// Seconds between one kill and the next.
    #[serde(default = "default_kill_interval")]
    pub(crate) kill_interval_secs: f64,
    /// Seconds of publishing before the first kill.
    #[serde(default = "default_first_kill")]
    pub(crate) first_kill_after_secs: f64,
    /// Seconds of publishing after the last kill, so the last round's clients are back and receiving.
    #[serde(default = "default_settle")]
    pub(crate) settle_secs: f64,
}

fn default_kill_interval() -> f64 {
    3.0
}

fn default_first_kill() -> f64 {
    5.0
}

fn default_settle() -> f64 {
    5.0
}

impl Default for FailoverSpec {
    fn default() -> Self {
        FailoverSpec {
            leader_kills: 0,
            edge_kills: 0,
            kill_interval_secs: default_kill_interval(),
            first_kill_after_secs: default_first_kill(),
            settle_secs: default_settle(),
        }
    }
}

/// One planned kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum KillKind {
    /// The registry member that leads when the kill comes.
    RegistryLeader,
    /// An edge (which one: round-robin over the edges).
    Edge,
}

impl FailoverSpec {
    /// Every kill in order, as (seconds after publishing starts, kind). Edge kills are spread evenly among the
    /// leader kills (Bresenham-style), so neither kind is bunched at one end of the run.
    pub(crate) fn schedule(&self) -> Vec<(f64, KillKind)> {
        let total = self.leader_kills + self.edge_kills;
        (0..total)
            .map(|i| {
                let at = self.first_kill_after_secs + i as f64 * self.kill_interval_secs;
                // Kill i is an edge kill when the running share of edge kills steps up at i.
                let edge = (i + 1) * self.edge_kills / total > i * self.edge_kills / total;
                (
                    at,
                    if edge {
                        KillKind::Edge
                    } else {
                        KillKind::RegistryLeader
                    },
                )
            })
            .collect()
    }

    /// The shortest `duration_secs` that fits every kill and the settling time after the last.
    pub(crate) fn min_duration_secs(&self) -> f64 {
        let kills = self.leader_kills + self.edge_kills;
        self.first_kill_after_secs
            + kills.saturating_sub(1) as f64 * self.kill_interval_secs
            + self.settle_secs
    }
}

/// When a run counts as failed (exit status 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PassSpec {
    /// Largest tolerated share of expected deliveries to stable subscribers that never arrived.
    #[serde(default)]
    pub(crate) max_loss: f64,
    /// Fail on any duplicate or reordered delivery.
    #[serde(default = "yes")]
    pub(crate) exact_order: bool,
    /// Largest tolerated share of stable connections that failed to connect or subscribe.
    #[serde(default)]
    pub(crate) max_connect_failures: f64,
}

fn yes() -> bool {
    true
}

impl Default for PassSpec {
    fn default() -> Self {
        PassSpec {
            max_loss: 0.0,
            exact_order: true,
            max_connect_failures: 0.0,
        }
    }
}

/// Performance targets, each optional. Every one names a figure the harness measures; "max" targets are met
/// when the measured figure is at most the limit, "min" targets when it is at least the limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetSpec {
    /// Deliveries per second to stable subscribers, first publish to last delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) min_deliveries_per_sec: Option<f64>,
    /// End-to-end latency percentiles (ms): over all deliveries, and separately over same-node and cross-node
    /// deliveries when the run has both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_p999_ms: Option<f64>,
    /// Server RSS added per subscribed connection (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_rss_per_connection_bytes: Option<f64>,
    /// Acknowledged subscribes per second of the stable connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) min_subscribes_per_sec: Option<f64>,
    /// p99 from scheduled connect to subscribe acknowledgement (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_subscribe_ack_p99_ms: Option<f64>,
    /// Seconds from the slow consumers' stop until the server had disconnected every one of them (measured for
    /// herald only, to within the 1 s sampling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_slow_consumer_disconnect_secs: Option<f64>,
    /// Failover: seconds from a registry leader's SIGKILL until a registry write committed, in the worst round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_registry_write_after_leader_kill_secs: Option<f64>,
    /// Failover: seconds from an edge's SIGKILL until one of its clients had resubscribed elsewhere, for the
    /// slowest client of any edge kill (every client must make it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_edge_kill_resubscribe_secs: Option<f64>,
}

impl TargetSpec {
    /// The targets that are set, as (key, limit).
    pub(crate) fn set(&self) -> Vec<(&'static str, f64)> {
        [
            ("min_deliveries_per_sec", self.min_deliveries_per_sec),
            ("max_p50_ms", self.max_p50_ms),
            ("max_p99_ms", self.max_p99_ms),
            ("max_p999_ms", self.max_p999_ms),
            (
                "max_rss_per_connection_bytes",
                self.max_rss_per_connection_bytes,
            ),
            ("min_subscribes_per_sec", self.min_subscribes_per_sec),
            ("max_subscribe_ack_p99_ms", self.max_subscribe_ack_p99_ms),
            (
                "max_slow_consumer_disconnect_secs",
                self.max_slow_consumer_disconnect_secs,
            ),
            (
                "max_registry_write_after_leader_kill_secs",
                self.max_registry_write_after_leader_kill_secs,
            ),
            (
                "max_edge_kill_resubscribe_secs",
                self.max_edge_kill_resubscribe_secs,
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

/// What one subscriber connection does, derived from its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubscriberPlan {
    pub(crate) node: usize,
    pub(crate) room: u32,
    pub(crate) wildcard: bool,
    pub(crate) slow: bool,
}

/// Why a scenario file is unusable.
#[derive(Debug)]
pub(crate) struct ScenarioError(pub(crate) String);

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Reads and validates a scenario file.
    pub(crate) fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError(format!("cannot read {}: {e}", path.display())))?;
        Scenario::parse(&text).map_err(|e| ScenarioError(format!("{}: {e}", path.display())))
    }

    /// Parses and validates scenario text.
    pub(crate) fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub(crate) fn validate(&self) -> Result<(), ScenarioError> {
        let fail = |msg: String| Err(ScenarioError(msg));
        let finite_nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(ScenarioError(format!(
                    "{name} must be a finite number >= 0, got {v}"
                )))
            }
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return fail(format!(
                "name must be non-empty letters, digits, '-' or '_' (it names result files), got {:?}",
                self.name
            ));
        }
        finite_nonneg("duration_secs", self.duration_secs)?;
        finite_nonneg("warmup_secs", self.warmup_secs)?;
        finite_nonneg("drain_secs", self.drain_secs)?;
        finite_nonneg("clients.ramp_up_secs", self.clients.ramp_up_secs)?;
        finite_nonneg("publish.rate", self.publish.rate)?;
        finite_nonneg("churn.per_second", self.churn.per_second)?;
        finite_nonneg(
            "slow_consumers.stop_after_secs",
            self.slow_consumers.stop_after_secs,
        )?;
        for (name, share) in [
            ("clients.wildcard_share", self.clients.wildcard_share),
            ("slow_consumers.share", self.slow_consumers.share),
            ("pass.max_loss", self.pass.max_loss),
            ("pass.max_connect_failures", self.pass.max_connect_failures),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return fail(format!("{name} is a share between 0 and 1, got {share}"));
            }
        }
        if self.duration_secs <= 0.0 {
            return fail("duration_secs must be above 0".into());
        }
        if self.duration_secs > 3600.0 {
            return fail("duration_secs is at most 3600: every run is bounded in time".into());
        }
        if self.warmup_secs >= self.duration_secs && self.publish.rate > 0.0 {
            return fail("warmup_secs must be shorter than duration_secs".into());
        }
        if self.cluster.nodes == 0 || self.cluster.nodes > 16 {
            return fail(format!(
                "cluster.nodes must be 1..=16, got {}",
                self.cluster.nodes
            ));
        }
        if self.cluster.nodes > 1 && !(1..=7).contains(&self.cluster.registries) {
            return fail("cluster.registries must be 1..=7".into());
        }
        let c = &self.clients;
        if c.rooms == 0 {
            return fail("clients.rooms must be at least 1".into());
        }
        if c.connections == 0 || !c.connections.is_multiple_of(c.rooms) {
            return fail(format!(
                "clients.connections ({}) must be a positive multiple of clients.rooms ({})",
                c.connections, c.rooms
            ));
        }
        if c.connections > 200_000 {
            return fail("clients.connections is at most 200,000".into());
        }
        if c.workers == Some(0) {
            return fail("clients.workers must be at least 1".into());
        }
        if let Some(w) = c.workers {
            if c.connections.div_ceil(w) > MAX_CONNECTIONS_PER_WORKER {
                return fail(format!(
                    "{w} workers would hold more than {MAX_CONNECTIONS_PER_WORKER} connections each \
                     (one process may hold 20,000 files here)"
                ));
            }
        }
        for (name, nodes) in [
            ("clients.nodes", &c.nodes),
            ("publish.nodes", &self.publish.nodes),
        ] {
            if let Some(bad) = nodes.iter().find(|&&n| n >= self.cluster.nodes) {
                return fail(format!(
                    "{name} names node {bad} but cluster.nodes is {}",
                    self.cluster.nodes
                ));
            }
        }
        let p = &self.publish;
        if p.rate > 0.0 {
            if p.publishers == 0 || p.publishers > c.rooms {
                return fail(format!(
                    "publish.publishers must be 1..=clients.rooms ({}), so each room has one publisher",
                    c.rooms
                ));
            }
            if p.payload_bytes > 1 << 20 {
                return fail("publish.payload_bytes is at most 1 MiB".into());
            }
        }
        if self.churn.per_second > 0.0 && self.churn.hold_ms == 0 {
            return fail("churn.hold_ms must be above 0 when churn.per_second is set".into());
        }
        if let Some(f) = &self.failover {
            self.validate_failover(f)?;
        }
        self.validate_targets()
    }

    fn validate_failover(&self, f: &FailoverSpec) -> Result<(), ScenarioError> {
        let fail = |msg: String| Err(ScenarioError(msg));
        for (name, v) in [
            ("failover.kill_interval_secs", f.kill_interval_secs),
            ("failover.first_kill_after_secs", f.first_kill_after_secs),
            ("failover.settle_secs", f.settle_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return fail(format!("{name} must be a finite number above 0, got {v}"));
            }
        }
        if f.leader_kills + f.edge_kills == 0 {
            return fail("failover needs leader_kills or edge_kills above 0".into());
        }
        if f.leader_kills + f.edge_kills > 1000 {
            return fail("failover kills are at most 1000 in all".into());
        }
        if self.cluster.nodes < 2 {
            return fail(
                "failover needs a cluster (cluster.nodes of 2 or more): `herald dev` has no registry members \
                 or other edges to fail over to"
                    .into(),
            );
        }
        if f.leader_kills > 0 && self.cluster.registries < 3 {
            return fail(format!(
                "failover.leader_kills needs cluster.registries of 3 or more (a majority must survive a kill), \
                 got {}",
                self.cluster.registries
            ));
        }
        if self.publish.rate <= 0.0 {
            return fail(
                "failover needs publishing (publish.rate above 0): loss is what it checks".into(),
            );
        }
        if self.publish.api != PublishApi::Grpc {
            return fail(
                "failover publishes over gRPC only (publish.api = \"grpc\"): an HTTP publish cut by a kill \
                 could be resent and delivered twice"
                    .into(),
            );
        }
        if self.slow_consumers.share > 0.0 || self.churn.per_second > 0.0 {
            return fail("failover does not combine with slow_consumers or churn".into());
        }
        if !self.clients.nodes.is_empty() || !self.publish.nodes.is_empty() {
            return fail(
                "failover uses every node for clients and publishers (clients.nodes and publish.nodes unset)"
                    .into(),
            );
        }
        if f.first_kill_after_secs < self.warmup_secs {
            return fail(format!(
                "failover.first_kill_after_secs ({}) must not fall in the warm-up ({} s)",
                f.first_kill_after_secs, self.warmup_secs
            ));
        }
        let needed = f.min_duration_secs();
        if self.duration_secs + 1e-9 < needed {
            return fail(format!(
                "duration_secs ({}) is too short for the failover schedule: first kill at {} s, {} kills {} s \
                 apart and {} s of settling need {needed} s",
                self.duration_secs,
                f.first_kill_after_secs,
                f.leader_kills + f.edge_kills,
                f.kill_interval_secs,
                f.settle_secs
            ));
        }
        Ok(())
    }

    fn validate_targets(&self) -> Result<(), ScenarioError> {
        let t = &self.targets;
        for (key, limit) in t.set() {
            if !(limit.is_finite() && limit > 0.0) {
                return Err(ScenarioError(format!(
                    "targets.{key} must be a finite number above 0, got {limit}"
                )));
            }
        }
        let needs_publishing = [
            ("min_deliveries_per_sec", t.min_deliveries_per_sec),
            ("max_p50_ms", t.max_p50_ms),
            ("max_p99_ms", t.max_p99_ms),
            ("max_p999_ms", t.max_p999_ms),
            (
                "max_slow_consumer_disconnect_secs",
                t.max_slow_consumer_disconnect_secs,
            ),
        ];
        if self.publish.rate == 0.0 {
            if let Some((key, _)) = needs_publishing.iter().find(|(_, v)| v.is_some()) {
                return Err(ScenarioError(format!(
                    "targets.{key} needs publishing, but publish.rate is 0"
                )));
            }
        }
        let kills = |pick: fn(&FailoverSpec) -> usize| self.failover.as_ref().map_or(0, pick);
        for (key, set, needed, what) in [
            (
                "max_registry_write_after_leader_kill_secs",
                t.max_registry_write_after_leader_kill_secs.is_some(),
                kills(|f| f.leader_kills),
                "failover.leader_kills",
            ),
            (
                "max_edge_kill_resubscribe_secs",
                t.max_edge_kill_resubscribe_secs.is_some(),
                kills(|f| f.edge_kills),
                "failover.edge_kills",
            ),
        ] {
            if set && needed == 0 {
                return Err(ScenarioError(format!("targets.{key} needs {what} above 0")));
            }
        }
        if t.max_slow_consumer_disconnect_secs.is_some() && self.slow_consumers.share == 0.0 {
            return Err(ScenarioError(
                "targets.max_slow_consumer_disconnect_secs needs slow_consumers.share above 0"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Stable subscriber connections.
    pub(crate) fn connections(&self) -> usize {
        self.clients.connections
    }

    /// Members of each room.
    pub(crate) fn members_per_room(&self) -> usize {
        self.clients.connections / self.clients.rooms
    }

    /// Worker processes for the subscribers.
    pub(crate) fn workers(&self) -> usize {
        self.clients.workers.unwrap_or_else(|| {
            let by_fds = self.connections().div_ceil(MAX_CONNECTIONS_PER_WORKER);
            let by_cpu = if self.connections() >= 2_000 { 2 } else { 1 };
            by_fds.max(by_cpu)
        })
    }

    /// The connection index range worker `w` holds.
    pub(crate) fn worker_range(&self, w: usize) -> std::ops::Range<usize> {
        let n = self.connections();
        let per = n.div_ceil(self.workers());
        (w * per).min(n)..((w + 1) * per).min(n)
    }

    fn client_nodes(&self) -> Vec<usize> {
        nodes_or_all(&self.clients.nodes, self.cluster.nodes)
    }

    /// Where and how connection `i` subscribes. Members of a room are spread over the client nodes, so every
    /// room has subscribers on every node (same-edge and cross-edge deliveries for each publish).
    pub(crate) fn subscriber(&self, i: usize) -> SubscriberPlan {
        let nodes = self.client_nodes();
        let rooms = self.clients.rooms;
        let member = i / rooms;
        SubscriberPlan {
            node: nodes[member % nodes.len()],
            room: (i % rooms) as u32,
            wildcard: spread(i as u64, 0x9e37_79b9) < self.clients.wildcard_share,
            slow: spread(i as u64, 0x85eb_ca6b) < self.slow_consumers.share,
        }
    }

    /// The node publisher `p` publishes through.
    pub(crate) fn publisher_node(&self, p: usize) -> usize {
        let nodes = nodes_or_all(&self.publish.nodes, self.cluster.nodes);
        nodes[p % nodes.len()]
    }

    /// The rooms publisher `p` owns (exactly one publisher per room, so per-(room, publisher) order is defined).
    pub(crate) fn publisher_rooms(&self, p: usize) -> Vec<u32> {
        (0..self.clients.rooms as u32)
            .filter(|r| *r as usize % self.publish.publishers == p)
            .collect()
    }

    /// The publisher that owns room `r`.
    pub(crate) fn room_publisher(&self, r: u32) -> usize {
        r as usize % self.publish.publishers.max(1)
    }
}

/// One process may hold 20,000 files here; leave room for the runtime's own.
pub(crate) const MAX_CONNECTIONS_PER_WORKER: usize = 19_500;

fn nodes_or_all(nodes: &[usize], count: usize) -> Vec<usize> {
    if nodes.is_empty() {
        (0..count).collect()
    } else {
        nodes.to_vec()
    }
}

/// A deterministic value in [0, 1) for index `i`, well spread so a 1% share picks every ~100th connection in a
/// scattered pattern rather than the first 1% (which would all share a node and a room).
fn spread(i: u64, salt: u64) -> f64 {
    let mut x = i.wrapping_add(salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        duration_secs = 2
        [clients]
        connections = 12
        rooms = 3
        [publish]
        rate = 10
    "#;

    #[test]
    fn parses_minimal_with_defaults() {
        let s = Scenario::parse(MINIMAL).unwrap();
        assert_eq!(s.members_per_room(), 4);
        assert_eq!(s.publish.payload_bytes, 64);
        assert_eq!(s.publish.api, PublishApi::Grpc);
        assert_eq!(s.workers(), 1);
        assert_eq!(s.worker_range(0), 0..12);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let text = MINIMAL.replace("rooms = 3", "rooms = 3\nmembers = 4");
        let err = Scenario::parse(&text).unwrap_err().to_string();
        assert!(err.contains("members"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (from, to, needle) in [
            ("connections = 12", "connections = 13", "multiple"),
            ("rate = 10", "rate = -1", "publish.rate"),
            ("name = \"t\"", "name = \"a/b\"", "name"),
            ("duration_secs = 2", "duration_secs = 99999", "bounded"),
        ] {
            let err = Scenario::parse(&MINIMAL.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }

    #[test]
    fn targets_parse_and_default_to_none() {
        assert_eq!(
            Scenario::parse(MINIMAL).unwrap().targets,
            TargetSpec::default()
        );
        let text =
            format!("{MINIMAL}\n[targets]\nmin_deliveries_per_sec = 500000\nmax_p99_ms = 25\n");
        let t = Scenario::parse(&text).unwrap().targets;
        assert_eq!(t.min_deliveries_per_sec, Some(500_000.0));
        assert_eq!(t.max_p99_ms, Some(25.0));
        assert_eq!(
            t.set(),
            vec![("min_deliveries_per_sec", 500_000.0), ("max_p99_ms", 25.0)]
        );
    }

    #[test]
    fn unknown_or_bad_targets_are_refused() {
        for (targets, needle) in [
            ("max_p95_ms = 10", "max_p95_ms"),
            ("max_p99_ms = 0", "targets.max_p99_ms"),
            ("max_p99_ms = -5", "targets.max_p99_ms"),
            ("max_p99_ms = nan", "targets.max_p99_ms"),
            (
                "max_slow_consumer_disconnect_secs = 5",
                "slow_consumers.share",
            ),
        ] {
            let text = format!("{MINIMAL}\n[targets]\n{targets}\n");
            let err = Scenario::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{targets}: {err}");
        }
        let idle = MINIMAL.replace("rate = 10", "rate = 0");
        let err = Scenario::parse(&format!("{idle}\n[targets]\nmax_p50_ms = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("publish.rate is 0"), "{err}");
        Scenario::parse(&format!(
            "{idle}\n[targets]\nmax_rss_per_connection_bytes = 8192\n"
        ))
        .unwrap();
    }

    const FAILOVER: &str = r#"
        name = "f"
        duration_secs = 20
        [cluster]
        nodes = 3
        [clients]
        connections = 12
        rooms = 3
        [publish]
        rate = 10
        [failover]
        leader_kills = 3
        edge_kills = 1
    "#;

    #[test]
    fn failover_parses_with_defaults_and_a_spread_schedule() {
        assert_eq!(Scenario::parse(MINIMAL).unwrap().failover, None);
        let f = Scenario::parse(FAILOVER).unwrap().failover.unwrap();
        assert_eq!(
            f,
            FailoverSpec {
                leader_kills: 3,
                edge_kills: 1,
                kill_interval_secs: 3.0,
                first_kill_after_secs: 5.0,
                settle_secs: 5.0,
            }
        );
        use KillKind::{Edge, RegistryLeader as Leader};
        assert_eq!(
            f.schedule(),
            vec![(5.0, Leader), (8.0, Leader), (11.0, Leader), (14.0, Edge)]
        );
        assert_eq!(f.min_duration_secs(), 19.0);
        // 20 leader kills and 3 edge kills: the edge kills fall among them, not bunched at one end.
        let f = FailoverSpec {
            leader_kills: 20,
            edge_kills: 3,
            ..FailoverSpec::default()
        };
        let edges: Vec<usize> = f
            .schedule()
            .iter()
            .enumerate()
            .filter(|(_, (_, kind))| *kind == Edge)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(edges, vec![7, 15, 22]);
        assert_eq!(f.schedule().len(), 23);
    }

    #[test]
    fn failover_misfits_are_explained() {
        for (from, to, needle) in [
            ("nodes = 3", "nodes = 1", "cluster.nodes of 2"),
            ("nodes = 3", "nodes = 3\nregistries = 2", "registries of 3"),
            ("duration_secs = 20", "duration_secs = 18", "too short"),
            ("rate = 10", "rate = 10\napi = \"http\"", "gRPC only"),
            ("leader_kills = 3\n        edge_kills = 1", "", "above 0"),
            (
                "edge_kills = 1",
                "edge_kills = 1\nkill_interval_secs = 0",
                "kill_interval_secs",
            ),
            ("edge_kills = 1", "edge_kills = 1\nrestarts = 2", "restarts"),
            (
                "duration_secs = 20",
                "duration_secs = 20\nwarmup_secs = 6",
                "warm-up",
            ),
        ] {
            assert!(FAILOVER.contains(from), "{from}");
            let err = Scenario::parse(&FAILOVER.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
        // Failover targets need the kills they measure.
        for (targets, needle) in [
            (
                "max_registry_write_after_leader_kill_secs = 2",
                "failover.leader_kills",
            ),
            ("max_edge_kill_resubscribe_secs = 3", "failover.edge_kills"),
        ] {
            let err = Scenario::parse(&format!("{MINIMAL}\n[targets]\n{targets}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{targets}: {err}");
            Scenario::parse(&format!("{FAILOVER}\n[targets]\n{targets}\n")).unwrap();
        }
    }

    #[test]
    fn members_of_a_room_spread_over_nodes() {
        let text = MINIMAL.replace("[clients]", "[cluster]\nnodes = 3\n[clients]");
        let s = Scenario::parse(&text).unwrap();
        let nodes: Vec<usize> = (0..12)
            .filter(|i| s.subscriber(*i).room == 0)
            .map(|i| s.subscriber(i).node)
            .collect();
        assert_eq!(nodes, vec![0, 1, 2, 0]);
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap();
                count += 1;
            }
        }
        assert!(count >= 6);
    }
}
