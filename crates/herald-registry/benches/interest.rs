//! Registry interest throughput and commit latency: a 3-member registry in this process (real gRPC between the
//! members on loopback, durable stores in temp directories), 64 registered edges, and one task per edge, each
//! with its own [`RegistryClient`], sending interest updates the way an edge does: one update in flight, over
//! the edge's interest stream (`HERALD_BENCH_PATH=unary` uses one unary call per update instead). The latency of
//! an update is the commit latency the edge sees: from sending it to the leader's answer that the raft entry
//! holding it committed.
//!
//! Two kinds of run:
//! - *Saturation* (closed loop): each edge sends updates of K room changes back to back, alternately adding
//!   and removing K of its own rooms. Throughput is the most the registry commits; latency is mostly queueing.
//! - *Offered rate* (open loop): room changes arise at each edge on a fixed schedule (the total rate split over
//!   the edges), and each edge sends whatever has arisen whenever its previous update has been answered, as
//!   `registry_link` does (waiting `FLUSH` first when it was idle). Besides commit latency, this reports each
//!   change's latency from the moment it arose on schedule to its commit, so a stalled registry shows as
//!   latency rather than as fewer requests (no coordinated omission).
//!
//! Not a criterion benchmark: it is a throughput/latency run that prints a Markdown table.
//!
//! ```sh
//! cargo bench -p herald-registry --bench interest
//! HERALD_BENCH_SECS=3 HERALD_BENCH_WARMUP_SECS=1 HERALD_BENCH_K=16 cargo bench -p herald-registry --bench interest
//! ```
//!
//! Environment: `HERALD_BENCH_SECS` (measured seconds, default 10), `HERALD_BENCH_WARMUP_SECS` (default 2),
//! `HERALD_BENCH_EDGES` (default 64), `HERALD_BENCH_K` (comma-separated changes per update for saturation runs,
//! default `1,16`; empty for none), `HERALD_BENCH_RATES` (comma-separated offered changes/s, default `50000`;
//! empty for none), `HERALD_BENCH_PATH` (`stream`, the default, or `unary`), `HERALD_BENCH_MEMBERS` (`separate`,
//! the default: each member on its own runtime, as separate processes would be; `shared`: members and clients on
//! one runtime, the form of the earliest figures), `HERALD_BENCH_IN_FLIGHT` (the leader's interest proposals in
//! flight). Before the loads it measures one idle raft entry at a time, the floor under every latency here.
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a one-second smoke run of each kind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpListener;

use herald_registry::{
    ClientError, ClusterSecret, InterestOutcome, InterestUpdates, NodeId, RegistryClient,
    RegistryConfig, RegistryHandle,
};

const SECRET: &str = "registry-interest-bench-secret";
/// Rooms each edge cycles through. An offered-rate update carries at most this many changes, so one update
/// never adds and removes the same room.
const ROOMS_PER_EDGE: usize = 1024;
/// How long starting the cluster and registering the edges may take.
const SETUP_BUDGET: Duration = Duration::from_secs(30);
/// What an idle edge waits for more changes before sending (the default `cluster.interest-flush-ms`).
const FLUSH: Duration = Duration::from_millis(5);

/// Which API the edges send their updates with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// `InterestStream`, one long-lived stream per edge (what edges use).
    Stream,
    /// One `UpdateInterest` call per update.
    Unary,
}

/// What one run drives.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// Updates of `k` changes, back to back.
    Saturation { k: usize },
    /// `rate` room changes per second over all edges, on schedule.
    Offered { rate: f64 },
}

struct Settings {
    warmup: Duration,
    measure: Duration,
    edges: usize,
    loads: Vec<Load>,
    path: Path,
    members: Members,
}

