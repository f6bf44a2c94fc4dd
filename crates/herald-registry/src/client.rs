//! [`RegistryClient`]: how edges and `herald ctl` talk to the registry's members.
//!
//! Writes go to the leader. The client remembers the last member that accepted a write, follows the
//! `x-herald-leader` hint a follower answers with, and otherwise tries the members in turn, pausing between rounds
//! (a round where no member takes the write is usually an election, which takes well under a second), until its
//! retry budget is spent. Each attempt has its own timeout, so one hung member costs one timeout, not the call.
//! Reads (`watch`, `status`) are served by any member.
//!
//! Retried writes are safe: registering again replaces what the edge held with the same thing, interest
//! changes are set operations, and re-adding a learner or re-applying the same voter set changes nothing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use herald_proto::v1 as pb;
use herald_proto::v1::registry_internal_client::RegistryInternalClient;

use crate::grpc::convert::change_from_proto;
use crate::grpc::{validate_host_port, ClusterSecret, CLUSTER_SECRET_HEADER, LEADER_HEADER};
use crate::state::Change;
use crate::types::NodeId;

/// How long one attempt (one member) may take by default.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a call keeps trying members by default before giving up. Longer than an election plus a few
/// attempts, so a leader change is ridden out rather than reported.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(10);

/// How long to wait for a connection to a member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The largest watch event accepted: a snapshot carries the whole registry state in one message.
pub const MAX_WATCH_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The pause after the first round in which no member took a call; it doubles up to [`MAX_ROUND_PAUSE`].
const FIRST_ROUND_PAUSE: Duration = Duration::from_millis(50);
/// Kept short: a round that fails fast is a few cheap calls, and an election ends within about a second (a
/// follower refuses votes for `election_timeout_max` after the last heartbeat, then one or two election timeouts),
/// so a long pause would mostly add latency after the new leader is already there.
const MAX_ROUND_PAUSE: Duration = Duration::from_millis(250);

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No member addresses were given.
    #[error("no registry member addresses given")]
    NoMembers,
    /// A member address is not `host:port`.
    #[error("invalid registry address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A member answered with an error that retrying elsewhere would not fix (a bad argument, a wrong secret,
    /// ...).
    #[error("registry refused the call: {} ({})", .0.message(), .0.code())]
    Status(Box<Status>),
    /// No member took the call within the retry budget (no leader, or none reachable).
    #[error("registry unavailable after {attempts} attempts: {last_error}")]
    Unavailable {
        /// How many attempts were made.
        attempts: u32,
        /// What the last one ran into.
        last_error: String,
    },
    /// A member sent something this client cannot read.
    #[error("malformed answer from the registry: {0}")]
    Malformed(String),
}

impl ClientError {
    /// The gRPC code this error amounts to (the member's own for [`ClientError::Status`]).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Status(status) => status.code(),
            ClientError::Unavailable { .. } => Code::Unavailable,
            ClientError::NoMembers | ClientError::InvalidAddress { .. } => Code::InvalidArgument,
            ClientError::Malformed(_) => Code::Internal,
        }
    }
}

/// The answer to a keep-alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveOutcome {
    /// The lease was renewed.
    Renewed,
    /// The registry holds no lease for the edge (it expired, or the edge never registered): register again with
    /// the full interest.
    UnknownEdge,
}

/// What a source claim achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This edge (or another) holds the source.
    Owner(String),
    /// The claiming edge is not registered: register again.
    UnknownEdge,
}

/// The answer to an interest update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterestOutcome {
    /// Committed at this revision.
    Committed(u64),
    /// The edge is not registered; nothing was applied. Register again with the full interest.
    UnknownEdge,
}

/// One watch event, converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchUpdate {
    /// The revision the registry is at after these changes; resume a watch from here.
    pub revision: u64,
    /// When true, `changes` is the whole state at `revision` (from empty): replace the replica with it.
    pub snapshot: bool,
    /// What changed, in order.
    pub changes: Vec<Change>,
}

/// Adds the cluster secret to every call.
#[derive(Clone)]
struct AttachSecret(MetadataValue<Ascii>);

impl Interceptor for AttachSecret {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, self.0.clone());
        // The caller's trace continues in the registry's write span (nothing unless traces are exported).
        herald_telemetry::inject_headers(
            &tracing::Span::current(),
            request.metadata_mut().as_mut(),
        );
        Ok(request)
    }
}

