//! The sending side of edge-to-edge forwarding: one [`PeerQueue`] and one task per peer edge.
//!
//! Publishers only ever push onto a peer's bounded queue — never a socket, never an `await` — so a slow or
//! partitioned peer costs its own queue filling up (and then counted drops), not latency for publishers or other
//! peers. Each peer's task owns the network side: it dials lazily (when there is something to send), opens one
//! `PeerInternal.Forward` stream, and drains the queue into [`ForwardBatch`]es, coalescing whatever piled up
//! while the previous batch was in flight. Acks are read concurrently with sending, in the same `select!`.
//!
//! Delivery is at most once: a publish that was sent when its stream broke is never resent (the peer may or may
//! not have delivered it, and a resend could duplicate), only counted under
//! `herald_peer_forward_drops_total{reason="stream_broken"}`. Publishes not yet sent survive a reconnect, in order.
//! One FIFO queue and one stream per peer is also what keeps a publisher's messages to a room in publish order.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;
use tonic::Request;

use herald_proto::v1::peer_internal_client::PeerInternalClient;
use herald_proto::v1::{ForwardBatch, ForwardedPublish};
use herald_registry::grpc::{ClusterSecret, InvalidSecret, CLUSTER_SECRET_HEADER};
use herald_registry::EdgeId;

use crate::metrics::Metrics;
use crate::peer_queue::{Forward, PeerQueue};

/// The default cap on one peer message, either way: a batch of forwards, or a batch's ack.
///
/// A single publish is at most `limits.max-publish-body-bytes` (1 MiB by default); batches are cut well below this
/// cap, so it only has to leave room for the biggest single publish plus its targets.
pub const DEFAULT_MAX_PEER_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Room left in every batch for the fields around the publishes (origin edge, framing).
const BATCH_OVERHEAD: usize = 4 * 1024;
/// HTTP/2 pings on an idle or busy link: they notice a peer host that vanished (no RST, no FIN) in seconds
/// instead of waiting for TCP's retransmission timeout, which is minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How peer links queue, batch and reconnect.
#[derive(Debug, Clone)]
pub struct PeerLinkConfig {
    /// Forwards queued per peer before further forwards to it are dropped.
    pub queue_capacity: usize,
    /// Publishes per [`ForwardBatch`], at most.
    pub max_batch: usize,
    /// Batches handed to the transport but not yet written, per peer. Small: the queue is where waiting should
    /// happen, because only there is it bounded in forwards and visible in metrics.
    pub in_flight_batches: usize,
    /// The cap on one message either way; use the same value as the peers' service.
    pub max_message_bytes: usize,
    /// How long dialing a peer and opening its stream may take before the attempt counts as failed.
    pub connect_timeout: Duration,
    /// The first wait after a failed attempt; it doubles per consecutive failure, up to `backoff_max`.
    pub backoff_initial: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
}

impl Default for PeerLinkConfig {
    fn default() -> Self {
        PeerLinkConfig {
            queue_capacity: 16 * 1024,
            max_batch: 256,
            in_flight_batches: 4,
            max_message_bytes: DEFAULT_MAX_PEER_MESSAGE_BYTES,
            connect_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What every link task needs, shared.
#[derive(Debug)]
struct Shared {
    edge_id: EdgeId,
    secret: MetadataValue<Ascii>,
    config: PeerLinkConfig,
    metrics: Arc<Metrics>,
}

/// One peer's queue and the token that stops its task.
#[derive(Debug)]
struct Link {
    addr: String,
    queue: Arc<PeerQueue>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    links: RwLock<HashMap<EdgeId, Link>>,
    /// Parent of every link's token: cancelled on [`PeerLinks::shutdown`] and when the last handle goes.
    closed: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// This edge's links to its peer edges, created on demand. Cheap to clone (a handle).
#[derive(Debug, Clone)]
pub struct PeerLinks {
    inner: Arc<Inner>,
}

impl PeerLinks {
    /// Links for edge `edge_id` (sent as `origin_edge`), presenting `secret` to every peer.
    pub fn new(
        edge_id: impl Into<EdgeId>,
        secret: &str,
        config: PeerLinkConfig,
        metrics: Arc<Metrics>,
    ) -> Result<PeerLinks, InvalidSecret> {
        // ClusterSecret validates exactly as the receiving side's does, so a secret this edge accepts for its own
        // service is one it can also send.
        ClusterSecret::new(secret)?;
        let mut secret =
            MetadataValue::try_from(secret).map_err(|_| InvalidSecret::NotPrintableAscii)?;
        secret.set_sensitive(true);
        let config = PeerLinkConfig {
            queue_capacity: config.queue_capacity.max(1),
            max_batch: config.max_batch.max(1),
            in_flight_batches: config.in_flight_batches.max(1),
            ..config
        };
        Ok(PeerLinks {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    edge_id: edge_id.into(),
                    secret,
                    config,
                    metrics,
                }),
                links: RwLock::new(HashMap::new()),
                closed: CancellationToken::new(),
            }),
        })
    }

