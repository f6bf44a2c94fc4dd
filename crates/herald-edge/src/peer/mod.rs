//! Edge-to-edge forwarding of publishes.
//!
//! A publish accepted by this edge is delivered locally first, then handed to [`Cluster::forward`], which asks
//! the local [`ClusterView`] which other edges want it and pushes it onto each one's queue ([`links`]). Each peer
//! delivers what it receives to its own subscribers ([`service`]) and never forwards again: one hop.
//!
//! - Room targets go to the peers whose registered interest matches (same wildcard rules as local delivery).
//! - User, connection and `all` targets go to every known peer: the registry tracks rooms, not who is connected
//!   where, and such a target can match a connection on any edge.
//!
//! Publishing reads only the local replica, never the registry, so it keeps working while the registry is
//! electing or down (with the interest it last saw).

pub mod links;
pub(crate) mod service;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use herald_protocol::Room;
use herald_registry::grpc::{ClusterSecret, InvalidSecret};
use herald_registry::{Change, EdgeId};

use crate::cluster_view::ClusterView;
use crate::hub::Target;
use crate::metrics::Metrics;
use crate::peer_queue::Forward;
use crate::server::State;

pub use links::{PeerLinkConfig, PeerLinks, DEFAULT_MAX_PEER_MESSAGE_BYTES};

/// How often links to peers that left the view are dropped, for views updated without [`Cluster::apply`].
const LINK_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How long peers' open forward streams get after the peer listener stops. Short: peers hold their stream open
/// forever, so waiting for them to finish is pointless; they see the stream break and redial.
const PEER_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// This edge's membership in a cluster: who it is, the replica it routes by, and its links to the other edges.
#[derive(Debug)]
pub struct Cluster {
    edge_id: EdgeId,
    view: Arc<RwLock<ClusterView>>,
    links: PeerLinks,
    secret: ClusterSecret,
    max_message_bytes: usize,
}

impl Cluster {
    /// Edge `edge_id` routing by `view` (which the registry client keeps up to date), presenting and requiring
    /// `secret` on peer streams. `metrics` is the edge's metrics: the server adopts them, so the peer series
    /// appear on this edge's `/metrics`.
    pub fn new(
        edge_id: impl Into<EdgeId>,
        secret: &str,
        view: Arc<RwLock<ClusterView>>,
        config: PeerLinkConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, InvalidSecret> {
        let edge_id = edge_id.into();
        let max_message_bytes = config.max_message_bytes;
        Ok(Cluster {
            secret: ClusterSecret::new(secret)?,
            links: PeerLinks::new(edge_id.clone(), secret, config, metrics)?,
            edge_id,
            view,
            max_message_bytes,
        })
    }

    /// This edge's id.
    pub fn edge_id(&self) -> &str {
        &self.edge_id
    }

    /// The replica publishes are routed by.
    pub fn view(&self) -> &Arc<RwLock<ClusterView>> {
        &self.view
    }

    /// The links to peer edges.
    pub fn links(&self) -> &PeerLinks {
        &self.links
    }

    /// The metrics this edge counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.links.metrics()
    }

    /// Applies registry changes made at `revision` to the view, then drops links to edges that left.
    pub fn apply(&self, revision: u64, changes: &[Change]) {
        self.view.write().apply(revision, changes);
        self.sync_links();
    }

    /// Replaces the view with a snapshot taken at `revision`, then drops links to edges that left.
    pub fn reset(&self, revision: u64, snapshot: &[Change]) {
        self.view.write().reset(revision, snapshot);
        self.sync_links();
    }

    /// Brings the links in step with the view: drops links to edges no longer in it and re-points links whose
    /// edge re-registered at another address.
    pub fn sync_links(&self) {
        // Copied so the view's lock is never held while the links' is taken.
        let edges = self.view.read().edges().clone();
        self.links.sync_with(&edges);
    }