type Rpc = RegistryInternalClient<InterceptedService<Channel, AttachSecret>>;

/// What a failed attempt means for the next one.
enum Next {
    /// Try the named leader next.
    Redirect(String),
    /// Try another member.
    Retry,
    /// Give up: retrying cannot help.
    Fail,
}

fn classify(status: &Status) -> Next {
    match status.code() {
        Code::FailedPrecondition => match status
            .metadata()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(leader) => Next::Redirect(leader.to_string()),
            None => Next::Fail,
        },
        // Unavailable: no leader yet, a member down or stopping. The others are what transport failures and
        // calls cut off by a member's shutdown surface as. Aborted: a registration raced with a removal.
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Aborted => Next::Retry,
        _ => Next::Fail,
    }
}

struct Inner {
    members: Vec<String>,
    secret: AttachSecret,
    /// Channels by address: the configured members, and leaders learned from hints.
    channels: Mutex<HashMap<String, Channel>>,
    /// The member that last accepted a write.
    leader: Mutex<Option<String>>,
    /// Rotates the member watches start at, so many watchers spread over the members.
    next_watch: AtomicUsize,
}

/// A client of the registry's members. Cheap to clone: clones share channels and the known leader.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
    call_timeout: Duration,
    retry_budget: Duration,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("members", &self.inner.members)
            .field("leader", &*self.inner.leader.lock())
            .field("call_timeout", &self.call_timeout)
            .field("retry_budget", &self.retry_budget)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client of the members at `addrs` (`host:port` each), presenting `secret`. Connects lazily: no member
    /// needs to be up yet.
    pub fn new(addrs: Vec<String>, secret: ClusterSecret) -> Result<RegistryClient, ClientError> {
        let mut members: Vec<String> = Vec::new();
        for addr in addrs {
            validate_host_port(&addr).map_err(|reason| ClientError::InvalidAddress {
                addr: addr.clone(),
                reason,
            })?;
            if !members.contains(&addr) {
                members.push(addr);
            }
        }
        if members.is_empty() {
            return Err(ClientError::NoMembers);
        }
        let mut channels = HashMap::new();
        for addr in &members {
            channels.insert(addr.clone(), channel(addr)?);
        }
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                members,
                secret: AttachSecret(secret.metadata_value()),
                channels: Mutex::new(channels),
                leader: Mutex::new(None),
                next_watch: AtomicUsize::new(0),
            }),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
        })
    }

    /// Sets how long one attempt may take (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn with_call_timeout(mut self, timeout: Duration) -> RegistryClient {
        self.call_timeout = timeout;
        self
    }

    /// Sets how long a call keeps trying before it fails (default [`DEFAULT_RETRY_BUDGET`]).
    pub fn with_retry_budget(mut self, budget: Duration) -> RegistryClient {
        self.retry_budget = budget;
        self
    }

    /// The configured member addresses.
    pub fn members(&self) -> &[String] {
        &self.inner.members
    }

    /// The member that last accepted a write, if any.
    pub fn leader(&self) -> Option<String> {
        self.inner.leader.lock().clone()
    }

    /// Registers (or re-registers) `edge`, reachable by other edges at `peer_addr`, with a lease of `ttl` and
    /// `rooms` (room JSON) as its full interest. Whatever it held before is replaced. Returns the revision.
    pub async fn register(
        &self,
        edge: &str,
        peer_addr: &str,
        ttl: Duration,
        rooms: Vec<String>,
    ) -> Result<u64, ClientError> {
        let request = pb::RegisterRequest {
            edge: edge.to_string(),
            peer_addr: peer_addr.to_string(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            rooms,
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.register(request).await }
            })
            .await?;
        Ok(reply.revision)
    }

    /// Renews `edge`'s lease.
    pub async fn keep_alive(&self, edge: &str) -> Result<KeepAliveOutcome, ClientError> {
        let request = pb::KeepAliveRequest {
            edge: edge.to_string(),
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.keep_alive(request).await }
            })
            .await?;
        Ok(if reply.unknown {
            KeepAliveOutcome::UnknownEdge
        } else {
            KeepAliveOutcome::Renewed
        })
    }

    /// Reports rooms (room JSON) that gained their first (`add`) or lost their last (`remove`) local subscriber
    /// on `edge`.
    pub async fn update_interest(
        &self,
        edge: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<InterestOutcome, ClientError> {
        let request = pb::InterestRequest {
            edge: edge.to_string(),
            add,
            remove,
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.update_interest(request).await }
            })
            .await?;
        Ok(interest_outcome(&reply))
    }

    /// Interest updates for one edge over a long-lived stream to the leader: what an edge uses under load, since
    /// a message on an open stream costs far less than a unary call. The stream opens on the first update.
    pub fn interest_updates(&self, edge: &str) -> InterestUpdates {
        InterestUpdates {
            client: self.clone(),
            edge: edge.to_string(),
            open: None,
        }
    }

    /// Opens the interest stream on the leader, following hints like a write.
    async fn open_interest_stream(&self) -> Result<OpenInterestStream, ClientError> {
        let opened = self
            .call(true, |mut rpc| async move {
                // The edge sends its next request only after the previous reply, so one slot is enough.
                let (requests, outgoing) = mpsc::channel(1);
                let replies = rpc.interest_stream(ReceiverStream::new(outgoing)).await?;
                Ok(replies.map(|replies| (requests, replies)))
            })
            .await?;
        let (requests, replies) = opened;
        Ok(OpenInterestStream {
            member: self.leader().unwrap_or_default(),
            requests,
            replies,
        })
    }

    /// Follows the registry's changes after `from_revision` (0: from the start, which begins with a snapshot),
    /// from whichever member answers first.
    ///
    /// The stream ends (with an error, or without one when the member shuts down) when its member goes away;
    /// call `watch` again with the last revision received to resume, on another member if need be.
    pub async fn watch(&self, from_revision: u64) -> Result<WatchStream, ClientError> {
        let members = &self.inner.members;
        let start = self.inner.next_watch.fetch_add(1, Ordering::Relaxed) % members.len();
        let deadline = Instant::now() + self.retry_budget;
        let mut pause = FIRST_ROUND_PAUSE;
        let mut attempts = 0u32;
        let mut last_error = String::new();
        loop {
            for i in 0..members.len() {
                let addr = &members[(start + i) % members.len()];
                let now = Instant::now();
                if now >= deadline {
                    return Err(ClientError::Unavailable {
                        attempts,
                        last_error,
                    });
                }
                attempts += 1;
                let mut rpc = self
                    .rpc(addr)?
                    .max_decoding_message_size(MAX_WATCH_MESSAGE_BYTES);
                let request = pb::WatchRequest { from_revision };
                let limit = self.call_timeout.min(deadline - now);
                match tokio::time::timeout(limit, rpc.watch(request)).await {
                    Ok(Ok(response)) => {
                        tracing::debug!(member = %addr, from_revision, "watching the registry");
                        return Ok(WatchStream {
                            member: addr.clone(),
                            inner: response.into_inner(),
                            done: false,
                        });
                    }
                    Ok(Err(status)) => match classify(&status) {
                        Next::Fail => return Err(ClientError::Status(Box::new(status))),
                        Next::Redirect(_) | Next::Retry => {
                            last_error = format!("{addr}: {}", status.message());
                        }
                    },
                    Err(_) => last_error = format!("{addr}: no answer within {limit:?}"),
                }
            }
            pause = self.pause_before_next_round(deadline, pause).await;
        }
    }

    /// The cluster's status, as the leader sees it when it can be reached (only the leader knows replication lag
    /// and lease ages), otherwise as any member sees it.
    pub async fn status(&self) -> Result<pb::StatusReply, ClientError> {
        let reply = self
            .call(false, |mut rpc| async move {
                rpc.status(pb::StatusRequest {}).await
            })
            .await?;
        if reply.leader_id.is_some()
            && reply.leader_id != Some(reply.node_id)
            && !reply.leader_addr.is_empty()
        {
            if let Ok(leader) = self.member_status(&reply.leader_addr).await {
                return Ok(leader);
            }
        }
        Ok(reply)
    }

    /// One member's own view of the cluster, with a single attempt.
    pub async fn member_status(&self, addr: &str) -> Result<pb::StatusReply, ClientError> {
        let mut rpc = self.rpc(addr)?;
        match tokio::time::timeout(self.call_timeout, rpc.status(pb::StatusRequest {})).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(ClientError::Status(Box::new(status))),
            Err(_) => Err(ClientError::Unavailable {
                attempts: 1,
                last_error: format!("{addr}: no answer within {:?}", self.call_timeout),
            }),
        }
    }

    /// Adds member `node_id`, reachable at `addr`, as a learner (it receives the log but does not vote). Returns
    /// the membership entry's log index. Promote it with [`Self::change_membership`] once it caught up.
    pub async fn add_learner(&self, node_id: NodeId, addr: &str) -> Result<u64, ClientError> {
        let request = pb::AddLearnerRequest {
            node_id,
            addr: addr.to_string(),
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.add_learner(request).await }
            })
            .await?;
        Ok(reply.log_index)
    }

    /// Makes `voters` the voting members (each must be a member or learner already); members left out leave the
    /// cluster. Returns the membership entry's log index.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<u64, ClientError> {
        let request = pb::ChangeMembershipRequest {
            voters: voters.into_iter().collect(),
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.change_membership(request).await }
            })
            .await?;
        Ok(reply.log_index)
    }

    /// Removes learner `node_id` from the cluster (a voter is refused: leave through [`Self::change_membership`]).
    /// Returns the membership entry's log index.
    pub async fn remove_learner(&self, node_id: NodeId) -> Result<u64, ClientError> {
        let reply = self
            .call(true, move |mut rpc| async move {
                rpc.remove_learner(pb::RemoveLearnerRequest { node_id })
                    .await
            })
            .await?;
        Ok(reply.log_index)
    }

    /// Adds or replaces endpoint `name` (an `herald_routes::Endpoint` as JSON). A change that would make the
    /// route table invalid comes back as `INVALID_ARGUMENT` with the reason. Returns the revision.
    pub async fn put_endpoint(&self, name: &str, endpoint_json: &str) -> Result<u64, ClientError> {
        let request = pb::PutEndpointRequest {
            name: name.to_owned(),
            endpoint_json: endpoint_json.to_owned(),
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.put_endpoint(request).await }
            })
            .await?;
        Ok(reply.revision)
    }

    /// Removes endpoint `name` (refused with `FAILED_PRECONDITION` while a route uses it). Returns whether it
    /// existed.
    pub async fn delete_endpoint(&self, name: &str) -> Result<bool, ClientError> {
        let name = name.to_owned();
        let reply = self
            .call(true, move |mut rpc| {
                let name = name.clone();
                async move { rpc.delete_endpoint(pb::NameRequest { name }).await }
            })
            .await?;
        Ok(reply.changed)
    }

    /// Adds or replaces route `name` (an `herald_routes::Route` as JSON), validated like
    /// [`Self::put_endpoint`]. Returns the revision.
    pub async fn put_route(&self, name: &str, route_json: &str) -> Result<u64, ClientError> {
        let request = pb::PutRouteRequest {
            name: name.to_owned(),
            route_json: route_json.to_owned(),
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.put_route(request).await }
            })
            .await?;
        Ok(reply.revision)
    }

    /// Removes route `name`. Returns whether it existed.
    pub async fn delete_route(&self, name: &str) -> Result<bool, ClientError> {
        let name = name.to_owned();
        let reply = self
            .call(true, move |mut rpc| {
                let name = name.clone();
                async move { rpc.delete_route(pb::NameRequest { name }).await }
            })
            .await?;
        Ok(reply.changed)
    }

    /// Asks for `edge` to consume the external source of `route`; answers who holds it now.
    pub async fn claim_source(&self, route: &str, edge: &str) -> Result<ClaimOutcome, ClientError> {
        let request = pb::ClaimSourceRequest {
            route: route.to_owned(),
            edge: edge.to_owned(),
        };
        let reply = self
            .call(true, move |mut rpc| {
                let request = request.clone();
                async move { rpc.claim_source(request).await }
            })
            .await?;
        Ok(if reply.unknown_edge {
            ClaimOutcome::UnknownEdge
        } else {
            ClaimOutcome::Owner(reply.owner)
        })
    }

    /// Endpoints, routes and source owners, as any member has applied them.
    pub async fn list_routes(&self) -> Result<pb::ListRoutesReply, ClientError> {
        self.call(false, |mut rpc| async move {
            rpc.list_routes(pb::ListRoutesRequest {}).await
        })
        .await
    }

    /// The gRPC client for `addr`, making its channel the first time.
    fn rpc(&self, addr: &str) -> Result<Rpc, ClientError> {
        let channel = {
            let mut channels = self.inner.channels.lock();
            match channels.get(addr) {
                Some(channel) => channel.clone(),
                None => {
                    let made = channel(addr)?;
                    channels.insert(addr.to_string(), made.clone());
                    made
                }
            }
        };
        Ok(RegistryInternalClient::with_interceptor(
            channel,
            self.inner.secret.clone(),
        ))
    }

    /// The order to try members in: the known leader first, then the configured members.
    fn candidates(&self) -> VecDeque<String> {
        let mut order = VecDeque::with_capacity(self.inner.members.len() + 1);
        if let Some(leader) = self.inner.leader.lock().clone() {
            order.push_back(leader);
        }
        for addr in &self.inner.members {
            if !order.contains(addr) {
                order.push_back(addr.clone());
            }
        }
        order
    }

    /// Sleeps before the next round of attempts (never past `deadline`) and returns the next pause.
    async fn pause_before_next_round(&self, deadline: Instant, pause: Duration) -> Duration {
        let now = Instant::now();
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(now))).await;
        (pause * 2).min(MAX_ROUND_PAUSE)
    }

    /// Runs one call with retries. `to_leader`: the call is a write, so follow leader hints and remember who
    /// took it.
    async fn call<T, F, Fut>(&self, to_leader: bool, op: F) -> Result<T, ClientError>
    where
        F: Fn(Rpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.retry_budget;
        let mut pause = FIRST_ROUND_PAUSE;
        let mut queue = self.candidates();
        let mut tried: BTreeSet<String> = BTreeSet::new();
        let mut attempts = 0u32;
        let mut last_error = String::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable {
                    attempts,
                    last_error,
                });
            }
            let Some(addr) = queue.pop_front() else {
                // A whole round without success: most likely an election. Wait a little and go again.
                pause = self.pause_before_next_round(deadline, pause).await;
                queue = self.candidates();
                tried.clear();
                continue;
            };
            tried.insert(addr.clone());
            attempts += 1;
            let rpc = self.rpc(&addr)?;
            let limit = self.call_timeout.min(deadline - now);
            let status = match tokio::time::timeout(limit, op(rpc)).await {
                Ok(Ok(response)) => {
                    if to_leader {
                        *self.inner.leader.lock() = Some(addr);
                    }
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    last_error = format!("{addr}: no answer within {limit:?}");
                    self.forget_leader(&addr);
                    continue;
                }
            };
            last_error = format!("{addr}: {} ({})", status.message(), status.code());
            match classify(&status) {
                Next::Fail => return Err(ClientError::Status(Box::new(status))),
                Next::Redirect(leader) if to_leader && !tried.contains(&leader) => {
                    tracing::debug!(from = %addr, leader = %leader, "following the registry leader hint");
                    *self.inner.leader.lock() = Some(leader.clone());
                    queue.retain(|a| *a != leader);
                    queue.push_front(leader);
                }
                // A hint to a member already tried this round is stale (leadership is moving): go on.
                Next::Redirect(_) | Next::Retry => self.forget_leader(&addr),
            }
        }
    }

    fn forget_leader(&self, addr: &str) {
        let mut leader = self.inner.leader.lock();
        if leader.as_deref() == Some(addr) {
            *leader = None;
        }
    }
}

