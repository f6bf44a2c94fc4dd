//! The result of a run: JSON (everything), Markdown (the table people read) and the PNG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

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
    /// The harness's own CPU (coordinator + workers) while publishing, in % of one core.
    pub(crate) harness_cpu_percent: f64,
    pub(crate) timeline: Vec<TimelinePoint>,
    /// How this run departs from the scenario (e.g. a peer run on one node).
    pub(crate) notes: Vec<String>,
    /// Why the run failed; empty when it passed.
    pub(crate) failures: Vec<String>,
    pub(crate) passed: bool,
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
    /// CPU while publishing, in % of one core.
    pub(crate) cpu_percent: f64,
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
        let _ = writeln!(
            md,
            "**Result: {}**\n",
            if self.passed { "passed" } else { "FAILED" }
        );
        for f in &self.failures {
            let _ = writeln!(md, "- {f}");
        }
        if !self.failures.is_empty() {
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
                format!(
                    "{:.1} / {:.1} MiB, {:.0}%",
                    server.rss_connected as f64 / 1048576.0,
                    server.rss_peak as f64 / 1048576.0,
                    server.cpu_percent
                ),
            );
        }
        row("harness CPU", format!("{:.0}%", self.harness_cpu_percent));
        md
    }
}
