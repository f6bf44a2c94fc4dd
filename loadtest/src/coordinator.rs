//! The coordinator: starts (or attaches to) the servers, starts the workers, publishes on the open-loop
//! schedule, gathers everything and judges the run.
//!
//! Phases: servers up and probed (a publish from every node reaches a probe subscriber on every node) → workers
//! connect and subscribe on the ramp schedule → publishing for `duration_secs` (progress bar, one timeline point
//! a second) → drain until deliveries stop or `drain_secs` → workers report, per (room, publisher), against the
//! counts actually sent.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::bridge::{self, RedisPublisher};
use crate::driver::herald::{GrpcPublisher, HeraldDriver, HttpPublisher};
use crate::driver::peers::{NatsPublish, SockudoPublish};
use crate::driver::{Driver, Incoming, Publisher, SubscriberClient};
use crate::failover::{self, Controller, PublisherSegment};
use crate::payload::{encode, instant_at, now_ns, Header};
use crate::peers::sockudo::PusherApp;
use crate::procstat;
use crate::report::*;
use crate::scenario::{PublishApi, Scenario};
use crate::server::{self, Servers};
use crate::stats::{Latency, Missing};
use crate::wire::{Command, ConnectReport, Event, FinalReport, Plan, Resubscribe, TargetKind};

/// What `herald-loadtest run` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) scenario: Scenario,
    pub(crate) target: TargetKind,
    pub(crate) publish_api: PublishApi,
    /// Attach to these nodes instead of starting servers.
    pub(crate) attach: Vec<String>,
    pub(crate) server_pids: Vec<u32>,
    pub(crate) api_key: Option<String>,
    /// Appended to the WebSocket path (e.g. `?token=...`).
    pub(crate) ws_query: String,
    pub(crate) herald_bin: Option<PathBuf>,
    pub(crate) out: PathBuf,
    pub(crate) progress: bool,
}

