//! A running registry member: the durable store, the raft node, the internal gRPC services on one listener, the
//! bootstrap of a fresh cluster, and the duties only the leader performs (edge leases and interest batching).
//!
//! [`start`] brings a member up and returns a [`RegistryHandle`] (tests use it to watch raft metrics); [`run`] is
//! `start` plus waiting for a shutdown signal, which is what `herald registry` calls.
//!
//! # Bootstrap
//! A member whose data directory is empty initializes the cluster only when it appears in
//! [`RegistryConfig::peers`] with the smallest id there; every other member waits for that one to replicate to it.
//! So every member of a new cluster is started with the same peer list, and a member that joins a running cluster
//! later (through `add-learner`) must not have the smallest id in its list: list the running members in it too.
//! A member with any raft state on disk never initializes again, whatever its peer list says.
//!
//! # Leader duties
//! Leases live only in the leader's memory ([`crate::leases`]). When this member becomes leader it first waits
//! until it has applied everything committed before its term (otherwise an edge registered in an entry it has not
//! applied yet would look unknown), then starts every registered edge's lease in full, and from then on proposes
//! `RemoveEdges` for the leases that expire, every [`RegistryConfig::lease_sweep`]. Stepping down drops the table.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{Fatal, InitializeError, RaftError};
use openraft::{Raft, RaftMetrics, ServerState};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tracing::Instrument;

use crate::batcher::InterestBatcher;
use crate::grpc::{raft_server, registry_server, ClusterSecret, DEFAULT_MAX_RAFT_MESSAGE_BYTES};
use crate::leases::Leases;
use crate::metrics::RegistryMetrics;
use crate::network::GrpcNetwork;
use crate::store::{self, LogReader, StateMachineStore, StoreError};
use crate::types::{NodeId, RegistryNode, Request, TypeConfig};

/// The default interval between two sweeps of expired leases.
pub const DEFAULT_LEASE_SWEEP: Duration = Duration::from_millis(500);

/// How long [`RegistryHandle::shutdown`] waits for open connections to finish before cutting them off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a new leader waits between attempts to confirm its leadership before loading the leases.
const CONFIRM_RETRY: Duration = Duration::from_millis(100);

/// What a registry member needs to run.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// This member's raft id, unique in the cluster and stable across restarts.
    pub node_id: NodeId,
    /// The `host:port` other members, edges and `herald ctl` reach this member's internal gRPC services at.
    pub advertise_addr: String,
    /// The static bootstrap list: member id -> internal address, including this member (whose entry is replaced
    /// by `advertise_addr`). Empty means "just this member". See the module docs for who initializes the cluster.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the raft log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// The secret every internal call must carry, both ways.
    pub secret: ClusterSecret,
    /// How often the leader looks for expired leases (default [`DEFAULT_LEASE_SWEEP`]). An edge that stops
    /// keeping its lease alive is removed within its TTL plus about this much.
    pub lease_sweep: Duration,
    /// openraft's tunables (default [`RegistryConfig::lan_raft_config`]).
    pub raft: openraft::Config,
    /// The cap on one raft message (and on one request to the registry service), either way. Default
    /// [`DEFAULT_MAX_RAFT_MESSAGE_BYTES`].
    pub max_raft_message_bytes: usize,
    /// Interest entries the leader keeps proposed but not yet committed at once (default
    /// [`DEFAULT_INTEREST_PROPOSALS_IN_FLIGHT`]).
    pub interest_proposals_in_flight: usize,
}

/// See [`RegistryConfig::interest_proposals_in_flight`].
pub const DEFAULT_INTEREST_PROPOSALS_IN_FLIGHT: usize = 1;

