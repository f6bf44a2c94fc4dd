//! `herald-loadtest`: runs load scenarios against herald (and its peers) and reports what the servers did.
//!
//! # Layout
//! - [`scenario`]: the TOML scenario files and the deterministic plan derived from them.
//! - [`coordinator`]: servers, workers, open-loop publishers, the run's phases and its verdict.
//! - [`worker`]: the `worker` subcommand, a process holding a slice of the subscriber connections.
//! - [`wire`]: what coordinator and workers say to each other (JSON lines over stdin/stdout).
//! - [`driver`]: how to subscribe and publish on each kind of server; [`ws`] is the lean WebSocket client.
//! - [`payload`]: the measured payload (publisher, sequence, intended send time) and the shared clock.
//! - [`stats`], [`procstat`]: histograms and stream accounting; RSS/CPU from /proc.
//! - [`report`], [`chart`]: result.json, report.md, chart.png.
//! - [`bridge`]: publishing through herald's Redis bridge (`publish.api = "redis"`): a private redis-server,
//!   the route in a generated herald.yaml, Redis `PUBLISH` clients.
//! - [`server`]: starting `herald dev` or a registry + edge cluster (or a peer's server), or attaching to running
//!   nodes; [`peers`]: NATS and Sockudo protocol clients and server starters, used by [`driver`]'s peer drivers.
//! - [`failover`]: scenario 6, killing registry leaders and edges while publishing, and what that cost.
//!
//! Exit status: 0 the run passed its scenario's criteria, 1 it ran but failed them (the reason is printed and in
//! the report), 2 it could not run (servers would not start, workers died), 64 bad scenario or arguments.

mod bridge;
mod chart;
mod coordinator;
mod driver;
mod failover;
mod otlp_sink;
mod payload;
// The peers' protocol clients and server starters; the harness uses only part of their API.
#[allow(dead_code)]
mod peers;
mod procstat;
mod report;
mod scenario;
mod server;
mod stats;
mod wire;
mod worker;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use scenario::{PublishApi, Scenario};
use wire::TargetKind;

