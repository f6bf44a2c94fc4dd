//! The `herald` binary: one executable, one subcommand per role.
//!
//! - `herald dev`: everything in one process with nothing external, for trying herald out.
//! - `herald edge`: a production edge; refuses to start without an auth method.
//! - `herald registry`: a member of the raft group that replicates edges, interest and routes.
//! - `herald config`: prints every setting with its environment variable and default.
//! - `herald ctl`: operates a running cluster through its registry members (see [`ctl`]).
//!
//! Configuration is resolved by `herald_edge::config` (flags > `HERALD_*` env > `-c herald.yaml` > defaults).
//! An invalid configuration or command line prints what is wrong and exits 64 (EX_USAGE).

mod ctl;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use herald_edge::config::{Config, Overrides};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// EX_UNAVAILABLE: a listener could not be bound.
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "A horizontally scaled real-time pub/sub server"
)]
struct Cli {
    /// Path to herald.yaml.
    #[arg(short, long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process for development: no external service, open auth unless configured.
    Dev(ServeArgs),
    /// Run an edge node: WebSockets and the publish APIs. Requires an auth method.
    Edge(ServeArgs),
    /// Run a registry member: one of the raft group (3 or 5 in production) that replicates edges, interest
    /// and routes.
    Registry(RegistryArgs),
    /// Print every setting: key, environment variable, default.
    Config,
    /// Operate a running cluster: `herald ctl cluster status | add-learner | promote | remove`.
    Ctl(ctl::CtlArgs),
}

#[derive(Debug, Args)]
struct RegistryArgs {
    /// This member's raft id (unique, stable across restarts).
    #[arg(long, env = "HERALD_REGISTRY_NODE_ID")]
    node_id: u64,
    /// Address to listen on for raft and registry calls.
    #[arg(long, env = "HERALD_REGISTRY_LISTEN", default_value = "127.0.0.1:7081")]
    listen: String,
    /// Address other members and edges use to reach this one; defaults to the listen address.
    #[arg(long, env = "HERALD_REGISTRY_ADVERTISE")]
    advertise: Option<String>,
    /// The static bootstrap list, `id=host:port,...`, including this member. The member with the smallest id
    /// initializes the group on first start.
    #[arg(long, env = "HERALD_REGISTRY_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Where the raft log, vote and snapshots are kept.
    #[arg(long, env = "HERALD_REGISTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// The cluster secret (16+ characters) every internal call carries.
    #[arg(long, env = "HERALD_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: String,
    /// Log filter.
    #[arg(long, env = "HERALD_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Address for `/metrics`, `/livez` and `/readyz` over plain HTTP (e.g. `127.0.0.1:7082`); empty: none.
    #[arg(long, env = "HERALD_REGISTRY_METRICS_ADDR", default_value = "")]
    metrics_addr: String,
    /// `text` or `json` (one object per line).
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// OTLP/gRPC collector for traces (registry writes, elections), e.g. `http://127.0.0.1:4317`; the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` wins.
    #[arg(long, env = "HERALD_TELEMETRY_OTLP_ENDPOINT", default_value = "")]
    otlp_endpoint: String,
}

impl RegistryArgs {
    fn config(&self) -> Result<herald_registry::node::RegistryConfig, String> {
        use herald_registry::grpc::ClusterSecret;
        if self.cluster_secret.len() < 16 {
            return Err("--cluster-secret must be at least 16 characters".into());
        }
        let secret = ClusterSecret::new(&self.cluster_secret)
            .map_err(|e| format!("--cluster-secret: {e}"))?;
        let mut peers = BTreeMap::new();
        for entry in &self.peers {
            let (id, addr) = entry
                .split_once('=')
                .ok_or_else(|| format!("--peers entries are id=host:port, got {entry:?}"))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| format!("--peers: {id:?} is not a node id"))?;
            peers.insert(id, addr.trim().to_owned());
        }
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone());
        let config = herald_registry::node::RegistryConfig::new(
            self.node_id,
            advertise,
            self.data_dir.clone(),
            secret,
        );
        Ok(if peers.is_empty() {
            config
        } else {
            config.with_peers(peers)
        })
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to bind (`server-host`).
    #[arg(long)]
    host: Option<String>,
    /// WebSocket + HTTP port (`server-port`); 0 picks a free port.
    #[arg(long)]
    port: Option<u16>,
    /// gRPC publish API port (`grpc-port`); 0 picks a free port.
    #[arg(long)]
    grpc_port: Option<u16>,
    /// Log filter (`log-level`), e.g. `info` or `herald_edge=debug`.
    #[arg(long)]
    log_level: Option<String>,
    /// Any setting by its key, e.g. `--set limits.max-message-bytes=4096`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ServeArgs {
    fn overrides(&self, dev: bool) -> Result<Overrides, String> {
        let mut overrides = Overrides::new();
        for pair in &self.set {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--set expects KEY=VALUE, got {pair:?}"))?;
            overrides.insert(key.trim().to_owned(), value.to_owned());
        }
        let flags = [
            ("server-host", self.host.clone()),
            ("server-port", self.port.map(|p| p.to_string())),
            ("grpc-port", self.grpc_port.map(|p| p.to_string())),
            ("log-level", self.log_level.clone()),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                overrides.insert(key.to_owned(), value);
            }
        }
        if dev {
            overrides.insert("dev".into(), "true".into());
        }
        Ok(overrides)
    }
}