impl RegistryConfig {
    /// A member with default tunables whose bootstrap list is just itself.
    pub fn new(
        node_id: NodeId,
        advertise_addr: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        secret: ClusterSecret,
    ) -> RegistryConfig {
        let advertise_addr = advertise_addr.into();
        RegistryConfig {
            node_id,
            peers: BTreeMap::from([(node_id, advertise_addr.clone())]),
            advertise_addr,
            data_dir: data_dir.into(),
            secret,
            lease_sweep: DEFAULT_LEASE_SWEEP,
            raft: RegistryConfig::lan_raft_config(),
            max_raft_message_bytes: DEFAULT_MAX_RAFT_MESSAGE_BYTES,
            interest_proposals_in_flight: DEFAULT_INTEREST_PROPOSALS_IN_FLIGHT,
        }
    }

    /// Replaces the bootstrap list.
    pub fn with_peers(mut self, peers: BTreeMap<NodeId, String>) -> RegistryConfig {
        self.peers = peers;
        self
    }

    /// openraft tuned for members on one LAN: a heartbeat every 100 ms and elections after 300-600 ms of silence,
    /// so a dead leader is replaced in well under a second (the issue asks for new subscriptions to be visible
    /// cluster-wide within 2 s of a leader kill).
    pub fn lan_raft_config() -> openraft::Config {
        openraft::Config {
            cluster_name: "herald-registry".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            // A snapshot chunk is up to 3 MiB of JSON; openraft's 200 ms default is tight for that under load.
            install_snapshot_timeout: 1000,
            ..Default::default()
        }
    }

    /// The membership this member would initialize a new cluster with, if it is the one to do so.
    fn bootstrap_members(&self) -> Option<BTreeMap<NodeId, RegistryNode>> {
        let mut peers = self.peers.clone();
        if peers.is_empty() {
            peers.insert(self.node_id, self.advertise_addr.clone());
        }
        let smallest = *peers.keys().next()?;
        if smallest != self.node_id {
            // Not in the list at all (a joiner) or not the smallest: someone else initializes.
            return None;
        }
        peers.insert(self.node_id, self.advertise_addr.clone());
        Some(
            peers
                .into_iter()
                .map(|(id, addr)| (id, RegistryNode { addr }))
                .collect(),
        )
    }

    fn validate(&self) -> Result<openraft::Config, RegistryError> {
        crate::grpc::validate_host_port(&self.advertise_addr).map_err(|e| {
            RegistryError::Config(format!("advertise address {:?}: {e}", self.advertise_addr))
        })?;
        for (id, addr) in &self.peers {
            crate::grpc::validate_host_port(addr)
                .map_err(|e| RegistryError::Config(format!("peer {id} address {addr:?}: {e}")))?;
        }
        if self.lease_sweep.is_zero() {
            return Err(RegistryError::Config("lease_sweep must be positive".into()));
        }
        // Snapshot chunks travel as JSON arrays of numbers (up to 4 bytes per byte): they must fit a message.
        if self.raft.snapshot_max_chunk_size.saturating_mul(4) > self.max_raft_message_bytes as u64
        {
            return Err(RegistryError::Config(format!(
                "raft snapshot_max_chunk_size {} does not fit max_raft_message_bytes {} (keep it under a quarter)",
                self.raft.snapshot_max_chunk_size, self.max_raft_message_bytes
            )));
        }
        Ok(self.raft.clone().validate()?)
    }
}

/// Why a registry member could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The configuration is unusable.
    #[error("invalid registry configuration: {0}")]
    Config(String),
    /// openraft refused its configuration.
    #[error("invalid raft configuration: {0}")]
    RaftConfig(Box<openraft::ConfigError>),
    /// The data directory could not be opened.
    #[error("cannot open the registry store: {0}")]
    Store(#[from] StoreError),
    /// The raft node stopped (a storage failure, or it was shut down).
    #[error("raft stopped: {0}")]
    Raft(Box<Fatal<NodeId>>),
    /// The listener failed.
    #[error("registry listener: {0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("registry gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A background task panicked.
    #[error("a registry task failed: {0}")]
    Task(String),
}

// Boxed above because openraft's errors are large and would make every `Result` carrying this one large.
impl From<openraft::ConfigError> for RegistryError {
    fn from(e: openraft::ConfigError) -> Self {
        RegistryError::RaftConfig(Box::new(e))
    }
}