impl Settings {
    fn from_env(full: bool) -> Settings {
        fn secs(name: &str, default: f64) -> Duration {
            let value = std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse::<f64>()
                        .unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
                })
                .unwrap_or(default);
            Duration::from_secs_f64(value)
        }
        fn list(name: &str, default: &str) -> Vec<f64> {
            let value = std::env::var(name).unwrap_or_else(|_| default.to_string());
            value
                .split(',')
                .filter(|v| !v.trim().is_empty())
                .map(|v| {
                    v.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("{name}: {v:?}: {e}"))
                })
                .collect()
        }
        let (warmup, measure, ks, rates) = if full {
            (2.0, 10.0, "1,16", "50000")
        } else {
            (0.2, 1.0, "1", "2000")
        };
        let mut loads: Vec<Load> = list("HERALD_BENCH_K", ks)
            .into_iter()
            .map(|k| Load::Saturation { k: k as usize })
            .collect();
        loads.extend(
            list("HERALD_BENCH_RATES", rates)
                .into_iter()
                .map(|rate| Load::Offered { rate }),
        );
        let path = match std::env::var("HERALD_BENCH_PATH").as_deref() {
            Ok("unary") => Path::Unary,
            Ok("stream") | Err(_) => Path::Stream,
            Ok(other) => panic!("HERALD_BENCH_PATH={other:?}: expected stream or unary"),
        };
        let members = match std::env::var("HERALD_BENCH_MEMBERS").as_deref() {
            Ok("separate") | Err(_) => Members::Separate,
            Ok("shared") => Members::Shared,
            Ok(other) => panic!("HERALD_BENCH_MEMBERS={other:?}: expected separate or shared"),
        };
        Settings {
            warmup: secs("HERALD_BENCH_WARMUP_SECS", warmup),
            measure: secs("HERALD_BENCH_SECS", measure),
            edges: std::env::var("HERALD_BENCH_EDGES")
                .ok()
                .map(|v| v.parse().expect("HERALD_BENCH_EDGES is a number"))
                .unwrap_or(64),
            loads,
            path,
            members,
        }
    }
}

/// Three members with ids 1..=3, started with the same peer list.
struct Cluster {
    members: BTreeMap<NodeId, RegistryHandle>,
    addrs: Vec<String>,
    /// Each member's own runtime when members run apart from the clients (see [`Members`]).
    runtimes: Vec<tokio::runtime::Runtime>,
    _dirs: Vec<TempDir>,
}

/// Where the members' tasks run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Members {
    /// Each member on its own multi-threaded runtime (its own worker threads), as three `herald registry`
    /// processes would be: the kernel schedules members and clients, and a member's raft tasks do not queue
    /// behind 64 clients' tasks in one scheduler.
    Separate,
    /// Members and clients share the bench's one runtime (the form of the earlier figures).
    Shared,
}