/// Runs a scenario end to end and writes the report; `Ok(report)` even when the run failed its criteria.
pub(crate) async fn run(mut opts: RunOptions) -> anyhow::Result<RunReport> {
    let mut notes = Vec::new();
    if opts.target != TargetKind::Herald && opts.scenario.cluster.nodes > 1 {
        // The harness runs each peer as one server: their clustering is not what is compared here.
        notes.push(format!(
            "{} runs as one node; the scenario's {} nodes' clients and publishers all use it",
            opts.target.name(),
            opts.scenario.cluster.nodes
        ));
        opts.scenario.cluster.nodes = 1;
        opts.scenario.clients.nodes.clear();
        opts.scenario.publish.nodes.clear();
    }
    let opts = opts;
    let scenario = &opts.scenario;
    if scenario.failover.is_some() {
        // main.rs answers "not applicable" for the peers before getting here.
        if opts.target != TargetKind::Herald {
            bail!("failover runs against herald only");
        }
        if !opts.attach.is_empty() {
            bail!(
                "failover kills and restarts the servers, so the harness must start them itself: --edge cannot \
                 be used"
            );
        }
        if opts.publish_api != PublishApi::Grpc {
            bail!("failover publishes over gRPC only (--publish-api http could resend a publish cut by a kill)");
        }
    }
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut servers = if opts.attach.is_empty() {
        match opts.target {
            TargetKind::Herald if opts.publish_api == PublishApi::Redis => {
                let bin = server::find_herald(opts.herald_bin.as_deref())?;
                bridge::start_herald(
                    &bin,
                    scenario.cluster.nodes,
                    scenario.cluster.registries,
                    &opts.out.join("logs"),
                )
                .await?
            }
            TargetKind::Herald => {
                let bin = server::find_herald(opts.herald_bin.as_deref())?;
                server::start_herald(
                    &bin,
                    scenario.cluster.nodes,
                    scenario.cluster.registries,
                    &opts.out.join("logs"),
                )?
            }
            TargetKind::Nats => server::start_nats(&opts.out.join("logs")).await?,
            TargetKind::Sockudo => server::start_sockudo(&opts.out.join("logs")).await?,
        }
    } else {
        server::attach(&opts.attach, &opts.server_pids)?
    };
    if let Some(key) = &opts.api_key {
        servers.api_key = Some(key.clone());
    }
    if servers.nodes.len() < scenario.cluster.nodes {
        bail!(
            "the scenario uses {} nodes but {} were given",
            scenario.cluster.nodes,
            servers.nodes.len()
        );
    }
    servers.nodes.truncate(scenario.cluster.nodes);

    let bar = if opts.progress {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("waiting for the servers");
    if opts.target == TargetKind::Herald {
        probe(&opts, &servers)
            .await
            .context("the servers are not ready")?;
    }

    let rss_before: Vec<u64> = servers
        .pids()
        .iter()
        .map(|(_, pid)| procstat::rss_bytes(*pid).unwrap_or(0))
        .collect();
    let sock_before = procstat::tcp_socket_memory_bytes();

    // === connect ===
    let workers = scenario.workers();
    bar.set_message(format!(
        "connecting {} subscribers from {workers} worker(s)",
        scenario.connections()
    ));
    let connect_start = now_ns() + 200_000_000;
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut procs = Vec::new();
    for w in 0..workers {
        let plan = Plan {
            scenario: scenario.clone(),
            target: opts.target,
            worker: w,
            nodes: servers.nodes.iter().map(|n| n.ws).collect(),
            driver_options: serde_json::json!({ "query": opts.ws_query }),
            source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (w % 250) as u8)),
            start_ns: connect_start,
        };
        procs.push(spawn_worker(w, &plan, event_tx.clone()).await?);
    }
    drop(event_tx);
    let mut connected = vec![None; workers];
    while connected.iter().any(Option::is_none) {
        let (w, event) = next_event(&mut events, &mut servers).await?;
        match event {
            Event::Connected(report) => connected[w] = Some(report),
            Event::Fatal(e) => bail!("worker {w}: {e}"),
            _ => {}
        }
    }
    let connected: Vec<ConnectReport> = connected.into_iter().flatten().collect();
    let connect = connect_figures(scenario, &connected, connect_start);
    let rss_connected: Vec<u64> = servers
        .pids()
        .iter()
        .map(|(_, pid)| procstat::rss_bytes(*pid).unwrap_or(0))
        .collect();
    let sock_connected = procstat::tcp_socket_memory_bytes();
    bar.println(format!(
        "{} subscribed ({} failed) at {:.0}/s, p99 time to ack {:.1} ms",
        connect.subscribed, connect.failed, connect.subscribes_per_sec, connect.time_to_ack.p99_ms
    ));

    // === publish ===
    let duration = Duration::from_secs_f64(scenario.duration_secs);
    let bridge_before = match opts.publish_api {
        PublishApi::Redis => Some(bridge::read_figures(&servers).await?),
        _ => None,
    };
    // Publishers connect before the schedule starts, so connection setup never shows up as latency.
    let publishers = connect_publishers(&opts, &servers).await?;
    let publish_start = now_ns() + 100_000_000;
    let publish_end = publish_start + duration.as_nanos() as u64;
    let record_from = publish_start + (scenario.warmup_secs * 1e9) as u64;
    for p in &mut procs {
        p.send(&Command::Publishing {
            start_ns: publish_start,
            record_from_ns: record_from,
        })
        .await?;
    }
    let sent: Arc<Vec<AtomicU64>> = Arc::new(
        (0..scenario.clients.rooms)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let publishers: Vec<PublisherHandle> = publishers
        .into_iter()
        .map(|(publisher, mut schedule)| {
            schedule.start = publish_start;
            schedule.end = publish_end;
            let switching = scenario.failover.as_ref().map(|_| Switching {
                grpc: servers.nodes.iter().filter_map(|n| n.grpc).collect(),
                api_key: servers.api_key.clone(),
            });
            tokio::spawn(publish_loop(publisher, schedule, sent.clone(), switching))
        })
        .collect();
    let controller = scenario.failover.as_ref().map(|spec| {
        tokio::spawn(
            Controller {
                spec: spec.clone(),
                procs: servers.procs.clone(),
                registry: servers.registry.clone(),
                nodes: servers.nodes.clone(),
                sent: sent.clone(),
                publish_start,
                publish_end,
            }
            .run(),
        )
    });

    let pids = servers.pids();
    let cpu_start: Vec<f64> = pids
        .iter()
        .map(|(_, pid)| procstat::cpu_secs(*pid).unwrap_or(0.0))
        .collect();
    let harness_pids: Vec<u32> = std::iter::once(std::process::id())
        .chain(procs.iter().filter_map(|p| p.child.id()))
        .collect();
    let harness_cpu_start: f64 = harness_pids
        .iter()
        .filter_map(|p| procstat::cpu_secs(*p))
        .sum();
    let mut rss_peak = rss_connected.clone();

    bar.set_style(
        ProgressStyle::with_template("{spinner} publishing [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_length(duration.as_secs().max(1));
    let slow_count = (0..scenario.connections())
        .filter(|i| scenario.subscriber(*i).slow)
        .count();
    let slow_stop = publish_start + (scenario.slow_consumers.stop_after_secs * 1e9) as u64;
    let mut slow_all_gone_at: Option<f64> = None;

    let mut timeline = Vec::new();
    // Seconds still waiting for a worker's tick: (deliveries, latencies), closed once every worker is past them.
    let mut open_seconds: std::collections::BTreeMap<u64, (u64, Latency)> = Default::default();
    let mut worker_second = vec![0u64; workers];
    let mut interval_delivered = 0u64;
    let mut interval_latency = Latency::default();
    let mut total_delivered_ticks = 0u64;
    // For the progress bar, RSS samples and the end of the drain; the timeline is built from the workers' ticks.
    let mut ticker = tokio::time::interval_at(
        instant_at(publish_start + 1_250_000_000),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut second = 0u64;
    let drain_deadline = publish_end + (scenario.drain_secs * 1e9) as u64;
    let mut last_change = now_ns();
    let mut last_total = 0u64;
    loop {
        tokio::select! {
            event = next_event(&mut events, &mut servers) => {
                let (w, event) = event?;
                match event {
                    Event::Tick(tick) => {
                        interval_delivered += tick.delivered;
                        total_delivered_ticks += tick.delivered;
                        interval_latency.add_wire(&tick.latency);
                        if tick.second > 0 {
                            let bin = open_seconds.entry(tick.second).or_default();
                            bin.0 += tick.delivered;
                            bin.1.add_wire(&tick.latency);
                            worker_second[w] = worker_second[w].max(tick.second);
                            let done = worker_second.iter().copied().min().unwrap_or(0);
                            while let Some(entry) = open_seconds.first_entry() {
                                if *entry.key() > done {
                                    break;
                                }
                                let (second, (delivered, latency)) = entry.remove_entry();
                                timeline.push(timeline_point(second, delivered, &latency));
                            }
                        }
                    }
                    Event::Fatal(e) => bail!("worker {w}: {e}"),
                    _ => {}
                }
            }
            _ = ticker.tick() => {
                let now = now_ns();
                // The end of the second the workers' ticks covered (Skip keeps whole seconds after a stall).
                second = second.max(now.saturating_sub(publish_start + 250_000_000) / 1_000_000_000);
                let pct = interval_latency.percentiles();
                bar.set_position(second.min(duration.as_secs()));
                bar.set_message(format!("{} deliveries/s, p99 {:.2} ms", interval_delivered, pct.p99_ms));
                interval_delivered = 0;
                interval_latency.reset();
                for (i, (_, pid)) in pids.iter().enumerate() {
                    if let Some(rss) = procstat::rss_bytes(*pid) {
                        rss_peak[i] = rss_peak[i].max(rss);
                    }
                }
                if slow_count > 0 && slow_all_gone_at.is_none() && now > slow_stop {
                    let gone = slow_disconnects(opts.target, &servers).await;
                    if gone.is_some_and(|g| g >= slow_count as u64) {
                        slow_all_gone_at = Some((now - slow_stop) as f64 / 1e9);
                    }
                }
                if total_delivered_ticks != last_total {
                    last_total = total_delivered_ticks;
                    last_change = now;
                }
                // Publishing is over: stop once deliveries have been still for a second (or at the deadline).
                if now >= publish_end && (now >= drain_deadline || now - last_change >= 1_000_000_000) {
                    break;
                }
            }
        }
    }
    for (second, (delivered, latency)) in std::mem::take(&mut open_seconds) {
        timeline.push(timeline_point(second, delivered, &latency));
    }
    // Keep the drain's tail only while something was still arriving.
    while timeline
        .last()
        .is_some_and(|p| p.t > scenario.duration_secs && p.delivered_per_sec == 0.0)
    {
        timeline.pop();
    }
    let elapsed = (publish_end - publish_start) as f64 / 1e9;
    let cpu_end: Vec<f64> = pids
        .iter()
        .map(|(_, pid)| procstat::cpu_secs(*pid).unwrap_or(0.0))
        .collect();
    let harness_cpu_end: f64 = harness_pids
        .iter()
        .filter_map(|p| procstat::cpu_secs(*p))
        .sum();
    let (mut publish, segments) = finish_publishers(publishers, scenario, &sent).await;
    let mut failover_run = None;
    if let Some(controller) = controller {
        bar.set_message("waiting for the last failover round");
        let outcome = controller
            .await
            .map_err(|e| anyhow!("the failover controller failed: {e}"))?;
        let (killed, switched, unexplained) =
            failover::killed_segments(&segments, &outcome.edge_rounds);
        publish.errors.extend(unexplained);
        let facts = failover::facts(&outcome, killed, publish_end);
        failover_run = Some((outcome, switched, facts));
    }
    bar.finish_and_clear();

    // === stop and gather ===
    let sent_counts: Vec<u64> = sent.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    for p in &mut procs {
        p.send(&Command::Stop {
            sent: sent_counts.clone(),
            failover: failover_run.as_ref().map(|(_, _, facts)| facts.clone()),
        })
        .await?;
    }
    let mut finals: Vec<Option<FinalReport>> = vec![None; workers];
    while finals.iter().any(Option::is_none) {
        let (w, event) = tokio::time::timeout(
            Duration::from_secs(30),
            next_event(&mut events, &mut servers),
        )
        .await
        .map_err(|_| anyhow!("workers did not report within 30 s of stop"))??;
        match event {
            Event::Final(report) => finals[w] = Some(report),
            Event::Fatal(e) => bail!("worker {w}: {e}"),
            _ => {}
        }
    }
    let finals: Vec<FinalReport> = finals.into_iter().flatten().collect();
    for mut p in procs {
        let _ = tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await;
        let _ = p.child.kill().await;
    }
    let slow_final = slow_disconnects(opts.target, &servers).await;
    let bridge_figures = match &bridge_before {
        Some(before) => Some(bridge::read_figures(&servers).await?.since(before)),
        None => None,
    };
    if bridge_figures.is_some() {
        notes.extend(bridge::notes(servers.nodes.len()));
    }

    // === judge ===
    let mut delivery = DeliveryFigures::default();
    let (mut same, mut cross, mut all) =
        (Latency::default(), Latency::default(), Latency::default());
    let mut churn = ChurnFigures {
        per_second: scenario.churn.per_second,
        ..ChurnFigures::default()
    };
    let mut churn_latency = Latency::default();
    let mut worker_cpu = 0.0;
    let mut last_delivery = publish_end;
    let mut failover_missing = Missing::default();
    let mut resubscribes: Vec<Resubscribe> = Vec::new();
    let mut unexplained_reconnects = 0;
    for f in &finals {
        failover_missing.add(f.failover_missing);
        resubscribes.extend_from_slice(&f.resubscribes);
        unexplained_reconnects += f.unexplained_reconnects;
        last_delivery = last_delivery.max(f.last_delivery_ns);
        delivery.delivered += f.delivered;
        delivery.lost += f.lost;
        delivery.streams_with_loss += f.streams_with_loss;
        delivery.duplicates += f.duplicates;
        delivery.reordered += f.reordered;
        delivery.disconnected += f.disconnected;
        delivery.unparsed_or_misrouted += f.unparsed;
        delivery.other += f.delivered_other;
        for &(code, n) in &f.close_codes {
            match delivery.close_codes.iter_mut().find(|(c, _)| *c == code) {
                Some((_, m)) => *m += n,
                None => delivery.close_codes.push((code, n)),
            }
        }
        same.add_wire(&f.same_node);
        cross.add_wire(&f.cross_node);
        churn.connected += f.churn_connected;
        churn.failed += f.churn_failed;
        churn_latency.add_wire(&f.churn_to_ack);
        worker_cpu += f.cpu_secs;
    }
    let _ = worker_cpu;
    all.add(&same);
    all.add(&cross);
    churn.time_to_ack = churn_latency.percentiles();
    // Expected: every delivery a publish owed a stable subscriber, including those a kill explains.
    delivery.expected = delivery.delivered - delivery.duplicates
        + delivery.lost
        + failover_missing.reconnect_gap
        + failover_missing.in_flight;
    delivery.loss_share = if delivery.expected > 0 {
        delivery.lost as f64 / delivery.expected as f64
    } else {
        0.0
    };
    // Over the publish window plus however long the backlog took to arrive: a server that falls behind and
    // catches up after the publishers stop does not get credit for the catching up.
    delivery.delivered_per_sec =
        delivery.delivered as f64 / ((last_delivery - publish_start) as f64 / 1e9).max(1e-9);
    delivery.backlog_drain_secs = (last_delivery - publish_end) as f64 / 1e9;

    let client_pids = servers.nodes.iter().filter(|n| n.pid.is_some()).count();
    let restarted = servers.procs.restarted();
    let server_usage: Vec<ServerUsage> = pids
        .iter()
        .enumerate()
        .map(|(i, (name, pid))| {
            let restarts = restarted
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, r)| *r);
            ServerUsage {
                name: name.clone(),
                pid: *pid,
                rss_before_connect: rss_before[i],
                rss_connected: rss_connected[i],
                rss_peak: rss_peak[i],
                // A restarted process's CPU is split over PIDs the harness did not all sample.
                cpu_percent: if restarts > 0 {
                    0.0
                } else {
                    (cpu_end[i] - cpu_start[i]) / elapsed * 100.0
                },
                restarts,
            }
        })
        .collect();
    let subscribed = connect.subscribed as f64;
    let memory = MemoryFigures {
        rss_per_connection_bytes: (client_pids == servers.nodes.len() && subscribed > 0.0).then(
            || {
                let delta: i64 = (0..client_pids)
                    .map(|i| rss_connected[i] as i64 - rss_before[i] as i64)
                    .sum();
                delta as f64 / subscribed
            },
        ),
        kernel_tcp_per_connection_bytes: match (sock_before, sock_connected) {
            (Some(a), Some(b)) if subscribed > 0.0 => Some((b as f64 - a as f64) / subscribed),
            _ => None,
        },
    };

    let mut failures = Vec::new();
    let pass = &scenario.pass;
    let connections = scenario.connections() as f64;
    if connect.failed as f64 > pass.max_connect_failures * connections {
        failures.push(format!(
            "{} of {} connections failed to connect or subscribe (first: {})",
            connect.failed,
            scenario.connections(),
            connect.errors.first().map_or("?", String::as_str)
        ));
    }
    if !publish.errors.is_empty() {
        failures.push(format!("publishing failed: {}", publish.errors.join("; ")));
    }
    if delivery.loss_share > pass.max_loss {
        failures.push(format!(
            "lost {} of {} expected deliveries{} ({:.4}%) on {} (room, publisher) streams; allowed {:.4}%",
            delivery.lost,
            delivery.expected,
            if scenario.failover.is_some() {
                " on live edges (not explained by a kill)"
            } else {
                ""
            },
            delivery.loss_share * 100.0,
            delivery.streams_with_loss,
            pass.max_loss * 100.0
        ));
    }
    let failover = match (failover_run, &scenario.failover) {
        (Some((outcome, switched, _)), Some(spec)) => Some(failover::figures(
            outcome,
            failover::Inputs {
                spec,
                resubscribes: &resubscribes,
                switched: &switched,
                missing: failover_missing,
                lost: delivery.lost,
                unexplained_reconnects,
                resubscribe_target_secs: scenario.targets.max_edge_kill_resubscribe_secs,
            },
        )),
        _ => None,
    };
    if let Some(f) = &failover {
        let never = f.clients_cut - f.clients_resubscribed;
        if never > 0 {
            failures.push(format!(
                "{never} of {} subscribers of killed edges never subscribed again",
                f.clients_cut
            ));
        }
        if f.unexplained_reconnects > 0 {
            failures.push(format!(
                "{} subscriber connections closed with no kill to explain it (edges that were not killed must \
                 keep their clients)",
                f.unexplained_reconnects
            ));
        }
        if f.skipped_kills > 0 {
            notes.push(format!(
                "{} of {} kills were not made: the rounds before them ran into the last {} s of publishing, \
                 kept for settling",
                f.skipped_kills,
                f.leader_kills_planned + f.edge_kills_planned,
                spec_settle(scenario)
            ));
        }
    }
    if pass.exact_order && (delivery.duplicates > 0 || delivery.reordered > 0) {
        failures.push(format!(
            "{} duplicate and {} reordered deliveries",
            delivery.duplicates, delivery.reordered
        ));
    }
    if delivery.unparsed_or_misrouted > 0 {
        failures.push(format!(
            "{} deliveries were unreadable or for a room the subscriber did not subscribe to",
            delivery.unparsed_or_misrouted
        ));
    }
    let mut report = RunReport {
        scenario: scenario.clone(),
        target: opts.target.name().to_owned(),
        publish_api: match (opts.target, opts.publish_api) {
            (TargetKind::Nats, _) => "NATS TCP",
            (TargetKind::Sockudo, _) => "Pusher HTTP API",
            (TargetKind::Herald, PublishApi::Grpc) => "gRPC",
            (TargetKind::Herald, PublishApi::Http) => "HTTP",
            (TargetKind::Herald, PublishApi::Redis) => "Redis PUBLISH through herald's bridge",
        }
        .to_owned(),
        started_at,
        machine: Machine::describe(),
        nodes: servers.nodes.len(),
        workers,
        connect,
        publish,
        delivery,
        latency: LatencyFigures {
            all: all.percentiles(),
            same_node: same.percentiles(),
            cross_node: cross.percentiles(),
        },
        churn: (scenario.churn.per_second > 0.0).then_some(churn),
        slow_consumers: SlowFigures {
            slow_consumers: slow_count,
            server_disconnects: slow_final,
            all_disconnected_after_secs: slow_all_gone_at,
        },
        servers: server_usage,
        memory,
        bridge: bridge_figures,
        harness_cpu_percent: (harness_cpu_end - harness_cpu_start) / elapsed * 100.0,
        timeline,
        failover,
        notes,
        passed: failures.is_empty(),
        failures,
        targets: Vec::new(),
        targets_missed: 0,
        targets_not_measured: 0,
        verdict: String::new(),
    };
    report.judge_targets();
    report.write(&opts.out)?;
    drop(servers);
    Ok(report)
}

fn timeline_point(second: u64, delivered: u64, latency: &Latency) -> TimelinePoint {
    let pct = latency.percentiles();
    TimelinePoint {
        t: second as f64,
        delivered_per_sec: delivered as f64,
        p50_ms: pct.p50_ms,
        p99_ms: pct.p99_ms,
        max_ms: pct.max_ms,
    }
}

fn spec_settle(scenario: &Scenario) -> f64 {
    scenario.failover.as_ref().map_or(0.0, |f| f.settle_secs)
}

// === servers ===

/// Waits until a publish from every node reaches a subscriber on every node (so a cluster's interest has
/// propagated), or fails after 30 s.
async fn probe(opts: &RunOptions, servers: &Servers) -> anyhow::Result<()> {
    const PROBE_ROOM: u32 = u32::MAX;
    let nodes = &servers.nodes;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let seen = Rc::new(RefCell::new(vec![vec![false; nodes.len()]; nodes.len()]));
            let driver = HeraldDriver {
                query: opts.ws_query.clone(),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            for (i, node) in nodes.iter().enumerate() {
                let mut client = loop {
                    let attempt = async {
                        let mut c = driver
                            .connect(node.ws, IpAddr::V4(Ipv4Addr::LOCALHOST))
                            .await?;
                        c.subscribe(PROBE_ROOM, false).await?;
                        anyhow::Ok(c)
                    };
                    match attempt.await {
                        Ok(c) => break c,
                        Err(e) if tokio::time::Instant::now() > deadline => {
                            return Err(e.context(format!("probe subscriber on {}", node.name)))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                let seen = seen.clone();
                tokio::task::spawn_local(async move {
                    while let Ok(incoming) = client.recv().await {
                        if let Incoming::Payload(h) = incoming {
                            if let Some(slot) = seen.borrow_mut()[i].get_mut(usize::from(h.node)) {
                                *slot = true;
                            }
                        }
                    }
                });
            }
            let mut publishers = Vec::new();
            for node in nodes {
                let grpc = node
                    .grpc
                    .ok_or_else(|| anyhow!("{} has no gRPC address", node.name));
                publishers.push(match opts.publish_api {
                    PublishApi::Grpc => AnyPublisher::Grpc(
                        GrpcPublisher::connect(grpc?, servers.api_key.as_deref()).await?,
                    ),
                    PublishApi::Http => AnyPublisher::Http(
                        HttpPublisher::connect(node.ws, servers.api_key.as_deref()).await?,
                    ),
                    PublishApi::Redis => AnyPublisher::Redis(
                        RedisPublisher::connect(redis_url(servers)?, false).await?,
                    ),
                });
            }
            for seq in 0u64.. {
                let all_seen = seen.borrow().iter().all(|row| row.iter().all(|s| *s));
                if all_seen {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "publishes did not reach every node within 30 s (seen: {:?})",
                        seen.borrow()
                    );
                }
                for (n, p) in publishers.iter_mut().enumerate() {
                    let mut data = Vec::new();
                    encode(
                        &Header {
                            node: n as u16,
                            publisher: 0,
                            room: PROBE_ROOM,
                            seq,
                            intended_ns: now_ns(),
                        },
                        0,
                        &mut data,
                    );
                    p.publish(PROBE_ROOM, data).await?;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for p in publishers {
                p.finish().await?;
            }
            Ok(())
        })
        .await
}

async fn slow_disconnects(target: TargetKind, servers: &Servers) -> Option<u64> {
    if target != TargetKind::Herald {
        return None;
    }
    let mut total = 0.0;
    for node in &servers.nodes {
        let body = server::http_get(node.ws, "/metrics").await.ok()?;
        total += server::metric_sum(&body, "herald_slow_consumer_disconnects_total");
    }
    Some(total as u64)
}

// === workers ===

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
}

impl WorkerProc {
    async fn send(&mut self, command: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .await
            .context("a worker went away")?;
        self.stdin.flush().await?;
        Ok(())
    }
}

async fn spawn_worker(
    w: usize,
    plan: &Plan,
    events: mpsc::UnboundedSender<(usize, anyhow::Result<Event>)>,
) -> anyhow::Result<WorkerProc> {
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a worker process")?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("worker pipes missing");
    };
    let mut line = serde_json::to_vec(plan)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    stdin.flush().await?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let event = match lines.next_line().await {
                Ok(Some(line)) => serde_json::from_str::<Event>(&line)
                    .map_err(|e| anyhow!("unreadable worker line ({e}): {line}")),
                Ok(None) => Err(anyhow!("the worker exited")),
                Err(e) => Err(anyhow!("reading the worker: {e}")),
            };
            let end = event.is_err();
            if events.send((w, event)).is_err() || end {
                return;
            }
        }
    });
    Ok(WorkerProc { child, stdin })
}