impl From<Fatal<NodeId>> for RegistryError {
    fn from(e: Fatal<NodeId>) -> Self {
        RegistryError::Raft(Box::new(e))
    }
}

/// Which leases the leader holds. `term` is set once the table was loaded for the current leadership term, so
/// calls that need it (keep-alive, lease ages) can tell "not loaded yet" from "no lease".
#[derive(Debug, Default)]
pub(crate) struct LeaderLeases {
    pub(crate) term: Option<u64>,
    pub(crate) table: Leases,
}

/// What the services and the leader duties share.
pub(crate) struct Core {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft<TypeConfig>,
    /// Reads the log's commit index for the metrics.
    pub(crate) log: LogReader,
    /// Lease expiries, commit latency.
    pub(crate) metrics: RegistryMetrics,
    pub(crate) state: StateMachineStore,
    /// Lock order: `leases`, then the state machine's lock (through `state.read_state`), never the reverse.
    pub(crate) leases: Mutex<LeaderLeases>,
    pub(crate) batcher: InterestBatcher,
    /// Registrations take it shared, a lease sweep exclusively: otherwise a `RemoveEdges` decided before an
    /// edge re-registered could commit after its registration and remove the fresh edge.
    pub(crate) edge_writes: tokio::sync::RwLock<()>,
    /// Cancelled when the member shuts down: ends watch streams (so connections can drain) and background tasks.
    pub(crate) shutdown: CancellationToken,
}

impl Core {
    /// The latest raft metrics.
    pub(crate) fn metrics(&self) -> RaftMetrics<NodeId, RegistryNode> {
        self.raft.metrics().borrow().clone()
    }
}

/// A running registry member, from [`start`]. Stop it with [`RegistryHandle::shutdown`]; dropping it leaves the
/// member running until the runtime ends.
pub struct RegistryHandle {
    core: Arc<Core>,
    local_addr: SocketAddr,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RegistryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryHandle")
            .field("node_id", &self.core.id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl RegistryHandle {
    /// This member's raft id.
    pub fn node_id(&self) -> NodeId {
        self.core.id
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The raft node (for metrics, waits, or direct writes in tests).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.core.raft
    }

    /// openraft's metrics, updated on every change.
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics<NodeId, RegistryNode>> {
        self.core.raft.metrics()
    }

    /// The state machine: the applied state and its change events.
    pub fn state_machine(&self) -> &StateMachineStore {
        &self.core.state
    }

    /// This member's metrics in the Prometheus text format (see [`crate::metrics`]).
    pub fn render_metrics(&self) -> String {
        crate::metrics::render(&self.core)
    }

    /// A renderer of this member's metrics that outlives the handle's borrow (for another `/metrics`).
    pub fn metrics_renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let core = self.core.clone();
        move || crate::metrics::render(&core)
    }

    /// Whether this member currently leads.
    pub fn is_leader(&self) -> bool {
        let metrics = self.core.raft.metrics();
        let m = metrics.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.core.id)
    }

    /// Stops the member: stops accepting calls and ends watch streams, stops raft and the background tasks, and
    /// waits (up to a few seconds) for open connections to finish. The data directory is left consistent.
    pub async fn shutdown(self) -> Result<(), RegistryError> {
        let RegistryHandle {
            core,
            local_addr: _,
            server,
            tasks,
        } = self;
        stop(core, server, tasks).await
    }
}

async fn stop(
    core: Arc<Core>,
    mut server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
) -> Result<(), RegistryError> {
    tracing::info!(node_id = core.id, "registry member shutting down");
    core.shutdown.cancel();
    let raft_result = core.raft.shutdown().await;
    for task in tasks {
        if let Err(e) = task.await {
            tracing::warn!(node_id = core.id, error = %e, "registry task failed");
        }
    }
    // The listener is already closed (tonic drops it on the signal); what remains are open connections
    // finishing their calls. Raft and watch streams have ended, so this is quick unless a peer misbehaves.
    let served = match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
        Ok(joined) => joined.map_err(|e| RegistryError::Task(e.to_string()))?,
        Err(_) => {
            tracing::warn!(
                node_id = core.id,
                timeout_ms = DRAIN_TIMEOUT.as_millis() as u64,
                "connections did not drain in time; cutting them off"
            );
            server.abort();
            Ok(())
        }
    };
    raft_result.map_err(|e| RegistryError::Task(format!("raft: {e}")))?;
    served?;
    tracing::info!(node_id = core.id, "registry member stopped");
    Ok(())
}

