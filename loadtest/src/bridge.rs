//! Publishing through herald's Redis bridge (`publish.api = "redis"`, or `--publish-api redis`).
//!
//! Instead of herald's publish APIs, the publishers `PUBLISH` to a private `redis-server` that the harness starts
//! on a free loopback port, and herald carries each message into its room through a route (README, "Routes and
//! bridges"):
//!
//! ```yaml
//! endpoints:
//!   loadtest-redis: {kind: redis, url: "redis://127.0.0.1:<port>/", channel: "herald-loadtest", marshal: envelope}
//!   loadtest-rooms: {kind: room}
//! routes:
//!   loadtest: {from: loadtest-redis, to: [loadtest-rooms]}
//! ```
//!
//! Every publisher sends on the one channel, and each body is an envelope naming its room,
//! `{"rooms":[{"lt":"7","shard":"0"}],"data":"LT1.…"}`, with the same `data` the other publish APIs carry. So the
//! subscribers, their rooms and the per-(room, publisher) sequence accounting are exactly those of a gRPC run, and
//! latency, loss, duplication and reordering are measured end to end: Redis, herald's source, its rooms, the
//! WebSocket. One channel (not one per room with a `{channel}` placeholder) keeps the source a single `SUBSCRIBE`,
//! and the envelope is High-templar's trigger body, the shape django-binder publishes.
//!
//! Redis Pub/Sub is at-most-once: a subscriber that falls behind by more than Redis's
//! `client-output-buffer-limit pubsub` (32 MB, or 8 MB for 60 s) is disconnected, and what it missed is gone.
//! herald's source then reconnects (`herald_bridge_task_restarts_total`). The harness counts what went missing as
//! loss, like any other; [`BridgeFigures`] shows herald's side of it. A `PUBLISH` that reached no subscriber at
//! all (herald's source not subscribed) is a publishing error.
//!
//! Only herald has this path: NATS and Sockudo have no Redis bridge, so [`check_applicable`] refuses them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::driver::herald::room_json;
use crate::driver::Publisher;
use crate::peers::{find_binary, ServerProcess};
use crate::server::{self, Servers};
use crate::wire::TargetKind;

/// The channel every publisher uses and herald's source subscribes to.
pub(crate) const CHANNEL: &str = "herald-loadtest";
/// The route's name, as in herald's `herald_bridge_*` metrics.
pub(crate) const ROUTE: &str = "loadtest";
/// Most `PUBLISH`es one pipeline carries when a publisher has a backlog.
const MAX_BATCH: usize = 256;
/// How long Redis may take to answer a pipeline (the redis crate's default, 500 ms, is too short for a machine
/// the run saturates).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a run cannot publish through Redis, if it cannot: the bridge is herald's, and the harness must start
/// herald itself to configure the route.
pub(crate) fn check_applicable(target: TargetKind, attach: bool) -> Result<(), String> {
    if target != TargetKind::Herald {
        return Err(format!(
            "publish api \"redis\" measures herald's Redis bridge; not applicable to {} (it has no Redis bridge): \
             run it with --target herald",
            target.name()
        ));
    }
    if attach {
        return Err(
            "publish api \"redis\" needs the harness to start herald (it configures the Redis route and starts \
             the redis-server); it cannot attach to running nodes (--edge)"
                .into(),
        );
    }
    Ok(())
}

/// herald's configuration for the bridge: the Redis source, the room destination named by the envelope, the
/// route between them.
pub(crate) fn herald_yaml(redis_url: &str) -> String {
    format!(
        "# Written by herald-loadtest: Redis PUBLISH on {CHANNEL:?} -> the rooms each envelope names.\n\
         endpoints:\n  \
           loadtest-redis: {{kind: redis, url: {redis_url:?}, channel: {CHANNEL:?}, marshal: envelope}}\n  \
           loadtest-rooms: {{kind: room}}\n\
         routes:\n  \
           {ROUTE}: {{from: loadtest-redis, to: [loadtest-rooms]}}\n"
    )
}