async fn next_event(
    events: &mut mpsc::UnboundedReceiver<(usize, anyhow::Result<Event>)>,
    servers: &mut Servers,
) -> anyhow::Result<(usize, Event)> {
    let (w, event) = events
        .recv()
        .await
        .ok_or_else(|| anyhow!("every worker is gone"))?;
    servers.check_alive()?;
    Ok((w, event.with_context(|| format!("worker {w}"))?))
}

fn connect_figures(scenario: &Scenario, reports: &[ConnectReport], start: u64) -> ConnectFigures {
    let mut connect = Latency::default();
    let mut to_ack = Latency::default();
    let mut figures = ConnectFigures {
        connections: scenario.connections(),
        ..ConnectFigures::default()
    };
    let mut last = start;
    for r in reports {
        figures.subscribed += r.subscribed;
        figures.failed += r.failed;
        for e in &r.errors {
            if figures.errors.len() < 5 {
                figures.errors.push(e.clone());
            }
        }
        connect.add_wire(&r.connect);
        to_ack.add_wire(&r.to_ack);
        last = last.max(r.last_ack_ns);
    }
    figures.connect = connect.percentiles();
    figures.time_to_ack = to_ack.percentiles();
    let secs = (last.saturating_sub(start)) as f64 / 1e9;
    figures.subscribes_per_sec = if secs > 0.0 {
        figures.subscribed as f64 / secs
    } else {
        0.0
    };
    figures
}