    /// Queues `forward` for `peer` at `addr`, creating the link (or replacing it, when the peer's address changed).
    /// Never waits: `false` means the forward was dropped and counted (the peer's queue is full, or the links are
    /// shut down).
    pub fn push(&self, peer: &str, addr: &str, forward: Forward) -> bool {
        let metrics = &self.inner.shared.metrics;
        let existing = {
            let links = self.inner.links.read();
            links
                .get(peer)
                .filter(|link| link.addr == addr)
                .map(|link| link.queue.clone())
        };
        let Some(queue) = existing.or_else(|| self.open(peer, addr)) else {
            metrics.peer_forward_drops.inc("other");
            return false;
        };
        // Counted before the push so the gauge never dips below zero when the task takes it right away.
        metrics.peer_queue_depth.add(1);
        if queue.push(forward) {
            return true;
        }
        metrics.peer_queue_depth.add(-1);
        metrics.peer_forward_drops.inc("queue_full");
        let dropped = queue.dropped();
        // Logged on powers of two: visible when it starts, quiet while it keeps happening at a high rate.
        if dropped.is_power_of_two() {
            tracing::warn!(
                peer,
                addr,
                dropped,
                "peer queue full: dropping forwards to this peer"
            );
        }
        false
    }

    /// Makes (or re-points) the link to `peer`, starting its task. `None` once shut down or outside a runtime.
    fn open(&self, peer: &str, addr: &str) -> Option<Arc<PeerQueue>> {
        if self.inner.closed.is_cancelled() {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut links = self.inner.links.write();
        // Another publisher may have made it between our read and write locks.
        if let Some(link) = links.get(peer).filter(|link| link.addr == addr) {
            return Some(link.queue.clone());
        }
        let queue = match links.remove(peer) {
            // The peer re-registered elsewhere: keep what is queued for it, in order, for the new address.
            Some(old) => {
                tracing::info!(peer, old = %old.addr, new = addr, "peer address changed");
                old.stop.cancel();
                old.queue
            }
            None => {
                self.inner.shared.metrics.peer_links.add(1);
                Arc::new(PeerQueue::new(self.inner.shared.config.queue_capacity))
            }
        };
        let stop = self.inner.closed.child_token();
        runtime.spawn(run_link(
            self.inner.shared.clone(),
            peer.to_owned(),
            addr.to_owned(),
            queue.clone(),
            stop.clone(),
        ));
        links.insert(
            peer.to_owned(),
            Link {
                addr: addr.to_owned(),
                queue: queue.clone(),
                stop,
            },
        );
        Some(queue)
    }

    /// Drops the links for which `keep(peer, addr)` is false (the peer left the cluster), counting what was queued
    /// for them as dropped.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        let removed: Vec<(EdgeId, Link)> = {
            let mut links = self.inner.links.write();
            let gone: Vec<EdgeId> = links
                .iter()
                .filter(|(peer, link)| !keep(peer, &link.addr))
                .map(|(peer, _)| peer.clone())
                .collect();
            gone.into_iter()
                .filter_map(|peer| links.remove_entry(&peer))
                .collect()
        };
        for (peer, link) in removed {
            tracing::info!(peer, addr = %link.addr, "peer left the cluster; dropping its link");
            self.close_link(link);
        }
    }

    /// Drops the links to peers missing from `edges` (peer -> address) and re-points those whose address
    /// changed, keeping what is queued for them.
    pub fn sync_with(&self, edges: &HashMap<EdgeId, String>) {
        self.retain(|peer, _| edges.contains_key(peer));
        let moved: Vec<(EdgeId, String)> = self
            .inner
            .links
            .read()
            .iter()
            .filter_map(|(peer, link)| {
                let addr = edges.get(peer)?;
                (*addr != link.addr).then(|| (peer.clone(), addr.clone()))
            })
            .collect();
        for (peer, addr) in moved {
            self.open(&peer, &addr);
        }
    }

    fn close_link(&self, link: Link) {
        let metrics = &self.inner.shared.metrics;
        link.stop.cancel();
        let discarded = link.queue.discard();
        metrics.peer_queue_depth.add(-(discarded as i64));
        metrics.peer_forward_drops.add("other", discarded as u64);
        metrics.peer_links.add(-1);
    }

    /// Stops every link; later pushes are dropped. What was queued is counted as dropped.
    pub fn shutdown(&self) {
        self.inner.closed.cancel();
        let links: Vec<Link> = self.inner.links.write().drain().map(|(_, l)| l).collect();
        for link in links {
            self.close_link(link);
        }
    }

    /// The peers with a link, and the address each link dials.
    pub fn peers(&self) -> Vec<(EdgeId, String)> {
        self.inner
            .links
            .read()
            .iter()
            .map(|(peer, link)| (peer.clone(), link.addr.clone()))
            .collect()
    }

    /// Forwards waiting in `peer`'s queue (`None` without a link).
    pub fn queue_len(&self, peer: &str) -> Option<usize> {
        self.inner.links.read().get(peer).map(|l| l.queue.len())
    }

    /// The metrics the links count into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.shared.metrics
    }
}

