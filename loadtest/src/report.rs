//! The result of a run: JSON (everything), Markdown (the table people read) and the PNG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::failover::FailoverFigures;
use crate::scenario::Scenario;
use crate::stats::Percentiles;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunReport {
    pub(crate) scenario: Scenario,
    pub(crate) target: String,
    pub(crate) publish_api: String,
    /// Unix seconds at the start of the run.
    pub(crate) started_at: u64,
    pub(crate) machine: Machine,
    pub(crate) nodes: usize,
    pub(crate) workers: usize,
    pub(crate) connect: ConnectFigures,
    pub(crate) publish: PublishFigures,
    pub(crate) delivery: DeliveryFigures,
    pub(crate) latency: LatencyFigures,
    pub(crate) churn: Option<ChurnFigures>,
    pub(crate) slow_consumers: SlowFigures,
    pub(crate) servers: Vec<ServerUsage>,
    pub(crate) memory: MemoryFigures,
    /// herald's Redis bridge counters over the publishing window, when the run published through Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bridge: Option<crate::bridge::BridgeFigures>,
    /// The harness's own CPU (coordinator + workers) while publishing, in % of one core.
    pub(crate) harness_cpu_percent: f64,
    pub(crate) timeline: Vec<TimelinePoint>,
    /// Scenario 6: the kills and what they cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failover: Option<FailoverFigures>,
    /// How this run departs from the scenario (e.g. a peer run on one node).
    pub(crate) notes: Vec<String>,
    /// Why the run failed; empty when it passed.
    pub(crate) failures: Vec<String>,
    /// The run was correct (no loss, duplication, reordering or connect failures beyond the scenario's `pass`
    /// limits). Performance targets do not affect it: see `targets`.
    pub(crate) passed: bool,
    /// Each of the scenario's `[targets]`, measured (filled in by [`RunReport::judge_targets`]).
    pub(crate) targets: Vec<TargetResult>,
    pub(crate) targets_missed: usize,
    pub(crate) targets_not_measured: usize,
    /// The verdict line, e.g. "passed, all 3 targets met" or "correct, 2 of 3 targets missed".
    pub(crate) verdict: String,
}

/// For a scenario that does not apply to `target` (failover against a peer): writes a `result.json` and a
/// `report.md` that say so, with the verdict line `run-scenarios.sh` reads, and returns the report's text.
pub(crate) fn not_applicable(
    scenario: &Scenario,
    target: &str,
    dir: &Path,
    why: &str,
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::json!({
        "scenario": scenario,
        "target": target,
        "not_applicable": why,
        "verdict": "not applicable",
    });
    std::fs::write(
        dir.join("result.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let md = format!(
        "# {} — {target}\n\n**Result: not applicable**\n\nNot run: {why}.\n",
        scenario.name
    );
    std::fs::write(dir.join("report.md"), &md)?;
    Ok(md)
}

/// How a run did against one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TargetStatus {
    Met,
    Missed,
    /// The run has no figure to compare (e.g. no server PIDs for RSS, a peer without disconnect metrics).
    NotMeasured,
}

/// One target and what the run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TargetResult {
    /// The scenario key, e.g. `max_p99_ms`.
    pub(crate) key: String,
    /// The figure, e.g. "p99 latency, cross-node".
    pub(crate) figure: String,
    /// The limit in `unit`.
    pub(crate) limit: f64,
    /// At least (`min_` targets) or at most (`max_` targets) the limit.
    pub(crate) at_least: bool,
    pub(crate) unit: String,
    pub(crate) measured: Option<f64>,
    pub(crate) status: TargetStatus,
    /// Why the figure is missing, or what stands in for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

impl TargetResult {
    fn new(key: &str, figure: &str, limit: f64, unit: &str, measured: Option<f64>) -> Self {
        let at_least = key.starts_with("min_");
        let status = match measured {
            None => TargetStatus::NotMeasured,
            Some(m) if (at_least && m >= limit) || (!at_least && m <= limit) => TargetStatus::Met,
            Some(_) => TargetStatus::Missed,
        };
        TargetResult {
            key: key.to_owned(),
            figure: figure.to_owned(),
            limit,
            at_least,
            unit: unit.to_owned(),
            measured,
            status,
            note: None,
        }
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// "at most 25 ms", "at least 500000 deliveries/s".
    pub(crate) fn target_text(&self) -> String {
        format!(
            "{} {}",
            if self.at_least { "at least" } else { "at most" },
            format_value(self.limit, &self.unit)
        )
    }

    pub(crate) fn measured_text(&self) -> String {
        if let (None, TargetStatus::Missed, Some(note)) = (self.measured, self.status, &self.note) {
            return note.clone();
        }
        let value = self.measured.map_or_else(
            || "not measured".to_owned(),
            |m| format_value(m, &self.unit),
        );
        match &self.note {
            Some(note) => format!("{value} ({note})"),
            None => value,
        }
    }

    pub(crate) fn status_text(&self) -> &'static str {
        match self.status {
            TargetStatus::Met => "met",
            TargetStatus::Missed => "MISSED",
            TargetStatus::NotMeasured => "not measured",
        }
    }
}