    /// Queues a publish that was just delivered locally for every peer edge that wants it; returns how many peers
    /// it was queued for. Never waits (see [`PeerLinks::push`]).
    pub fn forward(&self, targets: &[Target], data: &Bytes, traceparent: Option<&str>) -> usize {
        let rooms: Vec<&Room> = targets
            .iter()
            .filter_map(|t| match t {
                Target::Room(room) => Some(room),
                _ => None,
            })
            .collect();
        let direct = rooms.len() < targets.len();
        let peers = {
            let view = self.view.read();
            if direct {
                view.edges()
                    .iter()
                    .filter(|(edge, _)| **edge != self.edge_id)
                    .map(|(edge, addr)| (edge.clone(), addr.clone()))
                    .collect()
            } else if rooms.is_empty() {
                vec![]
            } else {
                view.peers_for(rooms.iter().copied(), &self.edge_id)
            }
        };
        if peers.is_empty() {
            return 0;
        }
        // Built once and shared by every peer's queue.
        let mut users = vec![];
        let mut connections = vec![];
        let mut all = false;
        for target in targets {
            match target {
                Target::User(user) => users.push(user.clone()),
                Target::Connection(id) => connections.push(id.clone()),
                Target::All => all = true,
                Target::Room(_) => {}
            }
        }
        let forward = Forward {
            rooms: rooms.iter().map(|r| r.canonical_json()).collect(),
            users: users.into(),
            connections: connections.into(),
            all,
            data: data.clone(),
            traceparent: traceparent.map(Arc::from),
        };
        let mut queued = 0;
        for (peer, addr) in &peers {
            if self.links.push(peer, addr, forward.clone()) {
                queued += 1;
            }
        }
        queued
    }
}

/// What [`crate::server::run_with_cluster`] needs to run an edge as a cluster member.
#[derive(Debug)]
pub struct ClusterNode {
    /// The cluster handle; the edge forwards through it and adopts its metrics.
    pub cluster: Arc<Cluster>,
    /// Where this edge serves `PeerInternal` to the other edges (the address it registers as its peer address).
    pub peer: TcpListener,
    /// The registry to register with and watch. `None` leaves the view to the caller (tests feed it by hand).
    pub registry: Option<crate::registry_link::RegistryAttachment>,
}

/// The running peer side of an edge: the `PeerInternal` server and the link maintenance.
pub(crate) struct PeerTasks {
    cluster: Arc<Cluster>,
    stop: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    sync: JoinHandle<()>,
}

/// Serves `PeerInternal` on `listener` and keeps the links in step with the view, until [`PeerTasks::stop`].
pub(crate) fn start(state: Arc<State>, node: ClusterNode) -> PeerTasks {
    let ClusterNode {
        cluster,
        peer: listener,
        registry: _,
    } = node;
    let stop = CancellationToken::new();
    let service = service::peer_server(state, cluster.secret.clone(), cluster.max_message_bytes);
    // Nagle off on accepted streams: `Server::tcp_nodelay` does not reach an incoming stream we pass in.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned())
            .await
    });
    let sync_stop = stop.clone();
    let sync_cluster = cluster.clone();
    let sync = tokio::spawn(async move {
        let mut tick = tokio::time::interval(LINK_SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sync_stop.cancelled() => break,
                _ = tick.tick() => sync_cluster.sync_links(),
            }
        }
    });
    PeerTasks {
        cluster,
        stop,
        server,
        sync,
    }
}

impl PeerTasks {
    /// Stops serving peers. Called after the publish APIs stopped, so nothing forwards any more either.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.sync.await;
        let abort = self.server.abort_handle();
        match tokio::time::timeout(PEER_SHUTDOWN_GRACE, self.server).await {
            Ok(Ok(Err(e))) => tracing::warn!(cause = %e, "peer server ended with an error"),
            Ok(Err(e)) => tracing::warn!(cause = %e, "peer server task failed"),
            Ok(Ok(Ok(()))) | Err(_) => abort.abort(),
        }
        self.cluster.links.shutdown();
    }
}