/// Exponential backoff with jitter: consecutive failures wait 1x, 2x, 4x … the initial delay up to the cap, each
/// scaled by a random factor in [0.5, 1) so edges that lost the same peer at the same moment do not redial in
/// lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        // No rand dependency for one jitter draw per failure: a fresh RandomState is randomly keyed.
        let random = RandomState::new().build_hasher().finish();
        let factor = 0.5 + (random % 1000) as f64 / 2000.0;
        base.mul_f64(factor)
    }
}

/// How one stream attempt ended.
enum StreamEnd {
    /// The link was stopped.
    Stopped,
    /// Dialing, opening or the stream itself failed; `delivered` says whether the peer acknowledged anything, so
    /// a link that worked for a while starts its backoff over.
    Failed { delivered: bool },
}

/// One peer's task: dial, stream, back off, repeat, until stopped.
async fn run_link(
    shared: Arc<Shared>,
    peer: EdgeId,
    addr: String,
    queue: Arc<PeerQueue>,
    stop: CancellationToken,
) {
    let config = &shared.config;
    let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint
            .connect_timeout(config.connect_timeout)
            // Forwards are latency-bound; coalescing already happens in the batch, not in Nagle's algorithm.
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true),
        Err(e) => {
            // A registry bug or a misconfigured peer: nothing can be sent, so the queue fills and drops are
            // counted like any unreachable peer's, until the address changes (which replaces this task).
            tracing::error!(peer, addr, cause = %e, "peer address is not a valid URI authority");
            stop.cancelled().await;
            return;
        }
    };
    // Taken from the queue but not yet sent; kept across reconnects so nothing unsent is lost or reordered.
    let mut pending: VecDeque<Forward> = VecDeque::new();
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut failures: u64 = 0;
    loop {
        // Dial lazily: a link with nothing to send holds no connection and makes no attempts.
        if pending.is_empty() && queue.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = queue.ready() => continue,
            }
        }
        match stream_once(
            &shared,
            &peer,
            &addr,
            &endpoint,
            &queue,
            &mut pending,
            &stop,
        )
        .await
        {
            StreamEnd::Stopped => break,
            StreamEnd::Failed { delivered } => {
                if delivered {
                    backoff.reset();
                    failures = 0;
                }
                failures += 1;
                let delay = backoff.next_delay();
                tracing::debug!(
                    peer,
                    addr,
                    failures,
                    delay_ms = delay.as_millis() as u64,
                    "peer link backing off"
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let unsent = pending.len();
    if unsent > 0 {
        shared
            .metrics
            .peer_forward_drops
            .add("other", unsent as u64);
    }
}

/// Dials `peer`, opens a Forward stream and pumps the queue into it until the stream breaks or the link stops.
async fn stream_once(
    shared: &Shared,
    peer: &str,
    addr: &str,
    endpoint: &Endpoint,
    queue: &PeerQueue,
    pending: &mut VecDeque<Forward>,
    stop: &CancellationToken,
) -> StreamEnd {
    let config = &shared.config;
    let metrics = &shared.metrics;
    let failed = StreamEnd::Failed { delivered: false };

    // tonic only bounds the TCP connect; the whole dial is bounded here so an address that accepts TCP but
    // never speaks HTTP/2 cannot park the link.
    let channel = tokio::select! {
        _ = stop.cancelled() => return StreamEnd::Stopped,
        dialed = tokio::time::timeout(config.connect_timeout, endpoint.connect()) => match dialed {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                tracing::warn!(peer, addr, cause = %e, "cannot reach peer edge");
                return failed;
            }
            Err(_) => {
                tracing::warn!(peer, addr, "dialing peer edge timed out");
                return failed;
            }
        },
    };
    let mut client = PeerInternalClient::new(channel)
        .max_encoding_message_size(config.max_message_bytes)
        .max_decoding_message_size(config.max_message_bytes);
    let (tx, rx) = mpsc::channel::<ForwardBatch>(config.in_flight_batches);
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(CLUSTER_SECRET_HEADER, shared.secret.clone());
    // The call resolves on the peer's response headers, which it sends at once; a peer that accepted the
    // connection but never answers is as good as down.
    let mut acks = tokio::select! {
        _ = stop.cancelled() => return StreamEnd::Stopped,
        opened = tokio::time::timeout(config.connect_timeout, client.forward(request)) => match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                tracing::warn!(peer, addr, code = ?status.code(), message = status.message(), "peer edge refused the forward stream");
                return failed;
            }
            Err(_) => {
                tracing::warn!(peer, addr, "peer edge did not answer the forward stream in time");
                return failed;
            }
        },
    };
    tracing::info!(peer, addr, "forward stream open");

    let budget = config
        .max_message_bytes
        .saturating_sub(BATCH_OVERHEAD)
        .max(1);
    let mut sent_through: u64 = 0;
    let mut acked_through: u64 = 0;
    let end = loop {
        tokio::select! {
            // Stopping and acks first: neither may starve behind a busy queue.
            biased;
            _ = stop.cancelled() => break StreamEnd::Stopped,
            ack = acks.message() => match ack {
                Ok(Some(ack)) => {
                    // Never trust a peer's number beyond what was sent.
                    let through = ack.through_seq.min(sent_through);
                    if through > acked_through {
                        metrics.peer_forwards.add(through - acked_through);
                        acked_through = through;
                    }
                }
                Ok(None) => {
                    tracing::warn!(peer, addr, "peer edge ended the forward stream");
                    break StreamEnd::Failed { delivered: acked_through > 0 };
                }
                Err(status) => {
                    tracing::warn!(peer, addr, code = ?status.code(), message = status.message(), "forward stream broke");
                    break StreamEnd::Failed { delivered: acked_through > 0 };
                }
            },
            permit = tx.reserve(), if !pending.is_empty() || !queue.is_empty() => {
                let Ok(permit) = permit else {
                    tracing::warn!(peer, addr, "forward stream's request side closed");
                    break StreamEnd::Failed { delivered: acked_through > 0 };
                };
                if pending.is_empty() {
                    let taken = queue.take_batch(config.max_batch);
                    metrics.peer_queue_depth.add(-(taken.len() as i64));
                    pending.extend(taken);
                }
                let batch = next_batch(shared, pending, budget, &mut sent_through);
                if !batch.publishes.is_empty() {
                    permit.send(batch);
                }
            }
            _ = queue.ready(), if pending.is_empty() && queue.is_empty() => {}
        }
    };
    let lost = sent_through - acked_through;
    if lost > 0 {
        let reason = match end {
            StreamEnd::Stopped => "other",
            StreamEnd::Failed { .. } => "stream_broken",
        };
        metrics.peer_forward_drops.add(reason, lost);
        tracing::warn!(peer, addr, lost, "forwards in flight lost with the stream");
    }
    end
}

