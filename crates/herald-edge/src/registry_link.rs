//! An edge's side of the registry: registration and lease, interest updates, and the watch that feeds the
//! local [`ClusterView`].
//!
//! The consistency model, in short: the registry is the cluster's memory, not a gate. While it is unreachable
//! (electing a leader, or down entirely) the edge keeps accepting subscriptions and delivering locally, keeps
//! forwarding publishes with its cached replica, and keeps its interest changes queued in the
//! [`InterestTracker`]; when the registry answers again the queue drains and the replicas converge. If the
//! edge's lease lapsed meanwhile, the registry has forgotten it: it registers again with its full interest.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use herald_registry::client::{InterestOutcome, KeepAliveOutcome, RegistryClient};

use crate::bridge::Bridges;
use crate::hub::Hub;
use crate::interest::InterestTracker;
use crate::peer::Cluster;

/// Room changes one interest update carries at most (the registry folds many updates into one raft entry).
const MAX_INTEREST_BATCH: usize = 4096;
/// Retry pacing when the registry does not answer.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Who this edge is to the cluster.
#[derive(Debug, Clone)]
pub struct EdgeIdentity {
    /// The edge's id.
    pub edge_id: String,
    /// Where other edges reach its peer listener.
    pub peer_addr: String,
    /// Its lease TTL.
    pub lease_ttl: Duration,
    /// How long interest changes may wait to be batched.
    pub interest_flush: Duration,
}

/// What a cluster edge needs to reach the registry: a client and who it is.
#[derive(Debug, Clone)]
pub struct RegistryAttachment {
    /// The registry client.
    pub client: RegistryClient,
    /// The edge's identity.
    pub identity: EdgeIdentity,
}

/// Everything the link needs from the edge.
#[derive(Debug, Clone)]
pub(crate) struct RegistryLink {
    /// The registry client.
    pub(crate) client: RegistryClient,
    /// The edge's identity.
    pub(crate) identity: EdgeIdentity,
    /// The local hub (for the full interest on registration).
    pub(crate) hub: Arc<Hub>,
    /// Interest transitions waiting to be sent.
    pub(crate) tracker: Arc<InterestTracker>,
    /// The cluster handle whose view (and peer links) the watch keeps current.
    pub(crate) cluster: Arc<Cluster>,
    /// The bridges, which follow the route table and source owners, and stop their sources when the lease
    /// cannot be renewed.
    pub(crate) bridges: Arc<Bridges>,
}

/// A doubling delay between retries, reset after a success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(MIN_BACKOFF)
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }

    fn reset(&mut self) {
        self.0 = MIN_BACKOFF;
    }
}

impl RegistryLink {
    /// Runs registration, keep-alives, interest updates and the watch until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let registered = Arc::new(tokio::sync::Notify::new());
        let needs_register = Arc::new(std::sync::atomic::AtomicBool::new(true));
        tokio::select! {
            _ = self.clone().lease_loop(needs_register.clone(), registered.clone()) => {}
            _ = self.clone().interest_loop(needs_register.clone(), registered.clone()) => {}
            _ = self.clone().watch_loop() => {}
            _ = shutdown.cancelled() => {}
        }
    }

    /// Registers with the full local interest. Pending transitions are dropped first: the snapshot taken after
    /// covers them (a transition racing the snapshot is recorded again and is idempotent at the registry).
    async fn register(&self) -> bool {
        self.tracker.clear();
        let rooms = self.hub.local_interest();
        let id = &self.identity;
        match self
            .client
            .register(&id.edge_id, &id.peer_addr, id.lease_ttl, rooms)
            .await
        {
            Ok(revision) => {
                self.bridges.lease_renewed();
                tracing::info!(edge = %id.edge_id, revision, "registered with the registry");
                true
            }
            Err(e) => {
                tracing::warn!(edge = %id.edge_id, cause = %e, "registration failed; retrying");
                false
            }
        }
    }

    async fn lease_loop(
        self,
        needs_register: Arc<std::sync::atomic::AtomicBool>,
        registered: Arc<tokio::sync::Notify>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut backoff = Backoff::new();
        let renew_every = self.identity.lease_ttl / 3;
        loop {
            if needs_register.load(SeqCst) {
                if self.register().await {
                    needs_register.store(false, SeqCst);
                    registered.notify_waiters();
                    backoff.reset();
                } else {
                    backoff.wait().await;
                    continue;
                }
            }
            tokio::time::sleep(renew_every).await;
            match self.client.keep_alive(&self.identity.edge_id).await {
                Ok(KeepAliveOutcome::Renewed) => {
                    self.bridges.lease_renewed();
                    backoff.reset();
                }
                Ok(KeepAliveOutcome::UnknownEdge) => {
                    tracing::warn!(edge = %self.identity.edge_id, "lease lapsed; registering again");
                    needs_register.store(true, SeqCst);
                }
                // The registry may be electing a leader: keep trying; the lease outlives a short outage.
                Err(e) => {
                    tracing::debug!(cause = %e, "keep-alive failed");
                    backoff.wait().await;
                }
            }
        }
    }

    async fn interest_loop(
        self,
        needs_register: Arc<std::sync::atomic::AtomicBool>,
        registered: Arc<tokio::sync::Notify>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut backoff = Backoff::new();
        let mut updates = self.client.interest_updates(&self.identity.edge_id);
        loop {
            if needs_register.load(SeqCst) {
                // Registration sends the full interest; nothing to do until it has.
                tokio::select! {
                    _ = registered.notified() => {}
                    _ = tokio::time::sleep(MAX_BACKOFF) => {}
                }
                continue;
            }
            if self.tracker.pending_len() == 0 {
                self.tracker.changed().await;
                // Let a burst of transitions gather into one update.
                tokio::time::sleep(self.identity.interest_flush).await;
            }
            let batch = self.tracker.take_batch(MAX_INTEREST_BATCH);
            if batch.is_empty() {
                continue;
            }
            match updates
                .update(batch.add.clone(), batch.remove.clone())
                .await
            {
                Ok(InterestOutcome::Committed(_)) => backoff.reset(),
                Ok(InterestOutcome::UnknownEdge) => {
                    needs_register.store(true, SeqCst);
                }
                Err(e) => {
                    tracing::debug!(cause = %e, changes = batch.len(), "interest update failed; will retry");
                    self.tracker.restore(batch);
                    backoff.wait().await;
                }
            }
        }
    }

    async fn watch_loop(self) {
        let mut backoff = Backoff::new();
        loop {
            let from = self.cluster.view().read().revision();
            let mut stream = match self.client.watch(from).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(cause = %e, "watch failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            };
            while let Some(update) = stream.next().await {
                match update {
                    Ok(update) => {
                        backoff.reset();
                        if update.snapshot {
                            self.cluster.reset(update.revision, &update.changes);
                        } else {
                            self.cluster.apply(update.revision, &update.changes);
                        }
                        self.bridges
                            .apply_registry(update.snapshot, &update.changes);
                    }
                    Err(e) => {
                        tracing::debug!(cause = %e, "watch stream broke; resuming");
                        break;
                    }
                }
            }
            backoff.wait().await;
        }
    }
}