/// Starts a private `redis-server`, then herald (one `herald dev`, or registries and edges) with the bridge's
/// route in a generated `herald.yaml` (kept in `log_dir`). redis-server is listed among the support processes, so
/// the report shows its CPU and RSS, and is stopped with the servers.
pub(crate) async fn start_herald(
    bin: &Path,
    nodes: usize,
    registries: usize,
    log_dir: &Path,
) -> anyhow::Result<Servers> {
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    let redis = RedisServer::start(log_dir).await?;
    let config = log_dir.join("herald-bridge.yaml");
    std::fs::write(&config, herald_yaml(&redis.url()))
        .with_context(|| format!("cannot write {}", config.display()))?;
    let extra = ["--config".to_owned(), config.display().to_string()];
    let mut servers = server::start_herald_with(bin, nodes, registries, log_dir, &extra)?;
    servers
        .support
        .push(("redis-server".to_owned(), redis.process.pid()));
    servers.redis_url = Some(redis.url());
    servers.keep(Box::new(redis));
    Ok(servers)
}

// === redis-server ===

/// A private `redis-server` on a free loopback port, without persistence, its log in the run's log directory;
/// killed by its PID when dropped.
pub(crate) struct RedisServer {
    process: ServerProcess,
    addr: SocketAddr,
}

impl RedisServer {
    /// Where `redis-server` is (`scripts/install-test-deps.sh` installs Debian's package).
    pub(crate) fn binary() -> Option<PathBuf> {
        find_binary(
            "redis-server",
            &[PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")],
        )
    }

    /// Starts one and waits until it answers `PING` (a port taken in the meantime is retried on another).
    pub(crate) async fn start(log_dir: &Path) -> anyhow::Result<RedisServer> {
        let binary = Self::binary().ok_or_else(|| {
            anyhow!("redis-server is not installed (scripts/install-test-deps.sh installs it)")
        })?;
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], server::free_port()?));
            let mut command = Command::new(&binary);
            command
                .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--protected-mode", "yes"])
                .arg("--dir")
                .arg(log_dir);
            let log = log_dir.join(format!("redis-server-{attempt}.log"));
            let mut process =
                ServerProcess::spawn("redis-server", command, log).map_err(|e| anyhow!("{e}"))?;
            let ready = async {
                process
                    .wait_accepting(&[addr], Duration::from_secs(15))
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                let mut conn = connect(&format!("redis://{addr}/")).await?;
                let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
                anyhow::ensure!(pong == "PONG", "PING answered {pong:?}");
                anyhow::Ok(())
            };
            match ready.await {
                Ok(()) => return Ok(RedisServer { process, addr }),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        bail!("redis-server did not start: {}", failures.join("; "))
    }

    /// `redis://127.0.0.1:<port>/`
    pub(crate) fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
}

async fn connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("redis url {url}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("redis connect to {url}"))
}

// === publisher ===

/// One publisher's Redis connection. `publish` only queues (open loop, like the gRPC stream); a task sends the
/// queue in order, as pipelines of up to [`MAX_BATCH`] `PUBLISH`es with one in flight, and counts Redis's
/// answers (how many subscribers each message reached).
pub(crate) struct RedisPublisher {
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    task: tokio::task::JoinHandle<anyhow::Result<Counts>>,
    /// Whether a `PUBLISH` that reached no subscriber is an error (not for the readiness probe, which publishes
    /// until herald's source has subscribed).
    strict: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    answered: u64,
    reached_nobody: u64,
}

impl RedisPublisher {
    /// Connects to `url`; `strict` makes a `PUBLISH` that reached no subscriber an error at [`Publisher::finish`].
    pub(crate) async fn connect(url: &str, strict: bool) -> anyhow::Result<RedisPublisher> {
        let mut conn = connect(url).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let task = tokio::spawn(async move {
            let mut counts = Counts::default();
            while let Some(first) = rx.recv().await {
                let mut pipe = redis::pipe();
                pipe.cmd("PUBLISH").arg(CHANNEL).arg(first);
                let mut batch = 1;
                while batch < MAX_BATCH {
                    let Ok(body) = rx.try_recv() else { break };
                    pipe.cmd("PUBLISH").arg(CHANNEL).arg(body);
                    batch += 1;
                }
                let receivers: Vec<i64> =
                    pipe.query_async(&mut conn).await.context("redis PUBLISH")?;
                counts.answered += receivers.len() as u64;
                counts.reached_nobody += receivers.iter().filter(|n| **n <= 0).count() as u64;
            }
            anyhow::Ok(counts)
        });
        Ok(RedisPublisher {
            tx: Some(tx),
            task,
            strict,
        })
    }
}