/// Cuts the next batch off `pending`: at most `max_batch` publishes and about `budget` bytes, numbering each.
fn next_batch(
    shared: &Shared,
    pending: &mut VecDeque<Forward>,
    budget: usize,
    seq: &mut u64,
) -> ForwardBatch {
    let mut publishes = Vec::new();
    let mut bytes = 0;
    while publishes.len() < shared.config.max_batch {
        let Some(forward) = pending.front() else {
            break;
        };
        let size = encoded_size(forward);
        if size > budget {
            // Could never be sent: the peer would refuse the whole batch and break the stream.
            pending.pop_front();
            shared.metrics.peer_forward_drops.inc("other");
            tracing::warn!(
                size,
                budget,
                "forward too large for a peer message; dropped"
            );
            continue;
        }
        if bytes + size > budget {
            break;
        }
        bytes += size;
        let forward = pending.pop_front().expect("front exists");
        *seq += 1;
        publishes.push(ForwardedPublish {
            seq: *seq,
            rooms: forward.rooms.to_vec(),
            data_json: forward.data.clone(),
            users: forward.users.to_vec(),
            connections: forward.connections.to_vec(),
            all: forward.all,
            traceparent: forward
                .traceparent
                .as_deref()
                .unwrap_or_default()
                .to_owned(),
        });
    }
    ForwardBatch {
        origin_edge: shared.edge_id.clone(),
        publishes,
    }
}