/// Starts a registry member serving on `listener` and returns once it serves (not once it has a leader).
pub async fn start(
    config: RegistryConfig,
    listener: TcpListener,
) -> Result<RegistryHandle, RegistryError> {
    let raft_config = Arc::new(config.validate()?);
    let local_addr = listener.local_addr()?;
    let id = config.node_id;

    // The store opens files and replays segments: blocking work, kept off the runtime's workers.
    let data_dir = config.data_dir.clone();
    let (log, state) = tokio::task::spawn_blocking(move || store::open(data_dir))
        .await
        .map_err(|e| RegistryError::Task(e.to_string()))??;
    let network = GrpcNetwork::new(id, config.secret.clone())
        .with_max_message_bytes(config.max_raft_message_bytes);
    let log_reader = log.reader();
    let raft = Raft::new(id, raft_config, network, log, state.clone()).await?;

    let core = Arc::new(Core {
        id,
        raft: raft.clone(),
        log: log_reader,
        metrics: RegistryMetrics::default(),
        state,
        leases: Mutex::new(LeaderLeases::default()),
        batcher: InterestBatcher::new(),
        edge_writes: tokio::sync::RwLock::new(()),
        shutdown: CancellationToken::new(),
    });

    let server = Server::builder()
        // Notices members and edges that vanished without closing their connections.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(raft_server(
            raft.clone(),
            config.secret.clone(),
            config.max_raft_message_bytes,
        ))
        .add_service(registry_server(
            core.clone(),
            config.secret.clone(),
            config.max_raft_message_bytes,
        ))
        .serve_with_incoming_shutdown(
            // Nagle off on accepted streams (`Server::tcp_nodelay` does not reach an incoming stream we pass
            // in): otherwise a response's trailers wait for the caller's delayed ACK, up to 40 ms per call.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            core.shutdown.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);

    let batcher = {
        let raft = raft.clone();
        let batch_core = core.clone();
        tokio::spawn(core.batcher.clone().run(
            move |request| {
                let raft = raft.clone();
                // Many edges' updates in one entry: a root span of its own, with the batch's size.
                let span = crate::grpc::registry_service::write_span(request.kind(), None);
                if let Request::Interest { changes } = &request {
                    span.record("herald.registry.updates", changes.len());
                }
                let core = batch_core.clone();
                async move {
                    let proposed = Instant::now();
                    let written = raft.client_write(request).instrument(span.clone()).await;
                    core.metrics.commit_duration.observe(proposed.elapsed());
                    if let Ok(written) = &written {
                        span.record("herald.registry.revision", written.log_id.index);
                    }
                    written
                        .map(|written| written.data)
                        .map_err(|e| e.to_string())
                }
            },
            config.interest_proposals_in_flight,
            core.shutdown.clone().cancelled_owned(),
        ))
    };
    let duties = tokio::spawn(leader_duties(core.clone(), config.lease_sweep));
    let elections = tokio::spawn(trace_elections(core.clone()));

    tracing::info!(
        node_id = id,
        listen = %local_addr,
        advertise = %config.advertise_addr,
        data_dir = %config.data_dir.display(),
        "registry member serving"
    );

    let handle = RegistryHandle {
        core,
        local_addr,
        server,
        tasks: vec![batcher, duties, elections],
    };
    if let Err(e) = bootstrap(&handle.core.raft, &config).await {
        let _ = handle.shutdown().await;
        return Err(e);
    }
    Ok(handle)
}