// === publishers ===

/// The publisher kinds, so one generic task loop serves them all.
enum AnyPublisher {
    Grpc(GrpcPublisher),
    Http(HttpPublisher),
    Nats(NatsPublish),
    Sockudo(SockudoPublish),
    Redis(RedisPublisher),
}

impl Publisher for AnyPublisher {
    async fn publish(&mut self, room: u32, data: Vec<u8>) -> anyhow::Result<()> {
        match self {
            AnyPublisher::Grpc(p) => p.publish(room, data).await,
            AnyPublisher::Http(p) => p.publish(room, data).await,
            AnyPublisher::Nats(p) => p.publish(room, data).await,
            AnyPublisher::Sockudo(p) => p.publish(room, data).await,
            AnyPublisher::Redis(p) => p.publish(room, data).await,
        }
    }

    async fn finish(self) -> anyhow::Result<Option<u64>> {
        match self {
            AnyPublisher::Grpc(p) => p.finish().await,
            AnyPublisher::Http(p) => p.finish().await,
            AnyPublisher::Nats(p) => p.finish().await,
            AnyPublisher::Sockudo(p) => p.finish().await,
            AnyPublisher::Redis(p) => p.finish().await,
        }
    }
}

struct PublisherOutcome {
    accepted: Option<u64>,
    max_lag_ns: u64,
    last_send_ns: u64,
    /// Failover: streams that broke (the publisher moved to another edge after each).
    segments: Vec<PublisherSegment>,
}