fn format_value(v: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{v:.2} ms"),
        "s" => format!("{v:.1} s"),
        "B" => format!("{v:.0} B ({:.1} KiB)", v / 1024.0),
        _ => format!("{v:.0} {unit}"),
    }
}

/// Measures a run against its scenario's targets.
pub(crate) fn evaluate_targets(report: &RunReport) -> Vec<TargetResult> {
    let t = &report.scenario.targets;
    let mut out = Vec::new();
    if let Some(limit) = t.min_deliveries_per_sec {
        out.push(TargetResult::new(
            "min_deliveries_per_sec",
            "deliveries/s",
            limit,
            "deliveries/s",
            Some(report.delivery.delivered_per_sec),
        ));
    }
    let l = &report.latency;
    let mut scopes = vec![("all deliveries", &l.all)];
    if l.same_node.count > 0 && l.cross_node.count > 0 {
        scopes.push(("same-node", &l.same_node));
        scopes.push(("cross-node", &l.cross_node));
    }
    for (key, name, limit, pick) in [
        (
            "max_p50_ms",
            "p50",
            t.max_p50_ms,
            (|p| p.p50_ms) as fn(&Percentiles) -> f64,
        ),
        ("max_p99_ms", "p99", t.max_p99_ms, |p| p.p99_ms),
        ("max_p999_ms", "p99.9", t.max_p999_ms, |p| p.p999_ms),
    ] {
        let Some(limit) = limit else { continue };
        for (scope, p) in &scopes {
            let measured = (p.count > 0).then(|| pick(p));
            let r = TargetResult::new(
                key,
                &format!("{name} latency, {scope}"),
                limit,
                "ms",
                measured,
            );
            out.push(if measured.is_none() {
                r.note("no latency samples")
            } else {
                r
            });
        }
    }
    if let Some(limit) = t.max_rss_per_connection_bytes {
        let r = TargetResult::new(
            "max_rss_per_connection_bytes",
            "server RSS per connection",
            limit,
            "B",
            report.memory.rss_per_connection_bytes,
        );
        out.push(if r.measured.is_none() {
            r.note("no server RSS: attached without --server-pid, or nothing subscribed")
        } else {
            r
        });
    }
    let c = &report.connect;
    if let Some(limit) = t.min_subscribes_per_sec {
        out.push(TargetResult::new(
            "min_subscribes_per_sec",
            "acknowledged subscribes/s",
            limit,
            "subscribes/s",
            Some(c.subscribes_per_sec),
        ));
    }
    if let Some(limit) = t.max_subscribe_ack_p99_ms {
        let measured = (c.time_to_ack.count > 0).then_some(c.time_to_ack.p99_ms);
        let r = TargetResult::new(
            "max_subscribe_ack_p99_ms",
            "p99 time to subscribe ack",
            limit,
            "ms",
            measured,
        );
        out.push(if measured.is_none() {
            r.note("no subscribe was acknowledged")
        } else {
            r
        });
    }
    if let Some(limit) = t.max_slow_consumer_disconnect_secs {
        let s = &report.slow_consumers;
        let key = "max_slow_consumer_disconnect_secs";
        let figure = "time until every slow consumer was disconnected";
        let r = TargetResult::new(key, figure, limit, "s", s.all_disconnected_after_secs);
        out.push(
            match (s.all_disconnected_after_secs, s.server_disconnects) {
                (Some(_), _) => r,
                _ if s.slow_consumers == 0 => r.note("no connection was a slow consumer"),
                (None, Some(gone)) => {
                    let mut r = r.note(format!(
                        "only {gone} of {} disconnected by the end of the run",
                        s.slow_consumers
                    ));
                    r.status = TargetStatus::Missed;
                    r
                }
                (None, None) => r.note("the harness reads disconnects from herald's metrics only"),
            },
        );
    }
    evaluate_failover_targets(report, &mut out);
    out
}