/// The body of one `PUBLISH`: an envelope naming `room`, with `data` (a JSON string from
/// [`crate::payload::encode`]) as its data.
pub(crate) fn envelope(room: u32, data: &[u8]) -> Vec<u8> {
    let room = room_json(room, false);
    let mut body = Vec::with_capacity(data.len() + room.len() + 24);
    body.extend_from_slice(br#"{"rooms":["#);
    body.extend_from_slice(room.as_bytes());
    body.extend_from_slice(br#"],"data":"#);
    body.extend_from_slice(data);
    body.push(b'}');
    body
}

impl Publisher for RedisPublisher {
    async fn publish(&mut self, room: u32, data: Vec<u8>) -> anyhow::Result<()> {
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(envelope(room, &data)).is_ok());
        if sent != Some(true) {
            bail!("the Redis publisher's connection failed");
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<Option<u64>> {
        drop(self.tx.take());
        let counts = self.task.await.context("the Redis publisher panicked")??;
        if self.strict && counts.reached_nobody > 0 {
            bail!(
                "{} of {} PUBLISHes reached no subscriber in Redis (herald's Redis source was not subscribed)",
                counts.reached_nobody,
                counts.answered
            );
        }
        Ok(Some(counts.answered))
    }
}

/// What the report says about a run that published through Redis.
pub(crate) fn notes(nodes: usize) -> Vec<String> {
    let mut notes = vec![format!(
        "publishes went to a private redis-server (PUBLISH on {CHANNEL:?}, envelope bodies naming the room) and \
         entered herald through its Redis bridge; latency runs from each PUBLISH's intended time to its WebSocket \
         delivery"
    )];
    if nodes > 1 {
        notes.push(
            "one edge consumes the Redis source; same-node/cross-node latency is split by each publisher's \
             nominal node, not by that edge"
                .to_owned(),
        );
    }
    notes
}

// === herald's side ===

/// herald's bridge counters over the publishing window (the difference of two `/metrics` readings, summed over
/// the nodes), so the probe's messages are not in them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct BridgeFigures {
    /// The Redis channel the publishers used.
    pub(crate) channel: String,
    /// Messages the route took from its Redis source (`herald_bridge_messages_in_total`).
    pub(crate) messages_in: u64,
    /// Messages it published into rooms (`herald_bridge_messages_out_total`).
    pub(crate) messages_out: u64,
    /// Messages it could not carry, by reason (`herald_bridge_messages_failed_total`), non-zero reasons only.
    pub(crate) failed: Vec<(String, u64)>,
    /// Restarts of the source consumer (`herald_bridge_task_restarts_total`): each one is a lost subscription,
    /// e.g. Redis disconnecting a subscriber that fell behind its output-buffer limit.
    pub(crate) source_restarts: u64,
}

/// Reads herald's bridge counters from every node's `/metrics`.
pub(crate) async fn read_figures(servers: &Servers) -> anyhow::Result<BridgeFigures> {
    let mut figures = BridgeFigures {
        channel: CHANNEL.to_owned(),
        ..BridgeFigures::default()
    };
    for node in &servers.nodes {
        let body = server::http_get(node.ws, "/metrics")
            .await
            .with_context(|| format!("reading {}'s /metrics", node.name))?;
        add_metrics(&mut figures, &body);
    }
    Ok(figures)
}

fn add_metrics(figures: &mut BridgeFigures, body: &str) {
    figures.messages_in += server::metric_sum(body, "herald_bridge_messages_in_total") as u64;
    figures.messages_out += server::metric_sum(body, "herald_bridge_messages_out_total") as u64;
    figures.source_restarts += server::metric_sum(body, "herald_bridge_task_restarts_total") as u64;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("herald_bridge_messages_failed_total{") else {
            continue;
        };
        let reason = rest
            .split_once("reason=\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(r, _)| r.to_owned());
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(reason), Some(value)) = (reason, value) {
            match figures.failed.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += value as u64,
                None => figures.failed.push((reason, value as u64)),
            }
        }
    }
}