type PublisherHandle = tokio::task::JoinHandle<anyhow::Result<PublisherOutcome>>;

/// Connects every publisher; their schedules get start and end times once all are connected.
async fn connect_publishers(
    opts: &RunOptions,
    servers: &Servers,
) -> anyhow::Result<Vec<(AnyPublisher, Schedule)>> {
    let scenario = &opts.scenario;
    if scenario.publish.rate <= 0.0 {
        return Ok(Vec::new());
    }
    let per_publisher = scenario.publish.rate / scenario.publish.publishers as f64;
    let mut handles = Vec::new();
    for p in 0..scenario.publish.publishers {
        let node_index = scenario.publisher_node(p);
        let node = &servers.nodes[node_index];
        let publisher = match (opts.target, opts.publish_api) {
            (TargetKind::Nats, _) => AnyPublisher::Nats(NatsPublish::connect(node.publish).await?),
            (TargetKind::Sockudo, _) => AnyPublisher::Sockudo(
                SockudoPublish::connect(node.publish, PusherApp::default()).await?,
            ),
            (TargetKind::Herald, PublishApi::Grpc) => {
                let grpc = node.grpc.ok_or_else(|| {
                    anyhow!("{} has no gRPC address (--edge HTTP/GRPC)", node.name)
                })?;
                AnyPublisher::Grpc(GrpcPublisher::connect(grpc, servers.api_key.as_deref()).await?)
            }
            (TargetKind::Herald, PublishApi::Http) => AnyPublisher::Http(
                HttpPublisher::connect(node.publish, servers.api_key.as_deref()).await?,
            ),
            (TargetKind::Herald, PublishApi::Redis) => {
                AnyPublisher::Redis(RedisPublisher::connect(redis_url(servers)?, true).await?)
            }
        };
        let schedule = Schedule {
            publisher: p as u32,
            node: Arc::new(AtomicU16::new(node_index as u16)),
            rooms: scenario.publisher_rooms(p),
            interval_ns: (1e9 / per_publisher).round() as u64,
            start: 0,
            end: 0,
            payload_bytes: scenario.publish.payload_bytes,
        };
        handles.push((publisher, schedule));
    }
    Ok(handles)
}