fn main() -> ExitCode {
    // Usage errors exit 64 (EX_USAGE) like configuration errors, rather than clap's 2, so scripts driving
    // `herald ctl` see one code for "you asked for something wrong"; help and version still exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let cli = match cli.command {
        Command::Ctl(args) => return ctl::run(args),
        command => Cli { command, ..cli },
    };
    if let Command::Registry(args) = &cli.command {
        return registry(args);
    }
    let (args, dev) = match &cli.command {
        Command::Dev(args) => (args, true),
        Command::Edge(args) => (args, false),
        Command::Registry(_) | Command::Ctl(_) => unreachable!("handled above"),
        Command::Config => {
            println!("| key | environment variable | default | what it does |\n|---|---|---|---|");
            for s in Config::reference() {
                println!(
                    "| `{}` | `{}` | `{}` | {} |",
                    s.key, s.env, s.default, s.description
                );
            }
            return ExitCode::SUCCESS;
        }
    };
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("HERALD_"))
        .collect();
    let config = match args
        .overrides(dev)
        .map_err(|e| e.to_string())
        .and_then(|o| Config::load(cli.config.as_deref(), &env, &o).map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let telemetry = match init_telemetry(
        &runtime,
        herald_telemetry::TelemetryConfig {
            log_level: config.log_level.clone(),
            log_format: config.log_format.clone(),
            otlp_endpoint: config.telemetry.otlp_endpoint.clone(),
            service_name: config.telemetry.service_name.clone(),
            instance: config.cluster.edge_id.clone(),
            sample_ratio: config.telemetry.sample_ratio,
        },
    ) {
        Ok(telemetry) => telemetry,
        Err(code) => return code,
    };
    let code = runtime.block_on(serve(config));
    // The spans of the drain's last publishes are still buffered.
    runtime.block_on(async { telemetry.shutdown() });
    code
}

fn registry(args: &RegistryArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let telemetry = match init_telemetry(
        &runtime,
        herald_telemetry::TelemetryConfig {
            log_level: args.log_level.clone(),
            log_format: args.log_format.clone(),
            otlp_endpoint: args.otlp_endpoint.clone(),
            service_name: "herald-registry".into(),
            instance: format!("registry-{}", config.node_id),
            ..Default::default()
        },
    ) {
        Ok(telemetry) => telemetry,
        Err(code) => return code,
    };
    let code = runtime.block_on(async {
        let listener = match TcpListener::bind(&args.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("herald: cannot bind {}: {e}", args.listen);
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        let http = if args.metrics_addr.is_empty() {
            None
        } else {
            match TcpListener::bind(&args.metrics_addr).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    eprintln!("herald: cannot bind {}: {e}", args.metrics_addr);
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
            }
        };
        let shutdown = shutdown_signal();
        let addr = listener.local_addr().expect("bound");
        let metrics = http
            .as_ref()
            .map(|l| format!(" metrics={}", l.local_addr().expect("bound")))
            .unwrap_or_default();
        println!(
            "herald registry listening: node={} addr={addr}{metrics}",
            config.node_id
        );
        match herald_registry::node::run(config, listener, http, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("herald: registry failed: {e}");
                ExitCode::FAILURE
            }
        }
    });
    runtime.block_on(async { telemetry.shutdown() });
    code
}