/// An upper bound on a forward's protobuf size: its strings and data plus a tag and length per field.
fn encoded_size(forward: &Forward) -> usize {
    let strings = forward
        .rooms
        .iter()
        .chain(forward.users.iter())
        .chain(forward.connections.iter());
    let (count, text) = strings.fold((0, 0), |(n, len), s| (n + 1, len + s.len()));
    let traceparent = forward.traceparent.as_deref().map_or(0, str::len);
    forward.data.len() + text + traceparent + 11 * (count + 5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn forward(data: &str) -> Forward {
        Forward {
            rooms: Arc::from(vec![r#"{"r":1}"#.to_string()]),
            users: Arc::from([]),
            connections: Arc::from([]),
            all: false,
            traceparent: None,
            data: Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    fn links(config: PeerLinkConfig) -> PeerLinks {
        PeerLinks::new("self", "secret", config, Arc::new(Metrics::default())).unwrap()
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        for (delay, base) in delays.iter().zip([100, 200, 400, 400, 400]) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base / 2 && *delay < base,
                "{delay:?} for base {base:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }

    #[test]
    fn batches_respect_count_and_bytes_and_number_in_order() {
        let shared = Shared {
            edge_id: "self".into(),
            secret: MetadataValue::from_static("s"),
            config: PeerLinkConfig {
                max_batch: 3,
                ..PeerLinkConfig::default()
            },
            metrics: Arc::new(Metrics::default()),
        };
        let mut pending: VecDeque<Forward> = (0..5).map(|i| forward(&i.to_string())).collect();
        let mut seq = 0;
        let batch = next_batch(&shared, &mut pending, 1 << 20, &mut seq);
        assert_eq!(
            batch.publishes.iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(batch.origin_edge, "self");
        // A budget that fits one forward cuts batches to one.
        let one = encoded_size(&pending[0]);
        let batch = next_batch(&shared, &mut pending, one, &mut seq);
        assert_eq!(batch.publishes.len(), 1);
        assert_eq!(&batch.publishes[0].data_json[..], b"3");
        // One that fits none drops (and counts) instead of wedging the link.
        pending.push_back(forward(&"x".repeat(100)));
        let batch = next_batch(&shared, &mut pending, one, &mut seq);
        assert_eq!(batch.publishes.len(), 1, "the small one still goes");
        assert!(pending.is_empty());
        assert_eq!(shared.metrics.peer_forward_drops.get("other"), 1);
    }

    #[test]
    fn secrets_are_checked_like_the_service_does() {
        let metrics = Arc::new(Metrics::default());
        let bad = PeerLinks::new("e", "", PeerLinkConfig::default(), metrics.clone());
        assert_eq!(bad.unwrap_err(), InvalidSecret::Empty);
        let bad = PeerLinks::new("e", "a b", PeerLinkConfig::default(), metrics);
        assert_eq!(bad.unwrap_err(), InvalidSecret::NotPrintableAscii);
    }

    #[tokio::test]
    async fn full_queues_drop_and_count_and_departed_peers_are_dropped() {
        let links = links(PeerLinkConfig {
            queue_capacity: 2,
            // Far beyond the test, so nothing is dialed successfully or taken off the queue.
            connect_timeout: Duration::from_secs(60),
            ..PeerLinkConfig::default()
        });
        let metrics = links.metrics().clone();
        // Nothing listens on the discard port: dials fail, and only an open stream ever takes from the queue.
        for i in 0..5 {
            links.push("p", "127.0.0.1:9", forward(&i.to_string()));
        }
        assert_eq!(metrics.peer_forward_drops.get("queue_full"), 3);
        assert_eq!(metrics.peer_queue_depth.get(), 2);
        assert_eq!(metrics.peer_links.get(), 1);
        assert_eq!(links.queue_len("p"), Some(2));

        // A new address keeps the queue (and its order) and the link count.
        links.push("p", "127.0.0.1:10", forward("x"));
        assert_eq!(
            links.peers(),
            vec![("p".to_string(), "127.0.0.1:10".to_string())]
        );
        assert_eq!(metrics.peer_links.get(), 1);
        assert_eq!(metrics.peer_forward_drops.get("queue_full"), 4);

        links.retain(|_, _| false);
        assert_eq!(metrics.peer_links.get(), 0);
        assert_eq!(metrics.peer_queue_depth.get(), 0);
        assert_eq!(metrics.peer_forward_drops.get("other"), 2);
        assert!(links.peers().is_empty());

        links.shutdown();
        assert!(!links.push("p", "127.0.0.1:9", forward("late")));
        assert_eq!(metrics.peer_forward_drops.get("other"), 3);
    }
}