/// Runs a registry member on `listener` until `shutdown` resolves (or the server fails), then stops it. With
/// `http`, it also serves `/metrics`, `/livez` and `/readyz` there.
pub async fn run(
    config: RegistryConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RegistryError> {
    let RegistryHandle {
        core,
        local_addr: _,
        mut server,
        mut tasks,
    } = start(config, listener).await?;
    if let Some(http) = http {
        tasks.push(tokio::spawn(crate::http::serve(
            core.clone(),
            http,
            core.shutdown.clone(),
        )));
    }
    tokio::select! {
        _ = shutdown => stop(core, server, tasks).await,
        // The server only ends on its own when it failed.
        ended = &mut server => {
            core.shutdown.cancel();
            let _ = core.raft.shutdown().await;
            for task in tasks {
                let _ = task.await;
            }
            match ended {
                Ok(Ok(())) => Err(RegistryError::Task("the gRPC server stopped unexpectedly".into())),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(RegistryError::Task(e.to_string())),
            }
        }
    }
}

/// Initializes a new cluster when this member is the one to (see the module docs).
async fn bootstrap(raft: &Raft<TypeConfig>, config: &RegistryConfig) -> Result<(), RegistryError> {
    if raft.is_initialized().await? {
        tracing::info!(
            node_id = config.node_id,
            "raft state found on disk; rejoining"
        );
        return Ok(());
    }
    let Some(members) = config.bootstrap_members() else {
        tracing::info!(
            node_id = config.node_id,
            "waiting for the cluster to replicate to this member"
        );
        return Ok(());
    };
    let ids: BTreeSet<NodeId> = members.keys().copied().collect();
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(node_id = config.node_id, members = ?ids, "initialized a new cluster");
            Ok(())
        }
        // Someone (this member, in an earlier life, or a replicating leader) got there first: nothing to do.
        Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
            tracing::info!(node_id = config.node_id, reason = %e, "cluster already initialized");
            Ok(())
        }
        Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
            Err(RegistryError::Config(format!("cannot bootstrap: {e}")))
        }
        Err(RaftError::Fatal(e)) => Err(e.into()),
    }
}

/// While traces are exported, one span per election this member sees: from the first sight of a new term until
/// a leader of it is known, with the term, the leader and whether this member won. Watched through raft's
/// metrics, which coalesce, so a span starts at the first new term observed (an election settled between two
/// observations is a span of (almost) no duration, still with its outcome).
async fn trace_elections(core: Arc<Core>) {
    let mut metrics = core.raft.metrics();
    let mut last_term = metrics.borrow().current_term;
    let mut standing: Option<tracing::Span> = None;
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_term > last_term {
                last_term = m.current_term;
                standing = herald_telemetry::enabled().then(|| {
                    tracing::info_span!(
                        target: "herald::registry",
                        "raft.election",
                        otel.kind = "internal",
                        herald.registry.node_id = core.id,
                        herald.registry.term = m.current_term,
                        herald.registry.leader = tracing::field::Empty,
                        herald.registry.outcome = tracing::field::Empty,
                    )
                });
            }
            if let (Some(leader), Some(span)) = (m.current_leader, standing.as_ref()) {
                let outcome = if leader == core.id { "won" } else { "lost" };
                span.record("herald.registry.leader", leader)
                    .record("herald.registry.outcome", outcome);
                standing = None;
            }
        }
        tokio::select! {
            _ = core.shutdown.cancelled() => break,
            changed = metrics.changed() => if changed.is_err() { break },
        }
    }
}

/// Follows raft's metrics and runs [`lead`] for as long as this member leads.
async fn leader_duties(core: Arc<Core>, sweep: Duration) {
    let mut metrics = core.raft.metrics();
    let mut current: Option<(u64, CancellationToken, JoinHandle<()>)> = None;
    loop {
        let leading = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader && m.current_leader == Some(core.id))
                .then_some(m.current_term)
        };
        if current.as_ref().map(|(term, _, _)| *term) != leading {
            if let Some((term, token, task)) = current.take() {
                token.cancel();
                let _ = task.await;
                *core.leases.lock() = LeaderLeases::default();
                tracing::info!(node_id = core.id, term, "no longer leading; leases dropped");
            }
            if let Some(term) = leading {
                let token = core.shutdown.child_token();
                let task = tokio::spawn(lead(core.clone(), term, sweep, token.clone()));
                current = Some((term, token, task));
            }
        }
        tokio::select! {
            _ = core.shutdown.cancelled() => break,
            changed = metrics.changed() => if changed.is_err() { break },
        }
    }
    if let Some((_, token, task)) = current {
        token.cancel();
        let _ = task.await;
    }
}