/// Logs, and traces when configured. Inside `runtime`, which the OTLP exporter's gRPC connection belongs to.
fn init_telemetry(
    runtime: &tokio::runtime::Runtime,
    config: herald_telemetry::TelemetryConfig,
) -> Result<herald_telemetry::Telemetry, ExitCode> {
    let _entered = runtime.enter();
    herald_telemetry::init(&config).map_err(|e| {
        eprintln!("herald: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn serve(mut config: Config) -> ExitCode {
    // `herald dev` without a registry configured embeds a one-member registry, so the single process runs the
    // same code path as a cluster: registration, interest batching, the watch and the cluster view.
    let embedded = if config.dev && !config.cluster.enabled() {
        match EmbeddedRegistry::start(&mut config).await {
            Ok(embedded) => Some(embedded),
            Err(e) => {
                eprintln!("herald: cannot start the embedded registry: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    } else {
        None
    };
    let registry_metrics = embedded.as_ref().map(|e| e.handle.metrics_renderer());
    let code = serve_edge(config, registry_metrics).await;
    if let Some(embedded) = embedded {
        embedded.stop().await;
    }
    code
}

/// The one-member registry inside `herald dev`: loopback only, a random secret, data in a temporary directory
/// removed at exit.
struct EmbeddedRegistry {
    handle: herald_registry::node::RegistryHandle,
    data_dir: PathBuf,
}

impl EmbeddedRegistry {
    async fn start(config: &mut Config) -> Result<EmbeddedRegistry, String> {
        use std::hash::{BuildHasher, Hasher};
        let random = || {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        let secret = format!("{:016x}{:016x}", random(), random());
        let data_dir = std::env::temp_dir().join(format!(
            "herald-dev-registry-{}-{:x}",
            std::process::id(),
            random()
        ));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener
            .local_addr()
            .map_err(|e| e.to_string())?
            .to_string();
        let registry_config = herald_registry::node::RegistryConfig::new(
            1,
            addr.clone(),
            data_dir.clone(),
            herald_registry::grpc::ClusterSecret::new(&secret).map_err(|e| e.to_string())?,
        );
        let handle = herald_registry::node::start(registry_config, listener)
            .await
            .map_err(|e| e.to_string())?;
        config.cluster.registry = vec![addr];
        config.cluster.secret = secret;
        // One edge, so its peer listener only needs to exist, not to be reachable at a known port.
        config.cluster.peer_port = 0;
        if config.cluster.edge_id.is_empty() {
            config.cluster.edge_id = "dev".into();
        }
        Ok(EmbeddedRegistry { handle, data_dir })
    }

    async fn stop(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::warn!(cause = %e, "embedded registry did not stop cleanly");
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// The accept queue of the public listeners. tokio's `TcpListener::bind` asks for 1024, which a burst of
/// reconnecting clients (a node restart, a load balancer shifting traffic) overflows: the kernel then drops the
/// handshake's last ACK and the client waits for SYN-ACK retransmissions, 1, 3, 7 s and more. The kernel caps it
/// at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

/// Binds `addr` (host:port) with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (a restarted node can bind while old
/// connections linger in TIME_WAIT), as `TcpListener::bind` would otherwise.
async fn bind_with_backlog(addr: &str) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Serves an edge; `registry_metrics` renders the embedded registry's series for the edge's `/metrics`.
async fn serve_edge(
    config: Config,
    registry_metrics: Option<impl Fn() -> String + Send + Sync + 'static>,
) -> ExitCode {
    let http_addr = format!("{}:{}", config.server_host, config.server_port);
    let grpc_addr = format!("{}:{}", config.server_host, config.grpc_port);
    let (http, grpc) = match (
        bind_with_backlog(&http_addr).await,
        bind_with_backlog(&grpc_addr).await,
    ) {
        (Ok(http), Ok(grpc)) => (http, grpc),
        (Err(e), _) => {
            eprintln!("herald: cannot bind {http_addr}: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        (_, Err(e)) => {
            eprintln!("herald: cannot bind {grpc_addr}: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let admin = if config.admin.enabled {
        let admin_addr = format!("{}:{}", config.admin.host, config.admin.port);
        match TcpListener::bind(&admin_addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("herald: cannot bind the admin API on {admin_addr}: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    } else {
        None
    };
    if admin.is_some() && config.admin.token.is_empty() && !config.dev {
        tracing::warn!("no admin.token configured: the admin API refuses every request");
    }
    let cluster = if config.cluster.enabled() {
        match join_cluster(&config).await {
            Ok(node) => {
                if let Some(render) = registry_metrics {
                    node.cluster.metrics().sources.add(render);
                }
                Some(node)
            }
            Err(code) => return code,
        }
    } else {
        None
    };
    let shutdown = shutdown_signal();
    let http_addr = http.local_addr().expect("bound");
    let grpc_addr = grpc.local_addr().expect("bound");
    let admin_field = admin
        .as_ref()
        .map(|l| format!(" admin={}", l.local_addr().expect("bound")))
        .unwrap_or_default();
    // One machine-readable line first (tests and scripts read it), then the human guide.
    match &cluster {
        Some(node) => println!(
            "herald listening: http={http_addr} grpc={grpc_addr} peer={} edge={}{admin_field}",
            node.peer.local_addr().expect("bound"),
            node.cluster.edge_id()
        ),
        None => println!("herald listening: http={http_addr} grpc={grpc_addr}{admin_field}"),
    }
    if config.dev {
        println!(
            "\n  herald dev is running.\n\n  \
             demo page:   http://{http_addr}/\n  \
             WebSocket:   ws://{http_addr}/ws/\n  \
             gRPC:        {grpc_addr} (herald.v1.Publisher)\n\n  \
             publish:     curl -X POST http://{http_addr}/api/v1/publish \\\n               \
             -H 'content-type: application/json' \\\n               \
             -d '{{\"rooms\":[{{\"chat\":\"lobby\"}}],\"data\":{{\"text\":\"hello\"}}}}'\n"
        );
    }
    let listeners = herald_edge::Listeners { http, grpc, admin };
    match herald_edge::run_with_cluster(config, listeners, cluster, shutdown).await {
        Ok(report) => {
            if report.cut_by_deadline > 0 {
                tracing::warn!(
                    cut = report.cut_by_deadline,
                    "exiting with connections cut by the drain deadline"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Binds the peer listener and builds this edge's cluster membership from `cluster.*`.
async fn join_cluster(config: &Config) -> Result<herald_edge::ClusterNode, ExitCode> {
    use herald_edge::registry_link::{EdgeIdentity, RegistryAttachment};
    use std::sync::Arc;
    use std::time::Duration;

    let settings = &config.cluster;
    let peer_addr = format!("{}:{}", config.server_host, settings.peer_port);
    let peer = TcpListener::bind(&peer_addr).await.map_err(|e| {
        eprintln!("herald: cannot bind {peer_addr}: {e}");
        ExitCode::from(EXIT_UNAVAILABLE)
    })?;
    let port = peer.local_addr().expect("bound").port();
    let advertise = if settings.advertise_host.is_empty() {
        config.server_host.clone()
    } else {
        settings.advertise_host.clone()
    };
    let edge_id = if settings.edge_id.is_empty() {
        format!("edge-{advertise}-{port}")
    } else {
        settings.edge_id.clone()
    };
    let config_error = |e: String| {
        eprintln!("herald: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let secret = herald_registry::grpc::ClusterSecret::new(&settings.secret)
        .map_err(|e| config_error(format!("cluster.secret: {e}")))?;
    let client = herald_registry::client::RegistryClient::new(settings.registry.clone(), secret)
        .map_err(|e| config_error(format!("cluster.registry: {e}")))?;
    let metrics = Arc::new(herald_edge::metrics::Metrics::default());
    let view = Arc::new(parking_lot::RwLock::new(
        herald_edge::cluster_view::ClusterView::new(),
    ));
    let links = herald_edge::peer::PeerLinkConfig {
        queue_capacity: settings.peer_queue,
        ..Default::default()
    };
    let cluster =
        herald_edge::Cluster::new(edge_id.clone(), &settings.secret, view, links, metrics)
            .map_err(|e| config_error(format!("cluster.secret: {e}")))?;
    Ok(herald_edge::ClusterNode {
        cluster: Arc::new(cluster),
        peer,
        registry: Some(RegistryAttachment {
            client,
            identity: EdgeIdentity {
                edge_id,
                peer_addr: format!("{advertise}:{port}"),
                lease_ttl: Duration::from_millis(settings.lease_ttl_ms),
                interest_flush: Duration::from_millis(settings.interest_flush_ms),
            },
        }),
    })
}

/// Installs the SIGTERM and SIGINT handlers now and returns a future that resolves on the first of them.
///
/// The handlers must exist before the "listening" line is printed: a supervisor (or a test) that signals right
/// after reading it would otherwise hit the default action and kill the process without a drain.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    }
}
