//! Registry interest throughput and commit latency: a 3-member registry in this process (real gRPC between the
//! members on loopback, durable stores in temp directories), 64 registered edges, and one task per edge sending
//! `update_interest` calls back to back through its own [`RegistryClient`] for a fixed time. Each call carries K
//! room changes, alternately adding and removing K of the edge's own rooms. The latency of a call is the commit
//! latency the edge sees: from sending the call to the leader's answer that the batch holding it committed.
//!
//! Not a criterion benchmark: it is a throughput/latency run that prints a Markdown table.
//!
//! ```sh
//! cargo bench -p herald-registry --bench interest
//! HERALD_BENCH_SECS=3 HERALD_BENCH_WARMUP_SECS=1 HERALD_BENCH_K=16 cargo bench -p herald-registry --bench interest
//! ```
//!
//! Environment: `HERALD_BENCH_SECS` (measured seconds, default 10), `HERALD_BENCH_WARMUP_SECS` (default 2),
//! `HERALD_BENCH_EDGES` (default 64), `HERALD_BENCH_K` (comma-separated changes per call, default `1,16`).
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a one-second smoke run with K = 1.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpListener;

use herald_registry::{
    ClusterSecret, InterestOutcome, NodeId, RegistryClient, RegistryConfig, RegistryHandle,
};

const SECRET: &str = "registry-interest-bench-secret";
/// Rooms each edge cycles through; it holds at most K of them at any time.
const ROOMS_PER_EDGE: usize = 256;
/// How long starting the cluster and registering the edges may take.
const SETUP_BUDGET: Duration = Duration::from_secs(30);

struct Settings {
    warmup: Duration,
    measure: Duration,
    edges: usize,
    ks: Vec<usize>,
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
        let (warmup, measure, ks) = if full {
            (2.0, 10.0, "1,16")
        } else {
            (0.2, 1.0, "1")
        };
        let ks = std::env::var("HERALD_BENCH_K").unwrap_or_else(|_| ks.to_string());
        Settings {
            warmup: secs("HERALD_BENCH_WARMUP_SECS", warmup),
            measure: secs("HERALD_BENCH_SECS", measure),
            edges: std::env::var("HERALD_BENCH_EDGES")
                .ok()
                .map(|v| v.parse().expect("HERALD_BENCH_EDGES is a number"))
                .unwrap_or(64),
            ks: ks
                .split(',')
                .map(|k| {
                    k.trim()
                        .parse()
                        .expect("HERALD_BENCH_K is a list of numbers")
                })
                .collect(),
        }
    }
}

/// Three members with ids 1..=3, started with the same peer list.
struct Cluster {
    members: BTreeMap<NodeId, RegistryHandle>,
    addrs: Vec<String>,
    _dirs: Vec<TempDir>,
}

impl Cluster {
    async fn start() -> Cluster {
        let mut listeners = BTreeMap::new();
        let mut peers = BTreeMap::new();
        for id in 1..=3 {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            peers.insert(id, listener.local_addr().unwrap().to_string());
            listeners.insert(id, listener);
        }
        let mut members = BTreeMap::new();
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
            let handle = herald_registry::start(config, listener)
                .await
                .expect("member starts");
            members.insert(id, handle);
            dirs.push(dir);
        }
        Cluster {
            members,
            addrs: peers.into_values().collect(),
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
    }
}

/// What one edge's task measured.
#[derive(Default)]
struct EdgeResult {
    /// Latency of each call completed in the measured window, in microseconds.
    latencies_us: Vec<u32>,
    errors: u64,
}