/// The leader's work for one term: load the leases, then expire the silent ones until `token` is cancelled.
async fn lead(core: Arc<Core>, term: u64, sweep: Duration, token: CancellationToken) {
    // Applied up to everything committed before this term, or edges registered there would be missing below.
    loop {
        let confirmed = tokio::select! {
            _ = token.cancelled() => return,
            confirmed = core.raft.ensure_linearizable() => confirmed,
        };
        match confirmed {
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(node_id = core.id, term, error = %e, "leadership not confirmed yet");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(CONFIRM_RETRY) => {}
                }
            }
        }
    }
    {
        let mut leases = core.leases.lock();
        let edges: Vec<_> = core.state.read_state(|s| {
            s.edges
                .iter()
                .map(|(edge, record)| (edge.clone(), Duration::from_millis(record.ttl_ms)))
                .collect()
        });
        let count = edges.len();
        // A full TTL for every edge: none is expired because leadership moved.
        leases.table.restart(edges, Instant::now());
        leases.term = Some(term);
        tracing::info!(
            node_id = core.id,
            term,
            edges = count,
            "leading; edge leases restarted"
        );
    }

    let mut tick = tokio::time::interval(sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        if core.leases.lock().table.expired(Instant::now()).is_empty() {
            continue;
        }
        let _exclusive = tokio::select! {
            _ = token.cancelled() => return,
            guard = core.edge_writes.write() => guard,
        };
        // Again under the guard: a registration that finished while this waited renewed its lease.
        let expired = core.leases.lock().table.expired(Instant::now());
        if expired.is_empty() {
            continue;
        }
        let written = tokio::select! {
            _ = token.cancelled() => return,
            written = core.raft.client_write(Request::RemoveEdges { edges: expired.clone() }) => written,
        };
        match written {
            Ok(written) => {
                core.leases.lock().table.forget(&expired);
                core.metrics.lease_expiries.add(expired.len() as u64);
                tracing::info!(
                    node_id = core.id,
                    term,
                    edges = ?expired,
                    revision = written.data.revision,
                    "removed edges whose leases expired"
                );
            }
            // The leases stay expired in the table, so the next sweep proposes them again.
            Err(e) => tracing::warn!(
                node_id = core.id,
                term,
                edges = ?expired,
                error = %e,
                "could not remove expired edges; retrying at the next sweep"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: NodeId, peers: &[(NodeId, &str)]) -> RegistryConfig {
        RegistryConfig::new(
            id,
            format!("127.0.0.1:{}", 7000 + id),
            "/nonexistent",
            ClusterSecret::new("s").unwrap(),
        )
        .with_peers(peers.iter().map(|(i, a)| (*i, a.to_string())).collect())
    }

    #[test]
    fn only_the_smallest_listed_member_bootstraps() {
        let peers = [(1, "a:1"), (2, "b:2"), (3, "c:3")];
        let members = config(1, &peers).bootstrap_members().unwrap();
        assert_eq!(members.len(), 3);
        assert_eq!(
            members[&1].addr, "127.0.0.1:7001",
            "self uses its advertise address"
        );
        assert!(config(2, &peers).bootstrap_members().is_none());
        // A joiner listing the running members is never the one to initialize.
        assert!(config(4, &peers).bootstrap_members().is_none());
        assert_eq!(config(5, &[]).bootstrap_members().unwrap().len(), 1);
    }

    #[test]
    fn the_lan_defaults_validate() {
        config(1, &[]).validate().unwrap();
        let mut bad = config(1, &[]);
        bad.advertise_addr = "no-port".into();
        assert!(matches!(bad.validate(), Err(RegistryError::Config(_))));
    }
}