fn evaluate_failover_targets(report: &RunReport, out: &mut Vec<TargetResult>) {
    let t = &report.scenario.targets;
    let f = report.failover.as_ref();
    if let Some(limit) = t.max_registry_write_after_leader_kill_secs {
        let key = "max_registry_write_after_leader_kill_secs";
        let figure = "first committed registry write after a leader SIGKILL, worst round";
        let rounds = f.map_or(0, |f| f.leader_rounds.len());
        let r = TargetResult::new(
            key,
            figure,
            limit,
            "s",
            f.and_then(|f| f.write_after_kill_max_secs),
        );
        out.push(match f {
            None => r.note("not a failover run"),
            Some(_) if rounds == 0 => r.note("no leader kill was made"),
            Some(f) if f.rounds_without_write > 0 => {
                let mut r = r.note(format!(
                    "no write committed within 30 s in {} of {rounds} rounds",
                    f.rounds_without_write
                ));
                r.status = TargetStatus::Missed;
                r
            }
            Some(f) => {
                let within = f
                    .leader_rounds
                    .iter()
                    .filter(|r| r.write_after_secs.is_some_and(|w| w <= limit))
                    .count();
                r.note(format!(
                    "p50 {:.2} s; {within} of {rounds} rounds within",
                    f.write_after_kill_p50_secs.unwrap_or(0.0)
                ))
            }
        });
    }
    if let Some(limit) = t.max_edge_kill_resubscribe_secs {
        let key = "max_edge_kill_resubscribe_secs";
        let figure = "killed edge's clients resubscribed, slowest of all";
        let measured = f
            .filter(|f| f.clients_resubscribed > 0)
            .map(|f| f.resubscribe.max_ms / 1e3);
        let r = TargetResult::new(key, figure, limit, "s", measured);
        out.push(match f {
            None => r.note("not a failover run"),
            Some(f) if f.edge_kills.is_empty() => r.note("no edge kill was made"),
            Some(f) if f.clients_cut == 0 => r.note("the edge kills cut no subscriber"),
            Some(f) => {
                let never = f.clients_cut - f.clients_resubscribed;
                let within = f.clients_within_target.unwrap_or(0);
                let note = format!(
                    "p50 {:.2} s, p99 {:.2} s; {within} of {} clients within{}",
                    f.resubscribe.p50_ms / 1e3,
                    f.resubscribe.p99_ms / 1e3,
                    f.clients_cut,
                    if never > 0 {
                        format!(", {never} never resubscribed")
                    } else {
                        String::new()
                    }
                );
                let mut r = r.note(note);
                if never > 0 {
                    r.status = TargetStatus::Missed;
                }
                r
            }
        });
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
}

impl Machine {
    pub(crate) fn describe() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ConnectFigures {
    pub(crate) connections: usize,
    pub(crate) subscribed: u64,
    pub(crate) failed: u64,
    pub(crate) errors: Vec<String>,
    /// Acknowledged subscribes per second, from the first scheduled connect to the last acknowledgement.
    pub(crate) subscribes_per_sec: f64,
    /// Scheduled start to the server's accept (herald: the authorization frame).
    pub(crate) connect: Percentiles,
    /// Scheduled start to the subscribe acknowledgement.
    pub(crate) time_to_ack: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PublishFigures {
    pub(crate) publishers: usize,
    pub(crate) target_rate: f64,
    pub(crate) sent: u64,
    /// What the servers acknowledged (gRPC stream replies, HTTP 200s).
    pub(crate) accepted: Option<u64>,
    pub(crate) achieved_rate: f64,
    /// The furthest a publisher fell behind its schedule (ms); latency includes it.
    pub(crate) max_schedule_lag_ms: f64,
    pub(crate) errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DeliveryFigures {
    /// Deliveries to stable subscribers.
    pub(crate) delivered: u64,
    /// Deliveries over the time from the first publish to the last delivery.
    pub(crate) delivered_per_sec: f64,
    /// How long deliveries went on after the last publish (a backlog the server was working off).
    pub(crate) backlog_drain_secs: f64,
    pub(crate) expected: u64,
    pub(crate) lost: u64,
    pub(crate) loss_share: f64,
    pub(crate) streams_with_loss: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    /// Stable subscribers the server disconnected.
    pub(crate) disconnected: u64,
    pub(crate) close_codes: Vec<(u16, u64)>,
    pub(crate) unparsed_or_misrouted: u64,
    /// Deliveries to slow consumers and churn connections.
    pub(crate) other: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LatencyFigures {
    pub(crate) all: Percentiles,
    /// Subscriber on the node the publisher published to.
    pub(crate) same_node: Percentiles,
    /// Subscriber on another node (forwarded edge to edge).
    pub(crate) cross_node: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ChurnFigures {
    pub(crate) per_second: f64,
    pub(crate) connected: u64,
    pub(crate) failed: u64,
    pub(crate) time_to_ack: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SlowFigures {
    pub(crate) slow_consumers: usize,
    /// herald's `herald_slow_consumer_disconnects_total` over all nodes at the end (herald only).
    pub(crate) server_disconnects: Option<u64>,
    /// Seconds from the moment they stopped reading until the server had disconnected them all, to within the
    /// 1 s sampling (herald only).
    pub(crate) all_disconnected_after_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ServerUsage {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) rss_before_connect: u64,
    pub(crate) rss_connected: u64,
    pub(crate) rss_peak: u64,
    /// CPU while publishing, in % of one core (0 for a process restarted during the run: not measured).
    pub(crate) cpu_percent: f64,
    /// Times a failover run killed and restarted it.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) restarts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct MemoryFigures {
    /// (RSS after subscribing − RSS before connecting) / connections, over the client-serving nodes.
    pub(crate) rss_per_connection_bytes: Option<f64>,
    /// Kernel TCP socket memory added by the connections (machine-wide, both ends), per connection.
    pub(crate) kernel_tcp_per_connection_bytes: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct TimelinePoint {
    /// Seconds since publishing started.
    pub(crate) t: f64,
    pub(crate) delivered_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl RunReport {
    /// Measures the run against the scenario's targets and sets the verdict. Call once the figures are in.
    pub(crate) fn judge_targets(&mut self) {
        self.targets = evaluate_targets(self);
        let count = |s| self.targets.iter().filter(|t| t.status == s).count();
        self.targets_missed = count(TargetStatus::Missed);
        self.targets_not_measured = count(TargetStatus::NotMeasured);
        self.verdict = self.verdict_text();
    }

    fn verdict_text(&self) -> String {
        let total = self.targets.len();
        let mut parts = Vec::new();
        if self.targets_missed > 0 {
            parts.push(format!("{} of {total} targets missed", self.targets_missed));
        }
        if self.targets_not_measured > 0 {
            parts.push(format!(
                "{} of {total} targets not measured",
                self.targets_not_measured
            ));
        }
        match (self.passed, parts.is_empty()) {
            (false, true) => "FAILED".to_owned(),
            (false, false) => format!("FAILED, and {}", parts.join(", ")),
            (true, false) => format!("correct, {}", parts.join(", ")),
            (true, true) if total == 0 => "passed (no performance targets)".to_owned(),
            (true, true) => format!("passed, all {total} targets met"),
        }
    }

    /// Every target was met (none missed, none unmeasured): what `--strict-targets` asks for.
    pub(crate) fn targets_all_met(&self) -> bool {
        self.targets_missed == 0 && self.targets_not_measured == 0
    }

    /// Writes `result.json`, `report.md` and `chart.png` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("result.json"), json)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        crate::chart::draw(self, &dir.join("chart.png")).context("drawing chart.png")?;
        Ok(())
    }

    /// The Markdown report: one table of headline figures, then details.
    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let s = &self.scenario;
        let _ = writeln!(md, "# {} — {}\n", s.name, self.target);
        if !s.description.is_empty() {
            let _ = writeln!(md, "{}\n", s.description.trim());
        }
        let _ = writeln!(
            md,
            "{} node(s), {} subscribers in {} rooms ({} per room), {} publisher(s) at {} publishes/s over {} \
             ({}-byte payloads), {} s; {} worker process(es). Machine: {} CPUs, {}.\n",
            self.nodes,
            s.clients.connections,
            s.clients.rooms,
            s.members_per_room(),
            s.publish.publishers,
            s.publish.rate,
            self.publish_api,
            s.publish.payload_bytes,
            s.duration_secs,
            self.workers,
            self.machine.cpus,
            self.machine.cpu_model
        );
        for note in &self.notes {
            let _ = writeln!(md, "Note: {note}\n");
        }
        let _ = writeln!(md, "**Result: {}**\n", self.verdict);
        for f in &self.failures {
            let _ = writeln!(md, "- {f}");
        }
        for t in self
            .targets
            .iter()
            .filter(|t| t.status != TargetStatus::Met)
        {
            let _ = writeln!(
                md,
                "- {} target: {} — measured {}, target {}",
                t.status_text(),
                t.figure,
                t.measured_text(),
                t.target_text()
            );
        }
        if !self.failures.is_empty() || !self.targets_all_met() {
            md.push('\n');
        }
        if !self.targets.is_empty() {
            md.push_str("Targets:\n\n| target | measured | result |\n|---|---:|---|\n");
            for t in &self.targets {
                let _ = writeln!(
                    md,
                    "| {} {} | {} | {} |",
                    t.figure,
                    t.target_text(),
                    t.measured_text(),
                    t.status_text()
                );
            }
            md.push('\n');
        }
        let d = &self.delivery;
        let p = &self.publish;
        let c = &self.connect;
        md.push_str("| figure | value |\n|---|---:|\n");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(md, "| {k} | {v} |");
        };
        row(
            "deliveries/s (first publish to last delivery)",
            format!("{:.0}", d.delivered_per_sec),
        );
        row(
            "deliveries still arriving after the last publish",
            format!("{:.2} s", d.backlog_drain_secs),
        );
        row(
            "publish rate achieved / target",
            format!("{:.0} / {:.0}", p.achieved_rate, p.target_rate),
        );
        row(
            "delivered / expected",
            format!("{} / {}", d.delivered, d.expected),
        );
        row(
            "lost / duplicated / reordered",
            format!("{} / {} / {}", d.lost, d.duplicates, d.reordered),
        );
        for (name, l) in [
            ("latency all", &self.latency.all),
            ("latency same-node", &self.latency.same_node),
            ("latency cross-node", &self.latency.cross_node),
        ] {
            if l.count > 0 {
                row(
                    &format!("{name} p50 / p90 / p99 / p99.9 / max (ms)"),
                    format!(
                        "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
                    ),
                );
            }
        }
        row(
            "connections subscribed / failed",
            format!("{} / {}", c.subscribed, c.failed),
        );
        row(
            "subscribes/s (acknowledged)",
            format!("{:.0}", c.subscribes_per_sec),
        );
        row(
            "time to ack p50 / p99 (ms)",
            format!("{:.2} / {:.2}", c.time_to_ack.p50_ms, c.time_to_ack.p99_ms),
        );
        if let Some(churn) = &self.churn {
            row(
                "churn connected / failed, p99 to ack (ms)",
                format!(
                    "{} / {}, {:.2}",
                    churn.connected, churn.failed, churn.time_to_ack.p99_ms
                ),
            );
        }
        if self.slow_consumers.slow_consumers > 0 {
            row(
                "slow consumers / disconnected by server",
                format!(
                    "{} / {}",
                    self.slow_consumers.slow_consumers,
                    self.slow_consumers
                        .server_disconnects
                        .map_or("n/a".into(), |n| n.to_string())
                ),
            );
        }
        if let Some(b) = self.memory.rss_per_connection_bytes {
            row("server RSS per connection", format!("{b:.0} B"));
        }
        if let Some(b) = self.memory.kernel_tcp_per_connection_bytes {
            row(
                "kernel TCP memory per connection (both ends)",
                format!("{b:.0} B"),
            );
        }
        for server in &self.servers {
            row(
                &format!("{} RSS connected / peak, CPU", server.name),
                if server.restarts > 0 {
                    format!(
                        "{:.1} MiB connected; restarted {}x, so peak and CPU not measured",
                        server.rss_connected as f64 / 1048576.0,
                        server.restarts
                    )
                } else {
                    format!(
                        "{:.1} / {:.1} MiB, {:.0}%",
                        server.rss_connected as f64 / 1048576.0,
                        server.rss_peak as f64 / 1048576.0,
                        server.cpu_percent
                    )
                },
            );
        }
        if let Some(b) = &self.bridge {
            row(
                "herald bridge: messages in / into rooms / not carried",
                format!(
                    "{} / {} / {}",
                    b.messages_in,
                    b.messages_out,
                    b.failed_total()
                ),
            );
            if !b.failed.is_empty() {
                row(
                    "herald bridge: not carried, by reason",
                    b.failed
                        .iter()
                        .map(|(reason, n)| format!("{reason} {n}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
            row(
                "herald bridge: source restarts (lost Redis subscriptions)",
                b.source_restarts.to_string(),
            );
        }
        row("harness CPU", format!("{:.0}%", self.harness_cpu_percent));
        if let Some(f) = &self.failover {
            failover_markdown(&mut md, f);
        }
        md
    }
}

fn ms3(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!("{:.0} / {:.0} / {:.0}", p.p50_ms, p.p99_ms, p.max_ms)
}

fn secs_or_dash(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2} s"))
}

/// The failover section: what the kills cost, then one row per edge kill and the leader rounds' times.
fn failover_markdown(md: &mut String, f: &FailoverFigures) {
    let _ = writeln!(
        md,
        "\nFailover: {} of {} registry leader kills and {} of {} edge kills made{}.\n",
        f.leader_rounds.len(),
        f.leader_kills_planned,
        f.edge_kills.len(),
        f.edge_kills_planned,
        if f.skipped_kills > 0 {
            format!(
                " ({} not made: earlier rounds ran into the settling time)",
                f.skipped_kills
            )
        } else {
            String::new()
        }
    );
    md.push_str("| failover figure | value |\n|---|---:|\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(md, "| {k} | {v} |");
    };
    row(
        "lost on live edges (missing deliveries no kill explains)",
        f.lost_on_live_edges.to_string(),
    );
    row(
        "missed by killed edges' clients while they reconnected (expected)",
        f.reconnect_gap.to_string(),
    );
    row(
        "missed: publishes through a killed edge after the last one the subscriber got through it (not \
         counted as loss: PublishStream acknowledges nothing per message)",
        f.in_flight_at_kill.to_string(),
    );
    row(
        "… of which handed to the stream before the SIGKILL (the edge accepted them, or they were on their way, \
         and it died before delivering them everywhere)",
        f.in_flight_before_kill.to_string(),
    );
    if !f.leader_rounds.is_empty() {
        row(
            "registry leader SIGKILL to first committed write, p50 / max",
            format!(
                "{} / {}",
                secs_or_dash(f.write_after_kill_p50_secs),
                secs_or_dash(f.write_after_kill_max_secs)
            ),
        );
        row(
            "leader rounds without a committed write within 30 s",
            f.rounds_without_write.to_string(),
        );
        let each: Vec<String> = f
            .leader_rounds
            .iter()
            .map(|r| {
                r.write_after_secs
                    .map_or("none".into(), |w| format!("{w:.2}"))
            })
            .collect();
        row("each leader round, SIGKILL to write (s)", each.join(", "));
    }
    if !f.edge_kills.is_empty() {
        row(
            "subscribers cut by edge kills / resubscribed / within target",
            format!(
                "{} / {} / {}",
                f.clients_cut,
                f.clients_resubscribed,
                f.clients_within_target
                    .map_or_else(|| "-".into(), |n| n.to_string())
            ),
        );
        row(
            "edge SIGKILL to resubscribe ack p50 / p99 / max (ms)",
            ms3(&f.resubscribe),
        );
        row(
            "edge SIGKILL to first delivery on the new connection p50 / p99 / max (ms)",
            ms3(&f.first_delivery_after_kill),
        );
        row(
            "publisher streams moved to another edge",
            f.publisher_switches.to_string(),
        );
    }
    row(
        "connections closed with no kill to explain it",
        f.unexplained_reconnects.to_string(),
    );
    if !f.edge_kills.is_empty() {
        md.push_str(
            "\n| edge kill | at | clients | resubscribed | ack p50 / p99 / max (ms) | first delivery p50 / p99 / max \
             (ms) | publishers moved | restarted / registered after |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for k in &f.edge_kills {
            let _ = writeln!(
                md,
                "| {} | {:.1} s | {} | {} | {} | {} | {} | {} / {} |",
                k.round.name,
                k.round.at_secs,
                k.clients,
                k.resubscribed,
                ms3(&k.resubscribe),
                ms3(&k.first_delivery),
                k.publishers_switched,
                secs_or_dash(k.round.restarted_after_secs),
                secs_or_dash(k.round.registered_after_secs)
            );
        }
    }
    if !f.notes.is_empty() {
        md.push('\n');
        for note in &f.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(targets: &str) -> RunReport {
        let text = format!(
            "name = \"t\"\nduration_secs = 2\n[clients]\nconnections = 12\nrooms = 3\n\
             [publish]\nrate = 10\n[slow_consumers]\nshare = 0.5\n[targets]\n{targets}\n"
        );
        let p = |p50_ms, p99_ms| Percentiles {
            count: 100,
            p50_ms,
            p90_ms: p50_ms,
            p99_ms,
            p999_ms: p99_ms,
            max_ms: p99_ms,
        };
        let mut report = RunReport {
            scenario: Scenario::parse(&text).unwrap(),
            target: "herald".into(),
            publish_api: "gRPC".into(),
            started_at: 0,
            machine: Machine {
                cpus: 2,
                cpu_model: String::new(),
            },
            nodes: 3,
            workers: 1,
            connect: ConnectFigures {
                subscribes_per_sec: 12_000.0,
                ..ConnectFigures::default()
            },
            publish: PublishFigures::default(),
            delivery: DeliveryFigures {
                delivered_per_sec: 300_000.0,
                ..DeliveryFigures::default()
            },
            latency: LatencyFigures {
                all: p(0.8, 30.0),
                same_node: p(0.5, 4.0),
                cross_node: p(1.1, 1200.0),
            },
            churn: None,
            slow_consumers: SlowFigures {
                slow_consumers: 6,
                server_disconnects: Some(4),
                all_disconnected_after_secs: None,
            },
            servers: Vec::new(),
            memory: MemoryFigures::default(),
            bridge: None,
            harness_cpu_percent: 0.0,
            timeline: Vec::new(),
            failover: None,
            notes: Vec::new(),
            failures: Vec::new(),
            passed: true,
            targets: Vec::new(),
            targets_missed: 0,
            targets_not_measured: 0,
            verdict: String::new(),
        };
        report.judge_targets();
        report
    }

    fn statuses(r: &RunReport) -> Vec<(&str, TargetStatus)> {
        r.targets
            .iter()
            .map(|t| (t.figure.as_str(), t.status))
            .collect()
    }

    #[test]
    fn no_targets_keeps_the_plain_verdict() {
        let r = report("");
        assert!(r.targets.is_empty());
        assert_eq!(r.verdict, "passed (no performance targets)");
        assert!(r
            .markdown()
            .contains("**Result: passed (no performance targets)**"));
        assert!(!r.markdown().contains("Targets:"));
    }

    #[test]
    fn met_and_missed_targets() {
        let r = report(
            "min_deliveries_per_sec = 250000\nmin_subscribes_per_sec = 12000\nmax_p99_ms = 25",
        );
        assert_eq!(
            statuses(&r),
            vec![
                ("deliveries/s", TargetStatus::Met),
                ("p99 latency, all deliveries", TargetStatus::Missed),
                ("p99 latency, same-node", TargetStatus::Met),
                ("p99 latency, cross-node", TargetStatus::Missed),
                ("acknowledged subscribes/s", TargetStatus::Met),
            ]
        );
        assert_eq!(r.verdict, "correct, 2 of 5 targets missed");
        assert!(!r.targets_all_met());
        let md = r.markdown();
        assert!(
            md.contains("**Result: correct, 2 of 5 targets missed**"),
            "{md}"
        );
        assert!(
            md.contains(
                "- MISSED target: p99 latency, cross-node — measured 1200.00 ms, target at most 25.00 ms"
            ),
            "{md}"
        );
        assert!(
            md.contains("| p99 latency, same-node at most 25.00 ms | 4.00 ms | met |"),
            "{md}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["targets_missed"], 2);
        assert_eq!(json["targets"][3]["status"], "missed");
        assert_eq!(json["targets"][3]["measured"], 1200.0);
    }

    #[test]
    fn all_met() {
        let r = report("min_deliveries_per_sec = 300000\nmax_p50_ms = 1.1");
        assert!(r.targets_all_met(), "{:?}", statuses(&r));
        assert_eq!(r.verdict, "passed, all 4 targets met");
    }

    #[test]
    fn absent_figures_are_not_measured_not_met() {
        let mut r = report("max_rss_per_connection_bytes = 8192\nmax_subscribe_ack_p99_ms = 50");
        assert_eq!(
            statuses(&r),
            vec![
                ("server RSS per connection", TargetStatus::NotMeasured),
                ("p99 time to subscribe ack", TargetStatus::NotMeasured),
            ]
        );
        assert_eq!(r.verdict, "correct, 2 of 2 targets not measured");
        assert!(!r.targets_all_met());
        r.memory.rss_per_connection_bytes = Some(9000.0);
        r.judge_targets();
        assert_eq!(r.targets[0].status, TargetStatus::Missed);
        assert_eq!(r.targets[0].measured_text(), "9000 B (8.8 KiB)");
    }

    #[test]
    fn slow_consumers_not_all_disconnected_is_a_miss() {
        let mut r = report("max_slow_consumer_disconnect_secs = 5");
        assert_eq!(r.targets[0].status, TargetStatus::Missed);
        assert_eq!(
            r.targets[0].measured_text(),
            "only 4 of 6 disconnected by the end of the run"
        );
        r.slow_consumers.all_disconnected_after_secs = Some(2.0);
        r.judge_targets();
        assert_eq!(r.targets[0].status, TargetStatus::Met);
        r.slow_consumers = SlowFigures {
            slow_consumers: 6,
            ..SlowFigures::default()
        };
        r.judge_targets();
        assert_eq!(r.targets[0].status, TargetStatus::NotMeasured);
    }

    fn failover_report(rounds: &[Option<f64>], resubscribed: u64, cut: u64) -> RunReport {
        let text =
            "name = \"f\"\nduration_secs = 60\n[cluster]\nnodes = 3\n[clients]\nconnections = 12\n\
                    rooms = 3\n[publish]\nrate = 10\n[failover]\nleader_kills = 3\nedge_kills = 1\n\
                    [targets]\nmax_registry_write_after_leader_kill_secs = 2\n\
                    max_edge_kill_resubscribe_secs = 3\n";
        let mut r = report("");
        r.scenario = Scenario::parse(text).unwrap();
        let leader_rounds: Vec<crate::failover::LeaderRound> = rounds
            .iter()
            .map(|w| crate::failover::LeaderRound {
                write_after_secs: *w,
                ..Default::default()
            })
            .collect();
        let mut writes: Vec<f64> = rounds.iter().flatten().copied().collect();
        writes.sort_by(f64::total_cmp);
        r.failover = Some(FailoverFigures {
            leader_kills_planned: 3,
            edge_kills_planned: 1,
            write_after_kill_p50_secs: writes.get(writes.len().saturating_sub(1) / 2).copied(),
            write_after_kill_max_secs: writes.last().copied(),
            rounds_without_write: rounds.len() - writes.len(),
            leader_rounds,
            edge_kills: vec![crate::failover::EdgeKillFigures::default()],
            clients_cut: cut,
            clients_resubscribed: resubscribed,
            clients_within_target: Some(resubscribed.min(cut) / 2),
            resubscribe: Percentiles {
                count: resubscribed,
                p50_ms: 400.0,
                p90_ms: 900.0,
                p99_ms: 2_500.0,
                p999_ms: 3_100.0,
                max_ms: 3_200.0,
            },
            reconnect_gap: 120,
            in_flight_at_kill: 7,
            ..FailoverFigures::default()
        });
        r.judge_targets();
        r
    }

    #[test]
    fn failover_targets_are_judged_and_misses_said_plainly() {
        let r = failover_report(&[Some(0.8), Some(1.1), Some(1.6)], 40, 40);
        assert_eq!(
            statuses(&r),
            vec![
                (
                    "first committed registry write after a leader SIGKILL, worst round",
                    TargetStatus::Met
                ),
                (
                    "killed edge's clients resubscribed, slowest of all",
                    TargetStatus::Missed
                ),
            ]
        );
        assert_eq!(
            r.targets[0].measured_text(),
            "1.6 s (p50 1.10 s; 3 of 3 rounds within)"
        );
        assert_eq!(r.verdict, "correct, 1 of 2 targets missed");
        let md = r.markdown();
        assert!(
            md.contains(
                "- MISSED target: killed edge's clients resubscribed, slowest of all — measured 3.2 s \
                 (p50 0.40 s, p99 2.50 s; 20 of 40 clients within), target at most 3.0 s"
            ),
            "{md}"
        );
        assert!(md.contains(
            "| missed by killed edges' clients while they reconnected (expected) | 120 |"
        ));
        assert!(
            md.contains("| each leader round, SIGKILL to write (s) | 0.80, 1.10, 1.60 |"),
            "{md}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["failover"]["in_flight_at_kill"], 7);
    }

    #[test]
    fn a_round_without_a_write_or_a_client_that_never_came_back_is_a_miss() {
        let r = failover_report(&[Some(0.5), None, Some(0.7)], 38, 40);
        assert!(r.targets.iter().all(|t| t.status == TargetStatus::Missed));
        assert_eq!(
            r.targets[0].measured_text(),
            "0.7 s (no write committed within 30 s in 1 of 3 rounds)"
        );
        assert!(
            r.targets[1]
                .measured_text()
                .ends_with("2 never resubscribed)"),
            "{}",
            r.targets[1].measured_text()
        );
        // No kill made at all: nothing measured, which is not "met".
        let mut r = failover_report(&[], 0, 0);
        if let Some(f) = r.failover.as_mut() {
            f.edge_kills.clear();
        }
        r.judge_targets();
        assert!(r
            .targets
            .iter()
            .all(|t| t.status == TargetStatus::NotMeasured));
    }

    #[test]
    fn correctness_failure_still_fails_and_reports_misses() {
        let mut r = report("max_p99_ms = 25");
        r.passed = false;
        r.failures.push("lost 3 of 10 expected deliveries".into());
        r.judge_targets();
        assert_eq!(r.verdict, "FAILED, and 2 of 3 targets missed");
        assert!(r.markdown().contains("- lost 3 of 10 expected deliveries"));
    }
}