async fn run_edge(
    client: RegistryClient,
    edge: String,
    k: usize,
    measure_from: Instant,
    end: Instant,
) -> EdgeResult {
    let rooms: Vec<String> = (0..ROOMS_PER_EDGE)
        .map(|i| format!(r#"{{"bench":"{edge}","room":{i}}}"#))
        .collect();
    let mut result = EdgeResult::default();
    let mut n = 0usize;
    loop {
        if Instant::now() >= end {
            return result;
        }
        // Call 2i adds K rooms, call 2i+1 removes the same K; the next pair moves on to the next K rooms.
        let first = (n / 2) * k;
        let batch: Vec<String> = (0..k)
            .map(|j| rooms[(first + j) % ROOMS_PER_EDGE].clone())
            .collect();
        let (add, remove) = if n % 2 == 0 {
            (batch, Vec::new())
        } else {
            (Vec::new(), batch)
        };
        let started = Instant::now();
        let outcome = client.update_interest(&edge, add, remove).await;
        let done = Instant::now();
        if done >= measure_from && done < end {
            match outcome {
                Ok(InterestOutcome::Committed(_)) => {
                    let us = (done - started).as_micros();
                    result
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                Ok(InterestOutcome::UnknownEdge) | Err(_) => result.errors += 1,
            }
        }
        n += 1;
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

struct Row {
    k: usize,
    calls: u64,
    errors: u64,
    secs: f64,
    p50: u32,
    p90: u32,
    p99: u32,
    max: u32,
    entries: u64,
    cpu: Option<f64>,
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run_once(settings: &Settings, k: usize) -> Row {
    let cluster = Cluster::start().await;
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
    let tasks: Vec<_> = edges
        .into_iter()
        .map(|edge| {
            // Each edge has its own client (its own connections), as real edges do.
            tokio::spawn(run_edge(cluster.client(), edge, k, measure_from, end))
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let index_before = leader.metrics().borrow().last_log_index.unwrap_or(0);
    let cpu_before = process_cpu();
    tokio::time::sleep_until(end.into()).await;
    let index_after = leader.metrics().borrow().last_log_index.unwrap_or(0);
    let cpu_after = process_cpu();

    let mut latencies = Vec::new();
    let mut errors = 0;
    // Each task stops at `end` after its call in flight: bounded by the client's retry budget.
    for task in tasks {
        let result = task.await.expect("edge task");
        latencies.extend(result.latencies_us);
        errors += result.errors;
    }
    cluster.shutdown().await;

    latencies.sort_unstable();
    let secs = settings.measure.as_secs_f64();
    Row {
        k,
        calls: latencies.len() as u64,
        errors,
        secs,
        p50: percentile(&latencies, 50.0),
        p90: percentile(&latencies, 90.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or(0),
        entries: index_after.saturating_sub(index_before),
        cpu: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| (a - b).as_secs_f64() / secs * 100.0),
    }
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
        "registry interest bench: 3 members in-process, {} edges, warm-up {:?}, measured {:?}, {} worker threads",
        settings.edges,
        settings.warmup,
        settings.measure,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut rows = Vec::new();
    for &k in &settings.ks {
        let row = runtime.block_on(run_once(&settings, k));
        eprintln!(
            "K = {k}: {} calls, {} errors, {} raft entries",
            row.calls, row.errors, row.entries
        );
        rows.push(row);
    }
    println!();
    println!("| K (changes/call) | interest changes/s | calls/s | p50 | p90 | p99 | max | raft entries/s | changes per entry | errors | process CPU |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let calls_per_s = r.calls as f64 / r.secs;
        let changes_per_entry = if r.entries == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", (r.calls * r.k as u64) as f64 / r.entries as f64)
        };
        println!(
            "| {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            r.k,
            calls_per_s * r.k as f64,
            calls_per_s,
            ms(r.p50),
            ms(r.p90),
            ms(r.p99),
            ms(r.max),
            r.entries as f64 / r.secs,
            changes_per_entry,
            r.errors,
            r.cpu.map_or("–".to_string(), |c| format!("{c:.0}%")),
        );
    }
    if !full {
        assert!(
            rows.iter().all(|r| r.calls > 0),
            "the smoke run committed interest updates"
        );
    }
}