/// The redis-server of a run that publishes through herald's Redis bridge.
fn redis_url(servers: &Servers) -> anyhow::Result<&str> {
    servers.redis_url.as_deref().ok_or_else(|| {
        anyhow!("publishing through Redis needs the harness to start herald and redis-server")
    })
}

struct Schedule {
    publisher: u32,
    /// The node it publishes through now (a failover run moves it), as payload headers carry it.
    node: Arc<AtomicU16>,
    rooms: Vec<u32>,
    interval_ns: u64,
    start: u64,
    end: u64,
    payload_bytes: usize,
}

/// Failover: where a publisher goes when its stream to an edge breaks.
struct Switching {
    /// Every node's gRPC address, by node index.
    grpc: Vec<SocketAddr>,
    api_key: Option<String>,
}

impl Switching {
    /// A new stream on another node (the others in turn, then `from` itself), trying until one connects or 30 s
    /// have passed.
    async fn connect(&self, from: usize) -> anyhow::Result<(usize, AnyPublisher)> {
        let n = self.grpc.len();
        let deadline = now_ns() + 30_000_000_000;
        let mut pause = Duration::from_millis(20);
        loop {
            let mut last_error = None;
            for k in 1..=n {
                let node = (from + k) % n;
                match GrpcPublisher::connect(self.grpc[node], self.api_key.as_deref()).await {
                    Ok(p) => return Ok((node, AnyPublisher::Grpc(p))),
                    Err(e) => last_error = Some(e),
                }
            }
            if now_ns() > deadline {
                return Err(last_error
                    .unwrap_or_else(|| anyhow!("no node"))
                    .context("no edge took a new PublishStream within 30 s"));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// Open loop: message k is due at `start + k * interval` and carries that time, whenever it actually goes out.
/// A publisher that falls behind sends its backlog at once rather than skipping it, so server stalls show up as
/// latency instead of as a lower send rate (coordinated omission).
///
/// The schedule runs on its own OS thread: tokio's timer rounds sleeps up to whole milliseconds, which would add
/// up to a millisecond of the harness's own lateness to every measured latency; `thread::sleep` wakes within
/// tens of microseconds. The async side only forwards what the schedule produced.
///
/// In a failover run (`switching`), a publish that fails because the stream's edge died is sent again on a new
/// stream to another edge (it never left: see `GrpcPublisher::publish`), and the broken stream's range of
/// sequence numbers per room is recorded, so what the edge died holding can be told from loss.
async fn publish_loop(
    mut publisher: AnyPublisher,
    s: Schedule,
    sent: Arc<Vec<AtomicU64>>,
    switching: Option<Switching>,
) -> anyhow::Result<PublisherOutcome> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, Vec<u8>, u64)>();
    let rooms = s.rooms.clone();
    let publisher_id = s.publisher;
    let node_now = s.node.clone();
    let schedule = std::thread::Builder::new()
        .name(format!("schedule-{}", s.publisher))
        .spawn(move || {
            let mut seqs = vec![0u64; s.rooms.len()];
            // A fixed count (not "until end") so the achieved rate is exactly the target when nothing lags.
            let count = ((s.end - s.start) as f64 / s.interval_ns.max(1) as f64).round() as u64;
            for k in 0..count {
                let intended = s.start + k * s.interval_ns.max(1);
                let now = now_ns();
                if intended > now {
                    std::thread::sleep(Duration::from_nanos(intended - now));
                }
                let slot = k as usize % s.rooms.len();
                let mut data = Vec::with_capacity(s.payload_bytes + 2);
                encode(
                    &Header {
                        node: s.node.load(Ordering::Relaxed),
                        publisher: s.publisher,
                        room: s.rooms[slot],
                        seq: seqs[slot],
                        intended_ns: intended,
                    },
                    s.payload_bytes,
                    &mut data,
                );
                seqs[slot] += 1;
                if tx.send((s.rooms[slot], data, intended)).is_err() {
                    // The sending side failed and reported why; stop producing.
                    return;
                }
            }
        })
        .context("cannot start a schedule thread")?;
    let mut max_lag_ns = 0;
    let mut last_send_ns = 0;
    let mut segments = Vec::new();
    let counts = |sent: &[AtomicU64]| -> Vec<u64> {
        rooms
            .iter()
            .map(|r| sent[*r as usize].load(Ordering::Relaxed))
            .collect()
    };
    let mut segment_start = counts(&sent);
    let result = async {
        while let Some((room, data, intended)) = rx.recv().await {
            let now = now_ns();
            max_lag_ns = max_lag_ns.max(now.saturating_sub(intended));
            let mut data = data;
            loop {
                let spare = switching.as_ref().map(|_| data.clone());
                match publisher.publish(room, data).await {
                    Ok(()) => break,
                    Err(e) => {
                        let (Some(switching), Some(spare)) = (&switching, spare) else {
                            return Err(e);
                        };
                        let from = usize::from(node_now.load(Ordering::Relaxed));
                        let end = counts(&sent);
                        segments.push(PublisherSegment {
                            publisher: publisher_id,
                            node: from,
                            ended_ns: now_ns(),
                            error: format!("{e:#}"),
                            rooms: rooms
                                .iter()
                                .zip(segment_start.iter().zip(&end))
                                .map(|(r, (a, b))| (*r, *a, *b))
                                .collect(),
                        });
                        let (node, next) = switching.connect(from).await?;
                        publisher = next;
                        node_now.store(node as u16, Ordering::Relaxed);
                        segment_start = end;
                        data = spare;
                    }
                }
            }
            sent[room as usize].fetch_add(1, Ordering::Relaxed);
            last_send_ns = now;
        }
        anyhow::Ok(())
    }
    .await;
    drop(rx);
    let _ = tokio::task::spawn_blocking(move || schedule.join()).await;
    result?;
    let accepted = publisher.finish().await?;
    if !segments.is_empty() {
        // Only the last stream answers: compare it with what went through it alone.
        let through_last: u64 = counts(&sent)
            .iter()
            .zip(&segment_start)
            .map(|(b, a)| b - a)
            .sum();
        if let Some(a) = accepted {
            if a != through_last {
                bail!(
                    "publisher {publisher_id}: its last stream sent {through_last} publishes but the edge \
                     accepted {a}"
                );
            }
        }
    }
    Ok(PublisherOutcome {
        accepted: if segments.is_empty() { accepted } else { None },
        max_lag_ns,
        last_send_ns,
        segments,
    })
}

async fn finish_publishers(
    handles: Vec<PublisherHandle>,
    scenario: &Scenario,
    sent: &[AtomicU64],
) -> (PublishFigures, Vec<PublisherSegment>) {
    let mut figures = PublishFigures {
        publishers: if scenario.publish.rate > 0.0 {
            scenario.publish.publishers
        } else {
            0
        },
        target_rate: scenario.publish.rate,
        ..PublishFigures::default()
    };
    let mut accepted = Some(0u64);
    let mut last_send = 0u64;
    let mut segments = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(Ok(outcome)) => {
                accepted = accepted.zip(outcome.accepted).map(|(a, b)| a + b);
                figures.max_schedule_lag_ms = figures
                    .max_schedule_lag_ms
                    .max(outcome.max_lag_ns as f64 / 1e6);
                last_send = last_send.max(outcome.last_send_ns);
                segments.extend(outcome.segments);
            }
            Ok(Err(e)) => figures.errors.push(format!("{e:#}")),
            Err(e) => figures.errors.push(format!("publisher task: {e}")),
        }
    }
    figures.sent = sent.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    figures.accepted = accepted;
    figures.achieved_rate = figures.sent as f64 / scenario.duration_secs;
    if let Some(a) = figures.accepted {
        if a != figures.sent {
            figures.errors.push(format!(
                "sent {} publishes but the server accepted {a}",
                figures.sent
            ));
        }
    }
    let _ = last_send;
    (figures, segments)
}