const EXIT_FAILED: u8 = 1;
const EXIT_ERROR: u8 = 2;
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "herald-loadtest",
    version,
    about = "Load-test herald and its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a scenario file and write result.json, report.md and chart.png.
    Run(Box<RunArgs>),
    /// Check scenario files without running them.
    Check {
        /// Scenario files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// An OTLP/gRPC trace receiver that counts and discards spans (for measuring herald's tracing overhead).
    OtlpSink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: String,
        /// Seconds between printed totals.
        #[arg(long, default_value_t = 5)]
        every: u64,
    },
    /// Internal: a worker process holding subscriber connections (started by `run`).
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The scenario file (see loadtest/scenarios/).
    scenario: PathBuf,
    /// The kind of server.
    #[arg(long, value_enum, default_value = "herald")]
    target: TargetKind,
    /// Publish API, overriding the scenario's `publish.api`.
    #[arg(long, value_enum)]
    publish_api: Option<PublishApi>,
    /// Attach to a running node instead of starting servers: `HTTP_ADDR[/GRPC_ADDR]`, e.g.
    /// `127.0.0.1:7070/127.0.0.1:7071`. Repeat once per node, in node-index order.
    #[arg(long = "edge")]
    edges: Vec<String>,
    /// PIDs of the attached nodes (same order as --edge), for RSS and CPU figures.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// API key for the publish APIs of an attached cluster.
    #[arg(long, env = "HERALD_LOADTEST_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Query string for WebSocket connections, e.g. `?token=<jwt>`.
    #[arg(long, default_value = "")]
    ws_query: String,
    /// The herald binary to start (default: next to this executable, then PATH).
    #[arg(long)]
    herald_bin: Option<PathBuf>,
    /// Output directory (default: loadtest/results/<scenario>-<target>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the scenario's duration_secs.
    #[arg(long)]
    duration: Option<f64>,
    /// Override the scenario's failover.leader_kills.
    #[arg(long)]
    leader_kills: Option<usize>,
    /// Override the scenario's failover.edge_kills.
    #[arg(long)]
    edge_kills: Option<usize>,
    /// Override the scenario's failover.kill_interval_secs.
    #[arg(long)]
    kill_interval: Option<f64>,
    /// Override the scenario's failover.first_kill_after_secs.
    #[arg(long)]
    first_kill_after: Option<f64>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Exit 1 when a scenario target is missed or not measured, not only on a correctness failure.
    #[arg(long)]
    strict_targets: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Worker => worker::main(),
        Cmd::OtlpSink { listen, every } => {
            match otlp_sink::main(&listen, std::time::Duration::from_secs(every.max(1))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald-loadtest: otlp-sink: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Check { files } => {
            let mut ok = true;
            for file in files {
                match Scenario::load(&file) {
                    Ok(s) => println!(
                        "{}: ok ({} connections, {} rooms, {} publishes/s, {} s)",
                        file.display(),
                        s.connections(),
                        s.clients.rooms,
                        s.publish.rate,
                        s.duration_secs
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_USAGE)
            }
        }
        Cmd::Run(args) => run(*args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let args_strict = args.strict_targets;
    let mut scenario = match Scenario::load(&args.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald-loadtest: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(d) = args.duration {
        if !(d > 0.0 && d <= 3600.0) {
            eprintln!("herald-loadtest: --duration must be in (0, 3600]");
            return ExitCode::from(EXIT_USAGE);
        }
        scenario.duration_secs = d;
        scenario.warmup_secs = scenario.warmup_secs.min(d / 2.0);
    }
    let failover_overrides = [
        args.leader_kills.is_some(),
        args.edge_kills.is_some(),
        args.kill_interval.is_some(),
        args.first_kill_after.is_some(),
    ];
    if failover_overrides.contains(&true) {
        let Some(f) = scenario.failover.as_mut() else {
            eprintln!(
                "herald-loadtest: --leader-kills, --edge-kills, --kill-interval and --first-kill-after need a \
                 scenario with a [failover] section"
            );
            return ExitCode::from(EXIT_USAGE);
        };
        f.leader_kills = args.leader_kills.unwrap_or(f.leader_kills);
        f.edge_kills = args.edge_kills.unwrap_or(f.edge_kills);
        f.kill_interval_secs = args.kill_interval.unwrap_or(f.kill_interval_secs);
        f.first_kill_after_secs = args.first_kill_after.unwrap_or(f.first_kill_after_secs);
    }
    // Overrides must still make a valid scenario (e.g. a shorter run must still fit the failover schedule).
    if let Err(e) = scenario.validate() {
        eprintln!("herald-loadtest: with the overrides: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let publish_api = args.publish_api.unwrap_or(scenario.publish.api);
    if publish_api == PublishApi::Redis {
        if let Err(e) = bridge::check_applicable(args.target, !args.edges.is_empty()) {
            eprintln!("herald-loadtest: {}: {e}", scenario.name);
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("loadtest/results").join(format!("{}-{}", scenario.name, args.target.name()))
    });
    if scenario.failover.is_some() && args.target != TargetKind::Herald {
        // The peers run as one node without a registry: there is nothing to fail over. Say so, not fail.
        return match report::not_applicable(
            &scenario,
            args.target.name(),
            &out,
            "failover kills herald's registry leader and edges; this peer runs as one node with no registry \
             or other edges, so there is nothing to fail over",
        ) {
            Ok(text) => {
                println!("{text}");
                println!("results in {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald-loadtest: {e:#}");
                ExitCode::from(EXIT_ERROR)
            }
        };
    }
    let opts = coordinator::RunOptions {
        publish_api,
        scenario,
        target: args.target,
        attach: args.edges,
        server_pids: args.server_pids,
        api_key: args.api_key,
        ws_query: args.ws_query,
        herald_bin: args.herald_bin,
        out: out.clone(),
        progress: !args.quiet,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-loadtest: cannot start a runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(coordinator::run(opts)) {
        Ok(report) => {
            println!("{}", report.markdown());
            println!("results in {}", out.display());
            if report.passed && args_strict && !report.targets_all_met() {
                eprintln!("herald-loadtest: targets missed (--strict-targets)");
                ExitCode::from(EXIT_FAILED)
            } else if report.passed {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "herald-loadtest: run FAILED: {}",
                    report.failures.join("; ")
                );
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(e) => {
            eprintln!("herald-loadtest: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