/// One edge's interest updates over a stream to the leader (see [`RegistryClient::interest_updates`]).
///
/// When the stream breaks (leadership moved, the member went away, no answer within the call timeout), the
/// update in flight is sent again with [`RegistryClient::update_interest`], which rides out an election, and
/// the next update reopens the stream on whoever leads then. Sending an update twice is safe: interest changes
/// are set operations.
pub struct InterestUpdates {
    client: RegistryClient,
    edge: String,
    open: Option<OpenInterestStream>,
}

impl std::fmt::Debug for InterestUpdates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterestUpdates")
            .field("edge", &self.edge)
            .field("member", &self.open.as_ref().map(|o| &o.member))
            .finish()
    }
}

struct OpenInterestStream {
    member: String,
    requests: mpsc::Sender<pb::InterestRequest>,
    replies: Streaming<pb::InterestReply>,
}

impl OpenInterestStream {
    async fn exchange(
        &mut self,
        request: pb::InterestRequest,
    ) -> Result<pb::InterestReply, Status> {
        self.requests
            .send(request)
            .await
            .map_err(|_| Status::unavailable("interest stream closed"))?;
        self.replies
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("interest stream ended"))
    }
}

impl InterestUpdates {
    /// Reports rooms (room JSON) that gained their first (`add`) or lost their last (`remove`) local subscriber
    /// on this edge, and waits for the raft entry holding them to commit.
    pub async fn update(
        &mut self,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<InterestOutcome, ClientError> {
        let request = pb::InterestRequest {
            edge: self.edge.clone(),
            add,
            remove,
        };
        if self.open.is_none() {
            match self.client.open_interest_stream().await {
                Ok(open) => self.open = Some(open),
                Err(e) => return Err(e),
            }
        }
        let open = self.open.as_mut().expect("opened above");
        let member = open.member.clone();
        match tokio::time::timeout(self.client.call_timeout, open.exchange(request.clone())).await {
            Ok(Ok(reply)) => return Ok(interest_outcome(&reply)),
            Ok(Err(status)) => match classify(&status) {
                Next::Redirect(leader) => *self.client.inner.leader.lock() = Some(leader),
                Next::Retry | Next::Fail => self.client.forget_leader(&member),
            },
            Err(_) => self.client.forget_leader(&member),
        }
        self.open = None;
        tracing::debug!(member = %member, "interest stream broke; retrying the update as a call");
        self.client
            .update_interest(&self.edge, request.add, request.remove)
            .await
    }
}

fn interest_outcome(reply: &pb::InterestReply) -> InterestOutcome {
    if reply.unknown_edge {
        InterestOutcome::UnknownEdge
    } else {
        InterestOutcome::Committed(reply.revision)
    }
}

/// A lazily connecting channel to a member.
fn channel(addr: &str) -> Result<Channel, ClientError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::InvalidAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // Watches are long-lived and mostly idle: pings notice a member that vanished without closing them.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// The events of one watch, from [`RegistryClient::watch`].
pub struct WatchStream {
    member: String,
    inner: tonic::Streaming<pb::WatchEvent>,
    done: bool,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl WatchStream {
    /// The member this stream comes from.
    pub fn member(&self) -> &str {
        &self.member
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchUpdate, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => None,
            Poll::Ready(Some(Ok(event))) => Some(convert_event(event)),
            Poll::Ready(Some(Err(status))) => Some(Err(ClientError::Status(Box::new(status)))),
        };
        // After an error the stream is over: the caller resumes from its last revision with a new watch.
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        Poll::Ready(item)
    }
}

fn convert_event(event: pb::WatchEvent) -> Result<WatchUpdate, ClientError> {
    let changes = event
        .changes
        .into_iter()
        .map(change_from_proto)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Malformed(e.to_string()))?;
    Ok(WatchUpdate {
        revision: event.revision,
        snapshot: event.snapshot,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new("s").unwrap()
    }

    #[test]
    fn addresses_are_checked_up_front() {
        assert!(matches!(
            RegistryClient::new(vec![], secret()),
            Err(ClientError::NoMembers)
        ));
        assert!(matches!(
            RegistryClient::new(vec!["http://a:1".into()], secret()),
            Err(ClientError::InvalidAddress { .. })
        ));
    }

    #[tokio::test]
    async fn the_known_leader_is_tried_first() {
        let client =
            RegistryClient::new(vec!["a:1".into(), "b:1".into(), "a:1".into()], secret()).unwrap();
        assert_eq!(client.members(), ["a:1", "b:1"]);
        *client.inner.leader.lock() = Some("c:1".into());
        assert_eq!(client.candidates(), ["c:1", "a:1", "b:1"]);
        client.forget_leader("c:1");
        assert_eq!(client.leader(), None);
    }

    #[test]
    fn only_hints_and_transient_failures_are_retried() {
        let mut hinted = Status::failed_precondition("not leader");
        hinted
            .metadata_mut()
            .insert(LEADER_HEADER, MetadataValue::from_static("l:1"));
        assert!(matches!(classify(&hinted), Next::Redirect(l) if l == "l:1"));
        assert!(matches!(classify(&Status::unavailable("x")), Next::Retry));
        assert!(matches!(
            classify(&Status::failed_precondition("x")),
            Next::Fail
        ));
        assert!(matches!(
            classify(&Status::unauthenticated("x")),
            Next::Fail
        ));
        assert!(matches!(
            classify(&Status::invalid_argument("x")),
            Next::Fail
        ));
    }
}