impl BridgeFigures {
    /// What changed from `before` to `self`.
    pub(crate) fn since(&self, before: &BridgeFigures) -> BridgeFigures {
        BridgeFigures {
            channel: self.channel.clone(),
            messages_in: self.messages_in.saturating_sub(before.messages_in),
            messages_out: self.messages_out.saturating_sub(before.messages_out),
            failed: self
                .failed
                .iter()
                .map(|(reason, n)| {
                    let was = before
                        .failed
                        .iter()
                        .find(|(r, _)| r == reason)
                        .map_or(0, |(_, n)| *n);
                    (reason.clone(), n.saturating_sub(was))
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            source_restarts: self.source_restarts.saturating_sub(before.source_restarts),
        }
    }

    /// Messages herald's route could not carry, over every reason.
    pub(crate) fn failed_total(&self) -> u64 {
        self.failed.iter().map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{encode, Header, Scanner};

    #[test]
    fn the_envelope_carries_the_room_and_the_measured_data() {
        let header = Header {
            node: 0,
            publisher: 2,
            room: 7,
            seq: 41,
            intended_ns: 123_456_789,
        };
        let mut data = Vec::new();
        encode(&header, 64, &mut data);
        let body = envelope(7, &data);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["rooms"],
            serde_json::json!([{"lt": "7", "shard": "0"}])
        );
        assert_eq!(json["data"].as_str().unwrap().len() + 2, 64);
        assert_eq!(Scanner::default().scan(&body), Some(header));
    }

    #[test]
    fn the_generated_config_is_herald_yaml_with_one_route() {
        let yaml = herald_yaml("redis://127.0.0.1:6390/");
        // Checked here for shape; herald itself validates it in the smoke test (tests/smoke.rs).
        assert!(yaml.contains(
            "loadtest-redis: {kind: redis, url: \"redis://127.0.0.1:6390/\", channel: \"herald-loadtest\", \
             marshal: envelope}"
        ));
        assert!(yaml.contains("loadtest-rooms: {kind: room}\n"));
        assert!(yaml.contains("  loadtest: {from: loadtest-redis, to: [loadtest-rooms]}\n"));
    }

    #[test]
    fn only_herald_started_by_the_harness() {
        assert!(check_applicable(TargetKind::Herald, false).is_ok());
        let err = check_applicable(TargetKind::Nats, false).unwrap_err();
        assert!(err.contains("not applicable to nats"), "{err}");
        let err = check_applicable(TargetKind::Herald, true).unwrap_err();
        assert!(err.contains("--edge"), "{err}");
    }

    #[test]
    fn bridge_metrics_are_read_and_differenced() {
        let before_text = "\
herald_bridge_messages_in_total{route=\"loadtest\"} 5
herald_bridge_messages_out_total{route=\"loadtest\",destination=\"loadtest-rooms\"} 5
herald_bridge_messages_failed_total{route=\"loadtest\",reason=\"decode\"} 0
herald_bridge_messages_failed_total{route=\"loadtest\",reason=\"too_large\"} 1
herald_bridge_task_restarts_total{task=\"loadtest<-source\"} 0
";
        let after_text = before_text
            .replace("} 5\n", "} 1005\n")
            .replace("reason=\"decode\"} 0", "reason=\"decode\"} 3")
            .replace(
                "restarts_total{task=\"loadtest<-source\"} 0",
                "restarts_total{task=\"loadtest<-source\"} 1",
            );
        let (mut before, mut after) = (BridgeFigures::default(), BridgeFigures::default());
        add_metrics(&mut before, before_text);
        add_metrics(&mut after, &after_text);
        let d = after.since(&before);
        assert_eq!(d.messages_in, 1000);
        assert_eq!(d.messages_out, 1000);
        assert_eq!(d.failed, vec![("decode".to_owned(), 3)]);
        assert_eq!(d.failed_total(), 3);
        assert_eq!(d.source_restarts, 1);
    }
}