impl Cluster {
    async fn start(placement: Members) -> Cluster {
        let mut listeners = BTreeMap::new();
        let mut peers = BTreeMap::new();
        for id in 1..=3 {
            // A std listener, so it can be registered with whichever runtime the member runs on.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            peers.insert(id, listener.local_addr().unwrap().to_string());
            listeners.insert(id, listener);
        }
        let mut members = BTreeMap::new();
        let mut runtimes = Vec::new();
        let mut dirs = Vec::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().expect("temp dir");
            let config = RegistryConfig::new(
                id,
                peers[&id].clone(),
                dir.path(),
                ClusterSecret::new(SECRET).unwrap(),
            )
            .with_peers(peers.clone());
            let mut config = config;
            if let Ok(n) = std::env::var("HERALD_BENCH_IN_FLIGHT") {
                config.interest_proposals_in_flight =
                    n.parse().expect("HERALD_BENCH_IN_FLIGHT is a number");
            }
            let start = async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                herald_registry::start(config, listener).await
            };
            let handle = match placement {
                Members::Shared => start.await,
                Members::Separate => {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .thread_name(format!("member-{id}"))
                        .enable_all()
                        .build()
                        .expect("member runtime");
                    let started = runtime.spawn(start);
                    runtimes.push(runtime);
                    started.await.expect("member start task")
                }
            }
            .expect("member starts");
            members.insert(id, handle);
            dirs.push(dir);
        }
        Cluster {
            members,
            addrs: peers.into_values().collect(),
            runtimes,
            _dirs: dirs,
        }
    }

    async fn leader(&self) -> &RegistryHandle {
        loop {
            if let Some(leader) = self.members.values().find(|m| m.is_leader()) {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(self.addrs.clone(), ClusterSecret::new(SECRET).unwrap()).unwrap()
    }

    async fn shutdown(self) {
        for (_, member) in self.members {
            member.shutdown().await.expect("member stops cleanly");
        }
        for runtime in self.runtimes {
            // Dropping a runtime blocks, which an async context must not do.
            runtime.shutdown_background();
        }
    }
}

/// An edge's connection for interest updates, by [`Path`].
enum Sender {
    Stream(Box<InterestUpdates>),
    Unary(RegistryClient, String),
}

impl Sender {
    fn new(client: RegistryClient, edge: &str, path: Path) -> Sender {
        match path {
            Path::Stream => Sender::Stream(Box::new(client.interest_updates(edge))),
            Path::Unary => Sender::Unary(client, edge.to_string()),
        }
    }

    async fn send(
        &mut self,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<InterestOutcome, ClientError> {
        match self {
            Sender::Stream(updates) => updates.update(add, remove).await,
            Sender::Unary(client, edge) => client.update_interest(edge, add, remove).await,
        }
    }
}

/// What one edge's task measured.
#[derive(Default)]
struct EdgeResult {
    /// Commit latency of each update answered in the measured window, in microseconds.
    update_latencies_us: Vec<u32>,
    /// Offered rate only: for each change committed in the window, from when it arose to its commit.
    change_latencies_us: Vec<u32>,
    /// Room changes committed in the measured window.
    changes: u64,
    errors: u64,
}

impl EdgeResult {
    /// Counts one answered update of `changes` room changes that took `latency`; true when it committed.
    fn record(
        &mut self,
        outcome: &Result<InterestOutcome, ClientError>,
        latency: Duration,
        changes: usize,
    ) -> bool {
        match outcome {
            Ok(InterestOutcome::Committed(_)) => {
                self.update_latencies_us.push(micros(latency));
                self.changes += changes as u64;
                true
            }
            Ok(InterestOutcome::UnknownEdge) | Err(_) => {
                self.errors += 1;
                false
            }
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn rooms_of(edge: &str) -> Vec<String> {
    (0..ROOMS_PER_EDGE)
        .map(|i| format!(r#"{{"bench":"{edge}","room":{i}}}"#))
        .collect()
}

/// Change `n` of an edge: pass `n / ROOMS_PER_EDGE` over its rooms adds them when even, removes them when odd.
fn change(rooms: &[String], n: usize) -> (bool, &String) {
    (
        (n / ROOMS_PER_EDGE).is_multiple_of(2),
        &rooms[n % ROOMS_PER_EDGE],
    )
}

async fn run_saturating_edge(
    mut sender: Sender,
    edge: String,
    k: usize,
    measure_from: Instant,
    end: Instant,
) -> EdgeResult {
    let rooms = rooms_of(&edge);
    let mut result = EdgeResult::default();
    let mut n = 0usize;
    while Instant::now() < end {
        // Update 2i adds K rooms, update 2i+1 removes the same K; the next pair moves on to the next K rooms.
        let first = (n / 2) * k;
        let batch: Vec<String> = (0..k)
            .map(|j| rooms[(first + j) % ROOMS_PER_EDGE].clone())
            .collect();
        let (add, remove) = if n.is_multiple_of(2) {
            (batch, Vec::new())
        } else {
            (Vec::new(), batch)
        };
        let started = Instant::now();
        let outcome = sender.send(add, remove).await;
        let done = Instant::now();
        if done >= measure_from && done < end {
            result.record(&outcome, done - started, k);
        }
        n += 1;
    }
    result
}

async fn run_offered_edge(
    mut sender: Sender,
    edge: String,
    interval: Duration,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> EdgeResult {
    let rooms = rooms_of(&edge);
    let arises = |n: usize| start + interval.mul_f64(n as f64);
    let mut result = EdgeResult::default();
    // The next change not yet sent.
    let mut next = 0usize;
    loop {
        let now = Instant::now();
        if now >= end {
            return result;
        }
        // Changes 0..due have arisen by now.
        let due = ((now - start).as_secs_f64() / interval.as_secs_f64()) as usize + 1;
        if due <= next {
            // Idle: wait for the next change, then let a burst gather, as the edge does.
            tokio::time::sleep_until(arises(next).into()).await;
            tokio::time::sleep(FLUSH).await;
            continue;
        }
        let take = (due - next).min(ROOMS_PER_EDGE);
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for n in next..next + take {
            match change(&rooms, n) {
                (true, room) => add.push(room.clone()),
                (false, room) => remove.push(room.clone()),
            }
        }
        let started = Instant::now();
        let outcome = sender.send(add, remove).await;
        let done = Instant::now();
        if done >= measure_from && done < end && result.record(&outcome, done - started, take) {
            result
                .change_latencies_us
                .extend((next..next + take).map(|n| micros(done - arises(n))));
        }
        // A failed update is not retried: the bench counts it and moves on.
        next += take;
    }
}

/// This process's CPU time (user + system), from `/proc/self/stat`; `None` where that is not available.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15 (1-based).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

struct Percentiles {
    p50: u32,
    p90: u32,
    p99: u32,
    max: u32,
}

impl Percentiles {
    fn of(mut values: Vec<u32>) -> Percentiles {
        values.sort_unstable();
        let at = |p: f64| {
            if values.is_empty() {
                return 0;
            }
            let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Percentiles {
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: values.last().copied().unwrap_or(0),
        }
    }
}

struct Row {
    load: Load,
    updates: u64,
    changes: u64,
    errors: u64,
    secs: f64,
    commit: Percentiles,
    /// Offered rate only.
    change: Option<Percentiles>,
    entries: u64,
    cpu: Option<f64>,
}

async fn run_once(settings: &Settings, load: Load) -> Row {
    let cluster = Cluster::start(settings.members).await;
    let setup = async {
        let leader = cluster.leader().await;
        let registrar = cluster.client();
        let edges: Vec<String> = (0..settings.edges)
            .map(|i| format!("edge-{i:02}"))
            .collect();
        for (i, edge) in edges.iter().enumerate() {
            let peer = format!("127.0.0.1:{}", 20000 + i);
            // A lease far longer than the run: no keep-alives needed, no expiry mid-run.
            registrar
                .register(edge, &peer, Duration::from_secs(3600), Vec::new())
                .await
                .expect("edge registers");
        }
        (leader, edges)
    };
    let (leader, edges) = tokio::time::timeout(SETUP_BUDGET, setup)
        .await
        .expect("cluster up and edges registered within the setup budget");

    let start = Instant::now();
    let measure_from = start + settings.warmup;
    let end = measure_from + settings.measure;
    let edge_count = edges.len();
    let tasks: Vec<_> = edges
        .into_iter()
        .enumerate()
        .map(|(i, edge)| {
            // Each edge has its own client (its own connections), as real edges do.
            let sender = Sender::new(cluster.client(), &edge, settings.path);
            match load {
                Load::Saturation { k } => {
                    tokio::spawn(run_saturating_edge(sender, edge, k, measure_from, end))
                }
                Load::Offered { rate } => {
                    let interval = Duration::from_secs_f64(edge_count as f64 / rate);
                    // Edges start their schedules spread over one interval, not all in the same instant.
                    let offset = interval.mul_f64(i as f64 / edge_count as f64);
                    tokio::spawn(run_offered_edge(
                        sender,
                        edge,
                        interval,
                        start + offset,
                        measure_from,
                        end,
                    ))
                }
            }
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let index_before = leader.metrics().borrow().last_log_index.unwrap_or(0);
    let cpu_before = process_cpu();
    tokio::time::sleep_until(end.into()).await;
    let index_after = leader.metrics().borrow().last_log_index.unwrap_or(0);
    let cpu_after = process_cpu();

    let mut updates = Vec::new();
    let mut changes = Vec::new();
    let mut committed = 0;
    let mut errors = 0;
    // Each task stops at `end` after its update in flight: bounded by the client's retry budget.
    for task in tasks {
        let result = task.await.expect("edge task");
        updates.extend(result.update_latencies_us);
        changes.extend(result.change_latencies_us);
        committed += result.changes;
        errors += result.errors;
    }
    cluster.shutdown().await;

    let secs = settings.measure.as_secs_f64();
    Row {
        load,
        updates: updates.len() as u64,
        changes: committed,
        errors,
        secs,
        commit: Percentiles::of(updates),
        change: matches!(load, Load::Offered { .. }).then(|| Percentiles::of(changes)),
        entries: index_after.saturating_sub(index_before),
        cpu: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| (a - b).as_secs_f64() / secs * 100.0),
    }
}

/// The latency of one raft entry with nothing else going on: the leader proposes an empty interest batch, waits
/// for it to commit and apply, pauses 10 ms, and again. This is the chain every update rides (leader append and
/// fsync, replication to the followers, their fsyncs, commit, apply), without the clients and their queueing.
async fn idle_entry_latency(placement: Members, samples: usize) -> Percentiles {
    let cluster = Cluster::start(placement).await;
    let leader = cluster.leader().await;
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        leader
            .raft()
            .client_write(herald_registry::Request::Interest {
                changes: Vec::new().into(),
            })
            .await
            .expect("an empty interest batch commits");
        latencies.push(micros(started.elapsed()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.shutdown().await;
    Percentiles::of(latencies)
}

fn ms(us: u32) -> String {
    format!("{:.2} ms", f64::from(us) / 1000.0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let settings = Settings::from_env(full);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "registry interest bench: 3 members in-process ({:?} runtimes), {} edges over the {:?} path, warm-up {:?}, measured {:?}, {} worker threads each",
        settings.members,
        settings.edges,
        settings.path,
        settings.warmup,
        settings.measure,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    // The floor under every figure below: one empty entry at a time through an idle cluster.
    let samples = if full { 300 } else { 20 };
    let idle = runtime.block_on(idle_entry_latency(settings.members, samples));
    println!(
        "idle raft entry (leader's client_write of an empty interest batch, one at a time, {samples} samples): p50 {} p90 {} p99 {} max {}",
        ms(idle.p50),
        ms(idle.p90),
        ms(idle.p99),
        ms(idle.max)
    );
    let mut rows = Vec::new();
    for &load in &settings.loads {
        let row = runtime.block_on(run_once(&settings, load));
        eprintln!(
            "{load:?}: {} updates, {} changes, {} errors, {} raft entries",
            row.updates, row.changes, row.errors, row.entries
        );
        rows.push(row);
    }
    println!();
    println!("| load | changes/s | updates/s | changes per update | commit p50 | p90 | p99 | max | change p50 | change p99 | raft entries/s | changes per entry | errors | process CPU |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let load = match r.load {
            Load::Saturation { k } => format!("saturation, K = {k}"),
            Load::Offered { rate } => format!("offered {rate:.0}/s"),
        };
        let per = |n: u64, d: u64| {
            if d == 0 {
                "–".to_string()
            } else {
                format!("{:.1}", n as f64 / d as f64)
            }
        };
        let (change_p50, change_p99) = r
            .change
            .as_ref()
            .map_or(("–".to_string(), "–".to_string()), |c| {
                (ms(c.p50), ms(c.p99))
            });
        println!(
            "| {load} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {change_p50} | {change_p99} | {:.0} | {} | {} | {} |",
            r.changes as f64 / r.secs,
            r.updates as f64 / r.secs,
            per(r.changes, r.updates),
            ms(r.commit.p50),
            ms(r.commit.p90),
            ms(r.commit.p99),
            ms(r.commit.max),
            r.entries as f64 / r.secs,
            per(r.changes, r.entries),
            r.errors,
            r.cpu.map_or("–".to_string(), |c| format!("{c:.0}%")),
        );
    }
    if !full {
        assert!(
            rows.iter().all(|r| r.updates > 0 && r.errors == 0),
            "the smoke runs committed interest updates without errors"
        );
    }
}
